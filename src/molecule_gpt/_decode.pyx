# _decode.pyx: the native half of generation (design.md §4, §5, §8.9, §8.10).
#
# What it is:
#   Weights   the effective weights of one model version, read-only and shareable between
#             threads: every adapted matrix with its delta modules folded in
#             (W + sum_k alpha_k A_k B_k, done once per version by generation.py), q/k/v stacked
#             into one (3C, C) matrix and fc_g/fc_v into one (2F, C), so a token step is 13 gemv
#             calls at the default config instead of 7 per layer plus 2 per delta module.
#   Decoder   one generation: the key/value cache, scratch, the sampling stack and the loop
#             with its stop rules. One per generating thread (it is not thread-safe); it holds
#             the GIL only between tokens (and while calling Python logits processors).
#   Batch     several started Decoders advanced together: one forward per step with a row per
#             sequence, so each weight matrix is read once per step for all of them; every
#             sequence gives the tokens it gives alone (design.md §4.1).
# What it is not: training (_core), policy (generation.py validates parameters and folds the
# weights under the model lock; text, stream decoding and stop strings are Python), the
# sampling stack (_sampling.pyx) or the corpus field's tables (_field.pyx), which it calls.
#
# Positions (design.md §8.10). The cache holds a window of at most T = block_size tokens whose
# positions are 0..n-1 relative to the window's first token, exactly as in training (every
# training sequence starts at position 0). A prompt longer than T keeps its last T tokens. When
# the window is full and another token must be fed, the last T/2 tokens of the window and the
# new token are re-run as one batched prefill at positions 0..T/2. Hence, at every step, the
# logits equal Model.logits(window)[-1] for the current window: the defining test. The
# original's `t mod block_size` (design.md §2) is never reached, and the rrpram pattern row (T
# entries) always covers every key (the crash of §8.10 cannot happen).
#
# Notes:
# - Keys are rotated once, when they enter the cache (the original re-rotated every cached key
#   at every step), and the prompt's last token is fed once (§8.9: the prefill's last logits
#   give the first sampled token).
# - The ops are the training forward's (_ops.pxd: embedding, RMSNorm, RoPE, gate, residual add;
#   csrc/gemm.h: the linear layers' products; csrc/attention.h: causal attention, for the rows
#   being decoded over the cache; csrc/rows.h: the row sums, in an order fixed by the code), so
#   with every delta module frozen a decode's logits are Model.logits bit for bit, in float32 and
#   float64 (a module still training is an adapter in the training forward and folded here: equal
#   to rounding). What differs is the shape: the products use folded weights, packed once per
#   model version (pack_weight), and attention reads the cache.
# - No BLAS: OpenBLAS was no faster on these shapes, cost a call path per product, and its
#   threads had to be limited per call, which restarts them spinning at every restore (they
#   then burned the core the background trainer needs).
# - Keys are cached transposed per head (H, d, Tp): the form attention.h's content logits read
#   (each key's logit is a chain of FMAs over d, all keys in vector lanes); values per head
#   (H, T, d). A head's keys and values are then blocks of their own, which stream best when a
#   batch's caches no longer fit in the CPU's caches.
# - Rejected: computing the pattern logits of all T keys each step (only the panels covering
#   the n cached ones are computed); a second softmax pass fused into the first (it would need
#   three exponentials per token to cover the three possible temperatures).

from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset, memcpy
from libc.math cimport log, sqrt, INFINITY
from libc.stdint cimport uint64_t, uint8_t, uint16_t
from cpython.ref cimport PyObject
cdef extern from * nogil:
    void __builtin_prefetch(const void* p, int rw, int locality)
cdef extern from "pool.h" nogil:  # the worker pool the training step runs on (csrc/pool.c)
    ctypedef void (*mg_pool_fn)(void* ctx, int part) noexcept nogil
    int mg_pool_run(mg_pool_fn fn, void* ctx, int n)

import numpy as np

from ._molecule cimport (floating, HEAD_CONTENT, HEAD_HYBRID, N_HEAD_TYPES, N_ACTIVATIONS, mg_head_type_names,
                         mg_activation_names, code_table, code_of, mg_bf16, mg_bf16_round,
                         MG_PACKED_PW_F, MG_PACKED_PW_D, mg_gemm_packed_elems, mg_gemm_pack_nt_f,
                         mg_gemm_pack_nt_d, mg_gemm_pack_nt_bf16, mg_gemm_packed_f, mg_gemm_packed_d,
                         mg_gemm_packed_bf16, HEAD_RRPRAM, mg_tri_nt_rows_f, mg_tri_nt_rows_d, mg_tri_nn_heads_f,
                         mg_tri_nn_heads_d, mg_causal_softmax_f, mg_causal_softmax_d)
from ._ops cimport embed_forward, rmsnorm_forward, rope_forward, rope_tables_per_head, gate_forward, add_forward
from ._sampling cimport Rng, Cand, SampleC, rng_seed, softmax_t, sample_stack, cand_draw
from ._field cimport Field, field_dist

cdef extern from "decode_kernels.h" nogil:  # the decoder's instruction path
    int mg_decode_has_avx2()

# stop reasons returned by Decoder.run (names in STOP_REASONS)
cdef enum:
    STOP_NONE = 0
    STOP_EOS = 1
    STOP_MAX_TOKENS = 2
    STOP_SENTENCE = 3
    STOP_REPETITION = 4

STOP_REASONS = (None, "eos", "max_tokens", "sentence", "repetition")

# the codes of csrc/codes.h by name (the same tables as _core's: one definition)
HEAD_TYPES = code_table(mg_head_type_names, N_HEAD_TYPES)
ACTIVATIONS = code_table(mg_activation_names, N_ACTIVATIONS)


def simd_path() -> str:
    """"avx2" when the float32 kernels run their AVX2+FMA versions, else "portable"."""
    return "avx2" if mg_decode_has_avx2() else "portable"


# ---------------------------------------------------------------------------------------------
# small helpers

cdef inline void* data_ptr(object arr):
    return <void*><size_t>arr.__array_interface__["data"][0]


# Products of at least this many multiply-adds may be split across the decoder's threads (below
# it a fork/join costs more than it saves; one row of the default config's largest product has 41k).
cdef Py_ssize_t PAR_MIN_WEIGHTS = 1 << 17


ctypedef struct ProductJob:  # one product split by rows (of the inputs or of the weights' panels) over the pool's parts
    void* C
    const void* A
    const void* P   # the weight's packed panels (gemm.h)
    Py_ssize_t M, N, K, lda, ldc, chunk
    bint is_double
    bint bf16


cdef inline Py_ssize_t panel_width(bint is_double) noexcept nogil:
    return MG_PACKED_PW_D if is_double else MG_PACKED_PW_F


cdef inline void mm_nt(floating* Cm, const floating* A, const void* P, Py_ssize_t M, Py_ssize_t N,
                       Py_ssize_t K, Py_ssize_t lda, Py_ssize_t ldc, Py_ssize_t p0, Py_ssize_t p1,
                       bint bf16) noexcept nogil:
    """Columns p0*PW .. p1*PW (panels p0 .. p1-1) of C (M, N) = A (M, K) B^T, B (N, K) packed
    into P by pack_weight: the linear layers' product (gemm.h), floating or bfloat16 panels."""
    cdef int avx2 = mg_decode_has_avx2()
    if floating is float:
        if bf16:
            mg_gemm_packed_bf16(avx2, Cm, ldc, A, lda, <const mg_bf16*>P, M, N, K, p0, p1)
        else:
            mg_gemm_packed_f(avx2, Cm, ldc, A, lda, <const float*>P, M, N, K, p0, p1)
    else:
        mg_gemm_packed_d(avx2, Cm, ldc, A, lda, <const double*>P, M, N, K, p0, p1)


cdef void _mm_nt_part(void* ctx, int t) noexcept nogil:
    cdef ProductJob* j = <ProductJob*>ctx
    cdef Py_ssize_t r0 = t * j.chunk, r1 = min(j.M, r0 + j.chunk)
    cdef Py_ssize_t np_ = (j.N + panel_width(j.is_double) - 1) // panel_width(j.is_double)
    if r1 <= r0:
        return
    if j.is_double:
        mm_nt(<double*>j.C + r0 * j.ldc, <const double*>j.A + r0 * j.lda, j.P, r1 - r0, j.N, j.K, j.lda, j.ldc,
              0, np_, False)
    else:
        mm_nt(<float*>j.C + r0 * j.ldc, <const float*>j.A + r0 * j.lda, j.P, r1 - r0, j.N, j.K, j.lda, j.ldc,
              0, np_, j.bf16)


