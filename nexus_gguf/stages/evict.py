"""Token eviction, once, after prefill: drop the least important cells of the full-attention
cache, for all heads and layers at once (the cache is shared; per-head eviction failed in
NexusQuant's measurements). Kept cells keep their positions, so the next token still goes at
position n. The first `sinks` positions and the last `window` are always kept; cells of
sliding-window caches are left alone (they hold only the window already).

Importance comes from nexus_gguf.scoring at save time; this stage only applies a choice, and
records which scorer made it. Decoding has nothing to undo: the file holds the kept cells."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import ConfigError
from ..llama_state import Cache, Cells, LlamaState, Stream
from .base import Stage

SCORERS = ("attention", "key-proxy")


class Evict(Stage):
    stage_id = "evict"
    lossless = False
    kind = "cells"
    PARAMS = {
        "keep": (float, 0.5),  # fraction of the cells (<= 1) or a number of cells (> 1)
        "sinks": (int, 4),
        "window": (int, 32),
        "scorer": (str, "attention"),  # attention | key-proxy
        "pool": (int, 0),  # max-pool importance over this many neighbours (SnapKV); 0: off
        "used": (str, ""),  # the scorer that was actually used (set at save time)
        "note": (str, ""),
        "kept": (int, 0),
    }

    def validate(self) -> None:
        if self.scorer not in SCORERS:
            raise ConfigError(f"evict scorer must be one of {SCORERS}, got {self.scorer!r}")
        if not self.keep > 0 or self.sinks < 0 or self.window < 1 or self.pool < 0:
            raise ConfigError("evict: keep > 0, sinks >= 0, window >= 1, pool >= 0")

    def budget(self, n: int) -> int:
        return min(n, int(round(self.keep * n)) if self.keep <= 1 else int(self.keep))

    def choose(self, importance: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Sorted indices of the cells to keep."""
        n = pos.shape[0]
        score = np.asarray(importance, np.float64)
        if self.pool > 1:
            pad = self.pool // 2
            padded = np.pad(score, pad, mode="edge")
            score = np.lib.stride_tricks.sliding_window_view(padded, 2 * pad + 1).max(axis=1)[:n]
        protected = (pos < self.sinks) | (pos >= pos.max() + 1 - self.window)
        budget = max(self.budget(n), int(protected.sum()))
        rest = np.nonzero(~protected)[0]
        best = rest[np.argsort(-score[rest], kind="stable")[: budget - int(protected.sum())]]
        return np.sort(np.concatenate([np.nonzero(protected)[0], best]))

    def apply(self, state: LlamaState, keep_idx: np.ndarray) -> LlamaState:
        """The state with only the cells keep_idx of the first cache's stream."""
        caches = list(state.caches)
        streams = []
        for s in caches[0].streams:
            if s is None:
                streams.append(None)
                continue
            streams.append(Stream(_take_cells(s.cells, keep_idx), s.v_trans, [_take_layer(L, keep_idx, s.v_trans, len(s.cells)) for L in s.layers]))
        caches[0] = Cache(caches[0].name, streams)
        return replace(state, caches=caches)

    def encode(self, data, info):
        return data

    def decode(self, data, info):
        return data


def _take_cells(cells: Cells, idx: np.ndarray) -> Cells:
    return Cells(cells.pos[idx], [cells.seq_ids[i] for i in idx], None if cells.ext is None else cells.ext[idx])


def _take_layer(layer, idx: np.ndarray, v_trans: bool, n_cells: int):
    k = np.ascontiguousarray(layer.k[idx])
    if v_trans:
        el = layer.v.shape[1] // n_cells
        v = np.ascontiguousarray(layer.v.reshape(layer.v.shape[0], n_cells, el)[:, idx, :].reshape(layer.v.shape[0], -1))
    else:
        v = np.ascontiguousarray(layer.v[idx])
    return replace(layer, k=k, v=v)
