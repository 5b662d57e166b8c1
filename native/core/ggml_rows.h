/* ggml's row types that KV caches hold, written once for every target: q8_0 blocks as
 * ggml-quants.c quantize_row_q8_0_ref makes them (and nexus_gguf/ggml_quants.py, the readable
 * version): per 32 values d = max|x| / 127 as f16, then roundf(x / d) as int8. Float operations
 * in ggml's order, so the same bytes. */
#ifndef NXKV_CORE_GGML_ROWS_H
#define NXKV_CORE_GGML_ROWS_H

#include <math.h>
#include <stdint.h>

#include "f16.h"
#include "target.h"

#define NXKV_QK 32

/* One q8_0 block (34 bytes: f16 scale, 32 int8) of 32 floats. */
NXKV_FN void nxkv_core_quantize_block_q8_0(const float *x, uint8_t *out) {
    float amax = 0.0f;
    for (int j = 0; j < NXKV_QK; ++j) {
        const float a = fabsf(x[j]);
        amax = a > amax ? a : amax;
    }
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dh = nxkv_core_f32_to_f16(d);
    out[0] = (uint8_t)(dh & 0xff);
    out[1] = (uint8_t)(dh >> 8);
    for (int j = 0; j < NXKV_QK; ++j) out[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
}

#endif
