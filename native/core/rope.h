/* One RoPE pair rotation by an angle whose cos and sin the host computed (llama.cpp's angles,
 * stages/rope.py), as backends/reference.py rope_rotate: float operands widened to double, each
 * product and sum one double rounding, one rounding back to float. */
#ifndef NXKV_CORE_ROPE_H
#define NXKV_CORE_ROPE_H

#include "target.h"

NXKV_FN void nxkv_core_rope_pair(float a, float b, double c, double s, float *out_a, float *out_b) {
    *out_a = (float)((double)a * c - (double)b * s);
    *out_b = (float)((double)a * s + (double)b * c);
}

#endif
