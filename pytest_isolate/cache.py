"""Content-addressed store of built environments.

An entry is ``<root>/<kind>/<key>/`` holding ``data/`` (what was built),
``manifest.json`` and ``build.log``.  It is built in a temporary directory under
``<root>/tmp`` and published by an atomic rename while a file lock on the key is
held, so N concurrent processes build one key once and nobody ever sees half
an entry.  A directory without a readable manifest is not an entry: it is
removed and rebuilt.

The manifest carries a *seal* of the data: a hash over every directory's name, mode
and modification time plus the top-level files' sizes and times.  Files added,
removed or renamed anywhere, or a top-level file (a VM image) rewritten, break the
seal; such an entry is not used but rebuilt.  It is checked once per process and
entry, in ~20 ms for a root filesystem: a content hash of every file (~0.1 s and up
per lookup) would cost more than the start it protects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock, Timeout

from pytest_isolate.errors import ConfigError, IsolateError
from pytest_isolate.sizes import dir_size

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    path: Path
    manifest: dict[str, Any]
    hit: bool
    build_seconds: float = 0.0

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def log(self) -> Path:
        return self.path / "build.log"


Builder = Callable[[Path, Path], dict[str, Any]]


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path in this process's mount namespace."""
    top = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point == top or point.startswith(top.rstrip("/") + "/"):
                    found.append(point)
    except OSError:
        pass
    return found


def force_rmtree(path: Path) -> None:
    """rmtree that also removes read-only directories a non-root build may leave.

    It never deletes through a mount point: a bind mount left under path could
    lead into the host's own files.
    """
    mounted = mounts_under(path)
    if mounted:
        raise IsolateError(
            f"refusing to delete {path}: something is mounted below it ({', '.join(mounted[:5])}); "
            "unmount it first (umount -R PATH)")

    def onerror(func: Any, p: str, exc: Any) -> None:
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
                shutil.rmtree(p, onerror=onerror)
            else:
                os.unlink(p)
        except FileNotFoundError:
            pass

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=onerror)


def seal(data: Path) -> str:
    """The seal of an entry's data (see the module docstring).

    Plain strings and one digest update at the end: a root filesystem has about a
    thousand directories, and this runs at every run's first lookup of its entries."""
    top = str(data)
    cut = len(top) + 1
    lines: list[str] = []
    add = lines.append
    stack = [top]
    while stack:
        path = stack.pop()
        rel = path[cut:] if path != top else "."
        try:
            st = os.lstat(path)
        except OSError as exc:
            add(f"E {rel} {exc.errno}\n")
            continue
        add(f"D {rel} {st.st_mode:o} {st.st_mtime_ns}\n")
        if path != top and st.st_mode & 0o005 != 0o005:
            # a private directory (/root, ...): its own time covers its entries, and its
            # insides are not read, so root and other users compute the same seal
            continue
        try:
            with os.scandir(path) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            add(f"E {rel} {exc.errno}\n")
            continue
        for child in reversed(children):
            if child.is_dir(follow_symlinks=False):
                stack.append(child.path)
            elif path == top:
                cst = child.stat(follow_symlinks=False)
                add(f"F {child.name} {cst.st_mode:o} {cst.st_size} {cst.st_mtime_ns}\n")
    return hashlib.sha256("".join(lines).encode(errors="surrogateescape")).hexdigest()


# --------------------------------------------------------------------------
# Listing, removal and garbage collection (`pytest-isolate cache ls|gc|rm`).
# What a running session uses is never removed: its shared flock on the manifest, a
# build's key lock, or a mount of the entry in any mount namespace keeps an entry.

#: Sub-directories of the cache root that hold no entries.
NOT_KINDS = ("tmp", "locks", "runs")
#: gc keeps entries used this recently: a session may be between lookup and mount.
GC_GRACE_SECONDS = 60.0
#: remove_external(backend name, entry): remove what the entry stands for outside the
#: cache directory (a Docker image); None when done, else why the entry must stay.
RemoveExternal = Callable[[str, "CacheItem"], "str | None"]


@dataclasses.dataclass
class CacheItem:
    """An entry as `cache ls`, `gc` and `rm` see it, read without touching it."""

    kind: str
    key: str
    path: Path
    manifest: dict[str, Any]
    size: int
    last_use: float

    @property
    def created(self) -> float:
        value = self.manifest.get("created")
        return float(value) if isinstance(value, (int, float)) else self.last_use


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of the entry at path; None when it is not an entry (yet)."""
    try:
        data = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == path.name else None


def mountinfo(pid: int | str) -> list[tuple[str, str, str]]:
    """(root, mount point, source and super options) of each mount in pid's namespace."""
    mounts = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if "-" not in fields[6:]:
                continue
            sep = fields.index("-", 6)
            mounts.append((fields[3], fields[4], " ".join(fields[sep + 2:])))
    return mounts


