/* One head vector of a lattice-coded K or V section made from its decoded point streams: the CPU
 * library (nxkv_decode_values) and the GPU kernel (native/cuda/nxkv_cuda.cu k_section_values) run
 * this same code, so their rows are the same bits, and those of the Python stages
 * (stages/lattice.py, hadamard.py, rope.py, then f16 rows). The nxkv_section and nxkv_values
 * structs are declared in nxkv.h. */
#ifndef NXKV_CORE_SECTION_H
#define NXKV_CORE_SECTION_H

#include <math.h>
#include <stdint.h>

#include "../include/nxkv.h"
#include "f16.h"
#include "hadamard.h"
#include "lattice.h"
#include "rope.h"
#include "target.h"
#include "transform.h"

/* The PCA basis product of one vector (core/transform.h's nxkv_core_basis_vector, a thread's
 * frame of 12 KB) is compiled for the CPU only: the GPU computes a tile of cells' products
 * together (native/cuda/nxkv_cuda.cu k_section_basis) from the same point groups and basis terms
 * below, and never passes a basis section to nxkv_core_section_vector. */
#if !defined(__CUDACC__)
#define NXKV_CORE_PCA 1
#endif

/* Whether every index the section makes lies inside the arrays (checked before any is read). */
NXKV_FN int nxkv_core_section_fits(const nxkv_section *s, const nxkv_values *a) {
    const int64_t d = s->head_dim, n = s->n_cells, h = s->n_heads, k = s->head_group;
    if (d < 8 || d % 8 || d > NXKV_MAX_HEAD_DIM || n < 0 || h < 1 || k < 1 || h % k ||
        k * d > NXKV_MAX_HEAD_DIM || s->scale_block < 8 || (k * d) % s->scale_block || s->scale_block % 8 || !s->dest) {
        return 0;
    }
    const int64_t w = k * d; /* values of one coded vector (a head group: concatenated) */
    const int64_t g = h * d / 8, blocks = w / s->scale_block, step_rows = s->step_per_cell ? n * (h / k) : h / k;
    if ((!s->by_class && (s->coset0 < 0 || s->coset0 + n * g > a->n_symbols || s->coord0 < 0 ||
                          s->coord0 + 7 * n * g > a->n_symbols || s->last0 < 0 || s->last0 + n * g > a->n_symbols)) ||
        s->step0 < 0 || s->step0 + step_rows * blocks > a->n_steps ||
        (s->mean0 >= 0 && s->mean0 + h * d > a->n_means) || (s->sink_map0 >= 0 && s->sink_map0 + n > a->n_sink_map) ||
        (s->rope && (s->n_rot < 2 || s->n_rot % 2 || s->n_rot > d || s->trig0 < 0 || s->trig0 + n * (s->n_rot / 2) > a->n_trig))) {
        return 0;
    }
    if (s->basis && (s->scale_block != w || s->basis_shift < 0 || s->basis_shift > 14 || s->basis0 < 0 ||
                     s->basis0 + (h / k) * w * w > a->n_bases || (s->cscale0 >= 0 && s->cscale0 + h * d > a->n_means))) {
        return 0;
    }
    if (s->cell_map0 >= 0 && !s->by_class) return 0;
    if (s->by_class) {
        /* each table's rows: the cells' own (one table) or the most a cell map names */
        const int64_t tables = s->cell_map0 >= 0 ? s->n_tables : 1;
        int64_t rows[NXKV_MAX_TABLES];
        if (tables < 1 || tables > NXKV_MAX_TABLES || s->cols0 < 0 || s->cols0 + tables * 27 * g > a->n_columns) return 0;
        rows[0] = n;
        if (s->cell_map0 >= 0) {
            if (s->cell_map0 + 2 * n > a->n_columns) return 0;
            for (int64_t t = 0; t < tables; ++t) rows[t] = 0;
            for (int64_t cell = 0; cell < n; ++cell) {
                const int64_t *m = a->columns + s->cell_map0 + 2 * cell;
                if (m[0] < 0 || m[0] >= tables || m[1] < 0 || m[1] >= a->n_symbols) return 0;
                if (m[1] + 1 > rows[m[0]]) rows[m[0]] = m[1] + 1;
            }
        }
        for (int64_t t = 0; t < tables; ++t) {
            for (int64_t c = 0; c < 9 * g && rows[t] > 0; ++c) {
                const int64_t *col = a->columns + s->cols0 + t * 27 * g + 3 * c;
                if (col[0] < 0 || col[1] < 0 || col[1] > a->n_symbols || col[0] + (rows[t] - 1) * col[1] >= a->n_symbols) return 0;
            }
        }
    }
    if (s->sink_map0 >= 0) {
        for (int64_t c = 0; c < n; ++c) {
            const int32_t r = a->sink_map[s->sink_map0 + c];
            if (r >= 0 && (s->sink0 < 0 || s->sink0 + ((int64_t)r + 1) * h * d > a->n_sinks)) return 0;
        }
    }
    return 1;
}

