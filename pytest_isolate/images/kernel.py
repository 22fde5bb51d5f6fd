"""Guest kernels for the VM backend, and which accelerator can run them.

The kernel comes from the Debian release itself: the VM's root filesystem is
built with the cloud kernel package added (``linux-image-cloud-<arch>``), so
it is cached with the root filesystem and matches its modules.  Its
``/boot/vmlinuz-*`` boots with ``qemu -kernel`` (on arm64 it is an
uncompressed Image) and ``/lib/modules/<version>`` gives the virtio modules
the initramfs loads.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
import threading
import time
from pathlib import Path

#: Debian architecture -> (kernel package, qemu system binary, machine arguments, console).
ARCHES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "amd64": ("linux-image-cloud-amd64", "qemu-system-x86_64",
              ("-M", "q35"), "ttyS0"),
    "arm64": ("linux-image-cloud-arm64", "qemu-system-aarch64",
              ("-M", "virt"), "ttyAMA0"),
}
#: Debian package of each qemu system binary (for error messages).
QEMU_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
}
#: TCG CPU models: on arm64, plain "max" emulates pointer authentication 4x slower.
TCG_CPUS = {"amd64": "max", "arm64": "max,pauth-impdef=on"}
HOST_MACHINES = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    version: str
    image: Path
    modules: Path


def _version_key(version: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def find_kernel(rootfs: Path) -> GuestKernel:
    """The newest kernel in rootfs/boot that has its modules in rootfs/lib/modules."""
    found = []
    for image in (rootfs / "boot").glob("vmlinuz-*"):
        version = image.name[len("vmlinuz-"):]
        for lib in ("usr/lib/modules", "lib/modules"):
            modules = rootfs / lib / version
            if (modules / "modules.dep").exists():
                found.append(GuestKernel(version, image, modules))
                break
    if not found:
        raise LookupError(f"no kernel with modules in {rootfs}/boot (is the cloud kernel package "
                          "in the environment's packages?)")
    return max(found, key=lambda k: _version_key(k.version))


def host_cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


_kvm_lock = threading.Lock()
_kvm_results: dict[str, tuple[bool, str]] = {}


def kvm_candidate(arch: str) -> tuple[bool, str]:
    """Whether KVM is worth probing for a guest of arch: same machine, /dev/kvm usable."""
    if HOST_MACHINES.get(platform.machine()) != arch:
        return False, f"the host is {platform.machine()}, the guest {arch}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    if arch == "amd64" and not host_cpu_flags() & {"vmx", "svm"}:
        return False, "the CPU flags show no vmx/svm (a paravirtual /dev/kvm cannot run stock guests)"
    return True, "candidate"


def probe_kvm(arch: str, argv: list[str], marker: str, timeout: float = 8.0) -> tuple[bool, str]:
    """Boot argv (a probe boot that prints marker and powers off) with KVM, bounded in time.

    The result is remembered for the process: one probe per architecture.
    """
    with _kvm_lock:
        if arch in _kvm_results:
            return _kvm_results[arch]
        ok, why = kvm_candidate(arch)
        if ok:
            ok, why = _run_probe(argv, marker, timeout)
        _kvm_results[arch] = (ok, why)
        return ok, why


def _run_probe(argv: list[str], marker: str, timeout: float) -> tuple[bool, str]:
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return False, f"cannot run {argv[0]}: {exc}"
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return False, f"a KVM guest did not finish booting in {timeout:.0f}s"
    text = out.decode(errors="replace")
    if marker in text:
        return True, f"a KVM guest booted in {time.monotonic() - started:.1f}s"
    return False, "a KVM guest failed to boot: " + " | ".join(text.strip().splitlines()[-3:])
