"""The small protocol every backend implements.

A backend turns an EnvSpec into a running *instance*: a byte stream to a
python3 inside the environment running the agent (see agent.BOOTSTRAP).
Everything else -- per-test clean state, running pytest items, commands,
files, snapshots -- is the agent's job and therefore the same for all backends.

Capabilities are class attributes, not ``if backend == ...`` branches
elsewhere.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from pytest_isolate.agent.wire import BOOTSTRAP, message
from pytest_isolate.cache import Cache, Entry
from pytest_isolate.channel import Connection
from pytest_isolate.config import Option
from pytest_isolate.errors import BackendUnavailable, IsolateError
from pytest_isolate.images.envvars import PYCACHE
from pytest_isolate.namespaces import MAP_ROOT_OPTION
from pytest_isolate.setup_host import HostNeeds
from pytest_isolate.spec import EnvSpec
from pytest_isolate.system import safe_name

if TYPE_CHECKING:
    from pytest_isolate.limits import HostCgroup

#: Where the host's pytest is visible inside every environment.
SITE = "/.isolate/site"
#: Pure-Python packages shipped from the host so both sides run the same pytest (and, for
#: pytest-cov, the same coverage: its compiled tracer is used where it fits the Python
#: inside, its pure-Python one elsewhere).
SHIPPED = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py",
           "exceptiongroup", "tomli", "pygments", "coverage")
Progress = Callable[[str], None]
#: How long a step of a start may take: the agent's handshake (ten times that under
#: qemu-user), an engine's start command (lxc-start, schroot -b).
START_TIMEOUT = 60.0
T = TypeVar("T")


@dataclasses.dataclass
class RunContext:
    """What a backend needs from the pytest run: where things go, what is shared."""

    run_id: str
    rootdir: Path
    cache: Cache
    log_dir: Path
    work_dir: Path
    progress: Progress
    strict: bool = False

    @property
    def runs_dir(self) -> Path:
        """Where every run's directory is (``<cache>/runs/<run id>``): what reapers read to
        learn which process ran a run (see ownership.run_owner)."""
        return self.cache.root / "runs"

    def log_path(self, env: str, name: str) -> Path:
        path = self.log_dir / env / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def shipped_paths() -> list[tuple[str, str]]:
    """(host path, path inside) for every shipped package the host has, with its metadata."""
    out = []
    for name in SHIPPED:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin is None:
            continue
        if spec.submodule_search_locations:
            src = os.path.dirname(spec.origin)
            out.append((src, f"{SITE}/{name}"))
        else:
            out.append((spec.origin, f"{SITE}/{os.path.basename(spec.origin)}"))
    wanted = {"pytest", "pluggy", "iniconfig", "packaging", "exceptiongroup", "tomli", "pygments",
              "coverage"}
    seen = set()
    for dist in importlib.metadata.distributions():
        dist_name = (dist.metadata["Name"] or "").lower()
        path = getattr(dist, "_path", None)
        if dist_name in wanted and dist_name not in seen and path is not None:
            seen.add(dist_name)
            out.append((str(path), f"{SITE}/{os.path.basename(str(path))}"))
    return out


def required_python() -> tuple[int, int]:
    """The oldest Python the host's pytest supports (from its Requires-Python)."""
    try:
        requires = importlib.metadata.metadata("pytest")["Requires-Python"] or ""
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        requires = ""
    m = re.search(r">=\s*(\d+)\.(\d+)", requires)
    return (int(m.group(1)), int(m.group(2))) if m else (3, 9)


def pycache_dir(run: RunContext, image: Entry) -> Path:
    """A persistent bytecode cache for one image's Python (PYTHONPYCACHEPREFIX inside).

    Without it every start recompiles the shipped pytest: a second natively, tens of
    seconds under qemu-user.  Keyed by the image, so one Python version writes it.
    """
    path = run.cache.root / "pycache" / image.key
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class Mount:
    """A host path made visible inside an environment."""

    src: str
    dst: str
    readonly: bool


