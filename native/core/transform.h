/* The inverse of the lattice's PCA transform for one head vector, as backends/reference.py
 * basis_inverse: out[i] = (sum over j = 0 .. d-1, in that order, of basis[j d + i] * y[j]) *
 * scale + mean[i], summed in double. Integer basis entries times floats are exact in a double, so
 * this order gives the same sum with or without FMA; zero coefficients add +0 and are skipped
 * (the sum never holds -0). acc: d doubles of scratch. One rounding to float at the end. */
#ifndef NXKV_CORE_TRANSFORM_H
#define NXKV_CORE_TRANSFORM_H

#include <stddef.h>
#include <stdint.h>

#include "target.h"

NXKV_FN void nxkv_core_basis_inverse(const float *y, const double *basis, size_t d, double scale, const double *mean,
                                     double *acc, float *out) {
    for (size_t i = 0; i < d; ++i) acc[i] = 0.0;
    for (size_t j = 0; j < d; ++j) {
        const double yj = (double)y[j];
        if (yj == 0.0) continue;
        const double *row = basis + j * d;
        for (size_t i = 0; i < d; ++i) acc[i] += row[i] * yj;
    }
    for (size_t i = 0; i < d; ++i) out[i] = (float)(acc[i] * scale + (mean ? mean[i] : 0.0));
}

#endif
