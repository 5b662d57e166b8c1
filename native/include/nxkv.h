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
/* Bumped whenever a declaration below changes; Python refuses a library of another version. */
int nxkv_abi_version(void);

/* Byte planes: element i's byte b goes to dst[b * n_elements + i]. Lossless and exact inverse
 * of nxkv_byteplane_merge. src and dst must not overlap; both hold n_elements * element_size. */
void nxkv_byteplane_split(const uint8_t *src, uint8_t *dst, size_t n_elements, size_t element_size);
void nxkv_byteplane_merge(const uint8_t *src, uint8_t *dst, size_t n_elements, size_t element_size);

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
