# _field.pyx: the corpus n-gram field's lookups (design.md §5): unigram counts, bigram and
# trigram counts as sorted int64 keys (a * V + b, (a * V + b) * V + c) with parallel counts; a
# context's continuations are one binary-searched range. field.CorpusField builds and merges the
# tables (numpy) and owns them; Field is their native view, for the decoder's blend (nogil,
# per token) and for Python (distribution).

from libc.string cimport memset
from libc.math cimport exp, log, INFINITY
from libc.stdint cimport int64_t

import numpy as np


cdef inline void* data_ptr(object arr):
    return <void*><size_t>arr.__array_interface__["data"][0]


cdef inline Py_ssize_t lower_bound(const int64_t* keys, Py_ssize_t n, int64_t key) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef int field_dist(double* q, const FieldC* f, const int* hist, Py_ssize_t nh, const float* z,
                    double inv_t, int min_level) noexcept nogil:
    """q (V) = the field's next-token distribution after hist[0:nh], proportional to
    count^(1/T), from the most specific level (3 trigram, 2 bigram, 1 unigram) >= min_level
    whose context was seen with at least one token allowed (z[i] > -inf; z may be NULL).
    Returns the level used, or 0 (q untouched) when none qualifies."""
    cdef Py_ssize_t V = f.V, lo, hi, j, i
    cdef int level
    cdef int64_t base
    cdef double total
    for level in range(3, min_level - 1, -1):
        if level == 1:
            total = 0
            for j in range(V):
                if f.uni[j] > 0 and (z == NULL or z[j] > -INFINITY):
                    total += exp(log(f.uni[j]) * inv_t)
            if total <= 0:
                continue
            for j in range(V):
                q[j] = exp(log(f.uni[j]) * inv_t) / total if f.uni[j] > 0 and (z == NULL or z[j] > -INFINITY) else 0.0
            return 1
        if nh < level - 1:
            continue
        if level == 3:
            base = (<int64_t>hist[nh - 2] * V + hist[nh - 1]) * V
            lo = lower_bound(f.tri_keys, f.n_tri, base)
            hi = lower_bound(f.tri_keys, f.n_tri, base + V)
        else:
            base = <int64_t>hist[nh - 1] * V
            lo = lower_bound(f.bi_keys, f.n_bi, base)
            hi = lower_bound(f.bi_keys, f.n_bi, base + V)
        total = 0
        for j in range(lo, hi):
            if z == NULL or z[(f.tri_keys[j] if level == 3 else f.bi_keys[j]) - base] > -INFINITY:
                total += exp(log((f.tri_counts if level == 3 else f.bi_counts)[j]) * inv_t)
        if total <= 0:
            continue
        memset(q, 0, V * sizeof(double))
        for j in range(lo, hi):
            i = (f.tri_keys[j] if level == 3 else f.bi_keys[j]) - base
            if z == NULL or z[i] > -INFINITY:
                q[i] = exp(log((f.tri_counts if level == 3 else f.bi_counts)[j]) * inv_t) / total
        return level
    return 0


cdef class Field:
    """Native view of a corpus field's tables (built by field.CorpusField, which owns the arrays)."""

    def __init__(self, Py_ssize_t vocab_size, uni, bi_keys, bi_counts, tri_keys, tri_counts):
        arrays = []
        for name, a, dt in (("uni", uni, np.float64), ("bi_keys", bi_keys, np.int64), ("bi_counts", bi_counts, np.float64),
                            ("tri_keys", tri_keys, np.int64), ("tri_counts", tri_counts, np.float64)):
            if not isinstance(a, np.ndarray) or a.dtype != dt or a.ndim != 1 or not a.flags.c_contiguous:
                raise ValueError(f"{name} must be a 1-D C-contiguous {np.dtype(dt).name} array")
            arrays.append(a if a.size else np.zeros(1, dt))
        if uni.shape[0] != vocab_size:
            raise ValueError(f"uni has {uni.shape[0]} entries, expected vocab_size={vocab_size}")
        if bi_keys.shape[0] != bi_counts.shape[0] or tri_keys.shape[0] != tri_counts.shape[0]:
            raise ValueError("keys and counts must have the same length")
        self.f.V = vocab_size
        self.f.uni = <const double*>data_ptr(arrays[0])
        self.f.bi_keys = <const int64_t*>data_ptr(arrays[1])
        self.f.bi_counts = <const double*>data_ptr(arrays[2])
        self.f.n_bi = bi_keys.shape[0]
        self.f.tri_keys = <const int64_t*>data_ptr(arrays[3])
        self.f.tri_counts = <const double*>data_ptr(arrays[4])
        self.f.n_tri = tri_keys.shape[0]
        self.keep = arrays

    @property
    def vocab_size(self) -> int:
        return self.f.V

    def distribution(self, context, double temperature=1.0, int min_level=1):
        """(q, level): the next-token distribution after `context` (ids) and the level used
        (3 trigram, 2 bigram, 1 unigram, 0 none: q is all zero)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        ctx = np.ascontiguousarray(context, dtype=np.intc)
        if ctx.ndim != 1 or (ctx.size and (ctx.min() < 0 or ctx.max() >= self.f.V)):
            raise ValueError(f"context must be a flat list of ids in [0, {self.f.V})")
        q = np.zeros(self.f.V)
        cdef double[::1] qv = q
        cdef int[::1] cv = ctx if ctx.size else np.zeros(1, np.intc)
        level = field_dist(&qv[0], &self.f, &cv[0], ctx.shape[0], NULL, 1.0 / temperature, min_level)
        return q, level
