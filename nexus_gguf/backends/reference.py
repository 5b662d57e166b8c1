"""numpy reference kernels: the readable truth every other backend is tested against.
Names match the C entry points in native/include/nxkv.h (without the nxkv_ prefix)."""

from __future__ import annotations

import numpy as np


def byteplane_split(src: np.ndarray, element_size: int) -> np.ndarray:
    """uint8 [n * element_size] -> uint8 [element_size * n]: byte b of element i at b * n + i."""
    return np.ascontiguousarray(src.reshape(-1, element_size).T).reshape(-1)


def byteplane_merge(src: np.ndarray, element_size: int) -> np.ndarray:
    """Inverse of byteplane_split."""
    return np.ascontiguousarray(src.reshape(element_size, -1).T).reshape(-1)


def hadamard_matrix(n: int) -> np.ndarray:
    """Orthonormal Walsh-Hadamard matrix (Sylvester order, as llama.cpp's ggml_gen_hadamard):
    symmetric, and its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def hadamard_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """Rotate each run of `block` consecutive values of float32 rows x[..., d] by the orthonormal
    Hadamard matrix (d a multiple of block): x @ hadamard_matrix(block), computed as the fast
    transform in a fixed order so that every backend rounds alike: butterflies (a + b, a - b) in
    float32 over pairs (i, i + h) for h = 1, 2, 4, ..., then one multiplication by the float32
    nearest 1/sqrt(block). Applying it twice gives x back up to rounding."""
    shape = x.shape
    if block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard size {block} is not a power of two")
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} values are not whole {block}-value blocks")
    y = np.array(x, np.float32).reshape(-1, block)
    h = 1
    while h < block:
        y = y.reshape(-1, block // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = np.stack([a + b, a - b], axis=2)
        h *= 2
    return (y.reshape(-1, block) * np.float32(1.0 / np.sqrt(block))).reshape(shape)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml q8_0 blocks (uint8 [n_blocks, 34]) of float32 x, a whole number of 32-value blocks:
    ggml_quants.quantize_row_q8_0_ref, the numpy twin of ggml's quantize_row_q8_0_ref."""
    from ..ggml_quants import quantize_row_q8_0_ref  # ggml_quants itself runs kernels: import late

    return quantize_row_q8_0_ref(x)


