/* Byte-wise rANS with a 32-bit state (Duda; ryg_rans' layout), as backends/reference.py
 * rans_encode / rans_decode: probabilities in 2^14, state lower bound 2^23, the final state
 * written first (big-endian), then the renormalisation bytes in decoding order. */
#ifndef NXKV_CORE_RANS_H
#define NXKV_CORE_RANS_H

#include <stddef.h>
#include <stdint.h>

#include "../include/nxkv.h" /* enum nxkv_format */
#include "target.h"

#define NXKV_RANS_PROB_BITS NXKV_FORMAT_RANS_PROB_BITS
#define NXKV_RANS_L (1u << NXKV_FORMAT_RANS_LOWER_BOUND_BITS)

/* The decoder's per-slot table: for slot k (0 .. 2^14-1) of symbol s = lookup[k],
 * freqs[s] << 14 | (k - cum[s]), so that one load gives both terms of the state update. */
NXKV_FN void nxkv_core_rans_slots(const uint32_t *freqs, const uint32_t *cum, const uint32_t *lookup, uint32_t *slots) {
    for (uint32_t k = 0; k < (1u << NXKV_RANS_PROB_BITS); ++k) {
        const uint32_t s = lookup[k];
        slots[k] = (freqs[s] << NXKV_RANS_PROB_BITS) | (k - cum[s]);
    }
}

/* Decode n symbols of one stream into out[0], out[stride], ...: 0, or -1 if the stream runs out
 * or does not end in the encoder's start state. lookup maps a slot (0 .. 2^14-1) to its symbol,
 * slots as nxkv_core_rans_slots. */
NXKV_FN int nxkv_core_rans_decode(const uint8_t *data, size_t n_data, const uint32_t *slots, const uint32_t *lookup,
                                  int32_t *out, size_t n, size_t stride) {
    const uint32_t mask = (1u << NXKV_RANS_PROB_BITS) - 1;
    if (n_data < 4) return -1;
    uint32_t x = ((uint32_t)data[0] << 24) | ((uint32_t)data[1] << 16) | ((uint32_t)data[2] << 8) | data[3];
    size_t p = 4;
    for (size_t i = 0; i < n; ++i) {
        const uint32_t slot = x & mask, e = slots[slot];
        out[i * stride] = lookup[slot];
        x = (e >> NXKV_RANS_PROB_BITS) * (x >> NXKV_RANS_PROB_BITS) + (e & mask);
        while (x < NXKV_RANS_L) {
            if (p >= n_data) return -1;
            x = (x << 8) | data[p++];
        }
    }
    return (x == NXKV_RANS_L && p == n_data) ? 0 : -1;
}

/* One decoding step of one lane: the symbol, then the state renormalised from d[*p ..). 0, or
 * -1 if the stream runs out. */
NXKV_FN int nxkv_core_rans_step(uint32_t *x, size_t *p, const uint8_t *d, size_t n_data, const uint32_t *slots,
                                const uint32_t *lookup, int32_t *out) {
    const uint32_t mask = (1u << NXKV_RANS_PROB_BITS) - 1;
    uint32_t xl = *x;
    const uint32_t slot = xl & mask, e = slots[slot];
    *out = lookup[slot];
    xl = (e >> NXKV_RANS_PROB_BITS) * (xl >> NXKV_RANS_PROB_BITS) + (e & mask);
    size_t pl = *p;
    if (pl + 2 <= n_data) {
        /* at most two bytes per symbol (2^14 probabilities, 2^23 lower bound): read both, keep
         * what is needed, without a branch the data would mispredict */
        const uint32_t n1 = xl < NXKV_RANS_L;
        xl = n1 ? (xl << 8) | d[pl] : xl;
        const uint32_t n2 = xl < NXKV_RANS_L;
        xl = n2 ? (xl << 8) | d[pl + n1] : xl;
        pl += n1 + n2;
    } else {
        while (xl < NXKV_RANS_L) {
            if (pl >= n_data) return -1;
            xl = (xl << 8) | d[pl++];
        }
    }
    *p = pl;
    *x = xl;
    return 0;
}