def under(path: str, pattern: str) -> bool:
    return path.startswith(pattern) or path + "/" == pattern


def mount_users(patterns: Sequence[str]) -> dict[str, int]:
    """pattern (a directory, ending in '/') -> a pid whose mount namespace mounts something *from*
    it (a bind mount of it, an overlay layer on it): an environment that uses it.

    Mount points *under* it do not count: other namespaces keep stale copies of what a build
    had mounted in its target (/proc, /sys) when they were created during the build.
    """
    found: dict[str, int] = {}
    seen_ns: set[str] = set()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if ns in seen_ns:
                continue
            seen_ns.add(ns)
            mounts = mountinfo(pid)
        except (OSError, ValueError):
            continue
        for pattern in patterns:
            if pattern in found:
                continue
            if any(under(root, pattern) or pattern in opts for root, _mnt, opts in mounts):
                found[pattern] = pid
    return found


def mounted_under(patterns: Sequence[str]) -> dict[str, str]:
    """pattern -> a mount point under it in our own mount namespace (rmtree would enter it)."""
    found: dict[str, str] = {}
    try:
        mounts = mountinfo("self")
    except (OSError, ValueError):
        return found
    for pattern in patterns:
        for _root, mnt, _opts in mounts:
            if under(mnt, pattern):
                found[pattern] = mnt.replace("\\040", " ")
                break
    return found


def path_pattern(path: Path) -> str:
    """How a directory shows in /proc/PID/mountinfo (octal escapes as the kernel writes them)."""
    text = os.path.realpath(path) + "/"
    for char in ("\\", " ", "\t", "\n"):
        text = text.replace(char, f"\\{ord(char):03o}")
    return text


def describe_pid(pid: int) -> str:
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"process {pid}"
    return f"process {pid} {name}"


def mount_pattern(item: CacheItem) -> str:
    """How the entry's directory shows in mountinfo (see path_pattern)."""
    return path_pattern(item.path)


