"""Which project files reach a VM's project disk (images/tree.py), and how a dead guest is
explained (qemu.guest_failure).  Real git, real files, real mkfs.ext4; no VM."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_isolate.backends.qemu import guest_failure
from pytest_isolate.images.disk import make_ext4
from pytest_isolate.images.tree import EXCLUDE_OPTION, Excluder, scan_tree, stage_tree


@pytest.mark.parametrize(("pattern", "path", "is_dir", "expected"), [
    ("*.bin", "data/x.bin", False, True),
    ("*.bin", "x.bin", False, True),
    ("*.bin", "x.binx", False, False),
    ("/top.txt", "top.txt", False, True),
    ("/top.txt", "sub/top.txt", False, False),
    ("data/", "data", True, True),
    ("data/", "data", False, False),  # directories only
    ("data/", "a/data", True, True),
    ("a/**/z.py", "a/z.py", False, True),
    ("a/**/z.py", "a/b/c/z.py", False, True),
    ("a/**/z.py", "b/a/z.py", False, False),
    ("logs/**", "logs/x/y", False, True),
    ("file?.txt", "file1.txt", False, True),
    ("file[0-3].txt", "file4.txt", False, False),
])
def test_gitignore_patterns(pattern: str, path: str, is_dir: bool, expected: bool) -> None:
    assert Excluder([pattern]).excluded(path, is_dir) is expected


def test_negation_last_match_wins() -> None:
    ex = Excluder(["*.log", "!keep.log"])
    assert ex.excluded("a.log", False)
    assert not ex.excluded("keep.log", False)
    assert not ex.excluded("sub/keep.log", False)


def test_exclude_option_takes_a_list_of_strings() -> None:
    assert EXCLUDE_OPTION.check(["data/", "*.bin"])
    assert not EXCLUDE_OPTION.check("data/")
    assert not EXCLUDE_OPTION.check(["ok", 3])
    assert EXCLUDE_OPTION.describe() == "a list of strings"


def _write(root: Path, rel: str, data: bytes = b"x") -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def _tree(root: Path) -> None:
    for rel in ("pkg/mod.py", "tests/test_a.py", "build-out/big.o", "notes.tmp",
                ".venv/lib/site.py", "pkg/__pycache__/mod.pyc", "secret1.txt", "data/keep.csv"):
        _write(root, rel)


def test_walk_without_git_uses_fixed_list_and_patterns(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / ".gitignore").write_text("build-out/\n")  # not a checkout: not honoured
    tree = scan_tree(tmp_path, ["secret*.txt", "*.tmp"], use_git=False)
    files = {e.rel for e in tree.entries if not (tmp_path / e.rel).is_dir()}
    assert files == {"pkg/mod.py", "tests/test_a.py", "build-out/big.o", "data/keep.csv",
                     ".gitignore"}
    assert tree.source == "walk"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_checkout_honours_gitignore(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / ".gitignore").write_text("build-out/\n*.tmp\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "pkg/mod.py"], check=True)
    tree = scan_tree(tmp_path, ["secret*.txt"])
    assert tree.source == "git"
    files = {e.rel for e in tree.entries if not (tmp_path / e.rel).is_dir()}
    # tracked plus untracked-not-ignored; .venv and __pycache__ never; the exclude option
    assert files == {".gitignore", "pkg/mod.py", "tests/test_a.py", "data/keep.csv"}
    dirs = [e.rel for e in tree.entries if (tmp_path / e.rel).is_dir()]
    assert set(dirs) == {"pkg", "tests", "data"}
    # the key is stable for an unchanged tree and changes with an edit
    key = tree.key()
    assert scan_tree(tmp_path, ["secret*.txt"]).key() == key
    _write(tmp_path, "pkg/mod.py", b"VALUE = 2\n")
    assert scan_tree(tmp_path, ["secret*.txt"]).key() != key


def test_staged_sparse_file_keeps_its_holes_on_the_disk_image(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write(src, "data/big.bin", b"")
    with open(src / "data/big.bin", "r+b") as f:
        f.truncate(512 << 20)
        f.seek(100 << 20)
        f.write(os.urandom(1 << 20))
    tree = scan_tree(src, use_git=False)
    assert tree.size == 512 << 20 and tree.allocated < 8 << 20
    stage = tmp_path / "stage"
    stage_tree(tree, stage)
    image = tmp_path / "p.img"
    make_ext4(stage, image)
    # the image holds the data written, not the holes
    assert os.stat(image).st_blocks * 512 < 64 << 20
    out = subprocess.run(["debugfs", "-R", "stat /data/big.bin", str(image)],
                         capture_output=True, text=True, check=True).stdout
    assert "Size: 536870912" in out, out


@pytest.mark.parametrize(("console", "expected"), [
    ("[ 1.0] foo\n[ 9.1] Out of memory and no killable processes...\n"
     "[ 9.2] Kernel panic - not syncing: System is deadlocked on memory\n",
     "the guest kernel panicked: out of memory (the guest has 1024 MiB"),
    ("[ 2.0] VFS: Unable to mount root fs on unknown-block(0,0)\n"
     "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n",
     "the guest kernel panicked: no root device or init"),
    ("Kernel panic - not syncing: sysrq triggered crash\n",
     "the guest kernel panicked: sysrq triggered crash"),
    ("[ 5.0] Out of memory: Killed process 123 (python3) total-vm:1kB\n",
     "the guest ran out of memory (the guest has 1024 MiB"),
    ("pytest-isolate init: FAILED: no root disk (serial isolate-root)\n",
     "the guest's /init failed: no root disk (serial isolate-root)"),
    ("[ 1.0] all quiet\n", ""),
])
def test_guest_failure_names_the_cause(console: str, expected: str) -> None:
    got = guest_failure(console, 1024)
    assert got.startswith(expected), got
    if expected.startswith("the guest kernel panicked: out of memory"):
        assert "memory key" in got


def _backend(tmp_path: Path, rootdir: Path, cache: Path) -> object:
    from pytest_isolate.backends.base import RunContext
    from pytest_isolate.backends.qemu import QemuBackend
    from pytest_isolate.cache import Cache

    (tmp_path / "logs").mkdir()
    run = RunContext(run_id="unit", rootdir=rootdir, cache=Cache(cache),
                     log_dir=tmp_path / "logs", work_dir=tmp_path, progress=lambda _m: None)
    return QemuBackend(run)


def test_project_disk_is_cached_and_too_big_a_tree_is_refused(tmp_path: Path) -> None:
    from pytest_isolate.backends.qemu import QemuBackend
    from pytest_isolate.errors import ProvisionError
    from pytest_isolate.spec import EnvSpec

    root = tmp_path / "proj"
    _write(root, "pkg/mod.py", b"VALUE = 1\n")
    with open(root / "big.bin", "wb") as f:
        f.truncate(3 << 20)
    spec = EnvSpec(name="vm", backend="qemu")
    cache = tmp_path / "cache"
    backend = _backend(tmp_path, root, cache)
    assert isinstance(backend, QemuBackend)
    image = backend._project_disk(spec)
    out = subprocess.run(["debugfs", "-R", "ls -l /pkg", str(image)], capture_output=True,
                         text=True, check=True).stdout
    assert "mod.py" in out
    # a new run over the unchanged tree reuses the image
    (tmp_path / "again").mkdir()
    again = _backend(tmp_path / "again", root, cache)
    assert isinstance(again, QemuBackend)
    assert again._project_disk(spec) == image
    small = EnvSpec(name="vm", backend="qemu", options=(("project_max_mib", 1),))
    with pytest.raises(ProvisionError) as info:
        (tmp_path / "third").mkdir()
        third = _backend(tmp_path / "third", root, cache)
        assert isinstance(third, QemuBackend)
        third._project_disk(small)
    msg = str(info.value)
    assert "3.0 MiB in 2 files" in msg and "limit of 1.0 MiB" in msg, msg
    assert "options.exclude" in msg and "options.project_max_mib" in msg, msg
