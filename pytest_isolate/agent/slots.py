"""Slots: the namespaces of a zygote's test workers, kept for a later test while they are
still as they were made (issue 13).

A test worker's clean state is its own PID namespace and its own mount namespace: a fresh
overlay root with /proc, /dev, /sys and the hardening's masks mounted in it.  Making and
tearing down those mounts is most of what a test costs beyond its fork.  Most tests leave
them exactly as they found them: nothing written to the root (its overlay's upper layer
is still empty), nothing in /dev/shm, no process left behind, and (hardened: no
CAP_SYS_ADMIN) no mount changed.  Such a slot is then given to a later test, whose worker
is a fresh fork of the zygote that joins the slot's namespaces (setns) instead of making
its own.

What a slot is:

- a tmpfs of its own, mounted in the zygote's mount namespace (``ws``): the overlay's
  upper and work directories and the directory bound at /dev/shm, so that the zygote
  sees whether they are still empty;
- a PID namespace whose PID 1 is a pause clone (mounts.pause_init);
- the mount namespace its first worker made (unshare, the overlay over the zygote's
  layers, the standard mounts, pivot_root): that worker sends it to the zygote (an
  SCM_RIGHTS message on the slot's socket pair), which holds it open from then on.

A slot is reused only when the zygote has set up or torn down nothing since it was made
(``generation``): the session layer, a lower layer of the slot's overlay, must not have
changed under it.  A later test in a reused slot gets the next free PID there, not 2.

Where tests keep CAP_SYS_ADMIN (a VM's guest, ``privileged = true``), a test may also
mount, unmount or remount in its namespace.  Those slots are ``checked``: the first
worker sends the mount table it made (/proc/self/mountinfo) with the namespace, and each
later worker compares it, once it has joined, with the table it finds.  Once no process
is left in the slot's PID namespace nothing can change its mounts (the zygote holds the
namespace by a descriptor only), so a table that is the same is a namespace as it was
made.  A worker that finds another goes back to the zygote's namespace, makes a root of
its own as a worker without a slot does, and tells the zygote that the slot is spent.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any, Dict, List, Optional, Tuple

from .mounts import (
    CLONE_NEWNS,
    MNT_DETACH,
    PidNamespaces,
    layer_dirs,
    mount,
    setns,
    size_opt,
    umount,
)

#: the largest mount table a checked slot keeps (a larger one is not kept: never the same)
MOUNTS_MAX = 1 << 16


def read_mounts() -> bytes:
    """This process's mount table, as /proc shows it to a process in its mount namespace."""
    with open("/proc/self/mountinfo", "rb") as f:
        return f.read(MOUNTS_MAX + 1)


