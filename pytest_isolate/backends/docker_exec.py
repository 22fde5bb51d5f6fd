"""The agent's transport in a container: a ``docker exec`` of its bootstrap with stdin
attached (API: exec create + start with a hijacked socket).

Without a tty the engine multiplexes stdout and stderr on that socket with 8-byte frame
headers (stream kind, 3 zero bytes, big-endian length); a reader thread demultiplexes it,
stdout into a pipe that the framed Connection reads, stderr into the agent log.  Writes go
straight to the socket when it is a plain one; otherwise (TLS, ssh, a named pipe) the bytes
must go through the object's own send, so they pass through a pipe and a writer thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Any

from pytest_isolate.agent.wire import message, write_all
from pytest_isolate.channel import Connection


class ExecAgent:
    """The agent as a ``docker exec`` process: what Instance needs (conn, alive, stop)."""

    def __init__(self, client: Any, container_id: str, argv: list[str], env: dict[str, str],
                 workdir: str, log_path: Path, label: str) -> None:
        api = client.api
        self.api = api
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.exec_id = api.exec_create(container_id, argv, stdin=True, stdout=True, stderr=True,
                                       tty=False, environment=env, workdir=workdir)["Id"]
        self.sock = api.exec_start(self.exec_id, socket=True, tty=False)
        raw = getattr(self.sock, "_sock", self.sock)
        self.raw = raw
        if hasattr(raw, "settimeout"):
            raw.settimeout(None)  # the client's request timeout must not end a quiet agent
        self._read_r, self._read_w = os.pipe()
        self._writer: threading.Thread | None = None
        self._write_r = -1
        if type(raw) is socket.socket:
            wfd = raw.fileno()
        else:  # TLS, ssh, named pipe: bytes must go through the object's own send
            self._write_r, wfd = os.pipe()
            self._writer = threading.Thread(target=self._pump_writes, daemon=True,
                                            name=f"pytest-isolate docker writer {label}")
        self._wfd = wfd
        self.conn = Connection(self._read_r, wfd, label)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed by the reader thread
        self._reader = threading.Thread(target=self._pump_reads, daemon=True,
                                        name=f"pytest-isolate docker reader {label}")
        self._reader.start()
        if self._writer is not None:
            self._writer.start()

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.raw.recv(n - len(buf))
            except OSError:
                chunk = b""
            if not chunk:
                return b""
            buf += chunk
        return buf

    def _pump_reads(self) -> None:
        """Demultiplex the exec stream: stdout -> pipe (the Connection), stderr -> log."""
        try:
            while True:
                header = self._recv(8)
                if len(header) < 8:
                    break
                kind, size = header[0], int.from_bytes(header[4:8], "big")
                payload = self._recv(size) if size else b""
                if size and not payload:
                    break
                if kind == 1:
                    with contextlib.suppress(OSError):  # the Connection side is closed: drain
                        write_all(self._read_w, payload)
                else:
                    self._log.write(payload)
                    self._log.flush()
        finally:
            with contextlib.suppress(OSError):
                os.close(self._read_w)
            self._log.close()

    def _pump_writes(self) -> None:
        try:
            while True:
                data = os.read(self._write_r, 1 << 16)
                if not data:
                    break
                self.raw.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.raw.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                os.close(self._write_r)

    def alive(self) -> bool:
        return self._reader.is_alive() and not self.conn.closed

    def stop(self, grace: float = 3.0) -> None:
        if self._reader.is_alive() and not self.conn.closed:
            with contextlib.suppress(Exception):
                self.conn.send(0, message("shutdown"))
        self._close_input()
        self._reader.join(grace)
        if self._reader.is_alive():
            with contextlib.suppress(OSError):
                self.raw.shutdown(socket.SHUT_RDWR)
            self._reader.join(grace)
        if self._writer is not None:
            self._writer.join(grace)
        with contextlib.suppress(OSError):
            self.raw.close()
        with contextlib.suppress(Exception):
            self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self._read_r)
        self.conn.closed = True

    def _close_input(self) -> None:
        if self._writer is not None:
            if self._wfd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._wfd)
                self._wfd = -1
        else:
            with contextlib.suppress(OSError):
                self.raw.shutdown(socket.SHUT_WR)
