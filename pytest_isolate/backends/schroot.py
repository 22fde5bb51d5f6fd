"""schroot: a schroot session over the cached root filesystem.

For every started environment the plugin writes a chroot definition
``/etc/schroot/chroot.d/pytest-isolate-<run id>-<env>-<n>`` (``type=directory``
on the cached root filesystem, ``union-type=overlay`` so the session's writes
go to a per-session upper layer and never reach the cache) and a profile of
its own, ``/etc/schroot/<same name>/``, instead of schroot's ``default``
profile, which would bind the host's /home, /tmp and copy its passwd.  The
profile's fstab binds only what the environment needs:

- a /dev made by the plugin (null, zero, full, random, urandom, tty device
  nodes, a private devpts instance and a tmpfs /dev/shm) -- not the host's
  /dev with its disks;
- a read-only sysfs;
- the cached root filesystem read-only at ``/.isolate/lower`` (the pristine
  lower layer of the agent's per-test overlays) and a tmpfs at
  ``/.isolate/ws`` (their scratch space);
- the project rootdir at its own path (read-only unless ``rootdir_writable``)
  and the host's pytest packages read-only at ``/.isolate/site`` (single-file
  modules are copied into a staging directory: fstab cannot bind a file
  because schroot creates every mount point as a directory).

``copyfiles`` is empty (the host's /etc/resolv.conf only when the spec asks
for network) and ``nssdatabases`` is empty: the environment keeps its own
users.

Sessions: ``schroot -b -c NAME -n SESSION`` begins one, the agent runs with
``schroot -r -c SESSION -- env -i ... python3 -u -c BOOTSTRAP`` and the
session is ended with ``schroot -e -c session:SESSION`` when the instance
stops.  Definitions carry a comment naming their owner (pid + process start
time): an atexit hook ends what a run leaves open, and the next run ends the
sessions and removes the definitions of owners that are gone (a run killed by
SIGKILL).

Isolation.  schroot itself only changes the root directory: processes share
the host's network, PID, mount, UTS and IPC namespaces, and the session's
mounts are in the host's mount namespace.  The spec wants no network by
default, so the agent is started under the host's util-linux ``unshare``
(independent of what the root filesystem contains):
``unshare --fork --pid --mount --uts --ipc [--net] --kill-child
--mount-proc=SESSION_ROOT/proc -- schroot -r ...``.  It gets a new network
namespace (only loopback, brought up before schroot runs; left out when the
spec asks for network), its own PID namespace with a /proc that shows only
its processes (mounted over the session root in a private copy of the mount
namespace, so the host never sees it), a private mount namespace (mounts made
by the agent's per-test workers stay in it) and its own hostname
``isolate-<env>``.  If the agent dies, ``--kill-child`` and the PID namespace
take every process in it along.  Per test, the agent's workers add their own
mount + PID namespaces and a fresh overlay, as for every backend.

schroot needs root (it is setuid root for users listed in a definition, but
the plugin must write /etc/schroot/chroot.d): ``needs_root``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from pytest_isolate.agent.bundle import AGENT_DIR
from pytest_isolate.backends.base import (
    SITE,
    START_TIMEOUT,
    HostRootBackend,
    Launch,
    LiveSet,
    agent_command,
    agent_settings,
    layer_mounts,
    need_tool,
    pycache_dir,
    shipped_paths,
    standard_mounts,
)
from pytest_isolate.cache import Entry
from pytest_isolate.channel import AgentProcess
from pytest_isolate.errors import BackendUnavailable, IsolateError
from pytest_isolate.images.envvars import PYCACHE, environment_variables
from pytest_isolate.namespaces import (
    agent_map_request,
    wanted_root_map,
    where_root_is,
)
from pytest_isolate.ownership import Owner
from pytest_isolate.setup_host import HOST_NEEDS
from pytest_isolate.spec import EnvSpec
from pytest_isolate.system import fstab_path, safe_name
from pytest_isolate.system import run_quiet as _run

PREFIX = HostRootBackend.PREFIX
SCHROOT_DIR = Path("/etc/schroot")
CHROOT_D = SCHROOT_DIR / "chroot.d"
OWNER_TAG = "# pytest-isolate owner: "
#: (name, major, minor) of the device nodes in the environment's /dev.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
             ("ptmx", "pts/ptmx"))
#: The fd on which the agent finds the user namespace PRELUDE made for its root.
USERNS_FD = 9
#: Runs on the host's Python inside the new namespaces, before schroot: set the
#: hostname, bring loopback up when the network namespace is new; for a mapped root
#: (argv[3]: the map as JSON, argv[4]: the agent package's directory) make the user namespace and
#: leave it on fd 9 -- schroot chroots, and a chrooted process may join a user namespace
#: (agent.mounts.map_root_here) but not make one; then exec the rest.
PRELUDE = r"""
import fcntl, json, os, socket, struct, sys
socket.sethostname(sys.argv[1])
if sys.argv[2] == "1":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ifr = struct.pack("16sh14x", b"lo", 0)
    flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), 0x8913, ifr))[1]
    fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sh14x", b"lo", flags | 1))
    s.close()
