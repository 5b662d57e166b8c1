"""One bounds-checked reader for the little-endian binary layouts nexus-gguf parses (llama.cpp
state blobs, entropy-coded sections, GGUF headers): every read says what it reads, and running
past the end raises the caller's error type with that name instead of an IndexError."""

from __future__ import annotations

import struct

import numpy as np


class ByteReader:
    def __init__(self, data, where: str, error: type[Exception]):
        self.buf = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        self.pos = 0
        self.where = where
        self.error = error

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str = "data") -> memoryview:
        if n < 0 or n > self.remaining():
            raise self.error(f"{self.where}: {what} needs {n} bytes at offset {self.pos}, {self.remaining()} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str = "data"):
        """struct.unpack of `fmt` (little-endian unless it says otherwise): one value or a tuple."""
        fmt = fmt if fmt[0] in "<>=!@" else "<" + fmt
        v = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))
        return v[0] if len(v) == 1 else v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def i32(self, what: str) -> int:
        return self.unpack("<i", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def array(self, n_bytes: int, what: str) -> np.ndarray:
        """The next n_bytes as a uint8 view (no copy)."""
        start = self.pos
        self.take(n_bytes, what)
        return np.frombuffer(self.buf, dtype=np.uint8, count=n_bytes, offset=start)

    def varint(self, what: str = "varint") -> int:
        """LEB128, at most 35 bits."""
        v, shift = 0, 0
        while True:
            b = self.take(1, what)[0]
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v
            shift += 7
            if shift > 35:
                raise self.error(f"{self.where}: {what} is not a valid varint")

    def _few_varints(self, count: int, what: str) -> np.ndarray:
        buf, pos, end = self.buf, self.pos, len(self.buf)
        out = [0] * count
        for i in range(count):
            v = shift = 0
            while True:
                if pos >= end:
                    raise self.error(f"{self.where}: {what}s need more bytes than the {end - self.pos} left at offset {self.pos}")
                b = buf[pos]
                pos += 1
                v |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
                if shift > 35:
                    raise self.error(f"{self.where}: {what} is not a valid varint")
            out[i] = v
        self.pos = pos
        return np.array(out, np.int64)

    def varints(self, count: int, what: str = "varint") -> np.ndarray:
        """`count` LEB128 values as int64, accepting exactly what varint() accepts (at most six
        bytes each), vectorised: lane tables of chunked streams hold one per (chunk, lane), tens
        of thousands."""
        if count <= 0:
            return np.zeros(0, np.int64)
        if count <= 64:  # a rANS table or a short lane table: a byte loop beats numpy's overhead
            return self._few_varints(count, what)
        rest = np.frombuffer(self.buf, np.uint8, offset=self.pos)[: 6 * count]  # the longest they can take
        ends = np.flatnonzero(rest < 0x80)[:count]
        if ends.size < count:
            raise self.error(f"{self.where}: {what}s need more bytes than the {rest.size} left at offset {self.pos}")
        starts = np.concatenate([[0], ends[:-1] + 1])
        lengths = ends - starts + 1
        if int(lengths.max()) > 6:
            raise self.error(f"{self.where}: {what} is not a valid varint")
        used = int(ends[-1]) + 1
        shift = 7 * (np.arange(used) - np.repeat(starts, lengths))
        values = np.add.reduceat((rest[:used].astype(np.int64) & 0x7F) << shift, starts)
        self.pos += used
        return values
