"""``pytest-isolate setup``: prepare this machine for the backends a project uses.

Planning is separate from doing.  :func:`gather_state` reads the machine (installed
packages, binfmt registrations, whether the engines answer, subordinate id ranges);
:func:`plan` is a pure function of a :class:`Request` and that :class:`HostState` and gives
a :class:`Plan`: a list of :class:`Step` (a command and the reason for it) and the problems
that stop it; :func:`execute` runs a plan.  What is already in place gets no step, so a
second run has nothing to do; ``--dry-run`` prints the plan.

Debian and Ubuntu (apt) are supported; elsewhere the plan names what to install and stops.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath


@dataclasses.dataclass(frozen=True)
class Package:
    """A Debian package a backend needs: what it is for, and the commands it brings that
    doctor looks for on PATH."""

    name: str
    why: str
    commands: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class HostNeeds:
    """What a backend needs on the host, declared once (HOST_NEEDS; a backend class's
    ``host_needs``): ``setup`` installs the packages and starts the services, ``doctor``
    probes the commands, services and Python modules, and error messages name them."""

    packages: tuple[Package, ...] = ()
    #: more packages for each architecture the backend runs (its VMs' QEMU)
    arch_packages: tuple[tuple[str, tuple[Package, ...]], ...] = ()
    #: (name, socket path, how to start it)
    services: tuple[tuple[str, str, str], ...] = ()
    #: (Python module, how to install it)
    python: tuple[tuple[str, str], ...] = ()

    def packages_for(self, arches: Iterable[str]) -> tuple[Package, ...]:
        wanted = set(arches)
        return self.packages + tuple(p for arch, pkgs in self.arch_packages if arch in wanted
                                     for p in pkgs)

    @property
    def commands(self) -> tuple[tuple[str, str], ...]:
        """(command, package) of every package, for every architecture."""
        every = self.packages_for(arch for arch, _ in self.arch_packages)
        return tuple((cmd, p.name) for p in every for cmd in p.commands)


MMDEBSTRAP = Package("mmdebstrap", "builds root filesystems", ("mmdebstrap",))
MMDEBSTRAP_IMAGES = Package("mmdebstrap", "builds root filesystems (imported as images)",
                            ("mmdebstrap",))
UTIL_LINUX = Package("util-linux", "unshare, mount", ("unshare",))
DOCKER_EXTRA = ("docker", "pip install 'pytest-isolate-env[docker]'")
LIBVIRT_PYTHON = "building libvirt-python (the [all] extra)"
DOCKERD = ("dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false")
PODMAN_SOCKET = "/run/podman/podman.sock"
#: What each built-in backend needs on the host (read through Backend.host_needs).
HOST_NEEDS: dict[str, HostNeeds] = {
    "chroot": HostNeeds(packages=(MMDEBSTRAP, UTIL_LINUX)),
    "schroot": HostNeeds(packages=(Package("schroot", "the schroot backend", ("schroot",)),
                                   MMDEBSTRAP, UTIL_LINUX)),
    "lxc": HostNeeds(packages=(Package("lxc", "the LXC tools", ("lxc-start", "lxc-attach")),
                               MMDEBSTRAP)),
    "docker": HostNeeds(
        packages=(Package("docker.io", "the Docker engine", ("docker", "dockerd")),
                  MMDEBSTRAP_IMAGES),
        services=(("Docker engine", "/var/run/docker.sock", " ".join(DOCKERD) + " &"),),
        python=(DOCKER_EXTRA,)),
    "podman": HostNeeds(
        packages=(Package("podman", "the podman engine (its Docker-compatible service)",
                          ("podman",)), MMDEBSTRAP_IMAGES),
        services=(("podman service", PODMAN_SOCKET,
                   f"podman system service --time=0 unix://{PODMAN_SOCKET} &"),),
        python=(DOCKER_EXTRA,)),
    "qemu": HostNeeds(
        packages=(Package("qemu-utils", "qemu-img", ("qemu-img",)),
                  Package("e2fsprogs", "mkfs.ext4 for the VM disks", ("mkfs.ext4",)),
                  Package("busybox-static", "the VMs' initramfs"),
                  Package("cpio", "the VMs' initramfs"),
                  MMDEBSTRAP,
                  Package("libvirt-daemon-system", 'libvirtd (vm_driver = "libvirt")'),
                  Package("libvirt-clients", "virsh"),
                  Package("libvirt-dev", LIBVIRT_PYTHON),
                  Package("pkg-config", LIBVIRT_PYTHON),
                  Package("gcc", LIBVIRT_PYTHON),
                  Package("python3-dev", LIBVIRT_PYTHON)),
        arch_packages=(
            ("amd64", (Package("qemu-system-x86", "x86_64 VMs", ("qemu-system-x86_64",)),
                       Package("seabios", "x86_64 VM firmware"),
                       Package("ipxe-qemu", "x86_64 VM option ROMs"))),
            ("arm64", (Package("qemu-system-arm", "aarch64 VMs", ("qemu-system-aarch64",)),))),
        services=(("libvirt (optional)", "/var/run/libvirt/libvirt-sock", "libvirtd -d"),)),
}
#: What foreign architectures need (qemu-user through binfmt_misc).
FOREIGN_PACKAGES = (("qemu-user-static", "runs foreign binaries (qemu-user)"),
                    ("binfmt-support", "update-binfmts"),
                    ("arch-test", "mmdebstrap's check for foreign architectures"))
#: What a rootless user needs.
ROOTLESS_PACKAGES = (("uidmap", "newuidmap/newgidmap for rootless builds"),)
#: A required package is also satisfied by these (other distributions' builds of it).
ALTERNATIVES = {
    "docker.io": ("docker-ce", "moby-engine"),
    "qemu-user-static": ("qemu-user-binfmt",),
}
#: Debian architecture -> the qemu-user binfmt name.
BINFMT_NAMES = {"arm64": "aarch64", "armhf": "arm", "armel": "arm", "i386": "i386",
                "ppc64el": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
                "mips64el": "mips64el", "amd64": "x86_64"}
#: Architectures a host runs natively (no qemu-user needed).
NATIVE = {"amd64": {"amd64", "i386"}, "arm64": {"arm64"}}
BINFMT_DIR = "/proc/sys/fs/binfmt_misc"
DOCKERD_LOG = "/var/log/pytest-isolate-dockerd.log"


def podman_target(endpoint: str | None) -> tuple[str, str]:
    """The podman service's URL and where it came from (the podman backend's, and the one
    setup starts): endpoint (a pool host), CONTAINER_HOST, else the rootful socket as root
    and the user's own ($XDG_RUNTIME_DIR/podman/podman.sock) otherwise."""
    if endpoint:
        return endpoint, "a [tool.pytest-isolate.hosts] entry of pyproject.toml"
    if os.environ.get("CONTAINER_HOST"):
        return os.environ["CONTAINER_HOST"], "the CONTAINER_HOST environment variable"
    if os.geteuid() == 0:
        return f"unix://{PODMAN_SOCKET}", "the rootful default socket"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"unix://{runtime}/podman/podman.sock", "the rootless default socket"


