"""Helpers every layer of the suite shares: running an inner pytest, the outer run's cache
directory, and waiting for something another process does.

Imported by name (tests/conftest.py puts this directory on sys.path): a module of its own,
not conftest.py, because every conftest.py in the tree imports as "conftest".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

#: Variables of the outer run that must not reach an inner one: xdist's worker identity
#: (placement deals hosts by the worker's number), the outer command line's options, the
#: current test, a disabled plugin autoload (the inner run needs pytest-isolate) and
#: pytest-cov's subprocess hooks.
PRIVATE_PREFIXES = ("PYTEST_XDIST", "PYTEST_ADDOPTS", "PYTEST_CURRENT",
                    "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "COV_")


def inner_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the outer run's private variables, plus extra."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_PREFIXES)}
    environ.update(extra or {})
    return environ


def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """inner_environ() for pytester's runs, which inherit os.environ: drop the outer run's
    private variables for the rest of the test."""
    for name in [k for k in os.environ if k.startswith(PRIVATE_PREFIXES)]:
        monkeypatch.delenv(name)


def pytest_options(cache: str | Path, *args: str) -> list[str]:
    """An inner run's options: strict, on the cache directory cache, then args."""
    return ["-p", "no:cacheprovider", "--isolate-strict", f"--isolate-cache-dir={cache}", *args]


def pytest_argv(cache: str | Path, *args: str) -> list[str]:
    """`python -m pytest` of this venv with pytest_options."""
    return [sys.executable, "-m", "pytest", *pytest_options(cache, *args)]


def run_pytest(root: Path, cache: str | Path, *args: str,
               extra_env: Mapping[str, str] | None = None,
               timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    """pytest_argv run in root with inner_environ(extra_env); its output captured."""
    return subprocess.run(pytest_argv(cache, *args), cwd=root, env=inner_environ(extra_env),
                          capture_output=True, text=True, timeout=timeout)


def output(result: subprocess.CompletedProcess[str]) -> str:
    """The ends of a run's output, for assertion messages."""
    return result.stdout[-6000:] + result.stderr[-2000:]


def outer_cache(config: pytest.Config) -> str:
    """The cache directory of this (outer) test session: what it built, inner runs reuse."""
    manager = config.pluginmanager.get_plugin("isolate-manager")
    assert manager is not None, "pytest-isolate is not loaded"
    return str(manager.cache.root)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
             proc: subprocess.Popen[bytes] | None = None, interval: float = 0.1,
             explain: Callable[[], object] | None = None) -> T:
    """probe()'s first true answer; fails after timeout (or when proc ended first), with
    explain()'s answer when given (what is in the way, a log's tail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            failure = f"the process ended (status {proc.returncode}) before {what}"
        elif time.monotonic() > deadline:
            failure = f"timed out after {timeout:.0f}s waiting for {what}"
        else:
            time.sleep(interval)
            continue
        pytest.fail(failure + (f": {explain()}" if explain is not None else ""))
