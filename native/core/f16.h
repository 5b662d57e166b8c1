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

/* double -> IEEE half, rounding to nearest even straight from the double (numpy's
 * astype(float16) of float64, npy_doublebits_to_halfbits: no double rounding through float). */
NXKV_FN uint16_t nxkv_core_f64_to_f16(double value) {
    uint64_t d;
    memcpy(&d, &value, sizeof d);
    const uint16_t sign = (uint16_t)((d & 0x8000000000000000ull) >> 48);
    uint64_t d_exp = d & 0x7ff0000000000000ull, d_sig;
    if (d_exp >= 0x40f0000000000000ull) { /* overflow, infinity or NaN */
        d_sig = d & 0x000fffffffffffffull;
        if (d_exp == 0x7ff0000000000000ull && d_sig) {
            uint16_t nan = (uint16_t)(0x7c00u + (d_sig >> 42));
            return (uint16_t)(sign + (nan == 0x7c00u ? 0x7c01u : nan));
        }
        return (uint16_t)(sign + 0x7c00u);
    }
    if (d_exp <= 0x3f00000000000000ull) { /* a half subnormal or zero */
        if (d_exp < 0x3e60000000000000ull) return sign;
        d_exp >>= 52;
        d_sig = 0x0010000000000000ull + (d & 0x000fffffffffffffull);
        d_sig <<= (d_exp - 998); /* doubles have room: no bit is lost */
        if ((d_sig & 0x003fffffffffffffull) != 0x0010000000000000ull) d_sig += 0x0010000000000000ull;
        return (uint16_t)(sign + (uint16_t)(d_sig >> 53));
    }
    const uint16_t h_exp = (uint16_t)((d_exp - 0x3f00000000000000ull) >> 42);
    d_sig = d & 0x000fffffffffffffull;
    if ((d_sig & 0x000007ffffffffffull) != 0x0000020000000000ull) d_sig += 0x0000020000000000ull;
    /* a carry out of the significand moves into the exponent, up to infinity: as it should */
    return (uint16_t)(sign + (uint16_t)((d_sig >> 42) + h_exp));
}

/* IEEE half bits -> float, exactly (every half is a float). */
NXKV_FN float nxkv_core_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t f;
    if (e == 0x1f) {
        f = sign | 0x7f800000u | (m << 13);
    } else if (e) {
        f = sign | ((e + 112) << 23) | (m << 13);
    } else if (!m) {
        f = sign;
    } else { /* subnormal: normalise */
        uint32_t shift = 0, mm = m;
        while (!(mm & 0x400u)) {
            mm <<= 1;
            ++shift;
        }
        f = sign | ((113 - shift) << 23) | ((mm & 0x3ffu) << 13);
    }
    float out;
    memcpy(&out, &f, sizeof out);
    return out;
}

#endif