class Slot:
    """One test worker's namespaces (see the module's docstring)."""

    def __init__(self, ws: str, pidns: int, init: Tuple[int, Any], generation: int,
                 checked: bool = False) -> None:
        self.ws = ws
        _root, self.upper, _work = layer_dirs(ws, 1)  # (the first worker's, see mount_layers)
        self.shm = ws + "/shm"
        #: its PID namespace (a descriptor, PidNamespaces.make) and its PID 1
        self.pidns = pidns
        self.init = init
        #: its mount namespace, once its first worker has sent it (-1: not yet)
        self.mnt = -1
        #: the zygote's end of the pair its first worker sends that on, and the worker's
        self.keep, self.give = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.keep.setblocking(False)  # (recv_fds passes no flags before Python 3.12)
        self.generation = generation
        #: the mount table its first worker made, when tests may change it (checked)
        self.checked = checked
        self.mounts = b""
        #: a later worker found the mount table changed (see the module's docstring)
        self.spent = False
        #: the worker in it now (0: none)
        self.worker = 0

    def close_all(self) -> None:
        """Close every descriptor of the slot (in a worker: another slot's)."""
        for fd in (self.pidns, self.mnt):
            if fd >= 0:
                os.close(fd)
        self.pidns = self.mnt = -1
        self.keep.close()
        self.give.close()

    # -- in the worker
    def enter(self) -> bool:
        """Join the slot's mount namespace: the root a test before left as it was made (the
        caller is in the slot's PID namespace already: the zygote forked it there).  False
        when a checked slot's mounts changed: the caller is still in the zygote's mount
        namespace, and makes a root of its own."""
        home = os.open("/proc/self/ns/mnt", os.O_RDONLY) if self.checked else -1
        try:
            setns(self.mnt, CLONE_NEWNS)
            if home >= 0 and read_mounts() != self.mounts:
                setns(home, CLONE_NEWNS)
                self.give.send(b"x")
                return False
            return True
        finally:
            if home >= 0:
                os.close(home)
            os.close(self.mnt)
            self.mnt = -1
            self.give.close()

    def hand_over(self) -> None:
        """The first worker, once its root is made and entered: send its mount namespace
        (and a checked slot's mount table) to the zygote."""
        fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
        try:
            socket.send_fds(self.give, [b"m" + (read_mounts() if self.checked else b"")], [fd])
        finally:
            os.close(fd)
            self.give.close()

    # -- in the zygote
    def receive(self) -> None:
        """Take what the slot's workers sent: its first worker's namespace (and mount
        table), a later worker's "spent"."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.keep, MOUNTS_MAX, 1)
            except OSError:
                return
            if not data:
                return
            if data[:1] == b"x":
                self.spent = True
            for fd in fds:
                if self.mnt < 0 and data[:1] == b"m":
                    self.mnt, self.mounts = fd, data[1:]
                else:
                    os.close(fd)

    def as_made(self) -> bool:
        """Whether what the last test did left the slot as it was made: no process in its PID
        namespace but PID 1 (whose children are the orphans, zombies included, of the
        test), and an empty upper layer and /dev/shm."""
        if self.spent:
            return False
        pid = self.init[0]
        try:
            with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
                if f.read().strip():
                    return False
            return not os.listdir(self.upper) and not os.listdir(self.shm)
        except OSError:  # no such file (a kernel without CONFIG_PROC_CHILDREN), PID 1 gone
            return False


class Slots:
    """A zygote's slots: ``take`` one for the next test (an idle one, or a new one),
    ``fork`` its worker into it, and when the worker is reaped (``ended``) keep the slot for
    another test if it is as it was made, else end it."""

    def __init__(self, base: str, pids: PidNamespaces, size: Optional[int], keep: int = 2,
                 checked: bool = False) -> None:
        self.base = base
        self.pids = pids
        self.size = size
        #: idle slots kept at most (the next test's worker is forked while a test runs)
        self.keep = keep
        #: tests may change their mounts: check each slot's (see the module's docstring)
        self.checked = checked
        self.idle: List[Slot] = []
        self.busy: Dict[int, Slot] = {}
        self.made = 0

    def take(self, generation: int) -> Slot:
        while self.idle:
            slot = self.idle.pop()
            if slot.generation == generation:
                return slot
            self.end(slot)
        return self.make(generation)

    def make(self, generation: int) -> Slot:
        self.made += 1
        ws = "%s/s%d" % (self.base, self.made)
        os.makedirs(ws, exist_ok=True)
        mount("tmpfs", ws, "tmpfs", 0, "mode=755" + size_opt(self.size))
        try:
            os.mkdir(ws + "/shm", 0o1777)
            os.chmod(ws + "/shm", 0o1777)  # past the umask
            init, pidns = self.pids.make()
        except BaseException:
            umount(ws, MNT_DETACH)
            raise
        return Slot(ws, pidns, init, generation, self.checked)

    def fork(self, slot: Slot) -> int:
        """os.fork() into slot's PID namespace; the child closes what is not its own (the
        other slots', the zygote's end of this one)."""
        try:
            pid = self.pids.fork_into(slot.pidns)
        except BaseException:
            self.end(slot)
            raise
        if pid == 0:
            slot.pidns = -1  # (closed by fork_into)
            for other in [*self.idle, *self.busy.values()]:
                other.close_all()
            slot.keep.close()
            return 0
        slot.worker = pid
        self.busy[pid] = slot
        return pid

    def ended(self, pid: int, status: int) -> bool:
        """pid was reaped: keep its slot if it is as it was made (False: pid had none)."""
        slot = self.busy.pop(pid, None)
        if slot is None:
            return False
        slot.worker = 0
        slot.receive()
        if status == 0 and slot.mnt >= 0 and len(self.idle) < self.keep and slot.as_made():
            self.idle.append(slot)
        else:
            self.end(slot)
        return True

    def end(self, slot: Slot) -> None:
        """End slot: its PID 1 (and with it anything left in its PID namespace), its mount
        namespace (with the last reference to it), its tmpfs."""
        slot.close_all()
        self.pids.end(slot.init)
        try:
            umount(slot.ws, MNT_DETACH)
            os.rmdir(slot.ws)
        except OSError:
            pass

    def close(self) -> None:
        for slot in [*self.idle, *self.busy.values()]:
            if slot.worker:
                try:
                    os.kill(slot.worker, signal.SIGKILL)
                except OSError:
                    pass
            self.end(slot)
        self.idle.clear()
        self.busy.clear()
