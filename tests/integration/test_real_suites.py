"""Real projects' own test suites inside environments (issue 10, item 5).

Three projects from the package index, pinned, their sdists fetched once into the session's
cache directory (``<cache>/real-suites/``) and unpacked there with ONLY a
``[tool.pytest-isolate]`` table added to their pyproject.toml (created for asgiref, which has
none):

- iso8601: pure Python, its suite uses hypothesis (and pytz); built by poetry-core;
- markupsafe: a C extension (``_speedups``) compiled inside (gcc and python3-dev in the
  environment); its suite runs every test against both implementations, and the speedups
  half skips when the extension is missing, so equal counts prove it was compiled inside
  for the environment's Python (trixie's 3.13; the host has another);
- asgiref: needs a pytest plugin (pytest-asyncio, strict mode): loaded inside with ``-p``
  because the host run loaded it. Its host venv also has uv, so its layers are built by uv
  (``installer = "auto"``), the other two projects' by pip.

Each suite runs on the host in a venv of its own (``<cache>/real-suites/venv-NAME``: the
project installed, the same pinned test requirements, pytest-isolate-env from this checkout,
the same pytest as this run), then with ``--isolate-env ENV``; the counts (passed, failed,
skipped, xfailed, xpassed, errors) must be equal: no difference between these platforms has
been seen (docs/real-suites.md has the table and the commands).

The CI set is the three projects in chroot and docker and four of asgiref's modules in an
arm64 chroot (qemu-user) and in qemu_vm. ``ISOLATE_REAL_SUITES=all`` runs the three whole
suites in the arm64 chroot and in qemu_vm instead (tens of minutes: the suites, and pip for
the other two, run emulated).
Select parts with ``-k chroot`` etc.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from filelock import FileLock

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARM64_ENV = '''
[tool.pytest-isolate.envs.arm64]
backend = "chroot"
arch = "arm64"
'''


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    version: str
    #: pinned test requirements, the same on the host and inside
    deps: tuple[str, ...]
    #: what is added to the project's pyproject.toml
    table: str
    #: more for the host venv only (uv: installer = "auto" then builds the layers with it)
    tools: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.name}-{self.version}"


ISO8601 = Suite(
    "iso8601", "2.1.0", ("hypothesis==6.170.17", "pytz==2026.6"),
    # poetry metadata, no [project] table: the default would be package = "skip"
    '\n[tool.pytest-isolate]\npackage = "editable"\n'
    'deps = ["hypothesis==6.170.17", "pytz==2026.6"]\n' + ARM64_ENV)
MARKUPSAFE = Suite(
    "markupsafe", "3.0.4", (),
    # only the compiler is added: pytest is the suite's only requirement, shipped from the host
    "".join(f'\n[tool.pytest-isolate.envs.{env}]\nbackend = "{backend}"\n{arch}'
            'packages = ["gcc", "python3-dev"]\n'
            for env, backend, arch in (("chroot", "chroot", ""), ("docker", "docker", ""),
                                       ("arm64", "chroot", 'arch = "arm64"\n'),
                                       ("qemu_vm", "qemu", ""))))
ASGIREF = Suite(
    "asgiref", "3.13.0", ("pytest-asyncio==1.5.0", "packaging==26.4"),
    # setup.py/setup.cfg project: the default would be package = "skip"
    '[tool.pytest-isolate]\npackage = "editable"\n'
    'deps = ["pytest-asyncio==1.5.0", "packaging==26.4"]\n' + ARM64_ENV,
    # its layers are built by uv: the default installer when the host has uv (under
    # qemu-user ~20 s instead of ~15 min with pip, which runs emulated)
    tools=("uv==0.13.9",))
SUITES = {s.name: s for s in (ISO8601, MARKUPSAFE, ASGIREF)}

#: in CI, asgiref's modules whose tests take no sleeps (37 tests, async ones included):
#: every test is ~2 s emulated
ASGIREF_PART = ("tests/test_local.py", "tests/test_testing.py", "tests/test_wsgi.py",
                "tests/test_compatibility.py")
CASES: list[tuple[str, str, tuple[str, ...]]] = [
    (s, env, ()) for s in ("iso8601", "markupsafe", "asgiref") for env in ("chroot", "docker")]
if os.environ.get("ISOLATE_REAL_SUITES") == "all":
    CASES += [(s, env, ()) for s in ("iso8601", "markupsafe", "asgiref")
              for env in ("arm64", "qemu_vm")]
else:
    CASES.append(("asgiref", "arm64", ASGIREF_PART))
    # a machine (TCG here): the layer and the project as hot-plugged disks
    CASES.append(("asgiref", "qemu_vm", ASGIREF_PART))

OUTCOMES = ("passed", "failed", "skipped", "xfailed", "xpassed", "errors")
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|warnings?|deselected)")


def counts(output: str) -> dict[str, int]:
    """pytest's final summary line as {outcome: n} (warnings left out)."""
    for line in reversed(output.splitlines()):
        found = SUMMARY.findall(line)
        if found and re.search(r" in [\d.]+s", line):
            got = {("errors" if k == "error" else k): int(n) for n, k in found}
            return {k: got.get(k, 0) for k in OUTCOMES}
    raise AssertionError(f"no pytest summary line in:\n{output[-3000:]}")


