"""Support of the pure unit layer (tests/pure): in-process tests of functions that compute
something from their arguments (configuration resolution, command lines, XML), with no
subprocess, no backend and no pytester.

Generated text is compared exactly with a golden file under ``golden/``, so a change of
output shows up as a diff in review.  To regenerate the golden files after an intended
change, run::

    PYTEST_ISOLATE_REGEN_GOLDEN=1 .venv/bin/pytest tests/pure

A test whose output changed then rewrites its file and fails once (saying which file);
review the change with ``git diff tests/pure/golden`` and run again.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"
REGEN_VAR = "PYTEST_ISOLATE_REGEN_GOLDEN"


class Golden:
    """Compares generated text with ``golden/<name>``."""

    def __init__(self, directory: Path, regenerate: bool) -> None:
        self.directory = directory
        self.regenerate = regenerate

    def check(self, name: str, text: str) -> None:
        path = self.directory / name
        old = path.read_text() if path.exists() else None
        if old == text:
            return
        if self.regenerate:
            path.write_text(text)
            pytest.fail(f"{path}: regenerated (it was {'missing' if old is None else 'different'}); "
                        "review it with git diff and run again", pytrace=False)
        if old is None:
            pytest.fail(f"{path}: no golden output; write it with {REGEN_VAR}=1", pytrace=False)
        diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                            f"{path} (golden)", "generated now"))
        pytest.fail(f"the output differs from {path}:\n{diff}\n"
                    f"(if the change is intended, regenerate with {REGEN_VAR}=1)", pytrace=False)

