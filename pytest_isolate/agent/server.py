"""The agent: serves channel 0 inside an environment, forks and relays its workers,
runs pytest inside with its plugin; ``main`` is where the bootstrap enters."""

from __future__ import annotations

import json
import os
import platform
import select
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .collect import item_target, parametrize_envs, split_items
from .mounts import MAP_ROOT_ENV, MS_RDONLY, ROOT_MAP_ENV, map_root_here, mount
from .ops import limit_guest, oom_kills, pack_path, run_command
from .wire import (
    DEFAULT_PATH,
    PROTOCOL_VERSION,
    FrameDecoder,
    drain,
    encode_frame,
    error_message,
    message,
    write_all,
)
from .workers import Debugger, Worker, end_child, worker_main

#: why the environment's root is the host's although it was asked not to be ("": it is not)
ROOT_MAP_PROBLEM = ""

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
        #: where reports go: channel 0 here, the worker's socket in a worker
        self.current_sender: Callable[..., None] = lambda obj, blob=b"": self.send(0, obj, blob)
        #: frames read while waiting for one message (wait_for), served first by serve()
        self.backlog: List[Tuple[int, Dict[str, Any], bytes]] = []

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
            for w in self.workers.values():
                if w.pid == pid and not w.via:  # our own child (a zygote's are its to reap)
                    w.status = status

    def wait_for(self, op: str) -> Optional[Dict[str, Any]]:
        """The next message op on channel 0, routing what comes before it as serve() would
        (what came after it waits in the backlog); None when the stream ends or the host
        shuts the agent down first."""
        while self.running:
            while self.backlog:
                ch, obj, blob = self.backlog.pop(0)
                if ch == 0 and obj.get("op") == op:
                    return obj
                self.route(ch, obj, blob)
                if not self.running:
                    return None
            data = os.read(self.rfd, 1 << 20)
            if not data:
                self.running = False
                return None
            self.backlog.extend(self.decoder.feed(data))
        return None

    def serve(self) -> None:
        while self.backlog and self.running:
            self.route(*self.backlog.pop(0))
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
                if w.fd < 0 and (w.status is not None or w.orphaned):
                    self.finish(w)
        for w in list(self.workers.values()):
            w.kill("agent shutting down")

    def finish(self, w: "Worker") -> None:
        # a zygote's worker that will never be reaped ended with its zygote (SIGKILL)
        if w.status is not None:
            status = w.status
        else:
            status = int(signal.SIGKILL)
            w.kill_reason = w.kill_reason or w.orphaned
        del self.workers[w.ch]
        if w.pidfd >= 0:
            os.close(w.pidfd)
        if w.zygote:
            if w.pid is not None:
                try:  # what it left in its process group (PidNamespaces' PID 1s)
                    os.killpg(w.pid, signal.SIGKILL)
                except OSError:
                    pass
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
        self.send(w.ch, message("exit", code=code, reason=reason))

    def zygote_event(self, obj: Dict[str, Any], pidfd: int = -1) -> None:
        """A zygote forked a test worker (pidfd: a pidfd of it, or -1), or reaped one.
        The pid is in the zygote's PID namespace, which need not be ours (Zygote.main):
        the worker is killed through its pidfd where there is one."""
        w = self.workers.get(int(obj["ch"]))
        if w is None:
            if pidfd >= 0:
                os.close(pidfd)
            return
        if obj["op"] == "forked":
            w.pid = int(obj["pid"])
            w.pidfd = pidfd
            if w.kill_reason is not None:  # timed out while the zygote set up
                w.kill(w.kill_reason, self)
        else:
            w.status = int(obj["status"])

    def route(self, ch: int, obj: Dict[str, Any], blob: bytes) -> None:
        if ch:
            w = self.workers.get(ch)
            if w is None:
                self.send(ch, message("error", message="no worker on channel %d" % ch))
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
            self.send(0, error_message(exc))

    # -- channel 0 operations
    def op_hello(self, req: Dict[str, Any], blob: bytes) -> None:
        try:
            with open("/proc/self/uid_map") as f:  # [inside, host, count] of the first range
                uid_map = [int(x) for x in f.read().split()[:3]]
        except (OSError, ValueError):
            uid_map = []
        self.send(0, message("hello", protocol=PROTOCOL_VERSION, python=list(sys.version_info[:3]),
                             machine=platform.machine(), pid=os.getpid(), uid=os.getuid(),
                             executable=sys.executable, uid_map=uid_map,
                             root_map_problem=ROOT_MAP_PROBLEM))

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
        self.send(0, message("ok"))

    def op_pytest(self, req: Dict[str, Any], blob: bytes) -> None:
        """Start a pytest session; its runtest loop becomes this agent's serve loop."""
        if self.session is not None:
            raise RuntimeError("a pytest session is already running")
        os.chdir(req["cwd"])
        import pytest

        plugin = make_pytest_plugin(self, req)
        # the host's plugins that are installed here too (the others: said by the host)
        args = list(req["args"])
        wanted = list(req.get("plugins") or ())
        if wanted:
            have = installed_plugins()
            args += [arg for name in wanted if name in have for arg in ("-p", name)]
            plugin.missing = [name for name in wanted if name not in have]
        # coverage of collection (imports, module-level code) as on the host's pytest-cov
        self.coverage = start_coverage(self.settings.get("coverage"))
        code = pytest.main(args, plugins=[plugin])
        if not plugin.reached_loop and self.running:
            self.send(0, message("error", type="PytestStartError",
                                 message="pytest inside the environment exited with %s before "
                                 "running tests (see the agent log)" % (code,)))
        # the session ended: either the host shut us down, or the stream ended.

    def op_preload(self, req: Dict[str, Any], blob: bytes) -> None:
        """Import pytest and its built-in plugins now, before a run asks for pytest (a
        warm environment waits for its run so, see the host's pytest_isolate/warm.py)."""
        import importlib

        import pytest  # noqa: F401

        try:  # the list pytest's Config imports from (no public name for it)
            from _pytest.config import default_plugins as names
        except ImportError:
            names = ()  # type: ignore[assignment]
        for name in names:
            try:
                importlib.import_module("_pytest." + name)
            except ImportError:
                pass
        self.send(0, message("ok"))

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
        self.send(0, message("coverage", files=len(names)), data)

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
            def child() -> int:
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
                return worker_main(self, b, ch, req)

            end_child(child)
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
        frame = encode_frame(zch, message("fork", **{k: v for k, v in req.items() if k != "op"}))
        try:
            socket.send_fds(z.sock, [frame], [b.fileno()])
        except OSError as exc:
            w.orphaned = "cannot reach the zygote: %s" % exc
        finally:
            b.close()

    def op_shutdown(self, req: Dict[str, Any], blob: bytes) -> None:
        self.running = False