def tail(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout[-6000:] + result.stderr[-2000:]


@pytest.fixture(scope="module")
def workdir(pytestconfig: pytest.Config) -> Path:
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    assert manager is not None
    path = Path(manager.cache.root) / "real-suites"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(suite: Suite, workdir: Path) -> Path:
    """The project's tree with the table added, unpacked once per (version, table)."""
    sdists = workdir / "sdists"
    tag = hashlib.sha256(suite.table.encode()).hexdigest()[:10]
    tree = workdir / "src" / f"{suite.id}-{tag}"
    with FileLock(str(workdir / f"{suite.name}.lock")):
        if tree.is_dir():
            return tree
        pattern = f"{suite.name.replace('-', '_')}-{suite.version}.tar.gz"
        found = [p for p in sdists.glob("*.tar.gz") if p.name.lower() == pattern.lower()]
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary", ":all:", f"{suite.name}=={suite.version}",
                            "-d", str(sdists)], check=True, timeout=600)
            found = [p for p in sdists.glob("*.tar.gz") if p.name.lower() == pattern.lower()]
        assert len(found) == 1, sorted(sdists.iterdir())
        tmp = workdir / "src" / f".{tree.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(found[0]) as tar:
            # trusted pinned sdists; the 'data' filter where this Python has it
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)
        (top,) = tmp.iterdir()
        pyproject = top / "pyproject.toml"
        text = pyproject.read_text() if pyproject.exists() else ""
        pyproject.write_text(text + suite.table)
        top.rename(tree)
        tmp.rmdir()
    return tree


def host_venv(suite: Suite, tree: Path, workdir: Path) -> Path:
    """A venv with the project, its pinned test requirements, this checkout's plugin and
    this run's pytest: the host side of the comparison."""
    venv = workdir / f"venv-{suite.name}"
    stamp = json.dumps({"repo": str(REPO), "tree": str(tree), "deps": suite.deps + suite.tools,
                        "pip": importlib.metadata.version("pip"),
                        "pytest": pytest.__version__, "python": sys.version})
    with FileLock(str(workdir / f"{suite.name}.lock")):
        if (venv / "stamp.json").is_file() and (venv / "stamp.json").read_text() == stamp:
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
        # the host's pip is what installs inside; bookworm's ensurepip gives pip 23.0.1,
        # which cannot run on trixie's Python 3.13 (pkgutil.ImpImporter): use this run's pip
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                        f"pip=={importlib.metadata.version('pip')}"], check=True, timeout=600)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                        "-e", str(REPO), f"pytest=={pytest.__version__}", *suite.deps, *suite.tools,
                        "-e", str(tree)], check=True, timeout=900)
        (venv / "stamp.json").write_text(stamp)
    return venv


def run(venv: Path, tree: Path, cache: Path, *args: str,
        timeout: float = 2400) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS", "PYTEST_CURRENT",
                                    "VIRTUAL_ENV", "PYTHONPATH"))}
    environ["PATH"] = f"{venv / 'bin'}:{environ.get('PATH', '/usr/bin:/bin')}"
    argv = [str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q",
            "-rfEsx", "--isolate-strict", f"--isolate-cache-dir={cache}", *args]
    return subprocess.run(argv, cwd=tree, env=environ, capture_output=True, text=True,
                          timeout=timeout)


#: differences the platform explains (docs/real-suites.md): under qemu-user, asgiref's
#: test_executor_context_across_bridges[False/True] spawn a Python child that does ~3 s of
#: work natively and gets 30 s (join timeout): emulated it does not finish in time
PLATFORM: dict[tuple[str, str], dict[str, int]] = {("asgiref", "arm64"): {"passed": -2, "failed": 2}}

_HOST: dict[tuple[str, tuple[str, ...]], dict[str, int]] = {}


@pytest.mark.parametrize(("name", "env", "select"), CASES,
                         ids=[f"{n}-{e}{'-part' if p else ''}" for n, e, p in CASES])
def test_real_suite_inside_matches_host(name: str, env: str, select: tuple[str, ...],
                                        workdir: Path, tmp_path: Path) -> None:
    suite = SUITES[name]
    cache = workdir.parent
    tree = fetch(suite, workdir)
    venv = host_venv(suite, tree, workdir)
    if (name, select) not in _HOST:
        host = run(venv, tree, cache, *select)
        assert host.returncode == 0, tail(host)
        _HOST[name, select] = counts(host.stdout)
    expected = _HOST[name, select]
    assert expected["passed"] > (30 if select else 40), expected
    if name == "markupsafe":
        # the host built the extension too, so the speedups half of the suite ran
        assert expected["skipped"] <= 2, expected
    if name == "asgiref":
        # pytest-asyncio ran the async tests (without it they would fail, not pass)
        assert expected["failed"] == 0 and expected["passed"] > (30 if select else 100), expected

    if not select:
        for key, delta in PLATFORM.get((name, env), {}).items():
            expected = {**expected, key: expected[key] + delta}

    report = tmp_path / "report.json"
    inside = run(venv, tree, cache, "--isolate-env", env, f"--isolate-report={report}", *select)
    assert inside.returncode == (1 if expected["failed"] else 0), tail(inside)
    got = counts(inside.stdout)
    assert got == expected, f"expected (the host's, platform differences applied) {expected}, " \
                            f"{env} {got}\n{tail(inside)}"
    data = json.loads(report.read_text())
    tests = data["tests"]
    # every test ran inside (a skip at collection, e.g. a missing optional plugin, stays on
    # the host), on the venv built for the project
    assert len(tests) >= sum(got.values()) - expected["skipped"], len(tests)
    assert {t["env"] for t in tests} == {env}, {t["env"] for t in tests}
    assert data["environments"][env]["tests"] == len(tests), data["environments"][env]
    assert "not installed inside" not in inside.stdout, tail(inside)
