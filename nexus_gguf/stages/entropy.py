"""Entropy coding of symbol streams, each on its own: rANS with a static frequency table per
stream (stored compactly in front of it), or zstd of the symbols as little-endian integers.

Section layout (all integers little-endian):
    u8 n_streams, then per stream:
    u8 name length, name (ASCII), u8 dtype code, u8 ndim, u32 * ndim shape,
    u8 method (0: zstd, 1: rANS, 2: empty), u32 payload length, payload
    zstd payload: a zstd frame of the values as int8/int16/int32 (u8 width byte first)
    rANS payload: i32 smallest symbol, varint alphabet size, varint * size frequencies
                  (summing to 2^14), then the rANS bytes"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import zstandard

from ..backends import kernel, native_parser
from ..backends.reference import RANS_PROB_BITS
from ..byte_reader import ByteReader
from ..errors import ConfigError, FormatError
from .base import Stage, TensorInfo
from .zstd import decompress_bounded

DTYPES = {0: np.uint8, 1: np.int16, 2: np.uint16, 3: np.int32}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_ALPHABET = 1 << 12  # wider streams (rare outliers) go to zstd
METHOD_ZSTD, METHOD_RANS, METHOD_EMPTY, METHOD_RANS_LANES = 0, 1, 2, 3
MAX_LANES = 4096


def normalized_freqs(counts: np.ndarray, total_bits: int = RANS_PROB_BITS) -> np.ndarray:
    """Frequencies summing to 2^total_bits, each symbol that occurs keeping at least 1."""
    total = 1 << total_bits
    counts = np.asarray(counts, np.int64)
    f = np.where(counts > 0, np.maximum(1, np.round(counts * (total / counts.sum()))), 0).astype(np.int64)
    while f.sum() != total:
        diff = total - f.sum()
        i = int(np.argmax(f))
        step = diff if diff > 0 else max(diff, 1 - f[i])  # never take a symbol below 1
        f[i] += step
        if step == 0:
            raise ValueError("cannot normalise frequencies")  # more symbols than slots
    return f


def _varints(values) -> bytes:
    out = bytearray()
    for v in values:
        v = int(v)
        while True:
            byte = v & 0x7F
            v >>= 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


class Entropy(Stage):
    stage_id = "entropy"
    lossless = True
    kind = "coder"
    PARAMS = {
        "coder": (str, "rans"),
        "level": (int, 3),
        # interleaved rANS: each stream cut into chunks of `chunk` symbols (0: one chunk), each
        # chunk into `lanes` independent rANS states (symbol i to lane i % lanes), so decoders
        # can run lanes and chunks on many threads or GPU threads; 1 lane, 0: the plain stream
        "lanes": (int, 1),
        "chunk": (int, 0),
        # streams of at most this many symbols are coded both ways, rANS and zstd, and stored
        # the smaller (0: rANS wherever the alphabet fits, as files before the option); and
        # uint16 streams (f16 bit patterns: sinks, means, channel scales) are stored as int16,
        # the same bits, so that zstd takes them two bytes a value instead of four. A rANS table
        # costs up to two bytes a symbol of the alphabet: a few hundred f16 values or a single
        # scale cost more than they hold (a 64-token `high` file: sinks and means were 31% of it)
        "small_streams": (int, 0),
    }

    def validate(self) -> None:
        if self.coder not in ("rans", "zstd"):
            raise ConfigError(f"entropy coder must be rans or zstd, got {self.coder!r}")
        if not 1 <= self.level <= 22:
            raise ConfigError("entropy: zstd level must be 1..22")
        if not 1 <= self.lanes <= MAX_LANES or self.chunk < 0 or (self.chunk and self.chunk < self.lanes):
            raise ConfigError(f"entropy: lanes in 1..{MAX_LANES}, chunk 0 or at least lanes")
        if self.small_streams < 0:
            raise ConfigError("entropy: small_streams must be at least 0")

    def _stream(self, values: np.ndarray) -> tuple[int, bytes]:
        flat = values.reshape(-1).astype(np.int64)
        if flat.size == 0:
            return METHOD_EMPTY, b""
        lo, hi = int(flat.min()), int(flat.max())
        if self.coder == "rans" and hi - lo < MAX_ALPHABET:
            counts = np.bincount(flat - lo, minlength=hi - lo + 1)
            freqs = normalized_freqs(counts)
            if self.plain_rans:
                coded = METHOD_RANS, rans_table(lo, freqs) + kernel("rans_encode")(flat - lo, freqs)
            else:
                lengths, body = kernel("rans_encode_lanes")(flat - lo, freqs, self.lanes, self.chunk_of(flat.size))
                coded = METHOD_RANS_LANES, rans_table(lo, freqs) + lanes_table(self.lanes, self.chunk_of(flat.size), lengths) + body
            return self.smaller(flat, *coded)
        return self._zstd(flat)

    def _zstd(self, flat: np.ndarray) -> tuple[int, bytes]:
        """Method 0 of integers of any type: the narrowest signed width that holds them."""
        lo, hi = int(flat.min()), int(flat.max())
        width = next(w for w, t in ((1, np.int8), (2, np.int16), (4, np.int32)) if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)
        raw = flat.astype({1: "<i1", 2: "<i2", 4: "<i4"}[width]).tobytes()
        return METHOD_ZSTD, bytes([width]) + zstandard.ZstdCompressor(level=self.level).compress(raw)

    def smaller(self, values: np.ndarray, method: int, payload: bytes) -> tuple[int, bytes]:
        """(method, payload) of a non-empty stream coded with rANS, or its zstd coding where
        small_streams asks for the smaller and that is it (the GPU encoder's choice too)."""
        flat = np.asarray(values).reshape(-1)
        if not self.small_streams or flat.size > self.small_streams:
            return method, payload
        other = self._zstd(flat)
        return other if len(other[1]) < len(payload) else (method, payload)

    @property
    def plain_rans(self) -> bool:
        """One plain rANS stream (method 1) rather than interleaved lanes (method 3)."""
        return self.lanes == 1 and not self.chunk

    def chunk_of(self, n: int) -> int:
        """Symbols per chunk of an interleaved stream of n symbols."""
        return max(self.chunk or n, self.lanes)

    def stream_record(self, name: str, values: np.ndarray) -> bytes:
        """One stream of the section as stored (coded here)."""
        values = np.asarray(values)
        if np.dtype(values.dtype) not in DTYPE_CODES:
            values = values.astype(np.int32)
        if self.small_streams and values.dtype == np.uint16:
            values = values.view(np.int16)  # f16 bit patterns: the readers take the 16 bits either way
        method, payload = self._stream(values)
        return stream_record(name, values.dtype, values.shape, method, payload)

    def encode(self, symbols: dict, info: TensorInfo) -> np.ndarray:
        parts = [bytes([len(symbols)])] + [self.stream_record(name, values) for name, values in symbols.items()]
        return np.frombuffer(b"".join(parts), np.uint8)

    def streams(self, data: np.ndarray, info: TensorInfo) -> list["CodedStream"]:
        """The section's streams as stored, checked for size but not decoded."""
        data = np.ascontiguousarray(data, np.uint8)
        table = _stream_table_native(data, info)
        if table is not None:
            return [table.stream(i) for i in range(len(table.names))]
        return self._streams_python(data, info)

    def stream_table(self, data: np.ndarray, info: TensorInfo) -> StreamTable:
        """The section's streams as a StreamTable (checked for size as streams() does)."""
        data = np.ascontiguousarray(data, np.uint8)
        table = _stream_table_native(data, info)
        return table if table is not None else StreamTable.of_streams(info, self._streams_python(data, info))

    def _streams_python(self, data: np.ndarray, info: TensorInfo) -> list["CodedStream"]:
        try:
            return self._streams_fast(data, info)
        except (IndexError, struct.error):  # runs out somewhere: the reader below says where
            pass
        return self._streams_read(data, info)

    def _streams_fast(self, data: np.ndarray, info: TensorInfo) -> list["CodedStream"]:
        """_streams_read with plain indexing (a load parses ~1000 streams: the reader's
        bookkeeping was a fifth of a load's Python time); IndexError or struct.error where
        the bytes run out, every other check the same."""
        buf = memoryview(data).cast("B")
        limit = max(info.max_items, 1)
        out = []
        pos = 1
        for _ in range(buf[0]):
            size = buf[pos]
            name = bytes(buf[pos + 1 : pos + 1 + size]).decode("ascii", errors="replace")
            if pos + 1 + size > len(buf):
                raise IndexError
            pos += 1 + size
            code, ndim = buf[pos], buf[pos + 1]
            if code not in DTYPES or ndim > 4:
                raise FormatError(f"{info.name}: stream {name!r} has an unknown dtype or rank")
            shape = struct.unpack_from(f"<{ndim}I", buf, pos + 2)
            pos += 2 + 4 * ndim
            n = math.prod(shape)
            if n > limit:
                raise FormatError(f"{info.name}: stream {name!r} claims {n} values, more than the section can hold")
            method = buf[pos]
            (length,) = struct.unpack_from("<I", buf, pos + 1)
            pos += 5
            if pos + length > len(buf):
                raise IndexError
            out.append(CodedStream(name, DTYPES[code], shape, n, method, buf[pos : pos + length], f"{info.name}/{name}"))
            pos += length
        if pos != len(buf):
            if pos > len(buf):
                raise IndexError
            raise FormatError(f"{info.name}: trailing bytes after the symbol streams")
        return out

    def _streams_read(self, data: np.ndarray, info: TensorInfo) -> list["CodedStream"]:
        r = ByteReader(data, info.name, FormatError)
        limit = max(info.max_items, 1)
        out = []
        for _ in range(r.unpack("<B")):
            name = bytes(r.take(r.unpack("<B"), "stream name")).decode("ascii", errors="replace")
            code, ndim = r.unpack("<BB")
            if code not in DTYPES or ndim > 4:
                raise FormatError(f"{info.name}: stream {name!r} has an unknown dtype or rank")
            shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim))
            n = math.prod(shape)  # exact (numpy's int64 product wraps for four large dimensions)
            if n > limit:
                raise FormatError(f"{info.name}: stream {name!r} claims {n} values, more than the section can hold")
            method = r.unpack("<B")
            payload = r.take(r.unpack("<I"))
            out.append(CodedStream(name, DTYPES[code], shape, n, method, payload, f"{info.name}/{name}"))
        if r.remaining():
            raise FormatError(f"{info.name}: trailing bytes after the symbol streams")
        return out

    def decode(self, data: np.ndarray, info: TensorInfo) -> dict:
        return {s.name: s.decode() for s in self.streams(data, info)}


