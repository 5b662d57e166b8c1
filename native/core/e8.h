/* Nearest point of the E8 lattice (D8 u D8 + 1/2) to an 8-vector, as backends/reference.py
 * e8_nearest (Conway & Sloane): round every coordinate half away from zero; if the sum is odd,
 * round the worst-rounded coordinate (the first on ties) the other way; of the two cosets take
 * the half-integer one only when strictly closer. Squared distances are summed in double in
 * the fixed order ((0+1)+(2+3))+((4+5)+(6+7)), as the reference does. */
#ifndef NXKV_CORE_E8_H
#define NXKV_CORE_E8_H

#include <math.h>
#include <stdint.h>

#include "target.h"

/* Whether an integer-valued double is odd (fmod(sum, 2) != 0), without a libm call where it
 * fits an integer. */
NXKV_FN int nxkv_core_is_odd(double sum) {
    return fabs(sum) < 4503599627370496.0 ? (int)((int64_t)sum & 1) : fmod(sum, 2.0) != 0.0;
}

NXKV_FN void nxkv_core_d8_nearest(const double x[8], double out[8]) {
    double err[8], sum = 0.0, worst_err = -1.0;
    for (int j = 0; j < 8; ++j) {
        const double v = x[j];
        const double r = floor(fabs(v) + 0.5) * (v >= 0 ? 1.0 : -1.0);
        out[j] = r;
        sum += r;
        err[j] = fabs(v - r);
    }
    /* the first index of the largest error, without a branch per coordinate (NaN errors never
     * win, as in the reference) */
    for (int j = 0; j < 8; ++j) worst_err = err[j] > worst_err ? err[j] : worst_err;
    int worst = 0;
    for (int j = 7; j >= 0; --j) worst = err[j] == worst_err ? j : worst;
    if (nxkv_core_is_odd(sum)) {
        out[worst] += (x[worst] - out[worst] >= 0) ? 1.0 : -1.0;
    }
}

NXKV_FN void nxkv_core_e8_nearest(const double x[8], double out[8]) {
    double a[8], b[8], xs[8];
    nxkv_core_d8_nearest(x, a);
    for (int j = 0; j < 8; ++j) xs[j] = x[j] - 0.5;
    nxkv_core_d8_nearest(xs, b);
    double ea[8], eb[8];
    for (int j = 0; j < 8; ++j) {
        b[j] += 0.5;
        ea[j] = (x[j] - a[j]) * (x[j] - a[j]);
        eb[j] = (x[j] - b[j]) * (x[j] - b[j]);
    }
    /* the reference's fixed order: ((0+1)+(2+3))+((4+5)+(6+7)) */
    const double da = ((ea[0] + ea[1]) + (ea[2] + ea[3])) + ((ea[4] + ea[5]) + (ea[6] + ea[7]));
    const double db = ((eb[0] + eb[1]) + (eb[2] + eb[3])) + ((eb[4] + eb[5]) + (eb[6] + eb[7]));
    const double *src = db < da ? b : a;
    for (int j = 0; j < 8; ++j) out[j] = src[j];
}

#endif
