/* CPU entry points of the native library; the kernel bodies live in native/core/. */
#include <stdlib.h>

#include "nxkv.h"
#include "../core/byteplane.h"
#include "../core/e8.h"
#include "../core/rans.h"

int nxkv_abi_version(void) { return NXKV_ABI_VERSION; }

void nxkv_e8_nearest(const double *x, double *out, size_t n_rows) {
    for (size_t i = 0; i < n_rows; ++i) {
        nxkv_core_e8_nearest(x + 8 * i, out + 8 * i);
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
    uint32_t *freqs, *cum, *lookup;
} rans_table;

static int rans_table_new(rans_table *t, const int64_t *freqs, size_t n_freqs, int with_lookup) {
    t->freqs = malloc(sizeof(uint32_t) * (n_freqs ? n_freqs : 1));
    t->cum = malloc(sizeof(uint32_t) * (n_freqs ? n_freqs : 1));
    t->lookup = with_lookup ? malloc(sizeof(uint32_t) << NXKV_RANS_PROB_BITS) : NULL;
    if (!t->freqs || !t->cum || (with_lookup && !t->lookup)) return NXKV_ERR_NOMEM;
    return rans_tables(freqs, n_freqs, t->freqs, t->cum, t->lookup);
}

static void rans_table_free(rans_table *t) {
    free(t->freqs);
    free(t->cum);
    free(t->lookup);
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
    if (r == NXKV_OK) {
        r = nxkv_core_rans_encode(symbols, n, stride, t.freqs, t.cum, out + capacity, capacity);
        if (r < 0) r = NXKV_ERR_ARG;
    }
    rans_table_free(&t);
    return r;
}

int nxkv_rans_decode(const uint8_t *data, size_t n_data, const int64_t *freqs, size_t n_freqs, int64_t *out, size_t n) {
    rans_table t;
    int r = rans_table_new(&t, freqs, n_freqs, 1);
    if (r == NXKV_OK) {
        r = nxkv_core_rans_decode(data, n_data, t.freqs, t.cum, t.lookup, out, n, 1) ? NXKV_ERR_CORRUPT : NXKV_OK;
    }
    rans_table_free(&t);
    return r;
}

int nxkv_rans_decode_lanes(const uint8_t *data, size_t n_data, const int64_t *lengths, size_t n_tasks,
                           const int64_t *freqs, size_t n_freqs, int64_t *out, size_t n, size_t lanes, size_t chunk,
                           size_t t0, size_t t1) {
    if (lanes == 0 || chunk < lanes || t1 > n_tasks || t0 > t1) return NXKV_ERR_ARG;
    rans_table t;
    int r = rans_table_new(&t, freqs, n_freqs, 1);
    size_t offset = 0;
    for (size_t k = 0; k < t0 && r == NXKV_OK; ++k) {
        if (lengths[k] < 0) r = NXKV_ERR_ARG;
        offset += (size_t)lengths[k];
    }
    for (size_t k = t0; k < t1 && r == NXKV_OK; ++k) {
        size_t c0 = (k / lanes) * chunk, lane = k % lanes;
        size_t m = n - c0 < chunk ? n - c0 : chunk;
        size_t count = m > lane ? (m - lane + lanes - 1) / lanes : 0;
        if (lengths[k] < 0 || offset + (size_t)lengths[k] > n_data || c0 >= n) {
            r = NXKV_ERR_CORRUPT;
            break;
        }
        if (count == 0) {
            if (lengths[k] != 0) r = NXKV_ERR_CORRUPT;
        } else if (nxkv_core_rans_decode(data + offset, (size_t)lengths[k], t.freqs, t.cum, t.lookup, out + c0 + lane,
                                         count, lanes)) {
            r = NXKV_ERR_CORRUPT;
        }
        offset += (size_t)lengths[k];
    }
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
