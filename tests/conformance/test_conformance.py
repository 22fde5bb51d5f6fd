"""The conformance suite: what every backend must do, run against the real engines.

Parametrized over environment names (CONFORMANCE_ENVS below, or the
comma-separated ISOLATE_CONFORMANCE_ENVS environment variable).  A third-party
backend runs the same suite by naming its environment there:

    ISOLATE_CONFORMANCE_ENVS=myenv pytest --pyargs tests/conformance --isolate-strict
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_isolate.backends import BUILTIN_BACKENDS
from pytest_isolate.config import BUILTIN_ENVS
from pytest_isolate.environment import CommandFailed, CommandTimeout, Environment
from pytest_isolate.spec import ARCH_MACHINES


def _default_envs() -> list[str]:
    """Every built-in environment whose backend ships in this version."""
    names = []
    for name, values in BUILTIN_ENVS.items():
        module = BUILTIN_BACKENDS.get(values["backend"], "").partition(":")[0]
        if module and importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


CONFORMANCE_ENVS = [
    n for n in os.environ.get("ISOLATE_CONFORMANCE_ENVS", "").split(",") if n
] or _default_envs()
os.environ["ISOLATE_SECRET_TOKEN"] = "s3cr3t"  # must never be visible inside

pytestmark = pytest.mark.integration


@pytest.fixture(params=CONFORMANCE_ENVS)
def env(request: pytest.FixtureRequest, isolate_env: Callable[[str], Environment]) -> Environment:
    return isolate_env(request.param)


# ---------------------------------------------------------------- commands


def test_argv_runs_without_a_shell(env: Environment) -> None:
    r = env.run(["echo", "$HOME", "a b"])
    assert r.returncode == 0
    assert r.stdout == "$HOME a b\n"


def test_string_runs_through_sh(env: Environment) -> None:
    r = env.run("echo hi > /tmp/x && cat /tmp/x; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "hi\n", "")


def test_missing_command_is_127(env: Environment) -> None:
    r = env.run(["/no/such/command"])
    assert r.returncode == 127
    assert "/no/such/command" in r.stderr


def test_binary_stdin_stdout_stderr(env: Environment) -> None:
    data = bytes(range(256)) * 64
    r = env.run(["sh", "-c", "cat; echo err >&2"], input=data, text=False)
    assert r.stdout == data
    assert r.stderr == b"err\n"


def test_env_and_cwd(env: Environment) -> None:
    r = env.run("echo $FOO; pwd", env={"FOO": "bar baz"}, cwd="/usr")
    assert r.stdout == "bar baz\n/usr\n"


def test_host_environment_does_not_leak(env: Environment) -> None:
    assert os.environ["ISOLATE_SECRET_TOKEN"] == "s3cr3t"
    assert "ISOLATE_SECRET_TOKEN" not in env.run("env").stdout


def test_check_raises(env: Environment) -> None:
    with pytest.raises(CommandFailed) as info:
        env.run("echo out; exit 3", check=True)
    assert info.value.result.returncode == 3
    assert info.value.result.stdout == "out\n"


def test_timeout_kills_a_process_that_ignores_sigterm(env: Environment) -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        env.run(["sh", "-c", "trap '' TERM; sleep 60"], timeout=1)
    assert time.monotonic() - started < 20
    assert env.run("echo alive").stdout == "alive\n"


def test_architecture(env: Environment) -> None:
    machine = env.run(["uname", "-m"]).stdout.strip()
    assert machine == ARCH_MACHINES[env.arch]


def test_no_network_by_default(env: Environment) -> None:
    r = env.run("ls /sys/class/net 2>/dev/null || cut -d: -f1 /proc/net/dev | tail -n +3")
    interfaces = set(r.stdout.split())
    assert interfaces == {"lo"}, interfaces


def test_rootdir_at_same_path_and_read_only(env: Environment, pytestconfig: pytest.Config) -> None:
    rootdir = str(pytestconfig.rootpath)
    r = env.run(["cat", f"{rootdir}/tests/conformance/test_conformance.py"])
    assert r.returncode == 0
    assert "The conformance suite" in r.stdout
    w = env.run(["touch", f"{rootdir}/isolate-write-probe"])
    assert w.returncode != 0
    assert not os.path.exists(f"{rootdir}/isolate-write-probe")


# ---------------------------------------------------------------- files


def test_put_get_file_keeps_mode(env: Environment, tmp_path: Path) -> None:
    src = tmp_path / "script.sh"
    src.write_text("#!/bin/sh\necho from-script\n")
    src.chmod(0o750)
    env.put(src, "/opt/script.sh")
    assert env.run(["/opt/script.sh"]).stdout == "from-script\n"
    env.get("/opt/script.sh", tmp_path / "back.sh")
    back = tmp_path / "back.sh"
    assert back.read_text() == src.read_text()
    assert stat.S_IMODE(back.stat().st_mode) == 0o750


def test_put_get_directory(env: Environment, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("A")
    (tree / "b.bin").write_bytes(b"\0\1\2")
    env.put(tree, "/srv/tree")
    assert env.run("cat /srv/tree/sub/a.txt").stdout == "A"
    env.run("echo new > /srv/tree/c.txt", check=True)
    env.get("/srv/tree", tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "a.txt").read_text() == "A"
    assert (tmp_path / "out" / "b.bin").read_bytes() == b"\0\1\2"
    assert (tmp_path / "out" / "c.txt").read_text() == "new\n"


def test_get_cannot_escape_through_symlinks(env: Environment, tmp_path: Path) -> None:
    env.run("mkdir -p /srv/evil && ln -s /etc/passwd /srv/evil/abs && ln -s ../../../../x /srv/evil/rel",
            check=True)
    with pytest.raises(Exception):  # noqa: B017 - tarfile's data filter refuses the archive
        env.get("/srv/evil", tmp_path / "evil")
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path.parent.parent / "x").exists()


# ---------------------------------------------------------------- state


@pytest.fixture(scope="module")
def marker_file() -> str:
    return f"/etc/isolate-conformance-{os.getpid()}"


def test_state_a_writes(env: Environment, marker_file: str) -> None:
    env.run(f"echo dirty > {marker_file}", check=True)
    assert env.run(["cat", marker_file]).stdout == "dirty\n"


def test_state_b_is_clean(env: Environment, marker_file: str) -> None:
    assert env.run(["test", "-e", marker_file]).returncode == 1


def test_two_environments_are_independent(isolate_env: Callable[[str], Environment]) -> None:
    name = CONFORMANCE_ENVS[0]
    one, two = isolate_env(name), isolate_env(name)
    one.run("echo 1 > /etc/only-in-one", check=True)
    assert two.run(["test", "-e", "/etc/only-in-one"]).returncode == 1


def test_snapshot_restore(env: Environment) -> None:
    env.run("echo v1 > /etc/state", check=True)
    env.snapshot("one")
    env.run("echo v2 > /etc/state; rm /etc/hostname; touch /etc/extra", check=True)
    env.snapshot("two")
    env.restore("one")
    assert env.run("cat /etc/state").stdout == "v1\n"
    assert env.run(["test", "-e", "/etc/hostname"]).returncode == 0
    assert env.run(["test", "-e", "/etc/extra"]).returncode == 1
    env.restore("two")
    assert env.run("cat /etc/state").stdout == "v2\n"
    assert env.run(["test", "-e", "/etc/hostname"]).returncode == 1
    with pytest.raises(Exception, match="no snapshot named 'nope'"):
        env.restore("nope")


def test_background_processes_end_with_the_environment(
    isolate_env: Callable[[str], Environment],
) -> None:
    name = CONFORMANCE_ENVS[0]
    one = isolate_env(name)
    processes = "sleep 0.3; cat /proc/[0-9]*/cmdline | tr '\\0' ' '"
    one.run("setsid sleep 1000 >/dev/null 2>&1 < /dev/null & sleep 0.3", check=True)
    assert "sleep 1000" in one.run(processes).stdout
    one.close()
    two = isolate_env(name)
    assert "sleep 1000" not in two.run(processes).stdout


# ---------------------------------------------------------------- marker outcomes

OUTCOMES = textwrap.dedent(
    """
    import logging, os, platform, sys
    import pytest

    @pytest.fixture
    def resource():
        print("setting up")
        yield 5
        print("tearing down")

    @pytest.fixture
    def broken():
        raise RuntimeError("fixture broke")

    @pytest.fixture
    def broken_teardown():
        yield
        raise RuntimeError("teardown broke")

    def test_pass(resource):
        assert resource == 5
        assert platform.machine() == MACHINE

    def test_fail():
        print("to stdout")
        sys.stderr.write("to stderr\\n")
        logging.getLogger("x").warning("a log line")
        assert [1, 2, 3] == [1, 2, 4]

    def test_error(broken):
        pass

    def test_teardown_error(broken_teardown):
        pass

    def test_skip():
        pytest.skip("not today")

    @pytest.mark.xfail(reason="known")
    def test_xfail():
        assert 0

    @pytest.mark.xfail(reason="known")
    def test_xpass():
        pass

    @pytest.mark.parametrize("n", [1, 2])
    def test_param(n):
        assert n in (1, 2)

    def test_writes_a():
        with open("/etc/isolate-outcome", "w") as f:
            f.write("x")

    def test_writes_b_sees_clean_state():
        assert not os.path.exists("/etc/isolate-outcome")
    """
)


@pytest.mark.parametrize("name", CONFORMANCE_ENVS)
def test_marker_outcomes(pytester: pytest.Pytester, name: str, isolate_cache_dir: str) -> None:
    from pytest_isolate.spec import host_arch

    arch = BUILTIN_ENVS.get(name, {}).get("arch", host_arch())
    pytester.makepyfile(test_outcomes=f"MACHINE = {ARCH_MACHINES[arch]!r}\n" + OUTCOMES)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--isolate-env={name}", "--isolate-strict", "-v", "-rA",
        f"--isolate-cache-dir={isolate_cache_dir}", timeout=900,
    )
    result.assert_outcomes(passed=6, failed=1, errors=2, skipped=1, xfailed=1, xpassed=1)
    result.stdout.fnmatch_lines([
        "*test_outcomes.py::test_pass PASSED*",
        "*test_outcomes.py::test_fail FAILED*",
        "*test_outcomes.py::test_error ERROR*",
        "*test_outcomes.py::test_param?1? PASSED*",
        "*assert [[]1, 2, 3[]] == [[]1, 2, 4[]]*",
        "*Captured stdout call*",
        "to stdout",
        "*Captured stderr call*",
        "to stderr",
        "*Captured log call*",
        "*a log line*",
    ])
    result.stdout.fnmatch_lines(["*ERROR at setup of test_error*", "*fixture broke*"])
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_teardown_error*"])
    result.stdout.fnmatch_lines(["*SKIPPED*not today*"])


# ---------------------------------------------------------------- hardening (issue 11)

#: A container backend must refuse what hardening_probe probes (a VM is its own kernel).
HARDENED_ENVS = [n for n in CONFORMANCE_ENVS if BUILTIN_ENVS.get(n, {}).get("backend") != "qemu"]

HARDENED_MARKER_TESTS = """
import pytest
from hardening_probe import PROBE, refusals

