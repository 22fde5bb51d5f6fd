"""One item per environment, and --isolate-env for unmarked tests."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from unit_support import BACKENDS_CONFTEST, Project

RECORDER = """
import json
import os
import pytest

def record(name, target=None):
    # what the test saw: its pid and whether it ran in the agent's environment
    # RECORD_DIR reaches the environment through pass_env only
    path = os.path.join(os.environ["RECORD_DIR"], name + ".json")
    with open(path, "w") as f:
        ancestors = [os.getppid()]  # the zygote, the agent, the host pytest, ...
        while ancestors[-1] > 1 and len(ancestors) < 4:
            with open("/proc/%d/stat" % ancestors[-1]) as stat:
                ancestors.append(int(stat.read().rsplit(")", 1)[1].split()[1]))
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "ancestors": ancestors,
                   "target": target,
                   "autoload": os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")}, f)
"""


PASS_ENV = """
[tool.pytest-isolate.envs.fakeenv]
backend = "fake"
pass_env = ["RECORD_DIR"]

[tool.pytest-isolate.envs.fakeenv2]
backend = "fake"
packages = ["something-else"]
pass_env = ["RECORD_DIR"]
"""


def record_in(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECORD_DIR", str(project.path / "records"))
    (project.path / "records").mkdir()
    project.pyproject(base="[tool.pytest.ini_options]\nmarkers = []\n" + PASS_ENV)


def recorded(directory: os.PathLike[str] | str, name: str) -> dict[str, object]:
    with open(os.path.join(directory, name + ".json")) as f:
        data: dict[str, object] = json.load(f)
    return data


def test_marker_with_two_envs_makes_two_items(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    record_in(project, monkeypatch)
    project.tests(RECORDER + textwrap.dedent("""
        @pytest.mark.isolate("fakeenv", "fakeenv2")
        def test_x(isolate_target):
            record("test_x-" + isolate_target, isolate_target)

        @pytest.mark.isolate("fakeenv", "fakeenv2")
        @pytest.mark.parametrize("n", [1, 2])
        def test_p(n):
            pass
    """))
    result = project.run("--collect-only", "-q")
    result.stdout.fnmatch_lines_random([
        "test_project.py::test_x[[]fakeenv[]]",
        "test_project.py::test_x[[]fakeenv2[]]",
        "test_project.py::test_p[[]1-fakeenv[]]",
        "test_project.py::test_p[[]2-fakeenv[]]",
        "test_project.py::test_p[[]1-fakeenv2[]]",
        "test_project.py::test_p[[]2-fakeenv2[]]",
    ])
    result = project.run("-v")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines_random([
        "test_project.py::test_x[[]fakeenv[]] PASSED*",
        "test_project.py::test_x[[]fakeenv2[]] PASSED*",
    ])
    records = project.path / "records"
    one, two = recorded(records, "test_x-fakeenv"), recorded(records, "test_x-fakeenv2")
    assert one["target"] == "fakeenv" and two["target"] == "fakeenv2"
    assert one["autoload"] == two["autoload"] == "1"
    # two environments: two agents, so the workers have different parents
    assert one["ppid"] != two["ppid"]
    # both environments show in the summary table
    result.stdout.fnmatch_lines(["*pytest-isolate*", "environment *", "fakeenv *fake*", "fakeenv2 *fake*"])


def test_isolate_env_runs_unmarked_tests_inside(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    record_in(project, monkeypatch)
    # the host pytest of the inner run records its own pid (the agent loads this conftest too)
    project.pytester.makeconftest(BACKENDS_CONFTEST + textwrap.dedent("""
        import os

        def pytest_configure(config):
            if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") != "1":
                with open(os.path.join(os.environ["RECORD_DIR"], "host.pid"), "w") as f:
                    f.write(str(os.getpid()))
    """))
    project.tests(RECORDER + textwrap.dedent("""
        def test_a():
            record("a")

        def test_b():
            record("b")
    """))
    result = project.run("-v", "--isolate-env", "fakeenv")
    result.assert_outcomes(passed=2)
    # one environment: ids are unchanged
    result.stdout.fnmatch_lines(["test_project.py::test_a PASSED*", "test_project.py::test_b PASSED*"])
    host_pid = int((project.path / "records" / "host.pid").read_text())
    a, b = (recorded(project.path / "records", n) for n in ("a", "b"))
    assert a["autoload"] == b["autoload"] == "1"
    assert host_pid not in (a["pid"], b["pid"], a["ppid"])
    # each test runs in its own worker (reset = "test"), forked from the same zygote, a
    # child of the agent, which is a child of the host pytest
    assert a["pid"] != b["pid"] and a["ppid"] == b["ppid"]
    assert a["ancestors"][2] == host_pid


def test_isolate_env_with_two_envs_parametrizes_unmarked(project: Project) -> None:
    project.tests("""
        import os

        def test_u(isolate_target):
            assert isolate_target in ("fakeenv", "fakeenv2")
            assert os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") == "1"
    """)
    result = project.run("-v", "--isolate-env", "fakeenv,fakeenv2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines_random([
        "test_project.py::test_u[[]fakeenv[]] PASSED*",
        "test_project.py::test_u[[]fakeenv2[]] PASSED*",
    ])


def test_marker_wins_over_isolate_env(project: Project) -> None:
    project.tests("""
        import pytest

        @pytest.mark.isolate("fakeenv2")
        def test_marked():
            pass

        def test_unmarked():
            pass
    """)
    result = project.run("-v", "--isolate-env", "fakeenv", "--isolate-report", "report.json")
    result.assert_outcomes(passed=2)
    report = json.loads((project.path / "report.json").read_text())
    envs = {t["nodeid"]: t["env"] for t in report["tests"]}
    assert envs == {"test_project.py::test_marked": "fakeenv2", "test_project.py::test_unmarked": "fakeenv"}


def test_isolate_target_is_none_for_a_single_env(project: Project) -> None:
    project.tests("""
        import pytest

        def test_host(isolate_target):
            assert isolate_target is None

        @pytest.mark.isolate("fakeenv")
        def test_inside(isolate_target):
            assert isolate_target is None
    """)
    result = project.run("-v")
    result.assert_outcomes(passed=2)