def standard_mounts(run: RunContext, spec: EnvSpec, image: Entry,
                    pycache: bool = True) -> list[Mount]:
    """What every environment sees: the rootdir at its own path (read-only unless the spec
    says otherwise), the host's pytest at /.isolate/site, and, where the backend can share
    a writable host directory, the bytecode cache."""
    rootdir = str(run.rootdir)
    mounts = [Mount(rootdir, rootdir, not spec.rootdir_writable)]
    mounts += [Mount(src, dst, True) for src, dst in shipped_paths()]
    if pycache:
        mounts.append(Mount(str(pycache_dir(run, image)), PYCACHE, False))
    return mounts + layer_mounts(spec)


def layer_mounts(spec: EnvSpec) -> list[Mount]:
    """The dependency layer's read-only binds (images/deps.py), when spec has one."""
    if spec.layer is None:
        return []
    from pytest_isolate.images.deps import PROJECT_LAYER, VENV

    mounts = [Mount(str(spec.layer.venv), VENV, True)]
    if spec.layer.project is not None:
        mounts.append(Mount(str(spec.layer.project), PROJECT_LAYER, True))
    return mounts


def agent_settings(run: RunContext, spec: EnvSpec, mounts: list[Mount],
                   lower: str = "/.isolate/lower") -> dict[str, Any]:
    """The agent's settings: per-test overlays over `lower` bounded by the spec's disk,
    the mounts re-bound in each."""
    settings = {"isolation": "overlay", "lower": lower, "site": SITE,
                "binds": [m.dst for m in mounts], "cwd": str(run.rootdir),
                "disk": spec.limits().disk,
                # the worker's hardening (agent.harden_process); None: privileged = true.
                # No seccomp filter under qemu-user: it would judge the emulator's syscalls
                "harden": None if spec.privileged else {"seccomp": not spec.foreign}}
    if spec.layer is not None and spec.layer.project is not None:
        from pytest_isolate.images.deps import PROJECT_LAYER

        # what the editable install built (extensions) over the read-only project tree
        settings["project_layer"] = [PROJECT_LAYER, str(run.rootdir)]
    return settings


def handshake_or_stop(instance: Instance, settings: dict[str, Any],
                      timeout: float = START_TIMEOUT) -> Instance:
    """Complete the agent's handshake (longer under qemu-user); stop the instance if it fails."""
    with instance.stopped_on_error():
        instance.handshake(settings, timeout * (10 if instance.spec.foreign else 1))
    return instance


class Transport(Protocol):
    """How a backend reaches its agent: a Connection, and a way to tell and end its life."""

    conn: Connection

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


class Instance:
    """A running environment with its agent; the same for every backend."""

    def __init__(self, spec: EnvSpec, process: Transport, logs: dict[str, Path],
                 cleanup: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.process = process
        self.conn: Connection = process.conn
        self.logs = logs
        self.hello: dict[str, Any] = {}
        #: where the environment's root lives on the host (chroot: a mapped uid, or why
        #: it is the host's root); "" where the backend does not say
        self.root = ""
        self.pytest_started = False
        self.collected: set[str] = set()
        self.collect_errors: list[dict[str, Any]] = []
        self._cleanup = cleanup

    def handshake(self, settings: dict[str, Any], timeout: float) -> None:
        """Send the agent, check its Python, and configure it."""
        self.conn.bootstrap()
        self.hello, _ = self.conn.call(0, message("hello"), timeout=timeout)
        need = required_python()
        have = tuple(self.hello["python"][:2])
        if have < need:
            raise IsolateError(
                f"environment {self.spec.name!r} runs Python {'.'.join(map(str, self.hello['python']))}, "
                f"but the pytest shipped from the host needs Python >= {need[0]}.{need[1]}; "
                "use a newer release for this environment or an older pytest on the host"
            )
        self.conn.call(0, message("configure", settings=settings), timeout=timeout)

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self) -> None:
        """Stop the agent, then undo what starting it made (once, however often called)."""
        try:
            self.process.stop()
        finally:
            if self._cleanup is not None:
                cleanup, self._cleanup = self._cleanup, None
                cleanup()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @contextlib.contextmanager
    def stopped_on_error(self) -> Iterator[Instance]:
        """Stop the instance if the block fails (the instance stays up when it succeeds)."""
        try:
            yield self
        except BaseException:
            self.stop()
            raise


