"""The files of warm environments in <cache>/warm (pytest_isolate/warm.py), without keepers:
what a run remembers of the environments each command used, and what `cache gc` sweeps."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_isolate import warm


def test_the_environments_a_command_used_are_remembered(tmp_path: Path) -> None:
    cmd = warm.command_key(tmp_path / "p", tmp_path / "p", ["tests", "--isolate-warm=60"])
    other = warm.command_key(tmp_path / "p", tmp_path / "p", ["tests", "-k", "x"])
    assert cmd != other
    assert warm.used_last(tmp_path, cmd) == set()  # nothing recorded yet
    warm.remember_used(tmp_path, cmd, {"chroot", "lxc"})
    warm.remember_used(tmp_path, other, set())
    assert warm.used_last(tmp_path, cmd) == {"chroot", "lxc"}
    assert warm.used_last(tmp_path, other) == set()
    warm.remember_used(tmp_path, cmd, {"docker"})  # the last run's, not a union
    assert warm.used_last(tmp_path, cmd) == {"docker"}
    assert os.stat(tmp_path / "warm").st_mode & 0o777 == 0o700


def test_only_the_newest_commands_are_kept(tmp_path: Path) -> None:
    keys = [warm.command_key(tmp_path, tmp_path, [str(i)]) for i in range(warm.USED_COMMANDS + 3)]
    for key in keys:
        warm.remember_used(tmp_path, key, {"chroot"})
    warm.remember_used(tmp_path, keys[3], {"lxc"})  # used again: now the newest
    assert [warm.used_last(tmp_path, k) for k in keys[:3]] == [set()] * 3
    assert warm.used_last(tmp_path, keys[3]) == {"lxc"}
    assert warm.used_last(tmp_path, keys[-1]) == {"chroot"}


def test_an_unreadable_record_is_no_record(tmp_path: Path) -> None:
    key = warm.command_key(tmp_path, tmp_path, [])
    warm.warm_dir(tmp_path)
    (tmp_path / "warm" / warm.USED).write_text("[1, 2")
    assert warm.used_last(tmp_path, key) == set()
    warm.remember_used(tmp_path, key, {"chroot"})  # replaced whole
    assert warm.used_last(tmp_path, key) == {"chroot"}


def test_gc_sweeps_ended_keepers_files_and_keeps_the_record(tmp_path: Path) -> None:
    directory = warm.warm_dir(tmp_path)
    gone = "0123456789abcdef0123456789abcdef"
    for suffix in (".sock", ".json", ".log", ".lock"):
        (directory / f"{gone}{suffix}").write_text("")
    warm.remember_used(tmp_path, warm.command_key(tmp_path, tmp_path, []), {"chroot"})
    assert warm.sweep(tmp_path, dry=True) == [gone]
    assert warm.sweep(tmp_path) == [gone]
    assert sorted(p.name for p in directory.iterdir()) == [warm.USED]
