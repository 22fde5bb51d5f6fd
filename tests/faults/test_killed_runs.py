"""A pytest run killed with SIGKILL: the next run removes everything the dead one left.

One scenario per module (module-scoped fixtures, so the kill happens once): the
dead run had an environment of every backend running; what it left is counted
right after the kill and again after the next run, resource by resource
(processes, containers, LXC containers, schroot sessions and definitions, mounts,
work directories, cgroups).  Each test asserts one kind of resource, so a kind
that is not reaped shows as its own failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults_support import (
    BACKENDS,
    HostState,
    descendants,
    find_processes,
    host_state,
    inner_argv,
    kill_all,
    run_id_of,
    sleep_tag,
)
from shared_support import inner_environ, wait_for

pytestmark = pytest.mark.integration

#: The dead run also has a virtual machine running (QEMU, its socket directory in /tmp).
VM = "qemu_vm"


def dead_run_source(tag: str) -> str:
    """A quick test in the VM and every backend but the last, whose test then sleeps: all
    of them are running (instances live until the session ends) when the run is killed."""
    lines = ["import subprocess", "import pytest", ""]
    for env in (VM, *BACKENDS[:-1]):
        lines += [f"@pytest.mark.isolate({env!r})", f"def test_{env}():", "    pass", ""]
    lines += [f"@pytest.mark.isolate({BACKENDS[-1]!r})", "def test_zz_sleeps():",
              f"    subprocess.run(['sleep', {tag!r}])", ""]
    return "\n".join(lines)


#: Both runs give every backend a memory limit: their groups must be reaped too.
LIMITED = "".join(f'[tool.pytest-isolate.envs.{env}]\nmemory = "1G"\n\n' for env in BACKENDS)

NEXT_RUN = """
    import pytest

    @pytest.mark.isolate({envs})
    def test_next():
        pass
