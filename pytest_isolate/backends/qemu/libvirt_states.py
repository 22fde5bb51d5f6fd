"""Saved machine states for the libvirt driver (virDomainSave / virDomainRestoreFlags).

libvirt restores a saved domain only under the name and UUID it was saved with, and
runs one domain of a UUID at a time.  So a state is saved per *slot*: slot k's domain
has a name and UUID derived from the state's key and k, and concurrent runs (xdist
workers) each take a free slot with a file lock held for the machine's life.  A slot's
first start boots and saves it; later starts restore it, then hot-plug the run's disks
into free PCIe root ports, as the direct driver does.

Where states live: a local libvirt's in the cache (CacheStates; the saved XML names this
run's socket directory and console log, which a restore rewrites for the new instance --
paths only: libvirt checks the rest for ABI stability); a remote one's in its storage
pool, beside the uploaded images (PoolStates; nothing there names a path of this machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Protocol
from xml.sax.saxutils import escape, quoteattr

from filelock import FileLock, Timeout

from pytest_isolate.backends.qemu.machine import Disk
from pytest_isolate.backends.qemu.remote import RemotePool
from pytest_isolate.backends.qemu.states import STATE_FORMAT
from pytest_isolate.cache import Cache, Entry
from pytest_isolate.channel import AGENT_SOURCE
from pytest_isolate.spec import content_hash

#: Concurrent machines of one saved state on one libvirt (one saved file per slot).
MAX_SLOTS = 16
#: PCIe root ports declared beyond the ones libvirt fills with the boot's devices (root,
#: site, virtio-serial, network): the project and layer disks are hot-plugged into them.
SPARE_PORTS = 8
_NAMESPACE = uuid.UUID("6f1c7a52-3b0e-4c55-9a57-1d3c1e4b2a90")


def controller() -> str:
    """This machine, as a remote libvirt tells its runs apart from other machines': its
    machine-id (else its host name)."""
    try:
        ident = Path("/etc/machine-id").read_text().strip()
    except OSError:
        ident = ""
    return ident or socket.gethostname()


def state_fields(uri: str, vmdisk: str, site: Path, shape: str, versions: dict[str, str],
                 initrd: Path, pool: str | None = None) -> dict[str, Any]:
    """What a libvirt saved state depends on: the domain's XML (this instance's paths
    replaced by placeholders), the disk images, libvirt's and QEMU's versions, the initrd
    and the agent; on a remote libvirt, the pool that holds it and this machine, so that a
    slot's domain there is always this machine's (its lock is here: a domain of a slot
    this run holds is a killed run's, to destroy)."""
    return {"format": STATE_FORMAT, "driver": "libvirt", "uri": uri, "pool": pool,
            "controller": controller() if pool is not None else None, "vmdisk": vmdisk,
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
    """libvirt's version (the connection's daemon) and QEMU's, for a state's key."""
    return {"libvirt": str(conn.getLibVersion()), "qemu": qemu}


class StateStore(Protocol):
    """Where a libvirt's saved states are kept."""

    def find(self, key: str) -> str | None:
        """The path (on libvirt's machine) of the state saved under key, if there is one."""

    def restore_xml(self, saved: str) -> str:
        """The found state's saved XML, made this instance's."""

    def save(self, dom: Any, key: str, fields: dict[str, Any], log: Path) -> str:
        """Save the domain (virDomainSave: it stops) under key; what it took, in words."""

    def drop(self, key: str) -> None:
        """Remove the state saved under key (it could not be restored)."""


class CacheStates:
    """A local libvirt's saved states: cache entries (kind "vmstate"), which libvirtd
    saves straight into the entry's build directory."""

    def __init__(self, cache: Cache, tmp: Path, console: Path) -> None:
        self.cache = cache
        self.tmp = tmp
        self.console = console
        self.entry: Entry | None = None

    def find(self, key: str) -> str | None:
        self.entry = self.cache.lookup("vmstate", key)
        return None if self.entry is None else str(self.entry.data / "state")

    def restore_xml(self, saved: str) -> str:
        if self.entry is None:
            return saved
        return restore_xml(saved, self.entry.manifest, self.tmp, self.console)

    def save(self, dom: Any, key: str, fields: dict[str, Any], log: Path) -> str:
        def build(data: Path, log_path: Path) -> dict[str, Any]:
            data.mkdir(parents=True)
            started = time.monotonic()
            dom.save(str(data / "state"))
            # the paths a restore replaces (restore_xml)
            return {"state_seconds": round(time.monotonic() - started, 3),
                    "tmp": str(self.tmp), "console": str(self.console)}

        self.entry = entry = self.cache.get_or_build("vmstate", key, build, fields, log)
        return (f"{entry.manifest.get('size', 0) >> 20} MiB in "
                f"{entry.manifest.get('state_seconds', 0):.2f}s")

    def drop(self, key: str) -> None:
        entry = self.cache.lookup("vmstate", key)
        if entry is not None:
            with contextlib.suppress(OSError):
                self.cache.remove(entry)


class PoolStates:
    """A remote libvirt's saved states: files that libvirt saves into the storage pool
    the images are uploaded to, named by key, with a marker volume once complete
    (RemotePool.state_path)."""

    def __init__(self, pool: RemotePool) -> None:
        self.pool = pool

    def find(self, key: str) -> str | None:
        return self.pool.state_path(key)

    def restore_xml(self, saved: str) -> str:
        return saved

    def save(self, dom: Any, key: str, fields: dict[str, Any], log: Path) -> str:
        started = time.monotonic()
        self.pool.save_state(dom, key)
        return f"in {self.pool.pool.name()} of {self.pool.uri} in {time.monotonic() - started:.2f}s"

    def drop(self, key: str) -> None:
        self.pool.drop_state(key)
