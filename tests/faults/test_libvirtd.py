"""libvirtd killed with SIGKILL while a test runs in a libvirt domain.

The machine itself lives on (QEMU is not libvirtd's child in any way that kills it,
and the agent's channel is a socket of QEMU's): the running test and the next one in
that machine pass.  A new environment needs libvirtd and fails at once, naming the
URI.  At the end of the run the domain cannot be destroyed through libvirt, so its
QEMU is killed directly: nothing keeps running.  The module restarts libvirtd the
way scripts/services.sh starts it, whatever happens.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_support import (
    Inner,
    console_mark,
    ended,
    find_processes,
    kill_and_wait,
    sleep_tag,
    wait_for_console,
)

pytestmark = pytest.mark.integration

URI = "qemu:///system"
SERVICES = Path(__file__).resolve().parents[2] / "scripts" / "services.sh"

PYPROJECT = """
    [tool.pytest-isolate.envs.lv]
    backend = "qemu"
    options = {{vm_driver = "libvirt", libvirt_uri = "{uri}"}}

    [tool.pytest-isolate.envs.lv2]
    backend = "qemu"
    options = {{vm_driver = "libvirt", libvirt_uri = "{uri}"}}
"""

TESTS = """
    import time
    import pytest

    @pytest.mark.isolate("lv")
    def test_a_running_when_libvirtd_dies():
        {mark}
        time.sleep(8)

    @pytest.mark.isolate("lv")
    def test_b_same_machine_after():
        pass

    @pytest.mark.isolate("lv2")
    def test_c_new_machine_needs_libvirtd():
        pass
"""


def libvirtd_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


def restart_libvirtd() -> None:
    done = subprocess.run(["bash", str(SERVICES)], capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def libvirtd_restored() -> Iterator[None]:
    assert libvirtd_pids(), "libvirtd is not running: scripts/services.sh starts it"
    try:
        yield
    finally:
        restart_libvirtd()


def test_libvirtd_killed_mid_run(inner: Inner, libvirtd_restored: None) -> None:
    tag = sleep_tag()
    inner.write("pyproject.toml", PYPROJECT.format(uri=URI))
    inner.write("test_lv.py", TESTS.format(mark=console_mark(tag)))
    proc = inner.popen()
    with ended(proc):
        run_id = wait_for_console(inner, proc, "lv", f"isolate-victim-started {tag}")
        # the domain of the environment's saved state (slot 0), restored or booted
        domain_qemu = find_processes("guest=pytest-isolate-saved-lv-")
        assert len(domain_qemu) == 1, (run_id, domain_qemu)
        elapsed = kill_and_wait(proc, libvirtd_pids(), timeout=180)
    out = inner.output()
    assert "test_lv.py::test_a_running_when_libvirtd_dies PASSED" in out, out
    assert "test_lv.py::test_b_same_machine_after PASSED" in out, out
    assert "test_lv.py::test_c_new_machine_needs_libvirtd ERROR" in out, out
    assert f"cannot connect to libvirt at {URI}" in out, out
    assert "2 passed, 1 error" in out, out
    assert elapsed < 60, elapsed
    # the domain's QEMU did not outlive the run, though libvirt could not destroy it
    assert find_processes("guest=pytest-isolate-saved-lv") == {}
