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

from .byte_reader import ByteReader
from .errors import FormatError

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
# Arrays longer than this (vocabularies, merges) are skipped, not decoded: nothing here needs them.
_MAX_KEPT_ARRAY = 4096


# ggml's `enum ggml_type` (ggml.h), for naming a model's weight types in messages.
WEIGHT_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0", 42: "Q2_0",
}


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

    @property
    def weight_types(self) -> str:
        """The matrices' ggml types, most values first ("Q4_1+Q6_K"): what tells two
        quantizations of one model apart in a message (1-D norms and biases are left out)."""
        counts: dict[str, int] = {}
        for shape, type_id in self.tensors.values():
            if len(shape) >= 2:
                name = WEIGHT_TYPE_NAMES.get(type_id, f"type {type_id}")
                n = 1
                for d in shape:
                    n *= d
                counts[name] = counts.get(name, 0) + n
        return "+".join(sorted(counts, key=lambda k: -counts[k])) or "?"


class _GgufReader(ByteReader):
    """ByteReader plus GGUF's typed values (strings, arrays)."""

    def string(self) -> str:
        n = self.unpack("<Q", "string length")
        return bytes(self.take(n, "string")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], "value")
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I", "array type"), self.unpack("<Q", "array length")
            if count > _MAX_KEPT_ARRAY:
                self.skip_array(etype, count)
                return None
            return [self.value(etype) for _ in range(count)]
        raise FormatError(f"{self.where}: unknown GGUF value type {vtype}")

    def skip_array(self, etype: int, count: int) -> None:
        if etype in _SCALARS:
            self.take(struct.calcsize(_SCALARS[etype]) * count, "array")
        elif etype == _STRING:
            # a vocabulary or merges: ~50k strings, walked by their lengths alone (through
            # ByteReader one by one they were most of the first load's 0.1-0.2 s of parsing)
            buf, pos, end = self.buf, self.pos, len(self.buf)
            length = _U64.unpack_from
            for _ in range(count):
                if pos + 8 > end:
                    break
                pos += 8 + length(buf, pos)[0]
            else:
                if pos <= end:
                    self.pos = pos
                    return
            self.pos = min(pos, end)
            raise FormatError(f"{self.where}: a string array runs past the end of the file")
        else:
            for _ in range(count):
                self.value(etype)


def _parse(cur: _GgufReader, path: str):
    """(metadata, tensor table, version, bytes up to the end of the tensor table)."""
    if bytes(cur.take(4, "magic")) != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (bad magic)")
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported")
    n_tensors, n_kv = cur.unpack("<Q", "tensor count"), cur.unpack("<Q", "metadata count")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        k = cur.string()
        metadata[k] = cur.value(cur.unpack("<I", "value type"))
    tensors = {}
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I", "tensor rank")
        if n_dims > 8:
            raise FormatError(f"{path}: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.unpack("<Q", "tensor shape") for _ in range(n_dims))
        ttype = cur.unpack("<I", "tensor type")
        cur.unpack("<Q", "tensor offset")  # into the data section
        tensors[name] = (shape, ttype)
    return metadata, tensors, version, cur.pos


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
            view = memoryview(mm)
            try:
                metadata, tensors, version, end = _parse(_GgufReader(view, path, FormatError), path)
                digest = hashlib.blake2b(view[:end], digest_size=16).hexdigest()
            finally:
                view.release()  # the mmap cannot close while a view of it is alive
    header = GgufHeader(path, version, metadata, tensors, end, digest)
    _cache[key] = header
    return header

