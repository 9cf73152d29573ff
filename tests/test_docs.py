"""Every command block of README.md and docs/*.md runs as printed, in order, after the README's first
command (the quickstart), in a fresh copy of the repository and with no environment variable set.

A block is a fenced ``bash`` block; a job command in it runs with shorter training appended
(``TINY_SIZES``). One that needs what CI does not have (a cluster, a GPU, a bucket)
carries the line ``<!-- doc-test: skip: <reason> -->`` just above its fence and is reported as skipped
with that reason. Placeholders (``<stage-1 run id>``, ...) are the only edits: the quickstart prints
their values. A failing command fails its block's test, named by file and line.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATASETS

pytestmark = [pytest.mark.slow, pytest.mark.datasets]

# Pages in the order a reader runs them: the stages before what uses their runs.
PAGE_ORDER = ["README.md", "docs/training.md", "docs/evaluation.md", "docs/registry.md", "docs/restoration.md",
              "docs/search.md",
              "docs/data.md", "docs/configuration.md", "docs/models.md", "docs/architecture.md"]
COMMAND_LANGUAGES = {"bash", "sh", "shell"}
SKIP_MARKER = re.compile(r"^<!--\s*doc-test:\s*skip:\s*(.+?)\s*-->$")
PLACEHOLDER_LINE = re.compile(r"^\s*(<[^<>]+>) = (\S+)\s*$")
PLACEHOLDER = re.compile(r"<[a-z][a-z0-9 -]*>")
COMMAND_TIMEOUT_S = 1200
# "At tiny sizes": what the test appends to a documented job command, which otherwise runs as printed
# (shorter training; the documented sizes are the ones the docs' figures come from).
TINY_SIZES = {
    "jobs/pipeline.py": ["samples=64", "stage1_overrides=[restorer_steps=20,prompt_steps=10]",
                         "stage2_overrides=[loop.max_steps=20]",
                         "train_overrides=[loop.val_every=10,loop.checkpoint_every=10,data.validation.images=2]"],
    "jobs/stage1.py": ["restorer_steps=20", "prompt_steps=10", "loop.val_every=10", "loop.checkpoint_every=10",
                       "data.validation.images=2"],
    "jobs/stage2.py": ["loop.max_steps=20", "loop.val_every=10", "loop.checkpoint_every=10",
                       "data.validation.images=2"],
    "jobs/tune.py": ["num_trials=2", "stage2.loop.max_steps=40", "stage2.loop.val_every=10",
                     "scheduler.grace_period=10", "stage2.data.validation.images=2"],
}


@dataclass
class Block:
    page: str
    line: int  # of the opening fence
    commands: list[str]  # backslash continuations joined, comment lines dropped
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages(repo: Path) -> list[str]:
    found = ["README.md"] + sorted(str(p.relative_to(repo)) for p in (repo / "docs").glob("*.md"))
    return [p for p in PAGE_ORDER if p in found] + [p for p in found if p not in PAGE_ORDER]


def command_blocks(repo: Path, page: str) -> list[Block]:
    """The page's fenced command blocks, with their skip reason if marked."""
    lines = (repo / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```\s*(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in COMMAND_LANGUAGES:
            marker = SKIP_MARKER.match(lines[i - 1].strip()) if i else None
            blocks.append(Block(page, i + 1, commands_of(lines[i + 1:end]), marker and marker.group(1)))
        i = end + 1
    return blocks


def commands_of(lines: list[str]) -> list[str]:
    commands, pending = [], ""
    for line in lines:
        if not pending and line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        if pending.strip():
            commands.append(" ".join(pending.split()))
        pending = ""
    return commands


def all_blocks(repo: Path) -> list[Block]:
    blocks = [b for page in pages(repo) for b in command_blocks(repo, page)]
    readme = [b for b in blocks if b.page == "README.md"]
    # The README's first two blocks set up: the first ends in the quickstart (run by the fixture),
    # the second is this test suite.
    readme[0].skip = "the quickstart: run once before every other block (it is what they follow)"
    readme[1].skip = "the test suite itself"
    return blocks


BLOCKS = all_blocks(REPO)


def fill(command: str, values: dict[str, str], where: str) -> str:
    filled = command
    for name, value in values.items():
        filled = filled.replace(name, value)
    left = PLACEHOLDER.findall(filled)
    assert not left, f"{where}: placeholder {left} has no value (the quickstart printed {sorted(values)})"
    return filled


def at_tiny_size(command: str) -> str:
    words = command.split()
    for script, extra in TINY_SIZES.items():
        if script in words[:2]:
            return " ".join([command, *map(shlex.quote, extra)])
    return command


def repository_copy(root: Path) -> Path:
    """The repository's files as a fresh clone holds them (tracked and new, never ignored ones), beside
    a link to the shared datasets; the environment's Python as its ``.venv``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    copy = root / "repo"
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    (root / "shared").symlink_to(SHARED_DATASETS.parent, target_is_directory=True)
    (copy / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return copy


def clean_environment() -> dict[str, str]:
    """The user's shell as a fresh terminal has it, in the environment's Python: no tracking URI, Ray
    address or cache set."""
    unset = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "PERCEIVE_IR_CACHE", "AWS_ENDPOINT_URL",
             "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(command: str, copy: Path, env: dict[str, str], where: str) -> str:
    done = subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, (f"{where}: `{command}` exited with {done.returncode}:\n"
                                  + "\n".join(output.splitlines()[-40:]))
    return output


@pytest.fixture(scope="module")
def after_quickstart(tmp_path_factory):
    """A fresh copy of the repository in which the README's first command has run; the values of the
    placeholders, as the quickstart printed them."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip("the documented commands read ../shared/datasets (CI always has it)")
    copy = repository_copy(tmp_path_factory.mktemp("docs"))
    env = clean_environment()
    first = BLOCKS[0]
    setup = [c for c in first.commands[0].split(" && ")  # the environment is this one
             if not c.startswith(("python3 -m venv", ". .venv/bin/activate", "pip install"))]
    output = run(at_tiny_size(" && ".join(setup)), copy, env, first.where)
    values = dict(m.groups() for line in output.splitlines() if (m := PLACEHOLDER_LINE.match(line)))
    assert set(values) >= {"<stage-1 run id>", "<stage-2 run id>"}, output[-3000:]
    assert not (copy / "mlflow.db").exists()
    return copy, env, values


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_the_documented_commands_run_as_printed(block, after_quickstart):
    if block.skip:
        pytest.skip(f"{block.where}: {block.skip}")
    copy, env, values = after_quickstart
    for command in block.commands:
        run(at_tiny_size(fill(command, values, block.where)), copy, env, block.where)
    assert not (copy / "mlflow.db").exists(), f"{block.where} left an MLflow store in the repository's root"


def test_every_command_of_the_readme_tour_is_a_documented_block():
    """The README names one command per job inline; each is a block of some page (run, or skipped with
    its reason), so none of them escapes this test."""
    def bare(command: str) -> str:  # without a trailing comment
        return re.sub(r"\s+#.*$", "", command)

    tour = re.findall(r"`((?:python|perceive-[a-z]+|bash|kubectl) [^`]+)`", (REPO / "README.md").read_text())
    documented = {bare(part) for block in BLOCKS for command in block.commands for part in command.split(" && ")}
    assert tour and [c for c in tour if " ".join(c.split()) not in documented] == []


def test_a_planted_broken_command_fails_naming_its_page_and_line(tmp_path):
    page = tmp_path / "docs" / "planted.md"
    page.parent.mkdir()
    page.write_text("# Planted\n\nText.\n\n```bash\npython jobs/stage2.py --config configs/none.yaml\n```\n")
    (block,) = command_blocks(tmp_path, "docs/planted.md")
    with pytest.raises(AssertionError, match=r"docs/planted.md:5: `python jobs/stage2.py --config "
                                             r"configs/none.yaml` exited with 2"):
        run(block.commands[0], REPO, clean_environment(), block.where)
