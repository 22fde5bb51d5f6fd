"""Hostile or careless tests: whatever they do inside, the host is untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from faults_support import BACKENDS, Inner

from pytest_isolate.agent import wire as agent
from pytest_isolate.channel import AGENT_SOURCE
from pytest_isolate.environment import Environment
from pytest_isolate.errors import IsolateError

pytestmark = pytest.mark.integration

HOSTILE = """
    import errno, os, socket
    import pytest

    ENV = {env!r}

    @pytest.mark.isolate(ENV)
    def test_write_to_a_host_path():
        os.makedirs({host_dir!r}, exist_ok=True)
        with open({host_file!r}, "w") as f:
            f.write("escaped")
        assert open({host_file!r}).read() == "escaped"  # inside, it is there

    @pytest.mark.isolate(ENV)
    def test_rootdir_is_read_only():
        with pytest.raises(OSError) as info:
            open({probe!r}, "w")
        assert info.value.errno == errno.EROFS

    @pytest.mark.isolate(ENV)
    def test_host_variables_are_not_visible():
        assert "ISOLATE_FAULTS_FAKE_TOKEN" not in os.environ
        assert not any("fake-token-value" in v for v in os.environ.values())

    @pytest.mark.isolate(ENV)
    def test_only_loopback():
        assert [name for _, name in socket.if_nameindex()] == ["lo"]
        assert sorted(os.listdir("/sys/class/net")) == ["lo"]

    @pytest.mark.isolate(ENV)
    def test_host_processes_are_invisible():
        cmdlines = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmdlines.append(open("/proc/%s/cmdline" % pid, "rb").read())
                except OSError:
                    pass
        assert not any({outer_mark!r}.encode() in c for c in cmdlines)
        with pytest.raises(ProcessLookupError):
            os.kill({outer_pid}, 0)

    @pytest.mark.isolate(ENV)
    def test_no_host_disks():
        devices = set(os.listdir("/dev"))
        assert not devices & {{"sda", "vda", "xvda", "nvme0n1", "loop0", "mem", "kmsg"}}

    @pytest.mark.isolate(ENV)
    def test_chroot_and_dotdot_stay_inside():
        # root in a Docker container has CAP_SYS_CHROOT, and so has a test
        {climb}
        assert not os.path.exists({marker!r})
"""

#: The classic way out of a chroot: chroot into a directory, then '..' from outside it
#: up to the top of the mount namespace, and make that the root.  A test and a command
#: run inside have CAP_SYS_CHROOT; the top must be the environment's own root.
CLIMB = ("os.makedirs('/tmp/climb', exist_ok=True); top = os.open('/', os.O_RDONLY); "
         "os.chroot('/tmp/climb'); os.fchdir(top); [os.chdir('..') for _ in range(64)]; "
         "os.chroot('.'); print('TOP', sorted(os.listdir('/')))")


@pytest.mark.parametrize("env", BACKENDS)
def test_marker_tests_cannot_reach_the_host(inner: Inner, env: str,
                                            tmp_path_factory: pytest.TempPathFactory,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    host_dir = tmp_path_factory.mktemp("host-side")
    host_file = host_dir / "escaped.txt"
    marker = tmp_path_factory.mktemp("host-only") / "marker"  # on the host alone
    marker.write_text("host")
    probe = inner.path / "isolate-write-probe"
    outer_mark = f"faults-outer-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ISOLATE_FAULTS_FAKE_TOKEN", "fake-token-value")
    monkeypatch.setenv("ISOLATE_FAULTS_OUTER_MARK", outer_mark)
    sleeper = subprocess.Popen(["sleep", "600", outer_mark])  # a host process to look for
    try:
        inner.write("test_hostile.py", HOSTILE.format(
            env=env, host_dir=str(host_dir), host_file=str(host_file), probe=str(probe),
            outer_mark=outer_mark, outer_pid=sleeper.pid, climb=CLIMB, marker=str(marker)))
        result = inner.run(timeout=240)
    finally:
        sleeper.kill()
        sleeper.wait()
    result.assert_outcomes(passed=7)
    assert not host_file.exists()
    assert list(host_dir.iterdir()) == []
    assert not probe.exists()


# ---------------------------------------------------------------- put / get paths


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, isolate_env: Callable[[str], Environment]) -> Environment:
    return isolate_env(request.param)


def test_a_command_run_inside_cannot_climb_out(env: Environment, tmp_path: Path) -> None:
    """A command the fixture runs has a test's powers, CAP_SYS_CHROOT among them: its
    chroot and '..' end at the environment's root.  (Under schroot they reached the
    host's root filesystem, whose agent runs in a chroot below it.)"""
    marker = tmp_path / "host-only-marker"
    marker.write_text("host")
    code = "import os; " + CLIMB + f"; print('MARKER', os.path.exists({str(marker)!r}))"
    result = env.run(["python3", "-c", code])
    assert result.returncode == 0, result.stderr
    assert "MARKER False" in result.stdout, result.stdout
    assert "'usr'" in result.stdout  # it climbed to a root filesystem: the environment's


