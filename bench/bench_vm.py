"""Benchmark the qemu backend on this machine and print the figures.

    python bench/bench_vm.py [--arch arm64,amd64] [--iterations 10]

For each architecture (the root filesystem, disk and initramfs come from the
cache; the first run builds them):

- baseline: boot the same kernel, initramfs and disks, run ``python3 -c print``
  once in place of the agent, time until its output reaches the host;
- cold start: QemuBackend.start() (boot + agent handshake), then the first
  command's result;
- per-test clean state: a fresh worker (new mount + PID namespace, overlay
  over the pristine root) running one command and closing, versus the same
  command run by the agent without a fresh root;
- snapshot restore: start() again, which restores the machine state saved by
  the first boot (when snapshots are enabled) instead of booting.

``--project`` instead measures the project disk (issue 19): start() to the first
command's result reading a project file, for a small project and for one with a
1 GiB sparse-plus-random data tree, with the project image made and reused, and
the guest's shared memory (tmpfs) in each.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pytest_isolate import config
from pytest_isolate.backends.base import RunContext
from pytest_isolate.backends.qemu import QemuBackend
from pytest_isolate.cache import Cache
from pytest_isolate.spec import EnvSpec


def baseline_argv(backend: QemuBackend, spec: EnvSpec, image_data: Path, tmp: Path,
                  command: list[str]) -> tuple[list[str], Path]:
    """QEMU argv booting image_data's kernel and disks with command in place of the agent.

    command's stdout goes to the agent's port: (argv, unix socket path to read it).
    """
    files = backend.files(image_data)
    initrd = tmp / "baseline-initrd.img"
    backend.write_initrd(files.initramfs, initrd, spec, command)
    return backend.qemu_argv(spec, files, "tcg", initrd, tmp), tmp / "agent.sock"


def baseline(backend: QemuBackend, spec: EnvSpec, image_data: Path, tmp: Path) -> float:
    """Seconds from starting QEMU to python3's output: the same boot without the agent."""
    marker = b"pytest-isolate-baseline"
    argv, sock_path = baseline_argv(backend, spec, image_data, tmp,
                                    ["python3", "-c", f"print('{marker.decode()}')"])
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = started + 120
        while True:
            try:
                sock.connect(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.perf_counter() > deadline or proc.poll() is not None:
                    raise RuntimeError("QEMU did not start") from None
                time.sleep(0.005)
        sock.settimeout(120)
        data = b""
        while marker not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"the guest closed the port; got {data!r}")
            data += chunk
        elapsed = time.perf_counter() - started
        sock.close()
        return elapsed
    finally:
        proc.kill()
        proc.wait()


def bench_arch(arch: str, iterations: int, root: Path) -> None:
    project = root / "project"
    project.mkdir()
    (project / "test_x.py").write_text("def test_x():\n    pass\n")
    run = RunContext(run_id="bench", rootdir=project,
                     cache=Cache(Path(os.environ.get("PYTEST_ISOLATE_CACHE_DIR")
                                      or config.default_cache_dir())),
                     log_dir=root / "logs", work_dir=root / "work", progress=print)
    (root / "work").mkdir()
    backend = QemuBackend(run)
    spec = EnvSpec(name=f"bench-{arch}", backend="qemu", arch=arch)
    backend.check(spec)
    t0 = time.perf_counter()
    entry = backend.provision(spec)
    print(f"[{arch}] provision: {time.perf_counter() - t0:.2f}s (cache hit: {entry.hit})")

    base = [baseline(backend, spec, entry.data, root) for _ in range(3)]
    print(f"[{arch}] baseline boot -> python3 printed: median {statistics.median(base):.2f}s "
          f"({', '.join(f'{b:.2f}' for b in base)})")

    cold = dataclasses.replace(spec, options=(("vm_snapshot", False),))
    inst = None
    for label, sp in (("cold boot", cold), ("boot or restore (saves state)", spec),
                      ("restore", spec)):
        t0 = time.perf_counter()
        inst = backend.start(sp, entry)
        t_ready = time.perf_counter()
        reply, out = inst.conn.call(0, {"op": "exec", "argv": ["python3", "-c", "print(1)"]},
                                    timeout=60)
        t_first = time.perf_counter()
        assert reply["returncode"] == 0 and out == b"1\n", (reply, out)
        print(f"[{arch}] {label}: start() {t_ready - t0:.2f}s, first command result "
              f"{t_first - t0:.2f}s [{backend.last_start}]")
        if label != "restore":
            inst.stop()
    assert inst is not None
    fresh = []
    plain = []
    for _ in range(iterations):
        ch = inst.conn.new_channel()
        t0 = time.perf_counter()
        inst.conn.send(0, {"op": "worker", "ch": ch, "kind": "test"})
        reply, _ = inst.conn.call(ch, {"op": "exec", "argv": ["true"]}, timeout=60)
        inst.conn.send(ch, {"op": "close"})
        while inst.conn.recv(ch, 60)[0]["op"] != "exit":
            pass
        fresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        inst.conn.call(0, {"op": "exec", "argv": ["true"]}, timeout=60)
        plain.append(time.perf_counter() - t0)
    inst.stop()
    f, p = statistics.median(fresh), statistics.median(plain)
    print(f"[{arch}] per test: fresh worker + command + close {f * 1000:.0f} ms, "
          f"same command without a fresh root {p * 1000:.0f} ms, "
          f"clean-state overhead {(f - p) * 1000:.0f} ms (median of {iterations})")