def check_fits(values: np.ndarray, kind: np.dtype, where: str) -> None:
    """FormatError unless every decoded value fits the stream's integer type: a damaged table
    can decode to values the type cannot hold, refused, not wrapped around (a coset of 256 is
    not a coset of 0)."""
    if values.size:
        check_range(int(values.min()), int(values.max()), kind, where)


def check_range(lo: int, hi: int, kind: np.dtype, where: str) -> None:
    """check_fits for values from lo to hi (already known)."""
    limits = np.iinfo(kind)
    if lo < limits.min or hi > limits.max:
        raise FormatError(f"{where}: values outside the stream's type {kind.name}")


# columns of a StreamTable's records (nxkv_stream_info in native/include/nxkv.h, in order)
(REC_NAME_AT, REC_NAME_SIZE, REC_DTYPE, REC_NDIM, REC_SHAPE, REC_N, REC_METHOD, REC_AT, REC_SIZE, REC_RANS_OK, REC_LO,
 REC_FREQ0, REC_N_FREQS, REC_LANES, REC_CHUNK, REC_LENGTH0, REC_N_LENGTHS, REC_BODY_AT, REC_BODY_SIZE) = (
    0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21)
N_RECORD_FIELDS = 22


class StreamTable:
    """A section's streams as arrays, for decoders that register hundreds of rANS streams at once
    (section_decode.py: about 60 a section with component classes and step buckets) without a
    Python object each: records (int64, a row per stream, the REC_* columns), values (the rANS
    frequencies and lane lengths the rows index), payload (the bytes their body offsets index).
    A stream's CodedStream is made when asked for (table[name]). A rANS row with rans_ok 0 has
    a table the Python reader refuses: decode() says why."""

    def __init__(self, info: TensorInfo, names: list[str], records: np.ndarray, values: np.ndarray, payload: np.ndarray,
                 make: Callable[[int], "CodedStream"]):
        self.info, self.names, self.records, self.values, self.payload = info, names, records, values, payload
        self.index = {name: i for i, name in enumerate(names)}
        self._make = make
        self._made: dict[int, CodedStream] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __getitem__(self, name: str) -> "CodedStream":
        return self.stream(self.index[name])

    def stream(self, i: int) -> "CodedStream":
        if i not in self._made:
            self._made[i] = self._make(i)
        return self._made[i]

    def shape(self, i: int) -> tuple:
        return tuple(self.records[i, REC_SHAPE : REC_SHAPE + self.records[i, REC_NDIM]].tolist())

    def where(self, i: int) -> str:
        return f"{self.info.name}/{self.names[i]}"

    @classmethod
    def of_streams(cls, info: TensorInfo, streams: list["CodedStream"]) -> "StreamTable":
        """The table of streams the Python readers parsed (no native library): each rANS table
        parsed here, its body copied into the payload."""
        records = np.zeros((len(streams), N_RECORD_FIELDS), np.int64)
        values, bodies, at = [], [], 0
        n_values = 0
        for i, s in enumerate(streams):
            r = records[i]
            r[REC_DTYPE], r[REC_NDIM], r[REC_N], r[REC_METHOD] = DTYPE_CODES[np.dtype(s.dtype)], len(s.shape), s.n, s.method
            r[REC_SHAPE : REC_SHAPE + len(s.shape)] = s.shape
            if s.method not in (METHOD_RANS, METHOD_RANS_LANES):
                continue
            try:
                p = s.rans()
            except FormatError:
                continue  # rans_ok 0: decode() raises this again, where it is decoded
            body = np.frombuffer(p.body, np.uint8)
            r[REC_RANS_OK], r[REC_LO], r[REC_LANES], r[REC_CHUNK] = 1, p.lo, p.lanes, p.chunk
            r[REC_FREQ0], r[REC_N_FREQS], r[REC_LENGTH0], r[REC_N_LENGTHS] = n_values, p.freqs.size, n_values + p.freqs.size, p.lengths.size
            r[REC_BODY_AT], r[REC_BODY_SIZE] = at, body.size
            values += [p.freqs, p.lengths]
            n_values += p.freqs.size + p.lengths.size
            bodies.append(body)
            at += body.size
        join = np.concatenate
        return cls(info, [s.name for s in streams], records, join(values).astype(np.int64) if values else np.zeros(0, np.int64),
                   join(bodies) if bodies else np.zeros(0, np.uint8), streams.__getitem__)


