"""Timing and reports: junitxml properties, the JSON report, the terminal table, logs."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from unit_support import Project

TESTS = """
import pytest

@pytest.mark.isolate("fakeenv")
def test_inside_ok():
    pass

@pytest.mark.isolate("fakeenv")
def test_inside_bad():
    assert 1 == 2

@pytest.mark.isolate("fakeenv2")
def test_other_env():
    pass

def test_local():
    pass
"""


def junit_properties(path: Path) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        props: dict[str, list[str]] = {}
        for prop in case.iter("property"):
            props.setdefault(prop.get("name", ""), []).append(prop.get("value", ""))
        out[case.get("name", "")] = props
    return out


def test_junitxml_has_env_and_phases(project: Project) -> None:
    project.tests(TESTS)
    result = project.run("--junitxml", "junit.xml")
    result.assert_outcomes(passed=3, failed=1)
    props = junit_properties(project.path / "junit.xml")
    assert set(props) == {"test_inside_ok", "test_inside_bad", "test_other_env", "test_local"}
    assert props["test_local"] == {}
    for name, env in (("test_inside_ok", "fakeenv"), ("test_inside_bad", "fakeenv"),
                      ("test_other_env", "fakeenv2")):
        p = props[name]
        assert p["isolate.env"] == [env], (name, p)
        assert len(p["isolate.run"]) == 1 and float(p["isolate.run"][0]) > 0, (name, p)
        assert "isolate.reset" in p
    # the first test of an environment paid provision and start, the next one did not
    assert "isolate.provision" in props["test_inside_ok"] and "isolate.start" in props["test_inside_ok"]
    assert "isolate.provision" not in props["test_inside_bad"]
    assert "isolate.start" not in props["test_inside_bad"]


def test_json_report(project: Project) -> None:
    project.tests(TESTS)
    result = project.run("--isolate-report", "out/report.json")
    result.assert_outcomes(passed=3, failed=1)
    report: dict[str, Any] = json.loads((project.path / "out" / "report.json").read_text())
    assert report["version"] == 1
    assert isinstance(report["run_id"], str) and report["run_id"]
    envs = report["environments"]
    assert set(envs) == {"fakeenv", "fakeenv2"}
    fake = envs["fakeenv"]
    assert fake["backend"] == "fake" and fake["tests"] == 2 and fake["starts"] == 1
    assert fake["cache_hit"] is False and len(fake["key"]) == 24
    assert Path(fake["logs"]["agent"]).is_file()
    assert envs["fakeenv2"]["key"] != fake["key"]  # different packages, different cache key
    tests = {t["nodeid"]: t for t in report["tests"]}
    assert set(tests) == {"test_project.py::test_inside_ok", "test_project.py::test_inside_bad",
                          "test_project.py::test_other_env"}
    assert tests["test_project.py::test_inside_ok"]["outcome"] == "passed"
    assert tests["test_project.py::test_inside_bad"]["outcome"] == "failed"
    assert tests["test_project.py::test_other_env"]["env"] == "fakeenv2"
    first = tests["test_project.py::test_inside_ok"]["phases"]
    assert {"provision", "start", "sync", "run", "reset"} <= set(first)
    assert all(isinstance(v, float) and v >= 0 for v in first.values())
    assert set(tests["test_project.py::test_inside_bad"]["phases"]) == {"run", "reset"}

    # second run: everything comes from the cache
    again = project.run("--isolate-report", "out/report.json")
    again.assert_outcomes(passed=3, failed=1)
    report = json.loads((project.path / "out" / "report.json").read_text())
    assert report["environments"]["fakeenv"]["cache_hit"] is True
    assert report["environments"]["fakeenv"]["key"] == fake["key"]
    again.stdout.no_fnmatch_line("isolate: built *")


def test_terminal_summary_table(project: Project) -> None:
    project.tests(TESTS)
    result = project.run()
    result.stdout.fnmatch_lines([
        "isolate: built fakeenv (fake, trixie/amd64) in *s",
    ])
    result.stdout.fnmatch_lines([
        "*= pytest-isolate =*",
        "environment  backend  arch   bound  tests  provision  *start  per test",
        "fakeenv      fake     amd64  2      2      *(built)  *s  * ms",
        "fakeenv2     fake     amd64  1      1      *(built)  *s  * ms",
        "logs: *",
    ])
    again = project.run()
    again.stdout.fnmatch_lines(["fakeenv      fake     amd64  2      2      *(cached)*"])


def test_no_table_without_isolated_tests(project: Project) -> None:
    project.tests("""
        def test_local():
            pass
    """)
    result = project.run()
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*pytest-isolate*")
    # nothing was built or started: the cache directory was not even used
    assert not (project.cache_dir / "fake").exists()


def test_failing_test_shows_log_paths(project: Project) -> None:
    project.tests(TESTS)
    result = project.run("-rA")
    result.stdout.fnmatch_lines([
        "*_ test_inside_bad _*",
        "*isolate logs (fakeenv)*",
        "agent: */fakeenv/agent.log",
    ])


def test_crash_shows_environment_log_tail(project: Project) -> None:
    project.tests("""
        import os, sys
        import pytest

        @pytest.mark.isolate("fakeenv")
        def test_crash():
            sys.stderr.write("last words before dying\\n")
            sys.stderr.flush()
            os._exit(7)
    """)
    result = project.run("-s")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*test worker inside environment 'fakeenv' ended: exited with status 7*",
        "*environment log tail*",
    ])


def test_json_report_and_table_under_xdist(project: Project) -> None:
    project.tests("""
        import pytest

        @pytest.mark.isolate("fakeenv")
        @pytest.mark.parametrize("i", range(8))
        def test_many(i):
            pass
    """)
    result = project.pytester.runpytest_subprocess("-n", "2", "--isolate-report", "r.json", timeout=90)
    result.assert_outcomes(passed=8)
    report = json.loads((project.path / "r.json").read_text())
    assert len(report["tests"]) == 8
    assert report["environments"]["fakeenv"]["tests"] == 8
    result.stdout.fnmatch_lines(["*= pytest-isolate =*", "fakeenv *fake*8*"])


def test_junitxml_under_xdist(project: Project) -> None:
    project.tests("""
        import pytest

        @pytest.mark.isolate("fakeenv")
        @pytest.mark.parametrize("i", range(4))
        def test_many(i):
            pass
    """)
    result = project.pytester.runpytest_subprocess("-n", "2", "--junitxml", "j.xml", timeout=90)
    result.assert_outcomes(passed=4)
    props = junit_properties(project.path / "j.xml")
    assert len(props) == 4
    assert all(p["isolate.env"] == ["fakeenv"] and "isolate.run" in p for p in props.values())
