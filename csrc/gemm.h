/* gemm.h: the linear layers' matrix products for the shapes of a training step.
 *
 * Why C: register-blocked kernels in GCC vector extensions and intrinsics under a target
 * attribute, chosen at run time (wheels are built without -march=native), which Cython cannot
 * express.
 *
 * Why not BLAS: at the default config a product is a few hundred positions by 72-576 by 72-576
 * (a worker's share of the batch), where OpenBLAS spent a large share of its time outside its
 * kernel: packing both operands and zeroing C before a beta-0 product (profile figures:
 * benchmarks/RESULTS.md). Here a 6 x 16 or 4 x 24 register
 * block of C is summed over K from broadcasts of A's elements times rows of a packed panel of
 * B. A is read where it lies, plain or transposed (dW = G^T X needs no copy), except a
 * transposed A spanning more than MG_GEMM_PACK_A_SPAN bytes (rows a page or more apart, the
 * larger config's weight gradients), which is copied block by block into tiles first. B is
 * packed once per pass of MG_GEMM_KC rows into zero-padded column panels (for y = x W^T that
 * is a transposition of the weight, in 8 x 8 register tiles): 1/M of the product's work, and
 * the kernel's loads become whole and contiguous. A is taken MG_GEMM_MC rows at a time, so its
 * rows stay in L2 while every panel passes over them.
 *
 * Compiled for AVX2+FMA only (GCC vector extensions and a few intrinsics under a target
 * attribute, chosen at run time with attention.h's switch); without it, or when the scratch
 * cannot be allocated, the functions return 0 and the caller uses BLAS, which stays the tested
 * twin. The scratch is one grow-only buffer per thread, a few hundred KB at the default config.
 *
 * Dims of mg_gemm_f / mg_gemm_d's three forms, row-major with leading dimensions:
 *   MG_GEMM_TN  C (M, N) (+)= alpha A^T B    A (K, M) lda, B (K, N) ldb    (dW = G^T X)
 *   MG_GEMM_NN  C (M, N) (+)= alpha A B      A (M, K) lda, B (K, N) ldb    (dX = G W)
 *   MG_GEMM_NT  C (M, N) (+)= alpha A B^T    A (M, K) lda, B (N, K) ldb    (Y = X W^T)
 * accumulate = 0 writes C (never reads it: C may hold anything, NaN included); 1 adds to it.
 *
 * Numbers: the same sums as BLAS in another order, with FMA: float64 agrees with the BLAS path
 * to ~1e-15 relative (tests compare the two on every shape class and on whole steps).
 */
#ifndef MOLECULE_GEMM_H
#define MOLECULE_GEMM_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include "attention.h" /* mg_tri_use_avx2: one switch for every AVX2 kernel */
#include "fastmath.h"  /* immintrin.h on x86 */

#define MG_GEMM_KC 256 /* K per pass: a K x 16-float (K x 8-double) panel of B is 16 KB */
#define MG_GEMM_MC 120 /* rows of A per pass, a multiple of every block's rows (4, 6, 8, 12) */
#define MG_GEMM_PACK_A_SPAN ((size_t)1 << 19) /* bytes a transposed A spans before it is copied */

/* grow-only scratch for the packed panels (and tiles of A), one per thread (the workers run
 * products concurrently), freed when its thread ends (a thread-specific key's destructor: the
 * organism's trainer threads come and go) */
typedef struct {
    void *data;
    size_t bytes;
} mg_gemm_buffer;

static pthread_key_t mg_gemm_key;
static pthread_once_t mg_gemm_key_once = PTHREAD_ONCE_INIT;
static int mg_gemm_key_ok = 0;

static void mg_gemm_buffer_free(void *b) {
    free(((mg_gemm_buffer *)b)->data);
    free(b);
}

static void mg_gemm_make_key(void) {
    mg_gemm_key_ok = pthread_key_create(&mg_gemm_key, mg_gemm_buffer_free) == 0;
}

static inline void *mg_gemm_scratch_get(size_t nbytes) {
    pthread_once(&mg_gemm_key_once, mg_gemm_make_key);
    if (!mg_gemm_key_ok) return NULL;
    mg_gemm_buffer *b = (mg_gemm_buffer *)pthread_getspecific(mg_gemm_key);
    if (b == NULL) {
        if ((b = (mg_gemm_buffer *)calloc(1, sizeof *b)) == NULL) return NULL;
        if (pthread_setspecific(mg_gemm_key, b) != 0) {
            free(b);
            return NULL;
        }
    }
    if (nbytes > b->bytes) {
        void *p = NULL;
        if (posix_memalign(&p, 64, nbytes) != 0) return NULL;
        free(b->data);
        b->data = p;
        b->bytes = nbytes;
    }
    return b->data;
}

/* one vector of a panel whose elements are the vector's own type */
#define MG_LOAD_VECTOR(dst, src) memcpy((dst), (src), sizeof *(dst))

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MG_GEMM_AVX2 1
/* v as computed, in a register: the compiler may not fuse the product that made it into the next
 * addition. C (+)= alpha sum: the scaled sum is rounded before C is added, in every kernel shape,
 * so the shapes (and the widths) give the same bits whatever the compiler contracts. */
#define MG_ROUNDED(v) __asm__("" : "+v"(v))

#define MG_GEMM_ATTR __attribute__((target("avx2,fma")))
#define MG_GEMM_INLINE __attribute__((always_inline, target("avx2,fma"))) static inline

/* One register block: C[0:MR, 0:NV W] (+)= alpha sum_k A(r, k) P[k, 0:NV W] for k < kc, with
 * A(r, k) at A[r * sam + k * sak] and P a packed panel of B (rows of NV W, zero-padded) of
 * element type PT, W of which LOADP turns into one vector VT of T. TAIL: only nc < NV W columns
 * of C exist. MR x NV accumulators + NV loads + 1 broadcast fit the vector registers (16 for
 * AVX2: MR x NV <= 12; 32 for AVX-512: <= 24). Each element of C is one chain of FMAs over k in
 * order, whatever the block's shape or the row's place in it: a row of a product rounds the
 * same in any block, alone or among others (the decoder's batched rows rely on it). */
