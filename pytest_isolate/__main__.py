# PYTHON_ARGCOMPLETE_OK: argcomplete's global completion (activate-global-python-argcomplete)
# looks for this marker in the module a console script imports.
"""``python -m pytest_isolate`` and the ``pytest-isolate`` console script (see cli/)."""

from __future__ import annotations

import sys

from pytest_isolate.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
