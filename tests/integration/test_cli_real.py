"""The command line against this machine: doctor, envs, a real build, shell, cache ls/gc/rm.

One real root filesystem is built into a temporary cache (by `shell`, which
provisions when needed) and removed again by `cache rm` at the end.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_isolate import config
from pytest_isolate.backends import BUILTIN_BACKENDS
from pytest_isolate.spec import host_arch

pytestmark = pytest.mark.integration

PYPROJECT = """
[project]
name = "demo"
version = "0"

[tool.pytest-isolate.envs.plain]
backend = "chroot"
"""


def cli(*args: str, cwd: Path, stdin: str | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_isolate", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


class Built:
    def __init__(self, project: Path, cache: Path, key: str, seconds: float, stderr: str) -> None:
        self.project = project
        self.cache = cache
        self.key = key
        self.seconds = seconds
        self.stderr = stderr

    def opts(self) -> list[str]:
        return ["--cache-dir", str(self.cache)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    base = tmp_path_factory.mktemp("cli-real")
    project = base / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "data.txt").write_text("from the host\n")
    cache = base / "cache"
    pyproject = project / "pyproject.toml"
    specs = config.resolve_envs(config.load_pyproject(pyproject), pyproject, BUILTIN_BACKENDS)
    key = specs["chroot"].rootfs_key()
    assert specs["plain"].rootfs_key() == key
    started = time.monotonic()
    result = cli("shell", "chroot", "--cache-dir", str(cache), "--", "true", cwd=project)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    yield Built(project, cache, key, seconds, result.stderr)
    shutil.rmtree(cache, ignore_errors=True)


def test_shell_built_the_rootfs_on_first_use(built: Built) -> None:
    assert "building" in built.stderr and built.key in built.stderr
    assert (built.cache / "rootfs" / built.key / "data" / "usr" / "bin" / "python3").exists()
    # the shell's own run directory is gone
    assert not any((built.cache / "runs").glob("*-shell"))


def test_cache_ls_after_a_real_build(built: Built) -> None:
    result = cli("cache", "ls", *built.opts(), cwd=built.project)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith(built.key))
    assert "rootfs" in row and "chroot" in row and "plain" in row
    data = json.loads(cli("cache", "ls", "--json", *built.opts(), cwd=built.project).stdout)
    (entry,) = data["entries"]
    assert entry["key"] == built.key and entry["kind"] == "rootfs"
    assert entry["size"] > 50 * 1024 * 1024
    assert entry["spec"]["arch"] == host_arch()
    # not qemu_vm: a VM boots a root filesystem with a kernel (another key)
    assert sorted(entry["envs"]) == sorted(["chroot", "plain", "schroot", "lxc", "docker", "podman",
                                          "py3.13"])


def test_envs_on_a_real_project(built: Built) -> None:
    result = cli("envs", "--json", *built.opts(), cwd=built.project / "")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["pyproject"] == str(built.project / "pyproject.toml")
    plain = data["envs"]["plain"]
    assert plain["rootfs_cached"] is True and plain["rootfs_key"] == built.key
    assert plain["values"]["backend"]["source"].endswith(
        "[tool.pytest-isolate.envs.plain] key 'backend'")
    assert data["envs"]["arm64_vm"]["values"]["arch"]["value"] == "arm64"
    assert data["envs"]["arm64_vm"]["rootfs_cached"] is False


def test_shell_non_interactive(built: Built) -> None:
    script = ("echo hello-from-inside; hostname; pwd; cat data.txt; "
              "python3 -c 'import pytest, sys; print(\"pytest\", pytest.__version__)'; "
              "echo x > /etc/written-inside && echo wrote-etc; "
              "echo y > data.txt 2>/dev/null || echo rootdir-read-only; "
              "grep -c : /proc/net/dev; exit 3")
    result = cli("shell", "chroot", *built.opts(), cwd=built.project, stdin=script, timeout=120)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "hello-from-inside"
    assert lines[1] == "isolate-chroot"
    assert lines[2] == str(built.project)
    assert lines[3] == "from the host"
    assert lines[4].startswith("pytest ")
    assert lines[5:7] == ["wrote-etc", "rootdir-read-only"]
    assert lines[7] == "1"  # only the loopback interface: no network
    assert (built.project / "data.txt").read_text() == "from the host\n"
    # a fresh instance each time: the previous shell's writes are gone
    again = cli("shell", "chroot", *built.opts(), "--", "sh", "-c",
                "test -e /etc/written-inside && echo leaked || echo clean", cwd=built.project)
    assert again.returncode == 0 and again.stdout == "clean\n"
    assert not (built.cache / "rootfs" / built.key / "data" / "etc" / "written-inside").exists()


def test_shell_interactive_on_a_terminal(built: Built) -> None:
    """A real terminal: prompt, job control, Ctrl-C interrupts a command, not the shell."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(built.project)
        os.execv(sys.executable, [sys.executable, "-m", "pytest_isolate", "shell", "chroot",
                                  *built.opts()])
    output = b""

    def read_until(marker: bytes, timeout: float) -> bool:
        nonlocal output
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if marker in output:
                return True
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    return marker in output
                if not chunk:
                    return marker in output
                output += chunk
        return marker in output

    try:
        assert read_until(b"isolate-chroot", 60), output
        started = time.monotonic()
        os.write(fd, b"echo start-$((1+1)); sleep 60; echo not-$((2+3))-interrupted\n")
        assert read_until(b"start-2", 20), output
        time.sleep(0.5)
        os.write(fd, b"\x03")
        os.write(fd, b"echo after-$((40+2)); exit 5\n")
        assert read_until(b"after-42", 20), output
        assert time.monotonic() - started < 30
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5
    assert b"not-5-interrupted" not in output


