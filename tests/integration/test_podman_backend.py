"""The podman backend runs the docker backend's code against podman's Docker-compatible
API: what a user reads (progress and errors) names podman, the engine actually used.  And
the docker backend pointed at podman's service by DOCKER_HOST works, keeps its images
apart from dockerd's and says which engine it reached.  Drives the real podman service and
dockerd; nothing leaves loopback (the registry that fails is a port nothing listens on)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from integration_support import free_port
from shared_support import inner_environ, outer_cache, output, pytest_argv

from pytest_isolate.backends.base import RunContext
from pytest_isolate.backends.docker import IMAGE_KIND
from pytest_isolate.backends.podman import ROOTFUL_SOCKET, PodmanBackend
from pytest_isolate.errors import ProvisionError
from pytest_isolate.spec import EnvSpec

pytestmark = pytest.mark.integration


@pytest.fixture
def messages() -> list[str]:
    return []


@pytest.fixture
def backend(pytestconfig: pytest.Config, tmp_path: Path, messages: list[str]) -> PodmanBackend:
    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    run = RunContext(run_id=f"itest-{uuid.uuid4().hex[:8]}", rootdir=pytestconfig.rootpath,
                     cache=manager.cache, log_dir=tmp_path / "logs", work_dir=tmp_path / "work",
                     progress=lambda message: messages.append(str(message)), strict=True)
    return PodmanBackend(run)


@pytest.fixture
def spec(pytestconfig: pytest.Config) -> EnvSpec:
    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    spec: EnvSpec = manager.specs["podman"]
    return spec


def image_spec(spec: EnvSpec, ref: str, **changes: Any) -> EnvSpec:
    name = f"podman-{uuid.uuid4().hex[:6]}"
    sources = {**dict(spec.sources),
               "image": f"pyproject.toml: [tool.pytest-isolate.envs.{name}] key 'image'"}
    return dataclasses.replace(spec, name=name, image=ref, sources=sources, **changes)


def test_a_failed_pull_names_podman(backend: PodmanBackend, spec: EnvSpec,
                                    messages: list[str]) -> None:
    ref = f"127.0.0.1:{free_port()}/isolate/none:1"
    missing = image_spec(spec, ref)
    backend.check(missing)
    with pytest.raises(ProvisionError) as info:
        backend.provision(missing)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"podman: pulling image {ref!r} (from "), first
    # the fix names podman's commands (credentials stay the SDK's: ~/.docker/config.json)
    assert "docker pull" not in str(info.value) and "docker load" not in str(info.value), info.value
    assert any(m.startswith(f"podman: pulling {ref}") for m in messages), messages
    assert not any(m.startswith("docker:") for m in messages), messages


def test_a_failed_setup_command_names_podman(backend: PodmanBackend, spec: EnvSpec,
                                             messages: list[str]) -> None:
    backend.check(spec)
    base = backend.provision(spec)  # the built image (cached across runs)
    failing = image_spec(spec, base.manifest["image"], setup=("echo half-done; exit 3",))
    with pytest.raises(ProvisionError) as info:
        backend.provision(failing)
    assert str(info.value).startswith(
        f"podman: setup command 1 of {failing.name!r} ('echo half-done; exit 3') failed with "
        "exit status 3"), info.value
    assert f"podman: setup command 1 of {failing.name!r} ('echo half-done; exit 3')" in messages
    assert not any(m.startswith("docker:") for m in messages), messages


DOCKER_TESTS = """\
import os
import pytest

pytestmark = pytest.mark.isolate("docker")

def test_root_inside():
    assert os.getuid() == 0

def test_no_network():
    assert sorted(os.listdir("/sys/class/net")) == ["lo"]
"""


def engine_version(url: str) -> str:
    import docker

    return str(docker.DockerClient(base_url=url).version()["Version"])


def test_the_docker_backend_on_podman_through_docker_host(tmp_path: Path,
                                                          pytestconfig: pytest.Config) -> None:
    """DOCKER_HOST at podman's rootful socket: the docker backend's tests pass there, its
    image record is another than the one made against dockerd (the key names the engine
    reached), `cache gc` would remove it from podman, and the report says podman."""
    (tmp_path / "pyproject.toml").write_text("[tool.pytest-isolate]\n")
    (tmp_path / "test_engine.py").write_text(DOCKER_TESTS)
    cache = outer_cache(pytestconfig)
    podman = f"unix://{ROOTFUL_SOCKET}"
    runs: dict[str, dict[str, Any]] = {}
    for engine, host in (("dockerd", None), ("podman", podman)):
        env = inner_environ({"DOCKER_HOST": host} if host else None)
        if host is None:
            env.pop("DOCKER_HOST", None)
        result = subprocess.run(
            pytest_argv(cache, "-v", f"--isolate-report={tmp_path / engine}.json"),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
        assert result.returncode == 0, output(result)
        assert "test_root_inside PASSED" in result.stdout, output(result)
        assert "test_no_network PASSED" in result.stdout, output(result)
        runs[engine] = json.loads((tmp_path / f"{engine}.json").read_text())[
            "environments"]["docker"]
    assert runs["podman"]["key"] != runs["dockerd"]["key"], runs
    assert runs["podman"]["root"] == (
        f"the engine's root (Podman Engine {engine_version(podman)} at {podman} (from the "
        "DOCKER_HOST environment variable))"), runs["podman"]
    assert runs["dockerd"]["root"].startswith("the engine's root (Docker Engine "), runs
    records = {engine: json.loads((Path(cache) / IMAGE_KIND / run["key"] / "manifest.json")
                                  .read_text()) for engine, run in runs.items()}
    # what `cache gc` reaches to remove the image: podman's socket, not dockerd
    assert records["podman"]["engine"] == podman, records["podman"]
    assert records["dockerd"]["engine"] == "unix:///var/run/docker.sock", records["dockerd"]
