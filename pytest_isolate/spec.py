"""EnvSpec: what an environment is, and its content hash (the cache key)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pytest_isolate.limits import DEFAULT_DISK, Limits

if TYPE_CHECKING:
    from pytest_isolate.images.deps import DepsLayer

#: Bump when the way a rootfs is built changes, so old cache entries are not reused.
ROOTFS_FORMAT = 1

HOST_ARCHES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "armhf",
    "i686": "i386",
    "i386": "i386",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
#: Debian architecture -> what platform.machine() says inside.
ARCH_MACHINES = {
    "amd64": "x86_64",
    "arm64": "aarch64",
    "armhf": "armv7l",
    "i386": "i686",
    "ppc64el": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
RELEASES = (
    "buster", "bullseye", "bookworm", "trixie", "forky", "sid",
    "oldstable", "stable", "testing", "unstable",
)
VARIANTS = ("minbase", "buildd", "required", "important", "standard")
RESETS = ("test", "module", "session")
DEFAULT_RELEASE = "trixie"  # Debian stable as of this release of pytest-isolate
#: The python3 each Debian release ships (what `envs` shows for a Debian root filesystem).
DEBIAN_PYTHONS = {"buster": "3.7", "bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13",
                  "oldstable": "3.11", "stable": "3.13"}
#: python = "X.Y" without an image selects the release that ships it (the ones tested here).
PYTHON_RELEASES = {"3.11": "bookworm", "3.13": "trixie"}


def host_arch() -> str:
    machine = platform.machine()
    return HOST_ARCHES.get(machine, machine)


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """A resolved environment: built-in defaults, pyproject.toml and overrides merged.

    ``sources`` maps each field to where its value came from, for error messages;
    it takes no part in equality or the cache key.
    """

    name: str
    backend: str
    arch: str = dataclasses.field(default_factory=host_arch)
    release: str = DEFAULT_RELEASE
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    network: bool = False
    mirror: str | None = None
    image: str | None = None
    #: an image built by the engine from this Dockerfile (relative to the rootdir), with
    #: this context directory (default: the Dockerfile's) and build arguments
    dockerfile: str | None = None
    context: str | None = None
    build_args: tuple[tuple[str, str], ...] = ()
    #: the Python version wanted inside ("3.13"): selects the Debian release that ships it,
    #: or is checked against the image's python3
    python: str | None = None
    reset: str = "test"
    timeout: float | None = None
    pass_env: tuple[str, ...] = ()
    rootdir_writable: bool = False
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    disk: int | None = None
    options: tuple[tuple[str, Any], ...] = ()
    #: how the project under test is installed inside: editable | wheel | skip; None: editable
    #: when the rootdir's pyproject.toml has a [project] table, else skip
    package: str | None = None
    extras: tuple[str, ...] = ()
    dependency_groups: tuple[str, ...] = ()
    deps: tuple[str, ...] = ()
    #: auto | uv | pip: what installs them (auto: uv when usable, else pip)
    installer: str = "auto"
    #: opt out of the worker hardening (issue 11: capabilities, no_new_privs, seccomp,
    #: read-only /proc/sys and masked /proc paths); the summary warns about it
    privileged: bool = False
    #: the dependency layer built for this spec (see images/deps.py), set by the manager
    #: before start(); not part of what the spec is
    layer: DepsLayer | None = dataclasses.field(default=None, compare=False, hash=False,
                                                repr=False)
    sources: Mapping[str, str] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @property
    def machine(self) -> str:
        """What ``platform.machine()`` answers inside."""
        return ARCH_MACHINES.get(self.arch, self.arch)

    @property
    def foreign(self) -> bool:
        return self.arch != host_arch()

    def source(self, key: str) -> str:
        return self.sources.get(key, "built-in default")

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def limits(self) -> Limits:
        """The resource limits (see pytest_isolate.limits); disk is always bounded."""
        return Limits(memory=self.memory, cpus=self.cpus, pids=self.pids,
                      disk=self.disk if self.disk is not None else DEFAULT_DISK)

    def all_packages(self) -> tuple[str, ...]:
        """The packages installed: python3 always, then the spec's, sorted and unique."""
        return tuple(sorted({"python3", *self.packages}))

    def rootfs_fields(self) -> dict[str, Any]:
        """Everything that determines the root filesystem's content."""
        return {
            "format": ROOTFS_FORMAT,
            "release": self.release,
            "arch": self.arch,
            "variant": self.variant,
            "packages": list(self.all_packages()),
            "setup": list(self.setup),
            "setup_network": self.network if self.setup else False,
            "mirror": self.mirror,
        }

    def rootfs_key(self) -> str:
        return content_hash(self.rootfs_fields())

    def python_version(self) -> str | None:
        """The Python version inside as far as the spec says: the python key, else for a
        Debian root filesystem its release's python3; None when only running it tells (an
        image, a moving release such as sid)."""
        if self.python is not None:
            return self.python
        return None if self.from_image else DEBIAN_PYTHONS.get(self.release)

    @property
    def from_image(self) -> bool:
        """The root filesystem is an image's (a reference or a Dockerfile's), not the Debian
        one pytest-isolate builds."""
        return self.image is not None or self.dockerfile is not None

    def summary(self) -> str:
        """One line for the user: ``name (backend, release/arch)``."""
        return f"{self.name} ({self.backend}, {self.release}/{self.arch})"


def content_hash(fields: Mapping[str, Any]) -> str:
    try:
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise TypeError(f"environment spec cannot be hashed: {exc}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:24]
