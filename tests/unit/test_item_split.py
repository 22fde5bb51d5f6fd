"""Every item kind is split per environment (issue 17), with the fake backend.

Functions are split by parametrize (test_parametrize.py); here: unittest TestCase
methods, doctests and items a conftest plugin collects from .yaml files, with the
marker and with ``--isolate-env a,b``.  Each test records, through a user property,
its own node id as pytest saw it while running (PYTEST_CURRENT_TEST) and the
environment it ran in: the directory of its agent's log (the fake backend runs one
agent per environment, and the test's worker is that agent's child).
"""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from unit_support import BACKENDS_CONFTEST, Project

CONFTEST = BACKENDS_CONFTEST + '''
import os

def where():
    """The environment this process runs in: its agent logs to <logs>/<env>/agent.log."""
    log = os.readlink("/proc/%d/fd/2" % os.getppid())
    return os.path.basename(os.path.dirname(log))

def record(node):
    current = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
    node.user_properties.append(("where", where()))
    node.user_properties.append(("current", current))

@pytest.fixture(autouse=True)
def _record(request):
    record(request.node)  # unittest methods and doctests get autouse fixtures too

class YamlItem(pytest.Item):
    def __init__(self, *, spec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec

    def runtest(self):
        record(self)
        if self.spec.get("fail") == where():
            raise AssertionError("yaml case %s failed in %s" % (self.name, where()))

    def reportinfo(self):
        return self.path, 0, "yaml: " + self.name

class YamlFile(pytest.File):
    def collect(self):
        # a tiny format: "name: key=value ..." per line (the stdlib has no yaml parser)
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

UNITTESTS = '''
import unittest

import pytest


@pytest.mark.isolate("fakeenv", "fakeenv2")
class TestMarked(unittest.TestCase):
    def test_one(self):
        self.assertEqual(1 + 1, 2)

    def test_two(self):
        self.assertTrue(True)


class TestPlain(unittest.TestCase):
    def test_plain(self):
        pass
'''

DOCS = '''
def double(x):
    """
    >>> double(2)
    4
    """
    return 2 * x
