"""A state rewritten for a context with other cache types or another V layout: f16 saved, q8_0
restored, flash attention on at save and off at load, and so on. Rows are read as floats,
llama.cpp's rotation of quantized caches undone for the source type and applied for the target
one, and written back in the target type and layout. Costs what the target type costs (README,
"Cache types"); a conversion to the same type and layout changes nothing."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .ggml_types import GgmlType
from .llama_rotation import llama_rotation, toggle_llama_rotation
from .errors import StateLayoutError
from .llama_state import Cache, LayerKV, LlamaState, Stream


def _layer(layer: LayerKV, k_type: GgmlType, v_type: GgmlType, v_trans: bool, rot_k: int, rot_v: int) -> LayerKV:
    if (layer.k_type, layer.v_type, layer.v_trans) == (k_type, v_type, v_trans):
        return layer
    k = toggle_llama_rotation(toggle_llama_rotation(layer.values("k"), layer.k_type, rot_k), k_type, rot_k)
    v = toggle_llama_rotation(toggle_llama_rotation(layer.values("v"), layer.v_type, rot_v), v_type, rot_v)
    return layer.with_values(k, v, k_type, v_type, v_trans)


def convert_state(state: LlamaState, k_type: GgmlType, v_type: GgmlType, v_trans: bool, head_dim_k: int,
                  head_dim_v: int) -> LlamaState:
    """`state` with every layer held as k_type / v_type in layout v_trans."""
    rot_k, rot_v = llama_rotation(head_dim_k, "k"), llama_rotation(head_dim_v, "v")
    caches = [
        Cache(c.name, [None if s is None else Stream(s.cells, [_layer(L, k_type, v_type, v_trans, rot_k, rot_v) for L in s.layers])
                       for s in c.streams])
        for c in state.caches
    ]
    return replace(state, caches=caches)


def into_stream(state: LlamaState, n_stream: int, index: int) -> LlamaState:
    """`state` (one sequence) with each cache's cells in stream `index` of `n_stream` streams:
    what a context with another number of streams (non-unified multi-sequence caches keep one
    per sequence) expects when the sequence goes to another sequence id. `state` itself where it
    already is so."""
    if all(len(c.streams) == n_stream and all(s is None for i, s in enumerate(c.streams) if i != index)
           for c in state.caches):
        return state
    caches = []
    for c in state.caches:
        held = [s for s in c.streams if s is not None]
        if len(held) > 1:
            raise StateLayoutError("a one-sequence state holds cells in several streams")
        streams: list = [None] * n_stream
        if held:
            streams[index] = held[0]
        caches.append(Cache(c.name, streams))
    return replace(state, caches=caches)


def layout_of(state: LlamaState) -> Optional[tuple[GgmlType, GgmlType, bool]]:
    """(K type, V type, V transposed) of the state's layers, or None for an empty state."""
    for _, _, layer in state.layers():
        return layer.k_type, layer.v_type, layer.v_trans
    return None
