"""A tiny initramfs for the VM backend, written in Python (cpio "newc" format).

It holds a static busybox, the kernel modules the guest needs to reach its
disks and its virtio-serial port, and an ``/init`` shell script that

1. loads the modules (in dependency order, from the kernel's ``modules.dep``),
2. mounts the root disk read-only at ``/lower``, a tmpfs upper and an overlay of
   the two as the new root -- the root disk is never written,
3. binds the pristine root at ``/.isolate/lower``, creates ``/.isolate/ws``,
   mounts the shipped-packages disk at ``/.isolate/site`` (read-only) and copies its
   busybox to ``/.isolate/bin`` (an image's root may have none),
4. ``switch_root``s into the new root and execs the agent's bootstrap with its
   stdin/stdout on the virtio-serial port named ``isolate.agent``.

No systemd, no udev: under TCG they would cost many seconds.  What differs
per instance (the hostname, the agent command, environment variables) is
a second, uncompressed cpio archive appended to the cached one -- the kernel
unpacks concatenated archives in order.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shlex
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Bump when the layout or /init changes, so cached initramfs images are rebuilt.
INITRAMFS_FORMAT = 7
#: The virtio-serial port the agent talks on.
PORT_NAME = "isolate.agent"
#: Serial numbers of the virtio disks, which is how /init tells them apart.
ROOT_SERIAL = "isolate-root"
SITE_SERIAL = "isolate-site"
#: Where /init puts its static busybox in the new root: an image's root filesystem may have
#: none (or only a dynamic one), and the agent's first commands and env(1) need one.
GUEST_BUSYBOX = "/.isolate/bin/busybox"
#: Printed by /init on the console once the agent is about to start (boot progress marker).
READY_MARK = "pytest-isolate: starting agent"
#: Printed by /init in probe mode (kernel command line ``isolate.probe``) before powering off.
PROBE_MARK = "pytest-isolate: probe ok"

#: Modules the guest needs, by name; their dependencies are added from modules.dep.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "overlay")
#: Loaded only when the environment asks for a network (QEMU user-mode networking).
NETWORK_MODULES = ("virtio_net",)
BUSYBOX_APPLETS = ("sh", "mount", "umount", "insmod", "mkdir", "cat", "echo", "sleep",
                   "switch_root", "poweroff", "chmod", "hostname", "env", "ifconfig", "route", "ls",
                   "dmesg")

INIT_SCRIPT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "pytest-isolate init: FAILED: $*" >/dev/console
    poweroff -f
    sleep 60
}
. /isolate/config.sh
modules=$(cat /modules.list)
[ "$ISOLATE_NETWORK" = 1 ] && modules="$modules $(cat /modules-net.list)"
for m in $modules; do
    insmod "/modules/$m" || fail "cannot load kernel module $m"
done
disk() {
    # /dev/vdX whose virtio serial number is $1 (waits up to ~5 s for it to appear)
    n=0
    while [ $n -lt 100 ]; do
        for b in /sys/block/vd*; do
            if [ -e "$b/serial" ] && [ "$(cat "$b/serial")" = "$1" ]; then
                echo "/dev/${b##*/}"
                return 0
            fi
        done
        n=$((n + 1))
        sleep 0.05
    done
    return 1
}
root=$(disk @ROOT@) || fail "no root disk (serial @ROOT@)"
mkdir -p /lower /rw /newroot
mount -t ext4 -o ro,noload "$root" /lower || fail "cannot mount the root disk $root"
mount -t tmpfs -o mode=755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the root overlay"
mkdir -p /newroot/.isolate/lower /newroot/.isolate/ws /newroot/.isolate/site /newroot/.isolate/bin
cat /bin/busybox >/newroot@BUSYBOX@ && chmod 755 /newroot@BUSYBOX@ || fail "cannot copy busybox"
mount -o bind /lower /newroot/.isolate/lower || fail "cannot bind the lower root"
if site=$(disk @SITE@); then
    mount -t ext4 -o ro,noload "$site" /newroot/.isolate/site || fail "cannot mount $site"
fi
mkdir -p /newroot/tmp /newroot/proc /newroot/sys /newroot/dev /newroot/run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /newroot/run
mkdir -p /dev/pts /dev/shm
mount -t devpts -o mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
hostname "$ISOLATE_HOSTNAME"
ifconfig lo 127.0.0.1 up 2>/dev/null
if [ "$ISOLATE_NETWORK" = 1 ]; then
    # QEMU user-mode networking: fixed addresses, no DHCP client needed
    ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up || fail "no network interface"
    route add default gw 10.0.2.2
    rm -f /newroot/etc/resolv.conf
    echo "nameserver 10.0.2.3" >/newroot/etc/resolv.conf
fi
case " $(cat /proc/cmdline) " in
    *" isolate.probe "*)
        echo "@PROBE@" >/dev/console
        poweroff -f
        sleep 60;;
esac
port=
for p in /sys/class/virtio-ports/*; do
    if [ "$(cat "$p/name" 2>/dev/null)" = "@PORT@" ]; then port="/dev/${p##*/}"; fi
done
[ -n "$port" ] || fail "no virtio-serial port named @PORT@"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
echo "@READY@ on $port" >/dev/console
eval "set -- $ISOLATE_ENV switch_root /newroot $ISOLATE_AGENT"
exec env -i "$@" <>"/newroot$port" >&0 2>/newroot/dev/console
""".replace("@ROOT@", ROOT_SERIAL).replace("@SITE@", SITE_SERIAL).replace("@PORT@", PORT_NAME).replace(
    "@READY@", READY_MARK).replace("@BUSYBOX@", GUEST_BUSYBOX).replace("@PROBE@", PROBE_MARK)


