# _core.pyx: the native training core: kernels, the arena-allocated tape, forward, backward, Adam.
#
# What it is: `Engine`, which owns one arena (csrc/arena.c) and a C description of the model
# (`NetC`: raw pointers to every parameter, its gradient and its adapters). A step is
#   record   - walk the model once, pushing one tape node per op and carving every activation
#              out of the arena (no math; an allocation past capacity stops here, before any
#              state changes, and the caller raises ArenaOverflowError);
#   forward  - run the nodes in order;
#   backward - zero the gradient half of the arena, run the nodes in reverse (creation order is
#              already topological), accumulate parameter gradients.
# All three run without the GIL, and `run` drives several engines (one per part of the batch, each
# with its own sequences, arena and gradient buffers) at once on the worker threads of csrc/pool.c.
# What it is not: policy. Validation, packing a batch, sizes,
# parameter allocation and the optimizer schedule live in model.py.

from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset, memcpy
from posix.time cimport clock_gettime, nanosleep, timespec

cdef extern from "<time.h>" nogil:
    enum: CLOCK_THREAD_CPUTIME_ID

cdef extern from "pool.h" nogil:
    ctypedef void (*mg_pool_fn)(void* ctx, int part) noexcept nogil
    int mg_pool_run_on(mg_pool_fn fn, void* ctx, int n, int n_threads)
    int mg_pool_threads()
    enum: MG_POOL_MAX_THREADS

from ._molecule cimport *

cimport numpy as cnp
cnp.import_array()

include "_kernels.pxi"


# ---------------------------------------------------------------------------------------------
# the model, as C pointers (set by Engine.bind_* from numpy arrays the Python Model owns)

ctypedef struct LayerC:
    mg_linear wqkv      # wq, wk, wv stacked (3C, C): one gemm for q, k and v
    mg_linear wo
    mg_linear fc_gv     # fc_g, fc_v stacked (2F, C)
    mg_linear fc2
    mg_linear* pat      # (H,) pattern linears, used by rrpram/hybrid heads
    void** alpha        # (H,) the 1x1 hybrid alpha parameter, NULL for other heads
    void** dalpha       # (H,) its gradient, NULL when frozen
    double* mix         # (H,) sigmoid(alpha) of this forward
    double* dalpha_acc  # (H,) d loss / d alpha accumulated by backward

ctypedef struct NetC:
    int L, C, H, d, T, V, F, act, K, r, n_pattern
    int profile         # accumulate wall time per op code into op_seconds
    double op_seconds[2 * MG_OP_SLOTS]   # forward, then backward, by op code
    int* head_type      # (H,)
    void* wte
    void* dwte
    void* wpe
    void* dwpe
    mg_linear lm_head
    LayerC* layers
    void* cos_t         # (T, H*d/2): RoPE's angles of each position, repeated once per head
    void* sin_t

# one batch, packed: sequence s holds positions off[s] .. off[s] + n[s]
ctypedef struct StepC:
    Py_ssize_t N
    Py_ssize_t n_seq
    const int* ids
    const int* pos
    const int* targets
    const double* weights
    const int* off
    const int* n
    const Py_ssize_t* sq_off
    Py_ssize_t SS
    double* losses
    void* logits        # set by record: (N, V) output of the lm_head node


# ---------------------------------------------------------------------------------------------
# record: push nodes and carve buffers. The one description of a step's sizes: `plan` runs it
# on a planning arena to size the real one.

cdef inline void* take(mg_arena* ar, size_t nbytes, bint* ok) noexcept nogil:
    cdef void* p = mg_arena_alloc(ar, nbytes)
    if p == NULL:
        ok[0] = False
    return p


cdef floating* rec_linear(mg_arena* ar, const mg_linear* lin, floating* X, Py_ssize_t ldx,
                          Py_ssize_t N, bint* ok) noexcept nogil:
    cdef floating* Y = <floating*>take(ar, N * lin.nout * sizeof(floating), ok)
    cdef floating* U = <floating*>take(ar, lin.n_ad * N * lin.rank * sizeof(floating), ok)
    cdef mg_node* node = mg_arena_push(ar, MG_OP_LINEAR)
    if not ok[0] or node == NULL:
        ok[0] = False
        return NULL
    node.a = X
    node.out = Y
    node.out_bytes = N * lin.nout * sizeof(floating)
    node.aux = U
    node.lin = lin
    node.n = N
    node.ld_in = ldx
    node.ld_out = lin.nout
    return Y


cdef floating* rec_rmsnorm(mg_arena* ar, floating* x, Py_ssize_t N, Py_ssize_t C, bint* ok) noexcept nogil:
    cdef floating* y = <floating*>take(ar, N * C * sizeof(floating), ok)
    cdef floating* rstd = <floating*>take(ar, N * sizeof(floating), ok)
    cdef mg_node* node = mg_arena_push(ar, MG_OP_RMSNORM)
    if not ok[0] or node == NULL:
        ok[0] = False
        return NULL
    node.a = x
    node.out = y
    node.out_bytes = N * C * sizeof(floating)
    node.aux = rstd
    node.n = N
    node.m = C
    return y


cdef floating* rec_elementwise(mg_arena* ar, int op, floating* a, floating* b, Py_ssize_t n,
                               bint* ok) noexcept nogil:
    cdef floating* out = <floating*>take(ar, n * sizeof(floating), ok)
    cdef mg_node* node = mg_arena_push(ar, op)
    if not ok[0] or node == NULL:
        ok[0] = False
        return NULL
    node.a = a
    node.b = b
    node.out = out
    node.out_bytes = n * sizeof(floating)
    node.n = n
    return out


cdef floating* rec_rope(mg_arena* ar, floating* x, Py_ssize_t ldx, Py_ssize_t N, Py_ssize_t C,
                        bint* ok) noexcept nogil:
    cdef floating* y = <floating*>take(ar, N * C * sizeof(floating), ok)
    cdef mg_node* node = mg_arena_push(ar, MG_OP_ROPE)
    if not ok[0] or node == NULL:
        ok[0] = False
        return NULL
    node.a = x
    node.ld_in = ldx
    node.out = y
    node.out_bytes = N * C * sizeof(floating)
    node.n = N
    return y


cdef inline mg_node* last(mg_arena* ar) noexcept nogil:
    """The node pushed last."""
    return ar.last


cdef inline void sole_consumer(mg_node* producer, mg_node* consumer, int flag) noexcept nogil:
    """consumer is the only reader of producer's output and writes its whole gradient (= for the
    input named by flag), so backward skips zeroing that gradient."""
    producer.flags |= MG_OUT_GRAD_SET
    consumer.flags |= flag


