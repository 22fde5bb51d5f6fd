"""The podman backend: the docker backend driven through podman's Docker-compatible API.

Why that API and not podman's own Python bindings: everything the docker backend does --
image import, containers with labels, limits and no network, the agent over an exec
stream, copying files in, reaping by label -- goes through the Docker SDK unchanged against
``podman system service`` (the whole conformance suite passes there), so one code path
serves both engines, and the podman bindings would be a second SDK to install and track.
What differs is small and lives here: where the socket is and how to start the service
(the image cache keys name the engine reached in both backends: DockerBackend.engine_key).

Limits: rootful podman gives every container fixed open-files and process limits
(``default_ulimits``, 1048576 unless containers.conf says otherwise), and starting a
container fails ("error setting rlimit type 7/6: operation not permitted") where the
service's own hard limits are lower, as in containers and CI runners; Docker passes its
daemon's limits on instead.  The service ``pytest-isolate setup`` starts reads a
containers.conf of ours with ``default_ulimits = []``, which gives Docker's behaviour.

The service: ``CONTAINER_HOST`` (podman's own variable) or a pool host's ``podman = URL``,
else the rootful socket ``/run/podman/podman.sock`` as root and
``$XDG_RUNTIME_DIR/podman/podman.sock`` otherwise (rootless podman).  ``pytest-isolate
setup --backends podman`` starts it where it does not answer (not as root: the user's own
service, without sudo).

Rootless (tests/integration/test_podman_rootless.py, no systemd, cgroup v1, podman 4.3):
the user's service keeps its images under ~/.local/share/containers (podman chose the vfs
driver there: each container is a copy of its image), root inside is the user's uid
outside (the report's ``root`` says so), the agent's namespaces and mounts work in the
user namespace, and containers have no network (no slirp4netns needed). Without systemd
the service must use cgroupfs (setup starts it so). What cannot work there: limits. On
cgroup v1 an unprivileged user cannot have a cgroup of its own, and podman then only warns
("Resource limits are not supported and ignored on cgroups V1 rootless systems") and runs
the container unlimited; DockerBackend.check_limits makes ``memory``, ``cpus`` and
``pids`` an error there instead. Podman keeps the runtime directory it first saw in its
database (~/.local/share/containers/storage/libpod), so a service started later with
another XDG_RUNTIME_DIR still uses the first one.
"""

from __future__ import annotations

import os
from typing import Any

from pytest_isolate.backends.docker import DockerBackend
from pytest_isolate.backends.docker_engine import sdk
from pytest_isolate.errors import BackendUnavailable
from pytest_isolate.setup_host import HOST_NEEDS, PODMAN_SOCKET, podman_target

#: Where podman's rootful service listens (the podman.socket unit's path).
ROOTFUL_SOCKET = PODMAN_SOCKET


def start_command(url: str) -> str:
    """How to start the service at url (no systemd needed)."""
    path = url.removeprefix("unix://")
    return (f"podman system service --time=0 unix://{path} & (as root: mkdir -p "
            f"{os.path.dirname(path)} first; with systemd: systemctl start podman.socket, or "
            "systemctl --user start podman.socket rootless); or pytest-isolate setup "
            "--backends podman")


class PodmanBackend(DockerBackend):
    name = "podman"
    host_needs = HOST_NEEDS["podman"]

    def new_client(self) -> Any:
        return sdk().DockerClient(base_url=podman_target(self.endpoint)[0])

    def engine_unavailable(self, exc: BaseException) -> BackendUnavailable:
        url, origin = podman_target(self.endpoint)
        return BackendUnavailable(self.name, f"the podman service does not answer at {url} "
                                  f"(from {origin}) ({exc})", start_command(url))

    def engine_where(self) -> tuple[str, str]:
        return podman_target(self.endpoint)

    def engine_url(self) -> str | None:
        return podman_target(self.endpoint)[0]

    def local_engine(self) -> bool:
        return podman_target(self.endpoint)[0].startswith("unix://")