def lattice_quantize(x: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The E8 points of m groups of 8 float64 values x[m, 8] at quantizer steps step[m] (0: the
    group is all zero), stored as stages/lattice.py does: (coset u8 [m]: 1 for D8 + ½, coord
    int32 [m, 7]: z0..z6 of z = point - coset/2, coord_last int32 [m]: (z7 - parity(z0..z6)) / 2).
    lattice_dequantize inverts it up to the quantization. ValueError if a value divided by its
    step is not within int32 with room for the rounding (infinite or NaN included)."""
    x = np.asarray(x, np.float64).reshape(-1, 8)
    step = np.asarray(step, np.float64).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if np.any((step[:, 0] > 0) & ~(np.abs(x / step) < 2147483000.0).all(axis=1)):
            raise ValueError("lattice_quantize: values too large for their steps (points beyond int32)")
        u = np.where(step > 0, x / step, 0.0)
    p = e8_nearest(u)
    coset = (p[:, 0] != np.floor(p[:, 0])).astype(np.uint8)
    z = (p - 0.5 * coset[:, None]).astype(np.int64)
    parity = z[:, :7].sum(axis=1) & 1
    return coset, z[:, :7].astype(np.int32), ((z[:, 7] - parity) // 2).astype(np.int32)


def lattice_quantize_rdo(x: np.ndarray, step: np.ndarray, rows: np.ndarray, costs: np.ndarray, scales: np.ndarray,
                         lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lattice_quantize choosing, for each group, the E8 point of least distortion + lam * rate
    among the nearest points of s * u for s in scales (in order, the first of equal costs), u =
    x[m] / step[m]: distortion = the squared distance to u, rate = the sum over the 8 values of
    costs[rows[m] + j, clip(2 p_j, -V, V) + V] (bits; costs float64 [r, 2V + 1], rows int64 [m]).
    Both sums in _sum8's order, then distortion + lam * rate, each one double operation: every
    backend picks the same points. scales[0] = 1 makes the nearest point a candidate."""
    x = np.asarray(x, np.float64).reshape(-1, 8)
    step = np.asarray(step, np.float64).reshape(-1, 1)
    rows = np.asarray(rows, np.int64).reshape(-1)
    costs = np.asarray(costs, np.float64)
    v = (costs.shape[1] - 1) // 2
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if np.any((step[:, 0] > 0) & ~(np.abs(x / step) < 2147483000.0).all(axis=1)):
            raise ValueError("lattice_quantize_rdo: values too large for their steps (points beyond int32)")
        u = np.where(step > 0, x / step, 0.0)
    if x.shape[0] and (rows.min() < 0 or rows.max() + 8 > costs.shape[0]):
        raise ValueError("lattice_quantize_rdo: rate rows outside the cost table")
    table = rows[:, None] + np.arange(8)
    best, best_cost = np.zeros_like(u), np.full(u.shape[0], np.inf)
    for s in np.asarray(scales, np.float64):
        p = e8_nearest(s * u)
        distortion = _sum8((u - p) ** 2)
        rate = _sum8(costs[table, np.clip(2.0 * p, -v, v).astype(np.int64) + v])
        cost = distortion + lam * rate
        take = cost < best_cost
        best[take], best_cost[take] = p[take], cost[take]
    coset = (best[:, 0] != np.floor(best[:, 0])).astype(np.uint8)
    z = (best - 0.5 * coset[:, None]).astype(np.int64)
    parity = z[:, :7].sum(axis=1) & 1
    return coset, z[:, :7].astype(np.int32), ((z[:, 7] - parity) // 2).astype(np.int32)


def lattice_dequantize(coset: np.ndarray, coord: np.ndarray, coord_last: np.ndarray, step: np.ndarray,
                       mean: np.ndarray) -> np.ndarray:
    """float32 [m, 8] values of m E8 points (stages/lattice.py stores them so): coset[m] 0 or 1,
    coord[m, 7], coord_last[m] the eighth coordinate halved (its parity is that of the seven's
    sum); point = (z + coset / 2), value = point * step[m] (+ mean, float64 [k * 8] repeated over
    the groups in blocks of k, when not empty). Double arithmetic, one rounding to float32."""
    # z + coset/2 as (2 z + coset) / 2: the same double, exactly
    p = doubled_points(np.asarray(coset).reshape(-1, 1), np.asarray(coord).reshape(-1, 1, 7),
                       np.asarray(coord_last).reshape(-1, 1)) * 0.5
    x = p * np.asarray(step, np.float64).reshape(-1)[:, None]
    mean = np.asarray(mean, np.float64).reshape(-1)
    if mean.size:
        x = (x.reshape(-1, mean.size) + mean).reshape(-1, 8)
    return x.astype(np.float32)


def basis_dequantize_args(coset, coord, coord_last, step, basis, mean, channel_scale=()):
    """The arrays basis_dequantize's kernels take (every backend's), checked: the points as
    [n, h, d/8] (coord [n, h, d/8, 7]) for step [n, h]."""
    step = np.ascontiguousarray(step, np.float64)
    basis = np.ascontiguousarray(basis, np.int16)
    if step.ndim != 2 or basis.ndim != 3 or basis.shape[0] != step.shape[1] or basis.shape[1] != basis.shape[2] or basis.shape[1] % 8:
        raise ValueError(f"basis_dequantize: steps {step.shape} and basis {basis.shape} do not fit [n, h] and [h, d, d]")
    n, h = step.shape
    d = basis.shape[1]
    coset = np.ascontiguousarray(coset, np.uint8).reshape(n, h, d // 8)
    coord = np.ascontiguousarray(coord, np.int32).reshape(n, h, d // 8, 7)
    coord_last = np.ascontiguousarray(coord_last, np.int32).reshape(n, h, d // 8)
    mean = np.ascontiguousarray(mean, np.float64).reshape(-1)
    channel_scale = np.ascontiguousarray(channel_scale, np.float64).reshape(-1)
    if mean.size not in (0, h * d) or channel_scale.size not in (0, h * d):
        raise ValueError(f"basis_dequantize: mean ({mean.size}) or channel scales ({channel_scale.size}) do not fit {h} heads of {d}")
    return coset, coord, coord_last, step, basis, mean, channel_scale


def doubled_points(coset: np.ndarray, coord: np.ndarray, coord_last: np.ndarray) -> np.ndarray:
    """int64 [..., 8 k]: twice the E8 points' coordinates, 2 z + coset (exact integers), of the
    stored points coset [..., k], coord [..., k, 7], coord_last [..., k] (lattice_dequantize)."""
    z7 = np.asarray(coord, np.int64)
    last = 2 * np.asarray(coord_last, np.int64) + (z7.sum(axis=-1) & 1)
    z = np.concatenate([z7, last[..., None]], axis=-1)
    p2 = 2 * z + np.asarray(coset, np.int64)[..., None]
    return p2.reshape(p2.shape[:-2] + (p2.shape[-2] * 8,))


def basis_dequantize(coset: np.ndarray, coord: np.ndarray, coord_last: np.ndarray, step: np.ndarray, basis: np.ndarray,
                     shift: int, mean: np.ndarray, channel_scale: np.ndarray = ()) -> np.ndarray:
    """float32 [n, h, d]: E8 points stored on a head's principal axes (stages/lattice.py's PCA
    transform) back in the head's coordinates. With p2 = twice each point's coordinates (exact
    integers, doubled_points) and B = basis[k] (int16 [d, d], rows the components, entries in
    units of 2^-shift): x[c, k, i] = S * (step[c, k] * 2^-(shift + 1)) (+ mean[k d + i]) where
    S = sum over j of B[j, i] * p2[j] is an exact int64 (|S| < 2^61 for any int32 point), so every
    backend computes the same S in any order and width that holds it; then its conversion to
    double, the double operations in this order (times the channel's scale, float64 [h * d],
    where given: the lattice's K weighting) and one rounding to float32."""
    coset, coord, coord_last, step, basis, mean, channel_scale = basis_dequantize_args(coset, coord, coord_last, step, basis,
                                                                                       mean, channel_scale)
    n, h = step.shape
    d = basis.shape[1]
    p2 = doubled_points(coset, coord, coord_last)  # [n, h, d]
    s = np.einsum("nhj,hji->nhi", p2, basis.astype(np.int64))
    x = s.astype(np.float64) * (step * 2.0 ** -(int(shift) + 1))[:, :, None]
    if channel_scale.size:
        x = x * channel_scale.reshape(h, d)
    if mean.size:
        x = x + mean.reshape(h, d)
    return x.astype(np.float32)


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    """uint16 bits of IEEE half values of float32 x, rounded to nearest even (numpy's astype;
    ggml's GGML_FP32_TO_FP16). NaN stays NaN (its payload bits are not specified here)."""
    with np.errstate(over="ignore"):  # overflow to infinity is the defined result
        return np.ascontiguousarray(x, np.float32).astype("<f2").view("<u2")


def f64_to_f16(x: np.ndarray) -> np.ndarray:
    """uint16 bits of IEEE half values of float64 x, rounded once, straight from the double."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(x, np.float64).astype("<f2").view("<u2")


def rope_rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int, neox: bool) -> np.ndarray:
    """float32 x[n, h, d] with the first n_rot values of each head vector rotated in pairs
    (2i, 2i+1), or (i, i + n_rot/2) for NEOX, by the angles whose float64 cos and sin [n, n_rot/2]
    are given: a*cos - b*sin, a*sin + b*cos in double, rounded once to float32."""
    x = np.asarray(x, np.float32)
    cos = np.asarray(cos, np.float64)[:, None, :]
    sin = np.asarray(sin, np.float64)[:, None, :]
    out = np.array(x, np.float32, copy=True)
    half = n_rot // 2
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half:n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    return out


def e8_nearest(x: np.ndarray) -> np.ndarray:
    """The nearest point of the E8 lattice (D8 ∪ D8 + ½) to each row of float x[n, 8]
    (Conway & Sloane, "Fast quantizing and decoding algorithms for lattice quantizers").
    Ties break towards the integer coset and the lower index, as the other backends do."""
    x = np.asarray(x, np.float64).reshape(-1, 8)
    a = _d8_nearest(x)
    b = _d8_nearest(x - 0.5) + 0.5
    da, db = _sum8((x - a) ** 2), _sum8((x - b) ** 2)
    return np.where((db < da)[:, None], b, a)


def _sum8(d: np.ndarray) -> np.ndarray:
    """Row sums of [n, 8] in one fixed order, ((0+1)+(2+3))+((4+5)+(6+7)) (numpy's own pairwise
    order for 8 values, written out so that no backend depends on it): near-ties between the
    two cosets then resolve alike everywhere."""
    return ((d[:, 0] + d[:, 1]) + (d[:, 2] + d[:, 3])) + ((d[:, 4] + d[:, 5]) + (d[:, 6] + d[:, 7]))


def _d8_nearest(x: np.ndarray) -> np.ndarray:
    """Nearest point of D8 (integer vectors with an even sum): round every coordinate, and if
    the sum is odd, round the worst-rounded coordinate the other way."""
    f = _round_half_away(x)
    odd = (f.sum(axis=1) % 2) != 0
    err = x - f
    worst = np.abs(err).argmax(axis=1)
    rows = np.nonzero(odd)[0]
    cols = worst[rows]
    f[rows, cols] += np.where(err[rows, cols] >= 0, 1.0, -1.0)
    return f


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


RANS_PROB_BITS = 14
RANS_L = 1 << 23  # lower bound of the normalised state (byte-wise renormalisation)


def rans_encode(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    """rANS (byte-wise, 32-bit state; Duda's rANS as in ryg_rans) of symbols in [0, len(freqs))
    with static frequencies summing to 2**RANS_PROB_BITS. Output: the final state (4 bytes,
    big-endian), then the renormalisation bytes in decoding order."""
    cum = np.concatenate([[0], np.cumsum(freqs)]).astype(np.int64)
    x = RANS_L
    out = bytearray()
    for s in reversed(np.asarray(symbols, np.int64).tolist()):
        f = int(freqs[s])
        x_max = ((RANS_L >> RANS_PROB_BITS) << 8) * f
        while x >= x_max:
            out.append(x & 0xFF)
            x >>= 8
        x = ((x // f) << RANS_PROB_BITS) + (x % f) + int(cum[s])
    out += bytes([x & 0xFF, (x >> 8) & 0xFF, (x >> 16) & 0xFF, (x >> 24) & 0xFF])
    return bytes(reversed(out))


def rans_decode(data: bytes, freqs: np.ndarray, n: int) -> np.ndarray:
    """Inverse of rans_encode; raises ValueError on data that runs out or does not end where
    the encoder started."""
    cum = np.concatenate([[0], np.cumsum(freqs)]).astype(np.int64)
    lookup = np.repeat(np.arange(len(freqs)), freqs)
    mask = (1 << RANS_PROB_BITS) - 1
    if len(data) < 4:
        raise ValueError("rANS stream shorter than its state")
    x = int.from_bytes(data[:4], "big")
    p = 4
    out = np.empty(n, np.int32)  # symbol indices: below 2^12
    for i in range(n):
        slot = x & mask
        s = int(lookup[slot])
        out[i] = s
        x = int(freqs[s]) * (x >> RANS_PROB_BITS) + slot - int(cum[s])
        while x < RANS_L:
            if p >= len(data):
                raise ValueError("rANS stream ends early")
            x = (x << 8) | data[p]
            p += 1
    if x != RANS_L or p != len(data):
        raise ValueError("rANS stream does not decode to its start state")
    return out


def lane_tasks(n: int, lanes: int, chunk: int) -> list[tuple[int, int]]:
    """(first symbol, symbol count) of each (chunk, lane) of interleaved rANS, in (chunk, lane)
    order: chunk k's lane j holds symbols k*chunk + j, + lanes, ... within the chunk."""
    out = []
    for c0 in range(0, n, chunk):
        m = min(chunk, n - c0)
        out += [(c0 + j, max(0, (m - j + lanes - 1) // lanes)) for j in range(lanes)]
    return out


def n_lane_tasks(n: int, lanes: int, chunk: int) -> int:
    """len(lane_tasks(n, lanes, chunk)), without building the list."""
    return -(-n // chunk) * lanes if n else 0


def rans_encode_lanes(symbols: np.ndarray, freqs: np.ndarray, lanes: int, chunk: int) -> tuple[np.ndarray, bytes]:
    """Interleaved rANS: (byte length of each (chunk, lane) stream, the streams back to back).
    Each stream is rans_encode of its lane's symbols; an empty lane is an empty stream."""
    symbols = np.asarray(symbols, np.int64)
    bodies = [rans_encode(symbols[start : start + count * lanes : lanes], freqs) if count else b""
              for start, count in lane_tasks(symbols.size, lanes, chunk)]
    return np.array([len(b) for b in bodies], np.int64), b"".join(bodies)


def rans_decode_lanes(data: bytes, lengths: np.ndarray, freqs: np.ndarray, n: int, lanes: int, chunk: int) -> np.ndarray:
    """Inverse of rans_encode_lanes; ValueError on a damaged or inconsistent stream."""
    tasks = lane_tasks(n, lanes, chunk)
    if len(lengths) != len(tasks) or int(np.sum(lengths)) != len(data):
        raise ValueError("interleaved rANS lane table does not match the stream")
    out = np.empty(n, np.int32)  # symbol indices: below 2^12
    offset = 0
    for (start, count), length in zip(tasks, lengths):
        part = data[offset : offset + int(length)]
        offset += int(length)
        if count:
            out[start : start + count * lanes : lanes] = rans_decode(part, freqs, count)
        elif length:
            raise ValueError("an empty rANS lane holds bytes")
    return out
