"""The Docker engine goes away mid-run: errors name the engine, nothing hangs.

A second, private engine (own socket, data root, exec root and cgroup parent)
is started for this module and killed with SIGKILL while a test runs in one of
its containers; the main engine is never touched.  Everything the private
engine leaves (its containerd, shims, container processes, mounts, files) is
removed by this module, found by those private paths and cgroup names only.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from faults_support import sleep_tag
from private_engine import PrivateEngine
from shared_support import inner_environ

pytestmark = pytest.mark.integration

ENGINE = PrivateEngine("isolate-faults-docker", "/tmp/isolate-faults-exec")
HOST = ENGINE.host


class EngineScenario:
    output = ""
    elapsed = 0.0


ENGINE_RUN = """
import subprocess
import pytest

@pytest.mark.isolate("docker")
def test_a_running_when_the_engine_dies():
    subprocess.run(["sleep", {tag!r}])

@pytest.mark.isolate("docker")
def test_b_after_the_engine_died():
    pass

@pytest.mark.isolate("chroot")
def test_c_other_backends_go_on():
    pass
"""


@pytest.fixture(scope="module")
def engine_killed(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Iterator[EngineScenario]:
    project = tmp_path_factory.mktemp("engine-killed")
    tag = sleep_tag()
    (project / "test_engine.py").write_text(ENGINE_RUN.format(tag=tag))
    env = inner_environ({"DOCKER_HOST": HOST})
    sc = EngineScenario()
    with ENGINE.killed_mid_run(project, cache_dir, tag, [], env) as elapsed:
        sc.elapsed = elapsed
        sc.output = (project / "inner.out").read_text(errors="replace")
        yield sc


def test_the_running_test_fails_with_the_reason(engine_killed: EngineScenario) -> None:
    out = engine_killed.output
    assert "test_engine.py::test_a_running_when_the_engine_dies FAILED" in out, out
    assert "environment 'docker': the agent's stream ended" in out, out
    assert "--- environment log tail ---" in out, out


def test_the_next_test_errors_naming_the_engine(engine_killed: EngineScenario) -> None:
    out = engine_killed.output
    assert "test_engine.py::test_b_after_the_engine_died ERROR" in out, out
    assert ("backend 'docker' is unavailable: the docker engine does not answer" in out), out
    assert "point DOCKER_HOST at a running engine" in out, out


def test_other_backends_go_on_and_nothing_hangs(engine_killed: EngineScenario) -> None:
    out = engine_killed.output
    assert "test_engine.py::test_c_other_backends_go_on PASSED" in out, out
    assert "1 failed, 1 passed, 1 error" in out, out
    assert engine_killed.elapsed < 30, engine_killed.elapsed


def test_the_error_names_the_endpoint(engine_killed: EngineScenario) -> None:
    assert f"does not answer at {HOST}" in engine_killed.output
