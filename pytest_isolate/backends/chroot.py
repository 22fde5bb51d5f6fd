"""chroot: a Debian root filesystem in its own mount, PID, UTS, IPC and network namespaces.

Works as root and as an unprivileged user (a user namespace mapping the user to
root inside).  The session root is an overlay over the cached root filesystem
with its writes on a tmpfs, so the cache is never written; per-test state is
the agent's business (a fresh overlay per worker).  Nothing outlives the
namespaces: when the launcher dies, its PID namespace and every mount go too.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import uuid

from pytest_isolate.backends.base import (
    Launch,
    RootfsBackend,
    agent_command,
    agent_settings,
    standard_mounts,
)
from pytest_isolate.cache import Entry
from pytest_isolate.channel import AgentProcess
from pytest_isolate.images.envvars import environment_variables
from pytest_isolate.namespaces import (
    MAP_ROOT_OPTION,
    check_namespaces,
    launcher_argv,
    wanted_root_map,
    where_root_is,
)
from pytest_isolate.setup_host import HOST_NEEDS
from pytest_isolate.spec import EnvSpec


class ChrootBackend(RootfsBackend):
    name = "chroot"
    needs_root = False
    supports_snapshot = True
    supports_warm = True
    host_needs = HOST_NEEDS["chroot"]
    options = {"map_root": MAP_ROOT_OPTION}
    #: nothing outlives the namespaces but a limits cgroup: host_cgroup reaps those
    reaps_at_start = False

    def check(self, spec: EnvSpec) -> None:
        check_namespaces(self.name)
        self.check_rootfs(spec)

    def launch(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
               image: Entry) -> Launch:
        group = self.held_cgroup(stack, spec)  # first: it may refuse (limits need root here)
        workdir = self.run.work_dir / f"{spec.name}-{uuid.uuid4().hex[:8]}"
        workdir.mkdir(parents=True)
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        mounts = standard_mounts(self.run, spec, image)
        cfg = {
            "rootfs": str(image.data), "workdir": str(workdir), "mode": "overlay",
            "binds": [[m.src, m.dst, m.readonly] for m in mounts], "network": spec.network,
            "hostname": f"isolate-{spec.name}"[:63], "argv": agent_command(spec),
            "env": environment_variables(spec, pycache=True), "cwd": str(self.run.rootdir),
            "disk": spec.limits().disk,
        }
        mapping = wanted_root_map(spec)
        if mapping is not None:  # the launcher's user namespace over an idmapped rootfs
            cfg["userns"] = mapping.cfg()
        log = self.run.log_path(spec.name, "agent.log")
        argv = launcher_argv(cfg)
        process = AgentProcess(group.wrap(argv) if group else argv, log,
                               f"environment {spec.name!r}")
        return Launch(process, {"agent": log}, agent_settings(self.run, spec, mounts),
                      root=functools.partial(where_root_is, spec, mapping))
