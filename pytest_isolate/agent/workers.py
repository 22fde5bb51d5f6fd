"""Workers: the agent's view of one (Worker); a worker's start, a fresh root and a PID
namespace of its own (worker_main); what a worker serves (WorkerServer) and a debugger's
terminal (Debugger)."""

from __future__ import annotations

import collections
import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Tuple

from .harden import harden_opts, harden_process, protect_paths
from .mounts import (
    CLONE_NEWNS,
    CLONE_NEWPID,
    MNT_DETACH,
    MS_PRIVATE,
    MS_REC,
    layer_dirs,
    mount,
    overlay,
    pause_init,
    pivot_root,
    populate_root,
    set_pdeathsig,
    size_opt,
    umount,
    unshare,
)
from .ops import in_root_call, pack_path, run_command, set_winsize, unpack_to
from .slots import Slot
from .wire import Frame, FrameDecoder, ProtocolError, encode_frame, error_message, message, write_all

if TYPE_CHECKING:
    from .server import Agent
    from .zygote import Zygote


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
        #: its wait status, once reaped (by the agent, or by its zygote)
        self.status: Optional[int] = None
        #: a zygote's worker: a pidfd of it, sent with "forked" (-1: none)
        self.pidfd = -1
        #: a zygote: the pidfds it sent, not yet matched to their "forked"
        self.pidfds: "collections.deque[int]" = collections.deque()

    def forward(self, obj: Dict[str, Any], blob: bytes) -> None:
        if self.fd < 0:
            return
        try:
            self.sock.sendall(encode_frame(self.ch, obj, blob))
        except OSError:
            pass

    def pump(self, agent: Agent) -> None:
        try:
            if self.zygote:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 16)
                self.pidfds.extend(fds)
            else:
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
                pidfd = self.pidfds.popleft() if obj.get("pidfd") and self.pidfds else -1
                agent.zygote_event(obj, pidfd)
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
        if self.pidfd >= 0:  # a zygote's worker, whose pid may be of another namespace
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass
            return
        try:
            # its process group (a worker leads one): the PID 1s of the PID namespaces it
            # made too (enter_pid_namespace, PidNamespaces), and with them what is left there
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:  # not leading its group yet (just forked)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass


def end_child(body: Callable[[], int]) -> None:
    """In a forked child: run body and end the process with its code (70 when it raised;
    the traceback goes to the log).  A child never returns into its parent's stack.

    A KeyboardInterrupt that escapes body ends the process by SIGINT, as CPython ends a
    program: a test that sends SIGINT to its process group is reported "killed by
    signal 2", whether or not another process of the worker's took the signal too."""
    code = 70
    interrupted = False
    try:
        code = body()
    except KeyboardInterrupt:
        interrupted = True
        traceback.print_exc()
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if interrupted:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


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
                zygote: Optional["Zygote"] = None, slot: Optional[Slot] = None) -> int:
    """Runs in the forked worker: make a fresh root and a PID namespace, then serve.

    A zygote's test worker (zygote given) lays its fresh upper layer over the zygote's
    layers (see Zygote) instead of over the pristine root alone.  Given a slot (slots.py)
    whose namespaces a test before left as they were made, it joins them instead.
    """
    own_capture(agent.session)
    if req.get("kind") == "zygote":
        from .zygote import Zygote  # zygote.py forks its test workers through here

        return Zygote(agent, sock, ch).main()
    isolated = agent.settings.get("isolation") == "overlay"
    if not isolated:
        return WorkerServer(agent, sock, ch, req, root=None, zygote=zygote).serve()
    test = req.get("kind", "test") == "test"
    reused = slot is not None and slot.mnt >= 0
    if slot is not None and reused and not slot.enter():
        # its mounts changed (a checked slot): a root of our own, in its PID namespace
        slot, reused = None, False
    ws = slot.ws if slot is not None else zygote.test_ws if zygote is not None else "/.isolate/ws"
    server = WorkerServer(agent, sock, ch, req, root=None, zygote=zygote, ws=ws)
    server.reused = reused
    if not reused:
        if zygote is None or zygote.pids is None:
            enter_pid_namespace(sock)
        else:
            # the zygote forked this process into a PID namespace of its own (PidNamespaces,
            # a slot's); the zygote's mounts are private already (session_root)
            unshare(CLONE_NEWNS)
        if slot is None:  # (a slot's tmpfs is the zygote's to mount)
            mount("tmpfs", ws, "tmpfs", 0, "mode=755" + size_opt(agent.settings.get("disk")))
        lowers = zygote.lowers if zygote is not None else [agent.settings["lower"]]
        root = server.mount_layers(lowers, shm=slot.shm if slot is not None else None)
        if not test:
            server.root = root
        else:
            pivot_root(root, allow_move=True)
            if slot is not None:
                slot.hand_over()
    set_pdeathsig()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if test:
        os.chdir(agent.settings.get("cwd") or "/")
        opts = harden_opts(agent.settings)
        if opts is not None:  # every mount is made: the test's code runs from here on
            for note in harden_process(opts):
                sys.stderr.write("pytest-isolate worker: %s\n" % note)
    code = server.serve()
    os._exit(code)


