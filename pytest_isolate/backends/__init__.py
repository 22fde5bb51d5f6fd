"""Built-in backends, registered through the same hook a third-party backend uses."""

from __future__ import annotations

#: name -> "module:Class"; imported only when an environment of that kind is used.
BUILTIN_BACKENDS: dict[str, str] = {
    "chroot": "pytest_isolate.backends.chroot:ChrootBackend",
    "docker": "pytest_isolate.backends.docker:DockerBackend",
    "lxc": "pytest_isolate.backends.lxc:LxcBackend",
    "schroot": "pytest_isolate.backends.schroot:SchrootBackend",
    "podman": "pytest_isolate.backends.podman:PodmanBackend",
    "qemu": "pytest_isolate.backends.qemu:QemuBackend",
}

