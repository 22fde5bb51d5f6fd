"""Images named by reference (``image = "REF"``) and pulled from a registry on loopback.

A registry of our own (Debian's docker-registry, never the system service) listens on
127.0.0.1 with htpasswd auth; the engine allows plain http there. It is seeded with
images made from the docker backend's own image of the cached root filesystem: a small
layer on top of it (a token file) is pushed and the local copy removed, so a test
really pulls (the base layers exist already: "Already exists"). Credentials reach the
engine the way a user's do: a config.json in DOCKER_CONFIG. The registry's access log
counts the manifest requests, which is how "no pull when present" is checked.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import free_port, remove_made_from, stop, wait_for_log
from shared_support import output, run_pytest, wait_for

from pytest_isolate.backends.base import RunContext
from pytest_isolate.backends.docker import DockerBackend
from pytest_isolate.backends.docker_engine import LABEL
from pytest_isolate.errors import AgentLost, ProvisionError
from pytest_isolate.images.kernel import ARCHES
from pytest_isolate.spec import EnvSpec

REGISTRY = "/usr/bin/docker-registry"
HTPASSWD = "/usr/bin/htpasswd"
USER = "isolate"

pytestmark = pytest.mark.integration

CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {base}/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
auth:
  htpasswd:
    realm: pytest-isolate-tests
    path: {base}/htpasswd
"""


