"""pytest-xdist: several workers, one cache, each key built once, one instance per worker.

A generated project defines two environments whose root filesystem is the same new
one (a setup command writes a token unique to this test run, so its key has never
been built): ``xd-chroot`` (chroot backend) and ``xd-docker`` (docker backend, an
image imported from that root filesystem).  ``pytest -n 2 --dist load`` runs eight
marked tests, ordered chroot, docker, chroot, docker, ... so that xdist's first
batches (two consecutive items per worker) give both workers both environments.

Checked afterwards, from the cache and the run's outputs:
- exactly one root filesystem entry, built by exactly one mmdebstrap invocation (the
  ``$ `` command lines of every worker's provision.log), and one docker import;
- both workers ran tests of both environments, each with its own instance (its own
  run directory with an agent log, and one ``isolate.start`` phase per worker and
  environment in the junit XML);
- the controller's ``--isolate-report`` and terminal summary cover every worker;
- a second run in which a host-side test kills its worker (``os._exit``) while that
  worker holds a chroot instance and a docker container leaves no process,
  container or mount behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from shared_support import run_pytest, wait_for

from pytest_isolate import config
from pytest_isolate.backends import BUILTIN_BACKENDS

pytestmark = pytest.mark.integration

CHROOT, DOCKER = "xd-chroot", "xd-docker"

PYPROJECT = """\
[project]
name = "xdist-demo"
version = "0"

[tool.pytest.ini_options]
testpaths = ["tests"]

[tool.pytest-isolate.envs.{chroot}]
backend = "chroot"
setup = ["echo {token} >> /etc/built-marker"]

[tool.pytest-isolate.envs.{docker}]
backend = "docker"
setup = ["echo {token} >> /etc/built-marker"]
"""

TESTS = '''\
import os

import pytest

TOKEN = {token!r}


def inside():
    # written once by the setup command: the root filesystem was built with it, once
    with open("/etc/built-marker") as f:
        assert f.read() == TOKEN + "\\n"
    print("inside", os.uname().nodename)


@pytest.mark.isolate("{chroot}")
def test_c1():
    inside()


@pytest.mark.isolate("{docker}")
def test_d1():
    inside()


@pytest.mark.isolate("{chroot}")
def test_c2():
    inside()


@pytest.mark.isolate("{docker}")
def test_d2():
    inside()


def test_host_side():
    # runs on the host; in the crash run it kills its xdist worker, which by then holds
    # a chroot instance and a docker container (its first batch had one test of each)
    if os.environ.get("XD_DIE"):
        os._exit(3)


@pytest.mark.isolate("{chroot}")
def test_c3():
    inside()


@pytest.mark.isolate("{docker}")
def test_d3():
    inside()


@pytest.mark.isolate("{chroot}")
def test_c4():
    inside()


@pytest.mark.isolate("{docker}")
def test_d4():
    inside()
'''

WORKER_LINE = re.compile(
    r"^\[(gw\d+)\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED) tests/test_spread\.py::(\w+)", re.M)


@dataclass
class Run:
    result: subprocess.CompletedProcess[str]
    seconds: float
    report: Path
    junit: Path
    run_dirs: list[Path]  # <cache>/runs/<run id> made by this run's processes

    @property
    def out(self) -> str:
        return self.result.stdout + self.result.stderr

    def workers_by_test(self) -> dict[str, str]:
        return {m.group(3): m.group(1) for m in WORKER_LINE.finditer(self.result.stdout)}


@dataclass
class Project:
    root: Path
    cache: Path
    token: str
    key: str

    def pytest(self, name: str, *extra: str, env: dict[str, str] | None = None) -> Run:
        runs = self.cache / "runs"
        before = set(runs.iterdir()) if runs.is_dir() else set()
        report = self.root / f"{name}-report.json"
        junit = self.root / f"{name}-junit.xml"
        # options with a path value are written --opt=value: pytest looks for its rootdir
        # among the existing paths on the command line before plugins' options are known
        started = time.monotonic()
        result = run_pytest(self.root, self.cache, "-n", "2", "--dist", "load", "-v",
                            f"--isolate-report={report}", f"--junitxml={junit}", *extra,
                            extra_env=env, timeout=1800)
        seconds = time.monotonic() - started
        after = set(runs.iterdir()) if runs.is_dir() else set()
        return Run(result, seconds, report, junit, sorted(after - before))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("xdist-project")
    token = f"built-{uuid.uuid4().hex[:12]}"
    pyproject = root / "pyproject.toml"
    pyproject.write_text(PYPROJECT.format(chroot=CHROOT, docker=DOCKER, token=token))
    (root / "tests").mkdir()
    (root / "tests" / "test_spread.py").write_text(
        TESTS.format(chroot=CHROOT, docker=DOCKER, token=token))
    specs = config.resolve_envs(config.load_pyproject(pyproject), pyproject, BUILTIN_BACKENDS)
    key = specs[CHROOT].rootfs_key()
    assert specs[DOCKER].rootfs_key() == key
    cache = tmp_path_factory.mktemp("xdist-cache")
    yield Project(root, cache, token, key)
    _remove_images(token_key=key)
    shutil.rmtree(cache, ignore_errors=True)


def _docker() -> Any:
    import docker

    return docker.from_env()


def _remove_images(token_key: str) -> None:
    """The image made from this test's unique root filesystem is of no use to anyone else."""
    client = _docker()
    for image in client.images.list(filters={"label": f"pytest-isolate.rootfs={token_key}"}):
        for tag in image.tags or [image.id]:
            client.images.remove(tag, force=True)


