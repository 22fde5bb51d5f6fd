"""The command line: ``pytest-isolate doctor | setup | envs | cache ls|gc|rm | shell ENV |
completion SHELL``.

Cheap to import: only the standard library at module level; the engine's
modules (config, cache, backends) are imported by the command that needs them.
Errors are one line, ``pytest-isolate: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pytest_isolate.sizes import dir_size, format_size, parse_size, walk_same_fs

if TYPE_CHECKING:
    from pytest_isolate.backends.base import Backend
    from pytest_isolate.cache import Cache, CacheItem
    from pytest_isolate.spec import EnvSpec

PROG = "pytest-isolate"
#: Backends doctor reports on, in this order (a missing module: not implemented yet).
DOCTOR_BACKENDS = ("chroot", "docker", "podman", "lxc", "schroot", "qemu")
#: Where a backend module would live when BUILTIN_BACKENDS does not name it yet.
FALLBACK_REFS = {"qemu": "pytest_isolate.backends.qemu:QemuBackend"}
#: gc removes finished runs' log directories older than this unless --max-age says otherwise.
RUNS_MAX_AGE_DAYS = 7.0
#: `completion SHELL` prints argcomplete's script for these shells.
COMPLETION_SHELLS = ("bash", "zsh", "fish")
COMPLETION_INSTALL = "pip install 'pytest-isolate-env[completion]'"
DOCKERD = "dockerd --bridge=none --iptables=false --ip-masq=false &"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


class UsageError(Exception):
    """A one-line error for the user (exit status 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


# --------------------------------------------------------------------------
# Formatting helpers


def size_arg(text: str) -> int:
    """--max-size's value: '10G', '500M', '1.5GiB', '4096' -> bytes (powers of 1024)."""
    size = parse_size(text)
    if size is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a number with an optional unit K, M, G or T (e.g. 10G)")
    return size


def parse_days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"invalid number of days {text!r}: use e.g. 7 or 0.5")
    return value


def format_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def dump_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------
# Project and cache location


@dataclasses.dataclass
class Project:
    """The project as the plugin sees it when pytest runs in the current directory."""

    #: the pyproject.toml with the [tool.pytest-isolate] table, None when there is none
    pyproject: Path | None
    table: dict[str, Any]
    #: pytest's ini values (isolate_* keys) from its inifile, whichever file that is
    ini: Mapping[str, Any]
    rootdir: Path
    inipath: Path | None


def load_project(option: str | None) -> Project:
    """pytest's own rootdir and inifile rules (pytest.ini, tox.ini, setup.cfg,
    pyproject.toml), so a command looks at what `pytest` in this directory would use;
    --pyproject FILE stands for `pytest -c FILE`."""
    from pytest_isolate import config

    inifile = None
    if option is not None:
        path = Path(option).expanduser().absolute()
        if not path.is_file():
            raise UsageError(f"--pyproject: {str(path)!r} is not a file")
        inifile = str(path)
    setup = config.pytest_setup(Path.cwd(), inifile)
    pyproject = setup.pyproject if setup.pyproject.is_file() else None
    return Project(pyproject, config.load_pyproject(pyproject), setup.ini, setup.rootdir,
                   setup.inipath)


def resolve_specs(project: Project) -> dict[str, EnvSpec]:
    from pytest_isolate import config
    from pytest_isolate.backends import BUILTIN_BACKENDS

    specs = config.resolve_envs(project.table, project.pyproject, BUILTIN_BACKENDS)
    config.check_all_options(specs, lambda name: load_backend(name)[0])
    return specs


def cache_location(args: argparse.Namespace, project: Project) -> tuple[Path, str]:
    """The cache directory and where that choice came from (the plugin's precedence)."""
    from pytest_isolate import config

    if args.cache_dir:
        return Path(args.cache_dir).expanduser().absolute(), "--cache-dir"
    value: Any = None
    where = ""
    if project.ini.get("isolate_cache_dir"):
        value = project.ini["isolate_cache_dir"]
        where = f"ini key 'isolate_cache_dir' in {project.inipath}"
    elif "cache_dir" in project.table:
        value = project.table["cache_dir"]
        where = f"{project.pyproject}: [{config.TABLE}] key 'cache_dir'"
    if value is not None:
        if not isinstance(value, str) or not value:
            raise UsageError(f"{where}: must be a non-empty string, got {value!r}")
        path = Path(value).expanduser()
        return (path if path.is_absolute() else project.rootdir / path), where
    env = os.environ.get("PYTEST_ISOLATE_CACHE_DIR")
    if env:
        return Path(env).expanduser().absolute(), "PYTEST_ISOLATE_CACHE_DIR"
    return config.default_cache_dir(), "default cache directory"


def open_cache(root: Path, where: str, create: bool = True) -> Cache:
    from pytest_isolate.cache import Cache

    return Cache(root, where=where, create=create)


# --------------------------------------------------------------------------
# What cache entries stand for


def summarize(manifest: dict[str, Any]) -> str:
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        return "-"
    if "release" in spec and "arch" in spec:
        text = f"{spec['release']}/{spec['arch']}"
        if spec.get("variant"):
            text += f" {spec['variant']}"
        extra = [p for p in spec.get("packages") or [] if p != "python3"]
        if extra:
            text += " +" + ",".join(extra)
        if spec.get("setup"):
            text += f" setup:{len(spec['setup'])}"
        if spec.get("setup_network"):
            text += " network"
        return text
    parts = []
    for key, value in sorted(spec.items()):
        if isinstance(value, (list, dict)):
            parts.append(f"{key}=[{len(value)}]")
        else:
            parts.append(f"{key}={str(value)[:12]}")
    return " ".join(parts)[:60]


def rootfs_key_of(spec: EnvSpec) -> str:
    """The key of the root filesystem spec's backend builds (a VM's has a kernel too)."""
    cls, _ = load_backend(spec.backend)
    return (cls.rootfs_spec(spec) if cls is not None else spec).rootfs_key()


