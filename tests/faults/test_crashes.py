"""Faults inside a running environment: the run goes on, the test says why, nothing survives.

Each case is a generated project run by a pytest subprocess against a real backend.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faults_support import (
    AGENT_CMDLINE_MARK,
    BACKENDS,
    Inner,
    ancestors,
    cmdline,
    console_mark,
    ended,
    find_processes,
    kill_and_wait,
    run_id_of,
    sleep_tag,
    wait_for_console,
)
from shared_support import wait_for

pytestmark = pytest.mark.integration


CRASHES = """
    import os, subprocess, time
    import pytest

    ENV = {env!r}

    @pytest.mark.isolate(ENV, timeout=2)
    def test_hangs():
        with open("/etc/isolate-dirty", "w") as f:
            f.write("left by the hanging test")
        subprocess.Popen(["sleep", {hang_tag!r}])
        time.sleep(1000)

    @pytest.mark.isolate(ENV)
    def test_clean_after_hang():
        assert not os.path.exists("/etc/isolate-dirty")

    @pytest.mark.isolate(ENV)
    def test_forks_a_process_that_never_exits():
        subprocess.Popen(["sleep", {fork_tag!r}], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

    @pytest.mark.isolate(ENV)
    def test_writes_garbage_into_its_channel():
        sockets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink("/proc/self/fd/" + fd).startswith("socket:"):
                    sockets.append(int(fd))
            except OSError:
                pass  # the directory's own descriptor
        assert sockets
        time.sleep(1)  # the setup report is relayed first (see test_hostile's decoder case)
        for fd in sockets:
            os.write(fd, b"NOT A FRAME" * 100)
        time.sleep(30)

    @pytest.mark.isolate(ENV)
    def test_last_one_passes():
        assert not os.path.exists("/etc/isolate-dirty")
"""


@pytest.mark.parametrize("env", BACKENDS)
def test_hang_fork_and_garbage_are_contained(inner: Inner, env: str) -> None:
    hang_tag, fork_tag = sleep_tag(), sleep_tag()
    inner.write("test_crashes.py", CRASHES.format(env=env, hang_tag=hang_tag, fork_tag=fork_tag))
    started = time.monotonic()
    result = inner.run("--isolate-report=report.json", timeout=240)
    elapsed = time.monotonic() - started
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines([
        "*test_crashes.py::test_hangs FAILED*",
        "*test_crashes.py::test_clean_after_hang PASSED*",
        "*test_crashes.py::test_forks_a_process_that_never_exits PASSED*",
        "*test_crashes.py::test_writes_garbage_into_its_channel FAILED*",
        "*test_crashes.py::test_last_one_passes PASSED*",
    ])
    result.stdout.fnmatch_lines([
        f"*test worker inside environment '{env}' ended: timeout: the test ran longer than 2.0s",
        "--- environment log tail ---",
    ])
    result.stdout.fnmatch_lines([
        f"*test worker inside environment '{env}' ended: sent a malformed frame: bad frame magic*",
    ])
    # the hang costs its 2 s timeout, the garbage test far less than its 30 s sleep
    assert elapsed < 90, elapsed
    report = inner.report()
    assert report["environments"][env]["starts"] == 1  # no fault needed a new environment
    assert find_processes(f"sleep {hang_tag}") == {}
    assert find_processes(f"sleep {fork_tag}") == {}


VICTIM = """
    import subprocess
    import pytest

    @pytest.mark.isolate({env!r})
    def test_victim():
        subprocess.run(["sleep", {tag!r}])

    @pytest.mark.isolate({env!r})
    def test_next():
        pass
"""


def kill_during_victim(inner: Inner, env: str, pick: Callable[[int], int]) -> None:
    """Run VICTIM in env, SIGKILL pick(agent pid) while test_victim sleeps, and check the
    outcome: that test fails with the reason and the log tail, the next one passes in a
    new environment, nothing of the first is left, and it took no time-out to notice."""
    tag = sleep_tag()
    inner.write("test_victim.py", VICTIM.format(env=env, tag=tag))
    proc = inner.popen("--isolate-report=report.json")
    with ended(proc):
        sleeper = wait_for(f"sleep {tag} inside {env}",
                           lambda: list(find_processes(f"sleep {tag}")), 180, proc)[0]
        # the agent: the outermost python3 running the bootstrap (the workers below it are
        # forks of it; the launcher, lxc-attach or unshare above it only name it in their
        # arguments)
        agents = [p for p in ancestors(sleeper)
                  if cmdline(p).startswith("python3 -u -c ") and AGENT_CMDLINE_MARK in cmdline(p)]
        assert agents, f"no agent among the ancestors of {sleeper}"
        elapsed = kill_and_wait(proc, [pick(agents[-1])])
    out = inner.output()
    assert "test_victim.py::test_victim FAILED" in out, out
    assert "test_victim.py::test_next PASSED" in out, out
    assert f"environment '{env}': the agent's stream ended" in out, out
    assert "--- environment log tail ---" in out, out
    assert "1 failed, 1 passed" in out, out
    assert elapsed < 30, elapsed
    assert inner.report()["environments"][env]["starts"] == 2
    assert find_processes(f"sleep {tag}") == {}


@pytest.mark.parametrize("env", BACKENDS)
def test_agent_killed_from_the_host(inner: Inner, env: str) -> None:
    """SIGKILL of the agent process: the test fails with the reason, the next one passes."""
    kill_during_victim(inner, env, lambda agent: agent)


def pid_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def namespace_init(agent: int) -> int:
    """The host pid of PID 1 of the agent's PID namespace (the environment's init)."""
    from faults_support import all_pids

    ns = pid_namespace(agent)
    for pid in all_pids():
        try:
            if pid_namespace(pid) != ns:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspid = next(line.split()[1:] for line in status.splitlines()
                     if line.startswith("NSpid:"))
        if nspid[-1] == "1":
            return pid
    raise AssertionError(f"no init in the PID namespace of {agent}")


#: What runs as the environment's PID 1, by backend (chroot's is the agent itself:
#: test_agent_killed_from_the_host covers it).
INITS = {"docker": "python3", "lxc": "/bin/sleep infinity", "schroot": "schroot"}


@pytest.mark.parametrize("env", sorted(INITS))
def test_environment_init_killed_from_the_host(inner: Inner, env: str) -> None:
    """SIGKILL of the environment's init (the container's main process, LXC's init, the
    schroot session's first process): everything inside dies with it; the test fails with
    the reason, and the next one gets a new environment."""
    def init_of(agent: int) -> int:
        init = namespace_init(agent)
        assert cmdline(init).startswith(INITS[env]), (init, cmdline(init))
        return init

    kill_during_victim(inner, env, init_of)


VM_VICTIM = """
    import time
    import pytest

    @pytest.mark.isolate("qemu_vm")
    def test_victim():
        {mark}
        time.sleep(600)

    @pytest.mark.isolate("qemu_vm")
    def test_next():
        pass
