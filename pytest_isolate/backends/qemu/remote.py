"""A libvirt on another machine (``qemu+ssh://...``, ``qemu+tcp://...``): everything goes
through libvirt's own connection, so that machine needs nothing of ours listening and
reads no path of this one.

- The kernel, the disks and the initrd are uploaded into a storage pool there
  (virStorageVolUpload) and the domain names the volumes' paths.  A volume's name is its
  file's identity (path, size, mtime: cache entries never change), so a second run
  uploads nothing; a marker volume says an upload completed.  The per-instance initrd is
  uploaded for each start and deleted at its stop.
- The agent's virtio-serial port is a unix socket libvirt allocates there, reached with
  virDomainOpenChannel; a pair of threads bridges that stream to a local socket pair,
  whose end the agent's Connection reads and writes as with a local machine.
- The serial console is read with virDomainOpenConsole into the local console.log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from pytest_isolate.errors import BackendUnavailable, ProvisionError

#: The storage pool images are uploaded into, unless options.libvirt_pool names another.
POOL = "pytest-isolate"
#: Where a system connection's pool is made when missing (mode 0711: QEMU's user passes).
SYSTEM_POOL_DIR = "/var/lib/libvirt/pytest-isolate"
#: Seconds to wait for another run's upload of the same volume to complete.
UPLOAD_WAIT = 300.0
CHUNK = 1 << 20


def is_remote(uri: str) -> bool:
    """Whether a libvirt URI reaches a daemon through a transport (ssh, tcp, tls...), as
    opposed to this machine's socket (qemu:///system, qemu:///session)."""
    scheme = uri.split(":", 1)[0]
    return "+" in scheme and not scheme.endswith("+unix")


def file_identity(path: Path) -> str:
    """What names a cached file's volume: its path, size and mtime (cache entries never
    change)."""
    st = os.stat(path)
    return hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:20]


def send_all(stream: Any, data: bytes) -> None:
    """All of data into a libvirt stream; a non-blocking one answers -2 while its buffer is
    full (the event loop drains it)."""
    view = memoryview(data)
    while view:
        sent = stream.send(bytes(view))
        if sent == -2:
            time.sleep(0.001)
            continue
        view = view[sent:]


def group_of(what: str) -> str:
    """A short name for what a volume belongs to (a project's rootdir), for volume names."""
    return hashlib.sha256(what.encode()).hexdigest()[:8]


