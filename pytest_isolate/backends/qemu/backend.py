"""QemuBackend: the VM backend's capabilities and options, its check and reap, and the
direct driver's launch (restore a saved state, else boot; then add the disks)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
from collections.abc import Mapping
from typing import Any

from pytest_isolate.agent.wire import message
from pytest_isolate.backends.base import agent_command, need_tool
from pytest_isolate.backends.qemu.libvirt import LibvirtDriver
from pytest_isolate.backends.qemu.machine import (
    HANDSHAKE_TIMEOUT,
    Marks,
    Vm,
    VmLaunch,
    boot_spec,
    vm_memory_mib,
)
from pytest_isolate.backends.qemu.qmp import QmpError
from pytest_isolate.backends.qemu.reaping import (
    qemu_command_lines,
    qemu_processes_of_gone_dirs,
    qemu_processes_of_runs,
    reap_temp_dirs,
    socket_dir,
)
from pytest_isolate.backends.qemu.states import (
    RESTORE_HELLO_TIMEOUT,
    SavedStates,
    saved_state_group,
    settle_agent,
)
from pytest_isolate.backends.qemu.transport import VmProcess
from pytest_isolate.cache import Entry
from pytest_isolate.channel import log_tail
from pytest_isolate.config import Option
from pytest_isolate.errors import AgentLost, AgentTimeout, BackendUnavailable, IsolateError
from pytest_isolate.images.kernel import ARCHES, QEMU_PACKAGES
from pytest_isolate.images.tree import EXCLUDE_OPTION
from pytest_isolate.namespaces import check_foreign, check_namespaces, check_rootfs_builder
from pytest_isolate.ownership import run_gone
from pytest_isolate.setup_host import HOST_NEEDS
from pytest_isolate.spec import EnvSpec


def vm_rootfs_spec(spec: EnvSpec) -> EnvSpec:
    """The spec whose root filesystem the VM boots: the spec's plus a kernel and busybox."""
    kernel_pkg = ARCHES[spec.arch][0]
    extra = tuple(p for p in (kernel_pkg, "busybox-static") if p not in spec.packages)
    return dataclasses.replace(spec, packages=spec.packages + extra)


