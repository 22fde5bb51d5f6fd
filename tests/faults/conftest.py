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
from shared_support import clean_environ  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(session_cache: str) -> str:
    """The outer run's cache (shared with the rest of the suite: nothing is built twice)."""
    return session_cache


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
          cache_dir: str) -> Iterator[Inner]:
    clean_environ(monkeypatch)
    yield Inner(pytester, cache_dir)
