"""Clean state between tests: reset = test | module | session (seen through worker processes).

The fake backend has no filesystem isolation, but every worker is a fresh fork
of the agent's collected session, so in-memory state shows what was reset.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from unit_support import PYPROJECT, Project

TESTS = """
import json
import os
import sys
import pytest

# one list for both modules, created when the agent collects (before any worker forks)
STATE = sys.__dict__.setdefault("_isolate_test_state", [])

def record(name):
    STATE.append(name)
    # the agent runs tests from the rootdir, like the host
    with open(name + ".json", "w") as f:
        json.dump({{"pid": os.getpid(), "state": list(STATE)}}, f)

pytestmark = pytest.mark.isolate("fakeenv"{kwargs})

def test_a():
    record("a")

def test_b():
    record("b")
"""


def run(project: Project, kwargs: str, *args: str) -> dict[str, dict[str, Any]]:
    project.tests(TESTS.format(kwargs=kwargs), name="test_one")
    project.tests(TESTS.format(kwargs=kwargs), name="test_two")
    result = project.run("-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=4)
    return {n: json.loads((project.path / f"{n}.json").read_text()) for n in ("a", "b")}


def test_reset_per_test_is_the_default(project: Project) -> None:
    rec = run(project, "")
    # b runs in a new worker that never saw a's state
    assert rec["b"]["state"] == ["b"]
    assert rec["a"]["pid"] != rec["b"]["pid"]


HOW = ["marker", "option", "ini", "pyproject"]


def reset_by(project: Project, how: str, value: str) -> dict[str, dict[str, Any]]:
    if how == "marker":
        return run(project, f", reset={value!r}")
    if how == "option":
        return run(project, "", "--isolate-reset", value)
    if how == "ini":
        project.pyproject(base=PYPROJECT.replace("markers = []", f"markers = []\nisolate_reset = {value!r}"))
    else:
        project.pyproject(f"\n[tool.pytest-isolate]\nreset = {value!r}\n")
    return run(project, "")


@pytest.mark.parametrize("how", HOW)
def test_reset_module_shares_a_worker_within_a_module(project: Project, how: str) -> None:
    rec = reset_by(project, how, "module")
    # the record files are rewritten by test_two: its a and b share a worker
    assert rec["b"]["state"] == ["a", "b"]
    assert rec["a"]["pid"] == rec["b"]["pid"]


@pytest.mark.parametrize("how", HOW)
def test_reset_session_shares_one_worker(project: Project, how: str) -> None:
    rec = reset_by(project, how, "session")
    assert rec["b"]["state"] == ["a", "b", "a", "b"]
