"""The zygote (agent.Zygote) through the fake backend: higher-scoped fixtures are set up
once, in one process, and torn down there; each test is a fresh fork of it.

The fake backend isolates nothing, so fixtures log to a file in the project with the
pid they ran in; what a test changes in memory shows whether it ran in a fresh fork.
"""

from __future__ import annotations

from collections import defaultdict

from unit_support import Project

CONFTEST_EXTRA = """
import os
import pytest

def log(event):
    with open(os.path.join(os.path.dirname(__file__), "events.log"), "a") as f:
        f.write("%s %d\\n" % (event, os.getpid()))

@pytest.fixture(scope="session")
def counter():
    log("session-setup")
    yield {"n": 0}
    log("session-teardown")

@pytest.fixture(scope="module")
def per_module():
    log("module-setup")
    yield
    log("module-teardown")

@pytest.fixture(scope="session")
def declared():
    log("declared-setup")
    yield
    log("declared-teardown")
"""

TESTS = """
import os
import pytest

pytestmark = pytest.mark.isolate("fakeenv", fixtures_per_test=["declared"])

@pytest.mark.parametrize("i", range(3))
def test_fork(counter, per_module, declared, i):
    counter["n"] += 1
    assert counter["n"] == 1  # the zygote's value, untouched by the tests before
"""


def events(project: Project) -> dict[str, list[int]]:
    found: dict[str, list[int]] = defaultdict(list)
    for line in (project.path / "events.log").read_text().splitlines():
        name, pid = line.split()
        found[name].append(int(pid))
    return found


def test_higher_scopes_are_set_up_once_in_the_zygote(project: Project) -> None:
    conftest = project.path / "conftest.py"
    conftest.write_text(conftest.read_text() + CONFTEST_EXTRA)
    project.tests(TESTS, name="test_one")
    project.tests(TESTS, name="test_two")
    result = project.run("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    ev = events(project)
    assert len(ev["session-setup"]) == len(ev["session-teardown"]) == 1
    assert len(ev["module-setup"]) == len(ev["module-teardown"]) == 2
    # set up and torn down in the same process: the zygote
    assert ev["session-setup"] == ev["session-teardown"] == ev["module-setup"][:1]
    # a fixture declared per test: set up and torn down in each test's worker
    assert len(ev["declared-setup"]) == len(ev["declared-teardown"]) == 6
    assert len(set(ev["declared-setup"])) == 6
    assert ev["session-setup"][0] not in ev["declared-setup"]
    assert "started threads" not in result.stdout.str()


def test_fixtures_per_test_must_be_a_list_of_names(project: Project) -> None:
    project.tests("""
        import pytest

        @pytest.mark.isolate("fakeenv", fixtures_per_test="pool")
        def test_a():
            pass
    """)
    result = project.run("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*fixtures_per_test must be a list of fixture names*"])
