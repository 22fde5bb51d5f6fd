"""The hook plugin: one object per pytest process, registered as "isolate-manager".

It binds collected items to environments (one copy per environment, the marker's
overrides checked once), hands each bound item to an ItemRun (itemrun.py), and at the
session's end closes the InstancePool (pool.py), writes the JSON report and shows the
summary table.  The run's settings are resolved once, before it exists (settings.py).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate import config as cfg
from pytest_isolate import hostplugins
from pytest_isolate.agent.collect import isolate_targets, item_target, parametrize_envs, split_items
from pytest_isolate.cache import Cache
from pytest_isolate.errors import ConfigError
from pytest_isolate.itemrun import ItemRun
from pytest_isolate.keys import ENV_KEY
from pytest_isolate.ownership import RunId
from pytest_isolate.pool import SPEC_KEY, InstancePool
from pytest_isolate.progress import Heartbeat
from pytest_isolate.settings import Settings, load_settings
from pytest_isolate.spec import EnvSpec
from pytest_isolate.timing import EnvStats, RunReport


def base_nodeid(nodeid: str) -> str:
    """nodeid without its parametrization: ``f.py::T::t[a-b]`` -> ``f.py::T::t``."""
    head, sep, tail = nodeid.rpartition("::")
    return head + sep + tail.partition("[")[0]


def marker_overrides(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The marker's keywords that override spec keys: fixtures_per_test is checked here and
    read by the zygote inside (agent.Zygote), not a spec key."""
    names = kwargs.get("fixtures_per_test", [])
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(
            isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: fixtures_per_test must be a list of fixture names, "
                          f"got {names!r}")
    return {k: v for k, v in kwargs.items() if k != "fixtures_per_test"}


