"""The .nxkv container: reader and writer. The spec is docs/FORMAT.md; keep the two in step.

    magic      8 bytes   b"NXKV\\r\\n\\x1a\\n"
    version    u32 LE    FORMAT_VERSION
    header_len u64 LE    length of the JSON header, at most MAX_HEADER_BYTES
    header     JSON      UTF-8 object; its "sections" list describes the data area
    header_crc u32 LE    CRC-32 of every byte before it
    data       sections back to back, in the order of "sections", no holes, ending at EOF

Each section entry: {"name": str, "offset": int, "length": int, "crc32": int}, offsets relative
to the start of the data area. This module knows nothing of what sections mean."""

from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import ChecksumError, FormatError, UnsupportedVersionError

MAGIC = b"NXKV\r\n\x1a\n"
# 2: the `high` preset's PCA transform and component classes (docs/FORMAT.md, "Version 2")
FORMAT_VERSION = 2
MAX_HEADER_BYTES = 16 << 20
_PRELUDE = struct.Struct("<8sIQ")


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def pack(header: Mapping[str, Any], sections: Iterable[tuple[str, bytes]]) -> list:
    """The file as a list of buffers (header first); `header` must not hold "sections"."""
    table, payloads, offset = [], [], 0
    for name, data in sections:
        data = memoryview(data).cast("B")
        table.append({"name": name, "offset": offset, "length": len(data), "crc32": crc32(data)})
        payloads.append(data)
        offset += len(data)
    if len({t["name"] for t in table}) != len(table):
        raise ValueError("section names must be unique")
    return [_file_head(header, table)] + payloads


def _file_head(header: Mapping[str, Any], table: list) -> bytes:
    """Prelude, JSON header with the section table, header CRC."""
    if "sections" in header:
        raise ValueError("the section table is written by format.pack")
    body = json.dumps({**header, "sections": table}, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(body)} bytes exceeds the {MAX_HEADER_BYTES}-byte cap")
    head = _PRELUDE.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    return head + struct.pack("<I", crc32(head))


class SpooledSections:
    """Sections as an encoder makes them, with the table `pack` would write: kept in memory up
    to `max_memory` bytes, beyond that in an unnamed temporary file in `directory` (the
    target's, so a large state is not held twice in memory nor put on a RAM-backed /tmp)."""

    _CHUNK = 4 << 20

    def __init__(self, max_memory: int, directory: str | None = None, target: str = "the file"):
        self._spool = tempfile.SpooledTemporaryFile(max_size=max_memory, dir=directory)
        self._target = target
        self.table: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._offset = 0

    def add(self, name: str, data) -> None:
        data = memoryview(data).cast("B")
        if name in self._names:
            raise ValueError("section names must be unique")
        self._names.add(name)
        self.table.append({"name": name, "offset": self._offset, "length": len(data), "crc32": crc32(data)})
        try:
            self._spool.write(data)
        except OSError as e:  # a full disk: say what was being written, and that nothing was replaced
            raise OSError(e.errno, f"cannot write {self._target}: {e.strerror or e} (spooling its sections); "
                                   "nothing was replaced") from e
        self._offset += len(data)

    def buffers(self, header: Mapping[str, Any]) -> Iterable:
        """The whole file, header first, in pieces of at most a few MiB after it."""
        yield _file_head(header, self.table)
        self._spool.seek(0)
        while True:
            chunk = self._spool.read(self._CHUNK)
            if not chunk:
                break
            yield chunk

    def close(self) -> None:
        self._spool.close()

    def __enter__(self) -> "SpooledSections":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_atomic(path: str | os.PathLike, buffers: Iterable) -> int:
    """Write buffers to path so that readers see the old file or the whole new one, never a
    part: a new file in the same directory, fsync, rename over path, fsync of the directory.
    On Linux the new file has no name until it is whole (O_TMPFILE), so a writer killed or out of
    disk mid-file leaves nothing behind; elsewhere a hidden temporary name, removed on errors."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):  # else the error would name the hidden temporary file
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: no directory {directory}", path)
    # the mode a plain open() would give, or the mode of the file this replaces (mkstemp: 0600)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd = _unnamed_file(directory)
    unnamed, tmp = fd is not None, None  # an unnamed file gets its temporary name once whole
    if not unnamed:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    n = 0
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            for b in buffers:
                f.write(b)
                n += len(b)
            f.flush()
            os.fsync(f.fileno())
            if unnamed:  # name it only now that it is whole
                tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
                _link_unnamed(f.fileno(), tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and e.errno is not None:  # a full disk: say which file, and that the old one stays
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; nothing was replaced") from e
        raise
    try:  # make the rename itself durable; not possible on every platform
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return n


def _unnamed_file(directory: str):
    """A file descriptor of a new file without a name in `directory` (Linux O_TMPFILE), or None
    where the platform or file system has none."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError:  # EOPNOTSUPP / EISDIR / EINVAL: the file system cannot
        return None


