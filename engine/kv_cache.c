/*
 * Paged KV cache bookkeeping (see kv_cache.h).
 *
 * Block ids 0 .. n_blocks-1.  Free ids sit on a stack (LIFO: a block just
 * released is the first reused, which keeps the working set warm in the
 * device pool); every block has a reference count, 0 while it is free.
 * Tagged (prefix cache) blocks at refcount 0 sit on a doubly linked LRU
 * list instead; an open-addressing table (linear probing, backward-shift
 * deletion) maps hashes to tagged blocks.  Nothing here touches the
 * block contents.
 */
#include "kv_cache.h"

#include <limits.h>
#include <string.h>


struct llm_kv_blocks {
    int         n_blocks;
    int         block_size;         /* tokens per block */
    int         n_free;
    int32_t    *free_ids;           /* [n_blocks] stack, top at n_free-1 */
    int32_t    *refs;               /* [n_blocks] reference counts */

    /* prefix cache */
    uint8_t    *tagged;             /* [n_blocks] 1: hash[] is valid */
    uint8_t   (*hash)[LLM_KV_HASH_LEN];     /* [n_blocks] */
    int32_t    *lru_prev, *lru_next;/* [n_blocks] reusable list, -1 ends */
    int32_t     lru_head, lru_tail; /* head: least recently released */
    int         n_reusable;
    int32_t    *slots;              /* [slot_mask + 1] block id or -1 */
    uint32_t    slot_mask;
    int         n_tagged;
    uint64_t    evictions;
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
    /* the table at most half full: short probes */
    kv->slot_mask = 1;
    while (kv->slot_mask < 2 * (uint32_t) n_blocks) {
        kv->slot_mask <<= 1;
    }
    kv->slot_mask -= 1;

    kv->free_ids = llm_malloc((size_t) n_blocks * sizeof(int32_t));
    kv->refs = llm_calloc((size_t) n_blocks, sizeof(int32_t));
    kv->tagged = llm_calloc((size_t) n_blocks, 1);
    kv->hash = llm_malloc((size_t) n_blocks * LLM_KV_HASH_LEN);
    kv->lru_prev = llm_malloc((size_t) n_blocks * sizeof(int32_t));
    kv->lru_next = llm_malloc((size_t) n_blocks * sizeof(int32_t));
    kv->slots = llm_malloc(((size_t) kv->slot_mask + 1) * sizeof(int32_t));
    if (kv->free_ids == NULL || kv->refs == NULL || kv->tagged == NULL
        || kv->hash == NULL || kv->lru_prev == NULL || kv->lru_next == NULL
        || kv->slots == NULL)
    {
        llm_kv_blocks_free(kv);
        goto nomem;
    }
    memset(kv->slots, 0xff, ((size_t) kv->slot_mask + 1) * sizeof(int32_t));
    kv->lru_head = kv->lru_tail = -1;

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
    llm_free(kv->tagged);
    llm_free(kv->hash);
    llm_free(kv->lru_prev);
    llm_free(kv->lru_next);
    llm_free(kv->slots);
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
    return kv != NULL ? kv->n_free + kv->n_reusable : 0;
}


int
llm_kv_block_size(const llm_kv_blocks *kv)
{
    return kv != NULL ? kv->block_size : 0;
}


/* ---- the hash table and the reusable list ------------------------- */

static uint32_t
slot_of(const llm_kv_blocks *kv, const uint8_t *hash)
{
    uint32_t h;

    /* the hash is already uniform: its first bytes are the slot */
    memcpy(&h, hash, sizeof(h));
    return h & kv->slot_mask;
}


static uint32_t
table_find(const llm_kv_blocks *kv, const uint8_t *hash)
{
    uint32_t i = slot_of(kv, hash);

    while (kv->slots[i] >= 0) {
        if (memcmp(kv->hash[kv->slots[i]], hash, LLM_KV_HASH_LEN) == 0) {
            return i;
        }
        i = (i + 1) & kv->slot_mask;
    }
    return UINT32_MAX;
}


static void
table_insert(llm_kv_blocks *kv, int32_t id)
{
    uint32_t i = slot_of(kv, kv->hash[id]);

    while (kv->slots[i] >= 0) {
        i = (i + 1) & kv->slot_mask;
    }
    kv->slots[i] = id;
}


/* Removes slot i, shifting later entries of the probe run back so that
 * lookups never stop at a hole. */
static void
table_delete(llm_kv_blocks *kv, uint32_t i)
{
    uint32_t j = i, home;

    kv->slots[i] = -1;
    for ( ;; ) {
        j = (j + 1) & kv->slot_mask;
        if (kv->slots[j] < 0) {
            return;
        }
        home = slot_of(kv, kv->hash[kv->slots[j]]);
        /* keep j if its home lies cyclically in (i, j] */
        if (i <= j ? (home > i && home <= j) : (home > i || home <= j)) {
            continue;
        }
        kv->slots[i] = kv->slots[j];
        kv->slots[j] = -1;
        i = j;
    }
}


