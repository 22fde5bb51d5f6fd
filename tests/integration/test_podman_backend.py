"""The podman backend runs the docker backend's code against podman's Docker-compatible
API: what a user reads (progress and errors) names podman, the engine actually used.
Drives the real podman service; nothing leaves loopback (the registry that fails is a
port nothing listens on)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import pytest
from integration_support import free_port

from pytest_isolate.backends.base import RunContext
from pytest_isolate.backends.podman import PodmanBackend
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