def podman_service(url: str) -> tuple[str, ...]:
    """podman's Docker-compatible service at url where there is no systemd (none to manage
    cgroups or take events): cgroupfs, events to a file.  The same for a rootless user."""
    return ("podman", "--cgroup-manager=cgroupfs", "--events-backend=file", "system",
            "service", "--time=0", url)


PODMAN_SERVICE = podman_service(f"unix://{PODMAN_SOCKET}")
PODMAN_LOG = "/var/log/pytest-isolate-podman.log"
PODMAN_CONF = "/run/podman/pytest-isolate-containers.conf"
#: Answers when the service does (podman's own client through the same socket).
PODMAN_PROBE = ("podman", "--url", f"unix://{PODMAN_SOCKET}", "info")
#: What libvirtd sees at /dev/kvm where KVM cannot run guests (see plan()).
NO_KVM = PurePosixPath("/run/pytest-isolate/no-kvm")
VIRSH_PROBE = ("timeout", "10", "virsh", "-c", "qemu:///system", "version")
#: Subordinate id ranges given to a named user: the first free block from here.
SUBID_START = 100000
SUBID_COUNT = 65536
APT_ENV = (("DEBIAN_FRONTEND", "noninteractive"),)


class SetupError(Exception):
    """A one-line error for the user."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a plan and why it is there."""

    argv: tuple[str, ...]
    reason: str
    env: tuple[tuple[str, str], ...] = ()
    #: a daemon: started detached, its output to this log file
    background_log: str | None = None
    #: checked right before running: when it succeeds, the step is already done
    unless: tuple[str, ...] = ()
    #: after the command: repeat this until it succeeds, for at most wait_seconds
    wait: tuple[str, ...] = ()
    wait_seconds: float = 0.0
    #: run as the user who runs setup, never through sudo (a rootless user's own service)
    own: bool = False

    def shell(self, prefix: Sequence[str] = ()) -> str:
        """The step as one shell line (what --dry-run prints)."""
        prefix = () if self.own else prefix
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env]
        if env and (prefix or self.background_log):  # after sudo or nohup: env(1) sets them
            env = ["env", *env]
        line = " ".join([*map(shlex.quote, prefix), *env, *map(shlex.quote, self.argv)])
        if self.background_log:
            line = f"nohup {line} >{self.background_log} 2>&1 &"
        if self.unless:
            line = f"{' '.join(map(shlex.quote, self.unless))} || {line}"
        if self.wait:
            line += (f"\n  (then wait up to {self.wait_seconds:g}s until "
                     f"`{' '.join(map(shlex.quote, self.wait))}` succeeds)")
        return line


