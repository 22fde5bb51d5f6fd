"""Docker-specific behaviour of the docker backend, against the real engine (no mocks).

What every backend does is in tests/conformance; here: images made without a
registry and found again by their hash, derived images for a user's image with
setup commands, the container's grants and labels, its log, clean up, reaping a
killed run's containers, and the messages when the SDK or the engine is missing.
Images pulled from a registry: test_registry.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shared_support import wait_for

from pytest_isolate.backends.base import RunContext, shipped_paths
from pytest_isolate.backends.docker import DockerBackend
from pytest_isolate.environment import Environment
from pytest_isolate.errors import BackendUnavailable, ProvisionError
from pytest_isolate.images.archive import docker_arch
from pytest_isolate.spec import ARCH_MACHINES, EnvSpec, host_arch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client() -> Any:
    import docker

    return docker.from_env()


@pytest.fixture
def manager(pytestconfig: pytest.Config) -> Any:
    return pytestconfig.pluginmanager.get_plugin("isolate-manager")


@pytest.fixture
def backend(manager: Any, pytestconfig: pytest.Config, tmp_path: Path) -> DockerBackend:
    run = RunContext(run_id=f"itest-{uuid.uuid4().hex[:8]}", rootdir=pytestconfig.rootpath,
                     cache=manager.cache, log_dir=tmp_path / "logs", work_dir=tmp_path / "work",
                     progress=lambda message: None, strict=True)
    return DockerBackend(run)


@pytest.fixture
def spec(manager: Any) -> EnvSpec:
    spec: EnvSpec = manager.specs["docker"]
    return spec


def run_in(instance: Any, argv: list[str]) -> tuple[int, str]:
    """A command in the container itself (the agent's own view, not a test's fresh root)."""
    reply, out = instance.conn.call(0, {"op": "exec", "argv": argv}, timeout=30)
    return reply["returncode"], out[: reply["stdout_len"]].decode()


def containers_of(client: Any, run_id: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"pytest-isolate.run={run_id}"}))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- images


def test_default_image_is_imported_once_and_tagged_by_hash(
    backend: DockerBackend, spec: EnvSpec, client: Any,
) -> None:
    first = backend.provision(spec)
    again = backend.provision(spec)
    assert again.hit
    assert again.key == first.key and again.manifest["id"] == first.manifest["id"]
    tag = first.manifest["image"]
    assert tag == f"pytest-isolate/docker:{first.key}"
    image = client.images.get(tag)
    assert image.labels["pytest-isolate.key"] == first.key
    rootfs_key = spec.rootfs_key()
    assert image.labels["pytest-isolate.rootfs"] == rootfs_key
    assert image.attrs["Architecture"] == spec.arch

    # an image made FROM ours inherits its labels (a user's Dockerfile, a pushed
    # derivative): it must never be taken for ours
    container = client.containers.create(tag, command=["true"])
    try:
        derived = container.commit(repository="isolate-derived", tag=uuid.uuid4().hex[:6])
    finally:
        container.remove()
    assert derived.labels["pytest-isolate.key"] == first.key and derived.id != image.id
    # another environment with the same content reuses the image under its own name
    alias = dataclasses.replace(spec, name=f"Alias_{uuid.uuid4().hex[:6]}")
    try:
        entry = backend.provision(alias)
        assert entry.hit
        assert entry.manifest["image"] == f"pytest-isolate/{alias.name.lower()}:{first.key}"
        assert entry.manifest["id"] == first.manifest["id"]
        assert client.images.get(entry.manifest["image"]).id == image.id
    finally:
        client.images.remove(f"pytest-isolate/{alias.name.lower()}:{first.key}")
        client.images.remove(derived.id, force=True)
    assert client.images.get(tag).id == first.manifest["id"]  # removing the alias kept it


def test_user_image_with_setup_is_committed_once(
    backend: DockerBackend, spec: EnvSpec, client: Any,
) -> None:
    base = backend.provision(spec).manifest["image"]
    name = f"derived-{uuid.uuid4().hex[:6]}"
    derived = dataclasses.replace(spec, name=name, image=base,
                                  setup=(f"echo {name} > /etc/derived-marker", "ls -d $PWD"))
    first = backend.provision(derived)
    try:
        assert not first.hit
        assert first.manifest["image"] == f"pytest-isolate/{name}:{first.key}"
        assert client.images.get(first.manifest["image"]).labels["pytest-isolate.key"] == first.key
        again = backend.provision(derived)
        assert again.hit and again.manifest["id"] == first.manifest["id"]
        log = (backend.run.log_dir / name / "provision.log").read_text()
        assert f"$ echo {name} > /etc/derived-marker" in log
        assert str(backend.run.rootdir) in log  # setup runs in the project's rootdir
        instance = backend.start(derived, first)
        try:
            assert run_in(instance, ["cat", "/etc/derived-marker"]) == (0, f"{name}\n")
        finally:
            instance.stop()
        # the setup container is gone
        assert not client.containers.list(all=True, filters={"label": f"pytest-isolate.env={name}"})
    finally:
        client.images.remove(first.manifest["image"])


def test_user_image_without_setup_is_used_as_it_is(
    backend: DockerBackend, spec: EnvSpec, client: Any,
) -> None:
    base = backend.provision(spec)
    plain = dataclasses.replace(spec, name="plain", image=base.manifest["image"])
    entry = backend.provision(plain)
    assert entry.manifest["image"] == base.manifest["id"]
    assert not client.images.list(name="pytest-isolate/plain")


def test_failing_setup_command_reports_its_output(
    backend: DockerBackend, spec: EnvSpec, client: Any,
) -> None:
    base = backend.provision(spec).manifest["image"]
    name = f"broken-{uuid.uuid4().hex[:6]}"
    broken = dataclasses.replace(spec, name=name, image=base,
                                 setup=("echo about to fail; exit 3",))
    with pytest.raises(ProvisionError, match=r"setup command 1 .* exit status 3") as info:
        backend.provision(broken)
    assert "about to fail" in str(info.value)
    assert not client.images.list(name=f"pytest-isolate/{name}")
    assert not client.containers.list(all=True, filters={"label": f"pytest-isolate.env={name}"})


# ---------------------------------------------------------------- containers


def test_container_grants_labels_mounts_and_cleanup(
    backend: DockerBackend, spec: EnvSpec, client: Any, pytestconfig: pytest.Config,
) -> None:
    entry = backend.provision(spec)
    instance = backend.start(spec, entry)
    try:
        (container,) = containers_of(client, backend.run.run_id)
        labels = container.labels
        assert labels["pytest-isolate.env"] == "docker"
        assert labels["pytest-isolate.pid"] == str(os.getpid())
        assert labels["pytest-isolate.host"] == socket.gethostname()
        host = container.attrs["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["Privileged"] is False
        assert host["CapAdd"] == ["SYS_ADMIN"]
        assert "apparmor=unconfined" not in (host["SecurityOpt"] or []) or "apparmor" in str(
            client.info()["SecurityOptions"])
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        rootdir = str(pytestconfig.rootpath)
        assert mounts[rootdir]["Source"] == rootdir and mounts[rootdir]["RW"] is False
        for src, dst in shipped_paths():
            assert mounts[dst]["Source"] == src and mounts[dst]["RW"] is False
        # the agent runs in the container (its own hostname), not on the host
        assert run_in(instance, ["hostname"]) == (0, "isolate-docker\n")
        assert run_in(instance, ["test", "-e", "/.dockerenv"])[0] == 0
        # the lower layer a test's fresh root is made from carries docker's hosts file
        code, hosts = run_in(instance, ["cat", "/etc/hosts"])
        assert code == 0 and "localhost" in hosts
        assert instance.alive()
    finally:
        instance.stop()
    assert not instance.alive()
    assert containers_of(client, backend.run.run_id) == []
    log = instance.logs["container"]
    assert log == backend.run.log_dir / "docker" / "container.log"
    text = log.read_text()
    assert "pytest-isolate: container up" in text
    assert "state: running" in text


def test_agent_that_dies_is_noticed(backend: DockerBackend, spec: EnvSpec, client: Any) -> None:
    instance = backend.start(spec, backend.provision(spec))
    try:
        (container,) = containers_of(client, backend.run.run_id)
        container.kill()
        wait_for("the agent's death to be noticed", lambda: not instance.alive(), 10,
                 interval=0.05)
    finally:
        instance.stop()
    assert containers_of(client, backend.run.run_id) == []
    assert "exit code 137" in instance.logs["container"].read_text()


def test_containers_of_dead_runs_are_reaped(
    backend: DockerBackend, spec: EnvSpec, client: Any,
) -> None:
    image = backend.provision(spec).manifest["image"]
    tag = uuid.uuid4().hex[:8]
    me = socket.gethostname()

    def make(pid: int, host: str, pidstart: str | None = None) -> Any:
        labels = {"pytest-isolate": "1", "pytest-isolate.run": f"reap-{tag}",
                  "pytest-isolate.env": "docker", "pytest-isolate.pid": str(pid),
                  "pytest-isolate.host": host}
        if pidstart is not None:
            labels["pytest-isolate.pidstart"] = pidstart
        return client.containers.create(image, ["true"], labels=labels, network_mode="none")

    dead = make(dead_pid(), me)
    reused = make(os.getpid(), me, pidstart="1")  # same pid number, another process
    alive = make(os.getpid(), me, pidstart=backend.labels(spec)["pytest-isolate.pidstart"])
    elsewhere = make(dead_pid(), "some-other-host")
    try:
        backend.check(spec)
        left = {c.id for c in containers_of(client, f"reap-{tag}")}
        assert left == {alive.id, elsewhere.id}
    finally:
        for c in (dead, reused, alive, elsewhere):
            with contextlib.suppress(Exception):
                c.remove(force=True)


def test_killed_run_leaves_a_container_the_next_run_removes(
    pytester: pytest.Pytester, client: Any, manager: Any,
) -> None:
    pytester.makepyfile(test_sleepy=textwrap.dedent("""
        import time, pytest

        @pytest.mark.isolate("docker")
        def test_sleeps():
            time.sleep(120)
    """))
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--isolate-strict",
            f"--isolate-cache-dir={manager.cache.root}", "test_sleepy.py"]
    proc = subprocess.Popen(args, cwd=pytester.path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    label = f"pytest-isolate.pid={proc.pid}"
    try:
        wait_for("a container of the run", lambda: client.containers.list(filters={"label": label}),
                 120, proc, interval=0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = client.containers.list(all=True, filters={"label": label})
    pytester.makepyfile(test_sleepy="import pytest\n\n@pytest.mark.isolate('docker')\n"
                                    "def test_quick():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--isolate-strict",
                                           f"--isolate-cache-dir={manager.cache.root}")
    result.assert_outcomes(passed=1)
    if left:  # (unless a concurrent run on this machine already removed it)
        result.stdout.fnmatch_lines(["*docker: removed * container(s) left by killed runs*"])
    assert not client.containers.list(all=True, filters={"label": label})


# ---------------------------------------------------------------- marker tests

MARKER_TESTS = textwrap.dedent("""
    import os, socket, pytest

    pytestmark = pytest.mark.isolate("docker")

    def test_in_a_container():
        assert os.uname().nodename == "isolate-docker"
        assert os.path.exists("/.dockerenv")
        assert os.getuid() == 0

    def test_localhost_resolves():
        assert "localhost" in open("/etc/hosts").read()
        assert socket.getaddrinfo("localhost", 80)

    def test_only_loopback():
        assert sorted(os.listdir("/sys/class/net")) == ["lo"]

    def test_writes_a():
        open("/etc/hosts", "a").write("10.0.0.1 written-by-a\\n")
        open("/usr/written-by-a", "w").write("x")

    def test_writes_b_sees_clean_state():
        assert "written-by-a" not in open("/etc/hosts").read()
        assert not os.path.exists("/usr/written-by-a")

    def test_fails():
        assert 1 + 1 == 3
