"""The libvirt driver: a transient domain with the same kernel, initramfs, disks and port
(``vm_driver = "libvirt"``, or a host pool entry whose endpoint is a libvirt URI)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_isolate.agent.wire import message
from pytest_isolate.backends.base import agent_command
from pytest_isolate.backends.qemu.libvirt_states import (
    CacheStates,
    PoolStates,
    StateStore,
    disk_xml,
    slot_machine,
    spare_ports,
    state_fields,
    take_slot,
    versions,
)
from pytest_isolate.backends.qemu.machine import (
    BOOT_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    PROJECT_SERIAL,
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
from pytest_isolate.backends.qemu.remote import (
    POOL,
    RemotePool,
    delete_volume,
    group_of,
    is_remote,
    open_streams,
    start_event_loop,
)
from pytest_isolate.backends.qemu.states import RESTORE_HELLO_TIMEOUT, settle_agent
from pytest_isolate.backends.qemu.transport import LibvirtProcess, destroy_domain
from pytest_isolate.cache import Entry
from pytest_isolate.errors import AgentLost, BackendUnavailable, IsolateError
from pytest_isolate.images import initramfs as ird
from pytest_isolate.images.kernel import ARCHES
from pytest_isolate.spec import EnvSpec


def close_quietly(conn: Any) -> None:
    """Close a libvirt connection; one whose daemon is gone cannot fail the cleanup."""
    with contextlib.suppress(Exception):
        conn.close()


class LibvirtDriver(QemuBase):
    """QemuBackend's libvirt driver: saved states restored (one per slot,
    libvirt_states.py), on this machine's libvirt or another's."""

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
            start_event_loop(libvirt)  # before the first connection (remote.py)
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

        Unless vm_snapshot is false, a slot's saved domain restored, or booted and saved
        first; else a domain named after the run, booted with its disks (AUTODESTROY on a
        remote libvirt).  Either is destroyed by stop(), and powers off when its agent's
        channel closes.
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
        remote = is_remote(uri)
        name = f"pytest-isolate-{self.run.run_id}-{spec.name}-{os.urandom(3).hex()}"
        disks = self.disks(spec)
        conn = self._libvirt_connect(libvirt, uri)
        stack.callback(close_quietly, conn)
        files = self.files(image.data)
        virt, why = self.libvirt_virt_type(spec, conn, uri, files, tmp)
        initrd = tmp / "initrd.img"
        self.write_initrd(files.initramfs, initrd, spec, agent_command(boot_spec(spec)))
        if bool(spec.option("vm_snapshot", True)):
            saved = self._saved_domain(stack, spec, libvirt, conn, uri, image, files, initrd,
                                       tmp, console_log, qemu_log, virt, why, marks, disks)
            if saved is not None:
                process, how, disks = saved
                self._attach(libvirt, process.dom, disks)
                marks("disks added")
                return VmLaunch(process, {"agent": console_log, "console": console_log,
                                          "qemu": qemu_log}, self.vm_settings(spec),
                                HANDSHAKE_TIMEOUT, console_log=console_log, qemu_log=qemu_log,
                                disks=disks, marks=marks, how=how)
        if remote:  # everything through libvirt's connection: that machine reads no path here
            files, initrd, disks, _ = self._upload(stack, spec, libvirt, conn, uri, name, files,
                                                   initrd, disks, qemu_log)
            marks("uploaded")
        xml = self.domain_xml(spec, files, initrd, tmp, console_log, name, disks, virt,
                              remote=remote)
        with open(qemu_log, "a") as log:
            log.write(f"# libvirt {uri}: domain {name}, type {virt} ({why})\n{xml}\n")
        try:
            # a remote domain also ends when this connection does (a killed run's: no reaper
            # of ours reaches that machine)
            dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY if remote else 0)
        except libvirt.libvirtError as exc:
            raise AgentLost(f"{describe}: libvirt could not start the VM: {exc}") from None
        stack.callback(destroy_domain, dom, name, local)
        marks("domain started")
        sock, close = self._channel(libvirt, conn, dom, tmp, console_log, describe, remote)
        stack.callback(close)  # the transport's own once launched (closing twice is no harm)
        process = LibvirtProcess(dom, sock, describe, name, local, console_log,
                                 vm_memory_mib(spec))
        # the agent's source waits in the socket until the guest opens its port: the
        # handshake's timeout covers the boot
        return VmLaunch(process, {"agent": console_log, "console": console_log, "qemu": qemu_log},
                        self.vm_settings(spec), float(spec.option("boot_timeout", BOOT_TIMEOUT)),
                        console_log=console_log, qemu_log=qemu_log, disks=disks, marks=marks,
                        how="boot (libvirt)")

    def _saved_domain(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
                      libvirt: Any, conn: Any, uri: str, image: Entry, files: VmFiles,
                      initrd: Path, tmp: Path, console_log: Path, qemu_log: Path, virt: str,
                      why: str, marks: Marks, disks: list[Disk],
                      ) -> tuple[LibvirtProcess, str, list[Disk]] | None:
        """A domain restored from its slot's saved state (libvirt_states.py), or booted and
        saved into that slot first, and the disks to add (a remote libvirt's volumes);
        None when every slot runs a machine."""
        describe = f"environment {spec.name!r}"
        remote = is_remote(uri)
        local = uri.startswith("qemu:///")
        shape = self.domain_xml(spec, files, initrd, tmp, console_log, "@NAME@", None, virt,
                                remote=remote, uuid="@UUID@")
        shape = shape.replace(str(console_log), "@CONSOLE@").replace(str(tmp), "@TMP@")
        binary = ARCHES[spec.arch][1]
        fields = state_fields(uri, image.key, files.site, shape,
                              versions(conn, self._version(shutil.which(binary) or binary)),
                              initrd, str(spec.option("libvirt_pool", POOL)) if remote else None)
        slot, key = take_slot(self.run.cache.root / "locks", fields, spec.name)
        if slot is None:
            return None
        stack.callback(slot.release)  # after the domain's destroy (pushed later)
        # a domain of the slot is a killed run's, whose lock died with it (a restored domain
        # cannot be AUTODESTROY, and no reaper of ours reaches a remote libvirt's)
        with contextlib.suppress(libvirt.libvirtError):
            leftover = conn.lookupByName(slot.name)
            self.run.progress(f"{describe}: destroying {slot.name} at {uri}, left running by "
                              "a killed run")
            destroy_domain(leftover, slot.name, local)
        store: StateStore
        if remote:
            # the slot's initrd volume is replaced at each start; the rest is uploaded once
            files, initrd, disks, pool = self._upload(stack, spec, libvirt, conn, uri, slot.name,
                                                      files, initrd, disks, qemu_log)
            marks("uploaded")
            store = PoolStates(pool)
        else:
            store = CacheStates(self.run.cache, tmp, console_log)
        path = store.find(key)
        if path is not None:
            try:
                process = self._restore_domain(stack, libvirt, conn, store, path, slot.name,
                                               tmp, console_log, describe, spec, local, remote)
                marks("restored")
                return process, "restore (libvirt)", disks
            except (libvirt.libvirtError, IsolateError) as exc:
                self.run.progress(f"{describe}: cannot restore the saved VM state, booting "
                                  f"instead ({str(exc).splitlines()[0]})")
                store.drop(key)
        xml = self.domain_xml(spec, files, initrd, tmp, console_log, slot.name, None, virt,
                              remote=remote, uuid=slot.uuid)
        with open(qemu_log, "a") as log:
            log.write(f"# libvirt {uri}: domain {slot.name}, type {virt} ({why}), saved in "
                      f"slot {slot.index} once booted\n{xml}\n")
        try:
            dom = conn.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise AgentLost(f"{describe}: libvirt could not start the VM: {exc}") from None
        try:
            sock, close = self._channel(libvirt, conn, dom, tmp, console_log, describe, remote)
            try:
                booted = LibvirtProcess(dom, sock, describe, slot.name, local, console_log,
                                        vm_memory_mib(spec))
                marks("domain started")
                settle_agent(booted.conn, marks, float(spec.option("boot_timeout", BOOT_TIMEOUT)))
                took = store.save(dom, key, {**fields, "slot": slot.index,
                                             "machine": slot_machine(uri, spec.name, slot)},
                                  qemu_log)
            finally:
                close()
        except BaseException:
            destroy_domain(dom, slot.name, local)
            raise
        self.run.progress(f"saved the state of {spec.name!r} ({took})")
        marks("state saved")
        path = store.find(key)
        if path is None:
            raise AgentLost(f"{describe}: the saved VM state is not where it was saved")
        process = self._restore_domain(stack, libvirt, conn, store, path, slot.name, tmp,
                                       console_log, describe, spec, local, remote)
        return process, "boot (libvirt)", disks

    def _restore_domain(self, stack: contextlib.ExitStack[bool | None], libvirt: Any,
                        conn: Any, store: StateStore, path: str, name: str, tmp: Path,
                        console_log: Path, describe: str, spec: EnvSpec,
                        local: bool, remote: bool) -> LibvirtProcess:
        """Restore a saved domain, made this instance's; its agent must answer.

        Restored paused, and resumed once the agent's channel is connected: the guest
        then finds its port's host end connected, as when it was saved.  (Resumed first,
        it sees the host end gone, and its agent ends as when a run is killed.)"""
        xml = store.restore_xml(conn.saveImageGetXMLDesc(path, 0))
        conn.restoreFlags(path, xml, libvirt.VIR_DOMAIN_SAVE_PAUSED)
        dom = conn.lookupByName(name)
        try:
            sock, close = self._channel(libvirt, conn, dom, tmp, console_log, describe, remote)
            try:
                process = LibvirtProcess(dom, sock, describe, name, local, console_log,
                                         vm_memory_mib(spec))
                process.vconn.bootstrapped = True  # the saved machine's agent runs already
                dom.resume()
                process.conn.call(0, message("hello"), timeout=RESTORE_HELLO_TIMEOUT)
            except BaseException:
                close()
                raise
        except BaseException:
            destroy_domain(dom, name, local)
            raise
        stack.callback(destroy_domain, dom, name, local)
        stack.callback(close)
        return process

    def _channel(self, libvirt: Any, conn: Any, dom: Any, tmp: Path, console_log: Path,
                 describe: str, remote: bool) -> tuple[socket.socket, Callable[[], None]]:
        """The running domain's agent channel, connected, and what closes it: a local
        libvirt's unix socket here; a remote one's channel stream (and the console's,
        read into console_log) through the connection (remote.py)."""
        if not remote:
            sock = self._agent_socket(tmp, describe)
            return sock, sock.close
        bridge, console = open_streams(libvirt, conn, dom, ird.PORT_NAME, console_log, describe)

        def close() -> None:
            bridge.close()
            console.close()
            with contextlib.suppress(OSError):
                bridge.sock.close()

        return bridge.sock, close

    def _attach(self, libvirt: Any, dom: Any, disks: list[Disk]) -> None:
        """Hot-plug the run's disks (project, layers) into the running domain."""
        for i, disk in enumerate(disks):
            try:
                dom.attachDeviceFlags(disk_xml(disk, f"vd{'cdefgh'[i]}"),
                                      libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                raise AgentLost(f"cannot add disk {disk.serial} to the VM: {exc}") from None

    def _agent_socket(self, tmp: Path, describe: str) -> socket.socket:
        """The local libvirt's unix socket behind the agent's port, connected."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + QMP_TIMEOUT
        while True:
            try:
                sock.connect(str(tmp / "agent.sock"))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    sock.close()
                    raise AgentLost(f"{describe}: the agent's socket did not appear") from None
                time.sleep(0.01)

    def _upload(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec, libvirt: Any,
                conn: Any, uri: str, name: str, files: VmFiles, initrd: Path,
                disks: list[Disk], qemu_log: Path,
                ) -> tuple[VmFiles, Path, list[Disk], RemotePool]:
        """The machine's files as volumes of the remote pool (remote.py): cached ones are
        uploaded once, the instance's initrd for this start (deleted at its stop)."""
        pool = RemotePool(libvirt, conn, uri, str(spec.option("libvirt_pool", POOL)),
                          self.name)
        started = time.monotonic()
        with contextlib.suppress(OSError), open(qemu_log, "a") as log:
            log.write(f"# uploading into pool {pool.pool.name()} of {uri}\n")
        remote_files = VmFiles(Path(pool.file("kernel", files.kernel)), files.initramfs,
                               Path(pool.file("root", files.root)),
                               Path(pool.file("site", files.site)))
        # a project's disk replaces the older ones of the same tree; a layer's is a cache
        # entry of its own
        remote_disks = [Disk(Path(pool.file(
            disk.serial.removeprefix("isolate-"), disk.path,
            group_of(str(self.run.rootdir)) if disk.serial == PROJECT_SERIAL else None)),
            disk.serial, disk.mountpoint) for disk in disks]
        path, volume = pool.data(f"isolate-initrd-{name}", initrd.read_bytes())
        stack.callback(delete_volume, volume, qemu_log)
        took = time.monotonic() - started
        if took > 2:
            self.run.progress(f"environment {spec.name!r}: uploaded the machine's images to "
                              f"{uri} in {took:.1f}s")
        return remote_files, Path(path), remote_disks, pool

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
                   virt: str = "qemu", remote: bool = False, uuid: str | None = None) -> str:
        """The transient domain.  Local: the console a file and the agent's port a socket
        here, QEMU run as this user without relabelling the cached images.  Remote: the
        console a pty and the port a socket libvirt allocates there (both read through
        the connection), the files volumes of its pool, QEMU as that libvirt runs it.
        With a uuid, the domain of a saved state's slot: spare PCIe root ports for the disks
        hot-plugged after a restore."""
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
        if remote:
            console_xml = "<serial type='pty'/><console type='pty'/>"
            channel_source = "<source mode='bind'/>"
            seclabel = ""
        else:
            console_xml = (f"<serial type='file'><source path={quoteattr(str(console_log))} "
                           "append='on'/></serial>")
            channel_source = f"<source mode='bind' path={quoteattr(str(tmp / 'agent.sock'))}/>"
            # run QEMU as the calling user, and never relabel (chown) the cached images
            seclabel = (f"<seclabel type='static' model='dac' relabel='no'>"
                        f"<label>+{os.getuid()}:+{os.getgid()}</label></seclabel>")
        return (
            f"<domain type='{virt}'><name>{escape(name)}</name>"
            f"{f'<uuid>{uuid}</uuid>' if uuid else ''}"
            f"<memory unit='MiB'>{vm_memory_mib(spec)}</memory>"
            f"<vcpu>{vm_cpus(spec)}</vcpu>"
            f"<os><type arch='{arch}' machine='{machine[1]}'>hvm</type>"
            f"<kernel>{escape(str(files.kernel))}</kernel><initrd>{escape(str(initrd))}</initrd>"
            f"<cmdline>console={console} panic=-1 loglevel=4 rdinit=/init</cmdline></os>"
            # ACPI as the direct driver's x86 machine has: without it (libvirt's -no-acpi), a
            # disk hot-plugged after a restore takes the other PCIe devices away
            f"{'<features><acpi/></features>' if spec.arch == 'amd64' else ''}"
            f"{cpu}<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
            f"<on_crash>destroy</on_crash><devices>"
            f"<emulator>{escape(shutil.which(binary) or binary)}</emulator>{disks}"
            f"{console_xml}"
            f"<channel type='unix'>{channel_source}"
            f"<target type='virtio' name='{ird.PORT_NAME}'/></channel>"
            f"{net}{spare_ports() if uuid else ''}"
            f"<controller type='usb' model='none'/><memballoon model='none'/>"
            f"<video><model type='none'/></video></devices>{seclabel}</domain>"
        )
