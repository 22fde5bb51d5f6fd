"""The controller: one plugin object per pytest process, registered as "isolate-manager".

It resolves the configuration, binds items to environments, starts instances
lazily (provision -> start -> sync), runs bound items through the agent and
feeds the rebuilt reports to the host's reporting hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
from _pytest.reports import TestReport

from pytest_isolate import config as cfg
from pytest_isolate import hostplugins, inside
from pytest_isolate.agent.collect import isolate_targets, item_target, parametrize_envs, split_items
from pytest_isolate.backends.base import Backend, Instance, RunContext
from pytest_isolate.cache import Cache, force_rmtree
from pytest_isolate.channel import log_tail
from pytest_isolate.errors import (
    AgentError,
    AgentLost,
    AgentTimeout,
    BackendUnavailable,
    ConfigError,
    IsolateError,
    ProvisionError,
    RemoteError,
)
from pytest_isolate.keys import ENV_KEY
from pytest_isolate.ownership import RunId, record_run, run_dir_finished
from pytest_isolate.progress import Heartbeat
from pytest_isolate.sizes import format_size
from pytest_isolate.spec import EnvSpec
from pytest_isolate.timing import EnvStats, Move, PhaseTimer, RunReport, TestRecord

SPEC_KEY = pytest.StashKey[EnvSpec]()
#: what the typed ini options take, for the error when pytest cannot convert a value
INI_EXPECTED = {"isolate_strict": "true or false",
                "isolate_timeout": "a positive number of seconds"}
INI_NAMES = ("isolate_cache_dir", "isolate_timeout", "isolate_reset", "isolate_strict")
DEFAULT_TIMEOUT = 300.0
#: Extra time the host waits beyond a test's timeout before it gives up on the agent.
HOST_GRACE = 30.0
#: How long the host waits for a test that is being debugged (--pdb): a working day.
DEBUG_WAIT = 8 * 3600.0
When = Literal["setup", "call", "teardown"]


def base_nodeid(nodeid: str) -> str:
    """nodeid without its parametrization: ``f.py::T::t[a-b]`` -> ``f.py::T::t``."""
    head, sep, tail = nodeid.rpartition("::")
    return head + sep + tail.partition("[")[0]


def doctest_args(opt: Any) -> list[str]:
    """The host's doctest options, for the pytest inside to collect the same doctest items
    (``-o addopts=`` there drops what addopts gave the host)."""
    args = ["--doctest-modules"] if getattr(opt, "doctestmodules", False) else []
    for pattern in getattr(opt, "doctestglob", None) or []:
        args.append(f"--doctest-glob={pattern}")
    if getattr(opt, "doctestreport", "udiff") != "udiff":
        args.append(f"--doctest-report={opt.doctestreport}")
    for flag in ("doctest_ignore_import_errors", "doctest_continue_on_failure"):
        if getattr(opt, flag, False):
            args.append("--" + flag.replace("_", "-"))
    return args


class Worker:
    def __init__(self, ch: int, scope: str) -> None:
        self.ch = ch
        self.scope = scope


@dataclasses.dataclass
class KeptWorker:
    """The worker of a failed test, kept alive by --isolate-keep-failed."""

    env: str
    instance: Instance
    ch: int
    nodeid: str


def release_worker(inst: Instance, ch: int) -> None:
    """Close a test's worker without waiting for its exit; its late frames are dropped."""
    inst.conn.send(ch, {"op": "close"})
    inst.conn.forget(ch)


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


