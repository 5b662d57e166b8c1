/* nxkv.h: the one C ABI of nexus-gguf's native library.
 *
 * Python reads the declarations between the NXKV_CDEF markers with cffi (ABI mode), so this
 * region must stay plain C declarations: no macros, no attributes, no #if.
 */
#ifndef NXKV_H
#define NXKV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* NXKV_CDEF_BEGIN */
/* The ABI version: bumped whenever a declaration below changes. Python reads this enum from
 * the header the library was built with and refuses a library that reports another one. */
enum nxkv_abi { NXKV_ABI_VERSION = 21 };
int nxkv_abi_version(void);

/* Constants of the file format that the kernels share with nexus_gguf (tests compare them with
 * backends/reference.py and stages/): rANS probabilities in 2^14, states renormalised bytewise
 * above 2^23, E8 groups of 8 values, lattice log-scales in 1/8 octaves. */
enum nxkv_format {
    NXKV_FORMAT_RANS_PROB_BITS = 14,
    NXKV_FORMAT_RANS_LOWER_BOUND_BITS = 23,
    NXKV_FORMAT_E8_GROUP = 8,
    NXKV_FORMAT_LATTICE_LOG_STEPS = 8,
    NXKV_FORMAT_METHOD_RANS = 1,       /* entropy stream methods: one rANS stream, */
    NXKV_FORMAT_METHOD_RANS_LANES = 3, /* interleaved lanes in chunks */
    NXKV_FORMAT_MAX_ALPHABET = 4096,   /* rANS symbols a table */
    NXKV_FORMAT_MAX_LANES = 4096
};

/* Limits of the decoder's arguments (not of the format): column tables of one section (a
 * table per step bucket; the format has at most 33 buckets). */
enum nxkv_limits { NXKV_MAX_TABLES = 64 };

/* Status codes of the kernels that can fail (a damaged stream, an argument out of range). */
enum nxkv_status { NXKV_OK = 0, NXKV_ERR_CORRUPT = -1, NXKV_ERR_ARG = -2, NXKV_ERR_NOMEM = -3 };

/* Byte planes: element i's byte b goes to dst[b * n_elements + i]. Lossless and exact inverse
 * of nxkv_byteplane_merge. src and dst must not overlap; both hold n_elements * element_size. */
void nxkv_byteplane_split(const uint8_t *src, uint8_t *dst, size_t n_elements, size_t element_size);
void nxkv_byteplane_merge(const uint8_t *src, uint8_t *dst, size_t n_elements, size_t element_size);

/* E8 nearest points of n_rows rows of 8 doubles (core/e8.h); x and out may be the same. */
void nxkv_e8_nearest(const double *x, double *out, size_t n_rows);

/* Which of the CPU's extensions the kernels may take where present: 0 none (the portable code),
 * 1 AVX2 and F16C, 2 (the default) AVX-512 too; returns the previous setting. The results are
 * the same at every level (tests compare them). */
int nxkv_use_cpu_extensions(int on);

/* float -> IEEE half bits, round to nearest even (core/f16.h), as numpy's astype(float16).
 * use_hardware = 1 takes the CPU's conversion instruction where there is one (same results);
 * 0 the portable code (tests compare both). */
void nxkv_f32_to_f16(const float *src, uint16_t *dst, size_t n, int use_hardware);

/* double -> IEEE half bits straight from the double (core/f16.h), as numpy's astype(float16)
 * of float64 (the channel means the GPU encoder computes in double). */
void nxkv_f64_to_f16(const double *src, uint16_t *dst, size_t n);

/* Orthonormal Hadamard rotation (core/hadamard.h) of each run of `block` (a power of two)
 * floats of x[0 .. n_values), into out (may be x). NXKV_ERR_ARG if block is not a power of two
 * or does not divide n_values. */
int nxkv_hadamard_blocks(const float *x, float *out, size_t n_values, size_t block);

/* E8 points stored on a head's principal axes back in its coordinates (core/transform.h):
 * n_vectors head vectors of d values (d/8 points each: coset, 7 coordinates, the last halved),
 * head k = vector index % n_heads, step[v] per vector, basis int16 [n_heads][d][d] (rows the
 * components, entries in units of 2^-shift), times channel_scale[k d .. k d + d) and plus
 * mean[k d .. k d + d) (either NULL: none), into out. NXKV_ERR_ARG if d is not a multiple of 8 up
 * to 512, shift outside 0 .. 14 or a basis entry beyond 2^shift in magnitude. */
int nxkv_basis_dequantize(const uint8_t *coset, const int32_t *coord, const int32_t *coord_last, const double *step,
                          const int16_t *basis, size_t n_vectors, size_t n_heads, size_t d, int shift, const double *mean,
                          const double *channel_scale, float *out);

