"""The .nxkv container on its own: every way a file can be wrong has its own clear error."""

from __future__ import annotations

import json
import struct

import pytest

from nexus_gguf import format as fmt
from nexus_gguf.errors import ChecksumError, FormatError, UnsupportedVersionError


def _file(tmp_path, sections=(("a", b"hello"), ("b", b"world!"))):
    p = tmp_path / "x.nxkv"
    fmt.write_atomic(p, fmt.pack({"k": 1}, sections))
    return p


def test_roundtrip(tmp_path):
    f = fmt.NxkvFile.open(_file(tmp_path))
    assert f.header == {"k": 1}
    assert bytes(f.section("a")) == b"hello" and bytes(f.section("b")) == b"world!"
    f.verify()


def test_empty_and_zero_length_sections(tmp_path):
    f = fmt.NxkvFile.open(_file(tmp_path, [("e", b"")]))
    assert bytes(f.section("e")) == b""
    f = fmt.NxkvFile.open(_file(tmp_path, []))
    assert f.names() == []


def test_bad_magic(tmp_path):
    data = bytearray(_file(tmp_path).read_bytes())
    data[0] ^= 1
    with pytest.raises(FormatError, match="magic"):
        fmt.NxkvFile(bytes(data))


def test_newer_version(tmp_path):
    data = bytearray(_file(tmp_path).read_bytes())
    data[8:12] = struct.pack("<I", fmt.FORMAT_VERSION + 1)
    with pytest.raises(UnsupportedVersionError, match="newer"):
        fmt.NxkvFile(bytes(data))


def test_header_cap(tmp_path):
    data = bytearray(_file(tmp_path).read_bytes())
    data[12:20] = struct.pack("<Q", fmt.MAX_HEADER_BYTES + 1)
    with pytest.raises(FormatError, match="cap"):
        fmt.NxkvFile(bytes(data))


def test_truncation_everywhere(tmp_path):
    data = _file(tmp_path).read_bytes()
    for n in range(len(data)):
        with pytest.raises(FormatError):
            fmt.NxkvFile(data[:n]).verify()


def test_trailing_bytes(tmp_path):
    data = _file(tmp_path).read_bytes()
    with pytest.raises(FormatError, match="unexpected bytes"):
        fmt.NxkvFile(data + b"\0")


def test_every_bit_flip_is_caught(tmp_path):
    data = _file(tmp_path).read_bytes()
    for i in range(len(data)):
        for bit in (0, 7):
            d = bytearray(data)
            d[i] ^= 1 << bit
            with pytest.raises(FormatError):  # ChecksumError and UnsupportedVersionError derive from it
                fmt.NxkvFile(bytes(d)).verify()


def _with_table(table, payload=b"xy"):
    body = json.dumps({"sections": table}).encode()
    head = struct.pack("<8sIQ", fmt.MAGIC, fmt.FORMAT_VERSION, len(body)) + body
    return head + struct.pack("<I", fmt.crc32(head)) + payload


@pytest.mark.parametrize(
    "table, match",
    [
        ([{"name": "a", "offset": 1, "length": 1, "crc32": 0}], "holes"),
        ([{"name": "a", "offset": 0, "length": 3, "crc32": 0}], "truncated"),
        ([{"name": "a", "offset": 0, "length": -1, "crc32": 0}], "invalid"),
        ([{"name": "a", "offset": 0, "length": 1, "crc32": 0}, {"name": "a", "offset": 1, "length": 1, "crc32": 0}], "repeated"),
        ([{"offset": 0, "length": 2, "crc32": 0}], "name"),
        ("nope", "section table"),
    ],
)
def test_bad_section_tables(table, match):
    with pytest.raises(FormatError, match=match):
        fmt.NxkvFile(_with_table(table))


def test_section_checksum(tmp_path):
    data = bytearray(_file(tmp_path).read_bytes())
    data[-1] ^= 0xFF
    f = fmt.NxkvFile(bytes(data))
    assert bytes(f.section("a")) == b"hello"
    with pytest.raises(ChecksumError, match="'b'"):
        f.section("b")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = _file(tmp_path)
    before = p.read_bytes()

    def boom():
        yield b"partial"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        fmt.write_atomic(p, boom())
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["x.nxkv"]  # no temporary file left behind


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    p = tmp_path / "new.nxkv"
    fmt.write_atomic(p, [b"x"])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    p.chmod(0o640)
    fmt.write_atomic(p, [b"y"])
    assert stat.S_IMODE(p.stat().st_mode) == 0o640  # a replaced file keeps its mode
