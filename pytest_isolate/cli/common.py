"""What the commands share: output helpers, the project (pytest's own rootdir and inifile
rules), the cache's location, the one backend loader, and what cache entries stand for."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pytest_isolate.sizes import parse_size

if TYPE_CHECKING:
    from pytest_isolate.backends.base import Backend
    from pytest_isolate.cache import Cache
    from pytest_isolate.spec import EnvSpec


PROG = "pytest-isolate"


class UsageError(Exception):
    """A one-line error for the user (exit status 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


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


def stderr_progress(message: str) -> None:
    """A progress line of a long command on stderr (stdout may be a pipe)."""
    try:
        sys.stderr.write(f"{PROG}: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass  # a closed stderr must not abort a build halfway


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
    as the docker backend pinned it when it last provisioned it), with "kernel" ("VERSION,
    from WHERE") when a machine booted it (the newest of its VM disks), in one listing."""
    pins: dict[str, tuple[float, dict[str, Any]]] = {}
    kernels: dict[str, tuple[float, str]] = {}
    for item in open_cache(root, where, create=False).listing(with_size=False):
        ref, digest = item.manifest.get("reference"), item.manifest.get("digest")
        if not isinstance(ref, str):
            continue
        if "kernel_from" in item.manifest:
            if ref not in kernels or kernels[ref][0] < item.last_use:
                kernels[ref] = (item.last_use, f"{item.manifest.get('kernel')}, from "
                                               f"{item.manifest['kernel_from']}")
        elif isinstance(digest, str) and (ref not in pins or pins[ref][0] < item.last_use):
            pins[ref] = (item.last_use, {"digest": digest, "last_use": item.last_use,
                                         "python": item.manifest.get("python")})
    return {ref: {**pin, **({"kernel": kernels[ref][1]} if ref in kernels else {})}
            for ref, (_, pin) in pins.items()}


def envs_by_key(specs: dict[str, EnvSpec]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, spec in specs.items():
        found.setdefault(rootfs_key_of(spec), []).append(name)
    return found


def loaded_backends() -> list[type[Backend]]:
    """The built-in backend classes that load here (one whose Python package is missing
    made no cache entries to judge)."""
    from pytest_isolate.backends import BUILTIN_BACKENDS

    classes = (load_backend(name)[0] for name in sorted(BUILTIN_BACKENDS))
    return [cls for cls in classes if cls is not None]


def load_backend(name: str) -> tuple[type[Backend] | None, str]:
    """The built-in backend's class, or None and why not."""
    from pytest_isolate.backends import BUILTIN_BACKENDS
    from pytest_isolate.config import load_backend_class

    ref = BUILTIN_BACKENDS.get(name)
    if ref is None:
        return None, "not implemented in this version of pytest-isolate"
    return load_backend_class(ref)
