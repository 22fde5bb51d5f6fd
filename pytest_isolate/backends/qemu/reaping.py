"""What reapers look for: the QEMU processes of runs (named by ``-name``) and of libvirt
domains, and the machines' socket directories, each named by its owner."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from pytest_isolate.ownership import RUN_STEM, Owner
from pytest_isolate.system import command_lines

_RUN_NAME = re.compile(rb"(?:^|\0)-name\0(?:guest=)?pytest-isolate[:-](" + RUN_STEM.encode()
                       + rb")")


def qemu_processes_of_runs(lines: list[tuple[int, bytes]] | None = None,
                           ) -> list[tuple[int, str]]:
    """(pid, run id) of every QEMU named after a pytest-isolate run (``-name``); lines:
    qemu_command_lines() when already read."""
    found = []
    for pid, cmdline in qemu_command_lines() if lines is None else lines:
        m = _RUN_NAME.search(cmdline)
        if m:
            found.append((pid, m.group(1).decode()))
    return found


def qemu_command_lines() -> list[tuple[int, bytes]]:
    """(pid, raw command line) of every QEMU system emulator running here."""
    return [(pid, cmdline) for pid, cmdline in command_lines()
            if b"qemu-system" in cmdline.split(b"\0", 1)[0]]


def qemu_processes_of(domain: str) -> list[int]:
    """Host pids of the QEMU running libvirt domain `domain` (its -name guest=...)."""
    needle = f"guest={domain},".encode()
    return [pid for pid, cmdline in qemu_command_lines() if needle in cmdline]


TMP_PREFIX = "pytest-isolate-vm-"
_SOCKET_DIR = re.compile(rb"(/[^\0,=]*/" + TMP_PREFIX.encode() + rb"[^/\0,]+)/")


def owner_gone(pid_file: Path, if_missing: bool) -> bool:
    """Whether the owner a socket directory's pid file names no longer runs (``PID-START``,
    or a bare ``PID`` from older versions); if_missing when there is no such file."""
    try:
        owner = Owner.from_name(pid_file.read_text())
    except FileNotFoundError:
        return if_missing
    except OSError:
        return False
    return owner is not None and not owner.alive()


def qemu_processes_of_gone_dirs(lines: list[tuple[int, bytes]] | None = None,
                                ) -> list[tuple[int, str]]:
    """(pid, directory) of every QEMU whose socket directory is gone or names an owner
    that no longer runs: a libvirt driver's restored domain, named after its saved
    state's slot rather than its run (libvirt_states.py); lines as for
    qemu_processes_of_runs."""
    found = []
    for pid, cmdline in qemu_command_lines() if lines is None else lines:
        m = _SOCKET_DIR.search(cmdline)
        if m is None:
            continue
        path = m.group(1).decode(errors="replace")
        # the path as that QEMU sees it (its mount namespace); gone with its directory
        if owner_gone(Path(f"/proc/{pid}/root{path}/pid"), if_missing=True):
            found.append((pid, path))
    return found


def reap_temp_dirs() -> None:
    """Remove socket directories left by runs that were killed (owner_gone)."""
    base = Path(tempfile.gettempdir())
    for path in base.glob(TMP_PREFIX + "*"):
        if owner_gone(path / "pid", if_missing=False):
            shutil.rmtree(path, ignore_errors=True)


def socket_dir() -> Path:
    """A new short temp directory for a machine's unix sockets (their paths are limited to
    ~100 bytes), named by its owner so that reap_temp_dirs removes it once that is gone."""
    reap_temp_dirs()
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "pid").write_text(Owner.me().name)
    return tmp