@dataclasses.dataclass(frozen=True)
class UserIds:
    exists: bool
    subuid: bool = False
    subgid: bool = False


@dataclasses.dataclass(frozen=True)
class HostState:
    """What the plan depends on, read from the machine by gather_state()."""

    os_name: str = "Debian GNU/Linux"
    apt: bool = True
    root: bool = True
    sudo: bool = False
    systemd: bool = False
    host_arch: str = "amd64"
    installed: frozenset[str] = frozenset()
    binfmt_mounted: bool = True
    binfmt_enabled: frozenset[str] = frozenset()
    docker_answers: bool = False
    docker_host: str = ""
    podman_answers: bool = False
    #: the podman service the podman backend would use here: the rootful socket as root,
    #: else the user's own (backends/podman.py), or CONTAINER_HOST's
    podman_url: str = f"unix://{PODMAN_SOCKET}"
    podman_from: str = "the rootful default socket"
    #: the runtime directory of the user's own podman socket exists and is theirs
    runtime_dir_ok: bool = True
    user_name: str = "root"
    libvirt_answers: bool = False
    libvirtd_running: bool = False
    virtlogd_running: bool = False
    dev_kvm: bool = False
    kvm_usable: bool = False
    users: Mapping[str, UserIds] = dataclasses.field(default_factory=dict)
    #: (start, count) of every subordinate uid and gid range already given out
    subid_ranges: tuple[tuple[int, int], ...] = ()
    unprivileged_userns: bool = True


@dataclasses.dataclass(frozen=True)
class Request:
    """What to set up: backends, foreign architectures, a user for rootless use."""

    backends: tuple[str, ...]
    arches: tuple[str, ...] = ()
    user: str | None = None
    packages: bool = True
    why: str = ""


@dataclasses.dataclass
class Plan:
    steps: list[Step]
    #: things that stop the plan from running (no apt, no root, unknown user)
    problems: list[str]
    #: things setup leaves alone but the user should know
    notes: list[str]
    #: every package the request needs, installed or not
    packages: list[str]

    @property
    def empty(self) -> bool:
        return not self.steps


# --------------------------------------------------------------------------
# Choosing what to set up