def _stream_table_native(data: np.ndarray, info: TensorInfo) -> Optional[StreamTable]:
    """The section's StreamTable by the C library (nxkv_parse_streams: the records and every
    rANS table in one call), or None where the library is not in use or the bytes are not sound
    (the Python readers then say why)."""
    parse = native_parser()
    if parse is None:
        return None
    got = parse(data, max(info.max_items, 1))
    if got is None:
        return None
    records, values = got
    if records.size and not 0 <= int(records[:, REC_DTYPE].min()) <= int(records[:, REC_DTYPE].max()) < len(DTYPES):
        return None  # (DTYPES are the codes 0..3)
    buf = memoryview(data).cast("B")
    # each name decoded from its own bytes (a copy of their span was a copy of the section)
    names = [str(buf[at : at + size], "ascii", "replace")
             for at, size in zip(records[:, REC_NAME_AT].tolist(), records[:, REC_NAME_SIZE].tolist())]

    def make(i: int) -> "CodedStream":
        (code, ndim, d0, d1, d2, d3, n, method, at, size, rans_ok, lo, freq0, n_freqs, lanes, chunk, length0, n_lengths,
         body_at, body_size) = records[i, REC_DTYPE:].tolist()
        parsed = None
        if rans_ok:
            parsed = RansPayload(lo, values[freq0 : freq0 + n_freqs], lanes, chunk, values[length0 : length0 + n_lengths],
                                 buf[body_at : body_at + body_size])
        return CodedStream(names[i], DTYPES[code], (d0, d1, d2, d3)[:ndim], n, method, buf[at : at + size], f"{info.name}/{names[i]}",
                           parsed)

    return StreamTable(info, names, records, values, data, make)


