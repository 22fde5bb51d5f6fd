"""The Docker engine as the docker and podman backends reach it: which engine, a client of
it, the labels that name a container's owner, and the one place where the Docker SDK's
exceptions become ours.

Which engine: the one the docker CLI would use (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY`` /
``DOCKER_CERT_PATH``, else the current docker context, else the default socket), or a pool
host's endpoint; an ``ssh://`` one is docker_ssh.py's.  The SDK is imported on first use
only, so importing the plugin stays cheap and works without it.

Errors.  ``Engine.calls`` wraps the engine calls of a step: the engine saying no (the SDK's
``APIError``, or another SDK error) becomes a ProvisionError in the engine's own name
("podman: ..." under podman) with the engine's words, and the engine not answering (a
connection error of requests, which the SDK lets through) becomes BackendUnavailable with
how to start it.  ``Engine.answering`` is for the first contact, where any failure means
the engine cannot be used.  ``Engine.image`` is the one lookup where "not found" is an
answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

from pytest_isolate.backends import docker_ssh
from pytest_isolate.errors import BackendUnavailable, IsolateError, ProvisionError
from pytest_isolate.ownership import Owner
from pytest_isolate.spec import EnvSpec

LABEL = "pytest-isolate"
INSTALL_SDK = "install the Docker SDK for Python: pip install 'pytest-isolate-env[docker]'"
START_ENGINE = ("start it with `dockerd --bridge=none --iptables=false --ip-masq=false &` "
                "(as root), or point DOCKER_HOST at a running engine")

#: What a step makes of the engine's refusal: (its words, the HTTP status) -> our error.
Explain = Callable[[str, int | None], IsolateError]


def sdk() -> Any:
    """The docker module, imported on first use (plugin import stays cheap)."""
    try:
        import docker
    except ImportError:
        raise BackendUnavailable("docker", "the Docker SDK for Python is not installed",
                                 INSTALL_SDK) from None
    return docker


def engine_target(endpoint: str | None = None) -> tuple[str, str, Any]:
    """The engine's address, where it came from (for messages), and the TLS settings of a
    context: endpoint (a pool host), else what the docker CLI would use: DOCKER_HOST, else
    the current context, else the default socket."""
    if endpoint:
        return endpoint, "a [tool.pytest-isolate.hosts] entry of pyproject.toml", None
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"], "the DOCKER_HOST environment variable", None
    try:
        from docker.context import ContextAPI

        ctx = ContextAPI.get_current_context()
    except Exception:
        ctx = None
    if ctx is not None and ctx.name != "default" and getattr(ctx, "Host", None):
        return str(ctx.Host), f"the current docker context {ctx.name!r}", ctx.TLSConfig or False
    return "unix:///var/run/docker.sock", "the default socket", None


def make_client(endpoint: str | None = None) -> Any:
    """A client for endpoint (a pool host), else for the engine the docker CLI would use."""
    docker = sdk()
    url, origin, tls = engine_target(endpoint)
    if docker_ssh.is_ssh(url):
        return docker_ssh.connect(docker, url, origin)
    if endpoint:
        return docker.DockerClient(base_url=endpoint)
    if tls is not None:
        return docker.DockerClient(base_url=url, tls=tls)
    return docker.from_env()


def engine_error(exc: BaseException, endpoint: str | None = None) -> BackendUnavailable:
    """The docker engine does not answer: where it was looked for and how to start it."""
    url, origin, _ = engine_target(endpoint)
    if docker_ssh.is_ssh(url):
        return docker_ssh.diagnose(url, origin, exc)
    return BackendUnavailable("docker", f"the docker engine does not answer at {url} (from "
                              f"{origin}) ({exc})", START_ENGINE)


def first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class Engine:
    """A client of one engine, made on first use, and the one place where SDK errors
    (and the requests errors the SDK lets through) become ours.

    name: the engine as the user knows it ("docker", "podman"), which every message of
    its backend says; connect: makes the client; unavailable: the error for an engine that
    does not answer."""

    def __init__(self, name: str, connect: Callable[[], Any],
                 unavailable: Callable[[BaseException], BackendUnavailable]) -> None:
        self.name = name
        self.connect = connect
        self.unavailable = unavailable
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            with self.answering():
                self._client = self.connect()
        return self._client

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Whatever goes wrong inside means the engine cannot be used: BackendUnavailable
        (for the first contact, where any failure is the engine's)."""
        try:
            yield
        except IsolateError:
            raise
        except Exception as exc:
            raise self.unavailable(exc) from None

    @contextlib.contextmanager
    def calls(self, doing: str, explain: Explain | None = None) -> Iterator[None]:
        """Engine calls of one step: a refusal (or another SDK error) is ProvisionError
        "<name>: <doing> failed: <the engine's words>" (or explain(words, status)); no answer
        is BackendUnavailable. Our own errors and bugs (not the SDK's) pass through."""
        docker = sdk()
        import requests  # the SDK's HTTP client: a dead engine's socket surfaces as its errors

        try:
            yield
        except docker.errors.APIError as exc:
            words = str(exc.explanation or exc)
            if explain is not None:
                raise explain(words, exc.status_code) from None
            raise ProvisionError(f"{self.name}: {doing} failed: {words}") from None
        except requests.exceptions.ConnectionError as exc:
            raise self.unavailable(exc) from None
        except docker.errors.DockerException as exc:
            raise ProvisionError(f"{self.name}: {doing} failed: {first_line(exc)}") from None

    def image(self, ref: str) -> Any | None:
        """The engine's image ref, None when it has none."""
        docker = sdk()
        with self.calls(f"looking up image {ref}"):
            try:
                return self.client.images.get(ref)
            except docker.errors.ImageNotFound:
                return None


