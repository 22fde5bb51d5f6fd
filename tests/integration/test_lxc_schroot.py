"""Backend-specific behaviour of the lxc and schroot backends, on the real engines.

What the conformance suite cannot see from inside: the containers and
sessions are labelled with the run, removed at the end, reaped after a run
that was killed, the cached root filesystem is never written, and what
isolation each backend adds.  Inner runs are separate pytest processes that
share the outer run's cache, so the root filesystem is built at most once.
"""

from __future__ import annotations

import os
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_isolate.backends import lxc as lxc_backend
from pytest_isolate.backends import schroot as schroot_backend
from pytest_isolate.backends.base import Backend, RunContext
from pytest_isolate.cache import Cache
from pytest_isolate.errors import BackendUnavailable
from pytest_isolate.spec import EnvSpec

pytestmark = pytest.mark.integration

RUN_TIMEOUT = 600


@pytest.fixture(scope="session")
def cache_dir(pytestconfig: pytest.Config) -> Iterator[str]:
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    assert manager is not None
    yield str(manager.cache.root)


def run_inner(pytester: pytest.Pytester, cache_dir: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-s", "--isolate-strict", f"--isolate-cache-dir={cache_dir}",
        *args, timeout=RUN_TIMEOUT)


def printed(result: pytest.RunResult, tag: str) -> list[str]:
    """Values the inner run printed as 'TAG value' lines."""
    found = (re.search(rf"(?:^|\s){tag} (.+)$", line) for line in result.outlines)
    return [m.group(1).strip() for m in found if m]


def rootfs_dirs(cache_dir: str) -> list[Path]:
    return sorted(Path(cache_dir, "rootfs").glob("*/data"))


# ---------------------------------------------------------------- lxc

LXC_INSIDE = textwrap.dedent(
    """
    import json, os, pathlib
    from pytest_isolate.backends import lxc as L

    def test_inside(lxc):
        mine = [m for m in L.monitors() if "-%d-" % os.getpid() in m[2]]
        assert len(mine) == 1, L.monitors()
        pid, lxcpath, name = mine[0]
        cdir = pathlib.Path(lxcpath) / name
        label = json.loads((cdir / L.LABEL).read_text())
        assert label["pid"] == os.getpid() and label["env"] == "lxc"
        config = (cdir / "config").read_text()
        assert "lxc.net.0.type = empty" in config
        assert "lxc.rootfs.path = overlay:" in config
        assert lxc.run("hostname").stdout == "isolate-lxc\\n"
        # the container's init and the agent: nothing of the host's processes
        procs = lxc.run("ls -d /proc/[0-9]*").stdout.split()
        assert len(procs) < 10, procs
        assert lxc.run(["sh", "-c", "echo x > /etc/isolate-lxc-probe"]).returncode == 0
        print("CONTAINER", lxcpath, name)
    """
)


