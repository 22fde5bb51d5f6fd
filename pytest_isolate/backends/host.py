"""Host-side helpers shared by backends: who owns a leftover, safe names, quiet commands."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if it is gone.

    A zombie counts as gone (e.g. a crashed xdist worker not yet waited for).  With the
    pid, it identifies a process: a reused pid has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def owner_label() -> dict[str, Any]:
    """What a backend records on what it creates, to tell later whether its owner lives."""
    return {"pid": os.getpid(), "start": process_start_time(os.getpid())}


def owner_alive(label: dict[str, Any]) -> bool:
    pid = label.get("pid")
    if not isinstance(pid, int):
        return False
    start = process_start_time(pid)
    return start is not None and start == label.get("start")


def command_lines() -> Iterator[tuple[int, bytes]]:
    """(pid, raw /proc/PID/cmdline: NUL-separated arguments) of every process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            yield int(entry), Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue


def run_owner(run_id: str) -> int | None:
    """The pytest pid in a run id (``YYYYmmdd-HHMMSS-PID[-...]``, also the start of the
    names lxc, schroot and qemu give what a run starts); None for anything else."""
    parts = run_id.split("-")
    if (len(parts) >= 3 and len(parts[0]) == 8 and parts[0].isdigit()
            and len(parts[1]) == 6 and parts[1].isdigit() and parts[2].isdigit()):
        return int(parts[2])
    return None


def run_gone(run_id: str) -> bool:
    """True when run_id names a run whose pytest process no longer exists."""
    owner = run_owner(run_id)
    return owner is not None and not os.path.exists(f"/proc/{owner}")


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
