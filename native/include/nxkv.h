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
enum nxkv_abi { NXKV_ABI_VERSION = 3 };
int nxkv_abi_version(void);

/* Status codes of the kernels that can fail (a damaged stream, an argument out of range). */
enum nxkv_status { NXKV_OK = 0, NXKV_ERR_CORRUPT = -1, NXKV_ERR_ARG = -2, NXKV_ERR_NOMEM = -3 };

/* Byte planes: element i's byte b goes to dst[b * n_elements + i]. Lossless and exact inverse
 * of nxkv_byteplane_merge. src and dst must not overlap; both hold n_elements * element_size. */
void nxkv_byteplane_split(const uint8_t *src, uint8_t *dst, size_t n_elements, size_t element_size);
void nxkv_byteplane_merge(const uint8_t *src, uint8_t *dst, size_t n_elements, size_t element_size);

/* E8 nearest points of n_rows rows of 8 doubles (core/e8.h); x and out may be the same. */
void nxkv_e8_nearest(const double *x, double *out, size_t n_rows);

/* rANS of one stream (core/rans.h) with n_freqs frequencies summing to 2^14. Encoding writes
 * backwards into out[0 .. capacity): it returns the byte count k (the stream is
 * out[capacity - k .. capacity)) or NXKV_ERR_ARG if capacity is too small. */
int64_t nxkv_rans_encode(const int64_t *symbols, size_t n, size_t stride, const int64_t *freqs, size_t n_freqs,
                         uint8_t *out, size_t capacity);
int nxkv_rans_decode(const uint8_t *data, size_t n_data, const int64_t *freqs, size_t n_freqs, int64_t *out, size_t n);

/* Interleaved rANS (FORMAT.md, entropy method 3): decode the (chunk, lane) streams t0 .. t1 of
 * a stream of n symbols in chunks of `chunk`, `lanes` lanes each, whose byte lengths are
 * lengths[0 .. n_tasks), into out (n symbols). Disjoint task ranges may run on threads. */
int nxkv_rans_decode_lanes(const uint8_t *data, size_t n_data, const int64_t *lengths, size_t n_tasks,
                           const int64_t *freqs, size_t n_freqs, int64_t *out, size_t n, size_t lanes, size_t chunk,
                           size_t t0, size_t t1);

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
