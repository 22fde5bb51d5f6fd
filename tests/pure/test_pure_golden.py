"""The golden-file comparison the pure layer relies on fails when it should."""

from __future__ import annotations

from pathlib import Path

import pytest
from pure_support import Golden


def test_same_text_passes(tmp_path: Path) -> None:
    (tmp_path / "out.txt").write_text("a\nb\n")
    Golden(tmp_path, regenerate=False).check("out.txt", "a\nb\n")


def test_different_text_fails_with_a_diff(tmp_path: Path) -> None:
    (tmp_path / "out.txt").write_text("a\nb\n")
    with pytest.raises(pytest.fail.Exception) as info:
        Golden(tmp_path, regenerate=False).check("out.txt", "a\nc\n")
    message = str(info.value)
    assert "-b\n+c" in message
    assert "PYTEST_ISOLATE_REGEN_GOLDEN=1" in message
    assert (tmp_path / "out.txt").read_text() == "a\nb\n"  # not touched


def test_missing_golden_file_fails(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="no golden output"):
        Golden(tmp_path, regenerate=False).check("new.txt", "x\n")
    assert not (tmp_path / "new.txt").exists()


def test_regenerating_rewrites_the_file_and_fails_once(tmp_path: Path) -> None:
    (tmp_path / "out.txt").write_text("old\n")
    with pytest.raises(pytest.fail.Exception, match="regenerated"):
        Golden(tmp_path, regenerate=True).check("out.txt", "new\n")
    assert (tmp_path / "out.txt").read_text() == "new\n"
    Golden(tmp_path, regenerate=True).check("out.txt", "new\n")
