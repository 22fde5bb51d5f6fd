"""The run's settings, resolved once from the pytest config when the plugin is configured.

Each setting is layered command-line flag > ini key > ``[tool.pytest-isolate]`` > built-in
default (a marker's keywords override them per item, in the manager's collection), and a
bad value's error names where it came from and what it must be.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate import config as cfg
from pytest_isolate.errors import ConfigError
from pytest_isolate.spec import EnvSpec

#: what the typed ini options take, for the error when pytest cannot convert a value
INI_EXPECTED = {"isolate_strict": "true or false",
                "isolate_timeout": "a positive number of seconds"}
INI_NAMES = ("isolate_cache_dir", "isolate_timeout", "isolate_reset", "isolate_strict",
             "isolate_warm")
DEFAULT_TIMEOUT = 300.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """What this run's configuration says, with where the cache directory came from."""

    pyproject: Path
    #: the [tool.pytest-isolate] table
    table: dict[str, Any]
    #: backend name -> its class or "module:attr" (pytest_isolate_backends hook)
    backend_refs: dict[str, Any]
    specs: dict[str, EnvSpec]
    #: the engines environments may be placed on ([tool.pytest-isolate.hosts.NAME])
    pool_hosts: list[cfg.PoolHost]
    timeout: float
    reset: str
    strict: bool
    cache_root: Path
    cache_where: str
    #: the environments of tests without a marker (--isolate-env)
    default_envs: list[str]
    keep_failed: bool
    #: seconds a started environment waits for the next run (0: not kept; see warm.py)
    warm: float = 0.0

    def backend_class(self, name: str) -> Any:
        return backend_class(self.backend_refs, name)


def backend_class(refs: dict[str, Any], name: str) -> Any:
    """The registered class of backend name; None when it cannot be loaded (using it
    reports why)."""
    return cfg.load_backend_class(refs.get(name))[0]


def load_settings(config: pytest.Config) -> Settings:
    """The settings of this run; ConfigError names the key, the file and the fix."""
    pyproject = config.rootpath / "pyproject.toml"
    if config.inipath is not None and config.inipath.name == "pyproject.toml":
        pyproject = config.inipath
    table = cfg.load_pyproject(pyproject)
    backend_refs = collect_backends(config)
    specs = cfg.resolve_envs(table, pyproject, backend_refs)
    cfg.check_all_options(specs, lambda name: backend_class(backend_refs, name))
    pool_hosts = cfg.resolve_hosts(table, pyproject, backend_refs)

    def setting(flag: str, default: Any) -> tuple[Any, str]:
        return _setting(config, table, pyproject, flag, default)

    timeout, where = setting("isolate_timeout", DEFAULT_TIMEOUT)
    try:
        timeout = float(timeout)
        if timeout <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: timeout must be a positive number of seconds, "
                          f"got {timeout!r}") from None
    reset, where = setting("isolate_reset", "test")
    if reset not in ("test", "module", "session"):
        raise ConfigError(f"{where}: unsupported reset {reset!r}; supported: test, module, session")
    strict, _ = setting("isolate_strict", False)
    raw_warm, where = setting("isolate_warm", 0)
    try:
        warm = float(raw_warm)
        if warm < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: warm must be a number of seconds (0: off), "
                          f"got {raw_warm!r}") from None
    cache_root, cache_where = _cache_dir(config, setting("isolate_cache_dir", None))
    default_envs: list[str] = []
    if config.getoption("isolate_env"):
        default_envs = cfg.parse_env_list(config.getoption("isolate_env"), "--isolate-env", specs)
    return Settings(
        pyproject=pyproject, table=table, backend_refs=backend_refs, specs=specs,
        pool_hosts=pool_hosts, timeout=timeout, reset=str(reset),
        strict=strict in (True, "true", "True", "1", "yes"), cache_root=cache_root,
        cache_where=cache_where, default_envs=default_envs,
        keep_failed=bool(config.getoption("isolate_keep_failed")), warm=warm)


def _setting(config: pytest.Config, table: dict[str, Any], pyproject: Path, flag: str,
             default: Any) -> tuple[Any, str]:
    """One setting and where it came from.  flag is both the option's dest and its ini key;
    the table's key drops the "isolate_" prefix."""
    value = config.getoption(flag)
    if value is not None:
        return value, f"--{flag.replace('_', '-')}"
    try:
        ini_value = config.getini(flag)
    except (ValueError, TypeError, pytest.UsageError) as exc:
        # a typed ini option pytest could not convert (it does not name the key)
        expected = INI_EXPECTED.get(flag, "another value")
        raise ConfigError(f"ini key {flag!r} in {config.inipath}: {exc}; "
                          f"set it to {expected}") from None
    if ini_value not in (None, "", []):
        return ini_value, f"ini key {flag!r} in {config.inipath}"
    top = flag.removeprefix("isolate_")
    if top in table:
        return table[top], f"{pyproject}: [{cfg.TABLE}] key {top!r}"
    return default, "built-in default"


def _cache_dir(config: pytest.Config, setting: tuple[Any, str]) -> tuple[Path, str]:
    """The cache root and where it came from: a setting (relative to the rootdir), else
    PYTEST_ISOLATE_CACHE_DIR, else the default."""
    cache_dir, where = setting
    if cache_dir is None:
        env_dir = os.environ.get("PYTEST_ISOLATE_CACHE_DIR")
        if env_dir:
            return Path(env_dir), "PYTEST_ISOLATE_CACHE_DIR"
        return Path(cfg.default_cache_dir()), "default cache directory"
    cache_root = Path(str(cache_dir)).expanduser()
    if not cache_root.is_absolute():
        cache_root = config.rootpath / cache_root
    return cache_root, where


def collect_backends(config: pytest.Config) -> dict[str, Any]:
    """Every backend the pytest_isolate_backends hook registers, by name."""
    refs: dict[str, Any] = {}
    for answer in config.hook.pytest_isolate_backends():
        for name, ref in dict(answer or {}).items():
            refs.setdefault(name, ref)  # earlier (non-trylast) answers win
    return refs
