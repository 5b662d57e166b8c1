"""Orthonormal Walsh-Hadamard rotation of each head vector: spreads outlier channels over the
whole vector so that one scale fits all of its values. Head sizes that are not powers of two
(80, 96, 192, ...) are split into power-of-two blocks, largest first (80 = 64 + 16)."""

from __future__ import annotations

import numpy as np

from ..backends import kernel
from ..errors import ConfigError
from .base import Stage, TensorInfo


def power_of_two_blocks(n: int) -> list[int]:
    """n as a sum of powers of two, largest first."""
    return [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]


class Hadamard(Stage):
    stage_id = "hadamard"
    lossless = False  # orthonormal: exact up to float32 rounding
    kind = "values"
    PARAMS = {"keys": (bool, True), "values": (bool, True)}

    def passes_through(self, info: TensorInfo) -> bool:
        return not (self.keys if info.kind == "k" else self.values)

    def absorbs_rotation(self, info: TensorInfo, block: int) -> bool:
        return not self.passes_through(info) and power_of_two_blocks(info.head_dim) == [block]

    def _apply(self, x: np.ndarray, info: TensorInfo) -> np.ndarray:
        if self.passes_through(info) or (info.llama_rot and self.absorbs_rotation(info, info.llama_rot)):
            return x
        d = x.shape[-1]
        if d < 1:
            raise ConfigError(f"{info.name}: empty head vectors")
        out = np.empty_like(x, dtype=np.float32)
        start = 0
        for block in power_of_two_blocks(d):
            out[..., start : start + block] = kernel("hadamard_blocks")(np.ascontiguousarray(x[..., start : start + block]), block)
            start += block
        return out

    # the rotation is symmetric and orthonormal, so it is its own inverse
    def encode(self, x: np.ndarray, info: TensorInfo) -> np.ndarray:
        return self._apply(x, info)

    def decode(self, x: np.ndarray, info: TensorInfo) -> np.ndarray:
        return self._apply(x, info)
