"""The chroot backend as an unprivileged user: user namespace + rootless mmdebstrap.

When this suite runs as root, it runs the chroot conformance suite again as the
unprivileged user that scripts/setup.sh creates, from a world-readable copy of
the package and its pure-Python dependencies, with Debian's own python3.
When the suite itself runs unprivileged, everything already is rootless and
this module has nothing to add.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_support import USER, stage_for_user

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the whole run is already unprivileged"),
]


@pytest.fixture(scope="module")
def staging(pytestconfig: pytest.Config) -> Iterator[Path]:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.fail(f"user {USER!r} is missing: scripts/setup.sh creates it")
    root = Path(tempfile.mkdtemp(prefix="pytest-isolate-rootless-", dir="/tmp"))
    try:
        repo = pytestconfig.rootpath
        shutil.copytree(repo / "tests" / "conformance", root / "tests" / "conformance",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (root / "pyproject.toml").write_text(
            '[tool.pytest.ini_options]\naddopts = "-p pytester"\n'
            'markers = ["integration: real backends"]\n')
        stage_for_user(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_as_user(staging: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = (f"PYTHONPATH={staging}/site:{staging}/src PYTEST_PLUGINS=pytest_isolate.plugin "
           "ISOLATE_CONFORMANCE_ENVS=chroot PYTHONDONTWRITEBYTECODE=1")
    # the user's own default cache: a cache directory chosen for root is not theirs to write
    command = (f"cd {staging} && env -u PYTEST_ISOLATE_CACHE_DIR {env} /usr/bin/python3 "
               "-m pytest -p no:cacheprovider " + " ".join(args))
    return subprocess.run(["su", USER, "-s", "/bin/sh", "-c", command],
                          capture_output=True, text=True, timeout=1800)


def test_chroot_conformance_rootless(staging: Path) -> None:
    result = run_as_user(staging, "tests/conformance", "--isolate-strict", "-q", "-ra")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
    assert "skipped" not in result.stdout.splitlines()[-1]


def test_rootless_is_root_inside_but_not_outside(staging: Path) -> None:
    test = staging / "tests" / "test_ids.py"
    test.write_text(
        "import os, pytest\n"
        "HOST_UID = os.getuid()\n"
        "@pytest.mark.isolate('chroot')\n"
        "def test_inside():\n"
        "    assert os.getuid() == 0\n"
        "def test_outside():\n"
        "    assert os.getuid() != 0\n"
    )
    os.chmod(test, 0o644)
    result = run_as_user(staging, "tests/test_ids.py", "--isolate-strict", "-v")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "test_inside PASSED" in result.stdout
    assert "test_outside PASSED" in result.stdout


def test_rootless_limits(staging: Path) -> None:
    """Rootless: the disk bound works (tmpfs sizes in the user namespace); memory, cpus and
    pids need the cgroup filesystem, which this user cannot write: a clear error, not a
    silently unlimited environment."""
    (staging / "pyproject.toml").write_text(
        (staging / "pyproject.toml").read_text()
        + '\n[tool.pytest-isolate.envs.small-disk]\nbackend = "chroot"\ndisk = "32M"\n'
        + '\n[tool.pytest-isolate.envs.small-memory]\nbackend = "chroot"\nmemory = "256M"\n')
    test = staging / "tests" / "test_limits.py"
    test.write_text(
        "import os, pytest\n"
        "@pytest.mark.isolate('small-disk')\n"
        "def test_disk():\n"
        "    st = os.statvfs('/tmp')\n"
        "    assert st.f_blocks * st.f_frsize == 32 << 20\n"
        "@pytest.mark.isolate('small-memory')\n"
        "def test_memory():\n"
        "    pass\n"
    )
    os.chmod(test, 0o644)
    result = run_as_user(staging, "tests/test_limits.py", "--isolate-strict", "-v")
    out = result.stdout
    assert "test_disk PASSED" in out, out[-4000:] + result.stderr[-2000:]
    assert "test_memory ERROR" in out, out[-4000:]
    assert "environment 'small-memory': cannot apply the resource limits" in out, out[-4000:]
    assert "need write access to the cgroup filesystem (run as root)" in out, out[-4000:]
