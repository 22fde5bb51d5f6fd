"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def session_cache(pytestconfig: pytest.Config) -> str:
    """The cache directory of this test session: what it built, inner runs reuse."""
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    assert manager is not None
    return str(manager.cache.root)
