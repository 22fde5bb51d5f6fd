"""The libvirt driver's saved states (backends/qemu/libvirt_states.py) and the reaper of
machines whose run is gone (reaping.py), on files and processes made here: slots taken
by concurrent holders, the restored XML made this instance's, which machine `cache gc`
keeps one state of, and a QEMU-named process whose socket directory's owner is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pytest_isolate.backends.qemu.libvirt_states import (
    MAX_SLOTS,
    restore_xml,
    slot_machine,
    state_fields,
    take_slot,
)
from pytest_isolate.backends.qemu.reaping import TMP_PREFIX, qemu_processes_of_gone_dirs
from pytest_isolate.backends.qemu.states import saved_state_group
from pytest_isolate.ownership import Owner, process_start_time


def fields(tmp_path: Path, shape: str = "<domain/>") -> dict[str, object]:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd")
    return state_fields("qemu:///system", "vmdisk-key", tmp_path / "site.img", shape,
                        {"libvirt": "9000000", "qemu": "7.2.0"}, initrd)


def test_concurrent_holders_take_distinct_slots_each_with_its_own_name_and_key(
        tmp_path: Path) -> None:
    described = fields(tmp_path)
    first, key0 = take_slot(tmp_path, described, "vm")
    second, key1 = take_slot(tmp_path, described, "vm")
    assert first is not None and second is not None
    assert (first.index, second.index) == (0, 1)
    assert first.name != second.name and first.uuid != second.uuid and key0 != key1
    assert first.name.startswith("pytest-isolate-saved-vm-") and first.name.endswith("-0")
    first.release()
    again, key_again = take_slot(tmp_path, described, "vm")  # a freed slot is taken first
    assert again is not None and again.index == 0 and key_again == key0
    assert again.uuid == first.uuid  # the same name and UUID: what libvirt restores under
    # another machine shape is another state, with slots of its own
    other, key_other = take_slot(tmp_path, fields(tmp_path, "<domain>2</domain>"), "vm")
    assert other is not None and other.index == 0 and key_other != key0
    for slot in (second, again, other):
        slot.release()


def test_every_slot_taken_means_no_state(tmp_path: Path) -> None:
    described = fields(tmp_path)
    held = [take_slot(tmp_path, described, "vm")[0] for _ in range(MAX_SLOTS)]
    assert all(slot is not None for slot in held)
    assert take_slot(tmp_path, described, "vm") == (None, "")
    for slot in held:
        assert slot is not None
        slot.release()


def test_a_restored_domain_gets_this_instances_socket_directory_and_console(
        tmp_path: Path) -> None:
    saved = ("<domain><os><initrd>/tmp/pytest-isolate-vm-old/initrd.img</initrd></os>"
             "<serial type='file'><source path='/cache/runs/1/logs/vm/console.log'/></serial>"
             "<channel type='unix'><source mode='bind' path='/tmp/pytest-isolate-vm-old/agent.sock'/>"
             "</channel><disk><source file='/cache/vmdisk/k/data/root.img'/></disk></domain>")
    manifest = {"tmp": "/tmp/pytest-isolate-vm-old",
                "console": "/cache/runs/1/logs/vm/console.log"}
    xml = restore_xml(saved, manifest, Path("/tmp/pytest-isolate-vm-new"),
                      Path("/cache/runs/2/logs/vm/console.log"))
    assert "pytest-isolate-vm-old" not in xml and "runs/1" not in xml
    assert "<initrd>/tmp/pytest-isolate-vm-new/initrd.img</initrd>" in xml
    assert "path='/tmp/pytest-isolate-vm-new/agent.sock'" in xml
    assert "path='/cache/runs/2/logs/vm/console.log'" in xml
    assert "/cache/vmdisk/k/data/root.img" in xml  # the cached images stay where they are


def test_cache_gc_keeps_one_state_per_slot_of_an_environment(tmp_path: Path) -> None:
    described = fields(tmp_path)
    slot, _ = take_slot(tmp_path, described, "vm")
    assert slot is not None
    machine = slot_machine("qemu:///system", "vm", slot)
    group = saved_state_group("vmstate", {"spec": {**described, "machine": machine}})
    assert group == "libvirt qemu:///system vm slot 0"
    # a newer state of the same slot (another agent, say) is in the same group
    newer = {**described, "agent": "another", "machine": machine}
    assert saved_state_group("vmstate", {"spec": newer}) == group
    slot.release()


def fake_qemu(tmp_path: Path, socket_dir: Path) -> subprocess.Popen[bytes]:
    """A process whose command line looks like a QEMU's naming socket_dir."""
    binary = tmp_path / "qemu-system-x86_64"
    binary.symlink_to(sys.executable)
    return subprocess.Popen([str(binary), "-c", "import time; time.sleep(60)",
                             f"socket,id=agent,path={socket_dir}/agent.sock,server=on"])


def test_the_reaper_finds_a_machine_whose_socket_directory_owner_is_gone(
        tmp_path: Path) -> None:
    live = tmp_path / f"{TMP_PREFIX}live"
    dead = tmp_path / f"{TMP_PREFIX}dead"
    gone = tmp_path / f"{TMP_PREFIX}gone"
    for path in (live, dead, gone):
        path.mkdir()
    (live / "pid").write_text(Owner.me().name)
    finished = subprocess.Popen(["sleep", "60"])
    owner = Owner(finished.pid, process_start_time(finished.pid))
    finished.kill()
    finished.wait()
    (dead / "pid").write_text(owner.name)
    procs = {}
    for path in (live, dead, gone):
        binary_dir = tmp_path / "bin" / path.name.removeprefix(TMP_PREFIX)
        binary_dir.mkdir(parents=True)
        procs[path.name] = fake_qemu(binary_dir, path)
    gone.joinpath("pid").unlink(missing_ok=True)
    os.rmdir(gone)
    try:
        deadline = time.monotonic() + 10
        while True:
            found = {pid: path for pid, path in qemu_processes_of_gone_dirs()
                     if path.startswith(str(tmp_path))}
            if len(found) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        by_name = {Path(path).name: pid for pid, path in found.items()}
        assert by_name == {dead.name: procs[dead.name].pid, gone.name: procs[gone.name].pid}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
