/* arena.c: the bump allocator behind the training tape (see molecule.h).
 *
 * One malloc holds the node array, the value region and the gradient region. Allocation past
 * capacity returns NULL and sets `overflowed`; the caller turns that into a Python exception.
 */
#include <stdlib.h>
#include <string.h>

#include "molecule.h"

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
    return 0;
}

void mg_arena_free(mg_arena *ar) {
    free(ar->block);
    memset(ar, 0, sizeof(*ar));
}

void mg_arena_reset(mg_arena *ar) {
    ar->used = 0;
    ar->n_nodes = 0;
    ar->overflowed = 0;
}

void *mg_arena_alloc(mg_arena *ar, size_t bytes) {
    size_t need = mg_arena_round(bytes);
    if (need > ar->cap_bytes - ar->used) {
        ar->overflowed = 1;
        return NULL;
    }
    void *p = ar->vals + ar->used;
    ar->used += need;
    if (ar->used > ar->high_water) ar->high_water = ar->used;
    return p;
}

mg_node *mg_arena_push(mg_arena *ar, int op) {
    if (ar->n_nodes >= ar->node_cap) {
        ar->overflowed = 1;
        return NULL;
    }
    mg_node *node = &ar->nodes[ar->n_nodes++];
    memset(node, 0, sizeof(*node));
    node->op = op;
    if (ar->n_nodes > ar->node_high_water) ar->node_high_water = ar->n_nodes;
    return node;
}

void mg_arena_zero_grads(mg_arena *ar) {
    memset(ar->grads, 0, ar->used);
}
