"""The matrix flag: ``pytest --isolate-env chroot,docker`` on a generated project.

- every collected test without an isolate marker runs once per named environment,
  its id carrying the environment (``test_x[chroot]``, ``test_x[docker]``); with one
  name the ids stay as they are;
- marked tests keep their own environments, whatever --isolate-env says;
- ``--junitxml`` carries ``isolate.env`` and the phase timings (``isolate.run`` ...)
  as properties of each test case;
- ``--isolate-report`` writes the JSON document (version 1) with every environment and
  every isolated test.

The tests record where they ran (the hostname inside is ``isolate-<env>``) as a
user property, so the junit file shows it next to ``isolate.env``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from shared_support import run_pytest

from pytest_isolate.timing import PHASES

pytestmark = pytest.mark.integration

PYPROJECT = """\
[project]
name = "matrix-demo"
version = "0"

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

PORTABLE = '''\
import socket

import pytest


def where(request):
    request.node.user_properties.append(("where", socket.gethostname()))


def test_where(request):
    where(request)


def test_fails(request):
    where(request)
    assert 1 + 1 == 3


def test_skips():
    pytest.skip("not here")


@pytest.mark.xfail(reason="known")
def test_xfails():
    assert 0
'''

MARKED = '''\
import socket

import pytest


def where(request):
    request.node.user_properties.append(("where", socket.gethostname()))


@pytest.mark.isolate("chroot")
def test_only_chroot(request):
    where(request)


@pytest.mark.isolate("docker")
def test_only_docker(request):
    where(request)


@pytest.mark.isolate("docker", "chroot")
def test_both(request):
    where(request)
'''

DRIVER = '''\
import socket


def test_drives_chroot(chroot, request):
    # an environment fixture: the test body runs on the host and drives the chroot
    request.node.user_properties.append(("where", socket.gethostname()))
    assert chroot.run("hostname").stdout == "isolate-chroot\\n"
'''


@dataclass
class Case:
    name: str  # test_x[env]
    file: str
    props: dict[str, str]
    result: str  # passed | failure | error | skipped


@dataclass
class Run:
    result: subprocess.CompletedProcess[str]
    seconds: float
    cases: dict[str, Case]
    report: dict[str, Any] | None

    @property
    def out(self) -> str:
        return self.result.stdout[-4000:] + self.result.stderr[-2000:]


def parse_junit(path: Path) -> dict[str, Case]:
    cases = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        props = {str(p.get("name")): str(p.get("value")) for p in tc.iter("property")}
        tags = {child.tag for child in tc} - {"properties", "system-out", "system-err"}
        assert len(tags) <= 1, tags
        name = str(tc.get("name"))
        file = str(tc.get("classname")).rsplit(".", 1)[-1]
        cases[f"{file}::{name}"] = Case(name, file, props, tags.pop() if tags else "passed")
    return cases


class Project:
    def __init__(self, root: Path, cache: str) -> None:
        self.root = root
        self.cache = cache

    def pytest(self, label: str, *args: str) -> Run:
        junit = self.root / f"{label}.xml"
        report = self.root / f"{label}.json"
        started = time.monotonic()
        result = run_pytest(self.root, self.cache, "-v", f"--junitxml={junit}",
                            f"--isolate-report={report}", *args, timeout=1800)
        seconds = time.monotonic() - started
        print(f"{label}: {' '.join(args)}: {seconds:.1f}s")
        assert junit.is_file(), result.stdout[-4000:] + result.stderr[-2000:]
        data = json.loads(report.read_text()) if report.is_file() else None
        return Run(result, seconds, parse_junit(junit), data)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("matrix-project")
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "tests").mkdir()
    (root / "tests" / "test_portable.py").write_text(PORTABLE)
    (root / "tests" / "test_marked.py").write_text(MARKED)
    (root / "tests" / "test_driver.py").write_text(DRIVER)
    # the cache this test session uses: the built-in environments are built there once
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    assert manager is not None
    yield Project(root, str(manager.cache.root))


@pytest.fixture(scope="module")
def matrix(project: Project) -> Run:
    return project.pytest("matrix", "--isolate-env", "chroot,docker")


