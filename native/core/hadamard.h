/* The orthonormal Walsh-Hadamard rotation of one block of n = 2^k floats, as
 * backends/reference.py hadamard_blocks: butterflies (a + b, a - b) in float over pairs
 * (i, i + h) for h = 1, 2, 4, ..., then one multiplication by `scale`, the float nearest
 * 1/sqrt(n). The fixed order makes every backend round alike. In place. */
#ifndef NXKV_CORE_HADAMARD_H
#define NXKV_CORE_HADAMARD_H

#include <stddef.h>

#include "target.h"

NXKV_FN void nxkv_core_hadamard(float *v, size_t n, float scale) {
    size_t h = 1;
    if (n >= 8) {
        /* the passes h = 1, 2, 4 within each group of 8, unrolled (the same butterflies in the
         * same order, so the same roundings), leaving contiguous passes the compiler vectorises */
        for (size_t i = 0; i < n; i += 8) {
            float *g = v + i;
            float a0 = g[0] + g[1], a1 = g[0] - g[1], a2 = g[2] + g[3], a3 = g[2] - g[3];
            float a4 = g[4] + g[5], a5 = g[4] - g[5], a6 = g[6] + g[7], a7 = g[6] - g[7];
            float b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
            float b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
            g[0] = b0 + b4, g[4] = b0 - b4, g[1] = b1 + b5, g[5] = b1 - b5;
            g[2] = b2 + b6, g[6] = b2 - b6, g[3] = b3 + b7, g[7] = b3 - b7;
        }
        h = 8;
    }
    for (; h < n; h *= 2) {
        for (size_t i = 0; i < n; i += 2 * h) {
            for (size_t j = i; j < i + h; ++j) {
                const float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
    }
    for (size_t j = 0; j < n; ++j) v[j] *= scale;
}

#endif
