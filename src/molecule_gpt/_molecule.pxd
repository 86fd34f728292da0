# The shared native declarations of molecule_gpt, cimported by both extensions (_core, _decode):
# the C API of csrc/ (codes, arena and tape node types, kernels) and the one `floating`.
# Declared here once; neither extension re-declares any of it.

ctypedef fused floating:
    float
    double


cdef extern from "codes.h" nogil:
    # csrc/codes.h is the one definition of these codes; the Cython names are its MG_ names
    enum:
        HEAD_CONTENT "MG_HEAD_CONTENT"
        HEAD_RRPRAM "MG_HEAD_RRPRAM"
        HEAD_HYBRID "MG_HEAD_HYBRID"
        N_HEAD_TYPES "MG_N_HEAD_TYPES"
        ACT_RELU "MG_ACT_RELU"
        ACT_SILU "MG_ACT_SILU"
        N_ACTIVATIONS "MG_N_ACTIVATIONS"
        MG_OP_EMBED
        MG_OP_RMSNORM
        MG_OP_LINEAR
        MG_OP_ROPE
        MG_OP_ATTN
        MG_OP_GATE
        MG_OP_ADD
        MG_OP_XENT
        MG_OP_SLOTS
    const char* const mg_head_type_names[]
    const char* const mg_activation_names[]
    const char* const mg_op_names[]


cdef inline dict code_table(const char* const* names, int n):
    """{name: code} of a codes.h name table (entries without a name left out): each extension's
    Python-visible HEAD_TYPES, ACTIVATIONS and OP_CODES, built from the one definition."""
    return {names[i].decode("ascii"): i for i in range(n) if names[i] != NULL}


