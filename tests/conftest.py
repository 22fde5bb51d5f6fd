"""Fixtures every layer of the suite shares (helpers: shared_support)."""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from shared_support import outer_cache  # noqa: E402


@pytest.fixture(scope="session")
def session_cache(pytestconfig: pytest.Config) -> str:
    """The cache directory of this test session: what it built, inner runs reuse."""
    return outer_cache(pytestconfig)