cdef void mm_nt_par(floating* Cm, const floating* A, const void* P, Py_ssize_t M, Py_ssize_t N,
                    Py_ssize_t K, Py_ssize_t lda, Py_ssize_t ldc, int nt, bint bf16) noexcept nogil:
    """mm_nt over all panels with the input rows split over nt parts of the worker pool when the
    product is large enough."""
    cdef ProductJob job
    cdef Py_ssize_t np_ = (N + panel_width(floating is double) - 1) // panel_width(floating is double)
    if nt <= 1 or N * K < PAR_MIN_WEIGHTS or M < 3 * nt:
        mm_nt(Cm, A, P, M, N, K, lda, ldc, 0, np_, bf16)
        return
    job.C, job.A, job.P = <void*>Cm, <const void*>A, P
    job.M, job.N, job.K, job.lda, job.ldc = M, N, K, lda, ldc
    job.chunk = ((M + nt - 1) // nt + 5) // 6 * 6
    job.is_double, job.bf16 = floating is double, bf16
    mg_pool_run(_mm_nt_part, &job, nt)


cdef void _mm_nt_w_part(void* ctx, int t) noexcept nogil:
    cdef ProductJob* j = <ProductJob*>ctx
    cdef Py_ssize_t np_ = (j.N + panel_width(j.is_double) - 1) // panel_width(j.is_double)
    cdef Py_ssize_t p0 = t * j.chunk, p1 = min(np_, p0 + j.chunk)
    if p1 <= p0:
        return
    if j.is_double:
        mm_nt(<double*>j.C, <const double*>j.A, j.P, j.M, j.N, j.K, j.lda, j.ldc, p0, p1, False)
    else:
        mm_nt(<float*>j.C, <const float*>j.A, j.P, j.M, j.N, j.K, j.lda, j.ldc, p0, p1, j.bf16)


cdef void mm_nt_wpar(floating* Cm, const floating* A, const void* P, Py_ssize_t M, Py_ssize_t N,
                     Py_ssize_t K, Py_ssize_t lda, Py_ssize_t ldc, int nt, bint bf16) noexcept nogil:
    """mm_nt with the weight's panels (its output rows) split over nt parts of the worker pool
    when the product is large enough: each part reads only its share of the weights. Every
    element has the arithmetic it has unsplit (gemm.h); for one input row this is a split
    matrix-vector product."""
    cdef ProductJob job
    cdef Py_ssize_t np_ = (N + panel_width(floating is double) - 1) // panel_width(floating is double)
    if nt <= 1 or M * N * K < PAR_MIN_WEIGHTS or np_ < 2 * nt:
        mm_nt(Cm, A, P, M, N, K, lda, ldc, 0, np_, bf16)
        return
    job.C, job.A, job.P = <void*>Cm, <const void*>A, P
    job.M, job.N, job.K, job.lda, job.ldc = M, N, K, lda, ldc
    job.chunk = (np_ + nt - 1) // nt
    job.is_double, job.bf16 = floating is double, bf16
    mg_pool_run(_mm_nt_w_part, &job, nt)


def pack_weight(W, bint bf16=False):
    """The panels the decoder's products read for a weight W (nout, nin) (float32 or float64,
    C-contiguous): a 1-d array of W's element type, or of bfloat16 bits (uint16) rounded to
    nearest even when bf16 (float32 only). See gemm.h's packed products."""
    if not isinstance(W, np.ndarray) or W.ndim != 2 or W.dtype not in (np.float32, np.float64) \
            or not W.flags.c_contiguous:
        raise ValueError(f"W must be a 2-D C-contiguous float32 or float64 array, got "
                         f"{getattr(W, 'dtype', type(W).__name__)} {getattr(W, 'shape', '')}")
    cdef Py_ssize_t N = W.shape[0], K = W.shape[1]
    cdef bint is_double = W.dtype == np.float64
    if bf16 and is_double:
        raise TypeError("bfloat16 panels are made from float32 weights")
    P = np.empty(mg_gemm_packed_elems(N, K, panel_width(is_double)),
                 np.uint16 if bf16 else W.dtype)
    cdef void* p = data_ptr(P)
    cdef const void* w = data_ptr(W)
    with nogil:
        if bf16:
            mg_gemm_pack_nt_bf16(<mg_bf16*>p, <const float*>w, K, N, K)
        elif is_double:
            mg_gemm_pack_nt_d(<double*>p, <const double*>w, K, N, K)
        else:
            mg_gemm_pack_nt_f(<float*>p, <const float*>w, K, N, K)
    return P


# ---------------------------------------------------------------------------------------------
# Weights: effective weights of one model version

ctypedef struct WLayer:  # the matrices as packed panels (pack_weight) of the shapes given
    void* wqkv      # (3C, C)  wq; wk; wv stacked
    void* wo        # (C, C)
    void* fcgv      # (2F, C)  fc_g; fc_v stacked
    void* fc2       # (C, F)
    void** pat      # (H,) (T, d) pattern matrices of rrpram/hybrid heads as packed panels; NULL for content
    double* mix     # (H,) sigmoid(alpha) of hybrid heads

ctypedef struct WNet:
    int L, C, H, d, T, V, F, act
    bint bf16       # the panels of wqkv, wo, fcgv, fc2 and lm hold bfloat16 elements (float32 model)
    int* head_type  # (H,)
    void* wte       # (V, C) input embedding (base)
    void* wpe       # (T, C)
    void* lm        # (V, C) effective output matrix (packed panels)
    void* cos_t     # (T, C/2) RoPE's tables, each position's row repeated per head (rope_forward)
    void* sin_t
    int* pos        # (T,) window positions 0..T-1 (the ops take a position per row)
    WLayer* layers


cdef class Weights:
    """Effective weights of one model version (see the module docstring). Built by
    generation.fold_weights; arrays are validated there and kept alive here."""
    cdef WNet net
    cdef readonly bint is_double
    cdef readonly bint bf16     # the products' matrices are bfloat16 (see bfloat16_bits); activations stay float32
    cdef readonly object dtype
    cdef readonly Py_ssize_t matrix_bytes  # the packed matrices a token streams through the products
    cdef object keep

    def __cinit__(self):
        memset(&self.net, 0, sizeof(WNet))

    def __init__(self, int n_layer, int n_embd, int n_head, int block_size, head_types, str activation,
                 wte, wpe, lm, cos_t, sin_t, layers, *, bint bf16=False):
        cdef int l, h
        cdef WLayer* Lw
        if n_layer < 1 or n_embd < 1 or n_head < 1 or block_size < 1 or n_embd % n_head or (n_embd // n_head) % 2:
            raise ValueError("invalid model dimensions")
        if len(head_types) != n_head or len(layers) != n_layer:
            raise ValueError("head_types needs n_head entries and layers n_layer entries")
        dt = np.asarray(wte).dtype
        if dt != np.float32 and dt != np.float64:
            raise TypeError(f"weights must be float32 or float64, got {dt}")
        if bf16 and dt != np.float32:
            raise TypeError(f"bfloat16 decode weights need a float32 model, got {dt}")
        self.dtype = dt
        self.is_double = dt == np.float64
        self.bf16 = bf16
        self.net.bf16 = bf16
        C, T, d, F = n_embd, block_size, n_embd // n_head, 4 * n_embd
        V = wte.shape[0]
        keep = []

        def check(a, shape, what, matrix=False, rounded=True):
            if not isinstance(a, np.ndarray) or a.dtype != dt or not a.flags.c_contiguous or a.shape != shape:
                raise ValueError(f"{what} must be a C-contiguous {dt} array of shape {shape}, got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
            if matrix:  # the products read it as panels (bfloat16 ones when bf16, unless not rounded)
                a = pack_weight(a, bf16 and rounded)
                self.matrix_bytes += a.nbytes
            keep.append(a)
            return a

        self.net.L, self.net.C, self.net.H, self.net.d, self.net.T = n_layer, C, n_head, d, T
        self.net.V, self.net.F = V, F
        self.net.act = code_of(ACTIVATIONS, activation, "activation")
        self.net.wte = data_ptr(check(wte, (V, C), "wte"))
        self.net.wpe = data_ptr(check(wpe, (T, C), "wpe"))
        self.net.lm = data_ptr(check(lm, (V, C), "lm_head", True))
        cos_t = rope_tables_per_head(check(cos_t, (T, d // 2), "cos_t"), n_head)
        sin_t = rope_tables_per_head(check(sin_t, (T, d // 2), "sin_t"), n_head)
        keep += [cos_t, sin_t]
        self.net.cos_t = data_ptr(cos_t)
        self.net.sin_t = data_ptr(sin_t)
        self.net.pos = <int*>calloc(T, sizeof(int))
        if self.net.pos == NULL:
            raise MemoryError()
        for l in range(T):
            self.net.pos[l] = l
        self.net.head_type = <int*>calloc(n_head, sizeof(int))
        self.net.layers = <WLayer*>calloc(n_layer, sizeof(WLayer))
        if self.net.head_type == NULL or self.net.layers == NULL:
            raise MemoryError()
        for h in range(n_head):
            self.net.head_type[h] = code_of(HEAD_TYPES, head_types[h], "head type")
        for l in range(n_layer):
            Lw = &self.net.layers[l]
            Lw.pat = <void**>calloc(n_head, sizeof(void*))
            Lw.mix = <double*>calloc(n_head, sizeof(double))
            if Lw.pat == NULL or Lw.mix == NULL:
                raise MemoryError()
            layer = layers[l]
            Lw.wqkv = data_ptr(check(layer["wqkv"], (3 * C, C), f"layer {l} wqkv", True))
            Lw.wo = data_ptr(check(layer["wo"], (C, C), f"layer {l} wo", True))
            Lw.fcgv = data_ptr(check(layer["fcgv"], (2 * F, C), f"layer {l} fcgv", True))
            Lw.fc2 = data_ptr(check(layer["fc2"], (C, F), f"layer {l} fc2", True))
            for h in range(n_head):
                if self.net.head_type[h] != HEAD_CONTENT:
                    Lw.pat[h] = data_ptr(check(layer["pat"][h], (T, d), f"layer {l} head {h} w_pattern", True, False))
                if self.net.head_type[h] == HEAD_HYBRID:
                    Lw.mix[h] = float(layer["mix"][h])
        self.keep = keep

    def __dealloc__(self):
        cdef int l
        if self.net.layers != NULL:
            for l in range(self.net.L):
                free(self.net.layers[l].pat)
                free(self.net.layers[l].mix)
            free(self.net.layers)
        free(self.net.head_type)
        free(self.net.pos)

    @property
    def vocab_size(self) -> int:
        return self.net.V

    @property
    def block_size(self) -> int:
        return self.net.T


def bfloat16_bits(a):
    """The bfloat16 nearest each element of the float32 array a (ties to even), as the uint16
    upper halves of float32 bits: the rounding Weights(bf16=True) applies (gemm.h's
    mg_bf16_round). Finite values that round past the largest bfloat16 become infinities, as
    in IEEE rounding; NaN stays NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty(a.shape, np.uint16)
    cdef const float[::1] src = a.reshape(-1)
    cdef uint16_t[::1] dst = out.reshape(-1)
    cdef Py_ssize_t i
    with nogil:
        for i in range(src.shape[0]):
            dst[i] = mg_bf16_round(src[i])
    return out


def bfloat16_values(bits):
    """The float32 values of bfloat16 bits (bfloat16_bits's output): exact."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------------------------
# forward: rows after the cache (a batched prefill, or one decode step)

ctypedef struct Buf:
    void* X         # (T, C)     residual stream
    void* Hn        # (T, C)     normalized input of the current block
    void* QKV       # (T, 3C)    q | k | v before rotation
    void* Q         # (T, C)     rotated queries
    void* K         # (T, C)     rotated keys (then stored transposed in kc)
    void* S         # ((H+2) Tp) one query's attention weights per head, a head's content logits, softmax scratch
    void* P         # (H, T)     pattern logits of one query, per head
    void* Y         # (T, C)     concatenated head outputs
    void* O         # (T, C)     a block's output before the residual add
    void* GU        # (T, 2F)    fc_g and fc_v outputs
    void* A         # (T, F)     gated activation
    void* kc        # (L, H, d, Tp) rotated keys of the window, transposed per head (cache_stride)
    void* vc        # (L, H, T, d) values of the window per head (and CACHE_PAD elements after it)
    void* logits    # (V,)
    int nt          # threads for large products (mm_nt_wpar / mm_nt_par)


# The attention kernels (attention.h) load whole vectors: a key row of the transposed cache up to
# a multiple of 32 positions (so its stride, Tp, is one), a value row up to a multiple of 16
# elements past its d (the next row's, or CACHE_PAD elements after the last: never used). Both
# caches are head-major, so that the keys and values one head attends over are one block each:
# a batch's caches do not stay in cache, and contiguous blocks stream best.
DEF CACHE_PAD = 16


cdef inline Py_ssize_t cache_stride(Py_ssize_t T) noexcept nogil:
    """Tp: positions per row of the transposed key cache, T rounded up to 32 (the rows of
    attention.h's 512-bit kernels)."""
    return (T + 31) // 32 * 32


cdef void* buf_alloc(Buf* b, Py_ssize_t rows, const WNet* net, bint is_double, bint sequence) except NULL:
    """One zeroed block carved into b's arrays: the work rows X .. A for `rows` rows, and either a
    sequence's own parts (sequence: the caches kc, vc and the attention scratch S, P; its logits
    are a numpy array the caller sets) or a batch's logits (rows, V). Returns the block (free it)."""
    cdef size_t es = sizeof(double) if is_double else sizeof(float), total = 0
    cdef Py_ssize_t i, L = net.L, C = net.C, T = net.T, F = net.F, R = rows
    cdef Py_ssize_t seq = 1 if sequence else 0
    cdef size_t sizes[14]
    cdef void** slots[14]
    cdef Py_ssize_t Tp = cache_stride(T)
    sizes[:] = [R * C, R * C, R * 3 * C, R * C, R * C, seq * (net.H + 2) * Tp, seq * net.H * T, R * C, R * C,
                R * 2 * F, R * F, seq * L * Tp * C, seq * (L * T * C + CACHE_PAD), (1 - seq) * R * net.V]
    slots[:] = [&b.X, &b.Hn, &b.QKV, &b.Q, &b.K, &b.S, &b.P, &b.Y, &b.O, &b.GU, &b.A, &b.kc, &b.vc, &b.logits]
    for i in range(14):
        total += sizes[i] * es
    cdef void* block = calloc(total, 1)
    if block == NULL:
        raise MemoryError(f"cannot allocate {total} bytes of decoding scratch")
    cdef char* cur = <char*>block
    for i in range(14):
        slots[i][0] = <void*>cur if sizes[i] else NULL
        cur += sizes[i] * es
    return block


cdef inline void attend_row(floating* y, floating* scratch, floating* pat_rows, const floating* q,
                            const floating* hrow, const floating* kt, const floating* vc, const WNet* net,
                            const WLayer* Lw, int nk) noexcept nogil:
    """y (C) = attention output of the query at position nk - 1 (q rotated, hrow its normalized
    input) over the nk cached keys kt (H, d, Tp; transposed) and values vc (H, T, d), by the
    training's attention kernels (attention.h) for that one row: content logits (mg_tri_nt_rows),
    the head's logits and causal softmax (mg_causal_softmax: heads.h's rows), then the weighted
    values of every head at once (mg_tri_nn_heads: each head's sums are mg_tri_nn_rows's,
    interleaved across heads to hide their latency). Pattern logits of rrpram/hybrid heads go to
    pat_rows (H, T) first, by the linear layers' product as in training. scratch: (H + 2) Tp
    elements (the heads' weights, then a head's content logits and the softmax's buffer)."""
    cdef Py_ssize_t h, T = net.T, d = net.d, C = net.C, Tp = cache_stride(net.T)
    cdef Py_ssize_t panels = (nk + panel_width(floating is double) - 1) // panel_width(floating is double)
    cdef int kind
    cdef floating* att = scratch
    cdef floating* cont = scratch + net.H * Tp
    cdef floating* buf = cont + Tp
    cdef floating* prow
    cdef floating scale = <floating>(1.0 / sqrt(<double>d))
    for h in range(net.H):
        if h + 1 < net.H:
            prefetch_head(kt + (h + 1) * d * Tp, Tp, vc + (h + 1) * T * d, d, nk)
        kind = net.head_type[h]
        prow = NULL
        if kind != HEAD_CONTENT:
            prow = pat_rows + h * T
            mm_nt(prow, hrow + h * d, Lw.pat[h], 1, T, d, d, T, 0, panels, False)
        if floating is float:
            if kind != HEAD_RRPRAM:
                mg_tri_nt_rows_f(cont, Tp, q + h * d, d, kt + h * d * Tp, Tp, nk - 1, nk, d, scale)
            mg_causal_softmax_f(att + h * Tp, Tp, cont, Tp, prow, T, nk - 1, nk, <float>Lw.mix[h], kind, buf)
        else:
            if kind != HEAD_RRPRAM:
                mg_tri_nt_rows_d(cont, Tp, q + h * d, d, kt + h * d * Tp, Tp, nk - 1, nk, d, scale)
            mg_causal_softmax_d(att + h * Tp, Tp, cont, Tp, prow, T, nk - 1, nk, Lw.mix[h], kind, buf)
    if floating is float:
        mg_tri_nn_heads_f(y, d, att, Tp, vc, T * d, d, net.H, nk - 1, d, 1, 0)
    else:
        mg_tri_nn_heads_d(y, d, att, Tp, vc, T * d, d, net.H, nk - 1, d, 1, 0)


cdef inline void prefetch_head(const floating* kt, Py_ssize_t Tp, const floating* v, Py_ssize_t d,
                               Py_ssize_t nk) noexcept nogil:
    """Ask for the next head's nk cached keys (d rows of kt, stride Tp) and values (nk d
    elements from v) while this head computes: a batch's caches stream from L3 or DRAM, and a
    head's own loads alone leave that latency exposed. Changes no value."""
    cdef Py_ssize_t c, j, step = 64 // sizeof(floating)
    for c in range(d):
        j = 0
        while j < nk:
            __builtin_prefetch(kt + c * Tp + j, 0, 2)
            j += step
    j = 0
    while j < nk * d:
        __builtin_prefetch(v + j, 0, 2)
        j += step


cdef inline void store_value(floating* vc, const floating* v, Py_ssize_t pos, Py_ssize_t H, Py_ssize_t T,
                             Py_ssize_t d) noexcept nogil:
    """Write one value row v (C = H*d) into position pos of each head's block of vc (H, T, d)."""
    cdef Py_ssize_t h
    for h in range(H):
        memcpy(vc + (h * T + pos) * d, v + h * d, d * sizeof(floating))


cdef inline void store_key(floating* kt, const floating* k, Py_ssize_t pos, Py_ssize_t C, Py_ssize_t Tp) noexcept nogil:
    """Write one rotated key row k (C = H*d) into column pos of the transposed cache kt (rows of Tp)."""
    cdef Py_ssize_t c
    for c in range(C):
        kt[c * Tp + pos] = k[c]


cdef double std_of(const floating* x, Py_ssize_t n) noexcept nogil:
    """Standard deviation of x[0:n] (two passes, double)."""
    cdef Py_ssize_t i
    cdef double mean = 0, var = 0
    for i in range(n):
        mean += x[i]
    mean /= n
    for i in range(n):
        var += (x[i] - mean) * (x[i] - mean)
    return sqrt(var / n)


cdef inline void linear_rows(floating* Y, const void* W, const floating* X, Py_ssize_t N, Py_ssize_t nout,
                             Py_ssize_t nin, int nt, bint by_weights, bint bf16) noexcept nogil:
    """Y (N, nout) = X (N, nin) W^T for a folded weight W (nout, nin) given as its packed panels
    (pack_weight; bfloat16 ones when bf16). Split over the threads by W's panels when by_weights
    or N == 1 (rows of independent sequences: each thread streams a share of the weights), else
    by X's rows (a prefill: FMA-bound, each thread takes a block of rows)."""
    if by_weights or N == 1:
        mm_nt_wpar(Y, X, W, N, nout, nin, nin, nout, nt, bf16)
    else:
        mm_nt_par(Y, X, W, N, nout, nin, nin, nout, nt, bf16)


ctypedef struct AttendJob:  # the attention rows r0 .. N-1 of a forward, split over the pool's parts
    const WNet* net
    const WLayer* Lw
    Buf* const* seq
    const int* pos
    void* Y
    const void* Q
    const void* Hn
    Py_ssize_t l
    int r0, N, nt
    bint batched
    bint is_double


cdef void attend_rows(floating* tag, const AttendJob* j, int part) noexcept nogil:
    """Rows r0 + part, r0 + part + nt, ... < N of a forward: row i attends over its sequence's
    cache (seq[i] when batched, else seq[0]: keys, values, scratch S and P) up to and including
    position pos[i]; its output is row i - r0 of Y. (One function for every caller, so each row's
    attention runs the same compiled code, batched or not.)"""
    cdef Py_ssize_t i = j.r0 + part, C = j.net.C, T = j.net.T
    cdef Buf* sb
    while i < j.N:
        sb = j.seq[i if j.batched else 0]
        attend_row(<floating*>j.Y + (i - j.r0) * C, <floating*>sb.S, <floating*>sb.P, <const floating*>j.Q + i * C,
                   <const floating*>j.Hn + i * C, <floating*>sb.kc + j.l * C * cache_stride(T),
                   <floating*>sb.vc + j.l * T * C,
                   j.net, j.Lw, j.pos[i] + 1)
        i += j.nt


cdef void _attend_part(void* ctx, int part) noexcept nogil:
    cdef AttendJob* j = <AttendJob*>ctx
    if j.is_double:
        attend_rows(<double*>NULL, j, part)
    else:
        attend_rows(<float*>NULL, j, part)


cdef void forward_rows(floating* tag, const WNet* net, Buf* b, Buf* const* seq, int n_seq, const int* ids,
                       const int* pos, int N, double* stds) noexcept nogil:
    """Run N token rows through the model after the positions the caches hold: write each row's
    key and value into its sequence's cache and the next-token logits into the sequence's
    logits. Two shapes, one forward:
      n_seq == 1  the rows are consecutive tokens of one sequence whose cache is seq[0]: a
                  prefill (pos = 0 .. N-1) or a decode step (N = 1, pos = the window's length);
                  only the last row's logits are wanted.
      n_seq == N  row i is the next token of sequence i (cache seq[i]) at its own position
                  pos[i]: a batched decode step. Each matrix is read once for all N rows, and
                  every row's arithmetic is the one it has alone (gemm.h, attention.h).
    b: the work rows X .. A (at least N rows) and the threads b.nt; seq[i].logits (V) receives the
    logits (for n_seq == N through b.logits, (N, V)). Each op is the training forward's (_ops.pxd);
    attention reads the cache (attend_row) one query at a time over the keys it sees. stds
    (L + 1, may be NULL; n_seq == 1 only) receives the std of the residual stream after the
    embedding and after each layer."""
    cdef Py_ssize_t l, i, r0, n, C = net.C, F = net.F, T = net.T, d = net.d, C3 = 3 * net.C, V = net.V
    cdef bint batched = n_seq > 1
    cdef const WLayer* Lw
    cdef floating* X = <floating*>b.X
    cdef floating* Hn = <floating*>b.Hn
    cdef floating* QKV = <floating*>b.QKV
    cdef floating* Q = <floating*>b.Q
    cdef floating* K = <floating*>b.K
    cdef floating* Y = <floating*>b.Y
    cdef floating* O = <floating*>b.O
    cdef floating* GU = <floating*>b.GU
    cdef floating* A = <floating*>b.A
    cdef floating* x
    cdef Buf* sb
    cdef AttendJob job
    cdef const floating* cos_t = <const floating*>net.cos_t
    cdef const floating* sin_t = <const floating*>net.sin_t
    embed_forward(X, <const floating*>net.wte, <const floating*>net.wpe, ids, pos, N, C)
    if stds != NULL:
        stds[0] = std_of(X, N * C)
    for l in range(net.L):
        Lw = &net.layers[l]
        rmsnorm_forward(Hn, <floating*>NULL, X, N, C)
        linear_rows(QKV, Lw.wqkv, Hn, N, C3, C, b.nt, batched, net.bf16)
        rope_forward(Q, QKV, pos, cos_t, sin_t, N, net.H, d, C3)
        rope_forward(K, QKV + C, pos, cos_t, sin_t, N, net.H, d, C3)
        for i in range(N):
            sb = seq[i if batched else 0]
            store_key(<floating*>sb.kc + l * C * cache_stride(T), K + i * C, pos[i], C, cache_stride(T))
            store_value(<floating*>sb.vc + l * T * C, QKV + i * C3 + 2 * C, pos[i], net.H, T, d)
        # Rows r0 .. N-1 go on through the layer. In a prefill's last layer only the last row does:
        # its keys and values are cached, and the rest of it only matters for the logits (a large
        # share of a shallow model's prefill) -- unless every row's residual stream is wanted (stds).
        r0 = N - 1 if l == net.L - 1 and stds == NULL and not batched else 0
        n = N - r0
        # a batch's rows (each over its own cache and scratch) are split over the threads
        job.net, job.Lw, job.seq, job.pos, job.l, job.r0, job.N = net, Lw, seq, pos, l, <int>r0, N
        job.Y, job.Q, job.Hn, job.batched = <void*>Y, <const void*>Q, <const void*>Hn, batched
        job.nt = b.nt if batched and 1 < b.nt <= N else 1
        job.is_double = floating is double
        if job.nt > 1:
            mg_pool_run(_attend_part, &job, job.nt)
        else:
            _attend_part(&job, 0)
        x = X + r0 * C
        linear_rows(O, Lw.wo, Y, n, C, C, b.nt, batched, net.bf16)
        add_forward(x, x, O, n * C)
        rmsnorm_forward(Hn, <floating*>NULL, x, n, C)
        linear_rows(GU, Lw.fcgv, Hn, n, 2 * F, C, b.nt, batched, net.bf16)
        gate_forward(A, GU, GU + F, n, F, 2 * F, net.act)
        linear_rows(O, Lw.fc2, A, n, C, F, b.nt, batched, net.bf16)
        add_forward(x, x, O, n * C)
        if stds != NULL:
            stds[l + 1] = std_of(X, N * C)
    # the logits of rows r0 .. N-1 (the last row of one sequence, or every row of a batch). One
    # call of each op for both shapes: the compiler may order an `omp simd` reduction differently
    # in two inlined copies, and a batched row must get its single-row arithmetic. The norm runs
    # a row per call, as a single step always ran it: a sequence decoded alone rounds as before
    # batching existed.
    r0 = 0 if batched else N - 1
    for i in range(r0, N):
        rmsnorm_forward(Hn + (i - r0) * C, <floating*>NULL, X + i * C, 1, C)
    linear_rows(<floating*>(b.logits if batched else seq[0].logits), net.lm, Hn, N - r0, V, C, b.nt, True, net.bf16)
    if batched:
        for i in range(N):
            memcpy(seq[i].logits, <floating*>b.logits + i * V, V * sizeof(floating))


# ---------------------------------------------------------------------------------------------
# Decoder: one generation

cdef class Decoder:
    """One generation's state: cache, window, scratch, random state, generated tokens.

    Decoder(weights, vocab_size, block_size): `weights` may be None for field-only generation.
    Low level (tests): prefill(ids), feed(token), logits, window. Generation: begin(...) then
    run(limit, processors) until it reports a stop reason. Not thread-safe: one per thread."""
    cdef Weights w
    cdef const WNet* net
    cdef Buf b
    cdef void* block
    cdef readonly bint is_double
    cdef object __weakref__     # generation.InFlight follows started generations weakly
    cdef int V, T
    cdef int n                  # tokens in the window (cache rows filled)
    cdef readonly long long rows    # positions run through the model since begin() (a prefill's,
                                    # one a step, a window refill's): a benchmark's unit of work
    cdef int* win               # (T + 1,) token ids of the window
    # generation state
    cdef Rng rng
    cdef SampleC sp
    cdef Field field
    cdef int* hist              # (cap,) prompt then generated ids
    cdef Py_ssize_t nh, cap, n_prompt, max_new, min_new
    cdef int rep_guard, eos, use_model, started, finished
    cdef int* counts            # (V,) generated-token counts (frequency penalty)
    cdef uint8_t* banned        # (V,) never sampled (BOS, PAD)
    cdef int* banned_ids        # (V,) the same as a list
    cdef Py_ssize_t n_banned
    cdef uint8_t* sentence_end  # (V,) token ends with . ! or ?
    cdef float* z               # (V,) working logits
    cdef float* fscratch        # (2V,) softmax scratch
    cdef double* p              # (V,) probabilities
    cdef double* q              # (V,) field distribution
    cdef Cand* cand             # (V,)
    # b.logits is this array's own buffer, not part of the scratch block: the array owns its
    # memory and does not reference the decoder. A view over the block would keep the decoder
    # alive through the view's base, which numpy does not show to the cycle collector, so
    # decoder -> array -> decoder would never be freed.
    cdef readonly object last_logits_array

    def __cinit__(self):
        self.block = NULL
        self.win = NULL
        self.hist = NULL
        self.counts = NULL
        self.banned = NULL
        self.banned_ids = NULL
        self.sentence_end = NULL
        self.z = NULL
        self.fscratch = NULL
        self.p = NULL
        self.q = NULL
        self.cand = NULL

    def __init__(self, Weights weights, int vocab_size, int block_size, int n_threads=1):
        if vocab_size < 1 or block_size < 1:
            raise ValueError("vocab_size and block_size must be positive")
        if weights is not None and (weights.net.V != vocab_size or weights.net.T != block_size):
            raise ValueError(f"weights are for vocab_size={weights.net.V}, block_size={weights.net.T}; "
                             f"got vocab_size={vocab_size}, block_size={block_size}")
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        self.w = weights
        self.b.nt = n_threads
        self.V = vocab_size
        self.T = block_size
        self.win = <int*>calloc(block_size + 1, sizeof(int))
        self.counts = <int*>calloc(vocab_size, sizeof(int))
        self.banned = <uint8_t*>calloc(vocab_size, 1)
        self.banned_ids = <int*>calloc(vocab_size, sizeof(int))
        self.sentence_end = <uint8_t*>calloc(vocab_size, 1)
        self.z = <float*>calloc(vocab_size, sizeof(float))
        self.fscratch = <float*>calloc(2 * vocab_size, sizeof(float))
        self.p = <double*>calloc(vocab_size, sizeof(double))
        self.q = <double*>calloc(vocab_size, sizeof(double))
        self.cand = <Cand*>calloc(vocab_size, sizeof(Cand))
        if (self.win == NULL or self.counts == NULL or self.banned == NULL or self.sentence_end == NULL
                or self.z == NULL or self.p == NULL or self.q == NULL or self.cand == NULL or self.banned_ids == NULL
                or self.fscratch == NULL):
            raise MemoryError()
        if weights is None:
            self.net = NULL
            return
        self.net = &weights.net
        self.is_double = weights.is_double
        self.block = buf_alloc(&self.b, block_size, &weights.net, self.is_double, True)
        # the logits live in a numpy array of their own (see last_logits_array): the arrays
        # prefill/feed/logits return stay valid even after the decoder is gone
        self.last_logits_array = np.zeros(vocab_size, dtype=weights.dtype)
        cdef unsigned char[::1] logits_bytes = self.last_logits_array.view(np.uint8)
        self.b.logits = <void*>&logits_bytes[0]

    def __dealloc__(self):
        free(self.block)
        free(self.win)
        free(self.hist)
        free(self.counts)
        free(self.banned)
        free(self.banned_ids)
        free(self.sentence_end)
        free(self.z)
        free(self.fscratch)
        free(self.p)
        free(self.q)
        free(self.cand)

    # ---- forward over the window

    cdef void _prefill(self, const int* ids, int N, double* stds=NULL) noexcept nogil:
        cdef Buf* seq = &self.b
        if self.is_double:
            forward_rows(<double*>NULL, self.net, &self.b, &seq, 1, ids, self.net.pos, N, stds)
        else:
            forward_rows(<float*>NULL, self.net, &self.b, &seq, 1, ids, self.net.pos, N, stds)
        if ids != self.win:
            memcpy(self.win, ids, N * sizeof(int))
        self.n = N
        self.rows += N

    cdef void _feed(self, int tok) noexcept nogil:
        """Append tok to the window (the window-full rule of the module docstring)."""
        cdef int keep
        cdef Buf* seq = &self.b
        if self.n < self.T:
            if self.is_double:
                forward_rows(<double*>NULL, self.net, &self.b, &seq, 1, &tok, self.net.pos + self.n, 1, NULL)
            else:
                forward_rows(<float*>NULL, self.net, &self.b, &seq, 1, &tok, self.net.pos + self.n, 1, NULL)
            self._fed(tok)
        else:
            keep = self.T // 2
            memmove_int(self.win, self.win + self.T - keep, keep)
            self.win[keep] = tok
            self._prefill(self.win, keep + 1)

    cdef int _step_row(self, int tok, Buf** seq, int* pos) noexcept nogil:
        """Feed tok as a row of a batched step: returns 1 with this decoder's Buf and the row's
        position in *seq, *pos (the caller runs the forward, then _fed(tok)); or 0 when there is
        nothing to batch (field only, or a full window, re-prefilled here alone by _feed)."""
        if not self.use_model:
            return 0
        if self.n >= self.T:
            self._feed(tok)
            return 0
        seq[0] = &self.b
        pos[0] = self.n
        return 1

    cdef inline void _fed(self, int tok) noexcept nogil:
        """tok's row is in the cache (a step of its own or of a Batch): it joins the window."""
        self.win[self.n] = tok
        self.n += 1
        self.rows += 1

    def _check_model(self):
        if self.net == NULL:
            raise ValueError("this Decoder has no weights (field-only); it cannot run the model")

    def prefill(self, ids):
        """Start a window from ids (its last block_size tokens when longer); returns the logits
        of the last position (the decoder's last_logits_array, overwritten by the next call)."""
        self._check_model()
        arr = self._ids(ids, "ids")
        if arr.shape[0] == 0:
            raise ValueError("prefill needs at least one token")
        if arr.shape[0] > self.T:
            arr = np.ascontiguousarray(arr[-self.T:])
        cdef int[::1] av = arr
        with nogil:
            self._prefill(&av[0], <int>av.shape[0])
        return self.last_logits_array

    def hidden_std(self, ids):
        """Std of the residual stream over the window's positions after the embedding and after
        each layer (L + 1 values) for a prefill of ids (which becomes the window)."""
        self._check_model()
        arr = self._ids(ids, "ids")
        if arr.shape[0] == 0:
            raise ValueError("hidden_std needs at least one token")
        if arr.shape[0] > self.T:
            arr = np.ascontiguousarray(arr[-self.T:])
        out = np.zeros(self.net.L + 1)
        cdef double[::1] ov = out
        cdef int[::1] av = arr
        with nogil:
            self._prefill(&av[0], <int>av.shape[0], &ov[0])
        return out

    def feed(self, int token):
        """Feed one token after the window; returns the next-token logits (last_logits_array,
        overwritten by the next call)."""
        self._check_model()
        if self.n == 0:
            raise ValueError("feed() needs a window: call prefill() first")
        if not 0 <= token < self.V:
            raise ValueError(f"token {token} outside the vocabulary [0, {self.V})")
        with nogil:
            self._feed(token)
        return self.last_logits_array

    @property
    def n_threads(self) -> int:
        """Threads that large matrix products are split over (1: none)."""
        return self.b.nt

    @n_threads.setter
    def n_threads(self, int value):
        if value < 1:
            raise ValueError(f"n_threads must be >= 1, got {value}")
        self.b.nt = value

    @property
    def weights(self):
        """The Weights this decoder runs (None: field only)."""
        return self.w

    @property
    def vocab_size(self) -> int:
        return self.V

    @property
    def window(self):
        """Token ids of the current window (the context whose last logits `logits` holds)."""
        return [self.win[i] for i in range(self.n)]

    @property
    def logits(self):
        self._check_model()
        return self.last_logits_array

    def _ids(self, ids, what):
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{what} must be a flat sequence of int token ids")
        if arr.size and (arr.min() < 0 or arr.max() >= self.V):
            raise ValueError(f"{what} holds ids outside the vocabulary [0, {self.V})")
        return np.ascontiguousarray(arr, dtype=np.intc)

    # ---- generation

    def begin(self, prompt_ids, *, double temperature, double entropy_low, double entropy_high,
              double boost, double focus, double min_p, double typical_p, double top_p, int top_k,
              double freq_penalty, double model_alpha, Field field, Py_ssize_t max_new,
              Py_ssize_t min_new, int rep_guard, int eos, banned, sentence_end, seed):
        """Prepare a generation after prompt_ids (validated by the caller): prefill the model
        (unless model_alpha == 0: field only) and seed the random state."""
        cdef Py_ssize_t j
        arr = self._ids(prompt_ids, "prompt_ids")
        if arr.shape[0] == 0:
            raise ValueError("the prompt must hold at least one token (<BOS>)")
        if model_alpha > 0:
            self._check_model()
        if model_alpha < 1 and field is None:
            raise ValueError("model_alpha < 1 blends with the corpus field; pass a field")
        if field is not None and field.f.V != self.V:
            raise ValueError(f"the field has vocab_size {field.f.V}, the decoder {self.V}")
        self.sp.temperature = temperature
        self.sp.entropy_low = entropy_low
        self.sp.entropy_high = entropy_high
        self.sp.boost = boost
        self.sp.focus = focus
        self.sp.min_p = min_p
        self.sp.typical_p = typical_p
        self.sp.top_p = top_p
        self.sp.top_k = top_k
        self.sp.freq_penalty = freq_penalty
        self.sp.model_alpha = model_alpha
        self.field = field
        self.use_model = model_alpha > 0
        self.max_new = max_new
        self.min_new = min_new
        self.rep_guard = rep_guard
        self.eos = eos
        free(self.hist)
        self.cap = arr.shape[0] + max_new + 1
        self.hist = <int*>malloc(self.cap * sizeof(int))
        if self.hist == NULL:
            raise MemoryError()
        cdef int[::1] av = arr
        memcpy(self.hist, &av[0], arr.shape[0] * sizeof(int))
        self.nh = arr.shape[0]
        self.n_prompt = arr.shape[0]
        memset(self.counts, 0, self.V * sizeof(int))
        cdef uint8_t[::1] bv = np.ascontiguousarray(banned, dtype=np.uint8)
        cdef uint8_t[::1] sv = np.ascontiguousarray(sentence_end, dtype=np.uint8)
        if bv.shape[0] != self.V or sv.shape[0] != self.V:
            raise ValueError("banned and sentence_end need one entry per token")
        memcpy(self.banned, &bv[0], self.V)
        self.n_banned = 0
        for j in range(self.V):
            if self.banned[j]:
                self.banned_ids[self.n_banned] = <int>j
                self.n_banned += 1
        memcpy(self.sentence_end, &sv[0], self.V)
        if seed is None:
            seed = int.from_bytes(np.random.SeedSequence().generate_state(2, np.uint64).tobytes()[:8], "little")
        rng_seed(&self.rng, <uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF))
        self.finished = 0
        self.started = 1
        self.rows = 0
        if self.use_model:
            window = arr[-self.T:] if arr.shape[0] > self.T else arr
            self.prefill(window)

    cdef Py_ssize_t _distribution(self) noexcept nogil:
        """Build the candidate set for the next token from the current logits; returns its size."""
        cdef Py_ssize_t i, n, best, V = self.V, n_new = self.nh - self.n_prompt
        cdef float* z = self.z
        cdef const double* qp = NULL
        cdef double inv_t
        cdef double fp = self.sp.freq_penalty
        if self.use_model:
            if self.is_double:
                for i in range(V):
                    z[i] = <float>(<double*>self.b.logits)[i]
            else:
                memcpy(z, self.b.logits, V * sizeof(float))
            if fp != 0:
                for i in range(V):
                    z[i] = <float>(z[i] - fp * self.counts[i])
        else:
            for i in range(V):
                z[i] = 0
        for i in range(self.n_banned):
            z[self.banned_ids[i]] = -INFINITY
        if n_new < self.min_new:    # <EOS> before min_gen_tokens is ignored: never sampled
            z[self.eos] = -INFINITY
        if not self.use_model:      # field alone: trigram -> bigram -> unigram, count^(1/T)
            inv_t = 1.0 / self.sp.temperature if self.sp.temperature > 0 else 1.0
            if field_dist(self.q, &self.field.f, self.hist, self.nh, z, inv_t, 1) == 0:
                return 0
            if self.sp.temperature <= 0:
                best = 0
                for i in range(V):
                    if self.q[i] > self.q[best]:
                        best = i
                self.cand[0].p = 1.0
                self.cand[0].i = <int>best
                return 1
            n = 0
            for i in range(V):
                if self.q[i] > 0:
                    self.cand[n].p = self.q[i]
                    self.cand[n].i = <int>i
                    n += 1
            return n
        if self.sp.model_alpha < 1:  # blend with the field's trigram/bigram distribution
            inv_t = 1.0 / self.sp.temperature if self.sp.temperature > 0 else 1.0
            if field_dist(self.q, &self.field.f, self.hist, self.nh, z, inv_t, 2) > 0:
                qp = self.q
        return sample_stack(self.cand, self.p, z, qp, V, &self.sp, self.fscratch)

    def run(self, Py_ssize_t limit, processors=None):
        """Generate up to `limit` more tokens; returns (new_ids, stop_reason or None).
        processors: callables (ids, logits) -> logits applied to the final logits of the
        built-in stack (log-probabilities, -inf where dropped), in order."""
        cdef Py_ssize_t produced = 0
        cdef int tok, stop = STOP_NONE
        if not self.started:
            raise ValueError("call begin() first")
        if self.finished:
            return [], None
        start = self.nh
        while produced < limit:
            tok = self._choose(processors)
            stop = self._accept(tok)
            if stop != STOP_EOS:
                produced += 1
            if stop != STOP_NONE:
                break
            if self.use_model:
                with nogil:
                    self._feed(tok)
        return [self.hist[j] for j in range(start, self.nh)], STOP_REASONS[stop]

    cdef int _choose(self, processors) except -1:
        """The next token, sampled from the current logits (and the processors, if any)."""
        cdef Py_ssize_t n
        cdef int tok
        if not processors:
            with nogil:
                tok = self._draw()
            if tok < 0:
                raise _no_token_error()
            return tok
        with nogil:
            n = self._distribution()
        return self._apply_processors(n, processors)

    cdef int _draw(self) noexcept nogil:
        """The next token from the built-in stack alone (no processors), or -1 when no token can
        be sampled (the generation is then finished)."""
        cdef Py_ssize_t n = self._distribution()
        if n == 0:
            self.finished = 1
            return -1
        return cand_draw(self.cand, n, &self.rng)

    cdef int _accept(self, int tok) noexcept nogil:
        """Record a sampled token and apply the stop rules; returns the stop reason (STOP_NONE:
        go on, the caller then feeds tok). EOS is not recorded; any stop finishes the generation."""
        cdef Py_ssize_t j, g, nn
        cdef int stop = STOP_NONE
        cdef bint same
        if tok == self.eos:
            stop = STOP_EOS
        else:
            self.hist[self.nh] = tok
            self.nh += 1
            self.counts[tok] += 1
            nn = self.nh - self.n_prompt
            g = self.rep_guard
            if g > 0 and nn >= 2 * g:
                same = True
                for j in range(g):
                    if self.hist[self.nh - 1 - j] != self.hist[self.nh - 1 - g - j]:
                        same = False
                        break
                if same:
                    stop = STOP_REPETITION
            if stop == STOP_NONE and nn >= self.min_new and self.sentence_end[tok]:
                stop = STOP_SENTENCE
            if stop == STOP_NONE and nn >= self.max_new:
                stop = STOP_MAX_TOKENS
        if stop != STOP_NONE:
            self.finished = 1
        return stop

    def finish(self):
        """End this generation here (a stop string was found): run() returns nothing more."""
        self.finished = 1

    @property
    def is_finished(self) -> bool:
        return bool(self.finished)

    cdef int _apply_processors(self, Py_ssize_t n, processors) except -1:
        cdef Py_ssize_t j
        cdef double mass = 0
        logits = np.full(self.V, -np.inf)
        cdef double[::1] lv = logits
        for j in range(n):
            mass += self.cand[j].p
        for j in range(n):
            lv[self.cand[j].i] = log(self.cand[j].p / mass)
        ids = np.array([self.hist[j] for j in range(self.nh)], dtype=np.int64)
        for proc in processors:
            out = proc(ids, logits)
            try:
                logits = np.array(out, dtype=np.float64, copy=True, order="C")
            except (TypeError, ValueError):
                raise _processor_error(proc, f"returned {type(out).__name__}, not an array of logits") from None
            if logits.shape != (self.V,):
                raise _processor_error(proc, f"returned shape {logits.shape}, expected ({self.V},)")
            if np.isnan(logits).any() or np.isposinf(logits).any():
                raise _processor_error(proc, "returned NaN or +inf logits")
        lv = logits
        # the hard rules hold whatever a processor returns: BOS/PAD never, EOS not before min
        for j in range(self.V):
            if self.banned[j]:
                lv[j] = -INFINITY
        if self.nh - self.n_prompt < self.min_new:
            lv[self.eos] = -INFINITY
        cdef Py_ssize_t best
        if self.sp.temperature <= 0:
            best = int(np.argmax(logits))
            if lv[best] == -INFINITY:
                raise _no_token_error()
            return best
        for j in range(self.V):
            self.z[j] = <float>lv[j]
        with nogil:
            softmax_t(self.p, self.z, self.V, 1.0, self.fscratch)
        n = 0
        for j in range(self.V):
            if self.p[j] > 0:
                self.cand[n].p = self.p[j]
                self.cand[n].i = <int>j
                n += 1
        if n == 0:
            raise _no_token_error()
        return cand_draw(self.cand, n, &self.rng)

    @property
    def generated(self):
        """Ids generated so far in this generation."""
        return [self.hist[j] for j in range(self.n_prompt, self.nh)]


# ---------------------------------------------------------------------------------------------
# Batch: several generations, one forward per step

ctypedef struct Group:  # the sequences of a Batch that one thread advances
    Buf b           # work rows (one per member) and the threads its products split over
    void* block
    int n           # members
    int* members    # (n,) their indices in the batch
    int m           # rows of the current step
    Buf** seq       # (n,) each row's sequence (cache, scratch, logits)
    int* ids        # (n,) each row's token
    int* pos        # (n,) each row's window position
    PyObject** row  # (n,) each row's Decoder (borrowed: the Batch's list holds them)


ctypedef struct GroupRun:  # one run() of every group at once on the worker pool
    PyObject* batch
    Py_ssize_t limit


cdef class Batch:
    """Generations advanced together, one token each per step, in one batched forward
    (forward_rows with a row per sequence): each weight matrix is read once per step for all of
    them instead of once per sequence, which is what bounds a decode step on a model whose
    weights do not fit in cache.

    Batch(decoders, n_threads=1): Decoders after begin() (any prompts, sampling parameters,
    seeds, limits; those that run the model share one Weights). Each keeps its own cache, window,
    random state, history and stop state, and produces exactly the tokens it produces alone
    (run() on the Decoder): the batched products give every row the arithmetic it has alone (each
    element one chain of FMAs in order: gemm.h's packed products), sampling is the Decoder's own, and a sequence whose window is full
    re-prefills alone (the window rule). A finished sequence (stop reason, or Decoder.finish())
    leaves the step.
    n_threads: the sequences are dealt into min(n_threads, size) groups, sequence i to group
    i mod groups, and each group runs its own steps (sampling included, without the GIL) on a
    thread of the worker pool: one fork/join per run() rather than one per product. With logits
    processors (Python) the groups take turns under the GIL. Not thread-safe."""
    cdef list decs
    cdef Weights w
    cdef PyObject** decp    # (size,) the decoders (borrowed: self.decs holds them)
    cdef int* stops         # (size,) stop code of each sequence in the current run()
    cdef int* failed        # (size,) 1: no token could be sampled
    cdef Group* groups
    cdef int n_groups
    cdef readonly int size
    cdef readonly int n_threads

    def __cinit__(self):
        self.decp = NULL
        self.stops = NULL
        self.failed = NULL
        self.groups = NULL
        self.n_groups = 0

    def __init__(self, decoders, int n_threads=1):
        cdef Decoder d
        cdef Group* g
        cdef int i, k
        decs = list(decoders)
        if not decs or not all(isinstance(x, Decoder) for x in decs):
            raise TypeError("Batch takes a non-empty sequence of Decoders")
        if len({id(x) for x in decs}) != len(decs):
            raise ValueError("a Decoder may appear in a Batch only once")
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        w = None
        for d in decs:
            if not d.started:
                raise ValueError("every Decoder of a Batch must be started (begin()) first")
            if d.use_model:
                if w is not None and d.w is not w:
                    raise ValueError("the Decoders of a Batch that run the model must share one Weights")
                w = d.w
        self.decs = decs
        self.size = len(decs)
        self.w = w
        self.n_threads = n_threads
        self.decp = <PyObject**>calloc(self.size, sizeof(PyObject*))
        self.stops = <int*>calloc(self.size, sizeof(int))
        self.failed = <int*>calloc(self.size, sizeof(int))
        ng = min(n_threads, self.size)
        self.groups = <Group*>calloc(ng, sizeof(Group))
        if self.decp == NULL or self.stops == NULL or self.failed == NULL or self.groups == NULL:
            raise MemoryError()
        self.n_groups = ng
        for i in range(self.size):
            self.decp[i] = <PyObject*>decs[i]
        for k in range(ng):
            g = &self.groups[k]
            g.n = (self.size - k + ng - 1) // ng
            g.b.nt = n_threads if ng == 1 else 1
            g.members = <int*>calloc(g.n, sizeof(int))
            g.seq = <Buf**>calloc(g.n, sizeof(Buf*))
            g.ids = <int*>calloc(g.n, sizeof(int))
            g.pos = <int*>calloc(g.n, sizeof(int))
            g.row = <PyObject**>calloc(g.n, sizeof(PyObject*))
            if g.members == NULL or g.seq == NULL or g.ids == NULL or g.pos == NULL or g.row == NULL:
                raise MemoryError()
            for i in range(g.n):
                g.members[i] = k + i * ng
            if w is not None:
                g.block = buf_alloc(&g.b, g.n, &self.w.net, self.w.is_double, False)

    def __dealloc__(self):
        cdef int k
        for k in range(self.n_groups):
            free(self.groups[k].block)
            free(self.groups[k].members)
            free(self.groups[k].seq)
            free(self.groups[k].ids)
            free(self.groups[k].pos)
            free(self.groups[k].row)
        free(self.groups)
        free(self.decp)
        free(self.stops)
        free(self.failed)

    @property
    def decoders(self):
        return list(self.decs)

    def run(self, Py_ssize_t limit, processors=None, bint raise_failed=True):
        """Generate up to `limit` more tokens in every unfinished sequence; returns one
        (new_ids, stop_reason or None) per decoder, as Decoder.run does for each.
        processors: None, or one entry per decoder (None or its callables, as Decoder.run's).
        A sequence for which no token can be sampled finishes; raise_failed: raise
        GenerationError for it (after the step of the others), else its stop reason is
        "no_token" and the others' results are returned as usual."""
        cdef Decoder d
        cdef Py_ssize_t i, k
        cdef int B = self.size
        cdef GroupRun job
        procs = None
        if processors is not None:
            procs = list(processors)
            if len(procs) != B:
                raise ValueError(f"processors needs one entry per decoder ({B}), got {len(procs)}")
            if not any(procs):
                procs = None
        starts = [(<Decoder>x).nh for x in self.decs]
        memset(self.stops, 0, B * sizeof(int))
        memset(self.failed, 0, B * sizeof(int))
        if procs is not None:
            self._run_with_gil(limit, procs)
        else:
            job.batch = <PyObject*>self
            job.limit = limit
            with nogil:
                if self.n_groups > 1:
                    mg_pool_run(_group_part, &job, self.n_groups)
                else:
                    self._run_group(&self.groups[0], limit)
            for i in range(B):
                if self.failed[i] and raise_failed:
                    raise _no_token_error()
        out = []
        for i in range(B):
            d = self.decs[i]
            out.append(([d.hist[k] for k in range(starts[i], d.nh)],
                        "no_token" if self.failed[i] else STOP_REASONS[self.stops[i]]))
        return out

    cdef void _run_group(self, Group* g, Py_ssize_t limit) noexcept nogil:
        """`limit` steps of one group (no processors: sampling is native)."""
        cdef Py_ssize_t step
        cdef int k, i, tok
        cdef bint live
        for step in range(limit):
            live = False
            for k in range(g.n):
                i = g.members[k]
                if (<Decoder>self.decp[i]).finished:
                    continue
                live = True
                tok = (<Decoder>self.decp[i])._draw()
                if tok < 0:
                    self.failed[i] = 1
                    continue
                self._take(g, i, tok)
            if not live:
                break
            self._step(g)

    cdef int _run_with_gil(self, Py_ssize_t limit, list procs) except -1:
        """run() when some sequence has logits processors: the groups take turns, sampling with
        the GIL (Decoder._choose)."""
        cdef Py_ssize_t step
        cdef int k, i, gi
        cdef bint live
        cdef Decoder d
        cdef Group* g
        for step in range(limit):
            live = False
            for gi in range(self.n_groups):
                g = &self.groups[gi]
                for k in range(g.n):
                    i = g.members[k]
                    d = self.decs[i]
                    if d.finished:
                        continue
                    live = True
                    self._take(g, i, d._choose(procs[i]))
                with nogil:
                    self._step(g)
            if not live:
                break
        return 0

    cdef inline void _take(self, Group* g, int i, int tok) noexcept nogil:
        """Record sequence i's sampled token (Decoder._accept: the stop rules); unless it stopped,
        the token becomes a row of the group's next forward, or re-prefills a full window alone."""
        cdef int stop = (<Decoder>self.decp[i])._accept(tok)
        if stop != STOP_NONE:
            self.stops[i] = stop
        elif (<Decoder>self.decp[i])._step_row(tok, &g.seq[g.m], &g.pos[g.m]):
            g.ids[g.m] = tok
            g.row[g.m] = self.decp[i]
            g.m += 1

    cdef void _step(self, Group* g) noexcept nogil:
        """The group's rows of this step through the model in one forward; each joins its window."""
        cdef int k
        if g.m == 0:
            return
        if self.w.is_double:
            forward_rows(<double*>NULL, &self.w.net, &g.b, g.seq, g.m, g.ids, g.pos, g.m, NULL)
        else:
            forward_rows(<float*>NULL, &self.w.net, &g.b, g.seq, g.m, g.ids, g.pos, g.m, NULL)
        for k in range(g.m):
            (<Decoder>g.row[k])._fed(g.ids[k])
        g.m = 0


cdef void _group_part(void* ctx, int part) noexcept nogil:
    cdef GroupRun* job = <GroupRun*>ctx
    (<Batch>job.batch)._run_group(&(<Batch>job.batch).groups[part], job.limit)


cdef inline void memmove_int(int* dst, const int* src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):     # dst < src: a forward copy is safe for overlapping ranges
        dst[i] = src[i]


def _no_token_error():
    from .errors import GenerationError
    return GenerationError("no token can be sampled: every token is banned or filtered out "
                           "(check min_gen_tokens, logits processors and the sampling parameters)")


def _processor_error(proc, what):
    from .errors import GenerationError
    return GenerationError(f"logits processor {proc!r} {what}; a processor takes (ids, logits) and returns "
                           f"logits of the same shape")


def _linear_rows(W, X, int n_threads=1, bint bf16=False):
    """Y = X W^T by the decoder's product for rows of independent sequences (linear_rows,
    split by W's panels) on W packed as Weights packs it (bfloat16 panels when bf16); test twin:
    row i must equal _linear_rows(W, X[i:i+1])."""
    if W.dtype != X.dtype or X.dtype not in (np.float32, np.float64) or W.ndim != 2 or X.ndim != 2 \
            or W.shape[1] != X.shape[1] or not W.flags.c_contiguous or not X.flags.c_contiguous or X.shape[0] < 1:
        raise ValueError("W (nout, nin) and X (N, nin): C-contiguous arrays of one float dtype, N >= 1")
    P = pack_weight(W, bf16)
    Y = np.zeros((X.shape[0], W.shape[0]), X.dtype)
    cdef Py_ssize_t N = X.shape[0], nout = W.shape[0], nin = W.shape[1]
    cdef void* y = data_ptr(Y)
    cdef const void* p = data_ptr(P)
    cdef const void* x = data_ptr(X)
    cdef bint is_double = X.dtype == np.float64
    with nogil:
        if is_double:
            linear_rows(<double*>y, p, <const double*>x, N, nout, nin, n_threads, True, False)
        else:
            linear_rows(<float*>y, p, <const float*>x, N, nout, nin, n_threads, True, bf16)
    return Y
