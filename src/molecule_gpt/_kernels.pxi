# _kernels.pxi: the math of one training step, written once over `floating`.
#
# Included by _core.pyx (one extension, so the tape can call kernels without a cross-module
# function-pointer hop). Every kernel is a plain function over raw row-major buffers: outputs
# first, sizes last, shapes in the docstring, `noexcept nogil`. Backward kernels `+=` into the
# gradients of their inputs and read what forward cached. Dims legend: csrc/molecule.h.
#
# Notes on choices:
# - Matrix products go to BLAS (scipy.linalg.cython_blas): every linear of a packed batch is
#   one gemm, the matvec backward "dW += G^T X, dX += G W" generalized to N positions.
# - Reductions (norms, softmax sums, losses) accumulate in double even for float32 buffers.
# - Attention is plain loops per (sequence, head): its work is a few percent of the linears at
#   the configs we target, and loops skip the masked upper triangle that a gemm would compute.

from libc.math cimport exp, sqrt, log, INFINITY
from libc.string cimport memset
from scipy.linalg.cython_blas cimport sgemm, dgemm

ctypedef fused floating:
    float
    double

cdef enum HeadType:
    HEAD_CONTENT = 0
    HEAD_RRPRAM = 1
    HEAD_HYBRID = 2

cdef enum Activation:
    ACT_RELU = 0
    ACT_SILU = 1


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


cdef inline void mm_xwt(floating* Y, const floating* X, const floating* W, int N, int nout, int nin,
                        int ldx, int ldy, floating alpha, floating beta) noexcept nogil:
    """Y (N, nout) := alpha X (N, nin) W^T + beta Y;  W (nout, nin)."""
    gemm(c'T', c'N', nout, N, nin, alpha, W, nin, X, ldx, beta, Y, ldy)


cdef inline void mm_gw(floating* dX, const floating* G, const floating* W, int N, int nout, int nin,
                       int ldg, int ldx, floating alpha, floating beta) noexcept nogil:
    """dX (N, nin) := alpha G (N, nout) W (nout, nin) + beta dX."""
    gemm(c'N', c'N', nin, N, nout, alpha, W, nin, G, ldg, beta, dX, ldx)


cdef inline void mm_gtx(floating* dW, const floating* G, const floating* X, int N, int nout, int nin,
                        int ldg, int ldx, floating alpha, floating beta) noexcept nogil:
    """dW (nout, nin) := alpha G^T (nout, N) X (N, nin) + beta dW."""
    gemm(c'N', c'T', nin, nout, N, alpha, X, ldx, G, ldg, beta, dW, nin)


# ---------------------------------------------------------------------------------------------
# linear with low-rank adapters:  Y = X W^T + sum_k alpha_k (X B_k^T) A_k^T

cdef void linear_forward(floating* Y, floating* U, const floating* X, const mg_linear* lin,
                         Py_ssize_t N, Py_ssize_t ldx, Py_ssize_t ldy) noexcept nogil:
    """Y (N, nout) = X (N, nin) W^T + sum_k alpha_k U_k A_k^T, caching U_k = X B_k^T in U (K, N, r)."""
    cdef int k
    cdef int r = lin.rank
    cdef floating* Uk
    mm_xwt(Y, X, <const floating*>lin.W, <int>N, lin.nout, lin.nin, <int>ldx, <int>ldy, 1, 0)
    for k in range(lin.n_ad):
        Uk = U + k * N * r
        mm_xwt(Uk, X, <const floating*>lin.B[k], <int>N, r, lin.nin, <int>ldx, r, 1, 0)
        mm_xwt(Y, Uk, <const floating*>lin.A[k], <int>N, lin.nout, r, r, <int>ldy, <floating>lin.alpha[k], 1)


cdef void linear_backward(floating* dX, floating* dU, const floating* G, const floating* X,
                          const floating* U, const mg_linear* lin,
                          Py_ssize_t N, Py_ssize_t ldx, Py_ssize_t ldg) noexcept nogil:
    """dX += G W + sum_k dU_k B_k;  dW += G^T X;  dA_k += alpha_k G^T U_k;  dB_k += dU_k^T X,
    with dU_k = alpha_k G A_k (scratch, (K, N, r)). dX may be NULL (input needs no gradient)."""
    cdef int k
    cdef int r = lin.rank
    cdef floating alpha
    cdef floating* dUk
    if lin.dW != NULL:
        mm_gtx(<floating*>lin.dW, G, X, <int>N, lin.nout, lin.nin, <int>ldg, <int>ldx, 1, 1)
    if dX != NULL:
        mm_gw(dX, G, <const floating*>lin.W, <int>N, lin.nout, lin.nin, <int>ldg, <int>ldx, 1, 1)
    for k in range(lin.n_ad):
        alpha = <floating>lin.alpha[k]
        dUk = dU + k * N * r
        if lin.dA[k] != NULL:
            mm_gtx(<floating*>lin.dA[k], G, U + k * N * r, <int>N, lin.nout, r, <int>ldg, r, alpha, 1)
        if lin.dB[k] == NULL and dX == NULL:
            continue
        mm_gw(dUk, G, <const floating*>lin.A[k], <int>N, lin.nout, r, <int>ldg, r, alpha, 0)
        if lin.dB[k] != NULL:
            mm_gtx(<floating*>lin.dB[k], dUk, X, <int>N, r, lin.nin, r, <int>ldx, 1, 1)
        if dX != NULL:
            mm_gw(dX, dUk, <const floating*>lin.B[k], <int>N, r, lin.nin, r, <int>ldx, 1, 1)


