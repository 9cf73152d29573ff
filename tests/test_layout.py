"""The repository layout: platform/ holds the package but must never shadow the standard library."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_import_platform_from_the_repository_root_is_the_standard_library():
    code = "import platform, sys; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    system, origin = out.split("\n")[:2]
    assert system in {"Linux", "Darwin", "Windows"}
    assert not origin.startswith(str(REPO))
    assert not (REPO / "platform" / "__init__.py").exists()


def test_the_package_imports_from_the_platform_folder():
    import perceive_ir

    assert perceive_ir.__file__.startswith(str(REPO / "platform" / "perceive_ir"))