/* The stored E8 points (core/lattice.h) of n_groups groups of 8 doubles x at steps step[i]:
 * coset[i], coord[7 i .. 7 i + 7), coord_last[i]. Values whose point does not fit int32 make
 * NXKV_ERR_ARG (the caller's steps were wrong). */
int nxkv_lattice_quantize(const double *x, const double *step, size_t n_groups, uint8_t *coset, int32_t *coord,
                          int32_t *coord_last);

/* nxkv_lattice_quantize choosing each group's point by rate and distortion (core/lattice.h
 * nxkv_core_lattice_point_rdo; backends/reference.py lattice_quantize_rdo): group i reads the
 * cost rows rows[i] .. rows[i] + 7 of costs [n_rows, width] (width odd), candidates the nearest
 * points of scales[c] * x / step. NXKV_ERR_ARG for points beyond int32, rows outside the table,
 * an even width or 0 or more than 64 scales. */
int nxkv_lattice_quantize_rdo(const double *x, const double *step, size_t n_groups, const int64_t *rows,
                              const double *costs, size_t n_rows, size_t width, const double *scales, size_t n_scales,
                              double lam, uint8_t *coset, int32_t *coord, int32_t *coord_last);

/* ggml q8_0 rows (core/ggml_rows.h): n_blocks blocks of 32 floats into 34 bytes each. */
void nxkv_quantize_q8_0(const float *x, uint8_t *out, size_t n_blocks);

/* E8 lattice points back to float values (core/lattice.h), n_groups groups of 8: coset[i] 0 or 1,
 * coord[7 i .. 7 i + 7), coord_last[i], step[i]; mean (mean_groups * 8 doubles, group i uses
 * block i % mean_groups) is added when mean_groups > 0. out holds 8 * n_groups floats. */
void nxkv_lattice_dequantize(const uint8_t *coset, const int32_t *coord, const int32_t *coord_last, const double *step,
                             size_t n_groups, const double *mean, size_t mean_groups, float *out);

/* RoPE rotation (core/rope.h) of n_rows x n_heads head vectors of head_dim floats: the first
 * n_rot values of each, in pairs (2i, 2i + 1) (neox = 0) or (i, i + n_rot / 2) (neox = 1), by
 * the angle whose cos and sin are cos / sin[row * n_rot / 2 + i]; the rest copied. x and out
 * must not overlap. */
void nxkv_rope_rotate(const float *x, float *out, size_t n_rows, size_t n_heads, size_t head_dim, const double *cos,
                      const double *sin, size_t n_rot, int neox);

/* rANS of one stream (core/rans.h) with n_freqs frequencies summing to 2^14. Encoding writes
 * backwards into out[0 .. capacity): it returns the byte count k (the stream is
 * out[capacity - k .. capacity)) or NXKV_ERR_ARG if capacity is too small. */
int64_t nxkv_rans_encode(const int64_t *symbols, size_t n, size_t stride, const int64_t *freqs, size_t n_freqs,
                         uint8_t *out, size_t capacity);
int nxkv_rans_decode(const uint8_t *data, size_t n_data, const int64_t *freqs, size_t n_freqs, int32_t *out, size_t n);

/* Interleaved rANS (FORMAT.md, entropy method 3) of n symbols in chunks of `chunk`, `lanes`
 * lanes each: every (chunk, lane) stream written to out back to back in (chunk, lane) order, its
 * byte length to lengths[] (ceil(n / chunk) * lanes of them). Returns the bytes written, or
 * NXKV_ERR_ARG (a symbol outside the table, frequencies not summing to 2^14, capacity too
 * small). */
int64_t nxkv_rans_encode_lanes(const int64_t *symbols, size_t n, const int64_t *freqs, size_t n_freqs, size_t lanes,
                               size_t chunk, uint8_t *out, size_t capacity, int64_t *lengths);

/* Interleaved rANS (FORMAT.md, entropy method 3): decode chunks chunk0 .. chunk1 of a stream of
 * n symbols in chunks of `chunk`, `lanes` lanes each, whose (chunk, lane) streams have the byte
 * lengths lengths[0 .. n_tasks), into out (n symbols); a chunk's lanes are decoded in lockstep.
 * Disjoint chunk ranges may run on threads. */
int nxkv_rans_decode_lanes(const uint8_t *data, size_t n_data, const int64_t *lengths, size_t n_tasks,
                           const int64_t *freqs, size_t n_freqs, int32_t *out, size_t n, size_t lanes, size_t chunk,
                           size_t chunk0, size_t chunk1);

