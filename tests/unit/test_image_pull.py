"""What a pull of ``image = REF`` says: the failure messages (the engine's words as a real
engine and registry give them, tests/integration/test_registry.py meets them live), the
progress of a pull, and the digest that pins an image. No engine needed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.backends.docker_pull import PullProgress, pinned_digest, pull_error
from pytest_isolate.cache import Cache
from pytest_isolate.progress import Heartbeat
from pytest_isolate.spec import EnvSpec

pytest.importorskip("docker")

WHERE = "/p/pyproject.toml: [tool.pytest-isolate.envs.py] key 'image'"
REF = "127.0.0.1:5000/team/app:1"


def spec(ref: str = REF) -> EnvSpec:
    return EnvSpec(name="py", backend="docker", image=ref, sources={"image": WHERE})


# the engine's own words (docker 20.10 against docker-registry 2.8 and Docker Hub)
CASES = [
    ("manifest for 127.0.0.1:5000/team/app:1 not found: manifest unknown: manifest unknown",
     404, "registry 127.0.0.1:5000 has no such image", "check the name and the tag or digest"),
    ("unauthorized: authentication required", 500,
     "registry 127.0.0.1:5000 refused the credentials", "`docker login 127.0.0.1:5000`"),
    ('Head "http://127.0.0.1:5000/v2/team/app/manifests/1": no basic auth credentials', 500,
     "registry 127.0.0.1:5000 refused the credentials", "`docker login 127.0.0.1:5000`"),
    ('Get "http://127.0.0.1:5000/v2/": dial tcp 127.0.0.1:5000: connect: connection refused',
     500, "registry 127.0.0.1:5000 is unreachable", "docker load"),
    ('Get "https://10.0.0.1:5000/v2/": http: server gave HTTP response to HTTPS client', 500,
     "registry 127.0.0.1:5000 is unreachable", "insecure-registries"),
    ("pull access denied for team/app, repository does not exist or may require "
     "'docker login': denied: requested access to the resource is denied", 404,
     "registry 127.0.0.1:5000 refused it", "it does not exist there, or it needs credentials"),
    ("something new", 500, "the engine refused the pull", f"`docker pull {REF}`"),
    # podman's words for a registry on a port whose digits hold "403": not a refusal
    ('initializing source docker://127.0.0.1:40335/team/app:1: pinging container registry '
     '127.0.0.1:40335: Get "https://127.0.0.1:40335/v2/": dial tcp 127.0.0.1:40335: connect: '
     'connection refused', 500, "registry 127.0.0.1:5000 is unreachable", "docker load"),
]


@pytest.mark.parametrize(("said", "status", "what", "fix"), CASES)
def test_each_pull_failure_is_one_message_with_reference_source_and_fix(
        said: str, status: int, what: str, fix: str) -> None:
    text = str(pull_error(spec(), said, status))
    first, engine, fix_line = text.splitlines()
    # the first line (what a later test of the run repeats) names what, where and why
    assert first == f"docker: pulling image {REF!r} (from {WHERE}) failed: {what}"
    assert engine == f"the engine said: {said}"
    assert fix_line.startswith("fix: ") and fix in fix_line


def test_credentials_messages_name_the_config_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    text = str(pull_error(spec(), "unauthorized: authentication required", 500))
    assert f"credentials come from {tmp_path / 'config.json'}" in text
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    text = str(pull_error(spec(), "unauthorized: authentication required", 500))
    assert "credentials come from none found" in text


def test_reference_without_a_host_names_the_default_registry() -> None:
    from pytest_isolate.backends.docker_pull import split_reference

    default = split_reference("python:3.12-slim")[2]  # what the SDK and the engine resolve
    assert default and "." in default
    text = str(pull_error(spec("python:3.12-slim"), "unauthorized: x", 401))
    assert f"registry {default} refused the credentials" in text


def test_pull_progress_is_a_heartbeat_per_interval_and_a_line_per_layer_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    beats: list[str] = []
    log = io.StringIO()
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    tracker = PullProgress(REF, beats.append, log)
    tracker.event({"status": "Pulling from team/app", "id": "1"})
    for layer in ("aaa", "bbb"):
        tracker.event({"status": "Pulling fs layer", "progressDetail": {}, "id": layer})
    for current in range(0, 1000, 10):  # a hundred chunks of one layer
        clock[0] += 0.05
        tracker.event({"status": "Downloading", "id": "aaa",
                       "progressDetail": {"current": current, "total": 1 << 20}})
    tracker.event({"status": "Pull complete", "progressDetail": {}, "id": "aaa"})
    tracker.event({"status": "Already exists", "progressDetail": {}, "id": "bbb"})
    tracker.event({"status": "Digest: sha256:abc"})
    assert 1 <= len(beats) <= 3  # 5 s of chunks: a beat each 2 s, not one per chunk
    assert all(isinstance(b, Heartbeat) for b in beats)
    assert beats[0].startswith(f"docker: pulling {REF}: 2s: 0 of 2 layers")
    lines = log.getvalue().splitlines()
    assert lines.count("aaa: Downloading") == 1  # the log: status changes, not chunks
    assert "aaa: Pull complete" in lines and "bbb: Already exists" in lines
    assert "Digest: sha256:abc" in lines
    assert tracker.summary() == "2 of 2 layers, 1M of 1M"
    assert PullProgress(REF, beats.append, log).summary() == "every layer was present"


class FakeImage:
    def __init__(self, digests: list[str]) -> None:
        self.id = "sha256:" + "1" * 64
        self.attrs: dict[str, Any] = {"RepoDigests": digests}


def test_pinned_digest_prefers_the_references_repository() -> None:
    ours, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    image = FakeImage([f"mirror.example/app@{other}", f"127.0.0.1:5000/team/app@{ours}"])
    assert pinned_digest(image, REF) == ours
    assert pinned_digest(image, "elsewhere/x:1") == other  # another name of the same image
    assert pinned_digest(FakeImage([]), REF) == "sha256:" + "1" * 64  # never pushed: its id


def test_envs_shows_the_digest_an_image_is_pinned_at(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.pytest-isolate.envs.app]\nbackend = "docker"\nimage = "{REF}"\n'
        '[tool.pytest-isolate.envs.later]\nbackend = "docker"\nimage = "team/later:2"\n')
    cache = Cache(tmp_path / "cache")
    digest = "sha256:" + "c" * 64

    def build(data: Path, log: Path) -> dict[str, Any]:
        data.mkdir()
        return {"reference": REF, "digest": digest, "python": "3.11.2"}

    cache.get_or_build("docker-pin", "k" * 24, build, {"env": "app"}, tmp_path / "log")
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_ISOLATE_CACHE_DIR"}
    result = subprocess.run([sys.executable, "-m", "pytest_isolate", "envs", "--cache-dir",
                             str(tmp_path / "cache")], cwd=tmp_path, env=environ,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"image {REF}: pinned at {digest} (python 3.11.2, last used" in result.stdout
    assert "image team/later:2: not pulled or checked yet" in result.stdout
    data = json.loads(subprocess.run(
        [sys.executable, "-m", "pytest_isolate", "envs", "--json", "app", "--cache-dir",
         str(tmp_path / "cache")], cwd=tmp_path, env=environ, capture_output=True, text=True,
        timeout=60).stdout)
    assert data["envs"]["app"]["image_pin"]["digest"] == digest
