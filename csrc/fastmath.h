/* fastmath.h: a float32 exp that vectorizes.
 *
 * Why C: it reinterprets float bits (2^n built in the exponent field), which C says plainly
 * with a bit cast. Used only for float32 buffers (softmax and cross-entropy); float64 keeps libm's
 * exp so imported checkpoints reproduce the original's numbers to 1e-9.
 *
 * Method (Cephes expf): exp(x) = 2^n exp(g), n = round(x / ln 2), g = x - n ln 2 with ln 2 split
 * in two for exactness, exp(g) by a degree-7 polynomial on |g| <= ln2/2. Max relative error
 * about 2 ulp on [-87.3, 88.7]; inputs below are clamped (result ~1e-38, i.e. 0 for softmax).
 * Branch-free, so `for` loops over it auto-vectorize at -O3 with plain SSE2.
 */
#ifndef MOLECULE_FASTMATH_H
#define MOLECULE_FASTMATH_H

#include <stdint.h>
#include <string.h>

static inline float mg_expf(float x) {
    const float hi = 88.3762626647949f, lo = -87.3365447504f;
    x = x > hi ? hi : x;
    x = x < lo ? lo : x;
    float fx = x * 1.44269504088896341f + 0.5f;
    int32_t n = (int32_t)fx;
    n -= (float)n > fx; /* floor for negative fx */
    float g = x - (float)n * 0.693359375f;
    g -= (float)n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * g + 1.3981999507e-3f;
    y = y * g + 8.3334519073e-3f;
    y = y * g + 4.1665795894e-2f;
    y = y * g + 1.6666665459e-1f;
    y = y * g + 5.0000001201e-1f;
    y = y * g * g + g + 1.0f;
    int32_t bits = (n + 127) << 23; /* 2^n as float bits; memcpy is a plain bit cast that vectorizes */
    float pow2;
    memcpy(&pow2, &bits, sizeof pow2);
    return y * pow2;
}

/* The same function with the floor as floorf: identical results, and the form GCC vectorizes
 * inside target("avx2") functions (there it keeps the compare-and-subtract above as a branch;
 * for baseline SSE2, which has no vector floor, the form above is the one that vectorizes).
 * Keep the two bodies in step by hand: sharing the reduction and polynomial through a common
 * inline helper was measured to stop GCC 12 vectorizing the AVX2 softmax rows (float32
 * attention forward 106 -> 148 us in bench_kernels, same session). */
static inline float mg_expf_fl(float x) {
    const float hi = 88.3762626647949f, lo = -87.3365447504f;
    x = x > hi ? hi : x;
    x = x < lo ? lo : x;
    float fx = x * 1.44269504088896341f + 0.5f;
    int32_t n = (int32_t)__builtin_floorf(fx);
    float g = x - (float)n * 0.693359375f;
    g -= (float)n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * g + 1.3981999507e-3f;
    y = y * g + 8.3334519073e-3f;
    y = y * g + 4.1665795894e-2f;
    y = y * g + 1.6666665459e-1f;
    y = y * g + 5.0000001201e-1f;
    y = y * g * g + g + 1.0f;
    int32_t bits = (n + 127) << 23;
    float pow2;
    memcpy(&pow2, &bits, sizeof pow2);
    return y * pow2;
}

#endif
