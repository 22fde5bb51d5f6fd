"""A 1-second session fixture used by N tests: host vs inside (issue 18).

    .venv/bin/python bench/bench_fixtures.py [--backends chroot,docker,lxc,schroot]
                                             [--tests 5] [--repeats 3] [--setup 1.0]
                                             [--no-warm]

Generates a throw-away project whose conftest has a session-scoped fixture that
sleeps --setup seconds, used by --tests trivial tests, and times the whole
``pytest`` process: locally (no isolation), inside each backend with a clean
state per test (the default reset = "test": the zygote sets the fixture up once),
inside with ``--isolate-reset session`` for reference, and with warm environments
(``--isolate-warm``: the run takes a keeper's spare, started before it; each timed
run waits until the spare is ready, as a user's next run finds it).  Medians over
--repeats interleaved runs; the ratio to the local run is the issue's figure
(target <= 1.2x).  Caches must be warm (one untimed run per subject first).
Results: bench/results/fixtures.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import WARM_SECONDS, settle, stop_keepers, user_environ, wait_for_spare  # noqa: E402

PYTEST = Path(sys.executable).parent / "pytest"
TARGET = 1.2

CONFTEST = """
import time
import pytest

SETUPS = []

@pytest.fixture(scope="session")
def expensive():
    time.sleep({setup})
    SETUPS.append(1)
    yield len(SETUPS)
"""

TESTS = """
def test_{i}(expensive):
    assert expensive == 1  # set up once, as on the host
"""


def write_project(root: Path, n: int, setup: float) -> None:
    (root / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    (root / "conftest.py").write_text(CONFTEST.format(setup=setup))
    (root / "test_fixture.py").write_text("".join(TESTS.format(i=i) for i in range(n)))


def timed(project: Path, args: Sequence[str], n: int) -> float:
    argv = [str(PYTEST), "-p", "no:cacheprovider", "-q", "--isolate-strict", *args]
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=project, capture_output=True, text=True, timeout=900,
                          env=user_environ())
    wall = time.monotonic() - started
    if proc.returncode != 0 or f"{n} passed" not in proc.stdout:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return wall


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backends", default="chroot,docker,lxc,schroot")
    p.add_argument("--tests", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--setup", type=float, default=1.0, help="seconds the fixture's set-up takes")
    p.add_argument("--output", type=Path, default=BENCH / "results" / "fixtures.json")
    p.add_argument("--no-warm", action="store_true",
                   help="skip the runs that take a keeper's spare (--isolate-warm)")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    subjects: dict[str, list[str]] = {"local": []}
    for b in backends:
        subjects[b] = ["--isolate-env", b]
        subjects[f"{b} reset=session"] = ["--isolate-env", b, "--isolate-reset", "session"]
        if not args.no_warm:
            subjects[f"{b} warm"] = ["--isolate-env", b, f"--isolate-warm={WARM_SECONDS}"]
    samples: dict[str, list[float]] = {s: [] for s in subjects}
    with tempfile.TemporaryDirectory(prefix="isolate-bench-fixtures-") as tmp:
        project = Path(tmp)
        write_project(project, args.tests, args.setup)
        for name, extra in subjects.items():  # warm the caches (and start keepers), untimed
            if name != "local":
                timed(project, extra, args.tests)
        try:
            for _ in range(args.repeats):
                for name, extra in subjects.items():
                    if name.endswith(" warm"):  # as a user's next run finds it
                        wait_for_spare(project, name.split()[0])
                    else:  # no keeper's work in the way of the run
                        settle(project)
                    samples[name].append(timed(project, extra, args.tests))
        finally:
            stop_keepers(project)
    local = statistics.median(samples["local"])
    print(f"{args.tests} tests using one {args.setup:g} s session fixture; whole pytest process, "
          f"median of {args.repeats}; load {os.getloadavg()[0]:.2f}")
    print(f"{'subject':<26}{'wall':>8}{'vs local':>10}  verdict (<= {TARGET}x, reset=test; "
          "warm: reset=test with --isolate-warm)")
    result = {"tests": args.tests, "setup": args.setup, "samples": samples, "medians": {}}
    for name, values in samples.items():
        med = statistics.median(values)
        ratio = med / local
        result["medians"][name] = med
        verdict = "" if name == "local" or "reset=session" in name else (
            "PASS" if ratio <= TARGET else "MISS")
        print(f"{name:<26}{med:>7.2f}s{ratio:>9.2f}x  {verdict}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