@dataclasses.dataclass
class Launch:
    """What a backend's launch() started, for the template Backend.start to finish."""

    #: the byte stream to the agent (not handshaken yet)
    process: Transport
    #: the instance's logs, in the order they are shown; "agent" is the one whose tail is
    #: shown when the agent is lost; "provision" (the image's log) is added last unless given
    logs: dict[str, Path]
    #: sent to the agent by the handshake (agent_settings)
    settings: dict[str, Any]
    timeout: float = START_TIMEOUT
    #: where the environment's root lives on the host, from the agent's hello (Instance.root)
    root: Callable[[dict[str, Any]], str] | None = None


class LiveSet(Generic[T]):
    """What this process made outside itself (schroot sessions, LXC containers), ended at
    exit by `end` if the instance's own cleanup never ran: an interrupted run (an
    unhandled KeyboardInterrupt, sys.exit from a plugin) must not leave them behind."""

    def __init__(self, end: Callable[[str, T], None]) -> None:
        self._end = end
        self._items: dict[str, T] = {}
        self._lock = threading.Lock()
        atexit.register(self.end_all)

    @contextlib.contextmanager
    def holding(self, name: str, item: T) -> Iterator[None]:
        """`item` is in the set for the block (an ExitStack keeps it until its cleanup)."""
        with self._lock:
            self._items[name] = item
        try:
            yield
        finally:
            with self._lock:
                self._items.pop(name, None)

    def end_all(self) -> None:
        with self._lock:
            live = list(self._items.items())
            self._items.clear()
        for name, item in live:
            self._end(name, item)


