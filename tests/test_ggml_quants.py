"""ggml row quantizers against gguf-py's numpy implementation of the same reference code."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from nexus_gguf.ggml_quants import dequantize, quantize
from nexus_gguf.ggml_types import ggml_type_by_name


def _rows(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((48, 128)) * rng.exponential(1.0, (48, 1))).astype(np.float32)
    x[0] = 0.0  # all-zero blocks: scale 0
    x[1, :32] = np.linspace(-3, 3, 32)  # the signed extreme is the last value
    x[2, 3], x[2, 9] = 5.0, -5.0  # equal magnitudes: the first one sets the sign
    x[3, :32] = np.arange(32) - 15.5  # exact halves after scaling: roundf vs round-half-even
    return x


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_block_types_match_ggml(name):
    x = _rows()
    ours = quantize(x, name)
    theirs = gguf_quantize(x, getattr(T, name.upper()))
    assert ours.shape == (48, ggml_type_by_name(name).row_size(128))
    np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))
    back = dequantize(ours, ggml_type_by_name(name), 128)
    np.testing.assert_array_equal(back, gguf_dequantize(theirs, getattr(T, name.upper())).reshape(back.shape))
    # and the error is what the type's step size allows
    step = {"q8_0": 1 / 127, "q4_0": 1 / 8, "q4_1": 1 / 15, "q5_0": 1 / 16, "q5_1": 1 / 31}[name]
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    spread = np.ptp(x.reshape(-1, 32), axis=1, keepdims=True)
    scale = spread if name.endswith("_1") else 2 * amax if name != "q8_0" else amax
    assert np.all(np.abs(back.reshape(-1, 32) - x.reshape(-1, 32)) <= scale * step * 0.51 + 1e-2 * scale)


@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
def test_float_types_match_ggml(name):
    x = _rows(1)
    x[4, 0], x[4, 1] = np.nan, np.inf
    ours = quantize(x, name)
    theirs = np.ascontiguousarray(gguf_quantize(x, getattr(T, name.upper()))).view(np.uint8)
    np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))
    back = dequantize(ours, ggml_type_by_name(name), 128)
    np.testing.assert_array_equal(back, gguf_dequantize(theirs.view(np.uint8).reshape(48, -1), getattr(T, name.upper())).reshape(back.shape))


def test_iq4_nl_rows_read_as_ggml_reads_them():
    # gguf-py cannot quantize IQ4_NL, so build blocks by hand: f16 scale, 16 bytes of nibbles
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (48 * 4, 18), dtype=np.uint8)
    blocks[:, :2] = rng.uniform(-0.1, 0.1, 48 * 4).astype("<f2").view(np.uint8).reshape(-1, 2)
    rows = blocks.reshape(48, -1)
    ours = dequantize(rows, ggml_type_by_name("iq4_nl"), 128)
    np.testing.assert_array_equal(ours, gguf_dequantize(rows, T.IQ4_NL).reshape(ours.shape))


def test_cannot_write_iq4_nl_and_rejects_partial_blocks():
    from nexus_gguf.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot write iq4_nl"):
        quantize(np.zeros((1, 32), np.float32), "iq4_nl")
    with pytest.raises(ConfigError, match="whole number"):
        quantize(np.zeros((1, 40), np.float32), "q8_0")
