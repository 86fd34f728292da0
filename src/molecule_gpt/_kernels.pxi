# _kernels.pxi: the math of one training step, written once over `floating`.
#
# Included by _core.pyx (one extension, so the tape can call kernels without a cross-module
# function-pointer hop). The forward ops the decoder shares (embedding, RMSNorm, RoPE, gate,
# residual add) are in _ops.pxd; here are the tape's own: the linear with adapters, attention
# over packed sequences, cross-entropy, every backward, Adam. Every kernel is a plain function
# over raw row-major buffers: outputs first, sizes last, shapes in the docstring, `noexcept nogil`. Backward kernels `+=` into the
# gradients of their inputs and read what forward cached. Dims legend: csrc/molecule.h.
#
# Notes on choices:
# - Every linear of a packed batch is one matrix product, the matvec backward "dW += G^T X,
#   dX += G W" generalized to N positions: csrc/gemm.h's AVX2 kernels where the CPU has them,
#   else BLAS (scipy.linalg.cython_blas), which stays the twin tests compare against.
# - Reductions (norms, softmax sums, losses) accumulate in double even for float32 buffers.
# - Attention runs per (sequence, head) block: its products (at most T x T x d) go to the
#   lower-triangle kernels of csrc/attention.h, which skip the masked upper blocks a gemm would
#   compute and BLAS's per-call path (figures: benchmarks/RESULTS.md). The BLAS path stays as
#   their naive twin (tests compare them).

from libc.math cimport exp, sqrt, sqrtf, log, INFINITY
from libc.string cimport memset
from scipy.linalg.cython_blas cimport sgemm, dgemm

from ._ops cimport *   # the forward ops (one definition each, shared with _decode) and row helpers

cdef bint attention_blas = False  # tests and benchmarks: products through BLAS (the naive twin)


cdef inline size_t attention_work(Py_ssize_t T, Py_ssize_t d) noexcept nogil:
    """Elements of an attention node's work buffer: the csrc/attention.h kernels' scratch, then one
    (T, T) block (a content head's logits in forward, the weights' gradient in backward)."""
    return mg_tri_scratch(T, d) + <size_t>T * T


cdef inline void tri_nt(floating* S, Py_ssize_t lds, const floating* A, Py_ssize_t lda, const floating* B,
                        Py_ssize_t ldb, Py_ssize_t n, Py_ssize_t d, floating alpha,
                        floating* scratch) noexcept nogil:
    """S[t, j] = alpha <A_t, B_j> for j <= t (csrc/attention.h)."""
    if floating is float:
        mg_tri_nt_f(S, lds, A, lda, B, ldb, n, d, alpha, scratch)
    else:
        mg_tri_nt_d(S, lds, A, lda, B, ldb, n, d, alpha, scratch)


cdef inline void tri_nn(floating* Y, Py_ssize_t ldy, const floating* P, Py_ssize_t ldp, const floating* B,
                        Py_ssize_t ldb, Py_ssize_t n, Py_ssize_t d, floating alpha, int accumulate,
                        floating* scratch) noexcept nogil:
    """Y_t (+)= alpha sum_{j <= t} P[t, j] B_j (csrc/attention.h)."""
    if floating is float:
        mg_tri_nn_f(Y, ldy, P, ldp, B, ldb, n, d, alpha, accumulate, scratch)
    else:
        mg_tri_nn_d(Y, ldy, P, ldp, B, ldb, n, d, alpha, accumulate, scratch)


cdef inline void tri_tn(floating* Y, Py_ssize_t ldy, const floating* P, Py_ssize_t ldp, const floating* B,
                        Py_ssize_t ldb, Py_ssize_t n, Py_ssize_t d, floating alpha,
                        floating* scratch) noexcept nogil:
    """Y_j += alpha sum_{t >= j} P[t, j] B_t (csrc/attention.h)."""
    if floating is float:
        mg_tri_tn_f(Y, ldy, P, ldp, B, ldb, n, d, alpha, scratch)
    else:
        mg_tri_tn_d(Y, ldy, P, ldp, B, ldb, n, d, alpha, scratch)


# ---------------------------------------------------------------------------------------------
# BLAS, row-major

