/* CPU entry points of the native library; the kernel bodies live in native/core/. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nxkv.h"
#include "cpu.h"
#include "../core/byteplane.h"
#include "../core/e8.h"
#include "../core/f16.h"
#include "../core/ggml_rows.h"
#include "../core/hadamard.h"
#include "../core/lattice.h"
#include "../core/rope.h"
#include "../core/rans.h"
#include "../core/transform.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
/* p2's coordinates as int16 pairs (pv[j] = p2[2j] | p2[2j + 1] << 16), or 0 where the int32
 * sums could overflow or a coordinate does not fit int16 (every product and partial sum is an
 * integer within 2^shift * l1 < 2^31 otherwise); the caller then takes the float / int64 path. */
static inline int pack_pairs(const int64_t *p2, int64_t l1, int64_t w, int shift, int32_t *pv) {
    if (w % 8 || w > NXKV_MAX_HEAD_DIM || shift > 14 || l1 >= ((int64_t)1 << (31 - shift))) return 0;
    for (int64_t j = 0; j < w; j += 2) {
        const int64_t a = p2[j], b = p2[j + 1];
        if (a < -32768 || a > 32767 || b < -32768 || b > 32767) return 0;
        pv[j / 2] = (int32_t)((uint32_t)(uint16_t)(int16_t)a | ((uint32_t)(uint16_t)(int16_t)b << 16));
    }
    return 1;
}

/* The basis products of core/transform.h in int16 pairs (AVX2 vpmaddwd: 16 products a
 * instruction where the float path does 8): pairs [w/2][w][2] holds rows 2j and 2j + 1 of a w x w
 * basis side by side. Exact, like the float path: every product and partial sum is an integer
 * within int32 when the coordinates fit int16 and 2^shift * l1 < 2^31 (checked: else 0 is
 * returned and the caller takes the float / int64 path); the same sums, so the same bits after
 * nxkv_core_basis_finish. 1.9x the float path's speed on a 2-core EPYC (192-value vectors). */
__attribute__((target("avx2"))) static int cpu_basis16(const int16_t *pairs, const int64_t *p2, int64_t l1, int64_t w,
                                                        int shift, double c, const double *mean, const double *cscale,
                                                        int64_t *acc64, float *out) {
    int32_t pv[NXKV_MAX_HEAD_DIM / 2];
    if (!pack_pairs(p2, l1, w, shift, pv)) return 0;
    int64_t rows[NXKV_MAX_HEAD_DIM / 2], np = 0;
    for (int64_t j = 0; j < w / 2; ++j) { /* the nonzero pairs */
        pv[np] = pv[j];
        rows[np] = 2 * j * w; /* pair j starts at j * w * 2 */
        np += pv[j] != 0;
    }
    int32_t acc[NXKV_MAX_HEAD_DIM];
    int64_t i0 = 0;
    for (; i0 + 64 <= w; i0 += 64) {
        __m256i s[8];
        for (int b = 0; b < 8; ++b) s[b] = _mm256_setzero_si256();
        for (int64_t t = 0; t < np; ++t) {
            const __m256i p = _mm256_set1_epi32(pv[t]);
            const int16_t *r = pairs + rows[t] + 2 * i0;
            for (int b = 0; b < 8; ++b)
                s[b] = _mm256_add_epi32(s[b], _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(r + 16 * b)), p));
        }
        for (int b = 0; b < 8; ++b) _mm256_storeu_si256((__m256i *)(acc + i0 + 8 * b), s[b]);
    }
    for (; i0 < w; i0 += 8) {
        __m256i s0 = _mm256_setzero_si256();
        for (int64_t t = 0; t < np; ++t) {
            const __m256i r = _mm256_loadu_si256((const __m256i *)(pairs + rows[t] + 2 * i0));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(r, _mm256_set1_epi32(pv[t])));
        }
        _mm256_storeu_si256((__m256i *)(acc + i0), s0);
    }
    for (int64_t i = 0; i < w; ++i) acc64[i] = acc[i];
    nxkv_core_basis_finish(acc64, w, c, mean, cscale, out);
    return 1;
}
#define NXKV_CPU_BASIS16 cpu_basis16
#endif

#include "../core/section.h"

/* The int16 row pairs of n_bases w x w bases held as floats (exact integers within 2^14):
 * malloc'd, or NULL (no memory: the callers take the float path). */
static int16_t *basis_pairs(const float *bases, int64_t n_bases, int64_t w) {
    int16_t *pairs = malloc(sizeof(int16_t) * (size_t)(n_bases * w * w));
    if (!pairs) return NULL;
    for (int64_t b = 0; b < n_bases; ++b) {
        const float *src = bases + b * w * w;
        int16_t *dst = pairs + b * w * w;
        for (int64_t j = 0; j < w; j += 2) {
            for (int64_t i = 0; i < w; ++i) {
                dst[(j * w) + 2 * i] = (int16_t)src[j * w + i];
                dst[(j * w) + 2 * i + 1] = (int16_t)src[(j + 1) * w + i];
            }
        }
    }
    return pairs;
}

/* The int8 quads [w/4][w][4] (rows 4j .. 4j + 3 side by side) of n_bases w x w bases and each
 * basis column's sum (colsum [n_bases][w]): malloc'd into *quads and *colsum, or 0 (an entry
 * beyond +-127, as a 2^7 entry of an 8-bit basis is, or no memory: int16 pairs then). */
static int basis_quads(const float *bases, int64_t n_bases, int64_t w, int8_t **quads, int32_t **colsum) {
    *quads = NULL;
    *colsum = NULL;
    for (int64_t i = 0; i < n_bases * w * w; ++i) {
        if (bases[i] > 127.0f || bases[i] < -127.0f) return 0;
    }
    int8_t *q = malloc((size_t)(n_bases * w * w));
    int32_t *c = malloc(sizeof(int32_t) * (size_t)(n_bases * w));
    if (!q || !c) {
        free(q);
        free(c);
        return 0;
    }
    for (int64_t b = 0; b < n_bases; ++b) {
        const float *src = bases + b * w * w;
        for (int64_t i = 0; i < w; ++i) c[b * w + i] = 0;
        for (int64_t j = 0; j < w; ++j) {
            for (int64_t i = 0; i < w; ++i) {
                q[b * w * w + (j / 4) * w * 4 + 4 * i + j % 4] = (int8_t)src[j * w + i];
                c[b * w + i] += (int32_t)src[j * w + i];
            }
        }
    }
    *quads = q;
    *colsum = c;
    return 1;
}

int nxkv_abi_version(void) { return NXKV_ABI_VERSION; }

/* The E8 loops twice: for any x86-64 CPU, and with AVX2 (every x86-64 CPU since 2013; chosen at
 * run time), where floor() is one instruction instead of a libm call. The same operations in
 * the same order (no FMA: -ffp-contract=off), so the same bits. */
#define E8_ROWS_BODY                                                   \
    for (size_t i = 0; i < n_rows; ++i) nxkv_core_e8_nearest(x + 8 * i, out + 8 * i);

#define LATTICE_QUANTIZE_BODY                                                                      \
    for (size_t i = 0; i < n_groups; ++i) {                                                        \
        for (int j = 0; j < 8; ++j) {                                                              \
            /* |x / step| within int32 with room for the rounding, or the casts are undefined */   \
            if (step[i] > 0 && !(fabs(x[8 * i + j] / step[i]) < 2147483000.0)) return NXKV_ERR_ARG; \
        }                                                                                          \
        nxkv_core_lattice_point(x + 8 * i, step[i], coset + i, coord + 7 * i, coord_last + i);     \
    }                                                                                              \
    return NXKV_OK;

static void e8_rows(const double *x, double *out, size_t n_rows) { E8_ROWS_BODY }
static int lattice_quantize(const double *x, const double *step, size_t n_groups, uint8_t *coset, int32_t *coord,
                            int32_t *coord_last) {
    LATTICE_QUANTIZE_BODY
}

#if defined(__GNUC__) && defined(__x86_64__)
#define NXKV_HAVE_AVX2_PATH 1
__attribute__((target("avx2"))) static void e8_rows_avx2(const double *x, double *out, size_t n_rows) { E8_ROWS_BODY }
__attribute__((target("avx2"))) static int lattice_quantize_avx2(const double *x, const double *step, size_t n_groups,
                                                                  uint8_t *coset, int32_t *coord, int32_t *coord_last) {
    LATTICE_QUANTIZE_BODY
}
#endif

static int use_extensions = 2; /* nxkv_use_cpu_extensions */

int nxkv_use_cpu_extensions(int on) {
    const int was = use_extensions;
    use_extensions = on;
    return was;
}

int nxkv_cpu_extensions_on(void) { return use_extensions; }

/* AVX-512 F, VL and VNNI, where allowed (level 2) */
static int have_avx512_vnni(void) {
    return use_extensions >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
}

#ifdef NXKV_HAVE_AVX2_PATH
static int have_avx2(void) { return use_extensions && __builtin_cpu_supports("avx2"); }
#endif

void nxkv_e8_nearest(const double *x, double *out, size_t n_rows) {
#ifdef NXKV_HAVE_AVX2_PATH
    if (have_avx2()) {
        e8_rows_avx2(x, out, n_rows);
        return;
    }
#endif
    e8_rows(x, out, n_rows);
}

#ifdef NXKV_HAVE_AVX2_PATH
/* core/e8.h's D8 rounding for eight groups at once, a group a lane (v[j]: coordinate j of each):
 * the same double operations, comparisons and first-index tie rule, lane by lane. The sums stay
 * below 2^34 (the caller's range check), so their parity is that of their int64. */
__attribute__((target("avx512f,avx512dq"))) static void d8_nearest_lanes(const __m512d *v, __m512d *r) {
    const __m512d half = _mm512_set1_pd(0.5), one = _mm512_set1_pd(1.0), minus = _mm512_set1_pd(-1.0);
    __m512d err[8], sum = _mm512_setzero_pd(), worst_err = minus;
    for (int j = 0; j < 8; ++j) {
        const __m512d a = _mm512_abs_pd(v[j]);
        const __m512d f = _mm512_roundscale_pd(_mm512_add_pd(a, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __mmask8 nonneg = _mm512_cmp_pd_mask(v[j], _mm512_setzero_pd(), _CMP_GE_OQ);
        r[j] = _mm512_mul_pd(f, _mm512_mask_blend_pd(nonneg, minus, one));
        sum = _mm512_add_pd(sum, r[j]);
        err[j] = _mm512_abs_pd(_mm512_sub_pd(v[j], r[j]));
    }
    for (int j = 0; j < 8; ++j) worst_err = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(err[j], worst_err, _CMP_GT_OQ), worst_err, err[j]);
    __m512i worst = _mm512_setzero_si512();
    for (int j = 7; j >= 0; --j)
        worst = _mm512_mask_blend_epi64(_mm512_cmp_pd_mask(err[j], worst_err, _CMP_EQ_OQ), worst, _mm512_set1_epi64(j));
    const __mmask8 odd = _mm512_test_epi64_mask(_mm512_cvttpd_epi64(sum), _mm512_set1_epi64(1));
    for (int j = 0; j < 8; ++j) {
        const __mmask8 fix = odd & _mm512_cmpeq_epi64_mask(worst, _mm512_set1_epi64(j));
        const __mmask8 up = _mm512_cmp_pd_mask(_mm512_sub_pd(v[j], r[j]), _mm512_setzero_pd(), _CMP_GE_OQ);
        r[j] = _mm512_mask_add_pd(r[j], fix, r[j], _mm512_mask_blend_pd(up, minus, one));
    }
}

/* Eight E8 points a lane (p[j]: coordinate j of each) in the stored form (core/lattice.h):
 * coset, seven coordinates, the eighth halved with their parity. */
__attribute__((target("avx512f,avx512dq"))) static void store_points_lanes(const __m512d *p, uint8_t *coset, int32_t *coord,
                                                                          int32_t *coord_last) {
    const __m512d half = _mm512_set1_pd(0.5), zero = _mm512_setzero_pd();
    const __mmask8 is_half = _mm512_cmp_pd_mask(p[0], _mm512_roundscale_pd(p[0], _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), _CMP_NEQ_UQ);
    const __m512d shift = _mm512_mask_blend_pd(is_half, zero, half);
    __m512i z[8], sum = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) z[j] = _mm512_cvttpd_epi64(_mm512_sub_pd(p[j], shift));
    for (int j = 0; j < 7; ++j) sum = _mm512_add_epi64(sum, z[j]);
    const __m512i last = _mm512_srai_epi64(_mm512_sub_epi64(z[7], _mm512_and_si512(sum, _mm512_set1_epi64(1))), 1);
    int64_t zz[8][8], ll[8];
    for (int j = 0; j < 7; ++j) _mm512_storeu_si512(zz[j], z[j]);
    _mm512_storeu_si512(ll, last);
    for (int g = 0; g < 8; ++g) {
        coset[g] = (uint8_t)(is_half >> g & 1);
        for (int j = 0; j < 7; ++j) coord[7 * g + j] = (int32_t)zz[j][g];
        coord_last[g] = (int32_t)ll[g];
    }
}