def marker_overrides(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The marker's keywords that override spec keys: fixtures_per_test is checked here and
    read by the zygote inside (agent.Zygote), not a spec key."""
    names = kwargs.get("fixtures_per_test", [])
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(
            isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: fixtures_per_test must be a list of fixture names, "
                          f"got {names!r}")
    return {k: v for k, v in kwargs.items() if k != "fixtures_per_test"}



def check_image_support(spec: EnvSpec, backend_class: Any) -> None:
    """ConfigError when spec's root is an image its backend cannot run (a VM would boot
    the Debian root filesystem and ignore the key)."""
    if spec.from_image and not getattr(backend_class, "supports_images", False):
        key = "image" if spec.image is not None else "dockerfile"
        raise ConfigError(f"{spec.source(key)}: backend {spec.backend!r} cannot run an image yet "
                          "(docker, podman, chroot, lxc and schroot can); remove the key, or "
                          "use one of those backends")

class IsolateManager:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.instances: dict[str, Instance] = {}
        self.workers: dict[str, Worker] = {}
        #: per environment: the zygote that holds higher-scoped fixtures (reset = "test")
        self.zygotes: dict[str, Worker] = {}
        #: per environment: the worker forked ahead for its next test (nodeid, worker)
        self.prepared: dict[str, tuple[str, Worker]] = {}
        #: per environment: the test that ran last
        self.last_run: dict[str, str] = {}
        self._zygote_next: dict[str, pytest.Item | None] | None = None
        self.backends: dict[str, Backend] = {}
        #: pool hosts that failed their health check in this run: (host, backend) -> why
        self.dead_hosts: dict[tuple[str, str], str] = {}
        #: per environment: the pool host its last instance was placed on
        self.placed: dict[str, str] = {}
        self.unavailable: dict[str, BackendUnavailable] = {}
        #: per environment: the test whose failure showed its backend's whole message
        self.unavailable_shown: dict[str, str] = {}
        #: the last progress line is a heartbeat, rewritten in place on a terminal
        self._heartbeat = False
        self.broken: dict[str, Exception] = {}
        self.bound: dict[str, set[str]] = {}
        #: bad @pytest.mark.isolate markers, raised as one UsageError once collection is done
        #: (a UsageError raised while a module is collected becomes a collection error, exit 2)
        self.marker_errors: list[str] = []
        #: environments whose missing plugins were reported already
        self.plugins_warned: set[str] = set()
        #: dependency plans per environment (None: nothing to install), see layer_plan
        self.plans: dict[str, Any] = {}
        #: items with several environments that could not be split into one copy each
        self.split_errors: list[str] = []
        #: test functions whose marker pytest_generate_tests checked
        self.checked: set[str] = set()
        self.keep_failed = bool(config.getoption("isolate_keep_failed"))
        self.kept: list[KeptWorker] = []
        #: releases of the shared locks on the cache entries this run uses
        self.holds: dict[str, Callable[[], None]] = {}
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        self.run_id = str(RunId.create(worker))
        self.report = RunReport(self.run_id)
        self._load()

    # ------------------------------------------------------------ configuration
    def _setting(self, flag: str, ini: str, top: str, default: Any) -> tuple[Any, str]:
        value = self.config.getoption(flag)
        if value is not None:
            return value, f"--{flag.replace('_', '-')}"
        try:
            ini_value = self.config.getini(ini)
        except (ValueError, TypeError, pytest.UsageError) as exc:
            # a typed ini option pytest could not convert (it does not name the key)
            expected = INI_EXPECTED.get(ini, "another value")
            raise ConfigError(f"ini key {ini!r} in {self.config.inipath}: {exc}; "
                              f"set it to {expected}") from None
        if ini_value not in (None, "", []):
            return ini_value, f"ini key {ini!r} in {self.config.inipath}"
        if top in self.table:
            return self.table[top], f"{self.pyproject}: [{cfg.TABLE}] key {top!r}"
        return default, "built-in default"

    def _load(self) -> None:
        rootpath = self.config.rootpath
        pyproject = rootpath / "pyproject.toml"
        inipath = self.config.inipath
        if inipath is not None and inipath.name == "pyproject.toml":
            pyproject = inipath
        self.pyproject = pyproject
        self.table = cfg.load_pyproject(pyproject)
        self.backend_refs = self._collect_backends()
        self.specs = cfg.resolve_envs(self.table, pyproject, self.backend_refs)
        cfg.check_all_options(self.specs, self._backend_class)
        self.hosts = cfg.resolve_hosts(self.table, pyproject, self.backend_refs)

        timeout, where = self._setting("isolate_timeout", "isolate_timeout", "timeout",
                                       DEFAULT_TIMEOUT)
        try:
            self.timeout = float(timeout)
            if self.timeout <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: timeout must be a positive number of seconds, "
                              f"got {timeout!r}") from None
        reset, where = self._setting("isolate_reset", "isolate_reset", "reset", "test")
        if reset not in ("test", "module", "session"):
            raise ConfigError(f"{where}: unsupported reset {reset!r}; supported: test, module, session")
        self.reset = str(reset)
        strict, _ = self._setting("isolate_strict", "isolate_strict", "strict", False)
        self.strict = strict in (True, "true", "True", "1", "yes")
        cache_dir, where = self._setting("isolate_cache_dir", "isolate_cache_dir", "cache_dir",
                                         None)
        if cache_dir is None:
            cache_root = Path(os.environ.get("PYTEST_ISOLATE_CACHE_DIR") or cfg.default_cache_dir())
            where = ("PYTEST_ISOLATE_CACHE_DIR" if os.environ.get("PYTEST_ISOLATE_CACHE_DIR")
                     else "default cache directory")
        else:
            cache_root = Path(str(cache_dir)).expanduser()
            if not cache_root.is_absolute():
                cache_root = rootpath / cache_root
        self.cache_root = cache_root
        self.cache_where = where
        self._cache: Cache | None = None

        default_envs = self.config.getoption("isolate_env")
        self.default_envs: list[str] = []
        if default_envs:
            self.default_envs = cfg.parse_env_list(default_envs, "--isolate-env", self.specs)

    def _collect_backends(self) -> dict[str, Any]:
        refs: dict[str, Any] = {}
        for answer in self.config.hook.pytest_isolate_backends():
            for name, ref in dict(answer or {}).items():
                refs.setdefault(name, ref)  # earlier (non-trylast) answers win
        return refs

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            self._cache = Cache(self.cache_root, where=self.cache_where)
            # build directories of killed runs: nobody holds their key's lock any more
            # (a live build does, and is skipped); mounted ones are refused and kept
            self._cache.clean_tmp()
        return self._cache

    def run_context(self) -> RunContext:
        base = self.cache.root / "runs" / self.run_id
        record_run(base)  # what tells a later run or `cache gc` whether this one still runs
        return RunContext(
            run_id=self.run_id, rootdir=self.config.rootpath, cache=self.cache,
            log_dir=base / "logs", work_dir=base / "work", progress=self.progress,
            strict=self.strict,
        )

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

    def _backend_class(self, name: str) -> Any:
        """The registered class of backend name; None when it cannot be loaded (using it
        reports why)."""
        ref = self.backend_refs.get(name)
        if isinstance(ref, str):
            module, _, attr = ref.partition(":")
            try:
                ref = getattr(importlib.import_module(module), attr)
            except Exception:
                return None
        return ref

    def backend(self, name: str, endpoint: str | None = None) -> Backend:
        """The backend object driving one engine (the default one, or a pool host's)."""
        cache_key = f"{name}@{endpoint}" if endpoint else name
        if cache_key in self.backends:
            return self.backends[cache_key]
        ref = self.backend_refs.get(name)
        if ref is None:
            raise BackendUnavailable(
                name, "no backend of that name is registered",
                f"registered backends: {', '.join(sorted(self.backend_refs))}; third-party "
                "backends register through the pytest_isolate_backends hook")
        if isinstance(ref, str):
            module, _, attr = ref.partition(":")
            ref = getattr(importlib.import_module(module), attr)
        backend: Backend = ref(self.run_context())
        backend.endpoint = endpoint
        self.backends[cache_key] = backend
        return backend

    # ------------------------------------------------------------ collection
    def envs_for(self, marker_args: Any, fixturenames: Any = ()) -> list[str]:
        return isolate_targets(marker_args or (), self.default_envs, fixturenames)

    @pytest.hookimpl(trylast=True)
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        marker = metafunc.definition.get_closest_marker("isolate")
        self.checked.add(metafunc.definition.nodeid)
        if marker is not None and not self.check_marker(metafunc.definition.nodeid, marker):
            return
        parametrize_envs(metafunc, self.default_envs)

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
            rep.result[:], problems = split_items(rep.result, self.default_envs)
            self.split_errors.extend(problems)
        return rep

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            # items that pytest_generate_tests did not check (not functions)
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
        for item in items:
            marker = item.get_closest_marker("isolate")
            envs = self.envs_for(marker.args if marker else (), getattr(item, "fixturenames", ()))
            if not envs:
                continue
            env = item_target(item) or envs[0]
            spec = self.specs[env]
            where = f"{item.nodeid}: @pytest.mark.isolate"
            # fixtures_per_test is read inside (checked in pytest_generate_tests)
            overrides: dict[str, Any] = {k: v for k, v in (marker.kwargs if marker else {}).items()
                                         if k != "fixtures_per_test"}
            # marker keyword > command-line flag > the env's table > ini > [tool.pytest-isolate]
            for key, flag, value in (("timeout", "isolate_timeout", self.timeout),
                                     ("reset", "isolate_reset", self.reset)):
                if key not in overrides and (self.config.getoption(flag) is not None
                                             or spec.source(key) == "built-in default"):
                    overrides[key] = value
            try:
                spec = cfg.with_overrides(spec, overrides, where)
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None
            item.stash[ENV_KEY] = env
            item.stash[SPEC_KEY] = spec
            self.bound.setdefault(env, set()).add(item.nodeid)
            item.user_properties.append(("isolate.env", env))
        if self.bound:
            try:
                _ = self.cache  # an unwritable cache directory is a usage error, before any test
                for env in sorted(self.bound):  # so are bad dependency keys
                    self.layer_plan(env)
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Per environment, how many of the selected items are bound to it (the summary
        table's and the JSON report's "bound": a partial matrix shows at a glance)."""
        counts: dict[str, int] = {}
        for item in session.items:
            env = item.stash.get(ENV_KEY, None)
            if env is not None:
                counts[env] = counts.get(env, 0) + 1
        for env, count in counts.items():
            spec = self.specs[env]
            stats = self.report.envs.setdefault(
                env, EnvStats(env, spec.backend, spec.arch, spec.release))
            stats.bound = count

    # ------------------------------------------------------------ instances
    def placed_backend(self, name: str, spec: EnvSpec) -> tuple[cfg.Host | None, Backend]:
        """The checked backend for environment name's next instance, and its pool host.

        Called for every new instance, so a host that died since the last one is found
        here: a host failing its health check is dead for the rest of this run (other
        environments skip it without asking), the environment moves to the next candidate
        (a Move in the report), and NoHostLeft names every host's reason when none is left.
        """
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        origin = self.placed.get(name)
        while True:
            host = cfg.place(spec, self.hosts, worker, self.dead_hosts)
            backend = self.backend(spec.backend, host.endpoints[spec.backend] if host else None)
            if host is None:  # no pool host serves it: the default engine, as before
                backend.check(spec)
                return None, backend
            try:
                backend.check(spec)
            except BackendUnavailable as exc:
                self.dead_hosts[host.name, spec.backend] = exc.reason
                origin = origin or host.name
                continue
            if origin is not None and origin != host.name:
                self.report.moves.append(Move(name, origin, host.name,
                                              self.dead_hosts[origin, spec.backend]))
                self.progress(f"{name}: moved from host {origin!r} to {host.name!r} "
                              f"({self.dead_hosts[origin, spec.backend]})")
            self.placed[name] = host.name
            return host, backend

    def instance(self, name: str, timer: PhaseTimer) -> Instance:
        inst = self.instances.get(name)
        if inst is not None and inst.alive():
            return inst
        if inst is not None:
            self.drop(name)
        spec = self.specs[name]
        if name in self.unavailable:
            raise self.unavailable[name]
        try:
            host, backend = self.placed_backend(name, spec)
        except BackendUnavailable as exc:
            self.unavailable[name] = exc
            raise
        endpoint = backend.endpoint
        stats = self.report.envs.setdefault(
            name, EnvStats(name, spec.backend, spec.arch, spec.release))
        stats.host = host.name if host is not None else "default"
        stats.endpoint = endpoint or ""
        if name in self.broken:
            # the full error (with the build's output tail) went with the first test
            first = str(self.broken[name]).splitlines()[0]
            raise ProvisionError(f"environment {name!r} could not be built earlier in this run "
                                 f"(the first test of it shows why): {first}")
        check_image_support(spec, type(backend))
        with timer.phase("provision"):
            started = time.perf_counter()
            try:
                entry = backend.provision(spec)
                spec = self.with_layer(name, spec, backend)
            except Exception as exc:
                self.broken[name] = exc  # built once per run: later tests fail fast
                raise
            finally:
                stats.provision += time.perf_counter() - started
        if name not in self.holds:
            self.holds[name] = self.cache.hold(entry)
        stats.key = entry.key
        if entry.manifest.get("digest"):  # a user's image: what its reference resolved to
            stats.image = str(entry.manifest.get("reference") or spec.image or "")
            stats.digest = str(entry.manifest["digest"])
        stats.cache_hit = entry.hit if stats.cache_hit is None else stats.cache_hit
        if not entry.hit:
            self.progress(f"built {spec.describe()} in {entry.build_seconds:.1f}s")
        with timer.phase("start"):
            started = time.perf_counter()
            inst = backend.start(spec, entry)
            stats.start += time.perf_counter() - started
            stats.starts += 1
            stats.root = inst.root or stats.root
        stats.logs = {k: str(v) for k, v in inst.logs.items()}
        self.instances[name] = inst
        return inst

    def layer_plan(self, name: str) -> Any:
        """The dependency plan of environment name (images/deps.py; None: nothing to
        install), made once per run; bad keys raise ConfigError."""
        if name in self.plans:
            return self.plans[name]
        from pytest_isolate.images.deps import choose_installer, make_plan

        spec = self.specs[name]
        plan = None
        explicit = [k for k in cfg.DEPS_KEYS if spec.source(k) != "built-in default"]
        backend_class = self._backend_class(spec.backend)
        check_image_support(spec, backend_class)
        if spec.from_image or not getattr(backend_class, "supports_layers", True):
            if explicit:
                image = spec.image or f"built from {spec.dockerfile}"
                why = (f"image {image!r} is not a root filesystem pytest-isolate builds"
                       if spec.from_image else f"backend {spec.backend!r}")
                raise ConfigError(
                    f"{spec.source(explicit[0])}: installing the project and its dependencies "
                    f"inside is not supported yet for {why}; remove the key or use another "
                    "environment")
        else:
            plan = make_plan(spec, self.config.rootpath)
            if plan is not None:
                choose_installer(spec)  # installer = "uv" without a uv: said now
        self.plans[name] = plan
        return plan

    def with_layer(self, name: str, spec: EnvSpec, backend: Backend) -> EnvSpec:
        """spec with its dependency layer (the project and its test dependencies in a
        virtual environment inside), built when missing; only for environments that run
        collected tests (a fixture drives its environment as provisioned)."""
        if name not in self.bound:
            return spec
        plan = self.layer_plan(name)
        if plan is None:
            return spec
        from pytest_isolate.images.deps import provision_layer
        from pytest_isolate.images.rootfs import provision_rootfs

        run = self.run_context()
        rootfs = provision_rootfs(backend.rootfs_spec(spec), self.cache,
                                  run.log_path(name, "provision.log"), run.rootdir,
                                  self.progress)
        layer = provision_layer(spec, rootfs, run.rootdir, self.cache,
                                run.log_path(name, "deps.log"), self.progress, plan)
        if layer is None:
            return spec
        if f"deps:{name}" not in self.holds:
            self.holds[f"deps:{name}"] = self.cache.hold(layer.entry)
        if layer.venv_pytest and layer.venv_pytest != pytest.__version__:
            self.progress(f"{name}: the project's dependencies install pytest "
                          f"{layer.venv_pytest} inside; the host's pytest {pytest.__version__} "
                          "is used there (both sides must run the same pytest)")
        return dataclasses.replace(spec, layer=layer)

    def drop(self, name: str) -> None:
        inst = self.instances.pop(name, None)
        self.workers.pop(name, None)
        self.zygotes.pop(name, None)
        self.prepared.pop(name, None)
        if inst is not None:
            inst.stop()

    def ensure_pytest(self, name: str, inst: Instance, timer: PhaseTimer) -> None:
        if inst.pytest_started:
            return
        rootdir = self.config.rootpath
        files = sorted({nodeid.split("::", 1)[0] for nodeid in self.bound.get(name, ())})
        opt = self.config.option
        args = [str(rootdir / f) for f in files]
        addopts, _ = inside.filter_addopts(inside.addopts_of(self.config))
        args += ["-p", "no:cacheprovider", "-o", "addopts=" + shlex.join(addopts),
                 "--rootdir", str(rootdir),
                 f"--tb={opt.tbstyle}", f"--capture={opt.capture}",
                 f"--import-mode={opt.importmode}", "-W", "ignore::pytest.PytestConfigWarning"]
        if self.config.inipath is not None:
            args += ["-c", str(self.config.inipath)]
        verbose = int(opt.verbose or 0)
        args += ["-v"] * verbose if verbose > 0 else ["-q"] * -verbose
        if opt.showlocals:
            args.append("-l")
        args += doctest_args(opt)
        args += inside.disabled_plugins(self.config.invocation_params.args)
        args += self.plugins_inside(name, inst)
        coverage = hostplugins.coverage_options(self.config)
        if coverage is not None:  # pytest-cov: measured inside too (hostplugins.py)
            inst.conn.call(0, {"op": "configure", "settings": {"coverage": coverage}},
                           timeout=self.timeout)
        request = {"op": "pytest", "args": args, "cwd": str(rootdir),
                   "default_envs": self.default_envs, "ini_names": list(INI_NAMES),
                   "markers": [str(m) for m in self.config.getini("markers")]}
        with timer.phase("sync"):
            try:
                reply, _ = inst.conn.call(0, request, timeout=self.timeout)
            except RemoteError as exc:
                if exc.type_name != "PytestStartError" or not addopts:
                    raise
                # an option of the project's addopts that the pytest inside does not know
                # (its plugin is not installed there): said once, then run without them
                self.progress(f"{name}: pytest inside refused the project's addopts "
                              f"{shlex.join(addopts)!r} (its log: {inst.logs.get('agent')}); "
                              "running there without them")
                request["args"] = ["addopts=" if a.startswith("addopts=") else a for a in args]
                reply, _ = inst.conn.call(0, request, timeout=self.timeout)
        if reply["op"] != "collected":
            raise AgentError(f"unexpected answer from the agent: {reply}")
        inst.pytest_started = True
        inst.collected = set(reply["nodeids"])
        inst.collect_errors = list(reply["errors"])

    def plugins_inside(self, name: str, inst: Instance) -> list[str]:
        """-p NAME for each plugin the host loaded that the environment has; one line for
        each that it lacks (once per environment)."""
        wanted = inside.host_plugins(self.config.pluginmanager)
        if not wanted:
            return []
        reply, _ = inst.conn.call(0, {"op": "plugins", "names": [n for n, _ in wanted]},
                                  timeout=self.timeout)
        present = set(reply.get("present", ()))
        missing = [f"{dist} (plugin {ep!r})" for ep, dist in wanted if ep not in present]
        if missing and name not in self.plugins_warned:
            self.plugins_warned.add(name)
            self.progress(f"{name}: pytest plugins loaded here but not installed inside: "
                          f"{', '.join(missing)}; add them to 'deps' or 'dependency_groups' "
                          f"in [{cfg.TABLE}] (or the environment's table) to load them there")
        return [arg for ep, _ in wanted if ep in present for arg in ("-p", ep)]

    # ------------------------------------------------------------ running items
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        if ENV_KEY not in item.stash:
            return None
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reruns = hostplugins.reruns_of(item)
        if reruns is None:
            ItemRun(self, item, nextitem).run()
        else:  # pytest-rerunfailures: each attempt in a fresh worker
            hostplugins.run_with_reruns(item, *reruns, lambda log: ItemRun(
                self, item, nextitem, log=log).run())
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
        self.close_zygotes()
        if self.kept:
            self.enter_kept()
        for name in list(self.instances):
            self.drop(name)
        for release in self.holds.values():
            release()
        self.holds.clear()
        workeroutput = getattr(self.config, "workeroutput", None)
        path = self.config.getoption("isolate_report")
        if workeroutput is not None:  # an xdist worker: the controller merges and writes
            workeroutput["isolate_report"] = self.report.to_json()
        elif path:
            self.report.write(Path(path))
        self._prune_runs()

    def next_in_zygote(self, item: pytest.Item,
                       nextitem: pytest.Item | None) -> pytest.Item | None:
        """The next test the zygote of item's environment will fork a worker for (None:
        none in this run, so it tears every scope down): pytest's nextitem under xdist
        (whose scheduler decides), else the next item of the run bound to the same
        environment with reset = "test", so tests of several environments interleaved
        (test_a[docker], test_a[lxc], ...) keep each environment's scopes alive."""
        session = item.session
        if nextitem is None or session.shouldfail or session.shouldstop:
            return None
        env = item.stash[ENV_KEY]

        def here(it: pytest.Item) -> bool:
            return it.stash.get(ENV_KEY, None) == env and it.stash[SPEC_KEY].reset == "test"

        if os.environ.get("PYTEST_XDIST_WORKER"):
            return nextitem if here(nextitem) else None
        if self._zygote_next is None:
            following: dict[str, pytest.Item | None] = {}
            last: dict[str, pytest.Item] = {}
            for it in reversed(session.items):
                name = it.stash.get(ENV_KEY, None)
                if name is None or it.stash[SPEC_KEY].reset != "test":
                    continue
                following[it.nodeid] = last.get(name)
                last[name] = it
            self._zygote_next = following
        return self._zygote_next.get(item.nodeid)

    def discard_prepared(self, env: str) -> None:
        """Close the worker forked ahead for env's next test (the run stopped early, the
        zygote it came from ended): nobody waits for its exit."""
        entry = self.prepared.pop(env, None)
        inst = self.instances.get(env)
        if entry is None or inst is None or not inst.alive():
            return
        try:
            release_worker(inst, entry[1].ch)
        except IsolateError:
            pass

    def close_zygotes(self) -> None:
        """A run that stopped early (-x, an interrupt) leaves scopes set up in zygotes:
        tear them down where they were set up (errors go to the environment's log)."""
        for env, zygote in list(self.zygotes.items()):
            self.discard_prepared(env)
            inst = self.instances.get(env)
            if inst is None or not inst.alive():
                continue
            try:
                inst.conn.send(zygote.ch, {"op": "advance", "prev": None, "next": None})
                while inst.conn.recv(zygote.ch, HOST_GRACE)[0]["op"] not in (
                        "advanced", "exit", "error"):
                    pass
            except IsolateError as exc:
                self.progress(f"tearing down the fixtures held for {env!r} failed: {exc}")
        self.zygotes.clear()

    def enter_kept(self) -> None:
        """--isolate-keep-failed: a shell in each failed test's environment, as it left it."""
        from pytest_isolate.interactive import interact

        kept, self.kept = self.kept, []
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        interactive = sys.stdin.isatty() and os.environ.get("PYTEST_XDIST_WORKER") is None
        for k in kept:
            if not k.instance.alive():
                continue
            if not interactive:
                self.progress(f"--isolate-keep-failed: {k.nodeid} failed in {k.env!r}; a shell "
                              "into it needs a terminal (and no xdist): rerun that test alone, "
                              "e.g. pytest --isolate-keep-failed " + shlex.quote(k.nodeid))
                continue
            self.progress(f"{k.nodeid} failed in {k.env!r}: a shell in its environment as the "
                          "test left it (cwd = rootdir); exit the shell to go on")
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                try:
                    interact(k.instance.conn, k.ch, cwd=str(self.config.rootpath))
                except IsolateError as exc:
                    self.progress(f"the shell ended: {exc}")
        self.progress("kept environments closed")

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: collect a worker's environments and tests."""
        data = getattr(node, "workeroutput", {}).get("isolate_report")
        if data:
            self.report.merge(data)
        if error is not None:
            self.reap_after_crash(str(getattr(getattr(node, "gateway", None), "id", "?")))

    def reap_after_crash(self, worker: str) -> None:
        """xdist controller: a worker died without tearing down; remove what it left.

        Its agents die with it (they see their stdin close), but containers, LXC
        containers and schroot sessions outlive it.  Every backend's reap() removes only
        what belongs to processes that are gone, so the other workers' instances stay.
        """
        for name in sorted({spec.backend for spec in self.specs.values()}):
            try:
                self.backend(name).reap()
            except Exception as exc:  # best effort: the next run reaps again
                self.progress(f"after worker {worker} died: could not reap {name}: {exc}")

    def _prune_runs(self, keep: int = 20) -> None:
        """Keep the newest `keep` run directories; never one whose pytest still runs."""
        if self._cache is None:
            return
        runs = self.cache.root / "runs"
        if not runs.is_dir():
            return
        ordered = sorted(runs.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in ordered[:-keep]:
            if not run_dir_finished(old):
                continue
            try:
                force_rmtree(old)
            except (OSError, IsolateError):
                pass  # `python -m pytest_isolate cache gc` reports what it cannot remove
        for old in ordered[-keep:]:
            # a killed run's work directory (launcher mount points, lxcpath): its logs stay
            if old.name != self.run_id and run_dir_finished(old) and (old / "work").exists():
                try:
                    force_rmtree(old / "work")
                except (OSError, IsolateError):
                    pass

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


class ItemRun:
    """Runs one bound item through the agent and reports it like a local test."""

    def __init__(self, manager: IsolateManager, item: pytest.Item, nextitem: pytest.Item | None,
                 log: hostplugins.Log | None = None):
        self.m = manager
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
        return hostplugins.timeout_of(self.item) or self.spec.timeout or self.m.timeout

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
            inst = self.m.instance(self.env, self.timer)
            self.m.ensure_pytest(self.env, inst, self.timer)
            if self.item.nodeid not in inst.collected:
                self.fail("setup", self.not_collected_message(inst))
                return
            self.run_in(inst)
        except BackendUnavailable as exc:
            if not self.m.strict:
                self.skip(str(exc))  # identical reasons: the summary shows it once
                return
            first = self.m.unavailable_shown.setdefault(self.env, self.item.nodeid)
            if first == self.item.nodeid:
                self.fail("setup", f"{exc} (--isolate-strict turns this skip into a failure)")
            else:
                self.fail("setup", f"backend {exc.backend!r} of environment {self.env!r} is "
                                   f"unavailable (--isolate-strict); {first} shows why")
        except (AgentLost, AgentTimeout) as exc:
            lost = self.m.instances.get(self.env)
            # an environment that died while starting never was in instances: its log is
            # still where the backend wrote it
            agent_log = (lost.logs.get("agent") if lost is not None
                         else self.m.run_context().log_dir / self.env / "agent.log")
            tail = log_tail(agent_log)
            self.m.drop(self.env)
            self.synthesize(f"{exc}\n--- environment log tail ---\n{tail}")
        except (IsolateError, OSError) as exc:
            message = f"pytest-isolate: {type(exc).__name__}: {exc}"
            current = self.m.instances.get(self.env)
            if current is not None:
                message += f"\n--- environment log tail ---\n{log_tail(current.logs.get('agent'))}"
            self.fail("setup", message)
        finally:
            self.m.report.tests.append(
                TestRecord(self.item.nodeid, self.env, self.outcome, dict(self.timer.phases)))
            stats = self.m.report.envs.get(self.env)
            if stats is not None:
                stats.tests += 1
                stats.run_total += self.timer.phases.get("run", 0.0)

    def not_collected_message(self, inst: Instance) -> str:
        path = self.item.nodeid.split("::", 1)[0]
        for err in inst.collect_errors:
            if err.get("nodeid", "").split("::", 1)[0] == path:
                rep = self.m.config.hook.pytest_report_from_serializable(
                    config=self.m.config, data=err)
                return f"collecting {path} inside environment {self.env!r} failed:\n{rep.longreprtext}"
        return (f"{self.item.nodeid} was not collected inside environment {self.env!r}; "
                "collection differs between the host and the environment")

    def run_in(self, inst: Instance) -> None:
        conn = inst.conn
        worker = self.m.workers.get(self.env)
        scope = self.scope_key(self.item.nodeid)
        if worker is not None and worker.scope != scope:
            self.close_worker(inst, worker)
            worker = None
        zygote = self.zygote(inst) if self.spec.reset == "test" else None
        if zygote is not None:
            # a worker per test, forked by the zygote that holds the higher scopes (ahead
            # of time, while the previous test ran, when that one left the scopes alone)
            prepared = self.m.prepared.get(self.env)
            if prepared is not None and prepared[0] == self.item.nodeid:
                worker = self.m.prepared.pop(self.env)[1]
            else:
                if self.m.last_run.get(self.env) != self.item.nodeid:
                    # not a rerun of the test before (which keeps what was prepared for
                    # the next): the test prepared for is not coming next after all
                    self.m.discard_prepared(self.env)
                worker = self.fork_worker(inst, zygote, self.item.nodeid, scope)
            self.m.last_run[self.env] = self.item.nodeid
        elif worker is None:
            worker = Worker(conn.new_channel(), scope)
            conn.send(0, {"op": "worker", "ch": worker.ch, "kind": "test"})
            self.m.workers[self.env] = worker
        nxt = self.next_in_worker()
        with self.timer.phase("run"):
            debug = hostplugins.debug_inside(self.m.config)
            request: dict[str, Any] = {"op": "runtest", "nodeid": self.item.nodeid, "next": nxt,
                                       "timeout": self.timeout}
            if debug:  # a debugging session has no time limit, as pytest-timeout stops for one
                cols, rows = shutil.get_terminal_size()
                request.update(timeout=None, debug=True, rows=rows, cols=cols)
            conn.send(worker.ch, request)
            if zygote is not None and not debug:
                self.prepare_next(inst, zygote, scope)
            exit_reason = None
            while True:
                reply, _ = conn.recv(worker.ch, DEBUG_WAIT if debug else self.timeout + HOST_GRACE)
                op = reply["op"]
                if op == "pty-started":  # --pdb: the test's debugger, on this terminal
                    hostplugins.relay_debugger(self.m.config, conn, worker.ch, self.on_report)
                elif op == "report":
                    self.emit(self.rebuild(reply["data"]))
                elif op == "done":
                    break
                elif op == "warning":
                    self.item.warn(pytest.PytestWarning(reply["message"]))
                elif op == "missing":
                    self.fail("setup", self.not_collected_message(inst))
                    break
                elif op == "error":
                    self.synthesize(f"pytest-isolate agent error: {reply.get('message')}\n"
                                    f"{reply.get('traceback', '')}")
                    break
                elif op == "exit":
                    exit_reason = reply.get("reason") or "the worker exited"
                    if "out of memory" in exit_reason and inst.spec.memory is not None:
                        exit_reason += (f"; the environment's memory limit is "
                                        f"{format_size(inst.spec.memory)} "
                                        f"({inst.spec.source('memory')})")
                    self.m.workers.pop(self.env, None)
                    break
        if exit_reason is not None:
            tail = log_tail(inst.logs.get("agent"))
            self.synthesize(f"test worker inside environment {self.env!r} ended: {exit_reason}"
                            f"\n--- environment log tail ---\n{tail}")
            if zygote is not None:
                self.check_zygote(inst, zygote)
        elif self.outcome == "failed" and self.m.keep_failed:
            # keep the worker (its root as the test left it) for a shell after the run
            self.m.workers.pop(self.env, None)
            self.m.kept.append(KeptWorker(self.env, inst, worker.ch, self.item.nodeid))
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

    def fork_worker(self, inst: Instance, zygote: Worker, nodeid: str, scope: str) -> Worker:
        worker = Worker(inst.conn.new_channel(), scope)
        inst.conn.send(0, {"op": "worker", "ch": worker.ch, "kind": "test", "zygote": zygote.ch,
                           "nodeid": nodeid})
        return worker

    def prepare_next(self, inst: Instance, zygote: Worker, scope: str) -> None:
        """While this test runs, have the zygote fork the next one's worker (its root
        mounted, hardened, waiting for its runtest) -- when the zygote needs to set up or
        tear down nothing for it (shares_fixtures), so no fixture changes under this test
        and the order of set-ups and teardowns stays the host's."""
        nxt = self.m.next_in_zygote(self.item, self.nextitem)
        if nxt is None or self.env in self.m.prepared or not shares_fixtures(self.item, nxt):
            return
        self.m.prepared[self.env] = (nxt.nodeid, self.fork_worker(inst, zygote, nxt.nodeid, scope))

    def zygote(self, inst: Instance) -> Worker:
        zygote = self.m.zygotes.get(self.env)
        if zygote is None:
            zygote = Worker(inst.conn.new_channel(), "zygote")
            inst.conn.send(0, {"op": "worker", "ch": zygote.ch, "kind": "zygote"})
            self.m.zygotes[self.env] = zygote
        return zygote

    def check_zygote(self, inst: Instance, zygote: Worker) -> None:
        """After a worker ended abnormally: forget the zygote if it ended too (its set-up
        timed out, the environment ran out of memory); the next test starts a new one."""
        inst.conn.send(zygote.ch, {"op": "ping"})
        while True:
            op = inst.conn.recv(zygote.ch, HOST_GRACE)[0]["op"]
            if op == "pong":
                return
            if op in ("exit", "error"):
                self.m.zygotes.pop(self.env, None)
                self.m.discard_prepared(self.env)
                return

    def advance(self, inst: Instance, zygote: Worker) -> None:
        """Tell the zygote which of its tests comes next: it tears down the scopes that
        test leaves (a module's fixtures after its last test; all after the run's last
        test here) and its report becomes part of this test's teardown, as on the host."""
        nxt = self.m.next_in_zygote(self.item, self.nextitem)
        if nxt is not None and keeps_scopes(self.item, nxt):
            return  # nothing to tear down (the zygote would answer "advanced" alone)
        inst.conn.send(zygote.ch, {"op": "advance", "prev": self.item.nodeid,
                                   "next": nxt.nodeid if nxt is not None else None})
        while True:
            reply, _ = inst.conn.recv(zygote.ch, self.timeout + HOST_GRACE)
            op = reply["op"]
            if op == "report":
                self.merge_teardown(self.rebuild(reply["data"]))
            elif op == "advanced":
                return
            elif op in ("exit", "error"):
                self.m.zygotes.pop(self.env, None)
                self.m.discard_prepared(self.env)
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

    def close_worker(self, inst: Instance, worker: Worker) -> None:
        self.m.workers.pop(self.env, None)
        conn = inst.conn
        conn.send(worker.ch, {"op": "close"})
        while True:
            reply, _ = conn.recv(worker.ch, HOST_GRACE)
            if reply["op"] == "exit":
                return

    # ------------------------------------------------------------ reports
    def rebuild(self, data: dict[str, Any]) -> TestReport:
        """A report from the agent; JSON made its tuples lists, pytest wants tuples back."""
        for key in ("longrepr", "location"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        data["user_properties"] = [tuple(p) for p in data.get("user_properties", [])]
        data["sections"] = [tuple(s) for s in data.get("sections", [])]
        rep: TestReport = self.m.config.hook.pytest_report_from_serializable(
            config=self.m.config, data=data)
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
        inst = self.m.instances.get(self.env)
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
