"""Presets and stage composition. PRESETS is the one table that defines what each preset is."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .stages import REGISTRY, Stage, TensorInfo, stage_from_config

# preset name -> stage configs, in encoding order. Lossy presets arrive with the lossy pipeline;
# naming one before then is a clear error, not a placeholder.
PRESETS: dict[str, list[dict[str, Any]]] = {
    "lossless": [{"id": "byteplane"}, {"id": "zstd", "level": 3}],
}
DEFAULT_PRESET = "lossless"

# Metadata sections (tokens, cell records, logits) are always coded so; FORMAT.md says the same.
META_STAGES: list[dict[str, Any]] = [{"id": "zstd", "level": 9}]


class Pipeline:
    def __init__(self, stages: Sequence[Stage], preset: str | None = None):
        self.stages = list(stages)
        self.preset = preset

    @property
    def lossless(self) -> bool:
        return all(s.lossless for s in self.stages)

    def get_config(self) -> dict[str, Any]:
        return {"preset": self.preset, "stages": [s.get_config() for s in self.stages]}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Pipeline":
        return cls([stage_from_config(c) for c in config.get("stages", [])], config.get("preset"))

    def encode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        for s in self.stages:
            data = s.encode(data, info)
        return data

    def decode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        for s in reversed(self.stages):
            data = s.decode(data, info)
        return data


def build_pipeline(preset: str = DEFAULT_PRESET, **overrides: Any) -> Pipeline:
    """The stages of `preset`, with options overridden as `<stage>_<option>=value`
    (e.g. zstd_level=19). Unknown presets, stages and options are ConfigErrors."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    configs = [dict(c) for c in PRESETS[preset]]
    by_id = {c["id"]: c for c in configs}
    for key, value in overrides.items():
        stage_id, _, option = key.partition("_")
        if stage_id not in REGISTRY:
            raise ConfigError(f"{key}: no stage {stage_id!r} (stages: {', '.join(REGISTRY)})")
        if stage_id not in by_id:
            raise ConfigError(f"{key}: preset {preset!r} has no {stage_id!r} stage")
        if option not in REGISTRY[stage_id].PARAMS:
            raise ConfigError(f"{key}: stage {stage_id!r} has no option {option!r}")
        by_id[stage_id][option] = value
    return Pipeline([REGISTRY[c["id"]].from_config(c) for c in configs], preset)


def meta_pipeline() -> Pipeline:
    return Pipeline([stage_from_config(c) for c in META_STAGES], None)


def ablations(preset: str) -> list[Pipeline]:
    """The preset once per stage, with that stage left out (named `<preset>-no-<stage>`)."""
    full = build_pipeline(preset)
    return [
        Pipeline(full.stages[:i] + full.stages[i + 1 :], f"{preset}-no-{s.stage_id}")
        for i, s in enumerate(full.stages)
    ]
