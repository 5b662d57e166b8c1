/* float -> IEEE half, rounding to nearest even (as numpy's astype(float16), and ggml's
 * GGML_FP32_TO_FP16 with F16C): overflow to infinity, subnormals rounded, NaN kept a NaN
 * (payload bits may differ; the decoders refuse NaN before they convert). The bit algorithm
 * of numpy's npy_floatbits_to_halfbits. */
#ifndef NXKV_CORE_F16_H
#define NXKV_CORE_F16_H

#include <stdint.h>
#include <string.h>

#include "target.h"

NXKV_FN uint16_t nxkv_core_f32_to_f16(float value) {
    uint32_t f;
    memcpy(&f, &value, sizeof f);
    const uint16_t sign = (uint16_t)((f & 0x80000000u) >> 16);
    uint32_t f_exp = f & 0x7f800000u, f_sig;
    if (f_exp >= 0x47800000u) { /* overflow, infinity or NaN */
        f_sig = f & 0x007fffffu;
        if (f_exp == 0x7f800000u && f_sig) {
            uint16_t nan = (uint16_t)(0x7c00u + (f_sig >> 13));
            return (uint16_t)(sign + (nan == 0x7c00u ? 0x7c01u : nan));
        }
        return (uint16_t)(sign + 0x7c00u);
    }
    if (f_exp <= 0x38000000u) { /* a half subnormal or zero */
        if (f_exp < 0x33000000u) return sign;
        f_exp >>= 23;
        f_sig = 0x00800000u + (f & 0x007fffffu);
        f_sig >>= (113 - f_exp);
        /* ties to even: the shift may have dropped up to 11 bits, so look at them in f */
        if ((f_sig & 0x00003fffu) != 0x00001000u || (f & 0x000007ffu)) f_sig += 0x00001000u;
        return (uint16_t)(sign + (uint16_t)(f_sig >> 13));
    }
    const uint16_t h_exp = (uint16_t)((f_exp - 0x38000000u) >> 13);
    f_sig = f & 0x007fffffu;
    if ((f_sig & 0x00003fffu) != 0x00001000u) f_sig += 0x00001000u;
    /* a carry out of the significand moves into the exponent, up to infinity: as it should */
    return (uint16_t)(sign + (uint16_t)((f_sig >> 13) + h_exp));
}

#endif
