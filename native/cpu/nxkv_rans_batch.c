/* nxkv_rans_decode_streams: every interleaved-rANS stream of a batch (a layer's K/V point
 * streams) in one call, the same symbols and the same refusals as nxkv_rans_decode_lanes on
 * each stream.
 *
 * Why a batch: a chunk's 4 lanes are one chain of dependent table lookups each, and a scalar
 * core runs about 4 of them at once (~350 M symbols/s on a 2-core EPYC, measured). With
 * AVX-512 (or AVX2, 8 lanes a register), 8 chunks of any streams (32 lanes) advance together,
 * their table lookups and byte reads as gathers: ~1 G symbols/s on the same core, AVX2 as fast
 * there (measured on a SmolLM2 layer: 53 M symbols of a 4096-token file in 0.07 s against
 * 0.2 s for the scalar code). Alphabets of up to 256 symbols (nearly every point stream) take a
 * compact table for that: a byte per slot
 * (16 KiB) and freq << 16 | cum per symbol; others take core/rans.h's tables. */
#include <stdlib.h>
#include <string.h>

#include "nxkv.h"
#include "cpu.h"
#include "../core/rans.h"

#define SLOTS (1 << NXKV_RANS_PROB_BITS)
#define SMALL_ALPHABET 256
#define SYMBOL_STRIDE (SLOTS + 64) /* a compact table's bytes and padding (a gather reads 4 bytes) */
#define SIMD_LANES 4               /* the presets' lanes per chunk: the SIMD path's only shape */
#define SIMD_JOBS 8                /* chunks a SIMD round advances (two registers of 16 lanes) */

typedef struct {
    int64_t stream;   /* index into the batch's streams */
    int64_t lane0;    /* its lanes' entries in lane_off / lane_len */
    int64_t lanes, m; /* lanes and symbols of this chunk */
    int32_t *out;
} chunk_job;

typedef struct {
    const uint8_t *payload;
    int64_t payload_size;
    const int64_t *lane_off, *lane_len; /* every lane's bytes: payload[lane_off ..) */
    const uint8_t *symbols8;            /* compact tables: SYMBOL_STRIDE bytes a stream */
    const uint32_t *fc;                 /* and SMALL_ALPHABET freq << 16 | cum a stream */
} batch_view;

/* The compact table of a frequency table (at most SMALL_ALPHABET symbols): 0, or -1 unless the
 * frequencies are non-negative and sum to 2^14. */
static int compact_table(const int64_t *freqs, int64_t n_freqs, uint8_t *symbols8, uint32_t *fc) {
    int64_t total = 0;
    for (int64_t s = 0; s < n_freqs; ++s) {
        if (freqs[s] < 0 || freqs[s] > SLOTS - total) return -1;
        memset(symbols8 + total, (int)s, (size_t)freqs[s]);
        fc[s] = (uint32_t)freqs[s] << 16 | (uint32_t)total;
        total += freqs[s];
    }
    memset(symbols8 + SLOTS, 0, SYMBOL_STRIDE - SLOTS);
    return total == SLOTS ? 0 : -1;
}

/* Symbols i0 .. m of a chunk on the compact table, its lanes' states x and positions p given
 * (i0 a multiple of the lane count): core/rans.h's decoder step for step, so the same symbols
 * and the same end checks. 0, or -1 as nxkv_core_rans_decode_interleaved. */
