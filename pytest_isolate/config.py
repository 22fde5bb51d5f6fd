"""pyproject.toml / ini / command line -> EnvSpecs, keeping where every value came from.

Precedence, highest first: marker keyword > command-line flag > the environment's
own table in pyproject.toml > ``isolate_*`` ini key > ``[tool.pytest-isolate]``
top-level key > built-in default.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pytest_isolate.errors import ConfigError, NoHostLeft
from pytest_isolate.limits import check_limit
from pytest_isolate.spec import (
    ARCH_MACHINES,
    DEBIAN_PYTHONS,
    PYTHON_RELEASES,
    RELEASES,
    RESETS,
    VARIANTS,
    EnvSpec,
    host_arch,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

TABLE = "tool.pytest-isolate"
#: keys of a pool host besides its backends' endpoints
HOST_KEYS = ("arches", "slots")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: The built-in environments: each a fixture of the same name and a marker argument.
BUILTIN_ENVS: dict[str, dict[str, Any]] = {
    "chroot": {"backend": "chroot"},
    "schroot": {"backend": "schroot"},
    "lxc": {"backend": "lxc"},
    "docker": {"backend": "docker"},
    "podman": {"backend": "podman"},
    "qemu_vm": {"backend": "qemu"},
    "arm64_vm": {"backend": "qemu", "arch": "arm64"},
}
#: Environments named after the Python inside (`--isolate-env py3.11,py3.13`): chroots of
#: the Debian release that ships it.  Known names like the built-in ones, but without
#: fixtures of their own.
PYTHON_ENVS: dict[str, dict[str, Any]] = {
    f"py{version}": {"backend": "chroot", "python": version} for version in PYTHON_RELEASES
}
_PYTHON = "a Python version as a string, such as \"3.13\""
_ARGS = "a table of strings"

_STR = "a string"
_STRS = "a list of strings"
_BOOL = "true or false"
_NUM = "a positive number of seconds"
_LIMIT = "a resource limit"
ENV_KEYS: dict[str, str] = {
    "backend": _STR,
    "arch": _STR,
    "release": _STR,
    "variant": _STR,
    "packages": _STRS,
    "setup": _STRS,
    "network": _BOOL,
    "mirror": _STR,
    "image": _STR,
    "python": _PYTHON,
    "dockerfile": _STR,
    "context": _STR,
    "build_args": _ARGS,
    "reset": _STR,
    "timeout": _NUM,
    "pass_env": _STRS,
    "rootdir_writable": _BOOL,
    "memory": _LIMIT,
    "cpus": _LIMIT,
    "pids": _LIMIT,
    "disk": _LIMIT,
    "options": "a table",
    "package": _STR,
    "extras": _STRS,
    "dependency_groups": _STRS,
    "deps": _STRS,
    "installer": _STR,
    "privileged": _BOOL,
}
#: Keys that [tool.pytest-isolate] gives every environment (built-ins included) unless the
#: environment's own table sets them: how the project and its test dependencies go inside.
DEPS_KEYS = ("package", "extras", "dependency_groups", "deps", "installer")
PACKAGE_MODES = ("editable", "wheel", "skip")
INSTALLERS = ("auto", "uv", "pip")
TOP_KEYS = {"cache_dir": _STR, "timeout": _NUM, "reset": _STR, "strict": _BOOL, "warm": _NUM,
            "envs": "a table", "hosts": "a table", **{k: ENV_KEYS[k] for k in DEPS_KEYS}}


@dataclasses.dataclass(frozen=True)
class Option:
    """One key of an environment's ``options`` table, as a backend declares it."""

    kind: str  # "a string" | "true or false" | "a whole number" | "a number"
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None

    def check(self, value: Any) -> bool:
        if self.kind == _BOOL:
            return isinstance(value, bool)
        if self.kind == _STR:
            return isinstance(value, str) and value != "" and (
                not self.choices or value in self.choices)
        if isinstance(value, bool) or not isinstance(
                value, int if self.kind == "a whole number" else (int, float)):
            return False
        return self.minimum is None or value >= self.minimum

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.minimum is not None:
            return f"{self.kind} >= {self.minimum:g}"
        return self.kind


