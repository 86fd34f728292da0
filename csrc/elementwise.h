/* elementwise.h: the MLP gate's and RoPE's row loops, in C for `restrict`.
 *
 * Why C: these loops touch up to five arrays; without `restrict` (which Cython cannot write) GCC
 * must assume they alias, keeps a branch per element and does not vectorize. With it they become
 * compare + mask + multiply over SSE2 vectors (figures: benchmarks/RESULTS.md). The ops that
 * call them are _ops.pxd's (forward) and _kernels.pxi's (backward).
 *
 *   gate forward : out = act(g) * u
 *   gate backward: dg += dout * u * act'(g);  du += dout * act(g)      act = relu
 *   (the _set variant writes dg, du: the tape marks when they have no other contribution)
 * (silu stays in Cython: it is dominated by exp, not by aliasing.)
 */
#ifndef MOLECULE_ELEMENTWISE_H
#define MOLECULE_ELEMENTWISE_H

#include <stddef.h>

#define MG_DEFINE_RELU_GATE(T, SUFFIX)                                                            \
    static inline void mg_relu_gate_forward_##SUFFIX(T *restrict out, const T *restrict g,       \
                                                     const T *restrict u, ptrdiff_t n) {          \
        for (ptrdiff_t i = 0; i < n; i++) {                                                       \
            T gi = g[i];                                                                          \
            out[i] = (gi > (T)0 ? gi : (T)0) * u[i];                                              \
        }                                                                                         \
    }                                                                                             \
    static inline void mg_relu_gate_backward_##SUFFIX(T *restrict dg, T *restrict du,            \
                                                      const T *restrict dout, const T *restrict g, \
                                                      const T *restrict u, ptrdiff_t n) {         \
        for (ptrdiff_t i = 0; i < n; i++) {                                                       \
            T on = (T)(g[i] > (T)0); /* GCC 12 vectorizes only this form here */                \
            T pass = dout[i] * on;                                                                \
            dg[i] += pass * u[i];                                                                 \
            du[i] += pass * g[i];                                                                 \
        }                                                                                         \
    }                                                                                             \
    /* the same, writing dg and du (their only contribution: no zeroing before) */                \
    static inline void mg_relu_gate_backward_set_##SUFFIX(T *restrict dg, T *restrict du,        \
                                                          const T *restrict dout,                 \
                                                          const T *restrict g,                    \
                                                          const T *restrict u, ptrdiff_t n) {     \
        for (ptrdiff_t i = 0; i < n; i++) {                                                       \
            T on = (T)(g[i] > (T)0);                                                              \
            T pass = dout[i] * on;                                                                \
            dg[i] = pass * u[i];                                                                  \
            du[i] = pass * g[i];                                                                  \
        }                                                                                         \
    }

MG_DEFINE_RELU_GATE(float, f)
MG_DEFINE_RELU_GATE(double, d)

/* RoPE on one row of all heads: pair p = (x[2p], x[2p+1]), p < np (= H d/2), turned by the angle
 * whose cosine and sine are c[p], s[p] (the position's table repeated once per head, so one
 * loop runs the whole row and vectorizes, instead of d/2 = 9 pairs at a time).
 *   forward : y = R x
 *   backward: dx += R^T dy   (the rotation is orthogonal) */
#define MG_DEFINE_ROPE_ROW(T, SUFFIX)                                                             \
    static inline void mg_rope_row_##SUFFIX(T *restrict y, const T *restrict x, const T *restrict c, \
                                            const T *restrict s, ptrdiff_t np) {                  \
        for (ptrdiff_t p = 0; p < np; p++) {                                                      \
            T a = x[2 * p], b = x[2 * p + 1];                                                     \
            y[2 * p] = a * c[p] - b * s[p];                                                       \
            y[2 * p + 1] = a * s[p] + b * c[p];                                                   \
        }                                                                                         \
    }                                                                                             \
    static inline void mg_rope_row_back_##SUFFIX(T *restrict dx, const T *restrict dy,             \
                                                 const T *restrict c, const T *restrict s,         \
                                                 ptrdiff_t np) {                                  \
        for (ptrdiff_t p = 0; p < np; p++) {                                                      \
            T a = dy[2 * p], b = dy[2 * p + 1];                                                   \
            dx[2 * p] += a * c[p] + b * s[p];                                                     \
            dx[2 * p + 1] += b * c[p] - a * s[p];                                                 \
        }                                                                                         \
    }

MG_DEFINE_ROPE_ROW(float, f)
MG_DEFINE_ROPE_ROW(double, d)

#endif
