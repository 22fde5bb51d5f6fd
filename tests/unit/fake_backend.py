"""A fake backend for the unit tests: the real agent as a host subprocess, NO isolation.

FakeBackend is a real :class:`~pytest_isolate.backend.Backend` subclass, built only
from the public surface for backend authors (``pytest_isolate.backend``) and
registered through the real ``pytest_isolate_backends`` hook from a conftest.py.
It starts the real agent (``python -u -c agent.BOOTSTRAP``) with the host's
interpreter and configures it with ``"isolation": "none"``: tests and commands
run on the host, in a forked child of the agent, with nothing mounted.  That is
enough to exercise the whole protocol -- reports, crashes, timeouts, commands,
files -- without root or a real engine.  It must never be used as a sandbox.

provision() goes through the real content-addressed cache with a trivial
builder, so cache hits and misses are real.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest_isolate
from pytest_isolate.backend import (
    BOOTSTRAP,
    AgentProcess,
    Backend,
    BackendUnavailable,
    Entry,
    EnvSpec,
    Launch,
    environment_variables,
)

HERE = os.path.dirname(os.path.abspath(__file__))
#: Where the host's pytest_isolate comes from: a checkout on PYTHONPATH may shadow the
#: installed one, and the agent's conftest must import the same code as the host.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pytest_isolate.__file__)))
#: Host variables the agent keeps (everything else is dropped, as inside a real environment).
KEEP_ENV = ("PATH", "HOME", "LANG", "TMPDIR")


class FakeBackend(Backend):
    """Fake for unit tests (no isolation): the real agent runs as a plain host subprocess."""

    name = "fake"
    needs_root = False
    supports_snapshot = False
    packages = ()

    def check(self, spec: EnvSpec) -> None:
        """Always available, except on a pool host: its endpoint is a file standing for
        the engine, which answers while the file exists (tests kill a host by removing it)."""
        if self.endpoint is not None and not os.path.exists(self.endpoint):
            raise BackendUnavailable(self.name, f"the fake engine does not answer at "
                                     f"{self.endpoint}", "create that file")

    def provision(self, spec: EnvSpec) -> Entry:
        def build(data: Path, log_path: Path) -> dict[str, Any]:
            data.mkdir(parents=True)
            (data / "spec.json").write_text(json.dumps({"name": spec.name, "pid": os.getpid()}))
            with open(log_path, "a") as log:
                log.write(f"fake build of {spec.name} in pid {os.getpid()}\n")
            return {"fake": True}

        return self.run.cache.get_or_build(
            "fake", spec.rootfs_key(), build, {"name": spec.name, "backend": spec.backend},
            self.run.log_path(spec.name, "provision.log"),
        )

    def launch(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
               image: Entry) -> Launch:
        env = {k: os.environ[k] for k in KEEP_ENV if k in os.environ}
        env.update(environment_variables(spec))
        # fake_backend itself must be importable by the project's conftest inside the agent
        # (and the agent's pytest_isolate the host's: a worktree's, not the editable install's)
        env["PYTHONPATH"] = os.pathsep.join([HERE, PACKAGE_ROOT])
        env["FAKE_ENDPOINT"] = self.endpoint or ""  # which pool host the tests run on
        log = self.run.log_path(spec.name, "agent.log")
        process = AgentProcess([sys.executable, "-u", "-c", BOOTSTRAP], log,
                               f"environment {spec.name!r}", env=env)
        return Launch(process, {"agent": log},
                      {"isolation": "none", "site": None, "binds": [],
                       "cwd": str(self.run.rootdir)})


class UnavailableFakeBackend(FakeBackend):
    """Fake for unit tests whose prerequisites are never met."""

    name = "fake-missing"
    REASON = "the fake engine is not installed"
    FIX = "install it with: apt-get install fake-engine"

    def check(self, spec: EnvSpec) -> None:
        raise BackendUnavailable(self.name, self.REASON, self.FIX)