def installed_plugins() -> Set[str]:
    """The names of the pytest11 entry points installed here."""
    import importlib.metadata

    eps = importlib.metadata.entry_points()
    group = (eps.select(group="pytest11") if hasattr(eps, "select")
             else eps.get("pytest11", []))  # type: ignore[attr-defined,arg-type,unused-ignore]
    return {ep.name for ep in group}


def make_pytest_plugin(agent: Agent, req: Dict[str, Any]) -> Any:
    import pytest

    default_envs = list(req.get("default_envs") or [])
    ini_names = list(req.get("ini_names") or [])
    host_markers = list(req.get("markers") or [])
    deferred = bool(req.get("deferred"))

    class AgentPlugin:
        def __init__(self) -> None:
            self.reached_loop = False
            self.errors: List[Dict[str, Any]] = []
            #: the host's plugins not installed here
            self.missing: List[str] = []
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

        @pytest.hookimpl(tryfirst=True)
        def pytest_collection(self, session: Any) -> None:
            # deferred: configured from the host's own arguments while the host collected;
            # the files to collect are the ones it bound to this environment
            if not deferred:
                return
            agent.send(0, message("waiting", missing=self.missing))
            files = agent.wait_for("files")
            if files is None:
                pytest.exit("the host ended the run before collection", returncode=2)
            session.config.args = list(files["args"])

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
            agent.current_sender(message("report", data=data))

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
            agent.send(0, message("collected", nodeids=list(agent.items), errors=self.errors,
                                  missing=self.missing))
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
