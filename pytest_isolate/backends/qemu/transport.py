"""The Transport of a machine (its QEMU driven directly, or a libvirt domain) and the
connection to its agent, which names what killed the guest when its console says."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from pytest_isolate.backends.qemu.qmp import Qmp, QmpError
from pytest_isolate.backends.qemu.reaping import qemu_processes_of
from pytest_isolate.channel import Connection
from pytest_isolate.errors import AgentLost


def guest_failure(text: str, memory_mib: int | None = None) -> str:
    """What a guest's console says killed it ("" when it says nothing): a kernel panic
    (and its cause: out of memory, no root device, ...), the OOM killer, a failed /init."""
    lines = text.splitlines()
    panic = next((m.group(1).strip() for line in lines
                  if (m := re.search(r"Kernel panic - not syncing: (.*)", line))), "")
    oom = next((line.strip() for line in lines
                if re.search(r"Out of memory|invoked oom-killer|oom-kill:", line)), "")
    memory = (f" (the guest has {memory_mib} MiB: raise it with the environment's memory key "
              "or options.memory)") if memory_mib else ""
    if panic:
        low = panic.lower()
        if oom or "out of memory" in low or "deadlocked on memory" in low:
            return f"the guest kernel panicked: out of memory{memory} [{panic}]"
        if "unable to mount root" in low or "no working init" in low:
            return f"the guest kernel panicked: no root device or init [{panic}]"
        return f"the guest kernel panicked: {panic}"
    init = next((m.group(1).strip() for line in lines
                 if (m := re.search(r"pytest-isolate init: FAILED: (.*)", line))), "")
    if init:
        return f"the guest's /init failed: {init}"
    if oom:
        return f"the guest ran out of memory{memory}: {oom}"
    return ""


class VmConnection(Connection):
    """A Connection whose bootstrap is sent once: a restored machine's agent already runs.

    When the stream ends, the error names what the console shows killed the guest
    (only what this machine wrote: the console log is shared by a run's machines)."""

    def __init__(self, rfd: int, wfd: int, label: str, console: Path | None = None,
                 memory_mib: int | None = None) -> None:
        super().__init__(rfd, wfd, label)
        self.bootstrapped = False
        self.console = console
        self.memory_mib = memory_mib
        try:
            self.console_start = console.stat().st_size if console is not None else 0
        except OSError:
            self.console_start = 0

    def bootstrap(self) -> None:
        if not self.bootstrapped:
            super().bootstrap()
            self.bootstrapped = True

    def guest_failure(self) -> str:
        if self.console is None:
            return ""
        try:
            with open(self.console, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self.console_start, size - (256 << 10)))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return guest_failure(text, self.memory_mib)

    def recv(self, ch: int, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        try:
            return super().recv(ch, timeout)
        except AgentLost as exc:
            cause = self.guest_failure()
            if not cause:
                # QEMU may still be writing the panic out: one short look again
                time.sleep(0.3)
                cause = self.guest_failure()
            if cause and cause not in str(exc):
                raise AgentLost(f"{exc}: {cause}") from None
            raise


class VmProcess:
    """The Transport of a QEMU machine (alive, stop, conn).

    ``conn`` talks over the unix socket behind the guest's virtio-serial port.
    """

    def __init__(self, proc: subprocess.Popen[bytes], qmp: Qmp, sock: socket.socket,
                 label: str, log_path: Path, memory_mib: int | None = None) -> None:
        self.proc = proc
        self.qmp = qmp
        self.sock = sock
        self.log_path = log_path
        fd = sock.fileno()
        self.vconn = VmConnection(fd, fd, label, log_path, memory_mib)
        self.conn: Connection = self.vconn

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.conn.closed

    def stop(self, grace: float = 3.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(QmpError, ValueError):
                self.qmp.command("quit", timeout=grace)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.qmp.close()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.conn.closed = True


class LibvirtProcess:
    """The Transport of a libvirt domain."""

    def __init__(self, dom: Any, sock: socket.socket, label: str, name: str,
                 local: bool, console: Path | None = None, memory_mib: int | None = None,
                 ) -> None:
        self.dom = dom
        self.sock = sock
        self.vconn = VmConnection(sock.fileno(), sock.fileno(), label, console, memory_mib)
        self.conn: Connection = self.vconn
        self.name = name
        self.local = local

    def alive(self) -> bool:
        try:
            return bool(self.dom.isActive()) and not self.conn.closed
        except Exception:
            # libvirtd may be gone while the machine runs on: the channel decides
            return not self.conn.closed

    def stop(self) -> None:
        destroy_domain(self.dom, self.name, self.local)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.conn.closed = True


def destroy_domain(dom: Any, name: str, local: bool) -> None:
    """Destroy a domain through libvirt; when libvirtd is gone (its QEMU lives on, kept
    by -no-shutdown even after the guest powers off) and the domain is on this host,
    kill its QEMU directly."""
    try:
        if dom.isActive():
            dom.destroy()
        return
    except Exception:
        if not local:
            return
    for pid in qemu_processes_of(name):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