/* Decode one chunk of interleaved rANS: m symbols, symbol i from lane i % lanes, each lane its
 * own stream data[l] of n_data[l] bytes (lanes with no symbol: no stream). The lanes advance in
 * lockstep, so their independent state updates overlap in the CPU's pipeline instead of waiting
 * on one another; `width`, a constant where the caller can make it one, lets the compiler keep
 * the states in registers. x and p are scratch of `lanes` entries. 0, or -1 as
 * nxkv_core_rans_decode. */
NXKV_FN int nxkv_core_rans_decode_interleaved(const uint8_t *const *data, const size_t *n_data, size_t lanes,
                                              const uint32_t *slots, const uint32_t *lookup,
                                              int32_t *out, size_t m, uint32_t *x, size_t *p) {
    const size_t active = m < lanes ? m : lanes;
    for (size_t l = 0; l < active; ++l) {
        const uint8_t *d = data[l];
        if (n_data[l] < 4) return -1;
        x[l] = ((uint32_t)d[0] << 24) | ((uint32_t)d[1] << 16) | ((uint32_t)d[2] << 8) | d[3];
        p[l] = 4;
    }
    size_t i = 0;
    int bad = 0;
    if (lanes == 4) { /* the presets' lane count: whole rounds with the states in registers */
        uint32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
        size_t p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
        for (; i + 4 <= m; i += 4) {
            bad |= nxkv_core_rans_step(&x0, &p0, data[0], n_data[0], slots, lookup, out + i);
            bad |= nxkv_core_rans_step(&x1, &p1, data[1], n_data[1], slots, lookup, out + i + 1);
            bad |= nxkv_core_rans_step(&x2, &p2, data[2], n_data[2], slots, lookup, out + i + 2);
            bad |= nxkv_core_rans_step(&x3, &p3, data[3], n_data[3], slots, lookup, out + i + 3);
        }
        x[0] = x0, x[1] = x1, x[2] = x2, x[3] = x3;
        p[0] = p0, p[1] = p1, p[2] = p2, p[3] = p3;
    }
    for (; i < m && !bad; i += lanes) {
        const size_t k = m - i < lanes ? m - i : lanes;
        for (size_t l = 0; l < k; ++l) {
            bad |= nxkv_core_rans_step(x + l, p + l, data[l], n_data[l], slots, lookup, out + i + l);
        }
    }
    if (bad) return -1;
    for (size_t l = 0; l < active; ++l) {
        if (x[l] != NXKV_RANS_L || p[l] != n_data[l]) return -1;
    }
    return 0;
}

/* The GPU's one-table form of the decoder's slot table: for slot k of symbol s,
 * s << 14 | (k - cum[s]) (s < 2^12: the alphabet is at most 4096 wide), the frequency then read
 * from a table of the alphabet's size. 64 KiB a stream, held in a GPU block's shared memory. */
NXKV_FN uint32_t nxkv_core_rans_packed_slot(const uint32_t *cum, uint32_t s, uint32_t k) {
    return (s << NXKV_RANS_PROB_BITS) | (k - cum[s]);
}

/* nxkv_core_rans_decode with packed slots (nxkv_core_rans_packed_slot) and the frequencies as
 * 16-bit values: the same symbols, the same checks. The renormalisation reads both possible bytes
 * without a branch where the stream has them (as nxkv_core_rans_step), so the threads of a GPU
 * warp do not diverge on it. */