exec(PROBE)

@pytest.fixture(scope="module")
def in_zygote():
    return probe(admin=True)

def test_test_is_refused():
    assert refusals(probe()) == []

def test_module_fixture_is_refused(in_zygote):
    assert refusals(in_zygote, admin=True) == []
"""


@pytest.mark.parametrize("name", HARDENED_ENVS)
def test_commands_cannot_reach_the_host_kernel(
        isolate_env: Callable[[str], Environment], name: str) -> None:
    """Kernel settings, sysrq, masked /proc entries, /sys, capabilities, no_new_privs,
    seccomp (see hardening_probe: nothing changes even where a refusal is missing)."""
    from hardening_probe import PROBE, refusals

    result = json.loads(isolate_env(name).run(["python3", "-c", PROBE], check=True).stdout)
    assert refusals(result) == []


@pytest.mark.parametrize("name", HARDENED_ENVS)
def test_marker_tests_cannot_reach_the_host_kernel(pytester: pytest.Pytester, name: str,
                                                   isolate_cache_dir: str) -> None:
    import shutil

    shutil.copy(Path(__file__).with_name("hardening_probe.py"), pytester.path)
    pytester.makepyfile(test_hardened=HARDENED_MARKER_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--isolate-env={name}", "--isolate-strict", "-rA",
        f"--isolate-cache-dir={isolate_cache_dir}", timeout=900,
    )
    result.assert_outcomes(passed=2)


@pytest.fixture(scope="session")
def isolate_cache_dir(pytestconfig: pytest.Config) -> Iterator[str]:
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    yield str(manager.cache.root)
