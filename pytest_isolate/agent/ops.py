"""Commands and files: what the agent and its workers do for the host's exec, get and
put operations, and the limits and OOM count of a guest."""

from __future__ import annotations

import errno
import io
import os
import signal
import struct
import subprocess
import tarfile
import time
from typing import Any, Callable, Dict, Optional, Tuple

from .mounts import MS_NODEV, MS_NOEXEC, MS_NOSUID, mount
from .wire import message, write_all


def run_command(req: Dict[str, Any], stdin: bytes,
                preexec: Optional[Callable[[], None]] = None) -> Tuple[Dict[str, Any], bytes]:
    argv = req["argv"]
    env = dict(os.environ)
    env.update(req.get("env") or {})
    timeout = req.get("timeout")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=req.get("cwd"), env=env, start_new_session=True, preexec_fn=preexec,
        )
    except OSError as exc:
        msg = ("%s: %s\n" % (argv[0], exc.strerror or exc)).encode()
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        return (message("result", returncode=code, stdout_len=0,
                        duration=time.monotonic() - started, timed_out=False), msg)
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=float(req.get("kill_grace", 2.0)))
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    else:
        _killpg(proc.pid, signal.SIGKILL)  # what the command left running in its group
    return (message("result", returncode=proc.returncode, stdout_len=len(out),
                    duration=time.monotonic() - started, timed_out=timed_out), out + err)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def limit_guest(values: Dict[str, str]) -> None:
    """In a virtual machine (the agent is the guest's root): put the agent, and so every
    worker it forks, into a cgroup v2 group with the spec's limits, as the host does for
    containers.  values: cgroup file -> value, e.g. {"pids.max": "64"}."""
    base = "/sys/fs/cgroup"
    if not os.path.exists(base + "/cgroup.controllers"):
        os.makedirs(base, exist_ok=True)
        mount("cgroup2", base, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    group = base + "/pytest-isolate-agent"  # not "pytest-isolate": the host's groups' parent
    os.makedirs(group, exist_ok=True)
    controllers = sorted(set(k.split(".", 1)[0] for k in values))
    with open(base + "/cgroup.subtree_control", "w") as f:
        f.write(" ".join("+" + c for c in controllers))
    for name, value in sorted(values.items()):
        if name == "memory.swap.max" and not os.path.exists(group + "/" + name):
            continue  # a kernel without swap accounting: nothing to limit
        with open(group + "/" + name, "w") as f:
            f.write(value)
    with open(group + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def oom_kills() -> Optional[int]:
    """The kernel's count of OOM kills since boot (/proc/vmstat), None when unknown."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def pack_path(path: str) -> bytes:
    """A tar archive of path, its top entry named 'root'."""
    if not os.path.lexists(path):
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(path, arcname="root")
    return buf.getvalue()


def unpack_to(data: bytes, dest: str) -> None:
    """Extract an archive made by pack_path so that its 'root' entry becomes dest."""
    parent = os.path.dirname(os.path.abspath(dest)) or "/"
    os.makedirs(parent, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        members = []
        for m in tar.getmembers():
            if m.name != "root" and not m.name.startswith("root/"):
                raise ValueError("unexpected archive member %r" % m.name)
            if m.isdev():
                continue
            m.name = os.path.basename(dest) + m.name[4:]
            # owned by root inside (like `docker cp`): the host's uid may not even be
            # mapped in a user namespace, and a failed chown would also skip the chmod
            m.uid = m.gid = 0
            m.uname = m.gname = "root"
            members.append(m)
        if hasattr(tarfile, "fully_trusted_filter"):
            tar.extractall(parent, members=members, filter="fully_trusted")
        else:
            tar.extractall(parent, members=members)


def set_winsize(fd: int, req: Dict[str, Any]) -> None:
    if req.get("rows") and req.get("cols"):
        import fcntl
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", req["rows"], req["cols"], 0, 0))


def in_root_call(root: Optional[str], fn: Callable[[], bytes]) -> bytes:
    """Run fn in a forked child chrooted to root (so paths resolve inside the env)."""
    if root is None:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            os.chroot(root)
            os.chdir("/")
            payload = b"\0" + fn()
        except BaseException as exc:
            payload = b"\1" + ("%s: %s" % (type(exc).__name__, exc)).encode()
            code = 1
        try:
            write_all(w, payload)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data or data[:1] != b"\0":
        raise OSError(data[1:].decode(errors="replace") or "file operation failed")
    return data[1:]
