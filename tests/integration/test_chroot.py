"""chroot-specific behaviour against the real backend: provisioning, caching, reset modes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def cache_dir(pytestconfig: pytest.Config) -> Path:
    """The suite's own (warm) cache: builds made here are reused by later runs."""
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    return Path(manager.cache.root)


def run(pytester: pytest.Pytester, cache_dir: Path, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--isolate-cache-dir={cache_dir}", "--isolate-strict",
        *args, timeout=1200)


def test_setup_commands_run_once_and_are_cached(pytester: pytest.Pytester,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    cache_dir = tmp_path_factory.mktemp("private-cache")  # a fresh build is the point here
    pytester.makefile(".toml", pyproject=textwrap.dedent("""
        [tool.pytest-isolate.envs.with-setup]
        backend = "chroot"
        setup = ["echo built-by-setup > /etc/setup-marker", "touch \\"$PWD/setup-saw-rootdir\\""]
    """))
    pytester.makepyfile(test_setup="""
        import pytest
        @pytest.mark.isolate("with-setup")
        def test_marker():
            assert open("/etc/setup-marker").read() == "built-by-setup\\n"
    """)
    first = run(pytester, cache_dir, "--isolate-report=first.json")
    first.assert_outcomes(passed=1)
    assert json.loads((pytester.path / "first.json").read_text())[
        "environments"]["with-setup"]["cache_hit"] is False
    second = run(pytester, cache_dir, "--isolate-report=second.json", "-s")
    second.assert_outcomes(passed=1)
    report = json.loads((pytester.path / "second.json").read_text())
    env = report["environments"]["with-setup"]
    assert env["cache_hit"] is True
    assert env["provision"] < 2.0
    assert "building" not in second.stdout.str()
    # setup commands run in the rootdir, which is writable for them
    assert (pytester.path / "setup-saw-rootdir").exists()


def test_failed_build_leaves_nothing_and_shows_the_log(pytester: pytest.Pytester,
                                                       cache_dir: Path) -> None:
    pytester.makefile(".toml", pyproject=textwrap.dedent("""
        [tool.pytest-isolate.envs.broken]
        backend = "chroot"
        packages = ["no-such-package-pytest-isolate"]
    """))
    pytester.makepyfile(test_broken="""
        import pytest
        @pytest.mark.isolate("broken")
        def test_one(): pass
        @pytest.mark.isolate("broken")
        def test_two(): pass
    """)
    result = run(pytester, cache_dir, "--isolate-report=r.json")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*building trixie/* root filesystem for 'broken' failed with exit status*",
        "*--- log tail ---*",
    ])
    assert "no-such-package-pytest-isolate" in result.stdout.str()
    result.stdout.fnmatch_lines(["*could not be built earlier in this run*"])  # built once
    key = json.loads((pytester.path / "r.json").read_text())["environments"]["broken"]["key"]
    assert key == "" or not (cache_dir / "rootfs" / key).exists()
    leftovers = [p.name for p in (cache_dir / "tmp").iterdir()
                 if p.name.startswith("rootfs-") and (p / "data").exists()]
    assert leftovers == []


def test_failing_setup_command_shows_its_output(pytester: pytest.Pytester, cache_dir: Path) -> None:
    pytester.makefile(".toml", pyproject=textwrap.dedent("""
        [tool.pytest-isolate.envs.bad-setup]
        backend = "chroot"
        setup = ["echo oops-from-setup; exit 3"]
    """))
    pytester.makepyfile(test_bad="""
        import pytest
        @pytest.mark.isolate("bad-setup")
        def test_one(): pass
    """)
    result = run(pytester, cache_dir)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*setup command 1 of 'bad-setup' ('echo oops-from-setup; exit 3') failed with exit status 3*",
    ])
    assert "oops-from-setup" in result.stdout.str()


def test_arm64_under_qemu_user(pytester: pytest.Pytester, cache_dir: Path) -> None:
    pytester.makefile(".toml", pyproject=textwrap.dedent("""
        [tool.pytest-isolate.envs.arm]
        backend = "chroot"
        arch = "arm64"
    """))
    pytester.makepyfile(test_arm="""
        import platform, struct, pytest
        @pytest.mark.isolate("arm", "chroot")
        def test_machine(isolate_target):
            expected = {"arm": "aarch64", "chroot": "x86_64"}[isolate_target]
            assert platform.machine() == expected
            assert struct.calcsize("P") == 8
    """)
    result = run(pytester, cache_dir, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_machine?arm? PASSED*", "*test_machine?chroot? PASSED*"])


@pytest.mark.parametrize("reset,expect", [("test", "clean"), ("module", "shared"),
                                          ("session", "shared")])
def test_reset_modes(pytester: pytest.Pytester, cache_dir: Path, reset: str, expect: str) -> None:
    pytester.makepyfile(test_a="""
        import os, pytest
        pytestmark = pytest.mark.isolate("chroot")
        def test_1_write():
            open("/etc/reset-probe", "w").write("x")
        def test_2_read():
            print("STATE", "shared" if os.path.exists("/etc/reset-probe") else "clean")
            assert False, "show output"
    """, test_b="""
        import os, pytest
        @pytest.mark.isolate("chroot")
        def test_other_module():
            print("OTHER", "shared" if os.path.exists("/etc/reset-probe") else "clean")
            assert False, "show output"
    """)
    result = run(pytester, cache_dir, f"--isolate-reset={reset}", "test_a.py", "test_b.py")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([f"STATE {expect}"])
    other = "shared" if reset == "session" else "clean"
    result.stdout.fnmatch_lines([f"OTHER {other}"])


def test_timeout_and_crash_do_not_stop_the_run(pytester: pytest.Pytester, cache_dir: Path) -> None:
    pytester.makepyfile(test_faults="""
        import os, time, pytest
        @pytest.mark.isolate("chroot", timeout=2)
        def test_hangs():
            time.sleep(600)
        @pytest.mark.isolate("chroot")
        def test_dies():
            os._exit(9)
        @pytest.mark.isolate("chroot")
        def test_after():
            assert True
    """)
    result = run(pytester, cache_dir, "-v")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*test_hangs FAILED*", "*test_dies FAILED*", "*test_after PASSED*",
        "*timeout: the test ran longer than 2.0s*",
        "*exited with status 9*",
    ])
    assert result.duration < 120
