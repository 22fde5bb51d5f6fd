"""The pure unit layer: in-process tests, no subprocess, no backend (see pure_support).

tests/pure has no __init__.py; the insert below makes ``import pure_support`` work under
any import mode, as in tests/unit.
"""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from pure_support import GOLDEN_DIR, REGEN_VAR, Golden  # noqa: E402


@pytest.fixture
def golden() -> Golden:
    """Compares generated text with golden/NAME (see pure_support for regenerating)."""
    return Golden(GOLDEN_DIR, os.environ.get(REGEN_VAR) == "1")
