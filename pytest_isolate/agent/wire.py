"""What both sides of the boundary run: the frame format and the agent's bootstrap.

The host sends the agent's source (see bundle.py) over the environment's stdin, which
a python3 inside runs with ``BOOTSTRAP``; from then on fds 0/1 carry frames::

    frame := MAGIC(2) channel(u32) json_len(u32) blob_len(u32) json blob

Channel 0 is the agent itself.  Every *worker* -- a forked child with a fresh
copy-on-write root and a PID namespace of its own -- gets a channel chosen by
the host.  The agent relays whole frames between the host and its workers, so
a worker that dies mid-write can never corrupt the host's stream, and a worker
that outlives its deadline is killed together with everything it started.
"""

from __future__ import annotations

import json
import os
import select
import struct
import traceback
from typing import Any, Dict, List, Optional, Tuple

MAGIC = b"PI"
HEADER = struct.Struct(">2sIII")
MAX_JSON = 64 << 20
MAX_BLOB = 1 << 30
PROTOCOL_VERSION = 1
MIN_PYTHON = (3, 9)

#: What the host runs inside an environment: read the agent's source from fd 0 (exact
#: byte counts: a buffered reader would swallow the first frames), then run it.
BOOTSTRAP = (
    "import os\n"
    "def r(n):\n"
    " d=os.read(0,n)\n"
    " if not d:raise SystemExit('pytest-isolate: no agent source on stdin')\n"
    " return d\n"
    "h=b''\n"
    "while h[-1:]!=b'\\n':h+=r(1)\n"
    "n=int(h);s=b''\n"
    "while len(s)<n:s+=r(n-len(s))\n"
    "g={'__name__':'pytest_isolate_agent'}\n"
    "exec(compile(s,'pytest_isolate/agent/bundle','exec'),g)\n"
    "g['main']()\n"
)

Frame = Tuple[int, Dict[str, Any], bytes]


#: The protocol's messages, defined once for both sides: op -> its fields (a request and
#: its answer of the same name share one entry).  message() builds every message;
#: docs/architecture.md ("The protocol") says who sends each and what answers it.
MESSAGES = {op: frozenset(fields.split()) for op, fields in (
    # the host to the agent (channel 0)
    ("hello", "protocol python machine pid uid executable uid_map root_map_problem"),
    ("configure", "settings"),
    ("pytest", "args cwd default_envs ini_names markers plugins deferred"),
    # the files a deferred pytest collects (the host knows them once it collected)
    ("files", "args"),
    ("coverage", "files"),
    ("worker", "ch kind zygote nodeid"),
    ("shutdown", ""),
    ("exec", "argv env cwd timeout"),
    ("preload", ""),
    # the host to a worker
    ("runtest", "nodeid next timeout debug rows cols"),
    ("put", "path"),
    ("get", "path"),
    ("snapshot", "name"),
    ("restore", "name"),
    ("pty", "argv cwd env rows cols term"),
    ("pty-in", ""),
    ("pty-resize", "rows cols"),
    ("close", ""),
    ("kill", "reason"),
    # the host to a zygote; the agent hands a zygote a worker's request as "fork"
    ("ping", ""),
    ("advance", "prev next"),
    ("fork", "ch kind zygote nodeid"),
    # answers and events
    ("ok", ""),
    ("error", "type message traceback"),
    ("result", "returncode stdout_len duration timed_out"),
    ("collected", "nodeids errors missing"),
    # a deferred pytest is configured and waits for its files
    ("waiting", "missing"),
    ("report", "data"),
    ("done", "nodeid reused"),
    ("missing", "nodeid known"),
    ("warning", "message"),
    ("exit", "code reason"),
    ("pong", "per_test"),
    ("advanced", ""),
    ("forked", "ch pid pidfd"),
    ("reaped", "ch pid status"),
    ("pty-started", ""),
    ("pty-out", ""),
    ("pty-exit", "code"),
)}


def message(op: str, **fields: Any) -> Dict[str, Any]:
    """The message op with its fields.  An op or a field MESSAGES does not define fails
    here, at the sender: at the other side it would be a silent None."""
    allowed = MESSAGES.get(op)
    if allowed is None:
        raise ValueError("no message %r in the protocol" % op)
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError("message %r has no field %s" % (op, ", ".join(map(repr, unknown))))
    return dict(op=op, **fields)


def error_message(exc: BaseException) -> Dict[str, Any]:
    """The answer to a request that raised exc (the host raises RemoteError from it)."""
    return message("error", type=type(exc).__name__, message=str(exc),
                   traceback=traceback.format_exc())


class ProtocolError(Exception):
    """A frame that is malformed or larger than allowed; the stream is unusable."""


def encode_frame(ch: int, obj: Dict[str, Any], blob: bytes = b"") -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, ch, len(data), len(blob)) + data + blob


class FrameDecoder:
    """Incremental frame parser; rejects bad magic, oversized frames, non-object JSON."""

    def __init__(self, max_json: int = MAX_JSON, max_blob: int = MAX_BLOB) -> None:
        self._buf = bytearray()
        self.max_json = max_json
        self.max_blob = max_blob
        self._error: Optional[ProtocolError] = None

    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> List[Frame]:
        """The complete frames in the stream so far.  Bad bytes raise ProtocolError, but
        only after the good frames before them were returned (on the next call)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: List[Frame] = []
        while len(self._buf) >= HEADER.size:
            try:
                frame = self._next()
            except ProtocolError as exc:
                if not frames:
                    raise
                self._error = exc
                break
            if frame is None:
                break
            frames.append(frame)
        return frames

    def _next(self) -> Optional[Frame]:
        magic, ch, jlen, blen = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise ProtocolError("bad frame magic %r" % bytes(magic))
        if jlen > self.max_json or blen > self.max_blob:
            raise ProtocolError(
                "oversized frame (json %d bytes, blob %d bytes; limits %d, %d)"
                % (jlen, blen, self.max_json, self.max_blob)
            )
        end = HEADER.size + jlen + blen
        if len(self._buf) < end:
            return None
        try:
            obj = json.loads(bytes(self._buf[HEADER.size : HEADER.size + jlen]))
        except ValueError as exc:
            raise ProtocolError("malformed JSON in frame: %s" % exc) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
            raise ProtocolError("frame is not an object with an 'op'")
        blob = bytes(self._buf[HEADER.size + jlen : end])
        del self._buf[:end]
        return (ch, obj, blob)


def drain(fd: int) -> None:
    """Read a non-blocking wake-up pipe empty (signal.set_wakeup_fd's)."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]

#: the PATH every environment starts with (the launcher, a venv activated inside)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
