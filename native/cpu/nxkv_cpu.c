/* CPU entry points of the native library; the kernel bodies live in native/core/. */
#include "nxkv.h"
#include "../core/byteplane.h"

#define NXKV_ABI_VERSION 2

int nxkv_abi_version(void) { return NXKV_ABI_VERSION; }

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
