"""docker: one container per environment, driven through the Docker SDK for Python.

The engine is reached the way the docker CLI reaches it (``DOCKER_HOST``,
``DOCKER_TLS_VERIFY`` / ``DOCKER_CERT_PATH``, else the current docker context), through
docker_engine.py's ``Engine``: the one place where the SDK's errors become ours, in the
engine's own name (the podman backend drives this code too).  The SDK is imported on
first use only.

Images.  No registry is needed for the default image: the cached Debian
root filesystem (images/rootfs.py) streamed as a tar archive into the engine's
image import, tagged ``pytest-isolate/<env>:<key>`` where the key hashes the root
filesystem's key, this module's image format and the engine reached (EngineFacts.identity:
dockerd's engine ID, podman's host and storage directory -- DOCKER_HOST may well name
podman's socket, whose images are not dockerd's); it is made once and found
again by its tag (or, under another env's name, by its ``pytest-isolate.key``
label).  A foreign architecture (``arch = "arm64"`` on amd64) is loaded instead
(``docker load`` of a one-layer image whose config names the architecture, since
older engines ignore the platform of an import; images/archive.py writes it) and runs
through the host's binfmt qemu-user.  A spec that names an image (``image = REF``) uses the engine's
image of that reference, pulled when the engine lacks it (docker_pull.py: progress,
credentials, one message per failure), pinned by its digest in a cache record
(``docker-pin``) that also holds the python3 version a throwaway container found in it
(none is a clear error, once per image); with setup commands, a derived image made by
running them in a container of it and committing the result, tagged by the hash of the
base image's id and the commands.

Containers.  No network unless the spec asks for it (``network_mode="none"``;
otherwise the engine's "bridge", or the host's network on an engine started with
``--bridge=none``), never ``--privileged``.  The grant is ``CAP_SYS_ADMIN``:
per-test clean state is the agent's job, and its workers need ``unshare(
CLONE_NEWNS | CLONE_NEWPID)``, ``mount`` (overlay, tmpfs, bind), ``umount2`` --
the kernel allows them only with CAP_SYS_ADMIN, and docker's default seccomp
profile allows them only to a container holding it.  That profile refuses
``pivot_root(2)`` even then: with an agent that falls back to move-mount +
chroot (``agent.PIVOT_ROOT_FALLBACK``) the default profile stays on, otherwise
the container also gets ``seccomp=unconfined``.  On an engine that confines
containers with AppArmor, ``docker-default`` denies every mount whatever the
capabilities, so there (only there) the container gets ``apparmor=unconfined``.
Everything else (device cgroup, masked /proc paths, read-only /sys, the other
capabilities) stays as docker sets it.  The grant is the agent's, not a test's: a test
worker drops CAP_SYS_ADMIN (to docker's default set), sets no_new_privs, adds its own
seccomp filter and masks its fresh /proc as docker masks the container's, after it has
mounted its root (agent.harden_process; README "Security model").  The zygote keeps
CAP_SYS_ADMIN to mount each worker's root.  ``privileged = true`` skips that drop.

Host paths.  The project rootdir (read-only unless ``rootdir_writable``) and the
shipped pytest packages (read-only, at /.isolate/site/...) are bind mounts on a
local engine.  A remote engine cannot see the host's files, so they are copied
into the container instead (``put_archive``; .git, virtualenvs and caches are
left out) and made read-only inside by a bind mount onto themselves; the option
``docker_transfer = "bind" | "copy"`` overrides the choice.  An engine over ssh
(``ssh://``: DOCKER_HOST, a context, a pool host) is remote in this sense even on
loopback; how it is reached and what its errors say is in docker_ssh.py.

Clean state.  The agent's pristine lower layer is the container's own root
(``lower = "/"``): an overlay whose lower directory is ``/`` sees the container's
root file system without the mounts on top of it, and nothing writes to that
root after start -- except once, before the agent starts: docker bind-mounts
/etc/hosts, /etc/hostname and /etc/resolv.conf over empty placeholder files, so
the prelude copies their content into the placeholders (which is what a test's
fresh root then shows), makes the copied host paths read-only and creates
/.isolate/ws.

Agent transport.  ``docker exec`` of the agent's bootstrap with stdin attached
(docker_exec.py: the exec stream, demultiplexed into the framed Connection and the
agent log).  The container's main process is a python3 that only waits.

Clean up.  Containers are labelled with the run id, env, host name and host pid
(plus that pid's start time, against pid reuse), removed when the instance
stops, and a later run removes any whose recorded process on this host is gone
(a killed run).  The container's own log (``docker logs`` and its final state)
is saved to the run's log directory first, as ``container.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from pytest_isolate.backends import docker_pull
from pytest_isolate.backends.base import (
    START_TIMEOUT,
    Backend,
    Launch,
    agent_command,
    agent_settings,
    standard_mounts,
)
from pytest_isolate.backends.docker_build import with_built_image
from pytest_isolate.backends.docker_engine import (
    LABEL,
    Engine,
    EngineFacts,
    engine_error,
    engine_facts,
    engine_target,
    make_client,
    network_mode_of,
    owner_gone,
    owner_labels,
    remove_container,
    remove_images,
    repository,
    sdk,
)
from pytest_isolate.backends.docker_exec import ExecAgent
from pytest_isolate.cache import Entry
from pytest_isolate.config import Option
from pytest_isolate.errors import BackendUnavailable, IsolateError, ProvisionError
from pytest_isolate.images.archive import (
    DOCKER_ARCH,
    TarStream,
    docker_arch,
    write_copy_archive,
    write_image_archive,
)
from pytest_isolate.images.envvars import environment_variables, system_variables
from pytest_isolate.images.tree import EXCLUDE_OPTION
from pytest_isolate.limits import cpu_list, host_cpus
from pytest_isolate.setup_host import HOST_NEEDS
from pytest_isolate.spec import EnvSpec, content_hash

#: Bump when the way images are made changes, so old tags are not reused.
IMAGE_FORMAT = 1
#: Seconds the image's dpkg may take to install an environment's packages.
PACKAGES_TIMEOUT = 1800
#: The cache entries that stand for images on an engine (see DockerBackend._record_image).
IMAGE_KIND = "docker-image"
#: The cache entries that pin a user's image (``image = REF``): its digest, id and python3.
PIN_KIND = "docker-pin"

#: What the container's main process runs: nothing, quietly, until it is removed.
MAIN_PROCESS = (
    "import signal,sys\n"
    "sys.stdout.write('pytest-isolate: container up, waiting for the agent\\n')\n"
    "sys.stdout.flush()\n"
    "signal.signal(signal.SIGTERM,lambda s,f:sys.exit(0))\n"
    "while 1:signal.pause()\n"
)

#: Run before the agent's bootstrap in the same python3 (see the module docstring);
#: READONLY: paths copied into the container (no bind mounts) to make read-only.
PRELUDE = """\
import os as _o,ctypes as _c
_l=_c.CDLL(None,use_errno=True)
for _f in ('/etc/hosts','/etc/hostname','/etc/resolv.conf'):
 try:
  _d=open(_f,'rb').read()
 except OSError:
  continue
 if _l.umount2(_f.encode(),0)==0:
  with open(_f,'wb') as _w:_w.write(_d)