@dataclass(frozen=True)
class RansPayload:
    """A rANS stream's table and bytes as stored: symbol i = index + lo; interleaved in lanes of
    chunks (a plain stream is one lane of one chunk)."""

    lo: int
    freqs: np.ndarray  # int64, summing to 2^14
    lanes: int
    chunk: int
    lengths: np.ndarray  # int64 byte length per (chunk, lane)
    body: memoryview  # of the section's bytes (no copy)


@dataclass(frozen=True)
class CodedStream:
    name: str
    dtype: type
    shape: tuple
    n: int
    method: int
    payload: bytes
    where: str
    parsed: Optional[RansPayload] = field(default=None, compare=False, repr=False)  # rans(), where already parsed

    def rans(self) -> RansPayload:
        """The parsed rANS payload (method rANS or interleaved rANS)."""
        if self.parsed is not None:
            return self.parsed
        r = ByteReader(self.payload, self.where, FormatError)
        lo = r.unpack("<i")
        size = r.varint()
        if not 0 < size <= MAX_ALPHABET:
            raise FormatError(f"{self.where}: rANS alphabet of {size} symbols")
        freqs = r.varints(size, "frequency")
        if freqs.sum() != 1 << RANS_PROB_BITS:
            raise FormatError(f"{self.where}: rANS frequencies do not sum to 2^{RANS_PROB_BITS}")
        if self.method == METHOD_RANS:
            body = self.payload[r.pos :]
            return RansPayload(lo, freqs, 1, max(self.n, 1), np.array([len(body)] if self.n else [], np.int64), body)
        lanes, chunk = r.varint("lane count"), r.varint("chunk size")
        if not 1 <= lanes <= MAX_LANES or chunk < lanes:
            raise FormatError(f"{self.where}: {lanes} lanes in chunks of {chunk} symbols")
        n_tasks = (-(-self.n // chunk) if self.n else 0) * lanes  # at most n + lanes: chunk >= lanes
        lengths = r.varints(n_tasks, "lane length")
        return RansPayload(lo, freqs, lanes, chunk, lengths, r.take(r.remaining(), "lanes"))

    def decode(self) -> np.ndarray:
        values = self._values()
        kind = np.dtype(self.dtype)
        if not np.can_cast(values.dtype, kind):  # (a narrower stored width always fits)
            check_fits(values, kind, self.where)
        return values.astype(kind, copy=not values.flags.writeable).reshape(self.shape)  # zstd's are read-only views

    def _values(self) -> np.ndarray:
        method, payload, n, where = self.method, self.payload, self.n, self.where
        if method == METHOD_EMPTY:
            if n:
                raise FormatError(f"{where}: empty stream with {n} values")
            return np.zeros(0, np.int64)
        if method == METHOD_ZSTD:
            return zstd_values(payload, n, where)
        if method in (METHOD_RANS, METHOD_RANS_LANES):
            p = self.rans()
            try:
                if method == METHOD_RANS_LANES:
                    # lanes are independent: the native kernel decodes chunks on all cores
                    symbols = kernel("rans_decode_lanes")(bytes(p.body), p.lengths, p.freqs, n, p.lanes, p.chunk)
                else:
                    symbols = kernel("rans_decode")(bytes(p.body), p.freqs, n)
            except ValueError as e:
                raise FormatError(f"{where}: {e}") from None
            return _offset(symbols, p.lo, p.freqs.size)
        raise FormatError(f"{where}: unknown coding method {method}")


_ZSTD_WIDTHS = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}


def zstd_values(payload, n: int, where: str) -> np.ndarray:
    """The n values of a zstd-coded stream's payload (its integer width in bytes, then one zstd
    frame), read-only, of that width's signed type."""
    if not len(payload):
        raise FormatError(f"{where}: data needs 1 bytes at offset 0, 0 left")  # (as ByteReader says it)
    width = payload[0]
    if width not in _ZSTD_WIDTHS:
        raise FormatError(f"{where}: bad integer width {width}")
    raw = decompress_bounded(payload[1:], n * width, where)
    if len(raw) != n * width:
        raise FormatError(f"{where}: zstd stream holds {len(raw)} bytes, expected {n * width}")
    return np.frombuffer(raw, _ZSTD_WIDTHS[width])


def _offset(symbols: np.ndarray, lo: int, size: int) -> np.ndarray:
    """Symbol indices (int32) + lo: in place where every value stays within int32 (the symbols
    are below `size`), else in int64 (only a damaged table's lo is that large)."""
    if lo and -(1 << 31) <= lo and lo + size <= 1 << 31:
        symbols += np.int32(lo)
        return symbols
    return symbols.astype(np.int64) + lo if lo else symbols


def stream_record(name: str, dtype, shape: tuple, method: int, payload: bytes) -> bytes:
    """A stream's bytes in the section (the layout in this module's docstring)."""
    key = name.encode("ascii")
    return b"".join([bytes([len(key)]), key, bytes([DTYPE_CODES[np.dtype(dtype)], len(shape)]),
                     struct.pack(f"<{len(shape)}I", *shape), bytes([method]), struct.pack("<I", len(payload)), payload])


def rans_table(lo: int, freqs: np.ndarray) -> bytes:
    """A rANS payload's start: i32 smallest symbol, varint alphabet size, varint frequencies."""
    return struct.pack("<i", lo) + _varints([len(freqs)]) + _varints(freqs)


def lanes_table(lanes: int, chunk: int, lengths) -> bytes:
    """Interleaved rANS after the table: varint lanes, varint chunk, one varint byte length per
    (chunk, lane); the lanes' plain rANS streams follow in (chunk, lane) order."""
    return _varints([lanes, chunk]) + _varints(lengths)