class Backend(abc.ABC):
    """Base of every backend.  Register a subclass through ``pytest_isolate_backends``."""

    name: ClassVar[str] = ""
    #: Needs to be root on the host (no unprivileged mode).
    needs_root: ClassVar[bool] = False
    #: Per-test copy-on-write state and snapshot()/restore() inside.
    supports_snapshot: ClassVar[bool] = True
    #: What the backend needs on the host: packages, services, Python modules (read by
    #: doctor, which probes them, and by setup for the built-in backends).
    host_needs: ClassVar[HostNeeds] = HostNeeds()
    #: The keys of an environment's `options` table it reads, checked before anything
    #: starts (with the common ones, e.g. python).  None: not declared, not checked.
    options: ClassVar[Mapping[str, Option] | None] = None
    #: Runs the project's dependency layer (images/deps.py: a virtual environment built on
    #: the Debian root filesystem, bound at /.isolate/venv).
    supports_layers: ClassVar[bool] = True
    #: Runs an environment whose root is an image (`image = REF` or `dockerfile`).
    supports_images: ClassVar[bool] = False
    #: The first start() reaps what killed runs left (reap_once); False where nothing
    #: outlives an instance but what the backend reaps at a point of its own.
    reaps_at_start: ClassVar[bool] = True
    #: A started instance can wait in a keeper process for a later run, which takes over
    #: its agent's stream (warm.py): the stream is file descriptors that work in another
    #: process, and the instance needs nothing of the run that takes it.
    supports_warm: ClassVar[bool] = False

    @classmethod
    def remove_external(cls, key: str, manifest: dict[str, Any]) -> str | None:
        """Remove what a cache entry of this backend stands for outside the cache directory
        (its manifest names the backend as "external_backend"), before `cache gc`/`rm`
        removes the entry; None when done, else why it must be kept."""
        return None

    @classmethod
    def cache_group(cls, kind: str, manifest: dict[str, Any]) -> str | None:
        """The group a cache entry of this backend belongs to when a newer entry of the same
        group replaces it (`cache gc` keeps only the newest of each group unless told to
        keep them all); None: not this backend's, or never replaced."""
        return None

    @classmethod
    def describe_image(cls, spec: EnvSpec, pin: Mapping[str, Any] | None) -> str | None:
        """A line for `envs` on how this backend runs spec's image beyond what the image is
        pinned at (pin: cli.common.image_pins' record, None before its first use); None:
        nothing to add."""
        return None

    @classmethod
    def rootfs_spec(cls, spec: EnvSpec) -> EnvSpec:
        """The spec of the Debian root filesystem this backend builds for spec (a backend
        that adds packages says so here; `cache ls` and `envs` show the right key)."""
        return spec

    def __init__(self, run: RunContext) -> None:
        self.run = run
        #: The engine this object drives: a pool host's endpoint (a Docker URL, a libvirt
        #: URI, ...) from [tool.pytest-isolate.hosts], or None for the backend's default.
        self.endpoint: str | None = None
        self._reaped = False

    def warm_ok(self, spec: EnvSpec) -> bool:
        """Whether an instance of spec may wait for a later run (supports_warm): not where
        it holds a copy of the project taken at its start, which a later run would find
        stale (a remote engine's copy, a VM's disk)."""
        return self.supports_warm

    @abc.abstractmethod
    def check(self, spec: EnvSpec) -> None:
        """Raise BackendUnavailable saying what to install when spec cannot run here."""

    @abc.abstractmethod
    def provision(self, spec: EnvSpec) -> Entry:
        """Build (or find in the cache) what start() needs; must be idempotent."""

    def start(self, spec: EnvSpec, image: Entry) -> Instance:
        """Start an instance whose agent has completed its handshake.

        The template: reap once, then launch() -- every resource it makes goes with its
        undo onto an ExitStack, so a failure part way unwinds what was made so far -- then
        ready() (the handshake).  The Instance owns the stack's undos from the launch on:
        a failed handshake stops it, and so does its stop() later.  A backend supplies
        launch() (and ready() if its handshake differs), or a start() of its own.
        """
        if self.reaps_at_start:
            self.reap_once()
        with contextlib.ExitStack() as stack:
            launch = self.launch(stack, spec, image)
            logs = {**launch.logs}
            logs.setdefault("provision", image.log)
            instance = Instance(spec, launch.process, logs, stack.pop_all().close)
            stack.enter_context(instance)  # from here a failure stops it: agent, then undos
            self.ready(instance, launch)
            stack.pop_all()
        return instance

    def launch(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
               image: Entry) -> Launch:
        """Start the agent of an instance of spec, pushing the undo of everything made on
        the way onto stack (stack.callback / enter_context), in the order made."""
        raise NotImplementedError(f"backend {self.name!r} ({type(self).__qualname__}) "
                                  "implements neither launch() nor start()")

    def ready(self, instance: Instance, launch: Launch) -> None:
        """Complete the agent's handshake (longer under qemu-user) and learn from its hello
        where the root lives; start() stops the instance if this fails."""
        instance.handshake(launch.settings,
                           launch.timeout * (10 if instance.spec.foreign else 1))
        if launch.root is not None:
            instance.root = launch.root(instance.hello)

    def reap_once(self) -> None:
        """reap() the first time this backend object is used: one guard for every backend
        (start() calls it; a backend may call it sooner, e.g. at its first contact)."""
        if not self._reaped:
            self._reaped = True
            self.reap()

    def reap(self) -> list[str]:
        """Remove what runs whose process is gone left behind (containers, sessions...).

        Must never touch what a live run owns.  Called by a backend when it first
        starts, by the xdist controller when a worker dies, and by `cache gc`.
        Returns a description of each thing removed.
        """
        return []


