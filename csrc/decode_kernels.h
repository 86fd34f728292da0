/* decode_kernels.h: the decoder's matrix products (float32 and float64), AVX2+FMA when the CPU has it.
 *
 * Why C: the fast path needs intrinsics and a runtime CPU check (wheels are built without
 * -march=native), which Cython cannot express. Used only by _decode.pyx.
 *
 * Why not BLAS: a decoded token is ~11 matrix-vector products of at most a few hundred rows of
 * 72..288 floats, and a re-prefill a few products of at most block_size rows. They are bound by
 * streaming the weights, which OpenBLAS does no better than this; what this saves is BLAS's
 * per-call path (wrapper, argument checks, packing) and, above all, its threads: decoding runs
 * beside the trainer, and limiting BLAS per call (threadpoolctl) restarts OpenBLAS's worker
 * threads at every restore, which then spin on the core the trainer needs (figures:
 * benchmarks/RESULTS.md).
 *
 * Dims: A (M, K) row-major with leading dimension lda (likewise B, C); x (K); y (M).
 *   mg_gemm_nt_f/d  C = A B^T        (B (N, K): a weight matrix; rows of A are inputs; one row
 *                                     of A is the matvec y = B x, mg_matvec_*_avx2 / _generic)
 *   mg_softmax_exp_f  the exponentials and sums of the sampling softmax
 *   mg_attend_row_f/d one query's attention over the key/value cache
 * The AVX2 kernels keep one 8-lane accumulator per output and reduce it once at the end; four
 * weight rows share each load of the input, and the gemm handles three inputs per pass over them.
 */
#ifndef MOLECULE_DECODE_KERNELS_H
#define MOLECULE_DECODE_KERNELS_H

#include <stddef.h>
#include <stdlib.h>

#include "codes.h" /* MG_HEAD_* */
#include "heads.h" /* a head's logits, the softmax row, mg_hsum256 */

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define MG_HAVE_AVX2_PATH 1

/* (hsum s0, hsum s1, hsum s2, hsum s3) in one vector: three hadds and one add instead of
 * four separate horizontal sums */
__attribute__((target("avx2,fma"))) static inline __m128 mg_hsum4(__m256 s0, __m256 s1, __m256 s2, __m256 s3) {
    __m256 a = _mm256_hadd_ps(s0, s1);  /* s0[01] s0[23] s1[01] s1[23] | upper halves alike */
    __m256 b = _mm256_hadd_ps(s2, s3);
    __m256 c = _mm256_hadd_ps(a, b);    /* s0[0..3] s1[0..3] s2[0..3] s3[0..3] | s0[4..7] ... */
    return _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}

/* y = A x, four rows of A per pass */
__attribute__((target("avx2,fma"))) static void mg_matvec_f_avx2(float *restrict y, const float *restrict A,
                                                                  const float *restrict x, ptrdiff_t M,
                                                                  ptrdiff_t K, ptrdiff_t lda) {
    ptrdiff_t i = 0, K8 = K & ~(ptrdiff_t)7;
    for (; i + 4 <= M; i += 4) {
        const float *a0 = A + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
               s3 = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + k), xv, s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + k), xv, s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + k), xv, s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + k), xv, s3);
        }
        if (K8 == K) {
            _mm_storeu_ps(y + i, mg_hsum4(s0, s1, s2, s3));
            continue;
        }
        float r0 = mg_hsum256(s0), r1 = mg_hsum256(s1), r2 = mg_hsum256(s2), r3 = mg_hsum256(s3);
        for (ptrdiff_t k = K8; k < K; k++) {
            r0 += a0[k] * x[k];
            r1 += a1[k] * x[k];
            r2 += a2[k] * x[k];
            r3 += a3[k] * x[k];
        }
        y[i] = r0;
        y[i + 1] = r1;
        y[i + 2] = r2;
        y[i + 3] = r3;
    }
    for (; i < M; i++) {
        const float *a = A + i * lda;
        __m256 s = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(x + k), s);
        float r = mg_hsum256(s);
        for (ptrdiff_t k = K8; k < K; k++) r += a[k] * x[k];
        y[i] = r;
    }
}