class QemuBackend(LibvirtDriver, SavedStates):
    name = "qemu"
    needs_root = False
    supports_snapshot = True
    #: the image's root filesystem as the root disk (machine.py: provision, kernel_spec)
    supports_images = True
    host_needs = HOST_NEEDS["qemu"]
    options = {
        "vm_driver": Option("a string", "QEMU driven directly, or a libvirt domain",
                            choices=("qemu", "libvirt")),
        "vm_snapshot": Option("true or false", "save the booted machine and restore it "
                              "instead of booting"),
        "libvirt_uri": Option("a string", "the libvirt connection of the libvirt driver"),
        "libvirt_pool": Option("a string", "the storage pool a remote libvirt gets the "
                               "machine's kernel and disks in"),
        "accel": Option("a string", "the accelerator (auto: KVM after a probe, else TCG)",
                        choices=("auto", "kvm", "tcg")),
        "cpu": Option("a string", "the CPU model under TCG"),
        "memory": Option("a whole number", "the guest's RAM in MiB when the spec has no "
                         "memory key", minimum=64),
        "cpus": Option("a whole number", "virtual CPUs when the spec has no cpus key "
                       "(default 2)", minimum=1),
        "boot_timeout": Option("a number", "seconds to wait for the agent's port",
                               minimum=1),
        "exclude": EXCLUDE_OPTION,
        "project_max_mib": Option("a whole number", "the largest project tree (after "
                                  "exclusions, in MiB) put on the VM's project disk",
                                  minimum=1),
    }

    # ------------------------------------------------------------------ check
    @classmethod
    def cache_group(cls, kind: str, manifest: dict[str, Any]) -> str | None:
        return saved_state_group(kind, manifest)

    @classmethod
    def rootfs_spec(cls, spec: EnvSpec) -> EnvSpec:
        return vm_rootfs_spec(spec)

    @classmethod
    def describe_image(cls, spec: EnvSpec, pin: Mapping[str, Any] | None) -> str | None:
        """Which kernel a machine of the image boots: as its newest VM disk recorded
        (machine.py guest_kernel), else the rule."""
        if pin and pin.get("kernel"):
            return f"kernel {pin['kernel']}"
        package = ARCHES[spec.arch][0] if spec.arch in ARCHES else "cloud kernel"
        return (f"kernel: the image's own when its /boot has one with its modules, else "
                f"Debian {spec.release}'s {package} (known after the first run)")

    def reap(self) -> list[str]:
        """QEMU processes (direct or libvirt's) and socket directories of runs whose
        process is gone.  A guest powers itself off when its agent's channel closes;
        this covers one that cannot (hung) and QEMU kept by libvirt's -no-shutdown."""
        reaped = []
        lines = qemu_command_lines()  # read once for both looks
        for pid, run_id in qemu_processes_of_runs(lines):
            if run_gone(run_id, self.run.runs_dir):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    reaped.append(f"qemu {pid} of run {run_id}")
        for pid, path in qemu_processes_of_gone_dirs(lines):  # before the directories go
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                reaped.append(f"qemu {pid} of {path}")
        reap_temp_dirs()
        for what in reaped:
            self.run.progress(f"qemu: killed {what} (an interrupted run)")
        return reaped

    def check(self, spec: EnvSpec) -> None:
        if spec.arch not in ARCHES:
            raise BackendUnavailable(self.name, f"no VM support for architecture {spec.arch!r}",
                                     f"use one of: {', '.join(sorted(ARCHES))}")
        binary = ARCHES[spec.arch][1]
        need_tool(self.name, binary, QEMU_PACKAGES[binary])
        need_tool(self.name, "mkfs.ext4", "e2fsprogs")
        check_rootfs_builder(self.name)
        if spec.foreign:
            check_foreign(self.name, spec.machine)
        if spec.setup:
            check_namespaces(self.name)
        if self.driver(spec) == "libvirt":
            self._libvirt()

    # ------------------------------------------------------------------ start
    def launch(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
               image: Entry) -> VmLaunch:
        if self.driver(spec) == "libvirt":
            return self._launch_libvirt(stack, spec, image)
        describe = f"environment {spec.name!r}"
        tmp = socket_dir()
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        marks = Marks()
        console_log = self.run.log_path(spec.name, "console.log")
        qemu_log = self.run.log_path(spec.name, "qemu.log")
        # killed here if the launch fails; once launched, VmProcess.stop quits it
        vm: Vm | None = None
        memory = vm_memory_mib(spec)
        try:
            disks = self.disks(spec)
            files = self.files(image.data)
            accel, why = self.accel(spec, files, tmp)
            initrd = tmp / "initrd.img"
            self.write_initrd(files.initramfs, initrd, spec, agent_command(boot_spec(spec)))
            argv = self.qemu_argv(spec, files, accel, initrd, tmp, console_log=console_log)
            snapshots = bool(spec.option("vm_snapshot", True))
            key, fields = self._state_key(image, files, argv, initrd, tmp, console_log)
            state = self.run.cache.lookup("vmstate", key) if snapshots else None
            process: VmProcess | None = None
            how = ""
            if state is not None:
                try:
                    vm = self._restore(argv, tmp, qemu_log, state, accel)
                    process = VmProcess(vm.proc, vm.qmp, vm.sock, describe, console_log, memory)
                    # the saved machine's agent is already running: check that it answers
                    process.vconn.bootstrapped = True
                    process.conn.call(0, message("hello"), timeout=RESTORE_HELLO_TIMEOUT)
                    how = f"restore ({accel})"
                    marks("restored")
                except IsolateError as exc:
                    if vm is not None:
                        vm.kill()
                    vm = process = None
                    self.run.progress(f"{describe}: cannot restore the saved VM state, booting "
                                      f"instead ({str(exc).splitlines()[0]})")
                    with contextlib.suppress(OSError):
                        self.run.cache.remove(state)
            if vm is None or process is None:
                vm = self._launch(argv, tmp, qemu_log, f"boot, accelerator {accel}: {why}")
                self._wait_port(spec, vm, qemu_log)
                process = VmProcess(vm.proc, vm.qmp, vm.sock, describe, console_log, memory)
                how = f"boot ({accel})"
                marks("booted")
                if snapshots:
                    settle_agent(process.conn, marks)
                    self._save_state(spec, vm, key, fields, qemu_log)
                    marks("state saved")
            # run-specific from here on: the guest finds the disks while the agent starts
            self.hotplug(vm, disks)
            marks("disks added")
        except BaseException as exc:
            if vm is not None:
                vm.kill()
            tail = log_tail(console_log)
            if isinstance(exc, QmpError):
                raise AgentLost(f"{describe}: {exc}\n--- qemu log ---\n{log_tail(qemu_log)}"
                                f"\n--- console tail ---\n{tail}") from None
            if isinstance(exc, (AgentLost, AgentTimeout)):
                raise type(exc)(f"{exc}\n--- console tail ---\n{tail}") from None
            raise
        # "agent" is the log whose tail is shown when the agent is lost: the console,
        # where the kernel, /init and the agent's stderr all write.
        return VmLaunch(process, {"agent": console_log, "console": console_log, "qemu": qemu_log},
                        self.vm_settings(spec), HANDSHAKE_TIMEOUT, console_log=console_log,
                        qemu_log=qemu_log, disks=disks, marks=marks, how=how)