class RemotePool:
    """The storage pool of a remote libvirt connection that holds a run's images."""

    def __init__(self, libvirt: Any, conn: Any, uri: str, name: str, backend: str) -> None:
        self.libvirt = libvirt
        self.conn = conn
        self.uri = uri
        self.backend = backend
        self.pool = self._pool(name)

    def _pool(self, name: str) -> Any:
        libvirt = self.libvirt
        try:
            pool = self.conn.storagePoolLookupByName(name)
        except libvirt.libvirtError:
            if not self.uri.rstrip("/").endswith("/system") or name != POOL:
                raise BackendUnavailable(
                    self.backend, f"libvirt at {self.uri} has no storage pool {name!r} to "
                    "upload the machine's kernel and disks into",
                    f"make one there: virsh pool-define-as {name} dir --target DIR; virsh "
                    f"pool-build {name}; virsh pool-start {name}; virsh pool-autostart {name} "
                    "(or name another pool in options.libvirt_pool)") from None
            pool = self.conn.storagePoolDefineXML(
                f"<pool type='dir'><name>{escape(name)}</name><target><path>{SYSTEM_POOL_DIR}"
                "</path><permissions><mode>0711</mode></permissions></target></pool>", 0)
            pool.build(0)
            pool.setAutostart(1)
        if not pool.isActive():
            pool.create(0)
        return pool

    def _lookup(self, name: str) -> Any | None:
        try:
            return self.pool.storageVolLookupByName(name)
        except self.libvirt.libvirtError:
            return None

    def _create(self, name: str, size: int) -> Any:
        return self.pool.createXML(
            f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{size}</capacity>"
            "<target><format type='raw'/><permissions><mode>0644</mode></permissions>"
            "</target></volume>", 0)

    def _send(self, volume: Any, size: int, chunks: Any) -> None:
        stream = self.conn.newStream(0)
        volume.upload(stream, 0, size, 0)
        try:
            for chunk in chunks:
                send_all(stream, chunk)
            stream.finish()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            raise

    def file(self, kind: str, path: Path, replaces: str | None = None) -> str:
        """The remote path of path's volume, uploaded unless a completed one is there.

        replaces: a group of volumes a new upload makes stale (the older images of one
        project's tree): they are deleted once it completes.  A machine that still runs
        on one keeps its open file.
        """
        prefix = f"isolate-{kind}-{replaces + '-' if replaces else ''}"
        name = prefix + file_identity(path)
        done = f"{name}.done"
        deadline = time.monotonic() + UPLOAD_WAIT
        while True:
            volume = self._lookup(name)
            if volume is not None and self._lookup(done) is not None:
                return str(volume.path())
            if volume is None:
                break
            if time.monotonic() > deadline:  # a run that died while uploading it
                with contextlib.suppress(self.libvirt.libvirtError):
                    volume.delete(0)
                break
            time.sleep(0.5)  # another run is uploading it
        size = path.stat().st_size
        try:
            volume = self._create(name, size)
        except self.libvirt.libvirtError as exc:
            if self._lookup(name) is not None:  # another run began the same upload meanwhile
                return self.file(kind, path, replaces)
            raise ProvisionError(f"{self.backend}: cannot make volume {name} in pool "
                                 f"{self.pool.name()} of {self.uri} for {path}: {exc}") from None
        try:
            with open(path, "rb") as f:
                self._send(volume, size, iter(lambda: f.read(CHUNK), b""))
            self._create(done, 0)
        except BaseException:
            with contextlib.suppress(Exception):
                volume.delete(0)
            raise
        if replaces:
            for old in self.pool.listAllVolumes(0):
                if old.name().startswith(prefix) and old.name() not in (name, done):
                    delete_volume(old)
        return str(volume.path())

    def data(self, name: str, data: bytes) -> tuple[str, Any]:
        """A volume holding data (a per-instance file): its remote path and the volume, which
        the caller deletes."""
        old = self._lookup(name)
        if old is not None:
            old.delete(0)
        volume = self._create(name, len(data))
        try:
            self._send(volume, len(data), [data])
        except BaseException:
            with contextlib.suppress(Exception):
                volume.delete(0)
            raise
        return str(volume.path()), volume

    # ------------------------------------------------------------ saved states
    def _state_name(self, key: str) -> str:
        return f"isolate-state-{key}"

    def _target(self) -> str:
        """The pool's directory there (a dir pool's target path)."""
        import xml.etree.ElementTree as ET

        path = ET.fromstring(self.pool.XMLDesc(0)).findtext("target/path")
        if not path:
            raise ProvisionError(f"{self.backend}: pool {self.pool.name()} of {self.uri} has "
                                 "no directory to save machine states in")
        return path

    def state_path(self, key: str) -> str | None:
        """Where the machine state saved under key is there, if its save completed."""
        name = self._state_name(key)
        if self._lookup(f"{name}.done") is None:
            return None
        return f"{self._target()}/{name}"

    def save_state(self, dom: Any, key: str) -> str:
        """Save the domain (it stops) into the pool's directory, then mark it complete."""
        self.drop_state(key)  # a killed run's partial save
        name = self._state_name(key)
        path = f"{self._target()}/{name}"
        dom.save(path)
        with contextlib.suppress(self.libvirt.libvirtError):  # busy with an upload: later
            self.pool.refresh(0)  # a volume, for `virsh vol-list` and vol-delete
        self._create(f"{name}.done", 0)
        return path

    def drop_state(self, key: str) -> None:
        name = self._state_name(key)
        for each in (f"{name}.done", name):
            volume = self._lookup(each)
            if volume is not None:
                delete_volume(volume)


def delete_volume(volume: Any, log: Path | None = None, attempts: int = 5) -> bool:
    """Delete a volume, trying again for about 3 s: libvirt can refuse for a while (a pool
    busy with a refresh or an upload, say).  A failure is written to log, if given, rather
    than raised: this runs while an instance stops."""
    for attempt in range(attempts):
        try:
            volume.delete(0)
            return True
        except Exception as exc:  # libvirtError; a lost connection too
            if attempt + 1 < attempts:
                time.sleep(0.2 * 2 ** attempt)
                continue
            if log is not None:
                with contextlib.suppress(OSError), open(log, "a") as f:
                    f.write(f"# could not delete volume {volume.name()}: {exc}\n")
    return False


