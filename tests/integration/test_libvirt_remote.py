"""The libvirt driver against a libvirt reached over ssh, proven on loopback.

An sshd of our own listens on 127.0.0.1; the inner pytest reaches libvirt as
``qemu+ssh://pytest-isolate-user@127.0.0.1:PORT/session``: on the far side, libvirt's
virt-ssh-helper starts that user's own session daemon, whose QEMU runs as that user.
Nothing of ours listens there, and nothing may shortcut through a path of this machine:
the run's cache is under root's home, which that user cannot read (checked first), so
a kernel, disk, console or socket named by a host path would fail the run. The machine's
files go into the user's storage pool by libvirt's volume upload, its agent's channel
and its console come back through libvirt's streams.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration_support import SSHD, USER, children, free_port, start_sshd, stop, wait_for_log
from shared_support import output, run_pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the test starts an sshd and logs in as a user"),
]

POOL = "pytest-isolate"


@dataclass
class Remote:
    port: int
    key: Path
    log: Path

    @property
    def uri(self) -> str:
        return (f"qemu+ssh://{USER}@127.0.0.1:{self.port}/session?keyfile={self.key}"
                "&no_verify=1&no_tty=1")

    def logins(self) -> int:
        return self.log.read_text().count(f"Accepted publickey for {USER}")


def virsh(uri: str, *argv: str, check: bool = True) -> str:
    result = subprocess.run(["virsh", "-q", "-c", uri, *argv], capture_output=True, text=True,
                            timeout=120, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"virsh {' '.join(argv)}: {result.stdout}{result.stderr}")
    return result.stdout


def pool_volumes(uri: str) -> list[str]:
    """The names of the volumes in the test pool (vol-list's first column), as its
    directory holds them: the pool's list is refreshed first (libvirt rescans the
    directory on its own only after an upload, in a thread of its own)."""
    virsh(uri, "pool-refresh", POOL, check=False)
    return sorted(line.split()[0] for line in virsh(uri, "vol-list", POOL).splitlines()
                  if line.strip())


def end_user_daemons() -> None:
    """The user's session libvirtd (started by virt-ssh-helper, idles out after 2 min)
    and any QEMU it left."""
    for pattern in ("-x libvirtd", "-f qemu-system-"):
        subprocess.run(["pkill", "-KILL", "-u", USER, *pattern.split()], check=False)


def drop_pool(uri: str) -> None:
    """The test pool and its volumes, whatever an earlier (killed) session left."""
    for line in virsh(uri, "vol-list", POOL, check=False).splitlines():
        if line.strip():
            virsh(uri, "vol-delete", line.split()[0], "--pool", POOL, check=False)
    for step in ("pool-destroy", "pool-delete", "pool-undefine"):
        virsh(uri, step, POOL, check=False)


@pytest.fixture(scope="module")
def remote() -> Iterator[Remote]:
    for tool in (SSHD, shutil.which("virsh"), shutil.which("virt-ssh-helper")):
        if not tool or not os.path.exists(tool):
            pytest.fail(f"{tool} is missing: scripts/setup.sh installs openssh-server and "
                        "libvirt-daemon-system (virt-ssh-helper)")
    # useradd leaves the account locked, and an sshd without PAM refuses a locked account
    # even for a key: '*' is "no password can match", not locked
    if subprocess.run(["passwd", "-S", USER], capture_output=True, text=True,
                      check=True).stdout.split()[1] == "L":
        subprocess.run(["usermod", "-p", "*", USER], check=True)
    base = Path(tempfile.mkdtemp(prefix="pytest-isolate-sshd-", dir="/tmp"))
    os.chmod(base, 0o755)  # sshd reads the authorized keys as the user logging in
    port = free_port()
    proc = start_sshd(base, port)
    end_user_daemons()
    remote = Remote(port, base / "client_key", base / "sshd.log")
    try:
        wait_for_log(proc, base / "sshd.log", "Server listening", "sshd")
        home = Path(os.path.expanduser(f"~{USER}"))
        drop_pool(remote.uri)
        virsh(remote.uri, "pool-define-as", POOL, "dir", "--target", str(home / "isolate-pool"))
        virsh(remote.uri, "pool-build", POOL)
        virsh(remote.uri, "pool-start", POOL)
        yield remote
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            drop_pool(remote.uri)
        sessions = children(proc.pid)
        stop(proc, 10)
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        end_user_daemons()
        shutil.rmtree(base, ignore_errors=True)


def project(root: Path, options: str) -> None:
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [tool.pytest-isolate.envs.rvm]
        backend = "qemu"
        options = {{{options}}}
    """))
    (root / "data.txt").write_text("from the host\n")
    (root / "test_remote.py").write_text(textwrap.dedent("""\
        import os
        import socket
        import pytest

        @pytest.mark.isolate("rvm")
        def test_in_the_machine():
            assert socket.gethostname() == "isolate-rvm"
            assert open("data.txt").read() == "from the host\\n"
            with open("/root/written", "w") as f:
                f.write("x")

        @pytest.mark.isolate("rvm")
        def test_a_clean_state():
            assert not os.path.exists("/root/written")

        @pytest.mark.isolate("rvm")
        def test_fails():
            assert 1 + 1 == 3
    """))


