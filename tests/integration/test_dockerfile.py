"""``dockerfile = "PATH"``: an environment's image built by the real docker engine from a
Dockerfile in the project, run by the docker backend and exported for chroot; rebuilt only
when what the build reads changes (.dockerignore'd files do not count).

The Dockerfile starts FROM the Debian image the docker backend builds in this session (so
nothing is pulled and the build needs no network)."""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import remove_made_from, session_docker_image, session_run
from shared_support import output, run_pytest

pytestmark = pytest.mark.integration

TESTS = '''
import pathlib
import pytest

HERE = pathlib.Path(__file__).parent

@pytest.mark.isolate("built", "built_chroot")
def test_image_is_the_dockerfiles():
    assert pathlib.Path("/etc/marker").read_text() == (HERE / "ci" / "marker").read_text()
    assert pathlib.Path("/etc/greeting").read_text() == "hello from a build arg\\n"
    assert not pathlib.Path("/etc/ignored").exists()
'''

DOCKERFILE = """\
FROM {base}
ARG GREETING
COPY marker /etc/marker
RUN echo "$GREETING" > /etc/greeting
"""


def pyproject(marker_env: str = "") -> str:
    return textwrap.dedent("""\
        [tool.pytest-isolate.envs.built]
        backend = "docker"
        dockerfile = "ci/Dockerfile"
        build_args = {GREETING = "hello from a build arg"}

        [tool.pytest-isolate.envs.built_chroot]
        backend = "chroot"
        dockerfile = "ci/Dockerfile"
        build_args = {GREETING = "hello from a build arg"}
        """) + marker_env