def _link_unnamed(fd: int, name: str) -> None:
    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, as open(2) describes for O_TMPFILE; a
    # src_dir_fd makes Python call linkat rather than link, which would not follow the link
    root = os.open("/", os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)


@dataclass
class Section:
    name: str
    offset: int
    length: int
    crc32: int


class NxkvFile:
    """A parsed, bounds-checked .nxkv file. Section bytes are checked against their CRC on every
    access (`section`) or all at once (`verify`). Local files are read a section at a time as
    asked for (os.pread: safe from threads, and memory holds what is being decoded, not the
    file); remote ones (fsspec URLs, storage.py) the same, one range after another, each
    section kept once read. Close with close() or a `with` block (or let it be collected)."""

    def __init__(self, buf, source: str = "<bytes>"):
        self.source = source
        self._buf = memoryview(buf).cast("B")
        self._size = len(self._buf)
        self._read = lambda offset, n: self._buf[offset : offset + n]
        self._close = None
        self._keep = True  # in memory already: keeping a checked section costs nothing
        self.concurrent_reads = True
        self.header, self.sections, self._data_start = _parse(self._buf, source)
        self._verified: dict[str, memoryview] = {}  # sections whose CRC was already checked

    @classmethod
    def open(cls, path: str | os.PathLike) -> "NxkvFile":
        from . import storage

        path = os.fspath(path)
        if storage.is_url(path):
            handle, size = storage.open_read(path)
            return cls._from_reader(path, _handle_reader(path, handle), size, handle.close, keep=True, concurrent=False)
        if not hasattr(os, "pread"):  # Windows: read it whole
            with open(path, "rb") as f:
                return cls(f.read(), path)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            return cls._from_reader(path, _pread_reader(path, fd), size, lambda: os.close(fd), keep=False, concurrent=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _from_reader(cls, source: str, read, size: int, close, keep: bool, concurrent: bool) -> "NxkvFile":
        self = cls.__new__(cls)
        self.source, self._size, self._read, self._close = source, size, read, close
        self._keep, self.concurrent_reads = keep, concurrent
        self._verified = {}
        self.header, self.sections, self._data_start = _parse(_head(read, size), source, size)
        return self

    def close(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            close()

    def __enter__(self) -> "NxkvFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing to report to at collection time
            pass

    @property
    def file_bytes(self) -> int:
        return self._size

    def names(self) -> list[str]:
        return list(self.sections)

    def section(self, name: str) -> memoryview:
        if name in self._verified:
            return self._verified[name]
        try:
            s = self.sections[name]
        except KeyError:
            raise FormatError(f"{self.source}: no section {name!r}") from None
        data = self._read(self._data_start + s.offset, s.length)
        if crc32(data) != s.crc32:
            raise ChecksumError(f"{self.source}: section {name!r} is damaged (CRC mismatch)")
        if self._keep:
            self._verified[name] = data
        return data

    def verify(self) -> None:
        """Check every section's CRC (a local file's sections are read, checked and let go)."""
        for name in self.sections:
            self.section(name)


def _pread_reader(source: str, fd: int):
    def read(offset: int, n: int) -> memoryview:
        parts, got = [], 0
        while got < n:  # one read returns at most about 2 GiB on Linux
            b = os.pread(fd, n - got, offset + got)
            if not b:
                raise FormatError(f"{source}: {n} bytes at offset {offset} could not be read (the file is shorter)")
            parts.append(b)
            got += len(b)
        return memoryview(parts[0] if len(parts) == 1 else b"".join(parts))

    return read


def _handle_reader(source: str, handle):
    def read(offset: int, n: int) -> memoryview:
        handle.seek(offset)
        data = handle.read(n)
        if len(data) != n:
            raise FormatError(f"{source}: {n} bytes at offset {offset} could not be read (the file is shorter)")
        return memoryview(data)

    return read


def _head(read, size: int) -> memoryview:
    """The prelude, header and header CRC, read with read(offset, n) from a file of `size`
    bytes (only as much as the prelude says, bounded by the cap and the size)."""
    if size < _PRELUDE.size:
        return read(0, size)
    prelude = bytes(read(0, _PRELUDE.size))
    n = _PRELUDE.unpack(prelude)[2]
    n = n + 4 if n + 4 <= min(MAX_HEADER_BYTES + 4, size - _PRELUDE.size) else 0  # _parse reports a bad length
    return memoryview(prelude + bytes(read(_PRELUDE.size, n)))


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Section], int]:
    """(header, section table, file size) of a .nxkv file, reading only its header bytes (a
    remote file too). The same checks as NxkvFile apply, except that section CRCs are not checked."""
    from . import storage

    path = os.fspath(path)
    if storage.is_url(path):
        handle, size = storage.open_read(path)
    else:
        handle = open(path, "rb")
        size = os.fstat(handle.fileno()).st_size
    with handle:
        def read(offset: int, n: int) -> memoryview:
            handle.seek(offset)
            return memoryview(handle.read(n))

        header, sections, _ = _parse(_head(read, size), path, size)
    return header, sections, size


