"""What a user could store instead of a .nxkv file, measured in the same eval run: the raw
llama.cpp state, zstd of it, and the state as llama.cpp writes it from a quantized cache (Q8_0,
Q5_0, Q4_0 rows), with or without the Hadamard rotation llama.cpp applies to quantized caches.

Each baseline turns a raw sequence-state blob into the bytes it would store, and those bytes back
into a blob the context can take (here: the context's own f16/f32 cache types)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import zstandard

from .backends import kernel
from .ggml_types import ggml_type_by_name
from .llama_rotation import llama_rotation_blocks
from .llama_state import Cache, LlamaState, StateLayout, Stream, parse_state, write_state

ZSTD_LEVEL = 3


@dataclass(frozen=True)
class Baseline:
    name: str
    lossless: bool

    def encode(self, blob: bytes, layout: StateLayout) -> bytes:
        raise NotImplementedError

    def decode(self, stored: bytes, original: LlamaState, layout: StateLayout) -> bytes:
        raise NotImplementedError


class RawBaseline(Baseline):
    def encode(self, blob, layout):
        return blob

    def decode(self, stored, original, layout):
        return stored


class ZstdBaseline(Baseline):
    def encode(self, blob, layout):
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(blob)

    def decode(self, stored, original, layout):
        return zstandard.ZstdDecompressor().decompress(stored)


@dataclass(frozen=True)
class GgmlRowsBaseline(Baseline):
    """The blob llama.cpp itself writes for a cache of `cache_type` (with flash attention, so V
    is stored by rows), optionally rotated as llama.cpp rotates quantized caches."""

    cache_type: str = "q8_0"
    hadamard: bool = False
    head_dim_k: int = 0
    head_dim_v: int = 0

    def _rotate(self, x: np.ndarray, kind: str) -> np.ndarray:
        block = llama_rotation_blocks(self.head_dim_k if kind == "k" else self.head_dim_v, kind)
        return kernel("hadamard_blocks")(x, block) if self.hadamard and block else x

    def encode(self, blob, layout):
        t = ggml_type_by_name(self.cache_type)

        def quantize(key, layer):
            k, v = self._rotate(layer.values("k"), "k"), self._rotate(layer.values("v"), "v")
            return layer.with_values(k, v, t, t, v_trans=False)

        return write_state(_map_layers(parse_state(blob, "sequence", layout), quantize))

    def decode(self, stored, original, layout):
        types = {key: layer for key, layer in _layers(original)}

        def restore(key, layer):
            # the rotation is its own inverse
            k, v = self._rotate(layer.values("k"), "k"), self._rotate(layer.values("v"), "v")
            like = types[key]
            return layer.with_values(k, v, like.k_type, like.v_type, like.v_trans)

        return write_state(_map_layers(parse_state(stored, "sequence", layout), restore))


def _layers(state: LlamaState):
    """((cache name, stream index, cache layer), layer) for every stored layer."""
    for c in state.caches:
        for si, s in enumerate(c.streams):
            if s is not None:
                for layer in s.layers:
                    yield (c.name, si, layer.cache_layer), layer


def _map_layers(state: LlamaState, fn) -> LlamaState:
    """A copy of `state` with every layer replaced by fn(key, layer)."""
    caches = []
    for c in state.caches:
        streams = [None if s is None else Stream(s.cells, [fn((c.name, si, layer.cache_layer), layer) for layer in s.layers])
                   for si, s in enumerate(c.streams)]
        caches.append(Cache(c.name, streams))
    return replace(state, caches=caches)


def default_baselines(head_dim_k: int, head_dim_v: int) -> list[Baseline]:
    """raw, zstd, then q8_0 / q5_0 / q4_0 rows each plain and rotated."""
    out: list[Baseline] = [RawBaseline("raw", True), ZstdBaseline("zstd", True)]
    for t in ("q8_0", "q5_0", "q4_0"):
        for rot in (False, True):
            out.append(GgmlRowsBaseline(t + ("+hadamard" if rot else ""), False, t, rot, head_dim_k, head_dim_v))
    return out
