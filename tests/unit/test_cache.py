"""The content-addressed cache: build once across processes, never publish half an entry."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from pytest_isolate.cache import MANIFEST, Cache, CacheItem, Entry
from pytest_isolate.errors import ConfigError


def counting_builder(counter_dir: Path, delay: float = 0.0) -> Any:
    def build(data: Path, log: Path) -> dict[str, Any]:
        # one file per build: counting them counts builds across processes
        (counter_dir / f"build-{os.getpid()}-{time.monotonic_ns()}").write_text("")
        data.mkdir(parents=True)
        (data / "payload").write_text("built")
        (data / "sub").mkdir()
        (data / "sub" / "more").write_bytes(b"x" * 1000)
        log.write_text("building\n")
        time.sleep(delay)
        return {"extra": "value"}

    return build


def builds(counter_dir: Path) -> int:
    return len(list(counter_dir.glob("build-*")))


def _worker(root: str, counter: str, start_at: float, out: str) -> None:
    cache = Cache(Path(root))
    while time.time() < start_at:
        time.sleep(0.001)
    entry = cache.get_or_build("kind", "key1", counting_builder(Path(counter), delay=0.5),
                               {"what": "test"}, Path(out) / f"log-{os.getpid()}")
    (Path(out) / f"result-{os.getpid()}").write_text(
        json.dumps({"path": str(entry.path), "hit": entry.hit,
                    "payload": (entry.data / "payload").read_text()}))


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    root, counter, out = tmp_path / "cache", tmp_path / "counter", tmp_path / "out"
    counter.mkdir()
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 1.5
    procs = [ctx.Process(target=_worker, args=(str(root), str(counter), start_at, str(out)))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert builds(counter) == 1
    results = [json.loads(p.read_text()) for p in out.glob("result-*")]
    assert len(results) == 4
    assert {r["path"] for r in results} == {str(root / "kind" / "key1")}
    assert all(r["payload"] == "built" for r in results)
    assert sorted(r["hit"] for r in results) == [False, True, True, True]
    assert list((root / "tmp").iterdir()) == []


def test_entry_contents_and_hit(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    counter = tmp_path / "n"
    counter.mkdir()
    log = tmp_path / "build.log"
    first = cache.get_or_build("k", "abc", counting_builder(counter), {"name": "x"}, log)
    assert isinstance(first, Entry) and not first.hit and first.build_seconds >= 0
    assert first.path == tmp_path / "c" / "k" / "abc"
    assert (first.data / "payload").read_text() == "built"
    assert first.log.read_text() == "building\n"
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["key"] == "abc" and manifest["kind"] == "k"
    assert manifest["spec"] == {"name": "x"} and manifest["extra"] == "value"
    assert manifest["size"] == len("built") + 1000
    second = cache.get_or_build("k", "abc", counting_builder(counter), {"name": "x"}, log)
    assert second.hit and second.path == first.path and builds(counter) == 1
    assert [e.key for e in cache.entries()] == ["abc"]
    cache.remove(second)
    assert not first.path.exists() and list(cache.entries()) == []


class Boom(Exception):
    pass


def test_failing_builder_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")

    def build(data: Path, log: Path) -> dict[str, Any]:
        data.mkdir(parents=True)
        (data / "half").write_text("half done")
        ro = data / "readonly"
        ro.mkdir()
        (ro / "f").write_text("x")
        ro.chmod(0o500)  # a non-root build can leave these; removal must cope
        raise Boom("builder failed")

    with pytest.raises(Boom):
        cache.get_or_build("k", "bad", build, {}, tmp_path / "log")
    assert not (tmp_path / "c" / "k" / "bad").exists()
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    assert cache.lookup("k", "bad") is None
    # and the next attempt builds normally
    counter = tmp_path / "n"
    counter.mkdir()
    entry = cache.get_or_build("k", "bad", counting_builder(counter), {}, tmp_path / "log")
    assert not entry.hit and builds(counter) == 1


def test_interrupted_builder_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")

    def build(data: Path, log: Path) -> dict[str, Any]:
        data.mkdir(parents=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build("k", "int", build, {}, tmp_path / "log")
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    assert not (tmp_path / "c" / "k" / "int").exists()


@pytest.mark.parametrize("damage", ["remove-manifest", "garbage-manifest", "wrong-key", "old-version"])
def test_corrupt_entry_is_rebuilt(tmp_path: Path, damage: str) -> None:
    cache = Cache(tmp_path / "c")
    counter = tmp_path / "n"
    counter.mkdir()
    entry = cache.get_or_build("k", "key", counting_builder(counter), {}, tmp_path / "log")
    manifest = entry.path / MANIFEST
    (entry.data / "stale").write_text("from the damaged entry")
    if damage == "remove-manifest":
        manifest.unlink()
    elif damage == "garbage-manifest":
        manifest.write_text("{not json")
    else:
        data = json.loads(manifest.read_text())
        data.update({"key": "other"} if damage == "wrong-key" else {"version": 0})
        manifest.write_text(json.dumps(data))
    assert cache.lookup("k", "key") is None
    rebuilt = cache.get_or_build("k", "key", counting_builder(counter), {}, tmp_path / "log")
    assert not rebuilt.hit and builds(counter) == 2
    assert not (rebuilt.data / "stale").exists()
    assert json.loads(manifest.read_text())["key"] == "key"


def test_clean_tmp_removes_leftovers(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    left = tmp_path / "c" / "tmp" / "k-key.abcd"
    (left / "data").mkdir(parents=True)
    building = tmp_path / "c" / "tmp" / "k-busy.efgh"
    building.mkdir()
    with FileLock(str(tmp_path / "c" / "locks" / "k-busy.lock")):  # a build in progress
        swept = cache.clean_tmp()
    assert swept.removed == [left] and swept.kept == []
    assert list((tmp_path / "c" / "tmp").iterdir()) == [building]
    assert cache.clean_tmp(older_than=3600).removed == []  # too recent
    assert cache.clean_tmp(dry=True).removed == [building] and building.is_dir()


def aged_entry(cache: Cache, key: str, size: int, days_ago: float) -> Entry:
    def build(data: Path, log: Path) -> dict[str, Any]:
        data.mkdir()
        (data / "blob").write_bytes(b"x" * size)
        return {}

    entry = cache.get_or_build("rootfs", key, build, {"name": key}, cache.root / f"{key}.log")
    stamp = time.time() - days_ago * 86400
    os.utime(entry.path / MANIFEST, (stamp, stamp))
    return entry


def test_listing_creates_and_touches_nothing(tmp_path: Path) -> None:
    assert Cache(tmp_path / "none", create=False).listing() == []
    assert not (tmp_path / "none").exists()
    cache = Cache(tmp_path / "c")
    entry = aged_entry(cache, "old", 1000, days_ago=3)
    before = (entry.path / MANIFEST).stat().st_mtime
    [item] = Cache(tmp_path / "c", create=False).listing()
    assert (item.kind, item.key, item.path, item.last_use) == ("rootfs", "old", entry.path, before)
    assert item.size >= 1000 and (entry.path / MANIFEST).stat().st_mtime == before
    [recorded] = cache.listing(with_size=False)
    assert recorded.size == 1000  # the manifest's size: the data alone


def test_collect_removes_least_recently_used_and_keeps_what_is_in_use(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    oldest = aged_entry(cache, "oldest", 1000, days_ago=9)
    held = aged_entry(cache, "held", 1000, days_ago=8)
    aged_entry(cache, "newer", 1000, days_ago=1)
    sizes = {i.key: i.size for i in cache.listing()}
    release = cache.hold(held)
    try:
        done = cache.collect(max_size=sizes["held"])
    finally:
        release()
    # least recently used first; the held one is skipped, so the newer one goes too
    assert [i.key for i in done.removed] == ["oldest", "newer"]
    assert [(i.key, why) for i, why in done.kept] == [("held", "in use by a running session")]
    assert done.remaining == 1 and done.remaining_size == sizes["held"]
    assert not oldest.path.exists() and [i.key for i in cache.listing()] == ["held"]
    assert [i.key for i in cache.collect(max_age=2 * 86400, dry=True).removed] == ["held"]
    assert [i.key for i in cache.collect(max_age=2 * 86400).removed] == ["held"]
    assert cache.listing() == []


def test_remove_unused_asks_the_backend_for_what_is_outside(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")

    def build(data: Path, log: Path) -> dict[str, Any]:
        data.mkdir()
        return {"external_backend": "fake"}

    cache.get_or_build("image", "img", build, {}, tmp_path / "log")
    [item] = cache.listing()
    assert cache.remove_unused(item) is not None and item.path.exists()  # nobody to ask
    asked: list[tuple[str, str]] = []

    def refuse(backend: str, it: CacheItem) -> str:
        asked.append((backend, it.key))
        return "still used by a container"

    assert cache.remove_unused(item, remove_external=refuse) == "still used by a container"
    assert item.path.exists()
    assert cache.remove_unused(item, remove_external=lambda b, i: None) is None
    assert asked == [("fake", "img")] and not item.path.exists()


def test_unwritable_root_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"where: cache directory '.*/file/c' is not writable"):
        Cache(blocker / "c", where="where")


@pytest.mark.parametrize("damage", ["file-removed", "file-added", "dir-removed",
                                    "image-rewritten"])
def test_entry_changed_after_its_build_is_rebuilt(tmp_path: Path, damage: str) -> None:
    """The manifest's seal: an entry whose data changed is never used, but rebuilt."""
    cache = Cache(tmp_path / "c")
    counter = tmp_path / "n"
    counter.mkdir()
    entry = cache.get_or_build("k", "key", counting_builder(counter), {}, tmp_path / "log")
    assert len(entry.manifest["seal"]) == 64
    time.sleep(0.01)  # a new modification time, even on coarse clocks
    if damage == "file-removed":
        (entry.data / "sub" / "more").unlink()
    elif damage == "file-added":
        (entry.data / "sub" / "intruder").write_text("x")
    elif damage == "dir-removed":
        (entry.data / "sub" / "more").unlink()
        (entry.data / "sub").rmdir()
    else:
        (entry.data / "payload").write_text("rewritten, longer than before")
    # a fresh process (a new Cache) checks the seal
    fresh = Cache(tmp_path / "c")
    assert fresh.lookup("k", "key") is None
    rebuilt = fresh.get_or_build("k", "key", counting_builder(counter), {}, tmp_path / "log")
    assert not rebuilt.hit and builds(counter) == 2
    assert (rebuilt.data / "sub" / "more").exists()
    assert not (rebuilt.data / "sub" / "intruder").exists()
    assert Cache(tmp_path / "c").lookup("k", "key") is not None


