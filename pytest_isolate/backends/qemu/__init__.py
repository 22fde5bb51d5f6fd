"""qemu: a whole virtual machine per environment, driven directly through QEMU and QMP.

Boot chain (no systemd, no udev, no bootloader)::

    qemu -kernel vmlinuz -initrd (cached initramfs + per-instance config)
      /init (busybox): load the virtio modules, mount the root disk read-only
      under a tmpfs overlay, mount the shipped-packages disk read-only,
      switch_root, exec ``python3 -u -c BOOTSTRAP`` on a virtio-serial port

The kernel is Debian's cloud kernel, installed into the environment's root
filesystem (so it is cached with it and matches its modules).  The root
filesystem becomes a cached raw ext4 image attached read-only (the guest
cannot write it; its writes go to a tmpfs, and per-test state is the agent's
overlay business as in every backend).  The shipped pytest packages are a
second cached ext4 image.  The project tree (images/tree.py decides which
files: git's view of the checkout, minus caches and the ``exclude`` option)
becomes a cached read-only ext4 image keyed by its manifest, and the
dependency layer's venv and project layer become cached ext4 images too; all
are hot-plugged (QMP ``blockdev-add`` + ``device_add`` into PCIe root ports
kept free for them) once the machine runs, and mounted read-only at their
paths by the agent (the same step sets the guest clock).  Nothing of the
project is held in guest memory, and an unchanged tree reuses its image.
The host talks to the agent through
a unix socket that QEMU connects to the virtio-serial port; QMP (another unix
socket) is used to wait for the port to open, to stop the machine and to
save/restore its state.

Hardware acceleration is used only after a bounded probe boot shows it works
(a paravirtual /dev/kvm can hang stock guests); otherwise TCG.  A foreign
architecture (arm64 on x86_64) always runs under TCG.

Saved states: the first boot of an environment saves the machine (QMP migrate
to a file descriptor, into the cache as kind "vmstate") once the agent runs
and before anything run-specific reached it; later starts restore it with
``-incoming`` and go straight to the handshake.  A state that does not restore
or whose agent does not answer is dropped and the machine booted.  The
project and layer disks are added after the restore, so one state serves
every version of the project.  Options:
``vm_snapshot = false`` turns this off; ``vm_driver = "libvirt"`` starts a
transient libvirt domain instead (no saved states; the disks are in its
definition); ``accel``, ``cpu``, ``memory``, ``cpus``, ``boot_timeout``,
``exclude`` (gitignore-style patterns kept off the project disk),
``project_max_mib``.

A guest that dies names its cause when the console shows one (a kernel panic,
out of memory, a failed /init) in the error, not only "the agent's stream
ended".
"""

from __future__ import annotations

from pytest_isolate.backends.qemu.backend import QemuBackend, vm_rootfs_spec
from pytest_isolate.backends.qemu.states import saved_state_group
from pytest_isolate.backends.qemu.transport import guest_failure

__all__ = ["QemuBackend", "guest_failure", "saved_state_group", "vm_rootfs_spec"]
