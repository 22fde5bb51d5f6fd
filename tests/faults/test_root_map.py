"""Root mapped away from the host's root (issue 11, item 2): chroot, schroot, lxc as root.

pytest runs as root here (CI does), so these are the runs where a test's root could be
the host's.  The inner tests look from inside (the kernel's own uid map, who owns what,
what root may still do there), the outer ones from the host (who owns what a test wrote
through a writable bind, what the run's report says).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from faults_support import Inner

from pytest_isolate.namespaces import RootMap, launcher_argv, root_map, where_root_is
from pytest_isolate.spec import EnvSpec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the mapped root is what runs as root get"),
]

INNER = """
    import os
    import subprocess

    import pytest

    @pytest.fixture(scope="session")
    def zygote_uid_map():
        with open("/proc/self/uid_map") as f:  # a session fixture runs in the zygote
            return f.read().split()

    @pytest.mark.isolate("{env}")
    def test_root_inside_is_not_the_hosts(zygote_uid_map):
        with open("/proc/self/uid_map") as f:
            inside, host, count = f.read().split()
        with open("/proc/self/gid_map") as f:
            ginside, ghost, gcount = f.read().split()
        assert (inside, host, count) == ("0", "{uid}", "{count}")
        assert (ginside, ghost, gcount) == ("0", "{gid}", "{count}")
        assert zygote_uid_map == ["0", "{uid}", "{count}"]
        assert os.getuid() == 0 and os.getgid() == 0

    @pytest.mark.isolate("{env}")
    def test_the_root_filesystem_is_roots_inside():
        # the cached root filesystem belongs to the host's root on disk: seen through
        # the idmapped mount, it belongs to root inside, with its other owners kept
        for path in ("/", "/etc", "/etc/passwd", "/usr/bin/python3", "/tmp", "/dev/shm",
                     "/root"):
            assert os.stat(path).st_uid == 0, path
        assert os.stat("/etc/shadow").st_gid == 42  # group shadow
        with open("/etc/isolate-root-map", "w") as f:  # root may change its own root
            f.write("x")
        os.mkdir("/isolate-root-map")
        os.chown("/etc/isolate-root-map", 65534, 65534)
        with open("/etc/passwd", "a") as f:
            f.write("")
        os.remove("/etc/isolate-root-map")

    @pytest.mark.isolate("{env}")
    def test_other_users_work_inside():
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "sh", "-c", "id -u; touch /tmp/by-nobody; stat -c %u /tmp/by-nobody"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["65534", "65534"]
        # the test's /proc is its own PID namespace's: a child it starts is there
        child = subprocess.Popen(["sleep", "30"])
        try:
            assert os.path.exists("/proc/%d/stat" % child.pid)
            assert os.readlink("/proc/self") == str(os.getpid())
        finally:
            child.kill()
            child.wait()

    @pytest.mark.isolate("{env}")
    def test_writes_through_the_writable_project_are_the_hosts_roots():
        with open("written-inside.txt", "w") as f:
            f.write("inside")
        os.mkdir("dir-made-inside")
"""


@pytest.mark.parametrize("backend", ["chroot", "schroot", "lxc"])
def test_root_is_an_unprivileged_host_uid(inner: Inner, backend: str) -> None:
    mapping = root_map()
    inner.write("pyproject.toml", f"""
        [tool.pytest-isolate.envs.mapped]
        backend = "{backend}"
        rootdir_writable = true
    """)
    inner.write("test_mapped.py", INNER.format(uid=mapping.uid[0], gid=mapping.gid[0],
                                               count=mapping.uid[1], env="mapped"))
    inner.path.chmod(0o700)  # the host's root's alone: seen only through the idmapped bind
    result = inner.run("--isolate-report=report.json", timeout=300)
    result.assert_outcomes(passed=4)
    # what root inside wrote through the (idmapped) writable project is the host's root's,
    # as it was before the mapping: nothing of the project changes owner
    for name in ("written-inside.txt", "dir-made-inside"):
        st = (inner.path / name).stat()
        assert (st.st_uid, st.st_gid) == (0, 0), name
    root = inner.report()["environments"]["mapped"]["root"]
    assert root.startswith(f"host uid {mapping.uid[0]} "), root
    assert "root of mapped is the host's root" not in result.stdout.str()


@pytest.mark.parametrize("backend", ["chroot", "schroot", "lxc"])
def test_map_root_false_keeps_the_hosts_root(inner: Inner, backend: str) -> None:
    inner.write("pyproject.toml", f"""
        [tool.pytest-isolate.envs.plain]
        backend = "{backend}"
        options = {{ map_root = false }}
    """)
    inner.write("test_plain.py", """
        import pytest

        @pytest.mark.isolate("plain")
        def test_the_hosts_root():
            with open("/proc/self/uid_map") as f:
                assert f.read().split() == ["0", "0", "4294967295"]
    """)
    result = inner.run("--isolate-report=report.json", timeout=300)
    result.assert_outcomes(passed=1)
    root = inner.report()["environments"]["plain"]["root"]
    assert root.startswith("the host's root (options.map_root = false, "), root


PRIVILEGED = """
    import pytest

    @pytest.mark.isolate("priv")
    def test_privileged_keeps_the_hosts_root():
        with open("/proc/self/uid_map") as f:
            assert f.read().split() == ["0", "0", "4294967295"]
