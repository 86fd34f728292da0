/* molecule.h: the C side of molecule_gpt's training core: the arena and the tape's node types.
 *
 * Why C: the arena that holds one training step's tape (nodes plus every activation and
 * activation-gradient buffer) is plain memory management that wants to be obviously correct,
 * reusable from any Cython module, and visible to AddressSanitizer buffer by buffer (arena.c).
 * The math is Cython over `floating` (the forward ops in src/molecule_gpt/_ops.pxd, the tape's
 * kernels in _kernels.pxi), calling the other csrc/ headers where C does better.
 *
 * Dimension legend (used by every kernel):
 *   N  = packed positions of a batch (sum over sequences of n_s, n_s <= T)
 *   T  = block_size, V = vocabulary, C = n_embd, H = n_head, d = C / H (head dim)
 *   F  = 4 C (MLP hidden), r = delta rank, K = delta modules
 *
 * Errors: functions return a status or NULL; nothing here prints or exits.
 */
#ifndef MOLECULE_H
#define MOLECULE_H

#include <stddef.h>
#include <stdint.h>

#include "codes.h" /* op codes (and head types, activations) */

#define MG_ALIGN 64
#define MG_MAX_ADAPTERS 192 /* adapters one linear carries: trainable modules x fused parts (3) */

/* Node flags: where a node's output has one consumer that writes its whole gradient, backward
 * skips zeroing that gradient and the consumer writes (=) instead of adding (+=). */
enum {
    MG_GRAD_SET_A = 1,    /* backward writes (not adds) the gradient of input a */
    MG_GRAD_SET_B = 2,    /* ... of input b */
    MG_OUT_GRAD_SET = 4   /* the output's gradient is written whole by its one consumer: not zeroed */
};

/* A weight matrix W (nout, nin) with its low-rank adapters:
 *   y[:, off_k : off_k + rows_k] += alpha_k A_k (B_k x)
 * A fused linear (q, k and v; or the MLP's gate and value) stacks its parts' weights in one W,
 * each part's adapters writing their own block of output columns. dW / dA / dB are NULL when
 * that part is frozen (no gradient is accumulated for it). */
typedef struct {
    void *W, *dW;
    int nout, nin;
    int n_ad;
    int rank;
    void *A[MG_MAX_ADAPTERS], *B[MG_MAX_ADAPTERS];   /* A (rows_k, r), B (r, nin) */
    void *dA[MG_MAX_ADAPTERS], *dB[MG_MAX_ADAPTERS];
    double alpha[MG_MAX_ADAPTERS];
    int out_off[MG_MAX_ADAPTERS], out_rows[MG_MAX_ADAPTERS];
} mg_linear;

/* One tape node. Inputs/outputs are arena value buffers; the gradient of an arena buffer sits
 * at the same offset in the gradient half (mg_grad_of). */
typedef struct {
    int op;
    int layer;
    int flags;            /* MG_GRAD_SET_A | MG_GRAD_SET_B | MG_OUT_GRAD_SET */
    void *a, *b, *c;      /* inputs */
    void *out;            /* output value */
    size_t out_bytes;     /* its size: backward zeroes only output gradients */
    void *aux;            /* what backward needs beyond inputs (rstd, weights, U, probs) */
    void *aux2;           /* a second cache (attention: scaled content logits) */
    void *ptrs;           /* op-specific pointer table (attention: rrpram logits per head) */
    void *work;           /* op-specific scratch (attention: csrc/attention.h's) */
    const mg_linear *lin; /* LINEAR: the weight and its adapters */
    ptrdiff_t n, m, k;    /* op-specific sizes */
    ptrdiff_t ld_in, ld_out;  /* row strides of input `a` (and `b`, `c`) and of `out` */
} mg_node;

/* The arena: one allocation split into a node array and two parallel float regions, values and
 * their gradients (same offsets). Reset is O(1); the gradient region is zeroed up to `used`
 * before backward.
 *
 * A planning arena (mg_arena_init_plan) measures a recording instead of holding it: allocations
 * add up their rounded sizes in `used` (saturating, with `overflowed`) and all get the same
 * scratch of the size it was made with; pushes count nodes and all get the same node. The tape's
 * `record` writes nothing into the buffers it takes but its pointer tables, so running it on a
 * planning arena with a scratch that holds one table gives exactly the bytes and nodes it takes
 * from a real one: the arena's plan is `record` itself, not a second description of it. */
typedef struct {
    char *block;
    mg_node *nodes;
    size_t node_cap, n_nodes, node_high_water;
    char *vals, *grads;
    size_t cap_bytes, used, high_water;
    int overflowed; /* set by an allocation past capacity, cleared by reset */
    int planning;   /* a planning arena (see above) */
    mg_node *last;  /* the node pushed last */
} mg_arena;

int mg_arena_init(mg_arena *ar, size_t value_bytes, size_t node_cap);
int mg_arena_init_plan(mg_arena *ar, size_t scratch_bytes);
void mg_arena_free(mg_arena *ar);
void mg_arena_reset(mg_arena *ar);
void *mg_arena_alloc(mg_arena *ar, size_t bytes);
mg_node *mg_arena_push(mg_arena *ar, int op);
void mg_arena_zero_grads(mg_arena *ar);
size_t mg_arena_round(size_t bytes);

static inline void *mg_grad_of(const mg_arena *ar, const void *value) {
    return ar->grads + ((const char *)value - ar->vals);
}

#endif
