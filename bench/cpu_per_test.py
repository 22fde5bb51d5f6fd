"""Where the CPU time of a clean state per test goes (issue 13): host, agent, zygote, test.

    .venv/bin/python bench/cpu_per_test.py [--backend chroot|lxc|schroot] [--tests 200]
                                           [--repeats 3]

bench/run.py measures the wall time each trivial test adds; on a machine with two cores
that is bounded by the CPU time the processes of the pipeline spend per test, which this
script splits by process.  It runs a generated project twice: 1 trivial test and N+1
(each ending with a test that sleeps), and while the sleeping test runs it reads from
/proc the CPU time (user + system) of

- the host's pytest (its own time: collecting, sending, rebuilding and reporting);
- the agent (relaying frames between the host and the workers);
- the zygote, its own time (setting up each test's fixtures, forking it, the PID
  namespace's cheap PID 1) and its reaped children's time: the test workers (their
  namespaces and mounts, hardening, the test's protocol, the copy-on-write faults
  after the fork, their exit), split into user and system time.

Per test = (value at N+1 - value at 1) / N.  It also times a bare fork of the zygote's
size (the floor below which no fork-per-test design goes on this machine).  The
isolated runs are the default reset = "test".  Needs what the backend needs (root for
lxc/schroot/docker).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PYTEST = Path(sys.executable).parent / "pytest"
#: the reaped test workers' minor page faults, counted beside the CPU times
FAULTS = "worker faults"
TICK = os.sysconf("SC_CLK_TCK")
SLEEP = 3.0
#: what the agent's processes run (wire.BOOTSTRAP's first line)
AGENT_MARK = "pytest-isolate: no agent source on stdin"


def write_project(root: Path, backend: str, n: int) -> None:
    (root / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    lines = ["import time", "import pytest", "", f"pytestmark = pytest.mark.isolate({backend!r})", ""]
    lines += [f"def test_{i}():\n    pass\n" for i in range(n)]
    lines += [f"def test_zz_sleep():\n    time.sleep({SLEEP})\n"]
    (root / "test_cpu.py").write_text("\n".join(lines))


def cpu(pid: int) -> tuple[float, float, float, int]:
    """(own, reaped children's user, their system) CPU seconds of pid, and its reaped
    children's minor page faults."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, cutime / TICK, cstime / TICK, int(fields[8])


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def is_agent(pid: int) -> bool:
    try:
        return AGENT_MARK.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def measure(project: Path, k: int) -> dict[str, float]:
    """Run the first k trivial tests and the sleeping one; CPU per role while it sleeps."""
    select = [f"test_cpu.py::test_{i}" for i in range(k)] + ["test_cpu.py::test_zz_sleep"]
    argv = [str(PYTEST), "-q", "-p", "no:cacheprovider", "--isolate-strict", *select]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    sample: dict[str, float] | None = None
    time.sleep(0.5)
    while proc.poll() is None and sample is None:
        agents = [p for p in descendants(proc.pid) if is_agent(p)]
        # the agent is the first agent process; under it the zygote (under a mapped root a
        # process that waits, then the zygote proper, PID 1 of a namespace of its own),
        # whose children are the test workers (and each one's cheap PID 1)
        top = [p for p in agents if not any(p in children(q) for q in agents)]
        parents = [p for p in agents if p not in top and any(is_agent(c) for c in children(p))]
        if top and parents and any(len(children(z)) >= 2 for z in parents):
            time.sleep(SLEEP / 2)  # the sleeping test's worker runs: all others reaped
            try:
                host = cpu(proc.pid)[0]
                agent = sum(cpu(a)[0] for a in top)
                zyg = [cpu(z) for z in parents]
                sample = {"host": host, "agent": agent, "zygote": sum(z[0] for z in zyg),
                          "workers (user)": sum(z[1] for z in zyg),
                          "workers (system)": sum(z[2] for z in zyg),
                          FAULTS: sum(z[3] for z in zyg)}
            except OSError:
                pass
        time.sleep(0.05)
    out, _ = proc.communicate()
    if proc.returncode != 0 or sample is None:
        raise SystemExit(f"{' '.join(argv[:8])}... failed ({proc.returncode}):\n"
                         f"{out.decode(errors='replace')[-3000:]}")
    return sample


def fork_floor(size_mb: int, rounds: int = 200) -> float:
    """Seconds per fork + exit + wait of a process with size_mb of touched heap."""
    code = (f"import os,time\nb=bytearray({size_mb}<<20)\nfor i in range(0,len(b),4096): b[i]=1\n"
            f"t=time.perf_counter()\nfor _ in range({rounds}):\n    p=os.fork()\n"
            "    if p==0: os._exit(0)\n    os.waitpid(p,0)\n"
            f"print((time.perf_counter()-t)/{rounds})")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backend", default="chroot")
    p.add_argument("--tests", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.backend not in ("chroot", "lxc", "schroot"):
        p.error("--backend: chroot, lxc or schroot (the agent must be a descendant of the "
                "pytest process; a docker container's is the engine's)")
    n = args.tests
    per: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="isolate-bench-cpu-") as tmp:
        project = Path(tmp)
        write_project(project, args.backend, n + 1)
        measure(project, 1)  # warm the caches
        for _ in range(args.repeats):
            one, many = measure(project, 1), measure(project, n + 1)
            for role in one:
                per.setdefault(role, []).append((many[role] - one[role]) / n)
    print(f"CPU time per trivial test, {args.backend}, reset=test: (N={n + 1} - N=1) / {n}, "
          f"median of {args.repeats}; {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}")
    total = 0.0
    for role, values in per.items():
        if role == FAULTS:
            continue
        med = statistics.median(values)
        total += med
        print(f"  {role:<17} {med * 1000:6.2f} ms")
    print(f"  {'total':<17} {total * 1000:6.2f} ms")
    print(f"  the test workers' minor page faults (copy-on-write after the fork, mostly): "
          f"{statistics.median(per[FAULTS]):.0f} per test")
    print(f"floor: fork + exit + wait of a 30 MB process here: {fork_floor(30) * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
