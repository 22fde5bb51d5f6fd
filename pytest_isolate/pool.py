"""The instance pool: the environments of one pytest process and their worker processes.

It places an environment on an engine (the default one or a pool host's), provisions
it (and its dependency layer), starts it, starts the pytest inside that collects the
bound items, and keeps per environment the worker of the current scope, the zygote
holding higher-scoped fixtures and the worker forked ahead for the next test.  At the
session's end it closes all of that and prunes old run directories.  The hook plugin
(manager.py) owns one; each ItemRun (itemrun.py) takes its instance and workers here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from pytest_isolate import config as cfg
from pytest_isolate import hostplugins, inside
from pytest_isolate.agent.wire import message
from pytest_isolate.backends.base import Backend, Instance, RunContext
from pytest_isolate.cache import Cache, force_rmtree
from pytest_isolate.errors import (
    AgentError,
    BackendUnavailable,
    ConfigError,
    IsolateError,
    ProvisionError,
    RemoteError,
)
from pytest_isolate.keys import ENV_KEY
from pytest_isolate.ownership import record_run, run_dir_finished
from pytest_isolate.settings import INI_NAMES, Settings
from pytest_isolate.spec import EnvSpec
from pytest_isolate.timing import EnvStats, Move, PhaseTimer, RunReport

#: the spec of an isolated item: its environment's, with the marker's overrides
SPEC_KEY = pytest.StashKey[EnvSpec]()
#: Extra time the host waits beyond a test's timeout before it gives up on the agent.
HOST_GRACE = 30.0


@dataclasses.dataclass(frozen=True)
class WorkerChannel:
    """A worker process inside an instance, as the host drives it: its channel on the
    instance's connection and the scope it serves (a test's nodeid, a module's path,
    "session", or "zygote").  (agent.py's Worker is the process's own side.)"""

    ch: int
    scope: str


@dataclasses.dataclass
class KeptWorker:
    """The worker of a failed test, kept alive by --isolate-keep-failed."""

    env: str
    instance: Instance
    ch: int
    nodeid: str


def release_worker(inst: Instance, ch: int) -> None:
    """Close a test's worker without waiting for its exit; its late frames are dropped."""
    inst.conn.close_worker(ch, wait=None)


def check_image_support(spec: EnvSpec, backend_class: Any) -> None:
    """ConfigError when spec's root is an image its backend cannot run (a VM would boot
    the Debian root filesystem and ignore the key)."""
    if spec.from_image and not getattr(backend_class, "supports_images", False):
        key = "image" if spec.image is not None else "dockerfile"
        raise ConfigError(f"{spec.source(key)}: backend {spec.backend!r} cannot run an image yet "
                          "(docker, podman, chroot, lxc, schroot and qemu can); remove the key, or "
                          "use one of those backends")