cdef inline void gemm(char ta, char tb, int m, int n, int k, floating alpha,
                      const floating* A, int lda, const floating* B, int ldb,
                      floating beta, floating* Cm, int ldc) noexcept nogil:
    """Column-major C := alpha op(A) op(B) + beta C (the raw BLAS call)."""
    cdef Py_ssize_t i, j
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        if beta != 1:
            for j in range(n):
                for i in range(m):
                    Cm[i + <Py_ssize_t>j * ldc] = beta * Cm[i + <Py_ssize_t>j * ldc] if beta != 0 else 0
        return
    if floating is float:
        sgemm(&ta, &tb, &m, &n, &k, &alpha, <float*>A, &lda, <float*>B, &ldb, &beta, Cm, &ldc)
    else:
        dgemm(&ta, &tb, &m, &n, &k, &alpha, <double*>A, &lda, <double*>B, &ldb, &beta, Cm, &ldc)


cdef bint linear_blas = False  # tests and benchmarks: every product through BLAS (the naive twin)


cdef inline bint own_gemm(int form, floating* Cm, const floating* A, const floating* B, int M, int Nn,
                          int K, int lda, int ldb, int ldc, floating alpha, floating beta) noexcept nogil:
    """csrc/gemm.h (form MG_GEMM_NT, _NN or _TN) for beta 0 or 1, all the model uses; False: the
    caller uses BLAS."""
    if linear_blas or (beta != 0 and beta != 1):
        return False
    if floating is float:
        return mg_gemm_f(form, Cm, ldc, A, lda, B, ldb, M, Nn, K, alpha, beta != 0)
    else:
        return mg_gemm_d(form, Cm, ldc, A, lda, B, ldb, M, Nn, K, alpha, beta != 0)


cdef inline void mm_nt(floating* Cm, const floating* A, const floating* B, int M, int Nn, int K,
                       int lda, int ldb, int ldc, floating alpha, floating beta) noexcept nogil:
    """C (M, Nn) := alpha A (M, K) B^T + beta C;  B (Nn, K). Row-major with leading dims."""
    if own_gemm(MG_GEMM_NT, Cm, A, B, M, Nn, K, lda, ldb, ldc, alpha, beta):
        return
    gemm(c'T', c'N', Nn, M, K, alpha, B, ldb, A, lda, beta, Cm, ldc)


cdef inline void mm_nn(floating* Cm, const floating* A, const floating* B, int M, int Nn, int K,
                       int lda, int ldb, int ldc, floating alpha, floating beta) noexcept nogil:
    """C (M, Nn) := alpha A (M, K) B (K, Nn) + beta C."""
    if own_gemm(MG_GEMM_NN, Cm, A, B, M, Nn, K, lda, ldb, ldc, alpha, beta):
        return
    gemm(c'N', c'N', Nn, M, K, alpha, B, ldb, A, lda, beta, Cm, ldc)


cdef inline void mm_tn(floating* Cm, const floating* A, const floating* B, int M, int Nn, int K,
                       int lda, int ldb, int ldc, floating alpha, floating beta) noexcept nogil:
    """C (M, Nn) := alpha A^T B + beta C;  A (K, M), B (K, Nn)."""
    if own_gemm(MG_GEMM_TN, Cm, A, B, M, Nn, K, lda, ldb, ldc, alpha, beta):
        return
    gemm(c'N', c'T', Nn, M, K, alpha, B, ldb, A, lda, beta, Cm, ldc)


# ---------------------------------------------------------------------------------------------
# linear with low-rank adapters:  Y = X W^T + sum_k alpha_k (X B_k^T) A_k^T

cdef void linear_forward(floating* Y, floating* U, const floating* X, const mg_linear* lin,
                         Py_ssize_t N, Py_ssize_t ldx, Py_ssize_t ldy) noexcept nogil:
    """Y (N, nout) = X (N, nin) W^T;  Y[:, off_k:off_k+rows_k] += alpha_k U_k A_k^T, caching
    U_k = X B_k^T in U (n_ad, N, r)."""
    cdef int k, r = lin.rank
    cdef floating* Uk
    mm_nt(Y, X, <const floating*>lin.W, <int>N, lin.nout, lin.nin, <int>ldx, lin.nin, <int>ldy, 1, 0)
    for k in range(lin.n_ad):
        Uk = U + k * N * r
        mm_nt(Uk, X, <const floating*>lin.B[k], <int>N, r, lin.nin, <int>ldx, lin.nin, r, 1, 0)
        mm_nt(Y + lin.out_off[k], Uk, <const floating*>lin.A[k], <int>N, lin.out_rows[k], r, r, r, <int>ldy,
              <floating>lin.alpha[k], 1)


