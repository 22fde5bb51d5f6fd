"""Helpers of the fault, bad-input, hostile-test and load suite (issue 6).

Every case runs a *generated* pytest project in a subprocess (pytester, or a
plain ``subprocess.Popen`` where the case must kill or sample that run while it
is going), against the real backends.  The inner runs use the outer run's cache
directory, so the root filesystems and images that the rest of the test suite
built are reused instead of built again.

What a run leaves behind on the host is counted with the functions below:
processes (by pid *and* start time, against pid reuse), Docker containers
labelled with the run id, schroot sessions, LXC monitors and mounts whose
names carry the run id, and the run's work directory in the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from shared_support import pytest_argv, pytest_options, wait_for

#: The backends every case that applies to all of them is parametrized over.
BACKENDS = ("chroot", "docker", "podman", "lxc", "schroot")
#: Text of agent.BOOTSTRAP that shows in the command line of every agent process.
AGENT_CMDLINE_MARK = "no agent source on stdin"


def safe_name(text: str) -> str:
    """How the lxc and schroot backends spell a run id in their names."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "env"


# ---------------------------------------------------------------- processes


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> str | None:
    fields = stat_fields(pid)
    return None if fields is None else fields[19]


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def find_processes(needle: str) -> dict[int, str]:
    """pid -> command line of every process whose command line contains needle."""
    me = os.getpid()
    found = {}
    for pid in all_pids():
        text = cmdline(pid)
        if needle in text and pid != me:
            found[pid] = text
    return found


def descendants(root: int) -> dict[tuple[int, str], str]:
    """(pid, start time) -> command line of root and every process below it."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        fields = stat_fields(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    out: dict[tuple[int, str], str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        start = start_time(pid)
        if start is None:
            continue
        out[(pid, start)] = cmdline(pid)
        todo.extend(children.get(pid, []))
    return out


def still_alive(procs: dict[tuple[int, str], str]) -> dict[tuple[int, str], str]:
    """Those of procs that still run (same pid and start time) and are not zombies."""
    alive = {}
    for (pid, start), text in procs.items():
        fields = stat_fields(pid)
        if fields is not None and fields[19] == start and fields[0] != "Z":
            alive[(pid, start)] = text
    return alive


def watch(proc: subprocess.Popen[bytes],
          sample: Callable[[dict[tuple[int, str], str]], None] | None = None,
          interval: float = 0.5) -> dict[tuple[int, str], str]:
    """Every process that ran under the inner run proc, looked at each interval until proc
    ends (killed on the way out if it still runs); sample(tree so far) after each look."""
    tree: dict[tuple[int, str], str] = {}
    try:
        while proc.poll() is None:
            tree.update(descendants(proc.pid))
            if sample is not None:
                sample(tree)
            time.sleep(interval)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return tree


def wait_gone(procs: dict[tuple[int, str], str], timeout: float = 10.0) -> None:
    """Wait until none of procs runs any more (each is gone once its run ended: its parent
    reaps it); fails naming those still there."""
    wait_for(f"the {len(procs)} processes of the run to end", lambda: not still_alive(procs),
             timeout, explain=lambda: still_alive(procs))


def ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        fields = stat_fields(pid)
        if fields is None:
            break
        pid = int(fields[1])
        out.append(pid)
    return out


def kill_all(procs: Any) -> None:
    """SIGKILL every pid in procs (a test's own cleanup; never a broad pattern)."""
    for key in list(procs):
        pid = key[0] if isinstance(key, tuple) else key
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------- other resources


def run_cmd(argv: list[str], timeout: float = 60.0, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL, env=env)
    return done.stdout


def docker_containers(run_id: str, env: dict[str, str] | None = None) -> list[str]:
    out = run_cmd(["docker", "ps", "-a", "--filter", f"label=pytest-isolate.run={run_id}",
                   "--format", "{{.Names}}"], env=env)
    return sorted(out.split())


def schroot_sessions(run_id: str) -> list[str]:
    out = run_cmd(["schroot", "--list", "--all-sessions"])
    return sorted(s for s in out.split() if safe_name(run_id) in s)


def schroot_definitions(run_id: str) -> list[str]:
    return sorted(p.name for p in Path("/etc/schroot/chroot.d").glob(f"*{safe_name(run_id)}*"))


def lxc_monitors(run_id: str) -> list[str]:
    return sorted(text for text in find_processes(safe_name(run_id)).values()
                  if text.startswith("[lxc monitor]"))


def mounts(needle: str) -> list[str]:
    """Mount points of the host's mount namespace whose line mentions needle."""
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f if needle in line)


def work_left(cache_dir: str, run_id: str) -> list[str]:
    work = Path(cache_dir) / "runs" / run_id / "work"
    if not work.exists():
        return []
    return sorted(str(p.relative_to(work)) for p in work.rglob("*"))


def cgroups(run_id: str) -> list[str]:
    """cgroups of one run: pytest-isolate's own (named by the run's pid) and LXC's (named
    after the run's containers), in every hierarchy."""
    pid = run_id.split("-")[2]
    found = []
    for path in Path("/sys/fs/cgroup").glob("**/*pytest-isolate-*"):
        if path.name.startswith(f"pytest-isolate-{pid}-") or safe_name(run_id) in path.name:
            found.append(str(path))
    return sorted(found)


