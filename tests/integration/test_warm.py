"""Warm environments (``--isolate-warm``, pytest_isolate/warm.py) on the real backends.

A run that wants a warm environment and finds none starts cold and leaves a keeper
holding a started spare; the next run of the same key takes it.  Each run must still
start from an environment nothing has touched: the inner tests fail if they find what
an earlier run wrote, in the root or in a session fixture's file.  The keepers are
real processes driving the real engines; every test stops the keepers of its project.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import session_docker_image
from shared_support import inner_environ, output, pytest_argv, run_pytest, wait_for

from pytest_isolate import warm

pytestmark = pytest.mark.integration

BACKENDS = ["chroot", "docker", "lxc", "schroot"]

CONFTEST = textwrap.dedent(
    '''
    import os
    import pytest

    @pytest.fixture(scope="session")
    def session_file():
        path = "/var/tmp/isolate-warm-session"
        assert not os.path.exists(path), "an earlier run's session fixture wrote this"
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        yield path
    '''
)

TEST = textwrap.dedent(
    '''
    import os, time
    import pytest

    pytestmark = pytest.mark.isolate("ENV")

    def test_fresh(session_file):
        assert os.path.exists(session_file)
        assert not os.path.exists("/etc/isolate-warm-witness"), "an earlier run wrote this"
        with open("/etc/isolate-warm-witness", "w") as f:
            f.write("x")

    def test_sleeps():
        if os.path.exists(os.path.join(os.path.dirname(__file__), "sleep-now")):
            time.sleep(120)
    '''
)


def make_project(root: Path, env: str) -> Path:
    (root / "conftest.py").write_text(CONFTEST)
    (root / "test_warm_inner.py").write_text(TEST.replace("ENV", env))
    return root


def warm_run(root: Path, cache: str, *args: str, seconds: str = "120",
             extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One inner run with warm environments on; the environment's record of its report."""
    report = root / "report.json"
    result = run_pytest(root, cache, f"--isolate-warm={seconds}", f"--isolate-report={report}",
                        "-rA", *args, extra_env=extra_env)
    assert result.returncode == 0, output(result)
    envs = json.loads(report.read_text())["environments"]
    assert len(envs) == 1, envs
    return dict(next(iter(envs.values())))


def project_keepers(cache: str, root: Path) -> list[dict[str, Any]]:
    return [k for k in warm.keepers(Path(cache)) if k["rootdir"] == str(root)]


def leftovers(backend: str, run_id: str) -> list[str]:
    """What an instance of run_id left on the host, as the backend's engine lists it."""
    if backend == "docker":
        out = subprocess.run(["docker", "ps", "-aq", "--filter",
                              f"label=pytest-isolate.run={run_id}"],
                             capture_output=True, text=True, check=True).stdout
    elif backend == "lxc":
        out = subprocess.run(["lxc-ls", "-1"], capture_output=True, text=True,
                             check=True).stdout
    elif backend == "schroot":
        out = subprocess.run(["schroot", "--list", "--all-sessions"], capture_output=True,
                             text=True).stdout
    else:  # chroot: the launcher's argv names its work directory under the run's
        out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                             check=True).stdout
    return [line for line in out.splitlines() if run_id in line or
            (backend == "docker" and line.strip())]


def run_id_of(agent_log: str) -> str:
    """The keeper's run id, from an instance's log path (<cache>/runs/<id>/logs/...)."""
    parts = Path(agent_log).parts
    return parts[parts.index("runs") + 1]


@pytest.fixture
def stop_keepers(session_cache: str, tmp_path: Path) -> Iterator[None]:
    yield
    for status in project_keepers(session_cache, tmp_path):
        warm.stop_keeper(status)


