"""A cache layer's K and V as float32 matrices [n_cells, n_embd] whatever type and layout the
state holds them in, and back: the form lossy stages and baselines work on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .ggml_quants import dequantize, quantize
from .ggml_types import GgmlType
from .llama_state import LayerKV
from .errors import StateLayoutError


def llama_rotation_blocks(head_dim: int, kind: str) -> int:
    """The Hadamard block llama.cpp uses for a quantized cache (llama-kv-cache.cpp
    build_input_k_rot / build_input_v_rot), or 0 where it does not rotate: K takes the largest
    power of two >= 64 dividing the head size, V always 64; head sizes not divisible by 64 are
    left alone."""
    if head_dim <= 0 or head_dim % 64:
        return 0
    if kind == "v":
        return 64
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


def n_embd_of(layer: LayerKV, kind: str, v_trans: bool) -> int:
    t: GgmlType = layer.k_type if kind == "k" else layer.v_type
    arr = layer.k if kind == "k" else layer.v
    if kind == "v" and v_trans:
        return int(arr.shape[0])
    return int(arr.shape[1]) // t.type_size * t.block_size


def layer_values(layer: LayerKV, kind: str, v_trans: bool) -> np.ndarray:
    """float32 [n_cells, n_embd] of the layer's K (kind 'k') or V ('v')."""
    t = layer.k_type if kind == "k" else layer.v_type
    arr = layer.k if kind == "k" else layer.v
    if kind == "v" and v_trans:
        if not t.float_bytes:
            raise StateLayoutError(f"a transposed V cache of block type {t.name} cannot exist")
        n_cells = arr.shape[1] // t.type_size
        return np.ascontiguousarray(dequantize(arr, t, n_cells).T)
    return dequantize(arr, t, n_embd_of(layer, kind, v_trans))


def with_values(layer: LayerKV, v_trans: bool, k: np.ndarray, v: np.ndarray,
                k_type: GgmlType | None = None, v_type: GgmlType | None = None) -> LayerKV:
    """A copy of `layer` holding float32 K and V [n_cells, n_embd], written as k_type / v_type
    (default: the layer's own types) in the layer's layout."""
    k_type = k_type or layer.k_type
    v_type = v_type or layer.v_type
    k_rows = quantize(k, k_type.name)
    if v_trans:
        if not v_type.float_bytes:
            raise StateLayoutError(f"a transposed V cache cannot hold {v_type.name}")
        v_rows = quantize(np.ascontiguousarray(v.T), v_type.name)
    else:
        v_rows = quantize(v, v_type.name)
    return replace(layer, k_type=k_type, k=k_rows, v_type=v_type, v=v_rows)
