"""The library's layers (platform/layers.yaml): every import, those inside functions included, goes down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = REPO / "platform" / "perceive_ir"
APPS = [REPO / "jobs", REPO / "dataset_tools", REPO / "benchmarks"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules(package: Path) -> dict[str, Path]:
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imports(path: Path, name: str, modules: dict[str, Path]):
    """``(target module, imported name or None, line)`` of every import in ``path``, at any depth."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule, None, node.lineno) if submodule in modules else (base, alias.name, node.lineno)


def package_of(module: str) -> str:
    """The top-level package (or module) of perceive_ir that ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def load_layers(path: Path) -> tuple[dict[str, int], dict[str, list[str]]]:
    table = yaml.safe_load(path.read_text())
    rank = {package: level for level, packages in enumerate(table["layers"]) for package in packages}
    return rank, table.get("sideways") or {}


def layer_violations(package: Path, layers_file: Path) -> list[str]:
    """Every import of ``package`` that goes up or sideways, or reaches a private name of another module."""
    rank, sideways = load_layers(layers_file)
    modules = library_modules(package)
    found = []
    for name, path in modules.items():
        source = package_of(name)
        where = f"{path.relative_to(package.parent.parent)}"
        if source and source not in rank:
            found.append(f"{where}: package '{source}' has no layer in {layers_file.name}")
            continue
        for target, imported, line in imports(path, name, modules):
            if not target.startswith("perceive_ir"):
                continue
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                found.append(f"{where}:{line}: imports the private name '{imported}' of {target}")
            goal = package_of(target)
            if goal in ("", source) or not source:
                continue
            if goal not in rank:
                found.append(f"{where}:{line}: imports {target}, whose package '{goal}' has no layer")
            elif rank[goal] > rank[source] or (rank[goal] == rank[source] and not any(
                    target == f"perceive_ir.{allowed}" or target.startswith(f"perceive_ir.{allowed}.")
                    for allowed in sideways.get(source, []))):
                direction = "up" if rank[goal] > rank[source] else "sideways"
                found.append(f"{where}:{line}: {source} (layer {rank[source]}) imports {target} "
                             f"({goal}, layer {rank[goal]}): {direction}")
    return found


def module_cycles(package: Path) -> list[list[str]]:
    """Import cycles between the library's modules (strongly connected components of two or more)."""
    modules = library_modules(package)
    graph = {name: sorted({t for t, _, _ in imports(path, name, modules) if t in modules and t != name})
             for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return cycles


def test_every_import_of_the_library_goes_down_a_layer():
    assert layer_violations(PACKAGE, REPO / "platform" / "layers.yaml") == []


def test_no_import_cycle_between_the_library_modules():
    assert module_cycles(PACKAGE) == []


def test_a_planted_upward_import_is_found_and_named(tmp_path):
    import shutil

    copy = tmp_path / "perceive_ir"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    planted = copy / "data" / "storage.py"
    planted.write_text(planted.read_text() + "\n\ndef _late():\n"
                       "    from perceive_ir.orchestration.trainer import launch\n"
                       "    from perceive_ir.eval.items import _hidden\n")
    found = layer_violations(copy, REPO / "platform" / "layers.yaml")
    assert any("data/storage.py" in f and "imports perceive_ir.orchestration.trainer" in f and ": up" in f
               for f in found), found
    assert any("private name '_hidden'" in f for f in found), found
    (copy / "eval" / "items.py").write_text((copy / "eval" / "items.py").read_text()
                                            + "\n\ndef _back():\n    from perceive_ir.eval import suite\n")
    assert any("perceive_ir.eval.items" in cycle for cycle in module_cycles(copy))


def test_the_library_never_imports_an_application():
    modules = library_modules(PACKAGE)
    reached = {target.split(".")[0] for name, path in modules.items() for target, _, _ in imports(path, name, modules)}
    assert not reached & {"jobs", "dataset_tools", "benchmarks", "tests"}


@pytest.mark.parametrize("folder", APPS, ids=lambda p: p.name)
def test_no_program_drives_another_through_its_argv(folder):
    """Programs call library functions; none calls another program's ``main``."""
    calls = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "main":
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names) \
                    and node.module not in ("_common", "cli", None):
                calls.append(f"{path.relative_to(REPO)}:{node.lineno} imports main from {node.module}")
    assert calls == []


def test_the_architecture_page_shows_the_layers_of_the_table():
    rank, _ = load_layers(REPO / "platform" / "layers.yaml")
    page = (REPO / "docs" / "architecture.md").read_text()
    missing = [package for package in rank if f"`{package}" not in page]
    assert not missing and "tests/test_layers.py" in page
