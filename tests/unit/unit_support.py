"""Helpers of the unit tests: a pytester project wired to the fake backend.

A module of its own (not conftest.py) so that test modules can import it by a
unique name: several conftest.py files in a tree all import as "conftest".
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

#: optionalhook=True: the agent does not know the hook spec (core bug, see
#: test_outcomes.py::test_backend_hook_without_optionalhook); pytest would refuse
#: the conftest inside the agent with "unknown hook 'pytest_isolate_backends'".
BACKENDS_CONFTEST = """
import pytest
from fake_backend import FakeBackend, UnavailableFakeBackend

@pytest.hookimpl(optionalhook=True)
def pytest_isolate_backends():
    return {"fake": FakeBackend, "fake-missing": UnavailableFakeBackend}
"""

PYPROJECT = """
[tool.pytest.ini_options]
markers = []

[tool.pytest-isolate.envs.fakeenv]
backend = "fake"

[tool.pytest-isolate.envs.fakeenv2]
backend = "fake"
packages = ["something-else"]

[tool.pytest-isolate.envs.missing]
backend = "fake-missing"
"""

#: Upper bound for one inner pytest run; nothing in these tests should come close.
RUN_TIMEOUT = 90.0


class Project:
    """A temporary pytest project whose environments use the fake backend."""

    def __init__(self, pytester: pytest.Pytester, cache_dir: Path) -> None:
        self.pytester = pytester
        self.path = pytester.path
        self.cache_dir = cache_dir

    def pyproject(self, extra: str = "", base: str = PYPROJECT) -> None:
        (self.path / "pyproject.toml").write_text(textwrap.dedent(base) + textwrap.dedent(extra))

    def tests(self, source: str, name: str = "test_project") -> Path:
        return self.pytester.makepyfile(**{name: textwrap.dedent(source)})

    def run(self, *args: str) -> pytest.RunResult:
        """The inner pytest in a subprocess (agents are subprocesses of it)."""
        return self.pytester.runpytest_subprocess(
            "-p", "no:randomly", "-p", "no:xdist", *args, timeout=RUN_TIMEOUT)

    def run_inprocess(self, *args: str) -> pytest.RunResult:
        """The inner pytest in this process: for runs that never start an agent (config errors)."""
        return self.pytester.runpytest_inprocess("-p", "no:randomly", "-p", "no:xdist", *args)
