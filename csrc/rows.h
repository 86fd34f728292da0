/* rows.h: row reductions for softmax, its backward and RMSNorm.
 *
 * Why C: a sum over a row only vectorizes if the compiler may reorder it, and a reordering it
 * chooses can differ between the places a function is inlined (the training extension and the
 * decoder's), so the same row would round differently in each. The sums here fix their own
 * order (MG_DEFINE_ROW_SUM), so every build and caller computes the same bits and the loops
 * still run on vectors. The max needs no order (it is exact): `omp simd` grants the reordering
 * there (built with -fopenmp-simd; -ffast-math would grant it everywhere).
 * float32 exponentials are attention.h's mg_row_exp_f; double rows keep libm's exp (the fixture's precision).
 */
#ifndef MOLECULE_ROWS_H
#define MOLECULE_ROWS_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "fastmath.h"

/* 16-byte vectors: the baseline x86-64 build's own width (wider ones would go through memory) */
typedef float mg_rows_v4f __attribute__((vector_size(16)));
typedef double mg_rows_v2d __attribute__((vector_size(16)));

/* NAME(x, y, n): sum over j < n of TERM, in a fixed order: two running vector sums of W lanes
 * take alternate vectors of W elements, what is left (at most two vectors, the last zero-padded)
 * goes to the first, then the two are added and their lanes halved pairwise. TERM reads the
 * vector a (from x) and, for a dot product, b (from y). */
#define MG_DEFINE_ROW_SUM(T, VT, W, NAME, TERM, LOAD_B)                                           \
    static inline T NAME(const T *restrict x, const T *restrict y, ptrdiff_t n) {                 \
        VT s0, s1, a, b;                                                                          \
        memset(&s0, 0, sizeof s0);                                                                \
        memset(&s1, 0, sizeof s1);                                                                \
        (void)y;                                                                                  \
        ptrdiff_t j = 0;                                                                          \
        for (; j + 2 * W <= n; j += 2 * W) {                                                      \
            memcpy(&a, x + j, sizeof a);                                                          \
            LOAD_B(b, y + j, W);                                                                  \
            s0 += TERM;                                                                           \
            memcpy(&a, x + j + W, sizeof a);                                                      \
            LOAD_B(b, y + j + W, W);                                                              \
            s1 += TERM;                                                                           \
        }                                                                                         \
        for (; j < n; j += W) { /* at most two more vectors, the last zero-padded */              \
            ptrdiff_t m = n - j < W ? n - j : W;                                                  \
            memset(&a, 0, sizeof a);                                                              \
            memcpy(&a, x + j, (size_t)m * sizeof(T));                                             \
            LOAD_B(b, y + j, m);                                                                  \
            s0 += TERM;                                                                           \
        }                                                                                         \
        s0 += s1;                                                                                 \
        T lanes[W];                                                                               \
        memcpy(lanes, &s0, sizeof lanes);                                                         \
        for (int w = W / 2; w >= 1; w /= 2)                                                       \
            for (int l = 0; l < w; l++) lanes[l] += lanes[l + w];                                 \
        return lanes[0];                                                                          \
    }
#define MG_ROWS_NO_B(b, src, m) (void)b
#define MG_ROWS_LOAD_B(b, src, m)                                                                 \
    do {                                                                                          \
        memset(&b, 0, sizeof b);                                                                  \
        memcpy(&b, src, (size_t)(m) * sizeof(b[0]));                                              \
    } while (0)
MG_DEFINE_ROW_SUM(float, mg_rows_v4f, 4, mg_row_sum_f, a, MG_ROWS_NO_B)
MG_DEFINE_ROW_SUM(double, mg_rows_v2d, 2, mg_row_sum_d, a, MG_ROWS_NO_B)
MG_DEFINE_ROW_SUM(float, mg_rows_v4f, 4, mg_row_dot_sum_f, a * b, MG_ROWS_LOAD_B)
MG_DEFINE_ROW_SUM(double, mg_rows_v2d, 2, mg_row_dot_sum_d, a * b, MG_ROWS_LOAD_B)

#define MG_DEFINE_ROWS(T, SUFFIX)                                                                 \
    /* max_j x[j], n >= 1 */                                                                      \
    static inline T mg_row_max_##SUFFIX(const T *restrict x, ptrdiff_t n) {                      \
        T m = x[0];                                                                               \
        _Pragma("omp simd reduction(max : m)")                                                    \
        for (ptrdiff_t j = 1; j < n; j++) m = x[j] > m ? x[j] : m;                                \
        return m;                                                                                 \
    }                                                                                             \
    /* sum_j a[j] b[j] */                                                                         \
    static inline T mg_row_dot_##SUFFIX(const T *restrict a, const T *restrict b, ptrdiff_t n) { \
        return mg_row_dot_sum_##SUFFIX(a, b, n);                                                  \
    }

MG_DEFINE_ROWS(float, f)
MG_DEFINE_ROWS(double, d)

/* x[j] = exp(x[j] - shift); returns sum_j x[j] (float32's exponentials: attention.h's mg_row_exp_f) */
static inline double mg_row_exp_sum_d(double *restrict x, ptrdiff_t n, double shift) {
    for (ptrdiff_t j = 0; j < n; j++) x[j] = exp(x[j] - shift);
    return mg_row_sum_d(x, NULL, n);
}

#endif