def test_untouched_entry_keeps_its_seal(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    counter = tmp_path / "n"
    counter.mkdir()
    cache.get_or_build("k", "key", counting_builder(counter), {}, tmp_path / "log")
    for _ in range(3):
        assert Cache(tmp_path / "c").lookup("k", "key") is not None
    assert builds(counter) == 1


def test_hold_of_something_outside_the_cache_is_a_no_op(tmp_path: Path) -> None:
    """A docker environment using a user's image as it is has no entry to hold."""
    cache = Cache(tmp_path / "c")
    outside = Entry("docker", "k", tmp_path / "not-an-entry", {}, hit=True)
    release = cache.hold(outside)
    release()
    assert not (tmp_path / "not-an-entry").exists()


def test_collect_keeps_only_the_newest_saved_state_of_each_machine(tmp_path: Path) -> None:
    """gc's default for saved VM states (issue 13): a newer state of the same machine (the
    environment's name and QEMU's binary, read by the qemu backend's cache_group, which
    `cache gc` asks every backend that loads) replaces the older ones, whatever made them
    differ."""
    from pytest_isolate.cli.cache import cache_group_of
    from pytest_isolate.cli.common import loaded_backends

    backends = loaded_backends()
    assert "qemu" in {cls.name for cls in backends}
    group = cache_group_of(backends)
    cache = Cache(tmp_path / "c")

    def state(key: str, env: str, binary: str = "qemu-system-x86_64") -> None:
        def build(data: Path, log: Path) -> dict[str, Any]:
            data.mkdir()
            (data / "state").write_bytes(b"s" * 100)
            return {}

        argv = [binary, "-m", "1024", "-name", f"pytest-isolate:@RUN@:{env}", "-nodefaults"]
        entry = cache.get_or_build("vmstate", key, build, {"argv": argv, "agent": key},
                                   cache.root / f"{key}.log")
        stamp = time.time() - 3600  # out of gc's grace period
        os.utime(entry.path / MANIFEST, (stamp, stamp))

    state("vm-old", "qemu_vm")
    state("arm-only", "arm64_vm", "qemu-system-aarch64")
    state("vm-older-agent", "qemu_vm")
    state("other-env", "netvm")
    state("vm-new", "qemu_vm")
    aged_entry(cache, "rootfs-alone", 10, days_ago=0.1)  # not a state: never superseded

    dry = cache.collect(dry=True, supersede=group)
    assert sorted(i.key for i in dry.removed) == ["vm-old", "vm-older-agent"]
    assert len(cache.listing()) == 6
    assert cache.collect().removed == []  # without the rule: nothing is too old or too big
    done = cache.collect(supersede=group)
    assert sorted(i.key for i in done.removed) == ["vm-old", "vm-older-agent"]
    assert sorted(i.key for i in cache.listing()) == [
        "arm-only", "other-env", "rootfs-alone", "vm-new"]
