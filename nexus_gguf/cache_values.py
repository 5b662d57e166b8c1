"""A cache layer's K and V as float32 matrices [n_cells, n_embd] whatever type and layout the
state holds them in, and back: the form lossy stages and baselines work on."""

from __future__ import annotations

import os

import numpy as np

from .backends.reference import hadamard_blocks
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


def llama_rotation_disabled() -> bool:
    """LLAMA_ATTN_ROT_DISABLE, which turns llama.cpp's rotation of quantized caches off."""
    return os.environ.get("LLAMA_ATTN_ROT_DISABLE", "0").strip() not in ("", "0")


def toggle_llama_rotation(values: np.ndarray, t: GgmlType, block: int) -> np.ndarray:
    """Undo (or redo: it is its own inverse) the rotation llama.cpp applied to the rows of a
    quantized cache of type t with Hadamard block `block` (0: none)."""
    return hadamard_blocks(values, block) if block and not t.float_bytes else values


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


def _rows(values: np.ndarray, t: GgmlType, transposed: bool) -> np.ndarray:
    if not transposed:
        return quantize(values, t.name)
    if not t.float_bytes:
        raise StateLayoutError(f"a transposed V cache cannot hold {t.name}")
    return quantize(np.ascontiguousarray(values.T), t.name)


def layer_from_values(cache_layer: int, model_layer, sliding: bool, v_trans: bool, k_type: GgmlType, k: np.ndarray,
                      v_type: GgmlType, v: np.ndarray) -> LayerKV:
    """A cache layer holding float32 K and V [n_cells, n_embd], written as k_type / v_type."""
    return LayerKV(cache_layer, model_layer, sliding, k_type, _rows(k, k_type, False), v_type, _rows(v, v_type, v_trans))


def with_values(layer: LayerKV, v_trans: bool, k: np.ndarray, v: np.ndarray,
                k_type: GgmlType | None = None, v_type: GgmlType | None = None) -> LayerKV:
    """A copy of `layer` holding float32 K and V [n_cells, n_embd], written as k_type / v_type
    (default: the layer's own types) in the layer's layout."""
    return layer_from_values(layer.cache_layer, layer.model_layer, layer.sliding_window, v_trans,
                             k_type or layer.k_type, k, v_type or layer.v_type, v)
