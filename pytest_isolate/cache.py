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

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

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
    """The seal of an entry's data (see the module docstring)."""
    digest = hashlib.sha256()
    stack = [data]
    while stack:
        path = stack.pop()
        rel = os.path.relpath(path, data)
        try:
            st = os.lstat(path)
        except OSError as exc:
            digest.update(f"E {rel} {exc.errno}\n".encode(errors="surrogateescape"))
            continue
        digest.update(f"D {rel} {st.st_mode:o} {st.st_mtime_ns}\n".encode(
            errors="surrogateescape"))
        if path != data and st.st_mode & 0o005 != 0o005:
            # a private directory (/root, ...): its own time covers its entries, and its
            # insides are not read, so root and other users compute the same seal
            continue
        try:
            with os.scandir(path) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            digest.update(f"E {rel} {exc.errno}\n".encode(errors="surrogateescape"))
            continue
        for child in reversed(children):
            if child.is_dir(follow_symlinks=False):
                stack.append(Path(child.path))
            elif path == data:
                cst = child.stat(follow_symlinks=False)
                digest.update(f"F {child.name} {cst.st_mode:o} {cst.st_size} "
                              f"{cst.st_mtime_ns}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


class Cache:
    def __init__(self, root: Path, where: str = "isolate_cache_dir") -> None:
        self.root = root
        #: entries whose seal this process checked (kind, key, seal)
        self._sealed: set[tuple[str, str, str]] = set()
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

    def hold(self, entry: Entry) -> Callable[[], None]:
        """Mark entry in use until the returned callable runs: `cache gc`/`rm` skip it.

        An entry that is not in the cache directory (a user's own docker image) has
        nothing to hold."""
        try:
            fd = os.open(entry.path / MANIFEST, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return lambda: None
        fcntl.flock(fd, fcntl.LOCK_SH)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                os.close(fd)

        return release

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

    def clean_tmp(self, older_than: float = 0.0) -> int:
        """Remove build directories nobody holds a lock for (left by killed runs)."""
        removed = 0
        now = time.time()
        for path in (self.root / "tmp").iterdir():
            if not path.is_dir():
                continue
            kind_key = path.name.rsplit(".", 1)[0]
            lock = FileLock(str(self.root / "locks" / f"{kind_key}.lock"), timeout=0)
            try:
                with lock:
                    if now - path.stat().st_mtime >= older_than:
                        force_rmtree(path)
                        removed += 1
            except Exception:
                continue
        return removed
