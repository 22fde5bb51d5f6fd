"""Where a mapped root lives on the host (namespaces.root_map): root's subordinate ranges
in /etc/subuid and /etc/subgid, else the built-in range.  Files of the test's own; no
backend involved."""

from __future__ import annotations

from pathlib import Path

from pytest_isolate.namespaces import BUILTIN_ROOT_RANGE, root_map
from pytest_isolate.timing import EnvStats, RunReport


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_roots_own_ranges_are_used(tmp_path: Path) -> None:
    subuid = write(tmp_path / "subuid", "alice:100000:65536\nroot:300000:65536\n")
    subgid = write(tmp_path / "subgid", "root:400000:200000\n")  # wider than needed
    mapping = root_map(subuid, subgid)
    assert (mapping.uid, mapping.gid) == ((300000, 65536), (400000, 65536))
    assert mapping.cfg() == {"uid": [300000, 65536], "gid": [400000, 65536]}
    assert mapping.describe().startswith("host uid 300000 (range of 65536, root's ranges")


def test_uid_zero_names_root_too(tmp_path: Path) -> None:
    subuid = write(tmp_path / "subuid", "# comment\nbroken line\n0:500000:65536\n")
    subgid = write(tmp_path / "subgid", "0:500000:65536\n")
    assert root_map(subuid, subgid).uid == (500000, 65536)


def test_without_a_range_for_root_the_built_in_one(tmp_path: Path) -> None:
    subuid = write(tmp_path / "subuid", "alice:100000:65536\n")
    mapping = root_map(subuid, str(tmp_path / "missing"))
    assert mapping.uid == mapping.gid == BUILTIN_ROOT_RANGE == (2**31, 65536)
    assert "built-in; give root a range in /etc/subuid" in mapping.describe()


def test_the_summary_names_an_environment_whose_root_stayed_the_hosts() -> None:
    report = RunReport("run")
    report.envs["a"] = EnvStats(name="a", backend="chroot", arch="amd64", release="trixie",
                                root="host uid 2147483648 (range of 65536, built-in)")
    report.envs["b"] = EnvStats(name="b", backend="lxc", arch="amd64", release="trixie",
                                root="the host's root: no mapped root here ([Errno 22] x)")
    report.envs["c"] = EnvStats(name="c", backend="chroot", arch="amd64", release="trixie",
                                root="the host's root (privileged = true)")
    lines = report.table()
    assert "root of b is the host's root: no mapped root here ([Errno 22] x)" in lines
    assert not [line for line in lines if line.startswith(("root of a", "root of c"))]
    merged = RunReport("run")
    merged.merge(report.to_json())
    assert merged.envs["b"].root == report.envs["b"].root
