/* The exponential, sigmoid and tanh of rnnkit's C code. Written out so that loops calling them
 * vectorise without -ffast-math (libm's exp is a scalar call then), keeping NaN and inf exact. */
#ifndef RNNKIT_NATIVE_MATH_H
#define RNNKIT_NATIVE_MATH_H

#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0 (or NaN, which comes out NaN): x = n ln2 + r with |r| <= ln2 / 2 (n by the
 * round-to-nearest magic-number trick, ln2 split in two for an exact product), then
 * exp(r) by its Taylor series (degree 7 in float, 13 in double: truncation below half an ulp)
 * and 2^n built in the exponent bits. Below the smallest normal result it returns 0. */
static inline float exp_nonpos_f32(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float t = xc * 1.44269504088896341f + 12582912.0f;
    float n = t - 12582912.0f;
    int32_t bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float r = xc - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float e = p * scale;
    return x < -87.0f ? 0.0f : e;
}

static inline double exp_nonpos_f64(double x) {
    double xc = x < -708.0 ? -708.0 : x;
    double t = xc * 1.44269504088896338700 + 6755399441055744.0;
    double n = t - 6755399441055744.0;
    int64_t bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - INT64_C(0x4338000000000000) + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    double r = xc - n * 6.93147180369123816490e-01 - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    double e = p * scale;
    return x < -708.0 ? 0.0 : e;
}

/* Both take exp of -|x| only, so nothing overflows; the sign is put back after. */
#define NATIVE_MATH_ACTIVATIONS(T, SUF)                                                         \
    static inline T sigmoid_##SUF(T x) {                                                        \
        T e = exp_nonpos_##SUF(-(x < 0 ? -x : x));                                              \
        T s = (T)1 / ((T)1 + e);                                                                \
        return x >= 0 ? s : e * s;                                                              \
    }                                                                                           \
    static inline T tanh_##SUF(T x) {                                                           \
        T e = exp_nonpos_##SUF((T)-2 * (x < 0 ? -x : x));                                       \
        T t = ((T)1 - e) / ((T)1 + e);                                                          \
        return x >= 0 ? t : -t;                                                                 \
    }
NATIVE_MATH_ACTIVATIONS(float, f32)
NATIVE_MATH_ACTIVATIONS(double, f64)
#undef NATIVE_MATH_ACTIVATIONS

#endif
