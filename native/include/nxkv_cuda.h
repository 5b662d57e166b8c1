/* nxkv_cuda.h: the C ABI of nexus-gguf's CUDA library (libnxkv_cuda), built by CMake wherever
 * nvcc is found (native/cuda/nxkv_cuda.cu) over the same native/core/*.h math as the CPU library.
 * Every function takes and returns host memory: the library uploads, runs and downloads itself,
 * so Python needs no CUDA package. Functions return 0 (NXKV_CUDA_OK) or a negative status; those
 * that can fail for a CUDA reason write its text into err (err_size bytes, may be NULL).
 *
 * Python reads the declarations between the NXKV_CUDA_CDEF markers with cffi (ABI mode), after
 * nxkv.h's (nxkv_section is declared there): plain C declarations only.
 */
#ifndef NXKV_CUDA_H
#define NXKV_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "nxkv.h" /* nxkv_section */

#ifdef __cplusplus
extern "C" {
#endif

/* NXKV_CUDA_CDEF_BEGIN */
enum nxkv_cuda_abi { NXKV_CUDA_ABI_VERSION = 4 };
int nxkv_cuda_abi_version(void);

enum nxkv_cuda_status {
    NXKV_CUDA_OK = 0,
    NXKV_CUDA_ERR_CORRUPT = -1, /* a damaged stream or symbol: the data, not the device */
    NXKV_CUDA_ERR_ARG = -2,     /* arguments out of range */
    NXKV_CUDA_ERR_DEVICE = -3   /* no usable device, or a CUDA call failed (err says which) */
};

/* The current device: 0 with its name and compute capability, or NXKV_CUDA_ERR_DEVICE and why
 * (no driver, no GPU) in name. */
int nxkv_cuda_device(char *name, size_t name_size, int *major, int *minor);

/* Per-op kernels over host arrays, the same contracts as the CPU library's functions of the
 * same names (nxkv.h): the parity tests compare them bit for bit. */
int nxkv_cuda_lattice_dequantize(const uint8_t *coset, const int32_t *coord, const int32_t *coord_last,
                                 const double *step, size_t n_groups, const double *mean, size_t mean_groups, float *out,
                                 char *err, size_t err_size);
int nxkv_cuda_lattice_quantize(const double *x, const double *step, size_t n_groups, uint8_t *coset, int32_t *coord,
                               int32_t *coord_last, char *err, size_t err_size);
int nxkv_cuda_hadamard_blocks(const float *x, float *out, size_t n_values, size_t block, char *err, size_t err_size);
int nxkv_cuda_rope_rotate(const float *x, float *out, size_t n_rows, size_t n_heads, size_t head_dim, const double *cos,
                          const double *sin, size_t n_rot, int neox, char *err, size_t err_size);
int nxkv_cuda_f32_to_f16(const float *src, uint16_t *dst, size_t n, char *err, size_t err_size);
/* Milliseconds the last per-op call's kernel took on this thread, transfers aside (CUDA events):
 * the benchmark's measure of the encode kernels. */
double nxkv_cuda_last_kernel_ms(void);
/* Interleaved rANS of one stream, one GPU thread per (chunk, lane): lengths[k] bytes per task. */
int nxkv_cuda_rans_decode_lanes(const uint8_t *data, size_t n_data, const int64_t *lengths, size_t n_tasks,
                                const int64_t *freqs, size_t n_freqs, int32_t *out, size_t n, size_t lanes, size_t chunk,
                                char *err, size_t err_size);
/* Encoding, one GPU thread per (chunk, lane) task: each task's stream is written backwards into
 * its own slot of `slot_bytes` bytes of out (n_tasks * slot_bytes); lengths[k] receives its
 * byte count (the stream is the last lengths[k] bytes of slot k). NXKV_CUDA_ERR_ARG if a slot
 * was too small or a symbol has no frequency. */
int nxkv_cuda_rans_encode_lanes(const int64_t *symbols, size_t n, const int64_t *freqs, size_t n_freqs, size_t lanes,
                                size_t chunk, uint8_t *out, size_t slot_bytes, int64_t *lengths, size_t n_tasks,
                                char *err, size_t err_size);

/* Batched decode of lattice-coded K/V sections (stages rope? hadamard? lattice entropy, the
 * presets' value path): every rANS stream of every section decoded at once, then one thread per
 * (section, vector, cell) makes the vector's values (lattice points, sinks, inverse Hadamard,
 * RoPE) and writes them as f16 or f32 in the cache's layout straight to the section's host rows;
 * sections on a PCA basis go a tile of cells per thread block (the points, their exact products
 * with the basis, then the same finish). */
typedef struct nxkv_cuda_rans_stream {
    int64_t payload_offset; /* its (chunk, lane) streams start here in payload, back to back */
    int64_t task0;          /* its first entry in task_lengths */
    int64_t n_symbols;
    int64_t lanes;
    int64_t chunk;          /* symbols per chunk (n_symbols or more: one chunk) */
    int64_t freq0;          /* its frequencies: freqs[freq0 .. freq0 + n_freqs), summing to 2^14 */
    int64_t n_freqs;
    int64_t out0;           /* its first symbol index goes to symbols[out0] */
} nxkv_cuda_rans_stream;


typedef struct nxkv_cuda_batch {
    const uint8_t *payload;
    int64_t payload_size;
    const int64_t *task_lengths;
    int64_t n_task_lengths;
    const int64_t *freqs;
    int64_t n_freqs;
    const nxkv_cuda_rans_stream *streams;
    int64_t n_streams;
    int64_t n_symbols;          /* size of the int32 symbol buffer */
    const int32_t *host_symbols; /* symbols the host decoded (other coders), copied to ... */
    int64_t n_host_symbols;
    int64_t host_symbols0;      /* ... symbols[host_symbols0 ..) */
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
    const float *bases;         /* nxkv_values' bases and class columns (nxkv.h) */
    int64_t n_bases;
    const int64_t *columns;
    int64_t n_columns;
    const nxkv_section *sections; /* nxkv.h; their dest: host rows */
    int64_t n_sections;
    int32_t *stream_status;     /* out, n_streams: 0, or NXKV_CUDA_ERR_CORRUPT */
    int32_t *section_status;    /* out, n_sections: 0, 1 a coset symbol not 0 or 1, 2 values not finite */
    double ms[5];               /* out: milliseconds of upload, tables, rANS, values, download */
} nxkv_cuda_batch;

int nxkv_cuda_decode_sections(nxkv_cuda_batch *batch, char *err, size_t err_size);

/* Batched encode of K/V sections on the lattice path (cuda_encode.py drives it), in steps that
 * leave the frequency tables and the file's layout to the host:
 *   begin      uploads every section's rows and, a thread per (section, head, cell), removes RoPE
 *              and applies the Hadamard rotation; returns the sink rows (f16), the channel means
 *              over the other cells (f16, as numpy's mean: cells summed in order) and each head's
 *              sum of squares after centring (a fixed-order tree: the host takes its scale)
 *   quantize   the E8 points at the host's steps (one per head) into the point streams; each
 *              stream's smallest and largest value
 *   histogram  counts of value - smallest, for the streams the host codes with rANS
 *   rans       interleaved rANS of those streams with the host's frequencies; lane lengths and
 *              the lanes' bytes back to back, as the file stores them
 *   symbols    a stream's values (for the host's own coder)
 * Everything on the device is freed by nxkv_cuda_encode_free. */
typedef struct nxkv_cuda_encode_section {
    int64_t n_cells, n_heads, head_dim;
    const void *rows;       /* host: f16 or f32 values, [n_cells, n_heads * head_dim] or transposed */
    int64_t rows_f16;
    int64_t transposed;
    int64_t rope;           /* 0: none; 1: pairs (2i, 2i + 1); 2: NEOX pairs (i, i + n_rot / 2) */
    int64_t n_rot;
    int64_t trig0;          /* cos / sin of the removing angles [n_cells, n_rot / 2] at trig[trig0] */
    int64_t hadamard;
    int64_t sink_map0;      /* -1, or sink_map[sink_map0 + cell]: the cell's sink row, -1 if none */
    int64_t center;
    uint16_t *sinks_out;    /* host, [n_sink, n_heads * head_dim] f16 (when sink_map0 >= 0) */
    uint16_t *mean_out;     /* host, [n_heads * head_dim] f16 (when center) */
    double *sumsq_out;      /* host, [n_heads] */
} nxkv_cuda_encode_section;

typedef struct nxkv_cuda_encoder nxkv_cuda_encoder;

int nxkv_cuda_encode_begin(nxkv_cuda_encode_section *sections, int64_t n_sections, const int32_t *sink_map,
                           int64_t n_sink_map, const double *cos, const double *sin, int64_t n_trig,
                           nxkv_cuda_encoder **encoder, char *err, size_t err_size);
/* steps: n_heads per section, back to back; minmax: per section its coset, coord and coord_last
 * streams' smallest and largest value (6 entries). NXKV_CUDA_ERR_ARG if a value does not fit
 * int32 points at its step (as nxkv_lattice_quantize). */
int nxkv_cuda_encode_quantize(nxkv_cuda_encoder *encoder, const double *steps, int64_t n_steps, int64_t *minmax,
                              char *err, size_t err_size);
/* Streams are numbered 3 * section + (0 coset, 1 coord, 2 coord_last). hist_offset[stream]: -1,
 * or where the counts of value - lo[stream] (size[stream] of them, at most 4096) go in hist. */
int nxkv_cuda_encode_histogram(nxkv_cuda_encoder *encoder, const int64_t *hist_offset, const int64_t *lo,
                               const int64_t *size, int64_t *hist, int64_t n_hist, char *err, size_t err_size);
/* For each stream with freq_offset[stream] >= 0 (in increasing order): its frequencies from
 * freqs[freq_offset] to the next such stream's (or n_freqs), its symbols coded as value - lo[stream],
 * in `lanes` lanes of chunks of chunk[stream] symbols (>= lanes; the stream's size for one chunk).
 * lengths: one entry per (chunk, lane) of every such stream, in stream order; body: their bytes,
 * stream after stream (body_size in, bytes written out). */
int nxkv_cuda_encode_rans(nxkv_cuda_encoder *encoder, const int64_t *freq_offset, const int64_t *freqs, int64_t n_freqs,
                          const int64_t *lo, int64_t lanes, const int64_t *chunk, int64_t *lengths, int64_t n_lengths,
                          uint8_t *body, int64_t *body_size, char *err, size_t err_size);
int nxkv_cuda_encode_symbols(nxkv_cuda_encoder *encoder, int64_t stream, int32_t *out, int64_t n, char *err,
                             size_t err_size);
void nxkv_cuda_encode_free(nxkv_cuda_encoder *encoder);

/* The device's copy bandwidths, for the benchmark's baseline in the same run: milliseconds per
 * copy of `bytes` (median of `repeats`) device to device, pageable host to device, pinned host to
 * device. */
int nxkv_cuda_copy_times(size_t bytes, int repeats, double *d2d_ms, double *h2d_ms, double *h2d_pinned_ms, char *err,
                         size_t err_size);
/* NXKV_CUDA_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* NXKV_CUDA_H */