def image_pins(root: Path, where: str) -> dict[str, dict[str, Any]]:
    """Per image reference, the newest cache record of what it resolved to (its digest,
    as the docker backend pinned it when it last provisioned it)."""
    pins: dict[str, tuple[float, dict[str, Any]]] = {}
    for item in open_cache(root, where, create=False).listing(with_size=False):
        ref, digest = item.manifest.get("reference"), item.manifest.get("digest")
        newer = isinstance(ref, str) and (ref not in pins or pins[ref][0] < item.last_use)
        if newer and isinstance(ref, str) and isinstance(digest, str):
            pins[ref] = (item.last_use, {"digest": digest, "last_use": item.last_use,
                                         "python": item.manifest.get("python")})
    return {ref: pin for ref, (_, pin) in pins.items()}


def envs_by_key(specs: dict[str, EnvSpec]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, spec in specs.items():
        found.setdefault(rootfs_key_of(spec), []).append(name)
    return found




# --------------------------------------------------------------------------
# cache ls / gc / rm


def cmd_cache_ls(args: argparse.Namespace, project: Project) -> int:
    root, where = cache_location(args, project)
    by_key = envs_by_key(resolve_specs(project))
    items = open_cache(root, where, create=False).listing()
    now = time.time()
    if args.json:
        dump_json({
            "cache_dir": str(root), "cache_dir_source": where,
            "entries": [{
                "kind": it.kind, "key": it.key, "path": str(it.path), "size": it.size,
                "created": it.created, "last_use": it.last_use, "spec": it.manifest.get("spec"),
                "envs": by_key.get(it.key, []) if it.kind == "rootfs" else [],
            } for it in items],
        })
        return 0
    out(f"cache: {root} ({where})")
    if not items:
        out("no entries")
        return 0
    rows = [["KEY", "KIND", "SPEC", "ENVS", "SIZE", "AGE", "LAST USE"]]
    for it in sorted(items, key=lambda i: i.last_use, reverse=True):
        envs = ",".join(by_key.get(it.key, [])) if it.kind == "rootfs" else ""
        rows.append([it.key, it.kind, summarize(it.manifest), envs or "-", format_size(it.size),
                     format_age(now - it.created), format_age(now - it.last_use) + " ago"])
    for line in table(rows):
        out(line)
    out(f"{plural(len(items), 'entry', 'entries')}, {format_size(sum(i.size for i in items))}")
    return 0


def run_dirs(root: Path) -> Iterator[tuple[Path, float]]:
    """(directory, newest mtime inside) of every finished run: no live process runs it
    (the manager's pruner decides the same way)."""
    from pytest_isolate.ownership import run_dir_finished

    runs = root / "runs"
    if not runs.is_dir():
        return
    for path in sorted(runs.iterdir()):
        if not path.is_dir() or not run_dir_finished(path):
            continue
        newest = max((st.st_mtime for st in walk_same_fs(path)), default=0.0)
        yield path, newest


def cmd_cache_gc(args: argparse.Namespace, project: Project) -> int:
    from pytest_isolate.cache import force_rmtree, mounted_under, path_pattern

    root, where = cache_location(args, project)
    out(f"cache: {root} ({where})")
    if not root.is_dir():
        out("nothing to do: the cache directory does not exist")
        return 0
    cache = open_cache(root, where)
    now = time.time()
    dry = args.dry_run
    verb = "would remove" if dry else "removed"

    # 0. what killed runs left outside the cache: containers, sessions, cgroups
    if dry:
        out("leftovers of killed runs (containers, sessions, cgroups): not looked for in a "
            "dry run")
    else:
        removed = reap_leftovers(cache)
        out(f"removed {len(removed)} leftovers of killed runs"
            + (f": {', '.join(removed)}" if removed else ""))

    # 1. build directories left by killed runs (their build lock is free)
    swept = cache.clean_tmp(dry=dry)
    for path, why in swept.kept:
        out(f"kept {path}: {why}")
    out(f"{verb} {len(swept.removed)} stale build directories")

    # 2. log/work directories of finished runs
    runs_max_age = (args.max_age if args.max_age is not None else RUNS_MAX_AGE_DAYS) * 86400
    removed_runs = 0
    for path, newest in run_dirs(root):
        if now - newest >= runs_max_age:
            # a killed run can leave host mounts there (schroot sessions bind the rootfs rw)
            inner = mounted_under([path_pattern(path)]).get(path_pattern(path))
            if inner is not None:
                out(f"kept {path}: something is still mounted under it ({inner}): unmount it first")
                continue
            if not dry:
                force_rmtree(path)
            removed_runs += 1
    out(f"{verb} {removed_runs} finished run directories older than "
        f"{runs_max_age / 86400:g} days")

    # 3. entries: too old first, then oldest-by-last-use until under --max-size
    max_age = args.max_age * 86400 if args.max_age is not None else None
    supersede = None if args.keep_states else cache_group_of(loaded_backends())
    done = cache.collect(max_age, args.max_size, dry, remove_external, supersede)
    for item in done.removed:
        out(f"{verb} {item.kind}/{item.key} ({summarize(item.manifest)}, {format_size(item.size)}, "
            f"last used {format_age(now - item.last_use)} ago)")
    for item, reason in done.kept:
        out(f"kept {item.kind}/{item.key}: {reason}")
    out(f"{verb} {len(done.removed)} entries, {format_size(sum(i.size for i in done.removed))}; "
        f"{done.remaining} entries remain, {format_size(done.remaining_size)}")
    if args.max_size is not None and done.remaining_size > args.max_size:
        out(f"still above --max-size {format_size(args.max_size)}: "
            "the remaining entries are in use or were used recently")
    return 0


def shell_run(cache: Cache) -> tuple[str, Path]:
    """The id and directory of a shell's run, its owner recorded (what `cache gc` and the
    leftover reapers judge it by)."""
    from pytest_isolate.ownership import RunId, record_run

    run_id = str(RunId.create("shell"))
    base = cache.root / "runs" / run_id
    record_run(base)
    return run_id, base


def loaded_backends() -> list[type[Backend]]:
    """The built-in backend classes that load here (one whose Python package is missing
    made no cache entries to judge)."""
    from pytest_isolate.backends import BUILTIN_BACKENDS

    classes = (load_backend(name)[0] for name in sorted(BUILTIN_BACKENDS))
    return [cls for cls in classes if cls is not None]


def cache_group_of(backends: list[type[Backend]]) -> Callable[[CacheItem], str | None]:
    """Cache.collect's supersede: the group a backend puts an entry in (a saved VM state
    is replaced by a newer state of the same machine), None when no backend groups it."""

    def group(item: CacheItem) -> str | None:
        for cls in backends:
            found = cls.cache_group(item.kind, item.manifest)
            if found is not None:
                return f"{cls.name}: {found}"
        return None

    return group


def remove_external(backend: str, item: CacheItem) -> str | None:
    """What a backend's cache entry stands for outside the cache (a Docker image), removed
    by the backend that made it (Cache.remove_unused asks before removing the entry)."""
    cls, missing = load_backend(backend)
    if cls is None:
        return f"backend {backend!r}, which made it, {missing}"
    return cls.remove_external(item.key, item.manifest)


def reap_leftovers(cache: Cache) -> list[str]:
    """Every built-in backend's reap(): what runs whose process is gone left behind."""
    from pytest_isolate.backends import BUILTIN_BACKENDS
    from pytest_isolate.backends.base import RunContext

    base = cache.root / "runs" / "gc"
    ctx = RunContext(run_id="gc", rootdir=Path.cwd(), cache=cache, log_dir=base / "logs",
                     work_dir=base / "work", progress=lambda message: None)
    removed: list[str] = []
    for name in sorted(BUILTIN_BACKENDS):
        cls, _ = load_backend(name)
        if cls is None:
            continue
        try:
            removed += [r for r in cls(ctx).reap() if r not in removed]
        except Exception as exc:  # best effort: an engine that is down has nothing to reap
            out(f"{name}: could not look for leftovers: {type(exc).__name__}: {exc}")
    return removed


def cmd_cache_rm(args: argparse.Namespace, project: Project) -> int:
    root, where = cache_location(args, project)
    items = open_cache(root, where, create=False).listing(with_size=False)
    if args.all:
        chosen = items
    else:
        if not args.keys:
            raise UsageError("cache rm: give one or more KEYs (see `cache ls`) or --all")
        chosen = []
        for key in args.keys:
            kind, _, short = key.rpartition("/")
            matches = [i for i in items if i.key.startswith(short) and (not kind or i.kind == kind)]
            if not matches:
                raise UsageError(f"cache rm: no entry matches {key!r} in {root} (see `cache ls`)")
            if len(matches) > 1:
                names = ", ".join(f"{m.kind}/{m.key}" for m in matches)
                raise UsageError(f"cache rm: {key!r} is ambiguous: {names}; give more of the key")
            chosen.append(matches[0])
    if not chosen:
        out(f"cache: {root}: no entries")
        return 0
    from pytest_isolate.cache import mount_pattern, mount_users

    cache = open_cache(root, where)
    busy = mount_users([mount_pattern(i) for i in chosen])
    status = 0
    for item in chosen:
        reason = cache.remove_unused(item, busy, remove_external)
        if reason is None:
            out(f"removed {item.kind}/{item.key} ({summarize(item.manifest)})")
        else:
            sys.stderr.write(f"{PROG}: not removed: {item.kind}/{item.key}: {reason}\n")
            status = 1
    return status


# --------------------------------------------------------------------------
# envs


def cmd_envs(args: argparse.Namespace, project: Project) -> int:
    from pytest_isolate import config
    from pytest_isolate.cache import read_manifest
    from pytest_isolate.spec import EnvSpec

    specs = resolve_specs(project)
    if args.names:
        config.check_env_names(args.names, "envs", specs)
    names = args.names or list(specs)
    root, where = cache_location(args, project)
    pins = image_pins(root, where)
    fields = [f.name for f in dataclasses.fields(EnvSpec) if f.name not in ("name", "sources")]
    result: dict[str, Any] = {}
    for name in names:
        spec = specs[name]
        values: dict[str, Any] = {}
        for key in fields:
            value = getattr(spec, key)
            if key == "options":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            values[key] = {"value": value, "source": spec.source(key)}
        key = rootfs_key_of(spec)
        result[name] = {
            "backend": spec.backend,
            "builtin": name in config.BUILTIN_ENVS or name in config.PYTHON_ENVS,
            "python": spec.python_version(),
            "values": values,
            "rootfs_key": key,
            "rootfs_cached": read_manifest(root / "rootfs" / key) is not None,
            "image_pin": pins.get(spec.image) if spec.image else None,
        }
    if args.json:
        dump_json({"pyproject": str(project.pyproject) if project.pyproject else None,
                   "cache_dir": str(root), "envs": result})
        return 0
    out(f"project: {project.pyproject or 'no pyproject.toml found (built-in environments only)'}")
    for name, info in result.items():
        origin = "built-in" if info["builtin"] else "pyproject.toml"
        if info["builtin"] and any(not s.startswith("built-in default")
                                   for s in specs[name].sources.values()):
            origin = "built-in, changed in pyproject.toml"
        out()
        out(f"{name}  ({origin})")
        rows = []
        for key, v in info["values"].items():
            value = v["value"]
            shown = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None \
                else str(value)
            rows.append([f"  {key}", shown, v["source"]])
        for line in table(rows):
            out(line)
        if specs[name].image:
            out(f"  {image_line(specs[name].image, info['image_pin'])}")
            continue
        state = "cached" if info["rootfs_cached"] else "not built yet"
        if info["python"]:
            out(f"  python {info['python']} (Debian {specs[name].release}'s python3)")
        out(f"  rootfs cache key: {info['rootfs_key']} ({state})")
    return 0


def image_line(ref: str | None, pin: dict[str, Any] | None) -> str:
    """What an image reference is pinned to, for `envs`."""
    if pin is None:
        return f"image {ref}: not pulled or checked yet (the first run that uses it does)"
    age = format_age(time.time() - float(pin["last_use"]))
    python = f"python {pin['python']}, " if pin.get("python") else ""
    return (f"image {ref}: pinned at {pin['digest']} ({python}last used {age} ago; "
            f"`docker pull {ref}` picks up a moved tag)")


# --------------------------------------------------------------------------
# doctor


@dataclasses.dataclass
class Probe:
    """Tools and daemons a backend needs: (command, Debian package) and (socket, start command)."""

    tools: tuple[tuple[str, str], ...] = ()
    daemons: tuple[tuple[str, str, str], ...] = ()  # (name, socket path, how to start)
    python: tuple[tuple[str, str], ...] = ()  # (module, how to install)


PROBES: dict[str, Probe] = {
    "chroot": Probe(tools=(("mmdebstrap", "mmdebstrap"),)),
    "schroot": Probe(tools=(("schroot", "schroot"), ("mmdebstrap", "mmdebstrap"))),
    "lxc": Probe(tools=(("lxc-start", "lxc"), ("lxc-attach", "lxc"), ("mmdebstrap", "mmdebstrap"))),
    "docker": Probe(
        tools=(("docker", "docker.io"), ("dockerd", "docker.io"), ("mmdebstrap", "mmdebstrap")),
        daemons=(("Docker engine", "/var/run/docker.sock", DOCKERD),),
        python=(("docker", "pip install 'pytest-isolate-env[docker]'"),),
    ),
    "podman": Probe(
        tools=(("podman", "podman"), ("mmdebstrap", "mmdebstrap")),
        daemons=(("podman service", "/run/podman/podman.sock",
                  "podman system service --time=0 unix:///run/podman/podman.sock &"),),
        python=(("docker", "pip install 'pytest-isolate-env[docker]'"),),
    ),
    "qemu": Probe(
        tools=(("qemu-system-x86_64", "qemu-system-x86"), ("qemu-system-aarch64", "qemu-system-arm"),
               ("qemu-img", "qemu-utils"), ("mkfs.ext4", "e2fsprogs"), ("mmdebstrap", "mmdebstrap")),
        daemons=(("libvirt (optional)", "/var/run/libvirt/libvirt-sock", "libvirtd -d"),),
    ),
}


def which(tool: str) -> str | None:
    import shutil

    return shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{tool}", os.X_OK)), None)


def socket_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def run_probe(probe: Probe) -> dict[str, Any]:
    import importlib.util

    tools = {tool: {"found": which(tool), "package": pkg} for tool, pkg in probe.tools}
    daemons = {name: {"socket": sock, "running": socket_answers(sock), "start": start}
               for name, sock, start in probe.daemons}
    python = {mod: {"found": importlib.util.find_spec(mod) is not None, "install": how}
              for mod, how in probe.python}
    return {"tools": tools, "daemons": daemons, "python": python}


def setup_invocation(*args: str) -> str:
    from pytest_isolate.setup_host import invocation

    return invocation(args)


def probe_hints(result: dict[str, Any], backend: str) -> list[str]:
    hints = []
    setup = setup_invocation("--backends", backend)
    missing = sorted({v["package"] for v in result["tools"].values() if not v["found"]})
    if missing:
        tools = ", ".join(t for t, v in result["tools"].items() if not v["found"])
        hints.append(f"missing {tools}: {setup}  (or apt-get install {' '.join(missing)})")
    for name, v in result["daemons"].items():
        if not v["running"]:
            hints.append(f"{name} is not running: {setup}  (or start it with `{v['start']}`)")
    for mod, v in result["python"].items():
        if not v["found"]:
            hints.append(f"Python package {mod!r} is missing: {v['install']}")
    return hints


def load_backend(name: str) -> tuple[type[Backend] | None, str]:
    """The backend class, or None and why not."""
    import importlib

    from pytest_isolate.backends import BUILTIN_BACKENDS

    ref = BUILTIN_BACKENDS.get(name) or FALLBACK_REFS.get(name)
    if ref is None:
        return None, "not implemented in this version of pytest-isolate"
    module_name, _, cls_name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None, "not implemented in this version of pytest-isolate"
        return None, f"cannot be loaded: Python module {exc.name!r} is missing"
    except Exception as exc:
        return None, f"cannot be loaded: {type(exc).__name__}: {exc}"
    cls = getattr(module, cls_name, None)
    if cls is None:
        return None, f"cannot be loaded: {module_name} has no {cls_name}"
    return cls, ""


class Checker:
    """Runs backends' check(spec) once per (backend, spec), in a throw-away run context."""

    def __init__(self, project: Project, cache: Cache, work: Path) -> None:
        self.project = project
        self.cache = cache
        self.work = work
        self.classes: dict[str, tuple[type[Backend] | None, str]] = {}
        self.backends: dict[str, Backend] = {}
        self.results: dict[tuple[str, EnvSpec], tuple[bool, str, str]] = {}

    def backend(self, name: str) -> Backend | str:
        from pytest_isolate.backends.base import RunContext

        if name not in self.classes:
            self.classes[name] = load_backend(name)
        cls, why = self.classes[name]
        if cls is None:
            return why
        if name not in self.backends:
            ctx = RunContext(run_id="doctor", rootdir=self.project.rootdir, cache=self.cache,
                             log_dir=self.work / "logs", work_dir=self.work / "work",
                             progress=lambda message: None)
            self.backends[name] = cls(ctx)
        return self.backends[name]

    def check(self, spec: EnvSpec) -> tuple[bool, str, str]:
        """(usable, reason, fix)."""
        from pytest_isolate.errors import BackendUnavailable

        key = (spec.backend, spec)
        if key not in self.results:
            backend = self.backend(spec.backend)
            if isinstance(backend, str):
                result = (False, backend, "")
            else:
                try:
                    backend.check(spec)
                    result = (True, "", "")
                except BackendUnavailable as exc:
                    result = (False, exc.reason, exc.fix)
                except Exception as exc:
                    result = (False, f"check failed: {type(exc).__name__}: {exc}", "")
            self.results[key] = result
        return self.results[key]


def kvm_status() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    virt = sorted(flags & {"vmx", "svm"})
    exists = os.path.exists("/dev/kvm")
    accessible = exists and os.access("/dev/kvm", os.R_OK | os.W_OK)
    if virt and accessible:
        verdict = ("likely usable (CPU flag " + ",".join(virt) + ", /dev/kvm accessible); "
                   "a bounded probe boot is still needed to be sure: VMs fall back to TCG if it fails")
    elif not exists:
        verdict = "not usable: /dev/kvm does not exist; VMs run under TCG emulation (slower)"
    elif not accessible:
        verdict = ("not usable: /dev/kvm is not readable and writable by this user "
                   "(add the user to group kvm); VMs run under TCG emulation")
    else:
        verdict = ("not usable: /dev/kvm exists but the CPU shows no vmx/svm flag "
                   "(paravirtual or nested KVM); VMs run under TCG emulation")
    return {"cpu_flags": virt, "dev_kvm": exists, "dev_kvm_accessible": accessible,
            "likely_usable": bool(virt and accessible), "verdict": verdict}


def binfmt_status() -> dict[str, Any]:
    mounted = (BINFMT_DIR / "register").exists()
    arches: dict[str, bool] = {}
    if mounted:
        for entry in sorted(BINFMT_DIR.glob("qemu-*")):
            try:
                arches[entry.name[len("qemu-"):]] = entry.read_text().startswith("enabled")
            except OSError:
                continue
    return {"mounted": mounted, "qemu_user": arches}


def cmd_doctor(args: argparse.Namespace, project: Project) -> int:
    from pytest_isolate.namespaces import userns_allowed

    specs = resolve_specs(project)
    user_envs = list(project.table.get("envs", {}) or {})
    used = user_envs or ["chroot"]
    root, where = cache_location(args, project)
    cache_problem = ""
    with tempfile.TemporaryDirectory(prefix="pytest-isolate-doctor.") as tmp:
        try:
            cache = open_cache(root, where)
        except Exception as exc:
            cache_problem = str(exc)
            cache = open_cache(Path(tmp) / "cache", "doctor")
        checker = Checker(project, cache, Path(tmp))
        backends: dict[str, Any] = {}
        for name in DOCTOR_BACKENDS:
            spec = next((s for s in specs.values() if s.backend == name), None)
            if spec is None:
                from pytest_isolate.spec import EnvSpec

                spec = EnvSpec(name=name, backend=name)
            usable, reason, fix = checker.check(spec)
            probe = run_probe(PROBES[name])
            cls, _ = checker.classes.get(name, (None, ""))
            packages = list(getattr(cls, "packages", ())) if cls is not None else []
            backends[name] = {"available": usable, "implemented": cls is not None,
                              "reason": reason, "fix": fix, "checked_with": spec.name,
                              "packages": packages, **probe, "hints": probe_hints(probe, name),
                              "setup": setup_invocation("--backends", name)}
        envs: dict[str, Any] = {}
        for name in used:
            spec = specs[name]
            usable, reason, fix = checker.check(spec)
            envs[name] = {"backend": spec.backend, "arch": spec.arch, "usable": usable,
                          "reason": reason, "fix": fix, "setup": setup_invocation("--envs", name)}
    items = open_cache(root, where, create=False).listing(with_size=False)
    report = {
        "root": os.geteuid() == 0,
        "userns_allowed": userns_allowed(),
        "root_inside": root_inside(root),
        "backends": backends,
        "kvm": kvm_status(),
        "binfmt": binfmt_status(),
        "cache": {"path": str(root), "source": where, "exists": root.is_dir(),
                  "problem": cache_problem, "entries": len(items),
                  "size": dir_size(root) if root.is_dir() else 0},
        "project": {"pyproject": str(project.pyproject) if project.pyproject else None,
                    "envs": envs},
    }
    ok = all(e["usable"] for e in envs.values()) and not cache_problem
    report["ok"] = ok
    if args.json:
        dump_json(report)
    else:
        print_doctor(report)
    return 0 if ok else 1


def root_inside(cache_root: Path) -> dict[str, str]:
    """Where each container backend's root lives on the host (README 'Security model')."""
    from pytest_isolate.namespaces import root_map, root_map_problem

    if os.geteuid() != 0:
        mine = f"host uid {os.geteuid()} (rootless: this user)"
        return {"chroot": mine, "schroot": "- (needs root)", "lxc": "- (needs root)",
                "docker": "the engine's root (rootless engine: its user)"}
    mapping = root_map()
    probe_at = cache_root if cache_root.is_dir() else Path(tempfile.gettempdir())
    problem = root_map_problem(probe_at, mapping)
    mapped = (mapping.describe() if problem is None else
              f"the host's root: no mapped root here ({problem})")
    return {"chroot": mapped, "schroot": mapped, "lxc": mapped,
            "docker": "the engine's root, unless dockerd maps it (userns-remap in daemon.json)"}


def debian_arch(binfmt_name: str) -> str:
    from pytest_isolate.setup_host import BINFMT_NAMES

    return next((deb for deb, name in BINFMT_NAMES.items() if name == binfmt_name), binfmt_name)


def print_doctor(r: dict[str, Any]) -> None:
    out(f"running as {'root' if r['root'] else f'uid {os.geteuid()}'}")
    out("backends:")
    for name, b in r["backends"].items():
        if b["available"]:
            state = "available"
        elif not b["implemented"]:
            state = b["reason"]
        else:
            state = f"unavailable: {b['reason']}"
        out(f"  {name:<8} {state}")
        if b["fix"]:
            out(f"           fix: {b['fix']}")
        if not b["available"]:
            for hint in b["hints"]:
                out(f"           {hint}")
        elif b["hints"] and b["implemented"]:
            for hint in b["hints"]:
                out(f"           note: {hint}")
    kvm = r["kvm"]
    out(f"KVM: {kvm['verdict']}")
    binfmt = r["binfmt"]
    setup_arm64 = setup_invocation("--arches", "arm64")
    if not binfmt["mounted"]:
        out(f"qemu-user (binfmt_misc): not mounted: {setup_arm64}  (or: "
            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc)")
    elif binfmt["qemu_user"]:
        arches = ", ".join(a + ("" if on else " (disabled)") for a, on in binfmt["qemu_user"].items())
        out(f"qemu-user (binfmt_misc): {arches}")
        disabled = [debian_arch(a) for a, on in binfmt["qemu_user"].items() if not on]
        if disabled:
            out(f"  enable the disabled ones: {setup_invocation('--arches', ','.join(disabled))}")
    else:
        out("qemu-user (binfmt_misc): none registered; foreign-arch chroots/containers need: "
            f"{setup_arm64}  (or: apt-get install qemu-user-static binfmt-support && "
            "update-binfmts --enable qemu-aarch64)")
    if r["root"]:
        userns = "allowed" if r["userns_allowed"] else "disabled (not needed as root)"
    else:
        userns = ("allowed" if r["userns_allowed"] else
                  "disabled: sysctl kernel.unprivileged_userns_clone=1 user.max_user_namespaces=15000")
    out(f"user namespaces: {userns}")
    out("root inside an environment is:")
    for name, where in r["root_inside"].items():
        out(f"  {name:<8} {where}")
    c = r["cache"]
    if c["problem"]:
        out(f"cache: {c['path']} ({c['source']}): PROBLEM: {c['problem']}")
    else:
        out(f"cache: {c['path']} ({c['source']}): {plural(c['entries'], 'entry', 'entries')}, "
            f"{format_size(c['size'])} in all")
    p = r["project"]
    out(f"project: {p['pyproject'] or 'no pyproject.toml found'}")
    for name, e in p["envs"].items():
        state = "usable" if e["usable"] else f"NOT usable: {e['reason']}"
        out(f"  {name} ({e['backend']}, {e['arch']}): {state}")
        if e["fix"]:
            out(f"      fix: {e['fix']}")
        if not e["usable"]:
            out(f"      set up what it needs: {e['setup']}")
    out("OK: every environment the project uses can run here" if r["ok"] else
        "NOT OK: some environments the project uses cannot run here (see above)")


# --------------------------------------------------------------------------
# setup (the planning and doing live in setup_host.py)


def split_list(value: str | None) -> list[str] | None:
    return [v for v in (value or "").replace(" ", ",").split(",") if v] or None


def cmd_setup(args: argparse.Namespace, project: Project) -> int:
    from pytest_isolate import setup_host
    from pytest_isolate.spec import host_arch

    specs = resolve_specs(project)
    try:
        request = setup_host.select(
            specs, list(project.table.get("envs", {}) or {}), backends=split_list(args.backends),
            envs=split_list(args.envs), arches=split_list(args.arches) or (), user=args.user,
            packages=not args.no_packages, host_arch=host_arch())
    except setup_host.SetupError as exc:
        raise UsageError(str(exc)) from None
    started = time.monotonic()
    state = setup_host.gather_state(request)
    plan = setup_host.plan(request, state)
    prefix = setup_host.sudo_prefix(state)
    arches = setup_host.foreign_arches(request, state)
    out(f"setup for {', '.join(request.backends)} ({request.why})"
        + (f"; foreign architectures: {', '.join(arches)}" if arches else "")
        + (f"; rootless user: {request.user}" if request.user else ""))
    for note in plan.notes:
        out(f"note: {note}")
    if args.dry_run or plan.problems:
        if plan.empty and not plan.problems:
            out("nothing to do: everything is in place")
        for step in plan.steps:
            out(f"# {step.reason}")
            out(step.shell(prefix))
        for problem in plan.problems:
            sys.stderr.write(f"{PROG}: error: {problem}\n")
        return 2 if plan.problems else 0
    if plan.empty:
        out(f"nothing to do: everything is in place ({time.monotonic() - started:.1f}s)")
        return 0
    if prefix:
        out(f"not running as root: the commands run through {prefix[0]}")
    try:
        setup_host.execute(plan.steps, prefix, out)
    except setup_host.SetupError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    left = setup_host.plan(request, setup_host.gather_state(request))
    if not left.empty:
        sys.stderr.write(f"{PROG}: error: still not in place after setup: "
                         + "; ".join(s.reason for s in left.steps) + "\n")
        return 1
    out(f"done in {time.monotonic() - started:.1f}s")
    return 0


# --------------------------------------------------------------------------
# shell


def cmd_shell(args: argparse.Namespace, project: Project) -> int:
    import shutil

    from pytest_isolate import config
    from pytest_isolate.backends.base import SITE, RunContext, standard_mounts
    from pytest_isolate.images.envvars import environment_variables
    from pytest_isolate.namespaces import launcher_argv

    specs = resolve_specs(project)
    config.check_env_names([args.env], "shell", specs)
    spec = specs[args.env]
    if spec.backend != "chroot":
        return shell_through_agent(args, project, spec)
    from pytest_isolate.backends.chroot import ChrootBackend

    root, where = cache_location(args, project)
    cache = open_cache(root, where)
    run_id, base = shell_run(cache)

    def progress(message: str) -> None:
        try:
            sys.stderr.write(f"{PROG}: {message}\n")
            sys.stderr.flush()
        except OSError:
            pass  # a closed stderr must not abort a build halfway

    ctx = RunContext(run_id=run_id, rootdir=project.rootdir, cache=cache, log_dir=base / "logs",
                     work_dir=base / "work", progress=progress)
    backend = ChrootBackend(ctx)
    backend.check(spec)
    entry = backend.provision(spec)
    rootdir = str(project.rootdir)
    # what a test sees; a project at / is not bound over the environment's own root
    binds: list[list[Any]] = [[m.src, m.dst, m.readonly]
                              for m in standard_mounts(ctx, spec, entry) if m.dst != "/"]
    has_bash = (entry.data / "usr/bin/bash").exists() or (entry.data / "bin/bash").is_file()
    argv = list(args.argv) if args.argv else ["/bin/bash" if has_bash else "/bin/sh"]
    env = environment_variables(spec, pycache=True)
    env.update({"PYTHONPATH": SITE, "debian_chroot": f"isolate:{spec.name}",
                "TERM": os.environ.get("TERM", "dumb")})
    workdir = base / "work" / f"{spec.name}-shell"
    workdir.mkdir(parents=True)
    cfg = {"rootfs": str(entry.data), "workdir": str(workdir), "mode": "overlay", "binds": binds,
           "network": spec.network, "hostname": f"isolate-{spec.name}"[:63], "argv": argv,
           "env": env, "cwd": rootdir, "new_session": False}
    if sys.stdin.isatty():
        progress(f"shell in a fresh {spec.summary()}; changes are discarded on exit")
    # Ctrl-C belongs to the shell.  A no-op handler, not SIG_IGN: an ignored signal would
    # stay ignored through exec in the shell and every command it runs.
    # SIGTERM / SIGHUP end the instance (the launcher kills everything inside), then we clean up.
    proc: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: Any) -> None:
        if proc is not None:
            proc.terminate()

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGINT, lambda signum, frame: None), (signal.SIGTERM, stop),
                 (signal.SIGHUP, stop))}
    try:
        proc = subprocess.Popen(launcher_argv(cfg))
        code = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(base, ignore_errors=True)
    return code if code >= 0 else 128 - code