class EntryLock:
    """Exclusive hold on an entry: its build lock and its manifest, both non-blocking.

    A session that uses an entry may hold a shared flock on its manifest.json;
    while it does, gc and rm leave the entry alone.
    """

    def __init__(self, cache_root: Path, item: CacheItem) -> None:
        self.lock = FileLock(str(cache_root / "locks" / f"{item.kind}-{item.key}.lock"), timeout=0)
        self.manifest = item.path / "manifest.json"
        self.fd = -1

    def acquire(self) -> str | None:
        """None when held, else why the entry is busy."""
        try:
            self.lock.acquire()
        except Timeout:
            return "being built by another process"
        try:
            self.fd = os.open(self.manifest, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            return "in use by a running session"
        except OSError:
            pass  # gone meanwhile: nothing left to protect
        return None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.lock.release()

    @contextlib.contextmanager
    def taken(self) -> Iterator[str | None]:
        """acquire() for the block: yields None when held (released after the block),
        else why the entry is busy (nothing to release)."""
        reason = self.acquire()
        try:
            yield reason
        finally:
            if reason is None:
                self.release()


class Hold:
    """A shared hold on an entry (see Cache.hold): call it, or leave its block, to release."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def __call__(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self()


@dataclasses.dataclass
class Swept:
    """What clean_tmp removed (or would) and what it kept, with the reason."""

    removed: list[Path] = dataclasses.field(default_factory=list)
    kept: list[tuple[Path, str]] = dataclasses.field(default_factory=list)


#: The group of entries an entry belongs to, of which gc keeps only the newest (None: none).
Supersede = Callable[[CacheItem], "str | None"]


def superseded(items: list[CacheItem], group: Supersede) -> set[Path]:
    """The entries of items that a newer entry of the same group replaces."""
    newest: dict[str, CacheItem] = {}
    older: set[Path] = set()
    for item in sorted(items, key=lambda i: i.created):
        name = group(item)
        if name is None:
            continue
        if name in newest:
            older.add(newest[name].path)
        newest[name] = item
    return older


@dataclasses.dataclass
class Collected:
    """What collect removed (or would), what it kept and why, and what remains."""

    removed: list[CacheItem]
    kept: list[tuple[CacheItem, str]]
    remaining: int
    remaining_size: int


class Cache:
    def __init__(self, root: Path, where: str = "isolate_cache_dir", create: bool = True) -> None:
        """create=False: only look (`cache ls` creates no directory and needs no write access)."""
        self.root = root
        #: entries whose seal this process checked (kind, key, seal)
        self._sealed: set[tuple[str, str, str]] = set()
        if not create:
            return
        try:
            for sub in ("tmp", "locks"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root / "tmp"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{where}: cache directory {str(root)!r} is not writable ({exc.strerror or exc}); "
                "choose another with --isolate-cache-dir or isolate_cache_dir"
            ) from None

    def entry_path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lookup(self, kind: str, key: str) -> Entry | None:
        path = self.entry_path(kind, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("version") != MANIFEST_VERSION or manifest.get("key") != key:
            return None
        expected = manifest.get("seal")
        if isinstance(expected, str) and (kind, key, expected) not in self._sealed:
            if seal(path / "data") != expected:
                return None  # changed since it was built: get_or_build replaces it
            self._sealed.add((kind, key, expected))
        try:
            os.utime(path / MANIFEST)  # last use, for `cache ls` / `cache gc`
        except OSError:
            pass
        return Entry(kind, key, path, manifest, hit=True)

    def get_or_build(self, kind: str, key: str, builder: Builder, describe: dict[str, Any],
                     log_path: Path) -> Entry:
        """The entry for key, building it with builder(data_dir, log_path) when missing."""
        entry = self.lookup(kind, key)
        if entry is not None:
            return entry
        with FileLock(str(self.root / "locks" / f"{kind}-{key}.lock")):
            entry = self.lookup(kind, key)
            if entry is not None:
                return entry
            # holding the key's lock, any build directory of the key is a killed run's
            for stale in (self.root / "tmp").glob(f"{kind}-{key}.*"):
                try:
                    force_rmtree(stale)
                except (OSError, IsolateError):
                    pass  # something is mounted below it: `cache gc` reports it
            final = self.entry_path(kind, key)
            if final.exists():  # a corrupt or foreign directory: never used, replaced
                force_rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{kind}-{key}.", dir=self.root / "tmp"))
            started = time.monotonic()
            try:
                extra = builder(tmp / "data", log_path)
                seconds = time.monotonic() - started
                manifest = {
                    "version": MANIFEST_VERSION,
                    "kind": kind,
                    "key": key,
                    "spec": describe,
                    "created": time.time(),
                    "build_seconds": round(seconds, 3),
                    "size": dir_size(tmp / "data"),
                    "seal": seal(tmp / "data"),
                    "pid": os.getpid(),
                    **extra,
                }
                if log_path.exists():
                    shutil.copyfile(log_path, tmp / "build.log")
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
                os.rename(tmp, final)
            except BaseException:
                force_rmtree(tmp)
                raise
            return Entry(kind, key, final, manifest, hit=False, build_seconds=seconds)

    def hold(self, entry: Entry) -> Hold:
        """Mark entry in use until the returned Hold is called (or its `with` block ends):
        `cache gc`/`rm` skip it.

        An entry that is not in the cache directory (a user's own docker image) has
        nothing to hold."""
        try:
            fd = os.open(entry.path / MANIFEST, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return Hold(None)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return Hold(fd)

    def entries(self) -> Iterator[Entry]:
        for kind_dir in sorted(self.root.iterdir()):
            if kind_dir.name in ("tmp", "locks") or not kind_dir.is_dir():
                continue
            for path in sorted(kind_dir.iterdir()):
                try:
                    manifest = json.loads((path / MANIFEST).read_text())
                except (OSError, ValueError):
                    continue
                yield Entry(kind_dir.name, path.name, path, manifest, hit=True)

    def remove(self, entry: Entry) -> None:
        with FileLock(str(self.root / "locks" / f"{entry.kind}-{entry.key}.lock")):
            force_rmtree(entry.path)

    def listing(self, with_size: bool = True) -> list[CacheItem]:
        """Every entry, read without touching it (a listing must not count as a use);
        with_size: measured on disk, else as its manifest recorded at build time."""
        items: list[CacheItem] = []
        if not self.root.is_dir():
            return items
        for kind_dir in sorted(self.root.iterdir()):
            if kind_dir.name in NOT_KINDS or not kind_dir.is_dir():
                continue
            for path in sorted(kind_dir.iterdir()):
                manifest = read_manifest(path)
                if manifest is None:
                    continue
                try:
                    last_use = (path / MANIFEST).stat().st_mtime
                except OSError:
                    continue
                size = dir_size(path) if with_size else int(manifest.get("size") or 0)
                # what the entry stands for outside the cache (a Docker image) counts too
                size += int(manifest.get("external_size") or 0)
                items.append(CacheItem(kind_dir.name, path.name, path, manifest, size, last_use))
        return items

    def remove_unused(self, item: CacheItem, busy: Mapping[str, int] | None = None,
                      remove_external: RemoveExternal | None = None) -> str | None:
        """Remove one entry unless it is in use; None when removed, else why it was kept.

        busy: mount_users() of many entries, from one walk of /proc (an entry it does not
        name is looked up again: it may have been mounted since)."""
        with EntryLock(self.root, item).taken() as reason:
            if reason is not None:
                return reason
            pattern = mount_pattern(item)
            pid = busy[pattern] if busy and pattern in busy else mount_users([pattern]).get(pattern)
            if pid is not None:
                return f"mounted by a running environment ({describe_pid(pid)})"
            inner = mounted_under([pattern]).get(pattern)
            if inner is not None:
                return f"something is mounted under it ({inner}): unmount it first"
            external = item.manifest.get("external_backend")
            if isinstance(external, str):
                if remove_external is None:
                    return f"backend {external!r}, which made it, cannot be asked to remove it"
                kept = remove_external(external, item)
                if kept is not None:
                    return kept
            force_rmtree(item.path)
        return None

    def collect(self, max_age: float | None = None, max_size: int | None = None,
                dry: bool = False, remove_external: RemoveExternal | None = None,
                supersede: Supersede | None = None) -> Collected:
        """Remove the entries unused for max_age seconds, the ones a newer entry of their
        group supersedes (supersede(item): the group, None for none), then the least
        recently used until the rest fit in max_size bytes.  An entry in use, or used in
        the last GC_GRACE_SECONDS, is kept with the reason.  dry: remove nothing, say what
        would go."""
        now = time.time()
        items = sorted(self.listing(), key=lambda i: i.last_use)
        total = sum(i.size for i in items)
        busy = mount_users([mount_pattern(i) for i in items])
        newer = superseded(items, supersede) if supersede is not None else set()
        removed: list[CacheItem] = []
        kept: list[tuple[CacheItem, str]] = []
        for item in items:
            too_old = max_age is not None and now - item.last_use >= max_age
            too_big = max_size is not None and total > max_size
            if not (too_old or too_big or item.path in newer):
                continue
            if now - item.last_use < GC_GRACE_SECONDS:
                kept.append((item, f"used in the last {GC_GRACE_SECONDS:.0f}s"))
                continue
            reason = None if dry else self.remove_unused(item, busy, remove_external)
            if dry and mount_pattern(item) in busy:
                reason = f"mounted by a running environment ({describe_pid(busy[mount_pattern(item)])})"
            if reason is not None:
                kept.append((item, reason))
                continue
            total -= item.size
            removed.append(item)
        return Collected(removed, kept, len(items) - len(removed), total)

    def clean_tmp(self, older_than: float = 0.0, dry: bool = False) -> Swept:
        """Remove build directories nobody holds a lock for (left by killed runs), never
        descending into one something is mounted under (a killed root-mode mmdebstrap can
        leave /proc, /sys and /dev mounted in its target)."""
        swept = Swept()
        now = time.time()
        try:
            dirs = [p for p in (self.root / "tmp").iterdir() if p.is_dir()]
        except OSError:
            return swept
        mounted = mounted_under([path_pattern(p) for p in dirs])
        for path in dirs:
            inner = mounted.get(path_pattern(path))
            if inner is not None:
                swept.kept.append((path, f"something is still mounted under it ({inner}; a "
                                         "killed build leaves /proc, /sys, /dev/* mounted): "
                                         "unmount it first"))
                continue
            kind_key = path.name.rsplit(".", 1)[0]
            lock = FileLock(str(self.root / "locks" / f"{kind_key}.lock"), timeout=0)
            try:
                with lock:
                    if now - path.stat().st_mtime < older_than:
                        continue
                    if not dry:
                        force_rmtree(path)
                    swept.removed.append(path)
            except Timeout:
                continue  # being built right now
            except (OSError, IsolateError) as exc:
                swept.kept.append((path, str(exc)))
        return swept