def test_the_cache_is_out_of_the_remote_users_reach(session_cache: str) -> None:
    """The premise of the others: a host path in the domain would not be readable there."""
    for path in (session_cache, os.path.join(session_cache, "vmdisk")):
        probe = subprocess.run(["runuser", "-u", USER, "--", "test", "-r", path,
                                "-a", "-x", path], check=False)
        assert probe.returncode != 0, f"{USER} can read {path}"


def test_a_run_through_qemu_ssh_uploads_once_and_reads_no_host_path(
        remote: Remote, tmp_path: Path, session_cache: str) -> None:
    root = tmp_path / "project"
    root.mkdir()
    project(root, f'vm_driver = "libvirt", libvirt_uri = "{remote.uri}"')
    report = tmp_path / "report.json"
    before = remote.logins()
    result = run_pytest(root, session_cache, "-q", "-rA", "-p", "no:cacheprovider",
                        f"--isolate-report={report}", timeout=900)
    assert "1 failed, 2 passed" in result.stdout, output(result)
    assert "assert (1 + 1) == 3" in result.stdout
    assert remote.logins() > before
    volumes = pool_volumes(remote.uri)
    # kernel, root, site and project disks, and the booted machine's saved state, each
    # with its completion marker; the instance's initrd was deleted at its stop
    kinds = sorted({v.split("-")[1] for v in volumes})
    assert kinds == ["kernel", "project", "root", "site", "state"], volumes
    assert all(f"{v}.done" in volumes for v in volumes if not v.endswith(".done")), volumes
    stats = json.loads(report.read_text())["environments"]["rvm"]
    assert stats["tests"] == 3 and stats["endpoint"] == ""  # libvirt_uri, not a pool host
    assert "# boot (libvirt): " in Path(stats["logs"]["qemu"]).read_text()

    # the second run uploads nothing new (only its initrd, deleted again), and restores
    # the saved machine there instead of booting it
    result = run_pytest(root, session_cache, "-q", "-p", "no:cacheprovider",
                        f"--isolate-report={report}", timeout=900)
    assert "1 failed, 2 passed" in result.stdout, output(result)
    assert pool_volumes(remote.uri) == volumes
    assert not virsh(remote.uri, "list", "--name").strip()  # no domain left
    stats = json.loads(report.read_text())["environments"]["rvm"]
    qemu_log = Path(stats["logs"]["qemu"]).read_text()
    assert "# restore (libvirt): " in qemu_log and "# boot (libvirt)" not in qemu_log, qemu_log

    # an edited tree: its new disk replaces the old one in the pool
    (root / "data.txt").write_text("edited\n")
    result = run_pytest(root, session_cache, "-q", "-p", "no:cacheprovider",
                        f"--isolate-report={report}", timeout=900)
    assert "2 failed, 1 passed" in result.stdout, output(result)
    edited = pool_volumes(remote.uri)
    qemu_log = Path(json.loads(report.read_text())["environments"]["rvm"]["logs"]["qemu"])
    assert len(edited) == len(volumes) and edited != volumes, (volumes, edited,
                                                               qemu_log.read_text())
    assert [v for v in edited if "project" not in v] == [v for v in volumes if "project" not in v]


def test_a_missing_pool_is_one_clear_error(remote: Remote, tmp_path: Path,
                                           session_cache: str) -> None:
    project(tmp_path, f'vm_driver = "libvirt", libvirt_uri = "{remote.uri}", '
                      'libvirt_pool = "no-such-pool"')
    result = run_pytest(tmp_path, session_cache, "-q", timeout=600)
    assert result.returncode != 0
    text = result.stdout
    assert f"libvirt at {remote.uri} has no storage pool 'no-such-pool'" in text, output(result)
    assert "virsh pool-define-as no-such-pool dir --target DIR" in text
    assert "Traceback" not in text + result.stderr


