"""Which Docker engine a run talks to, where that came from, and what an unreachable ssh
endpoint says (no sshd needed: nothing listens on the port). The loopback-sshd proof is
tests/integration/test_docker_ssh.py."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from pytest_isolate.backends.docker_engine import engine_target, make_client
from pytest_isolate.errors import BackendUnavailable

pytest.importorskip("docker")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_pool_endpoint_wins_over_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://elsewhere:2375")
    url, origin, _ = engine_target("ssh://ci@box")
    assert (url, origin) == ("ssh://ci@box", "a [tool.pytest-isolate.hosts] entry of pyproject.toml")
    url, origin, _ = engine_target()
    assert (url, origin) == ("tcp://elsewhere:2375", "the DOCKER_HOST environment variable")


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker CLI makes the context")
def test_the_current_context_names_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for argv in (["create", "box", "--docker", "host=ssh://ci@box:2222"], ["use", "box"]):
        subprocess.run(["docker", "context", *argv], env=env, check=True, capture_output=True)
    url, origin, _ = engine_target()
    assert (url, origin) == ("ssh://ci@box:2222", "the current docker context 'box'")


def test_no_sshd_listening_is_one_message_with_the_fix(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/config of the user's
    port = closed_port()
    monkeypatch.setenv("DOCKER_HOST", f"ssh://root@127.0.0.1:{port}")
    with pytest.raises(BackendUnavailable) as info:
        make_client()
    assert str(info.value).startswith(
        f"backend 'docker' is unavailable: the docker engine at ssh://root@127.0.0.1:{port} "
        f"(from the DOCKER_HOST environment variable) cannot be reached: no ssh server "
        f"answers on 127.0.0.1 port {port}")
    assert info.value.fix == "start sshd there, or correct the host and port"
