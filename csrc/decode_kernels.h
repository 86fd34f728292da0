/* decode_kernels.h: what only the decoder computes: the sampling softmax's exponentials, on 16
 * lanes where the AVX-512 products run, else AVX2+FMA when the CPU has it (the same bits).
 *
 * Why C: the fast path needs intrinsics and a runtime CPU check (wheels are built without
 * -march=native), which Cython cannot express. Used by _decode.pyx and its sampling stack
 * (_sampling.pyx).
 *
 * The model's forward is not here: the decoder runs the training step's kernels, the linear
 * layers' products of gemm.h on weights packed once per model version (mg_gemm_packed_*) and
 * attention.h's causal attention for its rows over the key/value cache.
 *
 *   mg_softmax_exp_f    the exponentials and sums of the sampling softmax
 *   mg_next_at_least_f  the next min-p candidate of the sampling stack
 *   mg_decode_has_avx2  the decoder's instruction path for its products, fixed for the process
 */
#ifndef MOLECULE_DECODE_KERNELS_H
#define MOLECULE_DECODE_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "attention.h" /* mg_use_avx512: the products' choice of width */
#include "heads.h"     /* mg_hsum256 */

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define MG_HAVE_AVX2_PATH 1

#endif

/* Sampling softmax, one pass: x_i = max(z_i ft - shift, lo), e_i = exp(x_i); returns
 * sum_i e_i and stores sum_i e_i x_i in *sx (for the entropy). exp is mg_expf's method
 * (fastmath.h); the AVX2 path spells it with intrinsics, 8 lanes wide (GCC leaves the inlined
 * scalar version unvectorized inside a target("avx2") function). */
#include "fastmath.h"

static float mg_softmax_exp_f_generic(float *restrict x, float *restrict e, const float *restrict z, ptrdiff_t n,
                                      float ft, float shift, float lo, float *sx) {
    for (ptrdiff_t i = 0; i < n; i++) {
        float v = z[i] * ft - shift;
        v = v > lo ? v : lo;
        x[i] = v;
        e[i] = mg_expf(v);
    }
    float t = 0, s = 0;
    _Pragma("omp simd reduction(+ : t, s)")
    for (ptrdiff_t i = 0; i < n; i++) {
        t += e[i];
        s += e[i] * x[i];
    }
    *sx = s;
    return t;
}

#ifdef MG_HAVE_AVX2_PATH
/* the pass from element i on, 8 lanes at a time, adding to the 8-lane sums vt (of e) and vs (of
 * e x) a caller began; then the remaining elements one by one */
__attribute__((target("avx2,fma"))) static inline float mg_softmax_exp_f_from8(
    float *restrict x, float *restrict e, const float *restrict z, ptrdiff_t i, ptrdiff_t n, float ft, float shift,
    float lo, float *sx, __m256 vt, __m256 vs) {
    __m256 vft = _mm256_set1_ps(ft), vshift = _mm256_set1_ps(shift), vlo = _mm256_set1_ps(lo);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_max_ps(_mm256_fmsub_ps(_mm256_loadu_ps(z + i), vft, vshift), vlo);
        __m256 w = mg_expf8(v);
        _mm256_storeu_ps(x + i, v);
        _mm256_storeu_ps(e + i, w);
        vt = _mm256_add_ps(vt, w);
        vs = _mm256_fmadd_ps(w, v, vs);
    }
    float t = mg_hsum256(vt), s = mg_hsum256(vs);
    for (; i < n; i++) {
        float v = z[i] * ft - shift;
        v = v > lo ? v : lo;
        float w = mg_expf(v);
        x[i] = v;
        e[i] = w;
        t += w;
        s += w * v;
    }
    *sx = s;
    return t;
}

__attribute__((target("avx2,fma"))) static float mg_softmax_exp_f_avx2(float *restrict x, float *restrict e,
                                                                         const float *restrict z, ptrdiff_t n,
                                                                         float ft, float shift, float lo, float *sx) {
    return mg_softmax_exp_f_from8(x, e, z, 0, n, ft, shift, lo, sx, _mm256_setzero_ps(), _mm256_setzero_ps());
}

/* The same pass on 16 lanes where the AVX-512 products run (attention.h's choice), with the
 * 8-lane pass's bits: lane by lane the same operations (mg_expf16 = mg_expf8), and the sums in
 * the 8-lane order (each 16-lane vector's low half, then its high half, into the 8-lane sums),
 * then the 8-lane pass's own end. */