cdef void linear_backward(floating* dX, floating* dU, const floating* G, const floating* X,
                          const floating* U, const mg_linear* lin,
                          Py_ssize_t N, Py_ssize_t ldx, Py_ssize_t ldg, bint set_dx,
                          bint set_params) noexcept nogil:
    """dX += G W + sum_k dU_k B_k;  dW += G^T X;  dA_k += alpha_k G_k^T U_k;  dB_k += dU_k^T X,
    with G_k = G[:, off_k:off_k+rows_k] and dU_k = alpha_k G_k A_k (scratch, (n_ad, N, r)).
    dX may be NULL (input needs no gradient); set_dx: dX = ... (its only contribution);
    set_params: dW, dA_k, dB_k = ... (a step's first contribution: no zeroing before)."""
    cdef int k, r = lin.rank
    cdef floating alpha
    cdef floating pbeta = 0 if set_params else 1
    cdef floating* dUk
    cdef const floating* Gk
    if lin.dW != NULL:
        mm_tn(<floating*>lin.dW, G, X, lin.nout, lin.nin, <int>N, <int>ldg, <int>ldx, lin.nin, 1, pbeta)
    if dX != NULL:
        mm_nn(dX, G, <const floating*>lin.W, <int>N, lin.nin, lin.nout, <int>ldg, lin.nin, <int>ldx, 1,
              0 if set_dx else 1)
    for k in range(lin.n_ad):
        alpha = <floating>lin.alpha[k]
        dUk = dU + k * N * r
        Gk = G + lin.out_off[k]
        if lin.dA[k] != NULL:
            mm_tn(<floating*>lin.dA[k], Gk, U + k * N * r, lin.out_rows[k], r, <int>N, <int>ldg, r, r, alpha, pbeta)
        if lin.dB[k] == NULL and dX == NULL:
            continue
        mm_nn(dUk, Gk, <const floating*>lin.A[k], <int>N, r, lin.out_rows[k], <int>ldg, r, r, alpha, 0)
        if lin.dB[k] != NULL:
            mm_tn(<floating*>lin.dB[k], dUk, X, r, lin.nin, <int>N, r, <int>ldx, lin.nin, 1, pbeta)
        if dX != NULL:
            mm_nn(dX, dUk, <const floating*>lin.B[k], <int>N, lin.nin, r, r, lin.nin, <int>ldx, 1, 1)


# ---------------------------------------------------------------------------------------------
# RMSNorm: forward in _ops.pxd

