"""The run of one isolated item: through the agent, reported like a local test.

ItemRun takes its environment's instance and workers from the InstancePool
(pool.py), sends the item's runtest to a worker (forked from the environment's zygote
with reset = "test"), rebuilds the reports the agent sends and feeds them to the
host's reporting hooks; a worker or agent that ends early becomes a failed phase.
"""

from __future__ import annotations

import shutil
from typing import Any, Literal

import pytest
from _pytest.reports import TestReport

from pytest_isolate import hostplugins
from pytest_isolate.agent.wire import message
from pytest_isolate.backends.base import Instance
from pytest_isolate.channel import log_tail
from pytest_isolate.errors import (
    AgentLost,
    AgentTimeout,
    BackendUnavailable,
    IsolateError,
)
from pytest_isolate.keys import ENV_KEY
from pytest_isolate.pool import (
    HOST_GRACE,
    SPEC_KEY,
    InstancePool,
    KeptWorker,
    WorkerChannel,
    release_worker,
)
from pytest_isolate.sizes import format_size
from pytest_isolate.timing import PhaseTimer, TestRecord

#: How long the host waits for a test that is being debugged (--pdb): a working day.
DEBUG_WAIT = 8 * 3600.0
When = Literal["setup", "call", "teardown"]


def keeps_scopes(item: pytest.Item, nxt: pytest.Item) -> bool:
    """True when nxt needs every collector item needs (its session, package, module and
    class): a zygote going from item to nxt tears nothing down."""
    mine = [node.nodeid for node in item.listchain()[:-1]]
    return [node.nodeid for node in nxt.listchain()[: len(mine)]] == mine


def shares_fixtures(item: pytest.Item, nxt: pytest.Item) -> bool:
    """True when going from item to nxt, a zygote sets up and tears down nothing: the same
    scopes, and nxt's higher-scoped fixtures are among item's, with the same parameters.
    (Then nxt's worker can be forked while item runs, without a fixture changing under it.)"""
    if not keeps_scopes(item, nxt):
        return False
    mine, theirs = higher_scoped(item), higher_scoped(nxt)
    if mine is None or theirs is None or not theirs <= mine:
        return False
    params = [getattr(getattr(it, "callspec", None), "indices", {}) for it in (item, nxt)]
    return all(params[0].get(name) == params[1].get(name) for name in theirs)


