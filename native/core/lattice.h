/* E8 lattice points back to values, as backends/reference.py lattice_dequantize: a point is its
 * coset (0 integer, 1 half-integer), seven stored coordinates and the eighth stored halved with
 * the parity of the seven implied; value = (z + coset / 2) * step (+ the channel mean). Every
 * operation is one IEEE double operation in the reference's order, then one rounding to float:
 * built without contraction into FMA (CMakeLists.txt), the result is bit-identical. */
#ifndef NXKV_CORE_LATTICE_H
#define NXKV_CORE_LATTICE_H

#include <stdint.h>

#include <math.h>

#include "e8.h"
#include "target.h"

NXKV_FN void nxkv_core_lattice_group(uint8_t coset, const int32_t *z7, int32_t last, double step, const double *mean,
                                     float *out) {
    int64_t sum = 0;
    for (int j = 0; j < 7; ++j) sum += z7[j];
    const double half = 0.5 * (double)coset;
    for (int j = 0; j < 8; ++j) {
        const int64_t z = j < 7 ? (int64_t)z7[j] : 2 * (int64_t)last + (sum & 1);
        double v = ((double)z + half) * step;
        if (mean) v = v + mean[j];
        out[j] = (float)v;
    }
}

/* The stored form of the E8 point nearest to x / step (core/e8.h; step 0: the zero point), as
 * backends/reference.py lattice_quantize: coset 1 for D8 + 1/2, z = point - coset/2, seven
 * coordinates and the eighth halved with the parity of the seven. */
NXKV_FN void nxkv_core_lattice_point(const double *x, double step, uint8_t *coset, int32_t *z7, int32_t *last) {
    double u[8], p[8];
    for (int j = 0; j < 8; ++j) u[j] = step > 0 ? x[j] / step : 0.0;
    nxkv_core_e8_nearest(u, p);
    const int half = p[0] != floor(p[0]);
    int64_t sum = 0;
    for (int j = 0; j < 7; ++j) {
        const int64_t z = (int64_t)(p[j] - 0.5 * half);
        z7[j] = (int32_t)z;
        sum += z;
    }
    const int64_t z_last = (int64_t)(p[7] - 0.5 * half);
    *coset = (uint8_t)half;
    *last = (int32_t)((z_last - (sum & 1)) / 2); /* exact: z_last and the seven's sum share parity */
}

#endif
