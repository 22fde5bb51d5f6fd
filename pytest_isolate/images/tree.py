"""Which files of the project tree reach an environment that cannot bind-mount it.

A VM gets the project as a read-only disk image, a remote Docker engine as a
copy; both take the same files:

- in a git checkout, what git itself would consider (``git ls-files --cached
  --others --exclude-standard``: tracked files plus untracked ones the
  project's ``.gitignore`` files, ``.git/info/exclude`` and the user's global
  excludes do not ignore); elsewhere every file;
- minus the fixed list below (VCS data, caches, host virtual environments);
- minus the environment's ``exclude`` patterns (gitignore syntax: ``name``
  matches at any depth, a ``/`` inside or in front anchors at the rootdir,
  a trailing ``/`` matches directories only, ``*``, ``?``, ``[...]`` and
  ``**`` as in git, ``!pattern`` re-includes; an excluded directory is not
  entered).

The manifest (path, type, mode, size, mtime of every kept entry) keys the
cached image: an unchanged tree reuses its image, a changed one gets a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pytest_isolate.config import Option

#: Directories never shipped (caches, VCS data, host virtualenvs), whatever git says.
DEFAULT_EXCLUDES = (
    ".git/", ".hg/", ".svn/", ".tox/", ".nox/", ".venv/", "venv/", "__pycache__/",
    ".mypy_cache/", ".ruff_cache/", ".pytest_cache/", "node_modules/", ".eggs/",
)
#: Bump when the rule or the manifest changes (new image keys).
TREE_FORMAT = 1


class ListOption(Option):
    """An ``options`` key whose value is a list of strings (e.g. ``exclude``)."""

    def check(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, str) and v.strip() != "" for v in value)

    def describe(self) -> str:
        return "a list of strings"


EXCLUDE_OPTION = ListOption(
    "a list of strings", "gitignore-style patterns of project files not shipped into the "
    "environment (besides .gitignore and caches/VCS/venv directories)")


def _translate(glob: str) -> str:
    """A gitignore glob (no leading/trailing slash) as a regular expression body."""
    out = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("/**", i) and i + 3 == len(glob):
            out.append("/.*")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = glob.find("]", i + 2)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 1
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


class Excluder:
    """gitignore-style patterns over paths relative to the rootdir (last match wins)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.rules: list[Rule] = []
        for raw in patterns:
            pat = raw.strip()
            if not pat or pat.startswith("#"):
                continue
            negate = pat.startswith("!")
            if negate:
                pat = pat[1:]
            dir_only = pat.endswith("/")
            pat = pat.rstrip("/")
            anchored = "/" in pat
            pat = pat.lstrip("/")
            if not pat:
                continue
            body = _translate(pat)
            regex = re.compile(("" if anchored else "(?:.*/)?") + body + r"\Z")
            self.rules.append(Rule(raw, regex, negate, dir_only))

    def excluded(self, rel: str, is_dir: bool) -> bool:
        result = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(rel):
                result = not rule.negate
        return result


@dataclasses.dataclass
class TreeEntry:
    rel: str
    st: os.stat_result


@dataclasses.dataclass
class ProjectTree:
    """The kept entries of a project tree (parents before children) and their totals."""

    root: Path
    entries: list[TreeEntry]
    #: apparent bytes of the kept files
    size: int
    #: bytes the kept files occupy on the host (holes of sparse files excluded)
    allocated: int
    #: "git" (git's view of the checkout) or "walk"
    source: str
    patterns: tuple[str, ...]

    def key(self) -> str:
        h = hashlib.sha256(f"{TREE_FORMAT}\0{self.root}\0".encode())
        for e in self.entries:
            st = e.st
            h.update(f"{e.rel}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0".encode(
                errors="surrogateescape"))
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(self.root / e.rel).encode(errors="surrogateescape"))
        return h.hexdigest()[:24]

    def files(self) -> int:
        return sum(1 for e in self.entries if not stat.S_ISDIR(e.st.st_mode))


