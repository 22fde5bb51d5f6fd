"""Small host-side helpers that backends and the CLI share: process command lines, safe
names, fstab escaping and quiet tool runs."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path


def command_lines() -> Iterator[tuple[int, bytes]]:
    """(pid, raw /proc/PID/cmdline: NUL-separated arguments) of every process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            yield int(entry), Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue


def safe_name(text: str) -> str:
    """Container, session and file names: letters, digits, '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "env"


def fstab_path(path: str) -> str:
    """Escape a path for an fstab-format line (schroot's fstab, lxc.mount.entry)."""
    return (path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
            .replace("\n", "\\012"))


def run_quiet(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing its output; never raises for a non-zero status."""
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)