#define MG_DEFINE_GEMM_BLOCK(T, PT, VT, W, NAME, MRMAX, INLINE, LOADP)                            \
    INLINE void NAME(const int MR, const int NV, const int TAIL, ptrdiff_t kc,                    \
                     const T *restrict A, ptrdiff_t sam, ptrdiff_t sak,                           \
                     const PT *restrict P, T *restrict C, ptrdiff_t ldc, T alpha,                 \
                     int accumulate, ptrdiff_t nc) {                                              \
        VT c[MRMAX][3];                                                                           \
        _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++)                                     \
            _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) c[r][v] = (VT){0};               \
        for (ptrdiff_t k = 0; k < kc; k++) {                                                      \
            VT b[3];                                                                              \
            _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++)                                  \
                LOADP(&b[v], P + k * NV * W + v * W);                                             \
            const T *a = A + k * sak;                                                             \
            _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++) {                               \
                T x = a[r * sam];                                                                 \
                _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) c[r][v] += x * b[v];         \
            }                                                                                     \
        }                                                                                         \
        _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++) {                                   \
            T *row = C + r * ldc;                                                                 \
            if (!TAIL) {                                                                          \
                _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) {                            \
                    VT u = c[r][v] * alpha;                                                       \
                    MG_ROUNDED(u);                                                                \
                    if (accumulate) {                                                             \
                        VT o;                                                                     \
                        memcpy(&o, row + v * W, sizeof o);                                        \
                        u += o;                                                                   \
                    }                                                                             \
                    memcpy(row + v * W, &u, sizeof u);                                            \
                }                                                                                 \
            } else {                                                                              \
                T out[3 * W];                                                                     \
                _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) {                            \
                    VT u = c[r][v] * alpha;                                                       \
                    MG_ROUNDED(u);                                                                \
                    memcpy(out + v * W, &u, sizeof u);                                            \
                }                                                                                 \
                for (ptrdiff_t l = 0; l < nc; l++) row[l] = accumulate ? row[l] + out[l] : out[l]; \
            }                                                                                     \
        }                                                                                         \
    }

/* dst[k PW + j] = src[j lds + k] for j < nc (zero for nc <= j < PW), k < kc: a panel of B^T.
 * float: 8 x 8 tiles transposed in registers (the scalar loop cost as much as the product of a
 * weight with a few dozen rows); double (float64 is not a speed target): element by element. */
MG_GEMM_INLINE void mg_pack_t_f(float *restrict dst, const float *restrict src, ptrdiff_t lds,
                                ptrdiff_t kc, ptrdiff_t nc, ptrdiff_t PW) {
    for (ptrdiff_t jb = 0; jb < PW; jb += 8) {
        ptrdiff_t k = 0;
        if (nc - jb >= 8) {
            const float *s = src + jb * lds;
            for (; k + 8 <= kc; k += 8) {
                __m256 r0 = _mm256_loadu_ps(s + k), r1 = _mm256_loadu_ps(s + lds + k);
                __m256 r2 = _mm256_loadu_ps(s + 2 * lds + k), r3 = _mm256_loadu_ps(s + 3 * lds + k);
                __m256 r4 = _mm256_loadu_ps(s + 4 * lds + k), r5 = _mm256_loadu_ps(s + 5 * lds + k);
                __m256 r6 = _mm256_loadu_ps(s + 6 * lds + k), r7 = _mm256_loadu_ps(s + 7 * lds + k);
                __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
                __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
                __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
                __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
                __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
                __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                float *d = dst + k * PW + jb;
                _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
                _mm256_storeu_ps(d + PW, _mm256_permute2f128_ps(u1, u5, 0x20));
                _mm256_storeu_ps(d + 2 * PW, _mm256_permute2f128_ps(u2, u6, 0x20));
                _mm256_storeu_ps(d + 3 * PW, _mm256_permute2f128_ps(u3, u7, 0x20));
                _mm256_storeu_ps(d + 4 * PW, _mm256_permute2f128_ps(u0, u4, 0x31));
                _mm256_storeu_ps(d + 5 * PW, _mm256_permute2f128_ps(u1, u5, 0x31));
                _mm256_storeu_ps(d + 6 * PW, _mm256_permute2f128_ps(u2, u6, 0x31));
                _mm256_storeu_ps(d + 7 * PW, _mm256_permute2f128_ps(u3, u7, 0x31));
            }
        }
        for (; k < kc; k++)
            for (ptrdiff_t r = 0; r < 8; r++) dst[k * PW + jb + r] = jb + r < nc ? src[(jb + r) * lds + k] : 0;
    }
}

MG_GEMM_INLINE void mg_pack_t_d(double *restrict dst, const double *restrict src, ptrdiff_t lds,
                                ptrdiff_t kc, ptrdiff_t nc, ptrdiff_t PW) {
    for (ptrdiff_t j = 0; j < PW; j++)
        for (ptrdiff_t k = 0; k < kc; k++) dst[k * PW + j] = j < nc ? src[j * lds + k] : 0;
}

/* all row counts 1..MR of one block shape, full or tail */
#define MG_GEMM_CASE(BLOCK, MRMAX, m, NV, TAIL, ...)                                              \
    case m: if (MRMAX >= m) { BLOCK(m, NV, TAIL, __VA_ARGS__); break; } /* fall through */
#define MG_GEMM_CASES(BLOCK, MRMAX, NV, TAIL, mr, ...)                                            \
    switch (mr) {                                                                                 \
    MG_GEMM_CASE(BLOCK, MRMAX, 12, NV, TAIL, __VA_ARGS__)                                         \
    MG_GEMM_CASE(BLOCK, MRMAX, 11, NV, TAIL, __VA_ARGS__)                                         \
    MG_GEMM_CASE(BLOCK, MRMAX, 10, NV, TAIL, __VA_ARGS__)                                         \
    MG_GEMM_CASE(BLOCK, MRMAX, 9, NV, TAIL, __VA_ARGS__)                                          \
    MG_GEMM_CASE(BLOCK, MRMAX, 8, NV, TAIL, __VA_ARGS__)                                          \
    MG_GEMM_CASE(BLOCK, MRMAX, 7, NV, TAIL, __VA_ARGS__)                                          \
    MG_GEMM_CASE(BLOCK, MRMAX, 6, NV, TAIL, __VA_ARGS__)                                          \
    MG_GEMM_CASE(BLOCK, MRMAX, 5, NV, TAIL, __VA_ARGS__)                                          \
    case 4: BLOCK(4, NV, TAIL, __VA_ARGS__); break;                                               \
    case 3: BLOCK(3, NV, TAIL, __VA_ARGS__); break;                                               \
    case 2: BLOCK(2, NV, TAIL, __VA_ARGS__); break;                                               \
    default: BLOCK(1, NV, TAIL, __VA_ARGS__);                                                     \
    }

/* Columns j .. j + W - 1 of a row of C (+)= the vector cv: as one vector when all W are below nc,
 * else the nc - j that are (element by element) */
#define MG_GEMM_STORE_ROW(T, VT, W, row, j, cv, nc, accumulate)                                   \
    do {                                                                                          \
        VT u_ = (cv); /* a copy: the accumulators' address is never taken */                     \
        MG_ROUNDED(u_);                                                                           \
        if ((nc) - (j) >= W) {                                                                    \
            if (accumulate) {                                                                     \
                VT o_;                                                                            \
                memcpy(&o_, (row) + (j), sizeof o_);                                              \
                u_ += o_;                                                                         \
            }                                                                                     \
            memcpy((row) + (j), &u_, sizeof u_);                                                  \
        } else {                                                                                  \
            T out_[W];                                                                            \
            memcpy(out_, &u_, sizeof out_);                                                       \
            for (ptrdiff_t l_ = 0; l_ < (nc) - (j); l_++)                                         \
                (row)[(j) + l_] = (accumulate) ? (row)[(j) + l_] + out_[l_] : out_[l_];           \
        }                                                                                         \
    } while (0)