def vm_dirs(run_id: str) -> list[str]:
    """The qemu backend's socket directories in /tmp that name the run's pid."""
    import tempfile

    pid = run_id.split("-")[2]
    found = []
    for path in Path(tempfile.gettempdir()).glob("pytest-isolate-vm-*"):
        try:
            if (path / "pid").read_text().strip() == pid:
                found.append(str(path))
        except OSError:
            continue
    return sorted(found)


@dataclasses.dataclass
class HostState:
    """What one run has on the host."""

    processes: dict[tuple[int, str], str]
    containers: list[str]
    sessions: list[str]
    definitions: list[str]
    monitors: list[str]
    mounts: list[str]
    work: list[str]
    cgroups: list[str]
    vm_dirs: list[str]

    def summary(self) -> str:
        return "\n".join(f"{k}: {v}" for k, v in dataclasses.asdict(self).items())


def host_state(cache_dir: str, run_id: str, processes: dict[tuple[int, str], str]) -> HostState:
    return HostState(
        processes=still_alive(processes),
        containers=docker_containers(run_id),
        sessions=schroot_sessions(run_id),
        definitions=schroot_definitions(run_id),
        monitors=lxc_monitors(run_id),
        mounts=mounts(safe_name(run_id)),
        work=work_left(cache_dir, run_id),
        cgroups=cgroups(run_id),
        vm_dirs=vm_dirs(run_id),
    )


# ---------------------------------------------------------------- inner runs


def run_id_of(cache_dir: str, pid: int) -> str:
    """The run id of the pytest process pid (the manager names it '<time>-<pid>')."""
    runs = Path(cache_dir) / "runs"
    found = [p.name for p in runs.glob(f"*-{pid}")] if runs.is_dir() else []
    assert len(found) == 1, f"run directory of pid {pid} in {runs}: {found}"
    return found[0]


def inner_options(cache_dir: str) -> list[str]:
    """An inner run's options: strict, on the outer run's cache, every outcome shown."""
    return pytest_options(cache_dir, "-rA", "-v")


def inner_argv(cache_dir: str, *args: str) -> list[str]:
    """`python -m pytest` with inner_options, then args."""
    return pytest_argv(cache_dir, "-rA", "-v", *args)


class Inner:
    """A generated project and the ways to run pytest on it."""

    def __init__(self, pytester: pytest.Pytester, cache_dir: str) -> None:
        self.pytester = pytester
        self.cache_dir = cache_dir
        self.path = pytester.path

    def write(self, name: str, source: str) -> Path:
        path = self.path / name
        path.write_text(textwrap.dedent(source))
        return path

    def run(self, *args: str, timeout: float = 300.0) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(*inner_options(self.cache_dir), *args,
                                                  timeout=timeout)

    def popen(self, *args: str, out: str = "inner.out",
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start pytest without waiting; its output goes to self.path / out."""
        log = open(self.path / out, "wb")  # noqa: SIM115 - closed right after the start
        try:
            return subprocess.Popen(
                inner_argv(self.cache_dir, *args),
                cwd=self.path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env)
        finally:
            log.close()

    def output(self, out: str = "inner.out") -> str:
        return (self.path / out).read_text(errors="replace")

    def report(self, name: str = "report.json") -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / name).read_text())
        return data


def console_mark(tag: str, indent: str = "        ") -> str:
    """Source lines for a test inside a VM that make `isolate-victim-started TAG` appear on
    the VM's console (see wait_for_console)."""
    return (f'with open("/dev/kmsg", "w") as f:  # level 2: shown on the console\n'
            f'{indent}    f.write("<2>isolate-victim-started {tag}\\n")')


@contextlib.contextmanager
def ended(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """Kill the inner run proc on the way out if it still runs."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_and_wait(proc: subprocess.Popen[bytes], pids: Any, timeout: float = 120.0) -> float:
    """SIGKILL pids, then wait for the inner run proc to end; the seconds that took."""
    killed_at = time.monotonic()
    kill_all(pids)
    proc.wait(timeout)
    return time.monotonic() - killed_at


def wait_for_console(inner: Inner, proc: subprocess.Popen[bytes], env: str, marker: str,
                     timeout: float = 300.0) -> str:
    """Wait until a VM's console (its console.log in the run proc's log directory) shows
    marker -- a test inside writes it to /dev/kmsg; returns the run id."""
    def seen() -> str | None:
        runs = list((Path(inner.cache_dir) / "runs").glob(f"*-{proc.pid}"))
        if not runs:
            return None
        console = runs[0] / "logs" / env / "console.log"
        text = console.read_text(errors="replace") if console.exists() else ""
        return runs[0].name if marker in text else None

    return wait_for(f"{marker!r} on the console of {env}", seen, timeout, proc)


def sleep_tag() -> str:
    """A unique `sleep` argument, so a test's processes can be found on the host."""
    return f"{4000 + os.getpid() % 1000}.{time.monotonic_ns() % 10**9:09d}"
