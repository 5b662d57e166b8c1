"""zstd entropy coding of whatever bytes reach it."""

from __future__ import annotations

import numpy as np
import zstandard

from ..errors import ConfigError, FormatError
from .base import Stage, TensorInfo


class Zstd(Stage):
    stage_id = "zstd"
    lossless = True
    PARAMS = {"level": (int, 9)}

    def validate(self) -> None:
        if not 1 <= self.level <= 22:
            raise ConfigError(f"zstd level must be 1..22, got {self.level}")

    def encode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        out = zstandard.ZstdCompressor(level=self.level).compress(memoryview(np.ascontiguousarray(data)))
        return np.frombuffer(out, np.uint8)

    def decode(self, data: np.ndarray, info: TensorInfo) -> np.ndarray:
        try:
            size = zstandard.frame_content_size(memoryview(np.ascontiguousarray(data)))
        except zstandard.ZstdError:
            size = -1
        if size < 0 or size > info.max_items:
            raise FormatError(f"section {info.name!r}: zstd frame declares {size} bytes, expected at most {info.max_items}")
        try:
            out = zstandard.ZstdDecompressor().decompress(memoryview(np.ascontiguousarray(data)))
        except zstandard.ZstdError as e:
            raise FormatError(f"section {info.name!r}: zstd data is corrupt: {e}") from None
        return np.frombuffer(out, np.uint8)