_o.makedirs('/.isolate/ws',exist_ok=True)
for _p in READONLY:
 _b=_p.encode()
 if _l.mount(_b,_b,None,_c.c_ulong(20480),None) or _l.mount(None,_b,None,_c.c_ulong(4129),None):
  raise SystemExit('pytest-isolate: cannot make %s read-only: %s'%(_p,_o.strerror(_c.get_errno())))
del _o,_c,_l
"""


def prelude(readonly: list[str]) -> str:
    return PRELUDE.replace("READONLY", repr(readonly), 1)


def platform_of(spec: EnvSpec) -> str | None:
    if not spec.foreign:
        return None
    arch, variant = docker_arch(spec.arch)
    return f"linux/{arch}" + (f"/{variant}" if variant else "")


def image_of(engine: Engine, spec: EnvSpec, progress: Any, log: Path) -> tuple[Any, float | None]:
    """The engine's image of spec.image, pulled when missing (or always, with the option
    ``pull = "always"``), and the seconds a pull took (None: no pull); ProvisionError when
    it is for another arch than spec's."""
    pulled = None
    if spec.option("pull", "missing") == "always":
        pulled = docker_pull.pull(engine, spec, platform_of(spec), progress, log)
    image = engine.image(str(spec.image))
    if image is None and pulled is None:
        pulled = docker_pull.pull(engine, spec, platform_of(spec), progress, log)
        image = engine.image(str(spec.image))
    if image is None:
        raise ProvisionError(f"{engine.name}: image {spec.image!r} is missing right after it "
                             "was pulled", log_path=str(log))
    want = docker_arch(spec.arch)[0]
    have = image.attrs.get("Architecture")
    if have and have != want:
        debian = next((d for d, (a, _) in DOCKER_ARCH.items() if a == have), have)
        raise ProvisionError(
            f"{engine.name}: image {spec.image!r} (from {spec.source('image')}) is for {have}, but "
            f"environment {spec.name!r} wants arch {want!r} ({spec.source('arch')}); set "
            f"arch = {debian!r} for it, or name an image made for {want} (a multi-platform "
            "image is pulled for the environment's arch)")
    return image, pulled


def check_python_version(spec: EnvSpec, found: str) -> None:
    """ProvisionError when the environment's python key wants another Python than the
    image's python3 (found: "3.13.5")."""
    if spec.python is None or not found:
        return
    if ".".join(found.split(".")[:2]) != spec.python:
        raise ProvisionError(
            f"{spec.backend}: image {spec.image!r} (from {spec.source('image')}) has Python {found}, "
            f"but {spec.source('python')} asks for python {spec.python!r}; name an image with "
            f"that Python (e.g. python:{spec.python}-slim) or change the python key")


