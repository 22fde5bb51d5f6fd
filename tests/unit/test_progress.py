"""Progress of long work: a heartbeat rewrites one line on a terminal, and stays a plain line
in logs (not a terminal, or CI set).  The messages come from a conftest that calls the real
plugin's progress() (what the image builders call every few seconds)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

CONFTEST = """
from pytest_isolate.progress import Heartbeat

def pytest_sessionstart(session):
    manager = session.config.pluginmanager.get_plugin("isolate-manager")
    manager.progress(Heartbeat("building: 3s: Unpacking a"))
    manager.progress(Heartbeat("building: 6s: Unpacking b"))
    manager.progress("built trixie in 7.0s")
"""


def on_terminal(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(cwd)
        os.execve(argv[0], argv, env)
    out = b""
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the program ended
                break
            if not data:
                break
            out += data
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    return out


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_a="def test_a():\n    pass\n")
    return pytester


def environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(extra, COLUMNS="100")
    return env


ARGV = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]


def test_heartbeats_rewrite_one_line_on_a_terminal(project: pytest.Pytester) -> None:
    out = on_terminal(ARGV, str(project.path), environ()).decode(errors="replace")
    assert "\risolate: building: 3s: Unpacking a" in out, repr(out)
    assert "\risolate: building: 6s: Unpacking b" in out, repr(out)
    # the second heartbeat replaced the first on the same line: no line break between them
    between = out.split("Unpacking a", 1)[1].split("Unpacking b", 1)[0]
    assert "\n" not in between, repr(out)
    # the final message is a line of its own, where the heartbeat was
    assert "\risolate: built trixie in 7.0s" in out.replace("\r\r", "\r"), repr(out)
    assert "1 passed" in out


@pytest.mark.parametrize("where", ["pipe", "CI on a terminal"])
def test_heartbeats_are_plain_lines_in_logs(project: pytest.Pytester, where: str) -> None:
    if where == "pipe":
        out = subprocess.run(ARGV, cwd=project.path, env=environ(), capture_output=True,
                             text=True, check=False).stdout
    else:
        out = on_terminal(ARGV, str(project.path), environ(CI="true")).decode(errors="replace")
    lines = [ln.strip() for ln in out.splitlines()]
    assert "isolate: building: 3s: Unpacking a" in lines, out
    assert "isolate: building: 6s: Unpacking b" in lines, out
    assert "isolate: built trixie in 7.0s" in lines, out
    assert "\r" not in out.replace("\r\n", "\n"), repr(out)
