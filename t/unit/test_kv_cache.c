/*
 * KV block bookkeeping: free list, reference counts, block tables, and
 * clean failure when memory runs out.
 */
#include <stdlib.h>
#include <string.h>

#include "test.h"
#include "engine/kv_cache.h"


/* ---- a counting allocator that can fail after N calls ------------------ */

static long kvt_calls;          /* allocation calls so far */
static long kvt_fail_after;     /* fail every call from this one on; -1 no */
static long kvt_live;           /* blocks allocated and not freed */


static int
kvt_should_fail(void)
{
    return kvt_fail_after >= 0 && kvt_calls++ >= kvt_fail_after;
}


static void *
kvt_malloc(size_t n)
{
    void *p;

    if (kvt_should_fail()) {
        return NULL;
    }
    p = malloc(n);
    kvt_live += p != NULL;
    return p;
}


static void *
kvt_calloc(size_t n, size_t size)
{
    void *p;

    if (kvt_should_fail()) {
        return NULL;
    }
    p = calloc(n, size);
    kvt_live += p != NULL;
    return p;
}


static void *
kvt_realloc(void *old, size_t n)
{
    void *p;

    if (kvt_should_fail()) {
        return NULL;
    }
    p = realloc(old, n);
    kvt_live += (old == NULL && p != NULL);
    return p;
}


static void
kvt_free(void *p)
{
    kvt_live -= p != NULL;
    free(p);
}


static void
kvt_install(long fail_after)
{
    static const llm_allocators a = {
        kvt_malloc, kvt_calloc, kvt_realloc, kvt_free
    };

    kvt_calls = 0;
    kvt_fail_after = fail_after;
    kvt_live = 0;
    llm_set_allocators(&a);
}


static uint64_t kvt_rng_state;

static uint32_t
kvt_rand(uint32_t n)
{
    uint64_t z = (kvt_rng_state += 0x9e3779b97f4a7c15ull);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (uint32_t) (z % n);
}


/* ---- checks ------------------------------------------------------------ */

/* Every block's refcount equals the number of table entries naming it, and
 * the free count equals the number of unnamed blocks. */
static int
kvt_consistent(llm_kv_blocks *kv, llm_block_table *bt, int n_bt,
               int *scratch)
{
    int n = llm_kv_n_blocks(kv), i, j, n_zero = 0;

    memset(scratch, 0, (size_t) n * sizeof(int));
    for (i = 0; i < n_bt; i++) {
        for (j = 0; j < bt[i].n; j++) {
            if (bt[i].ids[j] < 0 || bt[i].ids[j] >= n) {
                return 0;
            }
            scratch[bt[i].ids[j]]++;
        }
    }
    for (i = 0; i < n; i++) {
        if (llm_kv_refcount(kv, i) != scratch[i]) {
            return 0;
        }
        n_zero += scratch[i] == 0;
    }
    return n_zero == llm_kv_n_free(kv);
}


/* Makes dst (empty) share src's blocks, as a forked sequence would. */
static int
kvt_fork(llm_kv_blocks *kv, llm_block_table *dst, const llm_block_table *src)
{
    int32_t *ids;
    int      i;

    if (src->n == 0) {
        return 0;
    }
    if (dst->cap < src->n) {
        ids = llm_realloc(dst->ids, (size_t) src->n * sizeof(int32_t));
        if (ids == NULL) {
            return LLM_ENOMEM;
        }
        dst->ids = ids;
        dst->cap = src->n;
    }
    for (i = 0; i < src->n; i++) {
        llm_kv_ref(kv, src->ids[i]);
        dst->ids[i] = src->ids[i];
    }
    dst->n = src->n;
    return 0;
}