def _git_files(root: Path) -> list[str] | None:
    """Paths git considers in the checkout holding root (relative to root), or None when
    root is not in a git work tree or git is missing."""
    git = shutil.which("git")
    if git is None:
        return None
    base = [git, "-c", "safe.directory=*", "-C", str(root)]
    try:
        inside = subprocess.run([*base, "rev-parse", "--is-inside-work-tree"],
                                capture_output=True, text=True, timeout=30, check=False)
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return None
        proc = subprocess.run([*base, "ls-files", "-z", "--cached", "--others",
                               "--exclude-standard"], capture_output=True, timeout=120,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return sorted({p for p in os.fsdecode(proc.stdout).split("\0") if p})


def scan_tree(root: Path, patterns: Sequence[str] = (), use_git: bool = True) -> ProjectTree:
    """The entries of root that are shipped (see the module docstring)."""
    excluder = Excluder([*DEFAULT_EXCLUDES, *patterns])
    entries: list[TreeEntry] = []
    seen_dirs: dict[str, bool] = {"": True}  # rel dir -> kept
    size = allocated = 0

    def add(rel: str, st: os.stat_result) -> None:
        nonlocal size, allocated
        entries.append(TreeEntry(rel, st))
        if stat.S_ISREG(st.st_mode):
            size += st.st_size
            allocated += st.st_blocks * 512

    def dir_kept(rel: str) -> bool:
        """Whether directory rel and all its parents are kept (adding them in order)."""
        if rel in seen_dirs:
            return seen_dirs[rel]
        parent = rel.rpartition("/")[0]
        kept = dir_kept(parent) and not excluder.excluded(rel, True)
        if kept:
            try:
                st = os.lstat(root / rel)
            except OSError:
                kept = False
            else:
                kept = stat.S_ISDIR(st.st_mode)
                if kept:
                    add(rel, st)
        seen_dirs[rel] = kept
        return kept

    def walk(rel_dir: str) -> None:
        try:
            with os.scandir(root / rel_dir if rel_dir else root) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        for child in children:
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            try:
                st = child.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if dir_kept(rel):
                    walk(rel)
            elif (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) \
                    and not excluder.excluded(rel, False):
                add(rel, st)

    listed = _git_files(root) if use_git else None
    if listed is None:
        walk("")
        source = "walk"
    else:
        source = "git"
        for rel in listed:
            parent = rel.rpartition("/")[0]
            if parent and not dir_kept(parent):
                continue
            try:
                st = os.lstat(root / rel)
            except OSError:
                continue  # tracked but deleted
            if stat.S_ISDIR(st.st_mode):  # a submodule: all of it
                if dir_kept(rel):
                    walk(rel)
            elif (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) \
                    and not excluder.excluded(rel, False):
                add(rel, st)
    return ProjectTree(root, entries, size, allocated, source, tuple(patterns))


def stage_tree(tree: ProjectTree, dest: Path) -> None:
    """A copy of tree's entries under dest: hard links where possible (same filesystem),
    else sparse-preserving copies.  Directory modes and times are kept."""
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)
    link = True
    dirs: list[TreeEntry] = []
    for e in tree.entries:
        src = tree.root / e.rel
        dst = dest / e.rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        mode = e.st.st_mode
        if stat.S_ISDIR(mode):
            dst.mkdir(exist_ok=True)
            dirs.append(e)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        else:
            if link:
                try:
                    os.link(src, dst)
                    continue
                except OSError:
                    link = False
            proc = subprocess.run(["cp", "--sparse=always", "--preserve=mode,timestamps",
                                   str(src), str(dst)], capture_output=True, check=False)
            if proc.returncode != 0:
                continue  # unreadable: left out, as git would fail to read it too
    for e in reversed(dirs):
        d = dest / e.rel
        os.chmod(d, stat.S_IMODE(e.st.st_mode))
        os.utime(d, ns=(e.st.st_atime_ns, e.st.st_mtime_ns))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