static int chunk_compact(const batch_view *b, const chunk_job *j, int64_t i0, uint32_t *x, int64_t *p) {
    const uint8_t *sym = b->symbols8 + j->stream * SYMBOL_STRIDE;
    const uint32_t *fc = b->fc + j->stream * SMALL_ALPHABET;
    const int64_t lanes = j->lanes;
    int64_t l = 0;
    for (int64_t i = i0; i < j->m; ++i) {
        const uint8_t *d = b->payload + b->lane_off[j->lane0 + l];
        const int64_t n_data = b->lane_len[j->lane0 + l];
        uint32_t xl = x[l];
        const uint32_t slot = xl & (SLOTS - 1), s = sym[slot], e = fc[s];
        j->out[i] = (int32_t)s;
        xl = (e >> 16) * (xl >> NXKV_RANS_PROB_BITS) + slot - (e & 0xffff);
        while (xl < NXKV_RANS_L) {
            if (p[l] >= n_data) return -1;
            xl = (xl << 8) | d[p[l]++];
        }
        x[l] = xl;
        if (++l == lanes) l = 0;
    }
    for (int64_t k = 0; k < lanes && k < j->m; ++k) {
        if (x[k] != NXKV_RANS_L || p[k] != b->lane_len[j->lane0 + k]) return -1;
    }
    return 0;
}

/* A chunk's lanes' start states: 0, or -1 if a lane with symbols is shorter than a state or one
 * without symbols is not empty (as nxkv_rans_decode_lanes). */
