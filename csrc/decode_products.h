/* decode_products.h: the decoder's products C = A B^T for one kind of weight element, written
 * once and included by decode_kernels.h once per kind (no include guard, on purpose):
 *
 *   MG_WT          the element type of the weight matrix B (float, or mg_bf16)
 *   MG_WSFX        the kernels' name suffix (f, bf16)
 *   MG_WVAL(v)     one weight as a float
 *   MG_WLOAD8(p)   eight consecutive weights as a __m256 (AVX2 path)
 *
 * Inputs A, outputs C and all arithmetic are float32; a weight is widened exactly to float32 as
 * it is loaded, so the bfloat16 kernels have the float32 kernels' arithmetic on the widened
 * weights (and read half the bytes). Dims: A (M, K) with leading dimension lda, B (N, K) with
 * ldb, C (M, N) with ldc; x (K), y (rows of B).
 *   mg_matvec_<s>_avx2 / _generic   y = B x
 *   mg_matvec2_<s>_avx2, 3          two or three inputs in one pass over B
 *   mg_gemm_nt_<s>                  C = A B^T: every row of C is bit-identical to the matvec of
 *                                   that row of A (a batched decode row rounds as it does alone)
 * The AVX2 kernels keep one 8-lane accumulator per output and reduce it once at the end; four
 * weight rows share each load of the input, and the gemm handles three inputs per pass. */

#define MG_P3(a, b, c) a##b##c
#define MG_N3(a, b, c) MG_P3(a, b, c)
#define MG_NAME(base, tail) MG_N3(base, MG_WSFX, tail)

#ifdef MG_HAVE_AVX2_PATH
/* y = B x, four rows of B per pass */
__attribute__((target("avx2,fma"))) static void MG_NAME(mg_matvec_, _avx2)(float *restrict y, const MG_WT *restrict A,
                                                                            const float *restrict x, ptrdiff_t M,
                                                                            ptrdiff_t K, ptrdiff_t lda) {
    ptrdiff_t i = 0, K8 = K & ~(ptrdiff_t)7;
    for (; i + 4 <= M; i += 4) {
        const MG_WT *a0 = A + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
               s3 = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            s0 = _mm256_fmadd_ps(MG_WLOAD8(a0 + k), xv, s0);
            s1 = _mm256_fmadd_ps(MG_WLOAD8(a1 + k), xv, s1);
            s2 = _mm256_fmadd_ps(MG_WLOAD8(a2 + k), xv, s2);
            s3 = _mm256_fmadd_ps(MG_WLOAD8(a3 + k), xv, s3);
        }
        if (K8 == K) {
            _mm_storeu_ps(y + i, mg_hsum4(s0, s1, s2, s3));
            continue;
        }
        float r0 = mg_hsum256(s0), r1 = mg_hsum256(s1), r2 = mg_hsum256(s2), r3 = mg_hsum256(s3);
        for (ptrdiff_t k = K8; k < K; k++) {
            r0 += MG_WVAL(a0[k]) * x[k];
            r1 += MG_WVAL(a1[k]) * x[k];
            r2 += MG_WVAL(a2[k]) * x[k];
            r3 += MG_WVAL(a3[k]) * x[k];
        }
        y[i] = r0;
        y[i + 1] = r1;
        y[i + 2] = r2;
        y[i + 3] = r3;
    }
    for (; i < M; i++) {
        const MG_WT *a = A + i * lda;
        __m256 s = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) s = _mm256_fmadd_ps(MG_WLOAD8(a + k), _mm256_loadu_ps(x + k), s);
        float r = mg_hsum256(s);
        for (ptrdiff_t k = K8; k < K; k++) r += MG_WVAL(a[k]) * x[k];
        y[i] = r;
    }
}

