"""lxc: a privileged LXC system container over the cached root filesystem.

One container per started environment, driven by the LXC command-line tools
(``lxc-start`` / ``lxc-attach`` / ``lxc-stop`` / ``lxc-destroy`` from Debian's
``lxc`` package); the agent is ``lxc-attach``'s child, so its stdin/stdout are
the channel.  The plugin writes the container's config itself:

- ``lxc.rootfs.path = overlay:CACHED_ROOTFS:UPPER`` -- the container's root is
  an overlay whose writes go to a per-container directory: the cache is never
  written.  The cached root filesystem is also bound read-only at
  ``/.isolate/lower``: the pristine lower layer of the agent's per-test
  overlays (the container's own root is not pristine: the agent writes to it).
- ``lxc.init.cmd = /bin/sleep infinity``: no systemd or init scripts to boot
  (start costs tens of milliseconds); everything else runs via lxc-attach.
- ``lxc.net.0.type = empty`` (a network namespace with only loopback) unless
  the spec asks for network; then ``none`` (the host's network namespace --
  this host has no bridge to attach a veth to) and the host's resolv.conf.
- The project rootdir at the same absolute path (read-only unless
  ``rootdir_writable``) and the host's pytest packages read-only at
  ``/.isolate/site``, as ``lxc.mount.entry`` binds.

Security settings and why.  The agent must mount (a tmpfs and an overlay per
test, in a new mount + PID namespace), so it needs CAP_SYS_ADMIN and a mount
policy that allows overlay and tmpfs.  The container is privileged (root
inside is root outside: the plugin runs as root anyway), and the config does
not include LXC's ``common.conf``/``default.conf`` (which would also add a
veth on ``lxcbr0``); it applies the same hardening by itself:

- capabilities: ``common.conf``'s drop list (mac_admin mac_override sys_time
  sys_module sys_rawio); CAP_SYS_ADMIN stays.
- seccomp: LXC's ``common.seccomp`` (no kexec, module loading or
  open_by_handle_at) when the file is there; mount/umount/unshare/pivot_root
  stay allowed.
- AppArmor: ``unconfined``.  LXC's generated profile (``lxc-container-default``)
  denies mounting overlay and tmpfs at arbitrary places, which the agent's
  per-test isolation is made of; this host has no AppArmor at all (the setting
  is then a no-op).
- mount propagation: LXC makes every mount in the container shared; the
  agent starts after ``mount --make-rprivate /`` (the container's own mount
  binary), else pivot_root into a worker's fresh root fails with EINVAL and
  workers' mounts would propagate back.  Not needed once the agent's workers
  make their mount namespace private themselves.
- devices: ``lxc.autodev`` gives a fresh minimal /dev (null, zero, full,
  random, urandom, tty, pts; plus a tmpfs /dev/shm); the cgroup device allowlist
  is common.conf's.

Labels and cleanup.  Containers live in a per-run lxcpath
(``RunContext.work_dir/lxc``) and are named ``pytest-isolate-<run id>-<env>-<n>``;
each container directory holds ``pytest-isolate.json`` with the owning
process (pid + start time).  Instance cleanup stops (``lxc-stop -k``) and
destroys (``lxc-destroy``) it; an atexit hook does the same for a run that
exits without reaching it.  A run that was killed leaves labelled containers:
the next run's first ``start()`` reaps every container whose owner is dead
(also those whose run directory was already removed, found through their
``[lxc monitor]`` process).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from pytest_isolate.backends.base import (
    START_TIMEOUT,
    HostRootBackend,
    Launch,
    LiveSet,
    Mount,
    agent_command,
    agent_settings,
    need_tool,
    standard_mounts,
)
from pytest_isolate.cache import Entry
from pytest_isolate.channel import AgentProcess
from pytest_isolate.errors import IsolateError
from pytest_isolate.images.envvars import PYCACHE, environment_variables
from pytest_isolate.limits import Limits, cgroup_v2, cgroup_values, host_cpus
from pytest_isolate.namespaces import (
    agent_map_request,
    wanted_root_map,
    where_root_is,
)
from pytest_isolate.ownership import Owner, run_gone
from pytest_isolate.setup_host import HOST_NEEDS
from pytest_isolate.spec import EnvSpec
from pytest_isolate.system import command_lines, fstab_path, safe_name
from pytest_isolate.system import run_quiet as _run

PREFIX = HostRootBackend.PREFIX
LABEL = "pytest-isolate.json"
SECCOMP_PROFILE = Path("/usr/share/lxc/config/common.seccomp")
CAP_DROP = "mac_admin mac_override sys_time sys_module sys_rawio"
TOOLS = ("lxc-start", "lxc-attach", "lxc-stop", "lxc-destroy", "lxc-info")


def destroy_container(name: str, lxcpath: Path) -> None:
    """Stop (kill) and destroy a container; never raises, leaves nothing behind."""
    cdir = lxcpath / name
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        _run(["lxc-stop", "-k", "-n", name, "-P", str(lxcpath)])
    if (cdir / "config").exists():
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _run(["lxc-destroy", "-n", name, "-P", str(lxcpath)])
    if cdir.exists():
        shutil.rmtree(cdir, ignore_errors=True)


def monitors() -> list[tuple[int, str, str]]:
    """(pid, lxcpath, name) of every running ``[lxc monitor]`` of one of our containers."""
    out = []
    for pid, cmdline in command_lines():
        text = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        if not text.startswith("[lxc monitor] "):
            continue
        parts = text[len("[lxc monitor] "):].rsplit(" ", 1)
        if len(parts) == 2 and parts[1].startswith(PREFIX):
            out.append((pid, parts[0], parts[1]))
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL a monitor's children (the container's init: its PID namespace dies) and it."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError):
            os.kill(int(child), signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def reap(runs_dir: Path) -> list[str]:
    """Stop and destroy containers left by runs whose process is gone; return their names."""
    reaped = []
    for pid, lxcpath, name in monitors():
        label_path = Path(lxcpath) / name / LABEL
        try:
            label = json.loads(label_path.read_text())
        except (OSError, ValueError):
            if Path(lxcpath, name, "config").exists():
                continue  # being created right now, or not ours to judge
            _kill_tree(pid)  # its directory is gone: nothing else can stop it
            reaped.append(name)
            continue
        if owner_gone(label):
            destroy_container(name, Path(lxcpath))
            reaped.append(name)
    for label_path in runs_dir.glob(f"*/work/lxc/{PREFIX}*/{LABEL}"):
        try:
            label = json.loads(label_path.read_text())
        except (OSError, ValueError):
            continue
        if owner_gone(label):
            destroy_container(label_path.parent.name, label_path.parent.parent)
            reaped.append(label_path.parent.name)
    reaped += leftover_cgroups(runs_dir)
    return sorted(set(reaped))


def owner_gone(label: object) -> bool:
    """A container's label names an owner that no longer runs (a label that names none is
    not ours to judge)."""
    owner = Owner.from_label(label)
    return owner is not None and not owner.alive()


def leftover_cgroups(runs_dir: Path) -> list[str]:
    """LXC's cgroups of our containers whose monitor was killed (LXC removes them when a
    container stops; a SIGKILLed monitor cannot): removed once no monitor of that name
    runs and the run (its id starts the name) is gone."""
    from pytest_isolate.limits import CGROUP_ROOT, remove_dirs

    live = {name for _, _, name in monitors()}
    found: list[Path] = []
    with contextlib.suppress(OSError):
        for hierarchy in [CGROUP_ROOT, *CGROUP_ROOT.iterdir()]:
            for path in hierarchy.glob(f"lxc.*.{PREFIX}*"):
                kind, _, name = path.name[len("lxc."):].partition(".")
                if (kind in ("monitor", "payload", "pivot") and name not in live
                        and run_gone(name[len(PREFIX):], runs_dir)):
                    found.append(path)
    return sorted({p.name.split(".", 2)[2] for p in remove_dirs(found, timeout=1.0)})


#: The containers of this run (their lxcpath), destroyed at exit.
LIVE: LiveSet[Path] = LiveSet(destroy_container)


class LxcBackend(HostRootBackend):
    name = "lxc"
    supports_snapshot = True
    host_needs = HOST_NEEDS["lxc"]

    def check(self, spec: EnvSpec) -> None:
        self.require_root("the lxc backend runs privileged containers and needs root")
        for tool in TOOLS:
            need_tool(self.name, tool, "lxc")
        self.check_rootfs(spec)

    @property
    def lxcpath(self) -> Path:
        return self.run.work_dir / "lxc"

    def reap(self) -> list[str]:
        """Destroy what killed runs left behind (once per backend instance)."""
        names = reap(self.run.runs_dir) + super().reap()
        for name in names:
            self.run.progress(f"lxc: removed container {name} left by an interrupted run")
        return names

    def config_text(self, spec: EnvSpec, rootfs: Path, cdir: Path, log: Path,
                    mounts: list[Mount]) -> str:
        lines = [
            "# written by pytest-isolate; see pytest_isolate/backends/lxc.py",
            f"lxc.uts.name = {f'isolate-{safe_name(spec.name)}'[:63]}",
            f"lxc.rootfs.path = overlay:{rootfs}:{cdir / 'delta'}",
            "lxc.init.cmd = /bin/sleep infinity",
            "lxc.autodev = 1",
            "lxc.tty.max = 0",
            "lxc.pty.max = 64",
            "lxc.console.path = none",
            "lxc.mount.auto = proc:mixed sys:ro",
            f"lxc.cap.drop = {CAP_DROP}",
            "lxc.apparmor.profile = unconfined",
            "lxc.cgroup.devices.deny = a",
            "lxc.cgroup.devices.allow = c *:* m",
            "lxc.cgroup.devices.allow = b *:* m",
        ]
        for dev in ("1:3", "1:5", "1:7", "1:8", "1:9", "5:0", "5:1", "5:2", "136:*"):
            lines.append(f"lxc.cgroup.devices.allow = c {dev} rwm")
        lines += limit_lines(spec.limits())
        if SECCOMP_PROFILE.exists():
            lines.append(f"lxc.seccomp.profile = {SECCOMP_PROFILE}")
        lines += [f"lxc.log.file = {log}", "lxc.log.level = NOTICE"]
        if spec.network:
            lines.append("lxc.net.0.type = none")
        else:
            lines.append("lxc.net.0.type = empty")

        def entry(src: str, dst: str, readonly: bool) -> str:
            kind = "dir" if os.path.isdir(src) else "file"
            opts = f"{'ro' if readonly else 'rw'},bind,create={kind}"
            return f"lxc.mount.entry = {fstab_path(src)} {fstab_path(dst.lstrip('/'))} none {opts} 0 0"

        size = f"size={spec.limits().disk}"
        lines.append(f"lxc.mount.entry = tmpfs dev/shm tmpfs rw,nosuid,nodev,mode=1777,{size},"
                     "create=dir 0 0")
        lines.append(entry(str(rootfs), "/.isolate/lower", True))
        lines.append(f"lxc.mount.entry = tmpfs .isolate/ws tmpfs rw,mode=755,{size},create=dir 0 0")
        for m in mounts:
            lines.append(entry(m.src, m.dst, m.readonly))
        if spec.network and os.path.exists("/etc/resolv.conf"):
            lines.append(entry("/etc/resolv.conf", "/etc/resolv.conf", True))
        return "\n".join(lines) + "\n"

    def launch(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
               image: Entry) -> Launch:
        if ":" in str(image.data) or ":" in str(self.lxcpath):
            raise IsolateError(
                f"lxc: the overlay rootfs ({image.data}) and the run directory ({self.lxcpath}) "
                "must not contain ':' (LXC's overlay:LOWER:UPPER syntax); choose another "
                "--isolate-cache-dir")
        mounts = standard_mounts(self.run, spec, image)
        name = self.instance_name(spec)
        lxcpath = self.lxcpath
        cdir = lxcpath / name
        lxc_log = self.run.log_path(spec.name, "lxc.log")
        agent_log = self.run.log_path(spec.name, "agent.log")
        rootdir = str(self.run.rootdir)
        cdir.mkdir(parents=True)
        stack.callback(destroy_container, name, lxcpath)
        stack.enter_context(LIVE.holding(name, lxcpath))
        (cdir / LABEL).write_text(json.dumps(
            {**Owner.me().label(), "run_id": self.run.run_id, "env": spec.name}))
        (cdir / "delta").mkdir()
        (cdir / "config").write_text(self.config_text(spec, image.data, cdir, lxc_log, mounts))
        proc = _run(["lxc-start", "-n", name, "-P", str(lxcpath), "-d",
                     "-o", str(lxc_log), "-l", "NOTICE"], timeout=START_TIMEOUT)
        if proc.returncode != 0:
            raise IsolateError(
                f"lxc-start of {name} for environment {spec.name!r} failed "
                f"(status {proc.returncode}): {(proc.stderr or proc.stdout).strip()}\n"
                f"lxc log: {lxc_log}")
        env = environment_variables(spec, pycache=True, system=True)
        mapping = wanted_root_map(spec)
        if mapping is not None:  # the agent maps its root itself (agent.map_root_here)
            env.update(agent_map_request(mapping, ["/.isolate/lower", rootdir, PYCACHE]))
        argv = ["lxc-attach", "-n", name, "-P", str(lxcpath), "--clear-env",
                "-o", str(lxc_log), "-l", "WARN", "--",
                "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                *agent_command(spec, cwd=rootdir)]
        process = AgentProcess(argv, agent_log, f"environment {spec.name!r}")
        return Launch(process, {"agent": agent_log, "lxc": lxc_log},
                      agent_settings(self.run, spec, mounts),
                      root=functools.partial(where_root_is, spec, mapping))


def limit_lines(limits: Limits) -> list[str]:
    """The spec's memory, cpus and pids as lxc.cgroup.* (v1) or lxc.cgroup2.* keys."""
    v2 = cgroup_v2()
    cpus = host_cpus(limits.cpu_count() or 1) if limits.cpus else None
    prefix = "lxc.cgroup2." if v2 else "lxc.cgroup."
    return [f"{prefix}{key} = {value}" for key, value in cgroup_values(limits, v2, cpus).items()]