def make_big_data(project: Path) -> None:
    """A 1 GiB sparse file with 32 MiB of random data, and 300 small files."""
    (project / "data" / "small").mkdir(parents=True)
    for i in range(300):
        (project / "data" / "small" / f"f{i:03}").write_bytes(os.urandom(512))
    with open(project / "data" / "big.bin", "wb") as f:
        f.truncate(1 << 30)
        for pos in (0, 300 << 20, 700 << 20, (1 << 30) - (8 << 20)):
            f.seek(pos)
            f.write(os.urandom(8 << 20))


def bench_project(arch: str, iterations: int, root: Path) -> None:
    cache = Cache(Path(os.environ.get("PYTEST_ISOLATE_CACHE_DIR") or config.default_cache_dir()))
    spec = EnvSpec(name=f"bench-{arch}", backend="qemu", arch=arch)
    probe = ("import os; print(os.path.exists('data/big.bin'), "
             "os.popen('grep Shmem: /proc/meminfo').read().split()[1])")
    for label in ("small project", "1 GiB project"):
        project = root / label.split()[0]
        project.mkdir()
        (project / "test_x.py").write_text("def test_x():\n    pass\n")
        if label.startswith("1 GiB"):
            make_big_data(project)
        run = RunContext(run_id="bench", rootdir=project, cache=cache, log_dir=root / "logs",
                         work_dir=root / "work", progress=print)
        (root / "work").mkdir(exist_ok=True)
        entry = QemuBackend(run).provision(spec)
        times = []
        for i in range(iterations + 1):
            backend = QemuBackend(run)  # a new run: scans the tree, finds or makes the image
            t0 = time.perf_counter()
            inst = backend.start(spec, entry)
            reply, out = inst.conn.call(
                0, {"op": "exec", "argv": ["python3", "-c", probe], "cwd": str(project)},
                timeout=120)
            elapsed = time.perf_counter() - t0
            inst.stop()
            assert reply["returncode"] == 0, out
            has_big, shmem = out.decode().split()
            what = "image made" if i == 0 else "image reused"
            if i:
                times.append(elapsed)
            print(f"[{arch}] {label}: start() + first result {elapsed:.2f}s ({what}, "
                  f"{backend.last_start}); data/big.bin inside: {has_big}; guest Shmem "
                  f"{int(shmem) >> 10} MiB")
        print(f"[{arch}] {label}: first result median {statistics.median(times):.2f}s "
              f"(image reused, {iterations} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="arm64,amd64")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--project", action="store_true",
                        help="measure the project disk: small vs 1 GiB project")
    args = parser.parse_args()
    for arch in args.arch.split(","):
        root = Path(tempfile.mkdtemp(prefix="bench-vm-"))
        try:
            if args.project:
                bench_project(arch, args.iterations, root)
            else:
                bench_arch(arch, args.iterations, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