def select(specs: Mapping[str, object], project_envs: Sequence[str], *,
           backends: Sequence[str] | None = None, envs: Sequence[str] | None = None,
           arches: Sequence[str] = (), user: str | None = None, packages: bool = True,
           host_arch: str = "amd64") -> Request:
    """The request for the options given; ``specs`` are the resolved EnvSpecs by name.

    ``--envs``: those environments' backends and architectures.  ``--backends``: those
    backends and the foreign architectures of every environment using them.  Neither: the
    environments the project defines, else the built-in ``chroot``.
    """
    known = sorted(HOST_NEEDS)
    chosen: list[object]
    if envs:
        unknown = [n for n in envs if n not in specs]
        if unknown:
            raise SetupError(f"--envs: unknown environment {unknown[0]!r}; known: "
                             f"{', '.join(sorted(specs))}")
        chosen = [specs[n] for n in envs]
        names = list(dict.fromkeys(str(getattr(s, "backend", "")) for s in chosen))
        why = f"--envs {','.join(envs)}"
    elif backends:
        names = known if list(backends) == ["all"] else list(dict.fromkeys(backends))
        chosen = [s for s in specs.values() if getattr(s, "backend", None) in names]
        why = "--backends"
    elif project_envs:
        chosen = [specs[n] for n in project_envs]
        names = list(dict.fromkeys(str(getattr(s, "backend", "")) for s in chosen))
        why = f"the project's environments {', '.join(project_envs)}"
    else:
        chosen = [specs["chroot"]] if "chroot" in specs else []
        names = ["chroot"]
        why = ("the default: pyproject.toml defines no environments; "
               "name others with --envs or --backends")
    bad = [n for n in names if n not in HOST_NEEDS]
    if bad:
        raise SetupError(f"setup knows the built-in backends only ({', '.join(known)}, all); "
                         f"{bad[0]!r} is not one: install what its documentation says")
    wanted = list(arches)
    for spec in chosen:
        arch = str(getattr(spec, "arch", host_arch))
        if arch != host_arch or getattr(spec, "backend", None) == "qemu":
            wanted.append(arch)
    return Request(backends=tuple(names), arches=tuple(dict.fromkeys(wanted)), user=user,
                   packages=packages, why=why)


# --------------------------------------------------------------------------
# Planning (pure)


def free_subid_range(taken: Iterable[tuple[int, int]], count: int = SUBID_COUNT,
                     start: int = SUBID_START) -> int:
    """The first start >= start of count ids that overlaps no taken range."""
    candidate = start
    for lo, n in sorted(taken):
        if lo + n <= candidate:
            continue
        if lo >= candidate + count:
            break
        candidate = lo + n
    return candidate


def _required_packages(request: Request, state: HostState) -> dict[str, list[str]]:
    """package -> what needs it, in a stable order."""
    needed: dict[str, list[str]] = {}

    def need(pkgs: Iterable[tuple[str, str]], who: str) -> None:
        for pkg, what in pkgs:
            needed.setdefault(pkg, []).append(f"{who}: {what}")

    for backend in request.backends:
        packages = HOST_NEEDS[backend].packages_for({state.host_arch, *request.arches})
        need(((p.name, p.why) for p in packages), backend)
    if foreign_arches(request, state):
        need(FOREIGN_PACKAGES, "foreign architectures")
    if request.user:
        need(ROOTLESS_PACKAGES, f"rootless use by {request.user}")
    return needed


def foreign_arches(request: Request, state: HostState) -> list[str]:
    """The requested architectures this host does not run natively (need qemu-user)."""
    native = NATIVE.get(state.host_arch, {state.host_arch})
    return [a for a in request.arches if a not in native]


def _installed(pkg: str, state: HostState) -> bool:
    return pkg in state.installed or any(a in state.installed for a in ALTERNATIVES.get(pkg, ()))


def _plan_own_podman(state: HostState, steps: list[Step], problems: list[str],
                     notes: list[str]) -> None:
    """The podman service of a user who is not root (rootless podman: the user's own,
    started without sudo), or a CONTAINER_HOST that does not answer."""
    if state.podman_from == "the CONTAINER_HOST environment variable":
        notes.append(f"CONTAINER_HOST={state.podman_url} does not answer; setup starts the "
                     "default services only: start that one yourself")
        return
    url = state.podman_url
    socket = PurePosixPath(url.removeprefix("unix://"))
    probe = ("podman", "--url", url, "info")
    notes.append("podman runs rootless here (you are not root): your own service, started "
                 "without sudo; its images live under your home (~/.local/share/containers); "
                 "on cgroup v1 a rootless engine cannot apply memory, cpus or pids limits")
    if state.systemd:
        steps.append(Step(("systemctl", "--user", "start", "podman.socket"), "start your "
                          "podman service (rootless)", wait=probe, wait_seconds=30, own=True))
        return
    runtime = socket.parent.parent
    if not state.runtime_dir_ok:
        problems.append(f"rootless podman needs a runtime directory of yours at {runtime} "
                        "(a login session makes it; there is none here): as root, run `install "
                        f"-d -m 0700 -o {state.user_name} {runtime}`, or export XDG_RUNTIME_DIR="
                        "a directory of yours (mode 0700), then run setup again; the service "
                        f"is then: mkdir -p {socket.parent} && "
                        f"{' '.join(podman_service(url))} &")
        return
    steps.append(Step(("mkdir", "-p", str(socket.parent)), "the directory of your podman "
                      "socket", own=True))
    steps.append(Step(podman_service(url), "start your podman service (rootless; no systemd "
                      "here: cgroupfs, events to a file)",
                      env=(("XDG_RUNTIME_DIR", str(runtime)),),
                      background_log=str(socket.parent / "pytest-isolate-podman.log"),
                      wait=probe, wait_seconds=30, own=True))