def enter_pid_namespace(sock: socket.socket) -> None:
    """A worker's own PID and mount namespaces, made by the worker itself (a worker the
    agent forks: reset = "module" or "session"; and a zygote's test workers where the
    zygote cannot make theirs, see PidNamespaces).  Returns in the test's process.

    Two processes: this one (in the agent's PID namespace) and the test, PID 2 of the
    new namespace, whose PID 1 is pause_init's (it costs no copy of this process).  The
    test is not PID 1: the kernel drops every signal a namespace's PID 1 sends itself or
    gets from inside without a handler, so a test running as PID 1 would survive its own
    kill(0, SIGKILL) or kill(getpid(), SIGKILL) and go on reporting.  This process waits
    for the test, ends the namespace (what the test left running ends with its PID 1),
    and then ends the way the test ended, so the agent reports "killed by signal N" for
    a test killed by a signal (or the OOM killer).  It closes sock (the test's alone).
    """
    unshare(CLONE_NEWNS | CLONE_NEWPID)
    # Inherited mounts may be shared (LXC makes every container mount shared): pivot_root
    # would fail with EINVAL and the worker's mounts would propagate back to the agent.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test's kill(0, SIGINT) ends us too
    init, _stack = pause_init()
    test = os.fork()
    if test == 0:
        return
    sock.close()
    status = wait_for(test)
    os.kill(init, signal.SIGKILL)
    os.waitpid(init, 0)
    end_like(status)


def enter_root_alone(root: str) -> None:
    """In a process a worker starts for a command (exec, pty): root as its root, in a
    mount namespace of its own with nothing above root.  A chroot alone would leave the
    worker's own root reachable (chroot into a directory, then '..' from outside it), and
    under schroot that is the host's root filesystem (mounts.to_namespace_top)."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    pivot_root(root, allow_move=True)


def wait_for(pid: int) -> int:
    """pid's wait status (pid: a child)."""
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def end_like(status: int) -> NoReturn:
    """End this process the way the one whose wait status this is ended (the same exit
    code, or killed by the same signal), so that whoever waits for this one sees that."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        import resource

        # the other dumped core already if it was going to; this copy must not
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL, SIGSTOP: no handler to reset
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


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
        #: this worker joined a slot's namespaces that a test before it left (slots.py)
        self.reused = False

    def send(self, obj: Dict[str, Any], blob: bytes = b"") -> None:
        self.sock.sendall(encode_frame(self.ch, obj, blob))

    def mount_layers(self, lowers: List[str], shm: Optional[str] = None) -> str:
        self.generation += 1
        root, self.upper, work = layer_dirs(self.ws, self.generation)
        self.lowers = list(lowers)
        overlay(root, lowers, self.upper, work)
        s = self.agent.settings
        binds = [[p, p, False] for p in s.get("binds", [])]
        populate_root(root, binds, "/dev", fresh_dev=False, size=s.get("disk"), tmp=False,
                      shm=shm)
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
                    self.send(error_message(exc))

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
                    enter_root_alone(root)
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
        set_winsize(fd, req)
        self.send(message("pty-started"))
        try:
            self._relay_pty(pid, fd)
        finally:
            os.close(fd)
            _, status = os.waitpid(pid, 0)
        self.send(message("pty-exit", code=os.waitstatus_to_exitcode(status)))

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
                self.send(message("pty-out"), out)
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
                    set_winsize(fd, obj)
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
            enter_root_alone(root)
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
        self.send(message("ok"))

    def op_get(self, req: Dict[str, Any], blob: bytes) -> None:
        path = req["path"]
        self.send(message("ok"), in_root_call(self.root, lambda: pack_path(path)))

    def op_snapshot(self, req: Dict[str, Any], blob: bytes) -> None:
        self._require_layers()
        frozen = [self.upper, *self.lowers]
        self._remount(frozen)
        self.snapshots[req["name"]] = frozen
        self.send(message("ok"))

    def op_restore(self, req: Dict[str, Any], blob: bytes) -> None:
        self._require_layers()
        name = req["name"]
        if name not in self.snapshots:
            raise KeyError("no snapshot named %r (taken: %s)" % (name, sorted(self.snapshots) or "none"))
        self._remount(self.snapshots[name])
        self.send(message("ok"))

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
            self.send(message("missing", nodeid=req["nodeid"], known=sorted(items)[:50]))
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
        self.send(message("done", nodeid=req["nodeid"], reused=self.reused))


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
            set_winsize(self.master, self.req)
            self.server.send(message("pty-started"))
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
                    server.send(message("pty-out"), out)
            if sock in ready:
                if not server.read_frames():
                    return
                while server.pending and server.pending[0][1]["op"] in ("pty-in", "pty-resize"):
                    _, obj, data = server.pending.popleft()
                    if obj["op"] == "pty-in":
                        write_all(self.master, data)
                    else:
                        set_winsize(self.master, obj)

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
                self.server.send(message("pty-out"), out)
        except OSError:
            pass
        os.close(self.slave)
        os.close(self.master)
        self.server.send(message("pty-exit", code=0))
