"""The qemu backend end to end: real VMs (arm64 under TCG, x86_64), real pytest runs.

Each test writes a small project into a temporary directory and runs pytest on
it in a subprocess, exactly as a user would, then checks the outcomes from a
JUnit XML report, the JSON timing report and the console log.  Runs with
``--isolate-strict``: a missing prerequisite fails here instead of skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

CONFTEST = '''
import pytest

@pytest.hookimpl(optionalhook=True)  # inside the environment the hook is not declared
def pytest_isolate_backends():
    return {"qemu": "pytest_isolate.backends.qemu:QemuBackend"}
'''

ARM64_TESTS = '''
import os, platform, sys
import pytest

@pytest.mark.isolate("arm64_vm")
def test_machine():
    assert platform.machine() == "aarch64"
    assert os.getuid() == 0
    assert os.path.exists("/proc/1/cmdline")

@pytest.mark.isolate("arm64_vm")
def test_write_a():
    with open("/etc/marker", "w") as f:
        f.write("x")
    assert os.path.exists("/etc/marker")

@pytest.mark.isolate("arm64_vm")
def test_write_b():
    assert not os.path.exists("/etc/marker"), "state leaked from test_write_a"

@pytest.mark.isolate("arm64_vm")
def test_project_visible():
    # the project is at the same absolute path inside, read-only
    here = os.path.dirname(os.path.abspath(__file__))
    assert os.path.exists(os.path.join(here, "conftest.py"))
    with pytest.raises(OSError):
        open(os.path.join(here, "new-file"), "w")

@pytest.mark.isolate("arm64_vm")
def test_fails():
    value = [1, 2, 3]
    assert value == [1, 2, 4]

def test_fixture(arm64_vm):
    r = arm64_vm.run(["sh", "-c", "echo hi > /etc/x && cat /etc/x && uname -m"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hi\\naarch64\\n"
    assert arm64_vm.arch == "arm64"

@pytest.mark.isolate("arm64_vm")
def test_zz_crash_guest():
    # a kernel panic takes the whole VM down (panic=-1, -no-reboot: QEMU exits)
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("c")

@pytest.mark.isolate("arm64_vm")
def test_zzz_after_crash():
    assert platform.machine() == "aarch64"
'''

X86_TESTS = '''
import os, platform
import pytest

@pytest.mark.isolate("qemu_vm")
def test_machine():
    assert platform.machine() == "x86_64"
    # a VM has its own kernel: its boot id differs from the host's
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert f.read().strip() != HOST_BOOT_ID

@pytest.mark.isolate("qemu_vm")
def test_write_a():
    with open("/root/marker", "w") as f:
        f.write("x")

@pytest.mark.isolate("qemu_vm")
def test_write_b():
    assert not os.path.exists("/root/marker")

@pytest.mark.isolate("qemu_vm")
def test_no_network():
    assert sorted(os.listdir("/sys/class/net")) == ["lo"]

@pytest.mark.isolate("netvm")
def test_network_when_asked():
    # QEMU user-mode networking is configured (nothing outside is contacted)
    assert "eth0" in os.listdir("/sys/class/net")
    with open("/etc/resolv.conf") as f:
        assert "nameserver 10.0.2.3" in f.read()

@pytest.mark.isolate("hangvm")
def test_boot_too_slow():
    pass

def test_fixture(qemu_vm):
    r = qemu_vm.run("uname -m; cat /proc/cmdline")
    assert r.returncode == 0
    assert r.stdout.startswith("x86_64\\n")
    assert "rdinit=/init" in r.stdout

@pytest.mark.isolate("qemu_vm")
def test_zz_poweroff():
    # the guest powers itself off: QEMU exits, the test fails, the run goes on
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("o")

@pytest.mark.isolate("qemu_vm")
def test_zzz_after_poweroff():
    assert platform.machine() == "x86_64"
'''


def run_project(tmp_path: Path, tests: str, timeout: float = 1800, pyproject: str = "") -> tuple[
        subprocess.CompletedProcess[str], dict[str, str], dict[str, object]]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_vm.py").write_text(tests)
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n" + pyproject)
    junit = tmp_path / "junit.xml"
    report = tmp_path / "report.json"
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "--isolate-strict",
         f"--junitxml={junit}", f"--isolate-report={report}", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    outcomes: dict[str, str] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = case.get("name", "")
            if case.find("failure") is not None or case.find("error") is not None:
                outcomes[name] = "failed"
            elif case.find("skipped") is not None:
                outcomes[name] = "skipped"
            else:
                outcomes[name] = "passed"
    data = json.loads(report.read_text()) if report.exists() else {}
    return proc, outcomes, data


def env_logs(data: dict[str, object], env: str) -> dict[str, str]:
    envs = data.get("environments")
    assert isinstance(envs, dict) and env in envs, data
    logs = envs[env].get("logs")
    assert isinstance(logs, dict), envs[env]
    return {str(k): str(v) for k, v in logs.items()}


def test_arm64_vm_end_to_end(tmp_path: Path) -> None:
    proc, outcomes, data = run_project(tmp_path, ARM64_TESTS)
    out = proc.stdout + proc.stderr
    assert outcomes == {
        "test_machine": "passed",
        "test_write_a": "passed",
        "test_write_b": "passed",
        "test_project_visible": "passed",
        "test_fails": "failed",
        "test_fixture": "passed",
        "test_zz_crash_guest": "failed",
        "test_zzz_after_crash": "passed",
    }, out
    # assertion rewriting came back from inside
    assert "assert [1, 2, 3] == [1, 2, 4]" in out
    # the crash is reported with the console's tail (the kernel's panic message)
    crash = out[out.index("test_zz_crash_guest"):]
    assert "Kernel panic - not syncing: sysrq triggered crash" in crash, out
    # the console log is kept: it shows the crash, and the agent's stderr of both machines
    console = Path(env_logs(data, "arm64_vm")["console"])
    text = console.read_text(errors="replace")
    assert "sysrq" in text.lower(), text[-3000:]
    assert text.count("test session starts") >= 2, text[-3000:]
    # the machine that replaced the crashed one was restored from the state saved at the
    # first boot (in this run or an earlier one), not booted again
    qemu_log = Path(env_logs(data, "arm64_vm")["qemu"]).read_text()
    assert "# restore (tcg): restored" in qemu_log, qemu_log


X86_PREFIX = "HOST_BOOT_ID = {!r}\n"
NETVM = """
[tool.pytest-isolate.envs.netvm]
backend = "qemu"
network = true

