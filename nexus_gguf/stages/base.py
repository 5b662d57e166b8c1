from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class TensorInfo:
    """What a stage may know about the data it is given."""

    name: str  # section name, e.g. "k.0.0.12"
    ggml_type: str  # "f16", "q8_0", ... or "raw" for non-tensor payloads
    element_size: int  # bytes per value for plain float types, 0 for block-quantized or raw data
    # no decoded intermediate may hold more items than this (bytes of a byte stream, values of a
    # symbol stream): checked before allocating
    max_items: int
    # K/V sections on the value path (lossy stages):
    kind: str = ""  # "k" or "v"
    positions: Optional[np.ndarray] = None  # int32 [n_cells]: each cell's position
    model_layer: Optional[int] = None
    sliding: bool = False  # a sliding-window layer
    n_cells: int = 0
    n_heads: int = 0
    head_dim: int = 0
    # the Hadamard block llama.cpp rotated these rows with and that is still on them (0: none):
    # set only when a stage of the pipeline absorbs it (see Stage.absorbs_rotation)
    llama_rot: int = 0
    # encoding only: how much attention each cell gets, float64 [n_cells] (scoring.py)
    importance: Optional[np.ndarray] = None
    # encoding only, K sections: the mean square of the queries that read each head's channels,
    # summed over each RoPE pair, float64 [n_heads, head_dim] (scoring.query_energy)
    query_energy: Optional[np.ndarray] = None


@dataclass(frozen=True)
class ModelBinding:
    """What stages may learn about the model and context a state comes from."""

    facts: Any  # llama_bridge.ModelFacts
    context: dict  # llama_bridge.context_facts plus the context's RoPE parameters
    # encoding only: bits added to each layer's K and V (bit_profile.BitProfile), or None
    bit_profile: Any = None


class Stage:
    """One step of a pipeline. Subclasses set stage_id, lossless and kind, and declare their
    options in PARAMS (name -> (type, default)); get_config/from_config are derived from it.

    kind says what the stage maps (encoding direction):
      bytes:     uint8 -> uint8 (the lossless path: whole sections as llama.cpp wrote them)
      values:    float32 [n_cells, n_heads, head_dim] -> the same shape (rope, hadamard)
      quantizer: float32 values -> symbols, a dict of named integer arrays (lattice)
      symbols:   symbols -> symbols (delta)
      coder:     symbols -> uint8 (entropy)"""

    stage_id: ClassVar[str]
    lossless: ClassVar[bool]
    kind: ClassVar[str] = "bytes"
    PARAMS: ClassVar[dict[str, tuple[type, Any]]] = {}
    # options older files may hold that this version no longer has: name -> the value under
    # which dropping it changes nothing (None: any value); other values are a FormatError
    RETIRED: ClassVar[dict[str, Any]] = {}
    note: str = ""  # what bind() found worth telling (the header's "notes"), never an option

    @property
    def uses_importance(self) -> bool:
        """The stage codes cells by their importance (TensorInfo.importance, at save time)."""
        return False

    @property
    def uses_queries(self) -> bool:
        """The stage codes K by the queries' statistics (TensorInfo.query_energy, at save time)."""
        return False

    def importance_used_at(self, n_cells: int) -> bool:
        """Whether a state of at most n_cells cells a stream would have cells coded by their
        importance (no scoring is worth running for it otherwise)."""
        return self.uses_importance

    def queries_used_at(self, n_cells: int) -> bool:
        """Whether a state of at most n_cells cells a stream would have a section coded by the
        queries (no capture is worth running otherwise)."""
        return self.uses_queries

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.PARAMS)
        if unknown:
            raise ConfigError(f"stage {self.stage_id!r} has no option(s) {', '.join(sorted(unknown))}")
        for name, (typ, default) in self.PARAMS.items():
            value = params.get(name, default)
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # JSON and keyword arguments may give 3 for 3.0
            if not isinstance(value, typ) or isinstance(value, bool) != (typ is bool):
                raise ConfigError(f"stage {self.stage_id!r}: {name} must be {typ.__name__}, got {value!r}")
            setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        """Range checks; raise ConfigError."""

    def bind(self, model: "ModelBinding") -> "Stage":
        """This stage with the options that depend on the model resolved (done once at save
        time; the resolved options are what the file stores)."""
        return self

    def passes_through(self, info: TensorInfo) -> bool:
        """True when encode and decode leave this section's values exactly as they are."""
        return False

    def absorbs_rotation(self, info: TensorInfo, block: int) -> bool:
        """True when this stage would apply the very Hadamard rotation (block `block`) that
        llama.cpp already applied to a quantized cache's rows: the value path then keeps the rows
        rotated and the stage does nothing, instead of undoing and redoing the same matmul."""
        return False

    def get_config(self) -> dict[str, Any]:
        return {"id": self.stage_id, **{name: getattr(self, name) for name in self.PARAMS}}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Stage":
        options = {k: v for k, v in config.items() if k != "id"}
        for name, neutral in cls.RETIRED.items():
            if name in options:
                value = options.pop(name)
                if neutral is not None and value != neutral:
                    raise ConfigError(f"stage {cls.stage_id!r}: option {name}={value!r} is no longer supported")
        return cls(**options)

    def encode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        raise NotImplementedError

    def decode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.PARAMS)})"