@pytest.fixture(scope="module")
def built(project: Project) -> Run:
    """The first run: builds the new key while two workers want it."""
    run = project.pytest("build")
    print(f"xdist build run: {run.seconds:.1f}s")
    assert run.result.returncode == 0, run.out[-6000:]
    return run


def provision_commands(run_dirs: list[Path], env: str | None = None) -> list[str]:
    lines = []
    for run_dir in run_dirs:
        for log in run_dir.glob(f"logs/{env or '*'}/provision.log"):
            lines += log.read_text(errors="replace").splitlines()
    return lines


def test_every_test_passed_on_two_workers(built: Run) -> None:
    assert re.search(r"\b9 passed\b", built.out), built.out[-3000:]
    assert "created: 2/2 workers" in built.out
    workers = built.workers_by_test()
    assert len(workers) == 9
    assert set(workers.values()) == {"gw0", "gw1"}


def test_each_env_ran_on_both_workers_with_its_own_instance(built: Run) -> None:
    workers = built.workers_by_test()
    for env, prefix in ((CHROOT, "test_c"), (DOCKER, "test_d")):
        used = {w for test, w in workers.items() if test.startswith(prefix)}
        assert used == {"gw0", "gw1"}, (env, workers)
        # one instance per worker: each worker's run directory has the env's agent log
        agent_logs = [d.name for d in built.run_dirs if (d / "logs" / env / "agent.log").is_file()]
        assert sorted(name.rsplit("-", 1)[1] for name in agent_logs) == ["gw0", "gw1"], agent_logs
    # ... and started it once: one isolate.start phase per worker and environment
    starts: dict[str, int] = {}
    for case in ET.parse(built.junit).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if "isolate.start" in props:
            env = str(props["isolate.env"])
            starts[env] = starts.get(env, 0) + 1
            assert float(str(props["isolate.start"])) > 0
    assert starts == {CHROOT: 2, DOCKER: 2}


def test_one_cache_entry_built_by_one_mmdebstrap(project: Project, built: Run) -> None:
    entries = sorted(p.name for p in (project.cache / "rootfs").iterdir())
    assert entries == [project.key]
    manifest = json.loads((project.cache / "rootfs" / project.key / "manifest.json").read_text())
    assert manifest["key"] == project.key
    assert manifest["spec"]["setup"] == [f"echo {project.token} >> /etc/built-marker"]
    # nothing half-built left in the cache's temporary directory
    assert list((project.cache / "tmp").iterdir()) == []

    # every "$ " command line of every worker's provisioning logs
    commands = [ln for ln in provision_commands(built.run_dirs) if ln.startswith("$ ")]
    builds = [ln for ln in commands if re.match(r"\$ (unshare .* -- )?\S*mmdebstrap ", ln)]
    assert len(builds) == 1, commands
    setups = [ln for ln in commands if project.token in ln]
    assert len(setups) == 1, commands
    imports = [ln for ln in provision_commands(built.run_dirs) if ln.startswith("docker import of")]
    assert len(imports) == 1, imports


def test_the_image_was_made_once(project: Project, built: Run) -> None:
    images = _docker().images.list(filters={"label": f"pytest-isolate.rootfs={project.key}"})
    assert len(images) == 1
    assert any(tag.startswith(f"pytest-isolate/{DOCKER}:") for tag in images[0].tags)


def test_controller_report_covers_every_worker(project: Project, built: Run) -> None:
    """--isolate-report is written by the controller, from every worker's report.

    (Each worker writing it would leave only the last writer's part in the file.)
    """
    data = json.loads(built.report.read_text())
    assert data["version"] == 1
    tests = sorted((t["nodeid"].rsplit("::", 1)[1], t["env"], t["outcome"]) for t in data["tests"])
    assert tests == sorted([(f"test_c{i}", CHROOT, "passed") for i in range(1, 5)]
                           + [(f"test_d{i}", DOCKER, "passed") for i in range(1, 5)])
    for env in (CHROOT, DOCKER):
        stats = data["environments"][env]
        assert stats["tests"] == 4
        assert stats["starts"] == 2  # one instance per worker
        assert stats["cache_hit"] is False  # built in this run, by one of the workers
        assert stats["key"]
    assert data["environments"][CHROOT]["key"] == project.key