class DockerBackend(Backend):
    name = "docker"
    needs_root = False  # root, or membership of the engine's group
    supports_snapshot = True
    supports_warm = True
    supports_images = True
    host_needs = HOST_NEEDS["docker"]
    options = {
        "docker_network": Option("a string", "the network to join when the spec has "
                                 "network = true (default: the engine's bridge)"),
        "docker_transfer": Option("a string", "how the project and pytest reach the "
                                  "container (default: bind for a local engine, else copy)",
                                  choices=("bind", "copy")),
        "exclude": EXCLUDE_OPTION,
        "pull": Option("a string", "when `image` is pulled from its registry: missing (only "
                       "when the engine lacks it, the default) or always (once per run, so a "
                       "moved tag is seen)", choices=("missing", "always")),
    }

    @classmethod
    def remove_external(cls, key: str, manifest: dict[str, Any]) -> str | None:
        """An image entry: remove the image from the engine it was made on."""
        return remove_images(key, manifest.get("engine"))

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.engine = Engine(self.name, self.new_client, self.engine_unavailable)
        self._info: dict[str, Any] = {}
        self._facts: EngineFacts | None = None

    # ------------------------------------------------------------------ engine
    def client(self) -> Any:
        return self.engine.client

    def new_client(self) -> Any:
        """A client of this backend's engine (a pool host's endpoint, else the docker CLI's)."""
        return make_client(self.endpoint)

    def engine_where(self) -> tuple[str, str]:
        """The engine's address and where it came from (for messages)."""
        url, origin, _ = engine_target(self.endpoint)
        return url, origin

    def engine_url(self) -> str | None:
        """What `cache gc` reaches this engine by to remove an image made here (None: the
        docker CLI's engine; a context's TLS settings are not recorded)."""
        url = self.engine_where()[0]
        return self.endpoint or (url if url.startswith("unix://") else None)

    def facts(self) -> EngineFacts:
        """What the engine is (asked once: one info and one version call)."""
        if self._facts is None:
            client = self.client()
            with self.engine.answering():
                if not self._info:
                    self._info = client.info()
                self._facts = engine_facts(client, self._info)
        return self._facts

    def engine_key(self) -> dict[str, str]:
        """Added to the cache keys of the images made here: the engine actually reached, so
        that two engines (dockerd, podman rootful or rootless, behind DOCKER_HOST or not)
        never share an image record; another engine's images are its own entries."""
        return {"engine": self.facts().identity}

    def describe_engine(self) -> str:
        """The engine as messages and the report show it."""
        url, origin = self.engine_where()
        return f"{self.facts().describe()} at {url} (from {origin})"

    def engine_unavailable(self, exc: BaseException) -> BackendUnavailable:
        """The engine does not answer: what is wrong and how to start it."""
        return engine_error(exc, self.endpoint)

    def create_options(self) -> dict[str, Any]:
        """What this engine needs beyond the SDK's defaults when creating a container."""
        return {}

    def check(self, spec: EnvSpec) -> None:
        client = self.client()
        with self.engine.answering():
            client.ping()
            if not self._info:
                self._info = client.info()
        first = self._facts is None
        facts = self.facts()
        if first and facts.podman and self.name != "podman":
            self.run.progress(f"{self.name}: the engine is {self.describe_engine()}: podman's "
                              "Docker-compatible service (images made there are its own; "
                              "backend = \"podman\" is the same code with podman's defaults)")
        if self._info.get("OSType", "linux") != "linux":
            raise BackendUnavailable(self.name, f"the {self.name} engine runs "
                                     f"{self._info.get('OSType')} containers",
                                     "switch the engine to Linux containers")
        self.reap_once()  # now: the first contact with the engine, before anything is built
        if not spec.from_image:
            from pytest_isolate.namespaces import check_rootfs_builder

            check_rootfs_builder(self.name)
        if spec.foreign and self.local_engine():
            from pytest_isolate.namespaces import check_foreign

            check_foreign(self.name, spec.machine)

    def local_engine(self) -> bool:
        base = str(getattr(self.client().api, "base_url", ""))
        return base.startswith("http+docker://localhost") or base.startswith("http+docker://localunix")

    def reap(self) -> list[str]:
        """Remove containers of runs whose process (on this host) is gone; returns their names."""
        removed: list[str] = []
        try:
            found = self.client().containers.list(all=True, filters={"label": f"{LABEL}.pid"})
        except Exception:
            return removed
        for container in found:
            if owner_gone(container.labels or {}):
                with contextlib.suppress(Exception):
                    container.remove(force=True, v=True)
                    removed.append(container.name)
        if removed:
            self.run.progress(f"{self.name}: removed {len(removed)} container(s) left by killed runs")
        return removed

    def labels(self, spec: EnvSpec) -> dict[str, str]:
        return {LABEL: "1", f"{LABEL}.run": self.run.run_id, f"{LABEL}.env": spec.name,
                **owner_labels()}

    def security_opt(self) -> list[str]:
        options = " ".join(str(o) for o in self._info.get("SecurityOptions") or [])
        return ["apparmor=unconfined"] if "apparmor" in options else []

    def network_mode(self, spec: EnvSpec) -> str:
        return network_mode_of(self.client(), spec)

    # ------------------------------------------------------------------ images
    def find_image(self, tag: str, key: str) -> Any:
        image = self.engine.image(tag)
        if image is not None:
            return image
        # the label alone is not ours: an image built FROM one of ours (a user's Dockerfile,
        # a pushed derivative) inherits it; only an image tagged in our repositories is
        with self.engine.calls(f"looking for an image labelled {LABEL}.key={key}"):
            labelled = self.client().images.list(filters={"label": f"{LABEL}.key={key}"})
            same = [image for image in labelled
                    if any("pytest-isolate/" in t and t.endswith(f":{key}") for t in image.tags)]
            if not same:
                return None
            repo, _, name = tag.rpartition(":")
            same[0].tag(repo, name)
        return self.engine.image(tag)

    def check_limits(self, spec: EnvSpec) -> None:
        """ProvisionError where the engine would silently run spec's containers without its
        limits: rootless podman on cgroup v1 has no cgroup of its own to limit them in, and
        only warns ("Resource limits are not supported and ignored on cgroups V1 rootless
        systems").  (On cgroup v2 the engine itself refuses what is not delegated to it.)"""
        limits = spec.limits()
        facts = self.facts()
        if not (limits.needs_cgroup and facts.rootless and facts.cgroup_version == "1"):
            return
        keys = [k for k in ("memory", "cpus", "pids") if getattr(limits, k) is not None]
        raise ProvisionError(
            f"{self.name}: environment {spec.name!r}: cannot apply the resource limits "
            f"({', '.join(keys)}): the engine is {self.describe_engine()} on cgroup v1, where a "
            "rootless engine has no cgroup to limit containers in and would run them "
            "unlimited; limits need a rootful engine (run as root, or point the backend at "
            "one) or cgroup v2 with the controllers delegated to the user, or remove the keys "
            f"{', '.join(keys)} from the environment")

    def provision(self, spec: EnvSpec) -> Entry:
        self.check_limits(spec)
        log = self.run.log_path(spec.name, "provision.log")
        spec = with_built_image(self.client(), spec, self.run.rootdir, self.run.progress, log)
        if spec.image is None:
            from pytest_isolate.images.rootfs import provision_rootfs

            rootfs = provision_rootfs(spec, self.run.cache, log, self.run.rootdir, self.run.progress)
            key = content_hash({"rootfs": rootfs.key, "docker_image_format": IMAGE_FORMAT,
                                **self.engine_key()})
            tag = f"{repository(spec.name)}:{key}"
            return self._image_entry(spec, key, tag, rootfs.path, log,
                                     lambda: self._import_rootfs(spec, rootfs, key, tag, log))
        base, pulled = self._base_image(spec, log)
        digest = docker_pull.pinned_digest(base, str(spec.image))
        pinned = {"reference": spec.image, "digest": digest}
        packaged: Entry | None = None
        if spec.packages:  # python3 may be one of them: checked on the image they make
            key = content_hash({"base": base.id, "packages": sorted(spec.packages),
                                "mirror": spec.mirror, "docker_image_format": IMAGE_FORMAT,
                                **self.engine_key()})
            tag = f"{repository(spec.name)}:{key}"
            with_base = base
            packaged = self._image_entry(
                spec, key, tag, log.parent, log,
                lambda: self._commit_packages(spec, with_base, key, tag, log), pinned)
            with self.engine.calls(f"finding image {tag}"):
                base = self.client().images.get(packaged.manifest["id"])
        pin = self._pin(spec, base, digest, log)
        check_python_version(spec, str(pin.manifest.get("python") or ""))
        if not spec.setup:
            return packaged or Entry("docker", pin.key, pin.path,
                                     {"image": base.id, "base": spec.image, **pinned},
                                     hit=pin.hit and pulled is None,
                                     build_seconds=(pulled or 0.0) + pin.build_seconds)
        key = content_hash({"base": base.id, "setup": list(spec.setup), "network": spec.network,
                            "docker_image_format": IMAGE_FORMAT, **self.engine_key()})
        tag = f"{repository(spec.name)}:{key}"
        return self._image_entry(spec, key, tag, log.parent, log,
                                 lambda: self._commit_setup(spec, base, key, tag, log), pinned)

    def _image_entry(self, spec: EnvSpec, key: str, tag: str, path: Path, log: Path,
                     build: Any, pinned: dict[str, Any] | None = None) -> Entry:
        """The image tagged tag (or labelled with key), made by build() when missing;
        pinned: the reference and digest of the user's image it derives from."""
        from filelock import FileLock

        image = self.find_image(tag, key)
        hit = image is not None
        started = time.monotonic()
        if image is None:
            with FileLock(str(self.run.cache.root / "locks" / f"docker-{key}.lock")):
                image = self.find_image(tag, key)
                hit = image is not None
                if image is None:
                    build()
                    image = self.find_image(tag, key)
                    if image is None:
                        raise ProvisionError(f"{self.name}: image {tag} is missing right after "
                                             "it was made", log_path=str(log))
        record = self._record_image(spec, key, tag, image, log)
        # the session holds the record (Cache.hold): `cache gc` keeps the image meanwhile
        return Entry("docker", key, record.path if record is not None else path,
                     {"image": tag, "id": image.id, "base": spec.image, **(pinned or {})},
                     hit=hit, build_seconds=0.0 if hit else time.monotonic() - started)

    def _record_image(self, spec: EnvSpec, key: str, tag: str, image: Any,
                      log: Path) -> Entry | None:
        """A cache entry of kind IMAGE_KIND for an image this backend made, so that
        `cache ls` shows it with its last use and `cache gc`/`rm` remove it from its engine
        (the images themselves live in the engine, not in the cache directory)."""
        def build(data: Path, log_path: Path) -> dict[str, Any]:
            data.mkdir(parents=True)
            engine = self.engine_url()
            (data / "image.json").write_text(json.dumps(
                {"tag": tag, "id": image.id, "engine": engine,
                 "engine_identity": self.facts().identity}))
            return {"image": tag, "engine": engine, "external_backend": self.name,
                    "external_size": int(image.attrs.get("Size") or 0)}

        try:
            return self.run.cache.get_or_build(IMAGE_KIND, key, build,
                                               {"env": spec.name, "image": tag}, log)
        except (IsolateError, OSError):  # bookkeeping only
            return None

    def _base_image(self, spec: EnvSpec, log: Path) -> tuple[Any, float | None]:
        return image_of(self.engine, spec, self.run.progress, log)

    def _pin(self, spec: EnvSpec, image: Any, digest: str, log: Path) -> Entry:
        """The cache's record of spec.image as this run uses it: its digest and id (a
        moved tag is another record, so another environment) and the python3 inside,
        checked once per image (ProvisionError when it has none)."""
        python = spec.option("python", "python3")
        key = content_hash({"reference": spec.image, "digest": digest, "id": image.id,
                            "python": python, "docker_image_format": IMAGE_FORMAT})

        def build(data: Path, log_path: Path) -> dict[str, Any]:
            version = self._check_python(spec, image, python)
            data.mkdir(parents=True)
            pin = {"reference": spec.image, "digest": digest, "id": image.id, "python": version}
            (data / "pin.json").write_text(json.dumps(pin))
            return pin

        return self.run.cache.get_or_build(PIN_KIND, key, build,
                                           {"env": spec.name, "image": spec.image}, log)

    def _check_python(self, spec: EnvSpec, image: Any, python: str) -> str:
        """The version of python in image, from a throwaway container; ProvisionError
        naming the image and the fix when it has none (or one too old for the agent, or one
        without ctypes)."""
        from pytest_isolate.agent.wire import MIN_PYTHON

        fix = (f"name an image that has python{'.'.join(map(str, MIN_PYTHON))} or newer as "
               f"{python!r} (e.g. python:3.12-slim, or a Debian or Alpine image built with it "
               "installed; for a Debian-based image, \"python3\" in its `packages`), or leave "
               "`image` unset to use the Debian image pytest-isolate builds")
        where = f"image {spec.image!r} (from {spec.source('image')})"
        code, out = self._probe_python(spec, image, python, where, fix)
        versions = [line for line in out.splitlines()
                    if re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", line)]
        if not versions:
            raise ProvisionError(f"{self.name}: {python} in {where} does not run (exit status "
                                 f"{code}): {out[-2000:]}; {fix}")
        version = versions[-1]
        if tuple(int(p) for p in version.split(".")[:2]) < MIN_PYTHON:
            raise ProvisionError(f"{self.name}: {where} has Python {version} as "
                                 f"{python!r}, too old for the agent; {fix}")
        if code != 0:  # it printed its version, then could not import ctypes
            raise ProvisionError(
                f"{self.name}: {python} in {where} (Python {version}) cannot import ctypes, "
                f"which the agent needs for its system calls ({out.splitlines()[-1]}); use a "
                "python3 built with ctypes (libffi), as Debian's, Alpine's and the python "
                "images' are")
        return version

    def _probe_python(self, spec: EnvSpec, image: Any, python: str, where: str,
                      fix: str) -> tuple[int, str]:
        """Exit status and output of python printing its version, then importing ctypes,
        in a throwaway container."""
        def refused(text: str, status: int | None) -> ProvisionError:
            # the engine refuses to start a container whose entrypoint is not there
            if "not found" in text or "no such file" in text.lower():
                return ProvisionError(f"{self.name}: {where} has no {python} (the agent that "
                                      f"runs tests inside needs one); {fix}")
            return ProvisionError(f"{self.name}: cannot run {python} in {where}: {text}")

        self.run.progress(f"{self.name}: checking for {python} in {spec.image}")
        probe = ["-c", "import sys;print('%d.%d.%d'%sys.version_info[:3],flush=True);"
                 "import ctypes"]
        container = self._create(spec, image.id, [], purpose="check", command=probe)
        try:
            with self.engine.calls(f"starting {python} in {where}", refused):
                container.start()
            with self.engine.calls(f"checking for {python} in {where}"):
                code = int(container.wait(timeout=START_TIMEOUT).get("StatusCode", -1))
                out = container.logs(stdout=True, stderr=True).decode(errors="replace").strip()
        finally:
            remove_container(container)
        return code, out

    def _import_rootfs(self, spec: EnvSpec, rootfs: Entry, key: str, tag: str, log: Path) -> None:
        """Make the image from the root filesystem: import (native) or load (foreign arch)."""
        import tempfile

        how = "load" if spec.foreign else "import"
        self.run.progress(f"{self.name}: making image {tag} from {rootfs.data} ({how})")
        labels = {f"{LABEL}.key": key, f"{LABEL}.rootfs": rootfs.key}
        started = time.monotonic()
        # named like a cache build directory, so `cache gc` removes what a killed run left
        with tempfile.TemporaryDirectory(prefix=f"docker-{key}.",
                                         dir=self.run.cache.root / "tmp") as tmp:
            extra = Path(tmp) / "extra"
            (extra / ".isolate" / "ws").mkdir(parents=True)
            os.chmod(extra / ".isolate", 0o755)
            try:
                if spec.foreign:
                    text = self._load(spec, rootfs.data, extra, Path(tmp), tag, labels)
                else:
                    text = self._import(rootfs.data, extra, tag, labels)
            except BaseException:
                with contextlib.suppress(Exception):  # never keep a half-made image
                    self.client().images.remove(tag, force=True)
                raise
        with open(log, "a") as f:
            f.write(f"{self.name} {how} of {rootfs.data} as {tag}: {time.monotonic() - started:.1f}s\n"
                    f"{text}\n")

    def _import(self, rootfs: Path, extra: Path, tag: str, labels: dict[str, str]) -> str:
        api = self.client().api
        label_text = " ".join(f'"{k}"="{v}"' for k, v in labels.items())
        changes = [*(f"ENV {k}={v}" for k, v in system_variables().items()),
                   f"LABEL {label_text}", 'CMD ["python3"]']
        stream = TarStream(rootfs, extra)
        # the client's timeout (60 s) would end the import of a large root filesystem while
        # the engine still unpacks it: none for this request
        timeout, api.timeout = api.timeout, None
        try:
            # the tag inside repository (the API allows it): podman's Docker-compatible API
            # ignores a separate tag parameter when importing, and would name the image :latest
            with self.engine.calls(f"importing {rootfs}"):
                text = str(api.import_image(src=iter(stream), repository=tag, changes=changes,
                                            stream_src=True))
        finally:
            api.timeout = timeout
            stream.finish()
        for line in text.splitlines():
            if line.strip().startswith("{") and json.loads(line).get("error"):
                raise ProvisionError(f"{self.name}: importing {rootfs} failed: "
                                     f"{json.loads(line)['error']}")
        return text

    def _load(self, spec: EnvSpec, rootfs: Path, extra: Path, tmp: Path, tag: str,
              labels: dict[str, str]) -> str:
        """docker load of a one-layer image archive whose config names the foreign architecture.

        (The engine's import ignores a platform on older engines and records its own.)
        """
        archive = write_image_archive(rootfs, extra, tmp, tag, spec.arch, labels)
        with self.engine.calls(f"loading the image of {rootfs}"), open(archive, "rb") as f:
            answers = list(self.client().api.load_image(f) or [])
        for answer in answers:
            if isinstance(answer, dict) and answer.get("error"):
                raise ProvisionError(f"{self.name}: loading the image of {rootfs} failed: "
                                     f"{answer['error']}")
        return "\n".join(json.dumps(a) for a in answers)

    def _commit_setup(self, spec: EnvSpec, base: Any, key: str, tag: str, log: Path) -> None:
        rootdir = str(self.run.rootdir)
        copy = self.transfer(spec) == "copy"
        binds = [] if copy else [[rootdir, rootdir, False]]
        container = self._create(spec, base.id, binds, purpose="setup")
        try:
            with self.engine.calls(f"running the setup commands of {spec.name!r}"):
                container.start()
                if copy:
                    self._copy_in(container, [(rootdir, rootdir)], spec)
                self._run_setup(container, spec, rootdir, log)
                repo, _, name = tag.rpartition(":")
                container.commit(repository=repo, tag=name,
                                 changes=[f'LABEL "{LABEL}.key"="{key}"'])
        finally:
            remove_container(container)

    def _commit_packages(self, spec: EnvSpec, base: Any, key: str, tag: str, log: Path) -> None:
        """The image with spec.packages installed (images/debs.py): the host's apt fetches
        them for the image's release and dpkg status, read from a container of it, and
        the image's dpkg installs them there, with no network and no python3 needed."""
        import io
        import tarfile
        import tempfile

        from pytest_isolate.images import debs

        what = f"image {spec.image!r} (from {spec.source('image')})"
        # the script is copied in with the packages: its plan is known once they are
        script = (f"/bin/sh {debs.DEBS_DIR}/install.sh; status=$?; rm -rf {debs.DEBS_DIR}; "
                  "exit $status")
        container = self._create(spec, base.id, [], purpose="packages",
                                 entrypoint=["/bin/sh", "-c", script], command=["packages"])
        try:
            status = self._read_file(container, debs.DPKG_STATUS, what)
            os_release = next((text for path in debs.OS_RELEASE
                               if (text := self._read_file(container, path, what))), None)
            codename = debs.debian_codename(
                None if os_release is None else os_release.decode(errors="replace"),
                status is not None, what, spec.packages, spec.mirror)
            assert status is not None
            with tempfile.TemporaryDirectory(prefix=f"docker-{key}.",
                                             dir=self.run.cache.root / "tmp") as tmp:
                found, install = debs.download(spec, codename, status, Path(tmp) / "debs",
                                               Path(tmp) / "work", log, self.run.progress, what)
                (Path(tmp) / "debs" / "install.sh").write_text(install)
                archive = io.BytesIO()
                with tarfile.open(fileobj=archive, mode="w") as tar:
                    for path in [*found, Path(tmp) / "debs" / "install.sh"]:
                        tar.add(path, arcname=f"{debs.DEBS_DIR.lstrip('/')}/{path.name}")
                with self.engine.calls(f"copying packages into a container of {what}"):
                    container.put_archive("/", archive.getvalue())
            self.run.progress(f"{self.name}: installing {len(found)} packages into {what}")
            with self.engine.calls(f"installing the packages of {spec.name!r} into {what}"):
                container.start()
                code = int(container.wait(timeout=PACKAGES_TIMEOUT).get("StatusCode", -1))
                out = container.logs(stdout=True, stderr=True)
            with open(log, "ab") as f:
                f.write(out)
            if code != 0:
                raise ProvisionError(f"{self.name}: installing the packages of {spec.name!r} "
                                     f"into {what} failed with exit status {code}",
                                     out.decode(errors="replace")[-4000:], str(log))
            repo, _, name = tag.rpartition(":")
            with self.engine.calls(f"committing the packages of {spec.name!r}"):
                container.commit(repository=repo, tag=name,
                                 changes=[f'LABEL "{LABEL}.key"="{key}"'])
        finally:
            remove_container(container)

    def _read_file(self, container: Any, path: str, what: str) -> bytes | None:
        """A regular file of a container (created or running); None when it has none."""
        import io
        import tarfile

        missing = ProvisionError(f"{path} is not in {what}")

        def explain(words: str, status: int | None) -> ProvisionError:
            return missing if status == 404 else ProvisionError(
                f"{self.name}: reading {path} of a container of {what} failed: {words}")

        try:
            with self.engine.calls(f"reading {path} of a container of {what}", explain):
                stream, _ = container.get_archive(path)
                data = b"".join(stream)
        except ProvisionError as exc:
            if exc is missing:
                return None
            raise
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next((m for m in tar if m.isfile()), None)
            handle = tar.extractfile(member) if member is not None else None
            return handle.read() if handle is not None else None

    def _run_setup(self, container: Any, spec: EnvSpec, rootdir: str, log: Path) -> None:
        """Each setup command in container, its output in the provision log; ProvisionError
        with the output's tail at the first that fails."""
        env = environment_variables(spec)
        with open(log, "ab") as f:
            for index, command in enumerate(spec.setup):
                label = f"setup command {index + 1} of {spec.name!r} ({command!r})"
                self.run.progress(f"{self.name}: {label}")
                f.write(f"$ {command}\n".encode())
                result = container.exec_run(["/bin/sh", "-c", command], environment=env,
                                            workdir=rootdir, demux=False)
                f.write(result.output or b"")
                f.flush()
                if result.exit_code != 0:
                    raise ProvisionError(f"{self.name}: {label} failed with exit status "
                                         f"{result.exit_code}", (result.output or b"")
                                         .decode(errors="replace")[-4000:], str(log))

    # ------------------------------------------------------------------ containers
    def _create(self, spec: EnvSpec, image: str, binds: list[list[Any]], purpose: str,
                command: list[str] | None = None, entrypoint: list[str] | None = None) -> Any:
        """A container of image; its main process is python3 (or entrypoint) running command
        (default: MAIN_PROCESS), as the entrypoint, so an image's own ENTRYPOINT does not
        wrap it."""
        docker = sdk()
        mounts = [docker.types.Mount(target=dst, source=src, type="bind", read_only=bool(ro))
                  for src, dst, ro in binds]
        name = f"pytest-isolate-{spec.name}-{purpose}-{uuid.uuid4().hex[:10]}"
        limits = spec.limits()
        resources: dict[str, Any] = {}
        if purpose == "run":  # setup commands build the image: the spec's limits are for tests
            if limits.memory is not None:
                resources.update(mem_limit=limits.memory, memswap_limit=limits.memory)
            if limits.pids is not None:
                resources["pids_limit"] = limits.pids
            if limits.cpus is not None:
                resources["nano_cpus"] = int(limits.cpus * 1e9)
                if self.local_engine():  # a remote engine's CPUs are not ours to count
                    cpus = host_cpus(limits.cpu_count() or 1)
                    resources["cpuset_cpus"] = cpu_list(cpus)
        with self.engine.calls(f"creating a container of {image}"):
            return self.client().containers.create(
                image, entrypoint=entrypoint or [spec.option("python", "python3")],
                command=command or ["-c", MAIN_PROCESS],
                name=re.sub(r"[^a-zA-Z0-9_.-]", "-", name), hostname=f"isolate-{spec.name}"[:63],
                labels=self.labels(spec), network_mode=self.network_mode(spec),
                cap_add=["SYS_ADMIN"], security_opt=self.security_opt() or None, mounts=mounts,
                platform=platform_of(spec), detach=True, stdin_open=False, tty=False,
                **resources, **self.create_options(),
            )

    def warm_ok(self, spec: EnvSpec) -> bool:
        """Not with a copied project (a remote engine): a later run would find it stale."""
        return self.supports_warm and self.transfer(spec) == "bind"

    def transfer(self, spec: EnvSpec) -> str:
        """How host paths reach a container: "bind" (local engine) or "copy" (remote engine)."""
        wanted = spec.option("docker_transfer")
        if wanted in ("bind", "copy"):
            return str(wanted)
        return "bind" if self.local_engine() else "copy"

    def _copy_in(self, container: Any, pairs: list[tuple[str, str]], spec: EnvSpec) -> None:
        import tempfile

        exclude = tuple(str(p) for p in (spec.option("exclude", ()) or ()))
        with tempfile.TemporaryFile(prefix="pytest-isolate-copy-") as archive:
            write_copy_archive(archive, pairs, str(self.run.rootdir), exclude)
            doing = f"copying {[src for src, _ in pairs]} into the container"
            with self.engine.calls(doing):
                copied = container.put_archive("/", archive)
            if not copied:
                raise ProvisionError(f"{self.name}: {doing} failed")

    def launch(self, stack: contextlib.ExitStack[bool | None], spec: EnvSpec,
               image: Entry) -> Launch:
        rootdir = str(self.run.rootdir)
        copy = self.transfer(spec) == "copy"
        # a remote engine cannot bind host paths: no shared bytecode cache there
        mounts = standard_mounts(self.run, spec, image, pycache=not copy)
        binds: list[list[Any]] = [[m.src, m.dst, m.readonly] for m in mounts]
        agent_log = self.run.log_path(spec.name, "agent.log")
        container_log = self.run.log_path(spec.name, "container.log")
        provision_log = self.run.log_path(spec.name, "provision.log")
        container = self._create(spec, image.manifest["image"], [] if copy else binds, purpose="run")
        stack.callback(remove_container, container)
        stack.callback(self._save_log, container, container_log)  # unwound first: before removal
        with self.engine.calls(f"starting container {container.name}"):
            container.start()
        readonly: list[str] = []
        if copy:
            self._copy_in(container, [(src, dst) for src, dst, _ in binds], spec)
            readonly = [dst for _, dst, ro in binds if ro]
        argv = agent_command(spec)
        argv[-1] = prelude(readonly) + argv[-1]
        with self.engine.calls(f"starting the agent in container {container.name}"):
            process = ExecAgent(self.client(), container.id, argv,
                                environment_variables(spec, pycache=not copy),
                                rootdir, agent_log, f"environment {spec.name!r}")
        logs = {"agent": agent_log, "container": container_log, "provision": provision_log}
        return Launch(process, logs, agent_settings(self.run, spec, mounts, lower="/"),
                      root=self.where_root_is)

    def where_root_is(self, hello: dict[str, Any]) -> str:
        """Where root inside lives, from the agent's uid map, and the engine that holds it."""
        uid_map = hello.get("uid_map") or []
        if len(uid_map) >= 2 and uid_map[0] == 0 and uid_map[1] != 0:
            return f"uid {uid_map[1]} of the engine's host (a user namespace of " \
                   f"{self.describe_engine()})"
        return f"the engine's root ({self.describe_engine()})"

    def _save_log(self, container: Any, path: Path) -> None:
        try:
            container.reload()
            state = container.attrs.get("State", {})
            out = container.logs(stdout=True, stderr=True, timestamps=True)
        except Exception as exc:
            state, out = {}, f"({self.name} logs unavailable: {exc})\n".encode()
        with open(path, "ab") as f:
            f.write(f"container {container.name} ({container.short_id}) image "
                    f"{container.attrs.get('Config', {}).get('Image')}\n".encode())
            f.write(out)
            if state:
                f.write((f"state: {state.get('Status')} exit code {state.get('ExitCode')} "
                         f"oom-killed {state.get('OOMKilled')} error {state.get('Error')!r}\n")
                        .encode())
