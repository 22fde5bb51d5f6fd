"""Helpers of the integration tests that start a daemon (sshd, a registry) for a test, or
run pytest as the unprivileged user, or build FROM the session's docker image; running an
inner pytest is shared_support's.

A module of its own (imported by name: pytest's prepend import mode puts this directory on
sys.path).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import textwrap
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from shared_support import wait_for


def stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Terminate a daemon a test started; kill it when it outlives grace seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a daemon a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_log(proc: subprocess.Popen[bytes], log: Path, text: str, what: str,
                 seconds: float = 20) -> None:
    """Wait until a daemon a test started writes text to its log (it listens)."""
    wait_for(f"{what} to start listening ({text!r} in {log})", lambda: text in log.read_text(),
             seconds, proc, explain=lambda: log.read_text()[-3000:])


#: An sshd of our own (its config, keys and log in a directory of the test's): never the
#: system service.
SSHD = "/usr/sbin/sshd"


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (sshd's per-connection sessions)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pytest-isolate",
                    "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text()


def start_sshd(base: Path, port: int) -> subprocess.Popen[bytes]:
    host_pub = keygen(base / "host_key")
    (base / "authorized_keys").write_text(keygen(base / "client_key"))
    config = base / "sshd_config"
    config.write_text(textwrap.dedent(f"""\
        ListenAddress 127.0.0.1
        HostKey {base}/host_key
        AuthorizedKeysFile {base}/authorized_keys
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        PidFile none
    """))
    home_ssh = base / "home" / ".ssh"
    home_ssh.mkdir(parents=True)
    shutil.copy(base / "client_key", home_ssh / "id_ed25519")
    os.chmod(home_ssh / "id_ed25519", 0o600)
    (home_ssh / "known_hosts").write_text(
        f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n")
    # sshd insists on its privilege separation directory (compiled in; the system's
    # sshd service would make it)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    with open(base / "sshd.log", "wb") as log:
        return subprocess.Popen([SSHD, "-D", "-e", "-f", str(config), "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)


#: The unprivileged user scripts/setup.sh (`pytest-isolate setup`) creates.
USER = "pytest-isolate-user"


def stage_for_user(root: Path, modules: Sequence[str] = ()) -> None:
    """A world-readable copy of the package (root/src) and of its pure-Python dependencies
    plus modules (root/site), for Debian's own python3 run as USER (who cannot read the
    project's virtualenv)."""
    import importlib

    import filelock

    import pytest_isolate
    from pytest_isolate.backends.base import shipped_paths

    shutil.copytree(Path(pytest_isolate.__file__).parent, root / "src" / "pytest_isolate",
                    ignore=shutil.ignore_patterns("__pycache__"))
    site = root / "site"
    site.mkdir()
    deps = [(src, Path(dst).name) for src, dst in shipped_paths()]
    for module in [filelock.__name__, *modules]:
        deps.append((str(Path(str(importlib.import_module(module).__file__)).parent), module))
    for src, name in deps:
        if os.path.isdir(src):
            shutil.copytree(src, site / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, site / name)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    os.chmod(root, 0o755)


def session_run(config: pytest.Config, log_dir: Path) -> Any:
    """A RunContext on this session's cache (backends made in the test process), quiet."""
    from pytest_isolate.backends.base import RunContext

    manager: Any = config.pluginmanager.get_plugin("isolate-manager")
    return RunContext(run_id=f"itest-{uuid.uuid4().hex[:8]}", rootdir=config.rootpath,
                      cache=manager.cache, log_dir=log_dir / "logs", work_dir=log_dir / "work",
                      progress=lambda message: None, strict=True)


def remove_made_from(cache: Any, gone: set[str]) -> None:
    """Remove the cache entries made from what gone names (image ids, entry keys), and
    what was made from those in turn: an image's exports and pins (by its id), an export's
    VM disks, a disk's saved states (by key).  Matched by that chain, never by time, so
    what a concurrent run made stays."""
    def made_from(entry: Any) -> Any:
        if entry.kind in ("image-rootfs", "docker-pin"):
            return entry.manifest.get("id")
        if entry.kind == "vmdisk":
            return entry.manifest.get("rootfs_key")
        return entry.manifest.get("spec", {}).get("vmdisk")  # a vmstate

    for kinds in (("image-rootfs", "docker-pin"), ("vmdisk",), ("vmstate",)):
        for entry in list(cache.entries()):
            if entry.kind in kinds and made_from(entry) in gone:
                gone.add(entry.key)
                cache.remove(entry)


def session_docker_image(config: pytest.Config, log_dir: Path) -> str:
    """The tag of the Debian image the docker backend builds in this session (from the
    cached root filesystem): what a test's Dockerfile starts FROM, so nothing is pulled
    and its build needs no network."""
    from pytest_isolate.backends.docker import DockerBackend

    manager: Any = config.pluginmanager.get_plugin("isolate-manager")
    return str(DockerBackend(session_run(config, log_dir)).provision(
        manager.specs["docker"]).manifest["image"])