def env_of(name: str) -> str | None:
    m = re.search(r"\[(\w+)\]$", name)
    return m.group(1) if m else None


EXPECTED_MATRIX = {
    # unmarked: one item per --isolate-env environment
    "test_portable::test_where[chroot]": ("chroot", "passed"),
    "test_portable::test_where[docker]": ("docker", "passed"),
    "test_portable::test_fails[chroot]": ("chroot", "failure"),
    "test_portable::test_fails[docker]": ("docker", "failure"),
    "test_portable::test_skips[chroot]": ("chroot", "skipped"),
    "test_portable::test_skips[docker]": ("docker", "skipped"),
    "test_portable::test_xfails[chroot]": ("chroot", "skipped"),
    "test_portable::test_xfails[docker]": ("docker", "skipped"),
    # marked: their own environments
    "test_marked::test_only_chroot": ("chroot", "passed"),
    "test_marked::test_only_docker": ("docker", "passed"),
    "test_marked::test_both[docker]": ("docker", "passed"),
    "test_marked::test_both[chroot]": ("chroot", "passed"),
}
#: a test using an environment fixture drives it from the host: --isolate-env leaves it there
DRIVER_CASE = "test_driver::test_drives_chroot"


def test_one_item_per_environment(matrix: Run) -> None:
    assert sorted(matrix.cases) == sorted([*EXPECTED_MATRIX, DRIVER_CASE]), matrix.out
    assert matrix.result.returncode == 1  # test_fails failed, in both environments
    assert "2 failed, 7 passed, 2 skipped, 2 xfailed" in matrix.result.stdout, matrix.out
    for key, (env, result) in EXPECTED_MATRIX.items():
        case = matrix.cases[key]
        assert case.result == result, key
        assert case.props["isolate.env"] == env, key
        if "where" in case.props:  # it ran there: the hostname inside is isolate-<env>
            assert case.props["where"] == f"isolate-{env}", key
    assert sum("where" in c.props for c in matrix.cases.values()) == 9


def test_fixture_driven_tests_stay_on_the_host(matrix: Run) -> None:
    case = matrix.cases[DRIVER_CASE]
    assert case.result == "passed", matrix.out
    assert not case.props["where"].startswith("isolate-")
    assert "isolate.env" not in case.props
    # the fixture's own start and reset are timed on the test
    assert "isolate.reset" in case.props


def test_junit_carries_phase_timings(matrix: Run) -> None:
    first: dict[str, list[str]] = {}
    for key, case in matrix.cases.items():
        phases = {k.split(".", 1)[1]: float(v) for k, v in case.props.items()
                  if k.startswith("isolate.") and k != "isolate.env"}
        assert set(phases) <= set(PHASES), (key, phases)
        assert all(v >= 0 for v in phases.values())
        if key == DRIVER_CASE:  # the fixture's instance is the chroot environment's instance
            env = "chroot"
            assert "run" not in phases
        else:
            env = case.props["isolate.env"]
            assert "run" in phases, (key, case.props)
        if "start" in phases:
            first.setdefault(env, []).append(key)
            assert {"provision", "start"} <= set(phases), (key, phases)
    # each environment was provisioned and started once, for the first test that used it
    assert sorted(first) == ["chroot", "docker"]
    assert all(len(keys) == 1 for keys in first.values()), first


