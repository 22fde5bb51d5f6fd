"""The namespace and mount layer, on both sides of the boundary: the host's launcher
builds a namespace backend's root with it (launcher.py), the agent's workers their fresh
roots.  ctypes throughout: os.unshare only exists from Python 3.12.

Also the root mapped away from the host's root (issue 11): user namespaces, idmapped
mounts, and the agent mapping itself where its backend could not (map_root_here).
"""

from __future__ import annotations

import errno
import os
import platform
import signal
import socket
import struct
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:
    import ctypes
except ImportError as exc:  # a Python built without libffi: said once, with the fix
    raise ImportError(f"pytest-isolate's agent needs ctypes, which this Python "
                      f"({sys.executable} {platform.python_version()}) lacks ({exc}); use a "
                      "python3 built with ctypes (libffi), as Debian's, Alpine's and the python "
                      "images' are") from None

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


def check_errno(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def unshare(flags: int) -> None:
    check_errno(libc().unshare(flags), "unshare(0x%x)" % flags)


def mount(src: Optional[str], target: str, fstype: Optional[str], flags: int = 0,
          data: Optional[str] = None) -> None:
    def enc(s: Optional[str]) -> Optional[bytes]:
        return None if s is None else s.encode()

    check_errno(
        libc().mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        "mount %s on %s (%s)" % (src, target, fstype),
    )


def umount(target: str, flags: int = 0) -> None:
    check_errno(libc().umount2(target.encode(), flags), "umount %s" % target)


def pivot_root(new_root: str, allow_move: bool = False) -> None:
    """Make new_root the root and detach the old one (new_root must be a mount point).

    With allow_move (workers inside an environment), where pivot_root(2) is refused
    (EPERM: a seccomp filter such as docker's default profile), move new_root onto /
    and chroot into it, as switch_root does.  The launcher, which guards the host
    boundary, never falls back: a chroot alone can be escaped.
    """
    nr = SYS_PIVOT_ROOT.get(platform.machine())
    new = os.open(new_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        to_namespace_top(new_root)
        os.fchdir(new)
    finally:
        os.close(new)
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


def to_namespace_top(below: str) -> None:
    """Make the top of the mount namespace this process's root, where the root is a
    directory below it (a chroot: schroot starts the agent in one).

    pivot_root from such a root swaps mounts below the top only: the top (the host's root
    filesystem, under schroot) stays above the new root, and a process with CAP_SYS_CHROOT
    -- a test has it, as root in a Docker container does -- reaches it by chroot into a
    directory and '..' from outside it.  From the top, the new root replaces the top, and
    nothing is left above it.  The way up is that same chroot and '..': this process
    chroots into below (a directory under its root), climbs from its old root until '..'
    is '.', and makes that its root."""
    os.chdir("/")
    os.chroot(below)
    while True:
        here, up = os.stat("."), os.stat("..")
        if (here.st_dev, here.st_ino) == (up.st_dev, up.st_ino):
            break
        os.chdir("..")
    os.chroot(".")


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
                  owner: Optional[Tuple[int, int]] = None, shm: Optional[str] = None) -> None:
    """Mount /proc, /dev, /sys, /tmp and the bind mounts into a new root.

    size bounds the tmpfs mounts (/tmp, /dev/shm); tmp=False leaves /tmp in the root's
    own writable layer (a worker's: one budget for both, and part of its snapshots).
    shm: a directory to bind at /dev/shm instead of a tmpfs of its own (a slot's, on the
    slot's tmpfs, where its zygote sees whether a test left anything in it).
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
        shm_dir = os.path.join(dev, "shm")
        if not os.path.isdir(shm_dir):
            pass
        elif shm is not None:
            mount(shm, shm_dir, None, MS_BIND)
            mount(None, shm_dir, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV)
        else:  # its own, not the environment's shared one
            mount("tmpfs", shm_dir, "tmpfs", MS_NOSUID | MS_NODEV,
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


CLONE_VM = 0x00000100
CLONE_FILES = 0x00000400


def setns(fd: int, nstype: int) -> None:
    check_errno(libc().setns(fd, nstype), "setns(0x%x)" % nstype)


def pause_init() -> Tuple[int, Any]:
    """Start the first process (PID 1) of the PID namespace that unshare(CLONE_NEWPID)
    made for the caller's next children, for next to nothing.

    PID 1 only has to exist: while it lives, processes can be forked into the namespace;
    SIGKILLing it ends every process left there.  So it is libc's pause() run by a clone
    that shares the caller's memory and descriptor table (CLONE_VM | CLONE_FILES: no page
    tables copied at its start nor torn down at its end -- a fork of a process that has
    imported pytest costs milliseconds here), with every signal blocked (it never runs a
    handler, and pause() never returns into the shared memory).  It reaps nothing: an
    orphan of the test stays a zombie until the namespace ends with its test.

    Returns its pid and its stack (keep that referenced while the process lives).
    """
    lib = libc()
    stack = ctypes.create_string_buffer(1 << 14)
    top = (ctypes.addressof(stack) + len(stack)) & ~15
    lib.clone.restype = ctypes.c_int
    lib.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    entry = ctypes.cast(lib.pause, ctypes.c_void_p)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = lib.clone(entry, top, CLONE_VM | CLONE_FILES | int(signal.SIGCHLD), None)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if pid < 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # qemu-user (a foreign architecture) clones memory for threads only
            return forked_init(), None
        raise OSError(err, "clone(CLONE_VM): %s" % os.strerror(err))
    return pid, stack


def forked_init() -> int:
    """PID 1 as a fork, where a clone sharing memory is refused: it closes what it
    inherited, and reaps orphans until it is killed."""
    pid = os.fork()
    if pid:
        return pid
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        while True:
            signal.sigwait({signal.SIGCHLD})
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
    finally:
        os._exit(0)


class PidNamespaces:
    """The PID namespaces of a zygote's test workers, made by the zygote around each fork.

    A test gets a PID namespace of its own: the test sees itself and its children only,
    and when it ends, everything it left running ends with it.  A worker that makes its
    own (workers.enter_pid_namespace) costs one more fork and exit of a process that has
    imported pytest and collected the tests, milliseconds here; the zygote instead
    unshares CLONE_NEWPID, starts the namespace's PID 1 for next to nothing (pause_init),
    forks the test's worker into it (PID 2: not PID 1, whose signals from inside the
    kernel drops), and SIGKILLs that PID 1 once the worker has been reaped.  The worker is
    the zygote's own child, so its wait status is the test's.

    unshare(CLONE_NEWPID) changes where the zygote's next children go (and refuses to
    change it again until it is back), so after each fork the zygote goes back with setns.
    That takes CAP_SYS_ADMIN over the user namespace that owns the zygote's own PID
    namespace, which a root mapped after that namespace was made lacks: ``probe`` says
    whether this zygote can; where it cannot, it first goes on as PID 1 of a namespace of
    its own (Zygote.own_pid_namespace), and only without pidfds do its workers make theirs.
    SIGKILL to the zygote's process group (the agent: Worker.kill, finish) ends the
    namespaces' PID 1s, and with them whatever was left in them.
    """

    def __init__(self, own: int) -> None:
        #: the zygote's own PID namespace (an open /proc/self/ns/pid)
        self.own = own
        #: a test worker's pid -> its namespace's PID 1 (and that one's stack)
        self.inits: Dict[int, Tuple[int, Any]] = {}
        #: PID 1s SIGKILLed, not reaped yet
        self.dying: Dict[int, Any] = {}

    @classmethod
    def probe(cls) -> "Optional[PidNamespaces]":
        """PidNamespaces when this process may go back into its own PID namespace."""
        own = os.open("/proc/self/ns/pid", os.O_RDONLY)
        try:
            setns(own, CLONE_NEWPID)  # where its children go already: changes nothing
        except OSError:
            os.close(own)
            return None
        return cls(own)

    def fork(self) -> int:
        """os.fork() into a new PID namespace."""
        init, ns = self.make()
        try:
            pid = self.fork_into(ns)
        except BaseException:
            os.close(ns)
            self.end(init)
            raise
        if pid:
            os.close(ns)
            self.inits[pid] = init
        return pid

    def make(self) -> Tuple[Tuple[int, Any], int]:
        """A new PID namespace: its PID 1 (pid, stack) and an open descriptor of it (not
        /proc/PID/ns/pid of PID 1: that asks for ptrace access, which a mapped root lacks
        over a clone of its own)."""
        unshare(CLONE_NEWPID)
        init: Optional[Tuple[int, Any]] = None
        try:
            init = pause_init()
            return init, os.open("/proc/self/ns/pid_for_children", os.O_RDONLY)
        except BaseException:
            if init is not None:
                self.end(init)
            raise
        finally:
            setns(self.own, CLONE_NEWPID)

    def fork_into(self, ns: int) -> int:
        """os.fork() into the PID namespace ns (from make); the child closes ns and ours."""
        setns(ns, CLONE_NEWPID)
        try:
            pid = os.fork()
        except BaseException:
            setns(self.own, CLONE_NEWPID)
            raise
        if pid == 0:
            os.close(self.own)
            os.close(ns)
        else:
            setns(self.own, CLONE_NEWPID)
        return pid

    def end(self, init: Tuple[int, Any]) -> None:
        try:
            os.kill(init[0], signal.SIGKILL)
        except OSError:
            pass
        self.dying[init[0]] = init[1]

    def ended(self, pid: int) -> None:
        """The test worker pid was reaped: end what is left in its namespace."""
        init = self.inits.pop(pid, None)
        if init is not None:
            self.end(init)

    def reap(self) -> None:
        for pid in list(self.dying):
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got = pid
            if got:
                del self.dying[pid]


def layer_dirs(ws: str, generation: int) -> Tuple[str, str, str]:
    """A worker's root, upper and work directories in its workspace ws (a tmpfs), for the
    generation-th root it mounts there (snapshots remount it)."""
    return "%s/root%d" % (ws, generation), "%s/upper%d" % (ws, generation), "%s/work%d" % (ws, generation)


def overlay(root: str, lowers: Sequence[str], upper: str, work: str) -> None:
    for d in (root, upper, work):
        os.makedirs(d, exist_ok=True)
    mount("overlay", root, "overlay", 0,
          "lowerdir=%s,upperdir=%s,workdir=%s" % (":".join(lowers), upper, work))


def session_root(lower: str, ws: str, binds: Sequence[str], disk: Optional[int]) -> Tuple[str, List[str]]:
    """A zygote's root, not entered yet (the caller protects it and pivots): in a mount
    namespace of the caller's own, an overlay of a session layer (ws/session/upper, on a
    tmpfs at ws) over lower, with the standard mounts and binds, the layers at ws and
    lower at /.isolate/pristine inside.  Returns the root and the lower layers of each
    test worker's root: [the session layer, the pristine root]."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", ws, "tmpfs", 0, "mode=755" + size_opt(disk))
    upper = ws + "/session/upper"
    root = ws + "/root"
    overlay(root, [lower], upper, ws + "/session/work")
    populate_root(root, [[p, p, False] for p in binds], "/dev", fresh_dev=False, size=disk,
                  tmp=False)
    # the layers at the same paths inside (a plain bind: not the root mounted in ws)
    os.makedirs(root + ws, exist_ok=True)
    mount(ws, root + ws, None, MS_BIND)
    # the pristine root at a path of its own (lower may be "/" itself: docker)
    pristine = "/.isolate/pristine"
    bind(lower, root + pristine, readonly=True)
    return root, [upper, pristine]


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
    check_errno(libc().setns(userns_fd, CLONE_NEWUSER), "setns(user namespace)")
    os.close(userns_fd)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


#: what the launcher tells the agent when it could not map root (taken at the agent's start)
ROOT_MAP_ENV = "PYTEST_ISOLATE_ROOT_MAP_PROBLEM"
#: a backend whose launcher cannot map root (schroot's chroot, a privileged LXC container:
#: the agent starts as the host's root) asks the agent to (map_root_here), as JSON
MAP_ROOT_ENV = "PYTEST_ISOLATE_MAP_ROOT"

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