def test_a_spare_taken_before_collection_for_no_test_is_stopped(
        tmp_path: Path, session_cache: str, stop_keepers: None) -> None:
    """The same command again takes the spare before it collects (the last run of it used
    the environment); when its tests are no longer bound there, the spare is given back
    (its pytest had started: stopped, and the keeper starts another), and the next run
    takes that other one, fresh."""
    root = make_project(tmp_path, "chroot")
    inner = root / "test_warm_inner.py"
    assert warm_run(root, session_cache, "test_warm_inner.py")["warm"] is False
    wait_for("the keeper's spare", lambda: [
        k for k in project_keepers(session_cache, root) if k["spare"]], timeout=120)
    marked = inner.read_text()
    inner.write_text("def test_here():\n    assert True\n")  # the marker removed
    report = root / "report.json"  # the command of warm_run, unchanged
    result = run_pytest(root, session_cache, "--isolate-warm=120", f"--isolate-report={report}",
                        "-rA", "test_warm_inner.py")
    assert result.returncode == 0 and "1 passed" in result.stdout, output(result)
    assert json.loads(report.read_text())["environments"] == {}
    # lent to that run and returned: the keeper served it, and holds a new spare
    wait_for("the keeper's next spare", lambda: [
        k for k in project_keepers(session_cache, root)
        if k["served"] == 1 and k["spare"] and not k["lent"]], timeout=120)
    inner.write_text(marked)
    # that run used no environment: this one takes the spare when its first test needs it
    again = warm_run(root, session_cache, "test_warm_inner.py")
    assert again["warm"] is True and again["early"] is False, again
    assert again["tests"] == 2
    wait_for("the keeper's next spare", lambda: [
        k for k in project_keepers(session_cache, root)
        if k["served"] == 2 and k["spare"] and not k["lent"]], timeout=120)
    last = warm_run(root, session_cache, "test_warm_inner.py")
    assert last["warm"] is True and last["early"] is True, last


@pytest.mark.parametrize("backend", BACKENDS)
def test_later_runs_take_a_fresh_spare(backend: str, tmp_path: Path, session_cache: str,
                                       stop_keepers: None) -> None:
    root = make_project(tmp_path, backend)
    first = warm_run(root, session_cache)
    assert first["warm"] is False  # nothing was waiting: started here, a keeper left
    keeper = wait_for("the keeper's spare", lambda: [
        k for k in project_keepers(session_cache, root) if k["spare"]], timeout=120)[0]
    assert keeper["backend"] == backend and keeper["served"] == 0
    second = warm_run(root, session_cache)
    third = warm_run(root, session_cache)
    # both taken from the keeper; each a different instance (its own log directory), and
    # the inner tests passed: neither saw what the run before it wrote
    assert second["warm"] is True and third["warm"] is True, (second, third)
    # the keeper held its spare when the second run began: taken before the run collected,
    # its pytest started on the run's arguments and collected the bound file after
    assert first["early"] is False and second["early"] is True, (first, second)
    assert second["logs"]["agent"] != third["logs"]["agent"]
    assert second["start"] < first["start"], (first["start"], second["start"])
    status = wait_for("the third run's return", lambda: [
        k for k in project_keepers(session_cache, root) if k["served"] == 2 and not k["lent"]],
        timeout=60)[0]
    run_id = run_id_of(second["logs"]["agent"])
    assert run_id.endswith("-warm")
    cli = subprocess.run([sys.executable, "-m", "pytest_isolate", "warm",
                          f"--cache-dir={session_cache}"], cwd=root, capture_output=True,
                         text=True, env=inner_environ())
    assert status["key"][:12] in cli.stdout and backend in cli.stdout, cli.stdout
    if backend == "chroot":  # what holds the entries it uses is said where gc keeps them
        gc = subprocess.run([sys.executable, "-m", "pytest_isolate", "cache", "gc", "--dry-run",
                             "--max-size", "0", f"--cache-dir={session_cache}"], cwd=root,
                            capture_output=True, text=True, env=inner_environ())
        assert f"kept rootfs/{second['key']}" in gc.stdout, gc.stdout
        assert "warm keeper" in gc.stderr and "pytest-isolate warm --stop" in gc.stderr, gc.stderr
    assert warm.stop_keeper(status)
    pid = status["owner"]["pid"]
    wait_for("the keeper's end", lambda: not os.path.exists(f"/proc/{pid}"), timeout=60)
    assert not project_keepers(session_cache, root)
    assert not (Path(session_cache) / "warm" / f"{status['key']}.sock").exists()
    assert leftovers(backend, run_id) == []