def plan(request: Request, state: HostState) -> Plan:
    """The steps that bring this host to what the request needs; none when it is there."""
    steps: list[Step] = []
    problems: list[str] = []
    notes: list[str] = []
    needed = _required_packages(request, state)
    missing = [p for p in needed if not _installed(p, state)]
    if not request.packages:
        missing = []
    if missing:
        if not state.apt:
            problems.append(
                f"setup installs system packages with apt (Debian, Ubuntu); this is "
                f"{state.os_name}: install the equivalents of {', '.join(missing)} with its "
                f"package manager, then run setup again")
        else:
            steps.append(Step(("apt-get", "update", "-q"), "refresh the package lists",
                              env=APT_ENV))
            reasons = "; ".join(f"{p} ({', '.join(needed[p])})" for p in sorted(missing))
            steps.append(Step(("apt-get", "install", "-y", "-q", "--no-install-recommends",
                               *sorted(missing)), f"install {reasons}", env=APT_ENV))

    foreign = foreign_arches(request, state)
    binfmt_names = list(dict.fromkeys(BINFMT_NAMES.get(a, a) for a in foreign))
    if binfmt_names and not state.binfmt_mounted:
        steps.append(Step(("mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR),
                          "mount binfmt_misc: foreign binaries run through it"))
    for name in binfmt_names:
        if name in state.binfmt_enabled:
            continue
        path = f"{BINFMT_DIR}/qemu-{name}"
        steps.append(Step(("update-binfmts", "--enable", f"qemu-{name}"),
                          f"run {name} binaries under qemu-user (foreign architecture)",
                          unless=("grep", "-qx", "enabled", path)))

    if "docker" in request.backends and not state.docker_answers:
        if state.docker_host and not state.docker_host.startswith("unix://"):
            notes.append(f"DOCKER_HOST={state.docker_host} does not answer; setup starts local "
                         "engines only: start that one yourself")
        elif state.systemd:
            steps.append(Step(("systemctl", "start", "docker"), "start the Docker engine",
                              wait=("docker", "info"), wait_seconds=60))
        else:
            steps.append(Step(DOCKERD, "start the Docker engine (no systemd here; environments "
                              "use network_mode none, so no bridge or iptables)",
                              background_log=DOCKERD_LOG, wait=("docker", "info"),
                              wait_seconds=60))

    if "podman" in request.backends and not state.podman_answers:
        if state.podman_from != "the rootful default socket":
            _plan_own_podman(state, steps, problems, notes)
        elif state.systemd:
            steps.append(Step(("systemctl", "start", "podman.socket"), "start podman's service",
                              wait=PODMAN_PROBE, wait_seconds=30))
        else:
            steps.append(Step(("mkdir", "-p", str(PurePosixPath(PODMAN_SOCKET).parent)),
                              "the directory of podman's socket"))
            steps.append(Step(("sh", "-c", f"printf '[containers]\\ndefault_ulimits = []\\n' "
                                           f"> {PODMAN_CONF}"),
                              "podman's containers get the service's limits, as Docker's do "
                              "(see backends/podman.py)"))
            steps.append(Step(PODMAN_SERVICE, "start podman's Docker-compatible service (no "
                              "systemd here: cgroupfs, events to a file)",
                              env=(("CONTAINERS_CONF", PODMAN_CONF),),
                              background_log=PODMAN_LOG, wait=PODMAN_PROBE, wait_seconds=30))

    if "qemu" in request.backends and not state.libvirt_answers:
        if state.libvirtd_running:
            steps.append(Step(("pkill", "-x", "libvirtd"), "libvirtd runs but does not answer: "
                              "restart it"))
        masked = state.dev_kvm and not state.kvm_usable
        if state.systemd and not masked:
            steps.append(Step(("systemctl", "start", "libvirtd"), "start libvirtd",
                              wait=VIRSH_PROBE, wait_seconds=30))
        else:
            if masked:
                # The mask is a device node of our own that libvirt's QEMU user cannot open
                # (mode 000): libvirt then finds KVM unusable once and keeps its cached QEMU
                # capabilities.  /dev/null as the mask looked usable and changed its ctime on
                # every write, so libvirtd re-probed every QEMU binary (~20 s) for each
                # domain it started.
                argv: tuple[str, ...] = (
                    "unshare", "-m", "--propagation", "private", "sh", "-c",
                    f"mkdir -p {NO_KVM.parent} && rm -f {NO_KVM} && mknod -m 000 {NO_KVM} c 1 3 "
                    f"&& mount --bind {NO_KVM} /dev/kvm && exec libvirtd -d")
                why = ("start libvirtd with /dev/kvm masked: it exists but the CPU shows no "
                       "vmx/svm, and libvirtd's KVM probe would hang")
            else:
                argv, why = ("libvirtd", "-d"), "start libvirtd"
            if not state.virtlogd_running:
                steps.append(Step(("virtlogd", "-d"), "start virtlogd (libvirt's VM logs)"))
            steps.append(Step(argv, why, wait=VIRSH_PROBE, wait_seconds=30))

    if request.user:
        ids = state.users.get(request.user, UserIds(exists=False))
        if not ids.exists:
            problems.append(f"--user {request.user}: no such user; create it first "
                            f"(useradd --create-home {request.user})")
        elif not (ids.subuid and ids.subgid):
            start = free_subid_range(state.subid_ranges)
            ids_range = f"{start}-{start + SUBID_COUNT - 1}"
            flags: list[str] = []
            if not ids.subuid:
                flags += ["--add-subuids", ids_range]
            if not ids.subgid:
                flags += ["--add-subgids", ids_range]
            steps.append(Step(("usermod", *flags, request.user),
                              f"subordinate uid/gid range {ids_range} for {request.user}: "
                              "rootless builds map it in a user namespace"))
        if not state.unprivileged_userns:
            notes.append("unprivileged user namespaces are off on this kernel; rootless use "
                         "needs them: sysctl -w kernel.unprivileged_userns_clone=1 (setup "
                         "leaves this security setting to you)")

    if steps and not state.root and not state.sudo:
        problems.append("setup needs root for these steps: run it as root, or install sudo")
    return Plan(steps=steps, problems=problems, notes=notes, packages=sorted(needed))


# --------------------------------------------------------------------------
# Reading the machine


def _own_dir(path: PurePosixPath) -> bool:
    """Is path a directory of this user's (a rootless runtime directory)?"""
    try:
        return Path(path).is_dir() and Path(path).stat().st_uid == os.geteuid()
    except OSError:
        return False


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _run_ok(argv: Sequence[str], timeout: float = 15) -> bool:
    if shutil.which(argv[0]) is None and not os.path.exists(argv[0]):
        return False
    try:
        return subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _os_release() -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"')
    return values


def _installed_packages() -> frozenset[str]:
    if shutil.which("dpkg-query") is None:
        return frozenset()
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n"],
                          capture_output=True, text=True, check=False)
    return frozenset(line.split()[0] for line in done.stdout.splitlines()
                     if len(line.split()) >= 2 and line.split()[1] == "ii")


