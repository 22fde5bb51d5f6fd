"""A real suite inside an environment against the same suite on the host (issue 10, item 6).

    .venv/bin/python bench/bench_real_suite.py [--backend chroot] [--repeats 1]
                                               [--select tests/test_recipes.py] [--no-layer]
                                               [--deselect NODEID ...]

The suite is more-itertools' own (pinned, several hundred tests, pure Python, unittest
style with subtests), from its sdist, fetched once into --workdir. One run measures, with
warm caches, interleaved per repeat:

1. ``host``: the suite run by this venv's pytest on the host (the baseline);
2. ``reset=test``: ``--isolate-env BACKEND`` with a fresh root per test (the default);
3. ``reset=session``: the same with ``--isolate-reset session`` (one worker for the run);

and the dependency layer (the project installed editable into a venv inside): built cold
(a copy of the tree at a new path: a new layer key, the root filesystem and pip's download
cache stay warm) and warm (the same copy again: a cache hit), from the layer's manifest
(``build_seconds``) and the environment's provision phase in ``--isolate-report``.

It prints each figure with its ratio to the host baseline and writes every sample to
bench/results/real-suite.json. The outcome counts of every run must equal the host's
(else exit status 1). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PYTEST = Path(sys.executable).parent / "pytest"
PROJECT = ("more-itertools", "11.2.1")
SUMMARY = re.compile(r"(\d+) (subtests passed|subtests failed|subtests skipped|passed|failed|skipped|"
                     r"xfailed|xpassed|errors?|deselected)\b")


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def fetch(workdir: Path) -> Path:
    """The project's tree, unpacked once (its path stays the same: the layer key has it)."""
    name, version = PROJECT
    tree = workdir / f"{name}-{version}"
    if tree.is_dir():
        return tree
    sdists = workdir / "sdists"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                    ":all:", f"{name}=={version}", "-d", str(sdists)], check=True)
    (sdist,) = sdists.glob(f"{name.replace('-', '_')}-{version}.tar.gz")
    tmp = Path(tempfile.mkdtemp(dir=workdir))
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)
    (top,) = tmp.iterdir()
    top.rename(tree)
    tmp.rmdir()
    return tree


def counts(output: str) -> dict[str, int]:
    for line in reversed(output.splitlines()):
        found = SUMMARY.findall(line)
        if found and re.search(r" in [\d.]+s", line):
            return {("errors" if k == "error" else k): int(n) for n, k in found}
    return {}


def run(tree: Path, args: Sequence[str], report: Path | None = None) -> tuple[float, dict[str, int],
                                                                             dict[str, Any], str]:
    argv = [str(PYTEST), "-p", "no:cacheprovider", "-q", *args]
    if report is not None:
        report.unlink(missing_ok=True)
        argv += ["--isolate-strict", f"--isolate-report={report}"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=tree, env=environ, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    wall = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} exited with {proc.returncode}:\n{out[-4000:]}")
    data = json.loads(report.read_text()) if report is not None and report.exists() else {}
    return wall, counts(proc.stdout), data, out


def layer_manifests(cache: Path, since: float) -> list[dict[str, Any]]:
    found = []
    for manifest in (cache / "deps").glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        if data.get("created", 0) >= since and "more" in str(data.get("plan", "")).lower():
            found.append(data)
    return found


