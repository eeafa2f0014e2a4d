/*
 * Paged KV cache bookkeeping (see kv_cache.h).
 *
 * Block ids 0 .. n_blocks-1.  Free ids sit on a stack (LIFO: a block just
 * released is the first reused, which keeps the working set warm in the
 * device pool); every block has a reference count, 0 while it is free.
 * Nothing here touches the block contents.
 */
#include "kv_cache.h"

#include <limits.h>


struct llm_kv_blocks {
    int         n_blocks;
    int         block_size;         /* tokens per block */
    int         n_free;
    int32_t    *free_ids;           /* [n_blocks] stack, top at n_free-1 */
    int32_t    *refs;               /* [n_blocks] reference counts */
};


llm_kv_blocks *
llm_kv_blocks_new(int n_blocks, int block_size, llm_err *err)
{
    llm_kv_blocks *kv;
    int            i;

    if (n_blocks <= 0 || block_size <= 0) {
        llm_err_set(err, LLM_EINVAL,
                    "kv cache: n_blocks (%d) and block_size (%d) must be "
                    "positive", n_blocks, block_size);
        return NULL;
    }

    kv = llm_calloc(1, sizeof(*kv));
    if (kv == NULL) {
        goto nomem;
    }
    kv->free_ids = llm_malloc((size_t) n_blocks * sizeof(int32_t));
    kv->refs = llm_calloc((size_t) n_blocks, sizeof(int32_t));
    if (kv->free_ids == NULL || kv->refs == NULL) {
        llm_kv_blocks_free(kv);
        goto nomem;
    }

    kv->n_blocks = n_blocks;
    kv->block_size = block_size;
    kv->n_free = n_blocks;

    /* pushed in reverse so that the first allocations are 0, 1, 2, ... */
    for (i = 0; i < n_blocks; i++) {
        kv->free_ids[i] = n_blocks - 1 - i;
    }
    return kv;

nomem:
    llm_err_set(err, LLM_ENOMEM, "kv cache: no memory for %d blocks",
                n_blocks);
    return NULL;
}


void
llm_kv_blocks_free(llm_kv_blocks *kv)
{
    if (kv == NULL) {
        return;
    }
    llm_free(kv->free_ids);
    llm_free(kv->refs);
    llm_free(kv);
}


int
llm_kv_n_blocks(const llm_kv_blocks *kv)
{
    return kv != NULL ? kv->n_blocks : 0;
}


int
llm_kv_n_free(const llm_kv_blocks *kv)
{
    return kv != NULL ? kv->n_free : 0;
}


int
llm_kv_block_size(const llm_kv_blocks *kv)
{
    return kv != NULL ? kv->block_size : 0;
}


int32_t
llm_kv_alloc(llm_kv_blocks *kv)
{
    int32_t id;

    if (kv == NULL || kv->n_free == 0) {
        return -1;
    }
    id = kv->free_ids[--kv->n_free];
    kv->refs[id] = 1;
    return id;
}


void
llm_kv_ref(llm_kv_blocks *kv, int32_t id)
{
    /*
     * A free block (refcount 0) cannot be revived by a reference: it is on
     * the free list and would be handed out twice.  Misuse is ignored
     * rather than allowed to corrupt the accounting.
     */
    if (kv == NULL || id < 0 || id >= kv->n_blocks || kv->refs[id] <= 0
        || kv->refs[id] == INT32_MAX)
    {
        return;
    }
    kv->refs[id]++;
}


void
llm_kv_unref(llm_kv_blocks *kv, int32_t id)
{
    if (kv == NULL || id < 0 || id >= kv->n_blocks || kv->refs[id] <= 0) {
        return;                 /* bad id or double free: ignored */
    }
    if (--kv->refs[id] == 0) {
        kv->free_ids[kv->n_free++] = id;
    }
}


int
llm_kv_refcount(const llm_kv_blocks *kv, int32_t id)
{
    if (kv == NULL || id < 0 || id >= kv->n_blocks) {
        return 0;
    }
    return kv->refs[id];
}


int
llm_kv_blocks_for(const llm_kv_blocks *kv, int n_tokens)
{
    if (kv == NULL || n_tokens <= 0) {
        return 0;
    }
    /* ceil without the overflow of n_tokens + block_size - 1 */
    return (n_tokens - 1) / kv->block_size + 1;
}


int
llm_block_table_ensure(llm_kv_blocks *kv, llm_block_table *bt, int n_tokens)
{
    int      need, extra, cap;
    int32_t *ids;

    if (kv == NULL || bt == NULL || n_tokens < 0 || bt->n < 0
        || bt->n > bt->cap)
    {
        return LLM_EINVAL;
    }

    need = llm_kv_blocks_for(kv, n_tokens);
    if (need <= bt->n) {
        return LLM_OK;
    }
    extra = need - bt->n;
    if (extra > kv->n_free) {
        return LLM_EFULL;
    }

    /* grow the table first: the one step that can fail */
    if (need > bt->cap) {
        cap = bt->cap > 0 ? bt->cap : 4;
        while (cap < need) {
            cap = cap > INT_MAX / 2 ? need : cap * 2;
        }
        ids = llm_realloc(bt->ids, (size_t) cap * sizeof(int32_t));
        if (ids == NULL) {
            return LLM_ENOMEM;
        }
        bt->ids = ids;
        bt->cap = cap;
    }

    /* cannot fail: enough free blocks were checked above */
    while (bt->n < need) {
        bt->ids[bt->n++] = llm_kv_alloc(kv);
    }
    return LLM_OK;
}


void
llm_block_table_clear(llm_kv_blocks *kv, llm_block_table *bt)
{
    int i;

    if (bt == NULL) {
        return;
    }
    for (i = 0; i < bt->n; i++) {
        llm_kv_unref(kv, bt->ids[i]);
    }
    bt->n = 0;
}


void
llm_block_table_destroy(llm_block_table *bt)
{
    if (bt == NULL) {
        return;
    }
    llm_free(bt->ids);
    bt->ids = NULL;
    bt->n = 0;
    bt->cap = 0;
}
