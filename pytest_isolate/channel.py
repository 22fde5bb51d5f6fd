"""Host side of the agent protocol: one Connection per running environment."""

from __future__ import annotations

import collections
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from pytest_isolate.agent import bundle
from pytest_isolate.agent.wire import FrameDecoder, ProtocolError, encode_frame, message, write_all
from pytest_isolate.errors import AgentLost, AgentTimeout, RemoteError

#: What the bootstrap runs inside: the agent's shipped modules as one source.
AGENT_SOURCE = bundle.source()


#: How long a worker told to close has to end before the host gives up on it.
WORKER_EXIT_WAIT = 30.0


class Connection:
    """Framed request/response over a pair of file descriptors.

    Frames for channels nobody is waiting on are queued, so a worker's late
    messages are never lost or mixed into another channel's answer.
    """

    def __init__(self, rfd: int, wfd: int, label: str) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.label = label
        self.decoder = FrameDecoder()
        self.queues: dict[int, collections.deque[tuple[dict[str, Any], bytes]]] = (
            collections.defaultdict(collections.deque)
        )
        self.closed = False
        self._next_ch = 0
        #: channels whose late frames nobody will read (a worker closed without waiting)
        self.forgotten: set[int] = set()

    def new_channel(self) -> int:
        self._next_ch += 1
        return self._next_ch

    def forget(self, ch: int) -> None:
        """Drop what ch has sent or will send: its worker was told to close and nobody
        waits for its exit (a test's worker, whose reports are all in)."""
        self.forgotten.add(ch)
        self.queues.pop(ch, None)

    def bootstrap(self) -> None:
        """Send the agent's source; the environment runs BOOTSTRAP on its stdin."""
        self._write(b"%d\n" % len(AGENT_SOURCE) + AGENT_SOURCE)

    def _write(self, data: bytes) -> None:
        try:
            write_all(self.wfd, data)
        except OSError as exc:
            self.closed = True
            raise AgentLost(f"{self.label}: the agent's input is closed ({exc})") from None

    def send(self, ch: int, obj: dict[str, Any], blob: bytes = b"") -> None:
        if self.closed:
            raise AgentLost(f"{self.label}: the agent is gone")
        self._write(encode_frame(ch, obj, blob))

    def recv(self, ch: int, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        deadline = None if timeout is None else time.monotonic() + timeout
        queue = self.queues[ch]
        while not queue:
            if self.closed:
                raise AgentLost(f"{self.label}: the agent's stream ended")
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.rfd], [], [], wait)
            if not ready:
                raise AgentTimeout(f"{self.label}: no answer from the agent in {timeout:.1f}s")
            data = os.read(self.rfd, 1 << 20)
            if not data:
                self.closed = True
                raise AgentLost(f"{self.label}: the agent's stream ended")
            try:
                frames = self.decoder.feed(data)
            except ProtocolError as exc:
                self.closed = True
                raise AgentLost(f"{self.label}: unreadable stream from the agent: {exc}") from None
            for fch, obj, blob in frames:
                if fch not in self.forgotten:
                    self.queues[fch].append((obj, blob))
        return queue.popleft()

    def open_worker(self, kind: str, ch: int | None = None, **fields: Any) -> int:
        """Ask the agent for a worker of kind ("test", "zygote", "sandbox") on ch (a new
        channel when None); fields: the worker request's others (zygote, nodeid)."""
        ch = self.new_channel() if ch is None else ch
        self.send(0, message("worker", ch=ch, kind=kind, **fields))
        return ch

    def close_worker(self, ch: int, wait: float | None = WORKER_EXIT_WAIT) -> None:
        """Tell the worker on ch to close.  wait: the seconds it has to answer with its
        exit (AgentTimeout after); None: do not wait, and drop what it still sends."""
        self.send(ch, message("close"))
        if wait is None:
            self.forget(ch)
            return
        deadline = time.monotonic() + wait
        while self.recv(ch, max(0.0, deadline - time.monotonic()))[0]["op"] != "exit":
            pass

    def call(self, ch: int, obj: dict[str, Any], blob: bytes = b"",
             timeout: float | None = 60.0) -> tuple[dict[str, Any], bytes]:
        """Send a request and return its answer; an 'error' answer raises RemoteError."""
        self.send(ch, obj, blob)
        reply, data = self.recv(ch, timeout)
        if reply["op"] == "error":
            raise RemoteError(reply.get("type", "Error"), reply.get("message", ""),
                              reply.get("traceback", ""))
        if reply["op"] == "exit":
            raise AgentLost(f"{self.label}: worker exited: {reply.get('reason')}")
        return reply, data


class AgentProcess:
    """A process whose stdin/stdout lead to a python3 running BOOTSTRAP: the agent."""

    def __init__(self, argv: list[str], log_path: Path, label: str,
                 env: dict[str, str] | None = None) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                bufsize=0, env=env, start_new_session=True,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.conn = Connection(self.proc.stdout.fileno(), self.proc.stdin.fileno(), label)

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.conn.closed

    def stop(self, grace: float = 3.0) -> None:
        if self.proc.poll() is None:
            try:
                if not self.conn.closed:
                    self.conn.send(0, message("shutdown"))
            except Exception:
                pass
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self.conn.closed = True


def log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
