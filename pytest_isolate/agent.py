"""The agent: the one file of pytest-isolate that runs inside an environment.

Standard library only, Python 3.9+.  The host sends this file as source over
the environment's stdin (see ``BOOTSTRAP``); from then on fds 0/1 carry frames::

    frame := MAGIC(2) channel(u32) json_len(u32) blob_len(u32) json blob

Channel 0 is the agent itself.  Every *worker* -- a forked child with a fresh
copy-on-write root and a PID namespace of its own -- gets a channel chosen by
the host.  The agent relays whole frames between the host and its workers, so
a worker that dies mid-write can never corrupt the host's stream, and a worker
that outlives its deadline is killed together with everything it started.

The same file is the host-side launcher of namespace backends
(``python3 -I -S agent.py launch CONFIG_JSON``): the namespace and mount code
is needed on both sides of the boundary, and keeping it here keeps it stdlib
only.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import io
import json
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

MAGIC = b"PI"
HEADER = struct.Struct(">2sIII")
MAX_JSON = 64 << 20
MAX_BLOB = 1 << 30
PROTOCOL_VERSION = 1
MIN_PYTHON = (3, 9)

#: What the host runs inside an environment: read the agent's source from fd 0 (exact
#: byte counts: a buffered reader would swallow the first frames), then run it.
BOOTSTRAP = (
    "import os\n"
    "def r(n):\n"
    " d=os.read(0,n)\n"
    " if not d:raise SystemExit('pytest-isolate: no agent source on stdin')\n"
    " return d\n"
    "h=b''\n"
    "while h[-1:]!=b'\\n':h+=r(1)\n"
    "n=int(h);s=b''\n"
    "while len(s)<n:s+=r(n-len(s))\n"
    "g={'__name__':'pytest_isolate_agent'}\n"
    "exec(compile(s,'pytest_isolate/agent.py','exec'),g)\n"
    "g['main']()\n"
)

Frame = Tuple[int, Dict[str, Any], bytes]


class ProtocolError(Exception):
    """A frame that is malformed or larger than allowed; the stream is unusable."""


def encode_frame(ch: int, obj: Dict[str, Any], blob: bytes = b"") -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, ch, len(data), len(blob)) + data + blob


class FrameDecoder:
    """Incremental frame parser; rejects bad magic, oversized frames, non-object JSON."""

    def __init__(self, max_json: int = MAX_JSON, max_blob: int = MAX_BLOB) -> None:
        self._buf = bytearray()
        self.max_json = max_json
        self.max_blob = max_blob
        self._error: Optional[ProtocolError] = None

    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> List[Frame]:
        """The complete frames in the stream so far.  Bad bytes raise ProtocolError, but
        only after the good frames before them were returned (on the next call)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: List[Frame] = []
        while len(self._buf) >= HEADER.size:
            try:
                frame = self._next()
            except ProtocolError as exc:
                if not frames:
                    raise
                self._error = exc
                break
            if frame is None:
                break
            frames.append(frame)
        return frames

    def _next(self) -> Optional[Frame]:
        magic, ch, jlen, blen = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise ProtocolError("bad frame magic %r" % bytes(magic))
        if jlen > self.max_json or blen > self.max_blob:
            raise ProtocolError(
                "oversized frame (json %d bytes, blob %d bytes; limits %d, %d)"
                % (jlen, blen, self.max_json, self.max_blob)
            )
        end = HEADER.size + jlen + blen
        if len(self._buf) < end:
            return None
        try:
            obj = json.loads(bytes(self._buf[HEADER.size : HEADER.size + jlen]))
        except ValueError as exc:
            raise ProtocolError("malformed JSON in frame: %s" % exc) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
            raise ProtocolError("frame is not an object with an 'op'")
        blob = bytes(self._buf[HEADER.size + jlen : end])
        del self._buf[:end]
        return (ch, obj, blob)


def drain(fd: int) -> None:
    """Read a non-blocking wake-up pipe empty (signal.set_wakeup_fd's)."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


# --------------------------------------------------------------------------
# Namespaces and mounts (ctypes: os.unshare only exists from Python 3.12)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_MOVE = 8192
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SYS_PIVOT_ROOT = {
    "x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41, "loongarch64": 41,
    "armv7l": 218, "armv6l": 218, "i686": 217, "i386": 217, "ppc64le": 203,
    "ppc64": 203, "s390x": 217, "mips64": 5151,
}

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def unshare(flags: int) -> None:
    _check(libc().unshare(flags), "unshare(0x%x)" % flags)


def mount(src: Optional[str], target: str, fstype: Optional[str], flags: int = 0,
          data: Optional[str] = None) -> None:
    def enc(s: Optional[str]) -> Optional[bytes]:
        return None if s is None else s.encode()

    _check(
        libc().mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        "mount %s on %s (%s)" % (src, target, fstype),
    )


def umount(target: str, flags: int = 0) -> None:
    _check(libc().umount2(target.encode(), flags), "umount %s" % target)


def pivot_root(new_root: str, allow_move: bool = False) -> None:
    """Make new_root the root and detach the old one (new_root must be a mount point).

    With allow_move (workers inside an environment), where pivot_root(2) is refused
    (EPERM: a seccomp filter such as docker's default profile), move new_root onto /
    and chroot into it, as switch_root does.  The launcher, which guards the host
    boundary, never falls back: a chroot alone can be escaped.
    """
    nr = SYS_PIVOT_ROOT.get(platform.machine())
    os.chdir(new_root)
    if nr is not None:
        if libc().syscall(nr, b".", b".") == 0:
            umount(".", MNT_DETACH)
            os.chdir("/")
            return
        err = ctypes.get_errno()
        if err != errno.EPERM or not allow_move:
            raise OSError(err, "pivot_root %s: %s" % (new_root, os.strerror(err)))
    elif not allow_move:
        raise OSError(errno.ENOSYS, "pivot_root: unknown syscall number on " + platform.machine())
    mount(".", "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    libc().prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def loopback_up() -> None:
    """Bring 'lo' up in a fresh network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    import fcntl

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifr = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), 0x8913, ifr))[1]
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sh14x", b"lo", flags | 1))
    finally:
        s.close()


_ST_TO_MS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC))


def mount_point(src: str, dst: str) -> None:
    """Make dst what src can be mounted on: a directory, or an empty file for a file."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            open(dst, "a").close()


def bind(src: str, dst: str, readonly: bool = False) -> None:
    """Recursive bind mount; read-only remount keeps the flags a user namespace locks."""
    mount_point(src, dst)
    mount(src, dst, None, MS_BIND | MS_REC)
    if readonly:
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        st = os.statvfs(dst).f_flag
        for st_bit, ms_bit in _ST_TO_MS[1:]:
            if st & st_bit:
                flags |= ms_bit
        mount(None, dst, None, flags)


DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def size_opt(size: Optional[int]) -> str:
    """tmpfs mount options bounding it to size bytes (unbounded: half of RAM)."""
    return ",size=%d" % size if size else ""


def populate_root(root: str, binds: Sequence[Sequence[Any]], dev_from: str,
                  fresh_dev: bool, size: Optional[int] = None, tmp: bool = True,
                  userns_fd: Optional[int] = None,
                  owner: Optional[Tuple[int, int]] = None) -> None:
    """Mount /proc, /dev, /sys, /tmp and the bind mounts into a new root.

    size bounds the tmpfs mounts (/tmp, /dev/shm); tmp=False leaves /tmp in the root's
    own writable layer (a worker's: one budget for both, and part of its snapshots).
    The launcher of a mapped root (make_userns) passes its namespace (the binds are
    idmapped through it) and the host uid of its root (owner of the tmpfs mounts).
    """
    proc = os.path.join(root, "proc")
    os.makedirs(proc, exist_ok=True)
    try:
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as exc:
        # a zygote under a mapped root: its PID namespace belongs to the host's root, so
        # only the launcher could mount its /proc -- which is the one it has, unless that
        # one shows another PID namespace (then it would be wrong: say so)
        if exc.errno != errno.EPERM or os.readlink("/proc/self") != str(os.getpid()):
            raise
        bind("/proc", proc)
    tmpfs_owner = ",uid=%d,gid=%d" % owner if owner is not None else ""
    dev = os.path.join(root, "dev")
    os.makedirs(dev, exist_ok=True)
    if fresh_dev:
        mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755" + tmpfs_owner)
        for name in DEVICES:
            src = os.path.join(dev_from, name)
            if os.path.exists(src):
                bind(src, os.path.join(dev, name))
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                             ("ptmx", "pts/ptmx")):
            os.symlink(target, os.path.join(dev, name))
        os.makedirs(os.path.join(dev, "pts"))
        try:
            mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
                  "newinstance,ptmxmode=0666,mode=620")
        except OSError:
            pass
        os.makedirs(os.path.join(dev, "shm"))
        mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV,
              "mode=1777" + size_opt(size) + tmpfs_owner)
    else:
        mount(dev_from, dev, None, MS_BIND | MS_REC)
        shm = os.path.join(dev, "shm")
        if os.path.isdir(shm):  # its own, not the environment's shared one
            mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV,
                  "mode=1777" + size_opt(size) + tmpfs_owner)
    sys_dir = os.path.join(root, "sys")
    if os.path.isdir(sys_dir):
        try:
            mount("sysfs", sys_dir, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            try:
                bind("/sys", sys_dir, readonly=True)
            except OSError:
                pass
    if tmp:
        tmp_dir = os.path.join(root, "tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        mount("tmpfs", tmp_dir, "tmpfs", MS_NOSUID | MS_NODEV,
              "mode=1777" + size_opt(size) + tmpfs_owner)
    for src, dst, readonly in binds:
        if userns_fd is not None:
            idmapped_bind(src, root + dst, userns_fd, bool(readonly))
        else:
            bind(src, root + dst, bool(readonly))


def overlay(root: str, lowers: Sequence[str], upper: str, work: str) -> None:
    for d in (root, upper, work):
        os.makedirs(d, exist_ok=True)
    mount("overlay", root, "overlay", 0,
          "lowerdir=%s,upperdir=%s,workdir=%s" % (":".join(lowers), upper, work))


# --------------------------------------------------------------------------
# Root mapped away from the host's root (issue 11): the environment's uid 0 is an
# unprivileged host uid (a user namespace), and its root filesystem, owned by the host's
# root on disk, is seen through an idmapped mount, so that uid owns it inside.

#: open_tree, move_mount and mount_setattr share these numbers on every architecture
#: but alpha and mips (kernel >= 5.12 for idmapped mounts)
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 4
MOUNT_ATTR_RDONLY = 1
MOUNT_ATTR_IDMAP = 0x00100000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(nr: int, *args: Any) -> int:
    """A raw syscall with every integer passed as a C long (the kernel reads longs)."""
    if platform.machine().startswith(("alpha", "mips")):
        raise OSError(errno.ENOSYS, "no syscall numbers for the new mount API on "
                      + platform.machine())
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ret = int(libc().syscall(ctypes.c_long(nr), *conv))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def make_userns(uid_map: Sequence[int], gid_map: Sequence[int]) -> int:
    """A new user namespace mapping 0..count-1 inside to base..base+count-1 on the host
    ([base, count] for uids and gids); returns an fd that holds it.  Root only: a helper
    child makes the namespace, this process (root outside it) writes its maps."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            unshare(CLONE_NEWUSER)
            # its pid as /proc shows it: /proc may belong to another PID namespace than
            # ours (schroot's prelude runs under unshare --pid with the host's /proc)
            os.write(ready_w, os.readlink("/proc/self").encode())
            os.read(done_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        shown = os.read(ready_r, 32).decode()
        if not shown.isdigit():
            raise OSError(errno.EPERM, "the helper could not make a user namespace")
        for name, (base, count) in (("uid_map", uid_map), ("gid_map", gid_map)):
            with open("/proc/%s/%s" % (shown, name), "w") as f:
                f.write("0 %d %d\n" % (base, count))
        return os.open("/proc/%s/ns/user" % shown, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def idmapped_tree(src: str, userns_fd: int, readonly: bool = False,
                  recursive: bool = True) -> int:
    """A detached copy of the mount tree at src (or of its mount alone) whose files are seen
    through userns_fd's mapping (a file the host's uid 0 owns is owned by that namespace's
    root)."""
    rec = AT_RECURSIVE if recursive else 0
    fd = _syscall(SYS_OPEN_TREE, AT_FDCWD, src.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC | rec)
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if readonly else 0), 0, 0,
                          userns_fd)
        _syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | rec,
                 ctypes.byref(attr), ctypes.sizeof(attr))
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, "idmapped mount of %s: %s" % (src, exc.strerror)) from None
    return fd