def shell_through_agent(args: argparse.Namespace, project: Project, spec: Any) -> int:
    """shell for any backend: a fresh instance, a terminal relayed over the agent protocol."""
    import importlib
    import shutil

    from pytest_isolate.backends import BUILTIN_BACKENDS
    from pytest_isolate.backends.base import RunContext
    from pytest_isolate.environment import Environment

    ref = BUILTIN_BACKENDS.get(spec.backend)
    if ref is None:
        raise UsageError(f"shell: backend {spec.backend!r} of environment {spec.name!r} is not "
                         "a built-in one; use its own tools")
    module, _, attr = ref.partition(":")
    backend_class = getattr(importlib.import_module(module), attr)
    root, where = cache_location(args, project)
    cache = open_cache(root, where)
    run_id, base = shell_run(cache)

    def progress(message: str) -> None:
        try:
            sys.stderr.write(f"{PROG}: {message}\n")
            sys.stderr.flush()
        except OSError:
            pass

    ctx = RunContext(run_id=run_id, rootdir=project.rootdir, cache=cache, log_dir=base / "logs",
                     work_dir=base / "work", progress=progress)
    backend = backend_class(ctx)
    backend.check(spec)
    instance = backend.start(spec, backend.provision(spec))
    try:
        env = Environment(instance)
        if sys.stdin.isatty():
            progress(f"shell in a fresh {spec.summary()}; changes are discarded on exit")
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            return env.shell(list(args.argv) or None, cwd=str(project.rootdir))
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        instance.stop()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------
# Shell completion: argcomplete (the optional `completion` extra)
#
# argcomplete rather than shtab: a TAB runs this program, which completes from the same
# parser, so the project's environment names come from the same Python lookup as `envs`
# for bash, zsh and fish alike, with no per-shell code of ours.  The price, starting
# Python per TAB, stays small because the completers load no backend.

