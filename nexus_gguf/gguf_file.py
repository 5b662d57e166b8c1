"""A small, bounds-checked reader for a GGUF file's header: metadata and tensor table.

nexus-gguf needs three things from a model file without loading its weights: a fingerprint
(a hash of everything before the tensor data, so another model or another quantization of the
same model is told apart in milliseconds), the metadata keys llama.cpp reads (RoPE, sliding
window pattern, head sizes), and the tensor table. Spec: ggml's docs/gguf.md."""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from .errors import FormatError

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
# Arrays longer than this (vocabularies, merges) are skipped, not decoded: nothing here needs them.
_MAX_KEPT_ARRAY = 4096


@dataclass
class GgufHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], int]]  # name -> (shape, ggml type id)
    header_bytes: int  # bytes from the start of the file to the end of the tensor table
    fingerprint: str = field(default="")

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, key: str, default: Any = None) -> Any:
        """`{arch}.{key}`, as llama.cpp's LLM_KV names are spelt."""
        return self.metadata.get(f"{self.arch}.{key}", default)


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(f"{self.path}: GGUF header runs past the end of the file")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count > _MAX_KEPT_ARRAY:
                self.skip_array(etype, count)
                return None
            return [self.value(etype) for _ in range(count)]
        raise FormatError(f"{self.path}: unknown GGUF value type {vtype}")

    def skip_array(self, etype: int, count: int) -> None:
        if etype in _SCALARS:
            self.take(struct.calcsize(_SCALARS[etype]) * count)
        elif etype == _STRING:
            for _ in range(count):
                self.take(self.unpack("<Q"))
        else:
            for _ in range(count):
                self.value(etype)


_cache: dict[tuple[str, int, int], GgufHeader] = {}


def read_gguf_header(path: str | os.PathLike) -> GgufHeader:
    """Parse a GGUF file's metadata and tensor table (cached per path, size and mtime)."""
    path = os.fspath(path)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _cache:
        return _cache[key]
    with open(path, "rb") as f:
        if st.st_size < 24:
            raise FormatError(f"{path}: too small to be a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cur = _Cursor(mm, path)
            if cur.take(4) != b"GGUF":
                raise FormatError(f"{path}: not a GGUF file (bad magic)")
            version = cur.unpack("<I")
            if version not in (2, 3):
                raise FormatError(f"{path}: GGUF version {version} is not supported")
            n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                k = cur.string()
                metadata[k] = cur.value(cur.unpack("<I"))
            tensors = {}
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("<I")
                if n_dims > 8:
                    raise FormatError(f"{path}: tensor {name!r} has {n_dims} dimensions")
                shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
                ttype = cur.unpack("<I")
                cur.unpack("<Q")  # offset into the data section
                tensors[name] = (shape, ttype)
            end = cur.pos
            digest = hashlib.blake2b(mm[:end], digest_size=16).hexdigest()
    header = GgufHeader(path, version, metadata, tensors, end, digest)
    _cache[key] = header
    return header


def model_fingerprint(path: str | os.PathLike) -> str:
    """blake2b-128 of the GGUF header (metadata + tensor table): tells models and their
    quantizations apart without hashing gigabytes of weights."""
    return read_gguf_header(path).fingerprint