def attach_tree(fd: int, dst: str) -> None:
    """Mount a detached tree (idmapped_tree) at dst, which must exist."""
    try:
        _syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, dst.encode(), MOVE_MOUNT_F_EMPTY_PATH)
    except OSError as exc:
        raise OSError(exc.errno, "move_mount onto %s: %s" % (dst, exc.strerror)) from None
    finally:
        os.close(fd)


def idmapped_bind(src: str, dst: str, userns_fd: int, readonly: bool = False) -> None:
    """bind(), seen through userns_fd's mapping; a plain bind where the filesystem has no
    idmapped mounts (the files then show as nobody's inside: read-only use still works)."""
    try:
        fd = idmapped_tree(src, userns_fd, readonly)
    except OSError:
        try:  # a mount below src that cannot be idmapped (an overlay): src alone
            fd = idmapped_tree(src, userns_fd, readonly, recursive=False)
        except OSError:
            bind(src, dst, readonly)
            return
    mount_point(src, dst)
    attach_tree(fd, dst)


def hand_over(root: str, upper: str, owner: Tuple[int, int]) -> None:
    """What the launcher created in root's upper layer (as the host's root: mount points,
    /.isolate) goes to the mapped root (owner), through the overlay so that it sees the
    change; mount points stay as they are (what is mounted there decides)."""
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_uid != 0 and st.st_gid != 0:
                continue
            merged = root + path[len(upper):]
            if not os.path.lexists(merged) or os.path.ismount(merged):
                continue  # a whiteout (nothing there), or what is mounted there decides
            os.lchown(merged, owner[0] if st.st_uid == 0 else -1,
                      owner[1] if st.st_gid == 0 else -1)
    os.chown(root, *owner)


def enter_userns(userns_fd: int) -> None:
    """Join the mapped user namespace as its root (the host's uid becomes its base)."""
    _check(libc().setns(userns_fd, CLONE_NEWUSER), "setns(user namespace)")
    os.close(userns_fd)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


#: what the launcher tells the agent when it could not map root (taken at the agent's start)
ROOT_MAP_ENV = "PYTEST_ISOLATE_ROOT_MAP_PROBLEM"
#: a backend whose launcher cannot map root (schroot's chroot, a privileged LXC container:
#: the agent starts as the host's root) asks the agent to (map_root_here), as JSON
MAP_ROOT_ENV = "PYTEST_ISOLATE_MAP_ROOT"
#: why the environment's root is the host's although it was asked not to be ("": it is not)
ROOT_MAP_PROBLEM = ""


def map_root_here(cfg: Dict[str, Any]) -> None:
    """Become the root of a user namespace mapped to cfg's host range (cfg as launch()'s
    "userns", plus "idmap": paths), from the host's root inside an environment whose root
    file system is already mounted (by schroot, LXC).  Each path in cfg["idmap"] -- the
    pristine root at /.isolate/lower that every test's root is laid over, the project, the
    bytecode cache -- is mounted again over itself, idmapped, so what the host's root owns
    there is this root's; the rest of the environment's own root shows as nobody's (read
    and run only: tests never write it, their roots are overlays over /.isolate/lower).
    The new mounts stay in the environment's mount namespace.  cfg["userns_fd"]: the
    namespace is open on that fd already (a chrooted process cannot make one).  Raises
    OSError."""
    cwd = os.getcwd()
    # what needs the host's root over this environment's namespaces, done while it is:
    # loopback up (an LXC container without network has it down), a sysfs of this network
    # namespace (schroot's shows the host's interfaces), which the workers bind
    try:
        loopback_up()
    except OSError:
        pass
    if os.path.isdir("/sys"):
        try:
            mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass
    # and a /proc without mounts below it: a mapped root may mount a /proc of its own (a
    # worker's new PID namespace) only where one is fully visible, and LXC's has
    # read-only binds over /proc/sys and the like (the workers mask and protect their own)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if "userns_fd" in cfg:  # made before a chroot (schroot): joined here
        fd = cfg["userns_fd"]
        try:
            os.fstat(fd)
        except OSError:
            raise OSError(errno.EBADF, "no user namespace was made before the chroot (the "
                          "agent log says why)") from None
    else:
        fd = make_userns(cfg["uid"], cfg["gid"])
    try:
        for path in cfg.get("idmap", []):
            if os.path.isdir(path):
                attach_tree(idmapped_tree(path, fd, recursive=False), path)
    except BaseException:
        os.close(fd)
        raise
    enter_userns(fd)
    # a mount namespace this root owns: the agent and its workers mount in it
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    os.chdir(cwd)  # the project as mounted now (idmapped), not the mount below it


def probe_root_map(path: str, uid_map: Sequence[int], gid_map: Sequence[int]) -> None:
    """Can a root filesystem at path be run with a mapped root here?  Raises OSError
    with the reason (agent.py probe-root-map, for `pytest-isolate doctor`; a start does
    not probe: the launcher tries, and falls back with the reason)."""
    fd = make_userns(uid_map, gid_map)
    try:
        os.close(idmapped_tree(path, fd, readonly=True, recursive=False))
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Hardening (issue 11): a test in a container backend gets at most what root has in a
# default Docker container.  Applied in a worker after every mount of its root is made
# (protect_paths while the root is built, harden_process once the process is in it).

#: Docker's default capabilities (moby oci/caps): CHOWN DAC_OVERRIDE FOWNER FSETID KILL
#: SETGID SETUID SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP
DEFAULT_CAPS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31)
CAP_SYS_ADMIN = 21
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: runc's defaults: paths masked (an empty read-only tmpfs or /dev/null over them) and
#: paths made read-only in a fresh /proc and /sys
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
                  "/sys")

#: Docker's default seccomp profile (moby profiles/seccomp/default.json) for a container
#: with the default capabilities: the syscalls allowed whatever their arguments.  socket,
#: personality, clone and clone3 are judged by argument (SECCOMP_SPECIAL).
def _words(text: str) -> Tuple[str, ...]:
    return tuple(text.split())


SECCOMP_ALLOW = _words(
    "accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown "
    "clock_adjtime clock_getres clock_gettime clock_nanosleep close close_range connect "
    "copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old "
    "epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit "
    "exit_group faccessat faccessat2 fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat "
    "fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr "
    "fstat fstatfs fsync ftruncate futex futex_waitv futimesat getcpu getcwd getdents "
    "getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp getpid "
    "getppid getpriority getrandom getresgid getresuid getrlimit get_robust_list getrusage "
    "getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getxattr "
    "inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy "
    "io_getevents io_pgetevents ioprio_get ioprio_set io_setup io_submit io_uring_enter "
    "io_uring_register io_uring_setup kill landlock_add_rule landlock_create_ruleset "
    "landlock_restrict_self lchown lgetxattr link linkat listen listxattr llistxattr "
    "lremovexattr lseek lsetxattr lstat madvise membarrier memfd_create memfd_secret mincore "
    "mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mprotect mq_getsetattr mq_notify "
    "mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget msgrcv msgsnd msync "
    "munlock munlockall munmap name_to_handle_at nanosleep newfstatat open openat openat2 "
    "pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll "
    "ppoll prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6 pwrite64 pwritev "
    "pwritev2 read readahead readlink readlinkat readv recvfrom recvmmsg recvmsg "
    "remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq "
    "rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend "
    "rt_sigtimedwait rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam "
    "sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval "
    "sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp "
    "select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto setfsgid setfsuid "
    "setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid setreuid "
    "setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid "
    "setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 socketpair "
    "splice stat statfs statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill "
    "time timer_create timer_delete timer_getoverrun timer_gettime timer_settime "
    "timerfd_create timerfd_gettime timerfd_settime times tkill truncate umask uname unlink "
    "unlinkat utime utimensat utimes vfork vmsplice wait4 waitid write writev "
    # kernel >= 4.8 (Docker allows them there), CAP_SYS_CHROOT, amd64 only
    "process_vm_readv process_vm_writev ptrace chroot arch_prctl modify_ldt"
)
#: What a zygote keeps on top (CAP_SYS_ADMIN: it builds each test worker's root)
SECCOMP_ADMIN = _words("bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie "
                 "mount mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd "
                 "setdomainname sethostname setns syslog umount2 unshare pivot_root")
