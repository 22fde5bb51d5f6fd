"""Tests that run *inside* environments: the body and its fixtures execute there."""

import os
import platform
import sys

import pytest
from demo import describe, pack_native


@pytest.fixture
def machine():
    # runs inside the environment too
    return platform.machine()


@pytest.mark.isolate("chroot", "arm64-chroot")
def test_little_endian_64bit(machine):
    assert sys.byteorder == "little"
    assert len(pack_native(1)) == 8
    assert pack_native(1)[0] == 1
    assert machine in ("x86_64", "aarch64")
    print("inside:", describe())


@pytest.mark.isolate("arm64-chroot", "arm64_vm")  # qemu-user, and a whole emulated machine
def test_runs_on_arm64(machine):
    assert machine == "aarch64"


@pytest.mark.isolate("bookworm")
def test_previous_release_python():
    assert sys.version_info[:2] == (3, 11)


@pytest.mark.isolate("chroot")
def test_root_on_a_clean_system():
    assert os.getuid() == 0  # root inside, even when pytest runs unprivileged
    with open("/etc/demo.conf", "w") as f:  # allowed: the write is thrown away afterwards
        f.write("x")


@pytest.mark.isolate("chroot")
def test_previous_write_is_gone():
    assert not os.path.exists("/etc/demo.conf")