def subid_entries(path: str) -> list[tuple[str, int, int]]:
    """(name, first id, count) of each well-formed line of /etc/subuid or /etc/subgid."""
    entries = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            entries.append((parts[0], int(parts[1]), int(parts[2])))
    return entries


def _process_running(name: str) -> bool:
    return _run_ok(["pgrep", "-x", name], timeout=5)


def _kvm_usable() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags")
             for f in line.partition(":")[2].split()}
    return bool(flags & {"vmx", "svm"})


def gather_state(request: Request) -> HostState:
    """Read what plan() needs; probes engines only for the backends requested."""
    from pytest_isolate.spec import host_arch

    release = _os_release()
    like = {release.get("ID", ""), *release.get("ID_LIKE", "").split()}
    enabled = set()
    binfmt = Path(BINFMT_DIR)
    mounted = (binfmt / "register").exists()
    if mounted:
        for entry in binfmt.glob("qemu-*"):
            try:
                if entry.read_text().startswith("enabled"):
                    enabled.add(entry.name[len("qemu-"):])
            except OSError:
                continue
    users: dict[str, UserIds] = {}
    subuids = subid_entries("/etc/subuid")
    subgids = subid_entries("/etc/subgid")
    if request.user:
        try:
            account = pwd.getpwnam(request.user)
            names = {request.user, str(account.pw_uid)}
            users[request.user] = UserIds(
                exists=True, subuid=any(e[0] in names for e in subuids),
                subgid=any(e[0] in names for e in subgids))
        except KeyError:
            users[request.user] = UserIds(exists=False)
    try:
        userns = Path("/proc/sys/kernel/unprivileged_userns_clone").read_text().strip() != "0"
    except OSError:
        userns = True
    docker = "docker" in request.backends
    qemu = "qemu" in request.backends
    podman_url, podman_from = podman_target(None)
    return HostState(
        os_name=release.get("PRETTY_NAME", "an unknown system"),
        apt=bool(like & {"debian", "ubuntu"}) and shutil.which("apt-get") is not None,
        root=os.geteuid() == 0,
        sudo=shutil.which("sudo") is not None,
        systemd=os.path.isdir("/run/systemd/system"),
        host_arch=host_arch(),
        installed=_installed_packages(),
        binfmt_mounted=mounted,
        binfmt_enabled=frozenset(enabled),
        docker_answers=docker and _run_ok(["docker", "info"], timeout=20),
        docker_host=os.environ.get("DOCKER_HOST", ""),
        podman_answers="podman" in request.backends and _run_ok(
            ["podman", "--url", podman_url, "info"], timeout=20),
        podman_url=podman_url,
        podman_from=podman_from,
        runtime_dir_ok=_own_dir(PurePosixPath(podman_url.removeprefix("unix://")).parent.parent),
        user_name=_user_name(),
        libvirt_answers=qemu and _run_ok(VIRSH_PROBE, timeout=15),
        libvirtd_running=qemu and _process_running("libvirtd"),
        virtlogd_running=qemu and _process_running("virtlogd"),
        dev_kvm=os.path.exists("/dev/kvm"),
        kvm_usable=_kvm_usable(),
        users=users,
        subid_ranges=tuple((lo, n) for _, lo, n in subuids + subgids),
        unprivileged_userns=userns,
    )