def test_json_report(matrix: Run) -> None:
    data = matrix.report
    assert data is not None
    assert data["version"] == 1
    assert isinstance(data["run_id"], str) and data["run_id"]
    assert sorted(data["environments"]) == ["chroot", "docker"]
    counts = {"chroot": 0, "docker": 0}
    for env, _ in EXPECTED_MATRIX.values():
        counts[env] += 1
    for name, env in data["environments"].items():
        assert env["name"] == name
        assert env["backend"] == name
        assert env["arch"] and env["release"]
        assert re.fullmatch(r"[0-9a-f]{24}", env["key"]), env["key"]
        assert isinstance(env["cache_hit"], bool)
        assert isinstance(env["provision"], float) and env["provision"] >= 0
        assert isinstance(env["start"], float) and env["start"] > 0
        assert env["starts"] == 1
        assert env["tests"] == counts[name]
        assert isinstance(env["run_total"], float) and env["run_total"] > 0
        assert Path(env["logs"]["agent"]).is_file()
        assert "provision" in env["logs"]  # (docker: written only when something is built)
    assert "container" in data["environments"]["docker"]["logs"]

    tests = {t["nodeid"]: t for t in data["tests"]}
    assert len(tests) == len(data["tests"]) == len(EXPECTED_MATRIX)
    outcomes = {"passed": "passed", "failure": "failed", "skipped": "skipped"}
    for key, (env, result) in EXPECTED_MATRIX.items():
        file, name = key.split("::")
        record = tests[f"tests/{file}.py::{name}"]
        assert set(record) >= {"nodeid", "env", "outcome", "phases"}
        assert record["env"] == env
        assert record["outcome"] == outcomes[result], record
        assert set(record["phases"]) <= set(PHASES) and "run" in record["phases"]
        # the same numbers as in the junit file (rounded there)
        junit_run = float(matrix.cases[key].props["isolate.run"])
        assert abs(record["phases"]["run"] - junit_run) < 1e-5


def test_one_environment_keeps_plain_ids(project: Project) -> None:
    run = project.pytest("single", "--isolate-env", "chroot")
    names = sorted(run.cases)
    assert names == sorted([
        "test_portable::test_where", "test_portable::test_fails", "test_portable::test_skips",
        "test_portable::test_xfails", "test_marked::test_only_chroot",
        "test_marked::test_only_docker", "test_marked::test_both[docker]",
        "test_marked::test_both[chroot]", DRIVER_CASE]), run.out
    assert run.cases["test_portable::test_where"].props["where"] == "isolate-chroot"
    assert run.cases["test_portable::test_where"].props["isolate.env"] == "chroot"
    # a marked test keeps its environment, even one not named by --isolate-env
    assert run.cases["test_marked::test_only_docker"].props["where"] == "isolate-docker"
    assert run.cases["test_marked::test_both[docker]"].props["isolate.env"] == "docker"


def test_without_the_flag_unmarked_tests_run_on_the_host(project: Project) -> None:
    run = project.pytest("host")
    where = run.cases["test_portable::test_where"]
    assert "isolate.env" not in where.props
    assert not where.props["where"].startswith("isolate-")
    assert run.cases["test_marked::test_only_docker"].props["where"] == "isolate-docker"
    assert run.report is not None
    assert sorted(t["nodeid"].split("::")[1] for t in run.report["tests"]) == [
        "test_both[chroot]", "test_both[docker]", "test_only_chroot", "test_only_docker"]


def test_unknown_environment_is_a_usage_error(project: Project) -> None:
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                          "--isolate-env", "chroot,nosuch"], cwd=project.root,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 4  # pytest's usage error
    assert "nosuch" in run.stderr and "chroot" in run.stderr


PYTHON_VERSION = """
import socket
import sys


def test_version():
    env = socket.gethostname()[len("isolate-"):]
    assert env in ("py3.11", "py3.13")
    assert "py%d.%d" % sys.version_info[:2] == env
"""


def test_python_matrix_from_debian_releases(project: Project) -> None:
    """`--isolate-env py3.11,py3.13`: the built-in Python environments are chroots of the
    Debian release that ships that Python (bookworm, trixie)."""
    (project.root / "pyver").mkdir(exist_ok=True)
    (project.root / "pyver" / "test_pyver.py").write_text(PYTHON_VERSION)
    run = project.pytest("pythons", "--isolate-env", "py3.11,py3.13", "pyver")
    assert {name: case.result for name, case in run.cases.items()} == {
        "test_pyver::test_version[py3.11]": "passed",
        "test_pyver::test_version[py3.13]": "passed"}, run.out
    assert run.report is not None
    envs = run.report["environments"]
    assert {name: envs[name]["tests"] for name in ("py3.11", "py3.13")} == {
        "py3.11": 1, "py3.13": 1}, envs