#: argcomplete's completers: (prefix, parsed_args, ...) -> candidates (it filters by prefix)
Completer = Callable[..., list[str]]


def import_argcomplete() -> Any:
    try:
        import argcomplete
    except ImportError:
        raise UsageError("shell completion needs the argcomplete package, which is not "
                         f"installed: {COMPLETION_INSTALL}") from None
    return argcomplete


def project_env_names(option: str | None) -> list[str]:
    """The names `envs` lists: the built-in environments and the project's.  Resolved
    without loading backends (no engine's SDK, no daemon), so a TAB stays fast; a project
    whose configuration is broken completes the built-in names."""
    from pytest_isolate import config
    from pytest_isolate.backends import BUILTIN_BACKENDS
    from pytest_isolate.errors import IsolateError

    try:
        project = load_project(option)
        return list(config.resolve_envs(project.table, project.pyproject, BUILTIN_BACKENDS))
    except (IsolateError, UsageError):
        return [*config.BUILTIN_ENVS, *config.PYTHON_ENVS]


def env_names(parsed_args: argparse.Namespace) -> list[str]:
    """The project's environments; --pyproject given before the word counts."""
    return project_env_names(getattr(parsed_args, "pyproject", None))


def complete_envs(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    return env_names(parsed_args)


def backend_names(parsed_args: argparse.Namespace) -> list[str]:
    from pytest_isolate.backends import BUILTIN_BACKENDS

    return [*sorted(BUILTIN_BACKENDS), "all"]


def arch_names(parsed_args: argparse.Namespace) -> list[str]:
    from pytest_isolate.spec import ARCH_MACHINES

    return sorted(ARCH_MACHINES)


def comma_list(names: Callable[[argparse.Namespace], Iterable[str]]) -> Completer:
    """Completes a NAME[,NAME...] value: the names not given yet, after the ones given
    (bash does not break words at commas, so the prefix is the whole list so far)."""

    def complete(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
        head, comma, _last = prefix.rpartition(",")
        given = set(head.split(",")) if comma else set()
        return [head + comma + name for name in names(parsed_args) if name not in given]

    return complete


def with_completer(action: argparse.Action, completer: Completer) -> argparse.Action:
    """argcomplete reads an action's `completer` attribute; argparse ignores it."""
    action.completer = completer  # type: ignore[attr-defined]
    return action


def complete(parser: Parser) -> int:
    """Answer a shell's TAB: argcomplete's protocol (the line in COMP_LINE, the candidates
    written to file descriptor 8), then exit.  Without argcomplete there is nothing to say:
    the shell script mutes stderr, so the message is for `_ARC_DEBUG` runs."""
    try:
        argcomplete = import_argcomplete()
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    argcomplete.autocomplete(parser)  # exits when _ARGCOMPLETE is set
    return 1


def cmd_completion(args: argparse.Namespace) -> int:
    argcomplete = import_argcomplete()
    sys.stdout.write(argcomplete.shellcode([PROG], shell=args.shell))
    return 0


# --------------------------------------------------------------------------
# Parser and entry point

Handler = Callable[[argparse.Namespace, Project], int]
#: a command that needs no project (completion): it works in any directory
Standalone = Callable[[argparse.Namespace], int]


def with_project(handler: Handler) -> Standalone:
    """A command that reads the project (pytest's rootdir and inifile rules) first."""
    return lambda args: handler(args, load_project(args.pyproject))


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--cache-dir", metavar="DIR",
                        help="cache directory (default: the isolate_cache_dir ini key, else "
                             "[tool.pytest-isolate] cache_dir, else "
                             "$PYTEST_ISOLATE_CACHE_DIR, else ~/.cache/pytest-isolate)")
    common.add_argument("--pyproject", metavar="FILE",
                        help="the project's pyproject.toml, as pytest -c FILE (default: "
                             "what pytest finds from the current directory: pytest.ini, "
                             "pyproject.toml, tox.ini or setup.cfg, and the rootdir's "
                             "pyproject.toml)")
    parser = Parser(
        prog=PROG,
        description="Inspect and maintain pytest-isolate: which backends work on this host, "
                    "the resolved environments, the cache of built environments, and a debugging "
                    "shell inside an environment.",
        epilog="Run `pytest-isolate COMMAND --help` for a command's options.",
    )
    from pytest_isolate import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} "
                        f"(distribution pytest-isolate-env)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("doctor", parents=[common],
                       help="which backends work on this host and what to install for the others",
                       description="Report every backend (available or what to install/start), "
                                   "KVM, qemu-user binfmt registrations, user namespaces and the "
                                   "cache. Exit status 0 only when every environment the project's "
                                   "pyproject.toml defines (or `chroot` when it defines none) "
                                   "can run here, 1 otherwise.")
    p.add_argument("--json", action="store_true", help="print a JSON document instead")
    p.set_defaults(handler=cmd_doctor)

    p = sub.add_parser("envs", parents=[common], help="the resolved environment specs",
                       description="Show every environment (built-in and from pyproject.toml) "
                                   "with each value and where it came from, its root filesystem "
                                   "cache key and whether that is built.")
    with_completer(p.add_argument("names", nargs="*", metavar="ENV",
                                  help="only these environments"), complete_envs)
    p.add_argument("--json", action="store_true", help="print a JSON document instead")
    p.set_defaults(handler=cmd_envs)

    p = sub.add_parser("cache", help="list, garbage-collect or remove cached environments",
                       description="The content-addressed cache of built environments.")
    p.set_defaults(help_parser=p)
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    c = csub.add_parser("ls", parents=[common], help="list cache entries",
                        description="List entries: key, kind, spec summary, the project's "
                                    "environments that use it, size, age and last use.")
    c.add_argument("--json", action="store_true", help="print a JSON document instead")
    c.set_defaults(handler=cmd_cache_ls)
    c = csub.add_parser("gc", parents=[common], help="remove old or excess entries",
                        description="Remove what killed runs left outside the cache "
                                    "(containers, LXC containers, schroot sessions, cgroups), "
                                    "stale build directories of killed runs, log "
                                    "directories of finished runs (older than --max-age, default "
                                    f"{RUNS_MAX_AGE_DAYS:g} days), entries not used for --max-age "
                                    "days, saved VM states a newer state of the same machine "
                                    "replaces, then the least recently used entries until the cache "
                                    "fits --max-size. Entries in use by a running session or "
                                    "being built are never removed.")
    c.add_argument("--max-age", type=parse_days, metavar="DAYS",
                   help="remove entries not used for this many days")
    c.add_argument("--max-size", type=size_arg, metavar="SIZE",
                   help="remove least recently used entries until the total is at most SIZE "
                        "(e.g. 10G, 500M)")
    c.add_argument("--keep-states", action="store_true",
                   help="keep every saved VM state, not only the newest per machine")
    c.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    c.set_defaults(handler=cmd_cache_gc)
    c = csub.add_parser("rm", parents=[common], help="remove entries by key",
                        description="Remove the given entries (a unique key prefix is enough; "
                                    "KIND/KEY picks a kind) or all of them. Entries in use are "
                                    "kept and the exit status is 1.")
    c.add_argument("keys", nargs="*", metavar="KEY", help="entry key, prefix or KIND/KEY")
    c.add_argument("--all", action="store_true", help="remove every entry")
    c.set_defaults(handler=cmd_cache_rm)

    p = sub.add_parser("setup", parents=[common],
                       help="install and start what the project's backends need (root or sudo)",
                       description="Install the system packages (apt: Debian, Ubuntu), enable "
                                   "binfmt for foreign architectures, start the Docker engine and "
                                   "libvirtd, and give --user subordinate id ranges, for the "
                                   "environments the project's pyproject.toml defines (or the "
                                   "built-in chroot), or what --envs / --backends name. What is "
                                   "in place is left alone: a second run does nothing. Needs "
                                   "root; runs the commands through sudo otherwise.")
    with_completer(p.add_argument("--backends", metavar="NAME[,NAME...]",
                                  help="these backends (chroot, docker, podman, lxc, schroot, qemu, or all)"),
                   comma_list(backend_names))
    with_completer(p.add_argument("--envs", metavar="ENV[,ENV...]",
                                  help="what these environments need (their backends and "
                                       "architectures)"),
                   comma_list(env_names))
    with_completer(p.add_argument("--arches", metavar="ARCH[,ARCH...]",
                                  help="also these foreign architectures (Debian names: arm64, "
                                       "armhf, ...)"),
                   comma_list(arch_names))
    p.add_argument("--user", metavar="NAME",
                   help="an unprivileged user for rootless use: subordinate uid/gid ranges, uidmap")
    p.add_argument("--no-packages", action="store_true",
                   help="install nothing: only binfmt, daemons and the user's id ranges")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands (with their reasons) instead of running them")
    p.set_defaults(handler=cmd_setup)

    p = sub.add_parser("shell", parents=[common],
                       help="an interactive shell in a fresh instance of an environment",
                       description="Start a shell (bash, else sh) in a fresh instance of ENV, "
                                   "provisioning it first if needed; the project directory is "
                                   "mounted at the same path and is the working directory, the "
                                   "host's pytest is importable. Writes are discarded on exit. "
                                   "The exit status is the shell's. Every backend: chroot "
                                   "runs the shell directly, the others through the agent.")
    with_completer(p.add_argument("env", metavar="ENV",
                                  help="environment name (see `pytest-isolate envs`)"),
                   complete_envs)
    p.add_argument("argv", nargs="*", metavar="COMMAND",
                   help="run this command instead of a shell; put it after `--` when it has "
                        "options of its own: shell ENV -- sh -c 'echo hi'")
    p.set_defaults(handler=cmd_shell)

    p = sub.add_parser("completion", help="print the shell completion script (bash, zsh, fish)",
                       description="Print the script that makes TAB complete pytest-isolate's "
                                   "commands, options and the project's environment names. "
                                   "Load it from the shell's startup file: "
                                   'eval "$(pytest-isolate completion bash)" in ~/.bashrc, '
                                   'eval "$(pytest-isolate completion zsh)" in ~/.zshrc (after '
                                   "compinit), pytest-isolate completion fish | source in "
                                   "~/.config/fish/config.fish. Needs the completion extra: "
                                   f"{COMPLETION_INSTALL}.")
    p.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell to print the script for")
    p.set_defaults(standalone=cmd_completion)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # a shell's TAB, not a command
        return complete(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after `--` is the command of `shell`
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if extra:
        if args.command != "shell":
            parser.error(f"unexpected arguments after '--': {' '.join(extra)}")
        args.argv = list(args.argv) + extra
    handler: Handler | None = getattr(args, "handler", None)
    command: Standalone | None = (with_project(handler) if handler is not None
                                  else getattr(args, "standalone", None))
    if command is None:
        target: argparse.ArgumentParser = getattr(args, "help_parser", parser)
        target.print_help(sys.stderr)
        return 2
    from pytest_isolate.errors import IsolateError

    try:
        return command(args)
    except (IsolateError, UsageError) as exc:
        first, _, rest = str(exc).partition("\n")
        sys.stderr.write(f"{PROG}: error: {first}\n")
        if rest:
            sys.stderr.write(rest + "\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 1