SECCOMP_SPECIAL = ("socket", "personality", "clone", "clone3")
#: personality(2) values Docker allows: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE (both), query
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
AF_VSOCK = 40
#: clone flags that make namespaces (CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET)
CLONE_NAMESPACES = 0x7E020000
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
BPF_LD_W_ABS = 0x20
BPF_JEQ = 0x15
BPF_JGT = 0x25
BPF_JGE = 0x35
BPF_JSET = 0x45
BPF_AND = 0x54
BPF_RET = 0x06
#: offsets in struct seccomp_data (little-endian: an argument's low word comes first)
SECCOMP_NR, SECCOMP_ARCH, SECCOMP_ARG0 = 0, 4, 16
SYSCALL_NUMBERS = {
    "x86_64": (
        "read=0 write=1 open=2 close=3 stat=4 fstat=5 lstat=6 poll=7 lseek=8 mmap=9 mprotect=10 "
        "munmap=11 brk=12 rt_sigaction=13 rt_sigprocmask=14 rt_sigreturn=15 ioctl=16 pread64=17 "
        "pwrite64=18 readv=19 writev=20 access=21 pipe=22 select=23 sched_yield=24 mremap=25 "
        "msync=26 mincore=27 madvise=28 shmget=29 shmat=30 shmctl=31 dup=32 dup2=33 pause=34 "
        "nanosleep=35 getitimer=36 alarm=37 setitimer=38 getpid=39 sendfile=40 socket=41 "
        "connect=42 accept=43 sendto=44 recvfrom=45 sendmsg=46 recvmsg=47 shutdown=48 bind=49 "
        "listen=50 getsockname=51 getpeername=52 socketpair=53 setsockopt=54 getsockopt=55 "
        "clone=56 fork=57 vfork=58 execve=59 exit=60 wait4=61 kill=62 uname=63 semget=64 "
        "semop=65 semctl=66 shmdt=67 msgget=68 msgsnd=69 msgrcv=70 msgctl=71 fcntl=72 flock=73 "
        "fsync=74 fdatasync=75 truncate=76 ftruncate=77 getdents=78 getcwd=79 chdir=80 "
        "fchdir=81 rename=82 mkdir=83 rmdir=84 creat=85 link=86 unlink=87 symlink=88 "
        "readlink=89 chmod=90 fchmod=91 chown=92 fchown=93 lchown=94 umask=95 gettimeofday=96 "
        "getrlimit=97 getrusage=98 sysinfo=99 times=100 ptrace=101 getuid=102 syslog=103 "
        "getgid=104 setuid=105 setgid=106 geteuid=107 getegid=108 setpgid=109 getppid=110 "
        "getpgrp=111 setsid=112 setreuid=113 setregid=114 getgroups=115 setgroups=116 "
        "setresuid=117 getresuid=118 setresgid=119 getresgid=120 getpgid=121 setfsuid=122 "
        "setfsgid=123 getsid=124 capget=125 capset=126 rt_sigpending=127 rt_sigtimedwait=128 "
        "rt_sigqueueinfo=129 rt_sigsuspend=130 sigaltstack=131 utime=132 mknod=133 "
        "personality=135 statfs=137 fstatfs=138 getpriority=140 setpriority=141 "
        "sched_setparam=142 sched_getparam=143 sched_setscheduler=144 sched_getscheduler=145 "
        "sched_get_priority_max=146 sched_get_priority_min=147 sched_rr_get_interval=148 "
        "mlock=149 munlock=150 mlockall=151 munlockall=152 modify_ldt=154 pivot_root=155 "
        "prctl=157 arch_prctl=158 adjtimex=159 setrlimit=160 chroot=161 sync=162 acct=163 "
        "settimeofday=164 mount=165 umount2=166 swapon=167 reboot=169 sethostname=170 "
        "setdomainname=171 iopl=172 ioperm=173 init_module=175 delete_module=176 quotactl=179 "
        "gettid=186 readahead=187 setxattr=188 lsetxattr=189 fsetxattr=190 getxattr=191 "
        "lgetxattr=192 fgetxattr=193 listxattr=194 llistxattr=195 flistxattr=196 "
        "removexattr=197 lremovexattr=198 fremovexattr=199 tkill=200 time=201 futex=202 "
        "sched_setaffinity=203 sched_getaffinity=204 set_thread_area=205 io_setup=206 "
        "io_destroy=207 io_getevents=208 io_submit=209 io_cancel=210 get_thread_area=211 "
        "lookup_dcookie=212 epoll_create=213 epoll_ctl_old=214 epoll_wait_old=215 "
        "remap_file_pages=216 getdents64=217 set_tid_address=218 restart_syscall=219 "
        "semtimedop=220 fadvise64=221 timer_create=222 timer_settime=223 timer_gettime=224 "
        "timer_getoverrun=225 timer_delete=226 clock_settime=227 clock_gettime=228 "
        "clock_getres=229 clock_nanosleep=230 exit_group=231 epoll_wait=232 epoll_ctl=233 "
        "tgkill=234 utimes=235 mq_open=240 mq_unlink=241 mq_timedsend=242 mq_timedreceive=243 "
        "mq_notify=244 mq_getsetattr=245 kexec_load=246 waitid=247 add_key=248 request_key=249 "
        "keyctl=250 ioprio_set=251 ioprio_get=252 inotify_init=253 inotify_add_watch=254 "
        "inotify_rm_watch=255 openat=257 mkdirat=258 mknodat=259 fchownat=260 futimesat=261 "
        "newfstatat=262 unlinkat=263 renameat=264 linkat=265 symlinkat=266 readlinkat=267 "
        "fchmodat=268 faccessat=269 pselect6=270 ppoll=271 unshare=272 set_robust_list=273 "
        "get_robust_list=274 splice=275 tee=276 sync_file_range=277 vmsplice=278 utimensat=280 "
        "epoll_pwait=281 signalfd=282 timerfd_create=283 eventfd=284 fallocate=285 "
        "timerfd_settime=286 timerfd_gettime=287 accept4=288 signalfd4=289 eventfd2=290 "
        "epoll_create1=291 dup3=292 pipe2=293 inotify_init1=294 preadv=295 pwritev=296 "
        "rt_tgsigqueueinfo=297 perf_event_open=298 recvmmsg=299 fanotify_init=300 "
        "fanotify_mark=301 prlimit64=302 name_to_handle_at=303 clock_adjtime=305 syncfs=306 "
        "sendmmsg=307 setns=308 getcpu=309 process_vm_readv=310 process_vm_writev=311 "
        "finit_module=313 sched_setattr=314 sched_getattr=315 renameat2=316 seccomp=317 "
        "getrandom=318 memfd_create=319 bpf=321 execveat=322 membarrier=324 mlock2=325 "
        "copy_file_range=326 preadv2=327 pwritev2=328 pkey_mprotect=329 pkey_alloc=330 "
        "pkey_free=331 statx=332 io_pgetevents=333 rseq=334 pidfd_send_signal=424 "
        "io_uring_setup=425 io_uring_enter=426 io_uring_register=427 open_tree=428 "
        "move_mount=429 fsopen=430 fsconfig=431 fsmount=432 fspick=433 pidfd_open=434 "
        "clone3=435 close_range=436 openat2=437 faccessat2=439 epoll_pwait2=441 "
        "mount_setattr=442 quotactl_fd=443 landlock_create_ruleset=444 landlock_add_rule=445 "
        "landlock_restrict_self=446 memfd_secret=447 process_mrelease=448 futex_waitv=449 "
    ),
    "aarch64": (
        "io_setup=0 io_destroy=1 io_submit=2 io_cancel=3 io_getevents=4 setxattr=5 lsetxattr=6 "
        "fsetxattr=7 getxattr=8 lgetxattr=9 fgetxattr=10 listxattr=11 llistxattr=12 "
        "flistxattr=13 removexattr=14 lremovexattr=15 fremovexattr=16 getcwd=17 "
        "lookup_dcookie=18 eventfd2=19 epoll_create1=20 epoll_ctl=21 epoll_pwait=22 dup=23 "
        "dup3=24 fcntl=25 inotify_init1=26 inotify_add_watch=27 inotify_rm_watch=28 ioctl=29 "
        "ioprio_set=30 ioprio_get=31 flock=32 mknodat=33 mkdirat=34 unlinkat=35 symlinkat=36 "
        "linkat=37 renameat=38 umount2=39 mount=40 pivot_root=41 statfs=43 fstatfs=44 "
        "truncate=45 ftruncate=46 fallocate=47 faccessat=48 chdir=49 fchdir=50 chroot=51 "
        "fchmod=52 fchmodat=53 fchownat=54 fchown=55 openat=56 close=57 pipe2=59 quotactl=60 "
        "getdents64=61 lseek=62 read=63 write=64 readv=65 writev=66 pread64=67 pwrite64=68 "
        "preadv=69 pwritev=70 sendfile=71 pselect6=72 ppoll=73 signalfd4=74 vmsplice=75 "
        "splice=76 tee=77 readlinkat=78 newfstatat=79 fstat=80 sync=81 fsync=82 fdatasync=83 "
        "sync_file_range=84 timerfd_create=85 timerfd_settime=86 timerfd_gettime=87 "
        "utimensat=88 acct=89 capget=90 capset=91 personality=92 exit=93 exit_group=94 "
        "waitid=95 set_tid_address=96 unshare=97 futex=98 set_robust_list=99 "
        "get_robust_list=100 nanosleep=101 getitimer=102 setitimer=103 kexec_load=104 "
        "init_module=105 delete_module=106 timer_create=107 timer_gettime=108 "
        "timer_getoverrun=109 timer_settime=110 timer_delete=111 clock_settime=112 "
        "clock_gettime=113 clock_getres=114 clock_nanosleep=115 syslog=116 ptrace=117 "
        "sched_setparam=118 sched_setscheduler=119 sched_getscheduler=120 sched_getparam=121 "
        "sched_setaffinity=122 sched_getaffinity=123 sched_yield=124 sched_get_priority_max=125 "
        "sched_get_priority_min=126 sched_rr_get_interval=127 restart_syscall=128 kill=129 "
        "tkill=130 tgkill=131 sigaltstack=132 rt_sigsuspend=133 rt_sigaction=134 "
        "rt_sigprocmask=135 rt_sigpending=136 rt_sigtimedwait=137 rt_sigqueueinfo=138 "
        "rt_sigreturn=139 setpriority=140 getpriority=141 reboot=142 setregid=143 setgid=144 "
        "setreuid=145 setuid=146 setresuid=147 getresuid=148 setresgid=149 getresgid=150 "
        "setfsuid=151 setfsgid=152 times=153 setpgid=154 getpgid=155 getsid=156 setsid=157 "
        "getgroups=158 setgroups=159 uname=160 sethostname=161 setdomainname=162 getrlimit=163 "
        "setrlimit=164 getrusage=165 umask=166 prctl=167 getcpu=168 gettimeofday=169 "
        "settimeofday=170 adjtimex=171 getpid=172 getppid=173 getuid=174 geteuid=175 getgid=176 "
        "getegid=177 gettid=178 sysinfo=179 mq_open=180 mq_unlink=181 mq_timedsend=182 "
        "mq_timedreceive=183 mq_notify=184 mq_getsetattr=185 msgget=186 msgctl=187 msgrcv=188 "
        "msgsnd=189 semget=190 semctl=191 semtimedop=192 semop=193 shmget=194 shmctl=195 "
        "shmat=196 shmdt=197 socket=198 socketpair=199 bind=200 listen=201 accept=202 "
        "connect=203 getsockname=204 getpeername=205 sendto=206 recvfrom=207 setsockopt=208 "
        "getsockopt=209 shutdown=210 sendmsg=211 recvmsg=212 readahead=213 brk=214 munmap=215 "
        "mremap=216 add_key=217 request_key=218 keyctl=219 clone=220 execve=221 mmap=222 "
        "fadvise64=223 swapon=224 mprotect=226 msync=227 mlock=228 munlock=229 mlockall=230 "
        "munlockall=231 mincore=232 madvise=233 remap_file_pages=234 rt_tgsigqueueinfo=240 "
        "perf_event_open=241 accept4=242 recvmmsg=243 wait4=260 prlimit64=261 fanotify_init=262 "
        "fanotify_mark=263 name_to_handle_at=264 clock_adjtime=266 syncfs=267 setns=268 "
        "sendmmsg=269 process_vm_readv=270 process_vm_writev=271 finit_module=273 "
        "sched_setattr=274 sched_getattr=275 renameat2=276 seccomp=277 getrandom=278 "
        "memfd_create=279 bpf=280 execveat=281 membarrier=283 mlock2=284 copy_file_range=285 "
        "preadv2=286 pwritev2=287 pkey_mprotect=288 pkey_alloc=289 pkey_free=290 statx=291 "
        "io_pgetevents=292 rseq=293 clock_gettime64=403 clock_adjtime64=405 "
        "clock_getres_time64=406 clock_nanosleep_time64=407 timer_gettime64=408 "
        "timer_settime64=409 timerfd_gettime64=410 timerfd_settime64=411 utimensat_time64=412 "
        "pselect6_time64=413 ppoll_time64=414 io_pgetevents_time64=416 recvmmsg_time64=417 "
        "mq_timedsend_time64=418 mq_timedreceive_time64=419 semtimedop_time64=420 "
        "rt_sigtimedwait_time64=421 futex_time64=422 sched_rr_get_interval_time64=423 "
        "pidfd_send_signal=424 io_uring_setup=425 io_uring_enter=426 io_uring_register=427 "
        "open_tree=428 move_mount=429 fsopen=430 fsconfig=431 fsmount=432 fspick=433 "
        "pidfd_open=434 clone3=435 close_range=436 openat2=437 faccessat2=439 epoll_pwait2=441 "
        "mount_setattr=442 quotactl_fd=443 landlock_create_ruleset=444 landlock_add_rule=445 "
        "landlock_restrict_self=446 memfd_secret=447 process_mrelease=448 futex_waitv=449 "
    ),
}

BpfInsn = Tuple[int, int, int, int]


def syscall_numbers(machine: str) -> Dict[str, int]:
    """name -> number of the syscalls the filter knows, for machine (KeyError: no table)."""
    pairs = (item.split("=") for item in SYSCALL_NUMBERS[machine].split())
    return {name: int(nr) for name, nr in pairs}


def seccomp_program(machine: str, admin: bool = False) -> List[BpfInsn]:
    """The classic-BPF program of the filter (code, jt, jf, k): Docker's default profile,
    every syscall not allowed fails with EPERM (clone3: ENOSYS, so libc uses clone).
    admin: also what a holder of CAP_SYS_ADMIN may do (the zygote's filter)."""
    nrs = syscall_numbers(machine)
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    allow = SECCOMP_RET_ALLOW
    names = set(SECCOMP_ALLOW) | (set(SECCOMP_ADMIN) if admin else set())
    prog: List[BpfInsn] = [
        (BPF_LD_W_ABS, 0, 0, SECCOMP_ARCH),
        (BPF_JEQ, 1, 0, AUDIT_ARCH[machine]),
        (BPF_RET, 0, 0, deny),  # another ABI (i386, x32, arm32): refused
        (BPF_LD_W_ABS, 0, 0, SECCOMP_NR),
    ]
    if machine == "x86_64":
        prog += [(BPF_JGE, 0, 1, X32_SYSCALL_BIT), (BPF_RET, 0, 0, deny)]
    # socket: any family but AF_VSOCK
    prog += [(BPF_JEQ, 0, 4, nrs["socket"]), (BPF_LD_W_ABS, 0, 0, SECCOMP_ARG0),
             (BPF_JEQ, 0, 1, AF_VSOCK), (BPF_RET, 0, 0, deny), (BPF_RET, 0, 0, allow)]
    # personality: the listed values only
    n = len(PERSONALITY_ALLOWED)
    prog += [(BPF_JEQ, 0, n + 3, nrs["personality"]), (BPF_LD_W_ABS, 0, 0, SECCOMP_ARG0)]
    prog += [(BPF_JEQ, n - i, 0, v) for i, v in enumerate(PERSONALITY_ALLOWED)]
    prog += [(BPF_RET, 0, 0, deny), (BPF_RET, 0, 0, allow)]
    if not admin:
        # clone without namespace flags; clone3 (flags out of reach in memory): ENOSYS
        prog += [(BPF_JEQ, 0, 4, nrs["clone"]), (BPF_LD_W_ABS, 0, 0, SECCOMP_ARG0),
                 (BPF_JSET, 1, 0, CLONE_NAMESPACES), (BPF_RET, 0, 0, allow),
                 (BPF_RET, 0, 0, deny)]
        prog += [(BPF_JEQ, 0, 1, nrs["clone3"]),
                 (BPF_RET, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    wanted = sorted(set(nrs[name] for name in names if name in nrs
                        and (admin or name not in SECCOMP_SPECIAL)))
    ranges: List[List[int]] = []
    for nr in wanted:
        if ranges and ranges[-1][1] == nr - 1:
            ranges[-1][1] = nr
        else:
            ranges.append([nr, nr])
    for lo, hi in ranges:
        if lo == hi:
            prog += [(BPF_JEQ, 0, 1, lo), (BPF_RET, 0, 0, allow)]
        else:
            prog += [(BPF_JGE, 0, 2, lo), (BPF_JGT, 1, 0, hi), (BPF_RET, 0, 0, allow)]
    prog.append((BPF_RET, 0, 0, deny))
    return prog


_PROGRAMS: Dict[Tuple[str, bool], List[BpfInsn]] = {}


def cached_seccomp_program(machine: str, admin: bool = False) -> List[BpfInsn]:
    """seccomp_program, built once per process: a zygote builds the test workers' program
    before it forks them, so each worker only loads it."""
    key = (machine, admin)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = seccomp_program(machine, admin)
    return _PROGRAMS[key]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _prctl(option: int, *args: int) -> int:
    values = [ctypes.c_ulong(a) for a in args] + [ctypes.c_ulong(0)] * (4 - len(args))
    return int(libc().prctl(ctypes.c_int(option), *values))


def install_seccomp(prog: Sequence[BpfInsn]) -> None:
    """Load prog as this thread's seccomp filter (needs no_new_privs or CAP_SYS_ADMIN)."""
    insns = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
    _check(_prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog)),
           "prctl(PR_SET_SECCOMP)")


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_capabilities(keep: Sequence[int]) -> None:
    """Keep only `keep` in the bounding, effective and permitted sets; empty the
    inheritable and ambient ones (so no execve, not even of a setuid file, gets more)."""
    last = _cap_last()
    for cap in range(last + 1):
        if cap not in keep and _prctl(PR_CAPBSET_READ, cap) == 1:
            _check(_prctl(PR_CAPBSET_DROP, cap), "prctl(PR_CAPBSET_DROP, %d)" % cap)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)  # EINVAL before Linux 4.3: none to clear
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(libc().capget(header, data), "capget")
    mask = [0, 0]
    for cap in keep:
        mask[cap // 32] |= 1 << (cap % 32)
    for i in range(2):
        data[3 * i] &= mask[i]  # effective
        data[3 * i + 1] &= mask[i]  # permitted
        data[3 * i + 2] = 0  # inheritable
    _check(libc().capset(header, data), "capset")


def protect_paths(root: str) -> None:
    """runc's masked and read-only paths in the fresh /proc and /sys of root (a worker's
    root, before it enters it): what a test reads there is its own, what it could write
    would reach the host's kernel."""
    null = os.path.join(root, "dev/null")
    for path in MASKED_PATHS:
        target = root + path
        if not os.path.lexists(target) or os.path.islink(target):
            continue
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "mode=555,size=4k")
        else:
            mount(null, target, None, MS_BIND)
    for path in READONLY_PATHS:
        target = root + path
        if os.path.lexists(target) and not os.path.islink(target):
            if os.statvfs(target).f_flag & 1 and path == "/sys":
                continue  # mounted read-only already (populate_root)
            bind(target, target, readonly=True)


