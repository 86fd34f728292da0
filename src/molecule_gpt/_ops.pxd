# _ops.pxd: the forward ops of the model, one definition each, shared by training and decoding.
#
# Each op is one `cdef inline ... noexcept nogil` function over `floating`, on rows: the training
# tape (_kernels.pxi, run by _core's run_forward) calls it over the N packed positions of a
# batch, the decoder's prefill (_decode.pyx) over the window's rows, and a decode step over one
# row. The bodies behind an op may be specialised by shape or CPU (csrc/ kernels chosen at run
# time); the formula is written here once. Backward kernels stay with the tape (_kernels.pxi).
# What each op computes and why: design.md §2. Dims legend: csrc/molecule.h.
#
# OPS names them (tests/test_one_definition.py checks that every path calls these and that
# nothing else defines them).

from libc.math cimport exp, sqrt, sqrtf

from ._molecule cimport (floating, mg_expf, mg_row_max_f, mg_row_max_d, mg_row_exp_f, mg_row_sum_f, mg_row_exp_sum_d,
                         mg_row_dot_f, mg_row_dot_d, mg_rope_row_f, mg_rope_row_d,
                         mg_relu_gate_forward_f, mg_relu_gate_forward_d, ACT_RELU)


# ---------------------------------------------------------------------------------------------
# scalar and row helpers in the buffer's precision

cdef inline floating fexp(floating x) noexcept nogil:
    """exp in the buffer's precision: float32 uses the branch-free mg_expf (csrc/fastmath.h,
    ~2 ulp, vectorizes); float64 uses libm so imported checkpoints reproduce the original."""
    if floating is float:
        return mg_expf(x)
    else:
        return exp(x)


cdef inline floating fsqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating row_max(const floating* x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return mg_row_max_f(x, n)
    else:
        return mg_row_max_d(x, n)


cdef inline floating row_exp_sum(floating* x, Py_ssize_t n, floating shift) noexcept nogil:
    """x := exp(x - shift); returns the sum (csrc/rows.h's fixed-order reductions; float32's
    exponentials are attention.h's, on 8 lanes where AVX2 runs)."""
    if floating is float:
        mg_row_exp_f(x, n, shift)
        return mg_row_sum_f(x, NULL, n)
    else:
        return mg_row_exp_sum_d(x, n, shift)


cdef inline floating row_dot(const floating* a, const floating* b, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return mg_row_dot_f(a, b, n)
    else:
        return mg_row_dot_d(a, b, n)


cdef inline double sigmoid(double x) noexcept nogil:
    return 1.0 / (1.0 + exp(-x))


# ---------------------------------------------------------------------------------------------
# RMSNorm without gain:  y = x (mean(x^2) + 1e-5)^(-1/2)

cdef inline void rmsnorm_forward(floating* y, floating* rstd, const floating* x,
                                 Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """x, y (N, C); rstd (N,) cached for backward (NULL: not kept, as in decoding)."""
    cdef Py_ssize_t i, j
    cdef floating r
    for i in range(N):
        r = <floating>(1.0 / sqrt(<double>row_dot(x + i * C, x + i * C, C) / C + 1e-5))
        if rstd != NULL:
            rstd[i] = r
        for j in range(C):
            y[i * C + j] = x[i * C + j] * r


# ---------------------------------------------------------------------------------------------
# RoPE on interleaved pairs (2i, 2i+1) of every head, angle pos / 10000^(2i/d)

cdef inline object rope_tables_per_head(table, int H):
    """rope_forward's layout of a (T, d/2) cosine or sine table: each position's row repeated
    once per head, (T, H*d/2) C-contiguous, so one loop turns a whole row."""
    import numpy
    return numpy.ascontiguousarray(numpy.tile(table, (1, H)))


cdef inline void rope_forward(floating* y, const floating* x, const int* pos, const floating* cos_t,
                              const floating* sin_t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t d,
                              Py_ssize_t ldx) noexcept nogil:
    """x (N, H*d) with row stride ldx, y (N, H*d) contiguous; cos_t, sin_t (T, H*d/2) from
    rope_tables_per_head, at row pos[i] (csrc/elementwise.h)."""
    cdef Py_ssize_t i, C = H * d, np2 = C // 2
    for i in range(N):
        if floating is float:
            mg_rope_row_f(y + i * C, x + i * ldx, cos_t + pos[i] * np2, sin_t + pos[i] * np2, np2)
        else:
            mg_rope_row_d(y + i * C, x + i * ldx, cos_t + pos[i] * np2, sin_t + pos[i] * np2, np2)


# ---------------------------------------------------------------------------------------------
# embedding gather

cdef inline void embed_forward(floating* x, const floating* wte, const floating* wpe, const int* ids,
                               const int* pos, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """x (N, C) = wte[ids] + wpe[pos]."""
    cdef Py_ssize_t i, j
    for i in range(N):
        for j in range(C):
            x[i * C + j] = wte[<Py_ssize_t>ids[i] * C + j] + wpe[<Py_ssize_t>pos[i] * C + j]


# ---------------------------------------------------------------------------------------------
# gated MLP activation:  out = act(g) * u,  act = relu or silu

cdef inline void gate_forward(floating* out, const floating* g, const floating* u, Py_ssize_t N,
                              Py_ssize_t F, Py_ssize_t ld_in, int act) noexcept nogil:
    """out (N, F) = act(g) * u;  g, u (N, F) with row stride ld_in (halves of the fused linear)."""
    cdef Py_ssize_t i, j
    cdef const floating* gi
    cdef const floating* ui
    for i in range(N):
        gi = g + i * ld_in
        ui = u + i * ld_in
        if act == ACT_RELU:  # csrc/elementwise.h: restrict lets it vectorize
            if floating is float:
                mg_relu_gate_forward_f(out + i * F, gi, ui, F)
            else:
                mg_relu_gate_forward_d(out + i * F, gi, ui, F)
        else:
            for j in range(F):
                out[i * F + j] = <floating>(gi[j] * sigmoid(gi[j]) * ui[j])


# ---------------------------------------------------------------------------------------------
# elementwise add (residual)

cdef inline void add_forward(floating* out, const floating* a, const floating* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = a[i] + b[i]