def wait_no_monitor(name: str, lxcpath: Path, timeout: float = 5.0) -> bool:
    """True once no monitor of the container runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(n == name and p == str(lxcpath) for _, p, n in lxc_backend.monitors()):
            return True
        time.sleep(0.05)
    return False


def test_lxc_container_is_labelled_and_removed(pytester: pytest.Pytester, cache_dir: str) -> None:
    pytester.makepyfile(test_inside=LXC_INSIDE)
    result = run_inner(pytester, cache_dir)
    result.assert_outcomes(passed=1)
    [where] = printed(result, "CONTAINER")
    lxcpath, name = where.rsplit(" ", 1)
    assert name.startswith(lxc_backend.PREFIX)
    assert wait_no_monitor(name, Path(lxcpath))
    assert not Path(lxcpath, name).exists()
    logs = list(Path(cache_dir, "runs").glob("*/logs/lxc/lxc.log"))
    assert any(name in p.read_text(errors="replace") for p in logs)
    for rootfs in rootfs_dirs(cache_dir):
        assert not (rootfs / "etc" / "isolate-lxc-probe").exists()
        assert not (rootfs / ".isolate").exists()


KILLED_RUN = textwrap.dedent(
    """
    import os, signal
    from pytest_isolate.backends import lxc as L
    from pytest_isolate.backends import schroot as S

    def test_killed(ENV):
        assert ENV.run("true").returncode == 0
        print("OWNER", os.getpid(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _monitor_names() -> set[str]:
    return {name for _, _, name in lxc_backend.monitors()}


def test_lxc_reaps_containers_of_killed_runs(pytester: pytest.Pytester, cache_dir: str) -> None:
    pytester.makepyfile(test_killed=KILLED_RUN.replace("ENV", "lxc"))
    before = _monitor_names()
    killed = run_inner(pytester, cache_dir, "test_killed.py")
    assert killed.ret == -9 or "OWNER" in killed.stdout.str()
    left = _monitor_names() - before
    assert len(left) == 1, left  # the killed run's container still runs
    [name] = left
    assert f"-{printed(killed, 'OWNER')[0]}-" in name

    pytester.makepyfile(test_next="def test_next(lxc):\n    assert lxc.run('true').ok\n")
    result = run_inner(pytester, cache_dir, "test_next.py")
    result.assert_outcomes(passed=1)
    assert name not in _monitor_names()
    result.stdout.fnmatch_lines([f"*removed container {name} left by an interrupted run*"])
    assert not list(Path(cache_dir, "runs").glob(f"*/work/lxc/{name}"))


# ---------------------------------------------------------------- schroot

SCHROOT_INSIDE = textwrap.dedent(
    """
    import json, os, pathlib, socket
    from pytest_isolate.backends import schroot as S

    def test_inside(schroot):
        mine = [n for n in os.listdir(S.CHROOT_D) if "-%d-" % os.getpid() in n]
        assert len(mine) == 1, mine
        [name] = mine
        label = S.read_owner(S.CHROOT_D / name)
        assert label["pid"] == os.getpid() and label["env"] == "schroot"
        text = (S.CHROOT_D / name).read_text()
        assert "union-type=overlay" in text and "profile=" + name in text
        fstab = (S.SCHROOT_DIR / name / "fstab").read_text()
        assert "/home" not in fstab
        sessions = [s for s in S.list_sessions() if s.startswith(name)]
        assert len(sessions) == 1, S.list_sessions()
        assert schroot.run("hostname").stdout == "isolate-schroot\\n"
        assert socket.gethostname() != "isolate-schroot"
        # own PID namespace: only the agent's processes
        procs = schroot.run("ls -d /proc/[0-9]*").stdout.split()
        assert len(procs) < 10, procs
        assert schroot.run("cat /proc/1/cmdline | tr '\\\\0' ' '").stdout != \\
            pathlib.Path("/proc/1/cmdline").read_text().replace("\\0", " ")
        # the environment's own users, not the host's
        assert schroot.run(["id", "-un"]).stdout == "root\\n"
        assert schroot.run(["sh", "-c", "echo x > /etc/isolate-schroot-probe"]).returncode == 0
        print("CHROOT", name)
        print("SESSION", sessions[0])
    """
)


def test_schroot_session_is_labelled_and_ended(pytester: pytest.Pytester, cache_dir: str) -> None:
    pytester.makepyfile(test_inside=SCHROOT_INSIDE)
    result = run_inner(pytester, cache_dir)
    result.assert_outcomes(passed=1)
    [name] = printed(result, "CHROOT")
    [session] = printed(result, "SESSION")
    assert session not in schroot_backend.list_sessions()
    assert not (schroot_backend.CHROOT_D / name).exists()
    assert not (schroot_backend.SCHROOT_DIR / name).exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert session not in mounts and name not in mounts
    for rootfs in rootfs_dirs(cache_dir):
        assert not (rootfs / "etc" / "isolate-schroot-probe").exists()


def test_schroot_reaps_sessions_of_killed_runs(pytester: pytest.Pytester, cache_dir: str) -> None:
    pytester.makepyfile(test_killed=KILLED_RUN.replace("ENV", "schroot"))
    before = set(schroot_backend.list_sessions())
    killed = run_inner(pytester, cache_dir, "test_killed.py")
    [owner] = printed(killed, "OWNER")
    left = set(schroot_backend.list_sessions()) - before
    assert len(left) == 1, left  # the killed run's session is still open
    [session] = left
    assert f"-{owner}-" in session
    chroot = session.rsplit("-s", 1)[0]
    assert (schroot_backend.CHROOT_D / chroot).exists()

    pytester.makepyfile(test_next="def test_next(schroot):\n    assert schroot.run('true').ok\n")
    result = run_inner(pytester, cache_dir, "test_next.py")
    result.assert_outcomes(passed=1)
    assert session not in schroot_backend.list_sessions()
    assert not (schroot_backend.CHROOT_D / chroot).exists()
    assert not (schroot_backend.SCHROOT_DIR / chroot).exists()
    assert session not in Path("/proc/self/mountinfo").read_text()
    result.stdout.fnmatch_lines([f"*schroot: removed {session} left by an interrupted run*"])


def test_schroot_network_when_asked(pytester: pytest.Pytester, cache_dir: str) -> None:
    """network = true: the host's network namespace (its interfaces are visible)."""
    pytester.makepyprojecttoml(
        '[tool.pytest.ini_options]\nmarkers = []\n'
        '[tool.pytest-isolate.envs.netroot]\nbackend = "schroot"\nnetwork = true\n'
        '[tool.pytest-isolate.envs.netlxc]\nbackend = "lxc"\nnetwork = true\n')
    host = sorted(os.listdir("/sys/class/net"))
    pytester.makepyfile(test_net=textwrap.dedent(f"""
        import pytest

        @pytest.mark.parametrize("name", ["netroot", "netlxc"])
        def test_net(isolate_env, name):
            env = isolate_env(name)
            assert sorted(env.run("ls /sys/class/net").stdout.split()) == {host!r}
    """))
    result = run_inner(pytester, cache_dir)
    result.assert_outcomes(passed=2)


# ---------------------------------------------------------------- root


@pytest.mark.parametrize("backend", [lxc_backend.LxcBackend, schroot_backend.SchrootBackend])
def test_non_root_is_told_why(backend: type[Backend], tmp_path: Path) -> None:
    """check() as an unprivileged user (a forked child that dropped its effective uid)."""
    assert backend.needs_root
    run = RunContext("r", tmp_path, Cache(tmp_path / "cache"), tmp_path, tmp_path, print)
    spec = EnvSpec(name=backend.name, backend=backend.name)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        message = "no error"
        try:
            os.setegid(65534)
            os.seteuid(65534)
            backend(run).check(spec)
        except BackendUnavailable as exc:
            message = str(exc)
        except BaseException as exc:
            message = repr(exc)
        os.write(wfd, message.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        message = f.read()
    os.waitpid(pid, 0)
    assert re.search(rf"backend '{backend.name}' is unavailable: .*needs root", message), message
    # and as root it is available on this machine
    backend(run).check(spec)
