"""Saved machine states (cache kind "vmstate"): their key, saving, restoring, and which
machine a state is of (so that `cache gc` keeps only the newest)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from pytest_isolate.agent.wire import message
from pytest_isolate.backends.base import SITE
from pytest_isolate.backends.qemu.machine import HANDSHAKE_TIMEOUT, Marks, QemuBase, Vm, VmFiles
from pytest_isolate.backends.qemu.qmp import QmpError
from pytest_isolate.cache import Entry
from pytest_isolate.channel import AGENT_SOURCE, Connection, log_tail
from pytest_isolate.errors import IsolateError
from pytest_isolate.spec import EnvSpec, content_hash

STATE_FORMAT = 3  # 3: the agent has imported pytest (backend.py)
#: Seconds to save or restore a machine state.
STATE_TIMEOUT = 60.0
#: A restored agent must answer this fast, else the state is dropped and the VM booted.
RESTORE_HELLO_TIMEOUT = 15.0
#: Seconds the agent of a machine to be saved may take to import pytest (TCG is slow).
PRELOAD_TIMEOUT = 300.0


def settle_agent(conn: Connection, marks: Marks, hello_timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Bring a booted machine's agent where a saved state holds it: running and idle, with
    pytest imported from the site disk (part of the state's key), before anything
    run-specific (settings, project, clock) reaches it.  A restored agent then starts
    pytest without importing it under TCG again."""
    conn.bootstrap()
    conn.call(0, message("hello"), timeout=hello_timeout)
    marks("agent started")
    conn.call(0, message("configure", settings={"site": SITE}), timeout=HANDSHAKE_TIMEOUT)
    conn.call(0, message("preload"), timeout=PRELOAD_TIMEOUT)
    marks("pytest imported")


def saved_state_group(kind: str, manifest: dict[str, Any]) -> str | None:
    """The machine a saved state (cache kind "vmstate") is of: the environment's name and
    QEMU's binary.  A newer state of the same machine -- after a new agent, another
    initramfs or site image, other variables baked in at boot -- replaces an older one,
    so `cache gc` keeps only the newest (QemuBackend.cache_group); None for anything
    else."""
    spec = manifest.get("spec")
    if kind != "vmstate" or not isinstance(spec, dict):
        return None
    if isinstance(spec.get("machine"), str):  # the libvirt driver's (libvirt_states.py)
        return str(spec["machine"])
    argv = spec.get("argv")
    if not isinstance(argv, list) or "-name" not in argv or argv.index("-name") + 1 >= len(argv):
        return None
    return f"{argv[0]} {argv[argv.index('-name') + 1]}"


class SavedStates(QemuBase):
    """QemuBackend's saved states: the first boot saves the machine, later starts restore it."""

    # -------------------------------------------------------------- snapshots
    def _state_key(self, image: Entry, files: VmFiles, argv: list[str], initrd: Path, tmp: Path,
                   console_log: Path) -> tuple[str, dict[str, Any]]:
        """What a saved machine state depends on: everything on QEMU's command line."""
        shape = [a.replace(str(console_log), "@CONSOLE@").replace(str(tmp), "@TMP@")
                 .replace(self.run.run_id, "@RUN@") for a in argv]
        fields: dict[str, Any] = {
            "format": STATE_FORMAT, "vmdisk": image.key, "site": str(files.site),
            "argv": shape, "qemu": self._version(argv[0]),
            "initrd": hashlib.sha256(initrd.read_bytes()).hexdigest(),
            "agent": hashlib.sha256(AGENT_SOURCE).hexdigest(),
        }
        return content_hash(fields), fields

    def _save_state(self, spec: EnvSpec, vm: Vm, key: str, fields: dict[str, Any],
                    qemu_log: Path) -> None:
        """Save the machine (guest waiting for the agent's source) into the cache."""

        def build(data: Path, log_path: Path) -> dict[str, Any]:
            data.mkdir(parents=True)
            started = time.monotonic()
            with open(data / "state", "wb") as f:
                vm.qmp.command_with_fd("getfd", f.fileno(), fdname="isolate-state")
                try:
                    vm.qmp.command("migrate", uri="fd:isolate-state")
                    self._wait_migration(vm, "query-migrate", STATE_TIMEOUT)
                finally:
                    status = vm.qmp.command("query-status")
                    if status.get("status") != "running":
                        vm.qmp.command("cont")
                f.flush()
                os.fsync(f.fileno())
            return {"state_seconds": round(time.monotonic() - started, 3)}

        try:
            entry = self.run.cache.get_or_build("vmstate", key, build, fields, qemu_log)
        except (IsolateError, OSError) as exc:
            self.run.progress(f"environment {spec.name!r}: saving the VM state failed: {exc}")
            return
        if not entry.hit:
            self.run.progress(f"saved the state of {spec.name!r} "
                              f"({entry.manifest.get('size', 0) >> 20} MiB) in "
                              f"{entry.build_seconds:.2f}s")

    def _wait_migration(self, vm: Vm, query: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = vm.qmp.command(query)
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', '')}")
            if vm.proc.poll() is not None:
                raise QmpError(f"QEMU exited during migration (status {vm.proc.returncode})")
            if time.monotonic() > deadline:
                raise QmpError(f"migration did not complete in {timeout:.0f}s")
            time.sleep(0.01)

    def _restore(self, argv: list[str], tmp: Path, qemu_log: Path, state: Entry,
                 accel: str) -> Vm:
        vm = self._launch([*argv, "-incoming", "defer"], tmp, qemu_log,
                          f"restore {state.data / 'state'}, accelerator {accel}")
        try:
            with open(state.data / "state", "rb") as f:
                vm.qmp.command_with_fd("getfd", f.fileno(), fdname="isolate-state")
            vm.qmp.command("migrate-incoming", uri="fd:isolate-state")
            deadline = time.monotonic() + STATE_TIMEOUT
            while True:
                status = vm.qmp.command("query-status").get("status")
                if status == "running":
                    return vm
                if status in ("paused", "postmigrate", "prelaunch"):
                    # incoming finished but autostart did not happen
                    info = vm.qmp.command("query-migrate")
                    if info.get("status") == "completed":
                        vm.qmp.command("cont")
                        continue
                if vm.proc.poll() is not None:
                    raise QmpError(f"QEMU exited while restoring (status {vm.proc.returncode}): "
                                   f"{log_tail(qemu_log, 3)}")
                if time.monotonic() > deadline:
                    raise QmpError(f"restoring did not finish in {STATE_TIMEOUT:.0f}s")
                time.sleep(0.01)
        except BaseException:
            vm.kill()
            raise