def test_doctor_on_this_machine(built: Built) -> None:
    result = cli("doctor", *built.opts(), cwd=built.project, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  chroot   available" in result.stdout
    assert "plain (chroot, " in result.stdout and ": usable" in result.stdout
    assert "KVM: " in result.stdout and "user namespaces: " in result.stdout
    data = json.loads(cli("doctor", "--json", *built.opts(), cwd=built.project).stdout)
    assert data["ok"] is True
    assert data["backends"]["chroot"]["available"] is True
    assert data["cache"]["entries"] == 1 and data["cache"]["size"] > 50 * 1024 * 1024
    flags = Path("/proc/cpuinfo").read_text()
    has_virt = " vmx" in flags or " svm" in flags
    assert data["kvm"]["likely_usable"] == (has_virt and os.access("/dev/kvm", os.R_OK | os.W_OK))
    registered = sorted(p.name[5:] for p in Path("/proc/sys/fs/binfmt_misc").glob("qemu-*"))
    assert sorted(data["binfmt"]["qemu_user"]) == registered


def test_doctor_without_a_project_checks_chroot(tmp_path: Path, built: Built) -> None:
    result = cli("doctor", "--json", *built.opts(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["project"]["pyproject"] is None
    assert list(data["project"]["envs"]) == ["chroot"]


def test_gc_and_rm_never_remove_a_mounted_rootfs(built: Built) -> None:
    shell = subprocess.Popen(
        [sys.executable, "-m", "pytest_isolate", "shell", "chroot", *built.opts(), "--",
         "sh", "-c", "echo ready; sleep 60"],
        cwd=built.project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert shell.stdout is not None
        assert shell.stdout.readline() == "ready\n"
        # make the entry look old, so only its use protects it
        stamp = time.time() - 30 * 86400
        os.utime(built.cache / "rootfs" / built.key / "manifest.json", (stamp, stamp))
        gc = cli("cache", "gc", "--max-size", "0", *built.opts(), cwd=built.project)
        assert gc.returncode == 0, gc.stderr
        assert f"kept rootfs/{built.key}: mounted by a running environment" in gc.stdout
        rm = cli("cache", "rm", "--all", *built.opts(), cwd=built.project)
        assert rm.returncode == 1 and "mounted by a running environment" in rm.stderr
        assert (built.cache / "rootfs" / built.key / "data" / "usr" / "bin").is_dir()
    finally:
        shell.terminate()
        shell.communicate(timeout=30)
    assert shell.returncode != 0
    assert not any((built.cache / "runs").glob("*-shell")), "the shell left its run directory"
    rm = cli("cache", "rm", built.key[:8], *built.opts(), cwd=built.project)
    assert rm.returncode == 0, rm.stderr
    assert not (built.cache / "rootfs" / built.key).exists()
    assert cli("cache", "ls", "--json", *built.opts(), cwd=built.project).stdout.count('"key"') == 0


def test_gc_never_descends_into_a_mount_under_a_stale_build(tmp_path: Path) -> None:
    """A killed root-mode build leaves /proc, /sys, /dev/* mounted in its target: keep out."""
    if os.geteuid() != 0:
        pytest.fail("this check mounts a tmpfs: run the integration tests as root")
    cache = tmp_path / "cache"
    stale = cache / "tmp" / f"rootfs-{'a' * 24}.dead"
    target = stale / "data" / "dev" / "shm"
    target.mkdir(parents=True)
    (cache / "locks").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        (target / "sentinel").write_text("precious")
        result = cli("cache", "gc", "--cache-dir", str(cache), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "something is still mounted under it" in result.stdout
        assert (target / "sentinel").read_text() == "precious"
    finally:
        subprocess.run(["umount", str(target)], check=True)
    result = cli("cache", "gc", "--cache-dir", str(cache), cwd=tmp_path)
    assert "removed 1 stale build directories" in result.stdout
    assert not stale.exists()


def test_gc_keeps_a_finished_run_with_a_mount_left_in_it(tmp_path: Path) -> None:
    """A killed schroot run leaves a rw bind of a cached rootfs under runs/: never rmtree it."""
    if os.geteuid() != 0:
        pytest.fail("this check mounts a tmpfs: run the integration tests as root")
    cache = tmp_path / "cache"
    (cache / "locks").mkdir(parents=True)
    (cache / "tmp").mkdir()
    run = cache / "runs" / "20250101-000000-999999999"
    target = run / "work" / "underlay"
    target.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        (target / "sentinel").write_text("precious")
        result = cli("cache", "gc", "--max-age", "0", "--cache-dir", str(cache), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"kept {run}: something is still mounted under it" in result.stdout
        assert (target / "sentinel").read_text() == "precious"
    finally:
        subprocess.run(["umount", str(target)], check=True)
    result = cli("cache", "gc", "--max-age", "0", "--cache-dir", str(cache), cwd=tmp_path)
    assert "removed 1 finished run directories" in result.stdout and not run.exists()


DOCKER_PROJECT = """
[tool.pytest-isolate.envs.derived]
backend = "docker"
image = "{base}"
setup = ["echo {token} > /etc/derived-token"]

[tool.pytest-isolate.envs.as-is]
backend = "docker"
image = "{base}"
"""

DOCKER_TEST = """
import pytest

@pytest.mark.isolate("derived")
def test_derived():
    assert open("/etc/derived-token").read().strip() == "{token}"

@pytest.mark.isolate("as-is")
def test_user_image_as_is():
    import os
    assert not os.path.exists("/etc/derived-token")
"""


def suite_docker_image(pytestconfig: pytest.Config, where: Path) -> str:
    """A tag of the docker backend's default image (made by an inner run if needed)."""
    import docker

    client = docker.from_env()
    tags = [t for i in client.images.list(name="pytest-isolate/docker") for t in i.tags]
    if not tags:
        (where / "test_docker.py").write_text(
            "import pytest\n@pytest.mark.isolate('docker')\ndef test_it():\n    pass\n")
        cache = pytestconfig.pluginmanager.get_plugin("isolate-manager").cache.root
        subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                        f"--isolate-cache-dir={cache}", "--isolate-strict", "test_docker.py"],
                       cwd=where, check=True, capture_output=True, timeout=900)
        tags = [t for i in client.images.list(name="pytest-isolate/docker") for t in i.tags]
    assert tags
    return str(tags[0])


def test_docker_images_are_cache_entries(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """An image the docker backend made (here: a base image plus a setup command, in a
    private cache) is listed by `cache ls` with its size and last use, and `cache gc`
    removes it from the engine once unused for longer than --max-age.  A user's image
    used as it is stays out of the cache (and runs: nothing to hold)."""
    import uuid

    import docker

    from pytest_isolate.backends.docker import IMAGE_KIND
    token = uuid.uuid4().hex[:12]
    (tmp_path / "base").mkdir()
    base = suite_docker_image(pytestconfig, tmp_path / "base")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(DOCKER_PROJECT.format(base=base, token=token))
    (project / "test_derived.py").write_text(DOCKER_TEST.format(token=token))
    cache = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                          f"--isolate-cache-dir={cache}", "--isolate-strict", "-q"],
                         cwd=project, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    entries = list((cache / IMAGE_KIND).iterdir())
    assert len(entries) == 1, entries
    key = entries[0].name
    client = docker.from_env()
    images = client.images.list(filters={"label": f"pytest-isolate.key={key}"})
    assert len(images) == 1

    ls = cli("cache", "ls", "--cache-dir", str(cache), cwd=project)
    assert ls.returncode == 0, ls.stderr
    row = next(line for line in ls.stdout.splitlines() if line.startswith(key))
    assert IMAGE_KIND in row and "M" in row.split()[-4], row  # the image's size, in MiB

    # unused for two days: gc removes the entry and the image
    old = time.time() - 2 * 86400
    os.utime(entries[0] / "manifest.json", (old, old))
    gc = cli("cache", "gc", "--max-age", "1", "--cache-dir", str(cache), cwd=project)
    assert gc.returncode == 0, gc.stderr
    assert f"removed {IMAGE_KIND}/{key}" in gc.stdout, gc.stdout
    assert not entries[0].exists()
    assert client.images.list(filters={"label": f"pytest-isolate.key={key}"}) == []
    assert client.images.get(base) is not None  # the base image is not touched