def harden_process(opts: Dict[str, Any], admin: bool = False) -> List[str]:
    """Capabilities down to Docker's default set, no_new_privs, the seccomp filter.
    admin keeps CAP_SYS_ADMIN and the syscalls it needs (a zygote: it builds each test
    worker's root, whose own hardening then drops the rest).  Returns notes on what the
    kernel or emulator could not do (a filter under qemu-user, an unknown machine)."""
    notes: List[str] = []
    drop_capabilities(DEFAULT_CAPS + ((CAP_SYS_ADMIN,) if admin else ()))
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")
    machine = platform.machine()
    if not opts.get("seccomp", True):
        notes.append("no seccomp filter (the host turned it off: emulated architecture)")
    elif machine not in SYSCALL_NUMBERS:
        notes.append("no seccomp filter: no syscall table for %s" % machine)
    else:
        install_seccomp(cached_seccomp_program(machine, admin))
    return notes


def harden_opts(settings: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The hardening a worker applies (None: none, privileged or not a container root)."""
    opts = settings.get("harden")
    if settings.get("isolation") != "overlay" or not isinstance(opts, dict):
        return None
    return opts


# --------------------------------------------------------------------------
# Launcher (host side of namespace backends)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def launch(cfg: Dict[str, Any]) -> None:
    """Enter new namespaces, build the environment's root, pivot into it and exec.

    cfg keys: rootfs, workdir, mode ("overlay": writes go to a tmpfs;
    "direct": writes go to rootfs itself, for provisioning), binds
    [[src, dst, readonly]], network, hostname, argv, env, cwd, new_session
    (default true; false keeps the caller's terminal for an interactive shell),
    disk (bytes: the size of the writable tmpfs mounts; unbounded when absent),
    userns ({"uid": [base, count], "gid": [base, count]}, as root and in overlay mode:
    root inside is host uid base -- see make_userns).
    """
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC
    if not cfg.get("network"):
        flags |= CLONE_NEWNET
    if uid != 0:
        flags |= CLONE_NEWUSER
    set_pdeathsig()
    mapped = cfg.get("userns") if uid == 0 and cfg.get("mode", "overlay") == "overlay" else None
    userns_fd = lower_fd = None
    if mapped:
        try:
            userns_fd = make_userns(mapped["uid"], mapped["gid"])
            # the root filesystem seen through the mapping, attached in _enter_root
            lower_fd = idmapped_tree(cfg["rootfs"], userns_fd, readonly=True, recursive=False)
        except OSError as exc:
            # no user namespaces or no idmapped mounts here: the host's root, and the
            # agent's hello says why (the host reports it once)
            if userns_fd is not None:
                os.close(userns_fd)
            userns_fd, mapped = None, None
            cfg.setdefault("env", {})[ROOT_MAP_ENV] = str(exc)
    unshare(flags)
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid),
                           ("gid_map", "0 %d 1" % gid)):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    pid = os.fork()
    if pid:
        def forward(signum: int, frame: Any) -> None:
            os.kill(pid, signal.SIGKILL)

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, forward)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                os._exit(1)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    try:
        set_pdeathsig()
        if cfg.get("new_session", True):
            # the environment shares no process group with the host's launcher; not for an
            # interactive program, which must keep its terminal (job control, Ctrl-C)
            os.setsid()
        _enter_root(cfg, userns_fd, mapped, lower_fd)
    except BaseException as exc:  # reported on the launcher's stderr (the env's log)
        sys.stderr.write("pytest-isolate launcher: %s: %s\n" % (type(exc).__name__, exc))
        sys.stderr.flush()
        os._exit(121)


def _enter_root(cfg: Dict[str, Any], userns_fd: Optional[int] = None,
                mapped: Optional[Dict[str, Any]] = None,
                lower_fd: Optional[int] = None) -> None:
    work = cfg["workdir"]
    mount("tmpfs", work, "tmpfs", 0, "mode=755" + size_opt(cfg.get("disk")))
    root = os.path.join(work, "root")
    upper = os.path.join(work, "upper")
    owner = (mapped["uid"][0], mapped["gid"][0]) if mapped else None
    if cfg.get("mode", "overlay") == "direct":
        os.makedirs(root)
        mount(cfg["rootfs"], root, None, MS_BIND | MS_REC)
    else:
        lower = cfg["rootfs"]
        if lower_fd is not None:
            # the cached root filesystem stays owned by the host's root on disk; seen
            # through this mount, the mapped root owns it
            lower = os.path.join(work, "lower")
            os.makedirs(lower)
            attach_tree(lower_fd, lower)
        overlay(root, [lower], upper, os.path.join(work, "work"))
        bind(lower, root + "/.isolate/lower", readonly=True)  # a bind keeps the idmap
        os.makedirs(root + "/.isolate/ws", exist_ok=True)
    binds = list(cfg.get("binds", []))
    if cfg.get("network") and os.path.exists("/etc/resolv.conf"):
        binds.append(["/etc/resolv.conf", "/etc/resolv.conf", True])
    populate_root(root, binds, "/dev", fresh_dev=True, size=cfg.get("disk"),
                  userns_fd=userns_fd, owner=owner)
    if owner is not None:
        hand_over(root, upper, owner)
    if cfg.get("hostname"):
        socket.sethostname(cfg["hostname"])
    if not cfg.get("network"):
        try:
            loopback_up()
        except OSError:
            pass
    pivot_root(root)
    if userns_fd is not None:
        enter_userns(userns_fd)
        # a mount namespace the mapped root owns: the agent mounts (the project layer),
        # what the host's root mounted above stays locked in place
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    os.chdir(cfg.get("cwd") or "/")
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    env.update(cfg.get("env") or {})
    argv = cfg["argv"]
    os.execvpe(argv[0], argv, env)


# --------------------------------------------------------------------------
# Commands and files (used by workers and by the agent itself)


def run_command(req: Dict[str, Any], stdin: bytes,
                preexec: Optional[Callable[[], None]] = None) -> Tuple[Dict[str, Any], bytes]:
    argv = req["argv"]
    env = dict(os.environ)
    env.update(req.get("env") or {})
    timeout = req.get("timeout")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=req.get("cwd"), env=env, start_new_session=True, preexec_fn=preexec,
        )
    except OSError as exc:
        msg = ("%s: %s\n" % (argv[0], exc.strerror or exc)).encode()
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        return ({"op": "result", "returncode": code, "stdout_len": 0,
                 "duration": time.monotonic() - started, "timed_out": False}, msg)
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=float(req.get("kill_grace", 2.0)))
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    else:
        _killpg(proc.pid, signal.SIGKILL)  # what the command left running in its group
    return ({"op": "result", "returncode": proc.returncode, "stdout_len": len(out),
             "duration": time.monotonic() - started, "timed_out": timed_out}, out + err)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def limit_guest(values: Dict[str, str]) -> None:
    """In a virtual machine (the agent is the guest's root): put the agent, and so every
    worker it forks, into a cgroup v2 group with the spec's limits, as the host does for
    containers.  values: cgroup file -> value, e.g. {"pids.max": "64"}."""
    base = "/sys/fs/cgroup"
    if not os.path.exists(base + "/cgroup.controllers"):
        os.makedirs(base, exist_ok=True)
        mount("cgroup2", base, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    group = base + "/pytest-isolate-agent"  # not "pytest-isolate": the host's groups' parent
    os.makedirs(group, exist_ok=True)
    controllers = sorted(set(k.split(".", 1)[0] for k in values))
    with open(base + "/cgroup.subtree_control", "w") as f:
        f.write(" ".join("+" + c for c in controllers))
    for name, value in sorted(values.items()):
        if name == "memory.swap.max" and not os.path.exists(group + "/" + name):
            continue  # a kernel without swap accounting: nothing to limit
        with open(group + "/" + name, "w") as f:
            f.write(value)
    with open(group + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def oom_kills() -> Optional[int]:
    """The kernel's count of OOM kills since boot (/proc/vmstat), None when unknown."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def pack_path(path: str) -> bytes:
    """A tar archive of path, its top entry named 'root'."""
    if not os.path.lexists(path):
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(path, arcname="root")
    return buf.getvalue()


def unpack_to(data: bytes, dest: str) -> None:
    """Extract an archive made by pack_path so that its 'root' entry becomes dest."""
    parent = os.path.dirname(os.path.abspath(dest)) or "/"
    os.makedirs(parent, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        members = []
        for m in tar.getmembers():
            if m.name != "root" and not m.name.startswith("root/"):
                raise ValueError("unexpected archive member %r" % m.name)
            if m.isdev():
                continue
            m.name = os.path.basename(dest) + m.name[4:]
            # owned by root inside (like `docker cp`): the host's uid may not even be
            # mapped in a user namespace, and a failed chown would also skip the chmod
            m.uid = m.gid = 0
            m.uname = m.gname = "root"
            members.append(m)
        if hasattr(tarfile, "fully_trusted_filter"):
            tar.extractall(parent, members=members, filter="fully_trusted")
        else:
            tar.extractall(parent, members=members)


def _set_winsize(fd: int, req: Dict[str, Any]) -> None:
    if req.get("rows") and req.get("cols"):
        import fcntl
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", req["rows"], req["cols"], 0, 0))


def in_root_call(root: Optional[str], fn: Callable[[], bytes]) -> bytes:
    """Run fn in a forked child chrooted to root (so paths resolve inside the env)."""
    if root is None:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            os.chroot(root)
            os.chdir("/")
            payload = b"\0" + fn()
        except BaseException as exc:
            payload = b"\1" + ("%s: %s" % (type(exc).__name__, exc)).encode()
            code = 1
        try:
            write_all(w, payload)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data or data[:1] != b"\0":
        raise OSError(data[1:].decode(errors="replace") or "file operation failed")
    return data[1:]


# --------------------------------------------------------------------------
# pytest inside the environment


#: Fixtures that drive environments from the host: a test using one stays on the host.
HOST_FIXTURES = frozenset(("isolate_env", "chroot", "schroot", "lxc", "docker", "qemu_vm",
                           "arm64_vm"))


def isolate_targets(marker_args: Sequence[Any], default_envs: Sequence[str],
                    fixturenames: Sequence[str] = ()) -> List[str]:
    """Environments a test runs in: its marker's, else the run-wide default.

    An unmarked test that uses an environment fixture is a host-side driver: the
    run-wide default (--isolate-env) does not move it inside.
    """
    if marker_args:
        return [str(a) for a in marker_args]
    if HOST_FIXTURES.intersection(fixturenames):
        return []
    return list(default_envs)


def parametrize_envs(metafunc: Any, default_envs: Sequence[str]) -> None:
    """One item per environment when a test has several (shared by host and agent)."""
    marker = metafunc.definition.get_closest_marker("isolate")
    envs = isolate_targets(marker.args if marker else (), default_envs, metafunc.fixturenames)
    if len(envs) > 1:
        if "isolate_target" not in metafunc.fixturenames:
            metafunc.fixturenames.append("isolate_target")
        metafunc.parametrize("isolate_target", envs, ids=envs, indirect=True)


_TARGET_KEY: Any = None


def target_key() -> Any:
    """The stash key holding the environment of an item copy made by split_items."""
    global _TARGET_KEY
    if _TARGET_KEY is None:
        import pytest

        _TARGET_KEY = pytest.StashKey()
    return _TARGET_KEY


def item_target(item: Any) -> Optional[str]:
    """The environment an item was split for: its copy's, else its isolate_target param."""
    env = item.stash.get(target_key(), None)
    if env is not None:
        return str(env)
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "isolate_target" in callspec.params:
        return str(callspec.params["isolate_target"])
    return None


def env_nodeid(nodeid: str, env: str) -> str:
    """The node id of an item's copy for env, spelled as parametrize spells it:
    ``t`` -> ``t[env]``, ``t[a]`` -> ``t[a-env]``."""
    tail = nodeid.rpartition("::")[2]
    if tail.endswith("]") and "[" in tail:
        return nodeid[:-1] + "-" + env + "]"
    return nodeid + "[" + env + "]"


def copy_item_for_env(item: Any, env: str) -> Any:
    """A copy of item that differs in its node id (``[env]``), its keywords (``-k env``
    selects it), its stash (which holds env), user properties and report sections.

    ``name`` stays: a unittest TestCaseFunction finds its method by name, and doctest
    and plugin items have constructors of their own, so no constructor is called again.
    Raises ValueError for an item whose node id cannot be changed this way.
    """
    import copy

    nodeid = env_nodeid(item.nodeid, env)
    new = copy.copy(item)
    node_id = getattr(item, "_id", None)
    if node_id is not None and hasattr(type(node_id), "parse"):  # pytest >= 9: a NodeId
        new._id = type(node_id).parse(nodeid)
    else:
        new._nodeid = nodeid
    if new.nodeid != nodeid:
        raise ValueError("%s defines its own node id (%r), so no copy per environment can "
                         "carry the environment in its id" % (type(item).__name__, new.nodeid))
    try:
        keywords = type(item.keywords)(new)
    except TypeError:
        keywords = {}
    own = getattr(item.keywords, "_markers", None)
    for key in (own if isinstance(own, dict) else list(item.keywords)):
        keywords[key] = item.keywords[key]
    keywords[env] = True
    new.keywords = keywords
    new.own_markers = list(item.own_markers)
    new.extra_keyword_matches = set(item.extra_keyword_matches) | {env}
    stash = type(item.stash)()
    storage = getattr(item.stash, "_storage", None)
    if isinstance(storage, dict):
        stash._storage.update(storage)
    new.stash = stash
    if hasattr(item, "_store"):
        new._store = stash
    new.user_properties = list(getattr(item, "user_properties", []))
    new._report_sections = []
    if isinstance(getattr(item, "fixturenames", None), list):
        new.fixturenames = list(item.fixturenames)
    if hasattr(new, "_initrequest"):  # Function, TestCaseFunction, DoctestItem: a request of its own
        new._initrequest()
    stash[target_key()] = env
    return new


def split_items(nodes: List[Any], default_envs: Sequence[str]) -> Tuple[List[Any], List[str]]:
    """One copy per environment of every item with several environments that
    parametrize_envs did not split: unittest TestCase methods, doctests, items a plugin
    collects (shared by host and agent, so node ids match on both sides).

    nodes is a collector's result (collectors in it pass unchanged).  Returns the new
    list and, for each item that cannot be split, "nodeid: reason".
    """
    import pytest

    result: List[Any] = []
    problems: List[str] = []
    for node in nodes:
        if not isinstance(node, pytest.Item) or item_target(node) is not None:
            result.append(node)
            continue
        marker = node.get_closest_marker("isolate")
        envs = isolate_targets(marker.args if marker else (), default_envs,
                               getattr(node, "fixturenames", ()) or ())
        if len(envs) < 2:
            result.append(node)
            continue
        try:
            copies = [copy_item_for_env(node, env) for env in envs]
        except Exception as exc:
            problems.append("%s (%s): %s: %s" % (node.nodeid, type(node).__name__,
                                                 type(exc).__name__, exc))
            result.append(node)
            continue
        result.extend(copies)
    return result, problems


#: Where coverage data files are written inside (the host's pytest-cov combines them).
COVERAGE_DIR = "/.isolate/coverage"


def start_coverage(options: Optional[Dict[str, Any]]) -> Any:
    """A started coverage.Coverage for the host's pytest-cov options (None: not asked)."""
    if not options:
        return None
    try:
        import coverage
    except ImportError as exc:
        sys.stderr.write("pytest-isolate: no coverage measurement inside: %s\n" % exc)
        return None
    import warnings

    # the host's compiled tracer fits only the host's Python: the pure-Python one is fine
    warnings.filterwarnings("ignore", message="Couldn't import C tracer")
    cov = coverage.Coverage(
        source=options.get("source") or None, branch=options.get("branch") or None,
        config_file=options.get("config") or False, data_suffix=True,
        data_file=os.path.join(COVERAGE_DIR, ".coverage"))
    cov.start()
    return cov


def save_coverage(cov: Any) -> None:
    if cov is None:
        return
    cov.stop()
    cov.save()


def activate_venv(venv: str) -> None:
    """Become the venv's interpreter where the agent could not be started on it (a VM boots
    before its dependency layer arrives): what site.py does for a venv's python."""
    import glob
    import site

    sys.executable = venv + "/bin/python"
    sys.prefix = sys.exec_prefix = venv
    # a venv sees no system site-packages
    sys.path[:] = [p for p in sys.path if not p.endswith(("dist-packages", "site-packages"))]
    for sp in sorted(glob.glob(venv + "/lib/python*/site-packages")):
        site.addsitedir(sp)
    os.environ["VIRTUAL_ENV"] = venv
    os.environ["PATH"] = venv + "/bin:" + os.environ.get("PATH", DEFAULT_PATH)


class Agent:
    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.decoder = FrameDecoder()
        self.workers: Dict[int, "Worker"] = {}
        self.settings: Dict[str, Any] = {"isolation": "none"}
        self.session: Any = None
        self.items: Dict[str, Any] = {}
        self.running = True
        #: the coverage.Coverage measuring now (collection here, a test in a worker)
        self.coverage: Any = None
        #: the --pdb session of the test running in this worker, if the host asked for one
        self.debugger: Optional[Debugger] = None
        self.sigr, self.sigw = os.pipe()
        os.set_blocking(self.sigw, False)
        os.set_blocking(self.sigr, False)
        signal.set_wakeup_fd(self.sigw)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        self.exited: Dict[int, int] = {}
        #: where reports go: channel 0 here, the worker's socket in a worker
        self.current_sender: Callable[..., None] = lambda obj, blob=b"": self.send(0, obj, blob)

    # -- plumbing
    def send(self, ch: int, obj: Dict[str, Any], blob: bytes = b"") -> None:
        write_all(self.wfd, encode_frame(ch, obj, blob))

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited[pid] = status

    def serve(self) -> None:
        while self.running:
            rlist = [self.rfd, self.sigr] + [w.fd for w in self.workers.values() if w.fd >= 0]
            now = time.monotonic()
            deadlines = [w.deadline for w in self.workers.values() if w.deadline]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            ready, _, _ = select.select(rlist, [], [], timeout)
            if self.sigr in ready:
                drain(self.sigr)
            self.reap()
            if self.rfd in ready:
                data = os.read(self.rfd, 1 << 20)
                if not data:
                    self.running = False
                    break
                for ch, obj, blob in self.decoder.feed(data):
                    self.route(ch, obj, blob)
            for w in list(self.workers.values()):
                if w.fd in ready:
                    w.pump(self)
                if w.deadline and time.monotonic() >= w.deadline and w.kill_reason is None:
                    w.kill("timeout: the test ran longer than %ss" % w.timeout, self)
                if w.fd < 0 and (w.pid in self.exited or w.orphaned):
                    self.finish(w)
        for w in list(self.workers.values()):
            w.kill("agent shutting down")

    def finish(self, w: "Worker") -> None:
        # a zygote's worker that will never be reaped ended with its zygote (SIGKILL)
        if w.pid is not None and w.pid in self.exited:
            status = self.exited.pop(w.pid)
        else:
            status = int(signal.SIGKILL)
            w.kill_reason = w.kill_reason or w.orphaned
        del self.workers[w.ch]
        if w.zygote:
            for other in self.workers.values():
                if other.via == w.ch and other.orphaned is None:
                    other.orphaned = "its zygote ended (%s)" % (
                        w.kill_reason or "status %s" % os.waitstatus_to_exitcode(status))
        code = os.waitstatus_to_exitcode(status)
        reason = w.kill_reason
        if reason is None and code != 0:
            reason = ("killed by signal %d" % -code) if code < 0 else "exited with status %d" % code
            now = oom_kills()
            if w.oom_kills is not None and now is not None and now > w.oom_kills:
                reason = "%s: out of memory (the kernel's OOM killer ran)" % reason
        self.send(w.ch, {"op": "exit", "code": code, "reason": reason})

    def zygote_event(self, obj: Dict[str, Any]) -> None:
        """A zygote forked a test worker, or reaped one (its pid is in our PID namespace)."""
        w = self.workers.get(int(obj["ch"]))
        if obj["op"] == "forked":
            if w is not None:
                w.pid = int(obj["pid"])
                if w.kill_reason is not None:  # timed out while the zygote set up
                    w.kill(w.kill_reason, self)
        else:
            self.exited[int(obj["pid"])] = int(obj["status"])

    def route(self, ch: int, obj: Dict[str, Any], blob: bytes) -> None:
        if ch:
            w = self.workers.get(ch)
            if w is None:
                self.send(ch, {"op": "error", "message": "no worker on channel %d" % ch})
                return
            if obj["op"] == "runtest":
                w.timeout = obj.get("timeout")
                w.deadline = time.monotonic() + w.timeout if w.timeout else None
            if obj["op"] == "kill":
                w.kill(obj.get("reason") or "killed by the host", self)
                return
            w.forward(obj, blob)
            return
        try:
            handler = getattr(self, "op_" + obj["op"], None)
            if handler is None:
                raise ValueError("unknown op %r" % obj["op"])
            handler(obj, blob)
        except Exception as exc:
            self.send(0, {"op": "error", "type": type(exc).__name__, "message": str(exc),
                          "traceback": traceback.format_exc()})

    # -- channel 0 operations
    def op_hello(self, req: Dict[str, Any], blob: bytes) -> None:
        try:
            with open("/proc/self/uid_map") as f:  # [inside, host, count] of the first range
                uid_map = [int(x) for x in f.read().split()[:3]]
        except (OSError, ValueError):
            uid_map = []
        self.send(0, {"op": "hello", "protocol": PROTOCOL_VERSION,
                      "python": list(sys.version_info[:3]), "machine": platform.machine(),
                      "pid": os.getpid(), "uid": os.getuid(), "executable": sys.executable,
                      "uid_map": uid_map, "root_map_problem": ROOT_MAP_PROBLEM})

    def op_configure(self, req: Dict[str, Any], blob: bytes) -> None:
        self.settings.update(req.get("settings") or {})
        site = self.settings.get("site")
        if site and site not in sys.path:
            sys.path.insert(0, site)
        if (req.get("settings") or {}).get("guest_limits"):
            limit_guest(self.settings["guest_limits"])
        if self.settings.get("coverage") and COVERAGE_DIR not in self.settings.get("binds", []):
            # shared by every worker (bound into their roots) until the host collects it
            os.makedirs(COVERAGE_DIR, exist_ok=True)
            self.settings["binds"] = [*self.settings.get("binds", []), COVERAGE_DIR]
        venv = self.settings.get("venv")
        if venv and os.path.realpath(sys.prefix) != venv:
            activate_venv(venv)
        layer = (req.get("settings") or {}).get("project_layer")
        if layer:
            # what the project's editable install built (compiled extensions), laid over the
            # read-only project tree at its own path; workers bind this view
            upper, tree = layer
            mount("overlay", tree, "overlay", MS_RDONLY, "lowerdir=%s:%s" % (upper, tree))
        self.send(0, {"op": "ok"})

    def op_pytest(self, req: Dict[str, Any], blob: bytes) -> None:
        """Start a pytest session; its runtest loop becomes this agent's serve loop."""
        if self.session is not None:
            raise RuntimeError("a pytest session is already running")
        os.chdir(req["cwd"])
        import pytest

        plugin = make_pytest_plugin(self, req)
        # coverage of collection (imports, module-level code) as on the host's pytest-cov
        self.coverage = start_coverage(self.settings.get("coverage"))
        code = pytest.main(list(req["args"]), plugins=[plugin])
        if not plugin.reached_loop:
            self.send(0, {"op": "error", "type": "PytestStartError",
                          "message": "pytest inside the environment exited with %s before "
                          "running tests (see the agent log)" % (code,)})
        # the session ended: either the host shut us down, or the stream ended.

    def op_exec(self, req: Dict[str, Any], blob: bytes) -> None:
        reply, out = run_command(req, blob)
        self.send(0, reply, out)

    def op_coverage(self, req: Dict[str, Any], blob: bytes) -> None:
        """The coverage data files written so far (a tar of COVERAGE_DIR), then removed."""
        names = sorted(os.listdir(COVERAGE_DIR)) if os.path.isdir(COVERAGE_DIR) else []
        data = pack_path(COVERAGE_DIR) if names else b""
        for name in names:
            try:
                os.unlink(os.path.join(COVERAGE_DIR, name))
            except OSError:
                pass
        self.send(0, {"op": "coverage", "files": len(names)}, data)

    def op_plugins(self, req: Dict[str, Any], blob: bytes) -> None:
        """Which of the named pytest11 entry points are installed here."""
        import importlib.metadata

        eps = importlib.metadata.entry_points()
        group = (eps.select(group="pytest11") if hasattr(eps, "select")
                 else eps.get("pytest11", []))  # type: ignore[attr-defined,arg-type,unused-ignore]
        have = {ep.name for ep in group}
        self.send(0, {"op": "plugins", "present": [n for n in req["names"] if n in have]})

    def op_worker(self, req: Dict[str, Any], blob: bytes) -> None:
        ch = int(req["ch"])
        if ch <= 0 or ch in self.workers:
            raise ValueError("channel %d is not free" % ch)
        if req.get("zygote"):
            self.fork_from_zygote(ch, int(req["zygote"]), req)
            return
        a, b = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                # a session of its own: a test's kill(0, sig) or killpg(getpgrp(), sig)
                # reaches its worker only, never the agent or the host-side launcher
                os.setsid()
                # when the environment runs out of memory, the kernel's OOM killer ends a
                # test (this worker or what it started) rather than the agent
                try:
                    with open("/proc/self/oom_score_adj", "w") as f:
                        f.write("1000")
                except OSError:
                    pass
                a.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (self.rfd, self.wfd, self.sigr, self.sigw):
                    os.close(fd)
                for w in self.workers.values():
                    if w.fd >= 0:
                        os.close(w.fd)
                code = worker_main(self, b, ch, req)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        b.close()
        self.workers[ch] = Worker(ch, pid, a, oom_kills())
        if req.get("kind") == "zygote":
            self.workers[ch].zygote = True

    def fork_from_zygote(self, ch: int, zch: int, req: Dict[str, Any]) -> None:
        """A test worker forked by the zygote on channel zch (see Zygote): the agent keeps
        one end of the worker's socket and relays its frames like any worker's; the
        zygote, its parent, reports its pid ("forked") and its wait status ("reaped")."""
        z = self.workers.get(zch)
        a, b = socket.socketpair()
        w = Worker(ch, None, a, oom_kills())
        w.via = zch
        self.workers[ch] = w
        if z is None or not z.zygote or z.fd < 0:
            b.close()
            w.orphaned = "the zygote on channel %d is gone" % zch
            return
        frame = encode_frame(zch, dict(req, op="fork"))
        try:
            socket.send_fds(z.sock, [frame], [b.fileno()])
        except OSError as exc:
            w.orphaned = "cannot reach the zygote: %s" % exc
        finally:
            b.close()

    def op_shutdown(self, req: Dict[str, Any], blob: bytes) -> None:
        self.running = False


class Worker:
    """The agent's view of one worker process."""

    def __init__(self, ch: int, pid: Optional[int], sock: socket.socket,
                 oom_kills: Optional[int] = None) -> None:
        self.ch = ch
        self.oom_kills = oom_kills
        self.pid = pid
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = FrameDecoder()
        self.deadline: Optional[float] = None
        self.timeout: Optional[float] = None
        self.kill_reason: Optional[str] = None
        #: this worker is a zygote (forks test workers); or the zygote channel it came from
        self.zygote = False
        self.via = 0
        #: why a worker of a zygote will never be reaped (the zygote is gone)
        self.orphaned: Optional[str] = None

    def forward(self, obj: Dict[str, Any], blob: bytes) -> None:
        if self.fd < 0:
            return
        try:
            self.sock.sendall(encode_frame(self.ch, obj, blob))
        except OSError:
            pass

    def pump(self, agent: Agent) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.sock.close()
            self.fd = -1
            return
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self.kill("sent a malformed frame: %s" % exc)
            return
        for _, obj, blob in frames:
            if self.zygote and obj["op"] in ("forked", "reaped"):
                agent.zygote_event(obj)
                continue
            if obj["op"] in ("done", "exit"):
                self.deadline = None
            agent.send(self.ch, obj, blob)

    def kill(self, reason: str, agent: Optional["Agent"] = None) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.pid is None:
            # still in the zygote's hands (its higher-scoped set-up for this test hangs):
            # only ending the zygote ends that
            z = agent.workers.get(self.via) if agent is not None else None
            if z is not None:
                z.kill("a test's set-up of session/module fixtures ran out of time (%s)"
                       % reason)
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass


def own_capture(session: Any) -> None:
    """A forked worker's own capture files.  pytest's global fd capture writes into
    temporary files the worker shares (one open file, one offset) with the process it was
    forked from and with every other worker forked from it -- and the zygote forks the next
    test's worker, and reads and truncates its own capture while it sets that test's
    fixtures up, while the current test runs: the current test's captured output was lost.
    Each worker starts fresh ones here (suspended, as at the fork; the old files are left
    untouched, never read or truncated from here)."""
    if session is None:
        return
    capman: Any = session.config.pluginmanager.getplugin("capturemanager")
    old = getattr(capman, "_global_capturing", None)
    if old is None:
        return
    from _pytest.capture import _get_multicapture

    if getattr(old, "_state", None) == "started":
        old.suspend_capturing()  # the original fds back in place; the old files untouched
    fresh = _get_multicapture(capman._method)
    fresh.start_capturing()
    fresh.suspend_capturing()
    capman._global_capturing = fresh
    # kept, never closed: closing would flush into the shared files, and letting them be
    # collected warns of unclosed files (an error under a suite's filterwarnings = error)
    _INHERITED_CAPTURES.append(old)


_INHERITED_CAPTURES: List[Any] = []


def worker_main(agent: Agent, sock: socket.socket, ch: int, req: Dict[str, Any],
                zygote: Optional["Zygote"] = None) -> int:
    """Runs in the forked worker: make a fresh root and a PID namespace, then serve.

    A zygote's test worker (zygote given) lays its fresh upper layer over the zygote's
    layers (see Zygote) instead of over the pristine root alone.
    """
    own_capture(agent.session)
    if req.get("kind") == "zygote":
        return Zygote(agent, sock, ch).main()
    isolated = agent.settings.get("isolation") == "overlay"
    if not isolated:
        return WorkerServer(agent, sock, ch, req, root=None, zygote=zygote).serve()
    unshare(CLONE_NEWNS | CLONE_NEWPID)
    # Inherited mounts may be shared (LXC makes every container mount shared): pivot_root
    # would fail with EINVAL and the worker's mounts would propagate back to the agent.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Three processes: this one (in the agent's PID namespace), PID 1 of the new namespace,
    # and the test as PID 1's child.  The kernel drops every signal a namespace's init
    # sends itself or gets from inside without a handler, so a test running as PID 1
    # would survive its own kill(0, SIGKILL) or kill(getpid(), SIGKILL) and go on
    # reporting.  PID 1 only waits (and reaps orphans) and hands the test's wait status
    # up through a pipe; this process then ends the way the test ended, so the agent
    # reports "killed by signal N" for a test killed by a signal (or the OOM killer).
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test's kill(0, SIGINT) ends us too
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        sock.close()
        os.close(w)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        reported = os.read(r, 64)
        os.close(r)
        code = os.waitstatus_to_exitcode(int(reported) if reported else status)
        if code < 0:
            import resource

            # the test dumped core already if it was going to; this copy must not
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            try:
                signal.signal(-code, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # SIGKILL, SIGSTOP: no handler to reset
            os.kill(os.getpid(), -code)
        return code if code >= 0 else 128 - code
    os.close(r)
    set_pdeathsig()
    test = os.fork()
    if test:
        sock.close()
        while True:
            child, status = os.waitpid(-1, 0)
            if child == test:
                write_all(w, str(status).encode())
                os._exit(0)
    os.close(w)
    set_pdeathsig()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ws = zygote.test_ws if zygote is not None else "/.isolate/ws"
    mount("tmpfs", ws, "tmpfs", 0, "mode=755" + size_opt(agent.settings.get("disk")))
    server = WorkerServer(agent, sock, ch, req, root=None, zygote=zygote, ws=ws)
    lowers = zygote.lowers if zygote is not None else [agent.settings["lower"]]
    root = server.mount_layers(lowers)
    if req.get("kind", "test") == "test":
        pivot_root(root, allow_move=True)
        os.chdir(agent.settings.get("cwd") or "/")
        opts = harden_opts(agent.settings)
        if opts is not None:  # every mount is made: the test's code runs from here on
            for note in harden_process(opts):
                sys.stderr.write("pytest-isolate worker: %s\n" % note)
    else:
        server.root = root
    code = server.serve()
    os._exit(code)


class WorkerServer:
    def __init__(self, agent: Agent, sock: socket.socket, ch: int, req: Dict[str, Any],
                 root: Optional[str], zygote: Optional["Zygote"] = None,
                 ws: str = "/.isolate/ws") -> None:
        self.agent = agent
        self.zygote = zygote
        self.ws = ws
        self.sock = sock
        self.ch = ch
        self.req = req
        self.root = root
        self.decoder = FrameDecoder()
        self.generation = 0
        self.lowers: List[str] = []
        self.upper = ""
        self.snapshots: Dict[str, List[str]] = {}
        self.pending: "collections.deque[Frame]" = collections.deque()

    def send(self, obj: Dict[str, Any], blob: bytes = b"") -> None:
        self.sock.sendall(encode_frame(self.ch, obj, blob))

    def mount_layers(self, lowers: List[str]) -> str:
        self.generation += 1
        g = self.generation
        ws = self.ws
        root = "%s/root%d" % (ws, g)
        self.upper = "%s/upper%d" % (ws, g)
        self.lowers = list(lowers)
        overlay(root, lowers, self.upper, "%s/work%d" % (ws, g))
        s = self.agent.settings
        binds = [[p, p, False] for p in s.get("binds", [])]
        populate_root(root, binds, "/dev", fresh_dev=False, size=s.get("disk"), tmp=False)
        if harden_opts(s) is not None:
            protect_paths(root)
        return root

    def read_frames(self) -> bool:
        """Read once from the host into self.pending; False when the stream ended."""
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.pending.extend(self.decoder.feed(data))
        return True

    def serve(self) -> int:
        self.agent.current_sender = self.send
        while True:
            if not self.pending and not self.read_frames():
                return 0
            while self.pending:
                _, obj, blob = self.pending.popleft()
                op = obj["op"]
                if op == "close":
                    return 0
                try:
                    getattr(self, "op_" + op)(obj, blob)
                except Exception as exc:
                    self.send({"op": "error", "type": type(exc).__name__, "message": str(exc),
                               "traceback": traceback.format_exc()})

    def op_pty(self, req: Dict[str, Any], blob: bytes) -> None:
        """An interactive program on a pseudo-terminal, relayed over the channel.

        pty-out frames carry its output; the host sends pty-in (keys), pty-resize;
        the answer ends with pty-exit.  Used by `shell ENV` and --isolate-keep-failed.
        """
        import pty

        argv = req.get("argv") or ["/bin/sh"]
        env = dict(os.environ)
        env.update(req.get("env") or {})
        env["TERM"] = req.get("term") or "xterm"
        root, cwd = self.root, req.get("cwd") or "/"
        opts = harden_opts(self.agent.settings) if root is not None else None
        pid, fd = pty.fork()
        if pid == 0:
            try:
                if root is not None:
                    os.chroot(root)
                try:
                    os.chdir(cwd)
                except OSError:
                    os.chdir("/")
                if opts is not None:  # a shell gets what a test gets
                    harden_process(opts)
                os.execvpe(argv[0], argv, env)
            except BaseException as exc:
                os.write(2, ("pytest-isolate: cannot start %s: %s\r\n" % (argv[0], exc)).encode())
            os._exit(127)
        _set_winsize(fd, req)
        self.send({"op": "pty-started"})
        try:
            self._relay_pty(pid, fd)
        finally:
            os.close(fd)
            _, status = os.waitpid(pid, 0)
        self.send({"op": "pty-exit", "code": os.waitstatus_to_exitcode(status)})

    def _relay_pty(self, pid: int, fd: int) -> None:
        sock = self.sock.fileno()
        while True:
            ready = [sock] if self.pending else select.select([sock, fd], [], [])[0]
            if fd in ready:
                try:
                    out = os.read(fd, 65536)
                except OSError:  # EIO: the program's side of the terminal is closed
                    out = b""
                if not out:
                    return
                self.send({"op": "pty-out"}, out)
            if sock not in ready:
                continue
            if not self.pending and not self.read_frames():
                os.kill(pid, signal.SIGKILL)
                return
            while self.pending:
                _, obj, data = self.pending[0]
                if obj["op"] == "pty-in":
                    write_all(fd, data)
                elif obj["op"] == "pty-resize":
                    _set_winsize(fd, obj)
                else:  # anything else ends the session first (e.g. close)
                    os.kill(pid, signal.SIGKILL)
                    return
                self.pending.popleft()

    def _preexec(self, cwd: str = "/") -> Optional[Callable[[], None]]:
        root = self.root
        if root is None:
            return None
        opts = harden_opts(self.agent.settings)

        def enter() -> None:
            os.chroot(root)
            os.chdir(cwd)
            if opts is not None:  # as a test's own process is (see worker_main)
                harden_process(opts)

        return enter

    def op_exec(self, req: Dict[str, Any], blob: bytes) -> None:
        cwd = req.get("cwd")
        if self.root is not None and cwd:
            # chdir happens after chroot, inside the environment
            reply, out = run_command(dict(req, cwd=None), blob, self._preexec(cwd))
        else:
            reply, out = run_command(req, blob, self._preexec())
        self.send(reply, out)

    def op_put(self, req: Dict[str, Any], blob: bytes) -> None:
        path = req["path"]
        def unpack() -> bytes:
            unpack_to(blob, path)
            return b""

        in_root_call(self.root, unpack)
        self.send({"op": "ok"})

    def op_get(self, req: Dict[str, Any], blob: bytes) -> None:
        path = req["path"]
        self.send({"op": "ok"}, in_root_call(self.root, lambda: pack_path(path)))

    def op_snapshot(self, req: Dict[str, Any], blob: bytes) -> None:
        self._require_layers()
        frozen = [self.upper, *self.lowers]
        self._remount(frozen)
        self.snapshots[req["name"]] = frozen
        self.send({"op": "ok"})

    def op_restore(self, req: Dict[str, Any], blob: bytes) -> None:
        self._require_layers()
        name = req["name"]
        if name not in self.snapshots:
            raise KeyError("no snapshot named %r (taken: %s)" % (name, sorted(self.snapshots) or "none"))
        self._remount(self.snapshots[name])
        self.send({"op": "ok"})

    def _require_layers(self) -> None:
        if self.root is None:
            raise NotImplementedError("snapshots need the overlay isolation of a real backend")

    def _remount(self, lowers: List[str]) -> None:
        old = self.root
        self.root = self.mount_layers(lowers)
        if old:
            umount(old, MNT_DETACH)

    def op_runtest(self, req: Dict[str, Any], blob: bytes) -> None:
        items = self.agent.items
        item = items.get(req["nodeid"])
        if item is None:
            self.send({"op": "missing", "nodeid": req["nodeid"],
                       "known": sorted(items)[:50]})
            return
        nextitem = items.get(req.get("next") or "")
        if self.zygote is not None:
            # the zygote holds the higher scopes: tear down only what this test set up
            nextitem = self.zygote.keep_scopes(item)
        debug = Debugger(self, req) if req.get("debug") else None
        self.agent.debugger = debug
        previous_hook = sys.breakpointhook
        if debug is not None:
            sys.breakpointhook = debug.breakpoint
        try:
            item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        finally:
            sys.breakpointhook = previous_hook
            self.agent.debugger = None
            if debug is not None:
                debug.close()
        sys.stdout.flush()
        sys.stderr.flush()
        self.send({"op": "done", "nodeid": req["nodeid"]})


class Debugger:
    """--pdb for a test inside: pdb on a pseudo-terminal relayed to the host's terminal.

    Opened at the test's first breakpoint() or failure (pty-started; the host relays keys
    and output as for a shell), closed when the test's protocol ends (pty-exit).  pdb runs
    in the worker itself, on the test's frames; a thread moves the bytes meanwhile.
    """

    def __init__(self, server: "WorkerServer", req: Dict[str, Any]) -> None:
        self.server = server
        self.req = req
        self.master = -1
        self.slave = -1
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def open(self) -> Tuple[Any, Any]:
        if self.master < 0:
            self.master, self.slave = os.openpty()
            _set_winsize(self.master, self.req)
            self.server.send({"op": "pty-started"})
            self.thread = threading.Thread(target=self._relay, daemon=True)
            self.thread.start()
        stdin = os.fdopen(os.dup(self.slave), "r", buffering=1)
        stdout = os.fdopen(os.dup(self.slave), "w", buffering=1)
        return stdin, stdout

    def _pdb(self) -> Any:
        import pdb

        stdin, stdout = self.open()
        debugger = pdb.Pdb(stdin=stdin, stdout=stdout)
        debugger.use_rawinput = False
        return debugger

    def breakpoint(self, *args: Any, **kwargs: Any) -> None:
        self._pdb().set_trace(sys._getframe(1))

    def post_mortem(self, tb: Any) -> None:
        debugger = self._pdb()
        debugger.reset()
        debugger.interaction(None, tb)

    def _relay(self) -> None:
        server = self.server
        sock = server.sock.fileno()
        while not self.stop.is_set():
            ready = select.select([self.master, sock], [], [], 0.1)[0]
            if self.master in ready:
                try:
                    out = os.read(self.master, 65536)
                except OSError:
                    out = b""
                if out:
                    server.send({"op": "pty-out"}, out)
            if sock in ready:
                if not server.read_frames():
                    return
                while server.pending and server.pending[0][1]["op"] in ("pty-in", "pty-resize"):
                    _, obj, data = server.pending.popleft()
                    if obj["op"] == "pty-in":
                        write_all(self.master, data)
                    else:
                        _set_winsize(self.master, obj)

    def close(self) -> None:
        if self.thread is None:
            return
        self.stop.set()
        self.thread.join()
        os.set_blocking(self.master, False)
        try:
            while True:
                out = os.read(self.master, 65536)
                if not out:
                    break
                self.server.send({"op": "pty-out"}, out)
        except OSError:
            pass
        os.close(self.slave)
        os.close(self.master)
        self.server.send({"op": "pty-exit", "code": 0})


class _KeepScopes:
    """What a zygote's test worker passes as nextitem: an item whose chain is the test's
    ancestors, so the test's teardown stops short of the scopes the zygote holds."""

    def __init__(self, item: Any, chain: List[Any]) -> None:
        self._item = item
        self._chain = chain

    def listchain(self) -> List[Any]:
        return list(self._chain)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._item, name)


class Zygote:
    """The process that holds an environment's higher-scoped fixtures (reset = "test").

    Forked from the agent once per environment (host op "worker", kind "zygote"), it
    sets up, for each test the host asks it to fork a worker for, the collectors and
    the session-, package-, module- and class-scoped fixtures that test needs -- each
    once, as pytest on the host would -- and then forks that test's worker (host op
    "worker" with "zygote": its channel; the agent passes the worker's socket over with
    SCM_RIGHTS).  The worker runs the test with a nextitem that keeps those scopes, so
    only what the test itself set up is torn down there; the zygote tears a scope down
    where it set it up, when the host says the next test leaves it ("advance", whose
    teardown report the host merges into the previous test's).

    Layers (isolated backends): the zygote's root is an overlay whose upper layer
    (/.isolate/ws/session/upper, on a tmpfs of its own) takes what those fixtures write;
    each test worker's root is a fresh upper over [that layer, the pristine root].  So a
    test starts from the files, values, descriptors and processes the fixtures made, and
    its own writes and processes go with its worker.

    Threads do not survive fork: a fixture whose set-up leaves new threads running is
    torn down again in the zygote and set up per test from then on (with a warning that
    names it); ``@pytest.mark.isolate(..., fixtures_per_test=[...])`` asks for that
    up front.  The host asks for the next test's worker while the current test runs
    (when the zygote sets up and tears down nothing between the two: manager's
    shares_fixtures), so its fork and root are ready when its turn comes.
    """

    WS = "/.isolate/ws"

    def __init__(self, agent: Agent, sock: socket.socket, ch: int) -> None:
        self.agent = agent
        self.sock = sock
        self.ch = ch
        self.decoder = FrameDecoder()
        self.fds: "collections.deque[int]" = collections.deque()
        self.children: Dict[int, int] = {}
        self.per_test: Dict[str, str] = {}
        self.lowers: List[str] = []
        self.test_ws = self.WS + "/t"
        self.sigr = self.sigw = -1
        self.running = True

    def send(self, obj: Dict[str, Any], blob: bytes = b"") -> None:
        self.sock.sendall(encode_frame(self.ch, obj, blob))

    def main(self) -> int:
        if self.agent.settings.get("isolation") == "overlay":
            self.enter_layer()
        self.sigr, self.sigw = os.pipe()
        os.set_blocking(self.sigr, False)
        os.set_blocking(self.sigw, False)
        signal.set_wakeup_fd(self.sigw)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        self.agent.current_sender = self.send
        try:
            self.serve()
        finally:
            self.teardown_all()
            _kill_session_leftovers()
        return 0

    def enter_layer(self) -> None:
        s = self.agent.settings
        lower = s["lower"]
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        ws = self.WS
        mount("tmpfs", ws, "tmpfs", 0, "mode=755" + size_opt(s.get("disk")))
        upper = ws + "/session/upper"
        root = ws + "/root"
        overlay(root, [lower], upper, ws + "/session/work")
        binds = [[p, p, False] for p in s.get("binds", [])]
        populate_root(root, binds, "/dev", fresh_dev=False, size=s.get("disk"), tmp=False)
        if harden_opts(s) is not None:
            protect_paths(root)
        # the layers at the same paths inside (a plain bind: not the root mounted in ws)
        os.makedirs(root + ws, exist_ok=True)
        mount(ws, root + ws, None, MS_BIND)
        # the pristine root at a path of its own (lower may be "/" itself: docker)
        pristine = "/.isolate/pristine"
        bind(lower, root + pristine, readonly=True)
        os.makedirs(self.test_ws, exist_ok=True)
        pivot_root(root, allow_move=True)
        os.chdir(s.get("cwd") or "/")
        self.lowers = [upper, pristine]
        try:  # a fixture's server on 127.0.0.1 (a container "without network" has lo down)
            loopback_up()
        except OSError:
            pass
        opts = harden_opts(s)
        if opts is not None:
            # before any fixture code: everything but CAP_SYS_ADMIN (and the syscalls it
            # allows) goes; each test worker builds its root, then drops that too
            for note in harden_process(opts, admin=True):
                sys.stderr.write("pytest-isolate zygote: %s\n" % note)
            if platform.machine() in SYSCALL_NUMBERS:
                cached_seccomp_program(platform.machine())  # the workers' filter, once

    def serve(self) -> None:
        while self.running:
            sock = self.sock.fileno()
            ready = select.select([sock, self.sigr], [], [])[0]
            if self.sigr in ready:
                drain(self.sigr)
                self.reap()
            if sock not in ready:
                continue
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 16)
            self.fds.extend(fds)
            if not data:
                return
            for _, obj, _blob in self.decoder.feed(data):
                try:
                    getattr(self, "op_" + obj["op"])(obj)
                except Exception as exc:
                    self.send({"op": "error", "type": type(exc).__name__, "message": str(exc),
                               "traceback": traceback.format_exc()})
                if not self.running:
                    return

    def reap(self) -> None:
        for pid in list(self.children):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, int(signal.SIGKILL)
            if got:
                ch = self.children.pop(pid)
                self.send({"op": "reaped", "ch": ch, "pid": pid, "status": status})

    def op_ping(self, req: Dict[str, Any]) -> None:
        self.send({"op": "pong", "per_test": sorted(self.per_test)})

    def op_close(self, req: Dict[str, Any]) -> None:
        self.running = False

    def op_fork(self, req: Dict[str, Any]) -> None:
        fd = self.fds.popleft()
        ch = int(req["ch"])
        item = self.agent.items.get(req.get("nodeid") or "")
        warnings: List[str] = []
        if item is not None:
            warnings = self.prepare(item)
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.setsid()  # a test's kill(0, sig) never reaches the zygote
                set_pdeathsig()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for other in (self.sigr, self.sigw, *self.fds):
                    os.close(other)
                self.sock.close()
                sock = socket.socket(fileno=fd)
                for message in warnings:
                    sock.sendall(encode_frame(ch, {"op": "warning", "message": message}))
                code = worker_main(self.agent, sock, ch, dict(req, kind="test"), zygote=self)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(fd)
        self.children[pid] = ch
        if item is not None:
            item._report_sections = []  # the worker reports what the set-up printed
        self.send({"op": "forked", "ch": ch, "pid": pid})

    # -- pytest's scopes
    def prepare(self, item: Any) -> List[str]:
        """Set up item's collectors and higher-scoped fixtures here; failures are cached
        by pytest, so the worker's set-up raises them with their traceback, as on the host."""
        from _pytest.outcomes import TEST_OUTCOME

        ss = item.session._setupstate
        chain = item.listchain()
        warnings: List[str] = []
        if list(ss.stack) != chain[: len(ss.stack)]:  # the host did not advance: do it now
            try:
                ss.teardown_exact(item)
            except TEST_OUTCOME as exc:
                warnings.append("pytest-isolate: tearing down the scopes before %s failed "
                                "in the zygote: %s: %s" % (item.nodeid, type(exc).__name__, exc))
        for col in chain[len(ss.stack):-1]:
            ss.stack[col] = ([col.teardown], None)
            try:
                col.setup()
            except TEST_OUTCOME as exc:
                ss.stack[col] = (ss.stack[col][0], (exc, exc.__traceback__))
                return warnings
        if any(exc for _, exc in ss.stack.values()):
            return warnings
        request = getattr(item, "_request", None)
        info = getattr(item, "_fixtureinfo", None)
        if not request or info is None:
            return warnings
        marker = item.get_closest_marker("isolate")
        declared = list((marker.kwargs.get("fixtures_per_test") or ()) if marker else ())
        for name in declared:
            self.per_test.setdefault(str(name), "declared")
        names = self.zygote_fixtures(info)
        capman = item.config.pluginmanager.getplugin("capturemanager")
        import contextlib

        ctx = capman.item_capture("setup", item) if capman is not None else contextlib.nullcontext()
        # the item is "active" while its fixtures are requested, as in its own set-up; it
        # leaves the stack again before the fork (the worker pushes it)
        ss.stack[item] = ([], None)
        try:
            with ctx:
                self.prepare_fixtures(item, request, info, names, warnings)
        finally:
            ss.stack.pop(item, None)
        return warnings

    def prepare_fixtures(self, item: Any, request: Any, info: Any, names: List[str],
                         warnings: List[str]) -> None:
        import threading

        from _pytest.outcomes import TEST_OUTCOME

        defs = [d for n in info.names_closure for d in info.name2fixturedefs.get(n, ())]
        for name in names:
            if name in self.per_test:
                continue
            before = set(threading.enumerate())
            idle = [d for d in defs if d.cached_result is None]
            try:
                request.getfixturevalue(name)
            except TEST_OUTCOME:
                continue  # cached: each test using it errors with this set-up's traceback
            started = [t for t in threading.enumerate() if t not in before and t.is_alive()]
            if started:
                warnings.append(self.move_per_test(request, name, idle, started))

    def zygote_fixtures(self, info: Any) -> List[str]:
        """The item's higher-scoped fixtures that do not depend on a per-test one."""
        defs = info.name2fixturedefs
        memo: Dict[str, bool] = {}

        def per_test(name: str, seen: Tuple[str, ...] = ()) -> bool:
            if name in self.per_test:
                return True
            if name in memo or name in seen:
                return memo.get(name, False)
            memo[name] = any(per_test(arg, (*seen, name)) for d in defs.get(name, ())
                             for arg in d.argnames)
            return memo[name]

        names = []
        for name in info.names_closure:
            fixdefs = defs.get(name)
            if not fixdefs or fixdefs[-1].scope == "function" or per_test(name):
                continue
            names.append(name)
        return names

    def move_per_test(self, request: Any, name: str, idle: List[Any], threads: List[Any]) -> str:
        """name's set-up left threads running: tear down what it set up, here and now, and
        set it up in each test's worker instead."""
        fresh = [d for d in idle if d.cached_result is not None]
        for d in reversed(fresh):
            try:
                d.finish(request)
            except BaseException as exc:  # reported, not fatal: the warning names it
                sys.stderr.write("pytest-isolate zygote: tearing down %s: %r\n" % (d.argname, exc))
        names = sorted(set([name] + [d.argname for d in fresh]))
        for n in names:
            self.per_test[n] = "threads"
            request._fixture_defs.pop(n, None)  # set up afresh in the worker
        where = ", ".join("%r (%s-scoped)" % (d.argname, d.scope) for d in fresh) or repr(name)
        return ("pytest-isolate: setting up %s started threads (%s); threads do not survive "
                "the fork into each test's worker, so %s now set up and torn down in every "
                "test instead of once. Say so with @pytest.mark.isolate(..., "
                "fixtures_per_test=%r) to silence this, or start the threads lazily."
                % (where, ", ".join(t.name for t in threads[:5]),
                   "it is" if len(names) == 1 else "they are", names))

    def keep_scopes(self, item: Any) -> Any:
        """In the test's worker: the nextitem to run item with, and a teardown that also
        ends what the test set up at a higher scope itself (a per-test fixture,
        request.getfixturevalue in the test) -- the zygote's own stay untouched."""
        from _pytest.outcomes import TEST_OUTCOME

        ss = item.session._setupstate
        keep = _KeepScopes(item, item.listchain()[:-1])
        counts = {node: len(entry[0]) for node, entry in ss.stack.items()}
        original = ss.teardown_exact

        def teardown_exact(nextitem: Any) -> None:
            errors: List[BaseException] = []
            try:
                original(keep)
            except TEST_OUTCOME as exc:
                errors.append(exc)
            for node in reversed(list(ss.stack)):
                fins = ss.stack[node][0]
                while len(fins) > counts.get(node, 0):
                    fin = fins.pop()
                    try:
                        fin()
                    except TEST_OUTCOME as exc:
                        errors.append(exc)
            if len(errors) == 1:
                raise errors[0]
            if errors:
                import builtins

                group: Any = getattr(builtins, "BaseExceptionGroup", None)
                if group is None:
                    raise errors[0]
                raise group("errors during test teardown", errors[::-1])

        ss.teardown_exact = teardown_exact
        return keep

    def op_advance(self, req: Dict[str, Any]) -> None:
        """The host's next test here is req["next"] (None: none): tear down the scopes it
        leaves, and report that as the teardown of req["prev"]."""
        import contextlib

        from _pytest.runner import CallInfo

        items = self.agent.items
        session = self.agent.session
        prev = items.get(req.get("prev") or "")
        nxt = items.get(req.get("next") or "")
        ss = session._setupstate
        needed = nxt.listchain() if nxt is not None else []
        if ss.stack and list(ss.stack) != needed[: len(ss.stack)]:
            if prev is None:
                try:
                    ss.teardown_exact(nxt)
                except Exception:
                    traceback.print_exc()
            else:
                capman = prev.config.pluginmanager.getplugin("capturemanager")
                ctx = (capman.item_capture("teardown", prev) if capman is not None
                       else contextlib.nullcontext())
                with ctx:
                    call = CallInfo.from_call(lambda: ss.teardown_exact(nxt), when="teardown")
                rep = prev.ihook.pytest_runtest_makereport(item=prev, call=call)
                prev._report_sections = []
                config = session.config
                data = config.hook.pytest_report_to_serializable(config=config, report=rep)
                self.send({"op": "report", "data": data})
        self.send({"op": "advanced"})

    def teardown_all(self) -> None:
        session = self.agent.session
        if session is None or not session._setupstate.stack:
            return
        try:
            session._setupstate.teardown_exact(None)
        except BaseException:
            traceback.print_exc()


def _kill_session_leftovers() -> None:
    """SIGKILL what is left in the caller's session (it is a session leader): processes
    a fixture started and its teardown did not end."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == me:  # field 6 of stat: the session id
                os.kill(int(name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def make_pytest_plugin(agent: Agent, req: Dict[str, Any]) -> Any:
    import pytest

    default_envs = list(req.get("default_envs") or [])
    ini_names = list(req.get("ini_names") or [])
    host_markers = list(req.get("markers") or [])

    class AgentPlugin:
        def __init__(self) -> None:
            self.reached_loop = False
            self.errors: List[Dict[str, Any]] = []
            self.config: Any = None

        def pytest_addoption(self, parser: Any) -> None:
            for name in ini_names:
                parser.addini(name, "pytest-isolate host setting (ignored inside)")

        def pytest_addhooks(self, pluginmanager: Any) -> None:
            # the host's hook specs (pytest_isolate.hookspecs is not shipped): a conftest.py
            # registering a backend must not break collection inside
            class HostHookspecs:
                @pytest.hookspec
                def pytest_isolate_backends(self) -> Any:
                    """Backends a plugin provides (used on the host only)."""

            pluginmanager.add_hookspecs(HostHookspecs)

        def pytest_configure(self, config: Any) -> None:
            self.config = config
            config.addinivalue_line("markers", "isolate(*envs): run inside environments")
            # markers the host's plugins register (flaky, timeout, ...) whether or not the
            # plugin is loaded here, so --strict-markers judges them as on the host
            for line in host_markers:
                config.addinivalue_line("markers", line)

        @pytest.hookimpl(trylast=True)
        def pytest_generate_tests(self, metafunc: Any) -> None:
            parametrize_envs(metafunc, default_envs)

        @pytest.hookimpl(wrapper=True)
        def pytest_make_collect_report(self, collector: Any) -> Any:
            # the same split as the host's (IsolateManager.pytest_make_collect_report)
            rep = yield
            if rep.passed and rep.result:
                rep.result[:] = split_items(rep.result, default_envs)[0]
            return rep

        @pytest.fixture
        def isolate_target(self, request: Any) -> Any:
            return getattr(request, "param", None) or item_target(request.node)

        def pytest_collectreport(self, report: Any) -> None:
            if report.failed:
                data = self.config.hook.pytest_report_to_serializable(
                    config=self.config, report=report)
                self.errors.append(data)

        def pytest_runtest_logreport(self, report: Any) -> None:
            data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
            agent.current_sender({"op": "report", "data": data})

        def pytest_exception_interact(self, node: Any, call: Any, report: Any) -> None:
            # --pdb on the host: a post-mortem on the failing test's traceback
            if agent.debugger is not None and call.excinfo is not None:
                agent.debugger.post_mortem(call.excinfo.tb)

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtestloop(self, session: Any) -> bool:
            self.reached_loop = True
            self.config = session.config
            agent.session = session
            agent.items = {item.nodeid: item for item in session.items}
            save_coverage(agent.coverage)  # each test worker measures its own test
            agent.coverage = None
            agent.send(0, {"op": "collected", "nodeids": list(agent.items),
                           "errors": self.errors})
            agent.serve()
            return True

        def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
            if agent.settings.get("coverage"):  # in the test's worker
                agent.coverage = start_coverage(agent.settings["coverage"])

        def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
            save_coverage(agent.coverage)
            agent.coverage = None

    return AgentPlugin()


def main() -> None:
    """Entry point inside the environment (after BOOTSTRAP)."""
    global ROOT_MAP_PROBLEM
    ROOT_MAP_PROBLEM = os.environ.pop(ROOT_MAP_ENV, "")
    request = os.environ.pop(MAP_ROOT_ENV, "")
    if request:
        try:
            map_root_here(json.loads(request))
        except (OSError, ValueError) as exc:
            ROOT_MAP_PROBLEM = str(exc)
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # stray prints go to the log, never onto the channel
    sys.stdout = sys.stderr
    Agent(rfd, wfd).serve()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "launch":
        launch(json.loads(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "probe-root-map":
        try:
            probe_root_map(sys.argv[2], *json.loads(sys.argv[3]))
        except OSError as exc:
            sys.stderr.write("%s\n" % exc)
            sys.exit(1)
    else:
        sys.stderr.write("usage: agent.py launch CONFIG_JSON (or sent as source; see BOOTSTRAP)\n")
        sys.exit(2)