[tool.pytest-isolate.envs.hangvm]
backend = "qemu"
options = {boot_timeout = 1, vm_snapshot = false}
"""


def test_qemu_vm_end_to_end(tmp_path: Path) -> None:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    tests = X86_PREFIX.format(boot_id) + textwrap.dedent(X86_TESTS)
    proc, outcomes, data = run_project(tmp_path, tests, pyproject=NETVM)
    out = proc.stdout + proc.stderr
    assert outcomes == {
        "test_machine": "passed",
        "test_write_a": "passed",
        "test_write_b": "passed",
        "test_no_network": "passed",
        "test_network_when_asked": "passed",
        "test_boot_too_slow": "failed",
        "test_fixture": "passed",
        "test_zz_poweroff": "failed",
        "test_zzz_after_poweroff": "passed",
    }, out
    # the failure shows the console's tail: the kernel powering the machine off
    crash = out[out.index("test_zz_poweroff"):]
    assert "Power down" in crash, out
    # a machine that does not come up in time is stopped and reported, never waited on
    # (up to the short summary, which repeats whole messages when CI is set)
    slow = out[out.index("test_boot_too_slow _"):out.index("short test summary info")]
    assert "the agent's port did not open within 1s" in slow, out
    assert slow.count("--- console tail ---") == 1, out
    logs = env_logs(data, "qemu_vm")
    assert Path(logs["console"]).exists()
    assert "accelerator" in Path(logs["qemu"]).read_text()


def test_initramfs_is_a_valid_cpio_archive(tmp_path: Path) -> None:
    """The cpio writer's output reads back with the cpio tool, device nodes and links included."""
    from pytest_isolate.images.initramfs import CpioWriter, instance_archive

    cpio = CpioWriter()
    cpio.directory("bin")
    cpio.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.chardev("console", 5, 1)
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.getvalue())
    listing = subprocess.run(["cpio", "-itv", "-F", str(archive)], capture_output=True,
                             text=True, check=True).stdout
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in listing.splitlines()}
    assert set(lines) == {"bin", "bin/hello", "bin/sh", "console"}, listing
    assert lines["bin/hello"].startswith("-rwxr-xr-x")
    assert lines["console"].startswith("crw-------")
    assert "bin/sh -> busybox" in lines["bin/sh"]
    out = tmp_path / "out"
    out.mkdir()
    conf = tmp_path / "conf.cpio"
    conf.write_bytes(instance_archive("isolate-x", ["python3", "-c", "print('a b')"],
                                      {"A": "x y"}, network=True))
    subprocess.run(["cpio", "-id", "--quiet", "-F", str(conf)], cwd=out, check=True)
    text = (out / "isolate/config.sh").read_text()
    # the config is shell: what /init evaluates gives back the exact words
    words = subprocess.run(
        ["sh", "-c", '. "$1"; eval "set -- $ISOLATE_ENV $ISOLATE_AGENT"; printf "%s|" "$@"',
         "sh", str(out / "isolate/config.sh")],
        capture_output=True, text=True, check=True).stdout
    assert words == "A=x y|python3|-c|print('a b')|", text
    assert "ISOLATE_NETWORK=1" in text


