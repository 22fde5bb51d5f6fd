"""HostCgroup on a cgroup v2 kernel, inside the qemu_vm guest.

This host has the v1 controllers (the v1 path is what chroot and schroot use in the
rest of the suite); most current distributions have the unified v2 hierarchy.  The
guest's kernel is such a system: this module runs there, as root, and drives the same
code the host would (pytest_isolate.limits from the project tree).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared_support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.isolate("qemu_vm")]

MiB = 1 << 20
FORKS = """
import subprocess
procs = []
try:
    while len(procs) < 40:
        procs.append(subprocess.Popen(["sleep", "30"]))
except OSError as exc:
    print(len(procs), exc.errno)
for p in procs:
    p.kill()
"""


@pytest.fixture
def limits_module(pytestconfig: pytest.Config):  # type: ignore[no-untyped-def]
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", str(root)], check=True)
    sys.path.insert(0, str(pytestconfig.rootpath))
    try:
        from pytest_isolate import limits

        assert limits.cgroup_v2()
        yield limits
    finally:
        sys.path.remove(str(pytestconfig.rootpath))


def run_in(group, script: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(group.wrap(["/bin/sh", "-c", script]), capture_output=True,
                          text=True, timeout=60, check=False)


def test_v2_group_limits_what_runs_in_it(limits_module) -> None:  # type: ignore[no-untyped-def]
    limits = limits_module
    group = limits.HostCgroup.create(limits.Limits(memory=64 * MiB, pids=20, cpus=1),
                                     "environment 'v2'")
    assert group is not None and group.v2 and len(group.dirs) == 1
    path = group.dirs[0]
    try:
        assert path.parent == Path("/sys/fs/cgroup/pytest-isolate")
        assert (path / "memory.max").read_text().strip() == str(64 * MiB)
        assert (path / "pids.max").read_text().strip() == "20"
        assert (path / "cpu.max").read_text().split() == ["100000", "100000"]
        assert (path / "cpuset.cpus").read_text().strip() != ""
        # a command joins the group...
        out = run_in(group, "cat /proc/self/cgroup")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"0::/pytest-isolate/{path.name}"
        # ...and cannot start more than pids.max tasks
        out = subprocess.run(group.wrap([sys.executable, "-c", FORKS]), capture_output=True,
                             text=True, timeout=60, check=False)
        started, error = out.stdout.split()
        assert 10 <= int(started) < 20 and int(error) == errno.EAGAIN, (out.stdout, out.stderr)
        # ...nor use more memory than memory.max: the OOM killer ends the hog
        out = run_in(group, "exec python3 -c 'b = bytearray(256 << 20); print(len(b))'")
        assert out.returncode == -9, (out.returncode, out.stdout, out.stderr)
    finally:
        group.remove()
    assert not path.exists()


def test_v2_groups_of_a_dead_owner_are_reaped(limits_module) -> None:  # type: ignore[no-untyped-def]
    limits = limits_module
    group = limits.HostCgroup.create(limits.Limits(pids=50), "environment 'v2'")
    assert group is not None
    path = group.dirs[0]
    dead = path.parent / f"{limits.PREFIX}{2**22 + 9}-1-00000000"  # no such owner
    dead.mkdir()
    sleeper = subprocess.Popen(["/bin/sh", "-c", f'echo $$ > "{dead}/cgroup.procs"; '
                                "exec sleep 300"])
    try:
        wait_for("the sleeper to join the dead owner's group",
                 lambda: str(sleeper.pid) in (dead / "cgroup.procs").read_text().split(), 10,
                 interval=0.05)
        assert limits.reap_cgroups() == [str(dead)]
        assert sleeper.wait(10) == -9
        assert path.exists()  # a live owner's group (this process's) stays
    finally:
        sleeper.kill()
        sleeper.wait()
        group.remove()
    assert not dead.exists() and not path.exists()
    assert os.getpid() > 0