def _parse(buf: memoryview, source: str, total: int | None = None):
    """Parse the header in buf; `total` is the file's size when buf holds only its start."""
    total = len(buf) if total is None else total
    if len(buf) < _PRELUDE.size:
        raise FormatError(f"{source}: {len(buf)} bytes is too short for a .nxkv file")
    magic, version, header_len = _PRELUDE.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FormatError(f"{source}: not a .nxkv file (bad magic)")
    if version > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{source}: format version {version} is newer than this nexus-gguf reads ({FORMAT_VERSION}); upgrade nexus-gguf"
        )
    if version < 1:
        raise FormatError(f"{source}: invalid format version {version}")
    if header_len > MAX_HEADER_BYTES:
        raise FormatError(f"{source}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap")
    end = _PRELUDE.size + header_len
    if end + 4 > len(buf):
        raise FormatError(f"{source}: file is truncated inside its header")
    (stored_crc,) = struct.unpack_from("<I", buf, end)
    if crc32(buf[:end]) != stored_crc:
        raise ChecksumError(f"{source}: header is damaged (CRC mismatch)")
    try:
        header = json.loads(bytes(buf[_PRELUDE.size : end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{source}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("sections"), list):
        raise FormatError(f"{source}: header has no section table")
    data_start = end + 4
    data_len = total - data_start
    sections: dict[str, Section] = {}
    expected = 0
    for i, s in enumerate(header.pop("sections")):
        if not isinstance(s, dict):
            raise FormatError(f"{source}: section entry {i} is not an object")
        name, off, length, c = s.get("name"), s.get("offset"), s.get("length"), s.get("crc32")
        if not isinstance(name, str) or name in sections:
            raise FormatError(f"{source}: section {i} has a missing or repeated name")
        for v in (off, length, c):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FormatError(f"{source}: section {name!r} has an invalid offset, length or CRC")
        if off != expected:
            raise FormatError(f"{source}: section {name!r} starts at {off}, expected {expected} (holes or overlap)")
        if off + length > data_len:
            raise FormatError(f"{source}: file is truncated: section {name!r} ends past the end of the file")
        expected = off + length
        sections[name] = Section(name, off, length, c)
    if expected != data_len:
        raise FormatError(f"{source}: {data_len - expected} unexpected bytes after the last section")
    return header, sections, data_start
