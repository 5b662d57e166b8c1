/* Device-agnostic byte-plane kernel bodies (NXKV_FN, target.h: CPU, CUDA and Metal builds share them). */
#ifndef NXKV_CORE_BYTEPLANE_H
#define NXKV_CORE_BYTEPLANE_H

#include <stddef.h>
#include <stdint.h>

#include "target.h"

NXKV_FN void nxkv_core_byteplane_split_range(const uint8_t *src, uint8_t *dst, size_t n_elements,
                                                   size_t element_size, size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; ++i) {
        const uint8_t *e = src + i * element_size;
        for (size_t b = 0; b < element_size; ++b) {
            dst[b * n_elements + i] = e[b];
        }
    }
}

NXKV_FN void nxkv_core_byteplane_merge_range(const uint8_t *src, uint8_t *dst, size_t n_elements,
                                                   size_t element_size, size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; ++i) {
        uint8_t *e = dst + i * element_size;
        for (size_t b = 0; b < element_size; ++b) {
            e[b] = src[b * n_elements + i];
        }
    }
}

#endif
