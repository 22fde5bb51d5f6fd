"""A test worker's namespaces are kept for a later test while they are as they were made
(agent/slots.py, issue 13): the later test's process joins them instead of mounting its
own.  Whatever a test leaves -- a file in its root or in /dev/shm, a process -- makes its
slot unusable, and the next test still starts from a clean state; a fixture the zygote
sets up between tests (the session layer changes) retires every slot made before it.
Where tests keep CAP_SYS_ADMIN (a VM's guest, ``privileged = true``) a test may change
its mounts too: a slot whose mount table changed is not used again.

Each case is a generated project run by a pytest subprocess against a real backend.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BACKENDS = ("chroot", "lxc", "schroot", "docker", "podman")

TESTS = textwrap.dedent(
    '''
    import os, subprocess
    import pytest

    pytestmark = pytest.mark.isolate({env!r})

    def others():
        """The processes of this test's PID namespace besides PID 1 and itself."""
        return sorted(int(p) for p in os.listdir("/proc")
                      if p.isdigit() and int(p) not in (1, os.getpid()))

    def clean():
        assert not os.path.exists("/tmp/written")
        assert os.listdir("/dev/shm") == []
        assert others() == []
        assert os.readlink("/proc/self") == str(os.getpid())

    @pytest.mark.parametrize("i", range(6))
    def test_reads_only(i):
        clean()
        # a negative lookup the overlay of a kept root remembers (see test_seeded)
        assert not os.path.exists("/srv/seed")

    def test_writes_a_file():
        clean()
        with open("/tmp/written", "w") as f:
            f.write("x")

    def test_writes_to_shm():
        clean()
        with open("/dev/shm/segment", "w") as f:
            f.write("x")

    def test_leaves_a_process():
        clean()
        subprocess.Popen(["sleep", "60"], start_new_session=True)

    @pytest.mark.parametrize("i", range(3))
    def test_after_them(i):
        clean()

    @pytest.fixture(scope="module")
    def seeded():
        # set up in the zygote: written into the session layer, under every test's root
        with open("/srv/seed", "w") as f:
            f.write("seed")
        return "seed"

    @pytest.mark.parametrize("i", range(3))
    def test_seeded(seeded, i):
        clean()
        with open("/srv/seed") as f:
            assert f.read() == seeded
    '''
)


def run_passing(pytester: pytest.Pytester, session_cache: str, env: str, tests: str,
                passed: int, timeout: float = 600) -> dict[str, Any]:
    """Run the project of tests, which must all pass; the report's figures of env."""
    pytester.makepyfile(test_slots=tests)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "--isolate-strict",
        "--isolate-report=report.json", f"--isolate-cache-dir={session_cache}",
        timeout=timeout)
    result.assert_outcomes(passed=passed)
    stats: dict[str, Any] = json.loads((pytester.path / "report.json").read_text())[
        "environments"][env]
    assert stats["tests"] == passed
    return stats


@pytest.mark.parametrize("env", BACKENDS)
def test_kept_namespaces_are_clean_and_reused(pytester: pytest.Pytester, session_cache: str,
                                              env: str) -> None:
    stats = run_passing(pytester, session_cache, env, TESTS.format(env=env), 15)
    # the read-only tests hand their namespaces on (the next test's worker is forked while
    # a test runs, so it takes the slot of the test before that one); the three that left
    # something, and the fixture's set-up, make new ones
    assert 4 <= stats["reused_roots"] <= 15 - 4, stats


#: Tests that change their mounts, for environments whose tests keep CAP_SYS_ADMIN.  They
#: use mount(2) itself: mount(8) writes /run/mount, which would spoil the slot as a
#: written file does, and this is about the mounts alone.
MOUNT_TESTS = textwrap.dedent(
    '''

    import ctypes

    MS_REMOUNT, MS_BIND = 32, 4096
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(src, dst, fstype, flags):
        if libc.mount(src, dst, fstype, flags, None) != 0:
            raise OSError(ctypes.get_errno(), "mount " + dst.decode())

    def sys_writable():
        return any(line.split()[4] == "/sys" and line.split()[5].split(",")[0] == "rw"
                   for line in open("/proc/self/mountinfo"))

    def clean_mounts():
        clean()
        assert not os.path.ismount("/mnt")
        assert not sys_writable()

    def test_mounts_a_tmpfs():
        clean_mounts()
        mount(b"none", b"/mnt", b"tmpfs", 0)
        assert os.path.ismount("/mnt")

    @pytest.mark.parametrize("i", range(3))
    def test_after_the_tmpfs(i):
        clean_mounts()

    def test_makes_sys_writable():
        clean_mounts()
        mount(None, b"/sys", None, MS_REMOUNT | MS_BIND)
        assert sys_writable()

    @pytest.mark.parametrize("i", range(3))
    def test_after_sys(i):
        clean_mounts()
    '''
)

#: each container backend as a privileged environment, "privileged-BACKEND"
PRIVILEGED = "".join(
    f'[tool.pytest-isolate.envs.privileged-{b}]\nbackend = "{b}"\nprivileged = true\n'
    for b in BACKENDS)


@pytest.mark.parametrize("env", [*(f"privileged-{b}" for b in BACKENDS), "qemu_vm"])
def test_a_slot_whose_mounts_changed_is_not_used_again(pytester: pytest.Pytester,
                                                       session_cache: str, env: str) -> None:
    """A test that keeps CAP_SYS_ADMIN mounts a tmpfs, or makes the read-only /sys
    writable, and leaves nothing else: the later tests that take its slot find its mount
    table changed and make a root of their own, and the slots of the others are used
    again (the same project fails when the check is left out)."""
    pytester.makefile(".toml", pyproject=PRIVILEGED)
    stats = run_passing(pytester, session_cache, env, TESTS.format(env=env) + MOUNT_TESTS, 23,
                        timeout=900)
    assert 8 <= stats["reused_roots"] <= 23 - 6, stats
