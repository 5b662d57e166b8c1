"""ggml tensor types a KV cache can hold: the one table of block sizes (as ggml.c's type_traits).

Values are ggml's `enum ggml_type` numbers, which llama.cpp writes into state blobs."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import StateLayoutError


@dataclass(frozen=True)
class GgmlType:
    id: int
    name: str
    block_size: int  # values per block
    type_size: int  # bytes per block
    float_bytes: int  # >0 for plain float types: bytes per value (byte-plane split applies)

    def row_size(self, n_values: int) -> int:
        if n_values % self.block_size:
            raise StateLayoutError(f"{n_values} values is not a whole number of {self.name} blocks")
        return n_values // self.block_size * self.type_size


GGML_TYPES = {
    t.id: t
    for t in (
        GgmlType(0, "f32", 1, 4, 4),
        GgmlType(1, "f16", 1, 2, 2),
        GgmlType(2, "q4_0", 32, 18, 0),
        GgmlType(3, "q4_1", 32, 20, 0),
        GgmlType(6, "q5_0", 32, 22, 0),
        GgmlType(7, "q5_1", 32, 24, 0),
        GgmlType(8, "q8_0", 32, 34, 0),
        GgmlType(20, "iq4_nl", 32, 18, 0),
        GgmlType(30, "bf16", 1, 2, 2),
    )
}
GGML_TYPE_BY_NAME = {t.name: t for t in GGML_TYPES.values()}


def ggml_type(type_id: int) -> GgmlType:
    try:
        return GGML_TYPES[type_id]
    except KeyError:
        raise StateLayoutError(
            f"KV cache tensor of ggml type {type_id}, which is not a cache type nexus-gguf knows "
            f"({', '.join(t.name for t in GGML_TYPES.values())})"
        ) from None


def ggml_type_by_name(name: str) -> GgmlType:
    if not isinstance(name, str):
        raise StateLayoutError(f"a ggml cache type name must be a string, not {name!r}")
    try:
        return GGML_TYPE_BY_NAME[name.lower()]
    except KeyError:
        raise StateLayoutError(f"unknown ggml cache type {name!r}") from None