static int chunk_start(const batch_view *b, const chunk_job *j, uint32_t *x, int64_t *p) {
    for (int64_t l = 0; l < j->lanes; ++l) {
        const int64_t len = b->lane_len[j->lane0 + l];
        if (l >= j->m) {
            if (len) return -1;
            continue;
        }
        if (len < 4) return -1;
        const uint8_t *d = b->payload + b->lane_off[j->lane0 + l];
        x[l] = ((uint32_t)d[0] << 24) | ((uint32_t)d[1] << 16) | ((uint32_t)d[2] << 8) | d[3];
        p[l] = 4;
    }
    return 0;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define NXKV_HAVE_AVX512_RANS 1

/* The SIMD rounds' lanes (chunk c's lane l at c * SIMD_LANES + l): states, offsets in the
 * payload, the position each may read 4 bytes at before the rounds stop, table offsets, and
 * (after the rounds) positions. */
typedef struct {
    uint32_t x[SIMD_JOBS * SIMD_LANES];
    int32_t off[SIMD_JOBS * SIMD_LANES], limit[SIMD_JOBS * SIMD_LANES], tab[SIMD_JOBS * SIMD_LANES],
        fcb[SIMD_JOBS * SIMD_LANES], pos[SIMD_JOBS * SIMD_LANES];
} rounds_lanes;

/* The lanes of chunks j[0 .. SIMD_JOBS) before the rounds; returns the symbols of the shortest. */
static int64_t rounds_start(const batch_view *b, const chunk_job *j, rounds_lanes *L) {
    int64_t m = j[0].m;
    for (int q = 0; q < SIMD_JOBS * SIMD_LANES; ++q) {
        const chunk_job *c = j + q / SIMD_LANES;
        const int64_t lane = c->lane0 + q % SIMD_LANES;
        const uint8_t *d = b->payload + b->lane_off[lane];
        L->x[q] = ((uint32_t)d[0] << 24) | ((uint32_t)d[1] << 16) | ((uint32_t)d[2] << 8) | d[3];
        L->off[q] = (int32_t)b->lane_off[lane];
        /* go on while p <= limit: the lane has not run past its end, and 4 bytes lie in the payload */
        const int64_t room = b->payload_size - 4 - b->lane_off[lane];
        L->limit[q] = (int32_t)(b->lane_len[lane] < room ? b->lane_len[lane] : room);
        L->tab[q] = (int32_t)(c->stream * SYMBOL_STRIDE);
        L->fcb[q] = (int32_t)(c->stream * SMALL_ALPHABET);
        if (c->m < m) m = c->m;
    }
    return m;
}

/* After the rounds (symbols 0 .. i of every chunk, or all of one that ended before): the rest of
 * each chunk one lane at a time; a bit per chunk that is corrupt. */
static unsigned rounds_finish(const batch_view *b, const chunk_job *j, int64_t i, rounds_lanes *L) {
    unsigned bad = 0;
    for (int c = 0; c < SIMD_JOBS; ++c) {
        int64_t pc[SIMD_LANES];
        for (int l = 0; l < SIMD_LANES; ++l) pc[l] = L->pos[c * SIMD_LANES + l];
        if (chunk_compact(b, j + c, i < j[c].m ? i : j[c].m, L->x + c * SIMD_LANES, pc)) bad |= 1u << c;
    }
    return bad;
}

/* SIMD_JOBS chunks of SIMD_LANES lanes (compact tables, every lane with symbols and at least 4
 * bytes, lane offsets + lengths below 2^31) advanced together, the rest by chunk_compact.
 * Returns a bit per chunk that is corrupt.
 *
 * Each round reads 4 bytes at every lane's position and takes up to 2 of them. A valid lane
 * never takes a byte past its own end (the bytes after it, another lane's, are read and left);
 * a damaged one can: then, or near the end of the payload, the rounds stop and chunk_compact
 * goes on, which refuses a lane that runs out or does not end on its last byte. Stopping only
 * there (not 4 bytes before every lane's end) keeps ~25% more of the symbols in the rounds.
 * A lane whose chunk has no symbol left at a round sits it out (masked: its state, position and
 * output stay as they are), so the rounds go on past the shortest chunk while at least
 * MIN_ACTIVE of the eight have symbols; the chunks sorted longest first, the scalar tails were
 * 7% of a 4096-token file's symbols and a fifth of the rANS time (perf). */
#define MIN_ACTIVE 3
__attribute__((target("avx512f"))) static unsigned chunks_avx512(const batch_view *b, const chunk_job *j) {
    enum { V = SIMD_JOBS * SIMD_LANES / 16 }; /* registers of 16 lanes */
    rounds_lanes L;
    rounds_start(b, j, &L);
    uint32_t *xs = L.x;
    int32_t *off = L.off, *limit = L.limit, *tab = L.tab, *fcb = L.fcb, *pos = L.pos;
    /* lane l of chunk c has a symbol at round i while i < m_c - l; the rounds go on while
     * MIN_ACTIVE chunks have one (i below the MIN_ACTIVE-th largest m) */
    int32_t ends[SIMD_JOBS * SIMD_LANES];
    int64_t ms[SIMD_JOBS];
    for (int c = 0; c < SIMD_JOBS; ++c) {
        ms[c] = j[c].m;
        for (int l = 0; l < SIMD_LANES; ++l) ends[c * SIMD_LANES + l] = (int32_t)(j[c].m < INT32_MAX ? j[c].m - l : INT32_MAX);
    }
    for (int c = 1; c < SIMD_JOBS; ++c) { /* descending (an insertion sort of eight) */
        const int64_t v = ms[c];
        int k = c;
        for (; k > 0 && ms[k - 1] < v; --k) ms[k] = ms[k - 1];
        ms[k] = v;
    }
    const int64_t m_stop = ms[MIN_ACTIVE - 1] < INT32_MAX - SIMD_LANES ? ms[MIN_ACTIVE - 1] : INT32_MAX - SIMD_LANES;
    __m512i x[V], o[V], t[V], f[V], p[V], lim[V], e_lane[V];
    for (int v = 0; v < V; ++v) {
        x[v] = _mm512_loadu_si512(xs + 16 * v);
        o[v] = _mm512_loadu_si512(off + 16 * v);
        t[v] = _mm512_loadu_si512(tab + 16 * v);
        f[v] = _mm512_loadu_si512(fcb + 16 * v);
        lim[v] = _mm512_loadu_si512(limit + 16 * v);
        e_lane[v] = _mm512_loadu_si512(ends + 16 * v);
        p[v] = _mm512_set1_epi32(4);
    }
    const __m512i slot_mask = _mm512_set1_epi32(SLOTS - 1), lower = _mm512_set1_epi32((int)NXKV_RANS_L),
                  byte = _mm512_set1_epi32(0xff), low16 = _mm512_set1_epi32(0xffff), one = _mm512_set1_epi32(1);
    int64_t i = 0;
    for (; i < m_stop; i += SIMD_LANES) {
        const __m512i at = _mm512_set1_epi32((int32_t)i);
        __mmask16 act[V], near_end = 0;
        for (int v = 0; v < V; ++v) {
            act[v] = _mm512_cmpgt_epi32_mask(e_lane[v], at);
            near_end |= _mm512_mask_cmpgt_epi32_mask(act[v], p[v], lim[v]);
        }
        if (near_end) break;
        for (int v = 0; v < V; ++v) {
            const __mmask16 a = act[v];
            const __m512i slot = _mm512_and_si512(x[v], slot_mask);
            const __m512i s = _mm512_and_si512(_mm512_i32gather_epi32(_mm512_add_epi32(t[v], slot), b->symbols8, 1), byte);
            const __m512i e = _mm512_i32gather_epi32(_mm512_add_epi32(f[v], s), (const void *)b->fc, 4);
            __m512i y = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(e, 16), _mm512_srli_epi32(x[v], NXKV_RANS_PROB_BITS)),
                                         _mm512_sub_epi32(slot, _mm512_and_si512(e, low16)));
            /* renormalise: the lane's next two bytes, taken one at a time while below the bound
             * (a lane sitting out reads nothing: it may stand at the payload's end) */
            const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), a, _mm512_add_epi32(o[v], p[v]), b->payload, 1);
            const __mmask16 n1 = _mm512_mask_cmplt_epu32_mask(a, y, lower);
            y = _mm512_mask_or_epi32(y, n1, _mm512_slli_epi32(y, 8), _mm512_and_si512(w, byte));
            const __mmask16 n2 = _mm512_mask_cmplt_epu32_mask(a, y, lower);
            const __m512i next = _mm512_mask_srli_epi32(w, n1, w, 8);
            x[v] = _mm512_mask_mov_epi32(x[v], a, _mm512_mask_or_epi32(y, n2, _mm512_slli_epi32(y, 8), _mm512_and_si512(next, byte)));
            p[v] = _mm512_mask_add_epi32(p[v], n1, p[v], one);
            p[v] = _mm512_mask_add_epi32(p[v], n2, p[v], one);
            const chunk_job *c = j + 4 * v; /* 16 lanes: 4 chunks of 4 */
            for (int k = 0; k < 4; ++k) {
                const unsigned lanes = (unsigned)a >> (4 * k) & 0xfu; /* a prefix of the chunk's lanes */
                const __m128i q = k == 0 ? _mm512_extracti32x4_epi32(s, 0) : k == 1 ? _mm512_extracti32x4_epi32(s, 1)
                                  : k == 2 ? _mm512_extracti32x4_epi32(s, 2) : _mm512_extracti32x4_epi32(s, 3);
                if (lanes == 0xfu) {
                    _mm_storeu_si128((__m128i *)(c[k].out + i), q);
                } else if (lanes) { /* the chunk's last round: its first lanes only */
                    int32_t last[4];
                    _mm_storeu_si128((__m128i *)last, q);
                    for (int l = 0; lanes >> l & 1u; ++l) c[k].out[i + l] = last[l];
                }
            }
        }
    }
    for (int v = 0; v < V; ++v) {
        _mm512_storeu_si512(xs + 16 * v, x[v]);
        _mm512_storeu_si512(pos + 16 * v, p[v]);
    }
    return rounds_finish(b, j, i, &L);
}

