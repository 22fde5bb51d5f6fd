"""What both drivers share: the disks (provisioned, cached, added once the machine runs),
the accelerator, the initrd, QEMU's command line and launch, the handshake and mounts."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_isolate.agent.wire import message
from pytest_isolate.backends.base import SITE, Backend, Instance, Launch, RunContext, shipped_paths
from pytest_isolate.backends.qemu.qmp import QMP_TIMEOUT, Qmp
from pytest_isolate.cache import Entry
from pytest_isolate.channel import log_tail
from pytest_isolate.errors import AgentLost, AgentTimeout, BackendUnavailable, IsolateError, ProvisionError
from pytest_isolate.images import initramfs as ird
from pytest_isolate.images.deps import VENV
from pytest_isolate.images.disk import ext4_from_paths, make_ext4
from pytest_isolate.images.envvars import environment_variables, system_variables
from pytest_isolate.images.kernel import (
    ARCHES,
    TCG_CPUS,
    GuestKernel,
    find_kernel,
    kvm_candidate,
    probe_kvm,
)
from pytest_isolate.images.rootfs import provision_rootfs
from pytest_isolate.images.tree import ProjectTree, human, scan_tree, stage_tree
from pytest_isolate.limits import cgroup_values
from pytest_isolate.spec import EnvSpec, content_hash

#: Bump when the disk / kernel / initramfs layout in the "vmdisk" cache entries changes.
VMDISK_FORMAT = 1
SITE_FORMAT = 1
#: Seconds from starting QEMU to the agent's port opening (TCG on a loaded host is slow).
BOOT_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 60.0
MEMORY_MIB = 1024
#: RAM a guest needs besides its memory limit: kernel, page cache of the root disk.
GUEST_OVERHEAD_MIB = 256
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


@dataclasses.dataclass
class VmFiles:
    kernel: Path
    initramfs: Path
    root: Path
    site: Path


@dataclasses.dataclass
class Vm:
    proc: subprocess.Popen[bytes]
    qmp: Qmp
    sock: socket.socket

    def kill(self) -> None:
        self.qmp.close()
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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


#: Virtual CPUs when neither the spec's cpus nor the option says: two, so that the next
#: test's worker is made while a test runs (the host asks for it ahead) instead of after
#: it.  Under TCG each is a host thread: 210 -> 99 ms per test on two host cores (issue 13).
DEFAULT_VM_CPUS = 2


def vm_cpus(spec: EnvSpec) -> int:
    """Virtual CPUs: the spec's cpus rounded up, else the option cpus, else DEFAULT_VM_CPUS."""
    return spec.limits().cpu_count() or int(spec.option("cpus", DEFAULT_VM_CPUS))


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def boot_spec(spec: EnvSpec) -> EnvSpec:
    """What the machine boots with: the dependency layer comes after a restore (so one
    saved state serves every layer), and the agent takes on its venv then."""
    return dataclasses.replace(spec, layer=None) if spec.layer is not None else spec


@dataclasses.dataclass(frozen=True)
class Disk:
    """A read-only disk image added once the machine runs, mounted at mountpoint."""

    path: Path
    serial: str
    mountpoint: str


#: Runs inside the guest (the busybox /init copied into the root): set the clock, then mount
#: each disk (found by its virtio serial number) read-only at its path.  Arguments:
#: $0 the busybox, then the time, then serial and mount point pairs.
MOUNT_DISKS = r"""
set -e
bb=$0
read -r up _ </proc/uptime
echo "started at uptime $up"
$bb date -u -s "@$1" >/dev/null
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
        $bb usleep 50000
    done
    $bb mkdir -p "$dir"
    $bb mount -t ext4 -o ro,noload "$dev" "$dir"
    read -r up _ </proc/uptime
    echo "$serial after $n polls, mounted at uptime $up"
done
"""


