"""Numba CPU kernels, the fallback where the native library is not built. Compiled lazily on
first use (numba is imported only when this backend is chosen)."""

from __future__ import annotations

import numpy as np
from numba import njit

from . import parallel_map, threads


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
    ea = np.empty(8)
    eb = np.empty(8)
    for j in range(8):
        b[j] += 0.5
        ea[j] = (x[j] - a[j]) ** 2
        eb[j] = (x[j] - b[j]) ** 2
    # reference._sum8's order
    da = ((ea[0] + ea[1]) + (ea[2] + ea[3])) + ((ea[4] + ea[5]) + (ea[6] + ea[7]))
    db = ((eb[0] + eb[1]) + (eb[2] + eb[3])) + ((eb[4] + eb[5]) + (eb[6] + eb[7]))
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
def _store(p, i, coset, coord, last):
    """Group i's E8 point p in the stored form (reference.lattice_quantize)."""
    half = 1 if p[0] != np.floor(p[0]) else 0
    s = 0
    for j in range(7):
        z = np.int64(p[j] - 0.5 * half)
        coord[7 * i + j] = z
        s += z
    coset[i] = half
    last[i] = (np.int64(p[7] - 0.5 * half) - (s & 1)) // 2


@njit(cache=True, nogil=True)
def _lattice_quantize(x, step, coset, coord, last):
    u = np.empty(8)
    p = np.empty(8)
    for i in range(step.size):
        for j in range(8):
            u[j] = x[8 * i + j] / step[i] if step[i] > 0 else 0.0
        _e8(u, p)
        _store(p, i, coset, coord, last)


def lattice_quantize(x, step):
    x = np.ascontiguousarray(x, np.float64).reshape(-1)
    step = np.ascontiguousarray(step, np.float64).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if np.any((step > 0) & ~(np.abs(x.reshape(-1, 8) / step.reshape(-1, 1)) < 2147483000.0).all(axis=1)):
            raise ValueError("lattice_quantize: values too large for their steps (points beyond int32)")
    m = step.size
    coset, coord, last = np.empty(m, np.uint8), np.empty(m * 7, np.int32), np.empty(m, np.int32)
    _lattice_quantize(x, step, coset, coord, last)
    return coset, coord.reshape(m, 7), last


@njit(cache=True, nogil=True)
def _lattice_quantize_rdo(x, step, rows, costs, scales, lam, coset, coord, last):
    v = (costs.shape[1] - 1) // 2
    u = np.empty(8)
    su = np.empty(8)
    p = np.empty(8)
    best = np.empty(8)
    e = np.empty(8)
    r = np.empty(8)
    for i in range(step.size):
        for j in range(8):
            u[j] = x[8 * i + j] / step[i] if step[i] > 0 else 0.0
        best_cost = np.inf
        for s in scales:
            for j in range(8):
                su[j] = s * u[j]
            _e8(su, p)
            for j in range(8):
                e[j] = (u[j] - p[j]) ** 2
                k = min(max(2.0 * p[j], -v), v)
                r[j] = costs[rows[i] + j, np.int64(k) + v]
            # reference._sum8's order
            d = ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]))
            rate = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
            cost = d + lam * rate
            if cost < best_cost:
                best_cost = cost
                for j in range(8):
                    best[j] = p[j]
        _store(best, i, coset, coord, last)


def lattice_quantize_rdo(x, step, rows, costs, scales, lam):
    x = np.ascontiguousarray(x, np.float64).reshape(-1)
    step = np.ascontiguousarray(step, np.float64).reshape(-1)
    rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
    costs = np.ascontiguousarray(costs, np.float64)
    m = step.size
    with np.errstate(divide="ignore", invalid="ignore"):
        if np.any((step > 0) & ~(np.abs(x.reshape(-1, 8) / step.reshape(-1, 1)) < 2147483000.0).all(axis=1)):
            raise ValueError("lattice_quantize_rdo: values too large for their steps (points beyond int32)")
    if m and (rows.min() < 0 or rows.max() + 8 > costs.shape[0]):
        raise ValueError("lattice_quantize_rdo: rate rows outside the cost table")
    coset, coord, last = np.empty(m, np.uint8), np.empty(m * 7, np.int32), np.empty(m, np.int32)
    _lattice_quantize_rdo(x, step, rows, costs, np.ascontiguousarray(scales, np.float64), float(lam), coset, coord, last)
    return coset, coord.reshape(m, 7), last