/* y0 = B x0 and y1 = B x1 in one pass over B (four rows of B at a time) */
__attribute__((target("avx2,fma"))) static void MG_NAME(mg_matvec2_, _avx2)(float *restrict y0, float *restrict y1,
                                                                             const MG_WT *restrict B,
                                                                             const float *restrict x0,
                                                                             const float *restrict x1, ptrdiff_t N,
                                                                             ptrdiff_t K, ptrdiff_t ldb) {
    ptrdiff_t j = 0, K8 = K & ~(ptrdiff_t)7;
    for (; j + 4 <= N; j += 4) {
        const MG_WT *b0 = B + j * ldb, *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
        __m256 s00 = _mm256_setzero_ps(), s01 = _mm256_setzero_ps(), s02 = _mm256_setzero_ps(),
               s03 = _mm256_setzero_ps(), s10 = _mm256_setzero_ps(), s11 = _mm256_setzero_ps(),
               s12 = _mm256_setzero_ps(), s13 = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) {
            __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k), w;
            w = MG_WLOAD8(b0 + k);
            s00 = _mm256_fmadd_ps(w, u, s00);
            s10 = _mm256_fmadd_ps(w, v, s10);
            w = MG_WLOAD8(b1 + k);
            s01 = _mm256_fmadd_ps(w, u, s01);
            s11 = _mm256_fmadd_ps(w, v, s11);
            w = MG_WLOAD8(b2 + k);
            s02 = _mm256_fmadd_ps(w, u, s02);
            s12 = _mm256_fmadd_ps(w, v, s12);
            w = MG_WLOAD8(b3 + k);
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
            r00 += MG_WVAL(b0[k]) * x0[k];
            r01 += MG_WVAL(b1[k]) * x0[k];
            r02 += MG_WVAL(b2[k]) * x0[k];
            r03 += MG_WVAL(b3[k]) * x0[k];
            r10 += MG_WVAL(b0[k]) * x1[k];
            r11 += MG_WVAL(b1[k]) * x1[k];
            r12 += MG_WVAL(b2[k]) * x1[k];
            r13 += MG_WVAL(b3[k]) * x1[k];
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
        const MG_WT *b = B + j * ldb;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) {
            __m256 w = MG_WLOAD8(b + k);
            s0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0 + k), s0);
            s1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x1 + k), s1);
        }
        float r0 = mg_hsum256(s0), r1 = mg_hsum256(s1);
        for (ptrdiff_t k = K8; k < K; k++) {
            r0 += MG_WVAL(b[k]) * x0[k];
            r1 += MG_WVAL(b[k]) * x1[k];
        }
        y0[j] = r0;
        y1[j] = r1;
    }
}

/* y_r = B x_r for r = 0, 1, 2 in one pass over B (four rows of B at a time: 12 accumulators,
 * 7 loads per 12 FMAs; the prefill's products are FMA-bound, not bandwidth-bound) */
__attribute__((target("avx2,fma"))) static void MG_NAME(mg_matvec3_, _avx2)(float *restrict y0, float *restrict y1,
                                                                             float *restrict y2,
                                                                             const MG_WT *restrict B,
                                                                             const float *restrict x0,
                                                                             const float *restrict x1,
                                                                             const float *restrict x2, ptrdiff_t N,
                                                                             ptrdiff_t K, ptrdiff_t ldb) {
    ptrdiff_t j = 0, K8 = K & ~(ptrdiff_t)7;
    for (; j + 4 <= N; j += 4) {
        const MG_WT *b[4] = {B + j * ldb, B + (j + 1) * ldb, B + (j + 2) * ldb, B + (j + 3) * ldb};
        __m256 s[3][4];
        for (int r = 0; r < 3; r++)
            for (int c = 0; c < 4; c++) s[r][c] = _mm256_setzero_ps();
        for (ptrdiff_t k = 0; k < K8; k += 8) {
            __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k), t = _mm256_loadu_ps(x2 + k);
            for (int c = 0; c < 4; c++) {
                __m256 w = MG_WLOAD8(b[c] + k);
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
                for (ptrdiff_t k = K8; k < K; k++) acc += MG_WVAL(b[c][k]) * x[r][k];
                y[r][j + c] = acc;
            }
    }
    if (j < N) {
        MG_NAME(mg_matvec2_, _avx2)(y0 + j, y1 + j, B + j * ldb, x0, x1, N - j, K, ldb);
        MG_NAME(mg_matvec_, _avx2)(y2 + j, B + j * ldb, x2, N - j, K, ldb);
    }
}
#endif

