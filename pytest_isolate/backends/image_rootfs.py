"""The root filesystem of an image reference (``image = REF``) for the backends that run on
a directory (chroot): exported from the docker engine into the cache, keyed by digest.

The image is found or pulled as for the docker backend (backends/docker_pull.py: the
same progress, credentials and messages); a container of it is created (never started)
and the engine's export of it -- the image's layers flattened -- is unpacked into a cache
entry of kind ``image-rootfs``, keyed by the image's digest and id, so the same image runs
in a chroot and a container and a moved tag is a new entry. Unpacking keeps owners and
device nodes, so it needs root. The environment's `packages` are installed into the
export by the image's own dpkg (images/debs.py), in an entry of their own.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from pytest_isolate.cache import Entry
from pytest_isolate.errors import ProvisionError
from pytest_isolate.spec import EnvSpec, content_hash

KIND = "image-rootfs"
#: Bump when the way the export is unpacked changes.
FORMAT = 1
#: Where a python3 is looked for in an exported root filesystem.
PYTHON_DIRS = ("usr/local/bin", "usr/bin", "bin")


def provision_image_rootfs(spec: EnvSpec, cache: Any, log: Path, progress: Any,
                           rootdir: Path) -> Entry:
    """The cache entry whose data directory is the root filesystem of spec.image."""
    from pytest_isolate.backends.docker import check_python_version, image_of
    from pytest_isolate.backends.docker_build import with_built_image
    from pytest_isolate.backends.docker_engine import Engine, engine_error, make_client
    from pytest_isolate.backends.docker_pull import pinned_digest

    if spec.setup:
        raise ProvisionError(f"{spec.source('setup')}: setup commands on an image are for "
                             f"backend = \"docker\" only so far, not {spec.backend!r}; bake them "
                             "into the image (docker build), or use the docker backend")
    if os.geteuid() != 0:
        raise ProvisionError(f"{spec.backend}: unpacking image {spec.image!r} (from "
                             f"{spec.source('image')}) keeps its owners and devices, which "
                             "needs root; run as root, or use backend = \"docker\"")
    try:
        client = make_client()
        client.ping()
    except Exception as exc:
        raise ProvisionError(f"{spec.backend}: image {spec.image!r} (from "
                             f"{spec.source('image')}) comes from the docker engine, which "
                             f"does not answer: {engine_error(exc)}") from None
    spec = with_built_image(client, spec, rootdir, progress, log)
    image, _ = image_of(Engine("docker", lambda: client, engine_error), spec, progress, log)
    digest = pinned_digest(image, str(spec.image))
    # packages installed into the export make another entry (and none keeps the old key)
    packages = {"packages": sorted(spec.packages), "mirror": spec.mirror} if spec.packages else {}
    key = content_hash({"digest": digest, "id": image.id, "format": FORMAT, **packages})

    def build(data: Path, log_path: Path) -> dict[str, Any]:
        progress(f"{spec.backend}: exporting the root filesystem of {spec.image} ({digest})")
        export(client, image.id, data, log_path)
        if spec.packages:
            from pytest_isolate.images.debs import install_in_root

            install_in_root(spec, data, f"image {spec.image!r} (from {spec.source('image')})",
                            log_path, progress)
        if not any((data / d / "python3").exists() or (data / d / "python3").is_symlink()
                   for d in PYTHON_DIRS):
            raise ProvisionError(
                f"{spec.backend}: image {spec.image!r} (from {spec.source('image')}) has no "
                f"python3 in /{', /'.join(PYTHON_DIRS)} (the agent that runs tests inside "
                "needs one); name an image that has python3.9 or newer (e.g. python:3.12-slim), "
                "or, for a Debian-based image, add \"python3\" to its `packages`")
        return {"reference": spec.image, "digest": digest, "id": image.id,
                "python": python_version_in(data), **packages}

    entry: Entry = cache.get_or_build(KIND, key, build, {"env": spec.name, "image": spec.image},
                                      log)
    check_python_version(spec, str(entry.manifest.get("python") or ""))
    return entry


def python_version_in(root: Path) -> str | None:
    """X.Y of the python3 in an unpacked root filesystem, from the name it links to
    (python3 -> python3.13), else from the one python3.N beside it; None when neither
    tells (nothing is run: the root may be of another architecture)."""
    for d in PYTHON_DIRS:
        python3 = root / d / "python3"
        if not (python3.exists() or python3.is_symlink()):
            continue
        if python3.is_symlink():
            found = re.fullmatch(r"(?:.*/)?python(3\.[0-9]+)", os.readlink(python3))
            if found:
                return found.group(1)
        versions = {m.group(1) for p in (root / d).glob("python3.*")
                    if (m := re.fullmatch(r"python(3\.[0-9]+)", p.name))}
        if len(versions) == 1:
            return versions.pop()
    return None


def export(client: Any, image_id: str, dest: Path, log: Path) -> None:
    """Unpack the flattened file system of image_id into dest (GNU tar, as root)."""
    container = client.containers.create(image_id, entrypoint=["/"], command=[],
                                         network_disabled=True)
    dest.mkdir(parents=True)
    try:
        with open(log, "ab") as err:
            tar = subprocess.Popen(["tar", "-x", "--numeric-owner", "--xattrs",
                                    "--xattrs-include=*", "-C", str(dest), "-f", "-"],
                                   stdin=subprocess.PIPE, stderr=err)
            assert tar.stdin is not None
            try:
                for chunk in container.export(chunk_size=1 << 20):
                    tar.stdin.write(chunk)
            finally:
                tar.stdin.close()
                code = tar.wait()
        if code != 0:
            raise ProvisionError(f"unpacking the export of image {image_id} failed with exit "
                                 f"status {code}", log_path=str(log))
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)