""")


def test_marker_tests_run_in_containers_that_are_removed(
    pytester: pytest.Pytester, client: Any, manager: Any,
) -> None:
    pytester.makepyfile(test_marked=MARKER_TESTS)
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--isolate-strict", "-v",
                                           f"--isolate-cache-dir={manager.cache.root}",
                                           f"--isolate-report={report}")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["*assert (1 + 1) == 3*"])
    data = json.loads(report.read_text())
    logs = data["environments"]["docker"]["logs"]
    assert containers_of(client, data["run_id"]) == []
    assert "pytest-isolate: container up" in Path(logs["container"]).read_text()
    assert "test session starts" in Path(logs["agent"]).read_text()


# ---------------------------------------------------------------- unavailable


def test_engine_not_answering_says_how_to_start_it(
    backend: DockerBackend, spec: EnvSpec, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(BackendUnavailable) as info:
        backend.check(spec)
    assert "the docker engine does not answer" in str(info.value)
    assert "dockerd --bridge=none --iptables=false --ip-masq=false" in info.value.fix
    assert "DOCKER_HOST" in info.value.fix


def test_missing_sdk_says_what_to_install(
    backend: DockerBackend, spec: EnvSpec, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "docker", None)  # what `import docker` does when absent
    with pytest.raises(BackendUnavailable) as info:
        backend.check(spec)
    assert info.value.fix == "install the Docker SDK for Python: pip install 'pytest-isolate-env[docker]'"


def test_plugin_and_backend_import_without_the_sdk() -> None:
    code = ("import sys, pytest_isolate.plugin, pytest_isolate.backends.docker\n"
            "assert 'docker' not in sys.modules, 'docker imported eagerly'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(autouse=True)
def _no_leftovers(client: Any) -> Iterator[None]:
    before = {c.id for c in client.containers.list(all=True, filters={"label": "pytest-isolate.pid"})}
    yield
    label = f"pytest-isolate.pid={os.getpid()}"
    mine = [c for c in client.containers.list(all=True, filters={"label": label})
            if c.id not in before and c.labels.get("pytest-isolate.run", "").startswith("itest-")]
    assert mine == [], "containers left behind"


def test_network_when_the_spec_asks(backend: DockerBackend, spec: EnvSpec, client: Any) -> None:
    entry = backend.provision(spec)
    online = dataclasses.replace(spec, network=True)
    instance = backend.start(online, entry)
    try:
        (container,) = containers_of(client, backend.run.run_id)
        mode = container.attrs["HostConfig"]["NetworkMode"]
        networks = {n.name for n in client.networks.list()}
        assert mode == ("bridge" if "bridge" in networks else "host")
        code, out = run_in(instance, ["ls", "/sys/class/net"])
        assert code == 0 and set(out.split()) - {"lo"}, out
    finally:
        instance.stop()


def test_copy_transfer_for_remote_engines(
    backend: DockerBackend, spec: EnvSpec, client: Any, pytestconfig: pytest.Config,
) -> None:
    """What a remote engine gets (no host paths to bind): copies, made read-only inside."""
    copy = dataclasses.replace(spec, options=(("docker_transfer", "copy"),
                                              ("exclude", ("examples/",))))
    instance = backend.start(copy, backend.provision(spec))
    try:
        (container,) = containers_of(client, backend.run.run_id)
        assert container.attrs["Mounts"] == []
        rootdir = pytestconfig.rootpath
        this = Path(__file__).relative_to(rootdir)
        assert run_in(instance, ["cat", str(rootdir / this)]) == (0, Path(__file__).read_text())
        assert run_in(instance, ["test", "-e", str(rootdir / ".git")])[0] == 1  # not copied
        # the same rule as a VM's project disk: .gitignore'd and options.exclude'd paths stay out
        if (rootdir / ".git").exists() and (rootdir / "build").exists():
            assert run_in(instance, ["test", "-e", str(rootdir / "build")])[0] == 1
        assert run_in(instance, ["test", "-e", str(rootdir / "examples")])[0] == 1
        assert run_in(instance, ["test", "-e", str(rootdir / "pytest_isolate")])[0] == 0
        code, out = run_in(instance, ["sh", "-c", f"touch {rootdir}/probe 2>&1"])
        assert code != 0 and "Read-only file system" in out
        env = Environment(instance)
        r = env.run(["python3", "-c", "import pytest; print(pytest.__file__)"],
                    env={"PYTHONPATH": "/.isolate/site"})
        assert isinstance(r.stdout, str) and r.stdout.startswith("/.isolate/site/pytest/"), r
        assert env.run(["touch", str(rootdir / "probe")]).returncode != 0
    finally:
        instance.stop()
    assert not (pytestconfig.rootpath / "probe").exists()


def test_foreign_architecture_image_runs_under_qemu_user(
    backend: DockerBackend, spec: EnvSpec, client: Any,
) -> None:
    """A foreign arch (arm64 on other hosts): the image says so, binfmt's qemu-user runs it."""
    other = "arm64" if host_arch() != "arm64" else "amd64"
    foreign = dataclasses.replace(spec, name=f"docker-{other}", arch=other)
    machine = ARCH_MACHINES[other]
    backend.check(foreign)
    entry = backend.provision(foreign)
    image = client.images.get(entry.manifest["image"])
    arch, variant = docker_arch(other)
    assert (image.attrs["Architecture"], image.attrs.get("Variant") or "") == (arch, variant)
    assert image.labels["pytest-isolate.rootfs"] == foreign.rootfs_key()
    instance = backend.start(foreign, entry)
    try:
        assert instance.hello["machine"] == machine
        assert run_in(instance, ["uname", "-m"]) == (0, f"{machine}\n")
        env = Environment(instance)
        env.run("echo x > /etc/arch-probe", check=True)
        env.close()
        assert Environment(instance).run(["test", "-e", "/etc/arch-probe"]).returncode == 1
    finally:
        instance.stop()