/* y0 = B x0 and y1 = B x1 in one pass over B (four rows of B at a time) */
__attribute__((target("avx2,fma"))) static void mg_matvec2_f_avx2(float *restrict y0, float *restrict y1,
                                                                   const float *restrict B,
                                                                   const float *restrict x0,
                                                                   const float *restrict x1, ptrdiff_t N,
                                                                   ptrdiff_t K, ptrdiff_t ldb) {
    ptrdiff_t j = 0, K8 = K & ~(ptrdiff_t)7;
    for (; j + 4 <= N; j += 4) {
        const float *b0 = B + j * ldb, *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
        __m256 s00 = _mm256_setzero_ps(), s01 = _mm256_setzero_ps(), s02 = _mm256_setzero_ps(),
               s03 = _mm256_setzero_ps(), s10 = _mm256_setzero_ps(), s11 = _mm256_setzero_ps(),
               s12 = _mm256_setzero_ps(), s13 = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) {
            __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k), w;
            w = _mm256_loadu_ps(b0 + k);
            s00 = _mm256_fmadd_ps(w, u, s00);
            s10 = _mm256_fmadd_ps(w, v, s10);
            w = _mm256_loadu_ps(b1 + k);
            s01 = _mm256_fmadd_ps(w, u, s01);
            s11 = _mm256_fmadd_ps(w, v, s11);
            w = _mm256_loadu_ps(b2 + k);
            s02 = _mm256_fmadd_ps(w, u, s02);
            s12 = _mm256_fmadd_ps(w, v, s12);
            w = _mm256_loadu_ps(b3 + k);
            s03 = _mm256_fmadd_ps(w, u, s03);
            s13 = _mm256_fmadd_ps(w, v, s13);
        }
        if (K8 == K) {
            _mm_storeu_ps(y0 + j, mg_hsum4(s00, s01, s02, s03));
            _mm_storeu_ps(y1 + j, mg_hsum4(s10, s11, s12, s13));
            continue;
        }
        float r00 = mg_hsum256(s00), r01 = mg_hsum256(s01), r02 = mg_hsum256(s02), r03 = mg_hsum256(s03);
        float r10 = mg_hsum256(s10), r11 = mg_hsum256(s11), r12 = mg_hsum256(s12), r13 = mg_hsum256(s13);
        for (ptrdiff_t k = K8; k < K; k++) {
            r00 += b0[k] * x0[k];
            r01 += b1[k] * x0[k];
            r02 += b2[k] * x0[k];
            r03 += b3[k] * x0[k];
            r10 += b0[k] * x1[k];
            r11 += b1[k] * x1[k];
            r12 += b2[k] * x1[k];
            r13 += b3[k] * x1[k];
        }
        y0[j] = r00;
        y0[j + 1] = r01;
        y0[j + 2] = r02;
        y0[j + 3] = r03;
        y1[j] = r10;
        y1[j + 1] = r11;
        y1[j + 2] = r12;
        y1[j + 3] = r13;
    }
    for (; j < N; j++) {
        const float *b = B + j * ldb;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) {
            __m256 w = _mm256_loadu_ps(b + k);
            s0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0 + k), s0);
            s1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x1 + k), s1);
        }
        float r0 = mg_hsum256(s0), r1 = mg_hsum256(s1);
        for (ptrdiff_t k = K8; k < K; k++) {
            r0 += b[k] * x0[k];
            r1 += b[k] * x1[k];
        }
        y0[j] = r0;
        y1[j] = r1;
    }
}

/* y_r = B x_r for r = 0, 1, 2 in one pass over B (four rows of B at a time: 12 accumulators,
 * 7 loads per 12 FMAs; the prefill's products are FMA-bound, not bandwidth-bound) */
