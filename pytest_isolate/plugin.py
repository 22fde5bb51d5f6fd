"""pytest glue: options, ini keys, the marker, fixtures.  Cheap to import.

The work is done by the hook plugin IsolateManager (manager.py), registered per run
as "isolate-manager", with its settings (settings.py) and InstancePool (pool.py); no
backend module is imported until an environment of that kind is used.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pytest_isolate.backends import BUILTIN_BACKENDS
from pytest_isolate.config import BUILTIN_ENVS
from pytest_isolate.errors import BackendUnavailable, ConfigError
from pytest_isolate.keys import MANAGER

#: pytest's "float" ini type (8.4 and later)
FLOAT_INI = tuple(int(p) for p in pytest.__version__.split(".")[:2] if p.isdigit()) >= (8, 4)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_isolate import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolate", "pytest-isolate: run tests inside isolated environments")
    group.addoption("--isolate-env", metavar="NAME[,NAME...]", default=None,
                    help="run every collected test without an isolate marker inside these "
                    "environments (one item per environment when several)")
    group.addoption("--isolate-strict", action="store_true", default=None,
                    help="an unavailable backend fails its tests instead of skipping them")
    group.addoption("--isolate-cache-dir", metavar="DIR", default=None,
                    help="where built environments are cached (default: ~/.cache/pytest-isolate)")
    group.addoption("--isolate-timeout", metavar="SECONDS", type=float, default=None,
                    help="per-test time limit inside an environment (default 300)")
    group.addoption("--isolate-reset", choices=("test", "module", "session"), default=None,
                    help="how often the environment is reset to its provisioned state")
    group.addoption("--isolate-keep-failed", action="store_true", default=False,
                    help="keep the environment of each failed test and, at the end of the "
                    "run, open a shell in it as the test left it (needs a terminal)")
    group.addoption("--isolate-warm", metavar="SECONDS", default=None,
                    help="keep a started environment waiting for the next run, for SECONDS "
                    "without a run (0: off, the default); the next run's first test starts "
                    "without the environment's start-up")
    group.addoption("--isolate-report", metavar="PATH", default=None,
                    help="write a JSON report of environments, cache hits and phase timings")
    # typed where every supported pytest has the type (float: pytest >= 8.4); a value
    # pytest cannot convert is reported by the manager with the key and the file
    parser.addini("isolate_cache_dir", "cache directory of pytest-isolate", default=None)
    timeout_type: Any = "float" if FLOAT_INI else None
    parser.addini("isolate_timeout", "per-test time limit inside environments, in seconds",
                  type=timeout_type, default=None)
    parser.addini("isolate_reset", "test | module | session", default=None)
    parser.addini("isolate_strict", "unavailable backends fail instead of skip", type="bool",
                  default=None)
    parser.addini("isolate_warm", "seconds a started environment waits for the next run "
                  "(0: off)", default=None)


def _check_name_clash() -> None:
    try:
        importlib.metadata.distribution("pytest-isolate")
    except importlib.metadata.PackageNotFoundError:
        return
    raise pytest.UsageError(
        "the unrelated plugin 'pytest-isolate' (forked subprocesses) is installed next to "
        "pytest-isolate-env; both use the name 'isolate'. Uninstall one: "
        "pip uninstall pytest-isolate"
    )


@pytest.hookimpl(trylast=True)
def pytest_isolate_backends() -> dict[str, str]:
    return dict(BUILTIN_BACKENDS)


def pytest_configure(config: pytest.Config) -> None:
    _check_name_clash()
    config.addinivalue_line(
        "markers",
        "isolate(*envs, timeout=None, reset=None, network=None): run the test and its "
        "fixtures inside the named environments (one item per environment)",
    )
    from pytest_isolate.manager import IsolateManager

    try:
        manager = IsolateManager(config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.pluginmanager.register(manager, MANAGER)
    from pytest_isolate import hostplugins

    config.pluginmanager.register(hostplugins, "isolate-hostplugins")


def _manager(config: pytest.Config) -> Any:
    return config.pluginmanager.get_plugin(MANAGER)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The cache directory, and the environments --isolate-env names with their cache state
    (marked tests' environments are known after collection: see the summary table)."""
    manager = _manager(config)
    if manager is None:
        return []
    settings = manager.settings
    lines = [f"isolate: cache {settings.cache_root} ({settings.cache_where})"]
    if settings.default_envs:
        parts = []
        for name in settings.default_envs:
            spec = settings.specs[name]
            state = ""
            try:
                cls = settings.backend_class(spec.backend)
                key = (cls.rootfs_spec(spec) if cls is not None else spec).rootfs_key()
                built = (settings.cache_root / "rootfs" / key / "manifest.json").is_file()
                state = ", root filesystem cached" if built else ", root filesystem to build"
            except Exception:
                pass
            parts.append(f"{name} ({spec.backend}, {spec.release}/{spec.arch}{state})")
        lines.append("isolate: unmarked tests run in " + ", ".join(parts))
    return lines


@pytest.fixture
def isolate_target(request: pytest.FixtureRequest) -> Any:
    """The environment this item runs in (parametrized when a test has several)."""
    from pytest_isolate.agent.collect import item_target

    return getattr(request, "param", None) or item_target(request.node)


@pytest.fixture
def isolate_env(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Any]]:
    """Factory: ``isolate_env("name")`` gives a clean Environment of any known environment."""
    from pytest_isolate.environment import Environment
    from pytest_isolate.timing import PhaseTimer

    manager = _manager(request.config)
    created: list[Environment] = []

    def factory(name: str) -> Environment:
        if name not in manager.specs:
            raise pytest.UsageError(
                f"isolate_env({name!r}): unknown environment; known: {', '.join(sorted(manager.specs))}")
        timer = PhaseTimer()
        try:
            instance = manager.pool.instance(name, timer)
        except BackendUnavailable as exc:
            if manager.settings.strict:
                pytest.fail(f"{exc} (--isolate-strict turns this skip into a failure)", pytrace=False)
            pytest.skip(str(exc))
        with timer.phase("reset"):
            env = Environment(instance, default_timeout=None)
        request.node.user_properties.extend(timer.properties())
        created.append(env)
        return env

    yield factory
    for env in created:
        try:
            env.close()
        except Exception:
            manager.pool.drop(env.name)


def _env_fixture(name: str) -> Any:
    def fixture(isolate_env: Callable[[str], Any]) -> Any:
        return isolate_env(name)

    fixture.__doc__ = f"A clean {name!r} Environment, driven from the host."
    fixture.__name__ = name
    return pytest.fixture(name=name)(fixture)


chroot = _env_fixture("chroot")
schroot = _env_fixture("schroot")
lxc = _env_fixture("lxc")
docker = _env_fixture("docker")
podman = _env_fixture("podman")
qemu_vm = _env_fixture("qemu_vm")
arm64_vm = _env_fixture("arm64_vm")
assert set(BUILTIN_ENVS) == {"chroot", "schroot", "lxc", "docker", "podman", "qemu_vm",
                             "arm64_vm"}
