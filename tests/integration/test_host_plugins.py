"""Host plugins people run with, on isolated tests (issue 10 item 3), with the real plugins.

This venv has pytest-cov, pytest-rerunfailures and pytest-timeout installed (the `dev`
extra); a pytest subprocess runs a generated project with each:

- pytest-cov: `--cov` reports lines that ran only inside chroot, docker and qemu_vm (never
  on the host), with the host's paths;
- pytest-rerunfailures: `@pytest.mark.flaky(reruns=2)` and `--reruns` rerun an isolated
  test, each attempt on a clean state, reported as "rerun";
- pytest-timeout: `@pytest.mark.timeout` and `--timeout` limit the test inside, and building
  the environment (a dependency layer, ~10 s) does not count against a 2 s limit;
- --durations, --maxfail and -p no:NAME behave as on the host.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from shared_support import output, run_pytest

pytestmark = pytest.mark.integration

CODE = '''\
def only_inside():
    value = 40
    return value + 2
'''

COVERED = '''\
import socket

import code_under_test


def test_only_inside():
    assert socket.gethostname().startswith("isolate-")
    assert code_under_test.only_inside() == 42
'''

FLAKY = '''\
import os

import pytest

MARK = "/tmp/attempted"


@pytest.mark.flaky(reruns=2)
def test_flaky_on_a_clean_state():
    # every attempt starts clean: what the failed attempt wrote is gone
    assert not os.path.exists(MARK)
    open(MARK, "w").write("x")
    assert False, "fails on every attempt"


def test_passes():
    pass
'''

SLOW = '''\
import time

import pytest


@pytest.mark.timeout(1)
def test_marked_limit():
    time.sleep(30)


def test_option_limit():
    time.sleep(30)


def test_quick():
    time.sleep(0.1)
'''


def project(root: Path, pyproject: str = "") -> Path:
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\npythonpath = ["."]\n' + pyproject)
    (root / "code_under_test.py").write_text(CODE)
    return root


@pytest.mark.parametrize("env", ["chroot", "docker", "qemu_vm"])
def test_coverage_measured_inside(tmp_path: Path, session_cache: str, env: str) -> None:
    root = project(tmp_path / "cov")
    (root / "tests" / "test_cov.py").write_text(COVERED)
    result = run_pytest(root, session_cache, "--isolate-env", env, "--cov=code_under_test",
                 "--cov-report=term-missing")
    assert result.returncode == 0, output(result)
    # lines 2-3 run only inside the environment; the host only imported the module
    row = re.search(r"^code_under_test\.py\s+(\d+)\s+(\d+)\s+(\d+)%", result.stdout, re.M)
    assert row is not None, output(result)
    assert row.groups() == ("3", "0", "100"), output(result)
    host_only = run_pytest(root, session_cache, "--cov=code_under_test", "--cov-report=term-missing",
                    "--collect-only", "-q")
    assert re.search(r"^code_under_test\.py\s+3\s+2\s+33%\s+2-3$", host_only.stdout, re.M), \
        output(host_only)


def test_reruns_each_on_a_clean_state(tmp_path: Path, session_cache: str) -> None:
    root = project(tmp_path / "flaky")
    (root / "tests" / "test_flaky.py").write_text(FLAKY)
    result = run_pytest(root, session_cache, "--isolate-env", "chroot", "-v")
    assert result.returncode == 1, output(result)
    text = result.stdout
    assert text.count("test_flaky_on_a_clean_state RERUN") == 2, output(result)
    assert "1 failed, 1 passed, 2 rerun" in text, output(result)
    # the final failure is the assertion of the third attempt, not a leftover file
    assert "AssertionError: fails on every attempt" in text, output(result)
    assert "assert not True" not in text, output(result)

    result = run_pytest(root, session_cache, "--isolate-env", "chroot", "--reruns", "1",
                 "tests/test_flaky.py::test_passes")
    assert result.returncode == 0 and "1 passed" in result.stdout, output(result)
    assert "rerun" not in result.stdout.splitlines()[-1], output(result)


def test_timeouts_apply_inside_and_not_to_provisioning(tmp_path: Path, session_cache: str) -> None:
    # a dependency layer that this rootdir alone uses: built during the first test, for
    # several seconds, while --timeout is 2
    root = project(tmp_path / "slow", '[tool.pytest-isolate]\ndeps = ["iniconfig"]\n')
    (root / "tests" / "test_slow.py").write_text(SLOW)
    result = run_pytest(root, session_cache, "--isolate-env", "chroot", "--timeout=2", "-v", "--durations=3",
                 "-p", "no:randomly")
    assert "installing the dependencies of 'chroot'" in result.stdout, output(result)
    text = result.stdout
    assert "test_quick PASSED" in text, output(result)
    assert "the test ran longer than 1.0s" in text, output(result)  # the marker's limit
    assert "the test ran longer than 2.0s" in text, output(result)  # --timeout
    assert "2 failed, 1 passed" in text, output(result)
    # --durations shows the inside durations of the slowest phases
    assert "slowest 3 durations" in text, output(result)

    result = run_pytest(root, session_cache, "--isolate-env", "chroot", "--timeout=2", "--maxfail=1")
    assert "1 failed" in result.stdout and "passed" not in result.stdout.splitlines()[-1], \
        output(result)
    assert "stopping after 1 failures" in result.stdout, output(result)


def test_addopts_the_inside_does_not_know_are_said_and_dropped(tmp_path: Path,
                                                                 session_cache: str) -> None:
    # --maxschedchunk belongs to xdist: loaded here, never inside
    root = project(tmp_path / "opts")
    (root / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\npythonpath = ["."]\n'
        'addopts = "--strict-markers --maxschedchunk=2"\n')
    (root / "tests" / "test_a.py").write_text("def test_a():\n    pass\n")
    result = run_pytest(root, session_cache, "--isolate-env", "chroot")
    assert result.returncode == 0, output(result)
    lines = [ln for ln in result.stdout.splitlines() if "refused the project's addopts" in ln]
    assert len(lines) == 1 and "--maxschedchunk=2" in lines[0], output(result)
    assert "1 passed" in result.stdout, output(result)