cdef int record(NetC* net, mg_arena* ar, StepC* st, bint with_loss, floating* tag) noexcept nogil:
    """Build the tape of one forward pass; 0 on success, -1 when the arena is too small."""
    cdef bint ok = True
    cdef Py_ssize_t N = st.N, C = net.C, F = net.F, l, h
    cdef LayerC* L
    cdef mg_node* node
    cdef mg_node* prod
    cdef floating* x
    cdef floating* hn
    cdef floating* qkv
    cdef floating* q
    cdef floating* k
    cdef floating* v
    cdef floating* y
    cdef floating* o
    cdef floating* g
    cdef floating* a
    cdef floating* w
    cdef floating** P
    cdef floating** dP
    mg_arena_reset(ar)

    x = <floating*>take(ar, N * C * sizeof(floating), &ok)
    node = mg_arena_push(ar, MG_OP_EMBED)
    if not ok or node == NULL:
        return -1
    node.a = <void*>st.ids
    node.b = <void*>st.pos
    node.out = x
    node.out_bytes = N * C * sizeof(floating)
    node.n = N
    node.m = C

    for l in range(net.L):
        L = &net.layers[l]
        # attention block
        hn = rec_rmsnorm(ar, x, N, C, &ok)
        if not ok: return -1
        qkv = rec_linear(ar, &L.wqkv, hn, C, N, &ok)          # (N, 3C): q | k | v
        if not ok: return -1
        q = rec_rope(ar, qkv, 3 * C, N, C, &ok)
        k = rec_rope(ar, qkv + C, 3 * C, N, C, &ok)
        v = qkv + 2 * C                                        # read in place, row stride 3C
        P = <floating**>take(ar, net.H * sizeof(void*), &ok)
        dP = <floating**>take(ar, net.H * sizeof(void*), &ok)
        if not ok: return -1
        for h in range(net.H):
            P[h] = NULL
            dP[h] = NULL
            if net.head_type[h] != HEAD_CONTENT:
                P[h] = rec_linear(ar, &L.pat[h], hn + h * net.d, C, N, &ok)
                if not ok: return -1
                dP[h] = <floating*>mg_grad_of(ar, P[h])
        y = <floating*>take(ar, N * C * sizeof(floating), &ok)
        a = <floating*>take(ar, net.H * st.SS * sizeof(floating), &ok)       # weights
        o = <floating*>take(ar, net.H * st.SS * sizeof(floating), &ok)       # content logits
        w = <floating*>take(ar, attention_work(net.T, net.d) * sizeof(floating), &ok)  # kernels' scratch
        node = mg_arena_push(ar, MG_OP_ATTN)
        if not ok or node == NULL:
            return -1
        node.a = q
        node.b = k
        node.c = v
        node.ld_in = 3 * C   # v's row stride
        node.out = y
        node.out_bytes = N * C * sizeof(floating)
        node.aux = a
        node.aux2 = o
        node.ptrs = P
        node.work = w
        node.layer = <int>l
        node.n = N
        # Single-consumer outputs: the consumer writes their whole gradient, so backward skips
        # zeroing it (MG_OUT_GRAD_SET): y -> wo, wo -> add (as b), hn -> fc_gv, fc_gv -> gate,
        # gate -> fc2, fc2 -> add (as b), the final hn -> lm_head, logits -> cross-entropy.
        prod = node
        o = rec_linear(ar, &L.wo, y, C, N, &ok)
        if not ok: return -1
        sole_consumer(prod, last(ar), MG_GRAD_SET_A)
        prod = last(ar)
        x = rec_elementwise(ar, MG_OP_ADD, x, o, N * C, &ok)
        if not ok: return -1
        sole_consumer(prod, last(ar), MG_GRAD_SET_B)
        # MLP block
        hn = rec_rmsnorm(ar, x, N, C, &ok)
        if not ok: return -1
        prod = last(ar)
        g = rec_linear(ar, &L.fc_gv, hn, C, N, &ok)           # (N, 2F): gate | value
        if not ok: return -1
        sole_consumer(prod, last(ar), MG_GRAD_SET_A)
        prod = last(ar)
        a = <floating*>take(ar, N * F * sizeof(floating), &ok)
        node = mg_arena_push(ar, MG_OP_GATE)
        if not ok or node == NULL:
            return -1
        sole_consumer(prod, node, MG_GRAD_SET_A)   # the gate writes dg and du: both halves
        node.a = g
        node.b = g + F
        node.ld_in = 2 * F
        node.out = a
        node.out_bytes = N * F * sizeof(floating)
        node.n = N
        node.m = F
        prod = node
        o = rec_linear(ar, &L.fc2, a, F, N, &ok)
        if not ok: return -1
        sole_consumer(prod, last(ar), MG_GRAD_SET_A)
        prod = last(ar)
        x = rec_elementwise(ar, MG_OP_ADD, x, o, N * C, &ok)
        if not ok: return -1
        sole_consumer(prod, last(ar), MG_GRAD_SET_B)

    hn = rec_rmsnorm(ar, x, N, C, &ok)
    if not ok: return -1
    prod = last(ar)
    st.logits = rec_linear(ar, &net.lm_head, hn, C, N, &ok)
    if not ok: return -1
    sole_consumer(prod, last(ar), MG_GRAD_SET_A)
    if with_loss:
        prod = last(ar)
        node = mg_arena_push(ar, MG_OP_XENT)
        if node == NULL:
            return -1
        sole_consumer(prod, node, MG_GRAD_SET_A)
        node.a = st.logits
        node.n = N
        node.m = net.V
    return 0


cdef int plan(NetC* net, Py_ssize_t N, Py_ssize_t SS, bint is_double, size_t* value_bytes,
              size_t* n_nodes) noexcept nogil:
    """The exact bytes and nodes `record` takes for N positions whose squared sequence lengths
    sum to SS (with the loss node: the most a step takes): record itself, run on a planning
    arena (csrc/molecule.h), so there is no second description of the tape's sizes to keep in
    step with it. -1: the plan does not fit a size_t, or no memory for the planning arena."""
    cdef mg_arena ar
    cdef StepC st
    cdef int status
    memset(&st, 0, sizeof(StepC))
    st.N = N
    st.SS = SS
    if mg_arena_init_plan(&ar, net.H * sizeof(void*)) != 0:  # scratch for one pointer table
        return -1
    if is_double:
        status = record(net, &ar, &st, True, <double*>NULL)
    else:
        status = record(net, &ar, &st, True, <float*>NULL)
    value_bytes[0] = ar.used
    n_nodes[0] = ar.n_nodes
    if ar.overflowed:
        status = -1
    mg_arena_free(&ar)
    return status


cdef object plan_checked(NetC* net, Py_ssize_t N, Py_ssize_t SS, bint is_double):
    """plan() as (value_bytes, nodes); OverflowError when the sizes are too large for record's
    arithmetic (a crude product of every size, checked in Python ints first)."""
    cdef size_t nbytes = 0, nodes = 0
    cdef int status, l, h, k
    cdef const mg_linear* lins[4]
    widest = net.lm_head.n_ad   # Python ints from here: the check itself cannot overflow
    for l in range(net.L):
        lins[0], lins[1], lins[2], lins[3] = &net.layers[l].wqkv, &net.layers[l].wo, &net.layers[l].fc_gv, &net.layers[l].fc2
        for k in range(4):
            widest = max(widest, lins[k].n_ad)
        for h in range(net.H):
            widest = max(widest, net.layers[l].pat[h].n_ad)
    n, ss, L, H, T, C, F, V, r = N, SS, net.L, net.H, net.T, net.C, net.F, net.V, net.r
    crude = ((n + 1) * (V + 4 * F + 4 * C + (H + 3) * T + widest * (r + 1) + 64) + (2 * H + 1) * ss) * 8 * (L + 2) * (H + 2)
    if n < 0 or ss < 0 or crude >= 2 ** 62:
        raise OverflowError(f"a step of {N} positions is too large to plan an arena for")
    with nogil:
        status = plan(net, N, SS, is_double, &nbytes, &nodes)
    if status != 0:
        raise MemoryError("cannot plan the training arena")
    return nbytes, nodes


# ---------------------------------------------------------------------------------------------
# forward and backward over the tape

cdef inline double now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)  # CPU time of this thread: robust to descheduling
    return ts.tv_sec + 1e-9 * ts.tv_nsec


cdef void run_forward(NetC* net, mg_arena* ar, StepC* st, floating* tag) noexcept nogil:
    cdef size_t i
    cdef mg_node* node
    cdef Py_ssize_t h
    cdef LayerC* L
    cdef double t0 = 0
    for i in range(ar.n_nodes):
        node = &ar.nodes[i]
        if net.profile:
            t0 = now()
        if node.op == MG_OP_EMBED:
            embed_forward(<floating*>node.out, <floating*>net.wte, <floating*>net.wpe,
                          <int*>node.a, <int*>node.b, node.n, node.m)
        elif node.op == MG_OP_RMSNORM:
            rmsnorm_forward(<floating*>node.out, <floating*>node.aux, <floating*>node.a, node.n, node.m)
        elif node.op == MG_OP_LINEAR:
            linear_forward(<floating*>node.out, <floating*>node.aux, <floating*>node.a, node.lin,
                           node.n, node.ld_in, node.ld_out)
        elif node.op == MG_OP_ROPE:
            rope_forward(<floating*>node.out, <floating*>node.a, st.pos, <floating*>net.cos_t,
                         <floating*>net.sin_t, st.N, net.H, net.d, node.ld_in)
        elif node.op == MG_OP_ATTN:
            L = &net.layers[node.layer]
            for h in range(net.H):
                L.mix[h] = 0
                if net.head_type[h] == HEAD_HYBRID:
                    L.mix[h] = sigmoid((<floating*>L.alpha[h])[0])
            attention_forward(<floating*>node.out, <floating*>node.aux, <floating*>node.aux2,
                              <floating*>node.a, <floating*>node.b, <floating*>node.c,
                              <floating**>node.ptrs, net.head_type, L.mix, st.off, st.n, st.sq_off,
                              st.SS, st.n_seq, net.H, net.d, net.T, node.ld_in, <floating*>node.work)
        elif node.op == MG_OP_GATE:
            gate_forward(<floating*>node.out, <floating*>node.a, <floating*>node.b, node.n, node.m,
                         node.ld_in, net.act)
        elif node.op == MG_OP_ADD:
            add_forward(<floating*>node.out, <floating*>node.a, <floating*>node.b, node.n)
        elif node.op == MG_OP_XENT:
            xent_forward(st.losses, <floating*>node.a, st.targets, node.n, node.m)
        if net.profile:
            net.op_seconds[node.op] += now() - t0


