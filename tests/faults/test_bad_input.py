"""Bad input that tests/unit/test_config_errors.py does not cover, against the real chroot backend.

Wanted: one clear error naming the key, the value, the file and the fix, given before any
environment is built; where the error can only come from a build (a setup command),
that command's output is in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faults_support import Inner

pytestmark = pytest.mark.integration

USAGE = pytest.ExitCode.USAGE_ERROR

ONE_TEST = """
    import pytest

    @pytest.mark.isolate({env!r})
    def test_inside():
        pass

    @pytest.mark.isolate({env!r})
    def test_inside_again():
        pass

    def test_local():
        pass
"""


def project(inner: Inner, toml: str, env: str) -> None:
    inner.write("pyproject.toml", toml)
    inner.write("test_input.py", ONE_TEST.format(env=env))


@pytest.mark.parametrize(("line", "needles"), [
    # a float ini option: pytest converts it, the message still names the key and the fix
    ('isolate_timeout = "abc"', ["ini key 'isolate_timeout'", "'abc'",
                                 "set it to a positive number of seconds"]),
    ('isolate_timeout = "-5"', ["ini key 'isolate_timeout'", "timeout must be a positive number "
                                "of seconds, got -5"]),
    ('isolate_reset = "never"', ["ini key 'isolate_reset'", "unsupported reset 'never'; "
                                 "supported: test, module, session"]),
], ids=["timeout-text", "timeout-negative", "reset"])
def test_bad_ini_value(inner: Inner, line: str, needles: list[str]) -> None:
    project(inner, f"[tool.pytest.ini_options]\n{line}\n", "chroot")
    result = inner.run()
    assert result.ret == USAGE
    err = result.stderr.str()
    assert str(inner.path / "pyproject.toml") in err
    for needle in needles:
        assert needle in err, (needle, err)
    result.stdout.no_fnmatch_line("*passed*")


FAILING_SETUP = """
    [tool.pytest-isolate.envs.broken]
    backend = "chroot"
    setup = ["echo boom-output-on-stdout; echo boom-on-stderr >&2; exit 3"]
"""


def test_failing_setup_command_shows_its_output(inner: Inner) -> None:
    """A setup command that fails: its output is in the error, the environment is built once
    per run (the second test fails fast), local tests still run, nothing enters the cache."""
    project(inner, FAILING_SETUP, "broken")
    builds = sorted((Path(inner.cache_dir) / "tmp").glob("rootfs-*"))
    result = inner.run(timeout=600)
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_inside *",
        "*setup command 1 of 'broken' ('echo boom-output-on-stdout; echo boom-on-stderr >&2; "
        "exit 3') failed with exit status 3*",
    ])
    out = result.stdout.str()
    assert "boom-output-on-stdout" in out and "boom-on-stderr" in out
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_inside_again*",
        "*environment 'broken' could not be built earlier in this run*",
    ])
    assert out.count("building trixie/amd64 root filesystem for 'broken' (key ") == 1
    # the failed build left no directory behind (others may be building at the same time)
    assert [p for p in sorted((Path(inner.cache_dir) / "tmp").glob("rootfs-*"))
            if p not in builds and p.exists()] == []


NO_PYTHON = """
    [tool.pytest-isolate.envs.nopy]
    backend = "chroot"
    options = {python = "/nonexistent/python3"}
"""


def test_a_failed_start_shows_the_log_tail(inner: Inner) -> None:
    project(inner, NO_PYTHON, "nopy")
    result = inner.run()
    # the launcher may exit before or after the host has sent the agent: either way the
    # agent is lost, and the log tail says why
    result.stdout.re_match_lines([
        r".*environment 'nopy': the agent's (stream ended|input is closed).*",
        "--- environment log tail ---",
        r".*FileNotFoundError.*/nonexistent/python3.*",
    ])


@pytest.mark.parametrize(("options", "needle"), [
    ("{python = 3}", "option 'python' must be a string, got 3"),
    ('{vm_drvier = "libvirt"}', "unknown option 'vm_drvier' for backend 'chroot'"),
], ids=["wrong-type", "unknown"])
def test_bad_option_is_a_usage_error(inner: Inner, options: str, needle: str) -> None:
    toml = f'[tool.pytest-isolate.envs.badpy]\nbackend = "chroot"\noptions = {options}\n'
    project(inner, toml, "badpy")
    result = inner.run()
    assert result.ret == USAGE
    result.stderr.fnmatch_lines([f"ERROR: *pyproject.toml: [[]tool.pytest-isolate.envs.badpy[]]: "
                                 f"{needle}*"])
    result.stdout.no_fnmatch_line("*passed*")


def test_qemu_options_are_checked_against_their_declaration(inner: Inner) -> None:
    toml = ('[tool.pytest-isolate.envs.vm]\nbackend = "qemu"\n'
            'options = {vm_driver = "virtualbox"}\n')
    project(inner, toml, "vm")
    result = inner.run()
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["ERROR: *envs.vm[]]: option 'vm_driver' must be one of "
                                 "'qemu', 'libvirt', got 'virtualbox'*"])


@pytest.mark.parametrize("name", ["no such package!", "gcc,make", "--allow-unauthenticated",
                                  "Gcc"])
def test_impossible_package_name_is_a_usage_error(inner: Inner, name: str) -> None:
    """Checked before any build: a comma or a leading '-' would reach mmdebstrap's
    --include as two packages or as an option."""
    toml = ('[tool.pytest-isolate.envs.nopkg]\nbackend = "chroot"\n'
            f'packages = ["{name}"]\n')
    project(inner, toml, "nopkg")
    builds = sorted((Path(inner.cache_dir) / "tmp").glob("rootfs-*"))
    result = inner.run(timeout=600)
    assert result.ret == USAGE
    result.stderr.fnmatch_lines([
        "ERROR: *pyproject.toml: [[]tool.pytest-isolate.envs.nopkg[]]*key 'packages'*"
        f"{name!r} is not a Debian package name*"])
    assert sorted((Path(inner.cache_dir) / "tmp").glob("rootfs-*")) == builds


@pytest.mark.parametrize(("line", "needle"), [
    ('memory = "lots"', "key 'memory' must be a size such as \"512M\""),
    ('disk = "10k"', "disk = '10k' is below the minimum of 1M"),
    ("pids = 2", "key 'pids' must be a whole number >= 16"),
    ('cpus = "all"', "key 'cpus' must be a number of CPUs"),
], ids=["memory", "disk", "pids", "cpus"])
def test_bad_limit_is_a_usage_error(inner: Inner, line: str, needle: str) -> None:
    project(inner, f'[tool.pytest-isolate.envs.lim]\nbackend = "chroot"\n{line}\n', "lim")
    result = inner.run()
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["ERROR: *pyproject.toml: [[]tool.pytest-isolate.envs.lim[]]*"])
    assert needle in result.stderr.str()