/* e[0] + ... + e[7] lane by lane in the reference's fixed order ((0+1)+(2+3))+((4+5)+(6+7)). */
__attribute__((target("avx512f"))) static inline __m512d sum8_lanes(const __m512d *e) {
    return _mm512_add_pd(_mm512_add_pd(_mm512_add_pd(e[0], e[1]), _mm512_add_pd(e[2], e[3])),
                         _mm512_add_pd(_mm512_add_pd(e[4], e[5]), _mm512_add_pd(e[6], e[7])));
}

/* The nearest E8 point of each lane's v (core/e8.h's e8_nearest, a group a lane). */
__attribute__((target("avx512f,avx512dq"))) static void e8_nearest_lanes(const __m512d *v, __m512d *p) {
    const __m512d half = _mm512_set1_pd(0.5);
    __m512d vs[8], a[8], b[8], ea[8], eb[8];
    for (int j = 0; j < 8; ++j) vs[j] = _mm512_sub_pd(v[j], half);
    d8_nearest_lanes(v, a);
    d8_nearest_lanes(vs, b);
    for (int j = 0; j < 8; ++j) {
        b[j] = _mm512_add_pd(b[j], half);
        const __m512d fa = _mm512_sub_pd(v[j], a[j]), fb = _mm512_sub_pd(v[j], b[j]);
        ea[j] = _mm512_mul_pd(fa, fa);
        eb[j] = _mm512_mul_pd(fb, fb);
    }
    const __mmask8 take_b = _mm512_cmp_pd_mask(sum8_lanes(eb), sum8_lanes(ea), _CMP_LT_OQ);
    for (int j = 0; j < 8; ++j) p[j] = _mm512_mask_blend_pd(take_b, a[j], b[j]);
}

/* nxkv_lattice_quantize eight groups at a time with AVX-512 (core/lattice.h's
 * nxkv_core_lattice_point a lane; the rest of the groups by it): the same points. Divisions and
 * the E8 rounding ran scalar, ~35 cycles a value (measured); this is the encoder's largest kernel. */
__attribute__((target("avx512f,avx512dq"))) static int lattice_quantize_avx512(const double *x, const double *step, size_t n_groups,
                                                                              uint8_t *coset, int32_t *coord, int32_t *coord_last) {
    const __m512i rows = _mm512_setr_epi64(0, 8, 16, 24, 32, 40, 48, 56);
    const __m512d limit = _mm512_set1_pd(2147483000.0), zero = _mm512_setzero_pd();
    size_t i = 0;
    for (; i + 8 <= n_groups; i += 8) {
        const __m512d st = _mm512_loadu_pd(step + i);
        const __mmask8 pos = _mm512_cmp_pd_mask(st, zero, _CMP_GT_OQ);
        __m512d u[8];
        __mmask8 bad = 0;
        for (int j = 0; j < 8; ++j) {
            const __m512d xj = _mm512_i64gather_pd(rows, x + 8 * i + j, 8);
            const __m512d q = _mm512_div_pd(xj, st);
            bad |= pos & ~_mm512_cmp_pd_mask(_mm512_abs_pd(q), limit, _CMP_LT_OQ); /* |x / step| within int32 */
            u[j] = _mm512_mask_blend_pd(pos, zero, q);
        }
        if (bad) return NXKV_ERR_ARG;
        __m512d p[8];
        e8_nearest_lanes(u, p);
        store_points_lanes(p, coset + i, coord + 7 * i, coord_last + i);
    }
    return lattice_quantize(x + 8 * i, step + i, n_groups - i, coset + i, coord + 7 * i, coord_last + i);
}

/* nxkv_lattice_quantize_rdo eight groups at a time (core/lattice.h's nxkv_core_lattice_point_rdo
 * a lane, the candidates tried until all eight lanes sit at zero; the rest of the groups by it):
 * the same points. The caller has checked the steps' range and the rows. */
__attribute__((target("avx512f,avx512dq"))) static void lattice_quantize_rdo_avx512(
    const double *x, const double *step, size_t n_groups, const int64_t *rows, const double *costs, int64_t v,
    const double *scales, size_t n_scales, double lam, int falling, uint8_t *coset, int32_t *coord, int32_t *coord_last) {
    const __m512i gather = _mm512_setr_epi64(0, 8, 16, 24, 32, 40, 48, 56);
    const __m512d zero = _mm512_setzero_pd(), two = _mm512_set1_pd(2.0), lo = _mm512_set1_pd((double)-v),
                  hi = _mm512_set1_pd((double)v), lamv = _mm512_set1_pd(lam);
    const __m512i width = _mm512_set1_epi64(2 * v + 1), vi = _mm512_set1_epi64(v);
    size_t i = 0;
    for (; i + 8 <= n_groups; i += 8) {
        const __m512d st = _mm512_loadu_pd(step + i);
        const __mmask8 pos = _mm512_cmp_pd_mask(st, zero, _CMP_GT_OQ);
        const __m512i row0 = _mm512_loadu_si512(rows + i);
        __m512d u[8], su[8], p[8], best[8], best_cost = _mm512_set1_pd(INFINITY);
        for (int j = 0; j < 8; ++j) {
            const __m512d xj = _mm512_i64gather_pd(gather, x + 8 * i + j, 8);
            u[j] = _mm512_mask_blend_pd(pos, zero, _mm512_div_pd(xj, st));
            best[j] = zero;
        }
        for (size_t c = 0; c < n_scales; ++c) {
            const __m512d s = _mm512_set1_pd(scales[c]);
            for (int j = 0; j < 8; ++j) su[j] = _mm512_mul_pd(s, u[j]);
            e8_nearest_lanes(su, p);
            __m512d e[8], r[8];
            for (int j = 0; j < 8; ++j) {
                const __m512d f = _mm512_sub_pd(u[j], p[j]);
                e[j] = _mm512_mul_pd(f, f);
                const __m512d k = _mm512_min_pd(_mm512_max_pd(_mm512_mul_pd(two, p[j]), lo), hi);
                const __m512i at = _mm512_add_epi64(_mm512_mullo_epi64(_mm512_add_epi64(row0, _mm512_set1_epi64(j)), width),
                                                    _mm512_add_epi64(_mm512_cvttpd_epi64(k), vi));
                r[j] = _mm512_i64gather_pd(at, costs, 8);
            }
            const __m512d cost = _mm512_add_pd(sum8_lanes(e), _mm512_mul_pd(lamv, sum8_lanes(r)));
            const __mmask8 take = _mm512_cmp_pd_mask(cost, best_cost, _CMP_LT_OQ);
            best_cost = _mm512_mask_blend_pd(take, best_cost, cost);
            for (int j = 0; j < 8; ++j) best[j] = _mm512_mask_blend_pd(take, best[j], p[j]);
            __mmask8 at_zero = 0xFF;
            for (int j = 0; j < 8; ++j) at_zero &= _mm512_cmp_pd_mask(p[j], zero, _CMP_EQ_OQ);
            /* with scales falling, no later candidate can differ (core/lattice.h says why) */
            if (falling && at_zero == 0xFF) break;
        }
        store_points_lanes(best, coset + i, coord + 7 * i, coord_last + i);
    }
    for (; i < n_groups; ++i)
        nxkv_core_lattice_point_rdo(x + 8 * i, step[i], scales, (int)n_scales, costs, rows[i], v, lam, falling,
                                    coset + i, coord + 7 * i, coord_last + i);
}
#endif

/* sum8_lanes with AVX2: e[0] + ... + e[7] in the reference's order. */
__attribute__((target("avx2"))) static inline __m256d sum8_lanes4(const __m256d *e) {
    return _mm256_add_pd(_mm256_add_pd(_mm256_add_pd(e[0], e[1]), _mm256_add_pd(e[2], e[3])),
                         _mm256_add_pd(_mm256_add_pd(e[4], e[5]), _mm256_add_pd(e[6], e[7])));
}

/* d8_nearest_lanes with AVX2: four groups a register, masks as lanes of all ones; the sums'
 * parity from their halves (exact: integers below 2^34). */
