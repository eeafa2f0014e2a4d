/*
 * The prefix cache: block tagging, reuse and LRU eviction in kv_cache.c
 * (against a simple reference model under random operations), the hash
 * chain of prefix_cache.c, and the engine reusing blocks with outputs
 * identical to the uncached ones (whole, partial and shared-namespace
 * hits; no hit across namespaces or adapters; eviction under pressure).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "engine/prefix_cache.h"
#include "test.h"

#define F32_MODEL   ".models/smollm2-135m-f32.gguf"


static void
fake_hash(uint8_t h[32], uint32_t k)
{
    int i;

    /* the slot index is taken from the first bytes: many collisions on
     * purpose (k % 7) to exercise probing and backward-shift deletion */
    memset(h, 0, 32);
    h[0] = (uint8_t) (k % 7);
    for (i = 4; i < 8; i++) {
        h[i] = (uint8_t) (k >> (8 * (i - 4)));
    }
}


TEST_SUITE(prefix_kv_blocks)
{
    llm_kv_blocks      *kv;
    llm_kv_cache_stats  cs;
    uint8_t             h[32];
    int32_t             a, b, c, d;

    test("a released tagged block stays reusable and revives by hash");
    kv = llm_kv_blocks_new(4, 16, NULL);
    test_cond(kv != NULL);
    if (kv == NULL) {
        return;
    }
    a = llm_kv_alloc(kv);
    b = llm_kv_alloc(kv);
    fake_hash(h, 1);
    test_cond(llm_kv_cache_put(kv, a, h) == 1);
    test_cond(llm_kv_cache_put(kv, b, h) == 0);      /* hash taken */
    fake_hash(h, 2);
    test_cond(llm_kv_cache_put(kv, a, h) == 0);      /* already tagged */
    test_cond(llm_kv_cache_has(kv, h) == 0);
    fake_hash(h, 1);
    test_cond(llm_kv_cache_get(kv, h) == a && llm_kv_refcount(kv, a) == 2);
    llm_kv_unref(kv, a);
    llm_kv_unref(kv, a);
    llm_kv_unref(kv, b);
    /* a is reusable, b free: both count as available */
    test_cond(llm_kv_n_free(kv) == 4);
    llm_kv_cache_get_stats(kv, &cs);
    test_cond(cs.tagged == 1 && cs.reusable == 1);
    test_cond(llm_kv_cache_get(kv, h) == a && llm_kv_refcount(kv, a) == 1);
    llm_kv_cache_get_stats(kv, &cs);
    test_cond(cs.reusable == 0 && llm_kv_n_free(kv) == 3);
    llm_kv_unref(kv, a);

    test("allocation takes free blocks first, then the least recent "
         "reusable one");
    c = llm_kv_alloc(kv);
    d = llm_kv_alloc(kv);
    b = llm_kv_alloc(kv);
    test_cond(c != a && d != a && b != a);
    test_cond(llm_kv_cache_has(kv, h));
    fake_hash(h, 5);
    test_cond(llm_kv_cache_put(kv, c, h) == 1);
    fake_hash(h, 6);
    test_cond(llm_kv_cache_put(kv, d, h) == 1);
    llm_kv_unref(kv, d);                /* released before c */
    llm_kv_unref(kv, c);
    /* LRU order now: a (hash 1), d (6), c (5); b in use, nothing free */
    test_cond(llm_kv_alloc(kv) == a);
    fake_hash(h, 1);
    test_cond(!llm_kv_cache_has(kv, h));
    test_cond(llm_kv_alloc(kv) == d);
    test_cond(llm_kv_alloc(kv) == c);
    test_cond(llm_kv_alloc(kv) == -1);
    llm_kv_cache_get_stats(kv, &cs);
    test_cond(cs.tagged == 0 && cs.evictions == 3);
    llm_kv_blocks_free(kv);

    test("random operations agree with a reference model; no block in use "
         "is ever evicted");
    {
        enum { N = 48, K = 200 };
        int32_t  refs[N], holder[K];
        int      tag_of[N];       /* key tagged on block, or -1 */
        uint64_t x = 12345;
        int      it, i, ok = 1, n_used = 0;
        int32_t  used[4096];

        kv = llm_kv_blocks_new(N, 16, NULL);
        for (i = 0; i < N; i++) {
            refs[i] = 0;
            tag_of[i] = -1;
        }
        for (i = 0; i < K; i++) {
            holder[i] = -1;
        }
        for (it = 0; it < 20000 && ok; it++) {
            int op, k;

            x = x * 6364136223846793005ull + 1442695040888963407ull;
            op = (int) ((x >> 33) % 4);
            k = (int) ((x >> 40) % K);
            if (op == 0 && n_used < 4096) {             /* alloc */
                int32_t id = llm_kv_alloc(kv);
                if (id >= 0) {
                    ok &= refs[id] == 0;        /* never one in use */
                    if (tag_of[id] >= 0) {
                        holder[tag_of[id]] = -1;        /* evicted */
                        tag_of[id] = -1;
                    }
                    refs[id] = 1;
                    used[n_used++] = id;
                }
            } else if (op == 1 && n_used > 0) {         /* tag one */
                int32_t id = used[(x >> 20) % (uint64_t) n_used];
                fake_hash(h, (uint32_t) k);
                if (llm_kv_cache_put(kv, id, h)) {
                    ok &= tag_of[id] < 0 && holder[k] < 0;
                    tag_of[id] = k;
                    holder[k] = id;
                } else {
                    ok &= tag_of[id] >= 0 || holder[k] >= 0;
                }
            } else if (op == 2 && n_used > 0) {         /* release */
                int j = (int) ((x >> 20) % (uint64_t) n_used);
                int32_t id = used[j];
                used[j] = used[--n_used];
                llm_kv_unref(kv, id);
                refs[id]--;
            } else if (op == 3 && n_used < 4096) {      /* get */
                int32_t id;
                fake_hash(h, (uint32_t) k);
                id = llm_kv_cache_get(kv, h);
                ok &= id == holder[k];
                if (id >= 0) {
                    refs[id]++;
                    used[n_used++] = id;
                }
            }
            for (i = 0; i < N && ok; i++) {
                ok &= llm_kv_refcount(kv, i) == refs[i];
            }
        }
        test_cond(ok);
        for (i = 0; i < n_used; i++) {
            llm_kv_unref(kv, used[i]);
        }
        test_cond(llm_kv_n_free(kv) == N);
        llm_kv_blocks_free(kv);
    }
}