/* chunks_avx512 for CPUs with AVX2 only (8 lanes a register, the masks as lanes of all ones):
 * the same rounds, the same stops, the same symbols. */
__attribute__((target("avx2"))) static unsigned chunks_avx2(const batch_view *b, const chunk_job *j) {
    enum { V = SIMD_JOBS * SIMD_LANES / 8 }; /* registers of 8 lanes */
    rounds_lanes L;
    const int64_t m = rounds_start(b, j, &L);
    uint32_t *xs = L.x;
    int32_t *off = L.off, *limit = L.limit, *tab = L.tab, *fcb = L.fcb, *pos = L.pos;
    __m256i x[V], p[V];
    for (int v = 0; v < V; ++v) {
        x[v] = _mm256_loadu_si256((const __m256i *)(xs + 8 * v));
        p[v] = _mm256_set1_epi32(4);
    }
    const __m256i slot_mask = _mm256_set1_epi32(SLOTS - 1), byte = _mm256_set1_epi32(0xff), low16 = _mm256_set1_epi32(0xffff),
                  zero = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + SIMD_LANES <= m; i += SIMD_LANES) {
        __m256i near_end = zero;
        for (int v = 0; v < V; ++v) near_end = _mm256_or_si256(near_end, _mm256_cmpgt_epi32(p[v], _mm256_loadu_si256((const __m256i *)(limit + 8 * v))));
        if (!_mm256_testz_si256(near_end, near_end)) break;
        for (int v = 0; v < V; ++v) {
            const __m256i slot = _mm256_and_si256(x[v], slot_mask);
            const __m256i t = _mm256_loadu_si256((const __m256i *)(tab + 8 * v)), f = _mm256_loadu_si256((const __m256i *)(fcb + 8 * v));
            const __m256i s = _mm256_and_si256(_mm256_i32gather_epi32((const int *)b->symbols8, _mm256_add_epi32(t, slot), 1), byte);
            const __m256i e = _mm256_i32gather_epi32((const int *)b->fc, _mm256_add_epi32(f, s), 4);
            __m256i y = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_srli_epi32(e, 16), _mm256_srli_epi32(x[v], NXKV_RANS_PROB_BITS)),
                                         _mm256_sub_epi32(slot, _mm256_and_si256(e, low16)));
            const __m256i o = _mm256_loadu_si256((const __m256i *)(off + 8 * v));
            const __m256i w = _mm256_i32gather_epi32((const int *)b->payload, _mm256_add_epi32(o, p[v]), 1);
            /* below the bound 2^23: nothing above bit 22 */
            const __m256i n1 = _mm256_cmpeq_epi32(_mm256_srli_epi32(y, 23), zero);
            y = _mm256_blendv_epi8(y, _mm256_or_si256(_mm256_slli_epi32(y, 8), _mm256_and_si256(w, byte)), n1);
            const __m256i n2 = _mm256_cmpeq_epi32(_mm256_srli_epi32(y, 23), zero);
            const __m256i next = _mm256_blendv_epi8(w, _mm256_srli_epi32(w, 8), n1);
            x[v] = _mm256_blendv_epi8(y, _mm256_or_si256(_mm256_slli_epi32(y, 8), _mm256_and_si256(next, byte)), n2);
            p[v] = _mm256_sub_epi32(_mm256_sub_epi32(p[v], n1), n2); /* the masks are -1 */
            const chunk_job *c = j + 2 * v; /* 8 lanes: 2 chunks of 4 */
            _mm_storeu_si128((__m128i *)(c[0].out + i), _mm256_castsi256_si128(s));
            _mm_storeu_si128((__m128i *)(c[1].out + i), _mm256_extracti128_si256(s, 1));
        }
    }
    for (int v = 0; v < V; ++v) {
        _mm256_storeu_si256((__m256i *)(xs + 8 * v), x[v]);
        _mm256_storeu_si256((__m256i *)(pos + 8 * v), p[v]);
    }
    return rounds_finish(b, j, i, &L);
}
#endif