"""


def test_virtual_machine_killed_from_the_host(inner: Inner) -> None:
    """SIGKILL of QEMU while a test runs in the VM: the test fails naming the environment,
    with the console's tail; the next test runs in a new (restored) machine."""

    tag = sleep_tag()
    inner.write("test_victim.py", VM_VICTIM.format(mark=console_mark(tag)))
    proc = inner.popen("--isolate-report=report.json")
    with ended(proc):
        run_id = wait_for_console(inner, proc, "qemu_vm", f"isolate-victim-started {tag}")
        assert run_id == run_id_of(inner.cache_dir, proc.pid)
        qemus = [p for p, text in find_processes(f"pytest-isolate:{run_id}:qemu_vm").items()
                 if "qemu-system" in text.split()[0]]
        assert len(qemus) == 1, qemus
        elapsed = kill_and_wait(proc, qemus)
    out = inner.output()
    assert "test_victim.py::test_victim FAILED" in out, out
    assert "test_victim.py::test_next PASSED" in out, out
    assert "environment 'qemu_vm'" in out, out
    assert f"isolate-victim-started {tag}" in out, out  # the console's tail is shown
    assert elapsed < 60, elapsed
    assert inner.report()["environments"]["qemu_vm"]["starts"] == 2
    assert find_processes(f"pytest-isolate:{run_id}:qemu_vm") == {}


KILLPG = """
    import os, signal, time
    import pytest

    @pytest.mark.isolate({env!r})
    def test_a_signals_its_process_group():
        os.kill(0, signal.SIGKILL)
        print("NOT-REACHED")

    @pytest.mark.isolate({env!r})
    def test_b_next():
        pass

    @pytest.mark.isolate({env!r})
    def test_c_kills_itself():
        os.kill(os.getpid(), signal.SIGKILL)
        print("NOT-REACHED")

    @pytest.mark.isolate({env!r})
    def test_d_next():
        pass

    @pytest.mark.isolate({env!r})
    def test_e_interrupts_its_process_group():
        os.kill(0, signal.SIGINT)
        time.sleep(5)

    @pytest.mark.isolate({env!r})
    def test_f_next():
        pass

    @pytest.mark.isolate({env!r})
    def test_g_crashes():
        import ctypes
        ctypes.string_at(0)  # SIGSEGV

    @pytest.mark.isolate({env!r})
    def test_h_next():
        pass
"""


@pytest.mark.parametrize("env", BACKENDS)
def test_a_test_signalling_itself_or_its_group_ends_only_itself(inner: Inner, env: str) -> None:
    """A test runs below the PID namespace's init (which the kernel protects from signals
    sent inside): kill(0, sig), kill(getpid(), SIGKILL) and a crash end the test, reported
    with the signal, and nothing else; the next test runs in the same environment."""
    inner.write("test_killpg.py", KILLPG.format(env=env))
    result = inner.run("--isolate-report=report.json", timeout=240)
    result.assert_outcomes(passed=4, failed=4)
    result.stdout.fnmatch_lines([
        "*test_killpg.py::test_a_signals_its_process_group FAILED*",
        "*test_killpg.py::test_b_next PASSED*",
        "*test_killpg.py::test_c_kills_itself FAILED*",
        "*test_killpg.py::test_d_next PASSED*",
        "*test_killpg.py::test_e_interrupts_its_process_group FAILED*",
        "*test_killpg.py::test_f_next PASSED*",
        "*test_killpg.py::test_g_crashes FAILED*",
        "*test_killpg.py::test_h_next PASSED*",
    ])
    out = result.stdout.str()
    # the reasons as the FAILURES section prints them (lines of their own; the short
    # summary repeats them after the test id)
    lines = out.splitlines()
    ended = f"test worker inside environment '{env}' ended: killed by signal "
    assert lines.count(ended + f"{int(signal.SIGKILL)}") == 2, out
    assert lines.count(ended + f"{int(signal.SIGINT)}") == 1, out
    assert lines.count(ended + f"{int(signal.SIGSEGV)}") == 1, out
    assert "NOT-REACHED" not in out
    assert inner.report()["environments"][env]["starts"] == 1
