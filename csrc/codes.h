/* codes.h: the integer codes of the model, defined once: head types, MLP activations, tape op
 * codes, and the names Python uses for them.
 *
 * Why C: the C kernels (attention.h, decode_kernels.h, molecule.h's tape nodes) branch on these
 * codes, and both extensions (_core, _decode) read them through src/molecule_gpt/_molecule.pxd,
 * which externs this header. A Cython enum could not be seen by the C files; a C enum is seen
 * by all of them. The name tables give each extension its Python-visible mapping (HEAD_TYPES,
 * ACTIVATIONS, OP_CODES) from this one source.
 */
#ifndef MOLECULE_CODES_H
#define MOLECULE_CODES_H

/* Head types (design.md §2): an attention head's logits are the scaled content logits
 * c = <q_t, k_j> / sqrt(d) (content), the pattern p = W_pattern[j] . h_t (rrpram) or their
 * mix (1 - a) c + a p with a = sigmoid(alpha) (hybrid). */
enum {
    MG_HEAD_CONTENT = 0,
    MG_HEAD_RRPRAM = 1,
    MG_HEAD_HYBRID = 2,
    MG_N_HEAD_TYPES = 3
};

/* The MLP's gate activation: out = act(g) * u. */
enum {
    MG_ACT_RELU = 0,
    MG_ACT_SILU = 1,
    MG_N_ACTIVATIONS = 2
};

/* Op codes of tape nodes (micrograd's `_op`, as an int); 0 is no op. MG_OP_SLOTS bounds them
 * (the per-op profile keeps one slot per code). */
enum {
    MG_OP_EMBED = 1,
    MG_OP_RMSNORM,
    MG_OP_LINEAR,
    MG_OP_ROPE,
    MG_OP_ATTN,
    MG_OP_GATE,
    MG_OP_ADD,
    MG_OP_XENT,
    MG_OP_SLOTS = 16
};

/* names, indexed by code (NULL: no name) */
static const char *const mg_head_type_names[MG_N_HEAD_TYPES] = {"content", "rrpram", "hybrid"};
static const char *const mg_activation_names[MG_N_ACTIVATIONS] = {"relu", "silu"};
static const char *const mg_op_names[MG_OP_SLOTS] = {
    NULL, "embed", "rmsnorm", "linear", "rope", "attention", "gate", "add", "cross_entropy",
};

#endif
