"""Benchmark pytest-isolate's container backends side by side (issues 2 and 3).

    .venv/bin/python bench/run.py [--backends chroot,docker,lxc,schroot] [--tests 200]
                                  [--repeats 3] [--naive 20] [--quick] [--no-memory]

One run measures, on a generated throw-away project, with warm caches:

1. time from pytest's start to the first test result, per backend, with its
   breakdown (interpreter + pytest start, collection, environment start,
   pytest start-up inside, the first test), next to the same test run locally
   and a bare ``pytest --co -q``;
2. the time each further trivial test adds with a clean state per test
   (reset = "test"): (wall(N) - wall(1)) / (N - 1), minus the same for the
   tests run locally; plus the steady-state interval between results and the
   run / reset phase means from ``--isolate-report``;
3. the naive alternative on the image the docker backend uses: one
   ``docker run --rm --network none`` per test (``python3 -c pass``, and a
   pytest of one test), against the docker backend's cost per test;
4. peak memory of the agent processes per backend.

Each figure is the median over --repeats runs (interleaved across backends).
The table shows PASS / MISS against the issues' targets; everything measured
is written to bench/results/latest.json.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

import procmem  # noqa: E402  (bench/ is on sys.path: this script's directory)

from pytest_isolate.backends.base import SITE, shipped_paths  # noqa: E402

BACKENDS = ("chroot", "docker", "lxc", "schroot")
#: Measured when named in --backends (slow under TCG: use --tests 20 or so); no warm runs.
VM_ENVS = ("qemu_vm", "arm64_vm")
PYTEST = Path(sys.executable).parent / "pytest"
CLOCK_PLUGIN = "isolate_bench_clock"
#: The floor subject: the local tests, each in a fork of the pytest process, nothing more.
FORKED = "local, fork per test"
FORK_PLUGIN = "isolate_bench_forked"
#: Issue 13: pytest start -> first result with a warm cache: ("x", r) is r times the same
#: test run locally in the same benchmark, ("s", t) is t seconds.
FIRST_RESULT_TARGET = {"chroot": ("x", 1.3), "docker": ("s", 0.5), "lxc": ("x", 1.3),
                       "schroot": ("x", 1.3), "qemu_vm": ("s", 0.5), "arm64_vm": ("s", 0.5)}
#: Issue 13: time added per test with a clean state per test.
PER_TEST_TARGET_MS = {"chroot": 5.0, "docker": 8.0, "lxc": 5.0, "schroot": 5.0,
                      "qemu_vm": 30.0, "arm64_vm": 60.0}
#: Issue 3: a fresh container per test must cost more than this many times our per test.
NAIVE_RATIO_TARGET = 10.0
SLEEP = 1.5


#: The name suffix of the first-result subjects whose environment is a keeper's spare.
WARM = "+warm"
#: The name suffix of a VM's subject without a clean state per test (reset = "session"):
#: what a test costs in the guest under TCG before any clean state, in the same run.
SESSION = ", reset=session"
#: --isolate-warm for those runs: outlives the benchmark's gaps between them.
WARM_SECONDS = 300


def user_environ() -> dict[str, str]:
    """The benchmark's environment for the pytest runs it times, as a user's shell has it:
    without PYTHONDONTWRITEBYTECODE (set in some CI shells), whose every run compiles the
    host's plugins again, which no user's second run does."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def project_keepers(project: Path) -> list[dict[str, Any]]:
    from pytest_isolate import config, warm

    cache = os.environ.get("PYTEST_ISOLATE_CACHE_DIR") or config.default_cache_dir()
    return [k for k in warm.keepers(Path(cache))
            if k["rootdir"] == str(project)]


def wait_for_spare(project: Path, backend: str, timeout: float = 120.0) -> None:
    """Until backend's keeper has its spare ready and every other keeper of the project is
    idle too: a keeper that is still stopping the last run's instance or starting its next
    spare would take CPU from the run being timed (another subject's, or the baseline)."""
    settle(project, timeout, backend)