/* The orthonormal Hadamard rotation of a head vector of d values in power-of-two blocks, largest
 * first (stages/hadamard.py): its own inverse. */
NXKV_FN void nxkv_core_hadamard_vector(float *v, int64_t d) {
    int64_t start = 0;
    for (int b = 30; b >= 0; --b) {
        const int64_t block = (int64_t)1 << b;
        if (!(d & block)) continue;
        nxkv_core_hadamard(v + start, (size_t)block, (float)(1.0 / sqrt((double)block)));
        start += block;
    }
}

/* RoPE of a head vector by its cell's angles: mode 1 pairs (2i, 2i + 1), 2 NEOX pairs
 * (i, i + n_rot / 2); c and sn hold the n_rot / 2 cosines and sines. */
NXKV_FN void nxkv_core_rope_vector(float *v, int64_t mode, int64_t n_rot, const double *c, const double *sn) {
    const int64_t half = n_rot / 2;
    for (int64_t i = 0; i < half; ++i) {
        const int64_t ia = mode == 2 ? i : 2 * i, ib = mode == 2 ? i + half : 2 * i + 1;
        float x, y;
        nxkv_core_rope_pair(v[ia], v[ib], c[i], sn[i], &x, &y);
        v[ia] = x;
        v[ib] = y;
    }
}

/* The column table a cell's point symbols are read through and the cell's row in its streams:
 * a bucket section's cell (cell map) its step bucket's table at its row among that bucket's cells,
 * any other cell the one table at its own index. */
NXKV_FN const int64_t *nxkv_core_cell_columns(const nxkv_section *s, const nxkv_values *a, int64_t g, int64_t cell, int64_t *row) {
    if (s->cell_map0 < 0) {
        *row = cell;
        return a->columns + s->cols0;
    }
    const int64_t *m = a->columns + s->cell_map0 + 2 * cell;
    *row = m[1];
    return a->columns + s->cols0 + m[0] * 27 * g;
}

/* Symbol `col` of a cell's row of point symbols [coset g | coord 7 g | last g], its stream's
 * smallest value added. */
NXKV_FN int64_t nxkv_core_point_symbol(const nxkv_section *s, const nxkv_values *a, int64_t g, int64_t cell, int64_t col) {
    if (s->by_class) {
        int64_t row;
        const int64_t *c = nxkv_core_cell_columns(s, a, g, cell, &row) + 3 * col;
        return (int64_t)a->symbols[c[0] + row * c[1]] + c[2];
    }
    if (col < g) return (int64_t)a->symbols[s->coset0 + cell * g + col] + s->coset_lo;
    if (col < 8 * g) return (int64_t)a->symbols[s->coord0 + cell * 7 * g + col - g] + s->coord_lo;
    return (int64_t)a->symbols[s->last0 + cell * g + col - 8 * g] + s->last_lo;
}

/* The symbols of point group `grp` (of the n_heads * head_dim / 8 in a cell) of cell `cell`:
 * returns the coset symbol (0 or 1 in a sound file), the seven coordinates and the halved eighth
 * into z7 and *last. */
NXKV_FN int64_t nxkv_core_point_group(const nxkv_section *s, const nxkv_values *a, int64_t cell, int64_t grp, int32_t *z7,
                                      int32_t *last) {
    const int64_t g = s->n_heads * s->head_dim / 8;
    for (int j = 0; j < 7; ++j) z7[j] = (int32_t)nxkv_core_point_symbol(s, a, g, cell, g + 7 * grp + j);
    *last = (int32_t)nxkv_core_point_symbol(s, a, g, cell, 8 * g + grp);
    return nxkv_core_point_symbol(s, a, g, cell, grp);
}

/* The points of vector `vec` (head `vec`, or with head_group k > 1 the k heads from k vec on) of
 * cell `cell`: with a basis their doubled coordinates into p2 (w = k head_dim of them; *l1 their
 * magnitudes' sum), else the values at their steps plus the means into v. Returns 0, or 1 if a
 * coset symbol is not 0 or 1. */
NXKV_FN int nxkv_core_section_points(const nxkv_section *s, const nxkv_values *a, int64_t vec, int64_t cell, float *v,
                                     int64_t *p2, int64_t *l1) {
    (void)p2;
    (void)l1;
    const int64_t n_heads = s->n_heads, k = s->head_group, w = k * s->head_dim;
    const int64_t step_row = s->step0 + (s->step_per_cell ? cell * (n_heads / k) + vec : vec) * (w / s->scale_block);
    const double *mean = s->mean0 >= 0 ? a->means + s->mean0 + vec * w : 0;
    int coset_ok = 1;
#ifdef NXKV_CORE_PCA
    if (s->basis) *l1 = 0;
#endif
    for (int64_t q = 0; q < w / 8; ++q) {
        int32_t z7[7], last;
        const int64_t coset = nxkv_core_point_group(s, a, cell, vec * (w / 8) + q, z7, &last);
        coset_ok &= coset == 0 || coset == 1;
#ifdef NXKV_CORE_PCA
        if (s->basis) {
            *l1 += nxkv_core_doubled_group(coset & 1, z7, last, p2 + 8 * q);
            continue;
        }
#endif
        nxkv_core_lattice_group((uint8_t)(coset & 1), z7, last, a->steps[step_row + q * 8 / s->scale_block],
                                mean ? mean + q * 8 : 0, v + q * 8);
    }
    return coset_ok ? 0 : 1;
}

