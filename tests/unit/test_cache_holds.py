"""Cache holds and entry locks as context managers (the real cache on a temporary
directory; no backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_isolate.cache import Cache, CacheItem, Entry, EntryLock


def _entry(cache: Cache, key: str) -> Entry:
    def build(data: Path, log: Path) -> dict[str, Any]:
        data.mkdir(parents=True)
        (data / "f").write_text(key)
        return {}

    return cache.get_or_build("unit", key, build, {"key": key}, cache.root / f"{key}.log")


def _item(cache: Cache, key: str) -> CacheItem:
    [item] = [i for i in cache.listing() if i.key == key]
    return item


def test_an_entry_held_by_a_with_block_is_kept_until_the_block_ends(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    entry = _entry(cache, "k1")
    with cache.hold(entry) as hold:
        assert cache.remove_unused(_item(cache, "k1")) == "in use by a running session"
        hold()  # released early: the block's end releases nothing twice
        with cache.hold(entry):
            assert cache.remove_unused(_item(cache, "k1")) == "in use by a running session"
    assert cache.remove_unused(_item(cache, "k1")) is None
    assert not entry.path.exists()


def test_a_hold_on_what_is_not_in_the_cache_holds_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    outside = Entry("unit", "gone", tmp_path / "nowhere", {}, hit=True)
    with cache.hold(outside) as hold:
        hold()


def test_an_entry_lock_taken_in_a_block_is_released_after_it(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    _entry(cache, "k2")
    item = _item(cache, "k2")
    with EntryLock(cache.root, item).taken() as first:
        assert first is None
        with EntryLock(cache.root, item).taken() as second:
            assert second == "being built by another process"
        assert cache.remove_unused(item) == "being built by another process"
    with EntryLock(cache.root, item).taken() as again:
        assert again is None
    assert cache.remove_unused(item) is None
