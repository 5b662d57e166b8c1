/* E8 points stored on a head's principal axes back in the head's coordinates, as
 * backends/reference.py basis_dequantize: S[i] = sum over j of basis[j d + i] * p2[j] (p2: twice
 * the point's coordinates, exact integers), x[i] = (float)((double)S[i] * c + mean[i]) with
 * c = step * 2^-(shift + 1). S is an exact integer, so the order and width of the sum do not
 * matter: floats where a bound proves every partial sum exact, int64 otherwise; zero
 * coefficients are skipped. */
#ifndef NXKV_CORE_TRANSFORM_H
#define NXKV_CORE_TRANSFORM_H

#include <stdint.h>

#include "target.h"

/* The most values of one coded vector (a head, or a head group: stages/lattice.py MAX_BASIS_DIM) */
#define NXKV_MAX_HEAD_DIM 512

/* The doubled coordinates 2 z + coset of one stored E8 point (core/lattice.h's form: coset,
 * seven coordinates, the eighth halved with the seven's parity) into p2[0 .. 8); returns the sum
 * of their magnitudes (for the int32 bound below). */
NXKV_FN int64_t nxkv_core_doubled_group(int64_t coset, const int32_t *z7, int32_t last, int64_t *p2) {
    int64_t sum = 0, l1 = 0;
    for (int j = 0; j < 7; ++j) sum += z7[j];
    for (int j = 0; j < 8; ++j) {
        const int64_t z = j < 7 ? (int64_t)z7[j] : 2 * (int64_t)last + (sum & 1);
        const int64_t v = 2 * z + coset;
        p2[j] = v;
        l1 += v < 0 ? -v : v;
    }
    return l1;
}

/* The same for the d/8 points of one head vector. */
NXKV_FN int64_t nxkv_core_doubled_points(const uint8_t *coset, const int32_t *coord, const int32_t *coord_last, int64_t d,
                                         int64_t *p2) {
    int64_t l1 = 0;
    for (int64_t q = 0; q < d / 8; ++q) l1 += nxkv_core_doubled_group(coset[q], coord + 7 * q, coord_last[q], p2 + 8 * q);
    return l1;
}

#if defined(__GNUC__) && !defined(__CUDACC__) && !defined(__METAL_VERSION__)
/* GCC/Clang vector types: the compiler left the loop below scalar (5x slower, measured) */
typedef float nxkv_v8f __attribute__((vector_size(32)));
#define NXKV_HAVE_V8F 1
#endif

/* acc32[i0 .. i0 + 8 K) = sum over t < nnz of basis[rows[t] + i] * vals[t], for K = 8, 4 or 1
 * (a constant, so the K accumulators stay in registers: indexed by a run-time count they went
 * through memory, one store-to-load round trip per product, measured 4x slower). */
#ifdef NXKV_HAVE_V8F
#define NXKV_BASIS_BLOCK(K)                                                                                              \
    NXKV_FN void nxkv_core_basis_block##K(const float *basis, const int64_t *rows, const float *vals, int64_t nnz,    \
                                           int64_t i0, float *acc32) {                                                   \
        nxkv_v8f a[K];                                                                                                   \
        for (int b = 0; b < K; ++b) a[b] = (nxkv_v8f){0, 0, 0, 0, 0, 0, 0, 0};                                           \
        for (int64_t t = 0; t < nnz; ++t) {                                                                              \
            const float pj = vals[t];                                                                                    \
            const nxkv_v8f p = {pj, pj, pj, pj, pj, pj, pj, pj};                                                         \
            const float *row = basis + rows[t] + i0;                                                                     \
            for (int b = 0; b < K; ++b) {                                                                                \
                nxkv_v8f r;                                                                                              \
                __builtin_memcpy(&r, row + 8 * b, sizeof r);                                                             \
                a[b] += r * p;                                                                                           \
            }                                                                                                            \
        }                                                                                                                \
        for (int b = 0; b < K; ++b) __builtin_memcpy(acc32 + i0 + 8 * b, &a[b], sizeof a[b]);                          \
    }
