"""Numba CPU kernels, the fallback where the native library is not built. Compiled lazily on
first use (numba is imported only when this backend is chosen)."""

from __future__ import annotations

import numpy as np
from numba import njit

from . import pool, threads


@njit(cache=True, nogil=True)
def _split(src, dst, n, es):
    for i in range(n):
        for b in range(es):
            dst[b * n + i] = src[i * es + b]


@njit(cache=True, nogil=True)
def _merge(src, dst, n, es):
    for i in range(n):
        for b in range(es):
            dst[i * es + b] = src[b * n + i]


def byteplane_split(src: np.ndarray, element_size: int) -> np.ndarray:
    src = np.ascontiguousarray(src).reshape(-1)
    dst = np.empty_like(src)
    _split(src, dst, src.size // element_size, element_size)
    return dst


def byteplane_merge(src: np.ndarray, element_size: int) -> np.ndarray:
    src = np.ascontiguousarray(src).reshape(-1)
    dst = np.empty_like(src)
    _merge(src, dst, src.size // element_size, element_size)
    return dst


@njit(cache=True, nogil=True)
def _d8(x, out):
    s = 0.0
    worst, worst_err = 0, -1.0
    for j in range(8):
        v = x[j]
        r = np.floor(abs(v) + 0.5) * (1.0 if v >= 0 else -1.0)
        out[j] = r
        s += r
        e = abs(v - r)
        if e > worst_err:
            worst_err, worst = e, j
    if s % 2 != 0:
        out[worst] += 1.0 if x[worst] - out[worst] >= 0 else -1.0


@njit(cache=True, nogil=True)
def _e8(x, out):
    a = np.empty(8)
    b = np.empty(8)
    xs = np.empty(8)
    _d8(x, a)
    for j in range(8):
        xs[j] = x[j] - 0.5
    _d8(xs, b)
    da = 0.0
    db = 0.0
    for j in range(8):
        b[j] += 0.5
        da += (x[j] - a[j]) ** 2
        db += (x[j] - b[j]) ** 2
    src = b if db < da else a
    for j in range(8):
        out[j] = src[j]


@njit(cache=True, nogil=True)
def _e8_rows(x, out):
    for i in range(x.shape[0]):
        _e8(x[i], out[i])


def e8_nearest(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float64).reshape(-1, 8)
    out = np.empty_like(x)
    _e8_rows(x, out)
    return out


RANS_PROB_BITS = 14
RANS_L = 1 << 23


@njit(cache=True, nogil=True)
def _rans_encode(symbols, freqs, cum, out):
    x = np.uint64(RANS_L)
    p = out.shape[0]
    for i in range(symbols.shape[0] - 1, -1, -1):
        s = symbols[i]
        f = np.uint64(freqs[s])
        x_max = np.uint64((RANS_L >> RANS_PROB_BITS) << 8) * f
        while x >= x_max:
            p -= 1
            out[p] = np.uint8(x & np.uint64(0xFF))
            x >>= np.uint64(8)
        x = ((x // f) << np.uint64(RANS_PROB_BITS)) + (x % f) + np.uint64(cum[s])
    for k in range(4):
        p -= 1
        out[p] = np.uint8(x & np.uint64(0xFF))
        x >>= np.uint64(8)
    return p


@njit(cache=True, nogil=True)
def _rans_decode(data, freqs, cum, lookup, out):
    mask = np.uint64((1 << RANS_PROB_BITS) - 1)
    if data.shape[0] < 4:
        return -1
    x = np.uint64(0)
    for k in range(4):
        x = (x << np.uint64(8)) | np.uint64(data[k])
    p = 4
    for i in range(out.shape[0]):
        slot = x & mask
        s = lookup[slot]
        out[i] = s
        x = np.uint64(freqs[s]) * (x >> np.uint64(RANS_PROB_BITS)) + slot - np.uint64(cum[s])
        while x < np.uint64(RANS_L):
            if p >= data.shape[0]:
                return -1
            x = (x << np.uint64(8)) | np.uint64(data[p])
            p += 1
    if x != np.uint64(RANS_L) or p != data.shape[0]:
        return -1
    return 0


def rans_encode(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    symbols = np.ascontiguousarray(symbols, np.int64)
    freqs = np.ascontiguousarray(freqs, np.int64)
    cum = np.concatenate([[0], np.cumsum(freqs)]).astype(np.int64)
    # each symbol emits at most (32 - RANS_PROB_BITS + 7) // 8 + 1 bytes; plus the state
    out = np.empty(symbols.shape[0] * 4 + 8, np.uint8)
    p = _rans_encode(symbols, freqs, cum, out)
    return out[p:].tobytes()


def rans_decode(data: bytes, freqs: np.ndarray, n: int) -> np.ndarray:
    freqs = np.ascontiguousarray(freqs, np.int64)
    cum = np.concatenate([[0], np.cumsum(freqs)]).astype(np.int64)
    lookup = np.repeat(np.arange(freqs.shape[0]), freqs).astype(np.int64)
    out = np.empty(n, np.int64)
    if _rans_decode(np.frombuffer(data, np.uint8), freqs, cum, lookup, out) != 0:
        raise ValueError("rANS stream is corrupt (ends early or does not decode to its start state)")
    return out


@njit(cache=True, nogil=True)
def _rans_decode_lanes(data, starts, counts, offsets, freqs, cum, lookup, lanes, out, status, t0, t1):
    for t in range(t0, t1):
        if counts[t] == 0:
            status[t] = 0 if offsets[t + 1] == offsets[t] else -1
            continue
        part = np.empty(counts[t], np.int64)
        status[t] = _rans_decode(data[offsets[t] : offsets[t + 1]], freqs, cum, lookup, part)
        for i in range(counts[t]):
            out[starts[t] + i * lanes] = part[i]


_PARALLEL_SYMBOLS = 1 << 16  # fewer symbols decode faster on one thread


def _tasks(n: int, lanes: int, chunk: int):
    from .reference import lane_tasks

    t = np.array(lane_tasks(n, lanes, chunk), np.int64).reshape(-1, 2)
    return t[:, 0].copy(), t[:, 1].copy()


def rans_encode_lanes(symbols: np.ndarray, freqs: np.ndarray, lanes: int, chunk: int):
    symbols = np.ascontiguousarray(symbols, np.int64)
    bodies = [rans_encode(symbols[s : s + c * lanes : lanes], freqs) if c else b""
              for s, c in zip(*_tasks(symbols.size, lanes, chunk))]
    return np.array([len(b) for b in bodies], np.int64), b"".join(bodies)


def rans_decode_lanes(data: bytes, lengths: np.ndarray, freqs: np.ndarray, n: int, lanes: int, chunk: int) -> np.ndarray:
    starts, counts = _tasks(n, lanes, chunk)
    lengths = np.asarray(lengths, np.int64)
    if lengths.shape[0] != starts.shape[0] or int(lengths.sum()) != len(data):
        raise ValueError("interleaved rANS lane table does not match the stream")
    freqs = np.ascontiguousarray(freqs, np.int64)
    cum = np.concatenate([[0], np.cumsum(freqs)]).astype(np.int64)
    lookup = np.repeat(np.arange(freqs.shape[0]), freqs).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = np.empty(n, np.int64)
    status = np.zeros(starts.shape[0], np.int64)
    args = (np.frombuffer(data, np.uint8), starts, counts, offsets, freqs, cum, lookup, lanes, out, status)
    n_tasks = starts.shape[0]
    workers = min(threads(), n_tasks) if n >= _PARALLEL_SYMBOLS else 1
    if workers > 1:
        # Python threads over a nogil kernel: no OpenMP pool left spinning against numpy after
        bounds = np.linspace(0, n_tasks, workers + 1).astype(np.int64)
        list(pool().map(lambda i: _rans_decode_lanes(*args, bounds[i], bounds[i + 1]), range(workers)))
    else:
        _rans_decode_lanes(*args, 0, n_tasks)
    if np.any(status != 0):
        raise ValueError("rANS stream is corrupt (a lane ends early or does not decode to its start state)")
    return out
