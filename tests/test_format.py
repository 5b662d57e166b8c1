"""The .nxkv container on its own: every way a file can be wrong has its own clear error."""

from __future__ import annotations

import json
import struct

import numpy as np
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


def test_concurrent_writers_of_one_file_leave_one_whole_file(tmp_path):
    """Writers racing on one path (two saves of the same prompt, say): a reader always sees one
    writer's whole file, the last rename wins, and no temporary file is left."""
    import threading

    p = tmp_path / "x.nxkv"
    payloads = [bytes([k]) * (256 << 10) for k in range(4)]
    fmt.write_atomic(p, [payloads[0]])
    seen, torn, stop = set(), [], threading.Event()

    def write(k):
        for _ in range(25):
            fmt.write_atomic(p, [payloads[k][: 128 << 10], payloads[k][128 << 10 :]])

    def read():
        while not stop.is_set():
            data = p.read_bytes()
            if data in payloads:
                seen.add(data[0])
            else:  # (an assert here would end only this thread)
                torn.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert not torn, f"readers saw {len(torn)} files that no writer wrote whole (sizes {sorted(set(torn))[:5]} ...)"
    assert p.read_bytes() in payloads and len(seen) >= 2
    assert [x.name for x in tmp_path.iterdir()] == ["x.nxkv"]


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


_FAULTY_WRITER = r"""
import os, resource, signal, sys, time
sys.path.insert(0, {root!r})
from nexus_gguf import format as fmt
if {named!r}:
    fmt._unnamed_file = lambda directory: None  # the portable path: a hidden temporary name
fault = sys.argv[1]

def chunks():
    for i in range(64):
        yield bytes([i]) * 16384
        if fault == "kill" and i == 8:
            print("writing", flush=True)
            time.sleep(600)  # killed here, a quarter of the way through

if fault == "size":  # the kernel refuses writes past 64 KiB: a full disk, seen by the writer
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    fmt.write_atomic({target!r}, chunks())
except OSError as e:
    print("refused", e.errno, flush=True)
"""


def _unnamed_files_supported(tmp_path) -> bool:
    fd = fmt._unnamed_file(str(tmp_path))
    if fd is None:
        return False
    import os

    os.close(fd)
    return True


@pytest.mark.parametrize("named", [False, True], ids=["unnamed-file", "temporary-name"])
@pytest.mark.parametrize("fault", ["size", "kill"])
def test_a_failed_or_killed_writer_keeps_the_old_file(tmp_path, fault, named):
    """Real faults, not a raised exception: the kernel refusing a write past RLIMIT_FSIZE (what a
    full disk looks like to the writer) and SIGKILL in the middle of a file. The target keeps its
    old bytes; nothing is left behind, except a killed writer's hidden temporary file where the
    platform has no unnamed files."""
    import errno
    import os
    import signal
    import subprocess
    import sys

    if not hasattr(signal, "SIGKILL") or sys.platform == "win32":
        pytest.skip("POSIX faults")
    if not named and not _unnamed_files_supported(tmp_path):
        pytest.skip("this file system has no O_TMPFILE")
    target = _file(tmp_path)
    before = target.read_bytes()
    root = os.path.dirname(os.path.dirname(os.path.abspath(fmt.__file__)))
    script = _FAULTY_WRITER.format(root=root, named=named, target=str(target))
    proc = subprocess.Popen([sys.executable, "-c", script, fault], stdout=subprocess.PIPE, text=True)
    if fault == "kill":
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    else:
        out, _ = proc.communicate(timeout=60)
        assert out.split() == ["refused", str(errno.EFBIG)], out
    assert target.read_bytes() == before
    left = sorted(x.name for x in tmp_path.iterdir() if x.name != "x.nxkv")
    if fault == "kill" and named:
        assert len(left) == 1 and left[0].startswith(".x.nxkv.") and left[0].endswith(".tmp"), left
    else:
        assert left == []


def test_spooled_sections_write_what_pack_writes(tmp_path):
    """Sections spooled (in memory, then past the limit in an unnamed file beside the target)
    make the same file bytes as pack, and leave nothing behind."""
    rng = np.random.default_rng(1)
    sections = [(f"s{i}", rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for i, n in enumerate((10, 0, 300000, 70000))]
    with fmt.SpooledSections(max_memory=100000, directory=str(tmp_path)) as spool:
        for name, data in sections:
            spool.add(name, data)
        spooled = b"".join(bytes(b) for b in spool.buffers({"k": 1}))
        with pytest.raises(ValueError, match="unique"):
            spool.add("s0", b"again")
    assert spooled == b"".join(bytes(b) for b in fmt.pack({"k": 1}, sections))
    assert list(tmp_path.iterdir()) == []