def ratio(value: float, base: float) -> str:
    return f"{value / base:5.2f}x" if base > 0 else "-"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="chroot", help="environment to run in (chroot)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats (1)")
    parser.add_argument("--select", nargs="*", default=[],
                        help="paths/node ids of the suite to run (default: all of it)")
    parser.add_argument("--deselect", action="append", default=[], metavar="NODEID",
                        help="leave a test out of every run (repeatable), e.g. one whose time "
                             "depends on the interpreter more than on isolation")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "pytest-isolate-bench-real-suite")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "PYTEST_ISOLATE_CACHE_DIR", "~/.cache/pytest-isolate")).expanduser(),
        help="pytest-isolate's cache (default: $PYTEST_ISOLATE_CACHE_DIR or ~/.cache/pytest-isolate)")
    parser.add_argument("--no-layer", action="store_true", help="skip the layer build figures")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "real-suite.json")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tree = fetch(args.workdir)
    env = args.backend
    report = args.workdir / "report.json"
    inside = ["--isolate-env", env, f"--isolate-cache-dir={args.cache_dir}"]
    picked = [*args.select, *(f"--deselect={nodeid}" for nodeid in args.deselect)]
    subjects = {
        "host": picked,
        "reset=test": [*inside, "--isolate-reset", "test", *picked],
        "reset=session": [*inside, "--isolate-reset", "session", *picked],
    }

    log(f"{PROJECT[0]} {PROJECT[1]} in {tree}; warm-up (builds the layer if missing)")
    _, host_counts, _, _ = run(tree, subjects["host"])
    run(tree, subjects["reset=test"], report)
    samples: dict[str, list[float]] = {k: [] for k in subjects}
    phases: dict[str, list[dict[str, Any]]] = {k: [] for k in subjects}
    problems: list[str] = []
    for r in range(args.repeats):
        for name, argv_ in subjects.items():
            log(f"repeat {r + 1}/{args.repeats}: {name}")
            wall, got, data, _ = run(tree, argv_, None if name == "host" else report)
            samples[name].append(wall)
            if data:
                phases[name].append(data["environments"].get(env, {}))
            if got != host_counts:
                problems.append(f"{name}: counts {got} differ from the host's {host_counts}")

    layer: dict[str, Any] = {}
    if not args.no_layer:
        copy = args.workdir / f"cold-{os.getpid()}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(tree, copy, ignore=shutil.ignore_patterns("__pycache__"))
        one = ["tests/test_recipes.py::TakeTests"]
        try:
            for state in ("cold", "warm"):
                log(f"dependency layer: {state}")
                since = time.time()
                wall, _, data, _ = run(copy, [*inside, *one], report)
                built = layer_manifests(args.cache_dir, since)
                layer[state] = {
                    "wall": wall,
                    "provision": data["environments"][env]["provision"],
                    "build_seconds": built[0]["build_seconds"] if built else None,
                    "built": bool(built),
                }
                if state == "cold" and built:
                    layer["key"] = built[0]["key"]
            layer["ok"] = layer["cold"]["built"] and not layer["warm"]["built"]
            if not layer["ok"]:
                problems.append(f"layer: cold built={layer['cold']['built']}, "
                                f"warm built={layer['warm']['built']} (expected True, False)")
        finally:
            shutil.rmtree(copy, ignore_errors=True)
            if "key" in layer:
                subprocess.run([sys.executable, "-m", "pytest_isolate", "cache", "rm",
                                f"--cache-dir={args.cache_dir}", f"deps/{layer['key']}"],
                               cwd=BENCH.parent, capture_output=True, check=False)

    host = statistics.median(samples["host"])
    n = sum(host_counts.get(k, 0) for k in ("passed", "failed", "skipped", "xfailed",
                                           "xpassed", "errors"))
    load_end = os.getloadavg()
    print(f"\n{PROJECT[0]} {PROJECT[1]}: {n} tests ({host_counts}); environment {env!r}; "
          f"{args.repeats} repeat(s), medians; load {load_start[0]:.1f} -> {load_end[0]:.1f} "
          f"on {os.cpu_count()} cpus")
    print(f"{'subject':<16}{'wall':>9}{'vs host':>10}{'added/test':>12}{'start':>8}{'per test':>10}")
    for name, values in samples.items():
        wall = statistics.median(values)
        added = (wall - host) / n * 1000 if n else 0.0
        start = per = ""
        if phases[name]:
            start = f"{statistics.median(p.get('start', 0.0) for p in phases[name]):.2f}s"
            tests = phases[name][-1].get("tests") or 1
            per = f"{statistics.median(p.get('run_total', 0.0) for p in phases[name]) / tests * 1000:.1f}ms"
        print(f"{name:<16}{wall:>8.2f}s{ratio(wall, host):>10}"
              f"{'' if name == 'host' else f'{added:.1f}ms':>12}{start:>8}{per:>10}")
    if layer:
        print("dependency layer (the project editable in a venv inside; one test class run):")
        for state in ("cold", "warm"):
            if state in layer:
                d = layer[state]
                build = f"{d['build_seconds']:.2f}s" if d["build_seconds"] is not None else "-"
                print(f"  {state:<5} provision {d['provision']:6.2f}s  build {build:>7}  "
                      f"run wall {d['wall']:6.2f}s ({ratio(d['wall'], host)} the host's full run)")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "project": list(PROJECT), "backend": env, "repeats": args.repeats,
        "select": args.select, "deselect": args.deselect, "tests": n, "counts": host_counts,
        "samples": samples,
        "environments": phases, "layer": layer, "problems": problems,
        "host": {"cpus": os.cpu_count(), "loadavg_start": list(load_start),
                 "loadavg_end": list(load_end)},
    }, indent=2))
    log(f"wrote {args.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