__attribute__((target("avx2"))) static void d8_nearest_lanes4(const __m256d *v, __m256d *r) {
    const __m256d half = _mm256_set1_pd(0.5), one = _mm256_set1_pd(1.0), minus = _mm256_set1_pd(-1.0),
                  zero = _mm256_setzero_pd(), sign = _mm256_set1_pd(-0.0);
    __m256d err[8], sum = zero, worst_err = minus;
    for (int j = 0; j < 8; ++j) {
        const __m256d a = _mm256_andnot_pd(sign, v[j]);
        const __m256d f = _mm256_round_pd(_mm256_add_pd(a, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        r[j] = _mm256_mul_pd(f, _mm256_blendv_pd(minus, one, _mm256_cmp_pd(v[j], zero, _CMP_GE_OQ)));
        sum = _mm256_add_pd(sum, r[j]);
        err[j] = _mm256_andnot_pd(sign, _mm256_sub_pd(v[j], r[j]));
    }
    for (int j = 0; j < 8; ++j) worst_err = _mm256_blendv_pd(worst_err, err[j], _mm256_cmp_pd(err[j], worst_err, _CMP_GT_OQ));
    __m256d worst = zero;
    for (int j = 7; j >= 0; --j) worst = _mm256_blendv_pd(worst, _mm256_set1_pd(j), _mm256_cmp_pd(err[j], worst_err, _CMP_EQ_OQ));
    const __m256d h = _mm256_mul_pd(sum, half);
    const __m256d odd = _mm256_cmp_pd(h, _mm256_round_pd(h, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), _CMP_NEQ_UQ);
    for (int j = 0; j < 8; ++j) {
        const __m256d fix = _mm256_and_pd(odd, _mm256_cmp_pd(worst, _mm256_set1_pd(j), _CMP_EQ_OQ));
        const __m256d dir = _mm256_blendv_pd(minus, one, _mm256_cmp_pd(_mm256_sub_pd(v[j], r[j]), zero, _CMP_GE_OQ));
        r[j] = _mm256_blendv_pd(r[j], _mm256_add_pd(r[j], dir), fix);
    }
}

/* e8_nearest_lanes with AVX2: four groups a register. */
__attribute__((target("avx2"))) static void e8_nearest_lanes4(const __m256d *u, __m256d *p) {
    const __m256d half = _mm256_set1_pd(0.5);
    __m256d us[8], a[8], b[8], ea[8], eb[8];
    for (int j = 0; j < 8; ++j) us[j] = _mm256_sub_pd(u[j], half);
    d8_nearest_lanes4(u, a);
    d8_nearest_lanes4(us, b);
    for (int j = 0; j < 8; ++j) {
        b[j] = _mm256_add_pd(b[j], half);
        const __m256d fa = _mm256_sub_pd(u[j], a[j]), fb = _mm256_sub_pd(u[j], b[j]);
        ea[j] = _mm256_mul_pd(fa, fa);
        eb[j] = _mm256_mul_pd(fb, fb);
    }
    const __m256d take_b = _mm256_cmp_pd(sum8_lanes4(eb), sum8_lanes4(ea), _CMP_LT_OQ);
    for (int j = 0; j < 8; ++j) p[j] = _mm256_blendv_pd(a[j], b[j], take_b);
}

/* store_points_lanes with AVX2: four points a register. The points fit int32 (the callers' range
 * check), so they convert to int32 lanes and their parity sums wrap harmlessly. */
__attribute__((target("avx2"))) static void store_points_lanes4(const __m256d *p, uint8_t *coset, int32_t *coord,
                                                               int32_t *coord_last) {
    const __m256d half = _mm256_set1_pd(0.5);
    const __m256d is_half = _mm256_cmp_pd(p[0], _mm256_round_pd(p[0], _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), _CMP_NEQ_UQ);
    const __m256d shift = _mm256_and_pd(is_half, half);
    __m128i z[8], sum = _mm_setzero_si128();
    for (int j = 0; j < 8; ++j) z[j] = _mm256_cvttpd_epi32(_mm256_sub_pd(p[j], shift));
    for (int j = 0; j < 7; ++j) sum = _mm_add_epi32(sum, z[j]);
    const __m128i last = _mm_srai_epi32(_mm_sub_epi32(z[7], _mm_and_si128(sum, _mm_set1_epi32(1))), 1);
    int32_t zz[8][4], ll[4];
    for (int j = 0; j < 7; ++j) _mm_storeu_si128((__m128i *)zz[j], z[j]);
    _mm_storeu_si128((__m128i *)ll, last);
    const int halves = _mm256_movemask_pd(is_half);
    for (int g = 0; g < 4; ++g) {
        coset[g] = (uint8_t)(halves >> g & 1);
        for (int j = 0; j < 7; ++j) coord[7 * g + j] = zz[j][g];
        coord_last[g] = ll[g];
    }
}

/* lattice_quantize_avx512 for CPUs with AVX2 only: four groups a register. */
__attribute__((target("avx2"))) static int lattice_quantize_lanes4(const double *x, const double *step, size_t n_groups,
                                                                  uint8_t *coset, int32_t *coord, int32_t *coord_last) {
    const __m256i rows = _mm256_setr_epi64x(0, 8, 16, 24);
    const __m256d limit = _mm256_set1_pd(2147483000.0), zero = _mm256_setzero_pd(), sign = _mm256_set1_pd(-0.0);
    size_t i = 0;
    for (; i + 4 <= n_groups; i += 4) {
        const __m256d st = _mm256_loadu_pd(step + i);
        const __m256d pos = _mm256_cmp_pd(st, zero, _CMP_GT_OQ);
        __m256d u[8], p[8], bad = zero;
        for (int j = 0; j < 8; ++j) {
            const __m256d q = _mm256_div_pd(_mm256_i64gather_pd(x + 8 * i + j, rows, 8), st);
            bad = _mm256_or_pd(bad, _mm256_andnot_pd(_mm256_cmp_pd(_mm256_andnot_pd(sign, q), limit, _CMP_LT_OQ), pos));
            u[j] = _mm256_blendv_pd(zero, q, pos);
        }
        if (_mm256_movemask_pd(bad)) return NXKV_ERR_ARG;
        e8_nearest_lanes4(u, p);
        store_points_lanes4(p, coset + i, coord + 7 * i, coord_last + i);
    }
    return lattice_quantize_avx2(x + 8 * i, step + i, n_groups - i, coset + i, coord + 7 * i, coord_last + i);
}

/* lattice_quantize_rdo_avx512 for CPUs with AVX2 only: four groups a register, the candidates
 * tried until all four lanes sit at zero. Each lane's cost-row offsets are made once per group
 * (AVX2 has no 64-bit multiply), a candidate's column added as int32 lanes widened. The same
 * points: without it the encoder's points ran scalar on such CPUs, 66% of a one-thread
 * 7680-token `high` encode (perf, an EPYC with AVX2 only). The caller has checked the steps'
 * range and the rows. */
__attribute__((target("avx2"))) static void lattice_quantize_rdo_lanes4(
    const double *x, const double *step, size_t n_groups, const int64_t *rows, const double *costs, int64_t v,
    const double *scales, size_t n_scales, double lam, int falling, uint8_t *coset, int32_t *coord, int32_t *coord_last) {
    const __m256i gather = _mm256_setr_epi64x(0, 8, 16, 24);
    const __m256d zero = _mm256_setzero_pd(), two = _mm256_set1_pd(2.0), lo = _mm256_set1_pd((double)-v),
                  hi = _mm256_set1_pd((double)v), lamv = _mm256_set1_pd(lam);
    const int64_t width = 2 * v + 1;
    size_t i = 0;
    for (; i + 4 <= n_groups; i += 4) {
        const __m256d st = _mm256_loadu_pd(step + i);
        const __m256d pos = _mm256_cmp_pd(st, zero, _CMP_GT_OQ);
        __m256d u[8], su[8], p[8], best[8], best_cost = _mm256_set1_pd(INFINITY);
        __m256i base[8]; /* (row + j) width + v of each lane: column 0 of the clipped coordinate */
        for (int j = 0; j < 8; ++j) {
            u[j] = _mm256_blendv_pd(zero, _mm256_div_pd(_mm256_i64gather_pd(x + 8 * i + j, gather, 8), st), pos);
            best[j] = zero;
            base[j] = _mm256_setr_epi64x((rows[i] + j) * width + v, (rows[i + 1] + j) * width + v,
                                         (rows[i + 2] + j) * width + v, (rows[i + 3] + j) * width + v);
        }
        for (size_t c = 0; c < n_scales; ++c) {
            const __m256d s = _mm256_set1_pd(scales[c]);
            for (int j = 0; j < 8; ++j) su[j] = _mm256_mul_pd(s, u[j]);
            e8_nearest_lanes4(su, p);
            __m256d e[8], r[8];
            for (int j = 0; j < 8; ++j) {
                const __m256d f = _mm256_sub_pd(u[j], p[j]);
                e[j] = _mm256_mul_pd(f, f);
                const __m256d k = _mm256_min_pd(_mm256_max_pd(_mm256_mul_pd(two, p[j]), lo), hi);
                const __m256i at = _mm256_add_epi64(base[j], _mm256_cvtepi32_epi64(_mm256_cvttpd_epi32(k)));
                r[j] = _mm256_i64gather_pd(costs, at, 8);
            }
            const __m256d cost = _mm256_add_pd(sum8_lanes4(e), _mm256_mul_pd(lamv, sum8_lanes4(r)));
            const __m256d take = _mm256_cmp_pd(cost, best_cost, _CMP_LT_OQ);
            best_cost = _mm256_blendv_pd(best_cost, cost, take);
            __m256d at_zero = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
            for (int j = 0; j < 8; ++j) {
                best[j] = _mm256_blendv_pd(best[j], p[j], take);
                at_zero = _mm256_and_pd(at_zero, _mm256_cmp_pd(p[j], zero, _CMP_EQ_OQ));
            }
            /* with scales falling, no later candidate can differ (core/lattice.h says why) */
            if (falling && _mm256_movemask_pd(at_zero) == 0xF) break;
        }
        store_points_lanes4(best, coset + i, coord + 7 * i, coord_last + i);
    }
    for (; i < n_groups; ++i)
        nxkv_core_lattice_point_rdo(x + 8 * i, step[i], scales, (int)n_scales, costs, rows[i], v, lam, falling,
                                    coset + i, coord + 7 * i, coord_last + i);
}

int nxkv_lattice_quantize(const double *x, const double *step, size_t n_groups, uint8_t *coset, int32_t *coord,
                          int32_t *coord_last) {
#ifdef NXKV_HAVE_AVX2_PATH
    if (use_extensions >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
        return lattice_quantize_avx512(x, step, n_groups, coset, coord, coord_last);
    if (have_avx2()) return lattice_quantize_lanes4(x, step, n_groups, coset, coord, coord_last);
#endif
    return lattice_quantize(x, step, n_groups, coset, coord, coord_last);
}

int nxkv_lattice_quantize_rdo(const double *x, const double *step, size_t n_groups, const int64_t *rows,
                              const double *costs, size_t n_rows, size_t width, const double *scales, size_t n_scales,
                              double lam, uint8_t *coset, int32_t *coord, int32_t *coord_last) {
    if (width % 2 == 0 || n_scales == 0 || n_scales > 64) return NXKV_ERR_ARG;
    for (size_t i = 0; i < n_groups; ++i) {
        if (rows[i] < 0 || (uint64_t)rows[i] + 8 > n_rows) return NXKV_ERR_ARG;
        for (int j = 0; j < 8; ++j) {
            if (step[i] > 0 && !(fabs(x[8 * i + j] / step[i]) < 2147483000.0)) return NXKV_ERR_ARG;
        }
    }
    const int64_t v = (int64_t)(width - 1) / 2;
    /* candidates past the zero point can be skipped where the scales fall (core/lattice.h) */
    int falling = scales[0] > 0;
    for (size_t c = 1; c < n_scales; ++c) falling &= scales[c] < scales[c - 1] && scales[c] > 0;
#ifdef NXKV_HAVE_AVX2_PATH
    if (use_extensions >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) {
        lattice_quantize_rdo_avx512(x, step, n_groups, rows, costs, v, scales, n_scales, lam, falling, coset, coord,
                                    coord_last);
        return NXKV_OK;
    }
    if (have_avx2()) {
        lattice_quantize_rdo_lanes4(x, step, n_groups, rows, costs, v, scales, n_scales, lam, falling, coset, coord,
                                    coord_last);
        return NXKV_OK;
    }
#endif
    for (size_t i = 0; i < n_groups; ++i)
        nxkv_core_lattice_point_rdo(x + 8 * i, step[i], scales, (int)n_scales, costs, rows[i], v, lam, falling,
                                    coset + i, coord + 7 * i, coord_last + i);
    return NXKV_OK;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define NXKV_HAVE_F16C_PATH 1
/* F16C (every x86-64 CPU since 2012) rounds to nearest even exactly as the portable code */
__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(const float *src, uint16_t *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
    for (; i < n; ++i) dst[i] = nxkv_core_f32_to_f16(src[i]);
}
#endif

void nxkv_f32_to_f16(const float *src, uint16_t *dst, size_t n, int use_hardware) {
#ifdef NXKV_HAVE_F16C_PATH
    if (use_hardware && use_extensions && __builtin_cpu_supports("f16c")) {
        f32_to_f16_f16c(src, dst, n);
        return;
    }
#endif
    (void)use_hardware;
    for (size_t i = 0; i < n; ++i) dst[i] = nxkv_core_f32_to_f16(src[i]);
}

void nxkv_f64_to_f16(const double *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = nxkv_core_f64_to_f16(src[i]);
}

int nxkv_hadamard_blocks(const float *x, float *out, size_t n_values, size_t block) {
    if (block == 0 || (block & (block - 1)) || n_values % block) return NXKV_ERR_ARG;
    const float scale = (float)(1.0 / sqrt((double)block));
    if (out != x) memcpy(out, x, n_values * sizeof(float));
    for (size_t i = 0; i < n_values; i += block) nxkv_core_hadamard(out + i, block, scale);
    return NXKV_OK;
}

/* The vectors of nxkv_basis_dequantize; twice like the E8 loops (the AVX2 copy flattened). */
#define BASIS_ROWS_BODY                                                                                                 \
    int64_t p2[NXKV_MAX_HEAD_DIM], acc64[NXKV_MAX_HEAD_DIM];                                                           \
    float acc32[NXKV_MAX_HEAD_DIM];                                                                                     \
    const double scale = ldexp(1.0, -(shift + 1));                                                                      \
    const size_t g = d / 8;                                                                                             \
    for (size_t v = 0; v < n_vectors; ++v) {                                                                            \
        const size_t k = v % n_heads;                                                                                   \
        const int64_t l1 = nxkv_core_doubled_points(coset + v * g, coord + 7 * v * g, coord_last + v * g, (int64_t)d, p2); \
        const double *m = mean ? mean + k * d : NULL, *cs = channel_scale ? channel_scale + k * d : NULL;              \
        if (!BASIS16(pairs ? pairs + k * d * d : NULL, p2, l1, (int64_t)d, shift, step[v] * scale, m, cs, acc64,      \
                     out + v * d)) {                                                                                    \
            nxkv_core_basis_vector(p2, l1, b + k * d * d, (int64_t)d, shift, step[v] * scale, m, cs, acc32, acc64,      \
                                   out + v * d);                                                                        \
        }                                                                                                               \
    }

#define BASIS16(...) 0
static void basis_rows(const uint8_t *coset, const int32_t *coord, const int32_t *coord_last, const double *step,
                       const float *b, size_t n_vectors, size_t n_heads, size_t d, int shift, const double *mean,
                       const double *channel_scale, float *out, const int16_t *pairs) {
    (void)pairs;
    BASIS_ROWS_BODY
}
#undef BASIS16
#ifdef NXKV_HAVE_AVX2_PATH
#define BASIS16(pairs, ...) ((pairs) && cpu_basis16(pairs, __VA_ARGS__))
__attribute__((target("avx2"), flatten)) static void basis_rows_avx2(const uint8_t *coset, const int32_t *coord,
                                                                     const int32_t *coord_last, const double *step,
                                                                     const float *b, size_t n_vectors, size_t n_heads,
                                                                     size_t d, int shift, const double *mean,
                                                                     const double *channel_scale, float *out,
                                                                     const int16_t *pairs) {
    BASIS_ROWS_BODY
}
#undef BASIS16
#endif

int nxkv_basis_dequantize(const uint8_t *coset, const int32_t *coord, const int32_t *coord_last, const double *step,
                          const int16_t *basis, size_t n_vectors, size_t n_heads, size_t d, int shift, const double *mean,
                          const double *channel_scale, float *out) {
    if (d == 0 || d % 8 || d > NXKV_MAX_HEAD_DIM || n_heads == 0 || shift < 0 || shift > 14) return NXKV_ERR_ARG;
    for (size_t i = 0; i < n_heads * d * d; ++i) {
        if (basis[i] > (1 << shift) || basis[i] < -(1 << shift)) return NXKV_ERR_ARG;
    }
    float *b = malloc(sizeof(float) * n_heads * d * d);
    if (!b) return NXKV_ERR_NOMEM;
    for (size_t i = 0; i < n_heads * d * d; ++i) b[i] = (float)basis[i];
#ifdef NXKV_HAVE_AVX2_PATH
    if (have_avx2()) {
        int16_t *pairs = basis_pairs(b, (int64_t)n_heads, (int64_t)d);
        basis_rows_avx2(coset, coord, coord_last, step, b, n_vectors, n_heads, d, shift, mean, channel_scale, out, pairs);
        free(pairs);
        free(b);
        return NXKV_OK;
    }
#endif
    basis_rows(coset, coord, coord_last, step, b, n_vectors, n_heads, d, shift, mean, channel_scale, out, NULL);
    free(b);
    return NXKV_OK;
}

void nxkv_quantize_q8_0(const float *x, uint8_t *out, size_t n_blocks) {
    for (size_t i = 0; i < n_blocks; ++i) nxkv_core_quantize_block_q8_0(x + NXKV_QK * i, out + 34 * i);
}

void nxkv_lattice_dequantize(const uint8_t *coset, const int32_t *coord, const int32_t *coord_last, const double *step,
                             size_t n_groups, const double *mean, size_t mean_groups, float *out) {
    for (size_t i = 0; i < n_groups; ++i) {
        const double *m = mean_groups ? mean + 8 * (i % mean_groups) : NULL;
        nxkv_core_lattice_group(coset[i], coord + 7 * i, coord_last[i], step[i], m, out + 8 * i);
    }
}

void nxkv_rope_rotate(const float *x, float *out, size_t n_rows, size_t n_heads, size_t head_dim, const double *cos,
                      const double *sin, size_t n_rot, int neox) {
    const size_t half = n_rot / 2;
    for (size_t r = 0; r < n_rows; ++r) {
        const double *c = cos + r * half, *s = sin + r * half;
        for (size_t h = 0; h < n_heads; ++h) {
            const float *xv = x + (r * n_heads + h) * head_dim;
            float *ov = out + (r * n_heads + h) * head_dim;
            for (size_t j = n_rot; j < head_dim; ++j) ov[j] = xv[j];
            for (size_t i = 0; i < half; ++i) {
                const size_t ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
                nxkv_core_rope_pair(xv[ia], xv[ib], c[i], s[i], ov + ia, ov + ib);
            }
        }
    }
}

/* cum and, when lookup is given, the slot -> symbol table of a frequency table; NXKV_ERR_ARG
 * unless the frequencies are non-negative and sum to 2^14. */
static int rans_tables(const int64_t *freqs, size_t n_freqs, uint32_t *f32, uint32_t *cum, uint32_t *lookup) {
    uint64_t total = 0;
    for (size_t s = 0; s < n_freqs; ++s) {
        if (freqs[s] < 0 || freqs[s] > (1 << NXKV_RANS_PROB_BITS)) return NXKV_ERR_ARG;
        f32[s] = (uint32_t)freqs[s];
        cum[s] = (uint32_t)total;
        if (lookup) {
            for (int64_t k = 0; k < freqs[s]; ++k) lookup[total + (uint64_t)k] = (uint32_t)s;
        }
        total += (uint64_t)freqs[s];
        if (total > (1u << NXKV_RANS_PROB_BITS)) return NXKV_ERR_ARG;
    }
    return total == (1u << NXKV_RANS_PROB_BITS) ? NXKV_OK : NXKV_ERR_ARG;
}

typedef struct {
    uint32_t *freqs, *cum, *lookup, *slots;
} rans_table;

static int rans_table_new(rans_table *t, const int64_t *freqs, size_t n_freqs, int with_lookup) {
    t->freqs = malloc(sizeof(uint32_t) * (n_freqs ? n_freqs : 1));
    t->cum = malloc(sizeof(uint32_t) * (n_freqs ? n_freqs : 1));
    t->lookup = with_lookup ? malloc(sizeof(uint32_t) << NXKV_RANS_PROB_BITS) : NULL;
    t->slots = with_lookup ? malloc(sizeof(uint32_t) << NXKV_RANS_PROB_BITS) : NULL;
    if (!t->freqs || !t->cum || (with_lookup && !(t->lookup && t->slots))) return NXKV_ERR_NOMEM;
    int r = rans_tables(freqs, n_freqs, t->freqs, t->cum, t->lookup);
    if (r == NXKV_OK && with_lookup) nxkv_core_rans_slots(t->freqs, t->cum, t->lookup, t->slots);
    return r;
}

static void rans_table_free(rans_table *t) {
    free(t->freqs);
    free(t->cum);
    free(t->lookup);
    free(t->slots);
}

int64_t nxkv_rans_encode(const int64_t *symbols, size_t n, size_t stride, const int64_t *freqs, size_t n_freqs,
                         uint8_t *out, size_t capacity) {
    rans_table t;
    int64_t r = rans_table_new(&t, freqs, n_freqs, 0);
    if (r == NXKV_OK) {
        for (size_t i = 0; i < n; ++i) {
            if (symbols[i * stride] < 0 || (size_t)symbols[i * stride] >= n_freqs || !t.freqs[symbols[i * stride]]) {
                r = NXKV_ERR_ARG;
                break;
            }
        }
    }
    uint32_t *rcp = malloc(sizeof(uint32_t) * (n_freqs ? n_freqs : 1));
    uint32_t *shift = malloc(sizeof(uint32_t) * (n_freqs ? n_freqs : 1));
    if (r == NXKV_OK && !(rcp && shift)) r = NXKV_ERR_NOMEM;
    if (r == NXKV_OK) {
        for (size_t s = 0; s < n_freqs; ++s) nxkv_core_rans_reciprocal(t.freqs[s], rcp + s, shift + s);
        r = nxkv_core_rans_encode(symbols, n, stride, t.freqs, t.cum, rcp, shift, out + capacity, capacity);
        if (r < 0) r = NXKV_ERR_ARG;
    }
    free(rcp);
    free(shift);
    rans_table_free(&t);
    return r;
}

/* The 4 lanes of one chunk of m >= 4 symbols (lane j: symbols j, j + 4, ...) encoded together,
 * lane j's bytes ending at scratch + (j + 1) * most, their counts in k[]: core/rans.h's encoder
 * step for step on each lane (the same bytes), the four independent chains interleaved so that
 * they overlap in the pipeline (one lane at a time, each step waited on the last). 0, or -1 if
 * a lane's bytes would not fit. */
static int rans_encode_four(const int64_t *sym, size_t m, const uint32_t *freqs, const uint32_t *cum, const uint32_t *rcp,
                            const uint32_t *shift, uint8_t *scratch, size_t most, int64_t *k) {
    uint64_t x[4] = {NXKV_RANS_L, NXKV_RANS_L, NXKV_RANS_L, NXKV_RANS_L};
    uint8_t *p[4], *lo[4];
    for (int j = 0; j < 4; ++j) {
        p[j] = scratch + (size_t)(j + 1) * most;
        lo[j] = scratch + (size_t)j * most;
    }
    /* lane j's last symbol is the largest index i < m with i % 4 == j; all step down by 4 */
    const size_t rounds = m / 4, extra = m % 4;
    for (size_t q = extra; q-- > 0;) { /* the last, partial round: lanes 0 .. extra - 1 */
        if (nxkv_core_rans_put(x + q, p + q, lo[q], (uint32_t)sym[4 * rounds + q], freqs, cum, rcp, shift)) return -1;
    }
    for (size_t r = rounds; r-- > 0;) {
        for (int j = 0; j < 4; ++j) {
            if (nxkv_core_rans_put(x + j, p + j, lo[j], (uint32_t)sym[4 * r + (size_t)j], freqs, cum, rcp, shift)) return -1;
        }
    }
    for (int j = 0; j < 4; ++j) {
        for (int b = 0; b < 4; ++b) {
            if (p[j] <= lo[j]) return -1;
            *--p[j] = (uint8_t)(x[j] & 0xff);
            x[j] >>= 8;
        }
        k[j] = (int64_t)(scratch + (size_t)(j + 1) * most - p[j]);
    }
    return 0;
}

int64_t nxkv_rans_encode_lanes(const int64_t *symbols, size_t n, const int64_t *freqs, size_t n_freqs, size_t lanes,
                               size_t chunk, uint8_t *out, size_t capacity, int64_t *lengths) {
    if (lanes == 0 || chunk < lanes) return NXKV_ERR_ARG;
    rans_table t;
    int64_t r = rans_table_new(&t, freqs, n_freqs, 0);
    for (size_t i = 0; i < n && r == NXKV_OK; ++i) {
        if (symbols[i] < 0 || (size_t)symbols[i] >= n_freqs || !t.freqs[symbols[i]]) r = NXKV_ERR_ARG;
    }
    uint32_t *rcp = malloc(sizeof(uint32_t) * (n_freqs ? n_freqs : 1));
    uint32_t *shift = malloc(sizeof(uint32_t) * (n_freqs ? n_freqs : 1));
    /* one lane's bytes are made backwards at the end of a scratch, then moved to their place */
    const size_t most = (chunk + lanes - 1) / lanes * 2 + 8; /* 2 bytes a symbol at most, and the state */
    uint8_t *scratch = malloc(4 * most);
    if (r == NXKV_OK && !(rcp && shift && scratch)) r = NXKV_ERR_NOMEM;
    size_t at = 0, task = 0;
    if (r == NXKV_OK) {
        for (size_t s = 0; s < n_freqs; ++s) nxkv_core_rans_reciprocal(t.freqs[s], rcp + s, shift + s);
        for (size_t c0 = 0; c0 < n && r == NXKV_OK; c0 += chunk) {
            const size_t m = n - c0 < chunk ? n - c0 : chunk;
            if (lanes == 4 && m >= 4) { /* the presets' lanes: four chains at once */
                int64_t k4[4];
                if (rans_encode_four(symbols + c0, m, t.freqs, t.cum, rcp, shift, scratch, most, k4)) {
                    r = NXKV_ERR_ARG;
                    break;
                }
                for (size_t j = 0; j < 4; ++j, ++task) {
                    if ((size_t)k4[j] > capacity - at) {
                        r = NXKV_ERR_ARG;
                        break;
                    }
                    memcpy(out + at, scratch + (j + 1) * most - k4[j], (size_t)k4[j]);
                    lengths[task] = k4[j];
                    at += (size_t)k4[j];
                }
                continue;
            }
            for (size_t j = 0; j < lanes; ++j, ++task) {
                const size_t count = j < m ? (m - j + lanes - 1) / lanes : 0;
                int64_t k = 0;
                if (count) {
                    k = nxkv_core_rans_encode(symbols + c0 + j, count, lanes, t.freqs, t.cum, rcp, shift, scratch + most, most);
                    if (k < 0 || (size_t)k > capacity - at) {
                        r = NXKV_ERR_ARG;
                        break;
                    }
                    memcpy(out + at, scratch + most - k, (size_t)k);
                }
                lengths[task] = k;
                at += (size_t)k;
            }
        }
    }
    free(rcp);
    free(shift);
    free(scratch);
    rans_table_free(&t);
    return r == NXKV_OK ? (int64_t)at : r;
}

int nxkv_rans_decode(const uint8_t *data, size_t n_data, const int64_t *freqs, size_t n_freqs, int32_t *out, size_t n) {
    rans_table t;
    int r = rans_table_new(&t, freqs, n_freqs, 1);
    if (r == NXKV_OK) {
        r = nxkv_core_rans_decode(data, n_data, t.slots, t.lookup, out, n, 1) ? NXKV_ERR_CORRUPT : NXKV_OK;
    }
    rans_table_free(&t);
    return r;
}

int nxkv_rans_decode_lanes(const uint8_t *data, size_t n_data, const int64_t *lengths, size_t n_tasks,
                           const int64_t *freqs, size_t n_freqs, int32_t *out, size_t n, size_t lanes, size_t chunk,
                           size_t chunk0, size_t chunk1) {
    if (lanes == 0 || chunk < lanes || chunk0 > chunk1 || chunk1 > n_tasks / lanes) return NXKV_ERR_ARG;
    rans_table t;
    int r = rans_table_new(&t, freqs, n_freqs, 1);
    const uint8_t **ptrs = malloc(sizeof(*ptrs) * lanes);
    size_t *lens = malloc(sizeof(*lens) * lanes), *p = malloc(sizeof(*p) * lanes);
    uint32_t *x = malloc(sizeof(*x) * lanes);
    if (r == NXKV_OK && !(ptrs && lens && p && x)) r = NXKV_ERR_NOMEM;
    size_t offset = 0;
    for (size_t k = 0; k < chunk0 * lanes && r == NXKV_OK; ++k) {
        if (lengths[k] < 0) r = NXKV_ERR_ARG;
        offset += (size_t)lengths[k];
    }
    for (size_t c = chunk0; c < chunk1 && r == NXKV_OK; ++c) {
        const size_t c0 = c * chunk;
        if (c0 >= n) {
            r = NXKV_ERR_CORRUPT;
            break;
        }
        const size_t m = n - c0 < chunk ? n - c0 : chunk;
        for (size_t l = 0; l < lanes; ++l) {
            const int64_t len = lengths[c * lanes + l];
            if (len < 0 || (size_t)len > n_data - offset || (l >= m && len != 0)) {
                r = NXKV_ERR_CORRUPT;
                break;
            }
            ptrs[l] = data + offset;
            lens[l] = (size_t)len;
            offset += (size_t)len;
        }
        if (r == NXKV_OK && nxkv_core_rans_decode_interleaved(ptrs, lens, lanes, t.slots, t.lookup, out + c0, m, x, p)) {
            r = NXKV_ERR_CORRUPT;
        }
    }
    free(ptrs);
    free(lens);
    free(p);
    free(x);
    rans_table_free(&t);
    return r;
}

void nxkv_byteplane_split(const uint8_t *src, uint8_t *dst, size_t n_elements, size_t element_size) {
    if (element_size == 2) {
        /* the common case (f16/bf16 caches): two plain streams the compiler vectorises */
        uint8_t *lo = dst, *hi = dst + n_elements;
        for (size_t i = 0; i < n_elements; ++i) {
            lo[i] = src[2 * i];
            hi[i] = src[2 * i + 1];
        }
        return;
    }
    nxkv_core_byteplane_split_range(src, dst, n_elements, element_size, 0, n_elements);
}

void nxkv_byteplane_merge(const uint8_t *src, uint8_t *dst, size_t n_elements, size_t element_size) {
    if (element_size == 2) {
        const uint8_t *lo = src, *hi = src + n_elements;
        for (size_t i = 0; i < n_elements; ++i) {
            dst[2 * i] = lo[i];
            dst[2 * i + 1] = hi[i];
        }
        return;
    }
    nxkv_core_byteplane_merge_range(src, dst, n_elements, element_size, 0, n_elements);
}

/* A section's rows one vector at a time, its status into *status: sections without a basis (a
 * basis section where its tiles' pairs found no memory: the float products of core/transform.h);
 * twice like the E8 loops (flattened: every core call inlined into it). The same operations, so
 * the same bits. */
#define SECTION_ROWS_BODY                                                                        \
    float v[NXKV_MAX_HEAD_DIM];                                                                  \
    const int64_t d = s->head_dim, n_embd = s->n_heads * d, k = s->head_group;                  \
    *status = 0;                                                                                 \
    /* vectors (heads, or head groups) outside, cells inside: a transposed V is then  \
     * written along its rows */                                                                 \
    for (int64_t vec = 0; vec < s->n_heads / k && !*status; ++vec) {                             \
        for (int64_t cell = 0; cell < s->n_cells; ++cell) {                                      \
            const int r = nxkv_core_section_vector(s, arrays, vec, cell, v, pairs);              \
            if (r) {                                                                             \
                *status = r;                                                                     \
                break;                                                                           \
            }                                                                                    \
            if (s->out_f16 && !s->transposed) {                                                  \
                /* a cell-major f16 row: the vector's heads at once (F16C where present) */      \
                nxkv_f32_to_f16(v, (uint16_t *)s->dest + cell * n_embd + vec * k * d, (size_t)(k * d), 1); \
            } else {                                                                             \
                for (int64_t j = 0; j < k; ++j) nxkv_core_section_store(s, vec * k + j, cell, v + j * d); \
            }                                                                                    \
        }                                                                                        \
    }

#ifdef NXKV_HAVE_V8F
/* A basis section's rows eight cells at a time in portable C (CPUs without AVX2: ARM, older
 * x86; GCC vector types): the products in floats, exact where 2^shift * l1 < 2^24 as
 * core/transform.h's float path, each 32-output block of the basis (24 KiB for 192-value
 * vectors) kept in L1 while the tile's cells take it, two cells to a load; other cells through
 * core/transform.h one at a time. Cell by cell, the whole basis (147 KiB of floats) streamed from
 * L2 for every cell. The same integers, so the same bits. */
#define PORTABLE_TILE 8
/* 128-bit vectors, the width every SIMD unit has (SSE2, NEON): with 256-bit GCC vectors on
 * SSE2 the scalar broadcast went through the stack (measured 2x slower than no tiles at all) */
typedef float nxkv_v4f __attribute__((vector_size(16)));
/* acc[t] (and acc[t + 1] where `two`)[i0 .. i0 + 4 K) for K = 4 or 2: a constant, so that the
 * accumulators stay in registers */
#define PORTABLE_BLOCK(K)                                                                                              \
    static inline void portable_block##K(const float *basis, const float (*pf)[PORTABLE_TILE], int64_t t, int two,     \
                                         int64_t w, int64_t i0, float (*acc)[NXKV_MAX_HEAD_DIM]) {                     \
        nxkv_v4f sa[K], sb[K];                                                                                         \
        for (int q = 0; q < K; ++q) sa[q] = sb[q] = (nxkv_v4f){0, 0, 0, 0};                                            \
        for (int64_t j = 0; j < w; ++j) {                                                                              \
            const float *row = basis + j * w + i0;                                                                     \
            const float fa = pf[j][t], fb = two ? pf[j][t + 1] : 0.0f;                                                 \
            for (int q = 0; q < K; ++q) {                                                                              \
                nxkv_v4f r;                                                                                            \
                __builtin_memcpy(&r, row + 4 * q, sizeof r);                                                           \
                sa[q] += r * fa;                                                                                       \
                sb[q] += r * fb;                                                                                       \
            }                                                                                                          \
        }                                                                                                              \
        for (int q = 0; q < K; ++q) {                                                                                  \
            __builtin_memcpy(acc[t] + i0 + 4 * q, &sa[q], sizeof sa[q]);                                              \
            if (two) __builtin_memcpy(acc[t + 1] + i0 + 4 * q, &sb[q], sizeof sb[q]);                                 \
        }                                                                                                              \
    }
PORTABLE_BLOCK(4)
PORTABLE_BLOCK(2)
static void section_rows_portable_tiles(const nxkv_section *s, const nxkv_values *a, int32_t *status) {
    const int64_t d = s->head_dim, n = s->n_cells, k = s->head_group, w = k * d;
    const int shift = (int)s->basis_shift;
    float pf[NXKV_MAX_HEAD_DIM][PORTABLE_TILE], acc[PORTABLE_TILE][NXKV_MAX_HEAD_DIM], v[PORTABLE_TILE][NXKV_MAX_HEAD_DIM];
    float acc32[NXKV_MAX_HEAD_DIM];
    int64_t p2[NXKV_MAX_HEAD_DIM], acc64[NXKV_MAX_HEAD_DIM];
    int fits[PORTABLE_TILE];
    *status = 0;
    for (int64_t vec = 0; vec < s->n_heads / k; ++vec) {
        const float *basis = a->bases + s->basis0 + vec * w * w;
        for (int64_t c0 = 0; c0 < n; c0 += PORTABLE_TILE) {
            const int64_t cnt = n - c0 < PORTABLE_TILE ? n - c0 : PORTABLE_TILE;
            for (int64_t t = 0; t < cnt; ++t) {
                int64_t l1 = 0;
                if (nxkv_core_section_points(s, a, vec, c0 + t, v[t], p2, &l1)) {
                    *status = 1;
                    return;
                }
                fits[t] = shift < 24 && l1 < ((int64_t)1 << (24 - shift));
                for (int64_t j = 0; j < w; ++j) pf[j][t] = fits[t] ? (float)p2[j] : 0.0f;
                if (!fits[t]) {
                    double c;
                    const double *mean, *cscale;
                    nxkv_core_section_basis_terms(s, a, vec, c0 + t, &c, &mean, &cscale);
                    nxkv_core_basis_vector(p2, l1, basis, w, shift, c, mean, cscale, acc32, acc64, v[t]);
                }
            }
            int64_t i0 = 0;
            for (; i0 + 16 <= w; i0 += 16) {
                for (int64_t t = 0; t < cnt; t += 2) portable_block4(basis, pf, t, t + 1 < cnt, w, i0, acc);
            }
            for (; i0 < w; i0 += 8) {
                for (int64_t t = 0; t < cnt; t += 2) portable_block2(basis, pf, t, t + 1 < cnt, w, i0, acc);
            }
            for (int64_t t = 0; t < cnt; ++t) {
                if (fits[t]) {
                    double c;
                    const double *mean, *cscale;
                    nxkv_core_section_basis_terms(s, a, vec, c0 + t, &c, &mean, &cscale);
                    for (int64_t i = 0; i < w; ++i) acc64[i] = (int64_t)acc[t][i]; /* exact integers */
                    nxkv_core_basis_finish(acc64, w, c, mean, cscale, v[t]);
                }
                const int r = nxkv_core_section_finish(s, a, vec, c0 + t, v[t]);
                if (r) {
                    *status = r;
                    return;
                }
                for (int64_t j = 0; j < k; ++j) nxkv_core_section_store(s, vec * k + j, c0 + t, v[t] + j * d);
            }
        }
    }
}
#endif

static void section_rows(const nxkv_section *s, const nxkv_values *arrays, int32_t *status) {
    const int16_t *pairs = NULL;
    SECTION_ROWS_BODY
}
#ifdef NXKV_HAVE_AVX2_PATH
__attribute__((target("avx2"), flatten)) static void section_rows_avx2(const nxkv_section *s, const nxkv_values *arrays,
                                                               int32_t *status, const int16_t *pairs) {
    SECTION_ROWS_BODY
}
#endif

#ifdef NXKV_HAVE_AVX2_PATH
/* Products of TILE cells' points with a basis held as 4-byte groups per output (rows
 * [w/P][w][P]: int16 pairs, P = 2, or int8 quads, P = 4), the cells' points as the same groups,
 * pv [w/P][cell]: acc[cell][i] = sum over the first `rows` rows (a multiple of P; the rest are
 * zero: used_rows) of DOT(group of the basis, group of the points).
 * Block by block of outputs, so that the block's part of the basis (24 KiB of pairs for 64
 * outputs of a 192-value vector) stays in L1 while every cell of the tile takes it, two cells to
 * a load. */
#define TILE 8
#define TILE_SUMS(NAME, BLOCK, P, VEC, LOAD, DOT, ZERO, SET1, STORE)                                                    \
    static inline void NAME(const void *basis, const int32_t (*pv)[TILE], int64_t cnt, int64_t w, int64_t rows,        \
                            int64_t i0, int32_t (*acc)[NXKV_MAX_HEAD_DIM]) {                                            \
        enum { K = BLOCK / (sizeof(VEC) / 4) };                                                                        \
        int64_t t = 0;                                                                                                 \
        for (; t + 2 <= cnt; t += 2) {                                                                                 \
            VEC a[K], b[K];                                                                                            \
            for (int q = 0; q < K; ++q) a[q] = b[q] = ZERO();                                                          \
            for (int64_t j = 0; j < rows / P; ++j) {                                                                   \
                const char *r = (const char *)basis + 4 * (j * w + i0);                                                \
                const VEC pa = SET1(pv[j][t]), pb = SET1(pv[j][t + 1]);                                                \
                for (int q = 0; q < K; ++q) {                                                                          \
                    const VEC m = LOAD(r + q * sizeof(VEC));                                                           \
                    a[q] = DOT(a[q], m, pa);                                                                           \
                    b[q] = DOT(b[q], m, pb);                                                                           \
                }                                                                                                      \
            }                                                                                                          \
            for (int q = 0; q < K; ++q) {                                                                              \
                STORE(acc[t] + i0 + q * (sizeof(VEC) / 4), a[q]);                                                      \
                STORE(acc[t + 1] + i0 + q * (sizeof(VEC) / 4), b[q]);                                                 \
            }                                                                                                          \
        }                                                                                                              \
        for (; t < cnt; ++t) {                                                                                         \
            VEC a[K];                                                                                                  \
            for (int q = 0; q < K; ++q) a[q] = ZERO();                                                                 \
            for (int64_t j = 0; j < rows / P; ++j) {                                                                   \
                const char *r = (const char *)basis + 4 * (j * w + i0);                                                \
                const VEC pa = SET1(pv[j][t]);                                                                         \
                for (int q = 0; q < K; ++q) a[q] = DOT(a[q], LOAD(r + q * sizeof(VEC)), pa);                           \
            }                                                                                                          \
            for (int q = 0; q < K; ++q) STORE(acc[t] + i0 + q * (sizeof(VEC) / 4), a[q]);                              \
        }                                                                                                              \
    }
#define LOAD512(p) _mm512_loadu_si512((const void *)(p))
#define STORE512(p, v) _mm512_storeu_si512((void *)(p), v)
#define LOAD256(p) _mm256_loadu_si256((const __m256i *)(p))
#define STORE256(p, v) _mm256_storeu_si256((__m256i *)(p), v)
/* The products of a tile (acc [cell][output]): int8 quads where `quads` (every point of the
 * tile and every basis entry within +-127; acc = sum (p + 128) b, so 128 times each column's
 * sum is subtracted), else int16 pairs. Two versions, chosen at run time. */
typedef void (*tile_products_fn)(const int16_t *pairs, const int8_t *quads, const int32_t *colsum, const int32_t (*pv)[TILE],
                                 const int32_t (*pq)[TILE], int64_t cnt, int64_t w, int64_t rows,
                                 int32_t (*acc)[NXKV_MAX_HEAD_DIM]);

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512vnni,avx2")
/* AVX-512 VNNI. int16 pairs: vpdpwssd; int8 quads: vpdpbusd (twice the products an
 * instruction), the points' bytes (unsigned, offset by 128) first, the basis's (signed) second */
#define DOT16_512(acc, m, p) _mm512_dpwssd_epi32(acc, m, p)
#define DOT16_256(acc, m, p) _mm256_dpwssd_epi32(acc, m, p)
#define DOT8_512(acc, m, p) _mm512_dpbusd_epi32(acc, p, m)
#define DOT8_256(acc, m, p) _mm256_dpbusd_epi32(acc, p, m)
TILE_SUMS(tile_sums64, 64, 2, __m512i, LOAD512, DOT16_512, _mm512_setzero_si512, _mm512_set1_epi32, STORE512)
TILE_SUMS(tile_sums16, 16, 2, __m512i, LOAD512, DOT16_512, _mm512_setzero_si512, _mm512_set1_epi32, STORE512)
TILE_SUMS(tile_sums8, 8, 2, __m256i, LOAD256, DOT16_256, _mm256_setzero_si256, _mm256_set1_epi32, STORE256)
TILE_SUMS(tile_quads64, 64, 4, __m512i, LOAD512, DOT8_512, _mm512_setzero_si512, _mm512_set1_epi32, STORE512)
TILE_SUMS(tile_quads16, 16, 4, __m512i, LOAD512, DOT8_512, _mm512_setzero_si512, _mm512_set1_epi32, STORE512)
TILE_SUMS(tile_quads8, 8, 4, __m256i, LOAD256, DOT8_256, _mm256_setzero_si256, _mm256_set1_epi32, STORE256)

static void tile_products_vnni(const int16_t *pairs, const int8_t *quads, const int32_t *colsum, const int32_t (*pv)[TILE],
                               const int32_t (*pq)[TILE], int64_t cnt, int64_t w, int64_t rows,
                               int32_t (*acc)[NXKV_MAX_HEAD_DIM]) {
    int64_t i0 = 0;
    if (quads) {
        for (; i0 + 64 <= w; i0 += 64) tile_quads64(quads, pq, cnt, w, rows, i0, acc);
        for (; i0 + 16 <= w; i0 += 16) tile_quads16(quads, pq, cnt, w, rows, i0, acc);
        for (; i0 < w; i0 += 8) tile_quads8(quads, pq, cnt, w, rows, i0, acc);
        for (int64_t t = 0; t < cnt; ++t) {
            for (int64_t i = 0; i < w; ++i) acc[t][i] -= 128 * colsum[i];
        }
        return;
    }
    for (; i0 + 64 <= w; i0 += 64) tile_sums64(pairs, pv, cnt, w, rows, i0, acc);
    for (; i0 + 16 <= w; i0 += 16) tile_sums16(pairs, pv, cnt, w, rows, i0, acc);
    for (; i0 < w; i0 += 8) tile_sums8(pairs, pv, cnt, w, rows, i0, acc);
}
#pragma GCC pop_options

/* AVX2: int16 pairs only (vpmaddwd then vpaddd; AVX2's byte products saturate), 32 outputs a
 * block so that two cells' accumulators and the loads fit its 16 registers. */
#define DOT16_AVX2(acc, m, p) _mm256_add_epi32(acc, _mm256_madd_epi16(m, p))
#pragma GCC push_options
#pragma GCC target("avx2")
TILE_SUMS(tile_sums32_avx2, 32, 2, __m256i, LOAD256, DOT16_AVX2, _mm256_setzero_si256, _mm256_set1_epi32, STORE256)
TILE_SUMS(tile_sums8_avx2, 8, 2, __m256i, LOAD256, DOT16_AVX2, _mm256_setzero_si256, _mm256_set1_epi32, STORE256)

static void tile_products_avx2(const int16_t *pairs, const int8_t *quads, const int32_t *colsum, const int32_t (*pv)[TILE],
                               const int32_t (*pq)[TILE], int64_t cnt, int64_t w, int64_t rows,
                               int32_t (*acc)[NXKV_MAX_HEAD_DIM]) {
    (void)quads, (void)colsum, (void)pq;
    int64_t i0 = 0;
    for (; i0 + 32 <= w; i0 += 32) tile_sums32_avx2(pairs, pv, cnt, w, rows, i0, acc);
    for (; i0 < w; i0 += 8) tile_sums8_avx2(pairs, pv, cnt, w, rows, i0, acc);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,f16c")

/* The point columns of vector `vec` (core/section.h's nxkv_core_point_symbol, either layout; of
 * column table `table` where there are several) in the order [coset, 7 coordinates, last] per
 * group: symbol index at row 0, per-row stride, lo. 0 unless every stride and lo fits the int32
 * lanes of tile_points. */
static int point_columns(const nxkv_section *s, const nxkv_values *a, int64_t vec, int64_t w, int64_t table, int64_t *base,
                         int32_t *stride, int32_t *lo) {
    const int64_t g = s->n_heads * s->head_dim / 8;
    for (int64_t q = 0; q < w / 8; ++q) {
        const int64_t grp = vec * (w / 8) + q;
        for (int k = 0; k < 9; ++k) {
            const int64_t col = k == 0 ? grp : k < 8 ? g + 7 * grp + (k - 1) : 8 * g + grp;
            int64_t b, st, l;
            if (s->by_class) {
                const int64_t *c = a->columns + s->cols0 + 27 * g * table + 3 * col;
                b = c[0], st = c[1], l = c[2];
            } else if (k == 0) {
                b = s->coset0 + grp, st = g, l = s->coset_lo;
            } else if (k < 8) {
                b = s->coord0 + 7 * grp + (k - 1), st = 7 * g, l = s->coord_lo;
            } else {
                b = s->last0 + grp, st = g, l = s->last_lo;
            }
            if (st < 0 || st > INT32_MAX / TILE || l < INT32_MIN || l > INT32_MAX) return 0;
            base[9 * q + k] = b;
            stride[9 * q + k] = (int32_t)st;
            lo[9 * q + k] = (int32_t)l;
        }
    }
    return 1;
}

/* The points of TILE whole cells, rows c0 .. c0 + TILE of the point streams, a cell a lane
 * (AVX2 int32): their doubled coordinates as int16 pairs into pv [w/2][TILE], as
 * nxkv_core_section_points + pack_pairs do
 * one cell at a time. The int32 lanes wrap where those compute in int64, but only the low bits
 * (parity, coset) or values checked to fit int16 are kept: returns a bit per cell whose points
 * do not fit (coordinates past +-16383, the last past +-8191, or sums past int32: decoded by
 * the scalar path), *bad a bit per cell with a coset symbol other than 0 or 1. */
/* The columns in runs: columns whose symbol indices follow one another with one stride (a
 * stream's columns within each cell's row, in either layout) hold, for each cell, adjacent
 * symbols; tile_points reads a run eight columns by eight cells at a time and transposes them,
 * where a gather per column cost about half of a basis section's decoding (perf). order: the
 * columns sorted into runs; run_at[r] .. run_at[r + 1]: run r's places in order. Returns the
 * number of runs. */
typedef struct {
    int16_t order[9 * NXKV_MAX_HEAD_DIM / 8];
    int16_t run_at[9 * NXKV_MAX_HEAD_DIM / 8 + 1];
} column_runs;

static int point_runs(const int64_t *base, const int32_t *stride, int64_t n_cols, column_runs *runs) {
    for (int64_t c = 0; c < n_cols; ++c) { /* by symbol index (an insertion sort: they nearly are) */
        int64_t i = c;
        for (; i > 0 && base[runs->order[i - 1]] > base[c]; --i) runs->order[i] = runs->order[i - 1];
        runs->order[i] = (int16_t)c;
    }
    int n_runs = 0;
    for (int64_t i = 0; i < n_cols; ++i) {
        const int c = runs->order[i], prev = i ? runs->order[i - 1] : -1;
        if (!i || base[c] != base[prev] + 1 || stride[c] != stride[prev]) runs->run_at[n_runs++] = (int16_t)i;
    }
    runs->run_at[n_runs] = (int16_t)n_cols;
    return n_runs;
}

/* The eight 32-bit lanes of r[0 .. 8) transposed in place (r[i][j] <-> r[j][i]). */
static inline void transpose8x8_epi32(__m256i *r) {
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

/* Every column's symbols of rows c0 .. c0 + 8, lo added, into cols[column] (a cell a lane):
 * each run read a row of up to eight adjacent symbols a cell (masked past the run's end, so
 * nothing outside the columns is read), transposed. */
static void tile_columns(const int32_t *symbols, const int64_t *base, const int32_t *stride, const int32_t *lo, int64_t c0,
                         const column_runs *runs, int n_runs, __m256i *cols) {
    for (int r = 0; r < n_runs; ++r) {
        for (int i = runs->run_at[r]; i < runs->run_at[r + 1]; i += 8) {
            const int c = runs->order[i], len = runs->run_at[r + 1] - i < 8 ? runs->run_at[r + 1] - i : 8;
            const int32_t *row = symbols + base[c] + c0 * stride[c];
            const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(len), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            __m256i m[8];
            /* and each cell's row two tiles on: a tile reads ~200 strided rows, more than the
             * hardware prefetcher follows (the loads were a third of section_rows_tiled's time;
             * a 4096-token load's rANS and values took 10% less with the prefetch, measured) */
            for (int t = 0; t < TILE; ++t) {
                m[t] = _mm256_maskload_epi32((const int *)(row + t * stride[c]), mask);
                __builtin_prefetch(row + (t + 2 * TILE) * stride[c]);
            }
            transpose8x8_epi32(m);
            for (int k = 0; k < len; ++k) {
                const int col = runs->order[i + k];
                cols[col] = _mm256_add_epi32(m[k], _mm256_set1_epi32(lo[col]));
            }
        }
    }
}

static unsigned tile_points(const int32_t *symbols, const int64_t *base, const int32_t *stride, const int32_t *lo, int64_t c0,
                            int64_t w, int shift, int32_t (*pv)[TILE], int32_t (*pq)[TILE], unsigned *bad, unsigned *small,
                            const column_runs *runs, int n_runs) {
    __m256i cols[9 * NXKV_MAX_HEAD_DIM / 8];
    tile_columns(symbols, base, stride, lo, c0, runs, n_runs, cols);
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i lim7 = _mm256_set1_epi32(16383), lim_last = _mm256_set1_epi32(8191), low16 = _mm256_set1_epi32(0xffff);
    const __m256i lim8 = _mm256_set1_epi32(127), offset8 = _mm256_set1_epi32(128), byte = _mm256_set1_epi32(0xff);
    __m256i l1 = _mm256_setzero_si256(), wide = _mm256_setzero_si256(), bad_coset = _mm256_setzero_si256();
    __m256i over8 = _mm256_setzero_si256(); /* a doubled coordinate past +-127: no int8 quads */
    for (int64_t q = 0; q < w / 8; ++q) {
        const __m256i *x = cols + 9 * q;
        const __m256i coset = x[0];
        bad_coset = _mm256_or_si256(bad_coset, _mm256_andnot_si256(one, coset));
        __m256i sum = x[1];
        for (int j = 2; j < 8; ++j) sum = _mm256_add_epi32(sum, x[j]);
        __m256i p2[8];
        for (int j = 0; j < 7; ++j) {
            wide = _mm256_or_si256(wide, _mm256_or_si256(_mm256_cmpgt_epi32(x[1 + j], lim7),
                                                         _mm256_cmpgt_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), lim7), x[1 + j])));
            p2[j] = _mm256_add_epi32(_mm256_add_epi32(x[1 + j], x[1 + j]), coset);
        }
        wide = _mm256_or_si256(wide, _mm256_or_si256(_mm256_cmpgt_epi32(x[8], lim_last),
                                                     _mm256_cmpgt_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), lim_last), x[8])));
        /* the eighth: 2 (2 last + parity of the seven) + coset */
        p2[7] = _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(_mm256_slli_epi32(x[8], 1), _mm256_and_si256(sum, one)), 1), coset);
        for (int j = 0; j < 8; ++j) {
            const __m256i m = _mm256_abs_epi32(p2[j]);
            l1 = _mm256_add_epi32(l1, m);
            over8 = _mm256_or_si256(over8, _mm256_cmpgt_epi32(m, lim8));
        }
        for (int j = 0; j < 2; ++j) { /* quads of p2 + 128 as unsigned bytes */
            __m256i quad = _mm256_setzero_si256();
            for (int b = 0; b < 4; ++b)
                quad = _mm256_or_si256(quad, _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(p2[4 * j + b], offset8), byte), 8 * b));
            _mm256_storeu_si256((__m256i *)pq[2 * q + j], quad);
        }
        for (int j = 0; j < 4; ++j) {
            const __m256i pair = _mm256_or_si256(_mm256_and_si256(p2[2 * j], low16), _mm256_slli_epi32(p2[2 * j + 1], 16));
            _mm256_storeu_si256((__m256i *)pv[4 * q + j], pair);
        }
    }
    /* cosets outside 0..1 make |p2| up to 2^31: l1 is then meaningless, but those cells are refused */
    const __m256i too_big = _mm256_cmpgt_epi32(l1, _mm256_set1_epi32((int32_t)(((int64_t)1 << (31 - shift)) - 1)));
    /* (abs of INT32_MIN stays negative: such a cell is wide already) */
    over8 = _mm256_or_si256(over8, _mm256_or_si256(wide, too_big));
    *small = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(over8)) & 0xffu;
    *bad = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bad_coset, _mm256_setzero_si256()))) |
           (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setzero_si256(), bad_coset)));
    return (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(wide, _mm256_or_si256(too_big, _mm256_cmpgt_epi32(_mm256_setzero_si256(), l1)))));
}