/* Interleaved-rANS streams of one batch (a layer's point streams, section_decode.py) decoded in
 * one call: stream i's (chunk, lane) byte lengths are task_lengths[task0 ..], its bytes back to
 * back from payload[payload_offset], its frequencies freqs[freq0 .. freq0 + n_freqs) (summing to
 * 2^14), its n_symbols symbols (indices into the frequencies) go to symbols[out0 ..). The same
 * symbols as nxkv_rans_decode_lanes on each; status[i] is 0 or NXKV_ERR_CORRUPT (a damaged stream:
 * a lane ends early or does not end in the start state, a table that does not sum to 2^14).
 * NXKV_ERR_ARG, with nothing decoded, if an index or length falls outside the arrays. */
typedef struct nxkv_rans_stream {
    int64_t payload_offset, task0, n_symbols, lanes, chunk, freq0, n_freqs, out0;
} nxkv_rans_stream;

int nxkv_rans_decode_streams(const uint8_t *payload, int64_t payload_size, const int64_t *task_lengths,
                             int64_t n_task_lengths, const int64_t *freqs, int64_t n_freqs,
                             const nxkv_rans_stream *streams, int64_t n_streams, int32_t *symbols, int64_t n_symbols,
                             int32_t *status);

/* A section's stream container (FORMAT.md, stages/entropy.py) parsed in one call: stream k's
 * record into streams[k] (offsets into data), and where it is a rANS stream whose table passes
 * the format's checks (rans_ok 1), its frequencies values[freq0 .. + n_freqs) and its (chunk,
 * lane) byte lengths values[length0 .. + n_lengths), its lanes' bytes at body_offset. Records
 * with any dtype code are returned (the caller checks them). NXKV_ERR_CORRUPT where the records
 * run past the data, leave bytes after them or claim more than max_items values; NXKV_ERR_ARG if
 * max_streams (255 always suffices) or capacity (size values always suffice) is too small. */
typedef struct nxkv_stream_info {
    int64_t name_offset, name_size, dtype, ndim, shape[4], n, method, payload_offset, payload_size;
    int64_t rans_ok, lo, freq0, n_freqs, lanes, chunk, length0, n_lengths, body_offset, body_size;
} nxkv_stream_info;

int nxkv_parse_streams(const uint8_t *data, int64_t size, int64_t max_items, nxkv_stream_info *streams,
                       int64_t max_streams, int64_t *n_streams, int64_t *values, int64_t capacity, int64_t *n_values);

/* A lattice section's point streams among its stream records (n_records of nxkv_parse_streams),
 * and how a cell's point row [coset g | coord 7 g | last g] reads them (native/cpu/nxkv_points.c;
 * section_decode.py's numpy path is the reference). roles[3 r ..]: record r's point type (0
 * coset, 1 coord, 2 coord_last, else none), step bucket (-1: none) and component class (-1:
 * none), as its name says. classes: [8 g] component classes (NULL: streams not split by class);
 * buckets: [n_cells] each cell's step bucket, 0 .. 255 (NULL: none). Out: the tables (one, or one
 * per bucket present, ascending): bucket_ids[t] (-1: none) and tables_m[t] (their cells), at
 * most NXKV_MAX_TABLES; key_rows[k]: the record of each point stream, tables in order, in each
 * the types, in each their classes ascending; per column (9 g) its stream's place among a
 * table's (slot), its place among that stream's columns (rank) and the stream's columns
 * (width); cell_map[2 c ..] (table, row there) where buckets. NXKV_ERR_CORRUPT if a point stream
 * is missing or not of its shape, NXKV_ERR_ARG for arguments out of range (the numpy path then
 * says what is wrong). */
int nxkv_point_layout(const nxkv_stream_info *records, int64_t n_records, const int32_t *roles, int64_t n_cells, int64_t g,
                      const uint8_t *classes, const int64_t *buckets, int64_t *key_rows, int64_t max_keys, int64_t *n_keys,
                      int64_t *bucket_ids, int64_t *tables_m, int64_t *n_tables, int64_t *slot, int64_t *rank, int64_t *width,
                      int64_t *cell_map);

/* A lattice-coded K or V section's values made from its decoded point streams (core/section.h),
 * for the CPU here and the GPU (nxkv_cuda.h): the E8 points at their steps (through the
 * head's principal axes where `basis`) plus the channel means, sink rows, the inverse Hadamard
 * rotation, RoPE, written as f16 or f32 rows in the
 * cache's layout to dest. Offsets index the arrays of an nxkv_values. */
