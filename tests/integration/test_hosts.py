"""The host pool: environments placed on several engines, xdist workers spread over them.

A second Docker engine on its own unix socket stands in for a remote one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import stop

from pytest_isolate.cache import mounts_under

pytestmark = pytest.mark.integration
MAIN = "unix:///var/run/docker.sock"


def _client(url: str) -> Any:
    import docker

    return docker.DockerClient(base_url=url)


@pytest.fixture(scope="module")
def second_engine() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("starting a second Docker engine needs root")
    base = Path(tempfile.mkdtemp(prefix="isolate-engine2-", dir="/var/tmp"))
    sock = base / "docker.sock"
    log = open(base / "dockerd.log", "wb")  # noqa: SIM115 - lives as long as the engine
    proc = subprocess.Popen(
        ["dockerd", "-H", f"unix://{sock}", "--data-root", str(base / "data"),
         "--exec-root", str(base / "exec"), "--pidfile", str(base / "docker.pid"),
         "--bridge=none", "--iptables=false", "--ip-masq=false"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _client(url).ping()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((base / "dockerd.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield url
    finally:
        try:
            client = _client(url)
            for c in client.containers.list(all=True):
                c.remove(force=True)
        except Exception:
            pass
        stop(proc, 30)
        log.close()
        for point in sorted(mounts_under(base), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


def started_containers(url: str, since: float) -> int:
    events = _client(url).events(since=int(since), until=int(time.time()) + 1, decode=True,
                                 filters={"type": "container", "event": "start",
                                          "label": "pytest-isolate"})
    return sum(1 for _ in events)


def docker_tests(pytester: pytest.Pytester, count: int) -> None:
    """count tests in the built-in docker environment, each checking it runs in a container."""
    pytester.makepyfile(test_pool=f"""
        import os, pytest

        @pytest.mark.isolate("docker")
        @pytest.mark.parametrize("n", range({count}))
        def test_inside(n):
            assert os.path.exists("/.dockerenv")
    """)


def test_environments_spread_over_two_engines(pytester: pytest.Pytester, second_engine: str) -> None:
    pytester.makefile(".toml", pyproject=textwrap.dedent(f"""
        [tool.pytest-isolate.hosts.main]
        docker = "{MAIN}"
        arches = ["amd64"]

        [tool.pytest-isolate.hosts.second]
        docker = "{second_engine}"
        arches = ["amd64"]
    """))
    docker_tests(pytester, 6)
    since = time.time() - 1
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "load", "--isolate-strict",
                                           "-p", "no:cacheprovider", timeout=900)
    result.assert_outcomes(passed=6)
    assert started_containers(MAIN, since) >= 1
    assert started_containers(second_engine, since) >= 1
    images = _client(second_engine).images.list(name="pytest-isolate/docker")
    assert images, "the second engine got its own image, imported from the shared cache"


def test_unknown_host_key_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=textwrap.dedent("""
        [tool.pytest-isolate.hosts.box]
        dokcer = "ssh://ci@box"
    """))
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*[[]tool.pytest-isolate.hosts.box[]]: unknown key 'dokcer'"
                                 " (did you mean 'docker'?)*"])


def test_dead_endpoint_moves_its_environments_to_the_live_one(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    dead = f"unix://{tmp_path}/nothing.sock"
    pytester.makefile(".toml", pyproject=textwrap.dedent(f"""
        [tool.pytest-isolate.hosts.gone]
        docker = "{dead}"

        [tool.pytest-isolate.hosts.main]
        docker = "{MAIN}"
    """))
    docker_tests(pytester, 3)
    since = time.time() - 1
    # without xdist the one worker's slot is the first host's: the dead one
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--isolate-strict",
                                           "-p", "no:cacheprovider",
                                           "--isolate-report", "report.json", timeout=900)
    result.assert_outcomes(passed=3)
    assert started_containers(MAIN, since) >= 1
    report = json.loads((pytester.path / "report.json").read_text())
    [move] = report["moves"]
    assert (move["env"], move["from_host"], move["to_host"]) == ("docker", "gone", "main")
    assert move["reason"].startswith(f"the docker engine does not answer at {dead}"), move
    env = report["environments"]["docker"]
    assert (env["host"], env["endpoint"]) == ("main", MAIN)
