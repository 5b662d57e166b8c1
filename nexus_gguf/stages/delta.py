"""Differences of symbols along the cells (tokens): symbol[t] - symbol[t-1]. Kept as an option
because the seed used it; after a Hadamard rotation neighbouring tokens' symbols are close to
independent and the differences cost more than the symbols (see the benchmark's ablation)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import Stage, TensorInfo


class Delta(Stage):
    stage_id = "delta"
    lossless = True
    kind = "symbols"
    PARAMS = {"streams": (str, "coord,coord_last")}

    def validate(self) -> None:
        if not self.names():
            raise ConfigError("delta: name at least one symbol stream")

    def names(self) -> list[str]:
        return [s for s in self.streams.split(",") if s]

    def encode(self, symbols: dict, info: TensorInfo) -> dict:
        out = dict(symbols)
        for name in self.names():
            if name in out and out[name].shape[0] > 1:
                a = out[name].astype(np.int64)
                out[name] = np.concatenate([a[:1], np.diff(a, axis=0)]).astype(np.int32)
        return out

    def decode(self, symbols: dict, info: TensorInfo) -> dict:
        out = dict(symbols)
        for name in self.names():
            if name in out and out[name].shape[0] > 1:
                out[name] = np.cumsum(out[name].astype(np.int64), axis=0).astype(np.int32)
        return out
