"""The one size parser, formatter and disk-usage counter (pytest_isolate/sizes.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_isolate.sizes import dir_size, format_size, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("512M", 512 << 20), ("1.5G", 3 << 29), ("64MiB", 64 << 20), ("100k", 100 << 10),
    ("4096", 4096), (" 2 GB ", 2 << 30), ("0", 0), (1234, 1234),
    ("lots", None), ("-1M", None), ("1X", None), (True, None), (-5, None), (1.5, None),
])
def test_parse_size(text: object, expected: int | None) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("size", "expected"), [
    (0, "0B"), (1000, "1000B"), (1024, "1K"), (1536, "1.5K"), (64 << 20, "64M"),
    (3 << 29, "1.5G"), (5 << 40, "5T"),
])
def test_format_size(size: int, expected: str) -> None:
    assert format_size(size) == expected
    assert parse_size(expected) == size  # what is shown reads back the same


def test_dir_size_counts_file_bytes_and_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b").write_bytes(b"y" * 24)
    os.link(tmp_path / "a", tmp_path / "sub" / "a-again")
    os.symlink("a", tmp_path / "link")
    assert dir_size(tmp_path) == 1000 + 24 + len("a")
    assert dir_size(tmp_path / "missing") == 0