TEST_SUITE(kv_cache_basics)
{
    llm_kv_blocks  *kv;
    llm_err         err;
    int32_t         a, b, c;

    test("kv: invalid sizes are refused with a message");
    memset(&err, 0, sizeof(err));
    kv = llm_kv_blocks_new(0, 16, &err);
    test_cond(kv == NULL);
    test_cond(err.code == LLM_EINVAL);
    test_cond(strstr(err.msg, "n_blocks") != NULL);
    test_cond(llm_kv_blocks_new(8, 0, NULL) == NULL);
    test_cond(llm_kv_blocks_new(-3, 16, NULL) == NULL);

    test("kv: new pool is all free, blocks come out 0, 1, 2");
    kv = llm_kv_blocks_new(3, LLM_KV_BLOCK_SIZE, &err);
    test_cond(kv != NULL);
    if (kv == NULL) {
        return;
    }
    test_cond(llm_kv_n_blocks(kv) == 3);
    test_cond(llm_kv_n_free(kv) == 3);
    test_cond(llm_kv_block_size(kv) == LLM_KV_BLOCK_SIZE);
    a = llm_kv_alloc(kv);
    b = llm_kv_alloc(kv);
    c = llm_kv_alloc(kv);
    test_cond(a == 0 && b == 1 && c == 2);
    test_cond(llm_kv_alloc(kv) == -1);
    test_cond(llm_kv_n_free(kv) == 0);
    test_cond(llm_kv_refcount(kv, b) == 1);

    test("kv: ref/unref count, the block returns at 0");
    llm_kv_ref(kv, b);
    test_cond(llm_kv_refcount(kv, b) == 2);
    llm_kv_unref(kv, b);
    test_cond(llm_kv_refcount(kv, b) == 1);
    test_cond(llm_kv_n_free(kv) == 0);
    llm_kv_unref(kv, b);
    test_cond(llm_kv_refcount(kv, b) == 0);
    test_cond(llm_kv_n_free(kv) == 1);
    test_cond(llm_kv_alloc(kv) == b);      /* LIFO reuse */
    test_cond(llm_kv_n_free(kv) == 0);

    test("kv: double unref, bad ids and ref of a free block are ignored");
    llm_kv_unref(kv, a);
    test_cond(llm_kv_n_free(kv) == 1);
    llm_kv_unref(kv, a);                   /* already free */
    llm_kv_unref(kv, -1);
    llm_kv_unref(kv, 3);
    llm_kv_unref(kv, INT32_MAX);
    llm_kv_ref(kv, a);                     /* free: must not be revived */
    llm_kv_ref(kv, 99);
    test_cond(llm_kv_n_free(kv) == 1);
    test_cond(llm_kv_refcount(kv, a) == 0);
    test_cond(llm_kv_refcount(kv, -5) == 0);
    test_cond(llm_kv_refcount(kv, 3) == 0);
    test_cond(llm_kv_alloc(kv) == a);
    test_cond(llm_kv_alloc(kv) == -1);     /* handed out once only */
    llm_kv_unref(NULL, 0);
    test_cond(llm_kv_alloc(NULL) == -1);
    llm_kv_blocks_free(kv);
    llm_kv_blocks_free(NULL);

    test("kv: blocks_for rounds up without overflow");
    kv = llm_kv_blocks_new(4, 16, NULL);
    test_cond(llm_kv_blocks_for(kv, 0) == 0);
    test_cond(llm_kv_blocks_for(kv, -7) == 0);
    test_cond(llm_kv_blocks_for(kv, 1) == 1);
    test_cond(llm_kv_blocks_for(kv, 16) == 1);
    test_cond(llm_kv_blocks_for(kv, 17) == 2);
    test_cond(llm_kv_blocks_for(kv, 32) == 2);
    test_cond(llm_kv_blocks_for(kv, INT32_MAX) == (INT32_MAX - 1) / 16 + 1);
    llm_kv_blocks_free(kv);
}


