# _sampling.pyx: the sampling stack (design.md §4): the softmax at a temperature and its
# entropy, the entropy-adaptive temperature, the blend with the corpus field, min-p, top-k,
# typical-p and top-p, and the draw, with xoshiro256** random numbers (one stream per
# generation). Pure functions over buffers, nogil: the decoder (_decode.pyx) calls them once
# per token for each sequence; what they compute is declared in _sampling.pxd.
#
# Why here and not in the decoder: sampling is a policy over a distribution, independent of how
# the logits were computed (the corpus field's distribution goes through it too).

from libc.stdlib cimport calloc, free
from libc.string cimport memset, memcpy
from libc.math cimport exp, log, sqrt, fabs, INFINITY, isnan
from libc.stdint cimport uint64_t

import numpy as np

from ._molecule cimport mg_row_max_f

cdef extern from "decode_kernels.h" nogil:  # the softmax's exponentials and the min-p scan, vector-wide
    float mg_softmax_exp_f(float* x, float* e, const float* z, Py_ssize_t n, float ft, float shift, float lo,
                           float* sx)
    Py_ssize_t mg_next_at_least_f(const float* e, const float* z, Py_ssize_t i, Py_ssize_t n, float thr)


# ---------------------------------------------------------------------------------------------
# random numbers: xoshiro256** seeded by splitmix64 (per Decoder, so threads never share state)

cdef inline uint64_t rotl(uint64_t x, int k) noexcept nogil:
    return (x << k) | (x >> (64 - k))

cdef void rng_seed(Rng* r, uint64_t seed) noexcept nogil:
    cdef int i
    cdef uint64_t z
    for i in range(4):
        seed += <uint64_t>0x9E3779B97F4A7C15
        z = seed
        z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
        r.s[i] = z ^ (z >> 31)

cdef inline double rng_uniform(Rng* r) noexcept nogil:
    """Uniform double in [0, 1)."""
    cdef uint64_t result = rotl(r.s[1] * 5, 7) * 9
    cdef uint64_t t = r.s[1] << 17
    r.s[2] ^= r.s[0]
    r.s[3] ^= r.s[1]
    r.s[1] ^= r.s[2]
    r.s[0] ^= r.s[3]
    r.s[2] ^= t
    r.s[3] = rotl(r.s[3], 45)
    return (result >> 11) * (1.0 / 9007199254740992.0)


# ---------------------------------------------------------------------------------------------
# sampling stack (design.md §4)

cdef inline bint cand_before(const Cand* a, const Cand* b, int by_key) noexcept nogil:
    """Order: by_key=0 p descending; by_key=1 key ascending then p descending; ties by id."""
    if by_key:
        if a.key != b.key:
            return a.key < b.key
    if a.p != b.p:
        return a.p > b.p
    return a.i < b.i


cdef void cand_sort(Cand* c, Py_ssize_t n, int by_key) noexcept nogil:
    """In-place sort (quicksort, median of three, insertion sort below 16)."""
    cdef Py_ssize_t i, j, lo = 0, hi = n - 1, mid
    cdef Cand pivot, tmp
    while hi - lo >= 16:
        mid = lo + (hi - lo) // 2
        if cand_before(&c[mid], &c[lo], by_key):
            tmp = c[mid]; c[mid] = c[lo]; c[lo] = tmp
        if cand_before(&c[hi], &c[lo], by_key):
            tmp = c[hi]; c[hi] = c[lo]; c[lo] = tmp
        if cand_before(&c[hi], &c[mid], by_key):
            tmp = c[hi]; c[hi] = c[mid]; c[mid] = tmp
        pivot = c[mid]
        i = lo
        j = hi
        while i <= j:
            while cand_before(&c[i], &pivot, by_key):
                i += 1
            while cand_before(&pivot, &c[j], by_key):
                j -= 1
            if i <= j:
                tmp = c[i]; c[i] = c[j]; c[j] = tmp
                i += 1
                j -= 1
        # recurse into the smaller side, loop on the larger (stack depth O(log n))
        if j - lo < hi - i:
            cand_sort(c + lo, j - lo + 1, by_key)
            lo = i
        else:
            cand_sort(c + i, hi - i + 1, by_key)
            hi = j
    for i in range(lo + 1, hi + 1):
        tmp = c[i]
        j = i - 1
        while j >= lo and cand_before(&tmp, &c[j], by_key):
            c[j + 1] = c[j]
            j -= 1
        c[j + 1] = tmp