/* core/transform.h's nxkv_core_basis_finish from a cell's int32 sums, four doubles a register:
 * the same double operations in the same order (no contraction), so the same bits; scalar,
 * with its branches in the loop, it took a fifth of the tiled decoder's time (perf). */
static inline void tile_finish(const int32_t *acc, int64_t w, double c, const double *mean, const double *cscale, float *out) {
    const __m256d cv = _mm256_set1_pd(c);
    for (int64_t i = 0; i < w; i += 4) { /* w is a multiple of 8 */
        __m256d x = _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(acc + i))), cv);
        if (cscale) x = _mm256_mul_pd(x, _mm256_loadu_pd(cscale + i));
        if (mean) x = _mm256_add_pd(x, _mm256_loadu_pd(mean + i));
        _mm_storeu_ps(out + i, _mm256_cvtpd_ps(x));
    }
}

/* core/section.h's nxkv_core_section_finish for the tiles (sinks and Hadamard there; RoPE and
 * the finite check here), RoPE two pairs (NORM) or four (NEOX) a register: each pair's
 * products and sum in doubles in the core's order, one rounding back to float (no contraction:
 * this file is built with -ffp-contract=off, and the AVX2 target has no FMA), so the same bits.
 * Scalar, RoPE was ~9% of the values' time (perf). */