class RootfsBackend(Backend):
    """A backend whose environments run on the cached Debian root filesystem directly."""

    options: ClassVar[Mapping[str, Option] | None] = {}
    supports_images = True  # the engine's export of the image (backends/image_rootfs.py)

    def check_rootfs(self, spec: EnvSpec, overlay: bool = True) -> None:
        """What every such backend needs: overlayfs, a rootfs builder, binfmt when foreign."""
        from pytest_isolate.namespaces import check_foreign, check_rootfs_builder

        if overlay and "overlay" not in Path("/proc/filesystems").read_text():
            raise BackendUnavailable(self.name, "the kernel has no overlay filesystem",
                                     "load it: modprobe overlay")
        check_rootfs_builder(self.name)
        if spec.foreign:
            check_foreign(self.name, spec.machine)

    def reap(self) -> list[str]:
        """The cgroups of killed runs (see HostCgroup); subclasses add their own leftovers."""
        from pytest_isolate.limits import reap_cgroups

        return reap_cgroups()

    def host_cgroup(self, spec: EnvSpec) -> HostCgroup | None:
        """The cgroup holding one instance's processes, when the spec has limits (the
        first one reaps: a backend that reaps at start has, the others now do)."""
        from pytest_isolate.limits import HostCgroup

        if spec.limits().needs_cgroup:
            self.reap_once()
        return HostCgroup.create(spec.limits(), f"environment {spec.name!r}")

    def held_cgroup(self, stack: contextlib.ExitStack[bool | None],
                    spec: EnvSpec) -> HostCgroup | None:
        """host_cgroup(spec), removed (its processes killed) when stack unwinds."""
        group = self.host_cgroup(spec)
        if group is not None:
            stack.callback(group.remove)
        return group

    def provision(self, spec: EnvSpec) -> Entry:
        log = self.run.log_path(spec.name, "provision.log")
        if spec.from_image:  # an image's root filesystem, exported by the engine
            from pytest_isolate.backends.image_rootfs import provision_image_rootfs

            return provision_image_rootfs(spec, self.run.cache, log, self.run.progress,
                                          self.run.rootdir)
        from pytest_isolate.images.rootfs import provision_rootfs

        return provision_rootfs(spec, self.run.cache, log, self.run.rootdir, self.run.progress)


class HostRootBackend(RootfsBackend):
    """A root filesystem backend that runs as the host's root (lxc, schroot): the
    environment's root is mapped to an unprivileged host uid unless ``map_root = false``,
    and each instance is named after the run, for the reaper (``instance_name``)."""

    needs_root = True
    supports_warm = True  # the agent's stream is the pipes of lxc-attach or schroot
    options: ClassVar[Mapping[str, Option] | None] = {"map_root": MAP_ROOT_OPTION}
    #: the start of every instance's name (what the reapers look for)
    PREFIX: ClassVar[str] = "pytest-isolate-"

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self._instances = 0

    def require_root(self, why: str) -> None:
        if os.geteuid() != 0:
            raise BackendUnavailable(
                self.name, why, "run pytest as root, or use the chroot backend (works without root)")

    def instance_name(self, spec: EnvSpec) -> str:
        """A name for spec's next instance: the prefix, the run, the environment, a count."""
        self._instances += 1
        return f"{self.PREFIX}{safe_name(self.run.run_id)}-{safe_name(spec.name)}-{self._instances}"


def need_tool(backend: str, tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BackendUnavailable(backend, f"{tool!r} is not installed",
                                 f"install it with: apt-get install {package}")
    return path


def agent_command(spec: EnvSpec, cwd: str | None = None) -> list[str]:
    """The command inside an environment that starts the agent (source comes on stdin);
    cwd: the directory it changes into first (not `env -C`: busybox's env, the one of
    Alpine and other musl images, has no -C)."""
    if spec.layer is not None:
        from pytest_isolate.images.deps import VENV

        python = f"{VENV}/bin/python"
    else:
        python = spec.option("python", "python3")
    chdir = f"import os;os.chdir({cwd!r})\n" if cwd is not None else ""
    return [python, "-u", "-c", chdir + BOOTSTRAP]
