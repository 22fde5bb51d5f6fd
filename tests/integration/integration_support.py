"""Helpers of the integration tests that start a daemon (sshd, a registry) for a test; running
an inner pytest is shared_support's.

A module of its own (imported by name: pytest's prepend import mode puts this directory on
sys.path).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from shared_support import wait_for


def stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Terminate a daemon a test started; kill it when it outlives grace seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a daemon a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_log(proc: subprocess.Popen[bytes], log: Path, text: str, what: str,
                 seconds: float = 20) -> None:
    """Wait until a daemon a test started writes text to its log (it listens)."""
    wait_for(f"{what} to start listening ({text!r} in {log})", lambda: text in log.read_text(),
             seconds, proc, explain=lambda: log.read_text()[-3000:])
