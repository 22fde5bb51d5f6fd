"""``doctor``: which backends work on this host, what is missing, and the command that
fixes it."""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_isolate.cli.common import (
    Project,
    cache_location,
    dump_json,
    load_backend,
    open_cache,
    out,
    plural,
    resolve_specs,
)
from pytest_isolate.sizes import dir_size, format_size

if TYPE_CHECKING:
    from pytest_isolate.backends.base import Backend
    from pytest_isolate.cache import Cache
    from pytest_isolate.setup_host import HostNeeds
    from pytest_isolate.spec import EnvSpec


BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


def which(tool: str) -> str | None:
    import shutil

    return shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{tool}", os.X_OK)), None)


def socket_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def run_probe(needs: HostNeeds) -> dict[str, Any]:
    """What of a backend's declared needs this host has (Backend.host_needs)."""
    import importlib.util

    tools = {tool: {"found": which(tool), "package": pkg} for tool, pkg in needs.commands}
    daemons = {name: {"socket": sock, "running": socket_answers(sock), "start": start}
               for name, sock, start in needs.services}
    python = {mod: {"found": importlib.util.find_spec(mod) is not None, "install": how}
              for mod, how in needs.python}
    return {"tools": tools, "daemons": daemons, "python": python}


def setup_invocation(*args: str) -> str:
    from pytest_isolate.setup_host import invocation

    return invocation(args)


def probe_hints(result: dict[str, Any], backend: str) -> list[str]:
    hints = []
    setup = setup_invocation("--backends", backend)
    missing = sorted({v["package"] for v in result["tools"].values() if not v["found"]})
    if missing:
        tools = ", ".join(t for t, v in result["tools"].items() if not v["found"])
        hints.append(f"missing {tools}: {setup}  (or apt-get install {' '.join(missing)})")
    for name, v in result["daemons"].items():
        if not v["running"]:
            hints.append(f"{name} is not running: {setup}  (or start it with `{v['start']}`)")
    for mod, v in result["python"].items():
        if not v["found"]:
            hints.append(f"Python package {mod!r} is missing: {v['install']}")
    return hints


class Checker:
    """Runs backends' check(spec) once per (backend, spec), in a throw-away run context."""

    def __init__(self, project: Project, cache: Cache, work: Path) -> None:
        self.project = project
        self.cache = cache
        self.work = work
        self.classes: dict[str, tuple[type[Backend] | None, str]] = {}
        self.backends: dict[str, Backend] = {}
        self.results: dict[tuple[str, EnvSpec], tuple[bool, str, str]] = {}

    def backend(self, name: str) -> Backend | str:
        from pytest_isolate.backends.base import RunContext

        if name not in self.classes:
            self.classes[name] = load_backend(name)
        cls, why = self.classes[name]
        if cls is None:
            return why
        if name not in self.backends:
            ctx = RunContext(run_id="doctor", rootdir=self.project.rootdir, cache=self.cache,
                             log_dir=self.work / "logs", work_dir=self.work / "work",
                             progress=lambda message: None)
            self.backends[name] = cls(ctx)
        return self.backends[name]

    def check(self, spec: EnvSpec) -> tuple[bool, str, str]:
        """(usable, reason, fix)."""
        from pytest_isolate.errors import BackendUnavailable

        key = (spec.backend, spec)
        if key not in self.results:
            backend = self.backend(spec.backend)
            if isinstance(backend, str):
                result = (False, backend, "")
            else:
                try:
                    backend.check(spec)
                    result = (True, "", "")
                except BackendUnavailable as exc:
                    result = (False, exc.reason, exc.fix)
                except Exception as exc:
                    result = (False, f"check failed: {type(exc).__name__}: {exc}", "")
            self.results[key] = result
        return self.results[key]