static inline int tile_section_finish(const nxkv_section *s, const nxkv_values *a, int64_t vec, int64_t cell, float *v) {
    if (s->hadamard || !s->rope || s->n_rot % 4) return nxkv_core_section_finish(s, a, vec, cell, v);
    const int64_t d = s->head_dim, k = s->head_group, w = k * d, half = s->n_rot / 2;
    if (s->sink_map0 >= 0 && a->sink_map[s->sink_map0 + cell] >= 0) return nxkv_core_section_finish(s, a, vec, cell, v);
    const double *c = a->cos + s->trig0 + cell * half, *sn = a->sin + s->trig0 + cell * half;
    const __m256d neg_even = _mm256_setr_pd(-1.0, 1.0, -1.0, 1.0);
    for (int64_t j = 0; j < k; ++j) {
        float *h = v + j * d;
        if (s->rope == 2) { /* NEOX: pairs (i, i + half) */
            for (int64_t i = 0; i < half; i += 4) {
                const __m256d x = _mm256_cvtps_pd(_mm_loadu_ps(h + i)), y = _mm256_cvtps_pd(_mm_loadu_ps(h + half + i));
                const __m256d cv = _mm256_loadu_pd(c + i), sv = _mm256_loadu_pd(sn + i);
                _mm_storeu_ps(h + i, _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_mul_pd(x, cv), _mm256_mul_pd(y, sv))));
                _mm_storeu_ps(h + half + i, _mm256_cvtpd_ps(_mm256_add_pd(_mm256_mul_pd(x, sv), _mm256_mul_pd(y, cv))));
            }
        } else { /* NORM: pairs (2i, 2i + 1), two a register: [a0 b0 a1 b1] */
            for (int64_t i = 0; i < half; i += 2) {
                const __m256d x = _mm256_cvtps_pd(_mm_loadu_ps(h + 2 * i));
                const __m256d swapped = _mm256_permute_pd(x, 0x5); /* [b0 a0 b1 a1] */
                const __m128d c2 = _mm_loadu_pd(c + i), s2 = _mm_loadu_pd(sn + i);
                const __m256d cv = _mm256_set_m128d(_mm_unpackhi_pd(c2, c2), _mm_unpacklo_pd(c2, c2)); /* [c0 c0 c1 c1] */
                const __m256d sv = _mm256_set_m128d(_mm_unpackhi_pd(s2, s2), _mm_unpacklo_pd(s2, s2));
                /* a c + (-(b s)) = a c - b s; b c + a s = a s + b c: the core's two results */
                const __m256d r = _mm256_add_pd(_mm256_mul_pd(x, cv), _mm256_mul_pd(_mm256_mul_pd(swapped, sv), neg_even));
                _mm_storeu_ps(h + 2 * i, _mm256_cvtpd_ps(r));
            }
        }
    }
    /* finite: |x| below infinity (NaN compares false) */
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t j = 0; j < w; j += 8) ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(v + j), abs_mask), inf, _CMP_LT_OQ));
    return _mm256_movemask_ps(ok) == 0xff ? 0 : 2;
}