def test_conformance_suite_through_a_qemu_ssh_pool_host(
        remote: Remote, pytestconfig: pytest.Config, session_cache: str,
        tmp_path: Path) -> None:
    """xdist workers place qemu_vm on the pool host whose endpoint is the qemu+ssh URI."""
    from test_docker_ssh import PYTESTER_CONFORMANCE

    repo = pytestconfig.rootpath
    config = tmp_path / "pyproject.toml"
    config.write_text((repo / "pyproject.toml").read_text()
                      + f'\n[tool.pytest-isolate.hosts.loopback]\nqemu = "{remote.uri}"\n')
    # (the hardening probe's cases are for the environments that share the host's kernel)
    deselect = " and ".join(f"not {name}" for name in (
        *PYTESTER_CONFORMANCE, "test_commands_cannot_reach_the_host_kernel"))
    before = remote.logins()
    report = tmp_path / "report.json"
    result = run_pytest(repo, session_cache, "tests/conformance", "-q", "-ra", "-n", "2",
                        "-k", deselect, "-c", str(config), "--rootdir", str(repo),
                        f"--isolate-report={report}",
                        extra_env={"ISOLATE_CONFORMANCE_ENVS": "qemu_vm"}, timeout=1500)
    assert result.returncode == 0, output(result)
    summary = result.stdout.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, output(result)
    assert remote.logins() >= before + 2  # one connection per worker at least
    placed = json.loads(report.read_text())["environments"]
    assert {stats["endpoint"] for stats in placed.values()} == {remote.uri}, placed


def killed_while_running(remote: Remote, tmp_path: Path, session_cache: str,
                         options: str) -> Path:
    """A run of a sleeping test in rvm, SIGKILLed once its machine runs (ready() noted
    the start after mounting the project); its project directory."""
    from shared_support import inner_environ, pytest_argv, wait_for

    root = tmp_path / "project"
    root.mkdir(exist_ok=True)
    project(root, f'vm_driver = "libvirt", libvirt_uri = "{remote.uri}"{options}')
    (root / "test_remote.py").write_text(textwrap.dedent("""\
        import time
        import pytest

        @pytest.mark.isolate("rvm")
        def test_sleeps():
            time.sleep(600)
    """))
    with open(tmp_path / "out.txt", "wb") as out:
        proc = subprocess.Popen(pytest_argv(session_cache, "-q", "-s"), cwd=root,
                                env=inner_environ(None), stdout=out, stderr=subprocess.STDOUT)
    try:
        logs = Path(session_cache) / "runs" / f"*-{proc.pid}" / "logs" / "rvm"

        def started() -> bool:
            return any("# restore (libvirt): " in q.read_text(errors="replace")
                       or "# boot (libvirt): " in q.read_text(errors="replace")
                       for q in Path("/").glob(str(logs / "qemu.log").lstrip("/")))

        wait_for("the remote machine to start", started, 300, proc,
                 explain=lambda: (tmp_path / "out.txt").read_text()[-3000:])
        assert virsh(remote.uri, "list", "--name").strip()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return root


def test_a_killed_runs_booted_machine_ends_with_its_connection(
        remote: Remote, tmp_path: Path, session_cache: str) -> None:
    """Without saved states the domain is started AUTODESTROY: no reaper of ours reaches
    that machine, and the domain ends with the killed run's connection.  What stays in
    the pool is the instance's initrd volume (a few MB; `virsh vol-delete` removes it)."""
    from shared_support import wait_for

    initrds = {v for v in pool_volumes(remote.uri) if "initrd" in v}
    killed_while_running(remote, tmp_path, session_cache, ", vm_snapshot = false")
    wait_for("the remote domain to end", lambda: not virsh(
        remote.uri, "list", "--name").strip(), 60)
    left = {v for v in pool_volumes(remote.uri) if "initrd" in v} - initrds
    assert len(left) == 1, (initrds, pool_volumes(remote.uri))


def test_a_killed_runs_restored_machine_is_destroyed_by_the_next_run(
        remote: Remote, tmp_path: Path, session_cache: str) -> None:
    """libvirt starts no restore AUTODESTROY, so the machine restored from its saved state
    may outlive a killed run there.  Its slot's lock died with the run: the next run from
    this machine takes the slot, destroys that domain, restores its own and leaves none."""
    root = killed_while_running(remote, tmp_path, session_cache, "")
    (root / "test_remote.py").write_text(textwrap.dedent("""\
        import pytest

        @pytest.mark.isolate("rvm")
        def test_after():
            pass
    """))
    # (over ssh the restored guest has been seen to run on for minutes after its channel
    # closed; should it end by itself, there is nothing to destroy)
    left = virsh(remote.uri, "list", "--name").strip()
    result = run_pytest(root, session_cache, "-q", "-p", "no:cacheprovider", timeout=900)
    assert "1 passed" in result.stdout, output(result)
    destroyed = "left running by a killed run" in result.stdout + result.stderr
    assert destroyed == bool(left), (left, output(result))
    assert not virsh(remote.uri, "list", "--name").strip()
