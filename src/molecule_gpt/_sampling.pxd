# _sampling.pxd: the sampling stack of design.md §4 and the random numbers it draws with
# (_sampling.pyx), cimported by the decoder (_decode.pyx), which runs it once per token.

from libc.stdint cimport uint64_t

ctypedef struct Rng:
    uint64_t s[4]


ctypedef struct Cand:
    double p        # probability (full distribution, before renormalizing over candidates)
    double key      # typical-p score |surprisal - H|
    int i           # token id

ctypedef struct SampleC:
    double temperature      # 0 = greedy
    double entropy_low
    double entropy_high
    double boost
    double focus
    double min_p
    double typical_p
    double top_p
    double freq_penalty
    double model_alpha      # weight of the model in the model/field blend (1 = model only)
    int top_k               # 0 = off


cdef void rng_seed(Rng* r, uint64_t seed) noexcept nogil
cdef double softmax_t(double* p, const float* z, Py_ssize_t V, double inv_t, float* scratch,
                      double* Z=*) noexcept nogil
cdef Py_ssize_t sample_stack(Cand* cand, double* p, const float* z, const double* q, Py_ssize_t V,
                             const SampleC* sp, float* scratch) noexcept nogil
cdef int cand_draw(const Cand* cand, Py_ssize_t n, Rng* rng) noexcept nogil