__attribute__((target("avx512f,avx512vl,avx2,fma"))) static float mg_softmax_exp_f_avx512(
    float *restrict x, float *restrict e, const float *restrict z, ptrdiff_t n, float ft, float shift, float lo,
    float *sx) {
    __m256 vt = _mm256_setzero_ps(), vs = _mm256_setzero_ps();
    const __m512 vft = _mm512_set1_ps(ft), vshift = _mm512_set1_ps(shift), vlo = _mm512_set1_ps(lo);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_max_ps(_mm512_fmsub_ps(_mm512_loadu_ps(z + i), vft, vshift), vlo);
        __m512 w = mg_expf16(v);
        _mm512_storeu_ps(x + i, v);
        _mm512_storeu_ps(e + i, w);
        __m256 wl = _mm512_castps512_ps256(w), vl = _mm512_castps512_ps256(v);
        __m256 wh = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1));
        __m256 vh = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        vt = _mm256_add_ps(vt, wl);
        vs = _mm256_fmadd_ps(wl, vl, vs);
        vt = _mm256_add_ps(vt, wh);
        vs = _mm256_fmadd_ps(wh, vh, vs);
    }
    return mg_softmax_exp_f_from8(x, e, z, i, n, ft, shift, lo, sx, vt, vs);
}
#endif

/* The first j in [i, n) with e[j] >= thr and z[j] > -inf, or n: the sampling stack's min-p
 * candidates, in ascending order, one call each (there are few; the scan between them is
 * vector-wide). A NaN in e or z is no candidate, as in the scalar comparisons. */
static ptrdiff_t mg_next_at_least_f_generic(const float *e, const float *z, ptrdiff_t i, ptrdiff_t n, float thr) {
    for (; i < n; i++)
        if (e[i] >= thr && z[i] > -INFINITY) return i;
    return n;
}

#ifdef MG_HAVE_AVX2_PATH
__attribute__((target("avx2,fma"))) static ptrdiff_t mg_next_at_least_f_avx2(const float *e, const float *z,
                                                                              ptrdiff_t i, ptrdiff_t n, float thr) {
    const __m256 vthr = _mm256_set1_ps(thr), vinf = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) {
        __m256 ok = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(e + i), vthr, _CMP_GE_OQ),
                                  _mm256_cmp_ps(_mm256_loadu_ps(z + i), vinf, _CMP_GT_OQ));
        int m = _mm256_movemask_ps(ok);
        if (m) return i + __builtin_ctz((unsigned)m);
    }
    return mg_next_at_least_f_generic(e, z, i, n, thr);
}

__attribute__((target("avx512f,avx512vl,avx2,fma"))) static ptrdiff_t mg_next_at_least_f_avx512(
        const float *e, const float *z, ptrdiff_t i, ptrdiff_t n, float thr) {
    const __m512 vthr = _mm512_set1_ps(thr), vinf = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) {
        __mmask16 m = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(_mm512_loadu_ps(e + i), vthr, _CMP_GE_OQ),
                                              _mm512_loadu_ps(z + i), vinf, _CMP_GT_OQ);
        if (m) return i + __builtin_ctz((unsigned)m);
    }
    return mg_next_at_least_f_generic(e, z, i, n, thr);
}
#endif

/* 1 when the AVX2+FMA path runs on this CPU (checked once; a racy first check is harmless).
 * MOLECULE_GPT_NO_AVX2=1 in the environment forces the portable path (tests use it). */
static inline int mg_decode_has_avx2(void) {
#ifdef MG_HAVE_AVX2_PATH
    static int has = -1;
    if (has < 0) {
        const char *off = getenv("MOLECULE_GPT_NO_AVX2");
        __builtin_cpu_init();
        has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !(off && *off && *off != '0');
    }
    return has;
#else
    return 0;
#endif
}

static inline float mg_softmax_exp_f(float *restrict x, float *restrict e, const float *restrict z, ptrdiff_t n,
                                     float ft, float shift, float lo, float *sx) {
#ifdef MG_HAVE_AVX2_PATH
    if (mg_use_avx512()) return mg_softmax_exp_f_avx512(x, e, z, n, ft, shift, lo, sx);
    if (mg_decode_has_avx2()) return mg_softmax_exp_f_avx2(x, e, z, n, ft, shift, lo, sx);
#endif
    return mg_softmax_exp_f_generic(x, e, z, n, ft, shift, lo, sx);
}

static inline ptrdiff_t mg_next_at_least_f(const float *e, const float *z, ptrdiff_t i, ptrdiff_t n, float thr) {
#ifdef MG_HAVE_AVX2_PATH
    if (mg_use_avx512()) return mg_next_at_least_f_avx512(e, z, i, n, thr);
    if (mg_decode_has_avx2()) return mg_next_at_least_f_avx2(e, z, i, n, thr);
#endif
    return mg_next_at_least_f_generic(e, z, i, n, thr);
}


#endif