# ---------------------------------------------------------------------------------------------
# RMSNorm without gain:  y = x (mean(x^2) + 1e-5)^(-1/2)

cdef void rmsnorm_forward(floating* y, floating* rstd, const floating* x,
                          Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """x, y (N, C); rstd (N,) cached for backward."""
    cdef Py_ssize_t i, j
    cdef double ss, r
    for i in range(N):
        ss = 0
        for j in range(C):
            ss += <double>x[i * C + j] * x[i * C + j]
        r = 1.0 / sqrt(ss / C + 1e-5)
        rstd[i] = <floating>r
        for j in range(C):
            y[i * C + j] = <floating>(x[i * C + j] * r)


cdef void rmsnorm_backward(floating* dx, const floating* dy, const floating* y, const floating* rstd,
                           Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """dx += rstd (dy - y mean(dy y))   (d/dx of y_j = x_j r with dr/dx_j = -r^3 x_j / C)."""
    cdef Py_ssize_t i, j
    cdef double dot, r
    for i in range(N):
        dot = 0
        for j in range(C):
            dot += <double>dy[i * C + j] * y[i * C + j]
        dot /= C
        r = rstd[i]
        for j in range(C):
            dx[i * C + j] += <floating>(r * (dy[i * C + j] - y[i * C + j] * dot))


# ---------------------------------------------------------------------------------------------
# RoPE on interleaved pairs (2i, 2i+1) of every head, angle pos / 10000^(2i/d)

cdef void rope_forward(floating* y, const floating* x, const int* pos, const floating* cos_t,
                       const floating* sin_t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t d) noexcept nogil:
    """x, y (N, H*d); cos_t, sin_t (T, d/2) at row pos[i]."""
    cdef Py_ssize_t i, h, j, half = d // 2, C = H * d, o
    cdef floating a, b, c, s
    for i in range(N):
        for h in range(H):
            o = i * C + h * d
            for j in range(half):
                c = cos_t[pos[i] * half + j]
                s = sin_t[pos[i] * half + j]
                a = x[o + 2 * j]
                b = x[o + 2 * j + 1]
                y[o + 2 * j] = a * c - b * s
                y[o + 2 * j + 1] = a * s + b * c


cdef void rope_backward(floating* dx, const floating* dy, const int* pos, const floating* cos_t,
                        const floating* sin_t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t d) noexcept nogil:
    """dx += R(-theta) dy: the rotation is orthogonal, so its transpose is its inverse."""
    cdef Py_ssize_t i, h, j, half = d // 2, C = H * d, o
    cdef floating a, b, c, s
    for i in range(N):
        for h in range(H):
            o = i * C + h * d
            for j in range(half):
                c = cos_t[pos[i] * half + j]
                s = sin_t[pos[i] * half + j]
                a = dy[o + 2 * j]
                b = dy[o + 2 * j + 1]
                dx[o + 2 * j] += a * c + b * s
                dx[o + 2 * j + 1] += -a * s + b * c


# ---------------------------------------------------------------------------------------------
# causal attention over packed sequences, content / rrpram / hybrid heads
#
# For sequence s (positions off[s] .. off[s]+n[s]) and head h, query t and key j <= t:
#   content  c = <q_t, k_j> / sqrt(d)          (q, k already rotated)
#   rrpram   p = P_h[t, j]                      (P_h (N, T): the pattern linear's output)
#   hybrid   l = (1 - a) c + a p,  a = sigmoid(alpha_h)
# att = softmax_j(l);  y_t = sum_j att_j v_j.   att (per head, per sequence: n x n, row-major)
# is cached at att + h * SS + sq_off[s].

cdef void attention_forward(floating* y, floating* att, const floating* q, const floating* k,
                            const floating* v, floating** P, const int* head_type,
                            const double* mix, const int* off, const int* n, const Py_ssize_t* sq_off,
                            Py_ssize_t SS, Py_ssize_t n_seq, Py_ssize_t H, Py_ssize_t d,
                            Py_ssize_t T) noexcept nogil:
    """q, k, v, y (N, H*d); P[h] (N, T) for rrpram/hybrid heads; mix[h] = sigmoid(alpha_h)."""
    cdef Py_ssize_t s, h, t, j, i, o, ns, C = H * d
    cdef floating* row
    cdef floating* yt
    cdef const floating* qt
    cdef const floating* kj
    cdef const floating* vj
    cdef double scale = 1.0 / sqrt(<double>d), a, c, l, mx, total, w
    cdef int kind
    for h in range(H):
        kind = head_type[h]
        a = mix[h]
        for s in range(n_seq):
            o = off[s]
            ns = n[s]
            for t in range(ns):
                row = att + h * SS + sq_off[s] + t * ns
                qt = q + (o + t) * C + h * d
                mx = -INFINITY
                for j in range(t + 1):
                    l = 0
                    if kind != HEAD_RRPRAM:
                        kj = k + (o + j) * C + h * d
                        c = 0
                        for i in range(d):
                            c += <double>qt[i] * kj[i]
                        l = c * scale
                    if kind == HEAD_RRPRAM:
                        l = P[h][(o + t) * T + j]
                    elif kind == HEAD_HYBRID:
                        l = (1 - a) * l + a * P[h][(o + t) * T + j]
                    row[j] = <floating>l
                    if row[j] > mx:
                        mx = row[j]
                total = 0
                for j in range(t + 1):
                    w = exp(row[j] - mx)
                    row[j] = <floating>w
                    total += w
                yt = y + (o + t) * C + h * d
                for i in range(d):
                    yt[i] = 0
                for j in range(t + 1):
                    row[j] = <floating>(row[j] / total)
                    vj = v + (o + j) * C + h * d
                    for i in range(d):
                        yt[i] += row[j] * vj[i]


cdef void attention_backward(floating* dq, floating* dk, floating* dv, floating** dP, double* dmix_logit,
                             floating* scratch, const floating* dy, const floating* att,
                             const floating* q, const floating* k, const floating* v, floating** P,
                             const int* head_type, const double* mix, const int* off, const int* n,
                             const Py_ssize_t* sq_off, Py_ssize_t SS, Py_ssize_t n_seq, Py_ssize_t H,
                             Py_ssize_t d, Py_ssize_t T) noexcept nogil:
    """Gradients of attention_forward into q, k, v, P and, per hybrid head, into alpha:
    dmix_logit[h] += sum dl (p - c) a (1 - a)   (d/d alpha of the mixed logit).
    1. dw_j = <dy_t, v_j>;  dv_j += att_j dy_t
    2. dl_j = att_j (dw_j - sum_j att_j dw_j)        (softmax backward)
    3. content part dc = dl (content) or (1 - a) dl (hybrid): dq_t += dc k_j / sqrt(d), dk_j += dc q_t / sqrt(d)
    4. rrpram part dp = dl (rrpram) or a dl (hybrid) into dP_h[t, j].
    scratch holds T floats."""
    cdef Py_ssize_t s, h, t, j, i, o, ns, C = H * d
    cdef const floating* row
    cdef const floating* dyt
    cdef const floating* qt
    cdef const floating* kj
    cdef const floating* vj
    cdef floating* dqt
    cdef floating* dkj
    cdef floating* dvj
    cdef double scale = 1.0 / sqrt(<double>d), a, c, dw, sum_adw, dl, dc, dalpha
    cdef int kind
    for h in range(H):
        kind = head_type[h]
        a = mix[h]
        dalpha = 0
        for s in range(n_seq):
            o = off[s]
            ns = n[s]
            for t in range(ns):
                row = att + h * SS + sq_off[s] + t * ns
                dyt = dy + (o + t) * C + h * d
                qt = q + (o + t) * C + h * d
                dqt = dq + (o + t) * C + h * d
                sum_adw = 0
                for j in range(t + 1):
                    vj = v + (o + j) * C + h * d
                    dvj = dv + (o + j) * C + h * d
                    dw = 0
                    for i in range(d):
                        dw += <double>dyt[i] * vj[i]
                        dvj[i] += row[j] * dyt[i]
                    scratch[j] = <floating>dw
                    sum_adw += row[j] * dw
                for j in range(t + 1):
                    dl = row[j] * (scratch[j] - sum_adw)
                    if kind == HEAD_RRPRAM:
                        dP[h][(o + t) * T + j] += <floating>dl
                        continue
                    dc = dl
                    kj = k + (o + j) * C + h * d
                    if kind == HEAD_HYBRID:
                        dP[h][(o + t) * T + j] += <floating>(a * dl)
                        dc = (1 - a) * dl
                        c = 0
                        for i in range(d):
                            c += <double>qt[i] * kj[i]
                        dalpha += dl * (P[h][(o + t) * T + j] - c * scale) * a * (1 - a)
                    dc *= scale
                    dkj = dk + (o + j) * C + h * d
                    for i in range(d):
                        dqt[i] += <floating>(dc * kj[i])
                        dkj[i] += <floating>(dc * qt[i])
        dmix_logit[h] += dalpha


# ---------------------------------------------------------------------------------------------
# gated MLP activation:  out = act(g) * u,  act = relu or silu

cdef inline double sigmoid(double x) noexcept nogil:
    return 1.0 / (1.0 + exp(-x))


cdef void gate_forward(floating* out, const floating* g, const floating* u, Py_ssize_t n,
                       int act) noexcept nogil:
    """out, g, u (n,)."""
    cdef Py_ssize_t i
    if act == ACT_RELU:
        for i in range(n):
            out[i] = g[i] * u[i] if g[i] > 0 else 0
    else:
        for i in range(n):
            out[i] = <floating>(g[i] * sigmoid(g[i]) * u[i])


cdef void gate_backward(floating* dg, floating* du, const floating* dout, const floating* g,
                        const floating* u, Py_ssize_t n, int act) noexcept nogil:
    """dg += dout u act'(g);  du += dout act(g);  silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)."""
    cdef Py_ssize_t i
    cdef double sg
    if act == ACT_RELU:
        for i in range(n):
            if g[i] > 0:
                dg[i] += dout[i] * u[i]
                du[i] += dout[i] * g[i]
    else:
        for i in range(n):
            sg = sigmoid(g[i])
            dg[i] += <floating>(dout[i] * u[i] * sg * (1 + g[i] * (1 - sg)))
            du[i] += <floating>(dout[i] * g[i] * sg)


# ---------------------------------------------------------------------------------------------
# embedding gather / scatter-add

cdef void embed_forward(floating* x, const floating* wte, const floating* wpe, const int* ids,
                        const int* pos, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """x (N, C) = wte[ids] + wpe[pos]."""
    cdef Py_ssize_t i, j
    for i in range(N):
        for j in range(C):
            x[i * C + j] = wte[<Py_ssize_t>ids[i] * C + j] + wpe[<Py_ssize_t>pos[i] * C + j]


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
    cdef double mx, total, lse
    for i in range(N):
        z = logits + i * V
        mx = -INFINITY
        for j in range(V):
            if z[j] > mx:
                mx = z[j]
        total = 0
        for j in range(V):
            total += exp(z[j] - mx)
        lse = mx + log(total)
        losses[i] = lse - z[targets[i]]
        for j in range(V):
            z[j] = <floating>exp(z[j] - lse)


cdef void xent_backward(floating* dlogits, const floating* probs, const int* targets,
                        const double* weights, Py_ssize_t N, Py_ssize_t V) noexcept nogil:
    """dlogits += w_i (p - onehot(target_i)), for loss = sum_i w_i loss_i."""
    cdef Py_ssize_t i, j
    cdef floating w
    for i in range(N):
        w = <floating>weights[i]
        for j in range(V):
            dlogits[i * V + j] += w * probs[i * V + j]
        dlogits[i * V + targets[i]] -= w


# ---------------------------------------------------------------------------------------------
# elementwise add (residual)

cdef void add_forward(floating* out, const floating* a, const floating* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = a[i] + b[i]


cdef void add_backward(floating* da, floating* db, const floating* dout, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        da[i] += dout[i]
        db[i] += dout[i]


# ---------------------------------------------------------------------------------------------
# Adam with element-wise clipping

cdef void adam_step(floating* p, const floating* g, floating* m, floating* v, Py_ssize_t n,
                    double lr, double beta1, double beta2, double eps, double clip,
                    double bias1, double bias2) noexcept nogil:
    """g' = clip(g, +-clip); m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
    p -= lr (m / bias1) / (sqrt(v / bias2) + eps),  bias_i = 1 - beta_i^t."""
    cdef Py_ssize_t i
    cdef double gi, mi, vi
    for i in range(n):
        gi = g[i]
        if gi > clip:
            gi = clip
        elif gi < -clip:
            gi = -clip
        mi = beta1 * m[i] + (1 - beta1) * gi
        vi = beta2 * v[i] + (1 - beta2) * gi * gi
        m[i] = <floating>mi
        v[i] = <floating>vi
        p[i] = <floating>(p[i] - lr * (mi / bias1) / (sqrt(vi / bias2) + eps))