/* The basis product's scale, means and channel scales of vector `vec` of cell `cell`: x[i] =
 * (float)((double)S[i] * *c [* cscale[i]] [+ mean[i]]) from the exact sums S (core/transform.h). */
NXKV_FN void nxkv_core_section_basis_terms(const nxkv_section *s, const nxkv_values *a, int64_t vec, int64_t cell, double *c,
                                           const double **mean, const double **cscale) {
    const int64_t w = s->head_group * s->head_dim;
    const int64_t step_row = s->step0 + (s->step_per_cell ? cell * (s->n_heads / s->head_group) + vec : vec);
    *c = a->steps[step_row] * ldexp(1.0, -(int)(s->basis_shift + 1));
    *mean = s->mean0 >= 0 ? a->means + s->mean0 + vec * w : 0;
    *cscale = s->cscale0 >= 0 ? a->means + s->cscale0 + vec * w : 0;
}

/* The rest of vector `vec` of cell `cell` after its points: its sink row where it has one, then
 * per head the inverse Hadamard and RoPE, then the check. Returns 0, or 2 if a value is not
 * finite. */
NXKV_FN int nxkv_core_section_finish(const nxkv_section *s, const nxkv_values *a, int64_t vec, int64_t cell, float *v) {
    const int64_t d = s->head_dim, n_heads = s->n_heads, k = s->head_group, w = k * d;
    if (s->sink_map0 >= 0) {
        const int32_t r = a->sink_map[s->sink_map0 + cell];
        if (r >= 0) {
            const uint16_t *src = a->sinks + s->sink0 + (int64_t)r * n_heads * d + vec * w;
            for (int64_t j = 0; j < w; ++j) v[j] = nxkv_core_f16_to_f32(src[j]);
        }
    }
    for (int64_t j = 0; j < k; ++j) {
        if (s->hadamard) nxkv_core_hadamard_vector(v + j * d, d);
        if (s->rope) {
            const int64_t half = s->n_rot / 2;
            nxkv_core_rope_vector(v + j * d, s->rope, s->n_rot, a->cos + s->trig0 + cell * half, a->sin + s->trig0 + cell * half);
        }
    }
    int finite = 1;
    for (int64_t j = 0; j < w; ++j) finite &= isfinite(v[j]) != 0;
    return finite ? 0 : 2;
}

/* The values of vector `vec` of cell `cell` into v (points, basis product, finish). Returns 0,
 * or 1 if a coset symbol is not 0 or 1, 2 if a value is not finite. pairs: NULL, or (CPU
 * library, NXKV_CPU_BASIS16) the section's bases as int16 row pairs for its faster exact
 * products. */
NXKV_FN int nxkv_core_section_vector(const nxkv_section *s, const nxkv_values *a, int64_t vec, int64_t cell, float *v,
                                     const int16_t *pairs) {
    (void)pairs;
#ifdef NXKV_CORE_PCA
    int64_t p2[NXKV_MAX_HEAD_DIM], l1 = 0;
#else
    int64_t *p2 = 0, l1 = 0;
#endif
    if (nxkv_core_section_points(s, a, vec, cell, v, p2, &l1)) return 1;
#ifdef NXKV_CORE_PCA
    if (s->basis) {
        const int64_t w = s->head_group * s->head_dim;
        int64_t acc64[NXKV_MAX_HEAD_DIM];
        float acc32[NXKV_MAX_HEAD_DIM];
        double c;
        const double *mean, *cscale;
        nxkv_core_section_basis_terms(s, a, vec, cell, &c, &mean, &cscale);
#ifdef NXKV_CPU_BASIS16
        if (pairs && NXKV_CPU_BASIS16(pairs + vec * w * w, p2, l1, w, (int)s->basis_shift, c, mean, cscale, acc64, v)) {
            /* done: the same sums in int32 pairs */
        } else
#endif
            nxkv_core_basis_vector(p2, l1, a->bases + s->basis0 + vec * w * w, w, (int)s->basis_shift, c, mean, cscale,
                                   acc32, acc64, v);
    }
#endif
    return nxkv_core_section_finish(s, a, vec, cell, v);
}

/* v into the section's rows, one value at a time (cell-major or transposed). */
NXKV_FN void nxkv_core_section_store(const nxkv_section *s, int64_t head, int64_t cell, const float *v) {
    const int64_t d = s->head_dim, n_embd = s->n_heads * d;
    for (int64_t j = 0; j < d; ++j) {
        const int64_t i = s->transposed ? (head * d + j) * s->n_cells + cell : cell * n_embd + head * d + j;
        if (s->out_f16) ((uint16_t *)s->dest)[i] = nxkv_core_f32_to_f16(v[j]);
        else ((float *)s->dest)[i] = v[j];
    }
}

#endif
