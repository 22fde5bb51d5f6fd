"""The libvirt domain XML of a VM environment, in-process, against golden files (one
element a line, so a change shows as a small diff).  The emulator is its bare name and the
calling user's uid/gid are written UID/GID, so the files are the same on every host."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from pure_support import Golden

from pytest_isolate import config
from pytest_isolate.backends import BUILTIN_BACKENDS
from pytest_isolate.backends.base import RunContext
from pytest_isolate.backends.qemu import QemuBackend
from pytest_isolate.backends.qemu.machine import Disk, VmFiles
from pytest_isolate.cache import Cache

FILES = VmFiles(kernel=Path("/cache/vmdisk/k/vmlinuz"), initramfs=Path("/cache/vmdisk/k/initramfs.img"),
                root=Path("/cache/vmdisk/k/root.img"), site=Path("/cache/site/s/site.img"))
EXTRA = [Disk(Path("/cache/project/p.img"), "isolate-project", "/project"),
         Disk(Path("/cache/layer/v.img"), "isolate-venv", "/.isolate/venv")]

CASES: dict[str, tuple[dict[str, Any], str, list[Disk]]] = {
    # case -> (environment table, domain type, extra disks)
    "amd64_qemu": ({"backend": "qemu", "arch": "amd64"}, "qemu", []),
    "amd64_kvm_disks_network": ({"backend": "qemu", "arch": "amd64", "network": True,
                                 "memory": "1G", "cpus": 2}, "kvm", EXTRA),
    "arm64_qemu": ({"backend": "qemu", "arch": "arm64"}, "qemu", EXTRA[:1]),
    # a saved state's slot: its UUID, and spare root ports for the disks added after a restore
    "amd64_saved_slot": ({"backend": "qemu", "arch": "amd64"}, "qemu", []),
}
SLOT_UUID = "0b7c2c4e-7d0e-5a4f-9d59-3c7e61f0d1a2"


def one_element_a_line(xml: str) -> str:
    return re.sub(r"><", ">\n<", xml) + "\n"


@pytest.mark.parametrize("case", sorted(CASES))
def test_domain_xml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
                    golden: Golden) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    values, virt, extra = CASES[case]
    spec = config.resolve_envs({"envs": {"e": values}}, Path("/project/pyproject.toml"),
                               BUILTIN_BACKENDS)["e"]
    run = RunContext(run_id="golden", rootdir=Path("/project"), cache=Cache(tmp_path / "cache"),
                     log_dir=tmp_path, work_dir=tmp_path, progress=print)
    xml = QemuBackend(run).domain_xml(spec, FILES, Path("/tmp/vm/initrd.img"), Path("/tmp/vm"),
                                      Path("/logs/e/console.log"), "pytest-isolate-golden-e<&>",
                                      extra, virt,
                                      uuid=SLOT_UUID if case.endswith("_slot") else None)
    root = ElementTree.fromstring(xml)  # well-formed, the odd name escaped
    assert root.get("type") == virt
    ports = root.findall("devices/controller[@model='pcie-root-port']")
    if case.endswith("_slot"):
        assert root.findtext("uuid") == SLOT_UUID and len(ports) >= 3, xml
    else:
        assert root.find("uuid") is None and not ports, xml
    assert root.findtext("name") == "pytest-isolate-golden-e<&>"
    assert len(root.findall("devices/disk")) == 2 + len(extra)
    label = f"+{os.getuid()}:+{os.getgid()}"
    assert root.findtext("seclabel/label") == label
    golden.check(f"libvirt_{case}.xml", one_element_a_line(xml.replace(label, "+UID:+GID")))