__attribute__((target("avx2,fma"))) static void mg_matvec3_f_avx2(float *restrict y0, float *restrict y1,
                                                                   float *restrict y2, const float *restrict B,
                                                                   const float *restrict x0,
                                                                   const float *restrict x1,
                                                                   const float *restrict x2, ptrdiff_t N,
                                                                   ptrdiff_t K, ptrdiff_t ldb) {
    ptrdiff_t j = 0, K8 = K & ~(ptrdiff_t)7;
    for (; j + 4 <= N; j += 4) {
        const float *b[4] = {B + j * ldb, B + (j + 1) * ldb, B + (j + 2) * ldb, B + (j + 3) * ldb};
        __m256 s[3][4];
        for (int r = 0; r < 3; r++)
            for (int c = 0; c < 4; c++) s[r][c] = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) {
            __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k), t = _mm256_loadu_ps(x2 + k);
            for (int c = 0; c < 4; c++) {
                __m256 w = _mm256_loadu_ps(b[c] + k);
                s[0][c] = _mm256_fmadd_ps(w, u, s[0][c]);
                s[1][c] = _mm256_fmadd_ps(w, v, s[1][c]);
                s[2][c] = _mm256_fmadd_ps(w, t, s[2][c]);
            }
        }
        float *y[3] = {y0, y1, y2};
        const float *x[3] = {x0, x1, x2};
        if (K8 == K) {
            for (int r = 0; r < 3; r++) _mm_storeu_ps(y[r] + j, mg_hsum4(s[r][0], s[r][1], s[r][2], s[r][3]));
            continue;
        }
        for (int r = 0; r < 3; r++)
            for (int c = 0; c < 4; c++) {
                float acc = mg_hsum256(s[r][c]);
                for (ptrdiff_t k = K8; k < K; k++) acc += b[c][k] * x[r][k];
                y[r][j + c] = acc;
            }
    }
    if (j < N) {
        mg_matvec2_f_avx2(y0 + j, y1 + j, B + j * ldb, x0, x1, N - j, K, ldb);
        mg_matvec_f_avx2(y2 + j, B + j * ldb, x2, N - j, K, ldb);
    }
}
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
 *   pattern logits p_j = W_pattern[j] . h_h from the transposed pattern matrix pat[h] (d, T);
 *   the head's logits and their softmax over j < nk (heads.h, as in training); y_h = sum_j att_j v_j.
 * Each is a sum of scaled rows (SUMROWS: element j accumulates its terms in order, as axpys
 * would); heads go in pairs, and a pair's values are summed in one pass (SUMROWS_PAIR: twice the
 * independent sums per row of the cache, the same arithmetic). head_type: MG_HEAD_* codes
 * (codes.h). att: scratch of 2 T elements (a pair's weights at att and att + T); pat_out: nk.
 * One body for both element types and both instruction sets. */
#define MG_DEFINE_ATTEND_ROW(T, SUFFIX, ATTR, NAME, SUMROWS, SUMROWS_PAIR, SOFTMAX)                \
    ATTR static void NAME(T *restrict y, T *restrict att, T *restrict pat_out, const T *restrict q, \
                          const T *restrict hrow, const T *restrict kt, const T *restrict vc,      \
                          const T *const *pat, const int *head_type, const double *mix,            \
                          ptrdiff_t H, ptrdiff_t d, ptrdiff_t TT, ptrdiff_t C, ptrdiff_t nk) {     \
        const T scale = (T)(1.0 / __builtin_sqrt((double)d));                                     \
        for (ptrdiff_t h0 = 0; h0 < H; h0 += 2) {                                                 \
            ptrdiff_t pair = h0 + 1 < H;                                                          \
            for (ptrdiff_t h = h0; h <= h0 + pair; h++) {                                         \
                T *a = att + (h - h0) * TT;                                                       \
                int kind = head_type[h];                                                          \
                if (kind != MG_HEAD_RRPRAM) SUMROWS(a, scale, q + h * d, kt + h * d * TT, TT, d, nk); \
                if (kind != MG_HEAD_CONTENT) SUMROWS(pat_out, (T)1, hrow + h * d, pat[h], TT, d, nk); \
                mg_head_logits_##SUFFIX(a, a, pat_out, nk, (T)mix[h], kind);                      \
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

/* ---- portable paths (also the float64 kernels: used by tests, not for speed) */

#define MG_DEFINE_DECODE_GENERIC(T, SUFFIX)                                                       \
    static void mg_matvec_##SUFFIX##_generic(T *restrict y, const T *restrict A, const T *restrict x, \
                                             ptrdiff_t M, ptrdiff_t K, ptrdiff_t lda) {          \
        for (ptrdiff_t i = 0; i < M; i++) {                                                       \
            const T *a = A + i * lda;                                                             \
            T s = 0;                                                                              \
            _Pragma("omp simd reduction(+ : s)")                                                  \
            for (ptrdiff_t k = 0; k < K; k++) s += a[k] * x[k];                                   \
            y[i] = s;                                                                             \
        }                                                                                         \
    }

MG_DEFINE_DECODE_GENERIC(float, f)
MG_DEFINE_DECODE_GENERIC(double, d)

static inline float mg_softmax_exp_f(float *restrict x, float *restrict e, const float *restrict z, ptrdiff_t n,
                                     float ft, float shift, float lo, float *sx) {
#ifdef MG_HAVE_AVX2_PATH
    if (mg_decode_has_avx2()) return mg_softmax_exp_f_avx2(x, e, z, n, ft, shift, lo, sx);
#endif
    return mg_softmax_exp_f_generic(x, e, z, n, ft, shift, lo, sx);
}

static inline void mg_attend_row_f(float *restrict y, float *restrict att, float *restrict pat_out,
                                   const float *restrict q, const float *restrict hrow, const float *restrict kt,
                                   const float *restrict vc, const float *const *pat, const int *head_type,
                                   const double *mix, ptrdiff_t H, ptrdiff_t d, ptrdiff_t T, ptrdiff_t C,
                                   ptrdiff_t nk) {
#ifdef MG_HAVE_AVX2_PATH
    if (mg_decode_has_avx2()) {
        mg_attend_row_f_avx2(y, att, pat_out, q, hrow, kt, vc, pat, head_type, mix, H, d, T, C, nk);
        return;
    }
#endif
    mg_attend_row_f_generic(y, att, pat_out, q, hrow, kt, vc, pat, head_type, mix, H, d, T, C, nk);
}

/* Rows of B per cache block of mg_gemm_nt_f: a multiple of 4 holding about 16 KB (L1 is 32 KB
 * and the three input rows of a pass share it; 8 and 32 KB measured the same). */
#ifndef MG_GEMM_BLOCK_BYTES
#define MG_GEMM_BLOCK_BYTES 16384
#endif
/* How many blocks ahead mg_gemm_nt_f prefetches weight rows into L2 (0: off). At B = 16 rows of
 * the larger config 1 measured best (no prefetch 1,980-2,040 tok/s, 1: 2,160-2,310, 2 and 3 in
 * between; CPU time, shared machine). */
#ifndef MG_GEMM_PREFETCH
#define MG_GEMM_PREFETCH 1
#endif
static inline ptrdiff_t mg_gemm_block_rows(ptrdiff_t K) {
    ptrdiff_t nb = (ptrdiff_t)(MG_GEMM_BLOCK_BYTES / sizeof(float)) / (K > 0 ? K : 1);
    nb &= ~(ptrdiff_t)3;
    return nb < 4 ? 4 : nb;
}

/* C (M, N) = A (M, K) B^T, B (N, K): row i of C is B a_i. Every element has the arithmetic of
 * the matvec (the same 4-row blocks of B counted from its row 0, the same accumulators and
 * final sums), so a row of this product is bit-identical to the matvec of that row: a batched
 * decode step gives each sequence the logits it gets alone. B is walked in blocks of
 * mg_gemm_block_rows rows (a multiple of 4, so the 4-row blocks do not move) and every input
 * row passes over a block while it is in L1: B is read from memory once, not once per 3 rows. */
static inline void mg_gemm_nt_f(float *restrict C, const float *restrict A, const float *restrict B, ptrdiff_t M,
                                ptrdiff_t N, ptrdiff_t K, ptrdiff_t lda, ptrdiff_t ldb, ptrdiff_t ldc) {
#ifdef MG_HAVE_AVX2_PATH
    if (mg_decode_has_avx2()) {
        ptrdiff_t nb = M > 3 ? mg_gemm_block_rows(K) : N;
        for (ptrdiff_t j0 = 0; j0 < N; j0 += nb) {
            ptrdiff_t n = N - j0 < nb ? N - j0 : nb, i = 0;
            const float *Bj = B + j0 * ldb;
            float *Cj = C + j0;
            if (MG_GEMM_PREFETCH && M > 3) /* a block ahead on its way to L2 while the inputs pass over this one */
                for (ptrdiff_t r = j0 + MG_GEMM_PREFETCH * nb; r < j0 + (MG_GEMM_PREFETCH + 1) * nb && r < N; r++)
                    for (ptrdiff_t k = 0; k < K; k += 16) _mm_prefetch((const char *)(B + r * ldb + k), _MM_HINT_T1);
            for (; i + 3 <= M; i += 3)
                mg_matvec3_f_avx2(Cj + i * ldc, Cj + (i + 1) * ldc, Cj + (i + 2) * ldc, Bj, A + i * lda,
                                  A + (i + 1) * lda, A + (i + 2) * lda, n, K, ldb);
            if (i + 2 <= M) {
                mg_matvec2_f_avx2(Cj + i * ldc, Cj + (i + 1) * ldc, Bj, A + i * lda, A + (i + 1) * lda, n, K, ldb);
                i += 2;
            }
            if (i < M) mg_matvec_f_avx2(Cj + i * ldc, Bj, A + i * lda, n, K, ldb);
        }
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < M; i++) mg_matvec_f_generic(C + i * ldc, B, A + i * lda, N, K, ldb);
}

static inline void mg_gemm_nt_d(double *restrict C, const double *restrict A, const double *restrict B, ptrdiff_t M,
                                ptrdiff_t N, ptrdiff_t K, ptrdiff_t lda, ptrdiff_t ldb, ptrdiff_t ldc) {
    for (ptrdiff_t i = 0; i < M; i++) mg_matvec_d_generic(C + i * ldc, B, A + i * lda, N, K, ldb);
}

#endif
