"""The framed protocol (agent.wire: encode_frame, FrameDecoder) and a Connection to a real agent."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.agent import wire as agent
from pytest_isolate.agent.wire import HEADER, MAGIC, FrameDecoder, ProtocolError, encode_frame
from pytest_isolate.channel import AgentProcess
from pytest_isolate.errors import AgentLost, AgentTimeout, RemoteError

FRAMES: list[tuple[int, dict[str, Any], bytes]] = [
    (0, {"op": "hello"}, b""),
    (7, {"op": "report", "data": {"nested": [1, 2.5, None, True, "ü"]}}, b""),
    (2**32 - 1, {"op": "put", "path": "/x"}, bytes(range(256)) * 10),
    (3, {"op": "blob-only"}, b"\x00" * 70000),
]


def test_round_trip_with_blobs() -> None:
    stream = b"".join(encode_frame(*f) for f in FRAMES)
    assert FrameDecoder().feed(stream) == FRAMES


def test_header_layout() -> None:
    frame = encode_frame(5, {"op": "x"}, b"abc")
    magic, ch, jlen, blen = HEADER.unpack_from(frame)
    assert (magic, ch, blen) == (MAGIC, 5, 3)
    assert json.loads(frame[HEADER.size:HEADER.size + jlen]) == {"op": "x"}
    assert frame.endswith(b"abc") and len(frame) == HEADER.size + jlen + 3


@pytest.mark.parametrize("chunk", [1, 2, 7, HEADER.size - 1, HEADER.size, HEADER.size + 1, 4096])
def test_split_and_partial_frames(chunk: int) -> None:
    stream = b"".join(encode_frame(*f) for f in FRAMES)
    dec = FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += dec.feed(stream[i:i + chunk])
    assert got == FRAMES
    assert dec.pending() == 0


def test_partial_frame_waits_for_the_rest() -> None:
    frame = encode_frame(1, {"op": "a"}, b"xyz")
    dec = FrameDecoder()
    assert dec.feed(frame[:-1]) == []
    assert dec.pending() == len(frame) - 1
    assert dec.feed(frame[-1:] + frame[:3]) == [(1, {"op": "a"}, b"xyz")]
    assert dec.pending() == 3


def test_bad_magic() -> None:
    with pytest.raises(ProtocolError, match="bad frame magic"):
        FrameDecoder().feed(b"XX" + encode_frame(0, {"op": "a"})[2:])


def test_bad_magic_after_a_good_frame() -> None:
    """The good frame before the garbage is delivered; the error comes with the next read."""
    dec = FrameDecoder()
    good = encode_frame(0, {"op": "a"})
    assert dec.feed(good + b"garbage that is long enough") == [(0, {"op": "a"}, b"")]
    with pytest.raises(ProtocolError, match="bad frame magic"):
        dec.feed(b"")
    with pytest.raises(ProtocolError, match="bad frame magic"):  # and stays broken
        dec.feed(good)


@pytest.mark.parametrize("jlen,blen", [(65, 0), (10, 101)])
def test_oversized_frame_is_rejected_from_its_header(jlen: int, blen: int) -> None:
    dec = FrameDecoder(max_json=64, max_blob=100)
    # only the header: the decoder must not wait for (or buffer) a huge body
    with pytest.raises(ProtocolError, match="oversized frame"):
        dec.feed(HEADER.pack(MAGIC, 0, jlen, blen))


def test_default_limits() -> None:
    with pytest.raises(ProtocolError, match="oversized"):
        FrameDecoder().feed(HEADER.pack(MAGIC, 0, agent.MAX_JSON + 1, 0))
    with pytest.raises(ProtocolError, match="oversized"):
        FrameDecoder().feed(HEADER.pack(MAGIC, 0, 2, agent.MAX_BLOB + 1))


def raw(ch: int, payload: bytes, blob: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, ch, len(payload), len(blob)) + payload + blob


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"op"', b"42", b"null", b'{"no_op": 1}', b'{"op": 3}'])
def test_non_object_json(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="not an object with an 'op'"):
        FrameDecoder().feed(raw(0, payload))


@pytest.mark.parametrize("payload", [b"{", b"\xff\xfe", b""])
def test_malformed_json(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed JSON"):
        FrameDecoder().feed(raw(0, payload))


# ------------------------------------------------------------------ a real agent


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[AgentProcess]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = AgentProcess([sys.executable, "-u", "-c", agent.BOOTSTRAP], tmp_path / "agent.log",
                        "test agent", env=env)
    proc.conn.bootstrap()
    yield proc
    proc.stop()
    assert proc.proc.poll() is not None


def test_agent_hello_exec_and_errors(agent_process: AgentProcess) -> None:
    conn = agent_process.conn
    hello, _ = conn.call(0, {"op": "hello"}, timeout=30)
    assert hello["protocol"] == agent.PROTOCOL_VERSION
    assert hello["python"][:2] == list(sys.version_info[:2])
    assert hello["pid"] == agent_process.proc.pid
    reply, out = conn.call(0, {"op": "exec", "argv": ["cat"], "env": {}, "cwd": None, "timeout": 10},
                           b"blob in\x00")
    assert reply["returncode"] == 0 and out[:reply["stdout_len"]] == b"blob in\x00"
    with pytest.raises(RemoteError, match="unknown op 'frobnicate'"):
        conn.call(0, {"op": "frobnicate"}, timeout=10)
    with pytest.raises(AgentTimeout):
        conn.recv(0, timeout=0.2)
    # still usable after an error and a timeout
    assert conn.call(0, {"op": "hello"}, timeout=10)[0]["op"] == "hello"


def test_agent_stray_prints_do_not_corrupt_the_stream(agent_process: AgentProcess) -> None:
    conn = agent_process.conn
    conn.call(0, {"op": "configure", "settings": {"isolation": "none"}}, timeout=30)
    ch = conn.new_channel()
    conn.send(0, {"op": "worker", "ch": ch, "kind": "sandbox"})
    # a print from the agent process itself would land on fd 1; main() moved it to the log
    reply, out = conn.call(ch, {"op": "exec", "argv": ["sh", "-c", "echo to-stdout"], "env": {},
                                "cwd": None, "timeout": 10}, timeout=30)
    assert out[:reply["stdout_len"]] == b"to-stdout\n"
    conn.send(ch, {"op": "close"})
    assert conn.recv(ch, timeout=10)[0] == {"op": "exit", "code": 0, "reason": None}


def test_agent_garbage_is_fatal_and_reported(agent_process: AgentProcess) -> None:
    conn = agent_process.conn
    conn.call(0, {"op": "hello"}, timeout=30)
    agent.write_all(conn.wfd, b"this is not a frame at all")
    with pytest.raises(AgentLost):
        conn.call(0, {"op": "hello"}, timeout=10)
    agent_process.proc.wait(10)
    assert "bad frame magic" in (agent_process.log_path.read_text())


def test_agent_exits_when_its_input_closes(agent_process: AgentProcess) -> None:
    conn = agent_process.conn
    conn.call(0, {"op": "hello"}, timeout=30)
    assert agent_process.proc.stdin is not None
    agent_process.proc.stdin.close()
    assert agent_process.proc.wait(10) == 0
    with pytest.raises(AgentLost):
        conn.recv(0, timeout=5)