def kvm_status() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    virt = sorted(flags & {"vmx", "svm"})
    exists = os.path.exists("/dev/kvm")
    accessible = exists and os.access("/dev/kvm", os.R_OK | os.W_OK)
    if virt and accessible:
        verdict = ("likely usable (CPU flag " + ",".join(virt) + ", /dev/kvm accessible); "
                   "a bounded probe boot is still needed to be sure: VMs fall back to TCG if it fails")
    elif not exists:
        verdict = "not usable: /dev/kvm does not exist; VMs run under TCG emulation (slower)"
    elif not accessible:
        verdict = ("not usable: /dev/kvm is not readable and writable by this user "
                   "(add the user to group kvm); VMs run under TCG emulation")
    else:
        verdict = ("not usable: /dev/kvm exists but the CPU shows no vmx/svm flag "
                   "(paravirtual or nested KVM); VMs run under TCG emulation")
    return {"cpu_flags": virt, "dev_kvm": exists, "dev_kvm_accessible": accessible,
            "likely_usable": bool(virt and accessible), "verdict": verdict}


def binfmt_status() -> dict[str, Any]:
    mounted = (BINFMT_DIR / "register").exists()
    arches: dict[str, bool] = {}
    if mounted:
        for entry in sorted(BINFMT_DIR.glob("qemu-*")):
            try:
                arches[entry.name[len("qemu-"):]] = entry.read_text().startswith("enabled")
            except OSError:
                continue
    return {"mounted": mounted, "qemu_user": arches}


def cmd_doctor(args: argparse.Namespace, project: Project) -> int:
    from pytest_isolate.backends import BUILTIN_BACKENDS
    from pytest_isolate.namespaces import userns_allowed
    from pytest_isolate.setup_host import HOST_NEEDS, HostNeeds

    specs = resolve_specs(project)
    user_envs = list(project.table.get("envs", {}) or {})
    used = user_envs or ["chroot"]
    root, where = cache_location(args, project)
    cache_problem = ""
    with tempfile.TemporaryDirectory(prefix="pytest-isolate-doctor.") as tmp:
        try:
            cache = open_cache(root, where)
        except Exception as exc:
            cache_problem = str(exc)
            cache = open_cache(Path(tmp) / "cache", "doctor")
        checker = Checker(project, cache, Path(tmp))
        backends: dict[str, Any] = {}
        for name in BUILTIN_BACKENDS:
            spec = next((s for s in specs.values() if s.backend == name), None)
            if spec is None:
                from pytest_isolate.spec import EnvSpec

                spec = EnvSpec(name=name, backend=name)
            usable, reason, fix = checker.check(spec)
            cls, _ = checker.classes.get(name, (None, ""))
            # a backend that cannot load (its SDK is missing) still names what it needs
            needs = cls.host_needs if cls is not None else HOST_NEEDS.get(name, HostNeeds())
            probe = run_probe(needs)
            packages = sorted({p.name for p in needs.packages_for(a for a, _ in needs.arch_packages)})
            backends[name] = {"available": usable, "implemented": cls is not None,
                              "reason": reason, "fix": fix, "checked_with": spec.name,
                              "packages": packages, **probe, "hints": probe_hints(probe, name),
                              "setup": setup_invocation("--backends", name)}
        envs: dict[str, Any] = {}
        for name in used:
            spec = specs[name]
            usable, reason, fix = checker.check(spec)
            envs[name] = {"backend": spec.backend, "arch": spec.arch, "usable": usable,
                          "reason": reason, "fix": fix, "setup": setup_invocation("--envs", name)}
    items = open_cache(root, where, create=False).listing(with_size=False)
    report = {
        "root": os.geteuid() == 0,
        "userns_allowed": userns_allowed(),
        "root_inside": root_inside(root),
        "backends": backends,
        "kvm": kvm_status(),
        "binfmt": binfmt_status(),
        "cache": {"path": str(root), "source": where, "exists": root.is_dir(),
                  "problem": cache_problem, "entries": len(items),
                  "size": dir_size(root) if root.is_dir() else 0},
        "project": {"pyproject": str(project.pyproject) if project.pyproject else None,
                    "envs": envs},
    }
    ok = all(e["usable"] for e in envs.values()) and not cache_problem
    report["ok"] = ok
    if args.json:
        dump_json(report)
    else:
        print_doctor(report)
    return 0 if ok else 1