# --------------------------------------------------------------------------
# Doing


def _wait(argv: Sequence[str], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if _run_ok(argv, timeout=max(1.0, min(15.0, seconds))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)


def execute(steps: Sequence[Step], outer: Sequence[str], say: Callable[[str], None]) -> None:
    """Run the steps in order (through the prefix outer, sudo, unless a step is the user's
    own); the first that fails raises SetupError."""
    for i, step in enumerate(steps, 1):
        say(f"==> [{i}/{len(steps)}] {step.reason}")
        prefix = [] if step.own else list(outer)
        if step.unless and _run_ok([*prefix, *step.unless]):
            say("    already done")
            continue
        say(f"$ {step.shell(prefix)}")
        started = time.monotonic()
        env = {**os.environ, **dict(step.env)}
        argv = [*prefix, *(["env", *(f"{k}={v}" for k, v in step.env)] if step.env and prefix
                           else []), *step.argv]
        if step.background_log:
            with open(step.background_log, "ab") as log:
                subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                 start_new_session=True)
        else:
            sys.stdout.flush()
            code = subprocess.run(argv, env=env, check=False, stdin=subprocess.DEVNULL).returncode
            if code != 0:
                raise SetupError(f"`{step.shell(prefix)}` failed with exit status {code}")
        if step.wait and not _wait([*prefix, *step.wait], step.wait_seconds):
            where = f" (its log: {step.background_log})" if step.background_log else ""
            raise SetupError(f"{' '.join(step.argv)}: `{' '.join(step.wait)}` still fails after "
                             f"{step.wait_seconds:g}s{where}")
        say(f"    {time.monotonic() - started:.1f}s")


def sudo_prefix(state: HostState) -> list[str]:
    return [] if state.root else ["sudo"]


def invocation(args: Sequence[str] = ()) -> str:
    """The exact command line that runs setup with these arguments, for hints (not as
    root, setup runs its commands through sudo by itself)."""
    script = Path(sys.executable).parent / "pytest-isolate"
    on_path = shutil.which("pytest-isolate")
    if script.exists() and (on_path is None or Path(on_path) != script):
        prog = str(script)
    else:
        prog = "pytest-isolate"
    return " ".join([prog, "setup", *map(shlex.quote, args)])
