"""Interactive use, driven through a real pseudo-terminal: --isolate-keep-failed and `shell`."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def on_terminal(argv: list[str], cwd: Path, wait_for: bytes, keys: bytes,
                timeout: float = 300) -> tuple[int, bytes]:
    """Run argv on a new terminal; type keys once wait_for appears; its status and output."""
    return converse(argv, cwd, [(wait_for, keys)], timeout)


def test_keep_failed_opens_a_shell_where_the_test_failed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_keep="""
        import pytest
        @pytest.mark.isolate("chroot")
        def test_breaks():
            with open("/etc/left-behind", "w") as f:
                f.write("state-of-the-failed-test")
            assert False
        @pytest.mark.isolate("chroot")
        def test_fine():
            pass
    """)
    code, out = on_terminal(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--isolate-keep-failed"],
        pytester.path, b"exit the shell to go on", b"cat /etc/left-behind; echo; exit\n")
    text = out.decode(errors="replace")
    assert "state-of-the-failed-test" in text, text[-3000:]
    assert "kept environments closed" in text
    assert "1 failed, 1 passed" in text
    assert code == 1


def test_keep_failed_without_a_terminal_says_how(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_keep="""
        import pytest
        @pytest.mark.isolate("chroot")
        def test_breaks():
            assert False
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--isolate-keep-failed")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*a shell into it needs a terminal*"])


@pytest.mark.parametrize("env", ["chroot", "docker", "lxc", "schroot"])
def test_shell_in_every_backend(pytester: pytest.Pytester, env: str) -> None:
    code, out = on_terminal([sys.executable, "-m", "pytest_isolate", "shell", env],
                            pytester.path, b"changes are discarded on exit",
                            b"echo in-$(hostname) $PWD; exit 4\n")
    text = out.decode(errors="replace")
    assert f"in-isolate-{env} {pytester.path}" in text, text[-2000:]
    assert code == 4


def converse(argv: list[str], cwd: Path, steps: list[tuple[bytes, bytes]],
             timeout: float = 300) -> tuple[int, bytes]:
    """Run argv on a new terminal; type each step's keys once its prompt has appeared after
    the previous step's; its status and output."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(cwd)
        os.execvp(argv[0], argv)
    out = b""
    mark = 0
    pending = list(steps)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if fd in select.select([fd], [], [], 0.5)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the program ended
                    break
                if not data:
                    break
                out += data
                if pending and pending[0][0] in out[mark:]:
                    wait_for, keys = pending.pop(0)
                    mark = out.index(wait_for, mark) + len(wait_for)
                    os.write(fd, keys)
        else:
            os.kill(pid, 9)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def test_pdb_debugs_an_isolated_test_inside(pytester: pytest.Pytester) -> None:
    """--pdb: breakpoint() and the post-mortem of a failure, in pdb running inside the
    environment, on this terminal."""
    pytester.makepyfile(test_debug="""
        import socket
        import pytest
        @pytest.mark.isolate("chroot")
        def test_breaks():
            where = socket.gethostname()
            breakpoint()
            assert where == "the host"
    """)
    code, out = converse(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pdb"], pytester.path,
        [(b"(Pdb) ", b"p where\n"), (b"(Pdb) ", b"c\n"),
         (b"(Pdb) ", b"p where.upper()\n"), (b"(Pdb) ", b"c\n")])
    text = out.decode(errors="replace")
    assert "'isolate-chroot'" in text, text[-3000:]  # at the breakpoint, inside
    assert "'ISOLATE-CHROOT'" in text, text[-3000:]  # post-mortem, on the failure's frame
    assert "1 failed" in text, text[-3000:]
    assert code == 1


def test_pdb_without_a_terminal_says_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_debug="""
        import pytest
        @pytest.mark.isolate("chroot")
        def test_breaks():
            breakpoint()
            assert False
    """)
    # a session of its own: no controlling terminal, even when this suite runs on one
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pdb"],
                            cwd=pytester.path, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert "--pdb needs a terminal and no xdist" in result.stdout, result.stdout[-3000:]
    assert "1 failed" in result.stdout and "BdbQuit" in result.stdout, result.stdout[-3000:]
