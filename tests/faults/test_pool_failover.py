"""A pool host's Docker engine dies mid-run: the running test fails, the rest move.

The pool's first host is a private engine (private_engine.py), the second the main
one.  The private engine is killed with SIGKILL while a test runs in one of its
containers: that test fails as any lost environment does, and the environment's next
tests run on the main engine, with the move in the JSON report.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faults_support import find_processes, inner_options, sleep_tag, wait_for
from private_engine import PrivateEngine

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
    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is not installed (apt-get install docker.io)")
    project = tmp_path_factory.mktemp("pool-host-killed")
    tag = sleep_tag()
    (project / "pyproject.toml").write_text(POOL)
    (project / "test_pool.py").write_text(RUN.format(tag=tag))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    sc = Scenario()
    ENGINE.remove()  # what an interrupted earlier session left
    engine = proc = None
    try:
        engine = ENGINE.start(project / "dockerd.log")
        with open(project / "inner.out", "wb") as out:
            # without xdist the one worker's slot is the first host's: the private engine
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", *inner_options(cache_dir), "-p", "no:xdist",
                 "--isolate-report", "report.json"],
                cwd=project, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env)
        wait_for(f"sleep {tag} in a container of the private engine",
                 lambda: find_processes(f"sleep {tag}"), 240, proc)
        killed_at = time.monotonic()
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        proc.wait(600)
        sc.elapsed = time.monotonic() - killed_at
        sc.output = (project / "inner.out").read_text(errors="replace")
        sc.report = json.loads((project / "report.json").read_text())
        yield sc
    finally:
        for p in (proc, engine):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        ENGINE.remove()


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
