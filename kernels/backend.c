/*
 * Backend-independent helpers: tensors allocated through a backend's ops,
 * row views, and opening a backend by name ("cpu", "cuda:N").
 */
#include "backend.h"

#include <stdio.h>

#include <stdlib.h>
#include <string.h>

#include "../engine/common.h"


int
llm_tensor_alloc(llm_backend *be, llm_tensor *t, int type, int64_t cols,
                 int64_t rows)
{
    size_t nb;

    memset(t, 0, sizeof(*t));
    if (cols < 0 || rows < 0) {
        return LLM_EINVAL;
    }
    nb = llm_row_bytes(type, cols);
    if (nb == 0 && cols != 0) {
        return LLM_EINVAL;          /* unknown type or not whole blocks */
    }
    if (rows > 0 && nb > SIZE_MAX / (size_t) rows) {
        return LLM_ENOMEM;
    }
    t->data = be->ops->alloc(be, nb * (size_t) rows);
    if (t->data == NULL) {
        return LLM_ENOMEM;
    }
    t->type = type;
    t->ne[0] = cols;
    t->ne[1] = rows;
    t->nb = nb;
    t->layout = LLM_LAYOUT_ROWS;
    return 0;
}


void
llm_tensor_release(llm_backend *be, llm_tensor *t)
{
    if (t != NULL && t->data != NULL) {
        be->ops->release(be, t->data);
        t->data = NULL;
    }
}


llm_tensor
llm_tensor_rows(const llm_tensor *t, int64_t first, int64_t n)
{
    llm_tensor v = *t;

    /* clamp rather than point outside the tensor */
    if (first < 0) {
        first = 0;
    }
    if (first > t->ne[1]) {
        first = t->ne[1];
    }
    if (n < 0 || n > t->ne[1] - first) {
        n = t->ne[1] - first;
    }
    if (t->data != NULL) {
        v.data = (uint8_t *) t->data + (size_t) first * t->nb;
    }
    v.ne[1] = n;
    return v;
}


llm_backend *
llm_backend_open(const char *spec, int n_threads, llm_err *err)
{
    if (spec == NULL || strcmp(spec, "cpu") == 0) {
        return llm_backend_cpu_new(n_threads, err);
    }
    if (strncmp(spec, "cuda", 4) == 0
        && (spec[4] == '\0' || spec[4] == ':'))
    {
        long  dev = 0;
        char *end;

        if (spec[4] == ':') {
            dev = strtol(spec + 5, &end, 10);
            if (end == spec + 5 || *end != '\0' || dev < 0 || dev > 1024) {
                llm_err_set(err, LLM_EINVAL,
                            "backend \"%s\": bad device number", spec);
                return NULL;
            }
        }
#ifdef LLM_HAVE_CUDA
        return llm_backend_cuda_new((int) dev, err);
#else
        (void) dev;
        llm_err_set(err, LLM_EUNSUP, "backend \"%s\": built without CUDA",
                    spec);
        return NULL;
#endif
    }
    llm_err_set(err, LLM_EINVAL,
                "unknown backend \"%s\" (expected \"cpu\" or \"cuda:N\")",
                spec);
    return NULL;
}


/* ---- argument checks shared by the backends' KV ops ------------------ */

int
llm_kv_check_pool(const llm_kv_pool *kv, int layer, char *msg, size_t size)
{
    size_t blk_bytes;

    if (kv == NULL || kv->k == NULL || kv->v == NULL
        || kv->n_layers <= 0 || kv->n_blocks <= 0 || kv->block_size <= 0
        || kv->n_kv_heads <= 0 || kv->head_dim <= 0
        || !llm_kv_type_ok(kv->type, kv->head_dim))
    {
        snprintf(msg, size, "bad KV pool");
        return LLM_EINVAL;
    }
    blk_bytes = (size_t) kv->block_size
                * llm_kv_bytes(kv->type, (size_t) kv->n_kv_heads
                                         * kv->head_dim);
    if (kv->layer_bytes < (size_t) kv->n_blocks * blk_bytes) {
        snprintf(msg, size, "KV pool layer_bytes %zu < %d blocks of %zu",
                 kv->layer_bytes, kv->n_blocks, blk_bytes);
        return LLM_EINVAL;
    }
    if (layer < 0 || layer >= kv->n_layers) {
        snprintf(msg, size, "layer %d of %d", layer, kv->n_layers);
        return LLM_EINVAL;
    }
    return 0;
}


int
llm_kv_check_batch(const llm_kv_pool *kv, const llm_batch *b, char *msg,
                   size_t size)
{
    int64_t t;

    if (b->n_tokens > 0 && (b->block_table == NULL || b->max_blocks <= 0)) {
        snprintf(msg, size, "batch has no block table");
        return LLM_EINVAL;
    }
    for (t = 0; t < b->n_tokens; t++) {
        int32_t s = b->tok_seq[t], p = b->pos[t];
        int32_t bi, blk;

        if (s < 0 || s >= b->n_seqs || p < 0) {
            snprintf(msg, size, "token %lld: seq %d / pos %d out of range",
                     (long long) t, (int) s, (int) p);
            return LLM_EINVAL;
        }
        if (p / kv->block_size >= b->max_blocks) {
            snprintf(msg, size, "token %lld: pos %d beyond %d blocks",
                     (long long) t, (int) p, b->max_blocks);
            return LLM_EINVAL;
        }
        /* every block of positions 0 .. p lies in (attention reads them) */
        for (bi = 0; bi <= p / kv->block_size; bi++) {
            blk = b->block_table[(size_t) s * b->max_blocks + bi];
            if (blk < 0 || blk >= kv->n_blocks) {
                snprintf(msg, size, "seq %d block %d is %d, pool has %d",
                         (int) s, (int) bi, (int) blk, kv->n_blocks);
                return LLM_EINVAL;
            }
        }
        /* tokens of a sequence are in position order: the last one's
         * check covers the earlier ones' blocks */
        while (t + 1 < b->n_tokens && b->tok_seq[t + 1] == s
               && b->pos[t + 1] >= p && b->pos[t + 1] / kv->block_size
                                        == p / kv->block_size)
        {
            t++;
            p = b->pos[t];
        }
    }
    return 0;
}


llm_tensor
llm_tensor_of(void *data, int type, int64_t cols, int64_t rows)
{
    llm_tensor t;

    memset(&t, 0, sizeof(t));
    t.data = data;
    t.type = type;
    t.ne[0] = cols;
    t.ne[1] = rows;
    t.nb = llm_row_bytes(type, cols);
    t.layout = LLM_LAYOUT_ROWS;
    return t;
}