class IsolateManager:
    """The hooks pytest calls (as xdist's DSession); the environments are the pool's."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.settings: Settings = load_settings(config)
        xdist_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        self.run_id = str(RunId.create(xdist_worker))
        self.report = RunReport(self.run_id)
        self.pool = InstancePool(config, self.settings, self.report, self.progress)
        #: the last progress line is a heartbeat, rewritten in place on a terminal
        self._heartbeat = False
        #: bad @pytest.mark.isolate markers, raised as one UsageError once collection is done
        #: (a UsageError raised while a module is collected becomes a collection error, exit 2)
        self.marker_errors: list[str] = []
        #: items with several environments that could not be split into one copy each
        self.split_errors: list[str] = []
        #: test functions whose marker pytest_generate_tests checked
        self.checked: set[str] = set()
        #: warm environments' spares may be taken before collection (pytest_sessionstart)
        self.early = False

    # what conftests reach through config.pluginmanager.get_plugin("isolate-manager")
    @property
    def specs(self) -> dict[str, EnvSpec]:
        return self.settings.specs

    @property
    def cache(self) -> Cache:
        return self.pool.cache

    def progress(self, message: str) -> None:
        """A line for the user; a Heartbeat rewrites one line on a terminal (outside CI)."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        line = f"isolate: {message}"
        if isinstance(message, Heartbeat) and reporter.isatty() and not os.environ.get("CI"):
            reporter.ensure_newline()
            reporter.rewrite(line[: reporter._tw.fullwidth - 1], erase=True)
            self._heartbeat = True
            return
        if self._heartbeat:  # the next line takes the heartbeat's place
            reporter.rewrite("", erase=True)
            reporter.write("\r")
            self._heartbeat = False
        reporter.write_line(line)

    # ------------------------------------------------------------ collection
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Warm environments start their pytest while the host collects (start_early);
        not under xdist, whose workers each collect every test, and not to collect only."""
        self.early = not (self.config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER")
                          or self.config.pluginmanager.has_plugin("dsession"))
        if not self.early:
            return
        try:
            self.pool.start_early()
        except ConfigError as exc:  # an unwritable cache directory
            self.pool.end_early(set(), remember=False)
            raise pytest.UsageError(str(exc)) from None

    def envs_for(self, marker_args: Any, fixturenames: Any = ()) -> list[str]:
        return isolate_targets(marker_args or (), self.settings.default_envs, fixturenames)

    @pytest.hookimpl(trylast=True)
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        marker = metafunc.definition.get_closest_marker("isolate")
        self.checked.add(metafunc.definition.nodeid)
        if marker is not None and not self.check_marker(metafunc.definition.nodeid, marker):
            return
        parametrize_envs(metafunc, self.settings.default_envs)

    def check_marker(self, nodeid: str, marker: pytest.Mark) -> bool:
        """False (and the reason kept for a UsageError) when an isolate marker is bad."""
        where = f"{nodeid}: @pytest.mark.isolate"
        if not marker.args:
            self.marker_errors.append(
                f"{where} needs one or more environment names, e.g. "
                f"@pytest.mark.isolate(\"chroot\"); known: {', '.join(sorted(self.specs))}")
            return False
        try:
            cfg.check_env_names(marker.args, where, self.specs)
            cfg.with_overrides(self.specs[marker.args[0]], marker_overrides(marker.kwargs, where),
                               where)
        except ConfigError as exc:
            self.marker_errors.append(str(exc))
            return False
        return True

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector
                                   ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        """One copy per environment of the items pytest_generate_tests never sees
        (unittest TestCase methods, doctests, plugin items); agent.split_items does the
        same inside.  Done here, not in pytest_collection_modifyitems, so that --lf's
        filtering of a file's items (cacheprovider, an outer wrapper) sees the copies."""
        rep = yield
        if rep.passed and rep.result:
            rep.result[:], problems = split_items(rep.result, self.settings.default_envs)
            self.split_errors.extend(problems)
        return rep

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.check_remaining_markers(items)
        for item in items:
            self.bind(item)
        if self.pool.bound:
            try:
                # an unwritable cache directory is a usage error, before any test
                _ = self.pool.cache
                for env in sorted(self.pool.bound):  # so are bad dependency keys
                    self.pool.layer_plan(env)
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None

    def check_remaining_markers(self, items: list[pytest.Item]) -> None:
        """The markers of items pytest_generate_tests did not check (not functions), then
        one UsageError for every bad marker and every item that could not be split."""
        for item in items:
            marker = item.get_closest_marker("isolate")
            base = base_nodeid(item.nodeid)
            if marker is not None and base not in self.checked:
                self.checked.add(base)
                self.check_marker(base, marker)
        if self.marker_errors:
            raise pytest.UsageError("\n".join(dict.fromkeys(self.marker_errors)))
        if self.split_errors:
            raise pytest.UsageError(
                "these items have several environments but cannot be split into one item per "
                "environment; they would run in one of them only, so nothing runs:\n  "
                + "\n  ".join(self.split_errors)
                + "\nname one environment for them (@pytest.mark.isolate(\"ENV\") or a run of "
                "their own with --isolate-env ENV)")

    def bind(self, item: pytest.Item) -> None:
        """Bind item to its environment (when it has one): the environment's name and its
        spec with the marker's overrides go in the item's stash."""
        marker = item.get_closest_marker("isolate")
        envs = self.envs_for(marker.args if marker else (), getattr(item, "fixturenames", ()))
        if not envs:
            return
        env = item_target(item) or envs[0]
        spec = self.specs[env]
        where = f"{item.nodeid}: @pytest.mark.isolate"
        # fixtures_per_test is read inside (checked in pytest_generate_tests)
        overrides: dict[str, Any] = {k: v for k, v in (marker.kwargs if marker else {}).items()
                                     if k != "fixtures_per_test"}
        # marker keyword > command-line flag > the env's table > ini > [tool.pytest-isolate]
        for key, flag, value in (("timeout", "isolate_timeout", self.settings.timeout),
                                 ("reset", "isolate_reset", self.settings.reset)):
            if key not in overrides and (self.config.getoption(flag) is not None
                                         or spec.source(key) == "built-in default"):
                overrides[key] = value
        try:
            spec = cfg.with_overrides(spec, overrides, where)
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
        item.stash[ENV_KEY] = env
        item.stash[SPEC_KEY] = spec
        self.pool.bound.setdefault(env, set()).add(item.nodeid)
        item.user_properties.append(("isolate.env", env))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Per environment, how many of the selected items are bound to it (the summary
        table's and the JSON report's "bound": a partial matrix shows at a glance)."""
        counts: dict[str, int] = {}
        for item in session.items:
            env = item.stash.get(ENV_KEY, None)
            if env is not None:
                counts[env] = counts.get(env, 0) + 1
        if self.early:
            self.pool.end_early(set(counts))
        for env, count in counts.items():
            spec = self.specs[env]
            stats = self.report.envs.setdefault(
                env, EnvStats(env, spec.backend, spec.arch, spec.release))
            stats.bound = count

    # ------------------------------------------------------------ running items
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        if ENV_KEY not in item.stash:
            return None
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reruns = hostplugins.reruns_of(item)
        if reruns is None:
            ItemRun(self.pool, item, nextitem).run()
        else:  # pytest-rerunfailures: each attempt in a fresh worker
            hostplugins.run_with_reruns(item, *reruns, lambda log: ItemRun(
                self.pool, item, nextitem, log=log).run())
        # what host tests before this one set up (a module, a class) and the next item does
        # not share: torn down now, as pytest's own teardown phase would (else the next
        # local item finds a stale setup stack: "previous item was not torn down properly")
        call = pytest.CallInfo.from_call(
            lambda: item.session._setupstate.teardown_exact(nextitem), when="teardown",
            reraise=(pytest.exit.Exception, KeyboardInterrupt))
        if call.excinfo is not None:
            ihook.pytest_runtest_logreport(
                report=ihook.pytest_runtest_makereport(item=item, call=call))
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def pytest_sessionfinish(self) -> None:
        self.pool.close()
        workeroutput = getattr(self.config, "workeroutput", None)
        path = self.config.getoption("isolate_report")
        if workeroutput is not None:  # an xdist worker: the controller merges and writes
            workeroutput["isolate_report"] = self.report.to_json()
        elif path:
            self.report.write(Path(path))
        self.pool.prune_runs()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: collect a worker's environments and tests."""
        data = getattr(node, "workeroutput", {}).get("isolate_report")
        if data:
            self.report.merge(data)
        if error is not None:
            self.pool.reap_after_crash(str(getattr(getattr(node, "gateway", None), "id", "?")))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.report.envs:
            return
        terminalreporter.section("pytest-isolate")
        for line in self.report.table():
            terminalreporter.write_line(line)
        # the run's log directories (one per xdist worker): <cache>/runs/<run id>/logs
        dirs = sorted({str(Path(p).parent.parent) for s in self.report.envs.values()
                       for k, p in s.logs.items() if k != "provision"})
        for logs in dirs:
            terminalreporter.write_line(f"logs: {logs}")
        for name in sorted(self.report.envs):
            spec = self.specs.get(name)
            if spec is not None and spec.privileged:
                terminalreporter.write_line(
                    f"WARNING: environment {name!r} is privileged ({spec.source('privileged')}):"
                    " its tests ran without the hardening (capabilities, no_new_privs, seccomp,"
                    " read-only /proc/sys and /sys); see README 'Security model'", yellow=True)