'''

YAML = "hello: greeting=hi\nboth: envs=fakeenv,fakeenv2\n"

ENVS = ("fakeenv", "fakeenv2")


def make_project(project: Project) -> None:
    project.pytester.makeconftest(CONFTEST)
    project.tests(UNITTESTS, name="test_unit")
    project.tests(DOCS, name="docs")
    (project.path / "test_cases.yaml").write_text(YAML)


def cases(path: Path) -> dict[str, dict[str, str]]:
    """junit testcase -> its properties, keyed classname::name."""
    out = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        props = {str(p.get("name")): str(p.get("value")) for p in tc.iter("property")}
        tags = {c.tag for c in tc} - {"properties", "system-out", "system-err"}
        props["result"] = tags.pop() if tags else "passed"
        out[f"{tc.get('classname')}::{tc.get('name')}"] = props
    return out


MATRIX_IDS = [f"{base}[{env}]" for base in (
    "test_unit.py::TestMarked::test_one", "test_unit.py::TestMarked::test_two",
    "test_unit.py::TestPlain::test_plain", "docs.py::docs.double",
    "test_cases.yaml::hello", "test_cases.yaml::both") for env in ENVS]


def test_every_item_kind_is_split_with_isolate_env(project: Project) -> None:
    make_project(project)
    collected = project.run("--collect-only", "-q", "--doctest-modules",
                            "--isolate-env", "fakeenv,fakeenv2")
    ids = [line for line in collected.stdout.lines if "::" in line]
    assert sorted(ids) == sorted(MATRIX_IDS), collected.stdout.str()

    result = project.run("-v", "--doctest-modules", "--isolate-env", "fakeenv,fakeenv2",
                         "--junitxml", "junit.xml", "--isolate-report", "report.json")
    result.assert_outcomes(passed=12)
    junit = cases(project.path / "junit.xml")
    assert len(junit) == 12, junit
    seen = {}
    for props in junit.values():
        assert props["result"] == "passed"
        assert props["isolate.env"] == props["where"], props  # bound there, ran there
        seen[props["current"]] = props["where"]
    # each copy ran under its own id, in the environment its id names
    assert seen == {nodeid: nodeid.rsplit("[", 1)[1][:-1] for nodeid in MATRIX_IDS}
    report = json.loads((project.path / "report.json").read_text())
    assert {t["nodeid"]: t["env"] for t in report["tests"]} == seen
    for env in ENVS:
        assert report["environments"][env]["bound"] == 6
        assert report["environments"][env]["tests"] == 6
    result.stdout.fnmatch_lines([
        "environment  backend  arch   bound  tests  provision  *start  per test",
        "fakeenv      fake     amd64  6      6      *",
        "fakeenv2     fake     amd64  6      6      *",
    ])


def test_marker_on_a_testcase_class_and_a_plugin_item(project: Project) -> None:
    make_project(project)
    result = project.run("-v", "--doctest-modules", "--junitxml", "junit.xml")
    result.assert_outcomes(passed=9)
    junit = cases(project.path / "junit.xml")
    where = {props["current"]: props.get("isolate.env") for props in junit.values()}
    host = {nodeid: None for nodeid in (
        "test_unit.py::TestPlain::test_plain", "docs.py::docs.double", "test_cases.yaml::hello")}
    assert where == {
        **host,
        **{f"test_unit.py::TestMarked::{name}[{env}]": env
           for name in ("test_one", "test_two") for env in ENVS},
        **{f"test_cases.yaml::both[{env}]": env for env in ENVS},
    }
    for props in junit.values():
        if props.get("isolate.env"):
            assert props["where"] == props["isolate.env"]


def test_one_environment_keeps_plain_ids(project: Project) -> None:
    make_project(project)
    result = project.run("--collect-only", "-q", "--doctest-modules", "--isolate-env", "fakeenv")
    ids = sorted(line for line in result.stdout.lines if "::" in line)
    assert ids == sorted([
        "test_unit.py::TestMarked::test_one[fakeenv]", "test_unit.py::TestMarked::test_one[fakeenv2]",
        "test_unit.py::TestMarked::test_two[fakeenv]", "test_unit.py::TestMarked::test_two[fakeenv2]",
        "test_unit.py::TestPlain::test_plain", "docs.py::docs.double", "test_cases.yaml::hello",
        "test_cases.yaml::both[fakeenv]", "test_cases.yaml::both[fakeenv2]"])


@pytest.mark.parametrize(("args", "selected"), [
    (("-k", "fakeenv2"), [i for i in MATRIX_IDS if i.endswith("[fakeenv2]")]),
    (("-k", "TestMarked and not fakeenv2"),
     ["test_unit.py::TestMarked::test_one[fakeenv]", "test_unit.py::TestMarked::test_two[fakeenv]"]),
    (("--deselect", "test_unit.py::TestMarked::test_one[fakeenv2]",
      "--deselect", "docs.py::docs.double", "--deselect", "test_cases.yaml"),
     ["test_unit.py::TestMarked::test_one[fakeenv]", "test_unit.py::TestMarked::test_two[fakeenv]",
      "test_unit.py::TestMarked::test_two[fakeenv2]", "test_unit.py::TestPlain::test_plain[fakeenv]",
      "test_unit.py::TestPlain::test_plain[fakeenv2]"]),
])
def test_selection_works_on_the_copies(project: Project, args: tuple[str, ...],
                                       selected: list[str]) -> None:
    make_project(project)
    result = project.run("--collect-only", "-q", "--doctest-modules",
                         "--isolate-env", "fakeenv,fakeenv2", *args)
    assert sorted(line for line in result.stdout.lines if "::" in line) == sorted(selected)


def test_last_failed_reruns_only_the_failed_copies(project: Project) -> None:
    make_project(project)
    # one copy of a yaml case and one of a doctest fail: in fakeenv2 only
    (project.path / "test_cases.yaml").write_text(YAML + "broken: fail=fakeenv2\n")
    project.tests(DOCS + textwrap.dedent('''
        def env():
            """
            >>> import os; os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].endswith("[fakeenv]")
            True
            """
    '''), name="docs")
    first = project.run("-p", "cacheprovider", "-v", "--doctest-modules",
                        "--isolate-env", "fakeenv,fakeenv2")
    first.assert_outcomes(passed=14, failed=2)
    first.stdout.fnmatch_lines_random([
        "FAILED docs.py::docs.env[[]fakeenv2[]]*",
        "FAILED test_cases.yaml::broken[[]fakeenv2[]]*",
    ])
    again = project.run("-p", "cacheprovider", "-v", "--lf", "--doctest-modules",
                        "--isolate-env", "fakeenv,fakeenv2")
    again.assert_outcomes(failed=2)
    again.stdout.fnmatch_lines_random([
        "docs.py::docs.env[[]fakeenv2[]] FAILED*",
        "test_cases.yaml::broken[[]fakeenv2[]] FAILED*",
    ])


def test_xdist_distributes_the_copies(project: Project) -> None:
    make_project(project)
    result = project.pytester.runpytest_subprocess(
        "-p", "no:randomly", "-n", "2", "--doctest-modules", "--isolate-env", "fakeenv,fakeenv2",
        "--junitxml", "junit.xml", "--isolate-report", "report.json", timeout=120)
    result.assert_outcomes(passed=12)
    junit = cases(project.path / "junit.xml")
    assert sorted(props["current"] for props in junit.values()) == sorted(MATRIX_IDS)
    assert all(props["where"] == props["isolate.env"] for props in junit.values())
    report = json.loads((project.path / "report.json").read_text())
    # both workers collect (and bind) every item: the merged count is not doubled
    assert {env: report["environments"][env]["bound"] for env in ENVS} == {e: 6 for e in ENVS}
    assert sum(report["environments"][env]["tests"] for env in ENVS) == 12


UNSPLITTABLE = '''
class FixedIdItem(pytest.Item):
    @property
    def nodeid(self):
        return "fixed-id"

    def runtest(self):
        pass