def higher_scoped(item: pytest.Item) -> set[str] | None:
    """The names of item's fixtures above function scope (None: not a fixture user)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    return {name for name in info.names_closure
            if (defs := info.name2fixturedefs.get(name)) and defs[-1].scope != "function"}


class ItemRun:
    """Runs one bound item through the agent and reports it like a local test."""

    def __init__(self, pool: InstancePool, item: pytest.Item, nextitem: pytest.Item | None,
                 log: hostplugins.Log | None = None):
        #: where the item's environment, its workers and the run's report are
        self.pool = pool
        self.item = item
        #: where this run's reports go: the host's reporting hooks, or a rerun loop
        self.log: hostplugins.Log = log or (
            lambda rep: item.ihook.pytest_runtest_logreport(report=rep))
        self.nextitem = nextitem
        self.env = item.stash[ENV_KEY]
        self.spec = item.stash[SPEC_KEY]
        self.timer = PhaseTimer()
        self.last_when: str | None = None
        self.outcome = "passed"
        self.pending_teardown: TestReport | None = None

    @property
    def timeout(self) -> float:
        # pytest-timeout's limit for this test, then the environment's
        return hostplugins.timeout_of(self.item) or self.spec.timeout or self.pool.settings.timeout

    def scope_key(self, nodeid: str) -> str:
        if self.spec.reset == "session":
            return "session"
        if self.spec.reset == "module":
            return nodeid.split("::", 1)[0]
        return nodeid

    def next_in_worker(self) -> str | None:
        nxt = self.nextitem
        if nxt is None or self.spec.reset == "test" or nxt.stash.get(ENV_KEY, None) != self.env:
            return None
        if self.scope_key(nxt.nodeid) != self.scope_key(self.item.nodeid):
            return None
        return nxt.nodeid

    def run(self) -> None:
        try:
            inst = self.pool.instance(self.env, self.timer)
            self.pool.ensure_pytest(self.env, inst, self.timer)
            if self.item.nodeid not in inst.collected:
                self.fail("setup", self.not_collected_message(inst))
                return
            self.run_in(inst)
        except BackendUnavailable as exc:
            if not self.pool.settings.strict:
                self.skip(str(exc))  # identical reasons: the summary shows it once
                return
            first = self.pool.unavailable_shown.setdefault(self.env, self.item.nodeid)
            if first == self.item.nodeid:
                self.fail("setup", f"{exc} (--isolate-strict turns this skip into a failure)")
            else:
                self.fail("setup", f"backend {exc.backend!r} of environment {self.env!r} is "
                                   f"unavailable (--isolate-strict); {first} shows why")
        except (AgentLost, AgentTimeout) as exc:
            lost = self.pool.instances.get(self.env)
            # an environment that died while starting never was in instances: its log is
            # still where the backend wrote it
            agent_log = (lost.logs.get("agent") if lost is not None
                         else self.pool.run_context().log_dir / self.env / "agent.log")
            tail = log_tail(agent_log)
            self.pool.drop(self.env)
            self.synthesize(f"{exc}\n--- environment log tail ---\n{tail}")
        except (IsolateError, OSError) as exc:
            message = f"pytest-isolate: {type(exc).__name__}: {exc}"
            current = self.pool.instances.get(self.env)
            if current is not None:
                message += f"\n--- environment log tail ---\n{log_tail(current.logs.get('agent'))}"
            self.fail("setup", message)
        finally:
            self.pool.report.tests.append(
                TestRecord(self.item.nodeid, self.env, self.outcome, dict(self.timer.phases)))
            stats = self.pool.report.envs.get(self.env)
            if stats is not None:
                stats.tests += 1
                stats.run_total += self.timer.phases.get("run", 0.0)

    def not_collected_message(self, inst: Instance) -> str:
        path = self.item.nodeid.split("::", 1)[0]
        for err in inst.collect_errors:
            if err.get("nodeid", "").split("::", 1)[0] == path:
                rep = self.pool.config.hook.pytest_report_from_serializable(
                    config=self.pool.config, data=err)
                return f"collecting {path} inside environment {self.env!r} failed:\n{rep.longreprtext}"
        return (f"{self.item.nodeid} was not collected inside environment {self.env!r}; "
                "collection differs between the host and the environment")

    def run_in(self, inst: Instance) -> None:
        scope = self.scope_key(self.item.nodeid)
        worker, zygote = self.take_worker(inst, scope)
        nxt = self.next_in_worker()
        with self.timer.phase("run"):
            exit_reason = self.run_test(inst, worker, zygote, scope, nxt)
        if exit_reason is not None:
            tail = log_tail(inst.logs.get("agent"))
            self.synthesize(f"test worker inside environment {self.env!r} ended: {exit_reason}"
                            f"\n--- environment log tail ---\n{tail}")
            if zygote is not None:
                self.check_zygote(inst, zygote)
        elif self.outcome == "failed" and self.pool.settings.keep_failed:
            # keep the worker (its root as the test left it) for a shell after the run
            self.pool.workers.pop(self.env, None)
            self.pool.kept.append(KeptWorker(self.env, inst, worker.ch, self.item.nodeid))
        elif zygote is not None:
            # its reports are all in and its root goes with it: no need to wait for its exit
            release_worker(inst, worker.ch)
        elif nxt is None:
            with self.timer.phase("reset"):
                self.close_worker(inst, worker)
        if zygote is not None and exit_reason is None:
            with self.timer.phase("reset"):
                self.advance(inst, zygote)
        self.flush()

    def take_worker(self, inst: Instance, scope: str
                    ) -> tuple[WorkerChannel, WorkerChannel | None]:
        """The worker this test runs in, and the zygote it was forked from (reset = "test";
        else None: the worker of the test's module or session, kept between its tests)."""
        conn = inst.conn
        worker = self.pool.workers.get(self.env)
        if worker is not None and worker.scope != scope:
            self.close_worker(inst, worker)
            worker = None
        zygote = self.zygote(inst) if self.spec.reset == "test" else None
        if zygote is not None:
            # a worker per test, forked by the zygote that holds the higher scopes (ahead
            # of time, while the previous test ran, when that one left the scopes alone)
            prepared = self.pool.prepared.get(self.env)
            if prepared is not None and prepared[0] == self.item.nodeid:
                worker = self.pool.prepared.pop(self.env)[1]
            else:
                if self.pool.last_run.get(self.env) != self.item.nodeid:
                    # not a rerun of the test before (which keeps what was prepared for
                    # the next): the test prepared for is not coming next after all
                    self.pool.discard_prepared(self.env)
                worker = self.fork_worker(inst, zygote, self.item.nodeid, scope)
            self.pool.last_run[self.env] = self.item.nodeid
        elif worker is None:
            worker = WorkerChannel(conn.open_worker("test"), scope)
            self.pool.workers[self.env] = worker
        return worker, zygote

    def run_test(self, inst: Instance, worker: WorkerChannel, zygote: WorkerChannel | None,
                 scope: str, nxt: str | None) -> str | None:
        """Send the runtest and take the worker's frames until the test is done; the
        reason the worker ended, when it did."""
        conn = inst.conn
        debug = hostplugins.debug_inside(self.pool.config)
        if debug:  # a debugging session has no time limit, as pytest-timeout stops for one
            cols, rows = shutil.get_terminal_size()
            request = message("runtest", nodeid=self.item.nodeid, next=nxt, timeout=None,
                              debug=True, rows=rows, cols=cols)
        else:
            request = message("runtest", nodeid=self.item.nodeid, next=nxt, timeout=self.timeout)
        conn.send(worker.ch, request)
        if zygote is not None and not debug:
            self.prepare_next(inst, zygote, scope)
        while True:
            reply, _ = conn.recv(worker.ch, DEBUG_WAIT if debug else self.timeout + HOST_GRACE)
            op = reply["op"]
            if op == "pty-started":  # --pdb: the test's debugger, on this terminal
                hostplugins.relay_debugger(self.pool.config, conn, worker.ch, self.on_report)
            elif op == "report":
                self.emit(self.rebuild(reply["data"]))
            elif op == "done":
                if reply.get("reused"):
                    stats = self.pool.report.envs.get(self.env)
                    if stats is not None:
                        stats.reused_roots += 1
                return None
            elif op == "warning":
                self.item.warn(pytest.PytestWarning(reply["message"]))
            elif op == "missing":
                self.fail("setup", self.not_collected_message(inst))
                return None
            elif op == "error":
                self.synthesize(f"pytest-isolate agent error: {reply.get('message')}\n"
                                f"{reply.get('traceback', '')}")
                return None
            elif op == "exit":
                self.pool.workers.pop(self.env, None)
                return self.exit_reason(inst, reply)

    @staticmethod
    def exit_reason(inst: Instance, reply: dict[str, Any]) -> str:
        """Why a worker ended, with the environment's memory limit when it ran out."""
        reason: str = reply.get("reason") or "the worker exited"
        if "out of memory" in reason and inst.spec.memory is not None:
            reason += (f"; the environment's memory limit is {format_size(inst.spec.memory)} "
                       f"({inst.spec.source('memory')})")
        return reason

    def fork_worker(self, inst: Instance, zygote: WorkerChannel, nodeid: str, scope: str) -> WorkerChannel:
        return WorkerChannel(inst.conn.open_worker("test", zygote=zygote.ch, nodeid=nodeid), scope)

    def prepare_next(self, inst: Instance, zygote: WorkerChannel, scope: str) -> None:
        """While this test runs, have the zygote fork the next one's worker (its root
        mounted, hardened, waiting for its runtest) -- when the zygote needs to set up or
        tear down nothing for it (shares_fixtures), so no fixture changes under this test
        and the order of set-ups and teardowns stays the host's."""
        nxt = self.pool.next_in_zygote(self.item, self.nextitem)
        if nxt is None or self.env in self.pool.prepared or not shares_fixtures(self.item, nxt):
            return
        self.pool.prepared[self.env] = (nxt.nodeid, self.fork_worker(inst, zygote, nxt.nodeid, scope))

    def zygote(self, inst: Instance) -> WorkerChannel:
        zygote = self.pool.zygotes.get(self.env)
        if zygote is None:
            zygote = WorkerChannel(inst.conn.open_worker("zygote"), "zygote")
            self.pool.zygotes[self.env] = zygote
        return zygote

    def check_zygote(self, inst: Instance, zygote: WorkerChannel) -> None:
        """After a worker ended abnormally: forget the zygote if it ended too (its set-up
        timed out, the environment ran out of memory); the next test starts a new one."""
        inst.conn.send(zygote.ch, message("ping"))
        while True:
            op = inst.conn.recv(zygote.ch, HOST_GRACE)[0]["op"]
            if op == "pong":
                return
            if op in ("exit", "error"):
                self.pool.zygotes.pop(self.env, None)
                self.pool.discard_prepared(self.env)
                return

    def advance(self, inst: Instance, zygote: WorkerChannel) -> None:
        """Tell the zygote which of its tests comes next: it tears down the scopes that
        test leaves (a module's fixtures after its last test; all after the run's last
        test here) and its report becomes part of this test's teardown, as on the host."""
        nxt = self.pool.next_in_zygote(self.item, self.nextitem)
        if nxt is not None and keeps_scopes(self.item, nxt):
            return  # nothing to tear down (the zygote would answer "advanced" alone)
        inst.conn.send(zygote.ch, message("advance", prev=self.item.nodeid,
                                          next=nxt.nodeid if nxt is not None else None))
        while True:
            reply, _ = inst.conn.recv(zygote.ch, self.timeout + HOST_GRACE)
            op = reply["op"]
            if op == "report":
                self.merge_teardown(self.rebuild(reply["data"]))
            elif op == "advanced":
                return
            elif op in ("exit", "error"):
                self.pool.zygotes.pop(self.env, None)
                self.pool.discard_prepared(self.env)
                why = reply.get("reason") or reply.get("message") or "it ended"
                self.merge_teardown(self.make_report(
                    "teardown", "failed",
                    f"pytest-isolate: the process holding the session/module fixtures of "
                    f"{self.env!r} failed while tearing them down: {why}\n"
                    f"{reply.get('traceback', '')}--- environment log tail ---\n"
                    f"{log_tail(inst.logs.get('agent'))}"))
                return

    def merge_teardown(self, rep: TestReport) -> None:
        """The zygote's teardown of higher scopes joins the worker's teardown report."""
        pending = self.pending_teardown
        if pending is None:
            self.emit(rep)
            return
        if rep.failed and self.outcome != "failed":
            self.attach_logs(rep)
        if rep.failed or (rep.skipped and self.outcome == "passed"):
            self.outcome = rep.outcome
        if rep.failed and pending.passed:
            rep.sections = list(pending.sections) + list(rep.sections)
            rep.user_properties = list(pending.user_properties)
            rep.duration = pending.duration + rep.duration
            self.pending_teardown = rep
        elif rep.failed:
            pending.sections.append(("pytest-isolate: tearing down higher scopes",
                                     rep.longreprtext))
        else:
            pending.sections.extend(rep.sections)
            pending.duration += rep.duration

    def on_report(self, reply: dict[str, Any], blob: bytes) -> bool:
        """A debugged test's reports while its debugger is relayed; False for the frames
        that end its run (the loop in run_in takes those)."""
        if reply["op"] != "report":
            return False
        self.emit(self.rebuild(reply["data"]))
        return True

    def close_worker(self, inst: Instance, worker: WorkerChannel) -> None:
        self.pool.workers.pop(self.env, None)
        inst.conn.close_worker(worker.ch)

    # ------------------------------------------------------------ reports
    def rebuild(self, data: dict[str, Any]) -> TestReport:
        """A report from the agent; JSON made its tuples lists, pytest wants tuples back."""
        for key in ("longrepr", "location"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        data["user_properties"] = [tuple(p) for p in data.get("user_properties", [])]
        data["sections"] = [tuple(s) for s in data.get("sections", [])]
        rep: TestReport = self.pool.config.hook.pytest_report_from_serializable(
            config=self.pool.config, data=data)
        return rep

    def emit(self, rep: TestReport) -> None:
        self.last_when = rep.when
        if rep.failed and self.outcome != "failed":
            self.attach_logs(rep)  # on the report whose failure the terminal shows
        if rep.failed or (rep.skipped and self.outcome == "passed"):
            self.outcome = rep.outcome
        if rep.when == "teardown":
            self.pending_teardown = rep
            return
        if self.pending_teardown is not None:
            self.flush()
        self.log(rep)

    def flush(self) -> None:
        rep = self.pending_teardown
        if rep is None:
            return
        self.pending_teardown = None
        props = [("isolate.env", self.env), *self.timer.properties()]
        rep.user_properties = [p for p in rep.user_properties if p[0] != "isolate.env"] + props
        self.item.user_properties.extend(self.timer.properties())
        self.log(rep)

    def attach_logs(self, rep: TestReport) -> None:
        inst = self.pool.instances.get(self.env)
        if inst is not None:
            paths = "\n".join(f"{k}: {v}" for k, v in inst.logs.items())
            rep.sections.append((f"isolate logs ({self.env})", paths))

    def make_report(self, when: When,
                    outcome: Literal["passed", "failed", "skipped"], longrepr: Any) -> TestReport:
        keywords: dict[str, Literal[1]] = {k: 1 for k in self.item.keywords}
        return TestReport(self.item.nodeid, self.item.location, keywords, outcome, longrepr, when,
                          user_properties=list(self.item.user_properties))

    def fail(self, when: When, message: str) -> None:
        self.outcome = "failed"
        rep = self.make_report(when, "failed", message)
        self.attach_logs(rep)
        self.log(rep)
        if when != "teardown":
            teardown = self.make_report("teardown", "passed", None)
            self.pending_teardown = teardown
            self.flush()

    def skip(self, reason: str) -> None:
        self.outcome = "skipped"
        path, lineno = str(self.item.location[0]), (self.item.location[1] or 0) + 1
        self.log(
            self.make_report("setup", "skipped", (path, lineno, f"Skipped: {reason}")))
        self.pending_teardown = self.make_report("teardown", "passed", None)
        self.flush()

    def synthesize(self, message: str) -> None:
        """The worker ended before finishing: fail the phase it was in."""
        order: tuple[When, ...] = ("setup", "call", "teardown")
        if self.pending_teardown is not None:
            self.flush()
            self.outcome = "failed"
            self.log(
                self.make_report("teardown", "failed", message))
            return
        when: When
        if self.last_when is None:
            when = "setup"
        elif self.last_when == "setup" and self.outcome != "passed":
            when = "teardown"
        else:
            when = order[min(order.index(self.last_when) + 1, 2)]
        self.fail(when, message)
