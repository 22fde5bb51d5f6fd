"""Warm environments: a started environment waits for the next pytest run (``--isolate-warm``).

What a run pays before its first isolated result is mostly the environment's start: the
launcher, Python inside, the agent's handshake and pytest's import there.  With
``isolate_warm = SECONDS``, a *keeper* process (``python -m pytest_isolate.warm``, started
by the first run that finds none) starts one spare instance of the environment ahead of
time -- handshake done, pytest and its built-in plugins imported -- and waits on a unix
socket for the next run of the same key.

- **One run per instance.**  A run takes the spare: the keeper passes it the descriptors of
  the agent's stream (SCM_RIGHTS) with the handshake's answers, and the run uses the
  instance as if it had started it.  When the run ends (or its process dies), the keeper
  stops that instance and starts the next spare.  No instance serves two runs, so every
  run starts from an environment no test has touched, exactly like a cold start.
- **The key** is a hash of everything the start depends on, all known before anything
  is provisioned, so that a run takes its spare without contacting an engine or reading
  the cache: the resolved spec, what makes its dependency layer (the plan's files and the
  index settings), the backend, the project's root, the host's Python, pytest and
  pytest-isolate (its files' sizes and times, so an edited checkout never meets an older
  keeper), the user and the environment variables.  An image's key also names the cache
  entry that pins its digest, so a run provisions it first (a moved tag is a new key).
  Another key is another keeper; nothing is reused across keys.
- **Who can reach it.**  The sockets live in ``<cache>/warm``, a directory of mode 0700
  owned by the user (a run refuses to use one that is not); the keeper hands an instance
  only to a peer of its own uid (SO_PEERCRED).
- **Its life.**  The keeper ends, stopping its spare, after SECONDS without a run taking
  it, when its spare dies, or on SIGTERM.  It owns its instances as any run does (its own
  run directory and owner record), so when it is killed the next run's reapers remove
  what it left, and ``cache gc`` leaves a live keeper's entries alone (it holds them).
- **Concurrent runs** (two terminals, xdist workers) each take a spare of their own key
  or start cold; a run never waits for a keeper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import pickle
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_isolate.agent.wire import message
from pytest_isolate.backends.base import Backend, Instance, RunContext
from pytest_isolate.cache import Cache, Entry
from pytest_isolate.channel import Connection
from pytest_isolate.ownership import Owner, RunId, process_start_time, record_run
from pytest_isolate.spec import EnvSpec

#: Environment variables that differ between runs of the same project without changing
#: what an environment's start does.
VOLATILE_ENV = frozenset({"_", "OLDPWD", "SHLVL", "PYTEST_CURRENT_TEST", "COLUMNS", "LINES",
                          "PYTEST_ADDOPTS", "TERM_SESSION_ID", "WINDOWID",
                          "PYTEST_XDIST_TESTRUNUID"})
#: How long a run waits for a keeper's answer before it starts cold.
TAKE_TIMEOUT = 2.0
#: Starts of a spare that may fail in a row before the keeper gives up.
MAX_FAILED_STARTS = 2
_PACKAGE = Path(__file__).resolve().parent


def warm_dir(cache_root: Path) -> Path:
    """Where the keepers' sockets are: private to the user, made so when missing.

    Raises PermissionError when it exists with another owner or with access for others."""
    path = cache_root / "warm"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory of mode 0700 owned by uid "
                              f"{os.geteuid()} (it is mode {stat.S_IMODE(st.st_mode):o}, uid "
                              f"{st.st_uid}); remove it, a run makes it again")
    return path


def locked(path: Path) -> int | None:
    """An exclusive flock on path (made if missing) and its descriptor, to close when done;
    None when another process holds it (a keeper holds its key's from start to end)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@functools.cache
def code_stamp() -> str:
    """What identifies this pytest-isolate's code: every module's path, size and mtime."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(_PACKAGE)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


@dataclasses.dataclass
class Description:
    """What a keeper needs to start instances of one environment, as the run resolved it."""

    key: str
    backend_ref: Any
    endpoint: str | None
    spec: EnvSpec
    entry: Entry
    rootdir: Path
    cache_root: Path
    cache_where: str
    strict: bool
    #: seconds the keeper waits for a run before it ends
    idle: float


def key_of(spec: EnvSpec, backend_ref: Any, endpoint: str | None, rootdir: Path,
           inputs: Any) -> str:
    """The key of the instances a keeper serves (see the module's docstring): spec as
    resolved (without its dependency layer: inputs names what makes that, and for an image
    the cache entry that pins its digest), the backend, the project, the host's Python,
    pytest and pytest-isolate, the user and the environment variables."""
    import pytest

    env = {k: v for k, v in os.environ.items() if k not in VOLATILE_ENV}
    ref = backend_ref if isinstance(backend_ref, str) else (
        f"{backend_ref.__module__}:{backend_ref.__qualname__}")
    parts = {
        "spec": repr(spec), "sources": sorted(spec.sources.items()), "inputs": inputs,
        "backend": ref, "endpoint": endpoint, "rootdir": str(rootdir),
        # the venv and the interpreter (its python and python3 links are the same one)
        "python": [sys.prefix, os.path.realpath(sys.executable), sys.version],
        "pytest": pytest.__version__, "code": code_stamp(), "uid": os.geteuid(),
        "env": sorted(env.items()),
    }
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------- the run's side

class Borrowed:
    """An instance's agent stream taken from a keeper (the Transport of Instance): the run
    talks to the agent directly; stop() ends the agent and gives the instance back for
    the keeper to stop."""

    def __init__(self, sock: socket.socket, rfd: int, wfd: int, label: str) -> None:
        self.sock = sock
        self.conn = Connection(rfd, wfd, label)

    def alive(self) -> bool:
        return not self.conn.closed

    def stop(self) -> None:
        if not self.conn.closed:
            with contextlib.suppress(Exception):
                self.conn.send(0, message("shutdown"))
        self.conn.closed = True
        for fd in {self.conn.rfd, self.conn.wfd}:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.sock.sendall(b'{"op": "done"}\n')
        self.sock.close()


def with_spares(cache_root: Path, rootdir: Path) -> set[str]:
    """The environments of the project at rootdir whose live keepers say they hold a spare
    (a keeper of another key -- older code, other settings -- may say so too: the run's
    own key finds its socket, or none)."""
    return {str(k.get("env")) for k in keepers(cache_root)
            if k.get("rootdir") == str(rootdir) and k.get("spare")}


#: The environments the last run of each command used (<cache>/warm/USED): a run takes
#: spares before it collects for the ones its command used last time.  At most this many
#: commands are remembered; the one whose record changed longest ago goes first.
USED = "used-envs.json"
USED_COMMANDS = 64


def command_key(rootdir: Path, invocation: Path, args: Any) -> str:
    """A run's command: its project, the directory pytest ran in and its arguments."""
    return hashlib.sha256(json.dumps([str(rootdir), str(invocation), list(args)]).encode()
                          ).hexdigest()[:24]


def used_last(cache_root: Path, command: str) -> set[str]:
    """The environments the last run of command bound tests to (none when unknown)."""
    try:
        return set(json.loads((cache_root / "warm" / USED).read_text()).get(command, ()))
    except (OSError, ValueError, AttributeError):
        return set()


def remember_used(cache_root: Path, command: str, envs: set[str]) -> None:
    """Record the environments this run of command bound tests to (when they changed)."""
    path = warm_dir(cache_root) / USED
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    if set(table.get(command, ())) == envs and command in table:
        return
    table.pop(command, None)
    table[command] = sorted(envs)
    while len(table) > USED_COMMANDS:  # the oldest first (insertion order)
        table.pop(next(iter(table)))
    tmp = path.with_name(f".{USED}.{os.getpid()}")
    tmp.write_text(json.dumps(table))
    os.replace(tmp, path)


def take(cache_root: Path, key: str, spec: EnvSpec) -> tuple[Instance, dict[str, Any]] | None:
    """The spare instance of key's keeper and what the keeper says of it (the cache entry's
    key), or None when there is none to take now."""
    path = warm_dir(cache_root) / f"{key}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TAKE_TIMEOUT)
    try:
        sock.connect(str(path))
        sock.sendall(b'{"op": "take"}\n')
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
    except OSError:
        sock.close()
        return None
    if len(fds) != 2 or not data:
        for fd in fds:
            os.close(fd)
        sock.close()
        return None
    for fd in fds:  # the run's own children (a test's subprocesses) never hold them
        os.set_inheritable(fd, False)
    meta = json.loads(data.decode())
    sock.settimeout(None)
    label = f"environment {spec.name!r}"
    inst = Instance(spec, Borrowed(sock, fds[0], fds[1], label),
                    {k: Path(v) for k, v in meta["logs"].items()})
    inst.hello = meta["hello"]
    inst.root = meta["root"]
    return inst, meta


#: keepers this process started (kept referenced: no ResourceWarning, no early reap)
_STARTED: list[subprocess.Popen[bytes]] = []


def spawn_keeper(desc: Description) -> bool:
    """Start a keeper for desc's key unless one runs (or is starting); False when desc
    cannot be sent to another process (a backend class that does not pickle)."""
    directory = warm_dir(desc.cache_root)
    fd = locked(directory / f"{desc.key}.lock")
    if fd is None:
        return True  # a keeper holds it
    os.close(fd)  # the keeper takes the lock itself
    try:
        payload = pickle.dumps(desc)
    except Exception:
        return False
    with open(directory / f"{desc.key}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_isolate.warm"], stdin=subprocess.PIPE,
            stdout=log, stderr=log, start_new_session=True, close_fds=True)
    assert proc.stdin is not None
    proc.stdin.write(payload)
    proc.stdin.close()
    _STARTED.append(proc)
    # its status from now on, not from when it has started up: `pytest-isolate warm --stop`
    # right after this run must find it
    write_status(directory, desc, Owner(proc.pid, process_start_time(proc.pid)), spare=False,
                 lent=0, served=0, deadline=time.time() + desc.idle)
    return True


def write_status(directory: Path, desc: Description, owner: Owner, spare: bool, lent: int,
                 served: int, deadline: float) -> None:
    """What `pytest-isolate warm` shows of a keeper: <key>.json beside its socket,
    replaced whole."""
    status = {"key": desc.key, "env": desc.spec.name, "backend": desc.spec.backend,
              "rootdir": str(desc.rootdir), "owner": owner.label(), "idle": desc.idle,
              "deadline": deadline, "spare": spare, "lent": lent, "served": served,
              "log": str(directory / f"{desc.key}.log")}
    tmp = directory / f".{desc.key}.json.{os.getpid()}"
    tmp.write_text(json.dumps(status))
    os.replace(tmp, directory / f"{desc.key}.json")


def keepers(cache_root: Path) -> list[dict[str, Any]]:
    """The live keepers of this cache (their status, see Keeper.write_status)."""
    directory = cache_root / "warm"
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        owner = Owner.from_label(status.get("owner"))
        if owner is not None and owner.alive():
            found.append(status)
    return found


def sweep(cache_root: Path, dry: bool = False) -> list[str]:
    """The files of keepers that are gone (killed, or ended with a failure log): the keys
    whose lock nobody holds; removed unless dry.  Returns those keys."""
    directory = cache_root / "warm"
    names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    # <key>.sock|json|log|lock; ".<key>.json.<pid>" is a status being written (and
    # USED, which is not a keeper's)
    keys = sorted({key for key in (name.lstrip(".").split(".")[0] for name in names)
                   if len(key) == 32 and all(c in "0123456789abcdef" for c in key)})
    gone = []
    for key in keys:
        # no lock file: no keeper (one holds its lock from before it starts to its end)
        lock = directory / f"{key}.lock"
        fd = locked(lock) if lock.exists() else os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if fd is None:
            continue  # a keeper runs (or starts)
        try:
            gone.append(key)
            if not dry:
                for name in [f"{key}{suffix}" for suffix in (".sock", ".json", ".log", ".lock")
                             ] + [n for n in names if n.startswith(f".{key}.json.")]:
                    with contextlib.suppress(FileNotFoundError):
                        (directory / name).unlink()
        finally:
            os.close(fd)
    return gone


def stop_keeper(status: dict[str, Any]) -> bool:
    """End one keeper (it stops its instances first); False when it was gone already."""
    owner = Owner.from_label(status.get("owner"))
    if owner is None or not owner.alive():
        return False
    try:
        os.kill(owner.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------- the keeper

class Keeper:
    """Holds one spare instance of desc's environment and lends it (module docstring)."""

    def __init__(self, desc: Description) -> None:
        self.desc = desc
        self.dir = warm_dir(desc.cache_root)
        self.sock_path = self.dir / f"{desc.key}.sock"
        self.spare: Instance | None = None
        #: instances lent to runs: the run's socket -> the instance
        self.lent: dict[socket.socket, Instance] = {}
        self.deadline = time.monotonic() + desc.idle
        self.running = True
        self.failed_starts = 0
        #: something went wrong (a start, a preload, a spare that died): the log is kept
        self.failed = False
        #: runs that took a spare
        self.served = 0
        cache = Cache(desc.cache_root, where=desc.cache_where)
        run_id = str(RunId.create("warm"))
        base = cache.root / "runs" / run_id
        record_run(base)
        self.base = base
        self.starts = 0
        self.run = RunContext(run_id=run_id, rootdir=desc.rootdir, cache=cache,
                              log_dir=base / "logs", work_dir=base / "work",
                              progress=self.say, strict=desc.strict)
        from pytest_isolate import config as cfg

        cls, why = cfg.load_backend_class(desc.backend_ref)
        if cls is None:
            raise RuntimeError(f"the backend {why}")
        self.backend: Backend = cls(self.run)
        self.backend.endpoint = desc.endpoint
        self.holds: list[Callable[[], None]] = [cache.hold(desc.entry)]
        if desc.spec.layer is not None:
            self.holds.append(cache.hold(desc.spec.layer.entry))

    @staticmethod
    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def write_status(self) -> None:
        write_status(self.dir, self.desc, Owner.me(), self.spare is not None, len(self.lent),
                     self.served, time.time() + max(0.0, self.deadline - time.monotonic()))

    def start_spare(self) -> None:
        self.starts += 1
        self.run.log_dir = self.base / "logs" / str(self.starts)  # each instance its own
        try:
            inst = self.backend.start(self.desc.spec, self.desc.entry)
        except Exception as exc:
            self.failed_starts += 1
            self.failed = True
            self.say(f"start failed ({self.failed_starts}): {exc}")
            if self.failed_starts >= MAX_FAILED_STARTS:
                self.running = False
            return
        try:  # pytest and its built-in plugins imported before a run needs them
            inst.conn.call(0, message("preload"), timeout=60.0)
        except Exception as exc:
            self.say(f"preload failed: {exc}")
            self.failed = True
            inst.stop()
            self.running = False
            return
        self.failed_starts = 0
        self.spare = inst
        self.say(f"spare ready ({inst.logs.get('agent')})")

    def lend(self, client: socket.socket) -> None:
        creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        uid = int.from_bytes(creds[4:8], sys.byteorder)
        if uid != os.geteuid():
            self.say(f"refused a run of uid {uid}")
            client.close()
            return
        client.settimeout(TAKE_TIMEOUT)
        try:
            request = client.recv(4096)
        except OSError:
            request = b""
        spare, self.spare = self.spare, None
        if spare is None or not spare.alive() or not request.startswith(b'{"op": "take"}'):
            client.close()
            if spare is not None:
                spare.stop()
            return
        meta = {"hello": spare.hello, "root": spare.root, "entry_key": self.desc.entry.key,
                "logs": {k: str(v) for k, v in spare.logs.items()}}
        try:
            socket.send_fds(client, [json.dumps(meta).encode()],
                            [spare.conn.rfd, spare.conn.wfd])
        except OSError as exc:  # the run gave up waiting: the spare stays untouched
            self.say(f"could not hand the spare over: {exc}")
            client.close()
            self.spare = spare
            return
        client.settimeout(None)
        self.lent[client] = spare
        self.served += 1
        self.deadline = time.monotonic() + self.desc.idle
        self.say("lent the spare to a run")

    def give_back(self, client: socket.socket) -> None:
        """A run ended (it said so, or its socket closed): stop what it used."""
        inst = self.lent.pop(client)
        client.close()
        inst.stop()
        self.deadline = time.monotonic() + self.desc.idle  # idle from the run's end
        self.say("stopped a returned instance")

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.sock_path))
        finally:
            os.umask(old_umask)
        listener.listen(8)
        try:
            while self.running:
                if self.spare is None and not self.lent:
                    # the next spare starts once the run is done with the last one: it
                    # would take CPU from that run (which then waits on it) for a start
                    # that only the run after it needs
                    self.start_spare()
                    continue
                self.write_status()
                watched: list[Any] = [listener, *self.lent]
                if self.spare is not None:
                    watched.append(self.spare.conn.rfd)
                wait = max(0.0, self.deadline - time.monotonic())
                if not self.lent and wait == 0.0:
                    self.say("idle: ending")
                    break
                ready = select.select(watched, [], [], wait if not self.lent else None)[0]
                for item in ready:
                    if item is listener:
                        self.lend(listener.accept()[0])
                    elif isinstance(item, socket.socket):
                        self.give_back(item)
                    elif self.spare is not None:  # the idle agent wrote or its stream ended
                        self.say("the spare's agent ended")
                        self.failed = True
                        self.spare.stop()
                        self.spare = None
                        self.running = False
        finally:
            for path in (self.sock_path, self.dir / f"{self.desc.key}.json"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            listener.close()
            self.close()

    def close(self) -> None:
        for client in list(self.lent):
            self.give_back(client)
        if self.spare is not None:
            self.spare.stop()
            self.spare = None
        for release in self.holds:
            release()


def keeper_main() -> int:
    desc: Description = pickle.load(sys.stdin.buffer)
    os.close(0)
    lock = warm_dir(desc.cache_root) / f"{desc.key}.lock"
    # held to the end of this process (the descriptor is never closed)
    if locked(lock) is None:
        return 0  # another keeper serves this key
    keeper = Keeper(desc)

    def stop(signum: int, frame: Any) -> None:
        keeper.running = False
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    keeper.say(f"keeper of {desc.spec.name!r} (key {desc.key}), idle limit {desc.idle:g}s")
    try:
        keeper.serve()
    finally:
        # the lock goes while still held (a keeper starting now makes a new one); the log
        # stays only when a start failed, for `pytest-isolate warm` users to read
        lock.unlink(missing_ok=True)
        if not keeper.failed:
            (lock.parent / f"{desc.key}.log").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(keeper_main())
