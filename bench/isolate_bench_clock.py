"""A pytest plugin that bench/run.py loads into the *host* pytest (``-p isolate_bench_clock``).

It records CLOCK_MONOTONIC timestamps (the same clock as the benchmark's
``time.monotonic()``, so they compare across processes) of the moments that
matter, and writes them as JSON to the path in ``ISOLATE_BENCH_CLOCK`` when
pytest ends:

- ``import``: this plugin was imported (pytest is parsing its arguments);
- ``configure``: every plugin is configured;
- ``collected``: the host finished collecting;
- ``results``: one timestamp per test result (the ``call`` report, or a failed /
  skipped ``setup`` report), in the order the terminal shows them.

It is not forwarded into environments: the agent starts pytest with its own
argument list, and no backend passes PYTHONPATH through.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

_MARKS: dict[str, float] = {"import": time.monotonic()}
_RESULTS: list[float] = []


def pytest_configure(config: Any) -> None:
    _MARKS.setdefault("configure", time.monotonic())


def pytest_collection_finish(session: Any) -> None:
    _MARKS["collected"] = time.monotonic()


def pytest_runtest_logreport(report: Any) -> None:
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _RESULTS.append(time.monotonic())


def pytest_unconfigure(config: Any) -> None:
    path = os.environ.get("ISOLATE_BENCH_CLOCK")
    if path:
        with open(path, "w") as f:
            json.dump({"marks": _MARKS, "results": _RESULTS, "pid": os.getpid()}, f)
