"""chroot: a Debian root filesystem in its own mount, PID, UTS, IPC and network namespaces.

Works as root and as an unprivileged user (a user namespace mapping the user to
root inside).  The session root is an overlay over the cached root filesystem
with its writes on a tmpfs, so the cache is never written; per-test state is
the agent's business (a fresh overlay per worker).  Nothing outlives the
namespaces: when the launcher dies, its PID namespace and every mount go too.
"""

from __future__ import annotations

import shutil
import uuid

from pytest_isolate.backends.base import (
    PYCACHE,
    SITE,
    Backend,
    Instance,
    agent_command,
    environment_variables,
    pycache_dir,
    shipped_paths,
)
from pytest_isolate.cache import Entry
from pytest_isolate.channel import AgentProcess
from pytest_isolate.images.rootfs import provision_rootfs
from pytest_isolate.namespaces import (
    check_foreign,
    check_namespaces,
    check_rootfs_builder,
    launcher_argv,
)
from pytest_isolate.spec import EnvSpec

START_TIMEOUT = 60.0


class ChrootBackend(Backend):
    name = "chroot"
    needs_root = False
    supports_snapshot = True
    packages = ("mmdebstrap", "uidmap", "qemu-user-static", "binfmt-support", "arch-test")

    def check(self, spec: EnvSpec) -> None:
        check_namespaces(self.name)
        check_rootfs_builder(self.name)
        if spec.foreign:
            check_foreign(self.name, spec.machine)

    def provision(self, spec: EnvSpec) -> Entry:
        return provision_rootfs(spec, self.run.cache, self.run.log_path(spec.name, "provision.log"),
                                self.run.rootdir, self.run.progress)

    def start(self, spec: EnvSpec, image: Entry) -> Instance:
        rootdir = str(self.run.rootdir)
        workdir = self.run.work_dir / f"{spec.name}-{uuid.uuid4().hex[:8]}"
        workdir.mkdir(parents=True)
        shipped = shipped_paths()
        binds = [[rootdir, rootdir, not spec.rootdir_writable]]
        binds += [[src, dst, True] for src, dst in shipped]
        binds.append([str(pycache_dir(self.run, image)), PYCACHE, False])
        cfg = {
            "rootfs": str(image.data), "workdir": str(workdir), "mode": "overlay",
            "binds": binds, "network": spec.network, "hostname": f"isolate-{spec.name}"[:63],
            "argv": agent_command(spec), "env": environment_variables(spec, pycache=True),
            "cwd": rootdir,
        }
        log = self.run.log_path(spec.name, "agent.log")
        process = AgentProcess(launcher_argv(cfg), log, f"environment {spec.name!r}")

        def cleanup() -> None:
            shutil.rmtree(workdir, ignore_errors=True)

        instance = Instance(spec, process, {"agent": log, "provision": image.log}, cleanup)
        try:
            instance.handshake(
                {"isolation": "overlay", "lower": "/.isolate/lower", "site": SITE,
                 "binds": [rootdir, PYCACHE] + [dst for _, dst in shipped], "cwd": rootdir},
                timeout=START_TIMEOUT * (10 if spec.foreign else 1),
            )
        except BaseException:
            instance.stop()
            raise
        return instance