#: Options every backend reads (see backends.base.agent_command).
COMMON_OPTIONS: dict[str, Option] = {
    "python": Option(_STR, "the Python inside that runs the agent and pytest"),
}


def check_options(spec: EnvSpec, declared: Mapping[str, Option] | None) -> None:
    """Validate spec.options against what its backend declares (None: undeclared, so only
    the common options are checked; a third-party backend may read any key)."""
    if not spec.options:
        return
    where = spec.source("options").rsplit(" key 'options'", 1)[0]
    known = {**COMMON_OPTIONS, **(declared or {})}
    for key, value in spec.options:
        option = known.get(key)
        if option is None:
            if declared is None:
                continue
            raise ConfigError(
                f"{where}: unknown option {key!r} for backend {spec.backend!r}"
                f"{did_you_mean(key, known)}; its options: {', '.join(sorted(known))}")
        if not option.check(value):
            raise ConfigError(f"{where}: option {key!r} must be {option.describe()}, got "
                              f"{value!r} ({option.help})")


def check_all_options(specs: Mapping[str, EnvSpec],
                      backend_class: Callable[[str], Any]) -> None:
    """check_options for every spec with options; backend_class(name) gives the class whose
    `options` declare them (None when it cannot be loaded: using it reports why)."""
    for spec in specs.values():
        if spec.options:
            check_options(spec, getattr(backend_class(spec.backend), "options", None))


#: A Debian package as mmdebstrap/apt take it: name, then :arch, =version or /release.
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?([=/][A-Za-z0-9.+~:_-]+)?$")


def check_packages(packages: Iterable[str], where: str) -> None:
    for name in packages:
        if not PACKAGE_RE.match(name):
            raise ConfigError(
                f"{where}: {name!r} is not a Debian package name (lowercase letters, digits "
                "and '+-.', at least two characters, optionally followed by :ARCH, =VERSION "
                "or /RELEASE); fix the entry in 'packages'")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclasses.dataclass(frozen=True)
class PytestSetup:
    """What pytest decides for a run started in a directory: rootdir, inifile, ini values."""

    rootdir: Path
    inipath: Path | None
    #: the inifile's raw values (strings, or lists of strings from a TOML file)
    ini: Mapping[str, Any]

    @property
    def pyproject(self) -> Path:
        """The pyproject.toml whose [tool.pytest-isolate] table the plugin reads."""
        if self.inipath is not None and self.inipath.name == "pyproject.toml":
            return self.inipath
        return self.rootdir / "pyproject.toml"

    def where(self, key: str) -> str:
        """Where ini key `key` came from, worded as the plugin words it."""
        return f"ini key {key!r} in {self.inipath}"


def pytest_setup(invocation_dir: Path, inifile: str | None = None) -> PytestSetup:
    """The rootdir, inifile and ini values pytest itself finds (pytest.ini, .pytest.ini,
    pyproject.toml, tox.ini, setup.cfg, by its own rules) for `pytest` run in
    invocation_dir without arguments, or with ``-c inifile``: what the plugin then reads
    through config.rootpath, config.inipath and config.getini, for a command line that
    runs outside pytest."""
    import inspect

    import pytest
    from _pytest.config.findpaths import determine_setup

    # pytest 8 and 9 differ in the keywords (9 adds override_ini) and the result's length
    wanted: dict[str, Any] = {"inifile": inifile, "override_ini": None, "args": [],
                              "rootdir_cmd_arg": None, "invocation_dir": invocation_dir}
    accepted = inspect.signature(determine_setup).parameters
    try:
        rootdir, inipath, inicfg, *_ = determine_setup(
            **{k: v for k, v in wanted.items() if k in accepted})
    except pytest.UsageError as exc:  # pytest says "PATH: what is wrong"
        path, sep, reason = str(exc).partition(": ")
        if sep and path.endswith(".toml"):
            raise ConfigError(f"{path}: malformed TOML: {reason}; fix the file's syntax") from None
        raise ConfigError(f"{exc} (pytest cannot read its configuration either); fix it") from None
    # pytest 9 wraps each value in a ConfigValue (its origin), pytest 8 does not
    ini = {key: getattr(value, "value", value) for key, value in inicfg.items()}
    return PytestSetup(Path(rootdir), Path(inipath) if inipath else None, ini)