def test_put_with_dotdot_stays_inside(env: Environment, tmp_path: Path) -> None:
    name = f"isolate-faults-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "payload"
    src.write_text("payload")
    env.put(src, f"/../../../../../tmp/{name}")
    assert env.run(["cat", f"/tmp/{name}"]).stdout == "payload"
    assert not Path("/tmp", name).exists()


def test_put_through_a_symlink_stays_inside(env: Environment, tmp_path: Path) -> None:
    """Links inside the environment that name host paths resolve inside it."""
    victim = tmp_path / "victim"
    victim.write_text("host content")
    env.run(["mkdir", "-p", "/srv", str(tmp_path)], check=True)  # the same path, inside
    env.run(["ln", "-s", str(victim), "/srv/link"], check=True)
    env.run(["ln", "-s", str(tmp_path), "/srv/dirlink"], check=True)
    src = tmp_path / "payload"
    src.write_text("payload")
    env.put(src, "/srv/dirlink/through-dir")
    env.put(src, "/srv/dirlink/victim")
    env.put(src, "/srv/link")
    assert victim.read_text() == "host content"
    assert not (tmp_path / "through-dir").exists()
    assert env.run(["cat", f"{tmp_path}/through-dir"]).stdout == "payload"
    assert env.run(["cat", "/srv/link"]).stdout == "payload"


def test_get_with_dotdot_reads_inside(env: Environment, tmp_path: Path) -> None:
    env.run("echo inside > /etc/isolate-faults-file", check=True)
    env.get("/../../../etc/isolate-faults-file", tmp_path / "got")
    assert (tmp_path / "got").read_text() == "inside\n"


def test_get_of_a_symlink_out_of_the_tree_is_refused(env: Environment, tmp_path: Path) -> None:
    env.run(["ln", "-s", "/etc/shadow", "/etc/isolate-faults-link"], check=True)
    with pytest.raises(IsolateError, match="points outside the copied tree; refusing to "
                       "extract it on the host"):
        env.get("/etc/isolate-faults-link", tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link")


# ---------------------------------------------------------------- the agent's input


def start_host_agent() -> subprocess.Popen[bytes]:
    """The agent as the backends start it, but on the host (no environment around it)."""
    proc = subprocess.Popen([sys.executable, "-u", "-c", agent.BOOTSTRAP], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"%d\n" % len(AGENT_SOURCE) + AGENT_SOURCE)
    proc.stdin.flush()
    return proc


def exec_frame(marker: Path) -> bytes:
    return agent.encode_frame(0, {"op": "exec", "argv": ["touch", str(marker)]})


BAD_INPUT = {
    "bad-magic": b"XX" + b"\0" * 10 + b"garbage that is no frame at all",
    "announces-2GiB-blob": agent.HEADER.pack(agent.MAGIC, 0, 2, 2 << 30) + b"{}",
    "announces-2GiB-json": agent.HEADER.pack(agent.MAGIC, 0, 2 << 30, 0) + b"{",
    "malformed-json": agent.HEADER.pack(agent.MAGIC, 0, 5, 0) + b"{nope",
    "json-not-an-object": agent.HEADER.pack(agent.MAGIC, 0, 7, 0) + b"[1,2,3]",
    "object-without-op": agent.HEADER.pack(agent.MAGIC, 0, 8, 0) + b'{"a": 1}',
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_agent_rejects_bad_frames_and_executes_nothing(case: str, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    proc = start_host_agent()
    assert proc.stdin is not None
    # a valid request in the same write, after the bad bytes: it must never run
    started = time.monotonic()
    try:
        proc.stdin.write(BAD_INPUT[case] + exec_frame(marker))
        proc.stdin.flush()
    except BrokenPipeError:
        pass
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert b"ProtocolError" in err, err
    assert elapsed < 10, elapsed  # rejected from the header: the 2 GiB are never awaited
    assert not marker.exists()


def test_agent_still_executes_a_valid_frame(tmp_path: Path) -> None:
    """The control case of the test above: the same request alone does run."""
    marker = tmp_path / "executed"
    proc = start_host_agent()
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(exec_frame(marker))
    proc.stdin.flush()
    decoder = agent.FrameDecoder()
    frames: list[agent.Frame] = []
    while not frames:
        data = os.read(proc.stdout.fileno(), 65536)
        assert data, "the agent closed its output"
        frames = decoder.feed(data)
    proc.stdin.close()
    assert proc.wait(20) == 0
    assert frames[0][1]["op"] == "result" and frames[0][1]["returncode"] == 0
    assert marker.exists()


def test_decoder_keeps_the_frames_before_garbage() -> None:
    decoder = agent.FrameDecoder()
    good = agent.encode_frame(3, {"op": "report", "n": 1})
    frames = decoder.feed(good + b"NOT A FRAME AT ALL")
    assert frames == [(3, {"op": "report", "n": 1}, b"")]
    with pytest.raises(agent.ProtocolError):
        decoder.feed(b"")
