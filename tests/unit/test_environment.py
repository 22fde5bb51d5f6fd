"""The Environment API (run / put / get / logs) through the isolate_env fixture and the fake backend.

The fake backend has no isolation: "inside" paths are host paths, so the inner
tests use their tmp_path on both sides.
"""

from __future__ import annotations

import io
import os
import tarfile
import textwrap
from pathlib import Path

import pytest
from unit_support import Project

from pytest_isolate.environment import _unpack_safely
from pytest_isolate.errors import IsolateError

HEADER = """
import os
import stat
import time
from pathlib import Path

import pytest
from pytest_isolate.environment import CommandFailed, CommandTimeout, ExecResult
from pytest_isolate.errors import RemoteError

@pytest.fixture
def env(isolate_env):
    return isolate_env("fakeenv")

def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)
"""

CASES = {
    "argv-and-string": """
        def test_it(env):
            assert (env.name, env.backend) == ("fakeenv", "fake")
            assert repr(env).startswith("<Environment fakeenv (fake, ")
            r = env.run(["echo", "a  b", "$HOME", "*"])
            assert isinstance(r, ExecResult)
            assert (r.returncode, r.stdout, r.stderr) == (0, "a  b $HOME *\\n", "")
            assert r.ok and r.duration >= 0
            r = env.run("echo $((2 + 3)); echo err >&2; exit 4")
            assert (r.returncode, r.stdout, r.stderr) == (4, "5\\n", "err\\n")
            assert not r.ok
            r = env.run(["no-such-command-xyz"])
            assert r.returncode == 127 and "no-such-command-xyz" in r.stderr
            with pytest.raises(ValueError):
                env.run([])
    """,
    "input-env-cwd": """
        def test_it(env, tmp_path):
            assert env.run(["cat"], input="hello\\n").stdout == "hello\\n"
            assert env.run(["cat"], input=b"bytes in").stdout == "bytes in"
            r = env.run("echo $FOO-$PYTEST_DISABLE_PLUGIN_AUTOLOAD", env={"FOO": "bar"})
            assert r.stdout == "bar-1\\n"
            assert env.run(["pwd"], cwd=str(tmp_path)).stdout == str(tmp_path) + "\\n"
            r = env.run("pwd", cwd="/no/such/dir")
            assert r.returncode != 0
    """,
    "check": """
        def test_it(env):
            env.run("true", check=True)
            with pytest.raises(CommandFailed) as info:
                env.run("echo out; echo err >&2; exit 3", check=True)
            exc = info.value
            assert exc.argv == ["sh", "-c", "echo out; echo err >&2; exit 3"]
            assert (exc.result.returncode, exc.result.stdout, exc.result.stderr) == (3, "out\\n", "err\\n")
            assert "exited with status 3" in str(exc)
    """,
    "timeout": """
        def alive(needle):
            for pid in os.listdir("/proc"):
                try:
                    with open("/proc/%s/cmdline" % pid, "rb") as f:
                        if needle in f.read():
                            return True
                except (OSError, ValueError):
                    pass
            return False

        def test_it(env):
            started = time.monotonic()
            with pytest.raises(CommandTimeout) as info:
                env.run(["sh", "-c", "trap '' TERM; echo started; sleep 31.25"], timeout=1)
            elapsed = time.monotonic() - started
            assert 1 <= elapsed < 8, elapsed
            assert info.value.timeout == 1
            assert info.value.result.stdout == "started\\n"
            assert "timed out after 1" in str(info.value)
            time.sleep(0.2)
            assert not alive(b"31.25"), "the command survived its timeout"
            # a quick command with a timeout is fine, and the environment still works
            assert env.run("echo ok", timeout=5).stdout == "ok\\n"
    """,
    "binary": """
        def test_it(env):
            r = env.run(["printf", "\\\\000\\\\377\\\\200"], text=False)
            assert r.stdout == b"\\x00\\xff\\x80" and r.stderr == b""
            r = env.run(["cat"], input=bytes(range(256)), text=False)
            assert r.stdout == bytes(range(256))
            big = env.run(["head", "-c", "5000000", "/dev/zero"], text=False)
            assert big.stdout == bytes(5000000)
    """,
    "put-get": """
        def make_tree(root):
            root.mkdir()
            (root / "run.sh").write_text("#!/bin/sh\\necho ran\\n")
            (root / "run.sh").chmod(0o750)
            (root / "secret").write_text("s")
            (root / "secret").chmod(0o600)
            (root / "sub").mkdir()
            (root / "sub" / "data.bin").write_bytes(bytes(range(256)))
            (root / "sub" / "data.bin").chmod(0o640)
            (root / "sub").chmod(0o750)
            os.symlink("sub/data.bin", root / "inner-link")

        def check_tree(root):
            assert mode(root / "run.sh") == 0o750
            assert mode(root / "secret") == 0o600
            assert mode(root / "sub" / "data.bin") == 0o640
            assert (root / "sub" / "data.bin").read_bytes() == bytes(range(256))
            assert os.readlink(root / "inner-link") == "sub/data.bin"

        def test_it(env, tmp_path):
            src = tmp_path / "src"
            make_tree(src)
            remote = str(tmp_path / "remote" / "deep" / "tree")
            env.put(src, remote)
            assert env.run([remote + "/run.sh"]).stdout == "ran\\n"
            check_tree(Path(remote))
            assert mode(Path(remote) / "sub") == 0o750
            back = tmp_path / "back"
            env.get(remote, back)
            check_tree(back)
            # single files, replacing what is there
            env.put(src / "run.sh", str(tmp_path / "one.sh"))
            assert mode(tmp_path / "one.sh") == 0o750
            (tmp_path / "got.bin").write_text("old")
            env.get(remote + "/sub/data.bin", tmp_path / "got.bin")
            assert (tmp_path / "got.bin").read_bytes() == bytes(range(256))
            assert mode(tmp_path / "got.bin") == 0o640
            with pytest.raises(ValueError):
                env.put(src, "relative/path")
            with pytest.raises(RemoteError, match="FileNotFoundError|No such file|no such file"):
                env.get(str(tmp_path / "missing"), tmp_path / "x")
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(".isolate-get-")]
    """,
    "get-keeps-all-modes": """
        def test_it(env, tmp_path):
            remote = tmp_path / "remote"
            remote.mkdir()
            (remote / "sub").mkdir()
            (remote / "sub").chmod(0o750)
            (remote / "private").mkdir()
            (remote / "private").chmod(0o700)
            (remote / "readonly").write_text("x")
            (remote / "readonly").chmod(0o400)
            (remote / "shared").write_text("x")
            (remote / "shared").chmod(0o664)
            remote.chmod(0o711)
            env.get(str(remote), tmp_path / "back")
            got = {p.name: mode(p) for p in (tmp_path / "back").iterdir()}
            # group/other write bits are dropped on purpose (as tar's own filters do)
            assert got == {"sub": 0o750, "private": 0o700, "readonly": 0o400, "shared": 0o644}
            assert mode(tmp_path / "back") == 0o711
    """,
    "get-symlink-escape": """
        def test_it(env, tmp_path):
            outside = tmp_path / "outside"
            outside.mkdir()
            remote = tmp_path / "remote"
            remote.mkdir()
            (remote / "ok.txt").write_text("fine")
            os.symlink(str(outside), remote / "abs-link")
            dest_parent = tmp_path / "dest"
            dest_parent.mkdir()
            with pytest.raises(Exception) as info:
                env.get(str(remote), dest_parent / "got")
            assert "link" in str(info.value).lower() or "outside" in str(info.value).lower()
            assert list(outside.iterdir()) == []
            assert list(dest_parent.iterdir()) == [], "a failed get left files behind"
            # a top-level symlink to outside is refused the same way
            os.symlink(str(outside), tmp_path / "top-link")
            with pytest.raises(Exception):
                env.get(str(tmp_path / "top-link"), dest_parent / "got2")
            assert list(dest_parent.iterdir()) == []
    """,
    "logs-and-snapshot": """
        def test_it(env):
            text = env.logs()
            assert "==> agent: " in text and "==> provision: " in text
            assert "fake build of fakeenv" in text
            with pytest.raises(RemoteError, match="snapshots need the overlay isolation"):
                env.snapshot("one")
            # the worker survives a failed request
            assert env.run("echo still").stdout == "still\\n"
    """,
    "two-environments": """
        def test_it(isolate_env):
            a = isolate_env("fakeenv")
            b = isolate_env("fakeenv2")
            c = isolate_env("fakeenv")
            assert (a.name, b.name, c.name) == ("fakeenv", "fakeenv2", "fakeenv")
            for e in (a, b, c):
                assert e.run(["echo", e.name]).stdout == e.name + "\\n"
            c.close()
            with pytest.raises(Exception, match="closed"):
                c.run("true")
            assert a.run("echo a").stdout == "a\\n"
    """,
}