static void
lru_unlink(llm_kv_blocks *kv, int32_t id)
{
    int32_t p = kv->lru_prev[id], n = kv->lru_next[id];

    if (p >= 0) {
        kv->lru_next[p] = n;
    } else {
        kv->lru_head = n;
    }
    if (n >= 0) {
        kv->lru_prev[n] = p;
    } else {
        kv->lru_tail = p;
    }
    kv->n_reusable--;
}


static void
lru_push_tail(llm_kv_blocks *kv, int32_t id)
{
    kv->lru_prev[id] = kv->lru_tail;
    kv->lru_next[id] = -1;
    if (kv->lru_tail >= 0) {
        kv->lru_next[kv->lru_tail] = id;
    } else {
        kv->lru_head = id;
    }
    kv->lru_tail = id;
    kv->n_reusable++;
}


static void
untag(llm_kv_blocks *kv, int32_t id)
{
    uint32_t i = table_find(kv, kv->hash[id]);

    if (i != UINT32_MAX && kv->slots[i] == id) {
        table_delete(kv, i);
    }
    kv->tagged[id] = 0;
    kv->n_tagged--;
}


int32_t
llm_kv_alloc(llm_kv_blocks *kv)
{
    int32_t id;

    if (kv == NULL) {
        return -1;
    }
    if (kv->n_free > 0) {
        id = kv->free_ids[--kv->n_free];
    } else if (kv->lru_head >= 0) {
        /* evict the least recently released cached block */
        id = kv->lru_head;
        lru_unlink(kv, id);
        untag(kv, id);
        kv->evictions++;
    } else {
        return -1;
    }
    kv->refs[id] = 1;
    return id;
}


int32_t
llm_kv_cache_get(llm_kv_blocks *kv, const uint8_t *hash)
{
    uint32_t i;
    int32_t  id;

    if (kv == NULL || hash == NULL) {
        return -1;
    }
    i = table_find(kv, hash);
    if (i == UINT32_MAX) {
        return -1;
    }
    id = kv->slots[i];
    if (kv->refs[id] == 0) {
        lru_unlink(kv, id);     /* revived: no longer evictable */
        kv->refs[id] = 1;
    } else if (kv->refs[id] < INT32_MAX) {
        kv->refs[id]++;
    } else {
        return -1;
    }
    return id;
}


int
llm_kv_cache_has(const llm_kv_blocks *kv, const uint8_t *hash)
{
    return kv != NULL && hash != NULL && table_find(kv, hash) != UINT32_MAX;
}


int
llm_kv_cache_put(llm_kv_blocks *kv, int32_t id, const uint8_t *hash)
{
    if (kv == NULL || hash == NULL || id < 0 || id >= kv->n_blocks
        || kv->refs[id] <= 0 || kv->tagged[id]
        || table_find(kv, hash) != UINT32_MAX)
    {
        return 0;
    }
    memcpy(kv->hash[id], hash, LLM_KV_HASH_LEN);
    kv->tagged[id] = 1;
    kv->n_tagged++;
    table_insert(kv, id);
    return 1;
}


void
llm_kv_cache_get_stats(const llm_kv_blocks *kv, llm_kv_cache_stats *s)
{
    memset(s, 0, sizeof(*s));
    if (kv != NULL) {
        s->tagged = kv->n_tagged;
        s->reusable = kv->n_reusable;
        s->evictions = kv->evictions;
    }
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
        if (kv->tagged[id]) {
            lru_push_tail(kv, id);      /* reusable until evicted */
        } else {
            kv->free_ids[kv->n_free++] = id;
        }
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


static int
bt_reserve(llm_block_table *bt, int need)
{
    int      cap;
    int32_t *ids;

    if (need <= bt->cap) {
        return 0;
    }
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
    return 0;
}


int
llm_block_table_push(llm_block_table *bt, int32_t id)
{
    if (bt == NULL || bt->n < 0 || bt->n == INT_MAX
        || bt_reserve(bt, bt->n + 1) != 0)
    {
        return LLM_ENOMEM;
    }
    bt->ids[bt->n++] = id;
    return 0;
}


int
llm_block_table_ensure(llm_kv_blocks *kv, llm_block_table *bt, int n_tokens)
{
    int      need, extra;

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
    if (extra > kv->n_free + kv->n_reusable) {
        return LLM_EFULL;
    }

    /* grow the table first: the one step that can fail */
    if (bt_reserve(bt, need) != 0) {
        return LLM_ENOMEM;
    }

    /* cannot fail: enough free or reusable blocks were checked above */
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