def root_inside(cache_root: Path) -> dict[str, str]:
    """Where each container backend's root lives on the host (README 'Security model')."""
    from pytest_isolate.namespaces import root_map, root_map_problem

    if os.geteuid() != 0:
        mine = f"host uid {os.geteuid()} (rootless: this user)"
        return {"chroot": mine, "schroot": "- (needs root)", "lxc": "- (needs root)",
                "docker": "the engine's root (rootless engine: its user)"}
    mapping = root_map()
    probe_at = cache_root if cache_root.is_dir() else Path(tempfile.gettempdir())
    problem = root_map_problem(probe_at, mapping)
    mapped = (mapping.describe() if problem is None else
              f"the host's root: no mapped root here ({problem})")
    return {"chroot": mapped, "schroot": mapped, "lxc": mapped,
            "docker": "the engine's root, unless dockerd maps it (userns-remap in daemon.json)"}


def debian_arch(binfmt_name: str) -> str:
    from pytest_isolate.setup_host import BINFMT_NAMES

    return next((deb for deb, name in BINFMT_NAMES.items() if name == binfmt_name), binfmt_name)


def print_doctor(r: dict[str, Any]) -> None:
    out(f"running as {'root' if r['root'] else f'uid {os.geteuid()}'}")
    out("backends:")
    for name, b in r["backends"].items():
        if b["available"]:
            state = "available"
        elif not b["implemented"]:
            state = b["reason"]
        else:
            state = f"unavailable: {b['reason']}"
        out(f"  {name:<8} {state}")
        if b["fix"]:
            out(f"           fix: {b['fix']}")
        if not b["available"]:
            for hint in b["hints"]:
                out(f"           {hint}")
        elif b["hints"] and b["implemented"]:
            for hint in b["hints"]:
                out(f"           note: {hint}")
    kvm = r["kvm"]
    out(f"KVM: {kvm['verdict']}")
    binfmt = r["binfmt"]
    setup_arm64 = setup_invocation("--arches", "arm64")
    if not binfmt["mounted"]:
        out(f"qemu-user (binfmt_misc): not mounted: {setup_arm64}  (or: "
            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc)")
    elif binfmt["qemu_user"]:
        arches = ", ".join(a + ("" if on else " (disabled)") for a, on in binfmt["qemu_user"].items())
        out(f"qemu-user (binfmt_misc): {arches}")
        disabled = [debian_arch(a) for a, on in binfmt["qemu_user"].items() if not on]
        if disabled:
            out(f"  enable the disabled ones: {setup_invocation('--arches', ','.join(disabled))}")
    else:
        out("qemu-user (binfmt_misc): none registered; foreign-arch chroots/containers need: "
            f"{setup_arm64}  (or: apt-get install qemu-user-static binfmt-support && "
            "update-binfmts --enable qemu-aarch64)")
    if r["root"]:
        userns = "allowed" if r["userns_allowed"] else "disabled (not needed as root)"
    else:
        userns = ("allowed" if r["userns_allowed"] else
                  "disabled: sysctl kernel.unprivileged_userns_clone=1 user.max_user_namespaces=15000")
    out(f"user namespaces: {userns}")
    out("root inside an environment is:")
    for name, where in r["root_inside"].items():
        out(f"  {name:<8} {where}")
    c = r["cache"]
    if c["problem"]:
        out(f"cache: {c['path']} ({c['source']}): PROBLEM: {c['problem']}")
    else:
        out(f"cache: {c['path']} ({c['source']}): {plural(c['entries'], 'entry', 'entries')}, "
            f"{format_size(c['size'])} in all")
    p = r["project"]
    out(f"project: {p['pyproject'] or 'no pyproject.toml found'}")
    for name, e in p["envs"].items():
        state = "usable" if e["usable"] else f"NOT usable: {e['reason']}"
        out(f"  {name} ({e['backend']}, {e['arch']}): {state}")
        if e["fix"]:
            out(f"      fix: {e['fix']}")
        if not e["usable"]:
            out(f"      set up what it needs: {e['setup']}")
    out("OK: every environment the project uses can run here" if r["ok"] else
        "NOT OK: some environments the project uses cannot run here (see above)")
