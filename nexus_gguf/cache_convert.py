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


def layout_of(state: LlamaState) -> Optional[tuple[GgmlType, GgmlType, bool]]:
    """(K type, V type, V transposed) of the state's layers, or None for an empty state."""
    for _, _, layer in state.layers():
        return layer.k_type, layer.v_type, layer.v_trans
    return None