#: What podman's Docker-compatible API names itself among the components of its version.
PODMAN_ENGINE = "Podman Engine"


@dataclasses.dataclass(frozen=True)
class EngineFacts:
    """What an engine says it is: learnt once per backend object (one version and one info
    call, plus podman's own info for its rootless flag), so that images are keyed by the
    engine actually reached and messages say which one that is."""

    #: "Podman Engine" or "Docker Engine" (dockerd's version names no product of its own)
    product: str
    version: str
    #: what keys this engine's images in the cache: dockerd's engine ID; for podman, whose
    #: ID is a new random one each call, the host name and its image storage directory
    identity: str
    rootless: bool
    cgroup_version: str

    @property
    def podman(self) -> bool:
        return self.product == PODMAN_ENGINE

    def describe(self) -> str:
        """What messages and the report call it ("Podman Engine 4.3.1, rootless")."""
        return f"{self.product} {self.version}" + (", rootless" if self.rootless else "")


def engine_facts(client: Any, info: dict[str, Any]) -> EngineFacts:
    """The facts of the engine client talks to (info: its client.info(), already fetched)."""
    version = client.version()
    components = [str(c.get("Name")) for c in version.get("Components") or []]
    options = " ".join(str(o) for o in info.get("SecurityOptions") or [])
    storage = f"{info.get('Name', '')}:{info.get('DockerRootDir', '')}"
    if PODMAN_ENGINE in components:
        rootless = "rootless" in options
        with contextlib.suppress(Exception):  # podman's own API says it where the compat one does not
            answer = client.api._result(client.api._get(client.api._url("/libpod/info")), True)
            rootless = bool(answer["host"]["security"]["rootless"])
        return EngineFacts(PODMAN_ENGINE, str(version.get("Version", "")), f"podman:{storage}",
                           rootless, str(info.get("CgroupVersion") or ""))
    product = str((version.get("Platform") or {}).get("Name") or "") or "Docker Engine"
    return EngineFacts(product, str(version.get("Version", "")),
                       f"docker:{info.get('ID') or storage}", "name=rootless" in options,
                       str(info.get("CgroupVersion") or ""))


def network_mode_of(client: Any, spec: EnvSpec) -> str:
    """The engine's network for spec's containers (and builds): none unless it asks."""
    if not spec.network:
        return "none"
    wanted = spec.option("docker_network")
    if wanted:
        return str(wanted)
    try:
        names = {n.name for n in client.networks.list()}
    except Exception:
        names = set()
    # an engine started with --bridge=none has no default bridge: share the host's network
    return "bridge" if "bridge" in names else "host"


def repository(env: str) -> str:
    """A valid image repository name for env (lower case, restricted characters)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", env.lower()).strip("._-") or "env"
    return f"pytest-isolate/{name}"


def remove_images(key: str, endpoint: str | None) -> str | None:
    """Remove the images labelled with key from the engine at endpoint (None: the default
    engine); None when done, else why not (an image in use by a container is kept)."""
    try:
        client = make_client(endpoint)
        images = client.images.list(filters={"label": f"{LABEL}.key={key}"})
        for image in images:
            for tag in image.tags or [image.id]:
                client.images.remove(tag, noprune=False)
    except Exception as exc:
        return f"its image could not be removed from the engine ({first_line(exc)})"
    return None


def owner_labels() -> dict[str, str]:
    """This process as the owner of a container: its pid and start time, and the host they
    are valid on."""
    owner = Owner.me()
    start = "" if owner.start is None else str(owner.start)
    return {f"{LABEL}.pid": str(owner.pid), f"{LABEL}.pidstart": start,
            f"{LABEL}.host": socket.gethostname()}


def owner_gone(labels: dict[str, str]) -> bool:
    """Is the host process that made a container (same host) no longer running?"""
    if labels.get(f"{LABEL}.host") != socket.gethostname():
        return False  # another host's process: its pid means nothing here
    owner = Owner.from_fields(labels.get(f"{LABEL}.pid"), labels.get(f"{LABEL}.pidstart"))
    return owner is not None and not owner.alive()


def remove_container(container: Any) -> None:
    """Remove a container and its anonymous volumes, whatever state it is in; never raises
    (what cannot be removed now is reaped by a later run: its labels name its owner)."""
    with contextlib.suppress(Exception):
        container.remove(force=True, v=True)
