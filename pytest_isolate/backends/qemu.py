"""qemu: a whole virtual machine per environment, driven directly through QEMU and QMP.

Boot chain (no systemd, no udev, no bootloader)::

    qemu -kernel vmlinuz -initrd (cached initramfs + per-instance config)
      /init (busybox): load the virtio modules, mount the root disk read-only
      under a tmpfs overlay, mount the shipped-packages disk read-only,
      switch_root, exec ``python3 -u -c BOOTSTRAP`` on a virtio-serial port

The kernel is Debian's cloud kernel, installed into the environment's root
filesystem (so it is cached with it and matches its modules).  The root
filesystem becomes a cached raw ext4 image attached read-only (the guest
cannot write it; its writes go to a tmpfs, and per-test state is the agent's
overlay business as in every backend).  The shipped pytest packages are a
second cached ext4 image.  The project tree (images/tree.py decides which
files: git's view of the checkout, minus caches and the ``exclude`` option)
becomes a cached read-only ext4 image keyed by its manifest, and the
dependency layer's venv and project layer become cached ext4 images too; all
are hot-plugged (QMP ``blockdev-add`` + ``device_add`` into PCIe root ports
kept free for them) once the machine runs, and mounted read-only at their
paths by the agent (the same step sets the guest clock).  Nothing of the
project is held in guest memory, and an unchanged tree reuses its image.
The host talks to the agent through
a unix socket that QEMU connects to the virtio-serial port; QMP (another unix
socket) is used to wait for the port to open, to stop the machine and to
save/restore its state.

Hardware acceleration is used only after a bounded probe boot shows it works
(a paravirtual /dev/kvm can hang stock guests); otherwise TCG.  A foreign
architecture (arm64 on x86_64) always runs under TCG.

Saved states: the first boot of an environment saves the machine (QMP migrate
to a file descriptor, into the cache as kind "vmstate") once the agent runs
and before anything run-specific reached it; later starts restore it with
``-incoming`` and go straight to the handshake.  A state that does not restore
or whose agent does not answer is dropped and the machine booted.  The
project and layer disks are added after the restore, so one state serves
every version of the project.  Options:
``vm_snapshot = false`` turns this off; ``vm_driver = "libvirt"`` starts a
transient libvirt domain instead (no saved states; the disks are in its
definition); ``accel``, ``cpu``, ``memory``, ``cpus``, ``boot_timeout``,
``exclude`` (gitignore-style patterns kept off the project disk),
``project_max_mib``.

A guest that dies names its cause when the console shows one (a kernel panic,
out of memory, a failed /init) in the error, not only "the agent's stream
ended".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_isolate.backends.base import (
    SITE,
    Backend,
    Instance,
    RunContext,
    agent_command,
    need_tool,
    shipped_paths,
)
from pytest_isolate.cache import Entry
from pytest_isolate.channel import AGENT_SOURCE, Connection, log_tail
from pytest_isolate.config import Option
from pytest_isolate.errors import (
    AgentLost,
    AgentTimeout,
    BackendUnavailable,
    IsolateError,
    ProvisionError,
)
from pytest_isolate.images import initramfs as ird
from pytest_isolate.images.deps import VENV
from pytest_isolate.images.disk import ext4_from_paths, make_ext4
from pytest_isolate.images.envvars import environment_variables
from pytest_isolate.images.kernel import (
    ARCHES,
    QEMU_PACKAGES,
    TCG_CPUS,
    find_kernel,
    kvm_candidate,
    probe_kvm,
)
from pytest_isolate.images.rootfs import provision_rootfs
from pytest_isolate.images.tree import EXCLUDE_OPTION, ProjectTree, human, scan_tree, stage_tree
from pytest_isolate.limits import cgroup_values
from pytest_isolate.namespaces import check_foreign, check_namespaces, check_rootfs_builder
from pytest_isolate.ownership import RUN_STEM, Owner, run_gone
from pytest_isolate.spec import EnvSpec, content_hash
from pytest_isolate.system import command_lines

#: Bump when the disk / kernel / initramfs layout in the "vmdisk" cache entries changes.
VMDISK_FORMAT = 1
SITE_FORMAT = 1
STATE_FORMAT = 2
#: A restored agent must answer this fast, else the state is dropped and the VM booted.
RESTORE_HELLO_TIMEOUT = 15.0
#: Seconds to save or restore a machine state.
STATE_TIMEOUT = 60.0
#: Seconds from starting QEMU to the agent's port opening (TCG on a loaded host is slow).
BOOT_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 60.0
QMP_TIMEOUT = 10.0
MEMORY_MIB = 1024
#: RAM a guest needs besides its memory limit: kernel, page cache of the root disk.
GUEST_OVERHEAD_MIB = 256
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Bump when the project / layer disk images change layout.
PROJECT_FORMAT = 1
#: Serial numbers of the disks added once the machine runs (virtio-blk: 20 bytes at most).
PROJECT_SERIAL = "isolate-project"
VENV_SERIAL = "isolate-venv"
LAYER_SERIAL = "isolate-player"
#: PCIe root ports left free on the command line for them (hot-plug needs a port).
HOTPLUG_PORTS = 3
#: Largest project tree (after exclusions) put on a disk, unless project_max_mib says more.
PROJECT_MAX_MIB = 32 << 10


def vm_rootfs_spec(spec: EnvSpec) -> EnvSpec:
    """The spec whose root filesystem the VM boots: the spec's plus a kernel and busybox."""
    kernel_pkg = ARCHES[spec.arch][0]
    extra = tuple(p for p in (kernel_pkg, "busybox-static") if p not in spec.packages)
    return dataclasses.replace(spec, packages=spec.packages + extra)


class QmpError(IsolateError):
    """QEMU's monitor refused a command or went away."""


