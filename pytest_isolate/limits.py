"""Resource limits of an environment: spec keys ``memory``, ``cpus``, ``pids``, ``disk``.

What each key means, the same in every backend:

* ``disk`` -- the space a test can write: its root filesystem's writable layer, /tmp
  (part of that layer) and /dev/shm are tmpfs mounts of this size.  Always bounded:
  1 GiB unless the spec says otherwise.  A full disk is ENOSPC for the test; the
  space is returned with the test.
* ``memory`` -- the environment's memory, tmpfs pages included: a cgroup limit for
  containers (swap included, so the limit is not met by swapping), the guest's RAM
  for virtual machines.  The kernel's OOM killer ends the test that exceeded it
  (workers are its preferred victims), the agent survives, and the test is reported
  as killed out of memory.
* ``cpus`` -- a CPU time quota of that many CPUs, and (rounded up) the set of CPUs
  the environment's processes may run on, so ``nproc`` inside says so; a virtual
  machine gets that many virtual CPUs.
* ``pids`` -- the number of tasks (processes and threads) the environment may have;
  beyond it fork() and clone() fail with EAGAIN.

Backends that run on the host's kernel use a cgroup per environment instance:
cgroup v2 when the host has the unified hierarchy, else the v1 controllers.  Its
name carries the owning pytest process (pid and start time), so a killed run's
groups are found and removed by the next run, like its containers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from pytest_isolate.errors import ConfigError, IsolateError
from pytest_isolate.ownership import Owner
from pytest_isolate.sizes import format_size, parse_size

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Name prefix of every cgroup pytest-isolate creates (followed by owner pid and start).
PREFIX = "pytest-isolate-"
DEFAULT_DISK = 1 << 30
#: The smallest values that still run an agent and pytest (a clearer error than an OOM).
MIN_MEMORY = 64 << 20
MIN_DISK = 1 << 20
MIN_PIDS = 16

def check_limit(key: str, value: Any, where: str) -> int | float:
    """A spec value of memory/disk (bytes), pids (count) or cpus (number), validated."""
    if key in ("memory", "disk"):
        size = parse_size(value)
        minimum = MIN_MEMORY if key == "memory" else MIN_DISK
        if not size:  # None, or zero: no environment runs in no memory
            raise ConfigError(f"{where}: key {key!r} must be a size such as \"512M\" or "
                              f"\"2G\" (or a number of bytes), got {value!r}")
        if size < minimum:
            raise ConfigError(f"{where}: {key} = {value!r} is below the minimum of "
                              f"{format_size(minimum)}; raise it")
        return size
    if key == "pids":
        if isinstance(value, bool) or not isinstance(value, int) or value < MIN_PIDS:
            raise ConfigError(f"{where}: key 'pids' must be a whole number >= {MIN_PIDS} "
                              f"(the agent and pytest need a few), got {value!r}")
        return value
    if key == "cpus":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0.01 <= value <= 4096):
            raise ConfigError(f"{where}: key 'cpus' must be a number of CPUs such as 1, 2 "
                              f"or 0.5, got {value!r}")
        return float(value)
    raise KeyError(key)


@dataclasses.dataclass(frozen=True)
class Limits:
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    disk: int = DEFAULT_DISK

    @property
    def needs_cgroup(self) -> bool:
        return self.memory is not None or self.cpus is not None or self.pids is not None

    def cpu_count(self) -> int | None:
        return None if self.cpus is None else max(1, math.ceil(self.cpus))


def host_cpus(count: int) -> list[int]:
    """count of the CPUs this process may use, taken round-robin (so that environments
    started side by side, by one run or by xdist workers, do not share the first CPU)."""
    global _counter
    _counter += 1
    allowed = sorted(os.sched_getaffinity(0))
    count = min(count, len(allowed))
    start = (os.getpid() + _counter) % len(allowed)
    return sorted(allowed[(start + i) % len(allowed)] for i in range(count))


_counter = 0


def cpu_list(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def cgroup_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def cgroup_values(limits: Limits, v2: bool, cpus: list[int] | None) -> dict[str, str]:
    """controller file -> value for limits (also what LXC's lxc.cgroup[2].* keys take)."""
    out: dict[str, str] = {}
    period = 100_000
    if v2:
        if limits.memory is not None:
            out["memory.max"] = str(limits.memory)
            out["memory.swap.max"] = "0"
        if limits.pids is not None:
            out["pids.max"] = str(limits.pids)
        if limits.cpus is not None:
            out["cpu.max"] = f"{max(1000, int(limits.cpus * period))} {period}"
        if cpus:
            out["cpuset.cpus"] = cpu_list(cpus)
        return out
    if limits.memory is not None:
        out["memory.limit_in_bytes"] = str(limits.memory)
        out["memory.memsw.limit_in_bytes"] = str(limits.memory)
    if limits.pids is not None:
        out["pids.max"] = str(limits.pids)
    if limits.cpus is not None:
        out["cpu.cfs_period_us"] = str(period)
        out["cpu.cfs_quota_us"] = str(max(1000, int(limits.cpus * period)))
    if cpus:
        out["cpuset.cpus"] = cpu_list(cpus)
    return out


def _own_path(controller: str) -> str:
    """This process's cgroup path in a v1 controller's hierarchy ('' for v2: see below)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            if controller in names.split(","):
                return path.lstrip("/")
    return ""


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class HostCgroup:
    """The cgroup(s) of one environment instance on the host.

    v1: one directory per controller used, below this process's own group (so the
    limits of whatever runs pytest still apply).  v2: one directory below the root
    (a group with processes cannot delegate controllers: the v2 'no internal
    processes' rule), with the controllers enabled on the way.
    """

    def __init__(self, dirs: list[Path], v2: bool) -> None:
        self.dirs = dirs
        self.v2 = v2

    @classmethod
    def create(cls, limits: Limits, label: str) -> HostCgroup | None:
        if not limits.needs_cgroup:
            return None
        v2 = cgroup_v2()
        name = f"{PREFIX}{Owner.me().name}-{uuid.uuid4().hex[:8]}"
        cpus = host_cpus(limits.cpu_count() or 1) if limits.cpus else None
        values = cgroup_values(limits, v2, cpus)
        group = cls([], v2)
        try:
            if v2:
                group._create_v2(name, values)
            else:
                group._create_v1(name, values)
        except OSError as exc:
            group.remove()
            raise IsolateError(
                f"{label}: cannot apply the resource limits "
                f"({', '.join(sorted(values))}): {exc}; limits on this backend need "
                "write access to the cgroup filesystem (run as root), or remove the keys "
                "memory, cpus and pids from the environment") from None
        return group

    def _create_v1(self, name: str, values: dict[str, str]) -> None:
        for controller in sorted({k.split(".", 1)[0] for k in values}):
            base = v1_hierarchy(controller)
            parent = base / _own_path(controller)
            if not os.access(parent, os.W_OK):
                parent = base
            path = parent / name
            path.mkdir()
            self.dirs.append(path)
            if controller == "cpuset":  # a v1 cpuset takes no task before it has mems
                _write(path / "cpuset.mems", (parent / "cpuset.mems").read_text().strip())
            for key, value in values.items():  # memory.limit_in_bytes before memsw
                if key.split(".", 1)[0] != controller:
                    continue
                if key == "memory.memsw.limit_in_bytes" and not (path / key).exists():
                    continue  # swap accounting off: there is no swap to limit
                _write(path / key, value)

    def _create_v2(self, name: str, values: dict[str, str]) -> None:
        controllers = sorted({k.split(".", 1)[0] for k in values})
        top = CGROUP_ROOT / "pytest-isolate"
        top.mkdir(exist_ok=True)
        enable = " ".join(f"+{c}" for c in controllers)
        _write(CGROUP_ROOT / "cgroup.subtree_control", enable)
        _write(top / "cgroup.subtree_control", enable)
        path = top / name
        path.mkdir()
        self.dirs.append(path)
        for key, value in values.items():
            _write(path / key, value)

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside this group: a fixed sh script writes its own pid into each
        group (no user text reaches the shell: paths and argv are its arguments)."""
        script = ('while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; '
                  'shift; exec "$@"')
        procs = [str(d / "cgroup.procs") for d in self.dirs]
        return ["/bin/sh", "-c", script, "pytest-isolate-cgroup", *procs, "--", *argv]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return found

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left in the group and remove its directories."""
        remove_dirs(self.dirs, timeout)
        self.dirs = []


def remove_dirs(dirs: list[Path], timeout: float = 5.0) -> list[Path]:
    """Kill the processes of each group and of the groups below it, then rmdir them all,
    the deepest first; returns the dirs (of those given) removed."""
    removed = []
    deadline = time.monotonic() + timeout
    for top in dirs:
        below = [Path(d) for d, _, _ in os.walk(top, topdown=False)][:-1]
        remove_dirs(below, max(0.0, deadline - time.monotonic()))
        d = top
        while True:
            try:
                pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                pids = []
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            try:
                d.rmdir()
                removed.append(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
    return removed


def v1_hierarchy(controller: str) -> Path:
    """Where a v1 controller is mounted (possibly co-mounted, as cpu,cpuacct)."""
    base = CGROUP_ROOT / controller
    if base.is_dir():
        return base
    for path in CGROUP_ROOT.iterdir():
        if controller in path.name.split(","):
            return path
    return base


def leftover_groups() -> list[Path]:
    """Groups named by pytest-isolate whose owning process is gone."""
    if cgroup_v2():
        parents = [CGROUP_ROOT / "pytest-isolate"]
    else:
        parents = []
        for controller in ("memory", "pids", "cpu", "cpuset"):
            base = v1_hierarchy(controller)
            parents += [base, base / _own_path(controller)]
    found = []
    for parent in dict.fromkeys(parents):
        with contextlib.suppress(OSError):
            for path in parent.glob(PREFIX + "*"):
                owner = Owner.from_name(path.name[len(PREFIX):])
                if owner is not None and not owner.alive():
                    found.append(path)
    return found


def reap_cgroups() -> list[str]:
    """Remove the groups of runs whose process is gone; returns their paths."""
    return [str(p) for p in remove_dirs(leftover_groups(), timeout=2.0)]
