"""A private Docker engine for fault tests: own socket, data root, exec root and cgroup
parent, killed with SIGKILL by the test; everything it leaves (its containerd, shims,
container processes, mounts, files) is removed, found by those private paths and
cgroup names only, so the main engine is never touched."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_support import find_processes, inner_argv, kill_all
from shared_support import wait_for


class PrivateEngine:
    def __init__(self, name: str, exec_root: str) -> None:
        self.name = name
        self.sock = f"/tmp/{name}.sock"
        self.data = f"/tmp/{name}"
        self.exec_root = exec_root  # short: containerd's socket paths live under it
        self.pidfile = f"/tmp/{name}.pid"
        self.host = f"unix://{self.sock}"

    def in_private_cgroup(self, pid: int) -> bool:
        try:
            return self.name in Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False

    def processes(self) -> list[int]:
        pids = (set(find_processes(self.exec_root)) | set(find_processes(self.data))
                | set(find_processes(self.sock)))
        pids |= {int(p) for p in os.listdir("/proc")
                 if p.isdigit() and self.in_private_cgroup(int(p))}
        pids.discard(os.getpid())
        return sorted(pids)

    def mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        roots = (self.data, self.exec_root)
        return [p for p in points if p.startswith(tuple(r + "/" for r in roots)) or p in roots]

    def remove(self) -> None:
        for _ in range(3):
            pids = self.processes()
            if not pids:
                break
            kill_all(pids)
            time.sleep(0.5)
        for point in sorted(self.mounts(), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        for path in (self.data, self.exec_root):
            if not self.mounts():
                shutil.rmtree(path, ignore_errors=True)
        for path in (self.sock, self.pidfile):
            Path(path).unlink(missing_ok=True)
        # the killed engine cannot remove its containers' groups (its --cgroup-parent)
        from pytest_isolate.limits import remove_dirs

        remove_dirs(sorted(Path("/sys/fs/cgroup").glob(f"*/{self.name}")), timeout=2.0)

    def answers(self) -> bool:
        done = subprocess.run(["docker", "-H", self.host, "info", "--format", "{{.ID}}"],
                              capture_output=True, timeout=10, check=False)
        return done.returncode == 0

    def start(self, log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["dockerd", "-H", self.host, "--data-root", self.data,
                 "--exec-root", self.exec_root, "--pidfile", self.pidfile,
                 "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
                 "--cgroup-parent", self.name],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        wait_for("the private docker engine", self.answers, 60, proc, interval=0.5)
        return proc

    @contextlib.contextmanager
    def killed_mid_run(self, project: Path, cache_dir: str, tag: str, args: list[str],
                       env: dict[str, str]) -> Iterator[float]:
        """Start this engine and pytest on project; SIGKILL the engine once ``sleep tag``
        runs (in one of its containers); yield the seconds from the kill to the end of
        the run, whose output is project/inner.out.  Everything is gone afterwards."""
        if shutil.which("dockerd") is None:
            pytest.fail("dockerd is not installed (apt-get install docker.io)")
        self.remove()  # what an interrupted earlier session left
        engine = proc = None
        try:
            engine = self.start(project / "dockerd.log")
            with open(project / "inner.out", "wb") as out:
                proc = subprocess.Popen(
                    inner_argv(cache_dir, *args),
                    cwd=project, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=env)
            wait_for(f"sleep {tag} in a container of the private engine",
                     lambda: find_processes(f"sleep {tag}"), 240, proc)
            killed_at = time.monotonic()
            engine.send_signal(signal.SIGKILL)
            engine.wait()
            proc.wait(300)
            yield time.monotonic() - killed_at
        finally:
            for p in (proc, engine):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
            self.remove()