TEST_SUITE(prefix_hash_chain)
{
    uint8_t fp[32], fp2[32], v[32], a[32], b[32], c[32], p[32];
    int32_t t[16];
    int     i;

    test("the name of a block depends on every part of its tuple");
    for (i = 0; i < 16; i++) {
        t[i] = 1000 + i;
    }
    memset(v, 7, sizeof(v));
    llm_prefix_fingerprint((const uint8_t *) "0123456789abcdef0123456789abcdef",
                           1, 16, fp);
    llm_prefix_fingerprint((const uint8_t *) "0123456789abcdef0123456789abcdef",
                           0, 16, fp2);
    test_cond(memcmp(fp, fp2, 32) != 0);        /* KV dtype counts */
    llm_prefix_block_hash(fp, NULL, "acme", NULL, t, 16, a);
    llm_prefix_block_hash(fp, NULL, "acme", NULL, t, 16, b);
    test_cond(memcmp(a, b, 32) == 0);
    llm_prefix_block_hash(fp2, NULL, "acme", NULL, t, 16, b);
    test_cond(memcmp(a, b, 32) != 0);
    llm_prefix_block_hash(fp, v, "acme", NULL, t, 16, b);
    test_cond(memcmp(a, b, 32) != 0);           /* adapter */
    llm_prefix_block_hash(fp, NULL, "acmf", NULL, t, 16, b);
    test_cond(memcmp(a, b, 32) != 0);           /* namespace */
    llm_prefix_block_hash(fp, NULL, "", NULL, t, 16, b);
    test_cond(memcmp(a, b, 32) != 0);
    memset(p, 0, sizeof(p));
    llm_prefix_block_hash(fp, NULL, "acme", p, t, 16, b);
    test_cond(memcmp(a, b, 32) != 0);           /* parent (even zeros) */
    t[15]++;
    llm_prefix_block_hash(fp, NULL, "acme", NULL, t, 16, b);
    test_cond(memcmp(a, b, 32) != 0);           /* tokens */
    t[15]--;

    test("length prefixes: moving bytes between fields changes the name");
    llm_prefix_block_hash(fp, NULL, "ab", NULL, t, 16, b);
    llm_prefix_block_hash(fp, NULL, "a", NULL, t, 16, c);
    test_cond(memcmp(b, c, 32) != 0);
    llm_prefix_block_hash(fp, NULL, "acme", NULL, t, 15, b);
    test_cond(memcmp(a, b, 32) != 0);
}