NXKV_FN int nxkv_core_rans_decode_packed(const uint8_t *data, size_t n_data, const uint32_t *packed, const uint16_t *freqs,
                                         int32_t *out, size_t n, size_t stride) {
    const uint32_t mask = (1u << NXKV_RANS_PROB_BITS) - 1;
    if (n_data < 4) return -1;
    uint32_t x = ((uint32_t)data[0] << 24) | ((uint32_t)data[1] << 16) | ((uint32_t)data[2] << 8) | data[3];
    size_t p = 4;
    for (size_t i = 0; i < n; ++i) {
        const uint32_t e = packed[x & mask], s = e >> NXKV_RANS_PROB_BITS;
        out[i * stride] = (int32_t)s;
        x = (uint32_t)freqs[s] * (x >> NXKV_RANS_PROB_BITS) + (e & mask);
        if (p + 2 <= n_data) {
            const uint32_t n1 = x < NXKV_RANS_L;
            x = n1 ? (x << 8) | data[p] : x;
            const uint32_t n2 = x < NXKV_RANS_L;
            x = n2 ? (x << 8) | data[p + n1] : x;
            p += n1 + n2;
        } else {
            while (x < NXKV_RANS_L) {
                if (p >= n_data) return -1;
                x = (x << 8) | data[p++];
            }
        }
    }
    return (x == NXKV_RANS_L && p == n_data) ? 0 : -1;
}

/* x / f for 0 <= x < 2^31 and f >= 2 as a multiplication and shifts (the reciprocal of ryg_rans'
 * fast encoder, exact in that range): rcp = ceil(2^(shift + 31) / f), shift = ceil(log2 f). For
 * f = 1 the quotient is x itself (rcp 0 marks it). */
NXKV_FN void nxkv_core_rans_reciprocal(uint32_t f, uint32_t *rcp, uint32_t *shift) {
    if (f < 2) {
        *rcp = 0;
        *shift = 0;
        return;
    }
    uint32_t b = 0;
    while (f > (1u << b)) ++b;
    *rcp = (uint32_t)(((1ull << (b + 31)) + f - 1) / f);
    *shift = b - 1;
}

/* One encoder step: symbol s into state *x, the bytes it pushes out written downwards from *p,
 * not below lo. 0, or -1 if they would not fit. */
NXKV_FN int nxkv_core_rans_put(uint64_t *x, uint8_t **p, const uint8_t *lo, uint32_t s, const uint32_t *freqs,
                               const uint32_t *cum, const uint32_t *rcp, const uint32_t *shift) {
    const uint64_t f = freqs[s], x_max = ((uint64_t)(NXKV_RANS_L >> NXKV_RANS_PROB_BITS) << 8) * f;
    while (*x >= x_max) {
        if (*p <= lo) return -1;
        *--*p = (uint8_t)(*x & 0xff);
        *x >>= 8;
    }
    const uint64_t q = rcp[s] ? ((*x * rcp[s]) >> 32) >> shift[s] : *x; /* x / f */
    *x = (q << NXKV_RANS_PROB_BITS) + (*x - q * f) + cum[s];
    return 0;
}

/* Encode n symbols symbols[0], symbols[stride], ... into the buffer that ends at `end`, growing
 * downwards: the number of bytes written, or -1 if `capacity` bytes were not enough. rcp and
 * shift: nxkv_core_rans_reciprocal of each symbol's frequency (the state stays below 2^31, where
 * it is exact). */
NXKV_FN int64_t nxkv_core_rans_encode(const int64_t *symbols, size_t n, size_t stride, const uint32_t *freqs,
                                      const uint32_t *cum, const uint32_t *rcp, const uint32_t *shift, uint8_t *end,
                                      size_t capacity) {
    uint64_t x = NXKV_RANS_L;
    uint8_t *p = end;
    for (size_t k = n; k-- > 0;) {
        if (nxkv_core_rans_put(&x, &p, end - capacity, (uint32_t)symbols[k * stride], freqs, cum, rcp, shift)) return -1;
    }
    for (int k = 0; k < 4; ++k) {
        if ((size_t)(end - p) >= capacity) return -1;
        *--p = (uint8_t)(x & 0xff);
        x >>= 8;
    }
    return (int64_t)(end - p);
}

#endif
