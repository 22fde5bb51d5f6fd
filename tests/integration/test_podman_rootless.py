"""Rootless podman: the podman backend run by the unprivileged user against that user's own
``podman system service`` (no systemd, no login session: the runtime directory is made
here, 0700 and the user's, and the service started as the user with HOME and
XDG_RUNTIME_DIR set, as `pytest-isolate setup --backends podman` tells a user to).

The runtime directory is /run/user/UID, made when missing (podman keeps to the first one
it saw).  The inner pytest is Debian's python3 as that user, on a world-readable copy of the package
(integration_support.stage_for_user) and its default socket ($XDG_RUNTIME_DIR/podman/
podman.sock), default cache (~/.cache/pytest-isolate) and podman's default storage
(~/.local/share/containers).  Afterwards the images and containers the run made are removed
from the user's service, the service and podman's pause process (the holder of the user
namespace) are stopped, and the runtime directory goes with the staging copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import USER, stage_for_user

from pytest_isolate.setup_host import podman_service

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as the unprivileged user"),
]

#: What the Docker SDK needs beyond the package's own dependencies.
SDK_MODULES = ["docker", "requests", "urllib3", "idna", "certifi", "charset_normalizer"]


@dataclasses.dataclass
class Rootless:
    staging: Path
    runtime: Path
    account: pwd.struct_passwd
    service: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"unix://{self.runtime}/podman/podman.sock"

    def client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.url)

    def pytest(self, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = user_env(self.account, self.runtime, PYTHONPATH=f"{self.staging}/site:{self.staging}/src",
                       PYTEST_PLUGINS="pytest_isolate.plugin", PYTHONDONTWRITEBYTECODE="1")
        return subprocess.run(
            [*as_user(self.account), "/usr/bin/python3", "-m", "pytest", "-p", "no:cacheprovider",
             "--isolate-strict", *args], cwd=project, env=env, capture_output=True, text=True,
            timeout=1800)


def user_env(account: pwd.struct_passwd, runtime: Path, **extra: str) -> dict[str, str]:
    """The user's environment as a login would set it (there is no session here)."""
    return {"HOME": account.pw_dir, "USER": USER, "LOGNAME": USER,
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "XDG_RUNTIME_DIR": str(runtime), **extra}


def as_user(account: pwd.struct_passwd) -> list[str]:
    return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
            "--init-groups", "--"]


def ours(client: Any) -> tuple[list[Any], list[Any]]:
    """The containers and images pytest-isolate made in the user's service."""
    return (client.containers.list(all=True, filters={"label": "pytest-isolate"}),
            client.images.list(filters={"label": "pytest-isolate.key"}))


def podman_processes(uid: int) -> set[int]:
    """The podman, conmon and catatonit processes of uid (the service, the pause process
    that holds the user's namespace, the monitors of containers and exec sessions)."""
    found = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            # the pause process calls itself "podman pause"
            name = (entry / "comm").read_text().strip().split(" ")[0]
            if entry.name.isdigit() and entry.stat().st_uid == uid and \
                    name in ("podman", "conmon", "catatonit"):
                found.add(int(entry.name))
    return found


@pytest.fixture(scope="module")
def rootless() -> Iterator[Rootless]:
    try:
        account = pwd.getpwnam(USER)
    except KeyError:
        pytest.fail(f"user {USER!r} is missing: scripts/setup.sh creates it")
    staging = Path(tempfile.mkdtemp(prefix="pytest-isolate-podman-rootless-", dir="/tmp"))
    # the runtime directory a login session would give (podman records the first one it
    # saw in its database and keeps to it: a new temporary one each run would not be used)
    runtime = Path(f"/run/user/{account.pw_uid}")
    made = not runtime.exists()
    before = podman_processes(account.pw_uid)
    service: subprocess.Popen[bytes] | None = None
    try:
        stage_for_user(staging, SDK_MODULES)
        (runtime / "podman").mkdir(parents=True, exist_ok=True)
        for path in (runtime, runtime / "podman"):
            os.chown(path, account.pw_uid, account.pw_gid)
        os.chmod(runtime, 0o700)
        with open(staging / "podman-service.log", "wb") as log:
            service = subprocess.Popen(
                [*as_user(account), *podman_service(f"unix://{runtime}/podman/podman.sock")],
                env=user_env(account, runtime), stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, start_new_session=True)
        setup = Rootless(staging, runtime, account, service)
        deadline = time.monotonic() + 30
        while True:
            try:
                setup.client().ping()
                break
            except Exception:
                if service.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the rootless podman service did not answer: "
                                + (staging / "podman-service.log").read_text()[-3000:])
                time.sleep(0.2)
        yield setup
        containers, images = ours(setup.client())
        assert containers == [], f"containers left behind: {[c.name for c in containers]}"
        for image in images:  # what this run made (the next run imports it again)
            setup.client().images.remove(image.id, force=True)
    finally:
        if service is not None:
            os.killpg(service.pid, signal.SIGTERM)
            try:
                service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(service.pid, signal.SIGKILL)
                service.wait()
        # the pause process, and exec sessions' monitors (which wait minutes to exit)
        for pid in podman_processes(account.pw_uid) - before:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if made:
            shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def project(rootless: Rootless, name: str, tests: str, config: str = "") -> Path:
    path = rootless.staging / name
    path.mkdir()
    (path / "pyproject.toml").write_text(f"[tool.pytest-isolate]\n{config}")
    (path / "test_inside.py").write_text(tests)
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(path)], check=True)
    return path


