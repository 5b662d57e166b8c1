/* Query capture for attention-importance scoring: see nxkv_capture in nxkv.h. */
#include <stdlib.h>
#include <string.h>

#include "nxkv.h"

/* The layer index of a wanted node, or -1. */
static int wanted_layer(const nxkv_capture *c, void *tensor) {
    const char *name = c->get_name(tensor);
    if (name == NULL || strncmp(name, "Qcur-", 5) != 0) {
        return -1;
    }
    const char *op = c->op_desc(tensor);
    if (op == NULL || strcmp(op, "ROPE") != 0) {
        return -1;
    }
    char *end = NULL;
    long layer = strtol(name + 5, &end, 10);
    if (end == name + 5 || *end != '\0' || layer < 0 || layer >= c->n_layer) {
        return -1;
    }
    return (int)layer;
}

bool nxkv_capture_eval(void *tensor, bool ask, void *user_data) {
    nxkv_capture *c = (nxkv_capture *)user_data;
    if (!c->enabled) {
        return !ask; /* ask: not wanted; data phase: go on computing */
    }
    int layer = wanted_layer(c, tensor);
    if (ask) {
        return layer >= 0;
    }
    if (layer < 0) {
        return true;
    }
    int64_t n = c->nelements(tensor);
    if (n <= 0 || c->nbytes(tensor) != (size_t)n * sizeof(float) || !c->is_contiguous(tensor) ||
        c->filled[layer] + n > c->per_layer) {
        c->errors++;
        return true;
    }
    c->tensor_get(tensor, c->out + (int64_t)layer * c->per_layer + c->filled[layer], 0, (size_t)n * sizeof(float));
    c->filled[layer] += n;
    return true;
}