class Qmp:
    """A minimal QMP client over a unix socket: commands in order, events kept."""

    def __init__(self, path: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None:
                    self.sock.close()
                    raise QmpError(f"QEMU exited with status {proc.returncode} before its "
                                   "monitor came up") from None
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise QmpError(f"QEMU's monitor socket did not appear in {timeout:.0f}s") \
                        from None
                time.sleep(0.01)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._read(timeout)  # greeting
        self.command("qmp_capabilities", timeout=timeout)

    def _read(self, timeout: float) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QmpError(f"no answer from QEMU's monitor in {timeout:.0f}s") from None
            except OSError as exc:
                raise QmpError(f"QEMU's monitor went away: {exc}") from None
            if not chunk:
                raise QmpError("QEMU's monitor closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def command(self, name: str, timeout: float = QMP_TIMEOUT, **args: Any) -> Any:
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = args
        return self._call(name, req, None, timeout)

    def command_with_fd(self, name: str, fd: int, timeout: float = QMP_TIMEOUT,
                        **args: Any) -> Any:
        """A command that takes a file descriptor (getfd, add-fd), passed with SCM_RIGHTS."""
        return self._call(name, {"execute": name, "arguments": args}, fd, timeout)

    def _call(self, name: str, req: dict[str, Any], fd: int | None, timeout: float) -> Any:
        """Send one command (with fd over SCM_RIGHTS if given) and wait for its answer."""
        with self.lock:
            data = json.dumps(req).encode() + b"\n"
            try:
                if fd is None:
                    self.sock.sendall(data)
                else:
                    socket.send_fds(self.sock, [data], [fd])
            except OSError as exc:
                raise QmpError(f"QEMU's monitor went away: {exc}") from None
            deadline = time.monotonic() + timeout
            while True:
                msg = self._read(max(0.01, deadline - time.monotonic()))
                if "event" in msg:
                    self.events.append(msg)
                elif "error" in msg:
                    err = msg["error"]
                    raise QmpError(f"QEMU refused {name}: {err.get('desc', err)}")
                elif "return" in msg:
                    return msg["return"]

    def wait_event(self, name: str, timeout: float, match: dict[str, Any] | None = None,
                   ) -> dict[str, Any] | None:
        """The first event called name (whose data has match's items), or None on timeout."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for i, ev in enumerate(self.events):
                    data = ev.get("data", {})
                    if ev["event"] == name and all(data.get(k) == v
                                                   for k, v in (match or {}).items()):
                        del self.events[i]
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    msg = self._read(min(left, 0.5))
                except QmpError as exc:
                    if "no answer" in str(exc):
                        continue
                    raise
                if "event" in msg:
                    self.events.append(msg)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def guest_failure(text: str, memory_mib: int | None = None) -> str:
    """What a guest's console says killed it ("" when it says nothing): a kernel panic
    (and its cause: out of memory, no root device, ...), the OOM killer, a failed /init."""
    lines = text.splitlines()
    panic = next((m.group(1).strip() for line in lines
                  if (m := re.search(r"Kernel panic - not syncing: (.*)", line))), "")
    oom = next((line.strip() for line in lines
                if re.search(r"Out of memory|invoked oom-killer|oom-kill:", line)), "")
    memory = (f" (the guest has {memory_mib} MiB: raise it with the environment's memory key "
              "or options.memory)") if memory_mib else ""
    if panic:
        low = panic.lower()
        if oom or "out of memory" in low or "deadlocked on memory" in low:
            return f"the guest kernel panicked: out of memory{memory} [{panic}]"
        if "unable to mount root" in low or "no working init" in low:
            return f"the guest kernel panicked: no root device or init [{panic}]"
        return f"the guest kernel panicked: {panic}"
    init = next((m.group(1).strip() for line in lines
                 if (m := re.search(r"pytest-isolate init: FAILED: (.*)", line))), "")
    if init:
        return f"the guest's /init failed: {init}"
    if oom:
        return f"the guest ran out of memory{memory}: {oom}"
    return ""


class VmConnection(Connection):
    """A Connection whose bootstrap is sent once: a restored machine's agent already runs.

    When the stream ends, the error names what the console shows killed the guest
    (only what this machine wrote: the console log is shared by a run's machines)."""

    def __init__(self, rfd: int, wfd: int, describe: str, console: Path | None = None,
                 memory_mib: int | None = None) -> None:
        super().__init__(rfd, wfd, describe)
        self.bootstrapped = False
        self.console = console
        self.memory_mib = memory_mib
        try:
            self.console_start = console.stat().st_size if console is not None else 0
        except OSError:
            self.console_start = 0

    def bootstrap(self) -> None:
        if not self.bootstrapped:
            super().bootstrap()
            self.bootstrapped = True

    def guest_failure(self) -> str:
        if self.console is None:
            return ""
        try:
            with open(self.console, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self.console_start, size - (256 << 10)))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return guest_failure(text, self.memory_mib)

    def recv(self, ch: int, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        try:
            return super().recv(ch, timeout)
        except AgentLost as exc:
            cause = self.guest_failure()
            if not cause:
                # QEMU may still be writing the panic out: one short look again
                time.sleep(0.3)
                cause = self.guest_failure()
            if cause and cause not in str(exc):
                raise AgentLost(f"{exc}: {cause}") from None
            raise


class VmProcess:
    """The Transport of a QEMU machine (alive, stop, conn).

    ``conn`` talks over the unix socket behind the guest's virtio-serial port.
    """

    def __init__(self, proc: subprocess.Popen[bytes], qmp: Qmp, sock: socket.socket,
                 describe: str, log_path: Path, memory_mib: int | None = None) -> None:
        self.proc = proc
        self.qmp = qmp
        self.sock = sock
        self.log_path = log_path
        fd = sock.fileno()
        self.vconn = VmConnection(fd, fd, describe, log_path, memory_mib)
        self.conn: Connection = self.vconn

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.conn.closed

    def stop(self, grace: float = 3.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(QmpError, ValueError):
                self.qmp.command("quit", timeout=grace)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.qmp.close()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.conn.closed = True


class LibvirtProcess:
    """The Transport of a libvirt domain."""

    def __init__(self, dom: Any, sock: socket.socket, describe: str, name: str,
                 local: bool, console: Path | None = None, memory_mib: int | None = None,
                 ) -> None:
        self.dom = dom
        self.sock = sock
        self.conn: Connection = VmConnection(sock.fileno(), sock.fileno(), describe, console,
                                             memory_mib)
        self.name = name
        self.local = local

    def alive(self) -> bool:
        try:
            return bool(self.dom.isActive()) and not self.conn.closed
        except Exception:
            # libvirtd may be gone while the machine runs on: the channel decides
            return not self.conn.closed

    def stop(self) -> None:
        destroy_domain(self.dom, self.name, self.local)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.conn.closed = True


def destroy_domain(dom: Any, name: str, local: bool) -> None:
    """Destroy a domain through libvirt; when libvirtd is gone (its QEMU lives on, kept
    by -no-shutdown even after the guest powers off) and the domain is on this host,
    kill its QEMU directly."""
    try:
        if dom.isActive():
            dom.destroy()
        return
    except Exception:
        if not local:
            return
    for pid in qemu_processes_of(name):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


_RUN_NAME = re.compile(rb"(?:^|\0)-name\0(?:guest=)?pytest-isolate[:-](" + RUN_STEM.encode()
                       + rb")")


def qemu_processes_of_runs() -> list[tuple[int, str]]:
    """(pid, run id) of every QEMU named after a pytest-isolate run (``-name``)."""
    found = []
    for pid, cmdline in qemu_command_lines():
        m = _RUN_NAME.search(cmdline)
        if m:
            found.append((pid, m.group(1).decode()))
    return found


def qemu_command_lines() -> list[tuple[int, bytes]]:
    """(pid, raw command line) of every QEMU system emulator running here."""
    return [(pid, cmdline) for pid, cmdline in command_lines()
            if b"qemu-system" in cmdline.split(b"\0", 1)[0]]


def qemu_processes_of(domain: str) -> list[int]:
    """Host pids of the QEMU running libvirt domain `domain` (its -name guest=...)."""
    needle = f"guest={domain},".encode()
    return [pid for pid, cmdline in qemu_command_lines() if needle in cmdline]


@dataclasses.dataclass
class _Files:
    kernel: Path
    initramfs: Path
    root: Path
    site: Path


@dataclasses.dataclass
class _Vm:
    proc: subprocess.Popen[bytes]
    qmp: Qmp
    sock: socket.socket

    def kill(self) -> None:
        self.qmp.close()
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


TMP_PREFIX = "pytest-isolate-vm-"


def vm_memory_mib(spec: EnvSpec) -> int:
    """The guest's RAM: the spec's memory plus what the guest's kernel needs (the limit
    itself is a cgroup in the guest, as on the host), else the option memory (MiB), else
    1 GiB."""
    if spec.memory is not None:
        return (spec.memory >> 20) + GUEST_OVERHEAD_MIB
    return int(spec.option("memory", MEMORY_MIB))


def guest_limits(spec: EnvSpec) -> dict[str, str]:
    """The limits the agent applies inside the guest (a cgroup v2 group of its own): the
    CPU set is the guest's own CPUs (vm_cpus), the rest as on the host."""
    return cgroup_values(spec.limits(), v2=True, cpus=None)


def vm_cpus(spec: EnvSpec) -> int:
    """Virtual CPUs: the spec's cpus rounded up, else the option cpus, else 1."""
    return spec.limits().cpu_count() or int(spec.option("cpus", 1))


def reap_temp_dirs() -> None:
    """Remove socket directories left by runs that were killed (their pid file names an
    owner that no longer runs: ``PID-START``, or a bare ``PID`` from older versions)."""
    base = Path(tempfile.gettempdir())
    for path in base.glob(TMP_PREFIX + "*"):
        try:
            owner = Owner.from_name((path / "pid").read_text())
        except OSError:
            continue
        if owner is not None and not owner.alive():
            shutil.rmtree(path, ignore_errors=True)


def socket_dir() -> Path:
    """A new short temp directory for a machine's unix sockets (their paths are limited to
    ~100 bytes), named by its owner so that reap_temp_dirs removes it once that is gone."""
    reap_temp_dirs()
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "pid").write_text(Owner.me().name)
    return tmp


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def saved_state_group(kind: str, manifest: dict[str, Any]) -> str | None:
    """The machine a saved state (cache kind "vmstate") is of: the environment's name and
    QEMU's binary.  A newer state of the same machine -- after a new agent, another
    initramfs or site image, other variables baked in at boot -- replaces an older one,
    so `cache gc` keeps only the newest (QemuBackend.cache_group); None for anything
    else."""
    spec = manifest.get("spec")
    if kind != "vmstate" or not isinstance(spec, dict):
        return None
    argv = spec.get("argv")
    if not isinstance(argv, list) or "-name" not in argv or argv.index("-name") + 1 >= len(argv):
        return None
    return f"{argv[0]} {argv[argv.index('-name') + 1]}"


def boot_spec(spec: EnvSpec) -> EnvSpec:
    """What the machine boots with: the dependency layer comes after a restore (so one
    saved state serves every layer), and the agent takes on its venv then."""
    return dataclasses.replace(spec, layer=None) if spec.layer is not None else spec


@dataclasses.dataclass(frozen=True)
class _Disk:
    """A read-only disk image added once the machine runs, mounted at mountpoint."""

    path: Path
    serial: str
    mountpoint: str


#: Runs inside the guest (busybox from the root filesystem): set the clock, then mount
#: each disk (found by its virtio serial number) read-only at its path.  Arguments:
#: the time, then serial and mount point pairs.
MOUNT_DISKS = r"""
set -e
read -r up _ </proc/uptime
echo "started at uptime $up"
busybox date -u -s "@$1" >/dev/null
shift
while [ $# -ge 2 ]; do
    serial=$1 dir=$2 dev= n=0
    shift 2
    while :; do
        for b in /sys/block/vd*; do
            s=
            [ -e "$b/serial" ] && read -r s <"$b/serial" || true
            if [ "$s" = "$serial" ]; then dev=/dev/${b##*/}; fi
        done
        [ -n "$dev" ] && [ -b "$dev" ] && break
        n=$((n + 1))
        if [ $n -gt 400 ]; then
            echo "the disk with serial $serial did not appear in the guest in 20s" >&2
            exit 1
        fi
        busybox usleep 50000
    done
    busybox mkdir -p "$dir"
    busybox mount -t ext4 -o ro,noload "$dev" "$dir"
    read -r up _ </proc/uptime
    echo "$serial after $n polls, mounted at uptime $up"
done
"""


class QemuBackend(Backend):
    name = "qemu"
    needs_root = False
    supports_snapshot = True
    packages = ("qemu-system-x86", "qemu-system-arm", "qemu-utils", "e2fsprogs", "mmdebstrap",
                "qemu-user-static", "binfmt-support", "arch-test")
    options = {
        "vm_driver": Option("a string", "QEMU driven directly, or a libvirt domain",
                            choices=("qemu", "libvirt")),
        "vm_snapshot": Option("true or false", "save the booted machine and restore it "
                              "instead of booting"),
        "libvirt_uri": Option("a string", "the libvirt connection of the libvirt driver"),
        "accel": Option("a string", "the accelerator (auto: KVM after a probe, else TCG)",
                        choices=("auto", "kvm", "tcg")),
        "cpu": Option("a string", "the CPU model under TCG"),
        "memory": Option("a whole number", "the guest's RAM in MiB when the spec has no "
                         "memory key", minimum=64),
        "cpus": Option("a whole number", "virtual CPUs when the spec has no cpus key",
                       minimum=1),
        "boot_timeout": Option("a number", "seconds to wait for the agent's port",
                               minimum=1),
        "exclude": EXCLUDE_OPTION,
        "project_max_mib": Option("a whole number", "the largest project tree (after "
                                  "exclusions, in MiB) put on the VM's project disk",
                                  minimum=1),
    }

    def __init__(self, run: RunContext) -> None:
        super().__init__(run)
        self._lock = threading.Lock()
        #: project disk images of this run, by exclude patterns (scanned once per run)
        self._projects: dict[tuple[str, ...], Path] = {}
        #: dependency layer disk images (layer directory -> image)
        self._layer_disks: dict[str, Path] = {}
        #: cache entries in use by this run's machines (held against `cache gc`)
        self._held: list[Callable[[], None]] = []
        self._versions: dict[str, str] = {}
        #: how the last start() went: "boot (tcg)", "restore (tcg)", ... (for bench / logs)
        self.last_start = ""
        self._reaped = False

    # ------------------------------------------------------------------ check
    @classmethod
    def cache_group(cls, kind: str, manifest: dict[str, Any]) -> str | None:
        return saved_state_group(kind, manifest)

    @classmethod
    def rootfs_spec(cls, spec: EnvSpec) -> EnvSpec:
        return vm_rootfs_spec(spec)

    def reap(self) -> list[str]:
        """QEMU processes (direct or libvirt's) and socket directories of runs whose
        process is gone.  A guest powers itself off when its agent's channel closes;
        this covers one that cannot (hung) and QEMU kept by libvirt's -no-shutdown."""
        reaped = []
        for pid, run_id in qemu_processes_of_runs():
            if run_gone(run_id, self.run.runs_dir):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    reaped.append(f"qemu {pid} of run {run_id}")
        reap_temp_dirs()
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

    # -------------------------------------------------------------- provision
    def provision(self, spec: EnvSpec) -> Entry:
        log = self.run.log_path(spec.name, "provision.log")
        rootfs = provision_rootfs(self.rootfs_spec(spec), self.run.cache, log, self.run.rootdir,
                                  self.run.progress)
        fields = {"format": VMDISK_FORMAT, "initramfs": ird.INITRAMFS_FORMAT,
                  "rootfs": rootfs.key}

        def build(data: Path, log_path: Path) -> dict[str, Any]:
            self.run.progress(f"making the VM disk and initramfs for {spec.name!r}")
            data.mkdir(parents=True)
            try:
                kernel = find_kernel(rootfs.data)
            except LookupError as exc:
                raise ProvisionError(str(exc)) from None
            shutil.copyfile(kernel.image, data / "vmlinuz")
            busybox = next((p for p in (rootfs.data / "usr/bin/busybox",
                                        rootfs.data / "bin/busybox") if p.exists()), None)
            if busybox is None:
                raise ProvisionError(f"no busybox in {rootfs.data} (busybox-static missing)")
            try:
                modules = ird.build_initramfs(busybox, kernel.modules, data / "initramfs.img",
                                              compress=False)
            except (LookupError, OSError) as exc:
                raise ProvisionError(f"cannot build the initramfs: {exc}") from None
            make_ext4(rootfs.data, data / "root.img", label="isolate-root")
            return {"kernel": kernel.version, "modules": modules, "rootfs_key": rootfs.key}

        return self.run.cache.get_or_build("vmdisk", content_hash(fields), build,
                                           {**fields, "spec": spec.rootfs_fields()}, log)

    def _site_image(self) -> Path:
        """The shipped pytest packages as a cached ext4 image (keyed by their files)."""
        items = [(src, dst[len(SITE):].lstrip("/")) for src, dst in shipped_paths()]
        h = hashlib.sha256(str(SITE_FORMAT).encode())
        for src, rel in sorted(items):
            h.update(f"{src}\0{rel}\0".encode())
            for dirpath, dirs, files in os.walk(src):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(files):
                    st = os.lstat(os.path.join(dirpath, name))
                    h.update(f"{dirpath}/{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if os.path.isfile(src):
                st = os.stat(src)
                h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())

        def build(data: Path, log_path: Path) -> dict[str, Any]:
            data.mkdir(parents=True)
            ext4_from_paths(items, data / "site.img", data, excludes={"__pycache__"},
                            label="isolate-site")
            return {"paths": [rel for _, rel in items]}

        entry = self.run.cache.get_or_build("vmsite", h.hexdigest()[:24], build,
                                            {"format": SITE_FORMAT},
                                            self.run.log_dir / "vmsite.log")
        return entry.data / "site.img"

    def _project_disk(self, spec: EnvSpec) -> Path:
        """The project tree as a read-only ext4 image, cached by its manifest (made once per
        run and set of exclusions; an unchanged tree reuses the image of an earlier run)."""
        raw = spec.option("exclude", ()) or ()
        patterns = tuple(str(p) for p in raw)
        with self._lock:
            known = self._projects.get(patterns)
            if known is not None:
                return known
            rootdir = self.run.rootdir
            tree = scan_tree(rootdir, patterns)
            self._check_project_size(spec, tree)
            key = tree.key()
            log = self.run.log_dir / "vmproject.log"

            def build(data: Path, log_path: Path) -> dict[str, Any]:
                started = time.monotonic()
                data.mkdir(parents=True)
                stage = data.parent / "stage"
                try:
                    stage_tree(tree, stage)
                    make_ext4(stage, data / "project.img", label="isolate-proj")
                finally:
                    shutil.rmtree(stage, ignore_errors=True)
                self.run.progress(
                    f"made the VM project disk of {rootdir} ({tree.files()} files, "
                    f"{human(tree.size)}, from {tree.source}) in "
                    f"{time.monotonic() - started:.2f}s")
                return {"rootdir": str(rootdir), "files": tree.files(), "bytes": tree.size,
                        "source": tree.source, "exclude": list(patterns)}

            entry = self.run.cache.get_or_build(
                "vmproject", key, build,
                {"format": PROJECT_FORMAT, "rootdir": str(rootdir)}, log)
            self._held.append(self.run.cache.hold(entry))
            if not entry.hit:
                self._prune_projects(str(rootdir), key)
            image = entry.data / "project.img"
            self._projects[patterns] = image
            return image

    def _check_project_size(self, spec: EnvSpec, tree: ProjectTree) -> None:
        """Refuse a tree over project_max_mib or over the cache's free space, saying how
        big it is, the limit, and which keys change it."""
        limit_mib = int(spec.option("project_max_mib", PROJECT_MAX_MIB))
        what = (f"the project tree {tree.root} holds {human(tree.size)} in {tree.files()} "
                f"files after exclusions ({'.gitignore, ' if tree.source == 'git' else ''}"
                f"caches and VCS data, options.exclude = {list(tree.patterns)})")
        if tree.size > limit_mib << 20:
            raise ProvisionError(
                f"environment {spec.name!r}: {what}: more than the VM project disk's limit "
                f"of {human(limit_mib << 20)}; leave files out with options.exclude "
                f"(gitignore-style patterns) or raise options.project_max_mib")
        free = shutil.disk_usage(self.run.cache.root).free
        if tree.allocated + (64 << 20) > free:
            raise ProvisionError(
                f"environment {spec.name!r}: {what}: its disk image does not fit the "
                f"{human(free)} free in the cache {self.run.cache.root}; leave files out with "
                "options.exclude or free space (python -m pytest_isolate cache gc)")

    def _prune_projects(self, rootdir: str, keep: str) -> None:
        """Remove the project images no run holds of this rootdir (older versions of the
        tree) and of rootdirs that no longer exist (throw-away projects)."""
        import fcntl

        for entry in list(self.run.cache.entries()):
            if entry.kind != "vmproject" or entry.key == keep:
                continue
            owner = str(entry.manifest.get("rootdir", ""))
            if owner != rootdir and (not owner or os.path.exists(owner)):
                continue
            try:
                fd = os.open(entry.path / "manifest.json", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # in use by another run
            os.close(fd)
            with contextlib.suppress(OSError, IsolateError):
                self.run.cache.remove(entry)

    def _layer_disk(self, src: Path) -> Path:
        """A dependency layer directory (an immutable cache entry) as an ext4 image."""
        with self._lock:
            known = self._layer_disks.get(str(src))
            if known is not None:
                return known
            st = os.stat(src)
            key = content_hash({"format": PROJECT_FORMAT, "path": str(src),
                                "mtime": st.st_mtime_ns})

            def build(data: Path, log_path: Path) -> dict[str, Any]:
                data.mkdir(parents=True)
                make_ext4(src, data / "layer.img", label="isolate-layer")
                return {"source": str(src)}

            entry = self.run.cache.get_or_build("vmlayer", key, build,
                                                {"format": PROJECT_FORMAT, "source": str(src)},
                                                self.run.log_dir / "vmlayer.log")
            self._held.append(self.run.cache.hold(entry))
            image = entry.data / "layer.img"
            self._layer_disks[str(src)] = image
            return image

    def disks(self, spec: EnvSpec) -> list[_Disk]:
        """The disks added once the machine runs: the project, then the dependency layer."""
        from pytest_isolate.images.deps import PROJECT_LAYER

        out = [_Disk(self._project_disk(spec), PROJECT_SERIAL, str(self.run.rootdir))]
        layer = spec.layer
        if layer is not None:
            out.append(_Disk(self._layer_disk(layer.venv), VENV_SERIAL, VENV))
            if layer.project is not None:
                out.append(_Disk(self._layer_disk(layer.project), LAYER_SERIAL, PROJECT_LAYER))
        return out

    def files(self, image_data: Path) -> _Files:
        return _Files(image_data / "vmlinuz", image_data / "initramfs.img",
                      image_data / "root.img", self._site_image())

    # ------------------------------------------------------------------ start
    def accel(self, spec: EnvSpec, files: _Files, tmp: Path) -> tuple[str, str]:
        """("kvm" | "tcg", why): KVM only when wanted and a bounded probe boot succeeds."""
        wanted = str(spec.option("accel", os.environ.get("PYTEST_ISOLATE_ACCEL", "auto")))
        if wanted == "tcg":
            return "tcg", "TCG asked for"
        ok, why = kvm_candidate(spec.arch)
        if ok:
            probe = tmp / "probe-initrd.img"
            self.write_initrd(files.initramfs, probe, spec, ["true"])
            argv = self.qemu_argv(spec, files, "kvm", probe, tmp, probe=True)
            ok, why = probe_kvm(spec.arch, argv, ird.PROBE_MARK)
        if wanted == "kvm" and not ok:
            raise BackendUnavailable(self.name, f"KVM was asked for but does not work: {why}")
        return ("kvm" if ok else "tcg"), why

    def write_initrd(self, base: Path, dest: Path, spec: EnvSpec, agent_argv: list[str]) -> None:
        env = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
        env.update(environment_variables(boot_spec(spec)))
        if not agent_argv[0].startswith("/"):  # switch_root does no PATH lookup; env(1) does
            agent_argv = ["/usr/bin/env", *agent_argv]
        extra = ird.instance_archive(f"isolate-{spec.name}"[:63], agent_argv, env, spec.network)
        with open(dest, "wb") as out, open(base, "rb") as src:
            shutil.copyfileobj(src, out)
            out.write(extra)

    def qemu_argv(self, spec: EnvSpec, files: _Files, accel: str, initrd: Path, tmp: Path,
                  probe: bool = False, console_log: Path | None = None) -> list[str]:
        _, binary, machine, console = ARCHES[spec.arch]
        cpu = "host" if accel == "kvm" else str(spec.option("cpu", TCG_CPUS[spec.arch]))
        append = f"console={console} panic=-1 loglevel=4 rdinit=/init"
        if probe:
            append += " isolate.probe"
        qemu = shutil.which(binary) or binary
        argv = [qemu, *machine, "-accel", accel, "-cpu", cpu,
                "-m", str(vm_memory_mib(spec)), "-smp", str(vm_cpus(spec)),
                "-name", f"pytest-isolate:{self.run.run_id}:{spec.name}",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(files.kernel), "-initrd", str(initrd), "-append", append]
        for ident, path, serial in (("root", files.root, ird.ROOT_SERIAL),
                                    ("site", files.site, ird.SITE_SERIAL)):
            argv += ["-drive", f"file={path},format=raw,if=none,id={ident},readonly=on",
                     "-device", f"virtio-blk-pci,drive={ident},serial={serial}"]
        if probe:
            return [*argv, "-serial", "stdio", "-nic", "none"]
        console_log = console_log or tmp / "console.log"
        argv += ["-chardev", f"file,id=console,path={console_log},append=on",
                 "-serial", "chardev:console",
                 "-chardev", f"socket,id=agent,path={tmp / 'agent.sock'},server=on,wait=off",
                 "-device", "virtio-serial-pci,id=vser",
                 "-device", f"virtserialport,bus=vser.0,chardev=agent,id=agentport,"
                            f"name={ird.PORT_NAME}",
                 "-qmp", f"unix:{tmp / 'qmp.sock'},server=on,wait=off"]
        argv += ["-nic", "user,model=virtio-net-pci"] if spec.network else ["-nic", "none"]
        # free ports for the project and layer disks, hot-plugged after boot or restore
        for i in range(HOTPLUG_PORTS):
            argv += ["-device", f"pcie-root-port,id=isolate-hp{i},chassis={i + 1}"]
        return argv

    def hotplug(self, vm: _Vm, disks: list[_Disk]) -> None:
        """Add the disks to the running machine (read-only), one root port each."""
        if len(disks) > HOTPLUG_PORTS:
            raise IsolateError(f"{len(disks)} disks to add, only {HOTPLUG_PORTS} free ports")
        for i, disk in enumerate(disks):
            node = f"isolate-disk{i}"
            blockdev: dict[str, Any] = {
                "driver": "raw", "node-name": node, "read-only": True,
                "file": {"driver": "file", "filename": str(disk.path), "read-only": True}}
            device: dict[str, Any] = {
                "driver": "virtio-blk-pci", "id": f"isolate-dev{i}", "drive": node,
                "bus": f"isolate-hp{i}", "serial": disk.serial}
            vm.qmp.command("blockdev-add", **blockdev)
            vm.qmp.command("device_add", **device)

    def _version(self, binary: str) -> str:
        with self._lock:
            if binary not in self._versions:
                self._versions[binary] = qemu_version(binary)
            return self._versions[binary]

    def _launch(self, argv: list[str], tmp: Path, qemu_log: Path, note: str) -> _Vm:
        with open(qemu_log, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n# {note}\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        qmp: Qmp | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            qmp = Qmp(str(tmp / "qmp.sock"), QMP_TIMEOUT, proc)
            sock.connect(str(tmp / "agent.sock"))
        except BaseException:
            if qmp is not None:
                qmp.close()
            sock.close()
            proc.kill()
            proc.wait()
            raise
        return _Vm(proc, qmp, sock)

    def start(self, spec: EnvSpec, image: Entry) -> Instance:
        if not self._reaped:
            self._reaped = True
            for what in self.reap():
                self.run.progress(f"qemu: killed {what} (an interrupted run)")
        if self.driver(spec) == "libvirt":
            return self._start_libvirt(spec, image)
        describe = f"environment {spec.name!r}"
        tmp = socket_dir()
        started = time.monotonic()
        marks: list[str] = []

        def mark(what: str) -> None:
            marks.append(f"{what} {time.monotonic() - started:.2f}s")

        console_log = self.run.log_path(spec.name, "console.log")
        qemu_log = self.run.log_path(spec.name, "qemu.log")

        def cleanup() -> None:
            shutil.rmtree(tmp, ignore_errors=True)

        vm: _Vm | None = None
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
            if state is not None:
                try:
                    vm = self._restore(argv, tmp, qemu_log, state, accel)
                    process = VmProcess(vm.proc, vm.qmp, vm.sock, describe, console_log, memory)
                    # the saved machine's agent is already running: check that it answers
                    process.vconn.bootstrapped = True
                    process.conn.call(0, {"op": "hello"}, timeout=RESTORE_HELLO_TIMEOUT)
                    self.last_start = f"restore ({accel})"
                    mark("restored")
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
                self.last_start = f"boot ({accel})"
                mark("booted")
                if snapshots:
                    # save the machine with the agent running and idle, before anything
                    # run-specific (settings, project, clock) reaches it
                    process.conn.bootstrap()
                    process.conn.call(0, {"op": "hello"}, timeout=HANDSHAKE_TIMEOUT)
                    mark("agent started")
                    self._save_state(spec, vm, key, fields, qemu_log)
                    mark("state saved")
            # run-specific from here on: the guest finds the disks while the agent starts
            self.hotplug(vm, disks)
            mark("disks added")
        except BaseException as exc:
            if vm is not None:
                vm.kill()
            tail = log_tail(console_log)
            cleanup()
            if isinstance(exc, QmpError):
                raise AgentLost(f"{describe}: {exc}\n--- qemu log ---\n{log_tail(qemu_log)}"
                                f"\n--- console tail ---\n{tail}") from None
            if isinstance(exc, (AgentLost, AgentTimeout)):
                raise type(exc)(f"{exc}\n--- console tail ---\n{tail}") from None
            raise
        # "agent" is the log whose tail is shown when the agent is lost: the console,
        # where the kernel, /init and the agent's stderr all write.
        instance = Instance(spec, process, {"agent": console_log, "console": console_log,
                                            "qemu": qemu_log, "provision": image.log}, cleanup)
        self._ready(spec, instance, console_log, mark, HANDSHAKE_TIMEOUT, disks)
        with contextlib.suppress(OSError), open(qemu_log, "a") as log:
            log.write(f"# {self.last_start}: {', '.join(marks)}\n")
        return instance

    def _ready(self, spec: EnvSpec, instance: Instance, console_log: Path,
               mark: Callable[[str], None], timeout: float, disks: list[_Disk]) -> None:
        """Handshake, then mount the project (and layer) disks and set the clock; stops the
        instance on failure."""
        describe = f"environment {spec.name!r}"
        rootdir = str(self.run.rootdir)
        shipped = shipped_paths()
        try:
            instance.handshake(
                {"isolation": "overlay", "lower": "/.isolate/lower", "site": SITE,
                 "binds": [rootdir] + [dst for _, dst in shipped]
                 + (["/etc/resolv.conf"] if spec.network else [])
                 + ([VENV] if spec.layer is not None else []), "cwd": rootdir,
                 "disk": spec.limits().disk, "guest_limits": guest_limits(spec)},
                timeout=timeout,
            )
            mark("agent ready")
            pairs = [w for d in disks for w in (d.serial, d.mountpoint)]
            reply, out = instance.conn.call(
                0, {"op": "exec", "argv": ["busybox", "sh", "-c", MOUNT_DISKS, "sh",
                                          str(int(time.time())), *pairs],
                    "timeout": HANDSHAKE_TIMEOUT}, timeout=HANDSHAKE_TIMEOUT + 5)
            if reply.get("returncode") != 0:
                raise IsolateError(f"{describe}: cannot mount the project disk in the VM: "
                                   f"{out.decode(errors='replace').strip()}")
            mark("project mounted (" + "; ".join(
                out.decode(errors="replace").strip().splitlines()) + ")")
            if spec.layer is not None:
                self._configure_layer(spec, instance)
        except BaseException as exc:
            tail = log_tail(console_log)
            instance.stop()
            if isinstance(exc, (AgentLost, AgentTimeout)):
                raise type(exc)(f"{exc}\n--- console tail ---\n{tail}") from None
            if isinstance(exc, (IsolateError, OSError)):
                raise AgentLost(f"{describe}: starting the agent failed: {exc}"
                                f"\n--- console tail ---\n{tail}") from None
            raise

    def _configure_layer(self, spec: EnvSpec, instance: Instance) -> None:
        """The agent takes on the dependency layer (images/deps.py), mounted from its disks:
        its virtual environment, and the project layer over the rootdir (the saved machine
        booted without them)."""
        from pytest_isolate.images.deps import PROJECT_LAYER

        layer = spec.layer
        assert layer is not None
        settings: dict[str, Any] = {"venv": VENV}
        if layer.project is not None:
            settings["project_layer"] = [PROJECT_LAYER, str(self.run.rootdir)]
        instance.conn.call(0, {"op": "configure", "settings": settings},
                           timeout=HANDSHAKE_TIMEOUT)

    def _wait_port(self, spec: EnvSpec, vm: _Vm, qemu_log: Path) -> None:
        """Wait until the guest opens the agent's port; fail fast if QEMU or the guest dies."""
        timeout = float(spec.option("boot_timeout", BOOT_TIMEOUT))
        deadline = time.monotonic() + timeout
        while True:
            ev = vm.qmp.wait_event("VSERPORT_CHANGE", 0.5, {"id": "agentport", "open": True})
            if ev is not None:
                return
            if vm.proc.poll() is not None or any(e["event"] == "SHUTDOWN" for e in vm.qmp.events):
                raise AgentLost(
                    f"environment {spec.name!r}: the VM stopped during boot "
                    f"(QEMU exit status {vm.proc.poll()})\n--- qemu log ---\n{log_tail(qemu_log)}")
            if time.monotonic() > deadline:
                raise AgentLost(
                    f"environment {spec.name!r}: the agent's port did not open within "
                    f"{timeout:.0f}s of starting the VM")

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

    def _start_libvirt(self, spec: EnvSpec, image: Entry) -> Instance:
        """A transient libvirt domain with the same kernel, initramfs, disks and port.

        No saved states here: every start boots.  The domain is named after the
        run, destroyed by stop(), and destroys itself when its agent dies.
        """
        libvirt = self._libvirt()
        describe = f"environment {spec.name!r}"
        uri = str(spec.option("libvirt_uri", self.endpoint or os.environ.get(
            "LIBVIRT_DEFAULT_URI", "qemu:///system")))
        tmp = socket_dir()
        os.chmod(tmp, 0o755)
        console_log = self.run.log_path(spec.name, "console.log")
        qemu_log = self.run.log_path(spec.name, "qemu.log")
        started = time.monotonic()
        marks: list[str] = []

        def mark(what: str) -> None:
            marks.append(f"{what} {time.monotonic() - started:.2f}s")

        conn: Any = None
        dom: Any = None
        sock: socket.socket | None = None

        local = uri.startswith("qemu:///")
        name = f"pytest-isolate-{self.run.run_id}-{spec.name}-{os.urandom(3).hex()}"

        def cleanup() -> None:
            if dom is not None:
                destroy_domain(dom, name, local)
            with contextlib.suppress(Exception):
                if conn is not None:
                    conn.close()
            shutil.rmtree(tmp, ignore_errors=True)

        try:
            disks = self.disks(spec)
            conn = self._libvirt_connect(libvirt, uri)
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
            mark("domain started")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deadline = time.monotonic() + QMP_TIMEOUT
            while True:
                try:
                    sock.connect(str(tmp / "agent.sock"))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise AgentLost(f"{describe}: the agent's socket did not appear") \
                            from None
                    time.sleep(0.01)
        except BaseException:
            if sock is not None:
                sock.close()
            cleanup()
            raise
        process = LibvirtProcess(dom, sock, describe, name, local, console_log,
                                 vm_memory_mib(spec))
        instance = Instance(spec, process, {"agent": console_log, "console": console_log,
                                            "qemu": qemu_log, "provision": image.log}, cleanup)
        # the agent's source waits in the socket until the guest opens its port: the
        # handshake's timeout covers the boot
        self._ready(spec, instance, console_log, mark,
                    float(spec.option("boot_timeout", BOOT_TIMEOUT)), disks)
        self.last_start = "boot (libvirt)"
        with contextlib.suppress(OSError), open(qemu_log, "a") as log:
            log.write(f"# {self.last_start}: {', '.join(marks)}\n")
        return instance

    def libvirt_virt_type(self, spec: EnvSpec, conn: Any, uri: str, files: _Files,
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

    def domain_xml(self, spec: EnvSpec, files: _Files, initrd: Path, tmp: Path,
                   console_log: Path, name: str, extra: list[_Disk] | None = None,
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

    # -------------------------------------------------------------- snapshots
    def _state_key(self, image: Entry, files: _Files, argv: list[str], initrd: Path, tmp: Path,
                   console_log: Path) -> tuple[str, dict[str, Any]]:
        """What a saved machine state depends on: everything on QEMU's command line."""
        shape = [a.replace(str(console_log), "@CONSOLE@").replace(str(tmp), "@TMP@")
                 .replace(self.run.run_id, "@RUN@") for a in argv]
        fields: dict[str, Any] = {
            "format": STATE_FORMAT, "vmdisk": image.key, "site": str(files.site),
            "argv": shape, "qemu": self._version(argv[0]),
            "initrd": hashlib.sha256(initrd.read_bytes()).hexdigest(),
            "agent": hashlib.sha256(AGENT_SOURCE).hexdigest(),
        }
        return content_hash(fields), fields

    def _save_state(self, spec: EnvSpec, vm: _Vm, key: str, fields: dict[str, Any],
                    qemu_log: Path) -> None:
        """Save the machine (guest waiting for the agent's source) into the cache."""

        def build(data: Path, log_path: Path) -> dict[str, Any]:
            data.mkdir(parents=True)
            started = time.monotonic()
            with open(data / "state", "wb") as f:
                vm.qmp.command_with_fd("getfd", f.fileno(), fdname="isolate-state")
                try:
                    vm.qmp.command("migrate", uri="fd:isolate-state")
                    self._wait_migration(vm, "query-migrate", STATE_TIMEOUT)
                finally:
                    status = vm.qmp.command("query-status")
                    if status.get("status") != "running":
                        vm.qmp.command("cont")
                f.flush()
                os.fsync(f.fileno())
            return {"state_seconds": round(time.monotonic() - started, 3)}

        try:
            entry = self.run.cache.get_or_build("vmstate", key, build, fields, qemu_log)
        except (IsolateError, OSError) as exc:
            self.run.progress(f"environment {spec.name!r}: saving the VM state failed: {exc}")
            return
        if not entry.hit:
            self.run.progress(f"saved the state of {spec.name!r} "
                              f"({entry.manifest.get('size', 0) >> 20} MiB) in "
                              f"{entry.build_seconds:.2f}s")

    def _wait_migration(self, vm: _Vm, query: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = vm.qmp.command(query)
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', '')}")
            if vm.proc.poll() is not None:
                raise QmpError(f"QEMU exited during migration (status {vm.proc.returncode})")
            if time.monotonic() > deadline:
                raise QmpError(f"migration did not complete in {timeout:.0f}s")
            time.sleep(0.01)

    def _restore(self, argv: list[str], tmp: Path, qemu_log: Path, state: Entry,
                 accel: str) -> _Vm:
        vm = self._launch([*argv, "-incoming", "defer"], tmp, qemu_log,
                          f"restore {state.data / 'state'}, accelerator {accel}")
        try:
            with open(state.data / "state", "rb") as f:
                vm.qmp.command_with_fd("getfd", f.fileno(), fdname="isolate-state")
            vm.qmp.command("migrate-incoming", uri="fd:isolate-state")
            deadline = time.monotonic() + STATE_TIMEOUT
            while True:
                status = vm.qmp.command("query-status").get("status")
                if status == "running":
                    return vm
                if status in ("paused", "postmigrate", "prelaunch"):
                    # incoming finished but autostart did not happen
                    info = vm.qmp.command("query-migrate")
                    if info.get("status") == "completed":
                        vm.qmp.command("cont")
                        continue
                if vm.proc.poll() is not None:
                    raise QmpError(f"QEMU exited while restoring (status {vm.proc.returncode}): "
                                   f"{log_tail(qemu_log, 3)}")
                if time.monotonic() > deadline:
                    raise QmpError(f"restoring did not finish in {STATE_TIMEOUT:.0f}s")
                time.sleep(0.01)
        except BaseException:
            vm.kill()
            raise
