from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class TensorInfo:
    """What a stage may know about the bytes it is given."""

    name: str  # section name, e.g. "k.0.0.12"
    ggml_type: str  # "f16", "q8_0", ... or "raw" for non-tensor payloads
    element_size: int  # bytes per value for plain float types, 0 for block-quantized or raw data
    max_bytes: int  # no decoded intermediate may be larger (checked before allocating)


class Stage:
    """A byte-to-byte transform. Subclasses set stage_id and lossless, and declare their options
    in PARAMS (name -> (type, default)); get_config/from_config are derived from it."""

    stage_id: ClassVar[str]
    lossless: ClassVar[bool]
    PARAMS: ClassVar[dict[str, tuple[type, Any]]] = {}

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.PARAMS)
        if unknown:
            raise ConfigError(f"stage {self.stage_id!r} has no option(s) {', '.join(sorted(unknown))}")
        for name, (typ, default) in self.PARAMS.items():
            value = params.get(name, default)
            if not isinstance(value, typ) or isinstance(value, bool) != (typ is bool):
                raise ConfigError(f"stage {self.stage_id!r}: {name} must be {typ.__name__}, got {value!r}")
            setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        """Range checks; raise ConfigError."""

    def get_config(self) -> dict[str, Any]:
        return {"id": self.stage_id, **{name: getattr(self, name) for name in self.PARAMS}}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Stage":
        return cls(**{k: v for k, v in config.items() if k != "id"})

    def encode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        raise NotImplementedError

    def decode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.PARAMS)})"