def test_controller_prints_the_summary_table(built: Run) -> None:
    lines = built.result.stdout.splitlines()
    assert any("pytest-isolate" in ln and ln.startswith("=") for ln in lines), built.out[-3000:]
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith((CHROOT, DOCKER))}
    assert rows[CHROOT][1] == "chroot" and rows[CHROOT][3] == "4"
    assert rows[DOCKER][1] == "docker" and rows[DOCKER][3] == "4"
    assert "(built)" in " ".join(rows[CHROOT])


def test_a_killed_worker_leaves_nothing_behind(project: Project, built: Run) -> None:
    run = project.pytest("crash", env={"XD_DIE": "1"})
    print(f"xdist crash run: {run.seconds:.1f}s")
    out = run.out
    died = re.search(r"worker '(gw\d)' crashed while running 'tests/test_spread.py::test_host_side'", out)
    assert died, out[-4000:]
    assert re.search(r"\b1 failed, 8 passed\b", out), out[-3000:]
    dead = died.group(1)
    dead_dir = next(d for d in run.run_dirs if d.name.endswith(f"-{dead}"))
    # the killed worker did hold an instance of both environments when it died
    assert (dead_dir / "logs" / CHROOT / "agent.log").is_file()
    assert (dead_dir / "logs" / DOCKER / "agent.log").is_file()

    # the run is over: no container of any of its processes, whether running or stopped
    client = _docker()
    for run_dir in run.run_dirs:
        left = client.containers.list(all=True, filters={"label": f"pytest-isolate.run={run_dir.name}"})
        assert left == [], (run_dir.name, [c.name for c in left])
    # no process that uses this cache (agents, launchers, builders) ...
    cache = str(project.cache)
    procs = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cache in cmdline:
                procs.append(f"{pid}: {cmdline[:200]}")
    assert procs == []
    # ... and no mount below it
    with open("/proc/self/mountinfo") as f:
        assert [ln for ln in f if cache in ln] == []


VM_TESTS = '''\
import platform

import pytest


@pytest.mark.isolate("qemu_vm")
def test_x1():
    assert platform.machine() == "x86_64"


@pytest.mark.isolate("arm64_vm")
def test_a1():
    assert platform.machine() == "aarch64"


@pytest.mark.isolate("qemu_vm")
def test_x2():
    assert platform.machine() == "x86_64"


@pytest.mark.isolate("arm64_vm")
def test_a2():
    assert platform.machine() == "aarch64"


@pytest.mark.isolate("qemu_vm")
def test_x3():
    assert platform.machine() == "x86_64"


@pytest.mark.isolate("arm64_vm")
def test_a3():
    assert platform.machine() == "aarch64"
'''


def qemu_pids(run_ids: set[str]) -> set[int]:
    """The QEMUs of the runs run_ids (their -name is pytest-isolate:RUN:ENV): not those of
    other runs on this machine."""
    out = subprocess.run(["pgrep", "-af", "^[^ ]*qemu-system"], capture_output=True, text=True,
                         check=False).stdout
    return {int(pid) for pid, _, argv in (line.partition(" ") for line in out.splitlines())
            if any(f"pytest-isolate:{run}:" in argv for run in run_ids)}


def test_virtual_machines_on_two_workers(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """`-n 2` over qemu_vm and arm64_vm with the suite's warm cache: each worker restores its
    own machines from the saved states (no build), every test passes, no QEMU is left."""
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    cache = manager.cache.root
    (tmp_path / "test_vms.py").write_text(VM_TESTS)
    runs = cache / "runs"
    before = set(runs.iterdir())
    report = tmp_path / "report.json"
    result = run_pytest(tmp_path, cache, "-n", "2", "--dist", "load", "-v",
                        f"--isolate-report={report}", "test_vms.py", timeout=1200)
    out = result.stdout
    assert result.returncode == 0, out[-6000:] + result.stderr[-2000:]
    assert re.search(r"\b6 passed\b", out), out[-3000:]
    data = json.loads(report.read_text())
    for env in ("qemu_vm", "arm64_vm"):
        stats = data["environments"][env]
        assert stats["tests"] == 3, stats
        assert stats["cache_hit"] is True, stats  # nothing built: the suite's images
        assert 1 <= stats["starts"] <= 2, stats  # one machine per worker that ran it
    ran_on = {m.group(1) for m in re.finditer(r"\[(gw\d)\] \[[ \d%]+\] PASSED", out)}
    assert ran_on == {"gw0", "gw1"}, out[-3000:]
    # the two workers' runs (and those of any other run that started meanwhile on this cache)
    ours = {p.name for p in set(runs.iterdir()) - before}
    assert len(ours) >= 2, ours
    wait_for("the run's QEMUs to end", lambda: not qemu_pids(ours), 15, interval=0.2,
             explain=lambda: f"still running: {sorted(qemu_pids(ours))}")
