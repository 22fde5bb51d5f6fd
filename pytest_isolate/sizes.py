"""Sizes in bytes: read from a user ("512M", "1.5GiB"), shown to a user, measured on disk.

One home for these, used by the spec's limits, the cache's manifests and the command
line alike, so a size reads and counts the same everywhere.  Standard library only:
the command line imports it at start.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

#: Powers of 1024, as `du -h`, `docker --memory` and cgroups' users expect.
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: object) -> int | None:
    """Bytes of "512M", "1.5G", "64MiB", "100k", "4096" or an int; None when not a size.

    Zero is a size (`cache gc --max-size 0`); a caller that needs more says so."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = _SIZE_RE.match(value)
    if m is None:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(size: float) -> str:
    """'512B', '64M' (exact), '1.5G' (one decimal when not a whole number of the unit)."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= factor:
            if size % factor == 0:
                return f"{size // factor:.0f}{unit}"
            return f"{size / factor:.1f}{unit}"
    return f"{size:.0f}B"


def walk_same_fs(path: Path) -> Iterator[os.stat_result]:
    """lstat of everything under path, not crossing into other filesystems (like du -x)."""
    try:
        top = os.lstat(path)
    except OSError:
        return
    yield top
    stack = [str(path)]
    while stack:
        current = stack.pop()
        try:
            it = os.scandir(current)
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != top.st_dev:
                    continue  # a mount point (e.g. /proc of a build in progress)
                yield st
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


def dir_size(path: Path) -> int:
    """Bytes of the files under path: hard links counted once, other filesystems skipped.

    Directories themselves count nothing: their size depends on the filesystem, so a
    manifest's size would differ between a tmpfs and an ext4 cache."""
    seen: set[int] = set()
    total = 0
    for st in walk_same_fs(path):
        if stat.S_ISDIR(st.st_mode):
            continue
        if st.st_nlink > 1:
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        total += st.st_size
    return total
