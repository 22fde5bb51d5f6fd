"""Debian root filesystems: mmdebstrap (debootstrap as a root-only fallback) + setup commands.

No mirror is named unless the spec names one: mmdebstrap then uses the
machine's configured apt sources.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from pytest_isolate.cache import Entry
from pytest_isolate.channel import log_tail
from pytest_isolate.errors import ProvisionError
from pytest_isolate.progress import Heartbeat
from pytest_isolate.spec import EnvSpec


def _die_with_parent() -> None:
    """In the builder: SIGKILL when the pytest that started it dies (even by SIGKILL)."""
    from pytest_isolate.agent.mounts import set_pdeathsig

    set_pdeathsig()


def run_logged(argv: list[str], log_path: Path, progress: Any, label: str,
               timeout: float = 3600.0) -> None:
    """Run argv, appending its output to log_path and reporting progress every few seconds."""
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        except OSError as exc:
            raise ProvisionError(f"{label}: cannot run {argv[0]}: {exc}") from None
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            _pump(proc, sel, log, log_path, progress, label, started, timeout)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the builder and everything it started
            except OSError:
                pass
            proc.wait()
            raise
        sel.close()
        code = proc.wait()
        proc.stdout.close()
    if code != 0:
        raise ProvisionError(f"{label} failed with exit status {code}",
                             log_tail(log_path), str(log_path))


def _pump(proc: subprocess.Popen[bytes], sel: selectors.BaseSelector, log: Any,
          log_path: Path, progress: Any, label: str, started: float, timeout: float) -> None:
    assert proc.stdout is not None
    last_report = started
    last_line = b""
    while True:
        if time.monotonic() - started > timeout:
            raise ProvisionError(f"{label}: timed out after {timeout:.0f}s",
                                 log_tail(log_path), str(log_path))
        if sel.select(timeout=1.0):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return
            log.write(chunk)
            log.flush()
            lines = [ln for ln in chunk.splitlines() if ln.strip()]
            if lines:
                last_line = lines[-1]
        now = time.monotonic()
        if now - last_report >= 3.0:
            last_report = now
            progress(Heartbeat(f"{label}: {now - started:.0f}s: "
                               f"{last_line.decode(errors='replace').strip()[:100]}"))


def extract_rootfs(tar_path: Path, dest: Path) -> None:
    """Unpack mmdebstrap's tarball without root: device nodes are skipped (bound at run time)."""
    dest.mkdir(parents=True)
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar if not m.isdev()]
        if hasattr(tarfile, "fully_trusted_filter"):  # our own mmdebstrap's output
            tar.extractall(dest, members=members, filter="fully_trusted")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(dest, members=members)


def build_rootfs(spec: EnvSpec, dest: Path, log_path: Path, rootdir: Path,
                 progress: Any) -> dict[str, Any]:
    label = f"building {spec.release}/{spec.arch} root filesystem for {spec.name!r}"
    is_root = os.geteuid() == 0
    packages = ",".join(spec.all_packages())
    mirror = [spec.mirror] if spec.mirror else []
    mm = shutil.which("mmdebstrap")
    if mm:
        target = dest if is_root else dest.parent / "rootfs.tar"
        argv = [mm, f"--variant={spec.variant}", f"--include={packages}",
                f"--architectures={spec.arch}", "--mode=root" if is_root else "--mode=unshare",
                spec.release, str(target), *mirror]
        if is_root:
            # mmdebstrap mounts /proc, /sys and /dev into the target while it works: in a
            # private mount namespace those mounts die with it, whatever happens.
            # --pid --kill-child: when unshare dies (parent-death signal), mmdebstrap and
            # every apt/dpkg below it die with their PID namespace
            argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                    "--kill-child", "--", *argv]
        run_logged(argv, log_path, progress, label)
        if not is_root:
            extract_rootfs(target, dest)
            target.unlink()
        builder = "mmdebstrap"
    else:
        argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                "--kill-child", "--",
                shutil.which("debootstrap") or "debootstrap", f"--variant={spec.variant}",
                f"--include={packages}", f"--arch={spec.arch}", spec.release, str(dest), *mirror]
        run_logged(argv, log_path, progress, label)
        builder = "debootstrap"
    for index, command in enumerate(spec.setup):
        run_setup(spec, dest, command, index, log_path, rootdir, progress)
    return {"builder": builder}


def run_setup(spec: EnvSpec, rootfs: Path, command: str, index: int, log_path: Path,
              rootdir: Path, progress: Any) -> None:
    """One setup command inside the new root filesystem, written straight into it."""
    from pytest_isolate.images.envvars import environment_variables

    run_in_root(rootfs, rootfs.parent / f"setup-{index}", ["/bin/sh", "-c", command],
                [[str(rootdir), str(rootdir), False]], spec.network,
                environment_variables(spec), str(rootdir), log_path, progress,
                f"setup command {index + 1} of {spec.name!r} ({command!r})")


def run_in_root(root: Path, work: Path, argv: list[str], binds: list[list[Any]],
                network: bool, env: dict[str, str], cwd: str, log_path: Path, progress: Any,
                label: str) -> None:
    """argv run by the namespace launcher in root, its writes going straight into root
    (provisioning: setup commands, an image's packages); work is its scratch directory,
    made and removed here."""
    from pytest_isolate.namespaces import launcher_argv

    work.mkdir()
    cfg = {"rootfs": str(root), "workdir": str(work), "mode": "direct", "binds": binds,
           "network": network, "hostname": "isolate-setup", "argv": argv, "env": env,
           "cwd": cwd}
    try:
        run_logged(launcher_argv(cfg), log_path, progress, label)
    finally:
        work.rmdir()


def provision_rootfs(spec: EnvSpec, cache: Any, log_path: Path, rootdir: Path,
                     progress: Any) -> Entry:
    def builder(data: Path, log: Path) -> dict[str, Any]:
        progress(f"building {spec.release}/{spec.arch} root filesystem for {spec.name!r} "
                 f"(key {spec.rootfs_key()}); log: {log}")
        return build_rootfs(spec, data, log, rootdir, progress)

    entry: Entry = cache.get_or_build("rootfs", spec.rootfs_key(), builder,
                                      spec.rootfs_fields(), log_path)
    return entry
