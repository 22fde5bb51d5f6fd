"""The package's layers (pyproject.toml's [tool.importlinter] contract) hold.

CI runs only pytest, so the import-linter contract is checked here: a module that
imports a layer above its own (the manager from the cache, a backend from images/,
anything of ours from the shipped agent) fails the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_isolate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(pytest_isolate.__file__).resolve().parent


def contract() -> dict[str, object]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    [layers] = [c for c in config["contracts"] if c["type"] == "layers"]
    assert isinstance(layers, dict)
    return layers


def test_lint_imports_keeps_the_layers() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.fail(f"{lint} is missing: install the dev extra (pip install -e '.[dev]')")
    # the package next to this pyproject, not another installed copy
    path = os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([str(lint), "--no-cache", str(REPO / "pyproject.toml")],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": path},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_module_has_a_layer() -> None:
    """A new module must be placed (a module in no layer is not held by the contract)."""
    layers = contract()["layers"]
    assert isinstance(layers, list)
    named = {name.strip() for line in layers for name in line.replace("|", ":").split(":")}
    modules = set()
    for path in PACKAGE.iterdir():
        if path.name.startswith("_") and path.name != "__main__.py":
            continue
        if path.suffix == ".py":
            modules.add(f"pytest_isolate.{path.stem}")
        elif (path / "__init__.py").exists():
            modules.add(f"pytest_isolate.{path.name}")
    assert modules - named == set(), "add these to a layer in pyproject.toml"
    assert named - modules == set(), "these layers name no module"
