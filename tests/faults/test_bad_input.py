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
    ('isolate_timeout = "abc"', ["ini key 'isolate_timeout'", "timeout must be a positive number "
                                 "of seconds, got 'abc'"]),
    ('isolate_timeout = "-5"', ["ini key 'isolate_timeout'", "got '-5'"]),
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
    result.stdout.fnmatch_lines([
        "*environment 'nopy': the agent's stream ended*",
        "--- environment log tail ---",
        "*FileNotFoundError*/nonexistent/python3*",
    ])


@pytest.mark.xfail(strict=True, reason="core bug: values in an environment's options table "
                   "are not validated: options.python = 3 reaches the launcher's execvpe "
                   "(TypeError in agent.log) and the tests fail with 'the agent's stream ended'")
def test_option_of_the_wrong_type_is_a_usage_error(inner: Inner) -> None:
    toml = '[tool.pytest-isolate.envs.badpy]\nbackend = "chroot"\noptions = {python = 3}\n'
    project(inner, toml, "badpy")
    result = inner.run()
    assert result.ret == USAGE
    result.stderr.fnmatch_lines([
        "ERROR: *pyproject.toml: [[]tool.pytest-isolate.envs.badpy[]]: option 'python' must be "
        "a string, got 3*"])


@pytest.mark.xfail(strict=True, reason="core gap: package names are not checked before the "
                   "build: an impossible name costs an mmdebstrap run and is reported as a "
                   "provisioning failure of each test, not a usage error naming the key")
def test_impossible_package_name_is_a_usage_error(inner: Inner) -> None:
    toml = ('[tool.pytest-isolate.envs.nopkg]\nbackend = "chroot"\n'
            'packages = ["no such package!"]\n')
    project(inner, toml, "nopkg")
    result = inner.run(timeout=600)
    assert result.ret == USAGE
    result.stderr.fnmatch_lines([
        "ERROR: *pyproject.toml: [[]tool.pytest-isolate.envs.nopkg[]]*key 'packages'*"
        "'no such package!'*"])
