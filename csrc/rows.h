/* rows.h: row reductions for softmax and its backward, vectorized with `omp simd`.
 *
 * Why C: a sum or max over a row only vectorizes if the compiler may reorder it; `#pragma omp
 * simd reduction` grants that for these loops alone (built with -fopenmp-simd), where
 * -ffast-math would grant it everywhere and change results we compare to the reference.
 * float rows use mg_expf (fastmath.h); double rows keep libm's exp (the fixture's precision).
 */
#ifndef MOLECULE_ROWS_H
#define MOLECULE_ROWS_H

#include <math.h>
#include <stddef.h>

#include "fastmath.h"

#define MG_DEFINE_ROWS(T, SUFFIX, EXP)                                                            \
    /* max_j x[j], n >= 1 */                                                                      \
    static inline T mg_row_max_##SUFFIX(const T *restrict x, ptrdiff_t n) {                      \
        T m = x[0];                                                                               \
        _Pragma("omp simd reduction(max : m)")                                                    \
        for (ptrdiff_t j = 1; j < n; j++) m = x[j] > m ? x[j] : m;                                \
        return m;                                                                                 \
    }                                                                                             \
    /* x[j] = exp(x[j] - shift); returns sum_j x[j] */                                            \
    static inline T mg_row_exp_sum_##SUFFIX(T *restrict x, ptrdiff_t n, T shift) {               \
        T s = 0;                                                                                  \
        for (ptrdiff_t j = 0; j < n; j++) x[j] = EXP(x[j] - shift); /* two loops: each vectorizes */ \
        _Pragma("omp simd reduction(+ : s)")                                                      \
        for (ptrdiff_t j = 0; j < n; j++) s += x[j];                                              \
        return s;                                                                                 \
    }                                                                                             \
    /* sum_j a[j] b[j] */                                                                         \
    static inline T mg_row_dot_##SUFFIX(const T *restrict a, const T *restrict b, ptrdiff_t n) { \
        T s = 0;                                                                                  \
        _Pragma("omp simd reduction(+ : s)")                                                      \
        for (ptrdiff_t j = 0; j < n; j++) s += a[j] * b[j];                                       \
        return s;                                                                                 \
    }

MG_DEFINE_ROWS(float, f, mg_expf)
MG_DEFINE_ROWS(double, d, exp)

#endif