static int by_symbols_descending(const void *a, const void *b) {
    const int64_t ma = ((const chunk_job *)a)->m, mb = ((const chunk_job *)b)->m;
    return (ma < mb) - (ma > mb);
}

int nxkv_rans_decode_streams(const uint8_t *payload, int64_t payload_size, const int64_t *task_lengths,
                             int64_t n_task_lengths, const int64_t *freqs, int64_t n_freqs,
                             const nxkv_rans_stream *streams, int64_t n_streams, int32_t *symbols, int64_t n_symbols,
                             int32_t *status) {
    /* every index inside the arrays before anything is read (an overflow-safe order) */
    int64_t n_lanes = 0, n_chunks = 0, max_lanes = 1;
    for (int64_t i = 0; i < n_streams; ++i) {
        const nxkv_rans_stream *s = streams + i;
        if (s->n_symbols < 0 || s->lanes < 1 || s->chunk < s->lanes || s->out0 < 0 || s->out0 > n_symbols ||
            s->n_symbols > n_symbols - s->out0 || s->freq0 < 0 || s->n_freqs < 1 || s->freq0 > n_freqs ||
            s->n_freqs > n_freqs - s->freq0 || s->task0 < 0 || s->payload_offset < 0 || s->payload_offset > payload_size) {
            return NXKV_ERR_ARG;
        }
        const int64_t chunks = s->n_symbols / s->chunk + (s->n_symbols % s->chunk != 0);
        if (s->task0 > n_task_lengths || chunks > (n_task_lengths - s->task0) / s->lanes) return NXKV_ERR_ARG;
        int64_t bytes = 0;
        for (int64_t k = 0; k < chunks * s->lanes; ++k) {
            const int64_t len = task_lengths[s->task0 + k];
            if (len < 0 || len > payload_size - s->payload_offset - bytes) return NXKV_ERR_ARG;
            bytes += len;
        }
        n_lanes += chunks * s->lanes;
        n_chunks += chunks;
        if (s->lanes > max_lanes) max_lanes = s->lanes;
    }
    /* the SIMD rounds: 2 AVX-512, 1 AVX2, 0 none */
    int simd = 0;
#ifdef NXKV_HAVE_AVX512_RANS
    if (payload_size < ((int64_t)1 << 31) && n_streams < ((int64_t)1 << 31) / SYMBOL_STRIDE) {
        if (nxkv_cpu_extensions_on() >= 2 && __builtin_cpu_supports("avx512f")) simd = 2;
        else if (nxkv_cpu_extensions_on() >= 1 && __builtin_cpu_supports("avx2")) simd = 1;
    }
#endif
    int64_t *lane_off = malloc(sizeof(int64_t) * (size_t)(n_lanes ? n_lanes : 1));
    chunk_job *jobs = malloc(sizeof(chunk_job) * (size_t)(n_chunks ? n_chunks : 1));
    uint8_t *symbols8 = malloc((size_t)SYMBOL_STRIDE * (size_t)(n_streams ? n_streams : 1));
    uint32_t *fc = malloc(sizeof(uint32_t) * SMALL_ALPHABET * (size_t)(n_streams ? n_streams : 1));
    uint32_t *slots = malloc(sizeof(uint32_t) * SLOTS), *lookup = malloc(sizeof(uint32_t) * SLOTS);
    uint32_t *f32 = NULL, *cum = NULL;
    /* one chunk's lanes: states, positions, bytes */
    uint32_t *x = malloc(sizeof(uint32_t) * (size_t)max_lanes);
    size_t *px = malloc(sizeof(size_t) * (size_t)max_lanes), *lens = malloc(sizeof(size_t) * (size_t)max_lanes);
    int64_t *p = malloc(sizeof(int64_t) * (size_t)max_lanes);
    const uint8_t **ptrs = malloc(sizeof(*ptrs) * (size_t)max_lanes);
    int r = (lane_off && jobs && symbols8 && fc && slots && lookup && x && px && lens && p && ptrs) ? NXKV_OK : NXKV_ERR_NOMEM;
    const batch_view b = {payload, payload_size, lane_off, NULL, symbols8, fc};
    int64_t lane = 0, n_jobs = 0;
    for (int64_t i = 0; i < n_streams && r == NXKV_OK; ++i) {
        const nxkv_rans_stream *s = streams + i;
        status[i] = 0;
        const int64_t chunks = s->n_symbols / s->chunk + (s->n_symbols % s->chunk != 0);
        const int64_t *len = task_lengths + s->task0, *fr = freqs + s->freq0;
        const int compact = s->n_freqs <= SMALL_ALPHABET;
        if (compact && compact_table(fr, s->n_freqs, symbols8 + i * SYMBOL_STRIDE, fc + i * SMALL_ALPHABET)) {
            status[i] = NXKV_ERR_CORRUPT;
            continue;
        }
        if (!compact) { /* a wide alphabet: core/rans.h's tables, this stream now */
            free(f32);
            free(cum);
            f32 = malloc(sizeof(uint32_t) * (size_t)s->n_freqs);
            cum = malloc(sizeof(uint32_t) * (size_t)s->n_freqs);
            if (!f32 || !cum) {
                r = NXKV_ERR_NOMEM;
                break;
            }
            int64_t total = 0;
            for (int64_t k = 0; k < s->n_freqs && total <= SLOTS; ++k) {
                if (fr[k] < 0 || fr[k] > SLOTS - total) {
                    total = -1;
                    break;
                }
                f32[k] = (uint32_t)fr[k];
                cum[k] = (uint32_t)total;
                for (int64_t q = 0; q < fr[k]; ++q) lookup[total + q] = (uint32_t)k;
                total += fr[k];
            }
            if (total != SLOTS) {
                status[i] = NXKV_ERR_CORRUPT;
                continue;
            }
            nxkv_core_rans_slots(f32, cum, lookup, slots);
        }
        int64_t at = s->payload_offset, task = 0;
        if (compact && symbols8[i * SYMBOL_STRIDE] == symbols8[i * SYMBOL_STRIDE + SLOTS - 1]) {
            /* one symbol holds every slot (a pruned component's class: 14% of a 4096-token high
             * file's symbols): a decoder step leaves the state as it is, so a lane's state is
             * renormalised once, after its first symbol, and then must be the end state with
             * every byte read: the decoder's checks, without stepping through the symbols */
            const int32_t only = symbols8[i * SYMBOL_STRIDE];
            for (int64_t c = 0; c < chunks && !status[i]; ++c) {
                const int64_t m = s->n_symbols - c * s->chunk < s->chunk ? s->n_symbols - c * s->chunk : s->chunk;
                for (int64_t l = 0; l < s->lanes; ++l, at += len[task++]) {
                    const uint8_t *d = payload + at;
                    int ok = l < m ? len[task] >= 4 : len[task] == 0;
                    if (ok && l < m) {
                        uint32_t xl = ((uint32_t)d[0] << 24) | ((uint32_t)d[1] << 16) | ((uint32_t)d[2] << 8) | d[3];
                        int64_t pl = 4;
                        while (ok && xl < NXKV_RANS_L) {
                            ok = pl < len[task];
                            if (ok) xl = (xl << 8) | d[pl++];
                        }
                        ok = ok && xl == NXKV_RANS_L && pl == len[task];
                    }
                    if (!ok) status[i] = NXKV_ERR_CORRUPT;
                }
                int32_t *out = symbols + s->out0 + c * s->chunk;
                for (int64_t k = 0; k < m && !status[i]; ++k) out[k] = only;
            }
            continue;
        }
        for (int64_t c = 0; c < chunks && !status[i]; ++c) {
            const int64_t m = s->n_symbols - c * s->chunk < s->chunk ? s->n_symbols - c * s->chunk : s->chunk;
            if (!compact) { /* decoded here, lanes in lockstep */
                for (int64_t l = 0; l < s->lanes; ++l) {
                    ptrs[l] = payload + at;
                    lens[l] = (size_t)len[task];
                    if (l >= m && len[task]) status[i] = NXKV_ERR_CORRUPT;
                    at += len[task++];
                }
                if (!status[i] && nxkv_core_rans_decode_interleaved(ptrs, lens, (size_t)s->lanes, slots, lookup,
                                                                    symbols + s->out0 + c * s->chunk, (size_t)m, x, px)) {
                    status[i] = NXKV_ERR_CORRUPT;
                }
                continue;
            }
            chunk_job *j = jobs + n_jobs++;
            j->stream = i;
            j->lane0 = lane;
            j->lanes = s->lanes;
            j->m = m;
            j->out = symbols + s->out0 + c * s->chunk;
            for (int64_t l = 0; l < s->lanes; ++l) {
                lane_off[lane++] = at;
                at += len[task++];
            }
        }
    }
    /* lane lengths in the order the jobs' lanes were listed */
    int64_t *lane_len = malloc(sizeof(int64_t) * (size_t)(n_lanes ? n_lanes : 1));
    if (r == NXKV_OK && !lane_len) r = NXKV_ERR_NOMEM;
    if (r == NXKV_OK) {
        for (int64_t q = 0; q < n_jobs; ++q) {
            const nxkv_rans_stream *s = streams + jobs[q].stream;
            const int64_t c = (jobs[q].out - symbols - s->out0) / s->chunk;
            for (int64_t l = 0; l < jobs[q].lanes; ++l) lane_len[jobs[q].lane0 + l] = task_lengths[s->task0 + c * s->lanes + l];
        }
        batch_view v = b;
        v.lane_len = lane_len;
        /* the SIMD path's chunks first, longest first so that a round's chunks end together */
        int64_t n_simd = 0;
        for (int64_t q = 0; q < n_jobs && simd; ++q) {
            const chunk_job *j = jobs + q;
            int ok = j->lanes == SIMD_LANES && j->m >= SIMD_LANES && !status[j->stream];
            for (int64_t l = 0; l < j->lanes && ok; ++l) {
                ok = lane_len[j->lane0 + l] >= 4 && lane_off[j->lane0 + l] + lane_len[j->lane0 + l] < ((int64_t)1 << 31);
            }
            if (ok) {
                const chunk_job t = jobs[n_simd];
                jobs[n_simd++] = *j;
                jobs[q] = t;
            }
        }
        /* sorted before the rounds take whole groups of SIMD_JOBS: the few left over (decoded
         * one lane at a time) are the shortest (~10% of a section's symbols went scalar when
         * the left-over were any) */
        qsort(jobs, (size_t)n_simd, sizeof(chunk_job), by_symbols_descending);
        n_simd -= n_simd % SIMD_JOBS;
        int64_t q = 0;
#ifdef NXKV_HAVE_AVX512_RANS
        for (; q < n_simd; q += SIMD_JOBS) {
            const unsigned bad = simd == 2 ? chunks_avx512(&v, jobs + q) : chunks_avx2(&v, jobs + q);
            for (int c = 0; c < SIMD_JOBS; ++c) {
                if (bad >> c & 1) status[jobs[q + c].stream] = NXKV_ERR_CORRUPT;
            }
        }
#endif
        for (; q < n_jobs; ++q) {
            const chunk_job *j = jobs + q;
            if (status[j->stream]) continue;
            if (chunk_start(&v, j, x, p) || chunk_compact(&v, j, 0, x, p)) status[j->stream] = NXKV_ERR_CORRUPT;
        }
    }
    free(lane_len);
    free(lane_off);
    free(jobs);
    free(symbols8);
    free(fc);
    free(slots);
    free(lookup);
    free(f32);
    free(cum);
    free(x);
    free(px);
    free(lens);
    free(p);
    free(ptrs);
    return r;
}
