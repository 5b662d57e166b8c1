"""numpy versions of ggml's reference row quantizers (ggml-quants.c quantize_row_*_ref and
dequantize_row_*), named after them so the two read side by side. Arithmetic is float32 as in
C, so the bytes match ggml's (tests compare them with gguf-py's implementation).

Used to turn a state's cache rows into floats whatever type the cache holds, to put floats back
in the type a context expects, and to store llama.cpp's own cache types as baselines."""

from __future__ import annotations

import numpy as np

from .backends import kernel
from .errors import ConfigError
from .ggml_types import GgmlType, ggml_type_by_name

QK = 32  # values per block of every block type below
_F32 = np.float32

# ggml-common.h kvalues_iq4nl
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, _F32)
    if x.shape[-1] % QK:
        raise ConfigError(f"rows of {x.shape[-1]} values are not a whole number of {QK}-value blocks")
    return x.reshape(-1, QK)


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype("<f2").view(np.uint8).reshape(-1, 2)


def _abs_max_signed(b: np.ndarray) -> np.ndarray:
    """Per block, the value of largest magnitude with its sign (the first one on ties)."""
    return np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)[:, 0]


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero (np.round sends them to even)."""
    whole = np.trunc(v)
    return whole + np.sign(v) * (np.abs(v - whole) >= 0.5)


def quantize_row_q8_0_ref(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    d = (np.abs(b).max(axis=1) / _F32(127)).astype(_F32)
    q = _roundf(b * _inverse(d)[:, None])
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def quantize_row_q4_0_ref(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    d = (_abs_max_signed(b) / _F32(-8)).astype(_F32)
    q = np.minimum(15, np.trunc(b * _inverse(d)[:, None] + _F32(8.5))).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([_f16_bytes(d), qs], axis=1)


def quantize_row_q4_1_ref(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    lo, hi = b.min(axis=1), b.max(axis=1)
    d = ((hi - lo) / _F32(15)).astype(_F32)
    q = np.minimum(15, np.trunc((b - lo[:, None]) * _inverse(d)[:, None] + _F32(0.5))).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), qs], axis=1)


def _qh_bytes(q: np.ndarray) -> np.ndarray:
    """The fifth bits of 32 5-bit values as ggml's little-endian u32: bit j = value j."""
    bits = ((q >> 4) & 1).astype(np.uint32)
    qh = (bits << np.arange(QK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def quantize_row_q5_0_ref(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    d = (_abs_max_signed(b) / _F32(-16)).astype(_F32)
    q = np.minimum(31, np.trunc(b * _inverse(d)[:, None] + _F32(16.5))).astype(np.uint8)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return np.concatenate([_f16_bytes(d), _qh_bytes(q), qs], axis=1)


def quantize_row_q5_1_ref(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    lo, hi = b.min(axis=1), b.max(axis=1)
    d = ((hi - lo) / _F32(31)).astype(_F32)
    q = np.trunc((b - lo[:, None]) * _inverse(d)[:, None] + _F32(0.5)).astype(np.uint8)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _qh_bytes(q), qs], axis=1)


def _f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset : offset + 2].copy().view("<f2").astype(_F32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(blocks: np.ndarray, offset: int) -> np.ndarray:
    qh = blocks[:, offset : offset + 4].copy().view("<u4").astype(np.uint32)
    return (((qh >> np.arange(QK, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def dequantize_row_q8_0(blocks: np.ndarray) -> np.ndarray:
    return _f16_at(blocks, 0) * blocks[:, 2:].view(np.int8).astype(_F32)


def dequantize_row_q4_0(blocks: np.ndarray) -> np.ndarray:
    return _f16_at(blocks, 0) * (_nibbles(blocks[:, 2:]).astype(_F32) - 8)


def dequantize_row_q4_1(blocks: np.ndarray) -> np.ndarray:
    return _f16_at(blocks, 0) * _nibbles(blocks[:, 4:]).astype(_F32) + _f16_at(blocks, 2)


def dequantize_row_q5_0(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 6:]) | _fifth_bits(blocks, 2)
    return _f16_at(blocks, 0) * (q.astype(_F32) - 16)


def dequantize_row_q5_1(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 8:]) | _fifth_bits(blocks, 4)
    return _f16_at(blocks, 0) * q.astype(_F32) + _f16_at(blocks, 2)


def dequantize_row_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    return _f16_at(blocks, 0) * KVALUES_IQ4NL[_nibbles(blocks[:, 2:])].astype(_F32)


def _bf16_from_f32(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even; NaNs stay quiet NaNs."""
    u = np.ascontiguousarray(x, _F32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)


_QUANTIZE = {
    "q8_0": quantize_row_q8_0_ref,
    "q4_0": quantize_row_q4_0_ref,
    "q4_1": quantize_row_q4_1_ref,
    "q5_0": quantize_row_q5_0_ref,
    "q5_1": quantize_row_q5_1_ref,
}
_DEQUANTIZE = {
    "q8_0": dequantize_row_q8_0,
    "q4_0": dequantize_row_q4_0,
    "q4_1": dequantize_row_q4_1,
    "q5_0": dequantize_row_q5_0,
    "q5_1": dequantize_row_q5_1,
    "iq4_nl": dequantize_row_iq4_nl,
}


def quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """float rows [n_rows, n] -> uint8 rows [n_rows, row_size] of ggml type `type_name`."""
    t = ggml_type_by_name(type_name)
    x = np.asarray(x, _F32)
    n_rows, n = x.shape
    if t.name == "f32":
        out = x.astype("<f4").view(np.uint8)
    elif t.name == "f16":
        out = kernel("f32_to_f16")(x).view(np.uint8)  # the hot conversion of every f16 cache restore
    elif t.name == "bf16":
        out = _bf16_from_f32(x).astype("<u2").view(np.uint8)
    elif t.name == "q8_0":
        out = kernel("quantize_q8_0")(_blocks(x))  # the usual quantized cache: in C
    elif t.name in _QUANTIZE:
        out = _QUANTIZE[t.name](x)
    else:
        raise ConfigError(f"nexus-gguf cannot write {t.name} rows (it can read them)")
    return np.ascontiguousarray(out).reshape(n_rows, t.row_size(n))


def dequantize(rows: np.ndarray, t: GgmlType, n: int) -> np.ndarray:
    """uint8 rows [n_rows, row_size] of type `t` holding `n` values each -> float32 [n_rows, n]."""
    rows = np.ascontiguousarray(rows, np.uint8)
    n_rows = rows.shape[0]
    if rows.size != n_rows * t.row_size(n):
        raise ConfigError(f"{t.name} rows of {rows.shape[-1]} bytes do not hold {n} values")
    if t.name == "f32":
        return rows.view("<f4").astype(_F32).reshape(n_rows, n)
    if t.name == "f16":
        return rows.view("<f2").astype(_F32).reshape(n_rows, n)
    if t.name == "bf16":
        return (rows.view("<u2").astype(np.uint32) << 16).view(_F32).reshape(n_rows, n)
    return _DEQUANTIZE[t.name](rows.reshape(-1, t.type_size)).reshape(n_rows, n)