@pytest.fixture(scope="module")
def base_image(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tag of the Debian image the docker backend builds (from the cached rootfs)."""
    return session_docker_image(pytestconfig, tmp_path_factory.mktemp("base"))


@pytest.fixture
def project(tmp_path: Path, base_image: str, pytestconfig: pytest.Config) -> Iterator[Path]:
    (tmp_path / "pyproject.toml").write_text(pyproject())
    (tmp_path / "test_built.py").write_text(TESTS)
    ci = tmp_path / "ci"
    ci.mkdir()
    (ci / "Dockerfile").write_text(DOCKERFILE.format(base=base_image))
    (ci / "marker").write_text("first\n")
    (ci / "ignored").write_text("not part of the context\n")
    (ci / ".dockerignore").write_text("ignored\n")
    yield tmp_path
    remove_builds(pytestconfig, "built", "built_chroot")


def remove_builds(config: pytest.Config, *envs: str) -> None:
    """Remove the images the Dockerfile environments envs built, and what the cache made
    of them (remove_made_from)."""
    import docker

    client = docker.from_env()
    built = [image for env in envs
             for image in client.images.list(filters={"label": f"pytest-isolate.build={env}"})]
    for image in built:
        client.images.remove(image.id, force=True)
    manager: Any = config.pluginmanager.get_plugin("isolate-manager")
    remove_made_from(manager.cache, {image.id for image in built})


def built_images(report: dict[str, Any]) -> dict[str, str]:
    return {name: str(env.get("image")) for name, env in report["environments"].items()}


def test_dockerfile_is_built_once_and_rebuilt_when_its_context_changes(
        project: Path, pytestconfig: pytest.Config) -> None:
    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    cache = str(manager.cache.root)

    def run(label: str) -> tuple[str, dict[str, str]]:
        result = run_pytest(project, cache, "-rA", f"--isolate-report={label}.json")
        assert "2 passed" in result.stdout, output(result)
        report = json.loads((project / f"{label}.json").read_text())
        return result.stdout + result.stderr, built_images(report)

    first, images = run("first")
    # one build for both environments (the same Dockerfile, context and arguments)
    assert first.count("image from") == 1 and "built" in first, first
    tag = images["built"]
    assert tag.startswith("pytest-isolate-build:") and images["built_chroot"] == tag, images
    # a second run and a change to an ignored file: the same image, no build
    (project / "ci" / "ignored").write_text("changed, but .dockerignore'd\n")
    again, images_again = run("again")
    assert "building" not in again and images_again["built"] == tag, again
    # a change to what the build reads: a new image, which the tests see
    (project / "ci" / "marker").write_text("second\n")
    third, images_third = run("third")
    assert third.count("image from") == 1, third
    assert images_third["built"] != tag, images_third


def test_bad_dockerfile_keys_are_usage_errors(project: Path, pytestconfig: pytest.Config) -> None:
    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    (project / "pyproject.toml").write_text(pyproject() + textwrap.dedent("""
        [tool.pytest-isolate.envs.both]
        backend = "docker"
        image = "debian:trixie"
        dockerfile = "ci/Dockerfile"
        """))
    result = run_pytest(project, str(manager.cache.root))
    assert result.returncode == 4, output(result)
    assert ("[tool.pytest-isolate.envs.both] key 'dockerfile': an environment has either "
            "'dockerfile' or 'image'") in output(result)


def test_failed_build_is_one_clear_error(project: Path, pytestconfig: pytest.Config) -> None:
    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    (project / "ci" / "Dockerfile").write_text(
        (project / "ci" / "Dockerfile").read_text() + "RUN exit 3\n")
    result = run_pytest(project, str(manager.cache.root), "-p", "no:randomly")
    text = output(result)
    assert result.returncode == 1, text
    assert "building the image of dockerfile 'ci/Dockerfile'" in text, text
    assert "returned a non-zero code: 3" in text, text


KERNEL_TESTS = '''
import platform
import pytest

@pytest.mark.isolate("kernelled")
def test_boots_the_images_kernel():
    assert platform.release() == open("/etc/kernel-release").read().strip()
'''


def test_an_image_with_its_own_kernel_boots_it(tmp_path: Path, base_image: str,
                                               pytestconfig: pytest.Config) -> None:
    """A VM of an image whose /boot has a kernel with its modules boots that kernel, not
    the Debian package's: the Dockerfile copies in the kernel of the cached qemu_vm root
    (the only one at hand without a network), and the VM's disk entry says where its
    kernel came from."""
    from pytest_isolate.backends.qemu import QemuBackend

    manager: Any = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    # its root filesystem, cached
    QemuBackend(session_run(pytestconfig, tmp_path)).provision(manager.specs["qemu_vm"])
    roots = [e.data for e in manager.cache.entries() if e.kind == "rootfs"
             and e.manifest.get("spec", {}).get("arch") == "amd64"
             and list((e.data / "boot").glob("vmlinuz-*"))]
    assert roots, "no cached amd64 root filesystem with a kernel"
    kernel = sorted((roots[0] / "boot").glob("vmlinuz-*"))[-1]
    release = kernel.name.removeprefix("vmlinuz-")
    ci = tmp_path / "ci"
    ci.mkdir()
    shutil.copyfile(kernel, ci / kernel.name)
    shutil.copytree(roots[0] / "usr/lib/modules" / release, ci / "modules", symlinks=True)
    (ci / "kernel-release").write_text(release + "\n")
    (ci / "Dockerfile").write_text(
        f"FROM {base_image}\nCOPY {kernel.name} /boot/{kernel.name}\n"
        f"COPY modules/ /usr/lib/modules/{release}/\nCOPY kernel-release /etc/kernel-release\n")
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""\
        [tool.pytest-isolate.envs.kernelled]
        backend = "qemu"
        dockerfile = "ci/Dockerfile"
        """))
    (tmp_path / "test_kernel.py").write_text(KERNEL_TESTS)
    started = time.time()
    try:
        result = run_pytest(tmp_path, str(manager.cache.root), "-rA")
        assert "1 passed" in result.stdout, output(result)
        disks = [e for e in manager.cache.entries() if e.kind == "vmdisk"
                 and e.manifest.get("created", 0) >= started]
        assert [e.manifest.get("kernel_from") for e in disks] == ["the image's /boot"], [
            e.manifest for e in disks]
    finally:  # the throwaway image's export, VM disk and saved state (~0.5 GB) go with it
        remove_builds(pytestconfig, "kernelled")