class InstancePool:
    """The environments of this pytest process (name -> running instance) and the
    workers inside them; one per run, owned by the hook plugin."""

    def __init__(self, config: pytest.Config, settings: Settings, report: RunReport,
                 progress: Callable[[str], None]) -> None:
        self.config = config
        self.settings = settings
        #: the run's report: the pool records each environment's placement and timings
        self.report = report
        self.run_id = report.run_id
        #: a line for the user (the hook plugin's, on the terminal)
        self.progress = progress
        self.instances: dict[str, Instance] = {}
        #: per environment: the worker of the current scope (reset = "module"/"session")
        self.workers: dict[str, WorkerChannel] = {}
        #: per environment: the zygote that holds higher-scoped fixtures (reset = "test")
        self.zygotes: dict[str, WorkerChannel] = {}
        #: per environment: the worker forked ahead for its next test (nodeid, worker)
        self.prepared: dict[str, tuple[str, WorkerChannel]] = {}
        #: per environment: the test that ran last
        self.last_run: dict[str, str] = {}
        self._zygote_next: dict[str, pytest.Item | None] | None = None
        self.backends: dict[str, Backend] = {}
        #: pool hosts that failed their health check in this run: (pool host, backend) -> why
        self.dead_pool_hosts: dict[tuple[str, str], str] = {}
        #: per environment: the pool host its last instance was placed on
        self.placed: dict[str, str] = {}
        self.unavailable: dict[str, BackendUnavailable] = {}
        #: per environment: the test whose failure showed its backend's whole message
        self.unavailable_shown: dict[str, str] = {}
        self.broken: dict[str, Exception] = {}
        #: per environment: the nodeids of the collected items bound to it
        self.bound: dict[str, set[str]] = {}
        #: environments whose missing plugins were reported already
        self.plugins_warned: set[str] = set()
        #: dependency plans per environment (None: nothing to install), see layer_plan
        self.plans: dict[str, Any] = {}
        self.kept: list[KeptWorker] = []
        #: releases of the shared locks on the cache entries this run uses
        self.holds: dict[str, Callable[[], None]] = {}
        #: why warm environments are not used, said once (warm_refused)
        self.warm_said = False
        #: (environment, its image entry's key or None) -> its warm key (warm_key)
        self.warm_keys: dict[tuple[str, str | None], str | None] = {}
        #: environments whose spare was taken before collection and whose pytest waits
        #: for its files (start_early)
        self.early: set[str] = set()
        self._cache: Cache | None = None

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            self._cache = Cache(self.settings.cache_root, where=self.settings.cache_where)
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
            strict=self.settings.strict,
        )

    def backend(self, name: str, endpoint: str | None = None) -> Backend:
        """The backend object driving one engine (the default one, or a pool host's)."""
        cache_key = f"{name}@{endpoint}" if endpoint else name
        if cache_key in self.backends:
            return self.backends[cache_key]
        ref = self.settings.backend_refs.get(name)
        if ref is None:
            raise BackendUnavailable(
                name, "no backend of that name is registered",
                f"registered backends: {', '.join(sorted(self.settings.backend_refs))}; third-party "
                "backends register through the pytest_isolate_backends hook")
        cls, why = cfg.load_backend_class(ref)
        if cls is None:
            raise BackendUnavailable(name, f"the backend {why}",
                                     f"its registration says {ref!r}; install what it needs")
        backend: Backend = cls(self.run_context())
        backend.endpoint = endpoint
        self.backends[cache_key] = backend
        return backend

    # ------------------------------------------------------------ instances
    def placed_backend(self, name: str, spec: EnvSpec) -> tuple[cfg.PoolHost | None, Backend]:
        """The checked backend for environment name's next instance, and its pool host.

        Called for every new instance, so a pool host that died since the last one is found
        here: a pool host failing its health check is dead for the rest of this run (other
        environments skip it without asking), the environment moves to the next candidate
        (a Move in the report), and NoHostLeft names every pool host's reason when none is
        left.
        """
        xdist_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        origin = self.placed.get(name)
        while True:
            pool_host = cfg.place(spec, self.settings.pool_hosts, xdist_worker,
                                  self.dead_pool_hosts)
            endpoint = pool_host.endpoints[spec.backend] if pool_host else None
            backend = self.backend(spec.backend, endpoint)
            if pool_host is None:  # no pool host serves it: the default engine, as before
                backend.check(spec)
                return None, backend
            try:
                backend.check(spec)
            except BackendUnavailable as exc:
                self.dead_pool_hosts[pool_host.name, spec.backend] = exc.reason
                origin = origin or pool_host.name
                continue
            if origin is not None and origin != pool_host.name:
                self.report.moves.append(Move(name, origin, pool_host.name,
                                              self.dead_pool_hosts[origin, spec.backend]))
                self.progress(f"{name}: moved from host {origin!r} to {pool_host.name!r} "
                              f"({self.dead_pool_hosts[origin, spec.backend]})")
            self.placed[name] = pool_host.name
            return pool_host, backend

    def instance(self, name: str, timer: PhaseTimer) -> Instance:
        inst = self.instances.get(name)
        if inst is not None and inst.alive():
            return inst
        if inst is not None:
            self.drop(name)
        spec = self.settings.specs[name]
        if name in self.unavailable:
            raise self.unavailable[name]
        inst = self.warm_instance(name, spec, timer)
        if inst is not None:
            self.instances[name] = inst
            return inst
        try:
            pool_host, backend = self.placed_backend(name, spec)
        except BackendUnavailable as exc:
            self.unavailable[name] = exc
            raise
        endpoint = backend.endpoint
        stats = self.env_stats(name, spec)
        stats.host = pool_host.name if pool_host is not None else "default"
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
            self.progress(f"built {spec.summary()} in {entry.build_seconds:.1f}s")
        with timer.phase("start"):
            started = time.perf_counter()
            inst = self.start(name, spec, entry, backend)
            self.started(stats, inst, time.perf_counter() - started)
        self.instances[name] = inst
        return inst

    def env_stats(self, name: str, spec: EnvSpec) -> EnvStats:
        """Environment name's record in the run's report (made at its first instance)."""
        return self.report.envs.setdefault(
            name, EnvStats(name, spec.backend, spec.arch, spec.release))

    @staticmethod
    def started(stats: EnvStats, inst: Instance, seconds: float) -> None:
        """Record an instance's start (or a warm spare's take) in its environment's record."""
        stats.start += seconds
        stats.starts += 1
        stats.root = inst.root or stats.root
        stats.logs = {k: str(v) for k, v in inst.logs.items()}

    # ------------------------------------------------------------ warm environments
    def warm_key(self, name: str, spec: EnvSpec, entry: Any = None) -> str | None:
        """The key of environment name's warm instances (warm.py), None when it has none:
        warm environments off, a backend without them, a pool of hosts to place it on, or
        (entry None) an image, whose key needs the digest its provisioning pins.  Made once
        per environment and run (an image's: once per entry)."""
        memo = (name, entry.key if spec.from_image and entry is not None else None)
        if memo not in self.warm_keys:
            self.warm_keys[memo] = self._warm_key(name, spec, entry)
        return self.warm_keys[memo]

    def _warm_key(self, name: str, spec: EnvSpec, entry: Any, bound: bool | None = None
                  ) -> str | None:
        """bound: whether tests are bound to the environment (its dependency layer is part
        of the key); None: as collection found."""
        if self.settings.warm <= 0 or self.settings.pool_hosts:
            return None
        if not getattr(self.settings.backend_class(spec.backend), "supports_warm", False):
            return None
        if spec.from_image and entry is None:
            return None
        from pytest_isolate import warm

        layer: list[Any] = []
        try:
            plan = self.layer_plan(name) if (
                name in self.bound if bound is None else bound) else None
        except IsolateError:
            return None  # said by the run's own provisioning, with its test
        if plan is not None:
            from pytest_isolate.images.deps import choose_installer, host_index_config

            layer = [repr(plan), host_index_config().key_fields(), choose_installer(spec)[0]]
        image = [entry.kind, entry.key, str(entry.path)] if spec.from_image else []
        return warm.key_of(spec, self.settings.backend_refs[spec.backend], None,
                           self.config.rootpath, [layer, image])

    def warm_instance(self, name: str, spec: EnvSpec, timer: PhaseTimer,
                      key: str | None = None) -> Instance | None:
        """A keeper's spare of environment name (of key: else warm_key's), taken before
        anything else is done here: its keeper checked the backend, provisioned and
        started it (warm.py); None when there is none to take (the run goes on as without
        warm environments)."""
        key = key or self.warm_key(name, spec)
        if key is None:
            return None
        from pytest_isolate import warm

        with timer.phase("start"):
            started = time.perf_counter()
            try:
                taken = warm.take(self.cache.root, key, spec)
            except PermissionError as exc:  # a socket directory others can enter
                self.warm_refused(str(exc))
                return None
            if taken is None:
                return None
            inst, meta = taken
            stats = self.env_stats(name, spec)
            stats.warm = True
            stats.key = str(meta.get("entry_key", ""))
            stats.cache_hit = True if stats.cache_hit is None else stats.cache_hit
            self.started(stats, inst, time.perf_counter() - started)
        return inst

    def warm_refused(self, why: str) -> None:
        if not self.warm_said:
            self.warm_said = True
            self.progress(f"no warm environments: {why}")

    def start(self, name: str, spec: EnvSpec, entry: Any, backend: Backend) -> Instance:
        """A started instance of spec; with warm environments, an image's spare when one
        waits (its key needs the entry), and a keeper left for the next run."""
        key = self.warm_key(name, self.settings.specs[name], entry)
        if key is None or not backend.warm_ok(spec):
            return backend.start(spec, entry)
        from pytest_isolate import warm

        if spec.from_image:
            try:
                taken = warm.take(self.cache.root, key, spec)
            except PermissionError as exc:
                self.warm_refused(str(exc))
                return backend.start(spec, entry)
            if taken is not None:
                self.report.envs[name].warm = True
                return taken[0]
        inst = backend.start(spec, entry)
        ref = self.settings.backend_refs[spec.backend]
        desc = warm.Description(
            key=key, backend_ref=ref, endpoint=backend.endpoint, spec=spec, entry=entry,
            rootdir=self.config.rootpath, cache_root=self.cache.root,
            cache_where=self.settings.cache_where, strict=self.settings.strict,
            idle=self.settings.warm)
        try:
            spawned = warm.spawn_keeper(desc)
        except PermissionError as exc:
            self.warm_refused(str(exc))
            return inst
        if not spawned:
            self.warm_refused(f"the backend {ref!r} of {name!r} cannot be passed to another "
                              "process")
        return inst

    def layer_plan(self, name: str) -> Any:
        """The dependency plan of environment name (images/deps.py; None: nothing to
        install), made once per run; bad keys raise ConfigError."""
        if name in self.plans:
            return self.plans[name]
        from pytest_isolate.images.deps import choose_installer, make_plan

        spec = self.settings.specs[name]
        plan = None
        explicit = [k for k in cfg.DEPS_KEYS if spec.source(k) != "built-in default"]
        backend_class = self.settings.backend_class(spec.backend)
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

    # ------------------------------------------------------------ pytest inside
    def start_early(self) -> None:
        """Before the host collects: take the spare of each environment the last run of
        this command used (end_early remembers them) whose keeper holds one, and start the
        pytest there on the host's own arguments -- its configuration, plugins and initial
        conftests -- while the host collects.  It collects once ensure_pytest sends the
        files bound to it; the spare of an environment no test is bound to after all is
        given back (end_early)."""
        if self.settings.warm <= 0 or self.settings.pool_hosts:
            return
        from pytest_isolate import warm

        used = warm.used_last(self.cache.root, self.command_key())
        if not used:  # (a new command, or one that used none: no keeper's status read)
            return
        for name in sorted(used & warm.with_spares(self.cache.root, self.config.rootpath)):
            spec = self.settings.specs.get(name)
            key = None if spec is None else self._warm_key(name, spec, None, bound=True)
            if spec is None or key is None:
                continue
            inst = self.warm_instance(name, spec, PhaseTimer(), key)
            if inst is None:
                continue
            self.instances[name] = inst
            try:
                inst.conn.send(0, self.pytest_request(name, inst, inside.initial_paths(
                    self.config), deferred=True))
            except (IsolateError, OSError):
                self.drop(name)  # its tests start an environment of their own
                continue
            self.early.add(name)
            self.env_stats(name, spec).early = True

    def end_early(self, used: set[str], remember: bool = True) -> None:
        """After collection: give back the spares start_early took for environments no
        selected test is bound to (stopped: their pytest had started), and remember the
        ones this command used, for its next run's start_early."""
        for name in sorted(self.early - used):
            self.early.discard(name)
            self.drop(name)
            self.report.envs.pop(name, None)
        if remember and self.settings.warm > 0 and not self.settings.pool_hosts:
            from pytest_isolate import warm

            with contextlib.suppress(OSError):
                warm.remember_used(self.cache.root, self.command_key(), used)

    def command_key(self) -> str:
        """What identifies this run's command: the project, where pytest ran, its arguments."""
        from pytest_isolate import warm

        params = self.config.invocation_params
        return warm.command_key(self.config.rootpath, params.dir, params.args)

    def pytest_request(self, name: str, inst: Instance, files: list[str],
                       deferred: bool = False) -> dict[str, Any]:
        """The message that starts inst's pytest on files (deferred: configured from them,
        it waits for the files to collect), sent once coverage is set up there."""
        addopts, _ = inside.filter_addopts(inside.addopts_of(self.config))
        args = inside.pytest_args(self.config, files, addopts)
        coverage = hostplugins.coverage_options(self.config)
        if coverage is not None:  # pytest-cov: measured inside too (hostplugins.py)
            inst.conn.call(0, message("configure", settings={"coverage": coverage}),
                           timeout=self.settings.timeout)
        return message("pytest", args=args, cwd=str(self.config.rootpath),
                       default_envs=self.settings.default_envs, ini_names=list(INI_NAMES),
                       markers=[str(m) for m in self.config.getini("markers")],
                       plugins=[ep for ep, _ in inside.host_plugins(self.config.pluginmanager)],
                       deferred=deferred)

    def deferred_collect(self, name: str, inst: Instance, files: list[str]
                         ) -> dict[str, Any] | None:
        """The answer of a pytest start_early started to the files bound to it; None when
        it failed to start (started again as ensure_pytest does, which says why)."""
        reply, _ = inst.conn.recv(0, self.settings.timeout)
        if reply["op"] == "error":
            return None
        if reply["op"] != "waiting":
            raise AgentError(f"unexpected answer from the agent: {reply}")
        self.plugins_missing(name, reply)
        rootdir = self.config.rootpath
        return inst.conn.call(0, message("files", args=[str(rootdir / f) for f in files]),
                              timeout=self.settings.timeout)[0]

    def ensure_pytest(self, name: str, inst: Instance, timer: PhaseTimer) -> None:
        if inst.pytest_started:
            return
        files = sorted({nodeid.split("::", 1)[0] for nodeid in self.bound.get(name, ())})
        reply = None
        if name in self.early:
            self.early.discard(name)
            with timer.phase("sync"):
                reply = self.deferred_collect(name, inst, files)
        if reply is None:
            request = self.pytest_request(name, inst, files)
            reply = self.collect(name, inst, request, timer)
        if reply["op"] != "collected":
            raise AgentError(f"unexpected answer from the agent: {reply}")
        inst.pytest_started = True
        inst.collected = set(reply["nodeids"])
        inst.collect_errors = list(reply["errors"])

    def collect(self, name: str, inst: Instance, request: dict[str, Any],
                timer: PhaseTimer) -> dict[str, Any]:
        """inst's pytest started by request, and its answer once it collected."""
        args = request["args"]
        # the project's addopts as pytest_request gave them (inside.pytest_args)
        addopts = next((a for a in args if a.startswith("addopts=")), "")[len("addopts="):]
        with timer.phase("sync"):
            try:
                reply, _ = inst.conn.call(0, request, timeout=self.settings.timeout)
            except RemoteError as exc:
                if exc.type_name != "PytestStartError" or not addopts:
                    raise
                # an option of the project's addopts that the pytest inside does not know
                # (its plugin is not installed there): said once, then run without them
                self.progress(f"{name}: pytest inside refused the project's addopts "
                              f"{addopts!r} (its log: {inst.logs.get('agent')}); "
                              "running there without them")
                request["args"] = ["addopts=" if a.startswith("addopts=") else a for a in args]
                reply, _ = inst.conn.call(0, request, timeout=self.settings.timeout)
        self.plugins_missing(name, reply)
        return reply

    def plugins_missing(self, name: str, reply: dict[str, Any]) -> None:
        """One line (once per environment) for the host's plugins that the pytest inside
        did not load, not being installed there (the agent's answer says which)."""
        missing = set(reply.get("missing") or ())
        if not missing or name in self.plugins_warned:
            return
        self.plugins_warned.add(name)
        names = [f"{dist} (plugin {ep!r})" for ep, dist in
                 inside.host_plugins(self.config.pluginmanager) if ep in missing]
        self.progress(f"{name}: pytest plugins loaded here but not installed inside: "
                      f"{', '.join(names)}; add them to 'deps' or 'dependency_groups' "
                      f"in [{cfg.TABLE}] (or the environment's table) to load them there")

    # ------------------------------------------------------------ workers
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
                inst.conn.send(zygote.ch, message("advance", prev=None, next=None))
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

    # ------------------------------------------------------------ session end
    def close(self) -> None:
        """The session's end: scopes held in zygotes torn down, kept workers' shells
        (--isolate-keep-failed), every instance stopped, the cache entries' locks
        released."""
        self.close_zygotes()
        if self.kept:
            self.enter_kept()
        for name in list(self.instances):
            self.drop(name)
        for release in self.holds.values():
            release()
        self.holds.clear()

    def reap_after_crash(self, xdist_worker: str) -> None:
        """xdist controller: a worker died without tearing down; remove what it left.

        Its agents die with it (they see their stdin close), but containers, LXC
        containers and schroot sessions outlive it.  Every backend's reap() removes only
        what belongs to processes that are gone, so the other workers' instances stay.
        """
        for name in sorted({spec.backend for spec in self.settings.specs.values()}):
            try:
                self.backend(name).reap()
            except Exception as exc:  # best effort: the next run reaps again
                self.progress(f"after worker {xdist_worker} died: could not reap {name}: {exc}")

    def prune_runs(self, keep: int = 20) -> None:
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
