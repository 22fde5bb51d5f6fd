"""Shared fixtures of the unit tests: a pytester project wired to the fake backend.

tests/unit has no __init__.py, so pytest's default "prepend" import mode puts
this directory on sys.path when it imports this conftest; the explicit insert
below makes ``import fake_backend`` / ``import unit_support`` work under any
import mode too.  Runs in a subprocess (and the agent started by the fake
backend) get it via PYTHONPATH.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from shared_support import clean_environ  # noqa: E402
from unit_support import BACKENDS_CONFTEST, Project  # noqa: E402


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    cache_dir = tmp_path_factory.mktemp("isolate-cache")
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [HERE, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    clean_environ(monkeypatch)
    pytester.makeconftest(BACKENDS_CONFTEST)
    proj = Project(pytester, cache_dir)
    proj.pyproject()
    yield proj
