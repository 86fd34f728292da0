/* decode_kernels.h: the decoder's own kernels (float32 and float64), AVX2+FMA when the CPU has it.
 *
 * Why C: the fast path needs intrinsics and a runtime CPU check (wheels are built without
 * -march=native), which Cython cannot express. Used only by _decode.pyx.
 *
 * The decoder's matrix products are not here: they are the linear layers' products of gemm.h,
 * on weights packed once per model version (mg_gemm_pack_nt_*, mg_gemm_packed_*).
 *
 *   mg_softmax_exp_f  the exponentials and sums of the sampling softmax
 *   mg_attend_row_f/d one query's attention over the key/value cache
 *   mg_decode_has_avx2 the decoder's instruction path, fixed for the process
 */
#ifndef MOLECULE_DECODE_KERNELS_H
#define MOLECULE_DECODE_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "codes.h" /* MG_HEAD_* */
#include "heads.h" /* a head's logits, the softmax row, mg_hsum256 */

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
__attribute__((target("avx2,fma"))) static float mg_softmax_exp_f_avx2(float *restrict x, float *restrict e,
                                                                         const float *restrict z, ptrdiff_t n,
                                                                         float ft, float shift, float lo, float *sx) {
    __m256 vt = _mm256_setzero_ps(), vs = _mm256_setzero_ps();
    __m256 vft = _mm256_set1_ps(ft), vshift = _mm256_set1_ps(shift), vlo = _mm256_set1_ps(lo);
    ptrdiff_t i = 0;
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
#endif

/* y[0:n] += a x[0:n] */
#define MG_DEFINE_AXPY(T, SUFFIX)                                                                 \
    static inline void mg_axpy_##SUFFIX##_generic(T *restrict y, T a, const T *restrict x, ptrdiff_t n) { \
        for (ptrdiff_t i = 0; i < n; i++) y[i] = y[i] + a * x[i];                                 \
    }                                                                                             \
    /* y[0:n] = sum_{i<m} (s a_i) X_i[0:n], X_i = X + i ldx: from zero, one axpy per i in order */ \
    static inline void mg_sumrows_##SUFFIX##_generic(T *restrict y, T s, const T *restrict a,     \
                                                     const T *restrict X, ptrdiff_t ldx, ptrdiff_t m, \
                                                     ptrdiff_t n) {                               \
        for (ptrdiff_t j = 0; j < n; j++) y[j] = 0;                                               \
        for (ptrdiff_t i = 0; i < m; i++) mg_axpy_##SUFFIX##_generic(y, s * a[i], X + i * ldx, n); \
    }                                                                                             \
    /* two independent mg_sumrows with s = 1 (two heads' values) */                               \
    static inline void mg_sumrows_pair_##SUFFIX##_generic(T *restrict y, const T *restrict a,     \
                                                          const T *restrict X, T *restrict y2,    \
                                                          const T *restrict a2, const T *restrict X2, \
                                                          ptrdiff_t ldx, ptrdiff_t m, ptrdiff_t n) { \
        mg_sumrows_##SUFFIX##_generic(y, (T)1, a, X, ldx, m, n);                                  \
        mg_sumrows_##SUFFIX##_generic(y2, (T)1, a2, X2, ldx, m, n);                               \
    }

MG_DEFINE_AXPY(float, f)
MG_DEFINE_AXPY(double, d)

/* One query's attention over nk cached keys (all heads), _decode.pyx's attend_row:
 *   content logits c_j = scale q_h . k_j from the transposed key cache kt (H, d, T);
 *   pattern logits p_j = W_pattern[j] . h_h given in pat_rows (H, T) (the linear layers'
 *   product, computed by the caller as in training);
 *   the head's logits and their softmax over j < nk (heads.h, as in training); y_h = sum_j att_j v_j.
 * Each is a sum of scaled rows (SUMROWS: element j accumulates its terms in order, as axpys
 * would); heads go in pairs, and a pair's values are summed in one pass (SUMROWS_PAIR: twice the
 * independent sums per row of the cache, the same arithmetic). head_type: MG_HEAD_* codes
 * (codes.h). att: scratch of 2 T elements (a pair's weights at att and att + T).
 * One body for both element types and both instruction sets. */
