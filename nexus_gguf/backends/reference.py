"""numpy reference kernels: the readable truth every other backend is tested against.
Names match the C entry points in native/include/nxkv.h (without the nxkv_ prefix)."""

from __future__ import annotations

import numpy as np


def byteplane_split(src: np.ndarray, element_size: int) -> np.ndarray:
    """uint8 [n * element_size] -> uint8 [element_size * n]: byte b of element i at b * n + i."""
    return np.ascontiguousarray(src.reshape(-1, element_size).T).reshape(-1)


def byteplane_merge(src: np.ndarray, element_size: int) -> np.ndarray:
    """Inverse of byteplane_split."""
    return np.ascontiguousarray(src.reshape(element_size, -1).T).reshape(-1)


def hadamard_matrix(n: int) -> np.ndarray:
    """Orthonormal Walsh-Hadamard matrix (Sylvester order, as llama.cpp's ggml_gen_hadamard):
    symmetric, and its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def hadamard_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """Rotate each run of `block` consecutive values of float32 rows x[..., d] by the orthonormal
    Hadamard matrix (d a multiple of block). Applying it twice gives x back."""
    shape = x.shape
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} values are not whole {block}-value blocks")
    return (np.asarray(x, np.float32).reshape(-1, block) @ hadamard_matrix(block)).reshape(shape)