/* ---- the engine --------------------------------------------------- */

typedef struct {
    int32_t     out[8][64];
    int         n_out[8];
    int         cached[8];
    int         done[8];
    uint64_t    id[8];
    int         n;
} pc_run;


static void
pc_event(void *ud, const llm_event *ev)
{
    pc_run *r = ud;
    int     i;

    for (i = 0; i < r->n; i++) {
        if (r->id[i] != ev->seq_id) {
            continue;
        }
        if (ev->type == LLM_EV_TOKEN && r->n_out[i] < 64) {
            r->out[i][r->n_out[i]++] = ev->sample.token;
        } else if (ev->type == LLM_EV_DONE) {
            r->done[i] = ev->finish;
            r->cached[i] = ev->n_cached;
        }
    }
}


static llm_engine *
pc_engine(const char *model, size_t kv_memory, int cache_off,
          const char *adapters)
{
    llm_engine_params p;
    llm_err           err = { 0, "" };
    llm_engine       *e;

    memset(&p, 0, sizeof(p));
    p.model_path = model;
    p.max_seqs = 8;
    p.max_step_tokens = 128;
    p.kv_memory = kv_memory;
    p.prefix_cache_off = cache_off;
    p.adapter_dir = adapters;
    e = llm_engine_new(&p, &err);
    if (e == NULL) {
        printf("       engine: %s\n", err.msg);
    }
    return e;
}


/* Runs one request to the end: its tokens in r slot r->n. */
static int
pc_one(llm_engine *e, pc_run *r, const int32_t *ids, int n, int max_tokens,
       const char *ns, const char *shared_ns, int shared_tokens,
       const char *adapter)
{
    llm_request req;
    llm_err     err = { 0, "" };
    int         i = r->n, guard = 0;

    memset(&req, 0, sizeof(req));
    req.prompt = ids;
    req.n_prompt = n;
    req.max_tokens = max_tokens;
    llm_sampling_default(&req.sampling);
    req.ignore_eos = 1;
    req.cache_namespace = ns;
    req.cache_shared_namespace = shared_ns;
    req.cache_shared_tokens = shared_tokens;
    req.adapter = adapter;
    if (llm_engine_submit(e, &req, &r->id[i], &err) != 0) {
        printf("       submit: %s\n", err.msg);
        return -1;
    }
    r->n++;
    while (!llm_engine_idle(e) && guard < 100000) {
        if (llm_engine_step(e, pc_event, r, NULL) != 0) {
            return -1;
        }
        if (llm_engine_stalled(e)) {
            usleep(1000);       /* an adapter loading */
        } else {
            guard++;
        }
    }
    return r->done[i] == LLM_FINISH_LENGTH ? 0 : -1;
}


static void
pc_prompt(int32_t *ids, int n, uint64_t seed)
{
    int i;

    for (i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int32_t) (200 + (seed >> 33) % 40000);
    }
}


