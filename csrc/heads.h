/* heads.h: the row math of an attention head, written once for the training kernels
 * (attention.h) and the decoder's (decode_kernels.h).
 *
 * Why C: both users are C kernels compiled once per instruction set (baseline and AVX2+FMA,
 * chosen at run time), and these helpers must be inlined into each of those bodies; Cython
 * cannot mark a function for a target ISA.
 *
 *   mg_head_logits_f/d  a head's logits of one query over n keys from its content logits c and
 *                       pattern logits p: c (content), p (rrpram) or the hybrid mix
 *                       (1 - a) c + a p, a = sigmoid(alpha) (design.md §2). out may be c.
 *   mg_mix8             the hybrid mix on 8 float lanes (the AVX2 training softmax)
 *   mg_softmax_row_f/d  x[0:n] := softmax(x[0:n]) (max, exp, sum, scale; float32 exp is
 *                       mg_expf, float64 libm's exp), and mg_softmax_row_f_avx2 its AVX2 body
 */
#ifndef MOLECULE_HEADS_H
#define MOLECULE_HEADS_H

#include <math.h>
#include <stddef.h>

#include "codes.h"
#include "fastmath.h"

#define MG_DEFINE_HEAD_ROW(T, SUFFIX, EXP)                                                        \
    static inline void mg_head_logits_##SUFFIX(T *out, const T *c, const T *p, ptrdiff_t n, T a, \
                                               int kind) {                                        \
        if (kind == MG_HEAD_CONTENT) {                                                            \
            if (out != c)                                                                         \
                for (ptrdiff_t j = 0; j < n; j++) out[j] = c[j];                                  \
        } else if (kind == MG_HEAD_RRPRAM) {                                                      \
            for (ptrdiff_t j = 0; j < n; j++) out[j] = p[j];                                      \
        } else {                                                                                  \
            for (ptrdiff_t j = 0; j < n; j++) out[j] = (1 - a) * c[j] + a * p[j];                 \
        }                                                                                         \
    }                                                                                             \
    static inline void mg_softmax_row_##SUFFIX(T *restrict x, ptrdiff_t n) {                      \
        T m = x[0];                                                                               \
        _Pragma("omp simd reduction(max : m)")                                                    \
        for (ptrdiff_t j = 1; j < n; j++) m = x[j] > m ? x[j] : m;                                \
        T s = 0;                                                                                  \
        for (ptrdiff_t j = 0; j < n; j++) x[j] = EXP(x[j] - m); /* two loops: each vectorizes */  \
        _Pragma("omp simd reduction(+ : s)")                                                      \
        for (ptrdiff_t j = 0; j < n; j++) s += x[j];                                              \
        const T inv = 1 / s;                                                                      \
        for (ptrdiff_t j = 0; j < n; j++) x[j] = x[j] * inv;                                      \
    }

MG_DEFINE_HEAD_ROW(float, f, mg_expf)
MG_DEFINE_HEAD_ROW(double, d, exp)

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static inline float mg_hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* (1 - a) c + a p on 8 lanes; one_minus_a = 1 - a (loop-invariant, passed in) */
__attribute__((target("avx2,fma"))) static inline __m256 mg_mix8(__m256 a, __m256 one_minus_a, __m256 c, __m256 p) {
    return _mm256_fmadd_ps(one_minus_a, c, _mm256_mul_ps(a, p));
}

/* mg_softmax_row_f with intrinsics: GCC leaves the inlined mg_expf unvectorized inside a
 * target("avx2") function, so the exponentials are mg_expf8 (the same method, 8 lanes). */
__attribute__((target("avx2,fma"))) static inline void mg_softmax_row_f_avx2(float *restrict x, ptrdiff_t n) {
    ptrdiff_t j = 0;
    float m = x[0];
    if (n >= 8) {
        __m256 vm = _mm256_loadu_ps(x);
        for (j = 8; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + j));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        m = _mm_cvtss_f32(h);
    }
    for (; j < n; j++) m = x[j] > m ? x[j] : m;
    __m256 vmx = _mm256_set1_ps(m), vs = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 w = mg_expf8(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmx));
        _mm256_storeu_ps(x + j, w);
        vs = _mm256_add_ps(vs, w);
    }
    float s = mg_hsum256(vs);
    for (; j < n; j++) {
        x[j] = mg_expf(x[j] - m);
        s += x[j];
    }
    const float inv = 1 / s;
    __m256 vi = _mm256_set1_ps(inv);
    for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), vi));
    for (; j < n; j++) x[j] = x[j] * inv;
}
#endif

#endif
