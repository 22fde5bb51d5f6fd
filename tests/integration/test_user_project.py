"""A user's own project, outside this repository, from the built wheel to a green run.

What docs/ci/ tells users to do, step by step: this project's wheel is built and installed
into a fresh virtual environment in a temporary directory (with its dependencies from the
package index), a throw-away project is generated there (its own pyproject.toml with a
``[tool.pytest-isolate]`` table, a package and tests), ``pytest-isolate setup`` runs in
--dry-run and real mode (on our CI machine scripts/setup.sh has already set everything
up, so the real run must find nothing to do, quickly, and a second run too), and
``pytest --isolate-env chroot,docker`` runs the project's suite.  The outcomes are read
from the JUnit XML.  Each step's time is printed (run with -s to see them) and kept in
the test's user_properties.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="setup and the chroot/docker run need root here"),
]

REPO = Path(__file__).resolve().parents[2]

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "userproj"
version = "0.1"

[tool.setuptools]
packages = ["userproj"]

[tool.pytest-isolate]
timeout = 120
"""

PACKAGE = """\
import struct


def word_bits() -> int:
    return struct.calcsize("P") * 8
"""

TESTS = """\
import os
import sys

import pytest

import userproj


def test_runs_in_the_environment(isolate_target):
    assert isolate_target in ("chroot", "docker")
    with open("/etc/os-release") as f:
        assert "trixie" in f.read()   # Debian stable inside, whatever the host is


def test_the_project_is_installed_inside():
    assert userproj.word_bits() == 64
    assert os.environ.get("VIRTUAL_ENV") == "/.isolate/venv"
    assert userproj.__file__.startswith(os.getcwd())   # editable: the tree at the same path


def test_root_on_a_clean_system():
    assert os.getuid() == 0
    assert not os.path.exists("/etc/userproj-was-here")
    with open("/etc/userproj-was-here", "w") as f:
        f.write("x")


def test_root_on_a_clean_system_again():
    assert not os.path.exists("/etc/userproj-was-here")


@pytest.mark.skip(reason="a skip")
def test_skipped():
    pass


@pytest.mark.xfail(reason="an expected failure", strict=True)
def test_xfail():
    assert sys.version_info < (3, 0)
"""


class Steps:
    def __init__(self, node: pytest.Item, env: dict[str, str]) -> None:
        self.node = node
        self.env = env
        self.times: list[tuple[str, float]] = []

    def run(self, name: str, argv: list[str], cwd: Path,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        seconds = time.monotonic() - started
        self.times.append((name, seconds))
        self.node.user_properties.append((f"step.{name}", round(seconds, 2)))
        return result

    def report(self) -> str:
        return "\n".join(f"  {name:<28} {seconds:7.1f}s" for name, seconds in self.times)


def out(result: subprocess.CompletedProcess[str]) -> str:
    return f"status {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"


def test_fresh_project_outside_the_repository(tmp_path: Path, request: pytest.FixtureRequest,
                                              pytestconfig: pytest.Config) -> None:
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    assert manager is not None
    # a user's shell: nothing of this repository's venv or of the pytest run around us
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "VIRTUAL_ENV", "PYTHON"))}
    venv = tmp_path / "venv"
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    # the built environments are shared with the rest of this run, as a CI cache would be
    env["PYTEST_ISOLATE_CACHE_DIR"] = str(manager.cache.root)
    steps = Steps(request.node, env)

    # 1. the wheel, built from a copy of the sources (the shared tree stays untouched)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "pytest_isolate", src / "pytest_isolate",
                    ignore=shutil.ignore_patterns("__pycache__"))
    built = steps.run("pip wheel --no-deps", [sys.executable, "-m", "pip", "wheel", "-q",
                      "--no-deps", str(src), "-w", str(tmp_path / "wheels")], cwd=tmp_path)
    assert built.returncode == 0, out(built)
    (wheel,) = (tmp_path / "wheels").glob("pytest_isolate_env-*.whl")

    # 2. a fresh venv from the system's python3, the wheel and its dependencies from the index
    made = steps.run("python3 -m venv", ["/usr/bin/python3", "-m", "venv", str(venv)], cwd=tmp_path)
    assert made.returncode == 0, out(made)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # a current pip: the environments' Python (trixie: 3.13) is built with the host's pip
    up = steps.run("pip install --upgrade pip", [*pip, "--upgrade", "pip"], cwd=tmp_path)
    assert up.returncode == 0, out(up)
    installed = steps.run("pip install wheel[all]", [*pip, f"{wheel}[all]"], cwd=tmp_path)
    assert installed.returncode == 0, out(installed)
    assert not (venv / "bin" / "pytest-isolate").resolve().is_relative_to(REPO)

    # 3. the user's project: its own pyproject.toml, package and tests
    project = tmp_path / "userproj"
    (project / "userproj").mkdir(parents=True)
    (project / "tests").mkdir()
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "userproj" / "__init__.py").write_text(PACKAGE)
    (project / "tests" / "test_user.py").write_text(TESTS)
    editable = steps.run("pip install -e .", [*pip, "-e", "."], cwd=project)
    assert editable.returncode == 0, out(editable)

    # 4. setup: what it would do, then doing it; a second run finds nothing to do
    setup = [str(venv / "bin" / "pytest-isolate"), "setup", "--envs", "chroot,docker"]
    dry = steps.run("setup --dry-run", [*setup, "--dry-run"], cwd=project, timeout=120)
    assert dry.returncode == 0, out(dry)
    assert dry.stdout.startswith("setup for chroot, docker (--envs chroot,docker)"), out(dry)
    real = steps.run("setup", setup, cwd=project)
    assert real.returncode == 0, out(real)
    again = steps.run("setup (again)", setup, cwd=project, timeout=120)
    assert again.returncode == 0, out(again)
    assert "nothing to do: everything is in place" in again.stdout, out(again)
    assert steps.times[-1][1] < 30, steps.report()

    # 5. the suite, unmarked tests inside chroot and docker
    junit = project / "junit.xml"
    suite = steps.run("pytest --isolate-env chroot,docker",
                      [str(venv / "bin" / "pytest"), "--isolate-env", "chroot,docker",
                       "--isolate-strict", "-p", "no:cacheprovider", "-rA",
                       f"--junitxml={junit}"], cwd=project, timeout=1800)
    print("\nsteps of a fresh project outside the repository:\n" + steps.report())
    assert suite.returncode == 0, out(suite)
    outcomes: dict[str, str] = {}
    envs: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        skipped = case.find("skipped")
        if skipped is not None and skipped.get("type") == "pytest.xfail":
            kinds = ["xfailed"]
        outcomes[case.get("name", "")] = kinds[0] if kinds else "passed"
        for prop in case.iter("property"):
            if prop.get("name") == "isolate.env":
                envs[case.get("name", "")] = prop.get("value", "")
    expected = {}
    for test, outcome in (("test_runs_in_the_environment", "passed"),
                          ("test_the_project_is_installed_inside", "passed"),
                          ("test_root_on_a_clean_system", "passed"),
                          ("test_root_on_a_clean_system_again", "passed"),
                          ("test_skipped", "skipped"), ("test_xfail", "xfailed")):
        for env_name in ("chroot", "docker"):
            expected[f"{test}[{env_name}]"] = outcome
    assert outcomes == expected, out(suite)
    ran = {name: env_name for name, env_name in envs.items() if outcomes[name] == "passed"}
    assert ran and all(name.endswith(f"[{env_name}]") for name, env_name in ran.items()), envs
    assert "8 passed, 2 skipped, 2 xfailed" in suite.stdout, out(suite)