cdef void rmsnorm_backward(floating* dx, const floating* dy, const floating* y, const floating* rstd,
                           Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """dx += rstd (dy - y mean(dy y))   (d/dx of y_j = x_j r with dr/dx_j = -r^3 x_j / C)."""
    cdef Py_ssize_t i, j
    cdef floating dot, r
    for i in range(N):
        dot = row_dot(dy + i * C, y + i * C, C) / C
        r = rstd[i]
        for j in range(C):
            dx[i * C + j] += r * (dy[i * C + j] - y[i * C + j] * dot)


# ---------------------------------------------------------------------------------------------
# RoPE: forward in _ops.pxd

cdef void rope_backward(floating* dx, const floating* dy, const int* pos, const floating* cos_t,
                        const floating* sin_t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t d,
                        Py_ssize_t ldx) noexcept nogil:
    """dx += R(-theta) dy: the rotation is orthogonal, so its transpose is its inverse
    (dx has row stride ldx, dy is contiguous; tables as in rope_forward)."""
    cdef Py_ssize_t i, C = H * d, np2 = C // 2
    for i in range(N):
        if floating is float:
            mg_rope_row_back_f(dx + i * ldx, dy + i * C, cos_t + pos[i] * np2, sin_t + pos[i] * np2, np2)
        else:
            mg_rope_row_back_d(dx + i * ldx, dy + i * C, cos_t + pos[i] * np2, sin_t + pos[i] * np2, np2)


# ---------------------------------------------------------------------------------------------
# causal attention over packed sequences, content / rrpram / hybrid heads
#
# For sequence s (positions off[s] .. off[s]+n[s]) and head h, query t and key j <= t:
#   content  c = <q_t, k_j> / sqrt(d)          (q, k already rotated)
#   rrpram   p = P_h[t, j]                      (P_h (N, T): the pattern linear's output)
#   hybrid   l = (1 - a) c + a p,  a = sigmoid(alpha_h)
# att = softmax_j(l) (zero above the diagonal);  y_t = sum_j att_j v_j.
# Each (head, sequence) is one task: an n x n block at h * SS + sq_off[s] of `att` (weights) and
# of `cont` (scaled content logits), filled by gemm; tasks write disjoint memory, so they run
# in parallel (Model runs whole sequences on separate workers instead: one fork per step).

cdef void attention_task_forward(floating* y, floating* att, floating* cont, const floating* q,
                                 const floating* k, const floating* v, floating** P,
                                 const int* head_type, const double* mix, const int* off,
                                 const int* n, const Py_ssize_t* sq_off, Py_ssize_t SS,
                                 Py_ssize_t n_seq, Py_ssize_t H, Py_ssize_t d, Py_ssize_t T,
                                 Py_ssize_t ldv, Py_ssize_t task, floating* work) noexcept nogil:
    """One (head, sequence) block of attention_forward (work: csrc/attention.h's scratch)."""
    cdef Py_ssize_t h = task // n_seq, s = task % n_seq, o = off[s], ns = n[s], C = H * d
    cdef int kind = head_type[h]
    cdef floating fa = <floating>mix[h]
    cdef floating* A = att + h * SS + sq_off[s]
    # content logits: kept in `cont` only where backward reads them (hybrid heads' d alpha);
    # a content head's go to the task's reused, cache-hot block of work
    cdef floating* S = cont + h * SS + sq_off[s] if kind == HEAD_HYBRID else work + mg_tri_scratch(T, d)
    cdef const floating* Prow
    cdef floating scale = <floating>(1.0 / sqrt(<double>d))
    cdef floating* tri = NULL if attention_blas else work  # NULL: products through BLAS
    if ns <= 0:
        return
    if kind != HEAD_RRPRAM:
        if tri != NULL:
            tri_nt(S, ns, q + o * C + h * d, C, k + o * C + h * d, C, ns, d, scale, tri)
        else:
            mm_nt(S, q + o * C + h * d, k + o * C + h * d, <int>ns, <int>ns, <int>d, <int>C, <int>C,
                  <int>ns, scale, 0)
    Prow = P[h] + o * T if kind != HEAD_CONTENT else NULL
    if floating is float:  # csrc/attention.h: the rows with AVX2 exponentials when available
        mg_causal_softmax_f(A, ns, S, ns, Prow, T, 0, ns, fa, kind, work)
    else:
        mg_causal_softmax_d(A, ns, S, ns, Prow, T, 0, ns, fa, kind, work)
    if tri != NULL:
        tri_nn(y + o * C + h * d, C, A, ns, v + o * ldv + h * d, ldv, ns, d, 1, 0, tri)
    else:
        mm_nn(y + o * C + h * d, A, v + o * ldv + h * d, <int>ns, <int>d, <int>ns, <int>ns, <int>ldv, <int>C, 1, 0)


cdef void attention_forward(floating* y, floating* att, floating* cont, const floating* q,
                            const floating* k, const floating* v, floating** P, const int* head_type,
                            const double* mix, const int* off, const int* n, const Py_ssize_t* sq_off,
                            Py_ssize_t SS, Py_ssize_t n_seq, Py_ssize_t H, Py_ssize_t d,
                            Py_ssize_t T, Py_ssize_t ldv, floating* work) noexcept nogil:
    """q, k, y (N, H*d); v (N, H*d) with row stride ldv; P[h] (N, T) for rrpram/hybrid heads;
    mix[h] = sigmoid(alpha_h); att, cont (H * SS) cached for backward (cont: hybrid heads'
    blocks only); work holds attention_work(T, d) elements."""
    cdef Py_ssize_t task
    for task in range(H * n_seq):
        attention_task_forward(y, att, cont, q, k, v, P, head_type, mix, off, n, sq_off, SS,
                               n_seq, H, d, T, ldv, task, work)


cdef double attention_task_backward(floating* dq, floating* dk, floating* dv, floating** dP,
                                    floating* scratch, const floating* dy, const floating* att,
                                    const floating* cont, const floating* q, const floating* k,
                                    const floating* v, floating** P, const int* head_type,
                                    const double* mix, const int* off, const int* n,
                                    const Py_ssize_t* sq_off, Py_ssize_t SS, Py_ssize_t n_seq,
                                    Py_ssize_t H, Py_ssize_t d, Py_ssize_t T, Py_ssize_t ldv,
                                    Py_ssize_t task, floating* work) noexcept nogil:
    """One (head, sequence) block of attention_backward; returns its d loss / d alpha_h (work:
    csrc/attention.h's scratch).
    1. dA = dY V^T;  dV += A^T dY
    2. dl = A (dA - rowsum(A dA))                  (softmax backward, per row)
    3. rrpram part dp = dl (rrpram) or a dl (hybrid) into dP_h[t, j]
    4. content part dc = dl (content) or (1 - a) dl (hybrid):
       dQ += dc K / sqrt(d);  dK += dc^T Q / sqrt(d)
    5. d alpha = sum dl (p - c) a (1 - a)   (hybrid)."""
    cdef Py_ssize_t h = task // n_seq, s = task % n_seq, o = off[s], ns = n[s], C = H * d
    cdef int kind = head_type[h]
    cdef double a = mix[h], dalpha = 0
    cdef floating fa = <floating>a
    cdef const floating* A = att + h * SS + sq_off[s]
    cdef const floating* S = cont + h * SS + sq_off[s]  # read for hybrid heads only
    cdef floating* dA = work + mg_tri_scratch(T, d)     # (ns, ns), reused by every task: cache-hot
    cdef floating* dProw
    cdef const floating* Prow
    cdef floating scale = <floating>(1.0 / sqrt(<double>d))
    cdef floating* tri = NULL if attention_blas else work  # NULL: products through BLAS
    if ns <= 0:
        return 0
    if tri != NULL:
        tri_nt(dA, ns, dy + o * C + h * d, C, v + o * ldv + h * d, ldv, ns, d, 1, tri)
        tri_tn(dv + o * ldv + h * d, ldv, A, ns, dy + o * C + h * d, C, ns, d, 1, tri)
    else:
        mm_nt(dA, dy + o * C + h * d, v + o * ldv + h * d, <int>ns, <int>ns, <int>d, <int>C, <int>ldv, <int>ns, 1, 0)
        mm_tn(dv + o * ldv + h * d, A, dy + o * C + h * d, <int>ns, <int>d, <int>ns, <int>ns, <int>C, <int>ldv, 1, 1)
    Prow = P[h] + o * T if kind != HEAD_CONTENT else NULL
    dProw = dP[h] + o * T if kind != HEAD_CONTENT else NULL
    if floating is float:  # steps 2, 3 and 5's sum (csrc/attention.h)
        dalpha = mg_causal_softmax_backward_f(dA, A, ns, S, Prow, dProw, T, fa, kind)
    else:
        dalpha = mg_causal_softmax_backward_d(dA, A, ns, S, Prow, dProw, T, fa, kind)
    if kind != HEAD_RRPRAM and tri != NULL:
        tri_nn(dq + o * C + h * d, C, dA, ns, k + o * C + h * d, C, ns, d, scale, 1, tri)
        tri_tn(dk + o * C + h * d, C, dA, ns, q + o * C + h * d, C, ns, d, scale, tri)
    elif kind != HEAD_RRPRAM:
        mm_nn(dq + o * C + h * d, dA, k + o * C + h * d, <int>ns, <int>d, <int>ns, <int>ns, <int>C, <int>C, scale, 1)
        mm_tn(dk + o * C + h * d, dA, q + o * C + h * d, <int>ns, <int>d, <int>ns, <int>ns, <int>C, <int>C, scale, 1)
    return dalpha * a * (1 - a)


cdef void attention_backward(floating* dq, floating* dk, floating* dv, floating** dP, double* dalpha,
                             floating* scratch, const floating* dy, const floating* att,
                             const floating* cont, const floating* q, const floating* k,
                             const floating* v, floating** P, const int* head_type, const double* mix,
                             const int* off, const int* n, const Py_ssize_t* sq_off, Py_ssize_t SS,
                             Py_ssize_t n_seq, Py_ssize_t H, Py_ssize_t d, Py_ssize_t T,
                             Py_ssize_t ldv, floating* work) noexcept nogil:
    """Gradients of attention_forward into q, k, v (dv with row stride ldv), P and, per hybrid
    head, dalpha[h] += d loss / d alpha_h. work holds attention_work(T, d) elements (scratch
    is unused: the weights' gradient block of each task lives in work)."""
    cdef Py_ssize_t task
    for task in range(H * n_seq):
        dalpha[task // n_seq] += attention_task_backward(dq, dk, dv, dP, scratch, dy, att, cont, q, k, v, P,
                                                         head_type, mix, off, n, sq_off, SS, n_seq, H, d,
                                                         T, ldv, task, work)


# ---------------------------------------------------------------------------------------------
# gated MLP activation:  out = act(g) * u,  act = relu or silu

cdef void gate_backward(floating* dg, floating* du, const floating* dout, const floating* g,
                        const floating* u, Py_ssize_t N, Py_ssize_t F, Py_ssize_t ld_in,
                        int act, bint set_grads) noexcept nogil:
    """dg += dout u act'(g);  du += dout act(g);  silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
    dg, du, g, u have row stride ld_in; dout is (N, F) contiguous. set_grads: = instead of +=."""
    cdef Py_ssize_t i, j
    cdef double sg
    cdef floating* dgi
    cdef floating* dui
    cdef const floating* gi
    cdef const floating* ui
    cdef const floating* di
    for i in range(N):
        dgi = dg + i * ld_in
        dui = du + i * ld_in
        gi = g + i * ld_in
        ui = u + i * ld_in
        di = dout + i * F
        if act == ACT_RELU and set_grads:
            if floating is float:
                mg_relu_gate_backward_set_f(dgi, dui, di, gi, ui, F)
            else:
                mg_relu_gate_backward_set_d(dgi, dui, di, gi, ui, F)
        elif act == ACT_RELU:
            if floating is float:
                mg_relu_gate_backward_f(dgi, dui, di, gi, ui, F)
            else:
                mg_relu_gate_backward_d(dgi, dui, di, gi, ui, F)
        else:
            if set_grads:
                for j in range(F):
                    dgi[j] = 0
                    dui[j] = 0
            for j in range(F):
                sg = sigmoid(gi[j])
                dgi[j] += <floating>(di[j] * ui[j] * sg * (1 + gi[j] * (1 - sg)))
                dui[j] += <floating>(di[j] * gi[j] * sg)


# ---------------------------------------------------------------------------------------------
# embedding gather / scatter-add (forward in _ops.pxd)

cdef void embed_backward(floating* dwte, floating* dwpe, const floating* dx, const int* ids,
                         const int* pos, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """dwte[ids] += dx;  dwpe[pos] += dx  (either may be NULL when frozen)."""
    cdef Py_ssize_t i, j
    for i in range(N):
        for j in range(C):
            if dwte != NULL:
                dwte[<Py_ssize_t>ids[i] * C + j] += dx[i * C + j]
            if dwpe != NULL:
                dwpe[<Py_ssize_t>pos[i] * C + j] += dx[i * C + j]


# ---------------------------------------------------------------------------------------------
# fused softmax cross-entropy

cdef void xent_forward(double* losses, floating* logits, const int* targets, Py_ssize_t N,
                       Py_ssize_t V) noexcept nogil:
    """losses (N,) = logsumexp(z) - z[target]; the logits (N, V) are replaced by probabilities,
    which is all backward needs."""
    cdef Py_ssize_t i, j
    cdef floating* z
    cdef floating mx, target_logit, inv
    cdef double total
    for i in range(N):
        z = logits + i * V
        target_logit = z[targets[i]]
        mx = row_max(z, V)
        total = row_exp_sum(z, V, mx)   # z := exp(z - max)
        losses[i] = mx + log(total) - target_logit
        inv = <floating>(1.0 / total)
        for j in range(V):
            z[j] = z[j] * inv


cdef void xent_backward(floating* dlogits, const floating* probs, const int* targets,
                        const double* weights, Py_ssize_t N, Py_ssize_t V, bint set_grad) noexcept nogil:
    """dlogits += w_i (p - onehot(target_i)), for loss = sum_i w_i loss_i (set_grad: =)."""
    cdef Py_ssize_t i, j
    cdef floating w
    for i in range(N):
        w = <floating>weights[i]
        if set_grad:
            for j in range(V):
                dlogits[i * V + j] = w * probs[i * V + j]
        else:
            for j in range(V):
                dlogits[i * V + j] += w * probs[i * V + j]
        dlogits[i * V + targets[i]] -= w


# ---------------------------------------------------------------------------------------------
# elementwise add (residual; forward in _ops.pxd)

cdef void add_backward(floating* da, floating* db, const floating* dout, Py_ssize_t n,
                       bint set_b) noexcept nogil:
    """da += dout;  db += dout (set_b: db = dout, its only contribution)."""
    cdef Py_ssize_t i
    if set_b:
        for i in range(n):
            da[i] += dout[i]
            db[i] = dout[i]
    else:
        for i in range(n):
            da[i] += dout[i]
            db[i] += dout[i]


# ---------------------------------------------------------------------------------------------
# Adam with element-wise clipping

cdef inline void _adam_one(floating* p, floating* m, floating* v, Py_ssize_t i, floating gi,
                               floating b1, floating b2, floating one_b1, floating one_b2, floating lo_c,
                               floating hi_c, floating step, floating c2, floating e) noexcept nogil:
    """One element of adam_step: clip the gradient, update the moments and the parameter."""
    gi = hi_c if gi > hi_c else gi
    gi = lo_c if gi < lo_c else gi
    cdef floating mi = b1 * m[i] + one_b1 * gi
    cdef floating vi = b2 * v[i] + one_b2 * gi * gi
    m[i] = mi
    v[i] = vi
    p[i] = p[i] - step * mi / (fsqrt(vi) * c2 + e)


cdef void adam_step(floating* p, floating* g, const floating** extra, int n_extra, floating* m, floating* v,
                    Py_ssize_t lo, Py_ssize_t hi, double lr, double beta1, double beta2, double eps,
                    double clip, double bias1, double bias2) noexcept nogil:
    """Elements lo..hi: g = ((g + extra[0]) + extra[1]) + ... (the other parts' gradients, in
    order; g keeps the sum); g' = clip(g, +-clip); m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
    p -= lr (m / bias1) / (sqrt(v / bias2) + eps),  bias_i = 1 - beta_i^t.
    Written in the buffer's precision with the bias terms folded into two constants, so the loop
    vectorizes: p -= step m / (sqrt(v) c2 + eps), step = lr / bias1, c2 = 1 / sqrt(bias2). The
    last extra is added in the update's own pass; any others first, while the piece is in cache."""
    cdef Py_ssize_t i
    cdef int k
    cdef const floating* e_k
    cdef const floating* last = extra[n_extra - 1] if n_extra > 0 else NULL
    cdef floating gi
    cdef floating b1 = <floating>beta1, b2 = <floating>beta2, hi_c = <floating>clip, lo_c = <floating>(-clip)
    cdef floating one_b1 = <floating>(1 - beta1), one_b2 = <floating>(1 - beta2)
    cdef floating step = <floating>(lr / bias1), c2 = <floating>(1.0 / sqrt(bias2)), e = <floating>eps
    for k in range(n_extra - 1):
        e_k = extra[k]
        for i in range(lo, hi):
            g[i] = g[i] + e_k[i]
    if last == NULL:
        for i in range(lo, hi):
            _adam_one(p, m, v, i, g[i], b1, b2, one_b1, one_b2, lo_c, hi_c, step, c2, e)
    else:
        for i in range(lo, hi):
            gi = g[i] + last[i]
            g[i] = gi
            _adam_one(p, m, v, i, gi, b1, b2, one_b1, one_b2, lo_c, hi_c, step, c2, e)