cdef void run_backward(NetC* net, mg_arena* ar, StepC* st, floating* tag) noexcept nogil:
    cdef Py_ssize_t i, h, l
    cdef mg_node* node
    cdef LayerC* L
    cdef double t0 = now()
    # Zero the gradients that backward accumulates into: node outputs only. Caches (attention
    # weights, U, rstd) have gradient slots too, used as scratch that kernels overwrite.
    for i in range(<Py_ssize_t>ar.n_nodes):
        node = &ar.nodes[i]
        if node.out_bytes and not (node.flags & MG_OUT_GRAD_SET):
            memset(mg_grad_of(ar, node.out), 0, node.out_bytes)
    if net.profile:
        net.op_seconds[MG_OP_SLOTS] += now() - t0   # slot 0 of backward: zeroing the gradient arena
    for l in range(net.L):
        for h in range(net.H):
            net.layers[l].dalpha_acc[h] = 0
    for i in range(<Py_ssize_t>ar.n_nodes - 1, -1, -1):
        node = &ar.nodes[i]
        if net.profile:
            t0 = now()
        if node.op == MG_OP_XENT:
            xent_backward(<floating*>mg_grad_of(ar, node.a), <floating*>node.a, st.targets,
                          st.weights, node.n, node.m, node.flags & MG_GRAD_SET_A)
        elif node.op == MG_OP_ADD:
            add_backward(<floating*>mg_grad_of(ar, node.a), <floating*>mg_grad_of(ar, node.b),
                         <floating*>mg_grad_of(ar, node.out), node.n, node.flags & MG_GRAD_SET_B)
        elif node.op == MG_OP_GATE:
            gate_backward(<floating*>mg_grad_of(ar, node.a), <floating*>mg_grad_of(ar, node.b),
                          <floating*>mg_grad_of(ar, node.out), <floating*>node.a, <floating*>node.b,
                          node.n, node.m, node.ld_in, net.act,
                          node.flags & MG_GRAD_SET_A)
        elif node.op == MG_OP_LINEAR:
            linear_backward(<floating*>mg_grad_of(ar, node.a), <floating*>mg_grad_of(ar, node.aux),
                            <floating*>mg_grad_of(ar, node.out), <floating*>node.a,
                            <floating*>node.aux, node.lin, node.n, node.ld_in, node.ld_out,
                            node.flags & MG_GRAD_SET_A, True)
        elif node.op == MG_OP_ATTN:
            L = &net.layers[node.layer]
            attention_backward(<floating*>mg_grad_of(ar, node.a), <floating*>mg_grad_of(ar, node.b),
                               <floating*>mg_grad_of(ar, node.c),
                               <floating**>(<char*>node.ptrs + mg_arena_round(net.H * sizeof(void*))),
                               L.dalpha_acc, <floating*>mg_grad_of(ar, node.aux),
                               <floating*>mg_grad_of(ar, node.out), <floating*>node.aux,
                               <floating*>node.aux2, <floating*>node.a, <floating*>node.b,
                               <floating*>node.c, <floating**>node.ptrs, net.head_type, L.mix,
                               st.off, st.n, st.sq_off, st.SS, st.n_seq, net.H, net.d, net.T,
                               node.ld_in, <floating*>node.work)
        elif node.op == MG_OP_ROPE:
            rope_backward(<floating*>mg_grad_of(ar, node.a), <floating*>mg_grad_of(ar, node.out),
                          st.pos, <floating*>net.cos_t, <floating*>net.sin_t, st.N, net.H, net.d,
                          node.ld_in)
        elif node.op == MG_OP_RMSNORM:
            rmsnorm_backward(<floating*>mg_grad_of(ar, node.a), <floating*>mg_grad_of(ar, node.out),
                             <floating*>node.out, <floating*>node.aux, node.n, node.m)
        elif node.op == MG_OP_EMBED:
            embed_backward(<floating*>net.dwte, <floating*>net.dwpe, <floating*>mg_grad_of(ar, node.out),
                           <int*>node.a, <int*>node.b, node.n, node.m)
        if net.profile:
            net.op_seconds[MG_OP_SLOTS + node.op] += now() - t0
    for l in range(net.L):
        L = &net.layers[l]
        for h in range(net.H):
            if L.dalpha[h] != NULL:  # written, like every linear's parameter gradients
                (<floating*>L.dalpha[h])[0] = <floating>L.dalpha_acc[h]


# ---------------------------------------------------------------------------------------------
# Engine: the Python handle

MAX_ADAPTERS = MG_MAX_ADAPTERS  # adapters one linear can carry (trainable modules x fused parts)
# the codes of csrc/codes.h by name (the same tables as _decode's: one definition)
HEAD_TYPES = code_table(mg_head_type_names, N_HEAD_TYPES)
ACTIVATIONS = code_table(mg_activation_names, N_ACTIVATIONS)
OP_CODES = code_table(mg_op_names, MG_OP_SLOTS)


cdef inline void* data_ptr(object arr):
    # ndarrays through the C API (a step passes a few dozen, and __array_interface__ builds a
    # dict each time); anything else exporting the interface as before
    if cnp.PyArray_Check(arr):
        return cnp.PyArray_DATA(<cnp.ndarray>arr)
    return <void*><size_t>arr.__array_interface__["data"][0]


