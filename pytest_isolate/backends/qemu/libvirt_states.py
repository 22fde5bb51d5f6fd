"""Saved machine states for the libvirt driver (virDomainSave / virDomainRestoreFlags).

libvirt restores a saved domain only under the name and UUID it was saved with, and
runs one domain of a UUID at a time.  So a state is saved per *slot*: slot k's domain
has a name and UUID derived from the state's key and k, and concurrent runs (xdist
workers) each take a free slot with a file lock held for the machine's life.  A slot's
first start boots and saves it; later starts restore it, then hot-plug the run's disks
into free PCIe root ports, as the direct driver does.

The saved XML names this run's socket directory and console log; a restore rewrites
those paths for the new instance (paths only: libvirt checks the rest for ABI
stability).
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from filelock import FileLock, Timeout

from pytest_isolate.backends.qemu.machine import Disk
from pytest_isolate.backends.qemu.states import STATE_FORMAT
from pytest_isolate.channel import AGENT_SOURCE
from pytest_isolate.spec import content_hash

#: Concurrent machines of one saved state on one libvirt (one saved file per slot).
MAX_SLOTS = 16
#: PCIe root ports declared beyond the ones libvirt fills with the boot's devices (root,
#: site, virtio-serial, network): the project and layer disks are hot-plugged into them.
SPARE_PORTS = 8
_NAMESPACE = uuid.UUID("6f1c7a52-3b0e-4c55-9a57-1d3c1e4b2a90")


def state_fields(uri: str, vmdisk: str, site: Path, shape: str, versions: dict[str, str],
                 initrd: Path) -> dict[str, Any]:
    """What a libvirt saved state depends on: the domain's XML (this instance's paths
    replaced by placeholders), the disk images, libvirt's and QEMU's versions, the initrd
    and the agent."""
    return {"format": STATE_FORMAT, "driver": "libvirt", "uri": uri, "vmdisk": vmdisk,
            "site": str(site), "xml": shape, **versions,
            "initrd": hashlib.sha256(initrd.read_bytes()).hexdigest(),
            "agent": hashlib.sha256(AGENT_SOURCE).hexdigest()}


class Slot:
    """A slot of a saved state, held (file lock) while its machine runs."""

    def __init__(self, base: str, index: int, env: str, lock: FileLock) -> None:
        self.index = index
        self.lock = lock
        self.name = f"pytest-isolate-saved-{env}-{base[:8]}-{index}"
        self.uuid = str(uuid.uuid5(_NAMESPACE, f"{base}-{index}"))

    def release(self) -> None:
        self.lock.release()


def take_slot(locks: Path, fields: dict[str, Any], env: str) -> tuple[Slot | None, str]:
    """The first free slot of the state fields describe, and the state's key for it
    (None, "" when all MAX_SLOTS are taken: that machine boots without a state)."""
    base = content_hash(fields)
    for index in range(MAX_SLOTS):
        lock = FileLock(str(locks / f"libvirt-slot-{base}-{index}.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            continue
        return Slot(base, index, env, lock), content_hash({**fields, "slot": index})
    return None, ""


def slot_machine(uri: str, env: str, slot: Slot) -> str:
    """What `cache gc` keeps one newest state of (states.saved_state_group)."""
    return f"libvirt {uri} {env} slot {slot.index}"


def restore_xml(saved: str, manifest: dict[str, Any], tmp: Path, console: Path) -> str:
    """The saved domain's XML with this instance's socket directory and console log."""
    for old, new in ((manifest.get("console"), str(console)), (manifest.get("tmp"), str(tmp))):
        if isinstance(old, str) and old:
            saved = saved.replace(escape(old), escape(new))
    return saved


def disk_xml(disk: Disk, dev: str) -> str:
    """A read-only virtio disk to hot-plug (libvirt picks a free root port)."""
    return (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file={quoteattr(str(disk.path))}/><target dev='{dev}' bus='virtio'/>"
            f"<readonly/><serial>{escape(disk.serial)}</serial></disk>")


def spare_ports() -> str:
    """The PCIe root complex and root ports left free for hot-plug."""
    return ("<controller type='pci' index='0' model='pcie-root'/>"
            + "<controller type='pci' model='pcie-root-port'/>" * SPARE_PORTS)


def versions(conn: Any, qemu: str) -> dict[str, str]:
    return {"libvirt": str(conn.getLibVersion()), "qemu": qemu}
