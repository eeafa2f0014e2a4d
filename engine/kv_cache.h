/*
 * Paged KV cache bookkeeping (host side): fixed-size token blocks, a free
 * list, reference counts (so later features can share blocks between
 * sequences) and per-sequence block tables.  The block contents live in
 * the backend's llm_kv_pool; this file only decides which block ids a
 * sequence owns.
 */
#ifndef LLM_KV_CACHE_H
#define LLM_KV_CACHE_H

#include <stdint.h>

#include "common.h"

#define LLM_KV_BLOCK_SIZE 16

typedef struct llm_kv_blocks llm_kv_blocks;

typedef struct llm_block_table {
    int32_t    *ids;        /* [n] physical block ids, in position order */
    int         n;
    int         cap;
} llm_block_table;

llm_kv_blocks *llm_kv_blocks_new(int n_blocks, int block_size,
                                 llm_err *err);
void           llm_kv_blocks_free(llm_kv_blocks *kv);

int  llm_kv_n_blocks(const llm_kv_blocks *kv);
int  llm_kv_n_free(const llm_kv_blocks *kv);
int  llm_kv_block_size(const llm_kv_blocks *kv);

/* Takes a free block (refcount 1); -1 if none. */
int32_t llm_kv_alloc(llm_kv_blocks *kv);
void    llm_kv_ref(llm_kv_blocks *kv, int32_t id);
/* Drops a reference; the block returns to the free list at 0. */
void    llm_kv_unref(llm_kv_blocks *kv, int32_t id);
int     llm_kv_refcount(const llm_kv_blocks *kv, int32_t id);

/* Blocks needed to hold n_tokens. */
int  llm_kv_blocks_for(const llm_kv_blocks *kv, int n_tokens);

/* Grows bt so that it covers n_tokens positions.  All or nothing:
 * LLM_EFULL (bt unchanged) if the free list is short, LLM_ENOMEM if the
 * table cannot grow. */
int  llm_block_table_ensure(llm_kv_blocks *kv, llm_block_table *bt,
                            int n_tokens);
/* Unrefs every block and empties bt (keeps its memory). */
void llm_block_table_clear(llm_kv_blocks *kv, llm_block_table *bt);
/* Frees bt's memory (after clear). */
void llm_block_table_destroy(llm_block_table *bt);

#endif /* LLM_KV_CACHE_H */
