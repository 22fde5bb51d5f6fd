"""A tiny library with a portable part and a part whose answers depend on the machine."""

from __future__ import annotations

import struct
import sys


def crc8(data: bytes) -> int:
    """Pure Python, the same everywhere."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def pack_native(value: int) -> bytes:
    """A C unsigned long in native byte order and size: differs between machines."""
    return struct.pack("@L", value)


def word_bits() -> int:
    return struct.calcsize("P") * 8


def describe() -> str:
    return f"{sys.byteorder}-endian, {word_bits()}-bit, python {sys.version_info[0]}.{sys.version_info[1]}"
