"""An interactive shell inside any environment, relayed over the agent protocol.

The agent runs the program on a pseudo-terminal inside (a worker's root); this
side puts the local terminal in raw mode and moves bytes both ways.  Being
plain frames, it works the same for every backend.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from pytest_isolate.agent.wire import message
from pytest_isolate.channel import Connection
from pytest_isolate.errors import AgentLost, AgentTimeout, RemoteError

#: The shell a session starts when none is named: bash where the environment has it.
DEFAULT_SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null; then exec bash; else exec sh; fi"]


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSADRAIN)  # keep what was typed before (TCSAFLUSH drops it)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def interact(conn: Connection, ch: int, argv: list[str] | None = None, cwd: str | None = None,
             env: dict[str, str] | None = None, stdin: int = 0, stdout: int = 1) -> int:
    """Run argv (a shell by default) on a terminal inside channel ch's worker; its status."""
    cols, rows = shutil.get_terminal_size()
    conn.send(ch, message("pty", argv=argv or DEFAULT_SHELL, cwd=cwd, env=env or {}, rows=rows,
                          cols=cols, term=os.environ.get("TERM", "xterm")))
    reply, _ = conn.recv(ch, 60.0)
    if reply["op"] == "error":
        raise RemoteError(reply.get("type", "Error"), reply.get("message", ""))
    return relay(conn, ch, stdin, stdout)


def relay(conn: Connection, ch: int, stdin: int = 0, stdout: int = 1,
          other: Callable[[dict[str, Any], bytes], bool] | None = None) -> int:
    """Move a started pseudo-terminal's bytes between the local terminal (raw mode) and
    channel ch until the program inside ends (pty-exit); its status.

    other(frame, blob) takes the channel's other frames (a debugged test's reports) and
    says whether relaying goes on; a frame it refuses is put back for the caller, -1."""
    resized = [False]

    def on_winch(signum: int, frame: Any) -> None:
        resized[0] = True

    previous = signal.signal(signal.SIGWINCH, on_winch) if os.isatty(stdin) else None
    stdin_open = True
    try:
        with raw_terminal(stdin):
            while True:
                if resized[0]:
                    resized[0] = False
                    cols, rows = shutil.get_terminal_size()
                    conn.send(ch, message("pty-resize", rows=rows, cols=cols))
                code = _drain(conn, ch, stdout, other)
                if code is not None:
                    return code
                fds = [conn.rfd] + ([stdin] if stdin_open else [])
                ready = select.select(fds, [], [], 0.5)[0]
                if stdin in ready:
                    data = os.read(stdin, 65536)
                    if not data:  # end of input: the terminal's end-of-file key
                        stdin_open = False
                        data = b"\x04"
                    conn.send(ch, message("pty-in"), data)
                if conn.rfd in ready:
                    try:
                        reply, out = conn.recv(ch, 0.0)
                    except AgentTimeout:
                        continue
                    code = _handle(reply, out, stdout, other)
                    if code is not None:
                        if code == -1:
                            conn.queues[ch].appendleft((reply, out))
                        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)


def _drain(conn: Connection, ch: int, stdout: int,
           other: Callable[[dict[str, Any], bytes], bool] | None = None) -> int | None:
    while conn.queues[ch]:
        reply, out = conn.queues[ch].popleft()
        code = _handle(reply, out, stdout, other)
        if code is not None:
            if code == -1:
                conn.queues[ch].appendleft((reply, out))
            return code
    return None


def _handle(reply: dict[str, Any], out: bytes, stdout: int,
            other: Callable[[dict[str, Any], bytes], bool] | None = None) -> int | None:
    op = reply["op"]
    if op == "pty-out":
        os.write(stdout, out)
        return None
    if op == "pty-exit":
        return int(reply["code"])
    if other is not None:
        return None if other(reply, out) else -1
    if op == "error":
        raise RemoteError(reply.get("type", "Error"), reply.get("message", ""))
    if op == "exit":
        raise AgentLost(f"the environment's worker ended: {reply.get('reason')}")
    sys.stderr.write(f"pytest-isolate: unexpected frame {op!r} during the shell\n")
    return None
