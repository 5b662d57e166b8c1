"""Split multi-byte floats into byte planes so that the entropy coder sees the well-behaved
sign/exponent bytes apart from the noisy low mantissa bytes (f16 caches: 1.08x -> ~1.18x)."""

from __future__ import annotations

import numpy as np

from ..backends import kernel
from .base import Stage, TensorInfo


class BytePlane(Stage):
    stage_id = "byteplane"
    lossless = True

    def encode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        if info.element_size <= 1:
            return data
        return kernel("byteplane_split")(data, info.element_size)

    def decode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        if info.element_size <= 1:
            return data
        return kernel("byteplane_merge")(data, info.element_size)
