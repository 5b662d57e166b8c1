"""Stages: one module each, a small class with a stable `stage_id`, a JSON-clean
`get_config()` / `from_config()` and `encode` / `decode`. The registry maps id -> class.
numcodecs' codec habit."""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError, FormatError
from .base import ModelBinding, Stage, TensorInfo
from .byteplane import BytePlane
from .delta import Delta
from .entropy import Entropy
from .hadamard import Hadamard
from .lattice import Lattice
from .rope import Rope
from .zstd import Zstd

REGISTRY: dict[str, type[Stage]] = {cls.stage_id: cls for cls in (BytePlane, Zstd, Rope, Hadamard, Lattice, Delta, Entropy)}


def stage_from_config(config: Mapping[str, Any]) -> Stage:
    """Build a stage from its stored config; unknown ids are a FormatError (a newer writer)."""
    if not isinstance(config, Mapping) or not isinstance(config.get("id"), str):
        raise FormatError(f"stage config {config!r} has no id")
    try:
        cls = REGISTRY[config["id"]]
    except KeyError:
        raise FormatError(f"unknown stage {config['id']!r}; this file needs a newer nexus-gguf") from None
    try:
        return cls.from_config(config)
    except ConfigError as e:
        raise FormatError(f"stage {config['id']!r}: {e}") from None


__all__ = ["REGISTRY", "ModelBinding", "Stage", "TensorInfo", "stage_from_config"]