/* The basis rows (components) a vector's products need: up to its last row that is not all
 * zero, in whole quads. The rows of the components a writer left out (lattice basis_prune) are
 * stored as zeros, the weakest last: 18% of `high`'s rows and 36% of `balanced`'s at 4096
 * tokens, whose products add nothing (the sums are exact integers either way). */
static int64_t used_rows(const float *basis, int64_t w) {
    int64_t rows = w;
    for (; rows > 0; --rows) {
        const float *r = basis + (rows - 1) * w;
        int64_t i = 0;
        while (i < w && r[i] == 0.0f) ++i;
        if (i < w) break;
    }
    return (rows + 3) / 4 * 4;
}

/* A section's cells in the order section_rows_tiled takes them: by column table (a bucket
 * section's step buckets; nxkv_section.cell_map0), each table's cells in cell order, so its rows
 * in order; table t's are order[at[t] .. at[t + 1]). 0, or -1 for no memory. */
static int tile_order(const nxkv_section *s, const nxkv_values *a, int32_t **order, int64_t *at) {
    const int64_t n = s->n_cells, tables = s->n_tables;
    *order = malloc((size_t)(n > 0 ? n : 1) * sizeof **order);
    if (!*order) return -1;
    for (int64_t t = 0; t <= tables; ++t) at[t] = 0;
    for (int64_t c = 0; c < n; ++c) ++at[a->columns[s->cell_map0 + 2 * c] + 1];
    for (int64_t t = 0; t < tables; ++t) at[t + 1] += at[t];
    int64_t next[NXKV_MAX_TABLES];
    for (int64_t t = 0; t < tables; ++t) next[t] = at[t];
    for (int64_t c = 0; c < n; ++c) (*order)[next[a->columns[s->cell_map0 + 2 * c]]++] = (int32_t)c;
    return 0;
}