TEST_SUITE(prefix_engine)
{
    const char      *model = llm_test_default_model();
    llm_engine      *e, *ref;
    llm_engine_stats st;
    static pc_run    r, w;
    int32_t          p[200], q[200];
    int              i, same;

    test("a repeated prompt reuses its blocks; tokens identical to an "
         "engine without the cache");
    if (model == NULL) {
        test_skip("needs the default model");
        return;
    }
    e = pc_engine(model, (size_t) 64 << 20, 0, NULL);
    ref = pc_engine(model, (size_t) 64 << 20, 1, NULL);
    test_cond(e != NULL && ref != NULL);
    if (e == NULL || ref == NULL) {
        llm_engine_free(e);
        llm_engine_free(ref);
        return;
    }
    pc_prompt(p, 150, 1);
    memset(&r, 0, sizeof(r));
    memset(&w, 0, sizeof(w));
    test_cond(pc_one(ref, &w, p, 150, 12, "t1", NULL, 0, NULL) == 0);
    test_cond(pc_one(e, &r, p, 150, 12, "t1", NULL, 0, NULL) == 0);
    test_cond(pc_one(e, &r, p, 150, 12, "t1", NULL, 0, NULL) == 0);
    test_cond(w.cached[0] == 0 && r.cached[0] == 0);
    /* 9 full blocks of the 149 tokens before the last one */
    test_cond(r.cached[1] == 144);
    test_cond(memcmp(r.out[0], w.out[0], 12 * 4) == 0);
    test_cond(memcmp(r.out[1], w.out[0], 12 * 4) == 0);

    test("a prompt of whole blocks keeps its last block to compute");
    memset(&r, 0, sizeof(r));
    memset(&w, 0, sizeof(w));
    test_cond(pc_one(ref, &w, p, 64, 8, "t1", NULL, 0, NULL) == 0);
    test_cond(pc_one(e, &r, p, 64, 8, "t1", NULL, 0, NULL) == 0);
    test_cond(r.cached[0] == 48);       /* blocks 0-2 of the 150 above */
    test_cond(pc_one(e, &r, p, 64, 8, "t1", NULL, 0, NULL) == 0);
    test_cond(r.cached[1] == 48);
    test_cond(memcmp(r.out[0], w.out[0], 8 * 4) == 0
              && memcmp(r.out[1], w.out[0], 8 * 4) == 0);

    test("a partial prefix hit: shared blocks, then its own tokens");
    memcpy(q, p, sizeof(q));
    q[70] += 1;                         /* differs inside block 4 */
    memset(&r, 0, sizeof(r));
    memset(&w, 0, sizeof(w));
    test_cond(pc_one(ref, &w, q, 120, 12, "t1", NULL, 0, NULL) == 0);
    test_cond(pc_one(e, &r, q, 120, 12, "t1", NULL, 0, NULL) == 0);
    test_cond(r.cached[0] == 64);
    test_cond(memcmp(r.out[0], w.out[0], 12 * 4) == 0);

    test("another namespace gets no hit; a shared namespace covers only "
         "the shared part");
    memset(&r, 0, sizeof(r));
    test_cond(pc_one(e, &r, p, 150, 4, "t2", NULL, 0, NULL) == 0);
    test_cond(r.cached[0] == 0);
    /* tenant t3 declares the first 40 tokens public (2 whole blocks) */
    test_cond(pc_one(e, &r, p, 150, 4, "t3", "pub", 40, NULL) == 0);
    test_cond(r.cached[1] == 0);
    /* t4: same public prefix, its own private rest */
    test_cond(pc_one(e, &r, p, 150, 4, "t4", "pub", 40, NULL) == 0);
    test_cond(r.cached[2] == 32);
    test_cond(pc_one(e, &r, p, 150, 4, "t4", "pub", 40, NULL) == 0);
    test_cond(r.cached[3] == 144);
    test_cond(memcmp(r.out[1], r.out[2], 4 * 4) == 0
              && memcmp(r.out[2], r.out[3], 4 * 4) == 0
              && memcmp(r.out[0], r.out[3], 4 * 4) == 0);
    llm_engine_get_stats(e, &st);
    printf("       %d blocks cached (%d reusable), %llu hit tokens in "
           "%llu lookups\n", st.prefix_blocks_cached,
           st.prefix_blocks_reusable,
           (unsigned long long) st.prefix_hit_tokens,
           (unsigned long long) st.prefix_lookups);
    test_cond(st.kv_blocks_used == 0 && st.prefix_blocks_reusable > 0);
    llm_engine_free(e);

    test("under a small KV budget cached blocks are evicted, outputs "
         "stay identical and no block leaks");
    /* 24 blocks: three prompts of 10 blocks each cannot all stay */
    e = pc_engine(model, (size_t) 24 * 368640, 0, NULL);
    test_cond(e != NULL);
    if (e != NULL) {
        static pc_run a;
        int32_t       ps[3][170];

        memset(&a, 0, sizeof(a));
        memset(&w, 0, sizeof(w));
        for (i = 0; i < 3; i++) {
            pc_prompt(ps[i], 170, 10 + (uint64_t) i);
            test_cond(pc_one(ref, &w, ps[i], 170, 6, "", NULL, 0, NULL)
                      == 0);
        }
        same = 0;
        for (i = 0; i < 6; i++) {
            if (pc_one(e, &a, ps[i % 3], 170, 6, "", NULL, 0, NULL) == 0) {
                same += memcmp(a.out[i], w.out[i % 3], 6 * 4) == 0;
            }
        }
        test_cond(same == 6);
        llm_engine_get_stats(e, &st);
        printf("       %llu evictions\n",
               (unsigned long long) st.prefix_evictions);
        test_cond(st.prefix_evictions > 0 && st.kv_blocks_used == 0);
        llm_engine_free(e);
    }
    llm_engine_free(ref);
}


