"""llama.cpp's Hadamard rotation of quantized caches (llama-kv-cache.cpp build_input_k_rot /
build_input_v_rot): rows of a q8_0 / q4_0 / ... cache are stored rotated, so anything that works
on the values (RoPE removal, baselines, scoring) undoes it first and redoes it on the way back."""

from __future__ import annotations

import os

import numpy as np

from .backends import kernel
from .ggml_types import GgmlType


def llama_rotation_blocks(head_dim: int, kind: str) -> int:
    """The Hadamard block llama.cpp uses for a quantized cache, or 0 where it does not rotate:
    K takes the largest power of two >= 64 dividing the head size, V always 64; head sizes not
    divisible by 64 are left alone."""
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


def llama_rotation(head_dim: int, kind: str) -> int:
    """The block this process's llama.cpp rotates quantized K or V rows with (0: none)."""
    return 0 if llama_rotation_disabled() else llama_rotation_blocks(head_dim, kind)


def toggle_llama_rotation(values: np.ndarray, t: GgmlType, block: int) -> np.ndarray:
    """Undo (or redo: it is its own inverse) the rotation llama.cpp applied to the rows of a
    quantized cache of type t with Hadamard block `block` (0: none)."""
    return kernel("hadamard_blocks")(values, block) if block and not t.float_bytes else values
