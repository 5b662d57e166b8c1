"""Numba CPU kernels, the fallback where the native library is not built. Compiled lazily on
first use (numba is imported only when this backend is chosen)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _split(src, dst, n, es):
    for i in range(n):
        for b in range(es):
            dst[b * n + i] = src[i * es + b]


@njit(cache=True, nogil=True)
def _merge(src, dst, n, es):
    for i in range(n):
        for b in range(es):
            dst[i * es + b] = src[b * n + i]


def byteplane_split(src: np.ndarray, element_size: int) -> np.ndarray:
    src = np.ascontiguousarray(src).reshape(-1)
    dst = np.empty_like(src)
    _split(src, dst, src.size // element_size, element_size)
    return dst


def byteplane_merge(src: np.ndarray, element_size: int) -> np.ndarray:
    src = np.ascontiguousarray(src).reshape(-1)
    dst = np.empty_like(src)
    _merge(src, dst, src.size // element_size, element_size)
    return dst
