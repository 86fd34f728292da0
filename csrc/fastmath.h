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

/* mg_expf on 8 lanes with AVX2+FMA intrinsics (GCC does not vectorize the scalar body inside a
 * target("avx2") function reliably): the same reduction and polynomial, evaluated with FMA, so
 * results may differ from mg_expf in the last ulp. */
__attribute__((target("avx2,fma"))) static inline __m256 mg_expf8(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447504f));
    __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
    __m256 n = _mm256_floor_ps(fx);
    __m256 g = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    g = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), g);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, g, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, g, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, g, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, g, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, g, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(y, g), g, g), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

/* mg_expf8 on 16 lanes (AVX-512F): the same operations lane by lane, so the same bits. */
__attribute__((target("avx512f,avx512vl,avx2,fma"))) static inline __m512 mg_expf16(__m512 x) {
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3365447504f));
    __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
    __m512 n = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 g = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    g = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), g);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, g), g, g), _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}
#endif

#endif
