"""Token eviction: a choice made once, at save time, before any section is coded: drop the least
important cells of the full-attention cache, for all heads and layers at once (the cache is
shared; per-head eviction failed in NexusQuant's measurements). Kept cells keep their positions,
so the next token still goes at position n. The first `sinks` positions and the last `window`
are always kept; sliding-window caches are left alone (they hold only the window already).

Importance comes from nexus_gguf.scoring (its options: Scoring). Eviction is not a stage:
decoding has nothing to undo (the file holds the kept cells), so what a file records of it is an
account of what happened (the header's "eviction" and "scoring"), not options a reader acts on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np

from .errors import ConfigError

SCORERS = ("attention", "reconstruct", "key-proxy")


class Options:
    """A frozen dataclass of typed options with a JSON-clean config (numcodecs' habit)."""

    name = "options"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            typ = float if f.type == "float" else int if f.type == "int" else str
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif not isinstance(value, typ) or isinstance(value, bool):
                raise ConfigError(f"{self.name}: {f.name} must be {typ.__name__}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Range checks; raise ConfigError."""

    def get_config(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        unknown = set(config) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"{cls.name} has no option(s) {', '.join(sorted(unknown))}")
        return cls(**config)


@dataclass(frozen=True)
class Scoring(Options):
    """How importance is measured (nexus_gguf.scoring): for eviction and for importance-aware
    quantizer steps."""

    name = "score"
    # attention: the prompt's last `window` queries, captured | reconstruct: the queries of the
    # model asked to repeat the prompt (query-agnostic, KVzip) | key-proxy: no capture
    scorer: str = "attention"
    window: int = 32  # attention: the last this many prompt tokens ask the queries
    chunk: int = 1024  # reconstruct: prompt tokens repeated per decode
    stride: int = 4  # reconstruct: every stride-th repeated token's queries are scored
    # reconstruct: each chunk repeated after the `span` cells before it, not the whole prompt (0):
    # cheaper, a smaller side context, and at equal eviction a lower KLD (README)
    span: int = 1024
    # queries captured only for K's weights (no importance asked): the capture context holds
    # the first 4 cells and the last `context` cells, not the whole state, so a save's extra
    # memory stays bounded (0: every cell; SmolLM2, 7680 tokens: a save peaks 360 MB above
    # where it started with every cell, 277 MB with 2048, 208 MB with 1024, 230 MB without
    # weights). The weights are a mean over the window's queries: 1024 cells move the query
    # energies by ~7% (4096 tokens), within the KLD's own noise (README)
    context: int = 1024

    def validate(self) -> None:
        if self.scorer not in SCORERS:
            raise ConfigError(f"score: scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.window < 1 or self.chunk < 16 or self.stride < 1 or self.span < 0 or self.context < 0:
            raise ConfigError("score: window >= 1, chunk >= 16, stride >= 1, span >= 0, context >= 0")


@dataclass(frozen=True)
class Eviction(Options):
    """What to evict: the options a preset or a user sets."""

    name = "evict"
    keep: float = 0.5  # fraction of the cells (<= 1) or a number of cells (> 1)
    sinks: int = 4
    window: int = 32  # the last this many cells are always kept
    pool: int = 0  # max-pool importance over this many neighbours (SnapKV); 0: off

    def validate(self) -> None:
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


def eviction_record(options: Eviction, n_cells: int, kept: int) -> dict[str, Any]:
    """What eviction did, as the header's "eviction" records it."""
    return {**options.get_config(), "n_cells": n_cells, "kept": kept}


def legacy_stage_record(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The eviction record of a file written before eviction left the pipeline (format 1 files
    of nexus-gguf 0.1): an {"id": "evict", ...} entry at the head of its stages."""
    return {k: v for k, v in stage.items() if k != "id"}

