"""A test that fills the environment's disk or memory, or starts too many processes.

Each test's writable root (its /tmp included) is a tmpfs of the spec's ``disk`` size,
1 GiB by default, discarded with the test; /dev/shm is bounded by it too.
``memory``, ``cpus`` and ``pids`` are a cgroup of the environment (host cgroups for
chroot and schroot, the engine's for docker and lxc, a guest cgroup plus the guest's
RAM and CPUs for qemu).  A test over its memory limit is ended by the kernel's OOM
killer and reported as such; the environment (its agent) survives for the next test.
"""

from __future__ import annotations

import pytest
from faults_support import BACKENDS, Inner

pytestmark = pytest.mark.integration

MiB = 1 << 20

FILL = """
    import os
    import pytest

    ENV = {env!r}
    MiB = 1 << 20

    def free(path):
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    @pytest.mark.isolate(ENV)
    def test_fills():
        before = free("/tmp")
        for path in ("/tmp/fill", "/var/fill"):
            with open(path, "wb") as f:
                for _ in range(64):
                    f.write(b"x" * MiB)
        assert before - free("/tmp") >= 60 * MiB
        print("FREE-BEFORE", before)

    @pytest.mark.isolate(ENV)
    def test_space_is_back():
        assert not os.path.exists("/tmp/fill") and not os.path.exists("/var/fill")
        st = os.statvfs("/tmp")
        assert (st.f_blocks - st.f_bfree) * st.f_frsize < 8 * MiB
"""


@pytest.mark.parametrize("env", BACKENDS)
def test_written_data_is_discarded_with_the_test(inner: Inner, env: str) -> None:
    inner.write("test_fill.py", FILL.format(env=env))
    result = inner.run(timeout=240)
    result.assert_outcomes(passed=2)


BOUNDED = """
    import os
    import pytest

    @pytest.mark.isolate({env!r})
    def test_sizes():
        sizes = {{}}
        for path in ("/", "/tmp", "/dev/shm"):
            st = os.statvfs(path)
            sizes[path] = st.f_blocks * st.f_frsize
        print("SIZES", sizes)
        assert sizes == {{"/": 1 << 30, "/tmp": 1 << 30, "/dev/shm": 1 << 30}}
        # the root's writable layer and /tmp are one budget, not two
        assert os.stat("/").st_dev == os.stat("/tmp").st_dev
"""


@pytest.mark.parametrize("env", BACKENDS)
def test_writable_layers_are_bounded_by_default(inner: Inner, env: str) -> None:
    inner.write("test_bounded.py", BOUNDED.format(env=env))
    inner.run(timeout=240).assert_outcomes(passed=1)


LIMITS = """
    [tool.pytest-isolate.envs.limited]
    backend = {backend!r}
    disk = "64M"
    memory = "128M"
    pids = 64
    cpus = 1

    [tool.pytest-isolate.envs.half-cpu]
    backend = {backend!r}
    cpus = 0.5
"""

LIMITED = """
    import errno, os, subprocess, sys, time
    import pytest

    MiB = 1 << 20

    @pytest.mark.isolate("limited")
    def test_disk():
        written = 0
        with pytest.raises(OSError) as info:
            with open("/tmp/fill", "wb") as f:
                while written < 256 * MiB:
                    f.write(b"x" * MiB)
                    f.flush()
                    written += MiB
        assert info.value.errno == errno.ENOSPC
        assert 32 * MiB <= written <= 64 * MiB

    @pytest.mark.isolate("limited")
    def test_memory():
        blocks = [bytearray(16 * MiB) for _ in range(32)]  # 512 MiB, touched
        print("NOT-REACHED", len(blocks))

    @pytest.mark.isolate("limited")
    def test_pids():
        procs = []
        try:
            with pytest.raises(OSError) as info:
                for _ in range(200):
                    procs.append(subprocess.Popen(["sleep", "30"]))
            assert info.value.errno == errno.EAGAIN
            assert 16 <= len(procs) < 64
        finally:
            for p in procs:
                p.kill()
                p.wait()

    @pytest.mark.isolate("limited")
    def test_cpus():
        assert len(os.sched_getaffinity(0)) == 1

    @pytest.mark.isolate("limited")
    def test_next_is_unaffected():
        assert not os.path.exists("/tmp/fill")
        assert len([bytearray(16 * MiB) for _ in range(2)]) == 2

    def cpu_seconds(pid):
        fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @pytest.mark.isolate("half-cpu")
    def test_cpu_quota():
        spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        try:
            time.sleep(3)
            used = sum(cpu_seconds(p.pid) for p in spin)
        finally:
            for p in spin:
                p.kill()
                p.wait()
        print("CPU-SECONDS", used)
        # two spinning processes on a quota of half a CPU: at most ~1.5 s of 3 s
        assert used <= 3 * 0.5 * 1.4
"""


@pytest.mark.parametrize("backend", [*BACKENDS, "qemu"])
def test_spec_limits_are_enforced(inner: Inner, backend: str) -> None:
    inner.write("pyproject.toml", LIMITS.format(backend=backend))
    inner.write("test_limited.py", LIMITED)
    before = set(cgroup_dirs())
    result = inner.run("--isolate-report=report.json", timeout=600)
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines([
        "*test_limited.py::test_memory FAILED*",
        "test worker inside environment 'limited' ended: killed by signal 9: out of memory (the kernel's OOM "
        "killer ran); the environment's memory limit is 128M (*pyproject.toml: "
        "[[]tool.pytest-isolate.envs.limited[]] key 'memory')",
    ])
    result.stdout.no_fnmatch_line("*NOT-REACHED*")
    # the agent survived the OOM kill: one start served every test
    assert inner.report()["environments"]["limited"]["starts"] == 1
    # and the host groups of chroot/schroot are gone with the run
    assert set(cgroup_dirs()) <= before


def cgroup_dirs() -> list[str]:
    from pytest_isolate.limits import CGROUP_ROOT, PREFIX

    return sorted(str(p) for p in CGROUP_ROOT.glob(f"**/{PREFIX}*"))
