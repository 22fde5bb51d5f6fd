"""Peak memory of the agent processes of one pytest run, sampled from /proc.

The agent is the process whose command line is ``python3 -u -c BOOTSTRAP`` (see
pytest_isolate.agent.wire.BOOTSTRAP); the per-test workers are forked from it and
carry the same command line.  A process belongs to the benchmarked run when it
descends from that run's pytest process (chroot, schroot, lxc: the agent is a
child of the launcher / ``schroot -r`` / ``lxc-attach``) or lives in the cgroup
of a docker container labelled with that pytest's pid (docker: the agent is a
``docker exec`` child of the container's shim).

Figures (kB, the kernel's own): ``VmHWM`` (peak resident set) and ``VmRSS`` of
the agent, the largest ``VmHWM`` of any worker, and the sum of ``Pss`` (resident
set with shared pages divided among their sharers, from smaps_rollup) over the
agent and its workers -- what they cost together, copy-on-write sharing counted
once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import re
import subprocess
import threading
from pathlib import Path

from pytest_isolate.agent.wire import BOOTSTRAP

_BOOT = BOOTSTRAP.encode()
_DOCKER_ID = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass
class Proc:
    pid: int
    ppid: int
    agent_like: bool


@dataclasses.dataclass
class MemoryPeak:
    agent_hwm_kb: int = 0
    agent_rss_kb: int = 0
    worker_hwm_kb: int = 0
    total_pss_kb: int = 0
    agents_seen: int = 0
    workers_seen: int = 0
    samples: int = 0


def _processes() -> dict[int, Proc]:
    procs: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        procs[pid] = Proc(pid, int(fields[1]), _is_agent(cmdline.split(b"\0")))
    return procs


def _is_agent(argv: list[bytes]) -> bool:
    """``python3 -u -c [PRELUDE]BOOTSTRAP`` -- not a launcher, ``schroot`` or ``lxc-attach``
    whose arguments end with that command."""
    while argv and not argv[-1]:
        argv = argv[:-1]
    return (len(argv) >= 3 and argv[-2] == b"-c" and argv[-1].endswith(_BOOT)
            and b"python" in os.path.basename(argv[0]))


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


#: kcmp(2)'s number here, and its "same address space" type
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_KCMP_VM = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def _same_memory(pid: int, other: int) -> bool:
    """pid shares other's memory: a PID namespace's PID 1 that the agent starts as a
    clone with CLONE_VM (agent.mounts.pause_init): counted once, as the other."""
    if _SYS_KCMP is None:
        return False
    return int(_LIBC.syscall(_SYS_KCMP, pid, other, _KCMP_VM, 0, 0)) == 0


def _descends(pid: int, root: int, procs: dict[int, Proc]) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        proc = procs.get(pid)
        if proc is None:
            return False
        pid = proc.ppid
        seen += 1
    return False


def _docker_ids(pytest_pid: int) -> set[str]:
    try:
        out = subprocess.run(
            ["docker", "ps", "-q", "--no-trunc", "--filter", f"label=pytest-isolate.pid={pytest_pid}"],
            capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(out.split())


def _cgroup_ids(pid: int) -> set[str]:
    try:
        return set(_DOCKER_ID.findall(Path(f"/proc/{pid}/cgroup").read_text()))
    except OSError:
        return set()


class Sampler:
    """Samples the agent processes of one pytest run in a thread until stopped."""

    def __init__(self, pytest_pid: int, docker: bool, interval: float = 0.1) -> None:
        self.pytest_pid = pytest_pid
        self.docker = docker
        self.interval = interval
        self.peak = MemoryPeak()
        self._containers: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def _ours(self, pid: int, procs: dict[int, Proc]) -> bool:
        if _descends(pid, self.pytest_pid, procs):
            return True
        if not self.docker:
            return False
        if not self._containers:
            self._containers = _docker_ids(self.pytest_pid)
        return bool(_cgroup_ids(pid) & self._containers)

    def sample(self) -> None:
        procs = _processes()
        ours = [p for p in procs.values() if p.agent_like and self._ours(p.pid, procs)
                and not _same_memory(p.pid, p.ppid)]
        agents = [p for p in ours if not procs.get(p.ppid, Proc(0, 0, False)).agent_like]
        workers = [p for p in ours if p not in agents]
        peak = self.peak
        peak.samples += 1
        peak.agents_seen = max(peak.agents_seen, len(agents))
        peak.workers_seen = max(peak.workers_seen, len(workers))
        for p in agents:
            st = _status_kb(p.pid, ("VmHWM", "VmRSS"))
            peak.agent_hwm_kb = max(peak.agent_hwm_kb, st.get("VmHWM", 0))
            peak.agent_rss_kb = max(peak.agent_rss_kb, st.get("VmRSS", 0))
        for p in workers:
            peak.worker_hwm_kb = max(peak.worker_hwm_kb, _status_kb(p.pid, ("VmHWM",)).get("VmHWM", 0))
        if ours:
            peak.total_pss_kb = max(peak.total_pss_kb, sum(_pss_kb(p.pid) for p in ours))
