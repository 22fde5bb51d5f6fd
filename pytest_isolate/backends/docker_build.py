"""``dockerfile = "PATH"``: an environment's image built by the engine from a Dockerfile.

The image is tagged by the content of what the build reads -- the Dockerfile, every file of
the context that ``.dockerignore`` lets through (paths, modes and bytes) and the build
arguments -- so an unchanged context finds its image on the engine and is not rebuilt, and
any change is a new tag.  From there on the environment is an image environment
(``image`` = that tag): the docker backend runs it, chroot, lxc and schroot export it, and
its digest, python3 check and report lines are an image's.

The build has no network unless the environment says ``network = true`` (as ``setup``
commands), so ``FROM`` names an image the engine has or a registry it reaches then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

from pytest_isolate.backends.docker_engine import network_mode_of
from pytest_isolate.errors import ProvisionError
from pytest_isolate.progress import Heartbeat
from pytest_isolate.spec import EnvSpec

#: Bump when what the tag covers changes.
FORMAT = 1
#: The repository of built images; the tag is the content hash.
REPOSITORY = "pytest-isolate-build"


def context_paths(spec: EnvSpec, rootdir: Path) -> tuple[Path, Path]:
    """The Dockerfile and the context directory, relative paths taken from the rootdir
    (where pyproject.toml is); ProvisionError naming the key when one is missing."""
    dockerfile = (rootdir / str(spec.dockerfile)).resolve()
    context = (rootdir / spec.context).resolve() if spec.context else dockerfile.parent
    if not dockerfile.is_file():
        raise ProvisionError(f"{spec.backend}: dockerfile {spec.dockerfile!r} (from "
                             f"{spec.source('dockerfile')}) is not a file: {dockerfile}; paths "
                             f"are relative to {rootdir}")
    if not context.is_dir():
        raise ProvisionError(f"{spec.backend}: context {spec.context!r} (from "
                             f"{spec.source('context')}) is not a directory: {context}")
    return dockerfile, context


def context_hash(dockerfile: Path, context: Path, build_args: dict[str, str]) -> str:
    """What the build reads, hashed: the Dockerfile, the build arguments and each file
    .dockerignore lets through (the Docker SDK's own reading of it)."""
    from docker.utils.build import exclude_paths

    ignore = context / ".dockerignore"
    patterns = ([line.strip() for line in ignore.read_text().splitlines()
                 if line.strip() and not line.startswith("#")] if ignore.is_file() else [])
    inside = os.path.relpath(dockerfile, context)
    digest = hashlib.sha256(f"{FORMAT}\0{sorted(build_args.items())}\0".encode())
    digest.update(dockerfile.read_bytes())
    for rel in sorted(exclude_paths(str(context), patterns, dockerfile=inside)):
        path = context / rel
        info = path.lstat()
        digest.update(f"\0{rel}\0{stat.S_IMODE(info.st_mode):o}\0".encode())
        if stat.S_ISLNK(info.st_mode):
            digest.update(os.readlink(path).encode())
        elif stat.S_ISREG(info.st_mode):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def with_built_image(client: Any, spec: EnvSpec, rootdir: Path, progress: Any,
                     log: Path) -> EnvSpec:
    """spec as an image environment of its Dockerfile's image, built when the engine has
    no image of this content yet."""
    if spec.dockerfile is None:
        return spec
    dockerfile, context = context_paths(spec, rootdir)
    args = dict(spec.build_args)
    # by content only: environments with the same Dockerfile and context share the image
    tag = f"{REPOSITORY}:{context_hash(dockerfile, context, args)}"
    try:
        client.images.get(tag)
    except Exception:  # ImageNotFound (or anything else: the build will say)
        build(client, spec, dockerfile, context, args, tag, progress, log)
    sources = {**spec.sources, "image": f"built from {spec.source('dockerfile')}"}
    return dataclasses.replace(spec, image=tag, sources=sources)


def build(client: Any, spec: EnvSpec, dockerfile: Path, context: Path, args: dict[str, str],
          tag: str, progress: Any, log: Path) -> None:
    """docker build, its output in the environment's provision log, a heartbeat while it
    runs; ProvisionError with the build's last lines when it fails."""
    network_mode = network_mode_of(client, spec)
    started = time.monotonic()
    where = f"dockerfile {spec.dockerfile!r} (from {spec.source('dockerfile')})"
    progress(f"{spec.backend}: building {spec.name}'s image from {dockerfile}")
    lines: list[str] = []
    shown = started
    with open(log, "a") as out:
        out.write(f"# docker build -f {dockerfile} {context} -t {tag} "
                  f"(network {network_mode})\n")
        try:
            stream = client.api.build(path=str(context), dockerfile=str(dockerfile),
                                      tag=tag, buildargs=args, rm=True, forcerm=True,
                                      network_mode=network_mode, decode=True,
                                      labels={"pytest-isolate.build": spec.name})
            for chunk in stream:
                text = str(chunk.get("stream") or chunk.get("status") or "")
                if "error" in chunk:
                    lines.append(str(chunk.get("error")))
                    out.write(f"ERROR: {chunk.get('error')}\n")
                    break
                if text.strip():
                    out.write(text if text.endswith("\n") else text + "\n")
                    lines.append(text.strip())
                if time.monotonic() - shown > 2:
                    shown = time.monotonic()
                    progress(Heartbeat(f"{spec.backend}: building {spec.name}: "
                                       f"{time.monotonic() - started:.0f}s: "
                                       f"{lines[-1][:80] if lines else ''}"))
        except Exception as exc:
            lines.append(str(getattr(exc, "explanation", None) or exc))
            out.write(f"ERROR: {lines[-1]}\n")
    try:
        client.images.get(tag)
    except Exception:
        tail = "\n".join(lines[-15:])
        raise ProvisionError(f"{spec.backend}: building the image of {where} failed:\n{tail}",
                             log_path=str(log)) from None
    progress(f"{spec.backend}: built {spec.name}'s image {tag} in "
             f"{time.monotonic() - started:.1f}s")