/* A basis section's rows TILE cells at a time (AVX2): per cell its points, then the tile's
 * products (tile_products_*), then per cell core/section.h's finish, written as f16 rows (a
 * transposed V eight cells to a store). Decoded one cell at a time, the whole basis came from
 * L2 for every cell: the products were bound by L2, and VNNI alone gained nothing (measured).
 * The same exact integer sums and float operations, so the same bits. A tile is eight cells of
 * one column table (tile_order) whose rows follow one another: every tile of a plain section,
 * a bucket section's except at its buckets' ends. */
__attribute__((flatten)) static void section_rows_tiled(const nxkv_section *s, const nxkv_values *a, int32_t *status,
                                                       const int16_t *pairs, const int8_t *quads, const int32_t *colsum,
                                                       tile_products_fn products) {
    const int64_t d = s->head_dim, n = s->n_cells, k = s->head_group, w = k * d, n_embd = s->n_heads * d;
    int32_t pv[NXKV_MAX_HEAD_DIM / 2][TILE], pq[NXKV_MAX_HEAD_DIM / 4][TILE], acc[TILE][NXKV_MAX_HEAD_DIM];
    float v[TILE][NXKV_MAX_HEAD_DIM];
    int64_t p2[NXKV_MAX_HEAD_DIM], acc64[NXKV_MAX_HEAD_DIM], base[9 * NXKV_MAX_HEAD_DIM / 8];
    int32_t stride[9 * NXKV_MAX_HEAD_DIM / 8], lo[9 * NXKV_MAX_HEAD_DIM / 8], pair[NXKV_MAX_HEAD_DIM / 2];
    float acc32[NXKV_MAX_HEAD_DIM];
    int fits[TILE];
    int32_t *order = NULL; /* NULL: the cells in order, one table */
    int64_t at[NXKV_MAX_TABLES + 1] = {0, n}, tables = 1;
    if (s->cell_map0 >= 0) {
        if (tile_order(s, a, &order, at)) {
            section_rows_avx2(s, a, status, NULL); /* no memory for the order: cell by cell */
            return;
        }
        tables = s->n_tables;
    }
    *status = 0;
    for (int64_t vec = 0; vec < s->n_heads / k && !*status; ++vec) {
        const int16_t *vp = pairs + vec * w * w;
        const int64_t rows = used_rows(a->bases + s->basis0 + vec * w * w, w);
        for (int64_t table = 0; table < tables && !*status; ++table) {
            const int columns = point_columns(s, a, vec, w, table, base, stride, lo);
            column_runs runs;
            const int n_runs = columns ? point_runs(base, stride, 9 * (w / 8), &runs) : 0;
            for (int64_t p0 = at[table]; p0 < at[table + 1] && !*status; p0 += TILE) {
                const int64_t cnt = at[table + 1] - p0 < TILE ? at[table + 1] - p0 : TILE;
                int64_t cell[TILE];
                for (int64_t t = 0; t < cnt; ++t) cell[t] = order ? order[p0 + t] : p0 + t;
                const int64_t row0 = order ? a->columns[s->cell_map0 + 2 * cell[0] + 1] : cell[0];
                int rows_follow = 1, cells_follow = 1; /* rows row0 + t; cells cell[0] + t */
                for (int64_t t = 0; t < cnt; ++t) {
                    rows_follow &= !order || a->columns[s->cell_map0 + 2 * cell[t] + 1] == row0 + t;
                    cells_follow &= cell[t] == cell[0] + t;
                }
                unsigned scalar = (1u << cnt) - 1, small = 0; /* cells whose points the scalar path makes; in int8 */
                if (cnt == TILE && columns && rows_follow) {
                    unsigned bad;
                    scalar = tile_points(a->symbols, base, stride, lo, row0, w, (int)s->basis_shift, pv, pq, &bad, &small, &runs,
                                         n_runs);
                    if (bad) {
                        *status = 1;
                        break;
                    }
                }
                for (int64_t t = 0; t < cnt && !*status; ++t) {
                    fits[t] = 1;
                    if (!(scalar >> t & 1)) continue;
                    int64_t l1 = 0;
                    if (nxkv_core_section_points(s, a, vec, cell[t], v[t], p2, &l1)) {
                        *status = 1;
                        break;
                    }
                    fits[t] = pack_pairs(p2, l1, w, (int)s->basis_shift, pair);
                    for (int64_t j = 0; j < w / 2; ++j) pv[j][t] = fits[t] ? pair[j] : 0;
                    if (!fits[t]) { /* coordinates beyond int16 or sums beyond int32: float / int64 now */
                        double c;
                        const double *mean, *cscale;
                        nxkv_core_section_basis_terms(s, a, vec, cell[t], &c, &mean, &cscale);
                        nxkv_core_basis_vector(p2, l1, a->bases + s->basis0 + vec * w * w, w, (int)s->basis_shift, c, mean,
                                               cscale, acc32, acc64, v[t]);
                    }
                }
                if (*status) break;
                products(vp, quads && small == 0xffu ? quads + vec * w * w : NULL, colsum ? colsum + vec * w : NULL,
                         (const int32_t(*)[TILE])pv, (const int32_t(*)[TILE])pq, cnt, w, rows, acc);
                for (int64_t t = 0; t < cnt; ++t) {
                    if (fits[t]) {
                        double c;
                        const double *mean, *cscale;
                        nxkv_core_section_basis_terms(s, a, vec, cell[t], &c, &mean, &cscale);
                        tile_finish(acc[t], w, c, mean, cscale, v[t]);
                    }
                    const int r = tile_section_finish(s, a, vec, cell[t], v[t]);
                    if (r) {
                        *status = r;
                        break;
                    }
                }
                if (*status) break;
                if (s->out_f16 && s->transposed) {
                    /* V^T: a channel's row holds the cells; a tile's 8 adjacent cells of it in one store */
                    uint16_t *dest = (uint16_t *)s->dest;
                    for (int64_t j0 = 0; j0 < w; j0 += 8) { /* 8 channels x 8 cells: transposed in registers */
                        if (cnt == TILE) {
                            __m256i r[TILE];
                            for (int t = 0; t < TILE; ++t) r[t] = _mm256_castps_si256(_mm256_loadu_ps(v[t] + j0));
                            transpose8x8_epi32(r);
                            for (int j = 0; j < 8; ++j) {
                                const __m128i h = _mm256_cvtps_ph(_mm256_castsi256_ps(r[j]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                                uint16_t *row = dest + (vec * w + j0 + j) * n;
                                if (cells_follow) {
                                    _mm_storeu_si128((__m128i *)(row + cell[0]), h);
                                } else { /* a step bucket's cells: the same halves, one at a time */
                                    uint16_t half[TILE];
                                    _mm_storeu_si128((__m128i *)half, h);
                                    for (int t = 0; t < TILE; ++t) row[cell[t]] = half[t];
                                }
                            }
                        } else {
                            for (int64_t j = j0; j < j0 + 8; ++j) {
                                for (int64_t t = 0; t < cnt; ++t) dest[(vec * w + j) * n + cell[t]] = nxkv_core_f32_to_f16(v[t][j]);
                            }
                        }
                    }
                } else if (s->out_f16) {
                    for (int64_t t = 0; t < cnt; ++t) f32_to_f16_f16c(v[t], (uint16_t *)s->dest + cell[t] * n_embd + vec * w, (size_t)w);
                } else {
                    for (int64_t t = 0; t < cnt; ++t) {
                        for (int64_t j = 0; j < k; ++j) nxkv_core_section_store(s, vec * k + j, cell[t], v[t] + j * d);
                    }
                }
            }
        }
    }
    free(order);
}

/* The same tile decoder compiled for AVX-512 (flatten inlines it whole here): its intrinsics
 * stay AVX2's, but the copy has 32 vector registers and spills less of a tile's state; 3-4%
 * less decode time on a Xeon with AVX-512 (interleaved, one and two threads), the same bits.
 * Taken where VNNI's products are (every CPU with VNNI has BW and DQ; checked all the same). */
__attribute__((flatten, target("avx2,f16c,avx512f,avx512vl,avx512bw,avx512dq"))) static void
section_rows_tiled_avx512(const nxkv_section *s, const nxkv_values *a, int32_t *status, const int16_t *pairs,
                          const int8_t *quads, const int32_t *colsum, tile_products_fn products) {
    section_rows_tiled(s, a, status, pairs, quads, colsum, products);
}
#pragma GCC pop_options
#endif

int nxkv_decode_values(const nxkv_section *sections, int64_t n_sections, const nxkv_values *arrays, int32_t *status) {
    for (int64_t i = 0; i < n_sections; ++i) {
        if (!nxkv_core_section_fits(sections + i, arrays)) return NXKV_ERR_ARG;
    }
    for (int64_t i = 0; i < n_sections; ++i) {
#ifdef NXKV_HAVE_AVX2_PATH
        if (have_avx2()) {
            /* a basis section: its bases as int16 row pairs for the tiles (no memory for them:
             * one vector at a time, the float products) */
            const nxkv_section *s = sections + i;
            const int64_t w = s->head_dim * s->head_group;
            int16_t *pairs = s->basis ? basis_pairs(arrays->bases + s->basis0, s->n_heads / s->head_group, w) : NULL;
            if (pairs) { /* cells eight at a time, with VNNI's products where the CPU has them */
                int8_t *quads = NULL;
                int32_t *colsum = NULL;
                const int vnni = have_avx512_vnni();
                if (vnni) basis_quads(arrays->bases + s->basis0, s->n_heads / s->head_group, w, &quads, &colsum);
                if (vnni && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
                    section_rows_tiled_avx512(s, arrays, status + i, pairs, quads, colsum, tile_products_vnni);
                else
                    section_rows_tiled(s, arrays, status + i, pairs, quads, colsum, vnni ? tile_products_vnni : tile_products_avx2);
                free(quads);
                free(colsum);
            } else {
                section_rows_avx2(s, arrays, status + i, NULL);
            }
            free(pairs);
            continue;
        }
#endif
#ifdef NXKV_HAVE_V8F
        if (sections[i].basis) {
            section_rows_portable_tiles(sections + i, arrays, status + i);
            continue;
        }
#endif
        section_rows(sections + i, arrays, status + i);
    }
    return NXKV_OK;
}
