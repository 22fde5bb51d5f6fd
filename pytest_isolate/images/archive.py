"""Tar archives a container engine reads: a root filesystem as an image (streamed to
``docker import``, or as a one-layer image archive for ``docker load``), and host paths
copied into a container (``put_archive``).

Why a load archive at all: an engine's import records the engine's own architecture
(older engines ignore a platform given to it), so a root filesystem of a foreign
architecture is loaded instead, as the archive ``docker save`` writes (manifest.json, an
image config naming the architecture, one layer), which docker and podman both load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pytest_isolate.errors import ProvisionError
from pytest_isolate.images.envvars import system_variables
from pytest_isolate.images.tree import DEFAULT_EXCLUDES, scan_tree

#: Not copied into a container of a remote engine (caches, version control, virtualenvs):
#: the same fixed list as a VM's project disk (images/tree.py).
COPY_EXCLUDE = {p.rstrip("/") for p in DEFAULT_EXCLUDES}

#: Debian architecture -> docker (OCI) architecture and variant.
DOCKER_ARCH = {"amd64": ("amd64", ""), "arm64": ("arm64", "v8"), "armhf": ("arm", "v7"),
               "armel": ("arm", "v5"), "i386": ("386", ""), "ppc64el": ("ppc64le", ""),
               "s390x": ("s390x", ""), "riscv64": ("riscv64", ""), "mips64el": ("mips64le", "")}


def docker_arch(arch: str) -> tuple[str, str]:
    return DOCKER_ARCH.get(arch, (arch, ""))


def write_copy_archive(out: Any, pairs: list[tuple[str, str]], project: str | None = None,
                       exclude: tuple[str, ...] = ()) -> None:
    """Write a tar archive of each host path at its path inside to out, and rewind it.

    The project (rootdir) takes the files a VM's project disk takes (images/tree.py:
    git's view of a checkout, the fixed list, the exclude option); other paths leave
    out the fixed list's directories."""

    def skip(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if os.path.basename(info.name) in COPY_EXCLUDE else info

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for src, dst in pairs:
            arc = dst.lstrip("/")
            if src == project and os.path.isdir(src):
                tar.add(src, arcname=arc, recursive=False)
                for entry in scan_tree(Path(src), exclude).entries:
                    tar.add(os.path.join(src, entry.rel), arcname=f"{arc}/{entry.rel}",
                            recursive=False)
            else:
                tar.add(src, arcname=arc, filter=skip)
    out.seek(0)


def tar_argv(rootfs: Path, extra: Path, out: str = "-") -> list[str]:
    """GNU tar (fast, keeps xattrs) of rootfs plus extra/.isolate."""
    return ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(rootfs),
            "-cf", out, ".", "-C", str(extra), "./.isolate"]


class TarStream:
    """A tar archive of a root filesystem as an iterator of chunks, checked by finish()."""

    def __init__(self, rootfs: Path, extra: Path) -> None:
        self.rootfs = rootfs
        self.proc = subprocess.Popen(tar_argv(rootfs, extra), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def __iter__(self) -> Iterator[bytes]:
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read(1 << 20)
            if not chunk:
                return
            yield chunk

    def finish(self) -> None:
        """Wait for tar; raise when it failed or was not read to its end."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()  # a reader that stopped early makes tar fail (SIGPIPE)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        self.proc.stderr.close()
        if code != 0:
            raise ProvisionError(f"tar of {self.rootfs} failed with exit status {code}: {err}")


def write_layer(rootfs: Path, extra: Path, layer: Path) -> str:
    """Write rootfs plus extra/.isolate as the tar layer; its sha256 (the diff id)."""
    done = subprocess.run(tar_argv(rootfs, extra, str(layer)), capture_output=True,
                          stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise ProvisionError(f"tar of {rootfs} failed with exit status {done.returncode}: "
                             f"{done.stderr.decode(errors='replace').strip()}")
    digest = hashlib.sha256()
    with open(layer, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_config(arch: str, labels: dict[str, str], diff_id: str) -> bytes:
    """The image config of a one-layer image for Debian architecture arch."""
    oci_arch, variant = docker_arch(arch)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config: dict[str, Any] = {
        "architecture": oci_arch, "os": "linux", "created": created,
        "config": {"Env": [f"{k}={v}" for k, v in system_variables().items()],
                   "Cmd": ["python3"], "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": created, "created_by": "pytest-isolate (root filesystem)"}],
    }
    if variant:
        config["variant"] = variant
    return json.dumps(config, sort_keys=True).encode()


def write_image_archive(rootfs: Path, extra: Path, tmp: Path, tag: str, arch: str,
                        labels: dict[str, str]) -> Path:
    """The load archive (see the module docstring) of rootfs plus extra/.isolate, tagged
    tag, for Debian architecture arch, written in tmp; its path."""
    layer = tmp / "layer.tar"
    config_bytes = image_config(arch, labels, write_layer(rootfs, extra, layer))
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag],
                            "Layers": ["layer.tar"]}]).encode()
    archive = tmp / "image.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layer, arcname="layer.tar")
        for member, data in ((config_name, config_bytes), ("manifest.json", manifest)):
            add_bytes(tar, member, data)
    layer.unlink()  # the archive holds a copy: half the disk space while the engine loads
    return archive


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
