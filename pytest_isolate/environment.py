"""Environment: what the fixtures return -- drive an environment from the host."""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_isolate.agent.wire import message
from pytest_isolate.channel import log_tail
from pytest_isolate.errors import IsolateError

if TYPE_CHECKING:
    from pytest_isolate.backends.base import Instance

Command = str | Sequence[str]


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What a command inside an environment did."""

    returncode: int
    stdout: str | bytes
    stderr: str | bytes
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandFailed(IsolateError):
    """run(..., check=True) and the command exited non-zero."""

    def __init__(self, argv: Sequence[str], result: ExecResult) -> None:
        self.argv = list(argv)
        self.result = result
        super().__init__(
            f"command {self.argv!r} exited with status {result.returncode}\n"
            f"stdout: {result.stdout!r}\nstderr: {result.stderr!r}"
        )


class CommandTimeout(IsolateError):
    """The command ran past its timeout and was killed (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: Sequence[str], timeout: float, result: ExecResult) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.result = result
        super().__init__(f"command {self.argv!r} timed out after {timeout}s")


def _pack(local: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(str(local), arcname="root")
    return buf.getvalue()


def _inside(base: str, path: str) -> bool:
    norm = posixpath.normpath(path)
    return norm == base or norm.startswith(base + "/")


def _checked_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The members of an archive from inside, refusing anything that could land outside.

    Done by hand because tarfile's own filters only exist from Python 3.11.4; where
    they exist, the "data" filter is applied on top.
    """
    members = tar.getmembers()
    for m in members:
        name = m.name
        if not _inside("root", name) or name.startswith("/") or ".." in name.split("/"):
            raise IsolateError(f"get: archive member {name!r} is outside the requested path")
        if m.isdev() or m.isfifo():
            raise IsolateError(f"get: {name!r} is a device or fifo; only files, directories "
                               "and links can be copied out")
        if m.issym():
            target = m.linkname
            if target.startswith("/") or not _inside(
                    "root", posixpath.join(posixpath.dirname(name), target)):
                raise IsolateError(f"get: symlink {name!r} -> {target!r} points outside the "
                                   "copied tree; refusing to extract it on the host")
        if m.islnk() and not _inside("root", m.linkname):
            raise IsolateError(f"get: hard link {name!r} -> {m.linkname!r} points outside")
        m.mode &= 0o755
    return members


def _safe_keep_modes(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's 'data' checks (no absolute names, nothing and no link outside dest) with the
    permission bits kept as they were inside (minus setuid/setgid/sticky)."""
    checked = tarfile.data_filter(member, dest)
    return checked.replace(mode=member.mode & 0o777, deep=False)


def _unpack_safely(data: bytes, dest: Path) -> None:
    """Extract an archive from inside the environment: nothing may land outside dest."""
    dest = dest.absolute()
    staging = Path(tempfile.mkdtemp(prefix=".isolate-get-", dir=dest.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            members = _checked_members(tar)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, members=members, filter=_safe_keep_modes)
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(staging, members=members)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.rename(staging / "root", dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class Environment:
    """A clean instance of an environment, driven from the host.

    Each Environment is a worker inside the environment's agent with a fresh
    copy-on-write root: what it writes is gone when it closes.
    """

    def __init__(self, instance: Instance, default_timeout: float | None = None) -> None:
        self._instance = instance
        self.spec = instance.spec
        self.name = self.spec.name
        self.arch = self.spec.arch
        self.backend = self.spec.backend
        self._conn = instance.conn
        self._ch = self._conn.open_worker("sandbox")
        self._timeout = default_timeout
        self.closed = False

    def __repr__(self) -> str:
        return f"<Environment {self.name} ({self.backend}, {self.arch})>"

    def _call(self, obj: dict[str, object], blob: bytes = b"",
              timeout: float | None = None) -> tuple[dict[str, object], bytes]:
        if self.closed:
            raise IsolateError(f"environment {self.name!r} is closed")
        return self._conn.call(self._ch, obj, blob, timeout=timeout)

    def run(self, cmd: Command, *, input: str | bytes | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, check: bool = False,
            text: bool = True) -> ExecResult:
        """Run cmd inside: a list runs without a shell, a string through ``sh -c``."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise ValueError("run: empty command")
        data = input.encode() if isinstance(input, str) else (input or b"")
        timeout = timeout if timeout is not None else self._timeout
        reply, out = self._call(
            message("exec", argv=argv, env=dict(env or {}), cwd=cwd, timeout=timeout),
            data, timeout=None if timeout is None else timeout + 30,
        )
        n = int(reply["stdout_len"])  # type: ignore[call-overload]
        stdout, stderr = out[:n], out[n:]
        result = ExecResult(
            returncode=int(reply["returncode"]),  # type: ignore[call-overload]
            stdout=stdout.decode(errors="replace") if text else stdout,
            stderr=stderr.decode(errors="replace") if text else stderr,
            duration=float(reply["duration"]),  # type: ignore[arg-type]
        )
        if reply.get("timed_out"):
            raise CommandTimeout(argv, float(timeout or 0), result)
        if check and result.returncode != 0:
            raise CommandFailed(argv, result)
        return result

    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy a host file or directory to the absolute path remote inside."""
        self._call(message("put", path=_absolute(remote)), _pack(Path(local)))

    def get(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copy remote (file or directory inside) to local on the host; links cannot escape."""
        _, data = self._call(message("get", path=_absolute(remote)))
        _unpack_safely(data, Path(local))

    def snapshot(self, name: str) -> None:
        """Remember the current filesystem state under name."""
        self._call(message("snapshot", name=name))

    def restore(self, name: str) -> None:
        """Go back to the state saved by snapshot(name)."""
        self._call(message("restore", name=name))

    def shell(self, argv: Sequence[str] | None = None, cwd: str | None = None) -> int:
        """An interactive program (a shell by default) inside, on this process's terminal.

        For debugging: ``pytest -s`` and ``chroot.shell()`` in a test.  Returns its status.
        """
        from pytest_isolate.interactive import interact

        if self.closed:
            raise IsolateError(f"environment {self.name!r} is closed")
        return interact(self._conn, self._ch, list(argv) if argv else None, cwd=cwd)

    def logs(self) -> str:
        """The environment's logs (provisioning, agent), newest lines last."""
        parts = []
        for label, path in self._instance.logs.items():
            parts.append(f"==> {label}: {path} <==\n{log_tail(path, 200)}")
        return "\n".join(parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._conn.closed:
            return
        self._conn.close_worker(self._ch)


def _absolute(remote: str) -> str:
    if not remote.startswith("/"):
        raise ValueError(f"remote path must be absolute, got {remote!r}")
    return remote
