"""Phase timing: user_properties on reports, the JSON report, the terminal table."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PHASES = ("provision", "start", "sync", "run", "reset", "teardown")
REPORT_VERSION = 1


class PhaseTimer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def properties(self) -> list[tuple[str, object]]:
        return [(f"isolate.{name}", round(secs, 6)) for name, secs in self.phases.items()]


@dataclasses.dataclass
class EnvStats:
    name: str
    backend: str
    arch: str
    release: str
    key: str = ""
    host: str = "default"
    endpoint: str = ""
    cache_hit: bool | None = None
    provision: float = 0.0
    start: float = 0.0
    starts: int = 0
    #: items bound to this environment when collection ended (after -k, --deselect, --lf)
    bound: int = 0
    tests: int = 0
    run_total: float = 0.0
    #: tests whose worker joined the namespaces a test before it left as they were made
    #: (agent/slots.py) instead of making its own
    reused_roots: int = 0
    logs: dict[str, str] = dataclasses.field(default_factory=dict)
    #: an environment made from an image reference (``image = REF``): the reference and
    #: the digest it was pinned to in this run
    image: str = ""
    digest: str = ""
    #: where root inside lives on the host, as the backend says (chroot: a mapped uid)
    root: str = ""
    #: its instance was a warm keeper's spare (--isolate-warm), not started by this run
    warm: bool = False
    #: that spare was taken before the host collected, and its pytest configured while
    #: the host collected (InstancePool.start_early)
    early: bool = False


@dataclasses.dataclass
class TestRecord:
    nodeid: str
    env: str
    outcome: str
    phases: dict[str, float]


@dataclasses.dataclass
class Move:
    """An environment placed on another pool host than its own (to_host) because its own
    (from_host) failed its health check or died in this run."""

    env: str
    from_host: str
    to_host: str
    reason: str


class RunReport:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.envs: dict[str, EnvStats] = {}
        self.tests: list[TestRecord] = []
        self.moves: list[Move] = []

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "run_id": self.run_id,
            "environments": {n: dataclasses.asdict(s) for n, s in self.envs.items()},
            "tests": [dataclasses.asdict(t) for t in self.tests],
            "moves": [dataclasses.asdict(m) for m in self.moves],
        }

    def merge(self, data: dict[str, Any]) -> None:
        """Add another process's report (to_json() of an xdist worker) to this one."""
        for name, env in data.get("environments", {}).items():
            mine = self.envs.get(name)
            if mine is None:
                self.envs[name] = EnvStats(**env)
                continue
            for key in ("start", "starts", "tests", "run_total"):
                setattr(mine, key, getattr(mine, key) + env[key])
            mine.reused_roots += env.get("reused_roots", 0)
            # every xdist worker collects (and binds) all items: not a sum
            mine.bound = max(mine.bound, env.get("bound", 0))
            # workers build a key once and the others wait for it: the longest is the cost
            mine.provision = max(mine.provision, env["provision"])
            if env.get("cache_hit") is False or mine.cache_hit is None:
                mine.cache_hit = env.get("cache_hit")
            mine.key = mine.key or env.get("key", "")
            mine.image = mine.image or env.get("image", "")
            mine.digest = mine.digest or env.get("digest", "")
            mine.root = mine.root or env.get("root", "")
            for label, path in env.get("logs", {}).items():
                mine.logs.setdefault(label, path)
        self.tests.extend(TestRecord(**t) for t in data.get("tests", []))
        self.moves.extend(Move(**m) for m in data.get("moves", []))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    def table(self) -> list[str]:
        rows = [("environment", "backend", "arch", "bound", "tests", "provision", "start",
                 "per test")]
        for s in self.envs.values():
            prov = "-" if s.cache_hit is None else (
                f"{s.provision:.2f}s (cached)" if s.cache_hit else f"{s.provision:.1f}s (built)")
            per = f"{1000 * s.run_total / s.tests:.1f} ms" if s.tests and s.starts else "-"
            rows.append((s.name, s.backend, s.arch, str(s.bound), str(s.tests), prov,
                         f"{s.start:.2f}s" if s.starts else "-", per))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return lines + [f"image of {s.name}: {s.image} pinned at {s.digest}"
                        for s in self.envs.values() if s.image and s.digest] + [
            f"root of {s.name} is {s.root}" for s in self.envs.values()
            if s.root.startswith("the host's root: ")]
