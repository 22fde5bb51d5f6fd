"""``cache ls``, ``cache gc`` and ``cache rm``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_isolate.cli.common import (
    PROG,
    Project,
    UsageError,
    cache_location,
    dump_json,
    envs_by_key,
    format_age,
    load_backend,
    loaded_backends,
    open_cache,
    out,
    plural,
    resolve_specs,
    summarize,
    table,
)
from pytest_isolate.sizes import format_size, walk_same_fs

if TYPE_CHECKING:
    from pytest_isolate.backends.base import Backend
    from pytest_isolate.cache import Cache, CacheItem


#: gc removes finished runs' log directories older than this unless --max-age says otherwise.
RUNS_MAX_AGE_DAYS = 7.0


def cmd_cache_ls(args: argparse.Namespace, project: Project) -> int:
    root, where = cache_location(args, project)
    by_key = envs_by_key(resolve_specs(project))
    items = open_cache(root, where, create=False).listing()
    now = time.time()
    if args.json:
        dump_json({
            "cache_dir": str(root), "cache_dir_source": where,
            "entries": [{
                "kind": it.kind, "key": it.key, "path": str(it.path), "size": it.size,
                "created": it.created, "last_use": it.last_use, "spec": it.manifest.get("spec"),
                "envs": by_key.get(it.key, []) if it.kind == "rootfs" else [],
            } for it in items],
        })
        return 0
    out(f"cache: {root} ({where})")
    if not items:
        out("no entries")
        return 0
    rows = [["KEY", "KIND", "SPEC", "ENVS", "SIZE", "AGE", "LAST USE"]]
    for it in sorted(items, key=lambda i: i.last_use, reverse=True):
        envs = ",".join(by_key.get(it.key, [])) if it.kind == "rootfs" else ""
        rows.append([it.key, it.kind, summarize(it.manifest), envs or "-", format_size(it.size),
                     format_age(now - it.created), format_age(now - it.last_use) + " ago"])
    for line in table(rows):
        out(line)
    out(f"{plural(len(items), 'entry', 'entries')}, {format_size(sum(i.size for i in items))}")
    return 0


def run_dirs(root: Path) -> Iterator[tuple[Path, float]]:
    """(directory, newest mtime inside) of every finished run: no live process runs it
    (the manager's pruner decides the same way)."""
    from pytest_isolate.ownership import run_dir_finished

    runs = root / "runs"
    if not runs.is_dir():
        return
    for path in sorted(runs.iterdir()):
        if not path.is_dir() or not run_dir_finished(path):
            continue
        newest = max((st.st_mtime for st in walk_same_fs(path)), default=0.0)
        yield path, newest


def cmd_cache_gc(args: argparse.Namespace, project: Project) -> int:
    from pytest_isolate.cache import force_rmtree, mounted_under, path_pattern

    root, where = cache_location(args, project)
    out(f"cache: {root} ({where})")
    if not root.is_dir():
        out("nothing to do: the cache directory does not exist")
        return 0
    cache = open_cache(root, where)
    now = time.time()
    dry = args.dry_run
    verb = "would remove" if dry else "removed"

    # 0. what killed runs left outside the cache: containers, sessions, cgroups
    if dry:
        out("leftovers of killed runs (containers, sessions, cgroups): not looked for in a "
            "dry run")
    else:
        removed = reap_leftovers(cache)
        out(f"removed {len(removed)} leftovers of killed runs"
            + (f": {', '.join(removed)}" if removed else ""))

    # the files of warm keepers that are gone (a live keeper's are its own)
    from pytest_isolate import warm

    gone = warm.sweep(root, dry=dry)
    out(f"{verb} the files of {plural(len(gone), 'ended warm keeper', 'ended warm keepers')}")

    # 1. build directories left by killed runs (their build lock is free)
    swept = cache.clean_tmp(dry=dry)
    for path, why in swept.kept:
        out(f"kept {path}: {why}")
    out(f"{verb} {len(swept.removed)} stale build directories")

    # 2. log/work directories of finished runs
    runs_max_age = (args.max_age if args.max_age is not None else RUNS_MAX_AGE_DAYS) * 86400
    removed_runs = 0
    for path, newest in run_dirs(root):
        if now - newest >= runs_max_age:
            # a killed run can leave host mounts there (schroot sessions bind the rootfs rw)
            inner = mounted_under([path_pattern(path)]).get(path_pattern(path))
            if inner is not None:
                out(f"kept {path}: something is still mounted under it ({inner}): unmount it first")
                continue
            if not dry:
                force_rmtree(path)
            removed_runs += 1
    out(f"{verb} {removed_runs} finished run directories older than "
        f"{runs_max_age / 86400:g} days")

    # 3. entries: too old first, then oldest-by-last-use until under --max-size
    max_age = args.max_age * 86400 if args.max_age is not None else None
    supersede = None if args.keep_states else cache_group_of(loaded_backends())
    done = cache.collect(max_age, args.max_size, dry, remove_external, supersede)
    for item in done.removed:
        out(f"{verb} {item.kind}/{item.key} ({summarize(item.manifest)}, {format_size(item.size)}, "
            f"last used {format_age(now - item.last_use)} ago)")
    for item, reason in done.kept:
        out(f"kept {item.kind}/{item.key}: {reason}")
    if done.kept:
        keeper_hint(root)
    out(f"{verb} {len(done.removed)} entries, {format_size(sum(i.size for i in done.removed))}; "
        f"{done.remaining} entries remain, {format_size(done.remaining_size)}")
    if args.max_size is not None and done.remaining_size > args.max_size:
        out(f"still above --max-size {format_size(args.max_size)}: "
            "the remaining entries are in use or were used recently")
    return 0


def cache_group_of(backends: list[type[Backend]]) -> Callable[[CacheItem], str | None]:
    """Cache.collect's supersede: the group a backend puts an entry in (a saved VM state
    is replaced by a newer state of the same machine), None when no backend groups it."""

    def group(item: CacheItem) -> str | None:
        for cls in backends:
            found = cls.cache_group(item.kind, item.manifest)
            if found is not None:
                return f"{cls.name}: {found}"
        return None

    return group


def remove_external(backend: str, item: CacheItem) -> str | None:
    """What a backend's cache entry stands for outside the cache (a Docker image), removed
    by the backend that made it (Cache.remove_unused asks before removing the entry)."""
    cls, missing = load_backend(backend)
    if cls is None:
        return f"backend {backend!r}, which made it, {missing}"
    return cls.remove_external(item.key, item.manifest)


def reap_leftovers(cache: Cache) -> list[str]:
    """Every built-in backend's reap(): what runs whose process is gone left behind."""
    from pytest_isolate.backends import BUILTIN_BACKENDS
    from pytest_isolate.backends.base import RunContext

    base = cache.root / "runs" / "gc"
    ctx = RunContext(run_id="gc", rootdir=Path.cwd(), cache=cache, log_dir=base / "logs",
                     work_dir=base / "work", progress=lambda message: None)
    removed: list[str] = []
    for name in sorted(BUILTIN_BACKENDS):
        cls, _ = load_backend(name)
        if cls is None:
            continue
        try:
            removed += [r for r in cls(ctx).reap() if r not in removed]
        except Exception as exc:  # best effort: an engine that is down has nothing to reap
            out(f"{name}: could not look for leftovers: {type(exc).__name__}: {exc}")
    return removed


def cmd_cache_rm(args: argparse.Namespace, project: Project) -> int:
    root, where = cache_location(args, project)
    items = open_cache(root, where, create=False).listing(with_size=False)
    if args.all:
        chosen = items
    else:
        if not args.keys:
            raise UsageError("cache rm: give one or more KEYs (see `cache ls`) or --all")
        chosen = []
        for key in args.keys:
            kind, _, short = key.rpartition("/")
            matches = [i for i in items if i.key.startswith(short) and (not kind or i.kind == kind)]
            if not matches:
                raise UsageError(f"cache rm: no entry matches {key!r} in {root} (see `cache ls`)")
            if len(matches) > 1:
                names = ", ".join(f"{m.kind}/{m.key}" for m in matches)
                raise UsageError(f"cache rm: {key!r} is ambiguous: {names}; give more of the key")
            chosen.append(matches[0])
    if not chosen:
        out(f"cache: {root}: no entries")
        return 0
    from pytest_isolate.cache import mount_pattern, mount_users

    cache = open_cache(root, where)
    busy = mount_users([mount_pattern(i) for i in chosen])
    status = 0
    for item in chosen:
        reason = cache.remove_unused(item, busy, remove_external)
        if reason is None:
            out(f"removed {item.kind}/{item.key} ({summarize(item.manifest)})")
        else:
            sys.stderr.write(f"{PROG}: not removed: {item.kind}/{item.key}: {reason}\n")
            status = 1
    if status:
        keeper_hint(root)
    return status


def keeper_hint(root: Path) -> None:
    """What holds entries besides running sessions: the keepers of warm environments."""
    from pytest_isolate import warm

    keepers = warm.keepers(root)
    if len(keepers) == 1:
        sys.stderr.write(f"{PROG}: a warm keeper (--isolate-warm) holds the entries it uses "
                         "until it ends; end it with: pytest-isolate warm --stop\n")
    elif keepers:
        sys.stderr.write(f"{PROG}: {len(keepers)} warm keepers (--isolate-warm) hold the "
                         "entries they use until they end; end them with: pytest-isolate warm "
                         "--stop\n")