TESTS = '''\
import os
import pytest

pytestmark = pytest.mark.isolate("podman")

def test_root_inside():
    assert os.getuid() == 0

def test_root_is_the_user_outside():
    assert open("/proc/self/uid_map").read().split()[:2] == ["0", "{uid}"]

def test_write():
    with open("/etc/written-by-a-test", "w") as f:
        f.write("x")

def test_the_write_is_gone():
    assert not os.path.exists("/etc/written-by-a-test")

def test_no_network():
    assert sorted(os.listdir("/sys/class/net")) == ["lo"]

def test_fails():
    assert 2 + 2 == 5, "the rootless sentinel"
'''


def test_rootless_podman_runs_tests(rootless: Rootless) -> None:
    path = project(rootless, "basic", TESTS.replace("{uid}", str(rootless.account.pw_uid)))
    result = rootless.pytest(path, "-v", "--isolate-report=report.json")
    out = result.stdout
    assert result.returncode == 1, out[-6000:] + result.stderr[-3000:]
    for name in ("root_inside", "root_is_the_user_outside", "write", "the_write_is_gone",
                 "no_network"):
        assert f"test_{name} PASSED" in out, out[-6000:]
    assert "test_fails FAILED" in out, out[-6000:]
    assert "AssertionError: the rootless sentinel" in out, out[-6000:]
    report = json.loads((path / "report.json").read_text())["environments"]["podman"]
    assert report["root"] == (
        f"uid {rootless.account.pw_uid} of the engine's host (a user namespace of Podman Engine "
        f"{podman_version()}, rootless at {rootless.url} (from the rootless default socket))"), \
        report
    containers, images = ours(rootless.client())
    assert containers == [], [c.name for c in containers]  # removed when the run ended
    assert len(images) == 1, images  # the imported image, in the user's own storage
    storage = rootless.client().info()["DockerRootDir"]
    assert storage.startswith(rootless.account.pw_dir + "/"), storage


def test_rootless_podman_limits_are_a_clear_error(rootless: Rootless) -> None:
    """On cgroup v1 a rootless engine has no cgroup to put limits in and podman only warns:
    a clear error instead of tests that run unlimited."""
    if rootless.client().info().get("CgroupVersion") != "1":
        pytest.skip("this host has cgroup v2: podman itself refuses a controller not "
                    "delegated to the user")
    path = project(rootless, "limits", "import pytest\n\n"
                   "@pytest.mark.isolate('small')\ndef test_small():\n    pass\n",
                   '[tool.pytest-isolate.envs.small]\nbackend = "podman"\nmemory = "256M"\n'
                   'pids = 200\n')
    result = rootless.pytest(path, "-v")
    out = result.stdout
    assert "test_small ERROR" in out, out[-6000:] + result.stderr[-3000:]
    assert ("podman: environment 'small': cannot apply the resource limits (memory, pids): "
            f"the engine is Podman Engine {podman_version()}, rootless at {rootless.url} (from "
            "the rootless default socket) on cgroup v1") in out, out[-6000:]


def podman_version() -> str:
    return subprocess.run(["podman", "--version"], capture_output=True, text=True,
                          check=True).stdout.split()[-1]