#define MG_DEFINE_ATTEND_ROW(T, SUFFIX, ATTR, NAME, SUMROWS, SUMROWS_PAIR, SOFTMAX)                \
    ATTR static void NAME(T *restrict y, T *restrict att, const T *restrict pat_rows, const T *restrict q, \
                          const T *restrict kt, const T *restrict vc, const int *head_type,        \
                          const double *mix, ptrdiff_t H, ptrdiff_t d, ptrdiff_t TT, ptrdiff_t C,  \
                          ptrdiff_t nk) {                                                          \
        const T scale = (T)(1.0 / __builtin_sqrt((double)d));                                     \
        for (ptrdiff_t h0 = 0; h0 < H; h0 += 2) {                                                 \
            ptrdiff_t pair = h0 + 1 < H;                                                          \
            for (ptrdiff_t h = h0; h <= h0 + pair; h++) {                                         \
                T *a = att + (h - h0) * TT;                                                       \
                int kind = head_type[h];                                                          \
                if (kind != MG_HEAD_RRPRAM) SUMROWS(a, scale, q + h * d, kt + h * d * TT, TT, d, nk); \
                mg_head_logits_##SUFFIX(a, a, pat_rows + h * TT, nk, (T)mix[h], kind);            \
                SOFTMAX(a, nk);                                                                   \
            }                                                                                     \
            if (pair)                                                                             \
                SUMROWS_PAIR(y + h0 * d, att, vc + h0 * d, y + (h0 + 1) * d, att + TT, vc + (h0 + 1) * d, C, nk, d); \
            else                                                                                  \
                SUMROWS(y + h0 * d, (T)1, att, vc + h0 * d, C, nk, d);                            \
        }                                                                                         \
    }

MG_DEFINE_ATTEND_ROW(float, f, , mg_attend_row_f_generic, mg_sumrows_f_generic, mg_sumrows_pair_f_generic,
                     mg_softmax_row_f)
MG_DEFINE_ATTEND_ROW(double, d, , mg_attend_row_d, mg_sumrows_d_generic, mg_sumrows_pair_d_generic,
                     mg_softmax_row_d)

#ifdef MG_HAVE_AVX2_PATH
/* mg_sumrows on NB x 8 columns with the sums in registers (the axpys' FMAs, in the same order,
 * without storing and reloading y between rows) */
#define MG_DEFINE_SUMROWS_BLOCK(NB)                                                               \
    __attribute__((target("avx2,fma"))) static inline void mg_sumrows##NB##_f_avx2(               \
        float *restrict y, float s, const float *restrict a, const float *restrict X, ptrdiff_t ldx, \
        ptrdiff_t m) {                                                                            \
        __m256 acc[NB];                                                                           \
        for (int b = 0; b < NB; b++) acc[b] = _mm256_setzero_ps();                                \
        for (ptrdiff_t i = 0; i < m; i++) {                                                       \
            __m256 va = _mm256_set1_ps(s * a[i]);                                                 \
            const float *x = X + i * ldx;                                                         \
            for (int b = 0; b < NB; b++) acc[b] = _mm256_fmadd_ps(va, _mm256_loadu_ps(x + 8 * b), acc[b]); \
        }                                                                                         \
        for (int b = 0; b < NB; b++) _mm256_storeu_ps(y + 8 * b, acc[b]);                         \
    }

MG_DEFINE_SUMROWS_BLOCK(8)
MG_DEFINE_SUMROWS_BLOCK(4)
MG_DEFINE_SUMROWS_BLOCK(2)
MG_DEFINE_SUMROWS_BLOCK(1)

/* lanes 0 .. r-1 of 8 (r <= 8): the columns of a row's last, partial group */
__attribute__((target("avx2,fma"))) static inline __m256i mg_tail_mask(ptrdiff_t r) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* mg_sumrows_f_generic's result with AVX2: full 8-column groups in register blocks of 64, 32, 16
 * and 8 columns; the last n mod 8 columns in one masked register (the axpy's scalar tail compiles
 * to the same single-rounding FMA per element) */
__attribute__((target("avx2,fma"))) static inline void mg_sumrows_f_avx2(float *restrict y, float s,
                                                                          const float *restrict a,
                                                                          const float *restrict X, ptrdiff_t ldx,
                                                                          ptrdiff_t m, ptrdiff_t n) {
    ptrdiff_t j = 0;
    for (; j + 64 <= n; j += 64) mg_sumrows8_f_avx2(y + j, s, a, X + j, ldx, m);
    if (j + 32 <= n) {
        mg_sumrows4_f_avx2(y + j, s, a, X + j, ldx, m);
        j += 32;
    }
    if (j + 16 <= n) {
        mg_sumrows2_f_avx2(y + j, s, a, X + j, ldx, m);
        j += 16;
    }
    if (j + 8 <= n) {
        mg_sumrows1_f_avx2(y + j, s, a, X + j, ldx, m);
        j += 8;
    }
    if (j < n) {
        __m256i mask = mg_tail_mask(n - j);
        __m256 acc = _mm256_setzero_ps();
        for (ptrdiff_t i = 0; i < m; i++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s * a[i]), _mm256_maskload_ps(X + i * ldx + j, mask), acc);
        _mm256_maskstore_ps(y + j, mask, acc);
    }
}

