"""Helpers of the integration tests that run a generated project in a pytest subprocess.

A module of its own (imported by name: pytest's prepend import mode puts this directory on
sys.path), beside conftest.py's fixtures.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

#: Variables of this run that must not leak into the inner one.
PRIVATE_PREFIXES = ("PYTEST_XDIST", "PYTEST_ADDOPTS", "PYTEST_CURRENT", "COV_")


def run_pytest(root: Path, cache: str, *args: str, extra_env: Mapping[str, str] | None = None,
               timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    """`python -m pytest` of this venv in root, strict, on the given cache directory."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_PREFIXES)}
    environ.update(extra_env or {})
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--isolate-strict",
            f"--isolate-cache-dir={cache}", *args]
    return subprocess.run(argv, cwd=root, env=environ, capture_output=True, text=True,
                          timeout=timeout)


def output(result: subprocess.CompletedProcess[str]) -> str:
    """The ends of a run's output, for assertion messages."""
    return result.stdout[-6000:] + result.stderr[-2000:]


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
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{what} did not start listening"
        time.sleep(0.1)
