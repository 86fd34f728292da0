/* attention.h: the products of causal attention for one (head, sequence) block, lower triangle only.
 *
 * Why C: these are products of at most block_size x block_size x head_dim (96 x 96 x 18 at the
 * default config), where a BLAS call spends as long in its fixed path (argument checks, packing)
 * as in arithmetic, and computes the masked upper triangle too. Here each product skips the
 * blocks above the diagonal (about half the work) and runs register-blocked loops written with
 * GCC vector extensions, compiled three times: for AVX-512 (where the run-time probe chose it for
 * the products), AVX2+FMA (chosen at run time when the CPU has it; wheels are built without
 * -march=native) and the baseline x86-64 (SSE2); every width gives the same products' bits.
 *
 * Dims: n = positions of the sequence (n <= T), d = head dim; row-major with leading dimensions.
 *   mg_tri_nt   S[t, j]  = alpha sum_c A[t, c] B[j, c]            for j <= t   (Q K^T, dY V^T)
 *   mg_tri_nn   Y[t, c] (+)= alpha sum_{j <= t} P[t, j] B[j, c]                 (A V, dL K)
 *   mg_tri_tn   Y[j, c] += alpha sum_{t >= j} P[t, j] B[t, c]                   (A^T dY, dL^T Q)
 *   mg_causal_softmax           A = causal softmax of the head's logits, row by row (n, n)
 *   mg_causal_softmax_backward  dA := dl = A (dA - rowsum(A dA)) and its rrpram/hybrid parts
 * mg_tri_nt may also write entries above the diagonal of S (up to column n - 1; they hold the
 * same dot products, nobody reads them). mg_tri_nn and mg_tri_tn read P's entries above the
 * diagonal inside each 4 x 4 diagonal block, which must be zero (the attention weights and
 * their softmax gradient are zeroed there). `scratch` holds mg_tri_scratch(n, d) elements of
 * the buffer's type (padded copies of B, so every vector load is whole; the softmax's row).
 *
 * The causal softmax of a block lives here too, for the same AVX2 build of its exponentials
 * (float32: mg_expf's method, csrc/fastmath.h, 8 lanes at a time on the AVX2 path; float64:
 * libm's exp, as everywhere). Its rows are heads.h's (a head's logits, the softmax row); the
 * AVX2 float32 forward fuses them into three passes.
 *
 * The forward kernels also take a range of query rows t0 <= t < t1 (mg_tri_nt_rows with the
 * keys given transposed, mg_tri_nn_rows with the values given padded, mg_causal_softmax with
 * leading dimensions): a training block is rows 0 .. n, and the decoder runs the same kernels
 * for its rows over the key/value cache (one row: wider column blocks, the same sums).
 *
 * Numbers: the same products as the reference, summed in a different order (and with FMA on
 * the AVX2 path): float64 results match the BLAS path to ~1e-15 relative.
 */
#ifndef MOLECULE_ATTENTION_H
#define MOLECULE_ATTENTION_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "codes.h"    /* MG_HEAD_* */
#include "fastmath.h"
#include "heads.h"    /* a head's logits and the softmax row, shared with decoding */

#define MG_TRI_R 4 /* rows per register block */

/* elements of scratch the mg_tri_* kernels need for n positions of head dim d (both types:
 * sized for the narrower float lanes) */
static inline size_t mg_tri_scratch(ptrdiff_t n, ptrdiff_t d) {
    /* np: mg_tri_nt's columns, two vectors of 16 floats (AVX-512) a block */
    size_t np = (size_t)(n + 31) / 32 * 32, dp = (size_t)(d + 15) / 16 * 16;
    size_t a = (size_t)d * np, b = (size_t)n * dp;
    return a > b ? a : b;
}

/* dst[0:n] = src[0:n] for short rows: whole vectors of VT, then single elements (a variable-size
 * memcpy is a libc call per row, which cost more than the copy itself for rows of 18 floats) */
#define MG_COPY_ROW(T, VT, W, dst, src, n)                                                        \
    do {                                                                                          \
        ptrdiff_t c_ = 0;                                                                         \
        for (; c_ + W <= (n); c_ += W) memcpy((dst) + c_, (src) + c_, sizeof(VT));                \
        for (; c_ < (n); c_++) (dst)[c_] = (src)[c_];                                             \
    } while (0)

/* the same, then zeros up to `width` (a row of a zero-padded copy: whole vector loads later) */
#define MG_COPY_ROW_PADDED(T, VT, W, dst, src, n, width)                                          \
    do {                                                                                          \
        MG_COPY_ROW(T, VT, W, dst, src, n);                                                       \
        for (ptrdiff_t z_ = (n); z_ < (width); z_++) (dst)[z_] = 0;                               \
    } while (0)

/* One position of a 4-row register block: acc[r][v] += q_r b_v for r < 4, v < NV, the NV vectors
 * b_v read from bsrc (each element's chain over the positions stays in order) */
#define MG_TRI_FMA4(T, VT, W, NV, acc, bsrc, q0, q1, q2, q3)                                      \
    do {                                                                                          \
        VT b_[NV];                                                                                \
        const T x_[4] = {(q0), (q1), (q2), (q3)};                                                 \
        _Pragma("GCC unroll 3") for (int v_ = 0; v_ < (NV); v_++) memcpy(&b_[v_], (bsrc) + v_ * W, sizeof(VT)); \
        _Pragma("GCC unroll 4") for (int r_ = 0; r_ < 4; r_++)                                    \
            _Pragma("GCC unroll 3") for (int v_ = 0; v_ < (NV); v_++) (acc)[r_][v_] += x_[r_] * b_[v_]; \
    } while (0)

/* One family of kernels for element type T with W lanes per 32-byte vector VT; ATTR selects the
 * target. Vector loads and stores go through memcpy (unaligned, and legal for any buffer). */