class CpioWriter:
    """Writes a cpio archive in the "newc" (SVR4, no CRC) format the kernel unpacks."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.parts.append(header + encoded)
        self.parts.append(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.parts.append(data)
        self.parts.append(b"\0" * (-len(data) % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = CpioWriter()
        trailer.ino = 0
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self.parts) + b"".join(trailer.parts)


def module_order(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Relative paths of the wanted modules and their dependencies, dependencies first.

    Modules built into the kernel (listed in modules.builtin) are skipped; a
    wanted module that is neither a module nor built in raises LookupError.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    builtin = set()
    builtin_file = modules_dir / "modules.builtin"
    if builtin_file.exists():
        builtin = {_module_name(p) for p in builtin_file.read_text().split()}
    order: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in order or path in stack:
            return
        for dep in deps.get(path, []):
            visit(dep, (*stack, path))
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key], ())
        elif key not in builtin:
            raise LookupError(f"kernel module {name!r} is neither built in nor in {modules_dir}")
    return order


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".xz", ".gz", ".zst"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base.removesuffix(".ko").replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise LookupError(f"{path}: zstd-compressed modules are not supported")
    return data


def build_initramfs(busybox: Path, modules_dir: Path, dest: Path,
                    wanted: Sequence[str] = WANTED_MODULES, compress: bool = False) -> list[str]:
    """Write the base initramfs to dest; returns the module load order."""
    cpio = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "modules", "isolate"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    order = module_order(modules_dir, wanted)
    net = [m for m in module_order(modules_dir, NETWORK_MODULES) if m not in order]
    names: list[str] = []
    for group, listing in ((order, "modules.list"), (net, "modules-net.list")):
        group_names = []
        for rel in group:
            name = _module_name(rel) + ".ko"
            cpio.file(f"modules/{name}", _module_bytes(modules_dir / rel))
            group_names.append(name)
        cpio.file(listing, ("\n".join(group_names) + "\n").encode())
        names += group_names
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    data = cpio.getvalue()
    if compress:
        data = gzip.compress(data, compresslevel=6)
    dest.write_bytes(data)
    return names


def instance_archive(hostname: str, agent_argv: Sequence[str], env: dict[str, str],
                     network: bool = False) -> bytes:
    """The per-instance cpio appended to the cached one: /isolate/config.sh."""
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    lines = [
        f"ISOLATE_HOSTNAME={shlex.quote(hostname)}",
        f"ISOLATE_NETWORK={int(network)}",
        # strings of shell words, split by /init with eval "set -- ..."
        f"ISOLATE_ENV={shlex.quote(assignments)}",
        f"ISOLATE_AGENT={shlex.quote(shlex.join(agent_argv))}",
    ]
    cpio = CpioWriter()
    cpio.ino = 100000
    cpio.directory("isolate")
    cpio.file("isolate/config.sh", ("\n".join(lines) + "\n").encode(), 0o644)
    return cpio.getvalue()