cdef double softmax_t(double* p, const float* z, Py_ssize_t V, double inv_t, float* scratch,
                      double* Z=NULL) noexcept nogil:
    """Softmax of z * inv_t over V. Returns its entropy in nats, as H = log Z - sum_i p_i x_i
    with x_i = (z_i - max z) inv_t (no per-token log). The unnormalized weights e_i = exp(x_i)
    are left in scratch[V:2V] (e = 1 at the largest logit, so p_i / max p = e_i) and *Z (if
    given) receives their sum; p (if not NULL) receives the probabilities, exactly 0 where
    z = -inf. scratch: 2V floats.
    Sampling works in float32: exponentials by mg_expf (~2 ulp), the pass and its sums
    vectorized (csrc/decode_kernels.h, AVX2 when available); a sampling distribution needs no
    more precision (libm's double exp was a large share of a token's sampling time: figures in
    benchmarks/RESULTS.md)."""
    cdef Py_ssize_t i
    cdef float* x = scratch
    cdef float* e = scratch + V
    cdef float mx = mg_row_max_f(z, V), ft = <float>inv_t, sx = 0
    cdef float lo = -87.0   # exp(lo) ~ 1e-38: banned tokens stay finite in the sums
    cdef double total, inv
    if mx == -INFINITY:
        if p != NULL:
            memset(p, 0, V * sizeof(double))
        if Z != NULL:
            Z[0] = 0
        return 0.0
    total = mg_softmax_exp_f(x, e, z, V, ft, mx * ft, lo, &sx)
    inv = 1.0 / total
    if p != NULL:
        for i in range(V):
            p[i] = e[i] * inv if z[i] > -INFINITY else 0.0
    if Z != NULL:
        Z[0] = total
    return log(total) - sx * inv


