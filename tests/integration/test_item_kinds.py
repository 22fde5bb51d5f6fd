"""Every item kind runs once per environment, in each of them (issue 17), on chroot and docker.

A generated project has a unittest ``TestCase`` class with ``@pytest.mark.isolate("chroot",
"docker")``, an unmarked ``TestCase``, a module with a doctest (``--doctest-modules``) and a
``.yaml`` file whose cases a small conftest plugin collects (one of them marked for both
environments).  Every item records, as user properties, the hostname it ran on (inside it is
``isolate-<env>``) and its own node id as pytest saw it while running (PYTEST_CURRENT_TEST):
the junit file then shows that each copy ran under its own id, in the environment that id
names.  Runs: ``--isolate-env chroot,docker``, the marker alone, and ``-n 2``.
"""

from __future__ import annotations

import json
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from shared_support import run_pytest

pytestmark = pytest.mark.integration

ENVS = ("chroot", "docker")

PYPROJECT = """\
[project]
name = "item-kinds"
version = "0"

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

CONFTEST = '''\
import os
import socket

import pytest


def record(node):
    node.user_properties.append(("where", socket.gethostname()))
    node.user_properties.append(("current", os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]))


@pytest.fixture(autouse=True)
def _record(request):
    record(request.node)  # TestCase methods and doctests get autouse fixtures too


class YamlItem(pytest.Item):
    def __init__(self, *, spec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec

    def runtest(self):
        record(self)
        assert self.spec["expect"] == "ok"

    def reportinfo(self):
        return self.path, 0, "yaml: " + self.name


class YamlFile(pytest.File):
    """A tiny yaml subset: "name: key=value ..." per line (the stdlib has no yaml parser)."""

    def collect(self):
        for line in self.path.read_text().splitlines():
            name, _, rest = line.partition(":")
            spec = dict(kv.split("=") for kv in rest.split())
            item = YamlItem.from_parent(self, name=name.strip(), spec=spec)
            if "envs" in spec:
                item.add_marker(pytest.mark.isolate(*spec["envs"].split(",")))
            yield item


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".yaml" and file_path.name.startswith("test"):
        return YamlFile.from_parent(parent, path=file_path)
'''

UNITTESTS = '''\
import socket
import unittest

import pytest


@pytest.mark.isolate("chroot", "docker")
class TestMarked(unittest.TestCase):
    def test_one(self):
        self.assertTrue(socket.gethostname().startswith("isolate-"))

    def test_two(self):
        self.assertEqual(1 + 1, 2)


class TestPlain(unittest.TestCase):
    def test_plain(self):
        pass
'''

DOCS = '''\
def double(x):
    """
    >>> double(2)
    4
    """
    return 2 * x
'''

YAML = "hello: expect=ok\nboth: expect=ok envs=chroot,docker\n"

BASES = ("tests/test_unit.py::TestMarked::test_one", "tests/test_unit.py::TestMarked::test_two",
         "tests/test_unit.py::TestPlain::test_plain", "tests/docs.py::docs.double",
         "tests/test_cases.yaml::hello", "tests/test_cases.yaml::both")
#: --isolate-env chroot,docker: every item, of every kind, once per environment
MATRIX = {f"{base}[{env}]": env for base in BASES for env in ENVS}
#: the marker alone: marked items split, the others stay on the host
MARKED = {
    **{f"{base}[{env}]": env for base in (BASES[0], BASES[1], BASES[5]) for env in ENVS},
    **{base: None for base in (BASES[2], BASES[3], BASES[4])},
}


@dataclass
class Run:
    result: subprocess.CompletedProcess[str]
    #: node id the item ran under -> its properties (where, current, isolate.env, result)
    cases: dict[str, dict[str, str]]
    report: dict[str, Any]

    @property
    def out(self) -> str:
        return self.result.stdout[-4000:] + self.result.stderr[-2000:]


class Project:
    def __init__(self, root: Path, cache: str) -> None:
        self.root = root
        self.cache = cache

    def pytest(self, label: str, *args: str) -> Run:
        junit = self.root / f"{label}.xml"
        report = self.root / f"{label}.json"
        started = time.monotonic()
        result = run_pytest(self.root, self.cache, "-v", "--doctest-modules",
                            f"--junitxml={junit}", f"--isolate-report={report}", *args,
                            timeout=1800)
        print(f"{label}: {' '.join(args)}: {time.monotonic() - started:.1f}s")
        assert junit.is_file() and report.is_file(), result.stdout[-4000:] + result.stderr[-2000:]
        cases = {}
        for tc in ET.parse(junit).getroot().iter("testcase"):
            props = {str(p.get("name")): str(p.get("value")) for p in tc.iter("property")}
            tags = {c.tag for c in tc} - {"properties", "system-out", "system-err"}
            props["result"] = tags.pop() if tags else "passed"
            assert "current" in props, (tc.get("name"), props, result.stdout[-4000:])
            assert props["current"] not in cases, props["current"]
            cases[props["current"]] = props
        return Run(result, cases, json.loads(report.read_text()))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("item-kinds")
    (root / "pyproject.toml").write_text(PYPROJECT)
    tests = root / "tests"
    tests.mkdir()
    (tests / "conftest.py").write_text(CONFTEST)
    (tests / "test_unit.py").write_text(UNITTESTS)
    (tests / "docs.py").write_text(DOCS)
    (tests / "test_cases.yaml").write_text(YAML)
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    assert manager is not None
    yield Project(root, str(manager.cache.root))


def check_ran_where_bound(run: Run, expected: Mapping[str, str | None]) -> None:
    """Exactly the expected items ran, each in the environment its id names."""
    assert sorted(run.cases) == sorted(expected), run.out
    for nodeid, env in expected.items():
        props = run.cases[nodeid]
        assert props["result"] == "passed", (nodeid, run.out)
        assert props.get("isolate.env") == env, (nodeid, props)
        if env is None:  # on the host
            assert not props["where"].startswith("isolate-"), (nodeid, props)
        else:
            assert props["where"] == f"isolate-{env}", (nodeid, props)
    isolated = {n: e for n, e in expected.items() if e is not None}
    assert {t["nodeid"]: t["env"] for t in run.report["tests"]} == isolated
    for env in ENVS:
        stats = run.report["environments"][env]
        assert stats["bound"] == stats["tests"] == list(isolated.values()).count(env), stats


def test_every_kind_once_per_environment_with_isolate_env(project: Project) -> None:
    run = project.pytest("matrix", "--isolate-env", "chroot,docker")
    assert run.result.returncode == 0, run.out
    assert "12 passed" in run.result.stdout, run.out
    check_ran_where_bound(run, MATRIX)
    # the summary table shows how many items each environment had
    lines = run.result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("environment "))
    assert lines[header].split()[:5] == ["environment", "backend", "arch", "bound", "tests"]
    rows = {line.split()[0]: line.split() for line in lines[header + 1:header + 3]}
    assert {env: rows[env][3:5] for env in ENVS} == {env: ["6", "6"] for env in ENVS}, lines[header:]


def test_marker_on_a_testcase_class_and_a_plugin_item(project: Project) -> None:
    run = project.pytest("marked")
    assert run.result.returncode == 0, run.out
    check_ran_where_bound(run, MARKED)


def test_xdist_runs_each_copy_once(project: Project) -> None:
    run = project.pytest("xdist", "-n", "2", "--isolate-env", "chroot,docker")
    assert run.result.returncode == 0, run.out
    check_ran_where_bound(run, MATRIX)
    # both workers ran some of the copies
    workers = {line.split()[0] for line in run.result.stdout.splitlines()
               if line.startswith("[gw") and "PASSED" in line}
    assert workers == {"[gw0]", "[gw1]"}, run.out
