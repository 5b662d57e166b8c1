/* nxkv.h: the one C ABI of nexus-gguf's native library.
 *
 * Python reads the declarations between the NXKV_CDEF markers with cffi (ABI mode), so this
 * region must stay plain C declarations: no macros, no attributes, no #if.
 */
#ifndef NXKV_H
#define NXKV_H

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
/* NXKV_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* NXKV_H */
