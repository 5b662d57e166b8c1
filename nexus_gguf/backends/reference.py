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
