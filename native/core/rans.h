/* Byte-wise rANS with a 32-bit state (Duda; ryg_rans' layout), as backends/reference.py
 * rans_encode / rans_decode: probabilities in 2^14, state lower bound 2^23, the final state
 * written first (big-endian), then the renormalisation bytes in decoding order. */
#ifndef NXKV_CORE_RANS_H
#define NXKV_CORE_RANS_H

#include <stddef.h>
#include <stdint.h>

#include "target.h"

#define NXKV_RANS_PROB_BITS 14
#define NXKV_RANS_L (1u << 23)

/* Decode n symbols of one stream into out[0], out[stride], ...: 0, or -1 if the stream runs out
 * or does not end in the encoder's start state. lookup maps a slot (0 .. 2^14-1) to its symbol. */
NXKV_FN int nxkv_core_rans_decode(const uint8_t *data, size_t n_data, const uint32_t *freqs, const uint32_t *cum,
                                  const uint32_t *lookup, int64_t *out, size_t n, size_t stride) {
    const uint32_t mask = (1u << NXKV_RANS_PROB_BITS) - 1;
    if (n_data < 4) return -1;
    uint32_t x = ((uint32_t)data[0] << 24) | ((uint32_t)data[1] << 16) | ((uint32_t)data[2] << 8) | data[3];
    size_t p = 4;
    for (size_t i = 0; i < n; ++i) {
        uint32_t slot = x & mask;
        uint32_t s = lookup[slot];
        out[i * stride] = s;
        x = freqs[s] * (x >> NXKV_RANS_PROB_BITS) + slot - cum[s];
        while (x < NXKV_RANS_L) {
            if (p >= n_data) return -1;
            x = (x << 8) | data[p++];
        }
    }
    return (x == NXKV_RANS_L && p == n_data) ? 0 : -1;
}

/* Encode n symbols symbols[0], symbols[stride], ... into the buffer that ends at `end`, growing
 * downwards: the number of bytes written, or -1 if `capacity` bytes were not enough. */
NXKV_FN int64_t nxkv_core_rans_encode(const int64_t *symbols, size_t n, size_t stride, const uint32_t *freqs,
                                      const uint32_t *cum, uint8_t *end, size_t capacity) {
    uint64_t x = NXKV_RANS_L;
    uint8_t *p = end;
    for (size_t k = n; k-- > 0;) {
        uint32_t s = (uint32_t)symbols[k * stride];
        uint64_t f = freqs[s];
        uint64_t x_max = ((uint64_t)(NXKV_RANS_L >> NXKV_RANS_PROB_BITS) << 8) * f;
        while (x >= x_max) {
            if ((size_t)(end - p) >= capacity) return -1;
            *--p = (uint8_t)(x & 0xff);
            x >>= 8;
        }
        x = ((x / f) << NXKV_RANS_PROB_BITS) + (x % f) + cum[s];
    }
    for (int k = 0; k < 4; ++k) {
        if ((size_t)(end - p) >= capacity) return -1;
        *--p = (uint8_t)(x & 0xff);
        x >>= 8;
    }
    return (int64_t)(end - p);
}

#endif
