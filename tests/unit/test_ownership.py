"""The one ownership rule (pytest_isolate.ownership): an owner is a pid and its start time.

Pure: real processes of this machine (this one, a zombie child, a pid that exited), no
backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from shared_support import wait_for

from pytest_isolate.ownership import (
    OWNER_FILE,
    Owner,
    RunId,
    process_start_time,
    record_run,
    run_dir_finished,
    run_gone,
    run_owner,
)


def my_start() -> int:
    start = process_start_time(os.getpid())
    assert start is not None
    return start


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def zombie() -> Iterator[tuple[int, int]]:
    """(pid, start time while it ran) of a child that exited and was not waited for."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    start = process_start_time(proc.pid)
    assert proc.stdin is not None
    proc.stdin.close()
    wait_for("the child to exit (a zombie)",
             lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
             30, interval=0.01)
    try:
        assert start is not None
        yield proc.pid, start
    finally:
        proc.wait()


# ------------------------------------------------------------------ Owner
def test_this_process_is_alive() -> None:
    me = Owner.me()
    assert me == Owner(os.getpid(), my_start())
    assert me.alive()
    assert Owner.from_label(json.loads(json.dumps(me.label()))) == me


def test_a_reused_pid_is_not_the_owner() -> None:
    assert not Owner(os.getpid(), my_start() + 1).alive()


def test_a_zombie_is_not_alive(zombie: tuple[int, int]) -> None:
    pid, start = zombie
    assert Path(f"/proc/{pid}").exists()  # the pid is still taken
    assert not Owner(pid, start).alive()
    assert not Owner(pid, None).alive()


def test_an_unknown_start_is_judged_by_the_pid_alone(dead_pid: int) -> None:
    assert Owner(os.getpid(), None).alive()  # conservative: kept while the pid runs
    assert not Owner(dead_pid, None).alive()


def test_every_carrier_reads_the_same_owner() -> None:
    me = Owner.me()
    assert Owner.from_name(me.name) == me
    assert Owner.from_name(f"{me.name}-1a2b3c4d") == me  # a cgroup's name
    assert Owner.from_name("4242\n") == Owner(4242, None)  # an older QEMU pid file
    assert Owner.from_fields(str(me.pid), str(me.start)) == me  # docker labels
    assert Owner.from_fields("4242", "") == Owner(4242, None)


@pytest.mark.parametrize("carrier", [
    {"run_id": "x"}, {"pid": "nope", "start": 1}, {"pid": True}, {"pid": 0}, ["pid", 1], None,
])
def test_a_label_without_an_owner_names_none(carrier: object) -> None:
    assert Owner.from_label(carrier) is None


@pytest.mark.parametrize("name", ["", "abc", "12-deadbeef", "-12-34", "12-34x"])
def test_a_name_without_an_owner_names_none(name: str) -> None:
    assert Owner.from_name(name) is None


# ------------------------------------------------------------------ RunId
@pytest.mark.parametrize("suffix", ["", "gw0", "shell"])
def test_a_run_id_round_trips(suffix: str) -> None:
    run = RunId.create(suffix)
    assert run.pid == os.getpid()
    text = str(run)
    assert text.startswith(time.strftime("%Y%m%d-")) and text.endswith(suffix)
    assert RunId.parse(text) == run


def test_a_name_that_starts_with_a_run_id_parses_to_its_run() -> None:
    run = RunId.parse("20250101-000000-1234-gw1-py312-3")
    assert run is not None
    assert (run.stamp, run.pid, run.stem) == ("20250101-000000", 1234, "20250101-000000-1234")
    assert RunId.parse("20250101-000000-1234") == RunId("20250101-000000", 1234)
    for other in ("gc", "doctor", "2025-000000-1", "20250101-000000-x", "20250101-000000-1:py"):
        assert RunId.parse(other) is None


# ------------------------------------------------------------------ runs
def test_a_foreign_or_old_format_name_is_not_judged_gone(tmp_path: Path) -> None:
    for name in ("py312-1", "itest-abcdef12", "gc", "20250101-1234"):
        assert not run_gone(name, tmp_path)


def test_a_run_without_a_recorded_owner_is_judged_by_its_pid(tmp_path: Path,
                                                            dead_pid: int) -> None:
    assert not run_gone(f"20250101-000000-{os.getpid()}-py312-1", tmp_path)
    assert not run_gone(f"20250101-000000-{os.getpid()}", None)
    assert run_gone(f"20250101-000000-{dead_pid}-py312-1", tmp_path)


def test_a_recorded_owner_tells_a_reused_pid(tmp_path: Path) -> None:
    """A run directory records its owner's start time, so a name that holds only the pid
    (an lxc cgroup, a QEMU -name) is judged by pid and start time."""
    mine = tmp_path / str(RunId.create("gw0"))
    record_run(mine)
    assert json.loads((mine / OWNER_FILE).read_text()) == Owner.me().label()
    run = RunId.parse(mine.name)
    assert run is not None
    assert run_owner(run, tmp_path) == Owner.me()
    assert not run_gone(f"{mine.name}-py312-1", tmp_path)
    assert not run_dir_finished(mine)

    reused = tmp_path / f"20250101-000000-{os.getpid()}"
    reused.mkdir()
    (reused / OWNER_FILE).write_text(json.dumps(Owner(os.getpid(), my_start() - 1).label()))
    assert run_gone(f"{reused.name}-py312-1", tmp_path)
    assert run_dir_finished(reused)


def test_scratch_directories_of_the_cli_are_finished(tmp_path: Path, dead_pid: int) -> None:
    for name in ("gc", "doctor"):
        (tmp_path / name).mkdir()
        assert run_dir_finished(tmp_path / name)
    old = tmp_path / f"20250101-000000-{dead_pid}-shell"
    old.mkdir()
    assert run_dir_finished(old)
    running = tmp_path / f"20250101-000000-{os.getpid()}"
    running.mkdir()
    assert not run_dir_finished(running)