@njit(cache=True, nogil=True)
def _lattice_dequantize(coset, coord, coord_last, step, mean, mean_groups, out):
    for i in range(coset.size):
        s = 0
        for j in range(7):
            s += np.int64(coord[7 * i + j])
        half = 0.5 * coset[i]
        for j in range(8):
            z = np.int64(coord[7 * i + j]) if j < 7 else 2 * np.int64(coord_last[i]) + (s & 1)
            v = (np.float64(z) + half) * step[i]
            if mean_groups:
                v = v + mean[8 * (i % mean_groups) + j]
            out[8 * i + j] = np.float32(v)


def lattice_dequantize(coset, coord, coord_last, step, mean) -> np.ndarray:
    coset = np.ascontiguousarray(coset, np.uint8).reshape(-1)
    mean = np.ascontiguousarray(mean, np.float64).reshape(-1)
    out = np.empty(coset.size * 8, np.float32)
    _lattice_dequantize(coset, np.ascontiguousarray(coord, np.int32).reshape(-1),
                        np.ascontiguousarray(coord_last, np.int32).reshape(-1),
                        np.ascontiguousarray(step, np.float64).reshape(-1), mean, mean.size // 8, out)
    return out.reshape(-1, 8)


@njit(cache=True, nogil=True)
def _hadamard(y, block, scale):
    for start in range(0, y.size, block):
        h = 1
        while h < block:
            for i in range(start, start + block, 2 * h):
                for j in range(i, i + h):
                    a = y[j]
                    b = y[j + h]
                    y[j] = a + b
                    y[j + h] = a - b
            h *= 2
        for j in range(start, start + block):
            y[j] = y[j] * scale


def hadamard_blocks(x: np.ndarray, block: int) -> np.ndarray:
    if block < 1 or block & (block - 1) or x.shape[-1] % block:
        raise ValueError(f"Hadamard size {block} is not a power of two dividing rows of {x.shape[-1]}")
    y = np.array(x, np.float32)  # a contiguous copy, rotated in place
    _hadamard(y.reshape(-1), block, np.float32(1.0 / np.sqrt(block)))
    return y


@njit(cache=True, nogil=True)
def _basis_dequantize(coset, coord, coord_last, step, basis, scale, mean, channel_scale, out):
    # native/core/transform.h: the exact integer sum, then two double operations
    n, h, d = out.shape
    p2 = np.empty(d, np.int64)
    acc = np.empty(d, np.int64)
    for c in range(n):
        for k in range(h):
            for q in range(d // 8):
                s = 0
                for j in range(7):
                    s += np.int64(coord[c, k, q, j])
                for j in range(8):
                    z = np.int64(coord[c, k, q, j]) if j < 7 else 2 * np.int64(coord_last[c, k, q]) + (s & 1)
                    p2[8 * q + j] = 2 * z + np.int64(coset[c, k, q])
            acc[:] = 0
            for j in range(d):
                pj = p2[j]
                if pj == 0:
                    continue
                for i in range(d):
                    acc[i] += np.int64(basis[k, j, i]) * pj
            f = step[c, k] * scale
            for i in range(d):
                v = np.float64(acc[i]) * f
                if channel_scale.size:
                    v = v * channel_scale[k * d + i]
                if mean.size:
                    v = v + mean[k * d + i]
                out[c, k, i] = np.float32(v)


def basis_dequantize(coset, coord, coord_last, step, basis, shift: int, mean, channel_scale=()) -> np.ndarray:
    from .reference import basis_dequantize_args

    coset, coord, coord_last, step, basis, mean, channel_scale = basis_dequantize_args(coset, coord, coord_last, step, basis,
                                                                                       mean, channel_scale)
    out = np.empty(step.shape + (basis.shape[1],), np.float32)
    _basis_dequantize(coset, coord, coord_last, step, basis, 2.0 ** -(int(shift) + 1), mean, channel_scale, out)
    return out


@njit(cache=True, nogil=True)
def _f32_to_f16(bits, out):
    # native/core/f16.h, bit for bit (numba has no float16)
    for i in range(bits.size):
        f = np.uint32(bits[i])
        sign = (f & np.uint32(0x80000000)) >> np.uint32(16)
        f_exp = f & np.uint32(0x7F800000)
        if f_exp >= np.uint32(0x47800000):
            f_sig = f & np.uint32(0x007FFFFF)
            if f_exp == np.uint32(0x7F800000) and f_sig != 0:
                nan = np.uint32(0x7C00) + (f_sig >> np.uint32(13))
                out[i] = sign + (np.uint32(0x7C01) if nan == np.uint32(0x7C00) else nan)
            else:
                out[i] = sign + np.uint32(0x7C00)
        elif f_exp <= np.uint32(0x38000000):
            if f_exp < np.uint32(0x33000000):
                out[i] = sign
            else:
                e = f_exp >> np.uint32(23)
                f_sig = (np.uint32(0x00800000) + (f & np.uint32(0x007FFFFF))) >> (np.uint32(113) - e)
                if (f_sig & np.uint32(0x3FFF)) != np.uint32(0x1000) or (f & np.uint32(0x7FF)) != 0:
                    f_sig += np.uint32(0x1000)
                out[i] = sign + (f_sig >> np.uint32(13))
        else:
            h_exp = (f_exp - np.uint32(0x38000000)) >> np.uint32(13)
            f_sig = f & np.uint32(0x007FFFFF)
            if (f_sig & np.uint32(0x3FFF)) != np.uint32(0x1000):
                f_sig += np.uint32(0x1000)
            out[i] = sign + (f_sig >> np.uint32(13)) + h_exp


def f32_to_f16(x) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape, "<u2")
    _f32_to_f16(x.reshape(-1).view(np.uint32), out.reshape(-1))
    return out


@njit(cache=True, nogil=True)
def _q8_0(x, out, scales):
    for i in range(out.shape[0]):
        amax = np.float32(0.0)
        for j in range(32):
            a = np.float32(abs(x[32 * i + j]))
            amax = a if a > amax else amax
        d = np.float32(amax / np.float32(127.0))
        scales[i] = d
        inv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
        for j in range(32):
            v = np.float32(x[32 * i + j] * inv)
            r = np.floor(abs(np.float64(v)) + 0.5)  # C roundf: halves away from zero (exact in double)
            out[i, 2 + j] = np.uint8(np.int8(r if v >= 0 else -r))


def quantize_q8_0(x) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    if x.size % 32:
        raise ValueError(f"{x.size} values are not a whole number of 32-value q8_0 blocks")
    out = np.empty((x.size // 32, 34), np.uint8)
    scales = np.empty(x.size // 32, np.float32)
    _q8_0(x, out, scales)
    out[:, :2] = f32_to_f16(scales).view(np.uint8).reshape(-1, 2)
    return out


@njit(cache=True, nogil=True)
def _rope_rotate(x, out, cos, sin, n_rot, neox):
    n, h, d = x.shape
    half = n_rot // 2
    for r in range(n):
        for k in range(h):
            for j in range(n_rot, d):
                out[r, k, j] = x[r, k, j]
            for i in range(half):
                ia = i if neox else 2 * i
                ib = i + half if neox else 2 * i + 1
                a = np.float64(x[r, k, ia])
                b = np.float64(x[r, k, ib])
                out[r, k, ia] = np.float32(a * cos[r, i] - b * sin[r, i])
                out[r, k, ib] = np.float32(a * sin[r, i] + b * cos[r, i])


def rope_rotate(x, cos, sin, n_rot: int, neox: bool) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    _rope_rotate(x, out, np.ascontiguousarray(cos, np.float64), np.ascontiguousarray(sin, np.float64), n_rot, bool(neox))
    return out


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
    out = np.empty(n, np.int32)
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
    out = np.empty(n, np.int32)
    status = np.zeros(starts.shape[0], np.int64)
    args = (np.frombuffer(data, np.uint8), starts, counts, offsets, freqs, cum, lookup, lanes, out, status)
    n_tasks = starts.shape[0]
    workers = min(threads(), n_tasks) if n >= _PARALLEL_SYMBOLS else 1
    # Python threads over a nogil kernel (parallel_map: no OpenMP pool left spinning against
    # numpy after, and serial when already on a pool thread)
    bounds = np.linspace(0, n_tasks, workers + 1).astype(np.int64)
    parallel_map(lambda i: _rans_decode_lanes(*args, bounds[i], bounds[i + 1]), list(range(workers)))
    if np.any(status != 0):
        raise ValueError("rANS stream is corrupt (a lane ends early or does not decode to its start state)")
    return out
