"""Interop tests: MCP components from npm (tests/interop/package.json), run where Node.js is installed.

`tests/install-test-tools` installs them with `npm ci`; without node (or without that step) every
test here is skipped with the reason, never failed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

MODULES = Path(__file__).parent / "node_modules"


def node_package(name: str, entry: str = "dist/index.js") -> Path:
    """The entry point of an installed npm package, or a skip saying what is missing."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the npm interop components cannot run")
    path = MODULES / name / entry
    if not path.is_file():
        pytest.skip(f"{name} is not installed: run tests/install-test-tools")
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.interop)
