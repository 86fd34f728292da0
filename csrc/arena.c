/* arena.c: the bump allocator behind the training tape (see molecule.h).
 *
 * Why C: plain memory management with AddressSanitizer's poisoning interface (a C header), kept
 * apart from the Cython that uses it.
 *
 * One malloc holds the node array, the value region and the gradient region. Allocation past
 * capacity returns NULL and sets `overflowed`; the caller turns that into a Python exception.
 */
#include <stdlib.h>
#include <string.h>

#include "molecule.h"

/* Under AddressSanitizer (MOLECULE_GPT_SANITIZE=1) the arena says what is allocated: to ASan
 * the whole tape is one malloc, so a kernel running past its buffer into the next one, or a read
 * of a buffer from before the last reset, would go unseen. The value and gradient regions and the
 * node array are poisoned except what was handed out since the last reset, each buffer exactly
 * its requested size (the rounding padding stays poisoned). Elsewhere these are no-ops. */
#if defined(__SANITIZE_ADDRESS__)
#define MG_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MG_ASAN 1
#endif
#endif
#ifdef MG_ASAN
#include <sanitizer/asan_interface.h>
#define MG_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define MG_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define MG_POISON(p, n) ((void)(p), (void)(n))
#define MG_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

size_t mg_arena_round(size_t bytes) {
    return (bytes + (MG_ALIGN - 1)) & ~(size_t)(MG_ALIGN - 1);
}

int mg_arena_init(mg_arena *ar, size_t value_bytes, size_t node_cap) {
    memset(ar, 0, sizeof(*ar));
    size_t node_bytes = mg_arena_round(node_cap * sizeof(mg_node));
    value_bytes = mg_arena_round(value_bytes);
    if (node_cap > ((size_t)-1) / sizeof(mg_node) || value_bytes > (((size_t)-1) - node_bytes - MG_ALIGN) / 2)
        return -1;
    size_t total = node_bytes + 2 * value_bytes + MG_ALIGN;
    char *block = (char *)malloc(total);
    if (!block) return -1;
    char *aligned = (char *)(((uintptr_t)block + (MG_ALIGN - 1)) & ~(uintptr_t)(MG_ALIGN - 1));
    ar->block = block;
    ar->nodes = (mg_node *)aligned;
    ar->node_cap = node_cap;
    ar->vals = aligned + node_bytes;
    ar->grads = ar->vals + value_bytes;
    ar->cap_bytes = value_bytes;
    MG_POISON(ar->nodes, node_bytes + 2 * value_bytes);
    return 0;
}

int mg_arena_init_plan(mg_arena *ar, size_t scratch_bytes) {
    if (mg_arena_init(ar, scratch_bytes, 1) != 0) return -1;
    ar->planning = 1;
    return 0;
}

void mg_arena_free(mg_arena *ar) {
    if (ar->block) MG_UNPOISON(ar->nodes, mg_arena_round(ar->node_cap * sizeof(mg_node)) + 2 * ar->cap_bytes);
    free(ar->block);
    memset(ar, 0, sizeof(*ar));
}

void mg_arena_reset(mg_arena *ar) {
    if (!ar->planning) { /* a planning arena's counts run past its memory: nothing to poison */
        MG_POISON(ar->nodes, ar->n_nodes * sizeof(mg_node));
        MG_POISON(ar->vals, ar->used);
        MG_POISON(ar->grads, ar->used);
    }
    ar->last = NULL;
    ar->used = 0;
    ar->n_nodes = 0;
    ar->overflowed = 0;
}

void *mg_arena_alloc(mg_arena *ar, size_t bytes) {
    size_t need = mg_arena_round(bytes);
    if (ar->planning) {
        if (need < bytes || need > (size_t)-1 - ar->used) { /* the sum does not fit a size_t */
            ar->overflowed = 1;
            ar->used = (size_t)-1;
            return NULL;
        }
        size_t usable = bytes < ar->cap_bytes ? bytes : ar->cap_bytes;
        MG_UNPOISON(ar->vals, usable);
        MG_UNPOISON(ar->grads, usable);
        ar->used += need;
        if (ar->used > ar->high_water) ar->high_water = ar->used;
        return ar->vals;
    }
    if (need > ar->cap_bytes - ar->used) {
        ar->overflowed = 1;
        return NULL;
    }
    void *p = ar->vals + ar->used;
    MG_UNPOISON(p, bytes);
    MG_UNPOISON(ar->grads + ar->used, bytes);
    ar->used += need;
    if (ar->used > ar->high_water) ar->high_water = ar->used;
    return p;
}

mg_node *mg_arena_push(mg_arena *ar, int op) {
    if (ar->n_nodes >= ar->node_cap && !ar->planning) {
        ar->overflowed = 1;
        return NULL;
    }
    mg_node *node = ar->planning ? &ar->nodes[0] : &ar->nodes[ar->n_nodes];
    ar->n_nodes++;
    ar->last = node;
    MG_UNPOISON(node, sizeof(*node));
    memset(node, 0, sizeof(*node));
    node->op = op;
    if (ar->n_nodes > ar->node_high_water) ar->node_high_water = ar->n_nodes;
    return node;
}

void mg_arena_zero_grads(mg_arena *ar) {
    MG_UNPOISON(ar->grads, ar->used); /* the padding between buffers too: this zeroes it */
    memset(ar->grads, 0, ar->used);
}