TEST_SUITE(kv_cache_tables)
{
    llm_kv_blocks   *kv;
    llm_block_table  a = { 0 }, b = { 0 }, c = { 0 };
    int32_t          first;
    int              rc;

    kv = llm_kv_blocks_new(10, 16, NULL);
    if (kv == NULL) {
        test("kv tables: pool");
        test_cond(kv != NULL);
        return;
    }

    test("kv tables: ensure grows to cover n tokens, idempotent");
    test_cond(llm_block_table_ensure(kv, &a, 0) == 0 && a.n == 0);
    test_cond(llm_block_table_ensure(kv, &a, 1) == 0 && a.n == 1);
    test_cond(llm_block_table_ensure(kv, &a, 16) == 0 && a.n == 1);
    test_cond(llm_block_table_ensure(kv, &a, 100) == 0 && a.n == 7);
    test_cond(llm_block_table_ensure(kv, &a, 50) == 0 && a.n == 7);
    test_cond(a.cap >= 7);
    test_cond(llm_kv_n_free(kv) == 3);
    test_cond(llm_block_table_ensure(kv, &a, -1) == LLM_EINVAL);
    test_cond(llm_block_table_ensure(kv, NULL, 1) == LLM_EINVAL);

    test("kv tables: all or nothing on a nearly full pool");
    test_cond(llm_block_table_ensure(kv, &b, 16) == 0 && b.n == 1);
    first = b.ids[0];
    rc = llm_block_table_ensure(kv, &b, 16 * 4);    /* 3 more, 2 free */
    test_cond(rc == LLM_EFULL);
    test_cond(b.n == 1 && b.ids[0] == first);
    test_cond(llm_kv_n_free(kv) == 2);
    rc = llm_block_table_ensure(kv, &c, 16 * 3);     /* 3 for a new one */
    test_cond(rc == LLM_EFULL);
    test_cond(c.n == 0 && c.ids == NULL && c.cap == 0);
    test_cond(llm_kv_n_free(kv) == 2);
    test_cond(llm_block_table_ensure(kv, &b, 16 * 3) == 0 && b.n == 3);
    test_cond(llm_kv_n_free(kv) == 0);
    test_cond(llm_block_table_ensure(kv, &c, 1) == LLM_EFULL);

    test("kv tables: clear returns every block and keeps the memory");
    llm_block_table_clear(kv, &a);
    test_cond(a.n == 0 && a.ids != NULL && a.cap >= 7);
    test_cond(llm_kv_n_free(kv) == 7);
    llm_block_table_clear(kv, &b);
    test_cond(llm_kv_n_free(kv) == 10);
    llm_block_table_clear(kv, &b);                  /* twice: no-op */
    test_cond(llm_kv_n_free(kv) == 10);

    test("kv tables: a block shared by two tables is freed after both");
    test_cond(llm_block_table_ensure(kv, &a, 16 * 4) == 0);
    test_cond(kvt_fork(kv, &b, &a) == 0);
    test_cond(llm_block_table_ensure(kv, &b, 16 * 5) == 0);  /* own tail */
    test_cond(llm_kv_n_free(kv) == 5);
    test_cond(llm_kv_refcount(kv, a.ids[0]) == 2);
    test_cond(llm_kv_refcount(kv, b.ids[4]) == 1);
    llm_block_table_clear(kv, &a);
    test_cond(llm_kv_n_free(kv) == 5);              /* still held by b */
    test_cond(llm_kv_refcount(kv, b.ids[0]) == 1);
    llm_block_table_clear(kv, &b);
    test_cond(llm_kv_n_free(kv) == 10);
    test_cond(llm_kv_refcount(kv, 0) == 0);

    llm_block_table_destroy(&a);
    llm_block_table_destroy(&b);
    llm_block_table_destroy(&c);
    test_cond(a.ids == NULL && a.n == 0 && a.cap == 0);
    llm_block_table_destroy(NULL);
    llm_kv_blocks_free(kv);
}


/* The table still starts with the n ids it had. */
static int
kvt_same(const int32_t *before, const llm_block_table *bt, int n)
{
    return n == 0
           || (bt->n >= n
               && memcmp(before, bt->ids, (size_t) n * sizeof(int32_t)) == 0);
}