TEST_SUITE(prefix_engine_adapters)
{
    const char *model = llm_test_default_model();
    char        dir[512], cmd[1024];
    llm_engine *e;
    static pc_run r;
    int32_t     p[100];

    test("the same prompt under two adapters and the base never shares a "
         "block");
    if (model == NULL || access(F32_MODEL, R_OK) != 0) {
        test_skip("needs the default model and " F32_MODEL);
        return;
    }
    snprintf(dir, sizeof(dir), "%s/prefix-lora", llm_test_tmp_dir());
    snprintf(cmd, sizeof(cmd), "python3 tools/make_lora.py --base %s "
             "--out %s/a --rank 4 --targets q,k,v --seed 1 >/dev/null 2>&1 "
             "&& python3 tools/make_lora.py --base %s --out %s/b --rank 8 "
             "--targets k,v --seed 2 >/dev/null 2>&1", F32_MODEL, dir,
             F32_MODEL, dir);
    if (system(cmd) != 0) {
        test_skip("tools/make_lora.py failed");
        return;
    }
    e = pc_engine(model, (size_t) 64 << 20, 0, dir);
    test_cond(e != NULL);
    if (e == NULL) {
        return;
    }
    pc_prompt(p, 100, 3);
    memset(&r, 0, sizeof(r));
    test_cond(pc_one(e, &r, p, 100, 6, "", NULL, 0, "a") == 0);
    test_cond(pc_one(e, &r, p, 100, 6, "", NULL, 0, "b") == 0);
    test_cond(pc_one(e, &r, p, 100, 6, "", NULL, 0, NULL) == 0);
    test_cond(r.cached[0] == 0 && r.cached[1] == 0 && r.cached[2] == 0);
    test_cond(pc_one(e, &r, p, 100, 6, "", NULL, 0, "a") == 0);
    test_cond(r.cached[3] == 96);
    test_cond(memcmp(r.out[0], r.out[3], 6 * 4) == 0);
    test_cond(memcmp(r.out[0], r.out[2], 6 * 4) != 0);

    test("a reloaded adapter (new content) does not reuse the old blocks");
    snprintf(cmd, sizeof(cmd), "python3 tools/make_lora.py --base %s "
             "--out %s/a --rank 4 --targets q,k,v --seed 5 >/dev/null 2>&1",
             F32_MODEL, dir);
    test_cond(system(cmd) == 0);
    test_cond(llm_engine_adapter_load(e, "a", NULL, NULL, NULL) == 0);
    test_cond(pc_one(e, &r, p, 100, 6, "", NULL, 0, "a") == 0);
    test_cond(r.cached[4] == 0);
    test_cond(memcmp(r.out[0], r.out[4], 6 * 4) != 0);
    llm_engine_free(e);
}
