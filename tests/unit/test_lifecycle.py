"""The lifecycle template (Backend.start over launch() and an ExitStack), driven through
the unit tests' fake backend: a real agent subprocess on the host, no isolation (see
fake_backend.py).  What is checked: what a launch made is undone, in reverse, exactly
once -- when the launch fails, when the handshake fails, or when the instance stops --
and the reap-once guard."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
from fake_backend import FakeBackend

from pytest_isolate.backends.base import Backend, Instance, Launch, LiveSet, RunContext
from pytest_isolate.cache import Cache, Entry
from pytest_isolate.errors import IsolateError
from pytest_isolate.spec import EnvSpec

SPEC = EnvSpec("fake", "fake")


class Recording(FakeBackend):
    """The fake backend with two undos on its stack, recorded in `events`; it fails where
    told: "launch" (after the undos are pushed), "ready" (after a real handshake)."""

    def __init__(self, run: RunContext, fail: str = "") -> None:
        super().__init__(run)
        self.fail = fail
        self.events: list[str] = []
        self.reaps = 0

    def reap(self) -> list[str]:
        self.reaps += 1
        return []

    def launch(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
               image: Entry) -> Launch:
        stack.callback(self.events.append, "undo first made")
        stack.callback(self.events.append, "undo second made")
        launch = super().launch(stack, spec, image)
        self.events.append("launched")
        if self.fail == "launch":
            launch.process.stop()  # the transport is the launch's own until it returns
            raise IsolateError("launch failed on purpose")
        return launch

    def ready(self, instance: Instance, launch: Launch) -> None:
        super().ready(instance, launch)
        self.events.append(f"handshake from pid {instance.hello.get('pid')}")
        if self.fail == "ready":
            raise IsolateError("ready failed on purpose")


@pytest.fixture
def run(tmp_path: Path) -> RunContext:
    (tmp_path / "logs").mkdir()
    return RunContext(run_id="unit", rootdir=tmp_path, cache=Cache(tmp_path / "cache"),
                      log_dir=tmp_path / "logs", work_dir=tmp_path / "work",
                      progress=lambda _m: None)


def test_a_started_instance_keeps_its_undos_until_it_stops_once(run: RunContext) -> None:
    backend = Recording(run)
    with backend.start(SPEC, backend.provision(SPEC)) as instance:
        assert instance.alive()
        assert list(instance.logs) == ["agent", "provision"]
        assert backend.events[0] == "launched"
        assert not any(e.startswith("undo") for e in backend.events)
    assert not instance.alive()
    assert backend.events[-2:] == ["undo second made", "undo first made"]
    instance.stop()  # a second stop undoes nothing twice
    assert backend.events.count("undo first made") == 1


def test_a_failed_launch_unwinds_what_it_made(run: RunContext) -> None:
    backend = Recording(run, fail="launch")
    with pytest.raises(IsolateError, match="launch failed on purpose"):
        backend.start(SPEC, backend.provision(SPEC))
    assert backend.events == ["launched", "undo second made", "undo first made"]


def test_a_failed_handshake_stops_the_agent_then_unwinds(run: RunContext) -> None:
    backend = Recording(run, fail="ready")
    with pytest.raises(IsolateError, match="ready failed on purpose"):
        backend.start(SPEC, backend.provision(SPEC))
    assert backend.events[0] == "launched"
    assert backend.events[1].startswith("handshake from pid ")
    assert backend.events[2:] == ["undo second made", "undo first made"]
    pid = int(backend.events[1].rsplit(" ", 1)[1])
    with pytest.raises(ProcessLookupError):  # the agent was stopped (and waited for)
        os.kill(pid, 0)


def test_reap_runs_once_per_backend_object(run: RunContext) -> None:
    backend = Recording(run)
    image = backend.provision(SPEC)
    for _ in range(2):
        backend.start(SPEC, image).stop()
    backend.reap_once()
    assert backend.reaps == 1

    class NoReapAtStart(Recording):
        reaps_at_start = False

    quiet = NoReapAtStart(run)
    quiet.start(SPEC, image).stop()
    assert quiet.reaps == 0


def test_a_backend_with_neither_launch_nor_start_says_so(run: RunContext) -> None:
    class Bare(Backend):
        name = "bare"

        def check(self, spec: EnvSpec) -> None:
            pass

        def provision(self, spec: EnvSpec) -> Entry:
            raise AssertionError("not called")

    with pytest.raises(NotImplementedError, match=r"'bare' \(.*Bare\) implements neither"):
        Bare(run).start(SPEC, Entry("fake", "x", run.cache.root / "x", {}, hit=False))


def test_live_set_ends_only_what_is_still_held() -> None:
    ended: list[tuple[str, Any]] = []
    live: LiveSet[int] = LiveSet(lambda name, item: ended.append((name, item)))
    with contextlib.ExitStack() as stack:
        stack.enter_context(live.holding("kept", 1))
        with live.holding("released", 2):
            pass
        live.end_all()  # what an interrupted run's exit does
    assert ended == [("kept", 1)]
    live.end_all()
    assert ended == [("kept", 1)]
