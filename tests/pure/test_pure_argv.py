"""Command lines and configuration files built from a spec, in-process, against golden
files: QEMU's command line, the namespace launcher's, GNU tar's and an LXC container's
configuration.  Nothing is started; host-dependent parts (which binary PATH finds, the
host's Python, temporary directories) are fixed or written as <placeholders>."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from pure_support import Golden

from pytest_isolate import config
from pytest_isolate.agent.bundle import AGENT_DIR, LOADER
from pytest_isolate.backends import BUILTIN_BACKENDS
from pytest_isolate.backends.base import Mount, RunContext
from pytest_isolate.backends.lxc import LxcBackend
from pytest_isolate.backends.qemu import QemuBackend
from pytest_isolate.backends.qemu.machine import VmFiles
from pytest_isolate.cache import Cache
from pytest_isolate.images.archive import tar_argv
from pytest_isolate.namespaces import launcher_argv
from pytest_isolate.spec import EnvSpec

PYPROJECT = Path("/project/pyproject.toml")
FILES = VmFiles(kernel=Path("/cache/vmdisk/k/vmlinuz"), initramfs=Path("/cache/vmdisk/k/initramfs.img"),
                root=Path("/cache/vmdisk/k/root.img"), site=Path("/cache/site/s/site.img"))


def spec_of(**values: Any) -> EnvSpec:
    """Environment "e" as [tool.pytest-isolate.envs.e] with values resolves it."""
    return config.resolve_envs({"envs": {"e": values}}, PYPROJECT, BUILTIN_BACKENDS)["e"]


@pytest.fixture
def run(tmp_path: Path) -> RunContext:
    return RunContext(run_id="golden", rootdir=Path("/project"), cache=Cache(tmp_path / "cache"),
                      log_dir=tmp_path / "logs", work_dir=tmp_path / "work", progress=print)


@pytest.fixture
def no_path_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The QEMU binary as its bare name, whether or not this host has it on PATH."""
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)


def lines(argv: list[str]) -> str:
    """One argument a line: a change of one shows as a one-line diff."""
    return "".join(f"{arg}\n" for arg in argv)


QEMU_CASES: dict[str, tuple[dict[str, Any], str, bool]] = {
    # case -> (environment table, accelerator, probe)
    "amd64_tcg": ({"backend": "qemu", "arch": "amd64"}, "tcg", False),
    "amd64_kvm_limits_network": ({"backend": "qemu", "arch": "amd64", "memory": "2G", "cpus": 3,
                                  "network": True}, "kvm", False),
    "amd64_kvm_probe": ({"backend": "qemu", "arch": "amd64"}, "kvm", True),
    "arm64_tcg_options": ({"backend": "qemu", "arch": "arm64",
                           "options": {"memory": 512, "cpus": 2, "cpu": "cortex-a72"}}, "tcg", False),
}


@pytest.mark.usefixtures("no_path_lookup")
@pytest.mark.parametrize("case", sorted(QEMU_CASES))
def test_qemu_command_line(run: RunContext, case: str, golden: Golden) -> None:
    values, accel, probe = QEMU_CASES[case]
    argv = QemuBackend(run).qemu_argv(spec_of(**values), FILES, accel, Path("/tmp/vm/initrd.img"),
                                      Path("/tmp/vm"), probe=probe)
    assert argv[argv.index("-accel") + 1] == accel
    assert ("-qmp" in argv) is not probe
    golden.check(f"qemu_argv_{case}.txt", lines(argv))


def test_qemu_console_log_goes_where_asked(run: RunContext) -> None:
    argv = QemuBackend(run).qemu_argv(spec_of(backend="qemu", arch="amd64"), FILES, "tcg",
                                      Path("/tmp/vm/initrd.img"), Path("/tmp/vm"),
                                      console_log=Path("/logs/e/console.log"))
    assert "file,id=console,path=/logs/e/console.log,append=on" in argv


def test_launcher_command_line(golden: Golden) -> None:
    cfg = {"rootfs": "/cache/rootfs/r/data", "mode": "overlay", "network": False,
           "binds": [["/project", "/project", True]], "argv": ["python3", "-u", "-c", "..."]}
    argv = launcher_argv(cfg)
    assert json.loads(argv[-1]) == cfg
    assert argv[0] == sys.executable and argv[4:6] == [LOADER, str(AGENT_DIR)]
    argv[4:6] = ["<the agent package's loader>", "<agent dir>"]
    text = lines(argv).replace(sys.executable, "<host python>")
    golden.check("launcher_argv.txt", text)


def test_tar_command_line(golden: Golden) -> None:
    golden.check("tar_argv.txt",
                 lines(tar_argv(Path("/cache/rootfs/r/data"), Path("/tmp/extra"), "/tmp/out.tar")))


def test_lxc_configuration(run: RunContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           golden: Golden) -> None:
    from pytest_isolate.backends import lxc

    # what the host decides: cgroup v2, the seccomp profile that the lxc package ships
    monkeypatch.setattr(lxc, "cgroup_v2", lambda: True)
    profile = tmp_path / "common.seccomp"
    profile.write_text("2\n")
    monkeypatch.setattr(lxc, "SECCOMP_PROFILE", profile)
    for sub in ("rootfs", "project"):
        (tmp_path / sub).mkdir()
    (tmp_path / "site.pth").write_text("")
    mounts = [Mount(str(tmp_path / "project"), "/project", False),
              Mount(str(tmp_path / "site.pth"), "/.isolate/site/site.pth", True)]
    spec = spec_of(backend="lxc", arch="amd64", memory="1G", pids=512, disk="2G")
    text = LxcBackend(run).config_text(spec, tmp_path / "rootfs", tmp_path / "c", tmp_path / "lxc.log",
                                       mounts)
    assert "lxc.cgroup2.memory.max = 1073741824" in text.splitlines()
    assert "lxc.net.0.type = empty" in text.splitlines()  # no network unless asked
    golden.check("lxc_config.txt", text.replace(str(tmp_path), "<tmp>"))