"""


def test_privileged_keeps_the_hosts_root(inner: Inner) -> None:
    inner.write("pyproject.toml", """
        [tool.pytest-isolate.envs.priv]
        backend = "chroot"
        privileged = true
    """)
    inner.write("test_priv.py", PRIVILEGED)
    result = inner.run("--isolate-report=report.json", timeout=300)
    result.assert_outcomes(passed=1)
    assert inner.report()["environments"]["priv"]["root"] == \
        "the host's root (privileged = true)"


def test_doctor_says_where_root_lives(inner: Inner) -> None:
    mapping = root_map()
    result = inner.pytester.run(sys.executable, "-m", "pytest_isolate", "doctor",
                                f"--cache-dir={inner.cache_dir}")
    out = result.stdout.str()
    assert f"chroot   host uid {mapping.uid[0]} (range of {mapping.uid[1]}" in out, out
    assert f"schroot  host uid {mapping.uid[0]} (range of {mapping.uid[1]}" in out, out
    assert f"lxc      host uid {mapping.uid[0]} (range of {mapping.uid[1]}" in out, out


def test_setup_commands_still_write_the_hosts_root_filesystem(inner: Inner) -> None:
    """Provisioning is not mapped: a setup command writes the cached root filesystem as
    the host's root, so what it makes is root's inside a mapped environment too."""
    inner.write("pyproject.toml", """
        [tool.pytest-isolate.envs.setup]
        backend = "chroot"
        setup = ["mkdir -p /opt/made && touch /opt/made/file && chmod 700 /opt/made"]
    """)
    inner.write("test_setup.py", """
        import os
        import pytest

        @pytest.mark.isolate("setup")
        def test_made_by_setup_is_roots():
            st = os.stat("/opt/made/file")
            assert (st.st_uid, st.st_gid) == (0, 0)
            assert os.listdir("/opt/made") == ["file"]  # mode 700: only its owner lists it
    """)
    result = inner.run(timeout=600)
    result.assert_outcomes(passed=1)


def launch(tmp_path: Path, rootfs: str, wrap: list[str]) -> list[str]:
    """The launcher alone (as the chroot backend starts it, mapped), on rootfs; returns
    what the environment's shell printed: its uid map, then the problem the launcher
    passed on."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    cfg = {"rootfs": rootfs, "workdir": str(workdir), "mode": "overlay", "binds": [],
           "hostname": "isolate-probe", "cwd": "/", "userns": root_map().cfg(),
           "argv": ["/bin/sh", "-c", 'cat /proc/self/uid_map; echo "[$PYTEST_ISOLATE_ROOT_MAP_PROBLEM]"']}
    out = subprocess.run([*wrap, *launcher_argv(cfg)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_launcher_maps_root_over_an_idmapped_root_filesystem(tmp_path: Path) -> None:
    mapping = root_map()
    lines = launch(tmp_path, "/", [])  # the host's own root (ext4 here) as the rootfs
    assert lines[0].split() == ["0", str(mapping.uid[0]), str(mapping.uid[1])]
    assert lines[1] == "[]"


def test_the_launcher_falls_back_where_idmapped_mounts_are_missing(tmp_path: Path) -> None:
    """An overlay cannot be idmapped: on it the environment keeps the host's root, and the
    reason reaches the agent (whose hello hands it to the host's summary)."""
    for d in ("upper", "ovl-work", "merged"):
        (tmp_path / d).mkdir()
    mount = (f"mount -t overlay overlay -o lowerdir=/,upperdir={tmp_path}/upper,"
             f"workdir={tmp_path}/ovl-work {tmp_path}/merged && exec \"$@\"")
    lines = launch(tmp_path, f"{tmp_path}/merged",
                   ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh"])
    assert lines[0].split() == ["0", "0", "4294967295"]
    assert lines[1].startswith("[[Errno 22] idmapped mount of ") and "merged" in lines[1]


@pytest.mark.parametrize(("hello", "expected"), [
    ({"uid_map": [0, 2147483648, 65536]}, "host uid 2147483648 (range of 65536, test)"),
    ({"uid_map": [0, 0, 4294967295], "root_map_problem": "[Errno 22] no idmap"},
     "the host's root: no mapped root here ([Errno 22] no idmap)"),
])
def test_the_report_says_where_root_is(hello: dict[str, object], expected: str) -> None:
    mapping = RootMap((2147483648, 65536), (2147483648, 65536), "test")
    spec = EnvSpec(name="c", backend="chroot")
    assert where_root_is(spec, mapping, hello) == expected