if sys.argv[3] != "-":
    import importlib.util  # mounts.py imports nothing but the standard library
    spec = importlib.util.spec_from_file_location("pytest_isolate_mounts", sys.argv[4] + "/mounts.py")
    mounts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mounts)
    m = json.loads(sys.argv[3])
    try:
        fd = mounts.make_userns(m["uid"], m["gid"])
        os.dup2(fd, @USERNS_FD@)
        os.close(fd)
    except OSError as exc:
        sys.stderr.write("pytest-isolate: no user namespace for the root: %s\n" % exc)
os.execvp(sys.argv[5], sys.argv[5:])
""".replace("@USERNS_FD@", str(USERNS_FD))


def list_sessions() -> list[str]:
    """Names of every open schroot session whose name is one of ours."""
    try:
        proc = _run(["schroot", "--list", "--all-sessions", "--quiet"])
    except (OSError, subprocess.TimeoutExpired):
        return []
    names = []
    for line in proc.stdout.splitlines():
        name = line.strip().split(":", 1)[-1]
        if name.startswith(PREFIX):
            names.append(name)
    return names


def end_session(session: str, log: Path | None = None) -> bool:
    """End a session (forcing it if processes are left); True if it is gone."""
    for extra in ([], ["--force"]):
        try:
            proc = _run(["schroot", "-e", "-c", f"session:{session}", *extra])
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc = subprocess.CompletedProcess([], 1, "", str(exc))
        if log is not None and (proc.stdout or proc.stderr):
            with open(log, "a") as f:
                f.write(f"$ schroot -e -c session:{session} {' '.join(extra)}\n"
                        f"{proc.stdout}{proc.stderr}")
        if proc.returncode == 0:
            return True
    return session not in list_sessions()


def remove_definition(name: str, workdir: str | None) -> None:
    """Remove a chroot definition, its profile and its staging directory."""
    with contextlib.suppress(FileNotFoundError):
        (CHROOT_D / name).unlink()
    shutil.rmtree(SCHROOT_DIR / name, ignore_errors=True)
    if workdir:
        _remove_workdir(Path(workdir))


def _remove_workdir(path: Path) -> None:
    # Never follow into something still mounted (a session that failed to end).
    try:
        mounts = Path("/proc/self/mountinfo").read_text()
    except OSError:
        mounts = ""
    prefix = str(path) + "/"
    if any(line.split()[4].startswith(prefix) for line in mounts.splitlines() if line):
        return
    shutil.rmtree(path, ignore_errors=True)


def read_owner(definition: Path) -> dict[str, Any] | None:
    try:
        with open(definition) as f:
            first = f.readline()
    except OSError:
        return None
    if not first.startswith(OWNER_TAG):
        return None
    try:
        label: dict[str, Any] = json.loads(first[len(OWNER_TAG):])
    except ValueError:
        return None
    return label


def reap() -> list[str]:
    """End the sessions and remove the definitions of runs whose process is gone."""
    reaped = []
    dead: dict[str, dict[str, Any]] = {}
    for definition in sorted(CHROOT_D.glob(PREFIX + "*")):
        label = read_owner(definition)
        owner = Owner.from_label(label)
        if label is not None and owner is not None and not owner.alive():
            dead[definition.name] = label
    sessions = list_sessions()
    for session in sessions:
        chroot = session.rsplit("-s", 1)[0]
        if chroot in dead or not (CHROOT_D / chroot).exists():
            end_session(session)
            reaped.append(session)
    for name, label in dead.items():
        remove_definition(name, label.get("workdir"))
        reaped.append(name)
    return reaped


def end_sessions(sessions: list[str], log: Path | None = None) -> None:
    """End every session in the list (as filled when this runs)."""
    for session in sessions:
        end_session(session, log)


def _end_definition(name: str, held: tuple[list[str], str]) -> None:
    sessions, workdir = held
    end_sessions(sessions)
    remove_definition(name, workdir)


#: The definitions of this run (their sessions and staging directory), ended at exit.
LIVE: LiveSet[tuple[list[str], str]] = LiveSet(_end_definition)


class SchrootBackend(HostRootBackend):
    name = "schroot"
    supports_snapshot = True
    host_needs = HOST_NEEDS["schroot"]

    def check(self, spec: EnvSpec) -> None:
        self.require_root("schroot needs root (the plugin writes its chroot definitions to "
                          f"{CHROOT_D} and starts sessions as root)")
        need_tool(self.name, "schroot", "schroot")
        need_tool(self.name, "unshare", "util-linux")
        if not CHROOT_D.is_dir():
            raise BackendUnavailable(self.name, f"{CHROOT_D} does not exist",
                                     "reinstall schroot: apt-get install --reinstall schroot")
        self.check_rootfs(spec)

    def reap(self) -> list[str]:
        names = reap() + super().reap()
        for name in names:
            self.run.progress(f"schroot: removed {name} left by an interrupted run")
        return names

    # ------------------------------------------------------------ definition
    def _stage(self, workdir: Path) -> tuple[Path, list[tuple[str, str]]]:
        """The /dev and site directories bound into the session; returns the site binds."""
        dev = workdir / "dev"
        dev.mkdir(parents=True)
        for name, major, minor in DEVICES:
            os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(dev / name, 0o666)
        for name, target in DEV_LINKS:
            os.symlink(target, dev / name)
        (dev / "pts").mkdir()
        (dev / "shm").mkdir()
        site = workdir / "site"
        site.mkdir()
        binds = []
        for src, dst in shipped_paths():
            local = site / Path(dst).name
            if os.path.isdir(src):
                local.mkdir()
                binds.append((src, dst))
            else:
                shutil.copy2(src, local)
        return site, binds

    def _write_definition(self, spec: EnvSpec, name: str, rootfs: Path, workdir: Path,
                          pycache: Path) -> None:
        rootdir = str(self.run.rootdir)
        site, site_binds = self._stage(workdir)
        ro_rootdir = "rw" if spec.rootdir_writable else "ro"
        fstab = [
            "# written by pytest-isolate; see pytest_isolate/backends/schroot.py",
            f"{fstab_path(str(workdir / 'dev'))} /dev none rw,bind 0 0",
            "devpts /dev/pts devpts rw,nosuid,noexec,newinstance,ptmxmode=0666,mode=0620 0 0",
            "tmpfs /dev/shm tmpfs rw,nosuid,nodev,mode=1777 0 0",
            "sysfs /sys sysfs ro,nosuid,nodev,noexec 0 0",
            f"{fstab_path(str(rootfs))} /.isolate/lower none ro,bind 0 0",
            "tmpfs /.isolate/ws tmpfs rw,mode=755 0 0",
            f"{fstab_path(rootdir)} {fstab_path(rootdir)} none {ro_rootdir},bind 0 0",
            f"{fstab_path(str(site))} {SITE} none ro,bind 0 0",
            f"{fstab_path(str(pycache))} {PYCACHE} none rw,bind 0 0",
        ]
        fstab += [f"{fstab_path(src)} {fstab_path(dst)} none ro,bind 0 0"
                  for src, dst in [*site_binds, *((m.src, m.dst) for m in layer_mounts(spec))]]
        (workdir / "overlay").mkdir()
        (workdir / "underlay").mkdir()
        profile = SCHROOT_DIR / name
        profile.mkdir()
        (profile / "fstab").write_text("\n".join(fstab) + "\n")
        (profile / "copyfiles").write_text("/etc/resolv.conf\n" if spec.network else "")
        (profile / "nssdatabases").write_text("")
        label = {**Owner.me().label(), "run_id": self.run.run_id, "env": spec.name,
                 "workdir": str(workdir)}
        definition = [
            OWNER_TAG + json.dumps(label),
            f"[{name}]",
            f"description=pytest-isolate environment {spec.name} (run {self.run.run_id})",
            "type=directory",
            f"directory={rootfs}",
            "union-type=overlay",
            f"union-overlay-directory={workdir / 'overlay'}",
            f"union-underlay-directory={workdir / 'underlay'}",
            f"profile={name}",
            "users=root",
            "root-users=root",
            "preserve-environment=false",
        ]
        tmp = CHROOT_D / f".{name}.tmp"
        tmp.write_text("\n".join(definition) + "\n")
        tmp.rename(CHROOT_D / name)

    # ------------------------------------------------------------ start
    def launch(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
               image: Entry) -> Launch:
        name = self.instance_name(spec)
        session = f"{name}-s1"
        workdir = self.run.work_dir / name
        log = self.run.log_path(spec.name, "schroot.log")
        agent_log = self.run.log_path(spec.name, "agent.log")
        rootdir = str(self.run.rootdir)
        sessions: list[str] = []
        # undone in reverse: the live entry, the cgroup (its leftover processes killed),
        # the sessions, then the definition with its staging directory
        workdir.mkdir(parents=True)
        stack.callback(remove_definition, name, str(workdir))
        stack.callback(end_sessions, sessions, log)
        group = self.held_cgroup(stack, spec)
        stack.enter_context(LIVE.holding(name, (sessions, str(workdir))))
        self._write_definition(spec, name, image.data, workdir, pycache_dir(self.run, image))
        sessions.append(session)  # a failed begin can leave a session record behind
        begin = _run(["schroot", "-b", "-c", name, "-n", session], timeout=START_TIMEOUT)
        with open(log, "a") as f:
            f.write(f"$ schroot -b -c {name} -n {session}\n{begin.stdout}{begin.stderr}")
        if begin.returncode != 0:
            raise IsolateError(
                f"schroot could not begin a session of {name} for environment "
                f"{spec.name!r} (status {begin.returncode}): {begin.stderr.strip()}\n"
                f"log: {log}")
        where = _run(["schroot", "--location", "-c", f"session:{session}"])
        location = where.stdout.strip()
        if where.returncode != 0 or not location.startswith("/"):
            raise IsolateError(f"schroot --location of session {session} failed: "
                               f"{where.stderr.strip()}")
        env = environment_variables(spec, pycache=True, system=True)
        mapping = wanted_root_map(spec)
        if mapping is not None:  # the agent maps its root itself (agent.mounts.map_root_here)
            env.update(agent_map_request(mapping, ["/.isolate/lower", rootdir, PYCACHE],
                                         userns_fd=USERNS_FD))
        namespaces = ["--fork", "--pid", "--mount", "--uts", "--ipc", "--kill-child",
                      f"--mount-proc={location}/proc"]
        if not spec.network:
            namespaces.append("--net")
        argv = ["unshare", *namespaces, "--",
                sys.executable, "-I", "-S", "-c", PRELUDE,
                f"isolate-{safe_name(spec.name)}"[:63], "0" if spec.network else "1",
                json.dumps(mapping.cfg()) if mapping else "-", str(AGENT_DIR),
                "schroot", "-r", "-c", session, "-d", "/", "--",
                "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                *agent_command(spec, cwd=rootdir)]
        process = AgentProcess(group.wrap(argv) if group else argv, agent_log,
                               f"environment {spec.name!r}")
        mounts = standard_mounts(self.run, spec, image)  # what the fstab above binds
        return Launch(process, {"agent": agent_log, "schroot": log},
                      agent_settings(self.run, spec, mounts),
                      root=functools.partial(where_root_is, spec, mapping))