@pytest.mark.parametrize("case", list(CASES))
def test_environment_api(project: Project, case: str) -> None:
    project.tests(HEADER + textwrap.dedent(CASES[case]))
    result = project.run("-v")
    result.assert_outcomes(passed=1)


def test_fixture_skips_when_backend_unavailable(project: Project) -> None:
    project.tests("""
        def test_it(isolate_env):
            isolate_env("missing")
            raise AssertionError("not reached")
    """)
    result = project.run("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] *backend 'fake-missing' is unavailable: "
                                 "the fake engine is not installed*"])
    strict = project.run("--isolate-strict")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*the fake engine is not installed*--isolate-strict*"])


# ------------------------------------------------------- hostile archives from inside


def tar_of(*members: tuple[str, str, bytes | str]) -> bytes:
    """A tar archive; each member is (kind, name, content or link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(payload)
                tar.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(payload)
                tar.addfile(info)
            else:
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


HOSTILE = {
    "relative-link-then-write-through": [("dir", "root", ""), ("sym", "root/esc", "../../outside"),
                                         ("file", "root/esc/pwned", "x")],
    "absolute-link-then-write-through": [("dir", "root", ""), ("sym", "root/esc", "{outside}"),
                                         ("file", "root/esc/pwned", "x")],
    "dotdot-name": [("dir", "root", ""), ("file", "root/../../outside/pwned", "x")],
    "foreign-top": [("file", "other", "x")],
    "absolute-name": [("file", "/{outside}/pwned", "x")],
    "hardlink-outside": [("dir", "root", ""), ("hard", "root/h", "{outside}/victim")],
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_get_never_writes_outside_destination(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    members = [(k, n.format(outside=outside), p.format(outside=outside) if isinstance(p, str) else p)
               for k, n, p in HOSTILE[case]]
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    dest = work / "dest"
    with pytest.raises((IsolateError, tarfile.TarError, OSError)):
        _unpack_safely(tar_of(*members), dest)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "original"
    assert list(work.iterdir()) == [], "staging or partial output left behind"
    assert os.stat(outside / "victim").st_nlink == 1