LIBVIRT_TESTS = '''
import os, platform
import pytest

@pytest.mark.isolate("virt_arm")
def test_arm():
    assert platform.machine() == "aarch64"

@pytest.mark.isolate("virt_x86")
def test_x86_a():
    assert platform.machine() == "x86_64"
    with open("/etc/marker", "w") as f:
        f.write("x")

@pytest.mark.isolate("virt_x86")
def test_x86_b():
    assert not os.path.exists("/etc/marker")
'''
LIBVIRT_ENVS = """
[tool.pytest-isolate.envs.virt_arm]
backend = "qemu"
arch = "arm64"
options = {vm_driver = "libvirt"}

# qemu:///session is the connection GNOME Boxes shows (virt-manager shows qemu:///system)
[tool.pytest-isolate.envs.virt_x86]
backend = "qemu"
options = {vm_driver = "libvirt", libvirt_uri = "qemu:///session"}
"""


def libvirt_reachable() -> str:
    """Why the libvirt driver cannot be tried here ("" when it can)."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install 'pytest-isolate-env[libvirt]')"
    try:
        subprocess.run(["virsh", "-c", "qemu:///system", "list"], capture_output=True,
                       timeout=15, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"libvirtd does not answer ({exc}); start it with: libvirtd -d; virtlogd -d"
    return ""


def domains(uri: str) -> set[str]:
    listing = subprocess.run(["virsh", "-c", uri, "list", "--all", "--name"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    return {line for line in listing.split() if line.startswith("pytest-isolate-")}


def test_libvirt_driver(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """Transient domains on qemu:///system (arm64) and qemu:///session (x86_64): each listed
    on its connection while its tests run, gone afterwards; the domain's type is what the
    KVM probe decided.  The first run boots and saves each machine, the second restores."""
    why = libvirt_reachable()
    if why:
        pytest.skip(why)
    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    for entry in list(manager.cache.entries()):  # an earlier run's states: boot first
        machine = str(entry.manifest.get("spec", {}).get("machine", ""))
        if entry.kind == "vmstate" and re.match(r"libvirt \S+ virt_(arm|x86) slot", machine):
            manager.cache.remove(entry)
    seen: dict[str, set[str]] = {"qemu:///system": set(), "qemu:///session": set()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for uri, names in seen.items():
                with contextlib.suppress(subprocess.SubprocessError):
                    names.update(domains(uri))
            stop.wait(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc, outcomes, data = run_project(tmp_path, LIBVIRT_TESTS, pyproject=LIBVIRT_ENVS)
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert outcomes == {"test_arm": "passed", "test_x86_a": "passed",
                        "test_x86_b": "passed"}, proc.stdout + proc.stderr
    assert any("-virt_arm-" in name for name in seen["qemu:///system"]), seen
    # (as root, libvirt serves both URIs from the one privileged daemon, so the session
    # listing shows the arm64 domain as well; as a user they are separate daemons)
    assert any("-virt_x86-" in name for name in seen["qemu:///session"]), seen
    qemu_log = Path(env_logs(data, "virt_x86")["qemu"]).read_text()
    assert "# boot (libvirt)" in qemu_log
    header = next(line for line in qemu_log.splitlines() if line.startswith("# libvirt "))
    assert header.startswith("# libvirt qemu:///session: domain pytest-isolate-"), header
    virt = header.split(", type ", 1)[1].split()[0]
    assert f"<domain type='{virt}'>" in qemu_log
    assert ("<cpu mode='host-passthrough'/>" in qemu_log) == (virt == "kvm"), qemu_log
    # transient domains: nothing is left defined or running
    assert domains("qemu:///system") == set()
    assert domains("qemu:///session") == set()

    # saved states: the first run booted each machine and saved it (in slot 0 of its
    # state), the second restores it, hot-plugs the project's disk, and leaves nothing
    assert "domain pytest-isolate-saved-virt_x86-" in header and "saved in slot 0" in header
    proc, outcomes, data = run_project(tmp_path, LIBVIRT_TESTS, pyproject=LIBVIRT_ENVS)
    assert outcomes == {"test_arm": "passed", "test_x86_a": "passed",
                        "test_x86_b": "passed"}, proc.stdout + proc.stderr
    for env in ("virt_arm", "virt_x86"):
        qemu_log = Path(env_logs(data, env)["qemu"]).read_text()
        assert "# restore (libvirt): " in qemu_log, qemu_log
        assert "# boot (libvirt)" not in qemu_log, qemu_log
        assert "disks added" in qemu_log, qemu_log
    assert domains("qemu:///system") == set()
