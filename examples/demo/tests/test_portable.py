"""Plain tests: run on the host, or everywhere with `pytest --isolate-env NAME[,NAME]`."""

from demo import crc8, pack_native, word_bits


def test_crc8_known_vector():
    assert crc8(b"123456789") == 0xF4


def test_pack_native_round_trips():
    import struct

    assert struct.unpack("@L", pack_native(0x01020304))[0] == 0x01020304


def test_word_size_is_sane():
    assert word_bits() in (32, 64)
