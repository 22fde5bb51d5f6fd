"""chroot: a Debian root filesystem in its own mount, PID, UTS, IPC and network namespaces.

Works as root and as an unprivileged user (a user namespace mapping the user to
root inside).  The session root is an overlay over the cached root filesystem
with its writes on a tmpfs, so the cache is never written; per-test state is
the agent's business (a fresh overlay per worker).  Nothing outlives the
namespaces: when the launcher dies, its PID namespace and every mount go too.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

from pytest_isolate.backends.base import (
    Instance,
    RootfsBackend,
    agent_command,
    agent_settings,
    handshake_or_stop,
    standard_mounts,
)
from pytest_isolate.cache import Entry
from pytest_isolate.channel import AgentProcess
from pytest_isolate.config import Option
from pytest_isolate.images.envvars import environment_variables
from pytest_isolate.namespaces import (
    RootMap,
    check_namespaces,
    launcher_argv,
    root_map,
)
from pytest_isolate.spec import EnvSpec


class ChrootBackend(RootfsBackend):
    name = "chroot"
    needs_root = False
    supports_snapshot = True
    packages = ("mmdebstrap", "uidmap", "qemu-user-static", "binfmt-support", "arch-test")
    options = {
        "map_root": Option("true or false", "as root, run the environment's root as an "
                           "unprivileged host uid (a user namespace over an idmapped root "
                           "filesystem) where the kernel allows it; false keeps the host's "
                           "root inside (with the hardening still on)"),
    }

    def check(self, spec: EnvSpec) -> None:
        check_namespaces(self.name)
        self.check_rootfs(spec)

    def start(self, spec: EnvSpec, image: Entry) -> Instance:
        group = self.host_cgroup(spec)  # first: it may refuse (limits need root here)
        workdir = self.run.work_dir / f"{spec.name}-{uuid.uuid4().hex[:8]}"
        workdir.mkdir(parents=True)
        mounts = standard_mounts(self.run, spec, image)
        cfg = {
            "rootfs": str(image.data), "workdir": str(workdir), "mode": "overlay",
            "binds": [[m.src, m.dst, m.readonly] for m in mounts], "network": spec.network,
            "hostname": f"isolate-{spec.name}"[:63], "argv": agent_command(spec),
            "env": environment_variables(spec, pycache=True), "cwd": str(self.run.rootdir),
            "disk": spec.limits().disk,
        }
        mapping = self.root_mapping(spec, cfg)
        log = self.run.log_path(spec.name, "agent.log")

        def cleanup() -> None:
            if group is not None:
                group.remove()
            shutil.rmtree(workdir, ignore_errors=True)

        argv = launcher_argv(cfg)
        try:
            process = AgentProcess(group.wrap(argv) if group else argv, log,
                                   f"environment {spec.name!r}")
        except BaseException:
            cleanup()
            raise

        instance = Instance(spec, process, {"agent": log, "provision": image.log}, cleanup)
        handshake_or_stop(instance, agent_settings(self.run, spec, mounts))
        instance.root = self.where_root_is(spec, mapping, instance.hello)
        return instance

    def root_mapping(self, spec: EnvSpec, cfg: dict[str, object]) -> RootMap | None:
        """As root, the environment's root is an unprivileged host uid (cfg["userns"]:
        the launcher's user namespace over an idmapped root filesystem, agent.make_userns)
        unless the spec keeps the host's root."""
        if os.geteuid() != 0 or spec.privileged or spec.option("map_root", True) is False:
            return None
        mapping = root_map()
        cfg["userns"] = mapping.cfg()
        return mapping

    @staticmethod
    def where_root_is(spec: EnvSpec, mapping: RootMap | None, hello: dict[str, Any]) -> str:
        """Where the environment's root lives on the host, from what its agent saw."""
        if os.geteuid() != 0:
            return f"host uid {os.geteuid()} (rootless)"
        if spec.privileged:
            return "the host's root (privileged = true)"
        if mapping is None:
            return f"the host's root (options.map_root = false, {spec.source('options')})"
        if hello.get("uid_map", [])[:2] == [0, mapping.uid[0]]:
            return mapping.describe()
        # the launcher could not map it (no user namespaces or idmapped mounts here)
        problem = hello.get("root_map_problem") or f"the uid map inside is {hello.get('uid_map')}"
        return f"the host's root: no mapped root here ({problem})"