cdef class Engine:
    """The native half of a Model: its C description (pointers into the Model's arrays) and the
    arena that holds one step's tape. Not thread-safe: the Model serializes access."""
    cdef NetC net
    cdef mg_arena ar
    cdef readonly bint is_double
    cdef readonly size_t itemsize
    cdef StepC st
    cdef bint have_tape
    cdef bint tape_has_loss
    cdef object keep         # arrays whose memory the pointers reference
    cdef object step_arrays  # arrays backing the current StepC
    cdef void** zero_ptrs    # parameter-gradient buffers this engine zeroes before its backward
    cdef size_t* zero_bytes
    cdef Py_ssize_t n_zero
    cdef object zero_arrays

    def __cinit__(self, int n_layer, int n_embd, int n_head, int block_size, int vocab_size,
                  head_types, str activation, bint is_double, int rank):
        cdef int l, h
        memset(&self.net, 0, sizeof(NetC))
        memset(&self.ar, 0, sizeof(mg_arena))
        self.is_double = is_double
        self.itemsize = sizeof(double) if is_double else sizeof(float)
        self.net.L = n_layer
        self.net.C = n_embd
        self.net.H = n_head
        self.net.d = n_embd // n_head
        self.net.T = block_size
        self.net.V = vocab_size
        self.net.F = 4 * n_embd
        self.net.r = rank
        self.net.act = code_of(ACTIVATIONS, activation, "activation")
        self.net.head_type = <int*>calloc(n_head, sizeof(int))
        self.net.layers = <LayerC*>calloc(n_layer, sizeof(LayerC))
        if self.net.head_type == NULL or self.net.layers == NULL:
            raise MemoryError()
        for h in range(n_head):
            self.net.head_type[h] = code_of(HEAD_TYPES, head_types[h], "head type")
            if self.net.head_type[h] != HEAD_CONTENT:
                self.net.n_pattern += 1
        for l in range(n_layer):
            L = &self.net.layers[l]
            L.pat = <mg_linear*>calloc(n_head, sizeof(mg_linear))
            L.alpha = <void**>calloc(n_head, sizeof(void*))
            L.dalpha = <void**>calloc(n_head, sizeof(void*))
            L.mix = <double*>calloc(n_head, sizeof(double))
            L.dalpha_acc = <double*>calloc(n_head, sizeof(double))
            if L.pat == NULL or L.alpha == NULL or L.dalpha == NULL or L.mix == NULL or L.dalpha_acc == NULL:
                raise MemoryError()
        self.keep = {}

    def __dealloc__(self):
        cdef int l
        free(self.zero_ptrs)
        free(self.zero_bytes)
        mg_arena_free(&self.ar)
        if self.net.layers != NULL:
            for l in range(self.net.L):
                free(self.net.layers[l].pat)
                free(self.net.layers[l].alpha)
                free(self.net.layers[l].dalpha)
                free(self.net.layers[l].mix)
                free(self.net.layers[l].dalpha_acc)
            free(self.net.layers)
        free(self.net.head_type)

    # ---- binding parameters (arrays are validated by the caller: C-contiguous, right dtype)

    cdef mg_linear* _slot(self, int layer, str name, int head) except NULL:
        if name == "lm_head":
            return &self.net.lm_head
        if not 0 <= layer < self.net.L:
            raise IndexError(f"layer {layer} out of range")
        L = &self.net.layers[layer]
        if name == "wqkv": return &L.wqkv
        if name == "wo": return &L.wo
        if name == "fc_gv": return &L.fc_gv
        if name == "fc2": return &L.fc2
        if name == "w_pattern" and 0 <= head < self.net.H:
            return &L.pat[head]
        raise KeyError(f"no linear slot {name!r} (layer {layer}, head {head})")

    def bind_linear(self, key, int layer, str name, int head, W, dW, adapters):
        """Point a linear slot at W (nout, nin) and its grad (None = frozen); adapters is a list
        of (A, B, dA or None, dB or None, alpha, first output row of its part)."""
        cdef mg_linear* lin = self._slot(layer, name, head)
        cdef int k
        if len(adapters) > MG_MAX_ADAPTERS:
            raise ValueError(f"a linear carries at most {MG_MAX_ADAPTERS} adapters (trainable delta modules "
                             f"x fused parts), got {len(adapters)}; freeze older modules to fold them")
        lin.W = data_ptr(W)
        lin.dW = data_ptr(dW) if dW is not None else NULL
        lin.nout = W.shape[0]
        lin.nin = W.shape[1]
        lin.n_ad = len(adapters)
        lin.rank = self.net.r
        for k, (A, B, dA, dB, alpha, row0) in enumerate(adapters):
            lin.A[k] = data_ptr(A)
            lin.B[k] = data_ptr(B)
            lin.dA[k] = data_ptr(dA) if dA is not None else NULL
            lin.dB[k] = data_ptr(dB) if dB is not None else NULL
            lin.alpha[k] = alpha
            lin.out_off[k] = row0
            lin.out_rows[k] = A.shape[0]
        self.keep[key] = (W, dW, adapters)

    def bind_embeddings(self, wte, dwte, wpe, dwpe, cos_t, sin_t):
        """cos_t, sin_t (T, d/2): RoPE's tables (kept here repeated once per head)."""
        cos_t = rope_tables_per_head(cos_t, self.net.H)
        sin_t = rope_tables_per_head(sin_t, self.net.H)
        self.net.wte = data_ptr(wte)
        self.net.dwte = data_ptr(dwte) if dwte is not None else NULL
        self.net.wpe = data_ptr(wpe)
        self.net.dwpe = data_ptr(dwpe) if dwpe is not None else NULL
        self.net.cos_t = data_ptr(cos_t)
        self.net.sin_t = data_ptr(sin_t)
        self.net.V = wte.shape[0]
        self.keep["embeddings"] = (wte, dwte, wpe, dwpe, cos_t, sin_t)

    def bind_alpha(self, int layer, int head, alpha, dalpha):
        L = &self.net.layers[layer]
        L.alpha[head] = data_ptr(alpha)
        L.dalpha[head] = data_ptr(dalpha) if dalpha is not None else NULL
        self.keep[("alpha", layer, head)] = (alpha, dalpha)

    def bind_zeroed(self, arrays):
        """The parameter-gradient buffers (C-contiguous) this engine's backward accumulates into
        (the embeddings' scatter-adds; every linear's dW, dA, dB and each hybrid alpha's gradient
        are written whole by their one node, first thing): each step with backward zeroes them
        first, on the engine's own thread."""
        cdef Py_ssize_t i, n = len(arrays)
        cdef void** ptrs = <void**>calloc(max(n, 1), sizeof(void*))
        cdef size_t* nbytes = <size_t*>calloc(max(n, 1), sizeof(size_t))
        if ptrs == NULL or nbytes == NULL:
            free(ptrs)
            free(nbytes)
            raise MemoryError()
        for i in range(n):
            ptrs[i] = data_ptr(arrays[i])
            nbytes[i] = arrays[i].nbytes
        free(self.zero_ptrs)
        free(self.zero_bytes)
        self.zero_ptrs, self.zero_bytes, self.n_zero = ptrs, nbytes, n
        self.zero_arrays = list(arrays)

    @property
    def profile(self):
        """CPU seconds (of the thread running it) per op since profiling was switched on: {"forward.linear": s, ...}."""
        out = {"backward.zero_grads": self.net.op_seconds[MG_OP_SLOTS]}
        for name, code in OP_CODES.items():
            out["forward." + name] = self.net.op_seconds[code]
            out["backward." + name] = self.net.op_seconds[MG_OP_SLOTS + code]
        return out

    @profile.setter
    def profile(self, bint on):
        self.net.profile = on
        memset(self.net.op_seconds, 0, sizeof(self.net.op_seconds))

    # ---- arena

    def plan(self, Py_ssize_t N, Py_ssize_t SS):
        """(value_bytes, nodes) one step over N positions with sum of squared lengths SS takes
        (record's own sizes, see plan)."""
        return plan_checked(&self.net, N, SS, self.is_double)

    cdef void _shape_only(self, int modules):
        """Give every linear slot its shapes and `modules` delta modules on each of its parts,
        bound to no array: enough for plan (which reads only shapes), nothing else."""
        cdef NetC* net = &self.net
        cdef int l, h
        cdef LayerC* L
        _shape_linear(&net.lm_head, net.V, net.C, modules, net.r)
        for l in range(net.L):
            L = &net.layers[l]
            _shape_linear(&L.wqkv, 3 * net.C, net.C, 3 * modules, net.r)
            _shape_linear(&L.wo, net.C, net.C, modules, net.r)
            _shape_linear(&L.fc_gv, 2 * net.F, net.C, 2 * modules, net.r)
            _shape_linear(&L.fc2, net.C, net.F, modules, net.r)
            for h in range(net.H):
                if net.head_type[h] != HEAD_CONTENT:
                    _shape_linear(&L.pat[h], net.T, net.d, modules, net.r)

    def allocate(self, size_t value_bytes, size_t node_cap):
        """(Re)allocate the arena; the previous tape is discarded."""
        mg_arena_free(&self.ar)
        self.have_tape = False
        if mg_arena_init(&self.ar, value_bytes, node_cap) != 0:
            raise MemoryError(f"cannot allocate a training arena of {2 * value_bytes} bytes")

    @property
    def capacity(self):
        """(value bytes, nodes) the arena holds; gradients take as much again."""
        return self.ar.cap_bytes, self.ar.node_cap

    @property
    def high_water(self):
        """(value bytes, nodes): the most any step has used since allocation."""
        return self.ar.high_water, self.ar.node_high_water

    @property
    def used(self):
        return self.ar.used, self.ar.n_nodes

    # ---- steps

    def set_batch(self, ids, pos, targets, weights, off, n, sq_off, Py_ssize_t SS, losses):
        """Point the engine at a packed batch (validated by the caller). int32 arrays: ids, pos,
        targets (N,), off, n (S,); intp sq_off (S,); float64 weights and losses (N,)."""
        cdef StepC* st = &self.st
        self.have_tape = False
        st.N = ids.shape[0]
        st.n_seq = off.shape[0]
        st.ids = <const int*>data_ptr(ids)
        st.pos = <const int*>data_ptr(pos)
        st.targets = <const int*>data_ptr(targets)
        st.weights = <const double*>data_ptr(weights)
        st.off = <const int*>data_ptr(off)
        st.n = <const int*>data_ptr(n)
        st.sq_off = <const Py_ssize_t*>data_ptr(sq_off)
        st.SS = SS
        st.losses = <double*>data_ptr(losses)
        self.step_arrays = (ids, pos, targets, weights, off, n, sq_off, losses)

    cdef int _step(self, bint forward, bint with_loss, bint backward) noexcept nogil:
        """Record + forward and/or backward; -1 when the arena is too small (nothing ran)."""
        cdef int status = 0
        cdef Py_ssize_t i
        if forward:
            if self.ar.block == NULL:
                return -1
            if self.is_double:
                status = record(&self.net, &self.ar, &self.st, with_loss, <double*>NULL)
                if status == 0:
                    run_forward(&self.net, &self.ar, &self.st, <double*>NULL)
            else:
                status = record(&self.net, &self.ar, &self.st, with_loss, <float*>NULL)
                if status == 0:
                    run_forward(&self.net, &self.ar, &self.st, <float*>NULL)
            if status != 0:
                mg_arena_reset(&self.ar)
                return -1
        if backward:
            for i in range(self.n_zero):
                memset(self.zero_ptrs[i], 0, self.zero_bytes[i])
            if self.is_double:
                run_backward(&self.net, &self.ar, &self.st, <double*>NULL)
            else:
                run_backward(&self.net, &self.ar, &self.st, <float*>NULL)
        return 0

    def copy_logits(self, out):
        """Copy the (N, V) logits of the last forward (run without loss) into out."""
        if not self.have_tape or self.tape_has_loss:
            raise RuntimeError("copy_logits needs a forward pass without a loss")
        memcpy(data_ptr(out), self.st.logits, self.st.N * self.net.V * self.itemsize)

    def tape_ops(self):
        """Op names of the current tape, in creation order (for debugging and graph dumps)."""
        return [mg_op_names[self.ar.nodes[i].op].decode("ascii") for i in range(self.ar.n_nodes)]


cdef inline void _shape_linear(mg_linear* lin, int nout, int nin, int n_ad, int rank) noexcept nogil:
    lin.nout = nout
    lin.nin = nin
    lin.n_ad = n_ad
    lin.rank = rank


def worker_step(Py_ssize_t batch_size, Py_ssize_t block_size, Py_ssize_t n_parts):
    """(positions, sum of squared lengths) of one part's share of the largest batch: the step
    every part's arena is planned for (batch_size sequences of block_size positions, dealt
    into n_parts parts)."""
    per_worker = (batch_size + n_parts - 1) // n_parts  # ceil
    return per_worker * block_size, per_worker * block_size * block_size


def plan_arena(int n_layer, int n_embd, int n_head, int block_size, int vocab_size, head_types, int rank,
               int modules, bint is_double, Py_ssize_t N, Py_ssize_t SS):
    """(value_bytes, nodes) Engine.plan(N, SS) gives an engine of these shapes whose every
    linear carries `modules` delta modules on each of its parts (none folded), without building
    or binding any array: record's own sizes (see plan)."""
    e = Engine(n_layer, n_embd, n_head, block_size, vocab_size, head_types, "relu", is_double, rank)
    e._shape_only(modules)
    return e.plan(N, SS)


ctypedef struct RunJob:
    void** engines
    int* status
    bint forward, with_loss, backward


cdef void _run_part(void* ctx, int i) noexcept nogil:
    cdef RunJob* job = <RunJob*>ctx
    job.status[i] = (<Engine>job.engines[i])._step(job.forward, job.with_loss, job.backward)