def load_pyproject(path: Path | None) -> dict[str, Any]:
    """The [tool.pytest-isolate] table of path, or {} when there is none."""
    if path is None or not path.is_file():
        return {}
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}; fix the file's syntax") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    table = data.get("tool", {}).get("pytest-isolate", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{TABLE}] must be a table, not {type(table).__name__}")
    for key in table:
        if key not in TOP_KEYS:
            raise ConfigError(
                f"{path}: [{TABLE}]: unknown key {key!r}{did_you_mean(key, TOP_KEYS)}; "
                f"known keys: {', '.join(sorted(TOP_KEYS))}"
            )
    return table


def check_value(key: str, value: Any, kind: str, where: str) -> Any:
    """Validate one value against its kind; return it normalised."""
    ok = True
    if kind == _STR:
        ok = isinstance(value, str) and value != ""
    elif kind == _STRS:
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        value = tuple(value) if ok else value
    elif kind == _BOOL:
        ok = isinstance(value, bool)
    elif kind == _NUM:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        value = float(value) if ok else value
    elif kind == "a table":
        ok = isinstance(value, dict)
    elif kind == _LIMIT:
        return check_limit(key, value, where)
    elif kind == _ARGS:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        value = tuple(sorted(value.items())) if ok else value
    elif kind == _PYTHON:
        ok = isinstance(value, str) and re.fullmatch(r"3\.[0-9]+", value) is not None
        if isinstance(value, float):  # python = 3.10 in TOML is the number 3.1
            raise ConfigError(f"{where}: key {key!r} must be {kind}, got the number {value!r}; "
                              f"quote it: {key} = \"{value}\"")
    if not ok:
        raise ConfigError(f"{where}: key {key!r} must be {kind}, got {value!r}")
    return value


