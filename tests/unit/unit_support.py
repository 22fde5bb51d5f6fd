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

#: Added to the conftest by Project.relay_setup(): a handshake for a test that ends its own
#: environment and must do so in its call phase, once the host has its setup report (else
#: the host sees the stream end during setup).  The host's hook touches a file when the
#: setup report reaches it; the test's fixture `setup_relayed` waits for that file (the
#: fake backend shares the host's file system).
SETUP_RELAYED_CONFTEST = """
import os
import time

RELAYED = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".setup-relayed-")

def pytest_runtest_logreport(report):
    # the agent's pytest runs this hook too: only the host's, which got the report, counts
    if report.when == "setup" and os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") != "1":
        open(RELAYED + report.nodeid.rsplit("::", 1)[-1], "w").close()

@pytest.fixture
def setup_relayed(request):
    def wait():
        path = RELAYED + request.node.name
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "the host did not get the setup report"
            time.sleep(0.01)
    return wait
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

    def relay_setup(self) -> None:
        """Give the project's tests the fixture setup_relayed (see SETUP_RELAYED_CONFTEST)."""
        self.pytester.makeconftest(BACKENDS_CONFTEST + SETUP_RELAYED_CONFTEST)

    def tests(self, source: str, name: str = "test_project") -> Path:
        return self.pytester.makepyfile(**{name: textwrap.dedent(source)})

    def run(self, *args: str) -> pytest.RunResult:
        """The inner pytest in a subprocess (agents are subprocesses of it)."""
        return self.pytester.runpytest_subprocess(
            "-p", "no:randomly", "-p", "no:xdist", *args, timeout=RUN_TIMEOUT)

    def run_inprocess(self, *args: str) -> pytest.RunResult:
        """The inner pytest in this process: for runs that never start an agent (config errors)."""
        return self.pytester.runpytest_inprocess("-p", "no:randomly", "-p", "no:xdist", *args)