def run(list engines, bint forward, bint with_loss, bint backward, int n_threads):
    """Run a step on every engine, on at most n_threads threads of csrc/pool.c, each engine
    taken by whichever thread is free (each engine has its own batch, arena and gradient
    buffers, so they share nothing writable and what one computes does not depend on the
    thread). Returns one bool per engine: False when its arena was too small (that engine ran
    nothing)."""
    cdef Py_ssize_t i, n = len(engines)
    cdef Engine e
    cdef RunJob job
    cdef int* status = <int*>calloc(max(n, 1), sizeof(int))
    cdef void** handles = <void**>calloc(max(n, 1), sizeof(void*))
    if status == NULL or handles == NULL:
        free(status)
        free(handles)
        raise MemoryError()
    for i in range(n):
        e = engines[i]
        if backward and not forward and not (e.have_tape and e.tape_has_loss):
            free(status)
            free(handles)
            raise RuntimeError("backward needs a forward pass with a loss first")
        handles[i] = <void*>e
    job.engines = handles
    job.status = status
    job.forward = forward
    job.with_loss = with_loss
    job.backward = backward
    with nogil:
        mg_pool_run_on(_run_part, &job, <int>n, n_threads)
    out = []
    for i in range(n):
        e = engines[i]
        if forward:
            e.have_tape = status[i] == 0
            e.tape_has_loss = with_loss
        if backward:
            e.have_tape = False
        out.append(status[i] == 0)
    free(status)
    free(handles)
    return out


def pool_threads() -> int:
    """Worker threads the step pool (csrc/pool.c) has started so far in this process."""
    return mg_pool_threads()


ctypedef struct BusyJob:
    int slow_part
    double seconds, others, nap
    char* ran       # ran[i] = 1 once part i has run


cdef void _compute_for(double seconds) noexcept nogil:
    """Burn `seconds` of this thread's CPU time."""
    cdef timespec t0, t
    cdef double spent = 0
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0)
    while spent < seconds:
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
        spent = (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) * 1e-9


cdef void _busy_part(void* ctx, int i) noexcept nogil:
    cdef BusyJob* job = <BusyJob*>ctx
    cdef timespec nap
    job.ran[i] = 1
    if i != job.slow_part:
        _compute_for(job.others)
        return
    if job.nap > 0:
        nap.tv_sec = <long>job.nap
        nap.tv_nsec = <long>((job.nap - nap.tv_sec) * 1e9)
        nanosleep(&nap, NULL)
    _compute_for(job.seconds)


def _pool_busy(int n_parts, int slow_part, double seconds, int n_threads=0, double others=0.0, double nap=0.0):
    """Tests: run n_parts parts on at most n_threads threads of the step pool (0: as many as
    parts). Part slow_part sleeps `nap` seconds and then computes for `seconds` of its thread's
    CPU time; every other part computes for `others`. Returns (parts run on workers, parts that
    ran)."""
    cdef BusyJob job
    cdef int on_workers, i, n_ran = 0
    job.slow_part = slow_part
    job.seconds, job.others, job.nap = seconds, others, nap
    job.ran = <char*>calloc(max(n_parts, 1), 1)
    if job.ran == NULL:
        raise MemoryError()
    with nogil:
        on_workers = mg_pool_run_on(_busy_part, &job, n_parts, n_threads if n_threads > 0 else n_parts)
    for i in range(n_parts):
        n_ran += job.ran[i]
    free(job.ran)
    return on_workers, n_ran


def ragged_ids(batch, Py_ssize_t vocab_size):
    """A non-empty list of lists of plain ints in [0, vocab_size) (any lengths) as one int32
    array of the ids back to back and an intp array of the lists' lengths; None for anything
    else (the caller's general checks then accept it or name the problem). Two passes over the
    lists, one over the ints."""
    cdef Py_ssize_t S, s, j, k, n, total = 0
    cdef long long val
    cdef list row
    if type(batch) is not list or len(<list>batch) == 0:
        return None
    S = len(<list>batch)
    for s in range(S):
        item = (<list>batch)[s]
        if type(item) is not list:
            return None
        total += len(<list>item)
    flat_arr = np.empty(total, dtype=np.intc)
    lengths_arr = np.empty(S, dtype=np.intp)
    cdef int[::1] flat = flat_arr
    cdef Py_ssize_t[::1] lengths = lengths_arr
    k = 0
    for s in range(S):
        row = <list>(<list>batch)[s]
        n = len(row)
        if k + n > total:  # the arrays are sized by the first pass
            return None
        for j in range(n):
            x = row[j]
            if type(x) is not int:  # bools, numpy scalars, floats: the general path decides
                return None
            try:
                val = x
            except OverflowError:
                return None
            if val < 0 or val >= vocab_size:
                return None
            flat[k + j] = <int>val
        lengths[s] = n
        k += n
    if k != total:
        return None
    return flat_arr, lengths_arr


def pack_batch(list seqs, Py_ssize_t block_size, Py_ssize_t total_sequences):
    """Sequences (1-D C-contiguous int32 arrays of 2 or more ids, validated by the caller) packed
    back to back for Engine.set_batch: (ids, pos, targets, weights, off, n, sq_off, SS). Each
    sequence s contributes its first n_s = min(block_size, len - 1) positions: ids[t] and
    targets[t] = ids[t + 1] at pos t; weights 1 / (n_s * total_sequences), so that
    sum(weights * losses) is the batch loss; off and sq_off the running sums of n and n^2."""
    cdef Py_ssize_t S = len(seqs), s, t, k, N = 0, SS = 0, o = 0
    cdef const int[::1] a
    n_arr = np.empty(S, dtype=np.intc)
    off_arr = np.empty(S, dtype=np.intc)
    sq_arr = np.empty(S, dtype=np.intp)
    cdef int[::1] n = n_arr, off = off_arr
    cdef Py_ssize_t[::1] sq_off = sq_arr
    if block_size < 1 or total_sequences < 1:
        raise ValueError(f"block_size and total_sequences must be >= 1, got {block_size} and {total_sequences}")
    for s in range(S):
        k = min(block_size, (<object>seqs[s]).shape[0] - 1)
        if k < 1:
            raise ValueError(f"sequence {s} has fewer than 2 ids")
        n[s] = <int>k
        off[s] = <int>N
        sq_off[s] = SS
        N += k
        SS += k * k
    ids_arr = np.empty(N, dtype=np.intc)
    targets_arr = np.empty(N, dtype=np.intc)
    pos_arr = np.empty(N, dtype=np.intc)
    weights_arr = np.empty(N, dtype=np.float64)
    cdef int[::1] ids = ids_arr, targets = targets_arr, pos = pos_arr
    cdef double[::1] weights = weights_arr
    cdef double w
    for s in range(S):
        a = seqs[s]
        k = n[s]
        w = 1.0 / (<double>k * <double>total_sequences)
        for t in range(k):
            ids[o + t] = a[t]
            targets[o + t] = a[t + 1]
            pos[o + t] = <int>t
            weights[o + t] = w
        o += k
    return ids_arr, pos_arr, targets_arr, weights_arr, off_arr, n_arr, sq_arr, SS


def attention_simd_path() -> str:
    """Which attention kernels steps run: "avx2" (AVX2+FMA, chosen at run time) or "portable"
    (MOLECULE_GPT_NO_AVX2=1, or a CPU without AVX2)."""
    return "avx2" if mg_tri_use_avx2() else "portable"


def step_uses_blas() -> bool:
    """Whether a training step calls BLAS: on a CPU without AVX2+FMA (or with MOLECULE_GPT_NO_AVX2
    set) the products go to BLAS; otherwise only the tests' naive twins do."""
    return linear_blas or attention_blas or not mg_tri_use_avx2()


def _blas_attention(bint on):
    """Tests and benchmarks: run attention's products through BLAS (the naive twin) instead of
    the lower-triangle kernels."""
    global attention_blas
    attention_blas = on


def _blas_linear(bint on):
    """Tests and benchmarks: run every matrix product of the linear layers through BLAS (the
    naive twin) instead of csrc/gemm.h."""
    global linear_blas
    linear_blas = on


def _force_portable_attention(bint on):
    """Tests: run the baseline (SSE2) attention kernels even on an AVX2 CPU (off: decide again)."""
    mg_tri_force_portable(on)


def linear_simd_path() -> str:
    """Which csrc/gemm.h kernels the linear layers' products run: "avx512" (on cores that run
    512-bit FMAs at least 1.5x as fast as 256-bit ones: a probe decides once; MOLECULE_GPT_AVX512=1
    or 0 decides instead), "avx2", or "portable" (BLAS; MOLECULE_GPT_NO_AVX2=1). Every choice
    gives the same bits."""
    return ("portable", "avx2", "avx512")[mg_simd_level()]


def fma_peak(str width="avx2", int trials=20) -> float:
    """GFLOP/s one core reaches on float32 FMAs (12 independent chains, best of `trials` runs of
    ~0.1 ms on the calling thread) with 512-bit ("avx512") or 256-bit ("avx2") vectors: the
    ceiling benchmarks compare a product's rate with. ValueError for a width this CPU lacks."""
    cdef int need = {"avx2": 1, "avx512": 2}.get(width, -1)
    cdef double rate
    if need < 0:
        raise ValueError(f"width must be 'avx2' or 'avx512', got {width!r}")
    if mg_simd_supported() < need:
        raise ValueError(f"this CPU has no {width}")
    with nogil:
        rate = mg_fma_probe(need == 2, trials)
    return rate