def resolve_envs(
    table: Mapping[str, Any],
    pyproject: Path | None,
    backends: Iterable[str],
) -> dict[str, EnvSpec]:
    """Built-in environments merged with the user's [tool.pytest-isolate.envs.*]."""
    known_backends = sorted(set(backends))
    user_envs = table.get("envs", {})
    where_envs = f"{pyproject}: [{TABLE}.envs]"
    if not isinstance(user_envs, dict):
        raise ConfigError(f"{where_envs} must be a table of environments")
    raw: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
    defaults: dict[str, Any] = {}
    default_sources: dict[str, str] = {}
    for key in DEPS_KEYS:
        if key in table:
            where = f"{pyproject}: [{TABLE}]"
            defaults[key] = check_value(key, table[key], ENV_KEYS[key], where)
            default_sources[key] = f"{where} key {key!r}"
    for name, values in {**BUILTIN_ENVS, **PYTHON_ENVS}.items():
        raw[name] = ({**defaults, **values},
                     {**default_sources, **{k: "built-in default" for k in values}})
    for name, values in user_envs.items():
        where = f"{pyproject}: [{TABLE}.envs.{name}]"
        if not NAME_RE.match(name):
            raise ConfigError(
                f"{where}: environment name {name!r} may only use letters, digits, '_', '.', '-'"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{where} must be a table, got {values!r}")
        merged, sources = raw.get(name, (dict(defaults), dict(default_sources)))
        merged, sources = dict(merged), dict(sources)
        for key, value in values.items():
            if key not in ENV_KEYS:
                raise ConfigError(
                    f"{where}: unknown key {key!r}{did_you_mean(key, ENV_KEYS)}; "
                    f"known keys: {', '.join(sorted(ENV_KEYS))}"
                )
            merged[key] = check_value(key, value, ENV_KEYS[key], where)
            sources[key] = f"{where} key {key!r}"
        if "backend" not in merged:
            raise ConfigError(
                f"{where}: key 'backend' is required; one of: {', '.join(known_backends)}"
            )
        raw[name] = (merged, sources)
    specs = {}
    for name, (values, sources) in raw.items():
        builtin = name in BUILTIN_ENVS or name in PYTHON_ENVS
        specs[name] = make_spec(name, values, sources, known_backends,
                                strict_backend=not builtin or name in user_envs)
    return specs


def make_spec(name: str, values: Mapping[str, Any], sources: Mapping[str, str],
              known_backends: list[str], strict_backend: bool = True) -> EnvSpec:
    def where(key: str) -> str:
        return sources.get(key, "built-in default")

    backend = values["backend"]
    if strict_backend and backend not in known_backends:
        raise ConfigError(
            f"{where('backend')}: unknown backend {backend!r}{did_you_mean(backend, known_backends)}; "
            f"registered backends: {', '.join(known_backends)}"
        )
    checks = (("arch", tuple(ARCH_MACHINES)), ("release", RELEASES), ("variant", VARIANTS),
              ("reset", RESETS))
    for key, allowed in checks:
        if key in values and values[key] not in allowed:
            raise ConfigError(
                f"{where(key)}: unsupported {key} {values[key]!r}{did_you_mean(values[key], allowed)}; "
                f"supported: {', '.join(allowed)}"
            )
    if "packages" in values:
        check_packages(values["packages"], where("packages"))
    if "package" in values and values["package"] not in PACKAGE_MODES:
        raise ConfigError(
            f"{where('package')}: unsupported package {values['package']!r}"
            f"{did_you_mean(values['package'], PACKAGE_MODES)}; supported: "
            f"{', '.join(PACKAGE_MODES)} (how the project under test is installed inside)")
    if "installer" in values and values["installer"] not in INSTALLERS:
        raise ConfigError(
            f"{where('installer')}: unsupported installer {values['installer']!r}"
            f"{did_you_mean(values['installer'], INSTALLERS)}; supported: "
            f"{', '.join(INSTALLERS)} (auto: uv when the host has it and the environment is "
            "of the host's architecture, else pip)")
    check_dockerfile(values, where)
    values, sources = python_release(values, sources)
    kwargs = {k: v for k, v in values.items() if k != "options"}
    if "options" in values:
        kwargs["options"] = tuple(sorted(values["options"].items()))
    try:
        return EnvSpec(name=name, sources=dict(sources), **kwargs)
    except TypeError as exc:  # pragma: no cover - keys are validated above
        raise ConfigError(f"environment {name!r}: {exc}") from None


def check_dockerfile(values: Mapping[str, Any], where: Callable[[str], str]) -> None:
    """dockerfile excludes image; context and build_args need a dockerfile; the engine
    builds for its own architecture."""
    if values.get("dockerfile") is None:
        for key in ("context", "build_args"):
            if key in values:
                raise ConfigError(f"{where(key)}: {key!r} is for building an image from a "
                                  "Dockerfile: set 'dockerfile' too, or remove it")
        return
    if values.get("image") is not None:
        raise ConfigError(f"{where('dockerfile')}: an environment has either 'dockerfile' or "
                          f"'image' ({where('image')}), not both; keep one")
    arch = values.get("arch")
    if arch is not None and arch != host_arch():
        raise ConfigError(f"{where('arch')}: arch {arch!r} with a 'dockerfile': the engine "
                          f"builds for its own architecture ({host_arch()}); remove 'arch', or "
                          "build the image for that platform yourself and name it with 'image'")


def python_release(values: Mapping[str, Any], sources: Mapping[str, str]
                   ) -> tuple[Mapping[str, Any], Mapping[str, str]]:
    """python = "X.Y" without an image: the Debian release that ships that Python, which
    must agree with a release the user set.  With an image the version is checked against
    the image's python3 when it is provisioned."""
    version = values.get("python")
    if version is None or values.get("image") is not None or values.get("dockerfile"):
        return values, sources
    where = sources.get("python", "built-in default")
    release = PYTHON_RELEASES.get(version)
    if release is None:
        shipped = ", ".join(f"{v} ({r})" for v, r in PYTHON_RELEASES.items())
        raise ConfigError(
            f"{where}: no Debian release that pytest-isolate builds ships Python {version} "
            f"(it can: {shipped}); use one of those, or an image that has it: "
            f"image = \"python:{version}-slim\" (backend docker, chroot, lxc or schroot)")
    given = values.get("release")
    if given is not None and "release" in sources and DEBIAN_PYTHONS.get(given) != version:
        raise ConfigError(
            f"{where}: python {version!r} is Debian {release}'s, but {sources['release']} "
            f"says release {given!r} (python {DEBIAN_PYTHONS.get(given, 'unknown')}); "
            "set one of the two keys, not both")
    return ({**values, "release": release},
            {**sources, "release": f"{where} (python {version} is Debian {release}'s)"})


def with_overrides(spec: EnvSpec, overrides: Mapping[str, Any], where: str) -> EnvSpec:
    """A copy of spec with validated overrides (from a marker or the command line)."""
    if not overrides:
        return spec
    sources = dict(spec.sources)
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in ("timeout", "reset", "network"):
            raise ConfigError(
                f"{where}: {key!r} cannot be set here{did_you_mean(key, ('timeout', 'reset'))}; "
                "allowed: timeout, reset, network (set other keys in pyproject.toml)"
            )
        values[key] = check_value(key, value, ENV_KEYS[key], where)
        if key == "reset" and value not in RESETS:
            raise ConfigError(f"{where}: unsupported reset {value!r}; supported: {', '.join(RESETS)}")
        sources[key] = where
    return dataclasses.replace(spec, sources=sources, **values)


def parse_env_list(value: str, where: str, known: Iterable[str]) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{where}: expected one or more environment names, got {value!r}")
    check_env_names(names, where, known)
    return names


def check_env_names(names: Iterable[Any], where: str, known: Iterable[str]) -> None:
    known = sorted(known)
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: environment names must be strings, got {name!r}")
        if name not in known:
            raise ConfigError(
                f"{where}: unknown environment {name!r}{did_you_mean(name, known)}; "
                f"known environments: {', '.join(known)} "
                f"(define more under [{TABLE}.envs.NAME] in pyproject.toml)"
            )


@dataclasses.dataclass(frozen=True)
class PoolHost:
    """One engine of the host pool: ``[tool.pytest-isolate.hosts.NAME]``."""

    name: str
    endpoints: Mapping[str, str]  # backend name -> endpoint (Docker URL, libvirt URI, ...)
    arches: tuple[str, ...]
    #: declared capacity: this host's share of the xdist workers is slots / all slots
    slots: int = 1


def resolve_hosts(table: Mapping[str, Any], pyproject: Path | None,
                  backends: Iterable[str]) -> list[PoolHost]:
    """The host pool: remote (or extra local) engines that environments are placed on.

    ``[tool.pytest-isolate.hosts.NAME]`` maps backend names to endpoints, e.g.
    ``docker = "ssh://ci@arm-box"`` or ``qemu = "qemu+ssh://host/system"``, and
    ``arches`` lists the architectures it serves (all when absent), ``slots`` its
    capacity (how many xdist workers' environments it takes for one of a 1-slot host).
    """
    known = sorted(set(backends))
    raw = table.get("hosts", {})
    hosts = []
    for name, values in raw.items():
        where = f"{pyproject}: [{TABLE}.hosts.{name}]"
        if not isinstance(values, dict):
            raise ConfigError(f"{where} must be a table, got {values!r}")
        endpoints: dict[str, str] = {}
        arches: tuple[str, ...] = ()
        slots = 1
        for key, value in values.items():
            if key == "slots":
                slots = check_slots(value, where)
            elif key == "arches":
                arches = check_value(key, value, _STRS, where)
                for arch in arches:
                    if arch not in ARCH_MACHINES:
                        raise ConfigError(f"{where}: unsupported arch {arch!r}"
                                          f"{did_you_mean(arch, ARCH_MACHINES)}")
            elif key in known:
                endpoints[key] = check_value(key, value, _STR, where)
            else:
                raise ConfigError(
                    f"{where}: unknown key {key!r}{did_you_mean(key, [*known, *HOST_KEYS])}; "
                    f"use a backend name ({', '.join(known)}) with its endpoint, "
                    f"or {' or '.join(repr(k) for k in HOST_KEYS)}")
        if not endpoints:
            raise ConfigError(f"{where}: name at least one backend endpoint, "
                              f"e.g. docker = \"unix:///run/docker.sock\"")
        hosts.append(PoolHost(name, endpoints, arches, slots))
    return hosts


def check_slots(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: key 'slots' must be a positive integer, got {value!r}; "
                          "write how many environments the host runs at once, e.g. slots = 4 "
                          "(or leave the key out for 1)")
    return value


def candidates(spec: EnvSpec, hosts: Iterable[PoolHost]) -> list[PoolHost]:
    """The pool hosts that serve spec's backend and architecture, in declared order."""
    return [h for h in hosts
            if spec.backend in h.endpoints and (not h.arches or spec.arch in h.arches)]


def place(spec: EnvSpec, hosts: Iterable[PoolHost], worker: str,
          dead: Mapping[tuple[str, str], str] | None = None) -> PoolHost | None:
    """The pool host an environment runs on, for xdist worker ``worker`` (gw0, gw1...).

    The candidates' slots are numbered in declared order (a host with ``slots = 2``
    owns two consecutive ones); worker k takes the host owning slot k mod the total.
    When that host is dead (``dead`` maps (host, backend) to why), the next slot's
    host is taken: the workers of live hosts keep their host when another dies.
    None: no pool host serves the backend and architecture (the default engine does).
    Raises NoHostLeft when every candidate is dead.
    """
    dead = dead or {}
    found = candidates(spec, hosts)
    if not found:
        return None
    ring = [h for h in found for _ in range(h.slots)]
    digits = "".join(c for c in worker if c.isdigit())
    first = int(digits or 0) % len(ring)
    for step in range(len(ring)):
        host = ring[(first + step) % len(ring)]
        if (host.name, spec.backend) not in dead:
            return host
    raise NoHostLeft(spec.name, spec.backend, spec.arch,
                     {h.name: dead[h.name, spec.backend] for h in found})


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-isolate"


def load_backend_class(ref: Any) -> tuple[Any, str]:
    """A registered backend: its class, or None and why it cannot be loaded.  ref is what
    the pytest_isolate_backends hook answered: a class, or "module:Class" (imported here,
    only when the backend is used); the same rule for the plugin, its checks and the CLI."""
    if not isinstance(ref, str):
        return ref, ""
    module_name, _, cls_name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None, f"cannot be loaded: its module {module_name!r} is not installed"
        return None, f"cannot be loaded: Python module {exc.name!r} is missing"
    except Exception as exc:
        return None, f"cannot be loaded: {type(exc).__name__}: {exc}"
    cls = getattr(module, cls_name, None)
    if cls is None:
        return None, f"cannot be loaded: {module_name} has no {cls_name}"
    return cls, ""
