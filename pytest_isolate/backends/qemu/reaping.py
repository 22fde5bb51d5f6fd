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


def qemu_processes_of_runs() -> list[tuple[int, str]]:
    """(pid, run id) of every QEMU named after a pytest-isolate run (``-name``)."""
    found = []
    for pid, cmdline in qemu_command_lines():
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


def qemu_processes_of_gone_dirs() -> list[tuple[int, str]]:
    """(pid, directory) of every QEMU whose socket directory is gone or names an owner
    that no longer runs: a libvirt driver's restored domain, named after its saved
    state's slot rather than its run (libvirt_states.py)."""
    found = []
    for pid, cmdline in qemu_command_lines():
        m = _SOCKET_DIR.search(cmdline)
        if m is None:
            continue
        path = m.group(1).decode(errors="replace")
        try:  # the path as that QEMU sees it (its mount namespace)
            owner = Owner.from_name(Path(f"/proc/{pid}/root{path}/pid").read_text())
        except FileNotFoundError:
            found.append((pid, path))
            continue
        except OSError:
            continue
        if owner is not None and not owner.alive():
            found.append((pid, path))
    return found


def reap_temp_dirs() -> None:
    """Remove socket directories left by runs that were killed (their pid file names an
    owner that no longer runs: ``PID-START``, or a bare ``PID`` from older versions)."""
    base = Path(tempfile.gettempdir())
    for path in base.glob(TMP_PREFIX + "*"):
        try:
            owner = Owner.from_name((path / "pid").read_text())
        except OSError:
            continue
        if owner is not None and not owner.alive():
            shutil.rmtree(path, ignore_errors=True)


def socket_dir() -> Path:
    """A new short temp directory for a machine's unix sockets (their paths are limited to
    ~100 bytes), named by its owner so that reap_temp_dirs removes it once that is gone."""
    reap_temp_dirs()
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "pid").write_text(Owner.me().name)
    return tmp