def settle(project: Path, timeout: float = 120.0, backend: str | None = None) -> None:
    """Until every keeper of the project is idle with its spare (and, given backend, one
    of them is backend's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keepers = project_keepers(project)
        if (all(k["spare"] and not k["lent"] for k in keepers)
                and (backend is None or any(k["backend"] == backend for k in keepers))):
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: the keepers{f' (of {backend})' if backend else ''} did not "
                     f"settle within {timeout:g}s")


def stop_keepers(project: Path) -> None:
    from pytest_isolate import warm

    for status in project_keepers(project):
        warm.stop_keeper(status)


# ---------------------------------------------------------------- the project

def write_project(root: Path, backends: Sequence[str], n: int,
                  options: Sequence[str] = ()) -> None:
    """options: "BACKEND.KEY=VALUE" (VALUE a TOML value) for the environment of that name."""
    tables: dict[str, list[str]] = {}
    for option in options:
        env, _, assignment = option.partition(".")
        key, _, value = assignment.partition("=")
        tables.setdefault(env, []).append(f"{key.strip()} = {value.strip()}")
    text = "[tool.pytest.ini_options]\n" + "".join(
        f"\n[tool.pytest-isolate.envs.{env}.options]\n" + "".join(f"{line}\n" for line in lines)
        for env, lines in tables.items())
    (root / "pyproject.toml").write_text(text)

    def module(env: str | None, count: int, body: str = "pass") -> str:
        mark = f'@pytest.mark.isolate("{env}")\n' if env else ""
        tests = "".join(f"\n\n{mark}def test_{i}():\n    {body}\n" for i in range(count))
        return "import time\n\nimport pytest\n" + tests

    for env in (None, *backends):
        name = env or "local"
        (root / f"{name}_one_test.py").write_text(module(env, 1))
        (root / f"{name}_many_test.py").write_text(module(env, n))
        (root / f"{name}_sleep_test.py").write_text(module(env, 1, f"time.sleep({SLEEP})"))


# ---------------------------------------------------------------- one pytest run

@dataclasses.dataclass
class Run:
    argv: list[str]
    returncode: int
    wall: float
    #: seconds after the process was spawned
    marks: dict[str, float]
    results: list[float]
    report: dict[str, Any] | None
    output: str
    memory: procmem.MemoryPeak | None = None

    @property
    def first_result(self) -> float:
        return self.results[0]

    def problem(self, expected: int) -> str | None:
        """Why this run does not count, or None."""
        if self.returncode != 0:
            return f"pytest exited with {self.returncode}:\n{self.output[-3000:]}"
        if len(self.results) != expected:
            return f"{len(self.results)} results, expected {expected}:\n{self.output[-3000:]}"
        if self.report is not None:
            bad = [t for t in self.report.get("tests", []) if t["outcome"] != "passed"]
            if bad:
                return f"tests did not pass inside: {bad[:3]}\n{self.output[-3000:]}"
        return None


def run_pytest(project: Path, args: Sequence[str], tmp: Path, isolate_report: bool = True,
               sample_memory: str | None = None) -> Run:
    """Run the host pytest on args; with sample_memory (a backend name), sample its agents."""
    clock = tmp / "clock.json"
    report = tmp / "report.json"
    for p in (clock, report):
        p.unlink(missing_ok=True)
    argv = [str(PYTEST), "-p", "no:cacheprovider", "-p", CLOCK_PLUGIN, "-q", *args]
    if isolate_report:
        argv += ["--isolate-report", str(report), "--isolate-strict"]
    env = dict(user_environ(), ISOLATE_BENCH_CLOCK=str(clock),
               PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=project, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    memory = None
    if sample_memory is not None:
        with procmem.Sampler(proc.pid, docker=sample_memory == "docker") as sampler:
            out, _ = proc.communicate()
        memory = sampler.peak
    else:
        out, _ = proc.communicate()
    wall = time.monotonic() - t0
    marks: dict[str, float] = {}
    results: list[float] = []
    if clock.exists():
        data = json.loads(clock.read_text())
        marks = {k: v - t0 for k, v in data["marks"].items()}
        results = [v - t0 for v in data["results"]]
    rep = json.loads(report.read_text()) if isolate_report and report.exists() else None
    return Run(argv, proc.returncode, wall, marks, results, rep, out.decode(errors="replace"),
               memory)


def timed(argv: Sequence[str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, check=False)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... exited with {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


# ---------------------------------------------------------------- figures

def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def phase_mean(report: dict[str, Any] | None, phase: str) -> float | None:
    if not report:
        return None
    values = [t["phases"].get(phase, 0.0) for t in report.get("tests", [])]
    return statistics.fmean(values) if values else None


@dataclasses.dataclass
class Samples:
    """Every measured value of one subject (a backend or "local"), one per repeat."""

    first_result: list[float] = dataclasses.field(default_factory=list)
    wall_one: list[float] = dataclasses.field(default_factory=list)
    wall_many: list[float] = dataclasses.field(default_factory=list)
    startup: list[float] = dataclasses.field(default_factory=list)  # spawn -> configure
    collect: list[float] = dataclasses.field(default_factory=list)  # configure -> collected
    env_start: list[float] = dataclasses.field(default_factory=list)
    sync: list[float] = dataclasses.field(default_factory=list)
    first_run: list[float] = dataclasses.field(default_factory=list)
    provision: list[float] = dataclasses.field(default_factory=list)
    marginal: list[float] = dataclasses.field(default_factory=list)  # (wall(N)-wall(1))/(N-1)
    steady: list[float] = dataclasses.field(default_factory=list)  # (last - first result)/(N-1)
    run_mean: list[float] = dataclasses.field(default_factory=list)
    reset_mean: list[float] = dataclasses.field(default_factory=list)
    #: the share of the many-test run's tests whose worker joined a root a test before it
    #: left as it was made (agent/slots.py)
    reused: list[float] = dataclasses.field(default_factory=list)

    def add(self, one: Run, many: Run, n: int) -> None:
        self.add_first(one)
        self.wall_many.append(many.wall)
        self.marginal.append((many.wall - one.wall) / (n - 1))
        self.steady.append((many.results[-1] - many.results[0]) / (n - 1))
        for phase, into in (("run", self.run_mean), ("reset", self.reset_mean)):
            value = phase_mean(many.report, phase)
            if value is not None:
                into.append(value)
        envs = (many.report or {}).get("environments", {})
        tests = sum(e.get("tests", 0) for e in envs.values())
        if tests:
            self.reused.append(sum(e.get("reused_roots", 0) for e in envs.values()) / tests)

    def add_first(self, one: Run) -> None:
        """The first result of a one-test run and its phases (alone: a warm subject)."""
        self.first_result.append(one.first_result)
        self.wall_one.append(one.wall)
        self.startup.append(one.marks.get("configure", 0.0))
        self.collect.append(one.marks.get("collected", 0.0) - one.marks.get("configure", 0.0))
        if one.report and one.report.get("tests"):
            phases = one.report["tests"][0]["phases"]
            self.provision.append(phases.get("provision", 0.0))
            self.env_start.append(phases.get("start", 0.0))
            self.sync.append(phases.get("sync", 0.0))
            self.first_run.append(phases.get("run", 0.0))

    def medians(self) -> dict[str, float | None]:
        return {f.name: median(getattr(self, f.name)) for f in dataclasses.fields(self)}


def subject_argv(name: str, kind: str) -> list[str]:
    """pytest's arguments for subject name's generated file of kind ("one", "many")."""
    if name == FORKED:
        return ["-p", FORK_PLUGIN, f"local_{kind}_test.py"]
    env = name.removesuffix(SESSION)
    return [f"{env}_{kind}_test.py", *(["--isolate-reset", "session"] if env != name else [])]


def added_vs_local(samples: dict[str, Samples], name: str) -> list[float]:
    """Per repeat, what subject name's tests add per test to the local ones'."""
    return [e - loc for e, loc in zip(samples[name].marginal, samples["local"].marginal)]


def verdict(value: float | None, limit: float, above: bool = False) -> str:
    if value is None:
        return "-"
    ok = value > limit if above else value <= limit
    return "PASS" if ok else "MISS"


def ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{1000 * value:.{digits}f} ms"


def sec(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- baselines

def docker_image(report: dict[str, Any] | None) -> str | None:
    """The image the docker backend ran (its tag is pytest-isolate/docker:<key>)."""
    key = ((report or {}).get("environments", {}).get("docker") or {}).get("key")
    if not key:
        return None
    tag = f"pytest-isolate/docker:{key}"
    found = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag],
                           capture_output=True, check=False)
    return tag if found.returncode == 0 else None


def naive_argvs(image: str, project: Path) -> dict[str, list[str]]:
    base = ["docker", "run", "--rm", "--network", "none"]
    mounts = ["-v", f"{project}:{project}:ro"]
    for src, dst in shipped_paths():
        mounts += ["-v", f"{src}:{dst}:ro"]
    envs = ["-e", f"PYTHONPATH={SITE}", "-e", "PYTHONDONTWRITEBYTECODE=1",
            "-e", "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1"]
    return {
        "python3 -c pass": [*base, image, "python3", "-c", "pass"],
        "pytest, 1 test": [*base, *mounts, *envs, "-w", str(project), image, "python3", "-m",
                           "pytest", "-q", "-p", "no:cacheprovider", "local_one_test.py"],
    }


# ---------------------------------------------------------------- main

def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated backends (default: %(default)s)")
    p.add_argument("--tests", type=int, default=200, help="tests in the many-test run (N)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each measurement; medians shown")
    p.add_argument("--naive", type=int, default=20,
                   help="fresh containers per naive variant (docker run per test)")
    p.add_argument("--quick", action="store_true",
                   help="a fast smoke run: --tests 30 --repeats 1 --naive 5")
    p.add_argument("--no-memory", action="store_true", help="skip the memory sampling runs")
    p.add_argument("--no-warm", action="store_true",
                   help="skip the first-result runs with warm environments (--isolate-warm)")
    p.add_argument("--output", type=Path, default=BENCH / "results" / "latest.json")
    p.add_argument("--keep", action="store_true", help="keep the generated project")
    p.add_argument("--option", action="append", default=[], metavar="BACKEND.KEY=VALUE",
                   help="an options key for one backend's environment, VALUE in TOML "
                        "(e.g. chroot.map_root=false: the host's root inside); repeatable")
    args = p.parse_args(argv)
    if args.quick:
        args.tests, args.repeats, args.naive = 30, 1, 5
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS) - set(VM_ENVS))
    if unknown:
        p.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS + VM_ENVS)}")
    for option in args.option:
        env, dot, rest = option.partition(".")
        if not dot or env not in args.backends or "=" not in rest:
            p.error(f"--option {option!r}: expected BACKEND.KEY=VALUE for one of --backends")
    if args.tests < 2 or args.repeats < 1 or args.naive < 0:
        p.error("--tests must be >= 2, --repeats >= 1, --naive >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.load_start = os.getloadavg()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="pytest-isolate-bench-"))
    project = tmp / "project"
    project.mkdir()
    try:
        return bench(args, project, tmp, started)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def bench(args: argparse.Namespace, project: Path, tmp: Path, started: float) -> int:
    n = args.tests
    write_project(project, args.backends, n, args.option)
    failed: dict[str, str] = {}
    backends: list[str] = []

    def one(name: str, isolate: bool = True) -> Run:
        settle(project)
        return run_pytest(project, subject_argv(name, "one"), tmp, isolate and name != FORKED)

    def many(name: str, isolate: bool = True) -> Run:
        settle(project)
        return run_pytest(project, subject_argv(name, "many"), tmp, isolate and name != FORKED)

    def one_warm(name: str) -> Run:
        """One test taken from the keeper's spare (waited for, as a user's next run
        finds it a few seconds after the last one)."""
        wait_for_spare(project, name)
        return run_pytest(project, [f"{name}_one_test.py", f"--isolate-warm={WARM_SECONDS}"],
                          tmp)

    # Warm every cache (built images, the host's bytecode, the page cache) first.
    log("warm-up: local, and local with a fork per test")
    for run in (one("local", False), many("local", False), one(FORKED), many(FORKED)):
        problem = run.problem(1 if "one" in run.argv[-1] else n)
        if problem:
            raise SystemExit(f"bench: the local baseline failed: {problem}")
    docker_report: dict[str, Any] | None = None
    for b in args.backends:
        log(f"warm-up: {b} (builds its image if the cache lacks it)")
        run = one(b)
        problem = run.problem(1)
        if problem is None:
            run = many(b)
            problem = run.problem(n)
        if problem:
            failed[b] = problem
            log(f"{b} is left out: {problem.splitlines()[0]}")
            continue
        backends.append(b)
        if b == "docker":
            docker_report = run.report

    warm = [] if args.no_warm else [b for b in backends if b not in VM_ENVS]
    for b in warm:  # a cold run that leaves the keeper the timed runs take spares from
        log(f"warm-up: {b} with --isolate-warm (starts its keeper)")
        run = run_pytest(project, [f"{b}_one_test.py", f"--isolate-warm={WARM_SECONDS}"], tmp)
        problem = run.problem(1)
        if problem:
            raise SystemExit(f"bench: {b} with --isolate-warm failed: {problem}")

    sessions = [f"{b}{SESSION}" for b in backends if b in VM_ENVS]
    samples: dict[str, Samples] = {name: Samples()
                                   for name in ("local", FORKED, *backends, *sessions)}
    samples.update({f"{b}{WARM}": Samples() for b in warm})
    bare: list[float] = []
    bare_argv = [str(PYTEST), "-p", "no:cacheprovider", "--co", "-q", "local_one_test.py"]
    for r in range(args.repeats):
        log(f"repeat {r + 1}/{args.repeats}: local, bare --co, fork per test, "
            f"{', '.join(backends)}")
        settle(project)
        t0 = time.monotonic()
        subprocess.run(bare_argv, cwd=project, capture_output=True, check=True,
                       env=user_environ())
        bare.append(time.monotonic() - t0)
        for name in ("local", FORKED, *backends, *sessions):
            isolate = name not in ("local", FORKED)
            r1, rn = one(name, isolate), many(name, isolate)
            problem = r1.problem(1) or rn.problem(n)
            if problem:
                raise SystemExit(f"bench: {name} failed in repeat {r + 1}: {problem}")
            samples[name].add(r1, rn, n)
        for b in warm:
            run = one_warm(b)
            problem = run.problem(1)
            if problem is None and not (run.report or {}).get("environments", {}).get(
                    b, {}).get("warm"):
                problem = "the run did not take the keeper's spare"
            if problem:
                raise SystemExit(f"bench: {b}{WARM} failed in repeat {r + 1}: {problem}")
            samples[f"{b}{WARM}"].add_first(run)
    stop_keepers(project)

    naive: dict[str, list[float]] = {}
    image = docker_image(docker_report) if "docker" in backends else None
    if image and args.naive:
        for label, argv in naive_argvs(image, project).items():
            log(f"naive baseline: {args.naive} x docker run ({label}) on {image}")
            naive[label] = [timed(argv) for _ in range(args.naive)]

    memory: dict[str, procmem.MemoryPeak] = {}
    if not args.no_memory:
        for b in backends:
            log(f"memory: {b} (one test sleeping {SLEEP}s while /proc is sampled)")
            run = run_pytest(project, [f"{b}_sleep_test.py"], tmp, True, sample_memory=b)
            problem = run.problem(1)
            if problem is None and run.memory is not None:
                memory[b] = run.memory
            else:
                log(f"memory: {b} failed: {problem}")

    elapsed = time.monotonic() - started
    text, doc = render(args, backends, failed, samples, bare, naive, image, memory, elapsed)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    log(f"wrote {args.output} ({elapsed:.0f}s in all)")
    return 1 if failed else 0


def render(args: argparse.Namespace, backends: list[str], failed: dict[str, str],
           samples: dict[str, Samples], bare: list[float], naive: dict[str, list[float]],
           image: str | None, memory: dict[str, procmem.MemoryPeak],
           elapsed: float) -> tuple[str, dict[str, Any]]:
    n = args.tests
    med = {name: s.medians() for name, s in samples.items()}
    local = med["local"]
    verdicts: dict[str, dict[str, str]] = {}
    out: list[str] = []
    load = os.getloadavg()
    out.append(f"pytest-isolate benchmark: {os.cpu_count()} cpus, load average (1 min) "
               f"{args.load_start[0]:.2f} at start, {load[0]:.2f} at end; medians of "
               f"{args.repeats} run(s) unless marked best (the minimum); {elapsed:.0f}s in all")

    # 1. first result
    rows = [["subject", "first result", "best", "target", "", "vs local", "py+pytest start",
             "collect", "cache", "env start", "pytest inside", "1st test", "other"]]
    rows.append(["local (unmarked)", sec(local["first_result"]),
                 sec(min(samples["local"].first_result)), "", "", "",
                 sec(local["startup"]), sec(local["collect"]), "", "", "", "",
                 sec(_rest(local))])
    rows.append(["bare pytest --co -q", sec(median(bare)), sec(min(bare)), "", "", "", "", "", "",
                 "", "", "", ""])
    for b in [*backends, *(f"{b}{WARM}" for b in backends if f"{b}{WARM}" in med)]:
        m = med[b]
        kind, bound = FIRST_RESULT_TARGET[b.removesuffix(WARM)]
        base = local["first_result"]
        limit = bound if kind == "s" else (None if base is None else bound * base)
        v = verdict(m["first_result"], limit) if limit is not None else "-"
        verdicts.setdefault(b, {})["first_result"] = v
        rows.append([b, sec(m["first_result"]), sec(min(samples[b].first_result)),
                     f"<= {bound:g} s" if kind == "s" else f"<= {bound:g}x local", v,
                     "+" + sec(_sub(m["first_result"], local["first_result"])),
                     sec(m["startup"]), sec(m["collect"]), sec(m["provision"]),
                     sec(m["env_start"]), sec(m["sync"]), sec(m["first_run"]), sec(_rest(m))])
    out += ["", "1. pytest start -> first result, warm cache, one trivial test "
            "(wall clock from spawning pytest to the first result)", table(rows)]

    # 2. per test
    naive_pass = median(naive.get("python3 -c pass", []))
    rows = [["subject", "wall(1)", f"wall({n})", "per test", "added vs local", "min..max",
             "target", "", "steady", "run phase", "reset phase", "roots reused",
             "docker-run ÷ this"]]
    rows.append(["local (unmarked)", sec(local["wall_one"]), sec(local["wall_many"]),
                 ms(local["marginal"], 2), "", "", "", "", ms(local["steady"], 2), "", "", "",
                 ""])
    forked = med[FORKED]
    added = added_vs_local(samples, FORKED)
    rows.append([FORKED, sec(forked["wall_one"]), sec(forked["wall_many"]),
                 ms(forked["marginal"]), ms(median(added)), f"{ms(min(added))}..{ms(max(added))}",
                 "(floor)", "", ms(forked["steady"]), "", "", "", ""])
    for b in backends:
        m = med[b]
        added = added_vs_local(samples, b)
        limit = PER_TEST_TARGET_MS[b]
        v = verdict(None if not added else median(added), limit / 1000)
        verdicts.setdefault(b, {})["per_test"] = v
        ratio = (f"{naive_pass / m['marginal']:.0f}x" if naive_pass and m["marginal"]
                 else "-")
        rows.append([b, sec(m["wall_one"]), sec(m["wall_many"]), ms(m["marginal"]),
                     ms(median(added)), f"{ms(min(added))}..{ms(max(added))}",
                     f"<= {limit:g} ms", v, ms(m["steady"]), ms(m["run_mean"]),
                     ms(m["reset_mean"]),
                     "-" if m["reused"] is None else f"{100 * m['reused']:.0f} %", ratio])
        if f"{b}{SESSION}" in med:  # a VM: the same tests without a clean state
            m = med[f"{b}{SESSION}"]
            added = added_vs_local(samples, f"{b}{SESSION}")
            rows.append([f"{b}{SESSION}", sec(m["wall_one"]), sec(m["wall_many"]),
                         ms(m["marginal"]), ms(median(added)),
                         f"{ms(min(added))}..{ms(max(added))}", "(no clean state)", "",
                         ms(m["steady"]), ms(m["run_mean"]), ms(m["reset_mean"]), "", ""])
    out += ["", f"2. clean state per test (reset=test): {n} trivial tests in one environment; "
            f"per test = (wall({n}) - wall(1)) / {n - 1}; added = per test - local per test; "
            f"'{FORKED}': the local tests, each in a fork of the pytest process and nothing "
            "more (bench/isolate_bench_forked.py), the floor of any fork per test; "
            f"'VM{SESSION}': the same tests in the VM without a clean state per test",
            table(rows)]
    for b in backends:
        if f"{b}{SESSION}" in med:
            with_state = med[b]["marginal"]
            without = med[f"{b}{SESSION}"]["marginal"]
            if with_state is not None and without is not None:
                out.append(f"{b}: a clean state per test adds {ms(with_state - without)} per "
                           f"test to the same tests in the same VM without one")

    # 3. naive baseline
    rows = [["baseline", "per test", "min..max", "÷ docker backend per test", "target", ""]]
    docker_marginal = med.get("docker", {}).get("marginal")
    for label, values in naive.items():
        per = median(values)
        times = per / docker_marginal if per and docker_marginal else None
        v = verdict(times, NAIVE_RATIO_TARGET, above=True)
        verdicts.setdefault("docker", {})[f"naive_ratio[{label}]"] = v
        rows.append([f"docker run --rm per test: {label}", ms(per, 0),
                     f"{ms(min(values), 0)}..{ms(max(values), 0)}",
                     "-" if times is None else f"{times:.1f}x", f"> {NAIVE_RATIO_TARGET:g}x", v])
    if naive:
        out += ["", f"3. naive container-per-test on the docker backend's image {image} "
                f"({len(next(iter(naive.values())))} containers each)", table(rows)]
    elif "docker" in args.backends:
        out += ["", "3. naive container-per-test: not measured (no docker image / --naive 0)"]

    # 4. memory
    if memory:
        rows = [["backend", "agent VmHWM", "agent VmRSS", "worker VmHWM", "agent+workers Pss",
                 "samples"]]
        for b, peak in memory.items():
            rows.append([b, _mb(peak.agent_hwm_kb), _mb(peak.agent_rss_kb),
                         _mb(peak.worker_hwm_kb), _mb(peak.total_pss_kb), str(peak.samples)])
        out += ["", "4. memory of the agent processes (peak over one test that sleeps "
                f"{SLEEP:g}s)", table(rows)]

    for b, why in failed.items():
        out += ["", f"{b}: NOT MEASURED: {why}"]
    doc = {
        "version": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"backends": args.backends, "tests": n, "repeats": args.repeats,
                     "options": args.option,
                     "naive": args.naive, "sleep": SLEEP},
        "host": {"cpus": os.cpu_count(), "loadavg_start": list(args.load_start),
                 "loadavg_end": list(load),
                 "python": sys.version.split()[0]},
        "targets": {"first_result": FIRST_RESULT_TARGET, "per_test_ms": PER_TEST_TARGET_MS,
                    "naive_ratio": NAIVE_RATIO_TARGET},
        "medians": med,
        "samples": {name: dataclasses.asdict(s) for name, s in samples.items()},
        "bare_collect_only": bare,
        "naive": {"image": image, "samples": naive},
        "memory_kb": {b: dataclasses.asdict(p) for b, p in memory.items()},
        "verdicts": verdicts,
        "failed": failed,
        "elapsed_s": elapsed,
    }
    return "\n".join(out), doc


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _rest(m: dict[str, float | None]) -> float | None:
    """first result minus the parts the other columns account for."""
    if m["first_result"] is None:
        return None
    parts = ("startup", "collect", "provision", "env_start", "sync", "first_run")
    return m["first_result"] - sum(m[p] or 0.0 for p in parts)


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB" if kb else "-"


if __name__ == "__main__":
    sys.exit(main())
