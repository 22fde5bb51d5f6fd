"""The libvirt driver: a transient domain with the same kernel, initramfs, disks and port
(``vm_driver = "libvirt"``, or a host pool entry whose endpoint is a libvirt URI)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pytest_isolate.backends.base import agent_command
from pytest_isolate.backends.qemu.machine import (
    BOOT_TIMEOUT,
    Disk,
    Marks,
    QemuBase,
    VmFiles,
    VmLaunch,
    boot_spec,
    vm_cpus,
    vm_memory_mib,
)
from pytest_isolate.backends.qemu.qmp import QMP_TIMEOUT
from pytest_isolate.backends.qemu.reaping import socket_dir
from pytest_isolate.backends.qemu.transport import LibvirtProcess, destroy_domain
from pytest_isolate.cache import Entry
from pytest_isolate.errors import AgentLost, BackendUnavailable
from pytest_isolate.images import initramfs as ird
from pytest_isolate.images.kernel import ARCHES
from pytest_isolate.spec import EnvSpec


def close_quietly(conn: Any) -> None:
    """Close a libvirt connection; one whose daemon is gone cannot fail the cleanup."""
    with contextlib.suppress(Exception):
        conn.close()


class LibvirtDriver(QemuBase):
    """QemuBackend's libvirt driver (no saved states: every start boots)."""

    # ---------------------------------------------------------------- libvirt
    def driver(self, spec: EnvSpec) -> str:
        """"qemu" (QEMU driven directly, the default) or "libvirt" (option vm_driver, or a
        host pool entry whose endpoint is a libvirt URI)."""
        default = "libvirt" if self.endpoint else "qemu"
        driver = str(spec.option("vm_driver",
                                 os.environ.get("PYTEST_ISOLATE_VM_DRIVER", default)))
        if driver not in ("qemu", "libvirt"):
            raise BackendUnavailable(self.name, f"unknown vm_driver {driver!r}",
                                     "use 'qemu' or 'libvirt'")
        return driver

    def _libvirt(self) -> Any:
        try:
            import libvirt

            # errors are raised as libvirtError; keep them off stderr
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        except ImportError:
            raise BackendUnavailable(
                self.name, "the libvirt driver needs the libvirt-python package",
                "install it with: pip install 'pytest-isolate-env[libvirt]' "
                "(building it needs: apt-get install libvirt-dev pkg-config)") from None
        return libvirt

    def _libvirt_connect(self, libvirt: Any, uri: str, timeout: float = 15.0) -> Any:
        """libvirt.open(uri) and a capabilities query, bounded in time.

        libvirt calls cannot time out by themselves, and a libvirtd whose QEMU
        capability probe hangs (a paravirtual /dev/kvm does that) would hang us.
        """
        result: dict[str, Any] = {}

        def connect() -> None:
            try:
                c = libvirt.open(uri)
                c.getCapabilities()
                result["conn"] = c
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=connect, daemon=True, name="libvirt-connect")
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise BackendUnavailable(self.name, f"libvirt at {uri} did not answer in {timeout:.0f}s "
                                     "(is its QEMU capability probe stuck on /dev/kvm?)",
                                     "use the default vm_driver 'qemu'")
        if "error" in result:
            raise BackendUnavailable(self.name, f"cannot connect to libvirt at {uri}: "
                                     f"{result['error']}", "start it with: libvirtd -d")
        return result["conn"]

    def _launch_libvirt(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
                        image: Entry) -> VmLaunch:
        """A transient libvirt domain with the same kernel, initramfs, disks and port.

        No saved states here: every start boots.  The domain is named after the
        run, destroyed by stop(), and destroys itself when its agent dies.
        """
        libvirt = self._libvirt()
        describe = f"environment {spec.name!r}"
        uri = str(spec.option("libvirt_uri", self.endpoint or os.environ.get(
            "LIBVIRT_DEFAULT_URI", "qemu:///system")))
        tmp = socket_dir()
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        os.chmod(tmp, 0o755)
        console_log = self.run.log_path(spec.name, "console.log")
        qemu_log = self.run.log_path(spec.name, "qemu.log")
        marks = Marks()
        local = uri.startswith("qemu:///")
        name = f"pytest-isolate-{self.run.run_id}-{spec.name}-{os.urandom(3).hex()}"
        disks = self.disks(spec)
        conn = self._libvirt_connect(libvirt, uri)
        stack.callback(close_quietly, conn)
        files = self.files(image.data)
        virt, why = self.libvirt_virt_type(spec, conn, uri, files, tmp)
        initrd = tmp / "initrd.img"
        self.write_initrd(files.initramfs, initrd, spec, agent_command(boot_spec(spec)))
        xml = self.domain_xml(spec, files, initrd, tmp, console_log, name, disks, virt)
        with open(qemu_log, "a") as log:
            log.write(f"# libvirt {uri}: domain {name}, type {virt} ({why})\n{xml}\n")
        try:
            dom = conn.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise AgentLost(f"{describe}: libvirt could not start the VM: {exc}") from None
        stack.callback(destroy_domain, dom, name, local)
        marks("domain started")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stack.callback(sock.close)  # the transport's own once launched (closing twice is no harm)
        deadline = time.monotonic() + QMP_TIMEOUT
        while True:
            try:
                sock.connect(str(tmp / "agent.sock"))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise AgentLost(f"{describe}: the agent's socket did not appear") from None
                time.sleep(0.01)
        process = LibvirtProcess(dom, sock, describe, name, local, console_log,
                                 vm_memory_mib(spec))
        # the agent's source waits in the socket until the guest opens its port: the
        # handshake's timeout covers the boot
        return VmLaunch(process, {"agent": console_log, "console": console_log, "qemu": qemu_log},
                        self.vm_settings(spec), float(spec.option("boot_timeout", BOOT_TIMEOUT)),
                        console_log=console_log, qemu_log=qemu_log, disks=disks, marks=marks,
                        how="boot (libvirt)")

    def libvirt_virt_type(self, spec: EnvSpec, conn: Any, uri: str, files: VmFiles,
                          tmp: Path) -> tuple[str, str]:
        """The domain's type and why: "kvm" where KVM works, else "qemu" (TCG).

        A local libvirt runs its QEMU on this machine, so the direct driver's bounded probe
        boot decides (a /dev/kvm that exists can still hang a stock guest).  A remote one is
        asked through its domain capabilities for the environment's architecture.
        """
        if uri.startswith("qemu:///"):
            accel, why = self.accel(spec, files, tmp)
            return ("kvm" if accel == "kvm" else "qemu"), why
        wanted = str(spec.option("accel", os.environ.get("PYTEST_ISOLATE_ACCEL", "auto")))
        if wanted == "tcg":
            return "qemu", "TCG asked for"
        arch = "aarch64" if spec.arch == "arm64" else "x86_64"
        try:
            conn.getDomainCapabilities(None, arch, None, "kvm", 0)
        except Exception as exc:  # libvirtError: no KVM for this arch there
            if wanted == "kvm":
                raise BackendUnavailable(self.name, f"KVM was asked for but libvirt at {uri} "
                                         f"offers none for {arch}: {exc}") from None
            return "qemu", f"libvirt at {uri} offers no KVM for {arch}"
        return "kvm", f"libvirt at {uri} offers KVM for {arch}"

    def domain_xml(self, spec: EnvSpec, files: VmFiles, initrd: Path, tmp: Path,
                   console_log: Path, name: str, extra: list[Disk] | None = None,
                   virt: str = "qemu") -> str:
        from xml.sax.saxutils import escape, quoteattr

        _, binary, machine, console = ARCHES[spec.arch]
        arch = "aarch64" if spec.arch == "arm64" else "x86_64"
        if virt == "kvm":  # as the direct driver's -cpu host
            cpu = "<cpu mode='host-passthrough'/>"
        elif spec.arch == "arm64":
            cpu = ("<cpu mode='custom' match='exact'><model fallback='allow'>cortex-a57</model>"
                   "</cpu>")
        else:
            cpu = ""
        disks = ""
        # the project and layer disks are there from the start (libvirt boots every time)
        for path, serial, dev in ((files.root, ird.ROOT_SERIAL, "vda"),
                                  (files.site, ird.SITE_SERIAL, "vdb"),
                                  *((d.path, d.serial, f"vd{'cdef'[i]}")
                                    for i, d in enumerate(extra or []))):
            disks += (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                      f"<source file={quoteattr(str(path))}/><target dev='{dev}' bus='virtio'/>"
                      f"<readonly/><serial>{serial}</serial></disk>")
        net = ("<interface type='user'><model type='virtio'/></interface>" if spec.network
               else "")
        return (
            f"<domain type='{virt}'><name>{escape(name)}</name>"
            f"<memory unit='MiB'>{vm_memory_mib(spec)}</memory>"
            f"<vcpu>{vm_cpus(spec)}</vcpu>"
            f"<os><type arch='{arch}' machine='{machine[1]}'>hvm</type>"
            f"<kernel>{escape(str(files.kernel))}</kernel><initrd>{escape(str(initrd))}</initrd>"
            f"<cmdline>console={console} panic=-1 loglevel=4 rdinit=/init</cmdline></os>"
            f"{cpu}<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
            f"<on_crash>destroy</on_crash><devices>"
            f"<emulator>{escape(shutil.which(binary) or binary)}</emulator>{disks}"
            f"<serial type='file'><source path={quoteattr(str(console_log))} append='on'/>"
            f"</serial>"
            f"<channel type='unix'><source mode='bind' path={quoteattr(str(tmp / 'agent.sock'))}/>"
            f"<target type='virtio' name='{ird.PORT_NAME}'/></channel>"
            f"{net}<controller type='usb' model='none'/><memballoon model='none'/>"
            f"<video><model type='none'/></video></devices>"
            # run QEMU as the calling user, and never relabel (chown) the cached images
            f"<seclabel type='static' model='dac' relabel='no'>"
            f"<label>+{os.getuid()}:+{os.getgid()}</label></seclabel></domain>"
        )
