"""Which kernel a VM boots (backends/qemu/machine.py guest_kernel), on directory trees
made here: an image's own kernel when its /boot has one with its modules, else the Debian
kernel package's root filesystem; neither is one error naming the tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_isolate.backends.qemu.machine import guest_kernel, kernel_spec
from pytest_isolate.errors import ProvisionError
from pytest_isolate.spec import EnvSpec


def kernel_tree(root: Path, version: str, modules: bool = True) -> Path:
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{version}").write_bytes(b"kernel")
    if modules:
        (root / "usr/lib/modules" / version).mkdir(parents=True)
        (root / "usr/lib/modules" / version / "modules.dep").write_text("")
    return root


IMAGE = EnvSpec(name="img", backend="qemu", arch="amd64", release="trixie",
                image="example/app:1")


def test_an_image_with_a_kernel_boots_its_own(tmp_path: Path) -> None:
    image = kernel_tree(tmp_path / "image", "6.1.0-img")
    tools = kernel_tree(tmp_path / "tools", "6.12.0-deb")
    kernel, source = guest_kernel(IMAGE, image, tools)
    assert (kernel.version, source) == ("6.1.0-img", "the image's /boot")
    assert kernel.image == image / "boot/vmlinuz-6.1.0-img"


def test_an_image_without_one_boots_the_debian_package(tmp_path: Path) -> None:
    # a kernel without its modules does not count: the initramfs needs the virtio ones
    image = kernel_tree(tmp_path / "image", "6.1.0-img", modules=False)
    tools = kernel_tree(tmp_path / "tools", "6.12.0-deb")
    kernel, source = guest_kernel(IMAGE, image, tools)
    assert (kernel.version, source) == ("6.12.0-deb", "Debian trixie's linux-image-cloud-amd64")


def test_no_kernel_anywhere_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "image").mkdir()
    (tmp_path / "tools").mkdir()
    with pytest.raises(ProvisionError, match=r"no kernel with modules in .*tools/boot"):
        guest_kernel(IMAGE, tmp_path / "image", tmp_path / "tools")


def test_images_of_an_architecture_share_one_kernel_root() -> None:
    """The kernel's root filesystem depends on the architecture, release and mirror only,
    and is the plain VM environment's (so it is usually cached already)."""
    from pytest_isolate.backends.qemu import vm_rootfs_spec

    other = EnvSpec(name="other", backend="qemu", arch="amd64", release="trixie",
                    dockerfile="Dockerfile", python="3.12")
    assert kernel_spec(IMAGE).rootfs_key() == kernel_spec(other).rootfs_key()
    plain = vm_rootfs_spec(EnvSpec(name="qemu_vm", backend="qemu", arch="amd64",
                                   release="trixie"))
    assert kernel_spec(IMAGE).rootfs_key() == plain.rootfs_key()
    arm = EnvSpec(name="arm", backend="qemu", arch="arm64", release="trixie", image="x:1")
    assert kernel_spec(arm).rootfs_key() != kernel_spec(IMAGE).rootfs_key()


def test_envs_says_which_kernel_an_image_vm_boots() -> None:
    """The qemu backend's line in `envs` (Backend.describe_image), from the image's pin
    record (cli.common.image_pins: its newest VM disk's kernel), else the rule."""
    from pytest_isolate.cli.envs import image_line_of_backend

    pin = {"digest": "sha256:x", "kernel": "6.12.0-deb, from Debian trixie's linux-image-cloud-amd64"}
    assert image_line_of_backend(IMAGE, pin) == (
        "kernel 6.12.0-deb, from Debian trixie's linux-image-cloud-amd64")
    assert image_line_of_backend(IMAGE, None) == (
        "kernel: the image's own when its /boot has one with its modules, else Debian "
        "trixie's linux-image-cloud-amd64 (known after the first run)")
    armhf = EnvSpec(name="a", backend="qemu", arch="armhf", image="x:1")
    assert "else Debian trixie's cloud kernel" in str(image_line_of_backend(armhf, None))
    assert image_line_of_backend(EnvSpec(name="c", backend="chroot", image="x:1"), pin) is None
    assert image_line_of_backend(EnvSpec(name="q", backend="qemu"), pin) is None