_events_lock = threading.Lock()
_events_started = False


def start_event_loop(libvirt: Any) -> None:
    """libvirt's default event loop, run by a thread of its own: the streams below are
    non-blocking and driven by it (blocking stream calls from several threads stall the
    connection's other calls, a domain's destroy among them).  Registered once per
    process, before its first connection, which then also gets keepalive probes."""
    global _events_started
    with _events_lock:
        if _events_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, daemon=True, name="libvirt-events").start()
        _events_started = True


class StreamReader:
    """Reads a non-blocking libvirt stream as the event loop says it is readable, handing
    each piece to deliver(); end() once it ends (EOF, an error, a hang-up) or is closed."""

    def __init__(self, libvirt: Any, stream: Any) -> None:
        self.libvirt = libvirt
        self.stream = stream
        self.ended = threading.Event()
        events = (libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR
                  | libvirt.VIR_STREAM_EVENT_HANGUP)
        stream.eventAddCallback(events, self._readable, None)

    def deliver(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self) -> None:
        """Called once, when the stream ends."""

    def _readable(self, stream: Any, events: int, opaque: Any) -> None:
        while not self.ended.is_set():
            try:
                data = stream.recv(CHUNK)
            except Exception:
                data = b""
            if isinstance(data, int):  # -2: nothing more now
                if events & (self.libvirt.VIR_STREAM_EVENT_ERROR
                             | self.libvirt.VIR_STREAM_EVENT_HANGUP):
                    self._finish()
                return
            if not data:
                self._finish()
                return
            try:
                self.deliver(data)
            except OSError:
                self._finish()
                return

    def _finish(self) -> None:
        if not self.ended.is_set():
            self.ended.set()
            with contextlib.suppress(Exception):
                self.stream.eventRemoveCallback()
            self.end()

    def close(self) -> None:
        self._finish()
        with contextlib.suppress(Exception):
            self.stream.abort()


class ChannelBridge(StreamReader):
    """A libvirt stream (a domain's channel) as one end of a local socket pair: the other
    end (``sock``) is what the agent's Connection uses.  The event loop moves what the
    guest writes to the pair; a thread moves what the Connection writes to the stream."""

    def __init__(self, libvirt: Any, stream: Any, label: str) -> None:
        self.sock, self._peer = socket.socketpair()
        super().__init__(libvirt, stream)
        threading.Thread(target=self._to_guest, daemon=True, name=f"{label}-out").start()

    def deliver(self, data: bytes) -> None:
        self._peer.sendall(data)

    def end(self) -> None:
        with contextlib.suppress(OSError):
            self._peer.shutdown(socket.SHUT_WR)

    def _to_guest(self) -> None:
        try:
            while not self.ended.is_set():
                data = self._peer.recv(CHUNK)
                if not data:
                    break
                send_all(self.stream, data)
        except Exception:
            pass
        self.close()

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            self._peer.close()


class ConsoleReader(StreamReader):
    """A domain's serial console (virDomainOpenConsole) appended to a local file."""

    def __init__(self, libvirt: Any, stream: Any, path: Path) -> None:
        self.out = open(path, "ab")  # noqa: SIM115 - closed by end()
        super().__init__(libvirt, stream)

    def deliver(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()

    def end(self) -> None:
        with contextlib.suppress(OSError):
            self.out.close()


def open_streams(libvirt: Any, conn: Any, dom: Any, port: str, console_log: Path,
                 label: str) -> tuple[ChannelBridge, ConsoleReader]:
    """The domain's agent channel and console, through the connection (non-blocking
    streams: start_event_loop must have run before the connection was opened);
    ProvisionError when libvirt refuses either."""
    reader: ConsoleReader | None = None
    try:
        console = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        dom.openConsole(None, console, 0)
        reader = ConsoleReader(libvirt, console, console_log)
        channel = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        dom.openChannel(port, channel, 0)
        return ChannelBridge(libvirt, channel, label), reader
    except Exception as exc:
        if reader is not None:
            reader.close()
        raise ProvisionError(f"{label}: cannot open the machine's console or its agent's "
                             f"channel through libvirt: {exc}") from None
