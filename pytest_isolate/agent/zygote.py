"""The zygote: the process that holds an environment's session- and module-scoped
fixtures when the state is reset per test, and forks each test's worker from there."""

from __future__ import annotations

import collections
import gc
import os
import platform
import select
import signal
import socket
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .harden import SYSCALL_NUMBERS, cached_seccomp_program, harden_opts, harden_process, protect_paths
from .mounts import (
    CLONE_NEWPID,
    PidNamespaces,
    loopback_up,
    pivot_root,
    session_root,
    set_pdeathsig,
    unshare,
)
from .slots import Slots
from .wire import FrameDecoder, drain, encode_frame, error_message, message
from .workers import end_child, end_like, wait_for, worker_main

if TYPE_CHECKING:
    from .server import Agent


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
        #: each test worker's PID namespace (isolated backends)
        self.pids: Optional[PidNamespaces] = None
        #: test workers' namespaces kept for later tests (isolated backends)
        self.slots: Optional[Slots] = None
        #: counts what the zygote set up or tore down: a slot is reused in its generation only
        self.generation = 0

    def send(self, obj: Dict[str, Any], blob: bytes = b"") -> None:
        self.sock.sendall(encode_frame(self.ch, obj, blob))

    def main(self) -> int:
        if self.agent.settings.get("isolation") == "overlay":
            pids = PidNamespaces.probe()
            if pids is None and hasattr(os, "pidfd_open"):
                self.own_pid_namespace()
                pids = PidNamespaces.probe()
            self.enter_layer()
            self.pids = pids
            if pids is not None and len(os.listdir("/proc/self/task")) == 1:
                # One thread: a worker forked from here may join a mount namespace (setns
                # refuses a process whose threads share its root); under qemu-user (a
                # foreign architecture) the emulator's own thread is in every process.
                # Hardened, a test cannot change its mounts; elsewhere (a VM, privileged)
                # each slot's mount table is checked before it is used again.
                self.slots = Slots(self.test_ws, pids, self.agent.settings.get("disk"),
                                   checked=harden_opts(self.agent.settings) is None)
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
            if self.slots is not None:
                self.slots.close()
            _kill_session_leftovers()
        return 0

    def own_pid_namespace(self) -> None:
        """Go on as PID 1 of a PID namespace of our own (see PidNamespaces: one that the
        user namespace we run in owns, so that we may go back into it after each test
        worker's).  The process the agent forked stays, waits and ends the way we end;
        our pids are not the agent's from here on ("forked" sends a pidfd).  What the
        fixtures held here start runs in this namespace, and ends with it."""
        unshare(CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            set_pdeathsig()
            return
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        end_like(wait_for(pid))

    def enter_layer(self) -> None:
        s = self.agent.settings
        root, self.lowers = session_root(s["lower"], self.WS, s.get("binds", []), s.get("disk"))
        if harden_opts(s) is not None:
            protect_paths(root)
        os.makedirs(self.test_ws, exist_ok=True)
        pivot_root(root, allow_move=True)
        os.chdir(s.get("cwd") or "/")
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
                    self.send(error_message(exc))
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
                if self.slots is not None and self.slots.ended(pid, status):
                    pass
                elif self.pids is not None:
                    self.pids.ended(pid)
                self.send(message("reaped", ch=ch, pid=pid, status=status))
        if self.pids is not None:
            self.pids.reap()

    def op_ping(self, req: Dict[str, Any]) -> None:
        self.send(message("pong", per_test=sorted(self.per_test)))

    def op_close(self, req: Dict[str, Any]) -> None:
        self.running = False

    def op_fork(self, req: Dict[str, Any]) -> None:
        fd = self.fds.popleft()
        ch = int(req["ch"])
        item = self.agent.items.get(req.get("nodeid") or "")
        warnings: List[str] = []
        slot = None
        try:
            if item is not None:
                warnings = self.prepare(item)
            gc.freeze()  # (see changing)
            if self.slots is not None:
                slot = self.slots.take(self.generation)
                pid = self.slots.fork(slot)
            else:
                pid = self.pids.fork() if self.pids is not None else os.fork()
        except Exception as exc:
            self.not_forked(fd, ch, exc)
            return
        if pid == 0:
            def child() -> int:
                os.setsid()  # a test's kill(0, sig) never reaches the zygote
                set_pdeathsig()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for other in (self.sigr, self.sigw, *self.fds):
                    os.close(other)
                self.sock.close()
                sock = socket.socket(fileno=fd)
                for text in warnings:
                    sock.sendall(encode_frame(ch, message("warning", message=text)))
                return worker_main(self.agent, sock, ch, dict(req, kind="test"), zygote=self,
                                   slot=slot)

            end_child(child)
        os.close(fd)
        self.children[pid] = ch
        if item is not None:
            item._report_sections = []  # the worker reports what the set-up printed
        self.send_forked(ch, pid)

    def changing(self) -> None:
        """The zygote is about to set up or tear down something: a new generation (slots),
        and the collector may scan the zygote's objects again while fixture code runs.

        Before each fork (op_fork) every object goes to the collector's permanent
        generation, which it never scans (gc.freeze, constant time).  A worker's
        collections then look at what the worker made only, instead of writing to the
        header of every object the zygote holds: a copy of each of those pages, per test
        (under TCG, a full collection in a worker cost ten times its fork).  Thawed here,
        so that the garbage of the zygote's own set-ups and teardowns is collected."""
        self.generation += 1
        gc.unfreeze()

    def not_forked(self, fd: int, ch: int, exc: Exception) -> None:
        """The worker for channel ch could not be forked (no process left under a pids
        limit, a bug): its channel says why, and ends as a worker that exited 70 would."""
        with socket.socket(fileno=fd) as sock:
            try:
                sock.sendall(encode_frame(ch, error_message(exc)))
            except OSError:
                pass
        self.send(message("reaped", ch=ch, pid=0, status=70 << 8))

    def send_forked(self, ch: int, pid: int) -> None:
        """"forked", with a pidfd of the worker where the kernel makes one: our pids need
        not be the agent's (main), a pidfd names the process in any namespace."""
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3
            self.send(message("forked", ch=ch, pid=pid, pidfd=False))
            return
        try:
            frame = encode_frame(self.ch, message("forked", ch=ch, pid=pid, pidfd=True))
            socket.send_fds(self.sock, [frame], [pidfd])
        finally:
            os.close(pidfd)

    # -- pytest's scopes
    def prepare(self, item: Any) -> List[str]:
        """Set up item's collectors and higher-scoped fixtures here; failures are cached
        by pytest, so the worker's set-up raises them with their traceback, as on the host."""
        from _pytest.outcomes import TEST_OUTCOME

        ss = item.session._setupstate
        chain = item.listchain()
        warnings: List[str] = []
        if list(ss.stack) != chain[: len(ss.stack)]:  # the host did not advance: do it now
            self.changing()
            try:
                ss.teardown_exact(item)
            except TEST_OUTCOME as exc:
                warnings.append("pytest-isolate: tearing down the scopes before %s failed "
                                "in the zygote: %s: %s" % (item.nodeid, type(exc).__name__, exc))
        for col in chain[len(ss.stack):-1]:
            self.changing()
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

        from _pytest.outcomes import TEST_OUTCOME

        defs = [d for n in info.names_closure for d in info.name2fixturedefs.get(n, ())]
        for name in names:
            if name in self.per_test:
                continue
            before = set(threading.enumerate())
            idle = [d for d in defs if d.cached_result is None]
            if any(d.argname == name for d in idle):
                self.changing()  # set up now: what it writes goes to the session layer
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
            self.changing()
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
                self.send(message("report", data=data))
        self.send(message("advanced"))

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
