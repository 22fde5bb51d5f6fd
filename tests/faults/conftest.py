"""Fixtures of the fault, bad-input, hostile-test and load suite (issue 6); see faults_support."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from faults_support import Inner  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(pytestconfig: pytest.Config) -> str:
    """The outer run's cache (shared with the rest of the suite: nothing is built twice)."""
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    assert manager is not None, "pytest-isolate is not loaded"
    return str(manager.cache.root)


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
          cache_dir: str) -> Iterator[Inner]:
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield Inner(pytester, cache_dir)