class FixedFile(pytest.File):
    def collect(self):
        yield FixedIdItem.from_parent(self, name="case")

def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".fixed":
        return FixedFile.from_parent(parent, path=file_path)
'''


def test_an_item_that_cannot_be_split_is_a_usage_error(project: Project) -> None:
    project.pytester.makeconftest(BACKENDS_CONFTEST + UNSPLITTABLE)
    (project.path / "one.fixed").write_text("")
    result = project.run("--isolate-env", "fakeenv,fakeenv2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([
        "*these items have several environments but cannot be split*",
        "*fixed-id (FixedIdItem): ValueError: FixedIdItem defines its own node id*",
    ])
    result.stdout.no_fnmatch_line("*passed*")


def test_bad_marker_on_a_testcase_class_is_a_usage_error(project: Project) -> None:
    project.tests('''
        import unittest
        import pytest

        @pytest.mark.isolate("fakeenv", "nosuch")
        class TestX(unittest.TestCase):
            def test_a(self):
                pass
    ''')
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_project.py::TestX::test_a: @pytest.mark.isolate*nosuch*"])


def test_an_unavailable_environment_still_shows_its_bound_items(project: Project) -> None:
    make_project(project)
    result = project.run("-rs", "--doctest-modules", "--isolate-env", "fakeenv,missing",
                         "--isolate-report", "report.json")
    # unmarked: once in each; marked (TestMarked, the yaml case "both"): fakeenv, fakeenv2
    result.assert_outcomes(passed=9, skipped=3)
    report = json.loads((project.path / "report.json").read_text())
    envs = report["environments"]
    assert {name: envs[name]["bound"] for name in envs} == {
        "fakeenv": 6, "fakeenv2": 3, "missing": 3}
    assert (envs["missing"]["starts"], envs["missing"]["cache_hit"]) == (0, None)
    result.stdout.fnmatch_lines_random([
        "fakeenv      fake          amd64  6      6      *",
        "missing      fake-missing  amd64  3      3      -             -      -",
    ])
