"""QEMU's monitor (QMP): a minimal client over its unix socket."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from typing import Any

from pytest_isolate.errors import IsolateError

QMP_TIMEOUT = 10.0


class QmpError(IsolateError):
    """QEMU's monitor refused a command or went away."""


class Qmp:
    """A minimal QMP client over a unix socket: commands in order, events kept."""

    def __init__(self, path: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None:
                    self.sock.close()
                    raise QmpError(f"QEMU exited with status {proc.returncode} before its "
                                   "monitor came up") from None
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise QmpError(f"QEMU's monitor socket did not appear in {timeout:.0f}s") \
                        from None
                time.sleep(0.01)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._read(timeout)  # greeting
        self.command("qmp_capabilities", timeout=timeout)

    def _read(self, timeout: float) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QmpError(f"no answer from QEMU's monitor in {timeout:.0f}s") from None
            except OSError as exc:
                raise QmpError(f"QEMU's monitor went away: {exc}") from None
            if not chunk:
                raise QmpError("QEMU's monitor closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def command(self, name: str, timeout: float = QMP_TIMEOUT, **args: Any) -> Any:
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = args
        return self._call(name, req, None, timeout)

    def command_with_fd(self, name: str, fd: int, timeout: float = QMP_TIMEOUT,
                        **args: Any) -> Any:
        """A command that takes a file descriptor (getfd, add-fd), passed with SCM_RIGHTS."""
        return self._call(name, {"execute": name, "arguments": args}, fd, timeout)

    def _call(self, name: str, req: dict[str, Any], fd: int | None, timeout: float) -> Any:
        """Send one command (with fd over SCM_RIGHTS if given) and wait for its answer."""
        with self.lock:
            data = json.dumps(req).encode() + b"\n"
            try:
                if fd is None:
                    self.sock.sendall(data)
                else:
                    socket.send_fds(self.sock, [data], [fd])
            except OSError as exc:
                raise QmpError(f"QEMU's monitor went away: {exc}") from None
            deadline = time.monotonic() + timeout
            while True:
                msg = self._read(max(0.01, deadline - time.monotonic()))
                if "event" in msg:
                    self.events.append(msg)
                elif "error" in msg:
                    err = msg["error"]
                    raise QmpError(f"QEMU refused {name}: {err.get('desc', err)}")
                elif "return" in msg:
                    return msg["return"]

    def wait_event(self, name: str, timeout: float, match: dict[str, Any] | None = None,
                   ) -> dict[str, Any] | None:
        """The first event called name (whose data has match's items), or None on timeout."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for i, ev in enumerate(self.events):
                    data = ev.get("data", {})
                    if ev["event"] == name and all(data.get(k) == v
                                                   for k, v in (match or {}).items()):
                        del self.events[i]
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    msg = self._read(min(left, 0.5))
                except QmpError as exc:
                    if "no answer" in str(exc):
                        continue
                    raise
                if "event" in msg:
                    self.events.append(msg)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