TEST_SUITE(kv_cache_random)
{
    enum { N_BLOCKS = 384, N_TABLES = 48, N_OPS = 30000 };
    llm_kv_blocks   *kv;
    llm_block_table  bt[N_TABLES];
    int              tokens[N_TABLES];
    int32_t          before[N_BLOCKS];
    int              scratch[N_BLOCKS];
    int              i, j, op, rc, want, n_before, free_before;
    int              bad_acct = 0, bad_result = 0, bad_unchanged = 0;
    long             n_seq = 0, n_full = 0, n_fork = 0;

    test("kv random: accounting over thousands of sequences, no leak");
    kvt_install(-1);
    kvt_rng_state = 12345;
    memset(bt, 0, sizeof(bt));
    memset(tokens, 0, sizeof(tokens));
    kv = llm_kv_blocks_new(N_BLOCKS, 16, NULL);
    test_cond(kv != NULL);
    if (kv == NULL) {
        llm_reset_allocators();
        return;
    }

    for (op = 0; op < N_OPS; op++) {
        i = (int) kvt_rand(N_TABLES);
        switch (kvt_rand(20)) {

        case 0: case 1: case 2:             /* sequence ends */
            llm_block_table_clear(kv, &bt[i]);
            tokens[i] = 0;
            n_seq++;
            break;

        case 3:                             /* ends, memory given back */
            llm_block_table_clear(kv, &bt[i]);
            llm_block_table_destroy(&bt[i]);
            tokens[i] = 0;
            n_seq++;
            break;

        case 4: case 5:                     /* restarts shorter */
            llm_block_table_clear(kv, &bt[i]);
            tokens[i] = 0;
            n_seq++;
            want = (int) kvt_rand(200);
            goto grow;

        case 6:                             /* fork of another sequence */
            j = (int) kvt_rand(N_TABLES);
            if (j == i || bt[i].n != 0) {
                break;
            }
            test_cond(kvt_fork(kv, &bt[i], &bt[j]) == 0);
            tokens[i] = bt[j].n * 16;
            n_fork++;
            break;

        default:                            /* decode / prefill chunk */
            want = tokens[i] + (int) (kvt_rand(4) == 0 ? kvt_rand(300)
                                                       : kvt_rand(3));
        grow:
            n_before = bt[i].n;
            free_before = llm_kv_n_free(kv);
            if (n_before > 0) {
                memcpy(before, bt[i].ids,
                       (size_t) n_before * sizeof(int32_t));
            }
            rc = llm_block_table_ensure(kv, &bt[i], want);
            if (rc == 0) {
                tokens[i] = want > tokens[i] ? want : tokens[i];
                j = llm_kv_blocks_for(kv, want);
                if (bt[i].n != (j > n_before ? j : n_before)) {
                    bad_result++;
                }
                if (!kvt_same(before, &bt[i], n_before)) {
                    bad_unchanged++;            /* old blocks must stay */
                }
            } else {
                n_full++;
                if (rc != LLM_EFULL
                    || llm_kv_blocks_for(kv, want) - n_before <= free_before)
                {
                    bad_result++;
                }
                if (bt[i].n != n_before || llm_kv_n_free(kv) != free_before
                    || !kvt_same(before, &bt[i], n_before))
                {
                    bad_unchanged++;
                }
            }
            break;
        }
        if (!kvt_consistent(kv, bt, N_TABLES, scratch)) {
            bad_acct++;
        }
    }
    test_cond(bad_acct == 0);
    test_cond(bad_result == 0);
    test_cond(bad_unchanged == 0);
    test_cond(n_seq > 3000);
    test_cond(n_full > 100);                /* the pool did run short */
    test_cond(n_fork > 100);

    for (i = 0; i < N_TABLES; i++) {
        llm_block_table_clear(kv, &bt[i]);
    }
    test_cond(llm_kv_n_free(kv) == N_BLOCKS);
    for (i = 0; i < N_BLOCKS; i++) {
        if (llm_kv_refcount(kv, i) != 0) {
            bad_acct++;
        }
    }
    test_cond(bad_acct == 0);
    for (i = 0; i < N_TABLES; i++) {
        llm_block_table_destroy(&bt[i]);
    }
    llm_kv_blocks_free(kv);
    test_cond(kvt_live == 0);
    llm_reset_allocators();
}


/* One life of a pool; returns 1 when it ran to the end, 0 when an
 * allocation failed (after checking that the failure changed nothing). */
static int
kvt_scenario(int *bad)
{
    llm_kv_blocks   *kv;
    llm_block_table  bt[3];
    llm_err          err;
    int              i, k, rc, n_before, free_before, done = 0;

    memset(bt, 0, sizeof(bt));
    memset(&err, 0, sizeof(err));
    kv = llm_kv_blocks_new(200, 16, &err);
    if (kv == NULL) {
        *bad += err.code != LLM_ENOMEM;
        return 0;
    }
    for (k = 1; k <= 60; k++) {
        for (i = 0; i < 3; i++) {
            n_before = bt[i].n;
            free_before = llm_kv_n_free(kv);
            rc = llm_block_table_ensure(kv, &bt[i], k * 16);
            if (rc != 0) {
                *bad += rc != LLM_ENOMEM;
                *bad += bt[i].n != n_before;
                *bad += llm_kv_n_free(kv) != free_before;
                goto out;
            }
        }
        if (k == 30) {
            llm_block_table_clear(kv, &bt[1]);
            llm_block_table_destroy(&bt[1]);
        }
    }
    done = 1;

out:
    for (i = 0; i < 3; i++) {
        llm_block_table_clear(kv, &bt[i]);
        llm_block_table_destroy(&bt[i]);
    }
    *bad += llm_kv_n_free(kv) != 200;
    llm_kv_blocks_free(kv);
    return done;
}


TEST_SUITE(kv_cache_nomem)
{
    long n;
    int  bad = 0, leaks = 0, completed = 0;

    test("kv nomem: every allocation failure is clean and leaks nothing");
    for (n = 0; n < 200 && !completed; n++) {
        kvt_install(n);
        completed = kvt_scenario(&bad);
        leaks += kvt_live != 0;
    }
    llm_reset_allocators();
    test_cond(completed);
    test_cond(n > 5);               /* several distinct failure points */
    test_cond(bad == 0);
    test_cond(leaks == 0);
}
