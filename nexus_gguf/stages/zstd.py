"""zstd entropy coding of whatever bytes reach it."""

from __future__ import annotations

import threading

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
        return np.frombuffer(decompress_bounded(np.ascontiguousarray(data), info.max_items, f"section {info.name!r}"), np.uint8)


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (one is not safe to share between threads; a new one for each
    of a load's ~300 small streams cost more than their decoding)."""
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def decompress_bounded(data, limit: int, where: str) -> bytes:
    """A zstd frame's content, refused before anything is allocated when the frame does not
    state its size or states more than `limit` bytes (a decompression bomb, or damage)."""
    view = memoryview(data)
    try:
        size = zstandard.frame_content_size(view)
    except zstandard.ZstdError:
        size = -1
    if size < 0:
        raise FormatError(f"{where}: zstd frame does not declare its size (at most {limit} bytes expected)")
    if size > limit:
        raise FormatError(f"{where}: zstd frame declares {size} bytes, expected at most {limit}")
    try:
        out = _decompressor().decompress(view, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: zstd data is corrupt: {e}") from None
    if len(out) != size:
        raise FormatError(f"{where}: zstd frame holds {len(out)} bytes, not the {size} it declares")
    return out