#define MG_DEFINE_TRI(T, VT, W, ATTR, NT, NN, TN)                                                 \
    /* one row t (columns j < nc, in blocks of NV vectors): S[j] = alpha sum_c a[c] BT[c, j] */   \
    __attribute__((always_inline)) ATTR static inline void NT##_row(                              \
        const int NV, T *restrict S, const T *restrict a, const T *restrict BT, ptrdiff_t ldbt,   \
        ptrdiff_t jc, ptrdiff_t nc, ptrdiff_t d, T alpha) {                                       \
        VT s[8];                                                                                  \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) s[v] = (VT){0};                      \
        for (ptrdiff_t c = 0; c < d; c++) {                                                       \
            T x = a[c];                                                                           \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                                \
                VT b;                                                                             \
                memcpy(&b, BT + c * ldbt + jc + v * W, sizeof b);                                 \
                s[v] += x * b;                                                                    \
            }                                                                                     \
        }                                                                                         \
        T out[8 * W];                                                                             \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                                    \
            VT u = s[v] * alpha;                                                                  \
            memcpy(out + v * W, &u, sizeof u);                                                    \
        }                                                                                         \
        ptrdiff_t m = nc - jc < NV * W ? nc - jc : NV * W;                                        \
        for (ptrdiff_t l = 0; l < m; l++) S[jc + l] = out[l];                                     \
    }                                                                                             \
                                                                                                  \
    /* rows t0 <= t < t1 of S[t, j] = alpha <A_t, B_j> for j <= t, B given transposed (BT (d,    \
     * ldbt), readable up to column round_up(t1, 2 W)); row t of S and A at (t - t0) lds, lda.  \
     * Every element is one chain of FMAs over c, then the scale: a row computed alone (the     \
     * decoder's, wide column blocks) equals the same row among others. */                      \
    ATTR static void NT##_rows(T *restrict S, ptrdiff_t lds, const T *restrict A, ptrdiff_t lda, \
                               const T *restrict BT, ptrdiff_t ldbt, ptrdiff_t t0, ptrdiff_t t1,  \
                               ptrdiff_t d, T alpha) {                                            \
        if (t1 - t0 == 1) {                                                                       \
            for (ptrdiff_t jc = 0; jc < t1;) {                                                    \
                ptrdiff_t left = (t1 - jc + W - 1) / W;                                           \
                if (left >= 8) { NT##_row(8, S, A, BT, ldbt, jc, t1, d, alpha); jc += 8 * W; }    \
                else if (left >= 4) { NT##_row(4, S, A, BT, ldbt, jc, t1, d, alpha); jc += 4 * W; } \
                else if (left >= 2) { NT##_row(2, S, A, BT, ldbt, jc, t1, d, alpha); jc += 2 * W; } \
                else { NT##_row(1, S, A, BT, ldbt, jc, t1, d, alpha); jc += W; }                  \
            }                                                                                     \
            return;                                                                               \
        }                                                                                         \
        T out[MG_TRI_R][2 * W];                                                                   \
        for (ptrdiff_t tb = t0; tb < t1; tb += MG_TRI_R) {                                        \
            ptrdiff_t R = t1 - tb < MG_TRI_R ? t1 - tb : MG_TRI_R;                                \
            const T *Ab = A + (tb - t0) * lda;                                                    \
            /* column blocks of 2 W up to the diagonal: 8 independent sums hide FMA latency */    \
            for (ptrdiff_t jc = 0; jc < tb + R; jc += 2 * W) {                                    \
                VT s[MG_TRI_R][2];                                                                \
                memset(s, 0, sizeof s);                                                           \
                if (R == MG_TRI_R) {                                                              \
                    const T *a0 = Ab, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;             \
                    for (ptrdiff_t c = 0; c < d; c++)                                             \
                        MG_TRI_FMA4(T, VT, W, 2, s, BT + c * ldbt + jc, a0[c], a1[c], a2[c], a3[c]); \
                } else {                                                                          \
                    for (ptrdiff_t r = 0; r < R; r++)                                             \
                        for (ptrdiff_t c = 0; c < d; c++) {                                       \
                            VT b0, b1;                                                            \
                            memcpy(&b0, BT + c * ldbt + jc, sizeof b0);                           \
                            memcpy(&b1, BT + c * ldbt + jc + W, sizeof b1);                       \
                            s[r][0] += Ab[r * lda + c] * b0;                                      \
                            s[r][1] += Ab[r * lda + c] * b1;                                      \
                        }                                                                         \
                }                                                                                 \
                ptrdiff_t m = t1 - jc < 2 * W ? t1 - jc : 2 * W;                                  \
                for (ptrdiff_t r = 0; r < R; r++) {                                               \
                    VT u0 = s[r][0] * alpha, u1 = s[r][1] * alpha;                                \
                    T *row = S + (tb - t0 + r) * lds + jc;                                        \
                    if (m == 2 * W) {                                                             \
                        memcpy(row, &u0, sizeof u0);                                              \
                        memcpy(row + W, &u1, sizeof u1);                                          \
                    } else {                                                                      \
                        memcpy(out[r], &u0, sizeof u0);                                           \
                        memcpy(out[r] + W, &u1, sizeof u1);                                       \
                        for (ptrdiff_t l = 0; l < m; l++) row[l] = out[r][l];                     \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    ATTR static void NT(T *restrict S, ptrdiff_t lds, const T *restrict A, ptrdiff_t lda,        \
                        const T *restrict B, ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t d, T alpha,     \
                        T *restrict scratch) {                                                    \
        ptrdiff_t np = (n + 2 * W - 1) / (2 * W) * (2 * W);                                       \
        T *BT = scratch; /* (d, np): B transposed, zero columns past n */                         \
        for (ptrdiff_t c = 0; c < d; c++) {                                                       \
            for (ptrdiff_t j = 0; j < n; j++) BT[c * np + j] = B[j * ldb + c];                    \
            for (ptrdiff_t j = n; j < np; j++) BT[c * np + j] = 0;                                \
        }                                                                                         \
        NT##_rows(S, lds, A, lda, BT, np, 0, n, d, alpha);                                        \
    }                                                                                             \
                                                                                                  \
    /* rows t0 <= t < t1 of Y[t, c] (+)= alpha sum_{j <= t} P[t, j] B[j, c], B given with rows   \
     * readable to a whole number of vectors past d (Bp, row stride ldbp: a zero-padded copy, or \
     * the decoder's value cache); rows of Y and P at (t - t0) ldy, ldp. Every element is one    \
     * chain of FMAs over j (entries of P above the diagonal, inside the 4 x 4 diagonal blocks,  \
     * must be zero), then the scale: a row computed alone equals the same row among others. */ \
    /* one row t (columns c0 .. c0 + NV W of Y): NV chains over j <= t at once */                \
    __attribute__((always_inline)) ATTR static inline void NN##_row(                              \
        const int NV, T *restrict y, const T *restrict p, const T *restrict Bp, ptrdiff_t ldbp,   \
        ptrdiff_t t, ptrdiff_t c0, ptrdiff_t d, T alpha, int accumulate) {                        \
        VT acc[4];                                                                                \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[v] = (VT){0};                    \
        for (ptrdiff_t j = 0; j <= t; j++) {                                                      \
            T q = p[j];                                                                           \
            const T *bj = Bp + j * ldbp + c0;                                                     \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                                \
                VT b;                                                                             \
                memcpy(&b, bj + v * W, sizeof b);                                                 \
                acc[v] += q * b;                                                                  \
            }                                                                                     \
        }                                                                                         \
        T out[4 * W];                                                                             \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                                    \
            VT u = acc[v] * alpha;                                                                \
            memcpy(out + v * W, &u, sizeof u);                                                    \
        }                                                                                         \
        ptrdiff_t m = d - c0 < NV * W ? d - c0 : NV * W;                                          \
        if (accumulate)                                                                           \
            for (ptrdiff_t c = 0; c < m; c++) y[c0 + c] += out[c];                                \
        else                                                                                      \
            for (ptrdiff_t c = 0; c < m; c++) y[c0 + c] = out[c];                                 \
    }                                                                                             \
                                                                                                  \
    ATTR static void NN##_rows(T *restrict Y, ptrdiff_t ldy, const T *restrict P, ptrdiff_t ldp, \
                               const T *restrict Bp, ptrdiff_t ldbp, ptrdiff_t t0, ptrdiff_t t1,  \
                               ptrdiff_t d, T alpha, int accumulate) {                            \
        ptrdiff_t dp = (d + W - 1) / W * W;                                                       \
        if (t1 - t0 == 1) { /* one row (the decoder's, or a block's last): NN##_row */           \
            for (ptrdiff_t c0 = 0; c0 < dp;) {                                                    \
                ptrdiff_t left = (dp - c0) / W;                                                   \
                if (left >= 4) { NN##_row(4, Y, P, Bp, ldbp, t0, c0, d, alpha, accumulate); c0 += 4 * W; } \
                else if (left == 3) { NN##_row(3, Y, P, Bp, ldbp, t0, c0, d, alpha, accumulate); c0 += 3 * W; } \
                else if (left == 2) { NN##_row(2, Y, P, Bp, ldbp, t0, c0, d, alpha, accumulate); c0 += 2 * W; } \
                else { NN##_row(1, Y, P, Bp, ldbp, t0, c0, d, alpha, accumulate); c0 += W; }     \
            }                                                                                     \
            return;                                                                               \
        }                                                                                         \
        if ((t1 - t0) % MG_TRI_R == 1) { /* a lone last row: the one-row path, then the rest */  \
            NN##_rows(Y + (t1 - 1 - t0) * ldy, ldy, P + (t1 - 1 - t0) * ldp, ldp, Bp, ldbp, t1 - 1, t1, d, \
                      alpha, accumulate);                                                         \
            t1 -= 1;                                                                              \
        }                                                                                         \
        T out[MG_TRI_R][3 * W];                                                                   \
        for (ptrdiff_t tb = t0; tb < t1; tb += MG_TRI_R) {                                        \
            ptrdiff_t R = t1 - tb < MG_TRI_R ? t1 - tb : MG_TRI_R;                                \
            const T *Pb = P + (tb - t0) * ldp;                                                    \
            for (ptrdiff_t c0 = 0; c0 < dp; c0 += 3 * W) {                                        \
                ptrdiff_t nv = (dp - c0) / W < 3 ? (dp - c0) / W : 3;                             \
                VT acc[MG_TRI_R][3];                                                              \
                memset(acc, 0, sizeof acc);                                                       \
                if (R == MG_TRI_R && nv >= 2) { /* 4 rows of 3 vectors, or 2 (AVX-512's 32-wide head) */ \
                    const T *p0 = Pb, *p1 = p0 + ldp, *p2 = p1 + ldp, *p3 = p2 + ldp;             \
                    if (nv == 3)                                                                  \
                        for (ptrdiff_t j = 0; j < tb + MG_TRI_R; j++)                             \
                            MG_TRI_FMA4(T, VT, W, 3, acc, Bp + j * ldbp + c0, p0[j], p1[j], p2[j], p3[j]); \
                    else                                                                          \
                        for (ptrdiff_t j = 0; j < tb + MG_TRI_R; j++)                             \
                            MG_TRI_FMA4(T, VT, W, 2, acc, Bp + j * ldbp + c0, p0[j], p1[j], p2[j], p3[j]); \
                } else if (R == MG_TRI_R) {                                                       \
                    const T *p0 = Pb, *p1 = p0 + ldp, *p2 = p1 + ldp, *p3 = p2 + ldp;             \
                    for (ptrdiff_t v = 0; v < nv; v++)                                            \
                        for (ptrdiff_t j = 0; j < tb + MG_TRI_R; j++) {                           \
                            VT b;                                                                 \
                            memcpy(&b, Bp + j * ldbp + c0 + v * W, sizeof b);                     \
                            acc[0][v] += p0[j] * b;                                               \
                            acc[1][v] += p1[j] * b;                                               \
                            acc[2][v] += p2[j] * b;                                               \
                            acc[3][v] += p3[j] * b;                                               \
                        }                                                                         \
                } else {                                                                          \
                    for (ptrdiff_t r = 0; r < R; r++)                                             \
                        for (ptrdiff_t v = 0; v < nv; v++)                                        \
                            for (ptrdiff_t j = 0; j <= tb + r; j++) {                             \
                                VT b;                                                             \
                                memcpy(&b, Bp + j * ldbp + c0 + v * W, sizeof b);                 \
                                acc[r][v] += Pb[r * ldp + j] * b;                                 \
                            }                                                                     \
                }                                                                                 \
                for (ptrdiff_t r = 0; r < R; r++) {                                               \
                    for (ptrdiff_t v = 0; v < nv; v++) {                                          \
                        VT s = acc[r][v] * alpha;                                                 \
                        memcpy(out[r] + v * W, &s, sizeof s);                                     \
                    }                                                                             \
                    T *y = Y + (tb - t0 + r) * ldy + c0;                                          \
                    ptrdiff_t m = d - c0 < nv * W ? d - c0 : nv * W;                              \
                    if (accumulate)                                                               \
                        for (ptrdiff_t c = 0; c < m; c++) y[c] += out[r][c];                      \
                    else                                                                          \
                        for (ptrdiff_t c = 0; c < m; c++) y[c] = out[r][c];                       \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    /* row t of G heads at once (columns c0 .. c0 + NV W of each head's output, G NV <= 8): the    \
     * chains of NN##_row for each head, interleaved over j, so that G NV chains hide the FMA      \
     * latency one head's NV chains leave exposed. Each chain is NN##_row's: the same bits. */     \
    __attribute__((always_inline)) ATTR static inline void NN##_row_heads(                         \
        const int G, const int NV, T *restrict y, ptrdiff_t ldyh, const T *restrict p, ptrdiff_t ldph, \
        const T *restrict Bp, ptrdiff_t ldbh, ptrdiff_t ldbp, ptrdiff_t t, ptrdiff_t c0, ptrdiff_t d, \
        T alpha, int accumulate) {                                                                 \
        VT acc[8];                                                                                 \
        _Pragma("GCC unroll 8") for (int k = 0; k < G * NV; k++) acc[k] = (VT){0};                 \
        for (ptrdiff_t j = 0; j <= t; j++) {                                                       \
            _Pragma("GCC unroll 8") for (int g = 0; g < G; g++) {                                  \
                T q = p[g * ldph + j];                                                             \
                const T *bj = Bp + g * ldbh + j * ldbp + c0;                                       \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                             \
                    VT b;                                                                          \
                    memcpy(&b, bj + v * W, sizeof b);                                              \
                    acc[g * NV + v] += q * b;                                                      \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        ptrdiff_t m = d - c0 < NV * W ? d - c0 : NV * W;                                           \
        _Pragma("GCC unroll 8") for (int g = 0; g < G; g++) {                                      \
            T out[4 * W];                                                                          \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                                 \
                VT u = acc[g * NV + v] * alpha;                                                    \
                memcpy(out + v * W, &u, sizeof u);                                                 \
            }                                                                                      \
            T *yg = y + g * ldyh + c0;                                                             \
            if (accumulate)                                                                        \
                for (ptrdiff_t c = 0; c < m; c++) yg[c] += out[c];                                 \
            else                                                                                   \
                for (ptrdiff_t c = 0; c < m; c++) yg[c] = out[c];                                  \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* One row t (the decoder's query) of H heads: head h's output Y[h ldyh + c] (+)= alpha        \
     * sum_{j <= t} P[h ldph + j] Bp[h ldbh + j ldbp + c] for c < d, its values' rows readable to a \
     * whole number of vectors past d as in NN##_rows. Head by head it equals NN##_rows(t, t + 1) bit \
     * for bit; the heads' chains run interleaved, up to 8 vectors' chains at a time. */           \
    ATTR static void NN##_heads(T *restrict Y, ptrdiff_t ldyh, const T *restrict P, ptrdiff_t ldph, \
                               const T *restrict Bp, ptrdiff_t ldbh, ptrdiff_t ldbp, ptrdiff_t H,  \
                               ptrdiff_t t, ptrdiff_t d, T alpha, int accumulate) {                \
        ptrdiff_t dp = (d + W - 1) / W * W;                                                        \
        for (ptrdiff_t c0 = 0; c0 < dp;) {                                                         \
            ptrdiff_t nv = (dp - c0) / W < 4 ? (dp - c0) / W : 4;                                  \
            for (ptrdiff_t h = 0; h < H;) {                                                        \
                ptrdiff_t g = (8 / nv < H - h ? 8 / nv : H - h);                                   \
                T *y = Y + h * ldyh;                                                               \
                const T *p = P + h * ldph, *b = Bp + h * ldbh;                                     \
                if (nv == 1) {                                                                     \
                    if (g >= 8) { g = 8; NN##_row_heads(8, 1, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); } \
                    else if (g >= 4) { g = 4; NN##_row_heads(4, 1, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); } \
                    else if (g >= 2) { g = 2; NN##_row_heads(2, 1, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); } \
                    else NN##_row_heads(1, 1, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); \
                } else if (nv == 2) {                                                              \
                    if (g >= 4) { g = 4; NN##_row_heads(4, 2, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); } \
                    else if (g >= 2) { g = 2; NN##_row_heads(2, 2, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); } \
                    else NN##_row_heads(1, 2, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); \
                } else if (nv == 3) {                                                              \
                    if (g >= 2) { g = 2; NN##_row_heads(2, 3, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); } \
                    else NN##_row_heads(1, 3, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); \
                } else {                                                                           \
                    if (g >= 2) { g = 2; NN##_row_heads(2, 4, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); } \
                    else NN##_row_heads(1, 4, y, ldyh, p, ldph, b, ldbh, ldbp, t, c0, d, alpha, accumulate); \
                }                                                                                  \
                h += g;                                                                            \
            }                                                                                      \
            c0 += nv * W;                                                                          \
        }                                                                                          \
    }                                                                                              \
    ATTR static void NN(T *restrict Y, ptrdiff_t ldy, const T *restrict P, ptrdiff_t ldp,        \
                        const T *restrict B, ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t d, T alpha,     \
                        int accumulate, T *restrict scratch) {                                    \
        ptrdiff_t dp = (d + W - 1) / W * W;                                                       \
        T *Bp = scratch; /* (n, dp): B with zero columns past d */                                \
        for (ptrdiff_t j = 0; j < n; j++) {                                                       \
            MG_COPY_ROW_PADDED(T, VT, W, Bp + j * dp, B + j * ldb, d, dp);                        \
        }                                                                                         \
        NN##_rows(Y, ldy, P, ldp, Bp, dp, 0, n, d, alpha, accumulate);                            \
    }                                                                                             \
                                                                                                  \
    ATTR static void TN(T *restrict Y, ptrdiff_t ldy, const T *restrict P, ptrdiff_t ldp,        \
                        const T *restrict B, ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t d, T alpha,     \
                        T *restrict scratch) {                                                    \
        ptrdiff_t dp = (d + W - 1) / W * W;                                                       \
        T *Bp = scratch;                                                                          \
        for (ptrdiff_t t = 0; t < n; t++) {                                                       \
            MG_COPY_ROW_PADDED(T, VT, W, Bp + t * dp, B + t * ldb, d, dp);                    \
        }                                                                                         \
        T out[MG_TRI_R][3 * W];                                                                   \
        for (ptrdiff_t j0 = 0; j0 < n; j0 += MG_TRI_R) {                                          \
            ptrdiff_t R = n - j0 < MG_TRI_R ? n - j0 : MG_TRI_R;                                  \
            for (ptrdiff_t c0 = 0; c0 < dp; c0 += 3 * W) {                                        \
                ptrdiff_t nv = (dp - c0) / W < 3 ? (dp - c0) / W : 3;                             \
                VT acc[MG_TRI_R][3];                                                              \
                memset(acc, 0, sizeof acc);                                                       \
                if (R == MG_TRI_R && nv >= 2) { /* 4 rows of 3 vectors, or 2 */                   \
                    if (nv == 3)                                                                  \
                        for (ptrdiff_t t = j0; t < n; t++) {                                      \
                            const T *pt = P + t * ldp + j0;                                       \
                            MG_TRI_FMA4(T, VT, W, 3, acc, Bp + t * dp + c0, pt[0], pt[1], pt[2], pt[3]); \
                        }                                                                         \
                    else                                                                          \
                        for (ptrdiff_t t = j0; t < n; t++) {                                      \
                            const T *pt = P + t * ldp + j0;                                       \
                            MG_TRI_FMA4(T, VT, W, 2, acc, Bp + t * dp + c0, pt[0], pt[1], pt[2], pt[3]); \
                        }                                                                         \
                } else if (R == MG_TRI_R) {                                                       \
                    for (ptrdiff_t v = 0; v < nv; v++)                                            \
                        for (ptrdiff_t t = j0; t < n; t++) {                                      \
                            VT b;                                                                 \
                            const T *pt = P + t * ldp + j0;                                       \
                            memcpy(&b, Bp + t * dp + c0 + v * W, sizeof b);                       \
                            acc[0][v] += pt[0] * b;                                               \
                            acc[1][v] += pt[1] * b;                                               \
                            acc[2][v] += pt[2] * b;                                               \
                            acc[3][v] += pt[3] * b;                                               \
                        }                                                                         \
                } else {                                                                          \
                    for (ptrdiff_t r = 0; r < R; r++)                                             \
                        for (ptrdiff_t v = 0; v < nv; v++)                                        \
                            for (ptrdiff_t t = j0 + r; t < n; t++) {                              \
                                VT b;                                                             \
                                memcpy(&b, Bp + t * dp + c0 + v * W, sizeof b);                   \
                                acc[r][v] += P[t * ldp + j0 + r] * b;                             \
                            }                                                                     \
                }                                                                                 \
                for (ptrdiff_t r = 0; r < R; r++) {                                               \
                    for (ptrdiff_t v = 0; v < nv; v++) {                                          \
                        VT s = acc[r][v] * alpha;                                                 \
                        memcpy(out[r] + v * W, &s, sizeof s);                                     \
                    }                                                                             \
                    T *y = Y + (j0 + r) * ldy + c0;                                               \
                    ptrdiff_t m = d - c0 < nv * W ? d - c0 : nv * W;                              \
                    for (ptrdiff_t c = 0; c < m; c++) y[c] += out[r][c];                          \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

#define MG_DEFINE_SOFTMAX_FWD(T, SUFFIX, ATTR, FWD)                                               \
    /* Rows t0 <= t < t1 of A: row t = softmax of its logits over j <= t, zero for t < j < t1.  \
     * S scaled content logits, P the pattern's; row t of A, S, P at (t - t0) lda, lds, ldp. The \
     * head's logits and the softmax are heads.h's. buf is unused (the AVX2 float32 rows use     \
     * it). */                                                                                    \
    ATTR static void FWD(T *restrict A, ptrdiff_t lda, const T *restrict S, ptrdiff_t lds,        \
                         const T *restrict P, ptrdiff_t ldp, ptrdiff_t t0, ptrdiff_t t1, T a,     \
                         int kind, T *restrict buf) {                                             \
        (void)buf;                                                                                \
        for (ptrdiff_t t = t0; t < t1; t++) {                                                     \
            T *row = A + (t - t0) * lda;                                                          \
            ptrdiff_t m = t + 1;                                                                  \
            mg_head_logits_##SUFFIX(row, S + (t - t0) * lds, P ? P + (t - t0) * ldp : NULL, m, a, kind); \
            mg_softmax_row_##SUFFIX(row, m);                                                      \
            memset(row + m, 0, (t1 - m) * sizeof(T));                                             \
        }                                                                                         \
    }

#define MG_DEFINE_SOFTMAX_BWD(T, W, ATTR, BWD)                                                    \
    /* dA (n, n) holds dY V^T on entry and the logit gradient on exit: dl = A (dA -              \
     * rowsum(A dA)), zero above the diagonal; for rrpram heads dP += dl, for hybrid heads        \
     * dP += a dl and dA = (1 - a) dl (the content part). Returns sum dl (P - S) over the rows of  \
     * a hybrid head (d alpha before the sigmoid's derivative), else 0. Each row is processed up  \
     * to mp = min(round_up(t + 1, W), n) columns: A is zero past the diagonal, so the extra      \
     * columns add exact zeros, and dA must be finite there (mg_tri_nt computes them). */        \
    ATTR static double BWD(T *restrict dA, const T *restrict A, ptrdiff_t n, const T *restrict S, \
                           const T *restrict P, T *restrict dP, ptrdiff_t ldp, T a, int kind) {   \
        double dalpha = 0;                                                                        \
        for (ptrdiff_t t = 0; t < n; t++) {                                                       \
            const T *arow = A + t * n, *srow = S + t * n, *prow = P ? P + t * ldp : NULL;         \
            T *drow = dA + t * n, *dprow = dP ? dP + t * ldp : NULL;                              \
            ptrdiff_t mp = (t + W) / W * W;                                                       \
            mp = mp < n ? mp : n;                                                                 \
            T dot = 0;                                                                            \
            _Pragma("omp simd reduction(+ : dot)")                                                \
            for (ptrdiff_t j = 0; j < mp; j++) dot += arow[j] * drow[j];                          \
            for (ptrdiff_t j = 0; j < mp; j++) drow[j] = arow[j] * (drow[j] - dot);               \
            if (kind == MG_HEAD_RRPRAM) {                                                         \
                for (ptrdiff_t j = 0; j < mp; j++) dprow[j] += drow[j];                           \
            } else if (kind == MG_HEAD_HYBRID) {                                                  \
                T dps = 0, dss = 0;                                                               \
                _Pragma("omp simd reduction(+ : dps, dss)")                                       \
                for (ptrdiff_t j = 0; j < mp; j++) {                                              \
                    dps += drow[j] * prow[j];                                                     \
                    dss += drow[j] * srow[j];                                                     \
                }                                                                                 \
                dalpha += (double)dps - (double)dss;                                              \
                for (ptrdiff_t j = 0; j < mp; j++) {                                              \
                    dprow[j] += a * drow[j];                                                      \
                    drow[j] = (1 - a) * drow[j];                                                  \
                }                                                                                 \
            }                                                                                     \
            if (mp < n) memset(drow + mp, 0, (n - mp) * sizeof(T));                               \
        }                                                                                         \
        return dalpha;                                                                            \
    }

/* x[j] = exp(x[j] - shift), j < n: the cross-entropy's exponentials (float32; its sum is rows.h's
 * fixed-order mg_row_sum_f). The AVX2 build is mg_expf8 on 8 lanes, as the softmax's rows; the
 * AVX-512 one mg_expf16, the same bits. */
static void mg_row_exp_f_base(float *restrict x, ptrdiff_t n, float shift) {
    for (ptrdiff_t j = 0; j < n; j++) x[j] = mg_expf(x[j] - shift);
}

MG_DEFINE_SOFTMAX_FWD(float, f, , mg_causal_softmax_f_base)
MG_DEFINE_SOFTMAX_FWD(double, d, , mg_causal_softmax_d_base)
MG_DEFINE_SOFTMAX_BWD(float, 8, , mg_causal_softmax_backward_f_base)
MG_DEFINE_SOFTMAX_BWD(double, 4, , mg_causal_softmax_backward_d_base)

typedef float mg_v8f __attribute__((vector_size(32)));
typedef double mg_v4d __attribute__((vector_size(32)));

MG_DEFINE_TRI(float, mg_v8f, 8, , mg_tri_nt_f_base, mg_tri_nn_f_base, mg_tri_tn_f_base)
MG_DEFINE_TRI(double, mg_v4d, 4, , mg_tri_nt_d_base, mg_tri_nn_d_base, mg_tri_tn_d_base)

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MG_TRI_AVX2 1
MG_DEFINE_TRI(float, mg_v8f, 8, __attribute__((target("avx2,fma"))), mg_tri_nt_f_avx2, mg_tri_nn_f_avx2,
              mg_tri_tn_f_avx2)
MG_DEFINE_TRI(double, mg_v4d, 4, __attribute__((target("avx2,fma"))), mg_tri_nt_d_avx2, mg_tri_nn_d_avx2,
              mg_tri_tn_d_avx2)
/* AVX-512: the same products on 512-bit vectors (16 floats, 8 doubles). Every output element is
 * the same FMA chain at any width (vector lanes are output columns), so they give the AVX2
 * kernels' bits. Their rows entry points need BT readable to round_up(t1, 32) columns (one
 * row: round_up(t1, 16)) and Bp rows readable to round_up(d, 16). */
#define MG_TRI512_ATTR __attribute__((target("avx512f,avx512vl,avx2,fma")))
typedef float mg_v16f __attribute__((vector_size(64)));
typedef double mg_v8d __attribute__((vector_size(64)));
MG_DEFINE_TRI(float, mg_v16f, 16, MG_TRI512_ATTR, mg_tri_nt_f_avx512, mg_tri_nn_f_avx512, mg_tri_tn_f_avx512)
MG_DEFINE_TRI(double, mg_v8d, 8, MG_TRI512_ATTR, mg_tri_nt_d_avx512, mg_tri_nn_d_avx512, mg_tri_tn_d_avx512)
MG_DEFINE_SOFTMAX_FWD(double, d, __attribute__((target("avx2,fma"))), mg_causal_softmax_d_avx2)
MG_DEFINE_SOFTMAX_BWD(float, 8, __attribute__((target("avx2,fma"))), mg_causal_softmax_backward_f_avx2)
MG_DEFINE_SOFTMAX_BWD(double, 4, __attribute__((target("avx2,fma"))), mg_causal_softmax_backward_d_avx2)

/* The float32 forward rows in intrinsics: heads.h's head logits (mg_mix8 for hybrid heads) and
 * softmax row fused into three passes over whole vectors of the row (logits and their max; exp
 * and sum; scale and store), the last vector of a row masked to j <= t, where the generic rows
 * take more passes and scalar loop tails (figures: benchmarks/RESULTS.md; fastmath.h says why
 * GCC's own vectorization falls short). */
__attribute__((target("avx2,fma"))) static void mg_causal_softmax_f_avx2(float *restrict A, ptrdiff_t lda,
                                                                         const float *restrict S, ptrdiff_t lds,
                                                                         const float *restrict P, ptrdiff_t ldp,
                                                                         ptrdiff_t t0, ptrdiff_t n, float a, int kind,
                                                                         float *restrict buf) {
    static const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(1 - a), ninf = _mm256_set1_ps(-INFINITY);
    for (ptrdiff_t t = t0; t < n; t++) {
        float *row = A + (t - t0) * lda;
        const float *srow = S + (t - t0) * lds, *prow = P ? P + (t - t0) * ldp : NULL;
        ptrdiff_t m = t + 1, nv = (m + 7) / 8, last = (nv - 1) * 8;
        /* lanes j < m of the last vector: loads there read no element past the row's end */
        __m256i keep = _mm256_loadu_si256((const __m256i *)(lanes + 8 - (m - last)));
        __m256 vmax = ninf;
        for (ptrdiff_t v = 0; v < nv; v++) {
            ptrdiff_t j = v * 8;
            __m256 x;
            if (j < last) {
                x = kind == MG_HEAD_CONTENT ? _mm256_loadu_ps(srow + j)
                    : kind == MG_HEAD_RRPRAM ? _mm256_loadu_ps(prow + j)
                    : mg_mix8(va, vb, _mm256_loadu_ps(srow + j), _mm256_loadu_ps(prow + j));
            } else {
                x = kind == MG_HEAD_CONTENT ? _mm256_maskload_ps(srow + j, keep)
                    : kind == MG_HEAD_RRPRAM ? _mm256_maskload_ps(prow + j, keep)
                    : mg_mix8(va, vb, _mm256_maskload_ps(srow + j, keep), _mm256_maskload_ps(prow + j, keep));
                x = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(keep));
            }
            _mm256_storeu_ps(buf + j, x);
            vmax = _mm256_max_ps(vmax, x);
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        const __m256 vmx = _mm256_set1_ps(_mm_cvtss_f32(h));
        __m256 vsum = _mm256_setzero_ps();
        for (ptrdiff_t v = 0; v < nv; v++) {
            __m256 e = mg_expf8(_mm256_sub_ps(_mm256_loadu_ps(buf + v * 8), vmx));
            if (v == nv - 1) e = _mm256_and_ps(e, _mm256_castsi256_ps(keep)); /* exact zeros past t */
            _mm256_storeu_ps(buf + v * 8, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
        const __m256 inv = _mm256_set1_ps(1.0f / _mm_cvtss_f32(s4));
        ptrdiff_t j = 0;
        for (; j + 8 <= n; j += 8)  /* the whole row: weights, then zeros above the diagonal */
            _mm256_storeu_ps(row + j, j < nv * 8 ? _mm256_mul_ps(_mm256_loadu_ps(buf + j), inv) : _mm256_setzero_ps());
        for (; j < n; j++) row[j] = j < m ? buf[j] * _mm256_cvtss_f32(inv) : 0;
    }
}

__attribute__((target("avx2,fma"))) static void mg_row_exp_f_avx2(float *restrict x, ptrdiff_t n, float shift) {
    const __m256 s = _mm256_set1_ps(shift);
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, mg_expf8(_mm256_sub_ps(_mm256_loadu_ps(x + j), s)));
    if (j < n) { /* the last vector through a zero-padded copy: no load or store past x[n - 1] */
        float t[8] = {0};
        memcpy(t, x + j, (size_t)(n - j) * sizeof(float));
        _mm256_storeu_ps(t, mg_expf8(_mm256_sub_ps(_mm256_loadu_ps(t), s)));
        memcpy(x + j, t, (size_t)(n - j) * sizeof(float));
    }
}

/* The float32 forward rows on 16 lanes where the AVX-512 products run: mg_causal_softmax_f_avx2's
 * three passes over half as many vectors, with its bits. Lane by lane the same operations (the
 * mix, mg_expf16 = mg_expf8, the scale); the max is exact in any order; the sum keeps the 8-lane
 * order (each 16-lane vector's low half, then its high half, into one 8-lane sum; the same
 * horizontal sum). buf is written no further than the 8-lane kernel writes it (round_up(t + 1, 8)
 * elements of a row). */
MG_TRI512_ATTR static void mg_causal_softmax_f_avx512(float *restrict A, ptrdiff_t lda, const float *restrict S,
                                                       ptrdiff_t lds, const float *restrict P, ptrdiff_t ldp,
                                                       ptrdiff_t t0, ptrdiff_t n, float a, int kind,
                                                       float *restrict buf) {
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(1 - a), ninf = _mm512_set1_ps(-INFINITY);
    for (ptrdiff_t t = t0; t < n; t++) {
        float *row = A + (t - t0) * lda;
        const float *srow = S + (t - t0) * lds, *prow = P ? P + (t - t0) * ldp : NULL;
        ptrdiff_t m = t + 1, m8 = (m + 7) / 8 * 8;
        __m512 vmax = ninf;
        for (ptrdiff_t j = 0; j < m; j += 16) {
            /* lanes j + l < m hold the row's logits, the others -inf; stored up to m8 */
            const __mmask16 keep = m - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (m - j)) - 1);
            const __mmask16 st = m8 - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (m8 - j)) - 1);
            __m512 x = kind == MG_HEAD_CONTENT ? _mm512_maskz_loadu_ps(keep, srow + j)
                       : kind == MG_HEAD_RRPRAM ? _mm512_maskz_loadu_ps(keep, prow + j)
                       : _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(keep, srow + j),
                                         _mm512_mul_ps(va, _mm512_maskz_loadu_ps(keep, prow + j)));
            x = _mm512_mask_blend_ps(keep, ninf, x);
            _mm512_mask_storeu_ps(buf + j, st, x);
            vmax = _mm512_max_ps(vmax, x);
        }
        const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m256 vsum = _mm256_setzero_ps();
        for (ptrdiff_t j = 0; j < m; j += 16) {
            const __mmask16 keep = m - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (m - j)) - 1);
            const __mmask16 st = m8 - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (m8 - j)) - 1);
            __m512 e = mg_expf16(_mm512_sub_ps(_mm512_maskz_loadu_ps(st, buf + j), vmx));
            e = _mm512_maskz_mov_ps(keep, e); /* exact zeros past t */
            _mm512_mask_storeu_ps(buf + j, st, e);
            vsum = _mm256_add_ps(vsum, _mm512_castps512_ps256(e));
            if (j + 8 < m) vsum = _mm256_add_ps(vsum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
        }
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
        const __m512 inv = _mm512_set1_ps(1.0f / _mm_cvtss_f32(s4));
        for (ptrdiff_t j = 0; j < n; j += 16) { /* the whole row: weights, then zeros above the diagonal */
            const __mmask16 in = j >= m ? 0 : m - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (m - j)) - 1);
            const __mmask16 out = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            _mm512_mask_storeu_ps(row + j, out, _mm512_mul_ps(_mm512_maskz_loadu_ps(in, buf + j), inv));
        }
    }
}

/* The AVX-512 build of mg_row_exp_f: mg_expf16 on 16 lanes (mg_expf8's bits, element by element). */
MG_TRI512_ATTR static void mg_row_exp_f_avx512(float *restrict x, ptrdiff_t n, float shift) {
    const __m512 s = _mm512_set1_ps(shift);
    ptrdiff_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(x + j, mg_expf16(_mm512_sub_ps(_mm512_loadu_ps(x + j), s)));
    if (j < n) { /* the last lanes masked: no load or store past x[n - 1] */
        const __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
        _mm512_mask_storeu_ps(x + j, k, mg_expf16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), s)));
    }
}
#endif

/* 1 when the AVX2+FMA kernels run (the CPU has them and MOLECULE_GPT_NO_AVX2 is not set);
 * decided once per process. mg_tri_force_portable(1) switches to the baseline ones (tests). */
/* FMA throughput probe: GFLOP/s of 12 independent float32 FMA chains on 512-bit (zmm) or 256-bit
 * (ymm) vectors, the best of `trials` runs of about 0.1 ms each on this thread. Some cores run
 * 512-bit FMAs at twice the 256-bit rate, others split them in two halves (same rate). */
#ifdef MG_TRI_AVX2
#include <time.h>
static inline double mg_now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define MG_DEFINE_FMA_CHAINS(NAME, VT, W, FMADD, SET1, ATTR)                                      \
    ATTR static double NAME(long n) {                                                             \
        VT a[12], b = SET1(1.0000001f), c = SET1(1e-7f);                                          \
        for (int i = 0; i < 12; i++) a[i] = SET1((float)i);                                       \
        for (long k = 0; k < n; k++) {                                                            \
            _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) a[i] = FMADD(a[i], b, c);       \
        }                                                                                         \
        float out[W];                                                                             \
        double s = 0;                                                                             \
        for (int i = 0; i < 12; i++) {                                                            \
            memcpy(out, &a[i], sizeof out);                                                       \
            for (int l = 0; l < W; l++) s += out[l];                                              \
        }                                                                                         \
        return s;                                                                                 \
    }
MG_DEFINE_FMA_CHAINS(mg_fma_chains_zmm, __m512, 16, _mm512_fmadd_ps, _mm512_set1_ps, __attribute__((target("avx512f,fma"))))
MG_DEFINE_FMA_CHAINS(mg_fma_chains_ymm, __m256, 8, _mm256_fmadd_ps, _mm256_set1_ps, __attribute__((target("avx2,fma"))))

static volatile double mg_fma_sink;

/* wide: 1 for zmm (the CPU must have AVX-512F), 0 for ymm (AVX2+FMA) */
static inline double mg_fma_probe(int wide, int trials) {
    const long n = 20000;
    double best = 0;
    for (int t = 0; t < trials; t++) {
        double t0 = mg_now_s();
        mg_fma_sink = wide ? mg_fma_chains_zmm(n) : mg_fma_chains_ymm(n);
        double dt = mg_now_s() - t0;
        double rate = 12.0 * n * (wide ? 16 : 8) * 2 / dt / 1e9;
        if (rate > best) best = rate;
    }
    return best;
}
#endif

/* Read-bandwidth probe (benchmarks): the sum of a[0:n], read in steps of 256 bytes into eight
 * independent vector sums, so that the loads, not the additions, bound it. */
#define MG_DEFINE_READ_FLOATS(NAME, ATTR)                                                         \
    ATTR static float NAME(const float *a, ptrdiff_t n) {                                         \
        mg_v8f s[8];                                                                              \
        memset(s, 0, sizeof s);                                                                   \
        ptrdiff_t i = 0;                                                                          \
        for (; i + 64 <= n; i += 64) {                                                            \
            _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {                                 \
                mg_v8f v;                                                                         \
                memcpy(&v, a + i + 8 * j, sizeof v);                                              \
                s[j] += v;                                                                        \
            }                                                                                     \
        }                                                                                         \
        float out[8], t = 0;                                                                      \
        for (int j = 0; j < 8; j++) {                                                             \
            memcpy(out, &s[j], sizeof out);                                                       \
            for (int l = 0; l < 8; l++) t += out[l];                                              \
        }                                                                                         \
        for (; i < n; i++) t += a[i];                                                             \
        return t;                                                                                 \
    }
MG_DEFINE_READ_FLOATS(mg_read_floats_base, )
#ifdef MG_TRI_AVX2
MG_DEFINE_READ_FLOATS(mg_read_floats_avx2, __attribute__((target("avx2"))))
#endif
/* The vector width a step's products use, chosen once at run time: 2 AVX-512 (csrc/gemm.h's
 * products and attention's products; the softmax stays AVX2), 1 AVX2+FMA, 0 portable C or BLAS. AVX-512 is chosen only on
 * cores that run it at least 1.5x as fast as AVX2 (the probe above, ~3 ms once): on cores that
 * split 512-bit FMAs its wider padding makes the products slower. Both widths give the same
 * bits (every element is the same FMA chain over k), so the choice never changes a result.
 * MOLECULE_GPT_AVX512=1 or 0 skips the probe; MOLECULE_GPT_NO_AVX2=1 makes it portable;
 * tests force a level to compare paths. */
static int mg_tri_mode = -1;

static inline int mg_env_on(const char *name) {
    const char *v = getenv(name);
    return v && *v && *v != '0';
}

static inline int mg_simd_level(void) {
    if (mg_tri_mode < 0) {
#ifdef MG_TRI_AVX2
        __builtin_cpu_init();
        int level = 0;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !mg_env_on("MOLECULE_GPT_NO_AVX2")) {
            level = 1;
            if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
                const char *force = getenv("MOLECULE_GPT_AVX512");
                if (force && *force)
                    level = *force != '0' ? 2 : 1;
                else {
                    double zmm = 0, ymm = 0;
                    for (int r = 0; r < 3; r++) { /* alternated, best of each: robust to a busy core */
                        double z = mg_fma_probe(1, 3), y = mg_fma_probe(0, 3);
                        zmm = z > zmm ? z : zmm;
                        ymm = y > ymm ? y : ymm;
                    }
                    if (zmm >= 1.5 * ymm) level = 2;
                }
            }
        }
        mg_tri_mode = level;
#else
        mg_tri_mode = 0;
#endif
    }
    return mg_tri_mode;
}

