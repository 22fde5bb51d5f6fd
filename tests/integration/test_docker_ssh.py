"""The docker backend against an engine reached over ssh, proven on loopback.

An sshd of our own listens on 127.0.0.1 (a free port, a host key and an authorized key
made for the run in a temporary directory); the inner pytest reaches this machine's
dockerd through it as ``ssh://root@127.0.0.1:PORT``: by DOCKER_HOST, by a docker context,
as a host-pool endpoint, and for the conformance suite. The SDK's ssh transport
(paramiko, see pytest_isolate/backends/docker_ssh.py) reads ~/.ssh through HOME, so the
inner run gets a HOME of its own: its .ssh holds the key, and the sshd's host key in
known_hosts. The user's own ~/.ssh is never read or written.

The engine is in fact local, so a bind mount of a host path would work and hide a
shortcut: the project's tests check that their directory is not the host's file system
(its device differs from the host's project directory), and a control run that forces
``docker_transfer = "bind"`` shows that check failing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration_support import SSHD, children, free_port, keygen, start_sshd, stop, wait_for_log
from shared_support import output, run_pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the loopback sshd logs in as root"),
]


@dataclass
class Sshd:
    port: int
    home: Path  # the inner run's HOME: .ssh/id_ed25519 and .ssh/known_hosts
    log: Path
    dir: Path

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"

    def logins(self) -> int:
        """How many ssh logins the sshd has accepted so far."""
        return self.log.read_text().count("Accepted publickey for root")

    def env(self, **extra: str) -> dict[str, str]:
        return {"HOME": str(self.home), "DOCKER_HOST": self.url, **extra}


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    if not os.path.exists(SSHD):
        pytest.fail(f"{SSHD} is missing: scripts/setup.sh installs openssh-server")
    base = Path(tempfile.mkdtemp(prefix="pytest-isolate-sshd-", dir="/tmp"))
    port = free_port()
    proc = start_sshd(base, port)
    try:
        wait_for_log(proc, base / "sshd.log", "Server listening", "sshd")
        yield Sshd(port, base / "home", base / "sshd.log", base)
    finally:
        sessions = children(proc.pid)  # they outlive the listener while a client is connected
        stop(proc, 10)
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        shutil.rmtree(base, ignore_errors=True)
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def project(root: Path, pyproject: str = "") -> None:
    """Tests that pass, fail, and check their project is not the host's directory."""
    (root / "pyproject.toml").write_text(pyproject)
    (root / "data.txt").write_text("from the host\n")
    (root / "test_remote.py").write_text(textwrap.dedent(f"""\
        import os
        import pytest

        HOST_DEVICE = {os.stat(root).st_dev}

        @pytest.mark.isolate("docker")
        def test_inside_a_container():
            assert os.path.exists("/.dockerenv")
            assert open("data.txt").read() == "from the host\\n"

        @pytest.mark.isolate("docker")
        def test_project_is_a_copy_not_a_host_path():
            assert os.stat(".").st_dev != HOST_DEVICE, "the host's directory is mounted"

        @pytest.mark.isolate("docker")
        def test_fails():
            assert 1 + 1 == 3
    """))


def report_endpoint(report: Path) -> str:
    return str(json.loads(report.read_text())["environments"]["docker"]["endpoint"])


def test_docker_host_ssh_runs_tests_on_the_remote_engine(
        sshd: Sshd, tmp_path: Path, session_cache: str) -> None:
    project(tmp_path)
    before = sshd.logins()
    result = run_pytest(tmp_path, session_cache, "-q", "-rA",
                        extra_env=sshd.env(), timeout=900)
    assert "1 failed, 2 passed" in result.stdout, output(result)
    assert "assert (1 + 1) == 3" in result.stdout
    assert sshd.logins() > before


