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

/* The stored form of an E8 point p (integer or half-integer coordinates), as
 * backends/reference.py lattice_quantize stores it: coset 1 for D8 + 1/2, z = point - coset/2,
 * seven coordinates and the eighth halved with the parity of the seven. */
NXKV_FN void nxkv_core_lattice_store(const double p[8], uint8_t *coset, int32_t *z7, int32_t *last) {
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

/* The stored form of the E8 point nearest to x / step (core/e8.h; step 0: the zero point). */
NXKV_FN void nxkv_core_lattice_point(const double *x, double step, uint8_t *coset, int32_t *z7, int32_t *last) {
    double u[8], p[8];
    for (int j = 0; j < 8; ++j) u[j] = step > 0 ? x[j] / step : 0.0;
    nxkv_core_e8_nearest(u, p);
    nxkv_core_lattice_store(p, coset, z7, last);
}

/* backends/reference.py lattice_quantize_rdo for one group: of the nearest points of s * u (u =
 * x / step, s = scales[0 .. n_scales)), the first of least distortion + lam * rate, the rate read
 * from the cost rows row0 .. row0 + 7 (width 2 v + 1, doubled coordinates clipped to +-v); both
 * sums in the reference's fixed order. */
NXKV_FN void nxkv_core_lattice_point_rdo(const double *x, double step, const double *scales, int n_scales,
                                         const double *costs, int64_t row0, int64_t v, double lam, int falling,
                                         uint8_t *coset, int32_t *z7, int32_t *last) {
    double u[8], su[8], p[8], best[8] = {0, 0, 0, 0, 0, 0, 0, 0}, e[8], r[8];
    double best_cost = INFINITY;
    for (int j = 0; j < 8; ++j) u[j] = step > 0 ? x[j] / step : 0.0;
    for (int c = 0; c < n_scales; ++c) {
        for (int j = 0; j < 8; ++j) su[j] = scales[c] * u[j];
        nxkv_core_e8_nearest(su, p);
        /* at the zero point, no smaller positive scale can give another point: zero's Voronoi cell
         * {y : y.p <= |p|^2 / 2 for every p} holds s' u strictly inside for 0 < s' < s when it
         * holds s u (the same choice as the reference, which tries them all; only where the
         * scales fall, checked by the caller) */
        int zero = falling;
        for (int j = 0; j < 8; ++j) zero &= p[j] == 0.0;
        for (int j = 0; j < 8; ++j) {
            const double k = 2.0 * p[j];
            const int64_t col = (k < (double)-v ? -v : k > (double)v ? v : (int64_t)k) + v;
            e[j] = (u[j] - p[j]) * (u[j] - p[j]);
            r[j] = costs[(row0 + j) * (2 * v + 1) + col];
        }
        const double d = ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
        const double rate = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        const double cost = d + lam * rate;
        if (cost < best_cost) {
            best_cost = cost;
            for (int j = 0; j < 8; ++j) best[j] = p[j];
        }
        if (zero) break;
    }
    nxkv_core_lattice_store(best, coset, z7, last);
}

#endif