"""


class Scenario:
    def __init__(self, project: Path, cache_dir: str) -> None:
        self.project = project
        self.cache_dir = cache_dir
        self.run_id = ""
        self.tree: dict[tuple[int, str], str] = {}
        self.after_kill: HostState | None = None
        self.after_next: HostState | None = None
        self.next_output = ""
        self.next_status = -1


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Iterator[Scenario]:
    project = tmp_path_factory.mktemp("killed-run")
    sc = Scenario(project, cache_dir)
    tag = sleep_tag()
    (project / "test_dead.py").write_text(dead_run_source(tag))
    (project / "pyproject.toml").write_text(LIMITED)
    env = inner_environ()
    with open(project / "dead.out", "wb") as out:
        proc = subprocess.Popen(inner_argv(cache_dir), cwd=project, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        wait_for(f"sleep {tag} (every backend started)",
                 lambda: find_processes(f"sleep {tag}"), 300, proc)
        sc.run_id = run_id_of(cache_dir, proc.pid)
        sc.tree = descendants(proc.pid)
        del sc.tree[next(k for k in sc.tree if k[0] == proc.pid)]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(2)  # let what dies with its parent die
        sc.after_kill = host_state(cache_dir, sc.run_id, sc.tree)
        (project / "test_dead.py").unlink()
        (project / "test_next.py").write_text(textwrap.dedent(NEXT_RUN).format(
            envs=", ".join(repr(b) for b in (VM, *BACKENDS))))
        done = subprocess.run(inner_argv(cache_dir), cwd=project, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, env=env, timeout=600,
                              check=False)
        sc.next_output, sc.next_status = done.stdout + done.stderr, done.returncode
        time.sleep(1)
        sc.after_next = host_state(cache_dir, sc.run_id, sc.tree)
        yield sc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if sc.run_id:
            cleanup(sc)


def cleanup(sc: Scenario) -> None:
    """Remove by hand what the core left (so one gap does not leak into other tests)."""
    state = host_state(sc.cache_dir, sc.run_id, sc.tree)
    kill_all(state.processes)
    for name in state.containers:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    for session in state.sessions:
        subprocess.run(["schroot", "-e", "-c", f"session:{session}"], capture_output=True,
                       check=False)
    for point in reversed(state.mounts):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    for definition in state.definitions:
        Path("/etc/schroot/chroot.d", definition).unlink(missing_ok=True)
        shutil.rmtree(Path("/etc/schroot", definition), ignore_errors=True)
    from pytest_isolate.limits import remove_dirs

    remove_dirs([Path(g) for g in state.cgroups], timeout=2.0)
    work = Path(sc.cache_dir) / "runs" / sc.run_id / "work"
    if work.exists() and not host_state(sc.cache_dir, sc.run_id, {}).mounts:
        shutil.rmtree(work, ignore_errors=True)


def test_the_dead_run_left_something_to_reap(killed_run: Scenario) -> None:
    """The scenario is meaningful: the kill left resources for the next run to reap."""
    left = killed_run.after_kill
    assert left is not None
    print(f"left by the killed run {killed_run.run_id}:\n{left.summary()}")
    # docker's container, lxc's container and schroot's session outlive their owner (a
    # concurrent run of someone else may already have reaped one of them: at least one)
    assert left.containers or left.monitors or left.sessions, left.summary()


def test_the_next_run_passes(killed_run: Scenario) -> None:
    assert killed_run.next_status == 0, killed_run.next_output
    assert f"{len(BACKENDS) + 1} passed" in killed_run.next_output, killed_run.next_output


def after_next(sc: Scenario) -> HostState:
    assert sc.after_next is not None
    return sc.after_next


def test_no_process_of_the_dead_run_survives(killed_run: Scenario) -> None:
    assert after_next(killed_run).processes == {}


def test_no_container_survives(killed_run: Scenario) -> None:
    assert after_next(killed_run).containers == []


def test_no_schroot_session_or_definition_survives(killed_run: Scenario) -> None:
    state = after_next(killed_run)
    assert (state.sessions, state.definitions) == ([], [])


def test_no_lxc_container_survives(killed_run: Scenario) -> None:
    assert after_next(killed_run).monitors == []


def test_no_mount_survives(killed_run: Scenario) -> None:
    assert after_next(killed_run).mounts == []


def test_no_work_directory_survives(killed_run: Scenario) -> None:
    assert after_next(killed_run).work == []


def test_no_virtual_machine_survives(killed_run: Scenario) -> None:
    """The dead run's QEMU (a descendant of it: counted with the processes) and the
    socket directory it had in /tmp."""
    qemus = [text for text in killed_run.tree.values() if "qemu-system" in text.split(" ")[0]]
    assert len(qemus) == 1, killed_run.tree
    assert not [t for t in after_next(killed_run).processes.values() if "qemu-system" in t]
    assert after_next(killed_run).vm_dirs == []


def test_no_cgroup_survives(killed_run: Scenario) -> None:
    """The groups holding the limited environments (chroot's and schroot's own, LXC's):
    their processes died with the run, the directories stay until reaped."""
    assert killed_run.after_kill is not None and killed_run.after_kill.cgroups, \
        killed_run.after_kill
    assert after_next(killed_run).cgroups == []


# ---------------------------------------------------------------- killed while building

BUILD_SPEC = """
    [tool.pytest-isolate.envs.fresh]
    backend = "chroot"
    release = "bookworm"
    setup = ["echo built > /etc/isolate-build-marker"]
"""

BUILD_TEST = """
    import pytest

    @pytest.mark.isolate("fresh")
    def test_fresh():
        assert open("/etc/isolate-build-marker").read() == "built\\n"
"""


class BuildScenario:
    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.key = ""
        self.tmp_during: list[str] = []
        self.second_output = ""
        self.second_status = -1
        self.second_pid = -1
        self.manifest: dict[str, Any] = {}
        self.tmp_after: list[str] = []


@pytest.fixture(scope="module")
def killed_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildScenario]:
    """Run A builds a fresh root filesystem; run B waits for it on the same cache; A is
    killed mid-build; B must build it itself and never use A's half-made tree."""
    project = tmp_path_factory.mktemp("killed-build")
    cache = tmp_path_factory.mktemp("killed-build-cache")
    sc = BuildScenario(cache)
    (project / "pyproject.toml").write_text(textwrap.dedent(BUILD_SPEC))
    (project / "test_fresh.py").write_text(textwrap.dedent(BUILD_TEST))
    env = inner_environ()
    with open(project / "a.out", "wb") as out:
        a = subprocess.Popen(inner_argv(str(cache)), cwd=project, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    b: subprocess.Popen[str] | None = None
    try:
        sc.tmp_during = wait_for("run A's build directory",
                                 lambda: [p.name for p in (cache / "tmp").glob("rootfs-*")], 120, a)
        sc.key = sc.tmp_during[0].split(".")[0].split("-", 1)[1]
        b = subprocess.Popen(inner_argv(str(cache)), cwd=project, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True)
        sc.second_pid = b.pid
        time.sleep(4)  # A is downloading/unpacking packages, B waits for the key's lock
        a.send_signal(signal.SIGKILL)
        a.wait()
        time.sleep(1)
        out_b, _ = b.communicate(timeout=600)
        sc.second_output, sc.second_status = out_b, b.returncode
        manifest = cache / "rootfs" / sc.key / "manifest.json"
        sc.manifest = json.loads(manifest.read_text()) if manifest.exists() else {}
        sc.tmp_after = sorted(p.name for p in (cache / "tmp").iterdir())
        yield sc
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        leftovers = find_processes(str(cache))
        kill_all(leftovers)
        if leftovers:
            time.sleep(1)
        shutil.rmtree(cache, ignore_errors=True)


def test_killed_build_is_never_used(killed_build: BuildScenario) -> None:
    sc = killed_build
    assert sc.second_status == 0, sc.second_output
    assert "1 passed" in sc.second_output, sc.second_output
    # the entry was made by run B (its own build), complete, with its setup command run
    assert sc.manifest["key"] == sc.key
    assert sc.manifest["pid"] == sc.second_pid  # built by run B itself
    assert (sc.cache / "rootfs" / sc.key / "data" / "etc" / "isolate-build-marker").read_text() \
        == "built\n"


def test_next_run_cleans_the_killed_build_directory(killed_build: BuildScenario) -> None:
    assert killed_build.tmp_after == []


def test_cache_gc_removes_the_groups_of_dead_runs(cache_dir: str) -> None:
    """`cache gc` reaps like a run does: a group whose owner is gone, with a process in it."""
    from pytest_isolate.limits import CGROUP_ROOT, cgroup_v2, v1_hierarchy

    done = subprocess.run(["true"], check=True)
    assert done.returncode == 0
    parent = CGROUP_ROOT / "pytest-isolate" if cgroup_v2() else v1_hierarchy("pids")
    parent.mkdir(exist_ok=True)
    group = parent / f"pytest-isolate-{2**22 + 7}-1-{os.getpid():08x}"  # no such owner
    group.mkdir()
    sleeper = subprocess.Popen(["/bin/sh", "-c", f'echo $$ > "{group}/cgroup.procs"; '
                                "exec sleep 300"])
    try:
        wait_for("the sleeper to join the group",
                 lambda: str(sleeper.pid) in (group / "cgroup.procs").read_text().split(), 10)
        out = subprocess.run([sys.executable, "-m", "pytest_isolate", "cache", "gc",
                              "--cache-dir", cache_dir], capture_output=True, text=True,
                             timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert str(group) in out.stdout, out.stdout
        assert not group.exists()
        assert sleeper.wait(10) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
        if group.exists():
            group.rmdir()


def test_cache_gc_kills_the_qemu_of_a_dead_run(cache_dir: str) -> None:
    """A QEMU named after a run whose pytest is gone (a guest that could not power itself
    off) is killed by `cache gc`, as by the qemu backend's first start in a run."""
    dead_run = f"20260101-000000-{2**22 + 11}"
    fake = subprocess.Popen(["bash", "-c", 'exec -a qemu-system-x86_64 "$0" "$@"',
                             sys.executable, "-c", "import time; time.sleep(300)",
                             "-name", f"pytest-isolate:{dead_run}:qemu_vm"])
    live_run = f"20260101-000000-{os.getpid()}"
    live = subprocess.Popen(["bash", "-c", 'exec -a qemu-system-x86_64 "$0" "$@"',
                             sys.executable, "-c", "import time; time.sleep(300)",
                             "-name", f"guest=pytest-isolate-{live_run}-lv-abc,debug=on"])
    try:
        wait_for("the fake QEMUs", lambda: find_processes(dead_run) and find_processes(live_run),
                 10)
        out = subprocess.run([sys.executable, "-m", "pytest_isolate", "cache", "gc",
                              "--cache-dir", cache_dir], capture_output=True, text=True,
                             timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert f"qemu {fake.pid} of run {dead_run}" in out.stdout, out.stdout
        assert fake.wait(10) == -signal.SIGKILL
        assert live.poll() is None  # its run (this process) is alive
    finally:
        for p in (fake, live):
            p.kill()
            p.wait()
