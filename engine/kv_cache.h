/*
 * Paged KV cache bookkeeping (host side): fixed-size token blocks, a free
 * list, reference counts (blocks are shared between sequences) and
 * per-sequence block tables.  The block contents live in the backend's
 * llm_kv_pool; this file only decides which block ids a sequence owns.
 *
 * Prefix cache: a full block can be tagged with the content hash of its
 * tokens (prefix_cache.h).  A tagged block whose last reference goes
 * stays reusable, on an LRU list, instead of returning to the free list:
 * llm_kv_cache_get revives it for a new sequence with the same prefix.
 * Allocation takes truly free blocks first, then evicts the least
 * recently released tagged block; a block in use is never evicted.
 */
#ifndef LLM_KV_CACHE_H
#define LLM_KV_CACHE_H

#include <stdint.h>

#include "common.h"

#define LLM_KV_BLOCK_SIZE 16
#define LLM_KV_HASH_LEN   32

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
/* Blocks an allocation can take: free ones plus reusable cached ones. */
int  llm_kv_n_free(const llm_kv_blocks *kv);
int  llm_kv_block_size(const llm_kv_blocks *kv);

/* Takes a free block, else evicts the least recently used reusable one
 * (refcount 1, untagged); -1 if none. */
int32_t llm_kv_alloc(llm_kv_blocks *kv);
void    llm_kv_ref(llm_kv_blocks *kv, int32_t id);
/* Drops a reference; the block returns to the free list at 0. */
void    llm_kv_unref(llm_kv_blocks *kv, int32_t id);
int     llm_kv_refcount(const llm_kv_blocks *kv, int32_t id);

/* ---- prefix cache ---- */

/* The block tagged with hash, with one more reference (a reusable block
 * is revived); -1 if none. */
int32_t llm_kv_cache_get(llm_kv_blocks *kv, const uint8_t *hash);
/* 1 if some block is tagged with hash. */
int     llm_kv_cache_has(const llm_kv_blocks *kv, const uint8_t *hash);
/* Tags block id (in use, full, its KV written) with hash: 1 done; 0 if
 * hash already tags another block or id is tagged (nothing changes). */
int     llm_kv_cache_put(llm_kv_blocks *kv, int32_t id, const uint8_t *hash);

typedef struct llm_kv_cache_stats {
    int         tagged;         /* blocks holding a hash, in use or not */
    int         reusable;       /* tagged and unused (evictable) */
    uint64_t    evictions;      /* tagged blocks taken for new content */
} llm_kv_cache_stats;

void llm_kv_cache_get_stats(const llm_kv_blocks *kv, llm_kv_cache_stats *s);

/* Blocks needed to hold n_tokens. */
int  llm_kv_blocks_for(const llm_kv_blocks *kv, int n_tokens);

/* Grows bt so that it covers n_tokens positions.  All or nothing:
 * LLM_EFULL (bt unchanged) if the free list is short, LLM_ENOMEM if the
 * table cannot grow. */
int  llm_block_table_ensure(llm_kv_blocks *kv, llm_block_table *bt,
                            int n_tokens);
/* Appends block id (whose reference the table now holds) to bt; 0 or
 * LLM_ENOMEM. */
int  llm_block_table_push(llm_block_table *bt, int32_t id);
/* Unrefs every block and empties bt (keeps its memory). */
void llm_block_table_clear(llm_kv_blocks *kv, llm_block_table *bt);
/* Frees bt's memory (after clear). */
void llm_block_table_destroy(llm_block_table *bt);

#endif /* LLM_KV_CACHE_H */
