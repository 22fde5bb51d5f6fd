"""Host side of namespace-based environments: start the launcher in agent.py."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from pytest_isolate.channel import AGENT_PATH
from pytest_isolate.errors import BackendUnavailable
from pytest_isolate.setup_host import invocation as setup_invocation
from pytest_isolate.spec import HOST_ARCHES


def launcher_argv(cfg: dict[str, Any]) -> list[str]:
    """Run agent.py's launcher on the host's own Python, without site (fast start)."""
    return [sys.executable, "-I", "-S", str(AGENT_PATH), "launch", json.dumps(cfg)]


def userns_allowed() -> bool:
    for path, bad in (("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                      ("/proc/sys/user/max_user_namespaces", "0")):
        try:
            if Path(path).read_text().strip() == bad:
                return False
        except OSError:
            continue
    return True


def check_namespaces(backend: str) -> None:
    """Root, or unprivileged user namespaces: one of them is needed."""
    if os.geteuid() != 0 and not userns_allowed():
        raise BackendUnavailable(
            backend, "not root and unprivileged user namespaces are disabled",
            "run as root, or enable them: sysctl kernel.unprivileged_userns_clone=1 "
            "user.max_user_namespaces=15000",
        )


def binfmt_registered(machine: str) -> bool:
    """Is a qemu-user interpreter registered for this machine (e.g. 'aarch64')?"""
    entry = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{machine}"
    try:
        return entry.read_text().startswith("enabled")
    except OSError:
        return False


def check_foreign(backend: str, machine: str) -> None:
    if not binfmt_registered(machine):
        raise BackendUnavailable(
            backend, f"no qemu-user interpreter is registered for {machine}",
            f"{setup_invocation(('--arches', HOST_ARCHES.get(machine, machine)))}  (or install "
            "qemu-user-static and binfmt-support, then run: "
            f"update-binfmts --enable qemu-{machine})",
        )


def subuid_ok(user: str) -> bool:
    try:
        for line in Path("/etc/subuid").read_text().splitlines():
            if line.split(":", 1)[0] in (user, str(os.getuid())):
                return True
    except OSError:
        pass
    return False


def check_rootfs_builder(backend: str) -> None:
    """mmdebstrap (any user) or debootstrap (root only) must be there."""
    if os.geteuid() == 0:
        if shutil.which("mmdebstrap") or shutil.which("debootstrap"):
            return
        raise BackendUnavailable(backend, "neither mmdebstrap nor debootstrap is installed",
                                 "install them with: apt-get install mmdebstrap")
    if not shutil.which("mmdebstrap"):
        raise BackendUnavailable(backend, "mmdebstrap is not installed (needed without root)",
                                 "install it with: apt-get install mmdebstrap uidmap")
    if not shutil.which("newuidmap"):
        raise BackendUnavailable(backend, "newuidmap is missing (rootless mmdebstrap needs it)",
                                 "install it with: apt-get install uidmap")
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    if not subuid_ok(user):
        raise BackendUnavailable(backend, f"user {user!r} has no range in /etc/subuid",
                                 f"add one as root: usermod --add-subuids 100000-165535 "
                                 f"--add-subgids 100000-165535 {user}")