cdef inline int code_of(dict table, name, str what) except -1:
    """The code of `name` in a code_table; ValueError naming the choices for anything else."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r} (one of {', '.join(map(repr, table))})")
    return table[name]


cdef extern from "molecule.h" nogil:
    enum:
        MG_ALIGN
        MG_MAX_ADAPTERS
        MG_GRAD_SET_A
        MG_GRAD_SET_B
        MG_OUT_GRAD_SET

    ctypedef struct mg_linear:
        void* W
        void* dW
        int nout
        int nin
        int n_ad
        int rank
        void* A[MG_MAX_ADAPTERS]
        void* B[MG_MAX_ADAPTERS]
        void* dA[MG_MAX_ADAPTERS]
        void* dB[MG_MAX_ADAPTERS]
        double alpha[MG_MAX_ADAPTERS]
        int out_off[MG_MAX_ADAPTERS]
        int out_rows[MG_MAX_ADAPTERS]

    ctypedef struct mg_node:
        int op
        int layer
        int flags
        void* a
        void* b
        void* c
        void* out
        size_t out_bytes
        void* aux
        void* aux2
        void* ptrs
        void* work
        const mg_linear* lin
        Py_ssize_t n
        Py_ssize_t m
        Py_ssize_t k
        Py_ssize_t ld_in
        Py_ssize_t ld_out

    ctypedef struct mg_arena:
        char* block
        mg_node* nodes
        size_t node_cap
        size_t n_nodes
        size_t node_high_water
        char* vals
        char* grads
        size_t cap_bytes
        size_t used
        size_t high_water
        int overflowed
        int planning
        mg_node* last

    int mg_arena_init(mg_arena* ar, size_t value_bytes, size_t node_cap)
    int mg_arena_init_plan(mg_arena* ar, size_t scratch_bytes)
    void mg_arena_free(mg_arena* ar)
    void mg_arena_reset(mg_arena* ar)
    void* mg_arena_alloc(mg_arena* ar, size_t nbytes)
    mg_node* mg_arena_push(mg_arena* ar, int op)
    void mg_arena_zero_grads(mg_arena* ar)
    size_t mg_arena_round(size_t nbytes)
    void* mg_grad_of(const mg_arena* ar, const void* value)


cdef extern from "fastmath.h" nogil:
    float mg_expf(float x)


cdef extern from "elementwise.h" nogil:
    void mg_relu_gate_forward_f(float* out, const float* g, const float* u, Py_ssize_t n)
    void mg_relu_gate_forward_d(double* out, const double* g, const double* u, Py_ssize_t n)
    void mg_relu_gate_backward_f(float* dg, float* du, const float* dout, const float* g, const float* u, Py_ssize_t n)
    void mg_relu_gate_backward_d(double* dg, double* du, const double* dout, const double* g, const double* u, Py_ssize_t n)
    void mg_relu_gate_backward_set_f(float* dg, float* du, const float* dout, const float* g, const float* u, Py_ssize_t n)
    void mg_relu_gate_backward_set_d(double* dg, double* du, const double* dout, const double* g, const double* u, Py_ssize_t n)
    void mg_rope_row_f(float* y, const float* x, const float* c, const float* s, Py_ssize_t np)
    void mg_rope_row_d(double* y, const double* x, const double* c, const double* s, Py_ssize_t np)
    void mg_rope_row_back_f(float* dx, const float* dy, const float* c, const float* s, Py_ssize_t np)
    void mg_rope_row_back_d(double* dx, const double* dy, const double* c, const double* s, Py_ssize_t np)


cdef extern from "rows.h" nogil:
    float mg_row_max_f(const float* x, Py_ssize_t n)
    double mg_row_max_d(const double* x, Py_ssize_t n)
    float mg_row_sum_f(const float* x, const float* unused, Py_ssize_t n)
    double mg_row_exp_sum_d(double* x, Py_ssize_t n, double shift)
    float mg_row_dot_f(const float* a, const float* b, Py_ssize_t n)
    double mg_row_dot_d(const double* a, const double* b, Py_ssize_t n)


cdef extern from "gemm.h" nogil:
    enum:
        MG_GEMM_NT
        MG_GEMM_NN
        MG_GEMM_TN
    int mg_gemm_f(int form, float* C, Py_ssize_t ldc, const float* A, Py_ssize_t lda, const float* B,
                  Py_ssize_t ldb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, float alpha, int accumulate)
    int mg_gemm_d(int form, double* C, Py_ssize_t ldc, const double* A, Py_ssize_t lda, const double* B,
                  Py_ssize_t ldb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, double alpha, int accumulate)
    # a weight packed once (the decoder's products): see gemm.h
    enum:
        MG_PACKED_PW_F
        MG_PACKED_PW_D
    ctypedef unsigned short mg_bf16
    mg_bf16 mg_bf16_round(float x)
    size_t mg_gemm_packed_elems(Py_ssize_t N, Py_ssize_t K, Py_ssize_t PW)
    void mg_gemm_pack_nt_f(float* P, const float* B, Py_ssize_t ldb, Py_ssize_t N, Py_ssize_t K)
    void mg_gemm_pack_nt_d(double* P, const double* B, Py_ssize_t ldb, Py_ssize_t N, Py_ssize_t K)
    void mg_gemm_pack_nt_bf16(mg_bf16* P, const float* B, Py_ssize_t ldb, Py_ssize_t N, Py_ssize_t K)
    void mg_gemm_packed_f(int avx2, float* C, Py_ssize_t ldc, const float* A, Py_ssize_t lda, const float* P,
                          Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, Py_ssize_t p0, Py_ssize_t p1)
    void mg_gemm_packed_d(int avx2, double* C, Py_ssize_t ldc, const double* A, Py_ssize_t lda, const double* P,
                          Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, Py_ssize_t p0, Py_ssize_t p1)
    void mg_gemm_packed_bf16(int avx2, float* C, Py_ssize_t ldc, const float* A, Py_ssize_t lda, const mg_bf16* P,
                             Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, Py_ssize_t p0, Py_ssize_t p1)


cdef extern from "attention.h" nogil:
    size_t mg_tri_scratch(Py_ssize_t n, Py_ssize_t d)
    void mg_row_exp_f(float* x, Py_ssize_t n, float shift)
    void mg_tri_force_portable(int on)
    int mg_tri_use_avx2()
    int mg_simd_level()
    int mg_simd_supported()
    void mg_simd_force(int level)
    double mg_fma_probe(int wide, int trials)
    float mg_read_floats(const float* a, Py_ssize_t n)
    void mg_tri_nt_f(float* S, Py_ssize_t lds, const float* A, Py_ssize_t lda, const float* B, Py_ssize_t ldb,
                     Py_ssize_t n, Py_ssize_t d, float alpha, float* scratch)
    void mg_tri_nt_d(double* S, Py_ssize_t lds, const double* A, Py_ssize_t lda, const double* B, Py_ssize_t ldb,
                     Py_ssize_t n, Py_ssize_t d, double alpha, double* scratch)
    void mg_tri_nn_f(float* Y, Py_ssize_t ldy, const float* P, Py_ssize_t ldp, const float* B, Py_ssize_t ldb,
                     Py_ssize_t n, Py_ssize_t d, float alpha, int accumulate, float* scratch)
    void mg_tri_nn_d(double* Y, Py_ssize_t ldy, const double* P, Py_ssize_t ldp, const double* B, Py_ssize_t ldb,
                     Py_ssize_t n, Py_ssize_t d, double alpha, int accumulate, double* scratch)
    void mg_tri_tn_f(float* Y, Py_ssize_t ldy, const float* P, Py_ssize_t ldp, const float* B, Py_ssize_t ldb,
                     Py_ssize_t n, Py_ssize_t d, float alpha, float* scratch)
    void mg_tri_tn_d(double* Y, Py_ssize_t ldy, const double* P, Py_ssize_t ldp, const double* B, Py_ssize_t ldb,
                     Py_ssize_t n, Py_ssize_t d, double alpha, double* scratch)
    void mg_causal_softmax_f(float* A, Py_ssize_t lda, const float* S, Py_ssize_t lds, const float* P, Py_ssize_t ldp,
                             Py_ssize_t t0, Py_ssize_t t1, float a, int kind, float* buf)
    void mg_causal_softmax_d(double* A, Py_ssize_t lda, const double* S, Py_ssize_t lds, const double* P,
                             Py_ssize_t ldp, Py_ssize_t t0, Py_ssize_t t1, double a, int kind, double* buf)
    void mg_tri_nt_rows_f(float* S, Py_ssize_t lds, const float* A, Py_ssize_t lda, const float* BT, Py_ssize_t ldbt,
                          Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t d, float alpha)
    void mg_tri_nt_rows_d(double* S, Py_ssize_t lds, const double* A, Py_ssize_t lda, const double* BT,
                          Py_ssize_t ldbt, Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t d, double alpha)
    void mg_tri_nn_rows_f(float* Y, Py_ssize_t ldy, const float* P, Py_ssize_t ldp, const float* Bp, Py_ssize_t ldbp,
                          Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t d, float alpha, int accumulate)
    void mg_tri_nn_rows_d(double* Y, Py_ssize_t ldy, const double* P, Py_ssize_t ldp, const double* Bp,
                          Py_ssize_t ldbp, Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t d, double alpha, int accumulate)
    void mg_tri_nn_heads_f(float* Y, Py_ssize_t ldyh, const float* P, Py_ssize_t ldph, const float* Bp,
                           Py_ssize_t ldbh, Py_ssize_t ldbp, Py_ssize_t H, Py_ssize_t t, Py_ssize_t d, float alpha,
                           int accumulate)
    void mg_tri_nn_heads_d(double* Y, Py_ssize_t ldyh, const double* P, Py_ssize_t ldph, const double* Bp,
                           Py_ssize_t ldbh, Py_ssize_t ldbp, Py_ssize_t H, Py_ssize_t t, Py_ssize_t d, double alpha,
                           int accumulate)
    double mg_causal_softmax_backward_f(float* dA, const float* A, Py_ssize_t n, const float* S, const float* P,
                                        float* dP, Py_ssize_t ldp, float a, int kind)
    double mg_causal_softmax_backward_d(double* dA, const double* A, Py_ssize_t n, const double* S, const double* P,
                                        double* dP, Py_ssize_t ldp, double a, int kind)