#else
#define NXKV_BASIS_BLOCK(K)                                                                                              \
    NXKV_FN void nxkv_core_basis_block##K(const float *basis, const int64_t *rows, const float *vals, int64_t nnz,    \
                                           int64_t i0, float *acc32) {                                                   \
        for (int64_t i = i0; i < i0 + 8 * K; ++i) acc32[i] = 0.0f;                                                       \
        for (int64_t t = 0; t < nnz; ++t) {                                                                              \
            const float *row = basis + rows[t];                                                                          \
            for (int64_t i = i0; i < i0 + 8 * K; ++i) acc32[i] += row[i] * vals[t];                                      \
        }                                                                                                                \
    }
#endif
NXKV_BASIS_BLOCK(8)
NXKV_BASIS_BLOCK(4)
NXKV_BASIS_BLOCK(1)

/* x[i] = (float)(((double)S[i] * c) [* cscale[i]] [+ mean[i]]) from the exact sums S (int64): the
 * same double operations as the float path below, whose sums are the same integers. */
NXKV_FN void nxkv_core_basis_finish(const int64_t *acc64, int64_t d, double c, const double *mean, const double *cscale,
                                    float *out) {
    for (int64_t i = 0; i < d; ++i) {
        double v = (double)acc64[i] * c;
        if (cscale) v = v * cscale[i];
        if (mean) v = v + mean[i];
        out[i] = (float)v;
    }
}

/* One head vector: p2 [d] (l1 its magnitudes' sum), basis [d][d] (integers, every |entry| <=
 * 2^shift: the caller checks; held as floats, which hold them exactly), c = step * 2^-(shift + 1);
 * cscale: NULL or each channel's scale, multiplied before the mean is added; acc32 / acc64: d
 * scratch each. Every partial sum is at most 2^shift * l1 in magnitude: below
 * 2^24 the float sums are exact (8 lanes a vector instruction), else int64. */
NXKV_FN void nxkv_core_basis_vector(const int64_t *p2, int64_t l1, const float *basis, int64_t d, int shift, double c,
                                    const double *mean, const double *cscale, float *acc32, int64_t *acc64, float *out) {
    if (shift < 24 && l1 < ((int64_t)1 << (24 - shift))) {
        /* the nonzero coefficients first (many are 0: their values in out, their rows in acc64),
         * then the sums 32 outputs at a time, in registers, into acc32 */
        int64_t nnz = 0;
        for (int64_t j = 0; j < d; ++j) {
            out[nnz] = (float)p2[j];
            acc64[nnz] = j * d;
            nnz += p2[j] != 0;
        }
        int64_t i0 = 0;
        for (; i0 + 64 <= d; i0 += 64) nxkv_core_basis_block8(basis, acc64, out, nnz, i0, acc32);
        for (; i0 + 32 <= d; i0 += 32) nxkv_core_basis_block4(basis, acc64, out, nnz, i0, acc32);
        for (; i0 < d; i0 += 8) nxkv_core_basis_block1(basis, acc64, out, nnz, i0, acc32);
        /* (double) of these exact integer floats is (double) of the integers */
        if (mean && cscale) {
            for (int64_t i = 0; i < d; ++i) out[i] = (float)((double)acc32[i] * c * cscale[i] + mean[i]);
            return;
        }
        if (mean) {
            for (int64_t i = 0; i < d; ++i) out[i] = (float)((double)acc32[i] * c + mean[i]);
            return;
        }
        for (int64_t i = 0; i < d; ++i) acc64[i] = (int64_t)acc32[i];
    } else {
        for (int64_t i = 0; i < d; ++i) acc64[i] = 0;
        for (int64_t j = 0; j < d; ++j) {
            const int64_t pj = p2[j];
            if (!pj) continue;
            const float *row = basis + j * d;
            for (int64_t i = 0; i < d; ++i) acc64[i] += (int64_t)row[i] * pj;
        }
    }
    nxkv_core_basis_finish(acc64, d, c, mean, cscale, out);
}

#endif
