"""Presets and stage composition. PRESETS is the one table that defines what each preset is."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .errors import ConfigError, FormatError
from .eviction import Eviction, Scoring
from .stages import REGISTRY, ModelBinding, Stage, TensorInfo, stage_from_config

# preset name -> {"stages": stage configs in encoding order, "evict": eviction options and
# "score": scoring options (both optional; scoring runs when eviction or a stage needs it)}.
# Lossy presets: RoPE removed, E8 lattice (channel means subtracted, f16 attention sinks, one
# step per head), rANS. high codes a layer's KV heads as one vector (one step; SmolLM2's 3 heads
# of 64: 192 values) on that section's own principal axes (the basis stored in the section at 8
# bits an entry, from 1536 cells: below, the basis costs more than it saves) with one rANS table
# per component class (from 512 cells: the tables cost more than they save below, SmolLM2 prose:
# 16 cells -11% of the ratio, 128 -2%, 256 -0.2%, 1024 +1.3%). Per head at 6 bits (format 2's
# first high) it was 4.97x at KLD 0.0078 on 4096 prose tokens; the 8-bit basis alone lowers the
# KLD to 0.0066, the head group to 0.0061 at 5.29x (README). high and balanced weight K's channels by the
# prompt's last 32 queries (captured in a side context of the first 4 and last 1024 cells: Scoring.context), with
# K's step 0.2 bits finer there: 7-8% smaller at equal or lower KLD on four texts, two of them not tuned on (README).
# high gives the cells those queries attend to least coarser steps (token_steps: step x (median attention /
# the cell's)^0.5, in half octaves, at most 3 octaves; each bucket's points in streams of their own), from 1024
# cells (shorter prompts are saved without a capture): 7-8% smaller at about the same KLD on the same four texts,
# pass-key recall unchanged (README); balanced likewise: 8-9% smaller, the KLD the same on three texts and 27%
# higher on the benchmark's code.
# high and balanced choose each group's point by rate and distortion (lattice rdo 0.05) and leave out
# the components on the principal axes below 0.1 steps^2 (basis_prune: their basis rows stored as
# zeros): 2% (high) and 6-8% (balanced) smaller, the KLD within its noise, on the same four texts (README).
# max evicts the 65% of the tokens those queries attend to least, then codes the rest as balanced does at 2.0 bits
# (the basis from 1024 cells, so that 4096 tokens' kept 1434 have one): 32-35x at KLD 0.06-0.09 on four 4096-token
# texts, two not tuned on, where evicting 75% at 1.5 bits (the previous max: its 1024 kept cells had no basis, no
# steps, no K weights) gave 39-40x at 0.11-0.14 (README). Eviction loses facts either way.
# rANS in 4 interleaved lanes: decoded in lockstep, 2x the symbol rate of
# one stream on a CPU core (native/core/rans.h) for 0.02% more bytes; in chunks of 16384 symbols,
# so that a GPU decodes a 4096-token state's lanes on ~11,000 threads instead of 720 (17x
# faster, tools/gpu_bench.py) for 0.3% more bytes, the CPU as fast as before. Streams of up to 4096 symbols
# (sinks, means, channel scales, a scale, class maps) are stored the smaller way of rANS and zstd, f16 ones as
# int16 (small_streams): lossless, +7% on 64-token prose, +2.4% on 256, +0.65% on 1024, +0.7% on 4096 (balanced +1%, max +1-4%).
PRESETS: dict[str, dict[str, Any]] = {
    "lossless": {"stages": [{"id": "byteplane"}, {"id": "zstd", "level": 3}]},
    "high": {"stages": [
        {"id": "rope"},
        {"id": "lattice", "k_bits": 3.5, "v_bits": 3.5, "scale_scope": "head", "head_group": 0, "transform": "pca",
         "basis_bits": 8, "pca_min_cells": 1536, "classes": True, "class_min_cells": 512, "k_weights": "queries",
         "k_weights_bits": 0.2, "token_steps": 0.5, "step_octaves": 3.0,
         "step_min_cells": 1024, "rdo": 0.05, "basis_prune": 0.1},
        {"id": "entropy", "lanes": 4, "chunk": 16384, "small_streams": 4096},
    ]},
    "balanced": {"stages": [
        {"id": "rope"},
        {"id": "lattice", "k_bits": 2.6, "v_bits": 2.6, "scale_scope": "head", "head_group": 0, "transform": "pca",
         "basis_bits": 8, "pca_min_cells": 1536, "classes": True, "class_min_cells": 512, "k_weights": "queries",
         "k_weights_bits": 0.2, "token_steps": 0.5, "step_octaves": 3.0,
         "step_min_cells": 1024, "rdo": 0.05, "basis_prune": 0.1},
        {"id": "entropy", "lanes": 4, "chunk": 16384, "small_streams": 4096},
    ]},
    "max": {"evict": {"keep": 0.35}, "score": {"scorer": "attention"}, "stages": [
        {"id": "rope"},
        {"id": "lattice", "k_bits": 2.0, "v_bits": 2.0, "scale_scope": "head", "head_group": 0, "transform": "pca",
         "basis_bits": 8, "pca_min_cells": 1024, "classes": True, "class_min_cells": 512, "k_weights": "queries",
         "k_weights_bits": 0.2, "token_steps": 0.5, "step_octaves": 3.0,
         "step_min_cells": 1024, "rdo": 0.05, "basis_prune": 0.1},
        {"id": "entropy", "lanes": 4, "chunk": 16384, "small_streams": 4096},
    ]},
    # NexusQuant's pipeline taken literally, for comparison: group-8 fp16 max scales, K3V3,
    # delta coding of lattice symbols along tokens, zstd
    "seed": {"stages": [
        {"id": "rope"}, {"id": "hadamard"},
        {"id": "lattice", "k_bits": 3.0, "v_bits": 3.0, "sinks": 0, "center": False, "scale_block": 8, "scale_stat": "max",
         "scale_format": "f16"},
        {"id": "delta"}, {"id": "entropy", "coder": "zstd", "level": 3},
    ]},
}
DEFAULT_PRESET = "high"

# Metadata sections (tokens, cell records, logits) are always coded so; FORMAT.md says the same.
META_STAGES: list[dict[str, Any]] = [{"id": "zstd", "level": 9}]


class Pipeline:
    """How a state's K/V sections are coded: either only `bytes` stages (whole sections as
    llama.cpp wrote them), or the value path: values* quantizer symbols* coder (see Stage). An
    optional Eviction runs before, on the whole state; it is not part of the coding and a file
    records what it did apart from the stages. Scoring (importance per cell) runs before both
    when eviction or a stage needs it."""

    def __init__(self, stages: Sequence[Stage], preset: str | None = None, eviction: Optional[Eviction] = None,
                 scoring: Optional[Scoring] = None):
        self.stages = list(stages)
        self.preset = preset
        self.eviction = eviction
        self.scoring = scoring if scoring is not None or not self.needs_scores else Scoring()
        kinds = [s.kind for s in self.stages]
        if self.values_path:
            q = kinds.index("quantizer") if "quantizer" in kinds else -1
            ok = (
                q >= 0
                and all(k == "values" for k in kinds[:q])
                and kinds[-1] == "coder"
                and all(k == "symbols" for k in kinds[q + 1 : -1])
            )
            if not ok:
                raise ConfigError(
                    f"stages {[s.stage_id for s in self.stages]} do not form a pipeline: "
                    "value stages, one quantizer, symbol stages, one coder"
                )

    @property
    def uses_importance(self) -> bool:
        """A stage codes cells by their importance (the scores reach it in TensorInfo)."""
        return any(s.uses_importance for s in self.stages)

    @property
    def uses_queries(self) -> bool:
        """A stage codes K by the captured queries' statistics (TensorInfo.query_energy)."""
        return any(s.uses_queries for s in self.stages)

    @property
    def needs_scores(self) -> bool:
        """Scoring (query capture) runs before coding: for eviction, importance-aware steps or
        query-weighted K."""
        return self.eviction is not None or self.uses_importance or self.uses_queries

    def queries_used_at(self, n_cells: int) -> bool:
        """A stage would weight a section of a state of at most n_cells cells a stream by the
        queries (K weights apply from pca_min_cells: a shorter prompt's capture is skipped)."""
        return any(s.queries_used_at(n_cells) for s in self.stages)

    def importance_used_at(self, n_cells: int) -> bool:
        """A stage would code cells of a state of at most n_cells cells a stream by their
        importance (importance-aware steps apply from lattice.step_min_cells)."""
        return any(s.importance_used_at(n_cells) for s in self.stages)

    def needs_scores_at(self, n_cells: int) -> bool:
        """needs_scores for a state of at most n_cells cells a stream."""
        return self.eviction is not None or self.importance_used_at(n_cells) or self.queries_used_at(n_cells)

    @property
    def takes_bit_profile(self) -> bool:
        """A stage codes each layer at the bits a bit profile gives it (bit_profile.py)."""
        return any(getattr(s, "takes_profile", False) for s in self.stages)

    @property
    def values_path(self) -> bool:
        return any(s.kind != "bytes" for s in self.stages)

    @property
    def lossless(self) -> bool:
        return self.eviction is None and all(s.lossless for s in self.stages)

    def get_config(self) -> dict[str, Any]:
        return {"preset": self.preset, "stages": [s.get_config() for s in self.stages]}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Pipeline":
        """The coding stages a file names. Files of format 1 written by nexus-gguf 0.1 may
        start with an {"id": "evict"} entry: decoding has nothing to undo for it (see
        eviction.legacy_stage_record for what it recorded)."""
        configs = list(config.get("stages", []))
        if configs and isinstance(configs[0], Mapping) and configs[0].get("id") == "evict":
            configs = configs[1:]
        try:
            return cls([stage_from_config(c) for c in configs], config.get("preset"))
        except ConfigError as e:
            raise FormatError(f"the file's pipeline is invalid: {e}") from None

    def bind(self, model: ModelBinding) -> "Pipeline":
        """The pipeline with model-dependent options resolved (what a file records)."""
        return Pipeline([s.bind(model) for s in self.stages], self.preset, self.eviction, self.scoring)

    def absorbs_rotation(self, info: TensorInfo, block: int) -> bool:
        """Whether a value stage applies exactly llama.cpp's rotation of this section's rows
        (Hadamard block `block`) with only pass-through stages before it; the rows then stay
        rotated and that stage skips its own matmul (the two would cancel)."""
        if not block or not self.values_path:
            return False
        for s in self.stages:
            if s.kind != "values":
                return False
            if s.absorbs_rotation(info, block):
                return True
            if not s.passes_through(info):
                return False
        return False

    def encode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        # each stage's input is let go of as it is handed on (from a list the call empties):
        # where the caller keeps no reference either, a section's float32 values are freed once
        # the lattice has made its float64 copy, not at the end (a save encodes a layer per
        # core: 6-12 MB less each at 7680 tokens; CPython >= 3.11 keeps no reference of its own
        # to a Python call's arguments)
        held = [data]
        del data
        for s in self.stages:
            held.append(s.encode(held.pop(), info))
        return held.pop()

    def decode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        for s in reversed(self.stages):
            data = s.decode(data, info)
        return data

    def encode_values(self, values: np.ndarray, info: TensorInfo) -> np.ndarray:
        """float32 [n_cells, n_heads * head_dim] -> the section's bytes (value path)."""
        held = [values.reshape(info.n_cells, info.n_heads, info.head_dim)]
        del values  # the caller's to keep or let go of (encode)
        return self.encode(held.pop(), info)

    def decode_values(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        """The section's bytes -> float32 [n_cells, n_heads * head_dim] (value path). Values a
        cache cannot hold (NaN, infinities: a damaged file behind valid checksums) are refused
        before they reach llama.cpp."""
        with np.errstate(all="ignore"):
            values = np.asarray(self.decode(data, info), np.float32)
        if not np.isfinite(values).all():
            raise FormatError(f"section {info.name!r} decodes to values that are not finite")
        return values.reshape(info.n_cells, info.n_heads * info.head_dim)


def build_pipeline(preset: str = DEFAULT_PRESET, without: Sequence[str] = (), **overrides: Any) -> Pipeline:
    """The stages of `preset` less those named in `without` ("evict" leaves eviction out), with
    options overridden as `<stage>_<option>=value` (e.g. lattice_k_bits=4, zstd_level=19,
    evict_keep=0.3). Unknown presets, stages and options are ConfigErrors."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    definition = PRESETS[preset]
    configs = [dict(c) for c in definition["stages"]]
    evict = dict(definition["evict"]) if "evict" in definition else None
    score = dict(definition.get("score", {}))
    names = {c["id"] for c in configs} | ({"evict"} if evict is not None else set())
    for stage_id in without:
        if stage_id not in names:
            raise ConfigError(f"preset {preset!r} has no {stage_id!r} stage to leave out")
    configs = [c for c in configs if c["id"] not in without]
    if "evict" in without:
        evict = None
    by_id = {c["id"]: c for c in configs}
    for key, value in overrides.items():
        stage_id, _, option = key.partition("_")
        if stage_id == "evict":
            if evict is None:
                raise ConfigError(f"{key}: preset {preset!r} does not evict")
            evict[option] = value
            continue
        if stage_id == "score":
            score[option] = value
            continue
        if stage_id not in REGISTRY:
            raise ConfigError(f"{key}: no stage {stage_id!r} (stages: {', '.join(REGISTRY)}, evict)")
        if stage_id not in by_id:
            raise ConfigError(f"{key}: preset {preset!r} has no {stage_id!r} stage")
        if option not in REGISTRY[stage_id].PARAMS:
            raise ConfigError(f"{key}: stage {stage_id!r} has no option {option!r}")
        by_id[stage_id][option] = value
    eviction = Eviction.from_config(evict) if evict is not None else None
    stages = [REGISTRY[c["id"]].from_config(c) for c in configs]
    scoring = (Scoring.from_config(score) if score or eviction is not None or any(s.uses_importance or s.uses_queries for s in stages)
               else None)
    return Pipeline(stages, preset, eviction, scoring)


def meta_pipeline() -> Pipeline:
    return Pipeline([stage_from_config(c) for c in META_STAGES], None)


def ablations(preset: str) -> list[Pipeline]:
    """The preset once per stage with that stage left out (`<preset>-no-<stage>`, eviction
    too); a value path cannot lose its quantizer, and instead of dropping its coder, rANS is
    swapped for zstd (`<preset>-zstd`)."""
    full = build_pipeline(preset)
    out = []
    if full.eviction is not None:
        out.append(Pipeline(full.stages, f"{preset}-no-evict", None, full.scoring if full.uses_importance else None))
    for i, s in enumerate(full.stages):
        if s.kind == "quantizer" or (s.kind == "coder" and getattr(s, "coder", "") != "rans"):
            continue
        if s.kind == "coder":
            swapped = type(s).from_config({**s.get_config(), "coder": "zstd"})
            out.append(Pipeline(full.stages[:i] + [swapped] + full.stages[i + 1 :], f"{preset}-zstd", full.eviction,
                                full.scoring))
        else:
            out.append(Pipeline(full.stages[:i] + full.stages[i + 1 :], f"{preset}-no-{s.stage_id}", full.eviction,
                                full.scoring))
    return out