/* A tile: C[0:MR, 0:nc] (+)= alpha sum_k A(r, k) P_g[k, :] over G panels of one vector each
 * (panel g at P + g pstride; A(r, k) at A[r sam + k sak]), nc <= G W. The blocks above load one
 * panel vector per MR broadcasts; a tile loads G, so it needs fewer rows for as many independent
 * chains (AVX-512's 32 registers: MR G accumulators, G panel vectors and a broadcast). Each
 * element is the blocks' chain of FMAs over k in order, then the same alpha and accumulate: a
 * tile and a block give the same bits. Accumulators sized exactly per shape, and the function
 * kept out of line: inlined into a product, its registers were spilled. next (or NULL): the
 * group of panels that follows, asked into L2 a line per panel as k advances, so a batch's
 * weights stream in from memory at the rate the tile consumes them (a prefetch changes no value). */
#define MG_DEFINE_GEMM_TILE(T, PT, VT, W, NAME, MR, G, LOADP, ATTR)                               \
    ATTR void NAME##_##MR##x##G(ptrdiff_t kc, const T *restrict A, ptrdiff_t sam, ptrdiff_t sak,   \
                                const PT *restrict P, ptrdiff_t pstride, T *restrict C, ptrdiff_t ldc, \
                                T alpha, int accumulate, ptrdiff_t nc, const PT *next) {          \
        VT c[MR][G];                                                                              \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                      \
            _Pragma("GCC unroll 8") for (int g = 0; g < G; g++) c[r][g] = (VT){0};                \
        for (ptrdiff_t k = 0; k < kc; k++) {                                                      \
            VT b[G];                                                                              \
            _Pragma("GCC unroll 8") for (int g = 0; g < G; g++) LOADP(&b[g], P + g * pstride + k * W); \
            if (next != NULL)                                                                     \
                _Pragma("GCC unroll 8") for (int g = 0; g < G; g++)                               \
                    __builtin_prefetch(next + g * pstride + k * W, 0, 2);                         \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                                \
                T x = A[r * sam + k * sak];                                                       \
                _Pragma("GCC unroll 8") for (int g = 0; g < G; g++) c[r][g] += x * b[g];          \
            }                                                                                     \
        }                                                                                         \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                      \
            _Pragma("GCC unroll 8") for (int g = 0; g < G; g++)                                   \
                MG_GEMM_STORE_ROW(T, VT, W, C + r * ldc, g * W, c[r][g] * alpha, nc, accumulate); \
    }
/* Tile shapes are listed once (X-macros): X(m, g, ...) for each shape defines or dispatches it */
#define MG_GEMM_TILE_DEFINE(m, g, T, PT, VT, W, NAME, LOADP, ATTR) MG_DEFINE_GEMM_TILE(T, PT, VT, W, NAME, m, g, LOADP, ATTR)
#define MG_GEMM_TILE_CASE(m, g, TILE, ...) case m * 16 + g: TILE##_##m##x##g(__VA_ARGS__); break;
/* the training's tiles: up to 4 rows of up to 5 panels */
#define MG_GEMM_TRAIN_TILE_ROWS 4
#define MG_GEMM_TRAIN_TILE_PANELS 5
#define MG_GEMM_TRAIN_TILE_SHAPES(X, ...)                                                         \
    X(1, 1, __VA_ARGS__) X(1, 2, __VA_ARGS__) X(1, 3, __VA_ARGS__) X(1, 4, __VA_ARGS__) X(1, 5, __VA_ARGS__) \
    X(2, 1, __VA_ARGS__) X(2, 2, __VA_ARGS__) X(2, 3, __VA_ARGS__) X(2, 4, __VA_ARGS__) X(2, 5, __VA_ARGS__) \
    X(3, 1, __VA_ARGS__) X(3, 2, __VA_ARGS__) X(3, 3, __VA_ARGS__) X(3, 4, __VA_ARGS__) X(3, 5, __VA_ARGS__) \
    X(4, 1, __VA_ARGS__) X(4, 2, __VA_ARGS__) X(4, 3, __VA_ARGS__) X(4, 4, __VA_ARGS__) X(4, 5, __VA_ARGS__)
#define MG_GEMM_TRAIN_TILE_CASES_1(TILE, mr, g, ...)                                              \
    switch ((mr) * 16 + (g)) {                                                                    \
    MG_GEMM_TRAIN_TILE_SHAPES(MG_GEMM_TILE_CASE, TILE, __VA_ARGS__)                               \
    default: break; /* unreachable: mr <= 4, g <= 5 */                                            \
    }
#define MG_GEMM_TRAIN_TILE_CASES_0(TILE, mr, g, ...) (void)(mr), (void)(g); /* no tiles (AVX2's 16 registers) */

/* C (M, N) (+)= alpha opA(A) B, A(i, k) at A[i * sam + k * sak]; B(k, j) at B[k * sbk + j * sbj]
 * (row-major B: sbk = ldb, sbj = 1; B given transposed: sbk = 1, sbj = ldb). Per pass of
 * kc <= MG_GEMM_KC rows of B, B is first packed into column panels of NV W (zero-padded: the
 * kernel's loads are whole and contiguous); every row block of A reuses them. Blocks are MR x
 * NV W with (MR, NV) = (6, 2) or (4, 3): the caller picks the one that wastes fewer columns.
 * TILES (AVX-512's one-vector panels): tiles of up to 4 rows over up to 5 panels (TILE) instead
 * of blocks, unless A's transpose is copied into block-wide tiles first. */
