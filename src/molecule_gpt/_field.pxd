# _field.pxd: the corpus n-gram field's native tables (design.md §5; _field.pyx), cimported by the
# decoder (_decode.pyx), which blends the field's distribution into sampling.

from libc.stdint cimport int64_t

ctypedef struct FieldC:
    Py_ssize_t V
    const double* uni           # (V,) counts
    const int64_t* bi_keys      # (n_bi,) sorted a * V + b
    const double* bi_counts
    Py_ssize_t n_bi
    const int64_t* tri_keys     # (n_tri,) sorted (a * V + b) * V + c
    const double* tri_counts
    Py_ssize_t n_tri


cdef class Field:
    cdef FieldC f
    cdef object keep


cdef int field_dist(double* q, const FieldC* f, const int* hist, Py_ssize_t nh, const float* z,
                    double inv_t, int min_level) noexcept nogil