cdef inline void heap_sift(Cand* h, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    """Restore the heap below i: every parent comes after its children in cand order (the root
    is the worst of the kept candidates)."""
    cdef Py_ssize_t c
    cdef Cand tmp
    while True:
        c = 2 * i + 1
        if c >= n:
            return
        if c + 1 < n and cand_before(&h[c], &h[c + 1], 0):
            c += 1  # the worse child
        if not cand_before(&h[i], &h[c], 0):
            return
        tmp = h[i]; h[i] = h[c]; h[c] = tmp
        i = c


cdef inline Py_ssize_t heap_push(Cand* cand, Py_ssize_t n, Py_ssize_t k, double pi, int i) noexcept nogil:
    """Offer candidate (pi, i) to the k best kept in cand[0:n] (ids arrive ascending); returns
    the new count. Below k candidates are appended; at k they form a heap whose root is the
    worst, replaced when the newcomer is better (a tie keeps the earlier id)."""
    cdef Py_ssize_t m
    if n < k:
        cand[n].p = pi
        cand[n].key = 0
        cand[n].i = i
        n += 1
        if n == k:
            for m in range(k // 2 - 1, -1, -1):
                heap_sift(cand, k, m)
        return n
    if pi > cand[0].p:
        cand[0].p = pi
        cand[0].i = i
        heap_sift(cand, k, 0)
    return n


cdef inline Py_ssize_t leading_share(const Cand* cand, Py_ssize_t n, double mass, double share) noexcept nogil:
    """How many leading candidates it takes for their p / mass to sum to `share` (n if never)."""
    cdef double cum = 0
    cdef Py_ssize_t i
    for i in range(n):
        cum += cand[i].p / mass
        if cum >= share:
            return i + 1
    return n


cdef inline Py_ssize_t only_candidate(Cand* cand, Py_ssize_t m) noexcept nogil:
    """Token m as the one candidate (a greedy choice); no candidate when m < 0 (none allowed)."""
    if m < 0:
        return 0
    cand[0].p = 1.0
    cand[0].key = 0
    cand[0].i = <int>m
    return 1


cdef Py_ssize_t sample_stack(Cand* cand, double* p, const float* z, const double* q, Py_ssize_t V,
                             const SampleC* sp, float* scratch) noexcept nogil:
    """The built-in stack of design.md §4 on logits z (banned tokens already -inf, penalty applied):
    entropy H at the base temperature; temperature x boost when H < entropy_low, x focus when
    H > entropy_high; blend with the field q (when q != NULL): a p + (1 - a) q; then min-p,
    top-k, typical-p, top-p. Writes the surviving candidates to cand (sorted by p descending,
    unnormalized) and returns their count (>= 1 unless every token is banned).
    Note: min-p and top-k both keep a top set, so they commute; min-p runs first because its
    threshold is one pass and leaves top-k fewer candidates to select from."""
    cdef Py_ssize_t i, n = 0, m, k
    cdef double H, t, pmax = 0, thr, mass, pi, Z = 0, inv, a = sp.model_alpha
    cdef float thr_e
    cdef const float* e
    if sp.temperature <= 0 and q == NULL:   # greedy: the largest logit
        m = -1
        for i in range(V):
            if z[i] > -INFINITY and (m < 0 or z[i] > z[m]):
                m = i
        return only_candidate(cand, m)
    if sp.temperature <= 0:     # greedy: the most probable token of the blended distribution
        softmax_t(p, z, V, 1.0, scratch)
        if q != NULL:
            for i in range(V):
                p[i] = a * p[i] + (1 - a) * q[i]
        m = -1
        for i in range(V):
            if p[i] > 0 and (m < 0 or p[i] > p[m]):
                m = i
        return only_candidate(cand, m)
    H = softmax_t(NULL, z, V, 1.0 / sp.temperature, scratch, &Z)
    t = sp.temperature
    if H < sp.entropy_low:
        t = t * sp.boost
    elif H > sp.entropy_high:
        t = t * sp.focus
    if t != sp.temperature:
        softmax_t(NULL, z, V, 1.0 / t, scratch, &Z)
    if Z <= 0:
        return 0
    e = scratch + V
    inv = 1.0 / Z
    k = sp.top_k if 0 < sp.top_k < V else V
    if q == NULL:
        # p_i = e_i / Z and e = 1 at the largest logit, so min-p is e_i >= min_p: the
        # candidates come straight from the float weights (no probability array)
        thr_e = <float>sp.min_p
        i = mg_next_at_least_f(e, z, 0, V, thr_e)
        while i < V:
            n = heap_push(cand, n, k, e[i] * inv, <int>i)
            i = mg_next_at_least_f(e, z, i + 1, V, thr_e)
    else:
        pmax = 0
        for i in range(V):
            pi = a * (e[i] * inv if z[i] > -INFINITY else 0.0) + (1 - a) * q[i]
            p[i] = pi
            if pi > pmax:
                pmax = pi
        if pmax <= 0:
            return 0
        thr = sp.min_p * pmax
        for i in range(V):
            pi = p[i]
            if pi > 0 and pi >= thr:
                n = heap_push(cand, n, k, pi, <int>i)
    cand_sort(cand, n, 0)
    if sp.typical_p < 1 and n > 1:
        mass = 0
        for i in range(n):
            mass += cand[i].p
            cand[i].key = fabs(-log(cand[i].p) - H)
        cand_sort(cand, n, 1)
        n = leading_share(cand, n, mass, sp.typical_p)
        cand_sort(cand, n, 0)
    if sp.top_p < 1 and n > 1:
        mass = 0
        for i in range(n):
            mass += cand[i].p
        n = leading_share(cand, n, mass, sp.top_p)
    return n


cdef int cand_draw(const Cand* cand, Py_ssize_t n, Rng* rng) noexcept nogil:
    """A token drawn with probability proportional to cand[j].p."""
    cdef Py_ssize_t j
    cdef double total = 0, u, cum = 0
    for j in range(n):
        total += cand[j].p
    u = rng_uniform(rng) * total
    for j in range(n):
        cum += cand[j].p
        if u < cum:
            return cand[j].i
    return cand[n - 1].i


# ---------------------------------------------------------------------------------------------
# test twins of the sampling kernels

def _sample_stack_memview(z, q, double temperature, double entropy_low, double entropy_high,
                          double boost, double focus, double min_p, double typical_p, double top_p,
                          int top_k, double model_alpha=1.0):
    """(ids, probs) of the candidates the built-in stack keeps for logits z (cast to float32,
    as the decoder samples), sorted by probability descending, probabilities renormalized
    over the candidates."""
    cdef SampleC sp
    zf = np.ascontiguousarray(z, dtype=np.float32)
    cdef float[::1] zv = zf
    cdef Py_ssize_t V = zv.shape[0], n, j
    sp.temperature, sp.entropy_low, sp.entropy_high = temperature, entropy_low, entropy_high
    sp.boost, sp.focus, sp.min_p, sp.typical_p, sp.top_p = boost, focus, min_p, typical_p, top_p
    sp.top_k, sp.freq_penalty, sp.model_alpha = top_k, 0.0, model_alpha
    p = np.zeros(V)
    scratch = np.zeros(2 * V, np.float32)
    cdef double[::1] pv = p
    cdef float[::1] sv = scratch
    cdef double[::1] qv
    cdef const double* qp = NULL
    if q is not None:
        qv = np.ascontiguousarray(q, dtype=np.float64)
        qp = &qv[0]
    cdef Cand* cand = <Cand*>calloc(V, sizeof(Cand))
    if cand == NULL:
        raise MemoryError()
    n = sample_stack(cand, &pv[0], &zv[0], qp, V, &sp, &sv[0])
    ids = [cand[j].i for j in range(n)]
    probs = np.array([cand[j].p for j in range(n)])
    free(cand)
    if n:
        probs /= probs.sum()
    return ids, probs