/* the portable path: y = B x, one row at a time */
static void MG_NAME(mg_matvec_, _generic)(float *restrict y, const MG_WT *restrict A, const float *restrict x,
                                          ptrdiff_t M, ptrdiff_t K, ptrdiff_t lda) {
    for (ptrdiff_t i = 0; i < M; i++) {
        const MG_WT *a = A + i * lda;
        float s = 0;
        _Pragma("omp simd reduction(+ : s)")
        for (ptrdiff_t k = 0; k < K; k++) s += MG_WVAL(a[k]) * x[k];
        y[i] = s;
    }
}

/* C (M, N) = A (M, K) B^T, B (N, K): row i of C is B a_i. Every element has the arithmetic of
 * the matvec (the same 4-row blocks of B counted from its row 0, the same accumulators and
 * final sums), so a row of this product is bit-identical to the matvec of that row: a batched
 * decode step gives each sequence the logits it gets alone. B is walked in blocks of
 * mg_gemm_block_rows rows (a multiple of 4, so the 4-row blocks do not move) and every input
 * row passes over a block while it is in L1: B is read from memory once, not once per 3 rows. */
static inline void MG_NAME(mg_gemm_nt_, )(float *restrict C, const float *restrict A, const MG_WT *restrict B,
                                          ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, ptrdiff_t lda, ptrdiff_t ldb,
                                          ptrdiff_t ldc) {
#ifdef MG_HAVE_AVX2_PATH
    if (mg_decode_has_avx2()) {
        ptrdiff_t nb = M > 3 ? mg_gemm_block_rows(K, sizeof(MG_WT)) : N;
        for (ptrdiff_t j0 = 0; j0 < N; j0 += nb) {
            ptrdiff_t n = N - j0 < nb ? N - j0 : nb, i = 0;
            const MG_WT *Bj = B + j0 * ldb;
            float *Cj = C + j0;
            if (MG_GEMM_PREFETCH && M > 3) /* a block ahead on its way to L2 while the inputs pass over this one */
                for (ptrdiff_t r = j0 + MG_GEMM_PREFETCH * nb; r < j0 + (MG_GEMM_PREFETCH + 1) * nb && r < N; r++)
                    for (ptrdiff_t k = 0; k < K; k += 64 / (ptrdiff_t)sizeof(MG_WT))
                        _mm_prefetch((const char *)(B + r * ldb + k), _MM_HINT_T1);
            for (; i + 3 <= M; i += 3)
                MG_NAME(mg_matvec3_, _avx2)(Cj + i * ldc, Cj + (i + 1) * ldc, Cj + (i + 2) * ldc, Bj, A + i * lda,
                                            A + (i + 1) * lda, A + (i + 2) * lda, n, K, ldb);
            if (i + 2 <= M) {
                MG_NAME(mg_matvec2_, _avx2)(Cj + i * ldc, Cj + (i + 1) * ldc, Bj, A + i * lda, A + (i + 1) * lda, n,
                                            K, ldb);
                i += 2;
            }
            if (i < M) MG_NAME(mg_matvec_, _avx2)(Cj + i * ldc, Bj, A + i * lda, n, K, ldb);
        }
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < M; i++) MG_NAME(mg_matvec_, _generic)(C + i * ldc, B, A + i * lda, N, K, ldb);
}

#undef MG_NAME
#undef MG_N3
#undef MG_P3
