"""The Docker engine goes away mid-run: errors name the engine, nothing hangs.

A second, private engine (own socket, data root, exec root and cgroup parent)
is started for this module and killed with SIGKILL while a test runs in one of
its containers; the main engine is never touched.  Everything the private
engine leaves (its containerd, shims, container processes, mounts, files) is
removed by this module, found by those private paths and cgroup names only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_support import find_processes, inner_options, kill_all, sleep_tag, wait_for

pytestmark = pytest.mark.integration

NAME = "isolate-faults-docker"
SOCK = f"/tmp/{NAME}.sock"
DATA = f"/tmp/{NAME}"
EXEC = "/tmp/isolate-faults-exec"
PIDFILE = f"/tmp/{NAME}.pid"
HOST = f"unix://{SOCK}"


def in_private_cgroup(pid: int) -> bool:
    try:
        return NAME in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def private_processes() -> list[int]:
    pids = set(find_processes(EXEC)) | set(find_processes(DATA)) | set(find_processes(SOCK))
    pids |= {int(p) for p in os.listdir("/proc") if p.isdigit() and in_private_cgroup(int(p))}
    pids.discard(os.getpid())
    return sorted(pids)


def private_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith((DATA + "/", EXEC + "/")) or p in (DATA, EXEC)]


def remove_private_engine() -> None:
    for _ in range(3):
        pids = private_processes()
        if not pids:
            break
        kill_all(pids)
        time.sleep(0.5)
    for point in sorted(private_mounts(), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    for path in (DATA, EXEC):
        if not private_mounts():
            shutil.rmtree(path, ignore_errors=True)
    for path in (SOCK, PIDFILE):
        Path(path).unlink(missing_ok=True)
    # the killed engine cannot remove its containers' groups (its --cgroup-parent)
    from pytest_isolate.limits import remove_dirs

    remove_dirs(sorted(Path("/sys/fs/cgroup").glob(f"*/{NAME}")), timeout=2.0)


def engine_answers() -> bool:
    done = subprocess.run(["docker", "-H", HOST, "info", "--format", "{{.ID}}"],
                          capture_output=True, timeout=10, check=False)
    return done.returncode == 0


class EngineScenario:
    output = ""
    elapsed = 0.0


def start_private_engine(log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["dockerd", "-H", HOST, "--data-root", DATA, "--exec-root", EXEC, "--pidfile", PIDFILE,
             "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
             "--cgroup-parent", NAME],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    wait_for("the private docker engine", lambda: engine_answers(), 60, proc, interval=0.5)
    return proc


ENGINE_RUN = """
import subprocess
import pytest

@pytest.mark.isolate("docker")
def test_a_running_when_the_engine_dies():
    subprocess.run(["sleep", {tag!r}])

@pytest.mark.isolate("docker")
def test_b_after_the_engine_died():
    pass

@pytest.mark.isolate("chroot")
def test_c_other_backends_go_on():
    pass
"""


@pytest.fixture(scope="module")
def engine_killed(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Iterator[EngineScenario]:
    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is not installed (apt-get install docker.io)")
    project = tmp_path_factory.mktemp("engine-killed")
    tag = sleep_tag()
    (project / "test_engine.py").write_text(ENGINE_RUN.format(tag=tag))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    env["DOCKER_HOST"] = HOST
    sc = EngineScenario()
    remove_private_engine()  # what an interrupted earlier session left
    engine = proc = None
    try:
        engine = start_private_engine(project / "dockerd.log")
        with open(project / "inner.out", "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pytest", *inner_options(cache_dir)],
                                    cwd=project, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        wait_for(f"sleep {tag} in a container of the private engine",
                 lambda: find_processes(f"sleep {tag}"), 240, proc)
        killed_at = time.monotonic()
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        proc.wait(120)
        sc.elapsed = time.monotonic() - killed_at
        sc.output = (project / "inner.out").read_text(errors="replace")
        yield sc
    finally:
        for p in (proc, engine):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        remove_private_engine()


def test_the_running_test_fails_with_the_reason(engine_killed: EngineScenario) -> None:
    out = engine_killed.output
    assert "test_engine.py::test_a_running_when_the_engine_dies FAILED" in out, out
    assert "environment 'docker': the agent's stream ended" in out, out
    assert "--- environment log tail ---" in out, out


def test_the_next_test_errors_naming_the_engine(engine_killed: EngineScenario) -> None:
    out = engine_killed.output
    assert "test_engine.py::test_b_after_the_engine_died ERROR" in out, out
    assert ("backend 'docker' is unavailable: the docker engine does not answer" in out), out
    assert "point DOCKER_HOST at a running engine" in out, out


def test_other_backends_go_on_and_nothing_hangs(engine_killed: EngineScenario) -> None:
    out = engine_killed.output
    assert "test_engine.py::test_c_other_backends_go_on PASSED" in out, out
    assert "1 failed, 1 passed, 1 error" in out, out
    assert engine_killed.elapsed < 30, engine_killed.elapsed


def test_the_error_names_the_endpoint(engine_killed: EngineScenario) -> None:
    assert f"does not answer at {HOST}" in engine_killed.output
