"""Host side of namespace-based environments: start the launcher (agent/launcher.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pytest_isolate.agent.bundle import launcher_argv as run_launcher
from pytest_isolate.config import Option
from pytest_isolate.errors import BackendUnavailable
from pytest_isolate.setup_host import invocation as setup_invocation
from pytest_isolate.setup_host import subid_entries
from pytest_isolate.spec import HOST_ARCHES, EnvSpec


def launcher_argv(cfg: dict[str, Any]) -> list[str]:
    """Run the launcher on the host's own Python, without site (fast start)."""
    return run_launcher("launch", json.dumps(cfg))


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


#: root's ids in a mapped environment when /etc/subuid (/etc/subgid) gives root no range:
#: above every account a system makes (they stay below 2**31), one range of 65536
BUILTIN_ROOT_RANGE = (2**31, 65536)


@dataclasses.dataclass(frozen=True)
class RootMap:
    """Where the root of a chroot, schroot or lxc environment lives on the host: uids and
    gids base..base+count-1 are 0..count-1 inside (agent.mounts.make_userns)."""

    uid: tuple[int, int]
    gid: tuple[int, int]
    source: str

    def describe(self) -> str:
        return f"host uid {self.uid[0]} (range of {self.uid[1]}, {self.source})"

    def cfg(self) -> dict[str, list[int]]:
        return {"uid": list(self.uid), "gid": list(self.gid)}


def _subid_range(path: str, user: str = "root") -> tuple[int, int] | None:
    """user's first subordinate range in path (at most 65536 ids), or None."""
    for name, first, count in subid_entries(path):
        if name in (user, "0") and first > 0 and count > 0:
            return first, min(count, 65536)
    return None


def root_map(subuid: str = "/etc/subuid", subgid: str = "/etc/subgid") -> RootMap:
    """root's subordinate ranges in /etc/subuid and /etc/subgid, else BUILTIN_ROOT_RANGE."""
    uids, gids = _subid_range(subuid), _subid_range(subgid)
    if uids and gids:
        return RootMap(uids, gids, "root's ranges in /etc/subuid and /etc/subgid")
    return RootMap(BUILTIN_ROOT_RANGE, BUILTIN_ROOT_RANGE,
                   "built-in; give root a range in /etc/subuid and /etc/subgid to choose")


_probed: dict[int, str | None] = {}


def root_map_problem(path: Path, mapping: RootMap) -> str | None:
    """None when, as root, a root filesystem at path can run with its root mapped to
    mapping (user namespaces and idmapped mounts on its filesystem); otherwise why not.
    For doctor; asked once per filesystem and process (in a helper process: pytest's own
    would be forked)."""
    dev = path.stat().st_dev
    if dev not in _probed:
        argv = run_launcher("probe-root-map", str(path),
                            json.dumps([list(mapping.uid), list(mapping.gid)]))
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            _probed[dev] = f"the probe did not run: {exc}"
        else:
            _probed[dev] = (None if proc.returncode == 0 else
                            (proc.stderr.strip().splitlines() or ["the probe failed"])[-1])
    return _probed[dev]


#: the `options` key of chroot, schroot and lxc that keeps the host's root inside
MAP_ROOT_OPTION = Option(
    "true or false", "as root, run the environment's root as an unprivileged host uid (a "
    "user namespace, with idmapped mounts so it owns what the host's root owns) where the "
    "kernel allows it; false keeps the host's root inside (the hardening stays on)")


def wanted_root_map(spec: EnvSpec) -> RootMap | None:
    """The mapping an environment's root gets (as root; README 'Security model'), or
    None: rootless (already a user), privileged = true, or options.map_root = false."""
    if os.geteuid() != 0 or spec.privileged or spec.option("map_root", True) is False:
        return None
    return root_map()


def agent_map_request(mapping: RootMap, idmap: list[str],
                      userns_fd: int | None = None) -> dict[str, str]:
    """The environment variable that asks an agent started as the host's root to map its
    root itself (agent.mounts.map_root_here), idmapping the paths in idmap; userns_fd: the user
    namespace to join is open there (made before a chroot), else the agent makes it."""
    from pytest_isolate.agent.mounts import MAP_ROOT_ENV

    request: dict[str, Any] = {**mapping.cfg(), "idmap": idmap}
    if userns_fd is not None:
        request["userns_fd"] = userns_fd
    return {MAP_ROOT_ENV: json.dumps(request)}


def where_root_is(spec: EnvSpec, mapping: RootMap | None, hello: dict[str, Any]) -> str:
    """Where an environment's root lives on the host, from what its agent saw (its hello)."""
    if os.geteuid() != 0:
        return f"host uid {os.geteuid()} (rootless)"
    if spec.privileged:
        return "the host's root (privileged = true)"
    if mapping is None:
        return f"the host's root (options.map_root = false, {spec.source('options')})"
    if hello.get("uid_map", [])[:2] == [0, mapping.uid[0]]:
        return mapping.describe()
    # it could not be mapped (no user namespaces or idmapped mounts here)
    problem = hello.get("root_map_problem") or f"the uid map inside is {hello.get('uid_map')}"
    return f"the host's root: no mapped root here ({problem})"