@dataclasses.dataclass
class Registry:
    port: int
    base: Path
    password: str

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def manifest_requests(self, repo: str) -> int:
        """How many pulls of repo it has seen: GET requests of a manifest (the engine's
        HEAD before it, and the 401 that asks for credentials, are not counted)."""
        pattern = re.compile(rf'^127\.0\.0\.1 .*"GET /v2/{re.escape(repo)}/manifests/'
                             r'[^"]*" (\d+)', re.MULTILINE)
        found = pattern.findall((self.base / "registry.log").read_text())
        return sum(1 for status in found if status != "401")

    def docker_config(self, password: str | None) -> str:
        """A DOCKER_CONFIG directory whose config.json logs in with password (None: no
        credentials for this registry)."""
        where = Path(tempfile.mkdtemp(prefix="docker-config-", dir=self.base))
        auths = {} if password is None else {self.host: {"auth": base64.b64encode(
            f"{USER}:{password}".encode()).decode()}}
        (where / "config.json").write_text(json.dumps({"auths": auths}))
        return str(where)

    def auth(self) -> dict[str, str]:
        return {"username": USER, "password": self.password}


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    for tool, package in ((REGISTRY, "docker-registry"), (HTPASSWD, "apache2-utils")):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: scripts/setup.sh installs {package}")
    base = Path(tempfile.mkdtemp(prefix="pytest-isolate-registry-", dir="/tmp"))
    password = uuid.uuid4().hex
    hashed = subprocess.run([HTPASSWD, "-nbB", USER, password], capture_output=True,
                            text=True, check=True).stdout
    (base / "htpasswd").write_text(hashed)
    port = free_port()
    (base / "config.yml").write_text(CONFIG.format(base=base, port=port))
    with open(base / "registry.log", "wb") as log:
        proc = subprocess.Popen([REGISTRY, "serve", str(base / "config.yml")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_log(proc, base / "registry.log", "listening on", "the registry")
        yield Registry(port, base, password)
    finally:
        stop(proc, 5)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def podman_url(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A podman service of this module's own, whose registries.conf marks the loopback
    registry insecure (plain http): podman's Docker-compatible pull has no per-request
    switch for it, and a service reads that file once, at its start.  Rootful, on the
    same storage as the machine's service."""
    from pytest_isolate.setup_host import PODMAN_CONF, podman_service

    base = tmp_path_factory.mktemp("podman")
    (base / "registries.conf").write_text(
        f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    url = f"unix://{base}/podman.sock"
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf")}
    if os.path.exists(PODMAN_CONF):  # setup's: no fixed container ulimits (podman.py)
        env["CONTAINERS_CONF"] = PODMAN_CONF
    with open(base / "podman.log", "wb") as log:
        proc = subprocess.Popen(podman_service(url), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        wait_for("podman's service to listen", (base / "podman.sock").exists, 60, proc,
                 explain=(base / "podman.log").read_text)
        yield url
    finally:
        stop(proc, 10)


@pytest.fixture(scope="module")
def client() -> Any:
    import docker

    return docker.from_env()


def make_backend(pytestconfig: pytest.Config, log_dir: Path,
                 messages: list[str] | None = None) -> DockerBackend:
    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    sink = messages.append if messages is not None else (lambda message: None)
    run = RunContext(run_id=f"itest-{uuid.uuid4().hex[:8]}", rootdir=pytestconfig.rootpath,
                     cache=manager.cache, log_dir=log_dir / "logs", work_dir=log_dir / "work",
                     progress=sink, strict=True)
    return DockerBackend(run)


@dataclasses.dataclass
class Seeded:
    registry: Registry
    base_spec: EnvSpec
    base_image: str
    #: repository (without the host) -> digest of what was pushed last
    digests: dict[str, str]

    def ref(self, repo: str, tag: str = "1") -> str:
        return f"{self.registry.host}/{repo}:{tag}"


def push_layer(client: Any, registry: Registry, base: str, repo: str, tag: str,
               files: dict[str, bytes]) -> str:
    """Push base plus a layer holding files as registry/repo:tag, remove the local copy
    (so using it means pulling it); its digest."""
    container = client.containers.create(base, command=["true"])
    try:
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        container.put_archive("/", archive.getvalue())
        # not labelled as the docker backend's image (the base's labels are inherited):
        # its key label would make the backend take it for its own
        container.commit(repository=f"{registry.host}/{repo}", tag=tag,
                         changes=[f'LABEL "{LABEL}.key"="" "{LABEL}.rootfs"=""'])
    finally:
        container.remove(force=True)
    return push(client, registry, repo, tag)


def push(client: Any, registry: Registry, repo: str, tag: str) -> str:
    digest = ""
    for event in client.api.push(f"{registry.host}/{repo}", tag=tag, stream=True, decode=True,
                                 auth_config=registry.auth()):
        assert "error" not in event, event
        digest = event.get("aux", {}).get("Digest", digest)
    assert digest.startswith("sha256:")
    client.images.remove(f"{registry.host}/{repo}:{tag}")
    return digest


def remove_local(client: Any, ref: str) -> None:
    import docker

    try:
        client.images.remove(ref, force=True)
    except docker.errors.ImageNotFound:
        pass


def remove_pulled(client: Any, registry: Registry, cache: Any) -> None:
    """Remove every image of registry from the engine (what the tests pulled), and the
    cache entries of them and made from them, saved VM states included (each session's
    images are new: their entries would pile up)."""
    gone: set[str] = set()
    for entry in list(cache.entries()):
        if str(entry.manifest.get("reference") or "").startswith(f"{registry.host}/"):
            gone.add(entry.key)
            cache.remove(entry)
    remove_made_from(cache, gone)
    for image in client.images.list(all=True):
        refs = [*(image.attrs.get("RepoTags") or []), *(image.attrs.get("RepoDigests") or [])]
        if refs and all(ref.startswith(f"{registry.host}/") for ref in refs):
            with contextlib.suppress(Exception):
                client.images.remove(image.id, force=True)


@pytest.fixture(scope="module")
def seeded(registry: Registry, client: Any, pytestconfig: pytest.Config,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """isolate/debian:1 (the default Debian image plus /etc/registry-token) and
    isolate/nopython:1 (one file, no python3) in the registry, neither on the engine."""
    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    spec: EnvSpec = manager.specs["docker"]
    backend = make_backend(pytestconfig, tmp_path_factory.mktemp("seed"))
    base = backend.provision(spec).manifest["image"]
    digests = {"isolate/debian": push_layer(client, registry, base, "isolate/debian", "1",
                                            {"etc/registry-token": b"debian-1\n"})}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    client.api.import_image_from_data(archive.getvalue(),
                                      repository=f"{registry.host}/isolate/nopython", tag="1")
    digests["isolate/nopython"] = push(client, registry, "isolate/nopython", "1")
    yield Seeded(registry, spec, base, digests)
    remove_pulled(client, registry, manager.cache)


@pytest.fixture
def logged_in(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> Seeded:
    monkeypatch.setenv("DOCKER_CONFIG", seeded.registry.docker_config(seeded.registry.password))
    return seeded


def image_spec(seeded: Seeded, ref: str, **changes: Any) -> EnvSpec:
    name = f"reg-{uuid.uuid4().hex[:6]}"
    sources = {**dict(seeded.base_spec.sources),
               "image": f"pyproject.toml: [tool.pytest-isolate.envs.{name}] key 'image'"}
    return dataclasses.replace(seeded.base_spec, name=name, image=ref, sources=sources,
                               **changes)


def run_in(instance: Any, argv: list[str]) -> tuple[int, str]:
    reply, out = instance.conn.call(0, {"op": "exec", "argv": argv}, timeout=30)
    return reply["returncode"], out[: reply["stdout_len"]].decode()


# ---------------------------------------------------------------- pulls


def test_missing_image_is_pulled_once_pinned_and_runs(
        logged_in: Seeded, client: Any, pytestconfig: pytest.Config, tmp_path: Path) -> None:
    ref = logged_in.ref("isolate/debian")
    remove_local(client, ref)
    messages: list[str] = []
    backend = make_backend(pytestconfig, tmp_path, messages)
    spec = image_spec(logged_in, ref)
    before = logged_in.registry.manifest_requests("isolate/debian")
    entry = backend.provision(spec)
    assert logged_in.registry.manifest_requests("isolate/debian") > before
    assert not entry.hit
    assert entry.manifest["digest"] == logged_in.digests["isolate/debian"]
    assert entry.manifest["image"] == client.images.get(ref).id
    assert any(m.startswith(f"docker: pulling {ref}") for m in messages), messages
    assert any(m.startswith(f"docker: pulled {ref} (") and "layers" in m for m in messages)
    log = (backend.run.log_dir / spec.name / "provision.log").read_text()
    assert "Pull complete" in log and "Already exists" in log, log  # a line per layer

    instance = backend.start(spec, entry)
    try:
        assert run_in(instance, ["cat", "/etc/registry-token"]) == (0, "debian-1\n")
    finally:
        instance.stop()

    # present now: no pull, the same pinned entry
    seen = logged_in.registry.manifest_requests("isolate/debian")
    again = make_backend(pytestconfig, tmp_path / "again").provision(spec)
    assert again.hit and again.key == entry.key
    assert logged_in.registry.manifest_requests("isolate/debian") == seen


def test_pull_by_digest(logged_in: Seeded, client: Any, pytestconfig: pytest.Config,
                        tmp_path: Path) -> None:
    digest = logged_in.digests["isolate/debian"]
    ref = f"{logged_in.registry.host}/isolate/debian@{digest}"
    remove_local(client, ref)
    remove_local(client, logged_in.ref("isolate/debian"))
    backend = make_backend(pytestconfig, tmp_path)
    entry = backend.provision(image_spec(logged_in, ref))
    assert not entry.hit and entry.manifest["digest"] == digest
    assert client.images.get(ref).id == entry.manifest["image"]
    # the python key is checked against the image's python3 (trixie's 3.13 here)
    assert backend.provision(image_spec(logged_in, ref, python="3.13")).hit
    wrong = image_spec(logged_in, ref, python="3.11")
    wrong = dataclasses.replace(wrong, sources={
        **wrong.sources, "python": f"pyproject.toml: [tool.pytest-isolate.envs.{wrong.name}] "
                                   "key 'python'"})
    with pytest.raises(ProvisionError) as info:
        backend.provision(wrong)
    assert (f"image {ref!r} (from {wrong.source('image')}) has Python 3.13." in str(info.value)
            and f"but {wrong.source('python')} asks for python '3.11'" in str(info.value)), info


def test_moved_tag_is_seen_after_a_pull_and_makes_a_new_environment(
        logged_in: Seeded, client: Any, pytestconfig: pytest.Config, tmp_path: Path) -> None:
    registry = logged_in.registry
    first = push_layer(client, registry, logged_in.base_image, "isolate/moving", "1",
                       {"etc/registry-token": b"first\n"})
    spec = image_spec(logged_in, logged_in.ref("isolate/moving"))
    old = make_backend(pytestconfig, tmp_path / "a").provision(spec)
    assert old.manifest["digest"] == first
    second = push_layer(client, registry, logged_in.base_image, "isolate/moving", "1",
                        {"etc/registry-token": b"second\n"})
    # as if pushed from elsewhere: this engine's tag still names the first image
    client.images.get(old.manifest["image"]).tag(f"{registry.host}/isolate/moving", "1")
    # present: the run keeps what the engine has (nothing is contacted)
    seen = registry.manifest_requests("isolate/moving")
    same = make_backend(pytestconfig, tmp_path / "b").provision(spec)
    assert same.key == old.key and registry.manifest_requests("isolate/moving") == seen
    # pull = "always" sees the moved tag: a new digest, a new key
    always = dataclasses.replace(spec, options=(*spec.options, ("pull", "always")))
    moved = make_backend(pytestconfig, tmp_path / "c").provision(always)
    assert moved.manifest["digest"] == second and moved.key != old.key
    # and so does the documented refresh for the plain spec
    assert make_backend(pytestconfig, tmp_path / "d").provision(spec).key == moved.key


# ---------------------------------------------------------------- errors


def test_refused_and_missing_credentials_are_one_clear_error(
        seeded: Seeded, client: Any, pytestconfig: pytest.Config, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ref = seeded.ref("isolate/debian")
    remove_local(client, ref)
    for password in ("wrong", None):
        config = seeded.registry.docker_config(password)
        monkeypatch.setenv("DOCKER_CONFIG", config)
        spec = image_spec(seeded, ref)
        with pytest.raises(ProvisionError) as info:
            make_backend(pytestconfig, tmp_path).provision(spec)
        text = str(info.value)
        assert text.splitlines()[0] == (f"docker: pulling image {ref!r} (from "
                                        f"{spec.source('image')}) failed: registry "
                                        f"{seeded.registry.host} refused the credentials"), text
        assert f"fix: log in with `docker login {seeded.registry.host}`" in text
        assert f"{config}/config.json" in text


def test_unreachable_registry_is_one_clear_error(
        logged_in: Seeded, pytestconfig: pytest.Config, tmp_path: Path) -> None:
    ref = f"127.0.0.1:{free_port()}/isolate/debian:1"  # nothing listens there
    spec = image_spec(logged_in, ref)
    with pytest.raises(ProvisionError) as info:
        make_backend(pytestconfig, tmp_path).provision(spec)
    first, engine, fix = str(info.value).splitlines()
    assert first == (f"docker: pulling image {ref!r} (from {spec.source('image')}) failed: "
                     f"registry {ref.split('/')[0]} is unreachable")
    assert "connection refused" in engine and "docker load" in fix


def load_foreign_image(client: Any, tag: str, arch: str) -> None:
    """docker load of a one-file image whose config says arch (nothing of it runs)."""
    import hashlib

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    config = json.dumps({"architecture": arch, "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [
                             "sha256:" + hashlib.sha256(layer.getvalue()).hexdigest()]}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [tag],
                            "Layers": ["layer.tar"]}]).encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in (("layer.tar", layer.getvalue()), ("config.json", config),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    client.images.load(archive.getvalue())


def test_image_of_another_arch_names_the_arch_key(
        logged_in: Seeded, client: Any, pytestconfig: pytest.Config, tmp_path: Path) -> None:
    other = "arm64" if logged_in.base_spec.arch != "arm64" else "amd64"
    ref = logged_in.ref("isolate/foreign")  # on the engine only: removed with the others
    load_foreign_image(client, ref, other)
    spec = image_spec(logged_in, ref)
    with pytest.raises(ProvisionError) as info:
        make_backend(pytestconfig, tmp_path).provision(spec)
    assert str(info.value) == (
        f"docker: image {ref!r} (from {spec.source('image')}) is for {other}, but environment "
        f"{spec.name!r} wants arch {logged_in.base_spec.arch!r} ({spec.source('arch')}); set "
        f"arch = {other!r} for it, or name an image made for {logged_in.base_spec.arch} (a "
        "multi-platform image is pulled for the environment's arch)")


def test_image_without_python3_is_a_clear_error(
        logged_in: Seeded, client: Any, pytestconfig: pytest.Config, tmp_path: Path) -> None:
    ref = logged_in.ref("isolate/nopython")
    spec = image_spec(logged_in, ref)
    backend = make_backend(pytestconfig, tmp_path)
    with pytest.raises(ProvisionError, match="has no python3") as info:
        backend.provision(spec)
    text = str(info.value)
    assert f"image {ref!r} (from {spec.source('image')}) has no python3" in text
    assert "python:3.12-slim" in text  # the fix names an image that has one
    # the throwaway container is gone, and the image (pulled) stays for the next try
    assert not client.containers.list(all=True, filters={"label": f"pytest-isolate.env={spec.name}"})
    assert client.images.get(ref)


def test_missing_image_fails_its_tests_with_one_message(
        logged_in: Seeded, tmp_path: Path, session_cache: str) -> None:
    """A whole run: the image's reference and the registry's answer are said once, the
    pull is tried once (not per test), the good image's digest is in the report, and
    `envs` shows what it is pinned at."""
    registry = logged_in.registry
    gone = logged_in.ref("isolate/no-such-image")
    good = logged_in.ref("isolate/debian")
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.pytest-isolate.envs.gone]\nbackend = "docker"\nimage = "{gone}"\n\n'
        f'[tool.pytest-isolate.envs.good]\nbackend = "docker"\nimage = "{good}"\n')
    (tmp_path / "test_images.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.isolate('gone')\ndef test_one():\n    pass\n\n"
        "@pytest.mark.isolate('gone')\ndef test_two():\n    pass\n\n"
        "@pytest.mark.isolate('good')\ndef test_good():\n"
        "    assert open('/etc/registry-token').read() == 'debian-1\\n'\n")
    before = registry.manifest_requests("isolate/no-such-image")
    report = tmp_path / "report.json"
    env = {"DOCKER_CONFIG": registry.docker_config(registry.password)}
    result = run_pytest(tmp_path, session_cache, "-q", f"--isolate-report={report}",
                        extra_env=env, timeout=300)
    text = output(result)
    assert result.returncode == 1, text
    assert "2 failed, 1 passed" in text or "1 passed, 2 errors" in text, text
    # each test names the reference and where it came from; the fix is said once (counted
    # above the short summary, which repeats each error in full when CI is set)
    body = result.stdout.split("short test summary info")[0]
    assert body.count(f"pulling image {gone!r} (from {tmp_path / 'pyproject.toml'}: "
                      "[tool.pytest-isolate.envs.gone] key 'image') failed: registry "
                      f"{registry.host} has no such image") == 2, text
    assert body.count("the engine said: manifest for") == 1, text
    assert body.count("fix: check the name") == 1, text
    assert registry.manifest_requests("isolate/no-such-image") == before + 1
    stats = json.loads(report.read_text())["environments"]["good"]
    assert stats["image"] == good and stats["digest"] == logged_in.digests["isolate/debian"]

    envs = subprocess.run([sys.executable, "-m", "pytest_isolate", "envs", "good",
                           "--cache-dir", session_cache], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert envs.returncode == 0, envs.stderr
    assert f"image {good}: pinned at {logged_in.digests['isolate/debian']}" in envs.stdout


def test_same_image_runs_under_chroot_lxc_schroot_docker_podman_and_qemu(
        logged_in: Seeded, client: Any, podman_url: str, pytestconfig: pytest.Config,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chroot backend runs the image's root filesystem, exported from the engine into
    the cache by digest: the same files as in a container of it; lxc and schroot run the
    same export (one cache entry for all three), a VM boots it as its root disk with the
    Debian kernel package of its release (the image has no kernel), and podman pulls it
    from the same registry with the same credentials."""
    from pytest_isolate.backends.chroot import ChrootBackend
    from pytest_isolate.backends.lxc import LxcBackend
    from pytest_isolate.backends.podman import PodmanBackend
    from pytest_isolate.backends.qemu import QemuBackend
    from pytest_isolate.backends.schroot import SchrootBackend

    monkeypatch.setenv("CONTAINER_HOST", podman_url)

    ref = logged_in.ref("isolate/debian")
    remove_local(client, ref)
    docker_spec = image_spec(logged_in, ref)
    chroot_spec = dataclasses.replace(docker_spec, name=f"{docker_spec.name}-chroot",
                                      backend="chroot")
    docker_backend = make_backend(pytestconfig, tmp_path / "docker")
    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    chroot = ChrootBackend(make_backend(pytestconfig, tmp_path / "chroot").run)
    chroot.check(chroot_spec)
    rootfs = chroot.provision(chroot_spec)  # pulls it: the engine lacked it
    assert rootfs.kind == "image-rootfs" and rootfs.path.parent.parent == manager.cache.root
    assert rootfs.manifest["digest"] == logged_in.digests["isolate/debian"]
    assert chroot.provision(chroot_spec).hit
    assert rootfs.manifest["python"] == "3.13"  # trixie's, read from the python3 link
    with pytest.raises(ProvisionError, match=r"has Python 3\.13, but .* asks for python '3\.11'"):
        chroot.provision(dataclasses.replace(chroot_spec, python="3.11"))
    others = [(cls(make_backend(pytestconfig, tmp_path / name).run),
               dataclasses.replace(docker_spec, name=f"{docker_spec.name}-{name}", backend=name))
              for name, cls in (("lxc", LxcBackend), ("schroot", SchrootBackend),
                                ("qemu", QemuBackend), ("podman", PodmanBackend))]
    seen = []
    for backend, spec in ((chroot, chroot_spec), (docker_backend, docker_spec), *others):
        backend.check(spec)
        entry = backend.provision(spec)
        if isinstance(backend, QemuBackend):  # its disk is made of the same export
            assert entry.kind == "vmdisk" and entry.manifest["rootfs_key"] == rootfs.key
            assert entry.manifest["reference"] == spec.image
            kernel_package = ARCHES[spec.arch][0]
            assert entry.manifest["kernel_from"] == (f"Debian {spec.release}'s "
                                                     f"{kernel_package}"), entry.manifest
        elif isinstance(backend, PodmanBackend):  # pinned by the digest it pulled
            assert entry.manifest["digest"] == logged_in.digests["isolate/debian"]
        elif backend is not docker_backend:
            assert entry.path == rootfs.path, (spec.backend, entry.path)
        instance = backend.start(spec, entry)
        try:
            seen.append((run_in(instance, ["cat", "/etc/registry-token", "/etc/os-release"]),
                         run_in(instance, ["python3", "-c", "import sys; print(sys.version)"])))
        finally:
            instance.stop()
    assert len(seen) == 6 and all(each == seen[0] for each in seen), seen
    assert seen[0][0][1].startswith("debian-1\n"), seen

    # an image without python3: said when it is exported, and nothing is cached
    nopython = dataclasses.replace(image_spec(logged_in, logged_in.ref("isolate/nopython")),
                                   backend="chroot")
    with pytest.raises(ProvisionError) as info:
        chroot.provision(nopython)
    assert (f"chroot: image {nopython.image!r} (from {nopython.source('image')}) has no "
            "python3") in str(info.value)
    assert not [e for e in manager.cache.entries() if e.manifest.get("reference") == nopython.image]


# ---------------------------------------------------------------- packages on an image


def python_less_debian_image(client: Any, base: str, ref: str) -> None:
    """ref: the Debian image base with python3 purged (dpkg says so too), on the engine only."""
    purge = ("dpkg --purge --force-depends --force-remove-essential "
             "$(dpkg-query -W -f '${Package}\\n' 'python3*' 'libpython3*') >/dev/null")
    container = client.containers.create(base, entrypoint=["/bin/sh", "-c", purge],
                                         network_disabled=True)
    try:
        container.start()
        assert container.wait(timeout=120)["StatusCode"] == 0, container.logs()
        repo, _, tag = ref.rpartition(":")
        container.commit(repository=repo, tag=tag,
                         changes=[f'LABEL "{LABEL}.key"="" "{LABEL}.rootfs"=""'])
    finally:
        container.remove(force=True)


def test_packages_on_a_debian_image_are_installed_by_its_dpkg(
        logged_in: Seeded, client: Any, pytestconfig: pytest.Config, tmp_path: Path) -> None:
    """`packages` on a Debian-based image without python3: the host's apt fetches them
    (and python3) for the image's release, the image's dpkg installs them, with no network
    inside; the docker backend commits an image of it, chroot a cache entry of the export.
    Both are made once. A non-Debian image with packages is one clear error."""
    from pytest_isolate.backends.chroot import ChrootBackend

    ref = logged_in.ref("isolate/nopy-debian")  # never pushed: removed with the pulled ones
    python_less_debian_image(client, logged_in.base_image, ref)
    spec = image_spec(logged_in, ref, packages=("python3", "hello"))
    docker_backend = make_backend(pytestconfig, tmp_path / "docker")
    chroot = ChrootBackend(make_backend(pytestconfig, tmp_path / "chroot").run)
    chroot_spec = dataclasses.replace(spec, name=f"{spec.name}-chroot", backend="chroot")
    made: list[str] = []
    try:
        seen = []
        for backend, each in ((docker_backend, spec), (chroot, chroot_spec)):
            backend.check(each)
            entry = backend.provision(each)
            assert not entry.hit
            if backend is docker_backend:
                made.append(entry.manifest["image"])
            else:
                assert entry.kind == "image-rootfs"
                assert entry.manifest["packages"] == ["hello", "python3"]
                assert entry.manifest["python"] == "3.13"  # python3 came with the packages
            assert backend.provision(each).hit  # made once
            instance = backend.start(each, entry)
            try:
                seen.append((run_in(instance, ["hello"]),
                             run_in(instance, ["python3", "-c",
                                               "import sys; print(sys.version_info[:2])"]),
                             run_in(instance, ["ls", "-A", "/.isolate"])))
            finally:
                instance.stop()
        assert seen[0][:2] == seen[1][:2] == ((0, "Hello, world!\n"), (0, "(3, 13)\n")), seen
        assert "debs" not in seen[0][2][1] and "debs" not in seen[1][2][1], seen
        log = (tmp_path / "docker" / "logs").rglob("provision.log")
        assert any("Setting up hello" in p.read_text() for p in log)

        # not Debian-based: said once, naming the image and the fix
        other = image_spec(logged_in, logged_in.ref("isolate/nopython"), packages=("hello",))
        for backend, each in ((docker_backend, other),
                              (chroot, dataclasses.replace(other, backend="chroot"))):
            with pytest.raises(ProvisionError) as info:
                backend.provision(each)
            assert (f"image {other.image!r} (from {other.source('image')}) is not Debian-based "
                    "(no /etc/os-release, no dpkg), so its packages (hello) cannot be "
                    "installed") in str(info.value), (each.backend, str(info.value))
    finally:
        for tag in made:
            with contextlib.suppress(Exception):
                client.images.remove(tag, force=True)


# ---------------------------------------------------------------- a musl-based image


@pytest.fixture(scope="module")
def musl_root(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Alpine-like root of musl's libc, busybox and a CPython built against musl
    (musl_support.py; built once per machine, kept in pytest's cache)."""
    import musl_support

    log = tmp_path_factory.mktemp("musl") / "build.log"
    return musl_support.musl_root(pytestconfig.cache.mkdir("musl-image"), log)


def push_root(seeded: Seeded, client: Any, root: Path, repo: str, work: Path,
              leave_out: str = "") -> str:
    """root as the image repo:1 in the registry (not on the engine), less the files whose
    path has leave_out in it; its reference."""
    archive = work / f"{repo.replace('/', '-')}.tar"
    with tarfile.open(archive, "w") as tar:
        for top in sorted(root.iterdir()):
            tar.add(top, arcname=top.name,
                    filter=lambda info: None if leave_out and leave_out in info.name else info)
    client.api.import_image_from_file(str(archive), repository=f"{seeded.registry.host}/{repo}",
                                      tag="1")
    seeded.digests[repo] = push(client, seeded.registry, repo, "1")
    return seeded.ref(repo)


@pytest.fixture(scope="module")
def musl_image(seeded: Seeded, client: Any, musl_root: Path,
               tmp_path_factory: pytest.TempPathFactory) -> str:
    """isolate/musl:1: the musl root as an image."""
    return push_root(seeded, client, musl_root, "isolate/musl", tmp_path_factory.mktemp("push"))


def test_a_musl_image_runs_tests_under_every_backend(
        musl_image: str, logged_in: Seeded, podman_url: str, tmp_path: Path,
        session_cache: str) -> None:
    """A musl-based image (Alpine's kind: no glibc, busybox for a userland) is the root of
    every kind of backend: the agent is stdlib-only, and the host's pytest runs on the
    image's own musl CPython. Each test sees musl's loader mapped and no glibc; the failing
    one's traceback comes back from inside; the report pins the image's digest."""
    backends = {"musl-chroot": "chroot", "musl-lxc": "lxc", "musl-schroot": "schroot",
                "musl-docker": "docker", "musl-podman": "podman", "musl-qemu": "qemu"}
    (tmp_path / "pyproject.toml").write_text("".join(
        f'[tool.pytest-isolate.envs.{name}]\nbackend = "{backend}"\nimage = "{musl_image}"\n\n'
        for name, backend in backends.items()))
    names = ", ".join(repr(name) for name in backends)
    (tmp_path / "test_musl.py").write_text(
        "import os, platform, sys, sysconfig\n"
        "import pytest\n\n"
        f"@pytest.mark.isolate({names})\n"
        "def test_runs_on_musl():\n"
        "    maps = open('/proc/self/maps').read()\n"
        "    assert f'/lib/ld-musl-{platform.machine()}.so.1' in maps, maps\n"
        "    assert 'libc.so.6' not in maps, maps\n"
        "    assert sysconfig.get_config_var('MULTIARCH').endswith('-linux-musl')\n"
        "    assert os.path.realpath('/bin/sh') == '/bin/busybox'\n"
        "    assert not os.path.exists('/etc/debian_version')\n\n"
        f"@pytest.mark.isolate({names})\n"
        "def test_fails_inside():\n"
        "    assert sys.platform == 'musl-is-still-linux'\n")
    report = tmp_path / "report.json"
    registry = logged_in.registry
    env = {"DOCKER_CONFIG": registry.docker_config(registry.password),
           "CONTAINER_HOST": podman_url}
    result = run_pytest(tmp_path, session_cache, "-q", "-p", "no:randomly",
                        f"--isolate-report={report}", extra_env=env, timeout=900)
    text = output(result)
    assert result.returncode == 1, text
    assert "6 failed, 6 passed" in text, text
    assert result.stdout.count("AssertionError: assert 'linux' == 'musl-is-still-linux'") >= 6, \
        text
    environments = json.loads(report.read_text())["environments"]
    for name in backends:
        assert environments[name]["image"] == musl_image, environments[name]
        assert environments[name]["digest"] == logged_in.digests["isolate/musl"], name


def test_a_python_without_ctypes_is_one_clear_error(
        logged_in: Seeded, client: Any, musl_root: Path, pytestconfig: pytest.Config,
        tmp_path: Path) -> None:
    """The agent's system calls go through ctypes: a python3 built without it (no libffi)
    is said as such, by the engine backends' check of the image and by the agent itself
    under chroot (which runs the export as it is)."""
    from pytest_isolate.backends.chroot import ChrootBackend

    ref = push_root(logged_in, client, musl_root, "isolate/musl-noctypes", tmp_path,
                    leave_out="lib-dynload/_ctypes.")
    spec = image_spec(logged_in, ref)
    with pytest.raises(ProvisionError) as info:
        make_backend(pytestconfig, tmp_path / "docker").provision(spec)
    assert (f"docker: python3 in image {ref!r} (from {spec.source('image')}) (Python "
            f"{sys.version_info.major}.{sys.version_info.minor}.") in str(info.value)
    assert ("cannot import ctypes, which the agent needs for its system calls "
            "(ModuleNotFoundError: No module named '_ctypes'); use a python3 built with ctypes "
            "(libffi)") in str(info.value)

    chroot_spec = dataclasses.replace(spec, name=f"{spec.name}-chroot", backend="chroot")
    chroot = ChrootBackend(make_backend(pytestconfig, tmp_path / "chroot").run)
    chroot.check(chroot_spec)
    entry = chroot.provision(chroot_spec)
    with pytest.raises(AgentLost):
        chroot.start(chroot_spec, entry).stop()
    # the agent's log: what a run shows under the error as "environment log tail"
    log = (tmp_path / "chroot/logs" / chroot_spec.name / "agent.log").read_text()
    assert ("ImportError: pytest-isolate's agent needs ctypes, which this Python "
            f"(/usr/bin/python3 {sys.version_info.major}.{sys.version_info.minor}.") in log, log
    assert "(No module named '_ctypes'); use a python3 built with ctypes (libffi)" in log, log
