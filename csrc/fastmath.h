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

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>

/* mg_expf on whole vectors with intrinsics (GCC does not vectorize the scalar body inside a
 * target("avx2") function reliably): the same reduction and polynomial, evaluated with FMA, so
 * results may differ from mg_expf in the last ulp. One body for both widths (P the intrinsics'
 * prefix): lane by lane the same operations, so mg_expf8 and mg_expf16 give the same bits. */
#define MG_DEFINE_EXPF(NAME, ATTR, VT, VI, P, FLOOR, CAST_INT)                                   \
    ATTR static inline VT NAME(VT x) {                                                            \
        x = P##_min_ps(x, P##_set1_ps(88.3762626647949f));                                        \
        x = P##_max_ps(x, P##_set1_ps(-87.3365447504f));                                          \
        VT fx = P##_fmadd_ps(x, P##_set1_ps(1.44269504088896341f), P##_set1_ps(0.5f));            \
        VT n = FLOOR(fx);                                                                         \
        VT g = P##_fnmadd_ps(n, P##_set1_ps(0.693359375f), x);                                    \
        g = P##_fnmadd_ps(n, P##_set1_ps(-2.12194440e-4f), g);                                    \
        VT y = P##_set1_ps(1.9875691500e-4f);                                                     \
        y = P##_fmadd_ps(y, g, P##_set1_ps(1.3981999507e-3f));                                    \
        y = P##_fmadd_ps(y, g, P##_set1_ps(8.3334519073e-3f));                                    \
        y = P##_fmadd_ps(y, g, P##_set1_ps(4.1665795894e-2f));                                    \
        y = P##_fmadd_ps(y, g, P##_set1_ps(1.6666665459e-1f));                                    \
        y = P##_fmadd_ps(y, g, P##_set1_ps(5.0000001201e-1f));                                    \
        y = P##_add_ps(P##_fmadd_ps(P##_mul_ps(y, g), g, g), P##_set1_ps(1.0f));                  \
        VI bits = P##_slli_epi32(P##_add_epi32(P##_cvttps_epi32(n), P##_set1_epi32(127)), 23);    \
        return P##_mul_ps(y, CAST_INT(bits));                                                     \
    }

#define MG_FLOOR16(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
MG_DEFINE_EXPF(mg_expf8, __attribute__((target("avx2,fma"))), __m256, __m256i, _mm256, _mm256_floor_ps,
               _mm256_castsi256_ps)
MG_DEFINE_EXPF(mg_expf16, __attribute__((target("avx512f,avx512vl,avx2,fma"))), __m512, __m512i, _mm512,
               MG_FLOOR16, _mm512_castsi512_ps)
#endif

#endif
