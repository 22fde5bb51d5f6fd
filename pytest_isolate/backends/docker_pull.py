"""Images named by reference (``image = "REF"``) on a docker engine: pulling a missing one
with progress, the digest that pins it, and one clear message per way a pull fails.

What is pulled.  Nothing when the engine has the reference already (as pytest_container
and testcontainers do): a run never contacts a registry for an image it has, so a tag
that moved upstream is seen only after ``docker pull REF`` (or ``pull = "always"``). The
pinned digest is then the new one, and with it the environment's cache key.

Credentials are the Docker SDK's: the user's ``~/.docker/config.json`` or
``$DOCKER_CONFIG/config.json`` (``docker login`` writes it; credential helpers work), read
when the client is made. A plain-http registry works where the engine allows it
(127.0.0.0/8 always; others through the engine's ``insecure-registries``).

Progress.  The engine streams an event per chunk; the user sees a heartbeat (rewritten
in place on a terminal, a line every few seconds in CI) with layers and bytes done, and
one line when the pull ends. The provision log gets each layer's status changes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_isolate.backends.docker_engine import Engine
from pytest_isolate.errors import ProvisionError
from pytest_isolate.progress import Heartbeat
from pytest_isolate.sizes import format_size
from pytest_isolate.spec import EnvSpec

#: Seconds between two heartbeats of a pull.
HEARTBEAT_SECONDS = 2.0
#: The engine's words (lower case) for each way a pull fails, checked in this order.
DENIED = ("unauthorized", "authentication required", "no basic auth credentials", "denied",
          "forbidden", "401", "403")
MISSING = ("manifest unknown", "not found", "name unknown", "does not exist")
UNREACHABLE = ("connection refused", "no such host", "i/o timeout", "dial tcp",
               "tls handshake timeout", "network is unreachable", "no route to host",
               "server gave http response to https client", "connection reset",
               "context deadline exceeded")


def split_reference(ref: str) -> tuple[str, str, str]:
    """(repository, tag or digest, registry host) of an image reference, as the SDK and
    the engine read it (no tag: latest; no host: the SDK's default registry)."""
    from docker.auth import resolve_repository_name
    from docker.utils import parse_repository_tag

    repo, tag = parse_repository_tag(ref)
    registry, _ = resolve_repository_name(repo)
    return repo, tag or "latest", registry


def credentials_file() -> str:
    """Where the SDK reads registry credentials from, for messages."""
    from docker.utils.config import find_config_file

    found = find_config_file()
    return (f"{found}" if found else
            "none found: ~/.docker/config.json, or $DOCKER_CONFIG/config.json")


def pinned_digest(image: Any, ref: str) -> str:
    """What pins image: its registry digest for ref's repository (RepoDigests), any
    registry digest, else its id (an image that never came from a registry)."""
    repo = split_reference(ref)[0]
    digests = [str(d) for d in image.attrs.get("RepoDigests") or []]
    for digest in digests:
        if digest.rpartition("@")[0] == repo:
            return digest.rpartition("@")[2]
    if digests:
        return digests[0].rpartition("@")[2]
    return str(image.id)


def says(text: str, words: tuple[str, ...]) -> bool:
    """Does text hold one of words as whole words? (A registry on port 40335 does not
    make "dial tcp 127.0.0.1:40335: connection refused" a 403.)"""
    return any(re.search(rf"\b{re.escape(word)}\b", text) for word in words)


def pull_error(spec: EnvSpec, text: str, status: int | None,
               engine: str = "docker") -> ProvisionError:
    """One message naming the reference, where it came from, what went wrong and the fix.

    Its first line says what and where (a run repeats that line for the environment's
    later tests); the engine's words and the fix follow on the next line, shown once.
    engine: the engine's name ("docker", "podman"), which the message and the fix say."""
    ref = str(spec.image)
    registry = split_reference(ref)[2]
    lower = text.lower()
    login = (f"log in with `docker login {registry}` (credentials come from "
             f"{credentials_file()})")
    if "pull access denied" in lower:  # Docker Hub says this for both cases
        what, fix = (f"registry {registry} refused it",
                     f"it does not exist there, or it needs credentials: check the name, or {login}")
    elif status in (401, 403) or says(lower, DENIED):
        what, fix = (f"registry {registry} refused the credentials",
                     f"{login} as a user that may pull it")
    elif status == 404 or says(lower, MISSING):
        what, fix = (f"registry {registry} has no such image",
                     f"check the name and the tag or digest (`{engine} pull {ref}` says the "
                     "same), or push the image there")
    elif says(lower, UNREACHABLE):
        what = f"registry {registry} is unreachable"
        fix = ("add it to the engine's insecure-registries (daemon.json) or serve it over "
               "https" if "http response to https" in lower else
               f"check the address and the network (or proxy) of the {engine} engine, or load "
               f"the image into the engine ({engine} load): an image it has is not pulled")
    else:
        what, fix = "the engine refused the pull", f"`{engine} pull {ref}` shows the same error"
    return ProvisionError(f"{engine}: pulling image {ref!r} (from {spec.source('image')}) "
                          f"failed: {what}\nthe engine said: {text}\nfix: {fix}")


class PullProgress:
    """Layers and bytes of a pull, from the engine's event stream."""

    def __init__(self, ref: str, progress: Callable[[str], None], log: Any,
                 engine: str = "docker") -> None:
        self.ref = ref
        self.engine = engine
        self.progress = progress
        self.log = log
        self.started = time.monotonic()
        self.last_beat = self.started
        #: layer id -> (status, bytes downloaded, bytes in all)
        self.layers: dict[str, tuple[str, int, int]] = {}

    def event(self, event: dict[str, Any]) -> None:
        status = str(event.get("status") or "")
        layer = event.get("id")
        if not layer or "progressDetail" not in event:  # "Digest: ...", "Status: ..."
            if status:
                self.log.write(f"{status}\n")
            return
        old_status, current, total = self.layers.get(str(layer), ("", 0, 0))
        detail = event.get("progressDetail") or {}
        if status == "Downloading":
            current = int(detail.get("current") or current)
            total = int(detail.get("total") or total)
        elif status in ("Download complete", "Pull complete", "Already exists"):
            current = total
        if status != old_status:
            self.log.write(f"{layer}: {status}\n")
        self.layers[str(layer)] = (status, current, total)
        now = time.monotonic()
        if now - self.last_beat >= HEARTBEAT_SECONDS:
            self.last_beat = now
            self.progress(Heartbeat(f"{self.engine}: pulling {self.ref}: {now - self.started:.0f}s: "
                                    f"{self.summary()}"))

    def summary(self) -> str:
        done = sum(1 for s, _, _ in self.layers.values()
                   if s in ("Pull complete", "Already exists"))
        got = sum(c for _, c, _ in self.layers.values())
        total = sum(t for _, _, t in self.layers.values())
        if not self.layers:
            return "every layer was present"
        size = f", {format_size(got)} of {format_size(total)}" if total else ""
        return f"{done} of {len(self.layers)} layers{size}"


def pull(engine: Engine, spec: EnvSpec, platform: str | None, progress: Callable[[str], None],
         log_path: Path) -> float:
    """Pull spec.image onto the engine; the seconds it took. Raises ProvisionError."""
    ref = str(spec.image)
    repo, tag, _ = split_reference(ref)
    progress(f"{engine.name}: pulling {ref} (from {spec.source('image')})")
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def refused(text: str, status: int | None) -> ProvisionError:
        return pull_error(spec, text, status, engine.name)

    with open(log_path, "a") as log:
        log.write(f"{engine.name} pull {ref}\n")
        tracker = PullProgress(ref, progress, log, engine.name)
        with engine.calls(f"pulling {ref}", refused):
            for event in engine.client.api.pull(repo, tag=tag, stream=True, decode=True,
                                                platform=platform):
                if isinstance(event, dict) and event.get("error"):
                    raise refused(str(event["error"]), None)
                if isinstance(event, dict):
                    tracker.event(event)
        seconds = time.monotonic() - tracker.started
        log.write(f"pulled {ref} in {seconds:.1f}s\n")
    progress(f"{engine.name}: pulled {ref} ({tracker.summary()}) in {seconds:.1f}s")
    return seconds