class Marks:
    """The timed steps of one start ("booted 1.20s"), written to qemu.log once ready."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.done: list[str] = []

    def __call__(self, what: str) -> None:
        self.done.append(f"{what} {time.monotonic() - self.started:.2f}s")


@dataclasses.dataclass
class VmLaunch(Launch):
    """A machine's launch: what ready() needs besides the handshake's settings."""

    console_log: Path = Path()
    qemu_log: Path = Path()
    #: added to the running machine, mounted by ready()
    disks: list[Disk] = dataclasses.field(default_factory=list)
    marks: Marks = dataclasses.field(default_factory=Marks)
    #: how it started: "boot (tcg)", "restore (kvm)", "boot (libvirt)" (last_start)
    how: str = ""


def kernel_spec(spec: EnvSpec) -> EnvSpec:
    """The Debian root filesystem a machine of an image takes its kernel (when the image
    has none) and its initramfs's static busybox from: the environment's architecture
    and release, nothing but the kernel package and busybox-static (python3 comes with
    every root filesystem), so every image of an architecture shares one."""
    return EnvSpec(name=f"{spec.name} (kernel)", backend=spec.backend, arch=spec.arch,
                   release=spec.release, mirror=spec.mirror,
                   packages=(ARCHES[spec.arch][0], "busybox-static"),
                   sources={"packages": "the VM's kernel and busybox (built-in)"})


def guest_kernel(spec: EnvSpec, root: Path, tools: Path) -> tuple[GuestKernel, str]:
    """The kernel a machine boots, and where it comes from (for `envs` and the log): the
    root filesystem's own when it has one with its modules, else (an image's root) the
    Debian kernel package in tools."""
    try:
        return find_kernel(root), ("the image's /boot" if spec.from_image
                                   else f"Debian {spec.release}'s {ARCHES[spec.arch][0]}")
    except LookupError as exc:
        if root == tools:
            raise ProvisionError(str(exc)) from None
    try:
        return find_kernel(tools), f"Debian {spec.release}'s {ARCHES[spec.arch][0]}"
    except LookupError as exc:
        raise ProvisionError(str(exc)) from None


class QemuBase(Backend):
    """The VM backend's building blocks (and its ready(): handshake, disks); QemuBackend adds
    its check, reap and launch."""

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

    # -------------------------------------------------------------- provision
    def provision(self, spec: EnvSpec) -> Entry:
        """The machine's files (kernel, initramfs, root disk) as a "vmdisk" cache entry.

        The root disk is the Debian root filesystem (the spec's plus a kernel and busybox),
        or an image's root filesystem (image_rootfs.py: the same export chroot uses).  An
        image's kernel is its own when its /boot has one with modules, else the Debian
        kernel package of the environment's architecture, from a Debian root filesystem
        cached separately (kernel_spec) that also gives the static busybox of the initramfs.
        """
        log = self.run.log_path(spec.name, "provision.log")
        if spec.from_image:
            from pytest_isolate.backends.image_rootfs import provision_image_rootfs

            rootfs = provision_image_rootfs(spec, self.run.cache, log, self.run.progress,
                                            self.run.rootdir)
            tools = provision_rootfs(kernel_spec(spec), self.run.cache, log, self.run.rootdir,
                                     self.run.progress)
            described = {"image": spec.image or f"built from {spec.dockerfile}",
                         "digest": rootfs.manifest.get("digest")}
        else:
            rootfs = tools = provision_rootfs(self.rootfs_spec(spec), self.run.cache, log,
                                              self.run.rootdir, self.run.progress)
            described = {"spec": spec.rootfs_fields()}
        fields = {"format": VMDISK_FORMAT, "initramfs": ird.INITRAMFS_FORMAT,
                  "rootfs": rootfs.key, "tools": tools.key}

        def build(data: Path, log_path: Path) -> dict[str, Any]:
            self.run.progress(f"making the VM disk and initramfs for {spec.name!r}")
            data.mkdir(parents=True)
            kernel, kernel_from = guest_kernel(spec, rootfs.data, tools.data)
            shutil.copyfile(kernel.image, data / "vmlinuz")
            busybox = next((p for p in (tools.data / "usr/bin/busybox",
                                        tools.data / "bin/busybox") if p.exists()), None)
            if busybox is None:
                raise ProvisionError(f"no busybox in {tools.data} (busybox-static missing)")
            try:
                modules = ird.build_initramfs(busybox, kernel.modules, data / "initramfs.img",
                                              compress=False)
            except (LookupError, OSError) as exc:
                raise ProvisionError(f"cannot build the initramfs: {exc}") from None
            make_ext4(rootfs.data, data / "root.img", label="isolate-root")
            # an image's reference and digest (the report's `image` and `digest`)
            pin = {"reference": spec.image} if spec.image is not None else {}
            if spec.from_image and rootfs.manifest.get("digest"):
                pin["digest"] = rootfs.manifest["digest"]
            return {"kernel": kernel.version, "kernel_from": kernel_from, "modules": modules,
                    "rootfs_key": rootfs.key, **pin}

        return self.run.cache.get_or_build("vmdisk", content_hash(fields), build,
                                           {**fields, **described}, log)

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

    def disks(self, spec: EnvSpec) -> list[Disk]:
        """The disks added once the machine runs: the project, then the dependency layer."""
        from pytest_isolate.images.deps import PROJECT_LAYER

        out = [Disk(self._project_disk(spec), PROJECT_SERIAL, str(self.run.rootdir))]
        layer = spec.layer
        if layer is not None:
            out.append(Disk(self._layer_disk(layer.venv), VENV_SERIAL, VENV))
            if layer.project is not None:
                out.append(Disk(self._layer_disk(layer.project), LAYER_SERIAL, PROJECT_LAYER))
        return out

    def files(self, image_data: Path) -> VmFiles:
        return VmFiles(image_data / "vmlinuz", image_data / "initramfs.img",
                      image_data / "root.img", self._site_image())

    # ------------------------------------------------------------------ start
    def accel(self, spec: EnvSpec, files: VmFiles, tmp: Path) -> tuple[str, str]:
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
        env = {**system_variables(), "TERM": "dumb"}
        env.update(environment_variables(boot_spec(spec)))
        if not agent_argv[0].startswith("/"):  # switch_root does no PATH lookup; env(1) does
            agent_argv = [ird.GUEST_BUSYBOX, "env", *agent_argv]
        extra = ird.instance_archive(f"isolate-{spec.name}"[:63], agent_argv, env, spec.network)
        with open(dest, "wb") as out, open(base, "rb") as src:
            shutil.copyfileobj(src, out)
            out.write(extra)

    def qemu_argv(self, spec: EnvSpec, files: VmFiles, accel: str, initrd: Path, tmp: Path,
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

    def hotplug(self, vm: Vm, disks: list[Disk]) -> None:
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

    def _launch(self, argv: list[str], tmp: Path, qemu_log: Path, note: str) -> Vm:
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
        return Vm(proc, qmp, sock)

    def ready(self, instance: Instance, launch: Launch) -> None:
        """Handshake, then mount the project (and layer) disks and set the clock; a failure
        shows the console's tail (start() then stops the instance)."""
        assert isinstance(launch, VmLaunch)
        spec = instance.spec
        describe = f"environment {spec.name!r}"
        try:
            instance.handshake(launch.settings, timeout=launch.timeout)
            launch.marks("agent ready")
            pairs = [w for d in launch.disks for w in (d.serial, d.mountpoint)]
            reply, out = instance.conn.call(
                0, message("exec", argv=[ird.GUEST_BUSYBOX, "sh", "-c", MOUNT_DISKS,
                                         ird.GUEST_BUSYBOX,
                                         str(int(time.time())), *pairs],
                           timeout=HANDSHAKE_TIMEOUT),
                timeout=HANDSHAKE_TIMEOUT + 5)
            if reply.get("returncode") != 0:
                raise IsolateError(f"{describe}: cannot mount the project disk in the VM: "
                                   f"{out.decode(errors='replace').strip()}")
            launch.marks("project mounted (" + "; ".join(
                out.decode(errors="replace").strip().splitlines()) + ")")
            if spec.layer is not None:
                self._configure_layer(spec, instance)
        except BaseException as exc:
            tail = log_tail(launch.console_log)
            if isinstance(exc, (AgentLost, AgentTimeout)):
                raise type(exc)(f"{exc}\n--- console tail ---\n{tail}") from None
            if isinstance(exc, (IsolateError, OSError)):
                raise AgentLost(f"{describe}: starting the agent failed: {exc}"
                                f"\n--- console tail ---\n{tail}") from None
            raise
        self.last_start = launch.how
        with contextlib.suppress(OSError), open(launch.qemu_log, "a") as log:
            log.write(f"# {self.last_start}: {', '.join(launch.marks.done)}\n")

    def vm_settings(self, spec: EnvSpec) -> dict[str, Any]:
        """The agent's settings in a VM: what the disks hold is bound into each test's root."""
        rootdir = str(self.run.rootdir)
        return {"isolation": "overlay", "lower": "/.isolate/lower", "site": SITE,
                "binds": [rootdir] + [dst for _, dst in shipped_paths()]
                + (["/etc/resolv.conf"] if spec.network else [])
                + ([VENV] if spec.layer is not None else []), "cwd": rootdir,
                "disk": spec.limits().disk, "guest_limits": guest_limits(spec)}

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
        instance.conn.call(0, message("configure", settings=settings),
                           timeout=HANDSHAKE_TIMEOUT)

    def _wait_port(self, spec: EnvSpec, vm: Vm, qemu_log: Path) -> None:
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