/* two heads' mg_sumrows (s = 1) on NB x 8 columns each, in one pass over the cache rows */
#define MG_DEFINE_SUMROWS_PAIR_BLOCK(NB)                                                          \
    __attribute__((target("avx2,fma"))) static inline void mg_sumrows_pair##NB##_f_avx2(          \
        float *restrict y, const float *restrict a, const float *restrict X, float *restrict y2,  \
        const float *restrict a2, const float *restrict X2, ptrdiff_t ldx, ptrdiff_t m) {         \
        __m256 acc[NB], acc2[NB];                                                                 \
        for (int b = 0; b < NB; b++) acc[b] = acc2[b] = _mm256_setzero_ps();                      \
        for (ptrdiff_t i = 0; i < m; i++) {                                                       \
            __m256 va = _mm256_set1_ps(a[i]), vb = _mm256_set1_ps(a2[i]);                           \
            const float *x = X + i * ldx, *x2 = X2 + i * ldx;                                     \
            for (int b = 0; b < NB; b++) {                                                        \
                acc[b] = _mm256_fmadd_ps(va, _mm256_loadu_ps(x + 8 * b), acc[b]);                 \
                acc2[b] = _mm256_fmadd_ps(vb, _mm256_loadu_ps(x2 + 8 * b), acc2[b]);              \
            }                                                                                     \
        }                                                                                         \
        for (int b = 0; b < NB; b++) {                                                            \
            _mm256_storeu_ps(y + 8 * b, acc[b]);                                                  \
            _mm256_storeu_ps(y2 + 8 * b, acc2[b]);                                                \
        }                                                                                         \
    }

MG_DEFINE_SUMROWS_PAIR_BLOCK(4)
MG_DEFINE_SUMROWS_PAIR_BLOCK(2)
MG_DEFINE_SUMROWS_PAIR_BLOCK(1)

/* mg_sumrows_pair_f_generic's result with AVX2: both heads' full 8-column groups in register
 * blocks of 32, 16 and 8 columns each, the last n mod 8 columns of each as mg_sumrows_f_avx2 does */
__attribute__((target("avx2,fma"))) static inline void mg_sumrows_pair_f_avx2(
    float *restrict y, const float *restrict a, const float *restrict X, float *restrict y2, const float *restrict a2,
    const float *restrict X2, ptrdiff_t ldx, ptrdiff_t m, ptrdiff_t n) {
    ptrdiff_t j = 0;
    for (; j + 32 <= n; j += 32) mg_sumrows_pair4_f_avx2(y + j, a, X + j, y2 + j, a2, X2 + j, ldx, m);
    if (j + 16 <= n) {
        mg_sumrows_pair2_f_avx2(y + j, a, X + j, y2 + j, a2, X2 + j, ldx, m);
        j += 16;
    }
    if (j + 8 <= n) {
        mg_sumrows_pair1_f_avx2(y + j, a, X + j, y2 + j, a2, X2 + j, ldx, m);
        j += 8;
    }
    if (j < n) {
        __m256i mask = mg_tail_mask(n - j);
        __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
        for (ptrdiff_t i = 0; i < m; i++) {
            acc = _mm256_fmadd_ps(_mm256_set1_ps(a[i]), _mm256_maskload_ps(X + i * ldx + j, mask), acc);
            acc2 = _mm256_fmadd_ps(_mm256_set1_ps(a2[i]), _mm256_maskload_ps(X2 + i * ldx + j, mask), acc2);
        }
        _mm256_maskstore_ps(y + j, mask, acc);
        _mm256_maskstore_ps(y2 + j, mask, acc2);
    }
}

MG_DEFINE_ATTEND_ROW(float, f, __attribute__((target("avx2,fma"))), mg_attend_row_f_avx2, mg_sumrows_f_avx2,
                     mg_sumrows_pair_f_avx2, mg_softmax_row_f_avx2)
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
    if (mg_decode_has_avx2()) return mg_softmax_exp_f_avx2(x, e, z, n, ft, shift, lo, sx);
#endif
    return mg_softmax_exp_f_generic(x, e, z, n, ft, shift, lo, sx);
}

static inline void mg_attend_row_f(float *restrict y, float *restrict att, const float *restrict pat_rows,
                                   const float *restrict q, const float *restrict kt, const float *restrict vc,
                                   const int *head_type, const double *mix, ptrdiff_t H, ptrdiff_t d, ptrdiff_t T,
                                   ptrdiff_t C, ptrdiff_t nk) {
#ifdef MG_HAVE_AVX2_PATH
    if (mg_decode_has_avx2()) {
        mg_attend_row_f_avx2(y, att, pat_rows, q, kt, vc, head_type, mix, H, d, T, C, nk);
        return;
    }
#endif
    mg_attend_row_f_generic(y, att, pat_rows, q, kt, vc, head_type, mix, H, d, T, C, nk);
}

#endif
