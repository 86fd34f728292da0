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

from ._molecule cimport (floating, mg_expf, mg_row_max_f, mg_row_max_d, mg_row_exp_sum_f, mg_row_exp_sum_d,
                         mg_row_dot_f, mg_row_dot_d)


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
    """x := exp(x - shift); returns the sum (csrc/rows.h: vectorized reductions)."""
    if floating is float:
        return mg_row_exp_sum_f(x, n, shift)
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