cdef extern from * nogil:
    int __atomic_add_fetch(int* p, int v, int order)
    int __atomic_load_n(int* p, int order)
    enum: __ATOMIC_SEQ_CST


ctypedef struct ReadJob:
    const float* a
    Py_ssize_t n
    int parts
    int started     # parts begun in this pass (they wait for each other before reading)
    int alone       # a part stopped waiting before all had begun: the pass does not count
    float sums[MG_POOL_MAX_THREADS]
    double seconds[MG_POOL_MAX_THREADS]  # each part's read, timed from after the wait


cdef void _read_part(void* ctx, int part) noexcept nogil:
    """Part `part` of a pass: wait (up to 5 ms) until every part has begun, so that the threads
    read at once even when a worker wakes late, then read its share."""
    cdef ReadJob* j = <ReadJob*>ctx
    cdef Py_ssize_t lo = part * j.n // j.parts, hi = (part + 1) * j.n // j.parts
    cdef double t0 = now()
    __atomic_add_fetch(&j.started, 1, __ATOMIC_SEQ_CST)
    while __atomic_load_n(&j.started, __ATOMIC_SEQ_CST) < j.parts and now() - t0 < 5e-3:
        pass
    if __atomic_load_n(&j.started, __ATOMIC_SEQ_CST) < j.parts:
        j.alone = 1
    t0 = now()
    j.sums[part] = mg_read_floats(j.a + lo, hi - lo)
    j.seconds[part] = now() - t0