/* The CPU's best level, ignoring the probe and any forcing (tests) */
static inline int mg_simd_supported(void) {
#ifdef MG_TRI_AVX2
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? 2 : 1;
#else
    return 0;
#endif
}

/* level -1: back to the automatic choice; otherwise `level` (at most what the CPU supports) */
static inline void mg_simd_force(int level) {
    int top = mg_simd_supported();
    mg_tri_mode = level < 0 ? -1 : (level < top ? level : top);
}

static inline void mg_tri_force_portable(int on) {
    mg_simd_force(on ? 0 : -1);
}

static inline int mg_tri_use_avx2(void) {
    return mg_simd_level() >= 1;
}

static inline int mg_use_avx512(void) {
    return mg_simd_level() >= 2;
}

#ifdef MG_TRI_AVX2
#define MG_TRI_DISPATCH(fn, ...) (mg_tri_use_avx2() ? fn##_avx2(__VA_ARGS__) : fn##_base(__VA_ARGS__))
#define MG_TRI_DISPATCH_ROWS(fn, ...)                                                             \
    (mg_use_avx512() ? fn##_avx512_rows(__VA_ARGS__)                                              \
     : mg_tri_use_avx2() ? fn##_avx2_rows(__VA_ARGS__) : fn##_base_rows(__VA_ARGS__))
#define MG_TRI_DISPATCH_WIDE(fn, ...) (mg_use_avx512() ? fn##_avx512(__VA_ARGS__) : MG_TRI_DISPATCH(fn, __VA_ARGS__))
#define MG_TRI_DISPATCH_HEADS(fn, ...)                                                            \
    (mg_use_avx512() ? fn##_avx512_heads(__VA_ARGS__)                                             \
     : mg_tri_use_avx2() ? fn##_avx2_heads(__VA_ARGS__) : fn##_base_heads(__VA_ARGS__))
#else
#define MG_TRI_DISPATCH(fn, ...) fn##_base(__VA_ARGS__)
#define MG_TRI_DISPATCH_ROWS(fn, ...) fn##_base_rows(__VA_ARGS__)
#define MG_TRI_DISPATCH_WIDE(fn, ...) fn##_base(__VA_ARGS__)
#define MG_TRI_DISPATCH_HEADS(fn, ...) fn##_base_heads(__VA_ARGS__)
#endif

static inline float mg_read_floats(const float *a, ptrdiff_t n) {
    return MG_TRI_DISPATCH(mg_read_floats, a, n);
}

static inline void mg_tri_nt_f(float *S, ptrdiff_t lds, const float *A, ptrdiff_t lda, const float *B,
                               ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t d, float alpha, float *scratch) {
    MG_TRI_DISPATCH_WIDE(mg_tri_nt_f, S, lds, A, lda, B, ldb, n, d, alpha, scratch);
}
static inline void mg_tri_nt_d(double *S, ptrdiff_t lds, const double *A, ptrdiff_t lda, const double *B,
                               ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t d, double alpha, double *scratch) {
    MG_TRI_DISPATCH_WIDE(mg_tri_nt_d, S, lds, A, lda, B, ldb, n, d, alpha, scratch);
}
static inline void mg_tri_nn_f(float *Y, ptrdiff_t ldy, const float *P, ptrdiff_t ldp, const float *B,
                               ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t d, float alpha, int accumulate,
                               float *scratch) {
    MG_TRI_DISPATCH_WIDE(mg_tri_nn_f, Y, ldy, P, ldp, B, ldb, n, d, alpha, accumulate, scratch);
}
static inline void mg_tri_nn_d(double *Y, ptrdiff_t ldy, const double *P, ptrdiff_t ldp, const double *B,
                               ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t d, double alpha, int accumulate,
                               double *scratch) {
    MG_TRI_DISPATCH_WIDE(mg_tri_nn_d, Y, ldy, P, ldp, B, ldb, n, d, alpha, accumulate, scratch);
}
static inline void mg_tri_tn_f(float *Y, ptrdiff_t ldy, const float *P, ptrdiff_t ldp, const float *B,
                               ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t d, float alpha, float *scratch) {
    MG_TRI_DISPATCH_WIDE(mg_tri_tn_f, Y, ldy, P, ldp, B, ldb, n, d, alpha, scratch);
}
static inline void mg_tri_tn_d(double *Y, ptrdiff_t ldy, const double *P, ptrdiff_t ldp, const double *B,
                               ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t d, double alpha, double *scratch) {
    MG_TRI_DISPATCH_WIDE(mg_tri_tn_d, Y, ldy, P, ldp, B, ldb, n, d, alpha, scratch);
}

/* rows t0 <= t < t1 of the causal softmax (see MG_DEFINE_SOFTMAX_FWD); a whole block: t0 = 0,
 * t1 = n, lda = lds = n */
static inline void mg_causal_softmax_f(float *A, ptrdiff_t lda, const float *S, ptrdiff_t lds, const float *P,
                                       ptrdiff_t ldp, ptrdiff_t t0, ptrdiff_t t1, float a, int kind, float *buf) {
    MG_TRI_DISPATCH_WIDE(mg_causal_softmax_f, A, lda, S, lds, P, ldp, t0, t1, a, kind, buf);
}
static inline void mg_row_exp_f(float *x, ptrdiff_t n, float shift) {
    MG_TRI_DISPATCH_WIDE(mg_row_exp_f, x, n, shift);
}
static inline void mg_causal_softmax_d(double *A, ptrdiff_t lda, const double *S, ptrdiff_t lds, const double *P,
                                       ptrdiff_t ldp, ptrdiff_t t0, ptrdiff_t t1, double a, int kind, double *buf) {
    MG_TRI_DISPATCH(mg_causal_softmax_d, A, lda, S, lds, P, ldp, t0, t1, a, kind, buf);
}
/* rows t0 <= t < t1 of mg_tri_nt (B given transposed) and mg_tri_nn (B given padded): the
 * kernels the whole-block products run, for the decoder's rows over its cache */
static inline void mg_tri_nt_rows_f(float *S, ptrdiff_t lds, const float *A, ptrdiff_t lda, const float *BT,
                                    ptrdiff_t ldbt, ptrdiff_t t0, ptrdiff_t t1, ptrdiff_t d, float alpha) {
    MG_TRI_DISPATCH_ROWS(mg_tri_nt_f, S, lds, A, lda, BT, ldbt, t0, t1, d, alpha);
}
static inline void mg_tri_nt_rows_d(double *S, ptrdiff_t lds, const double *A, ptrdiff_t lda, const double *BT,
                                    ptrdiff_t ldbt, ptrdiff_t t0, ptrdiff_t t1, ptrdiff_t d, double alpha) {
    MG_TRI_DISPATCH_ROWS(mg_tri_nt_d, S, lds, A, lda, BT, ldbt, t0, t1, d, alpha);
}
static inline void mg_tri_nn_rows_f(float *Y, ptrdiff_t ldy, const float *P, ptrdiff_t ldp, const float *Bp,
                                    ptrdiff_t ldbp, ptrdiff_t t0, ptrdiff_t t1, ptrdiff_t d, float alpha,
                                    int accumulate) {
    MG_TRI_DISPATCH_ROWS(mg_tri_nn_f, Y, ldy, P, ldp, Bp, ldbp, t0, t1, d, alpha, accumulate);
}
static inline void mg_tri_nn_rows_d(double *Y, ptrdiff_t ldy, const double *P, ptrdiff_t ldp, const double *Bp,
                                    ptrdiff_t ldbp, ptrdiff_t t0, ptrdiff_t t1, ptrdiff_t d, double alpha,
                                    int accumulate) {
    MG_TRI_DISPATCH_ROWS(mg_tri_nn_d, Y, ldy, P, ldp, Bp, ldbp, t0, t1, d, alpha, accumulate);
}
/* one query row t of H heads of mg_tri_nn_rows at once (the decoder's attention output; see
 * NN##_heads): head h at Y + h ldyh, P + h ldph, Bp + h ldbh, each equal to its rows call */
static inline void mg_tri_nn_heads_f(float *Y, ptrdiff_t ldyh, const float *P, ptrdiff_t ldph, const float *Bp,
                                     ptrdiff_t ldbh, ptrdiff_t ldbp, ptrdiff_t H, ptrdiff_t t, ptrdiff_t d,
                                     float alpha, int accumulate) {
    MG_TRI_DISPATCH_HEADS(mg_tri_nn_f, Y, ldyh, P, ldph, Bp, ldbh, ldbp, H, t, d, alpha, accumulate);
}
static inline void mg_tri_nn_heads_d(double *Y, ptrdiff_t ldyh, const double *P, ptrdiff_t ldph, const double *Bp,
                                     ptrdiff_t ldbh, ptrdiff_t ldbp, ptrdiff_t H, ptrdiff_t t, ptrdiff_t d,
                                     double alpha, int accumulate) {
    MG_TRI_DISPATCH_HEADS(mg_tri_nn_d, Y, ldyh, P, ldph, Bp, ldbh, ldbp, H, t, d, alpha, accumulate);
}
static inline double mg_causal_softmax_backward_f(float *dA, const float *A, ptrdiff_t n, const float *S,
                                                  const float *P, float *dP, ptrdiff_t ldp, float a, int kind) {
    return MG_TRI_DISPATCH(mg_causal_softmax_backward_f, dA, A, n, S, P, dP, ldp, a, kind);
}
static inline double mg_causal_softmax_backward_d(double *dA, const double *A, ptrdiff_t n, const double *S,
                                                  const double *P, double *dP, ptrdiff_t ldp, double a, int kind) {
    return MG_TRI_DISPATCH(mg_causal_softmax_backward_d, dA, A, n, S, P, dP, ldp, a, kind);
}

#endif