typedef struct nxkv_section {
    int64_t n_cells, n_heads, head_dim;
    int64_t coset0, coord0, last0; /* symbol indices of the point streams [n, g], [n, g, 7], [n, g] */
    int64_t coset_lo, coord_lo, last_lo; /* added to each symbol index (a stream's smallest value) */
    int64_t step0;          /* steps[step0 + (per-cell ? cell * n_heads + head : head) * blocks + block] */
    int64_t step_per_cell;
    int64_t scale_block;    /* values per step within a head vector */
    int64_t mean0;          /* -1, or the channel means: means[mean0 .. + n_heads * head_dim) */
    int64_t sink_map0;      /* -1, or sink_map[sink_map0 + cell]: the cell's sink row, -1 if none */
    int64_t sink0;          /* the sink rows, f16 [n_sink, n_heads * head_dim], at sinks[sink0] */
    int64_t hadamard;       /* 1: the orthonormal Hadamard in power-of-two blocks, largest first */
    int64_t rope;           /* 0: none; 1: pairs (2i, 2i + 1); 2: NEOX pairs (i, i + n_rot / 2) */
    int64_t n_rot;
    int64_t trig0;          /* cos / sin [n_cells, n_rot / 2] at cos[trig0], sin[trig0] */
    int64_t out_f16;        /* 1: f16 rows, 0: f32 */
    int64_t transposed;     /* 1: V as [n_heads * head_dim, n_cells] (flash attention off) */
    int64_t basis;          /* 1: the points lie on each head's principal axes (core/transform.h):
                               bases[basis0 + head * head_dim^2 ..], entries within 2^basis_shift,
                               one step per head vector (scale_block = head_dim), means added after
                               (head_group > 1: see below) */
    int64_t basis0, basis_shift;
    int64_t cscale0;        /* with basis: -1, or each channel's scale (the K weighting), multiplied
                               before the mean is added: means[cscale0 + head * head_dim ..] */
    int64_t by_class;       /* 1: point symbols read through a column table (streams split by
                               component class or step bucket): column c of the row [coset g |
                               coord 7 g | last g] is at columns[cols0 + 3 c ..] = (symbol index at
                               row 0, per-row stride, lo); 0: coset0 .. last_lo above */
    int64_t cols0;
    int64_t cell_map0;      /* -1: a cell's row is its index, one table; else (by_class, step
                               buckets) columns[cell_map0 + 2 cell] = the cell's table t (its
                               bucket's: 27 g entries at cols0 + 27 g t), [+ 1] its row there */
    int64_t n_tables;       /* with a cell map: its tables, 1 .. NXKV_MAX_TABLES */
    int64_t head_group;     /* this many adjacent heads coded as one vector, concatenated (head_dim *
                               head_group values, one step; steps, bases and channel offsets by
                               vector: read "vector" for "head" above); 1: each head alone */
    void *dest;             /* the rows: n_cells * n_heads * head_dim values */
} nxkv_section;

typedef struct nxkv_values {
    const int32_t *symbols;
    int64_t n_symbols;
    const double *steps;
    int64_t n_steps;
    const double *means;
    int64_t n_means;
    const int32_t *sink_map;
    int64_t n_sink_map;
    const uint16_t *sinks;
    int64_t n_sinks;
    const double *cos;
    const double *sin;
    int64_t n_trig;
    const float *bases; /* the bases' int16 entries as floats (exact) */
    int64_t n_bases;
    const int64_t *columns;
    int64_t n_columns;
} nxkv_values;

/* The sections' rows, on this thread: status[i] 0, 1 a coset symbol not 0 or 1, 2 values not
 * finite (the rows of such a section are partly written: the caller discards them). NXKV_ERR_ARG,
 * with nothing written, if a section does not fit the arrays. */
int nxkv_decode_values(const nxkv_section *sections, int64_t n_sections, const nxkv_values *arrays, int32_t *status);

/* Query capture through llama.cpp's eval callback (ggml_backend_sched_eval_callback): keeps the
 * f32 data of graph nodes named "Qcur-<layer>" that the ROPE op produced, while `enabled`.
 * Only ggml's exported accessors are used, passed in by the caller from the ggml library
 * llama.cpp loaded, so no ggml struct layout is compiled in. Other nodes cost one string
 * compare. Layer l's values go to out[l * per_layer + filled[l] ...]; nodes that do not fit,
 * are not contiguous or not f32 count in `errors`. */
typedef struct nxkv_capture {
    const char *(*get_name)(const void *tensor);
    const char *(*op_desc)(const void *tensor);
    int64_t (*nelements)(const void *tensor);
    size_t (*nbytes)(const void *tensor);
    bool (*is_contiguous)(const void *tensor);
    void (*tensor_get)(const void *tensor, void *data, size_t offset, size_t size);
    int32_t enabled;
    int32_t n_layer;
    int64_t per_layer;
    float *out;
    int64_t *filled;
    int32_t errors;
} nxkv_capture;

/* The callback itself; user_data is an nxkv_capture *. */
bool nxkv_capture_eval(void *tensor, bool ask, void *user_data);
/* NXKV_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* NXKV_H */