def test_another_key_starts_cold(tmp_path: Path, session_cache: str,
                                 stop_keepers: None) -> None:
    """Another environment variable is another key: never an instance started for other
    settings."""
    root = make_project(tmp_path, "chroot")
    warm_run(root, session_cache)
    wait_for("the keeper's spare", lambda: [
        k for k in project_keepers(session_cache, root) if k["spare"]], timeout=120)
    assert warm_run(root, session_cache)["warm"] is True
    other = warm_run(root, session_cache, extra_env={"ISOLATE_WARM_OTHER": "1"})
    assert other["warm"] is False
    keys = wait_for("two keepers", lambda: (
        ks if len(ks := project_keepers(session_cache, root)) == 2 else None), timeout=120)
    assert len({k["key"] for k in keys}) == 2


def test_idle_keeper_ends_with_its_spare(tmp_path: Path, session_cache: str,
                                         stop_keepers: None) -> None:
    root = make_project(tmp_path, "chroot")
    first = warm_run(root, session_cache, seconds="3")
    status = wait_for("the keeper", lambda: project_keepers(session_cache, root), timeout=60)[0]
    pid = status["owner"]["pid"]
    wait_for("the idle keeper's end", lambda: not os.path.exists(f"/proc/{pid}"), timeout=60)
    assert not (Path(session_cache) / "warm" / f"{status['key']}.sock").exists()
    assert not (Path(session_cache) / "warm" / f"{status['key']}.lock").exists()
    # its spare's launcher went with it (its argv names the keeper's run, "...-PID-warm")
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                text=True).stdout.splitlines()
                if f"-{pid}-warm" in line], "the spare's processes outlived their keeper"
    assert first["warm"] is False