#define MG_DEFINE_GEMM_CORE(T, VT, W, BLOCK, PACKT, CORE, MR, NV, TILES, TILE, ATTR)                                      \
    ATTR static void CORE(T *restrict C, ptrdiff_t ldc, const T *restrict A, ptrdiff_t sam, \
                                  ptrdiff_t sak, const T *restrict B, ptrdiff_t sbk, ptrdiff_t sbj, \
                                  ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, T alpha, int accumulate, \
                                  T *restrict panels) {                                           \
        const ptrdiff_t PW = NV * W, np = (N + PW - 1) / PW;                                      \
        /* A read transposed (sam == 1: A^T B, the weight gradients) whose rows k span more than     \
         * L2 is first copied block by block (see below) */                                      \
        T *apack = sam == 1 && (size_t)K * sak * sizeof(T) > MG_GEMM_PACK_A_SPAN                  \
                       ? panels + np * PW * (K < MG_GEMM_KC ? K : MG_GEMM_KC) : NULL;             \
        if (K <= 0 && !accumulate) /* an empty sum: C = 0 */                                      \
            for (ptrdiff_t i = 0; i < M; i++) memset(C + i * ldc, 0, N * sizeof(T));             \
        for (ptrdiff_t k0 = 0; k0 < K; k0 += MG_GEMM_KC) {                                        \
            ptrdiff_t kc = K - k0 < MG_GEMM_KC ? K - k0 : MG_GEMM_KC;                             \
            int acc = accumulate || k0 > 0;                                                       \
            for (ptrdiff_t p = 0; p < np; p++) {                                                  \
                T *dst = panels + p * kc * PW;                                                    \
                ptrdiff_t j0 = p * PW, nc = N - j0 < PW ? N - j0 : PW;                            \
                if (sbj == 1) {                                                                   \
                    for (ptrdiff_t k = 0; k < kc; k++) {                                          \
                        MG_COPY_ROW_PADDED(T, VT, W, dst + k * PW, B + (k0 + k) * sbk + j0, nc, PW); \
                    }                                                                             \
                } else { /* B given transposed (sbk == 1: y = x W^T): transpose into the panel */ \
                    PACKT(dst, B + j0 * sbj + k0, sbj, kc, nc, PW);                               \
                }                                                                                 \
            }                                                                                     \
            for (ptrdiff_t i0 = 0; i0 < M; i0 += MG_GEMM_MC) {                                    \
                ptrdiff_t mc = M - i0 < MG_GEMM_MC ? M - i0 : MG_GEMM_MC;                         \
                /* a transposed A with rows far apart (a page each at the larger config) is copied \
                 * into MR-wide tiles, contiguous along k, which every panel then reads from L1/L2 \
                 * (faster on the larger config's products, see benchmarks/RESULTS.md; at the     \
                 * default config's sizes the copy costs more than it saves, hence the span       \
                 * threshold) */                                                                  \
                const T *Ab = A + i0 * sam + k0 * sak;                                            \
                if (TILES && apack == NULL) { /* rows of up to 4, each over groups of panels */   \
                    for (ptrdiff_t i = i0; i < i0 + mc; i += MG_GEMM_TRAIN_TILE_ROWS) {           \
                        int mr = i0 + mc - i < MG_GEMM_TRAIN_TILE_ROWS ? (int)(i0 + mc - i) : MG_GEMM_TRAIN_TILE_ROWS; \
                        for (ptrdiff_t p = 0; p < np; p += MG_GEMM_TRAIN_TILE_PANELS) {           \
                            int g = np - p < MG_GEMM_TRAIN_TILE_PANELS ? (int)(np - p) : MG_GEMM_TRAIN_TILE_PANELS; \
                            MG_GEMM_TRAIN_TILE_CASES_##TILES(TILE, mr, g, kc, Ab + (i - i0) * sam, sam, sak, \
                                                             panels + p * kc * PW, kc * PW, C + i * ldc + p * PW, ldc, \
                                                             alpha, acc, N - p * PW < g * PW ? N - p * PW : g * PW, \
                                                             (const T *)NULL)                      \
                        }                                                                         \
                    }                                                                             \
                    continue;                                                                     \
                }                                                                                 \
                if (apack != NULL) {                                                              \
                    for (ptrdiff_t b = 0; b * MR < mc; b++) {                                     \
                        ptrdiff_t rows = mc - b * MR < MR ? mc - b * MR : MR;                     \
                        const T *src = Ab + b * MR;                                               \
                        T *dst = apack + b * kc * MR;                                             \
                        if (rows == MR)                                                           \
                            for (ptrdiff_t k = 0; k < kc; k++)                                    \
                                memcpy(dst + k * MR, src + k * sak, MR * sizeof(T));              \
                        else                                                                      \
                            for (ptrdiff_t k = 0; k < kc; k++)                                    \
                                for (ptrdiff_t r = 0; r < rows; r++) dst[k * MR + r] = src[k * sak + r]; \
                    }                                                                             \
                }                                                                                 \
                const ptrdiff_t bsak = apack ? MR : sak; /* tiles: sam is 1 either way */          \
                for (ptrdiff_t p = 0; p < np; p++) {                                              \
                    const T *Pp = panels + p * kc * PW;                                           \
                    ptrdiff_t j0 = p * PW, nc = N - j0 < PW ? N - j0 : PW;                        \
                    for (ptrdiff_t i = i0; i < i0 + mc; i += MR) {                                \
                        int mr = i0 + mc - i < MR ? (int)(i0 + mc - i) : MR;                      \
                        const T *Ai = apack ? apack + ((i - i0) / MR) * kc * MR : Ab + (i - i0) * sam; \
                        T *Ci = C + i * ldc + j0;                                                 \
                        if (nc == PW) {                                                           \
                            MG_GEMM_CASES(BLOCK, MR, NV, 0, mr, kc, Ai, sam, bsak, Pp, Ci, ldc, alpha, acc, nc) \
                        } else {                                                                  \
                            MG_GEMM_CASES(BLOCK, MR, NV, 1, mr, kc, Ai, sam, bsak, Pp, Ci, ldc, alpha, acc, nc) \
                        }                                                                         \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

/* AVX2 (8 floats or 4 doubles a vector, 16 registers): blocks 6 x 2W or 4 x 3W, whichever
 * pads fewer columns */
#define MG_DEFINE_GEMM(T, VT, W, SFX)                                                             \
    MG_DEFINE_GEMM_BLOCK(T, T, VT, W, mg_gemm_block_##SFX, 6, MG_GEMM_INLINE, MG_LOAD_VECTOR)     \
    MG_DEFINE_GEMM_CORE(T, VT, W, mg_gemm_block_##SFX, mg_pack_t_##SFX, mg_gemm_core2_##SFX, 6, 2, 0, -, MG_GEMM_ATTR) \
    MG_DEFINE_GEMM_CORE(T, VT, W, mg_gemm_block_##SFX, mg_pack_t_##SFX, mg_gemm_core3_##SFX, 4, 3, 0, -, MG_GEMM_ATTR) \
    static inline int mg_gemm_wide_##SFX(ptrdiff_t N) {                                           \
        ptrdiff_t pad2 = (N + 2 * W - 1) / (2 * W) * 2 * W, pad3 = (N + 3 * W - 1) / (3 * W) * 3 * W; \
        return pad3 < pad2;                                                                       \
    }

MG_DEFINE_GEMM(float, mg_v8f, 8, f)
MG_DEFINE_GEMM(double, mg_v4d, 4, d)

/* AVX-512 (16 floats or 8 doubles a vector, 32 registers; full width on the cores that run it at
 * full rate): blocks 12 x W, 12 x 2W or 8 x 3W, the one that pads fewest columns (ties: the
 * wider, which loads B less often per FMA) */
#define MG_GEMM512_ATTR __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define MG_GEMM512_INLINE __attribute__((always_inline, target("avx512f,avx512vl,avx2,fma"))) static inline
/* a kernel kept out of line (the tiles: see MG_DEFINE_GEMM_TILE) */
#define MG_GEMM512_CALLED __attribute__((noinline, unused, target("avx512f,avx512vl,avx2,fma"))) static
/* mg_v16f, mg_v8d: attention.h's */

#define MG_DEFINE_GEMM512(T, VT, W, SFX)                                                          \
    MG_DEFINE_GEMM_BLOCK(T, T, VT, W, mg_gemm512_block_##SFX, 12, MG_GEMM512_INLINE, MG_LOAD_VECTOR) \
    MG_GEMM_TRAIN_TILE_SHAPES(MG_GEMM_TILE_DEFINE, T, T, VT, W, mg_gemm512_tile_##SFX, MG_LOAD_VECTOR, MG_GEMM512_CALLED) \
    MG_DEFINE_GEMM_CORE(T, VT, W, mg_gemm512_block_##SFX, mg_pack_t_##SFX, mg_gemm512_core1_##SFX, 12, 1, 1, \
                        mg_gemm512_tile_##SFX, MG_GEMM512_ATTR)                                   \
    MG_DEFINE_GEMM_CORE(T, VT, W, mg_gemm512_block_##SFX, mg_pack_t_##SFX, mg_gemm512_core2_##SFX, 12, 2, 0, -, MG_GEMM512_ATTR) \
    MG_DEFINE_GEMM_CORE(T, VT, W, mg_gemm512_block_##SFX, mg_pack_t_##SFX, mg_gemm512_core3_##SFX, 8, 3, 0, -, MG_GEMM512_ATTR) \
    /* vectors per panel: 1, 2 or 3 */                                                            \
    static inline int mg_gemm512_width_##SFX(ptrdiff_t N) {                                       \
        int best = 3;                                                                             \
        ptrdiff_t best_pad = (N + 3 * W - 1) / (3 * W) * 3 * W;                                   \
        for (int nv = 2; nv >= 1; nv--) {                                                         \
            ptrdiff_t pad = (N + nv * W - 1) / (nv * W) * nv * W;                                 \
            if (pad < best_pad) best = nv, best_pad = pad;                                        \
        }                                                                                         \
        return best;                                                                              \
    }

MG_DEFINE_GEMM512(float, mg_v16f, 16, f)
MG_DEFINE_GEMM512(double, mg_v8d, 8, d)
#endif

/* The public entry points: 1 when the product was computed here, 0 when the caller must use
 * BLAS (no AVX2+FMA, or no memory for B^T). */
/* The entry point: C (+)= alpha op(A) op(B) in the form MG_GEMM_NT, _NN or _TN (see the top).
 * Returns 1 when the product was computed here, 0 when the caller must use BLAS (no AVX2+FMA,
 * or no memory for the scratch). */
enum { MG_GEMM_NT = 0, MG_GEMM_NN = 1, MG_GEMM_TN = 2 };

/* W: the widest vector's lanes; every block shape pads N to at most a multiple of 3 W (and 2 W
 * for AVX2's), and tiles of A take (MC + the largest MR) x kc */
#define MG_DEFINE_GEMM_API(T, SFX, W)                                                             \
    static inline T *mg_gemm_panels_##SFX(ptrdiff_t N, ptrdiff_t K) {                             \
        ptrdiff_t kc = K < MG_GEMM_KC ? K : MG_GEMM_KC;                                           \
        size_t panel_elems = (size_t)((N + 3 * W - 1) / (3 * W)) * 3 * W * kc;                    \
        return (T *)mg_gemm_scratch_get((panel_elems + (size_t)(MG_GEMM_MC + 12) * kc) * sizeof(T)); \
    }                                                                                             \
    static inline int mg_gemm_##SFX(int form, T *C, ptrdiff_t ldc, const T *A, ptrdiff_t lda,     \
                                    const T *B, ptrdiff_t ldb, ptrdiff_t M, ptrdiff_t N,          \
                                    ptrdiff_t K, T alpha, int accumulate) {                       \
        /* strides of A(i, k) and B(k, j) */                                                      \
        ptrdiff_t sam = form == MG_GEMM_TN ? 1 : lda, sak = form == MG_GEMM_TN ? lda : 1;        \
        ptrdiff_t sbk = form == MG_GEMM_NT ? 1 : ldb, sbj = form == MG_GEMM_NT ? ldb : 1;        \
        MG_GEMM_BODY(T, SFX, C, ldc, A, sam, sak, B, sbk, sbj, M, N, K, alpha, accumulate)        \
    }

#ifdef MG_GEMM_AVX2
#define MG_GEMM_BODY(T, SFX, C, ldc, A, sam, sak, B, sbk, sbj, M, N, K, alpha, accumulate)        \
    T *panels;                                                                                    \
    if (!mg_tri_use_avx2() || (panels = mg_gemm_panels_##SFX(N, K)) == NULL) return 0;            \
    if (mg_use_avx512()) {                                                                        \
        int nv = mg_gemm512_width_##SFX(N);                                                       \
        if (nv == 1)                                                                              \
            mg_gemm512_core1_##SFX(C, ldc, A, sam, sak, B, sbk, sbj, M, N, K, alpha, accumulate, panels); \
        else if (nv == 2)                                                                         \
            mg_gemm512_core2_##SFX(C, ldc, A, sam, sak, B, sbk, sbj, M, N, K, alpha, accumulate, panels); \
        else                                                                                      \
            mg_gemm512_core3_##SFX(C, ldc, A, sam, sak, B, sbk, sbj, M, N, K, alpha, accumulate, panels); \
    } else if (mg_gemm_wide_##SFX(N))                                                             \
        mg_gemm_core3_##SFX(C, ldc, A, sam, sak, B, sbk, sbj, M, N, K, alpha, accumulate, panels);\
    else                                                                                          \
        mg_gemm_core2_##SFX(C, ldc, A, sam, sak, B, sbk, sbj, M, N, K, alpha, accumulate, panels);\
    return 1;
#else
#define MG_GEMM_BODY(T, SFX, C, ldc, A, sam, sak, B, sbk, sbj, M, N, K, alpha, accumulate)        \
    (void)C, (void)ldc, (void)A, (void)sam, (void)sak, (void)B, (void)sbk, (void)sbj, (void)M,    \
        (void)N, (void)K, (void)alpha, (void)accumulate;                                          \
    return 0;
#endif

MG_DEFINE_GEMM_API(float, f, 16)
MG_DEFINE_GEMM_API(double, d, 8)

/* ---- products with a weight packed once: the decoder's linear layers
 *
 * C (M, N) = A (M, K) B^T for a weight B (N, K) packed ahead by mg_gemm_pack_nt_* into the
 * panels the NT form above packs on every call: for each pass of MG_GEMM_KC rows of K
 * (kc = min(KC, K - k0)), np = ceil(N / PW) panels of kc x PW (column j of a panel is row j of
 * B, zero past N), pass k0 at P + k0 np PW, panel p of it at + p kc PW. Size: np PW K elements.
 * PW is 16 (float and bfloat16 panels) or 8 (double): two AVX2 vectors (the 6 x 2W block
 * above) or one AVX-512 vector (the 12 x W block).
 *
 * mg_gemm_packed_<s>(C, ldc, A, lda, P, M, N, K, p0, p1) computes the columns of panels
 * p0 .. p1-1 with the same register blocks as mg_gemm_<s> (and for one or two rows, a block
 * of several panels: enough chains of FMAs for one row); every element is the same chain of
 * FMAs over k per pass, the passes added in order, so a row's result does not depend on the
 * other rows, on the split into parts, or on the instruction set's width. Without AVX2 a
 * portable loop does the same sums (its own rounding: no FMA there). bfloat16 panels (the
 * upper halves of float32 bits, rounded to nearest even by mg_bf16_round) are widened exactly
 * as they are loaded: the products are the float32 products of the rounded weights. */
typedef uint16_t mg_bf16;

static inline float mg_bf16_to_f(mg_bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* the bfloat16 nearest x, ties to even (NaN stays NaN; past the largest finite: infinity) */
static inline mg_bf16 mg_bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) return (mg_bf16)((u >> 16) | 0x0040u);
    return (mg_bf16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#define MG_PACKED_PW_F 16
#define MG_PACKED_PW_D 8

static inline size_t mg_gemm_packed_elems(ptrdiff_t N, ptrdiff_t K, ptrdiff_t PW) {
    return (size_t)((N + PW - 1) / PW) * (size_t)PW * (size_t)K;
}

/* P = the panels of B (N, K), ldb (see above); CONV turns an element of B into one of P */
#define MG_DEFINE_GEMM_PACK(T, PT, SFX, PW, CONV)                                                 \
    static inline void mg_gemm_pack_nt_##SFX(PT *restrict P, const T *restrict B, ptrdiff_t ldb, ptrdiff_t N, \
                                      ptrdiff_t K) {                                              \
        const ptrdiff_t np = (N + PW - 1) / PW;                                                   \
        for (ptrdiff_t k0 = 0; k0 < K; k0 += MG_GEMM_KC) {                                        \
            ptrdiff_t kc = K - k0 < MG_GEMM_KC ? K - k0 : MG_GEMM_KC;                             \
            for (ptrdiff_t p = 0; p < np; p++) {                                                  \
                PT *dst = P + k0 * np * PW + p * kc * PW;                                         \
                for (ptrdiff_t j = 0; j < PW; j++) {                                              \
                    ptrdiff_t row = p * PW + j;                                                   \
                    if (row >= N) { /* zero columns past N */                                     \
                        for (ptrdiff_t k = 0; k < kc; k++) dst[k * PW + j] = CONV((T)0);          \
                        continue;                                                                 \
                    }                                                                             \
                    const T *src = B + row * ldb + k0;                                            \
                    for (ptrdiff_t k = 0; k < kc; k++) dst[k * PW + j] = CONV(src[k]);            \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

#define MG_SAME(x) (x)
MG_DEFINE_GEMM_PACK(float, float, f, MG_PACKED_PW_F, MG_SAME)
MG_DEFINE_GEMM_PACK(double, double, d, MG_PACKED_PW_D, MG_SAME)
MG_DEFINE_GEMM_PACK(float, mg_bf16, bf16, MG_PACKED_PW_F, mg_bf16_round)

/* the portable path: per row and panel, PW sums over k in order (vectorized across columns) */
#define MG_DEFINE_GEMM_PACKED_GENERIC(T, PT, SFX, PW, WVAL)                                       \
    static void mg_gemm_packed_generic_##SFX(T *restrict C, ptrdiff_t ldc, const T *restrict A, ptrdiff_t lda, \
                                             const PT *restrict P, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, \
                                             ptrdiff_t p0, ptrdiff_t p1) {                        \
        const ptrdiff_t np = (N + PW - 1) / PW;                                                   \
        for (ptrdiff_t k0 = 0; k0 < K; k0 += MG_GEMM_KC) {                                        \
            ptrdiff_t kc = K - k0 < MG_GEMM_KC ? K - k0 : MG_GEMM_KC;                             \
            for (ptrdiff_t i = 0; i < M; i++)                                                     \
                for (ptrdiff_t p = p0; p < p1; p++) {                                             \
                    const PT *Pp = P + k0 * np * PW + p * kc * PW;                                \
                    const T *a = A + i * lda + k0;                                                \
                    T acc[PW];                                                                    \
                    for (ptrdiff_t j = 0; j < PW; j++) acc[j] = 0;                                \
                    for (ptrdiff_t k = 0; k < kc; k++) {                                          \
                        T x = a[k];                                                               \
                        _Pragma("omp simd") for (ptrdiff_t j = 0; j < PW; j++) acc[j] += x * WVAL(Pp[k * PW + j]); \
                    }                                                                             \
                    ptrdiff_t j0 = p * PW, nc = N - j0 < PW ? N - j0 : PW;                        \
                    T *c = C + i * ldc + j0;                                                      \
                    for (ptrdiff_t j = 0; j < nc; j++) c[j] = k0 > 0 ? c[j] + acc[j] : acc[j];    \
                }                                                                                 \
        }                                                                                         \
    }

MG_DEFINE_GEMM_PACKED_GENERIC(float, float, f, MG_PACKED_PW_F, MG_SAME)
MG_DEFINE_GEMM_PACKED_GENERIC(double, double, d, MG_PACKED_PW_D, MG_SAME)
MG_DEFINE_GEMM_PACKED_GENERIC(float, mg_bf16, bf16, MG_PACKED_PW_F, mg_bf16_to_f)

#ifdef MG_GEMM_AVX2
/* eight bfloat16 widened to a vector of eight floats */
#define MG_LOAD_BF16(dst, src)                                                                    \
    do {                                                                                          \
        __m256 w_ = _mm256_castsi256_ps(                                                          \
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src))), 16)); \
        memcpy((dst), &w_, sizeof w_);                                                            \
    } while (0)

MG_DEFINE_GEMM_BLOCK(float, mg_bf16, mg_v8f, 8, mg_gemm_block_bf16, 6, MG_GEMM_INLINE, MG_LOAD_BF16)

/* One or two rows (MR) of G consecutive panels of NVP vectors of W: C[r, 0:nc] (+)= the rows'
 * sums over one pass (pstride: elements from a panel to the next). The blocks above would give
 * one row only NVP chains of FMAs; this gives it G NVP. Each element's chain is the blocks' one. */
#define MG_DEFINE_GEMM_ROWS(T, PT, VT, W, NVP, NAME, LOADP, INLINE)                               \
    INLINE void NAME(const int MR, const int G, ptrdiff_t kc, const T *restrict A, ptrdiff_t lda,  \
                     const PT *restrict P, ptrdiff_t pstride, T *restrict C, ptrdiff_t ldc,        \
                     int accumulate, ptrdiff_t nc) {                                              \
        VT c[2][8][NVP];                                                                          \
        _Pragma("GCC unroll 2") for (int r = 0; r < MR; r++)                                      \
            _Pragma("GCC unroll 8") for (int g = 0; g < G; g++)                                   \
                _Pragma("GCC unroll 2") for (int v = 0; v < NVP; v++) c[r][g][v] = (VT){0};       \
        for (ptrdiff_t k = 0; k < kc; k++) {                                                      \
            T x0 = A[k], x1 = MR > 1 ? A[lda + k] : 0;                                            \
            _Pragma("GCC unroll 8") for (int g = 0; g < G; g++)                                   \
                _Pragma("GCC unroll 2") for (int v = 0; v < NVP; v++) {                           \
                    VT b;                                                                         \
                    LOADP(&b, P + g * pstride + k * NVP * W + v * W);                             \
                    c[0][g][v] += x0 * b;                                                         \
                    if (MR > 1) c[1][g][v] += x1 * b;                                             \
                }                                                                                 \
        }                                                                                         \
        _Pragma("GCC unroll 2") for (int r = 0; r < MR; r++)                                      \
            _Pragma("GCC unroll 8") for (int g = 0; g < G; g++)                                   \
                _Pragma("GCC unroll 2") for (int v = 0; v < NVP; v++)                             \
                    MG_GEMM_STORE_ROW(T, VT, W, C + r * ldc, (NVP * g + v) * W, c[r][g][v], nc, accumulate); \
    }

/* one or two rows of g <= GMAX panels (g <= GMAX / 2 for two) */
#define MG_GEMM_ROWS_CASES(ROWS, M, g, ...)                                                       \
    if (M == 1) {                                                                                 \
        switch (g) {                                                                              \
        case 8: ROWS(1, 8, __VA_ARGS__); break;                                                   \
        case 7: ROWS(1, 7, __VA_ARGS__); break;                                                   \
        case 6: ROWS(1, 6, __VA_ARGS__); break;                                                   \
        case 5: ROWS(1, 5, __VA_ARGS__); break;                                                   \
        case 4: ROWS(1, 4, __VA_ARGS__); break;                                                   \
        case 3: ROWS(1, 3, __VA_ARGS__); break;                                                   \
        case 2: ROWS(1, 2, __VA_ARGS__); break;                                                   \
        default: ROWS(1, 1, __VA_ARGS__);                                                         \
        }                                                                                         \
    } else {                                                                                      \
        switch (g) {                                                                              \
        case 4: ROWS(2, 4, __VA_ARGS__); break;                                                   \
        case 3: ROWS(2, 3, __VA_ARGS__); break;                                                   \
        case 2: ROWS(2, 2, __VA_ARGS__); break;                                                   \
        default: ROWS(2, 1, __VA_ARGS__);                                                         \
        }                                                                                         \
    }

/* the decode's tile shapes (mg_gemm_tile_panels): these, and 4 x 4, one of the training's */
#define MG_GEMM_DECODE_TILE_SHAPES(X, ...)                                                        \
    X(3, 8, __VA_ARGS__) X(4, 6, __VA_ARGS__) X(5, 4, __VA_ARGS__) X(6, 4, __VA_ARGS__)           \
    X(6, 2, __VA_ARGS__) X(7, 2, __VA_ARGS__) X(8, 2, __VA_ARGS__)
/* Tiles of a batch's rows (AVX-512: 32 registers): rows are dealt evenly over tiles of at most
 * eight (blocks of mr and mr - 1 rows, mr - 1 >= 4 then), each taking the panels of its larger
 * block at once: mr x G accumulators, G panel vectors and the mr broadcasts fit the registers */
#define MG_GEMM_TILE_ROWS 8
static inline int mg_gemm_tile_panels(ptrdiff_t mr) {
    return mr <= 3 ? 8 : mr == 4 ? 6 : mr <= 6 ? 4 : 2;
}
#define MG_GEMM_TILE_CASES_1(TILE, mr, G, ...)                                                    \
    switch ((mr) * 16 + (G)) {                                                                    \
    MG_GEMM_DECODE_TILE_SHAPES(MG_GEMM_TILE_CASE, TILE, __VA_ARGS__)                              \
    MG_GEMM_TILE_CASE(4, 4, TILE, __VA_ARGS__)                                                    \
    default: break; /* unreachable: see mg_gemm_tile_panels */                                    \
    }
#define MG_GEMM_TILE_CASES_0(TILE, mr, G, ...) /* no tiles (AVX2's 16 registers) */

/* Share b of `blocks` of the `lines` 64-byte lines at `next`, prefetched into L2. With several
 * row blocks, only the first reads a panel from memory and the others find it in L1; the next
 * panel is fetched a share per block meanwhile, so that its stream overlaps the arithmetic
 * instead of following it (a weight streamed from L3 or DRAM for a batch of sequences). A
 * prefetch changes no value. */
#define MG_PREFETCH_SHARE(next, lines, b, blocks)                                                 \
    do {                                                                                          \
        const char *next_ = (const char *)(next);                                                 \
        for (ptrdiff_t l_ = (b) * (lines) / (blocks); l_ < ((b) + 1) * (lines) / (blocks); l_++)  \
            __builtin_prefetch(next_ + 64 * l_, 0, 2);                                            \
    } while (0)

/* the packed product on one instruction set: panels of NVP vectors of W, blocks of MRB rows
 * (BLOCK), one or two rows GMAX or GMAX / 2 panels at a time (ROWS); with TILES, more rows in
 * tiles of several panels (TILE) */
#define MG_DEFINE_GEMM_PACKED(T, PT, W, NVP, MRB, GMAX, TILES, NAME, BLOCK, ROWS, TILE, ATTR)                   \
    ATTR static void NAME(T *restrict C, ptrdiff_t ldc, const T *restrict A, ptrdiff_t lda,       \
                          const PT *restrict P, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, ptrdiff_t p0, \
                          ptrdiff_t p1) {                                                         \
        const ptrdiff_t PW = NVP * W, np = (N + PW - 1) / PW;                                     \
        for (ptrdiff_t k0 = 0; k0 < K; k0 += MG_GEMM_KC) {                                        \
            ptrdiff_t kc = K - k0 < MG_GEMM_KC ? K - k0 : MG_GEMM_KC;                             \
            int acc = k0 > 0;                                                                     \
            const PT *Pk = P + k0 * np * PW;                                                      \
            if (M <= 2) {                                                                         \
                const ptrdiff_t G = M == 1 ? GMAX : GMAX / 2;                                     \
                for (ptrdiff_t p = p0; p < p1; p += G) {                                          \
                    ptrdiff_t g = p1 - p < G ? p1 - p : G, j0 = p * PW;                           \
                    ptrdiff_t nc = N - j0 < g * PW ? N - j0 : g * PW;                             \
                    MG_GEMM_ROWS_CASES(ROWS, M, g, kc, A + k0, lda, Pk + p * kc * PW, kc * PW, C + j0, ldc, acc, nc) \
                }                                                                                 \
                continue;                                                                         \
            }                                                                                     \
            const ptrdiff_t rows = TILES ? MG_GEMM_TILE_ROWS : MRB;                               \
            const ptrdiff_t blocks = (M + rows - 1) / rows;                                       \
            const ptrdiff_t lines = (ptrdiff_t)(kc * PW * sizeof(PT)) / 64;                       \
            const ptrdiff_t G = TILES ? mg_gemm_tile_panels((M + blocks - 1) / blocks) : 1;       \
            for (ptrdiff_t p = p0; p < p1;) {                                                     \
                const PT *Pp = Pk + p * kc * PW;                                                  \
                ptrdiff_t j0 = p * PW, nc = N - j0 < PW ? N - j0 : PW;                            \
                int tile = G > 1 && p + G <= p1;                                                  \
                ptrdiff_t step = tile ? G : 1;                                                    \
                for (ptrdiff_t b = 0; b < blocks; b++) { /* rows dealt evenly: 8 = 4 + 4, not 6 + 2 */ \
                    ptrdiff_t i = b * M / blocks;                                                 \
                    int mr = (int)((b + 1) * M / blocks - i);                                     \
                    const T *Ai = A + i * lda + k0;                                               \
                    T *Ci = C + i * ldc + j0;                                                     \
                    if (tile) { /* the first block streams the next group in as it goes */        \
                        MG_GEMM_TILE_CASES_##TILES(TILE, mr, G, kc, Ai, lda, 1, Pp, kc * PW, Ci, ldc, (T)1, acc, \
                                                   N - j0 < G * PW ? N - j0 : G * PW,              \
                                                   b == 0 && p + G < p1 ? Pp + G * kc * PW : NULL) \
                        continue;                                                                 \
                    }                                                                             \
                    if (blocks > 1 && p + 1 < p1) MG_PREFETCH_SHARE(Pp + kc * PW, lines, b, blocks); \
                    if (nc == PW) {                                                               \
                        MG_GEMM_CASES(BLOCK, MRB, NVP, 0, mr, kc, Ai, lda, 1, Pp, Ci, ldc, (T)1, acc, nc) \
                    } else {                                                                      \
                        MG_GEMM_CASES(BLOCK, MRB, NVP, 1, mr, kc, Ai, lda, 1, Pp, Ci, ldc, (T)1, acc, nc) \
                    }                                                                             \
                }                                                                                 \
                p += step;                                                                        \
            }                                                                                     \
        }                                                                                         \
    }

/* AVX2: panels of two vectors, the 6 x 2W block (the training's) */
MG_DEFINE_GEMM_ROWS(float, float, mg_v8f, 8, 2, mg_gemm_rows_f, MG_LOAD_VECTOR, MG_GEMM_INLINE)
MG_DEFINE_GEMM_ROWS(double, double, mg_v4d, 4, 2, mg_gemm_rows_d, MG_LOAD_VECTOR, MG_GEMM_INLINE)
MG_DEFINE_GEMM_ROWS(float, mg_bf16, mg_v8f, 8, 2, mg_gemm_rows_bf16, MG_LOAD_BF16, MG_GEMM_INLINE)
MG_DEFINE_GEMM_PACKED(float, float, 8, 2, 6, 4, 0, mg_gemm_packed_avx2_f, mg_gemm_block_f, mg_gemm_rows_f, -, MG_GEMM_ATTR)
MG_DEFINE_GEMM_PACKED(double, double, 4, 2, 6, 4, 0, mg_gemm_packed_avx2_d, mg_gemm_block_d, mg_gemm_rows_d, -, MG_GEMM_ATTR)
MG_DEFINE_GEMM_PACKED(float, mg_bf16, 8, 2, 6, 4, 0, mg_gemm_packed_avx2_bf16, mg_gemm_block_bf16, mg_gemm_rows_bf16,
                      -, MG_GEMM_ATTR)

/* AVX-512 (where the probe chose it for the training's products): panels of one vector, the
 * 12 x W block (the training's); the same sums, so the same bits as AVX2 */
#define MG_LOAD_BF16_512(dst, src)                                                                \
    do {                                                                                          \
        __m512 w_ = _mm512_castsi512_ps(                                                          \
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src))), 16)); \
        memcpy((dst), &w_, sizeof w_);                                                            \
    } while (0)

MG_DEFINE_GEMM_BLOCK(float, mg_bf16, mg_v16f, 16, mg_gemm512_block_bf16, 12, MG_GEMM512_INLINE, MG_LOAD_BF16_512)
MG_DEFINE_GEMM_ROWS(float, float, mg_v16f, 16, 1, mg_gemm512_rows_f, MG_LOAD_VECTOR, MG_GEMM512_INLINE)
MG_DEFINE_GEMM_ROWS(double, double, mg_v8d, 8, 1, mg_gemm512_rows_d, MG_LOAD_VECTOR, MG_GEMM512_INLINE)
MG_DEFINE_GEMM_ROWS(float, mg_bf16, mg_v16f, 16, 1, mg_gemm512_rows_bf16, MG_LOAD_BF16_512, MG_GEMM512_INLINE)
MG_GEMM_DECODE_TILE_SHAPES(MG_GEMM_TILE_DEFINE, float, float, mg_v16f, 16, mg_gemm512_tile_f, MG_LOAD_VECTOR, MG_GEMM512_CALLED)
MG_GEMM_DECODE_TILE_SHAPES(MG_GEMM_TILE_DEFINE, double, double, mg_v8d, 8, mg_gemm512_tile_d, MG_LOAD_VECTOR, MG_GEMM512_CALLED)
MG_GEMM_DECODE_TILE_SHAPES(MG_GEMM_TILE_DEFINE, float, mg_bf16, mg_v16f, 16, mg_gemm512_tile_bf16, MG_LOAD_BF16_512,
                           MG_GEMM512_CALLED)
MG_DEFINE_GEMM_TILE(float, mg_bf16, mg_v16f, 16, mg_gemm512_tile_bf16, 4, 4, MG_LOAD_BF16_512, MG_GEMM512_CALLED)
MG_DEFINE_GEMM_PACKED(float, float, 16, 1, 12, 8, 1, mg_gemm_packed_avx512_f, mg_gemm512_block_f, mg_gemm512_rows_f,
                      mg_gemm512_tile_f, MG_GEMM512_ATTR)
MG_DEFINE_GEMM_PACKED(double, double, 8, 1, 12, 8, 1, mg_gemm_packed_avx512_d, mg_gemm512_block_d, mg_gemm512_rows_d,
                      mg_gemm512_tile_d, MG_GEMM512_ATTR)
MG_DEFINE_GEMM_PACKED(float, mg_bf16, 16, 1, 12, 8, 1, mg_gemm_packed_avx512_bf16, mg_gemm512_block_bf16,
                      mg_gemm512_rows_bf16, mg_gemm512_tile_bf16, MG_GEMM512_ATTR)
#endif

/* the entry points; avx2: the caller's choice of path, fixed for a process (mg_decode_has_avx2),
 * so that every row of a decode runs the same path; with it, the vector width the training's
 * products use (mg_use_avx512, decided once per process) */
#ifdef MG_GEMM_AVX2
#define MG_GEMM_PACKED_DISPATCH(SFX, ...)                                                         \
    if (avx2 && mg_use_avx512()) mg_gemm_packed_avx512_##SFX(__VA_ARGS__);                        \
    else if (avx2) mg_gemm_packed_avx2_##SFX(__VA_ARGS__);                                        \
    else mg_gemm_packed_generic_##SFX(__VA_ARGS__);
#else
#define MG_GEMM_PACKED_DISPATCH(SFX, ...) (void)avx2; mg_gemm_packed_generic_##SFX(__VA_ARGS__);
#endif
#define MG_DEFINE_GEMM_PACKED_API(T, PT, SFX)                                                     \
    static inline void mg_gemm_packed_##SFX(int avx2, T *C, ptrdiff_t ldc, const T *A, ptrdiff_t lda, \
                                            const PT *P, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,   \
                                            ptrdiff_t p0, ptrdiff_t p1) {                         \
        MG_GEMM_PACKED_DISPATCH(SFX, C, ldc, A, lda, P, M, N, K, p0, p1)                          \
    }

MG_DEFINE_GEMM_PACKED_API(float, float, f)
MG_DEFINE_GEMM_PACKED_API(double, double, d)
MG_DEFINE_GEMM_PACKED_API(float, mg_bf16, bf16)

#endif
