"""Hardening (issue 11): a test's root is not the host's root.

From inside chroot, docker, lxc and schroot, a marker test, a session-scoped fixture
(it runs in the zygote), a ``run()`` command and a shell probe the boundary with
tests/conformance/hardening_probe.py: kernel settings (written back with the value just
read, so nothing changes if a refusal were missing), /proc/sysrq-trigger (opened, never
written), masked /proc entries, read-only /sys, capabilities, no_new_privs, the seccomp
filter and syscalls it must refuse.  ``privileged = true`` shows what opting out grants.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from faults_support import BACKENDS, Inner

from pytest_isolate.environment import Environment
from pytest_isolate.interactive import interact

CONFORMANCE = Path(__file__).resolve().parent.parent / "conformance"
if str(CONFORMANCE) not in sys.path:
    sys.path.insert(0, str(CONFORMANCE))

from hardening_probe import CAP_SYS_ADMIN, PROBE, refusals  # noqa: E402

pytestmark = pytest.mark.integration

INNER = """
    import json
    import pytest
    from hardening_probe import PROBE, refusals

    exec(PROBE)
    ENV = {env!r}

    @pytest.fixture(scope="session")
    def in_zygote():
        return probe(admin=True)  # session-scoped: set up once, in the zygote

    @pytest.mark.isolate(ENV)
    def test_marker_test_is_refused():
        result = probe()
        print(json.dumps(result))
        assert result["uid"] == 0  # still root inside
        assert refusals(result) == []

    @pytest.mark.isolate(ENV)
    def test_session_fixture_is_refused(in_zygote):
        print(json.dumps(in_zygote))
        assert refusals(in_zygote, admin=True) == []

    @pytest.mark.isolate(ENV)
    def test_a_second_test_is_refused_too(in_zygote):
        assert refusals(probe()) == []
"""

PRIVILEGED = """
    import json
    import pytest
    from hardening_probe import CAP_SYS_ADMIN, PROBE

    exec(PROBE)

    @pytest.mark.isolate("priv")
    def test_what_privileged_grants():
        result = probe()
        print(json.dumps(result))
        assert result["Seccomp"] == {seccomp!r}  # docker: the engine's own profile stays
        assert result["NoNewPrivs"] == "0"
        assert result["CapEff"] & CAP_SYS_ADMIN
        assert result["unshare_mount"] == "ok" and result["mount"] == "ok"
"""


def write_project(inner: Inner, name: str, source: str, pyproject: str = "") -> None:
    shutil.copy(CONFORMANCE / "hardening_probe.py", inner.path / "hardening_probe.py")
    if pyproject:
        inner.write("pyproject.toml", pyproject)
    inner.write(name, source)


@pytest.mark.parametrize("env", BACKENDS)
def test_marker_tests_and_fixtures_are_refused(inner: Inner, env: str) -> None:
    write_project(inner, "test_hardening_inner.py", INNER.format(env=env))
    result = inner.run("-rA", timeout=300)
    result.assert_outcomes(passed=3)
    assert "WARNING: environment" not in result.stdout.str()


@pytest.mark.parametrize("backend", ["chroot", "docker"])
def test_privileged_opts_out_with_a_warning(inner: Inner, backend: str) -> None:
    seccomp = "2" if backend == "docker" else "0"
    write_project(inner, "test_privileged_inner.py", PRIVILEGED.format(seccomp=seccomp),
                  f'[tool.pytest-isolate.envs.priv]\nbackend = "{backend}"\nprivileged = true\n')
    result = inner.run("-rA", timeout=300)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["WARNING: environment 'priv' is privileged*"])


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, isolate_env: Callable[[str], Environment]) -> Environment:
    return isolate_env(request.param)


def test_run_commands_are_refused(env: Environment) -> None:
    r = env.run(["python3", "-c", PROBE], check=True)
    result = json.loads(r.stdout)
    assert result["uid"] == 0
    assert refusals(result) == []


def test_a_shell_is_refused(env: Environment) -> None:
    """What `python -m pytest_isolate shell ENV` runs: the worker's pty op."""
    with tempfile.TemporaryFile() as out:
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            code = interact(env._conn, env._ch, ["python3", "-c", PROBE],
                            stdin=stdin, stdout=out.fileno())
        finally:
            os.close(stdin)
        out.seek(0)
        text = out.read().decode(errors="replace")
    assert code == 0, text
    line = next(line for line in text.splitlines() if line.startswith("{"))
    result = json.loads(line)
    assert refusals(result) == []
    assert not result["CapEff"] & CAP_SYS_ADMIN