def test_killed_run_gives_its_instance_back(tmp_path: Path, session_cache: str,
                                            stop_keepers: None) -> None:
    """A run killed while its test runs: the keeper stops the instance it lent, and the
    next run still gets a fresh spare."""
    root = make_project(tmp_path, "chroot")
    warm_run(root, session_cache)
    status = wait_for("the keeper's spare", lambda: [
        k for k in project_keepers(session_cache, root) if k["spare"]], timeout=120)[0]
    (root / "sleep-now").write_text("")  # not an environment variable: that is another key
    proc = subprocess.Popen(
        pytest_argv(session_cache, "--isolate-warm=120", "-k", "sleeps"), cwd=root,
        env=inner_environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    lent = wait_for("the lent instance", lambda: [
        k for k in project_keepers(session_cache, root) if k["lent"]], timeout=60, proc=proc)[0]
    assert lent["served"] == 1
    time.sleep(2)  # the test sleeps inside now
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log = Path(status["log"])
    wait_for("the keeper to stop the returned instance", lambda: [
        k for k in project_keepers(session_cache, root) if not k["lent"] and k["spare"]],
        timeout=60, explain=lambda: log.read_text()[-2000:] if log.exists() else "no log")
    assert "stopped a returned instance" in log.read_text()
    (root / "sleep-now").unlink()
    nxt = warm_run(root, session_cache)
    assert nxt["warm"] is True


def test_only_the_user_reaches_a_keeper(tmp_path: Path, session_cache: str,
                                        stop_keepers: None) -> None:
    """The sockets' directory is the user's alone: another user cannot connect, and a
    directory others can enter is refused (the run starts cold and says why)."""
    root = make_project(tmp_path, "chroot")
    cache = Path(session_cache)
    warm_run(root, session_cache)
    status = wait_for("the keeper's spare", lambda: [
        k for k in project_keepers(session_cache, root) if k["spare"]], timeout=120)[0]
    sock = cache / "warm" / f"{status['key']}.sock"
    probe = subprocess.run(
        ["setpriv", "--reuid=pytest-isolate-user", "--regid=pytest-isolate-user",
         "--clear-groups", sys.executable, "-I", "-c",
         "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
         str(sock)], capture_output=True, text=True)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
    warm.stop_keeper(status)
    pid = status["owner"]["pid"]
    wait_for("the keeper's end", lambda: not os.path.exists(f"/proc/{pid}"), timeout=60)
    (cache / "warm").chmod(0o755)
    try:
        result = run_pytest(root, session_cache, "--isolate-warm=120")
    finally:
        (cache / "warm").chmod(0o700)
    assert result.returncode == 0, output(result)
    assert "no warm environment" in result.stdout and "mode 0700" in result.stdout, output(result)
    assert not project_keepers(session_cache, root)


BUILT_TEST = '''
import pathlib
import pytest

HERE = pathlib.Path(__file__).parent

@pytest.mark.isolate("built")
def test_image_is_the_dockerfiles():
    assert pathlib.Path("/etc/marker").read_text() == (HERE / "ci" / "marker").read_text()
'''


@pytest.fixture
def base_image(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> str:
    return session_docker_image(pytestconfig, tmp_path_factory.mktemp("base"))


def test_an_image_is_keyed_by_its_digest(tmp_path: Path, session_cache: str, base_image: str,
                                         stop_keepers: None) -> None:
    """An image's spare is taken only while the image is the same: a rebuilt one (another
    digest) starts cold, and its tests see the new image."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest-isolate.envs.built]\nbackend = "docker"\ndockerfile = "ci/Dockerfile"\n')
    (tmp_path / "test_built.py").write_text(BUILT_TEST)
    ci = tmp_path / "ci"
    ci.mkdir()
    (ci / "Dockerfile").write_text(f"FROM {base_image}\nCOPY marker /etc/marker\n")
    (ci / "marker").write_text("first\n")
    assert warm_run(tmp_path, session_cache)["warm"] is False
    wait_for("the keeper's spare", lambda: [
        k for k in project_keepers(session_cache, tmp_path) if k["spare"]], timeout=120)
    assert warm_run(tmp_path, session_cache)["warm"] is True
    (ci / "marker").write_text("second\n")  # a new build, a new digest: another key
    assert warm_run(tmp_path, session_cache)["warm"] is False


def test_a_killed_keeper_is_replaced_and_its_files_swept(tmp_path: Path, session_cache: str,
                                                         stop_keepers: None) -> None:
    """SIGKILL: the keeper's spare goes with it (its launcher's input closes), the next run
    starts cold and a new keeper for the same key; `cache gc` removes only what the dead
    one left."""
    root = make_project(tmp_path, "chroot")
    warm_run(root, session_cache)
    status = wait_for("the keeper's spare", lambda: [
        k for k in project_keepers(session_cache, root) if k["spare"]], timeout=120)[0]
    pid = status["owner"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for("the keeper's end", lambda: not os.path.exists(f"/proc/{pid}"), timeout=30)
    wait_for("its spare's end", lambda: not [
        line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                        text=True).stdout.splitlines()
        if f"-{pid}-warm" in line], timeout=30)
    assert status["key"] in warm.sweep(Path(session_cache), dry=True)
    assert warm_run(root, session_cache)["warm"] is False
    wait_for("the new keeper's spare", lambda: [
        k for k in project_keepers(session_cache, root) if k["spare"]], timeout=120)
    assert status["key"] not in warm.sweep(Path(session_cache))  # the new one's files stay
    assert (Path(session_cache) / "warm" / f"{status['key']}.sock").exists()
    assert warm_run(root, session_cache)["warm"] is True