def test_a_bind_mount_of_the_host_project_is_detected(
        sshd: Sshd, tmp_path: Path, session_cache: str) -> None:
    """The control: forcing binds (possible only because the engine is in fact local)
    fails the check above, so a backend that shortcut through host paths would too."""
    project(tmp_path, '[tool.pytest-isolate.envs.docker]\nbackend = "docker"\n'
                      'options = {docker_transfer = "bind"}\n')
    result = run_pytest(tmp_path, session_cache, "-q", extra_env=sshd.env(), timeout=900)
    assert "2 failed, 1 passed" in result.stdout, output(result)
    assert "the host's directory is mounted" in result.stdout


def test_docker_context_with_an_ssh_endpoint(
        sshd: Sshd, tmp_path: Path, session_cache: str) -> None:
    env = {"HOME": str(sshd.home)}
    for argv in (["create", "isolate-ssh", "--docker", f"host={sshd.url}"],
                 ["use", "isolate-ssh"]):
        subprocess.run(["docker", "context", *argv], env={**os.environ, **env}, check=True,
                       capture_output=True)
    try:
        project(tmp_path)
        before = sshd.logins()
        report = tmp_path / "report.json"
        result = run_pytest(tmp_path, session_cache, "-q", f"--isolate-report={report}",
                            "-k", "copy", extra_env={**env, "DOCKER_HOST": ""}, timeout=900)
        assert "1 passed" in result.stdout, output(result)
        assert sshd.logins() > before, "the context's ssh endpoint was not used"
        assert report_endpoint(report) == ""  # the default engine: the context's
    finally:
        shutil.rmtree(sshd.home / ".docker", ignore_errors=True)


def test_host_pool_endpoint_over_ssh(sshd: Sshd, tmp_path: Path, session_cache: str) -> None:
    project(tmp_path, f'[tool.pytest-isolate.hosts.loopback]\ndocker = "{sshd.url}"\n')
    report = tmp_path / "report.json"
    result = run_pytest(tmp_path, session_cache, "-q", f"--isolate-report={report}",
                        "-k", "copy", extra_env={"HOME": str(sshd.home), "DOCKER_HOST": ""},
                        timeout=900)
    assert "1 passed" in result.stdout, output(result)
    assert report_endpoint(report) == sshd.url


#: Conformance tests that run a nested pytest through pytester, which gives that run a
#: HOME of its own (its tmp path): no ~/.ssh there, so no key for the loopback sshd.
PYTESTER_CONFORMANCE = ("test_marker_outcomes", "test_marker_tests_cannot_reach_the_host_kernel")


def test_conformance_suite_over_ssh(sshd: Sshd, pytestconfig: pytest.Config,
                                    session_cache: str) -> None:
    repo = pytestconfig.rootpath
    deselect = " and ".join(f"not {name}" for name in PYTESTER_CONFORMANCE)
    before = sshd.logins()
    result = run_pytest(repo, session_cache, "tests/conformance", "-q", "-ra", "-k", deselect,
                        extra_env=sshd.env(ISOLATE_CONFORMANCE_ENVS="docker"), timeout=900)
    assert result.returncode == 0, output(result)
    summary = result.stdout.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, output(result)
    assert sshd.logins() > before


def test_a_refused_key_is_one_clear_error(sshd: Sshd, tmp_path: Path,
                                          session_cache: str) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(sshd.home / ".ssh" / "known_hosts", home / ".ssh" / "known_hosts")
    keygen(home / ".ssh" / "id_ed25519")  # a key the sshd does not know
    project(tmp_path)
    before = sshd.log.read_text().count("Connection closed by authenticating user root")
    result = run_pytest(tmp_path, session_cache, "-q", "-rA",
                        extra_env={"HOME": str(home), "DOCKER_HOST": sshd.url}, timeout=300)
    assert result.returncode != 0
    assert "3 errors" in result.stdout, output(result)
    expected = (f"the docker engine at {sshd.url} (from the DOCKER_HOST environment variable) "
                "is behind an ssh server that refused every key offered")
    assert expected in result.stdout, output(result)
    assert "~/.ssh/authorized_keys" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    # one login attempt for the whole run, not one per test
    after = sshd.log.read_text().count("Connection closed by authenticating user root")
    assert after - before == 1, sshd.log.read_text()
