"""A pool host's Docker engine dies mid-run: the running test fails, the rest move.

The pool's first host is a private engine (private_engine.py), the second the main
one.  The private engine is killed with SIGKILL while a test runs in one of its
containers: that test fails as any lost environment does, and the environment's next
tests run on the main engine, with the move in the JSON report.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from faults_support import sleep_tag
from private_engine import PrivateEngine
from shared_support import inner_environ

pytestmark = pytest.mark.integration

ENGINE = PrivateEngine("isolate-faults-pool", "/tmp/isolate-pool-exec")
MAIN = "unix:///var/run/docker.sock"

POOL = f"""
[tool.pytest-isolate.hosts.private]
docker = "{ENGINE.host}"

[tool.pytest-isolate.hosts.main]
docker = "{MAIN}"
"""

RUN = """
import os, subprocess
import pytest

@pytest.mark.isolate("docker")
def test_a_running_when_its_host_dies():
    subprocess.run(["sleep", {tag!r}])

@pytest.mark.isolate("docker")
@pytest.mark.parametrize("n", range(2))
def test_b_moved_to_the_other_host(n):
    assert os.path.exists("/.dockerenv")
"""


class Scenario:
    output = ""
    report: dict[str, Any] = {}
    elapsed = 0.0


@pytest.fixture(scope="module")
def host_killed(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Iterator[Scenario]:
    project = tmp_path_factory.mktemp("pool-host-killed")
    tag = sleep_tag()
    (project / "pyproject.toml").write_text(POOL)
    (project / "test_pool.py").write_text(RUN.format(tag=tag))
    env = inner_environ()
    sc = Scenario()
    # without xdist the one worker's slot is the first host's: the private engine
    args = ["-p", "no:xdist", "--isolate-report", "report.json"]
    with ENGINE.killed_mid_run(project, cache_dir, tag, args, env) as elapsed:
        sc.elapsed = elapsed
        sc.output = (project / "inner.out").read_text(errors="replace")
        sc.report = json.loads((project / "report.json").read_text())
        yield sc


def test_the_running_test_fails_as_a_lost_environment(host_killed: Scenario) -> None:
    out = host_killed.output
    assert "test_pool.py::test_a_running_when_its_host_dies FAILED" in out, out
    assert "environment 'docker': the agent's stream ended" in out, out


def test_the_next_tests_run_on_the_other_host(host_killed: Scenario) -> None:
    out = host_killed.output
    assert "1 failed, 2 passed" in out, out
    env = host_killed.report["environments"]["docker"]
    assert (env["host"], env["endpoint"], env["starts"]) == ("main", MAIN, 2), env


def test_the_report_records_the_move(host_killed: Scenario) -> None:
    [move] = host_killed.report["moves"]
    assert (move["env"], move["from_host"], move["to_host"]) == ("docker", "private", "main")
    assert move["reason"].startswith(f"the docker engine does not answer at {ENGINE.host}"), move