def read_bandwidth(Py_ssize_t nbytes, int n_threads=1, int trials=20) -> float:
    """GB/s at which n_threads threads of the pool read a buffer of nbytes (split evenly) that
    they read just before: from the cache level it fits in, as a model's weights are read again
    at every token. The best of `trials` passes in which every part ran on a thread of its own
    and the threads started together (each part waits up to 5 ms for the others to begin), a
    pass timed by its slowest part. The ceiling benchmarks compare a decode that streams its weights with
    (the FMA peak's counterpart for memory). RuntimeError if the pool's threads never read at
    once (another thread holding the pool, or no core for a worker)."""
    if nbytes < 4096 or n_threads < 1 or n_threads > MG_POOL_MAX_THREADS or trials < 1:
        raise ValueError(f"need nbytes >= 4096, 1 <= n_threads <= {MG_POOL_MAX_THREADS}, trials >= 1; "
                         f"got {nbytes}, {n_threads}, {trials}")
    buf = np.ones(nbytes // 4, np.float32)
    cdef ReadJob job
    cdef float[::1] view = buf
    cdef double best = 0, dt
    cdef int counted = 0, tries = 0, on_workers, p
    job.a, job.n, job.parts = &view[0], view.shape[0], n_threads
    with nogil:
        job.started = 0
        mg_pool_run_on(_read_part, &job, n_threads, n_threads)  # warm: pages touched, caches filled
        while counted < trials and tries < 50 * trials:
            tries += 1
            job.started = 0
            mg_pool_run_on(_read_part, &job, n_threads, n_threads)  # the threads meet
            job.started, job.alone = 0, 0
            on_workers = mg_pool_run_on(_read_part, &job, n_threads, n_threads)
            dt = 0
            for p in range(n_threads):
                dt = max(dt, job.seconds[p])
            if on_workers != n_threads - 1 or job.alone or dt <= 0:
                continue
            counted += 1
            if job.n * 4.0 / dt > best:
                best = job.n * 4.0 / dt
    if counted == 0:
        raise RuntimeError(f"the pool's {n_threads} threads never read at once in {tries} passes")
    return best / 1e9


def _force_simd(level):
    """Tests: cap the kernels' vector width at level (0 portable, 1 AVX2, 2 AVX-512; None: the
    automatic choice again). A level the CPU lacks stays unavailable."""
    mg_simd_force(-1 if level is None else int(level))


# ---------------------------------------------------------------------------------------------
# Adam over parameter segments

def adam_update(params, grads, m, v, double lr, double beta1, double beta2, double eps,
                double clip, Py_ssize_t step):
    """One clipped Adam step on 1-D arrays of one dtype (a parameter group); step counts from 1."""
    _adam_update(params, grads, m, v, lr, beta1, beta2, eps, clip, step, (), 1)


def adam_update_groups(groups, double lr, double beta1, double beta2, double eps, double clip,
                       extra_grads=None, int n_threads=1):
    """One clipped Adam step on every group (objects with 1-D arrays flat, grad, m, v and an int
    step), each with bias correction at step + 1, then step += 1. extra_grads: per group, the
    other parts' gradients of it, added into group.grad in order in the same pass (grad keeps
    the batch gradient). n_threads splits each large group's elements across threads.
    All or nothing for Ctrl-C: no Python bytecode runs between the first update and the last
    counter bump, so a KeyboardInterrupt lands before or after the whole update, never inside
    it (a counter one ahead of its moments would skew every later bias correction)."""
    cdef list gs = list(groups)
    cdef Py_ssize_t step, i
    for i in range(len(gs)):
        g = gs[i]
        step = g.step + 1
        _adam_update(g.flat, g.grad, g.m, g.v, lr, beta1, beta2, eps, clip, step,
                     extra_grads[i] if extra_grads is not None else (), n_threads)
        g.step = step


ADAM_CHUNK_MIN = 1 << 15  # elements below which a group's update is one piece
ADAM_CHUNKS_PER_THREAD = 4   # at most: a thread that lost its core holds up a quarter of its share


ctypedef struct AdamJob:
    void* p
    void* g
    void** extra
    int n_extra
    void* m
    void* v
    Py_ssize_t n
    int n_chunks
    bint is_double
    double lr, beta1, beta2, eps, clip, bias1, bias2


cdef void _adam_part(void* ctx, int c) noexcept nogil:
    cdef AdamJob* j = <AdamJob*>ctx
    cdef Py_ssize_t lo = c * j.n // j.n_chunks, hi = (c + 1) * j.n // j.n_chunks
    if j.is_double:
        adam_step(<double*>j.p, <double*>j.g, <const double**>j.extra, j.n_extra, <double*>j.m, <double*>j.v,
                  lo, hi, j.lr, j.beta1, j.beta2, j.eps, j.clip, j.bias1, j.bias2)
    else:
        adam_step(<float*>j.p, <float*>j.g, <const float**>j.extra, j.n_extra, <float*>j.m, <float*>j.v,
                  lo, hi, j.lr, j.beta1, j.beta2, j.eps, j.clip, j.bias1, j.bias2)


cdef int _adam_update(params, grads, m, v, double lr, double beta1, double beta2, double eps,
                      double clip, Py_ssize_t step, extras, int n_threads) except -1:
    cdef AdamJob job
    cdef Py_ssize_t k
    job.n_extra = len(extras)
    job.extra = <void**>malloc(max(job.n_extra, 1) * sizeof(void*))
    if job.extra == NULL:
        raise MemoryError()
    for k in range(job.n_extra):
        job.extra[k] = data_ptr(extras[k])
    job.p = data_ptr(params)
    job.g = data_ptr(grads)
    job.m = data_ptr(m)
    job.v = data_ptr(v)
    job.n = params.shape[0]
    job.is_double = params.dtype.itemsize == 8
    job.lr, job.beta1, job.beta2, job.eps, job.clip = lr, beta1, beta2, eps, clip
    job.bias1 = 1.0 - beta1 ** step
    job.bias2 = 1.0 - beta2 ** step
    # element-wise: pieces give the same numbers whoever computes them and however many there are
    # (a multiple of the threads, so a quiet machine's threads get equal shares)
    if job.n < 2 * ADAM_CHUNK_MIN or n_threads <= 1:
        job.n_chunks = 1
    else:
        job.n_chunks = n_threads * <int>max(1, min(ADAM_CHUNKS_PER_THREAD, job.n // (n_threads * ADAM_CHUNK_MIN)))
    with nogil:
        mg_pool_run_on(_adam_part, &job, job.n_chunks, n_threads)
    free(job.extra)
    return 0


# ---------------------------------------------------------------------------------------------
# Python twins of each kernel, for per-op tests (sklearn's `_xxx_memview` pattern). They
# allocate outputs with numpy and call the same cdef kernels the tape runs.

import numpy as np


def _rmsnorm_forward_memview(floating[:, ::1] x):
    y = np.empty_like(np.asarray(x))
    rstd = np.empty(x.shape[0], dtype=y.dtype)
    cdef floating[:, ::1] yv = y
    cdef floating[::1] rv = rstd
    rmsnorm_forward(&yv[0, 0], &rv[0], &x[0, 0], x.shape[0], x.shape[1])
    return y, rstd


def _rmsnorm_backward_memview(floating[:, ::1] dy, floating[:, ::1] y, floating[::1] rstd):
    dx = np.zeros_like(np.asarray(dy))
    cdef floating[:, ::1] dxv = dx
    rmsnorm_backward(&dxv[0, 0], &dy[0, 0], &y[0, 0], &rstd[0], dy.shape[0], dy.shape[1])
    return dx


def _rope_forward_memview(floating[:, ::1] x, int[::1] pos, cos_t, sin_t, int H):
    """cos_t, sin_t (T, d/2) of x's dtype."""
    cdef floating[:, ::1] ct = rope_tables_per_head(cos_t, H), st = rope_tables_per_head(sin_t, H)
    y = np.empty_like(np.asarray(x))
    cdef floating[:, ::1] yv = y
    rope_forward(&yv[0, 0], &x[0, 0], &pos[0], &ct[0, 0], &st[0, 0], x.shape[0], H, x.shape[1] // H,
                 x.shape[1])
    return y


def _rope_backward_memview(floating[:, ::1] dy, int[::1] pos, cos_t, sin_t, int H):
    cdef floating[:, ::1] ct = rope_tables_per_head(cos_t, H), st = rope_tables_per_head(sin_t, H)
    dx = np.zeros_like(np.asarray(dy))
    cdef floating[:, ::1] dxv = dx
    rope_backward(&dxv[0, 0], &dy[0, 0], &pos[0], &ct[0, 0], &st[0, 0], dy.shape[0], H, dy.shape[1] // H,
                  dy.shape[1])
    return dx


cdef void _fill_linear(mg_linear* lin, W, dW, As, Bs, dAs, dBs, alphas):
    memset(lin, 0, sizeof(mg_linear))
    lin.W = data_ptr(W)
    lin.dW = data_ptr(dW) if dW is not None else NULL
    lin.nout, lin.nin = W.shape[0], W.shape[1]
    lin.n_ad = len(As)
    lin.rank = As[0].shape[1] if As else 0
    for k in range(len(As)):
        lin.A[k] = data_ptr(As[k])
        lin.B[k] = data_ptr(Bs[k])
        lin.dA[k] = data_ptr(dAs[k]) if dAs is not None else NULL
        lin.dB[k] = data_ptr(dBs[k]) if dBs is not None else NULL
        lin.alpha[k] = alphas[k]
        lin.out_off[k] = 0
        lin.out_rows[k] = lin.nout


_MATMUL_FORMS = {"nt": 0, "nn": 1, "tn": 2}


def _matmul_memview(str form, floating[:, :] A, floating[:, :] B, floating[:, :] C, double alpha,
                    bint accumulate):
    """C (+)= alpha op(A) op(B) through the linear layers' product helpers (csrc/gemm.h, or BLAS
    after _blas_linear(True)): form "nt" is A B^T, "nn" A B, "tn" A^T B. Each operand may be a
    row-strided view (unit stride along its rows: the leading dimension is its row stride)."""
    if form not in _MATMUL_FORMS:
        raise ValueError(f"form must be 'nt', 'nn' or 'tn', got {form!r}")
    for name, m in (("A", A), ("B", B), ("C", C)):
        if m.strides[1] != m.itemsize or m.strides[0] % m.itemsize:
            raise ValueError(f"{name} must have unit stride along its rows")
    cdef int code = _MATMUL_FORMS[form], M = C.shape[0], Nn = C.shape[1]
    cdef int K = A.shape[0] if form == "tn" else A.shape[1]
    want_a = (K, M) if form == "tn" else (M, K)
    want_b = (Nn, K) if form == "nt" else (K, Nn)
    if (A.shape[0], A.shape[1]) != want_a or (B.shape[0], B.shape[1]) != want_b:
        raise ValueError(f"{form}: A must be {want_a} and B {want_b} for C {(M, Nn)}, got "
                         f"{(A.shape[0], A.shape[1])} and {(B.shape[0], B.shape[1])}")
    if M == 0 or Nn == 0:
        return
    cdef const floating* pa = &A[0, 0] if A.shape[0] and A.shape[1] else NULL
    cdef const floating* pb = &B[0, 0] if B.shape[0] and B.shape[1] else NULL
    cdef int lda = max(A.strides[0] // A.itemsize, 1), ldb = max(B.strides[0] // B.itemsize, 1)
    cdef int ldc = C.strides[0] // C.itemsize
    cdef floating beta = 1 if accumulate else 0
    with nogil:
        if code == 0:
            mm_nt(&C[0, 0], pa, pb, M, Nn, K, lda, ldb, ldc, <floating>alpha, beta)
        elif code == 1:
            mm_nn(&C[0, 0], pa, pb, M, Nn, K, lda, ldb, ldc, <floating>alpha, beta)
        else:
            mm_tn(&C[0, 0], pa, pb, M, Nn, K, lda, ldb, ldc, <floating>alpha, beta)


def _linear_forward_memview(floating[:, ::1] x, W, As, Bs, alphas):
    """(y, U) of y = x W^T + sum_k alpha_k (x B_k^T) A_k^T (all C-contiguous, x's dtype)."""
    cdef mg_linear lin
    _fill_linear(&lin, W, None, As, Bs, None, None, alphas)
    N = x.shape[0]
    y = np.empty((N, lin.nout), dtype=np.asarray(x).dtype)
    U = np.empty((max(lin.n_ad, 1), N, max(lin.rank, 1)), dtype=y.dtype)
    cdef floating[:, ::1] yv = y
    cdef floating[:, :, ::1] Uv = U
    linear_forward(&yv[0, 0], &Uv[0, 0, 0], &x[0, 0], &lin, N, x.shape[1], lin.nout)
    return y, U


def _linear_backward_memview(floating[:, ::1] g, floating[:, ::1] x, W, As, Bs, alphas, floating[:, :, ::1] U):
    """(dx, dW, dAs, dBs) for upstream gradient g (N, nout)."""
    cdef mg_linear lin
    dW = np.zeros_like(W)
    dAs = [np.zeros_like(A) for A in As]
    dBs = [np.zeros_like(B) for B in Bs]
    _fill_linear(&lin, W, dW, As, Bs, dAs, dBs, alphas)
    dx = np.zeros_like(np.asarray(x))
    dU = np.zeros_like(np.asarray(U))
    cdef floating[:, ::1] dxv = dx
    cdef floating[:, :, ::1] dUv = dU
    linear_backward(&dxv[0, 0], &dUv[0, 0, 0], &g[0, 0], &x[0, 0], &U[0, 0, 0], &lin,
                    x.shape[0], x.shape[1], g.shape[1], False, False)
    return dx, dW, dAs, dBs


def _attention_forward_memview(floating[:, ::1] q, floating[:, ::1] k, floating[:, ::1] v, P,
                               head_types, mix, lengths, int T):
    """y and the cached weights for packed sequences of the given lengths; P[h] (N, T) or None."""
    cdef Py_ssize_t H = len(head_types), N = q.shape[0], C = q.shape[1], d = C // H, SS, n_seq
    typ = np.array([code_of(HEAD_TYPES, t, "head type") for t in head_types], dtype=np.intc)
    mixa = np.ascontiguousarray(mix, dtype=np.float64)
    n = np.ascontiguousarray(lengths, dtype=np.intc)
    n_seq = n.shape[0]
    off = np.zeros_like(n); off[1:] = np.cumsum(n[:n_seq - 1])
    sq = n.astype(np.intp) ** 2
    sq_off = np.zeros_like(sq); sq_off[1:] = np.cumsum(sq[:n_seq - 1])
    SS = int(sq.sum())
    y = np.zeros((N, C), dtype=np.asarray(q).dtype)
    att = np.zeros(2 * H * SS, dtype=y.dtype)  # weights, then content logits
    work = np.empty(attention_work(T, d), dtype=y.dtype)
    cdef floating** Pp = <floating**>calloc(H, sizeof(void*))
    for h in range(H):
        Pp[h] = <floating*>data_ptr(P[h]) if P[h] is not None else NULL
    cdef floating[:, ::1] yv = y
    cdef floating[::1] av = att
    attention_forward(&yv[0, 0], &av[0], &av[H * SS], &q[0, 0], &k[0, 0], &v[0, 0], Pp,
                      <int*>data_ptr(typ), <double*>data_ptr(mixa), <int*>data_ptr(off),
                      <int*>data_ptr(n), <Py_ssize_t*>data_ptr(sq_off), SS, n_seq, H, d, T, C,
                      <floating*>data_ptr(work))
    free(Pp)
    return y, att


def _tri_nt_rows_memview(floating[:, ::1] A, floating[:, ::1] BT, Py_ssize_t t0, Py_ssize_t t1, double alpha):
    """S (t1 - t0, ldbt): S[t - t0, j] = alpha <A[t - t0], BT[:, j]> for j <= t, the rows t0 <= t
    < t1 of attention.h's mg_tri_nt_rows (a training block runs 0 .. n, a decoder step one row).
    A (t1 - t0, d); BT (d, ldbt) with ldbt a multiple of 32, >= t1. Entries past column t are
    unspecified."""
    if not (0 <= t0 < t1) or A.shape[0] != t1 - t0 or BT.shape[0] != A.shape[1] or BT.shape[1] % 32 \
            or BT.shape[1] < t1:
        raise ValueError("need 0 <= t0 < t1, A (t1 - t0, d), BT (d, ldbt) with ldbt a multiple of 32 >= t1")
    S = np.zeros((t1 - t0, BT.shape[1]), np.asarray(A).dtype)
    cdef floating[:, ::1] sv = S
    if floating is float:
        mg_tri_nt_rows_f(&sv[0, 0], sv.shape[1], &A[0, 0], A.shape[1], &BT[0, 0], BT.shape[1], t0, t1,
                         A.shape[1], <float>alpha)
    else:
        mg_tri_nt_rows_d(&sv[0, 0], sv.shape[1], &A[0, 0], A.shape[1], &BT[0, 0], BT.shape[1], t0, t1,
                         A.shape[1], alpha)
    return S


def _tri_nn_rows_memview(floating[:, ::1] P, floating[:, ::1] B, Py_ssize_t d, Py_ssize_t t0, Py_ssize_t t1,
                         double alpha):
    """Y (t1 - t0, d): Y[t - t0] = alpha sum_{j <= t} P[t - t0, j] B[j, :d], the rows t0 <= t < t1
    of attention.h's mg_tri_nn_rows. P (t1 - t0, >= t1): entries above the diagonal inside each
    4 x 4 diagonal block must be zero; B (>= t1, ldb) with ldb >= d rounded up to 16 (read as
    whole vectors past d)."""
    if not (0 <= t0 < t1) or d < 1 or P.shape[0] != t1 - t0 or P.shape[1] < t1 or B.shape[0] < t1 \
            or B.shape[1] < (d + 15) // 16 * 16:
        raise ValueError("need 0 <= t0 < t1, d >= 1, P (t1 - t0, >= t1), B (>= t1, >= d rounded up to 16)")
    Y = np.zeros((t1 - t0, d), np.asarray(P).dtype)
    cdef floating[:, ::1] yv = Y
    if floating is float:
        mg_tri_nn_rows_f(&yv[0, 0], d, &P[0, 0], P.shape[1], &B[0, 0], B.shape[1], t0, t1, d, <float>alpha, 0)
    else:
        mg_tri_nn_rows_d(&yv[0, 0], d, &P[0, 0], P.shape[1], &B[0, 0], B.shape[1], t0, t1, d, alpha, 0)
    return Y


def _tri_nn_heads_memview(floating[:, ::1] P, floating[:, :, ::1] B, Py_ssize_t d, Py_ssize_t t, double alpha):
    """Y (H, d): Y[h] = alpha sum_{j <= t} P[h, j] B[h, j, :d] for one query row t of H heads at
    once, attention.h's mg_tri_nn_heads (the decoder's). P (H, >= t + 1); B (H, >= t + 1, ldb) with
    its rows readable to d rounded up to 16 (each head's block, as the decoder's value cache)."""
    cdef Py_ssize_t H = P.shape[0]
    if t < 0 or d < 1 or H < 1 or B.shape[0] != H or P.shape[1] < t + 1 or B.shape[1] < t + 1 \
            or B.shape[2] < (d + 15) // 16 * 16:
        raise ValueError("need t >= 0, d >= 1, P (H, >= t + 1), B (H, >= t + 1, >= d rounded up to 16)")
    Y = np.zeros((H, d), np.asarray(P).dtype)
    cdef floating[:, ::1] yv = Y
    if floating is float:
        mg_tri_nn_heads_f(&yv[0, 0], d, &P[0, 0], P.shape[1], &B[0, 0, 0], B.shape[1] * B.shape[2], B.shape[2],
                          H, t, d, <float>alpha, 0)
    else:
        mg_tri_nn_heads_d(&yv[0, 0], d, &P[0, 0], P.shape[1], &B[0, 0, 0], B.shape[1] * B.shape[2], B.shape[2],
                          H, t, d, alpha, 0)
    return Y


def _attention_backward_memview(floating[:, ::1] dy, floating[::1] att, floating[:, ::1] q,
                                floating[:, ::1] k, floating[:, ::1] v, P, head_types, mix, lengths, int T):
    """(dq, dk, dv, dP, dalpha) where dalpha[h] = d loss / d alpha_h of hybrid heads."""
    cdef Py_ssize_t H = len(head_types), N = q.shape[0], C = q.shape[1], d = C // H, SS, n_seq
    typ = np.array([code_of(HEAD_TYPES, t, "head type") for t in head_types], dtype=np.intc)
    mixa = np.ascontiguousarray(mix, dtype=np.float64)
    n = np.ascontiguousarray(lengths, dtype=np.intc)
    n_seq = n.shape[0]
    off = np.zeros_like(n); off[1:] = np.cumsum(n[:n_seq - 1])
    sq = n.astype(np.intp) ** 2
    sq_off = np.zeros_like(sq); sq_off[1:] = np.cumsum(sq[:n_seq - 1])
    SS = int(sq.sum())
    dt = np.asarray(q).dtype
    dq, dk, dv = np.zeros((N, C), dt), np.zeros((N, C), dt), np.zeros((N, C), dt)
    dP = [np.zeros((N, T), dt) if P[h] is not None else None for h in range(H)]
    dalpha = np.zeros(H)
    scratch = np.zeros(H * SS + 1, dt)
    work = np.empty(attention_work(T, d), dtype=dt)
    cdef floating** Pp = <floating**>calloc(H, sizeof(void*))
    cdef floating** dPp = <floating**>calloc(H, sizeof(void*))
    for h in range(H):
        Pp[h] = <floating*>data_ptr(P[h]) if P[h] is not None else NULL
        dPp[h] = <floating*>data_ptr(dP[h]) if dP[h] is not None else NULL
    cdef floating[:, ::1] dqv = dq
    cdef floating[:, ::1] dkv = dk
    cdef floating[:, ::1] dvv = dv
    cdef floating[::1] sv = scratch
    attention_backward(&dqv[0, 0], &dkv[0, 0], &dvv[0, 0], dPp, <double*>data_ptr(dalpha), &sv[0],
                       &dy[0, 0], &att[0], &att[H * SS], &q[0, 0], &k[0, 0], &v[0, 0], Pp,
                       <int*>data_ptr(typ), <double*>data_ptr(mixa), <int*>data_ptr(off),
                       <int*>data_ptr(n), <Py_ssize_t*>data_ptr(sq_off), SS, n_seq, H, d, T, C,
                       <floating*>data_ptr(work))
    free(Pp)
    free(dPp)
    return dq, dk, dv, dP, dalpha


def _gate_forward_memview(floating[::1] g, floating[::1] u, str act):
    out = np.empty_like(np.asarray(g))
    cdef floating[::1] ov = out
    gate_forward(&ov[0], &g[0], &u[0], 1, g.shape[0], g.shape[0], code_of(ACTIVATIONS, act, "activation"))
    return out


def _gate_backward_memview(floating[::1] dout, floating[::1] g, floating[::1] u, str act, bint set_grads=False):
    """(dg, du); set_grads: the kernel's writing form, run on buffers full of NaN."""
    dg = np.full_like(np.asarray(g), np.nan) if set_grads else np.zeros_like(np.asarray(g))
    du = np.full_like(np.asarray(u), np.nan) if set_grads else np.zeros_like(np.asarray(u))
    cdef floating[::1] dgv = dg
    cdef floating[::1] duv = du
    gate_backward(&dgv[0], &duv[0], &dout[0], &g[0], &u[0], 1, g.shape[0], g.shape[0],
                  code_of(ACTIVATIONS, act, "activation"), set_grads)
    return dg, du


def _xent_forward_memview(floating[:, ::1] logits, int[::1] targets):
    """(losses, probs); logits are left untouched (a copy becomes the probabilities)."""
    probs = np.array(logits, copy=True)
    losses = np.zeros(logits.shape[0])
    cdef floating[:, ::1] pv = probs
    cdef double[::1] lv = losses
    xent_forward(&lv[0], &pv[0, 0], &targets[0], logits.shape[0], logits.shape[1])
    return losses, probs


def _xent_backward_memview(floating[:, ::1] probs, int[::1] targets, double[::1] weights):
    dlogits = np.zeros_like(np.asarray(probs))
    cdef floating[:, ::1] dv = dlogits
    xent_backward(&dv[0, 0], &probs[0, 0], &targets[0], &weights[0], probs.shape[0], probs.shape[1], False)
    return dlogits


def _embed_forward_memview(floating[:, ::1] wte, floating[:, ::1] wpe, int[::1] ids, int[::1] pos):
    x = np.empty((ids.shape[0], wte.shape[1]), dtype=np.asarray(wte).dtype)
    cdef floating[:, ::1] xv = x
    embed_forward(&xv[0, 0], &wte[0, 0], &wpe[0, 0], &ids[0], &pos[0], ids.shape[0], wte.shape[1])
    return x


def _embed_backward_memview(floating[:, ::1] dx, int[::1] ids, int[::1] pos, int V, int T):
    dwte = np.zeros((V, dx.shape[1]), dtype=np.asarray(dx).dtype)
    dwpe = np.zeros((T, dx.shape[1]), dtype=dwte.dtype)
    cdef floating[:, ::1] a = dwte
    cdef floating[:, ::1] b = dwpe
    embed_backward(&a[0, 0], &b[0, 0], &dx[0, 0], &ids[0], &pos[0], dx.shape[0], dx.shape[1])
    return dwte, dwpe
