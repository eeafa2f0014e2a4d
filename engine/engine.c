/*
 * The engine (see engine.h): sequences, one step = plan (scheduler.c),
 * build the batch, run the model (forward.c), sample (sampler.c), emit
 * events, retire finished sequences.
 */
#include "engine.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "forward.h"
#include "kv_cache.h"
#include "kv_tier.h"
#include "prefix_cache.h"
#include "../adapters/device_pool.h"
#include "../adapters/loader.h"
#include "../adapters/lora.h"
#include "../adapters/registry.h"
#include "scheduler.h"
#include "tokenizer.h"


struct llm_engine {
    llm_engine_params   p;
    llm_backend        *be;
    llm_model          *model;
    llm_tokenizer      *tok;
    llm_forward         fw;
    llm_kv_blocks      *kv;
    llm_scheduler       sched;
    llm_lora_registry  *reg;            /* adapters: names, host cache */
    llm_lora_pool      *pool;           /* adapters: device copies */
    llm_lora_span      *spans;          /* [max_seqs] per-step scratch */
    int                 n_ctx;
    uint64_t            next_id;

    /* sequences cancelled since the last step: their DONE is pending */
    llm_seq_list        cancelled;
    /* sequences that failed while waiting (adapter load): likewise */
    llm_seq_list        failed;
    llm_lora_loader    *loader;         /* adapter loads, in background */

    /* per-step scratch, host memory */
    llm_seq           **plan;           /* [max_seqs] */
    int32_t            *tokens;         /* [cap_tokens] */
    int32_t            *pos;            /* [cap_tokens] */
    int32_t            *tok_seq;        /* [cap_tokens] */
    int32_t            *seq_start;      /* [max_seqs + 1] */
    int32_t            *seq_kv_len;     /* [max_seqs] */
    int32_t            *block_table;    /* [max_seqs, max_blocks] */
    int                 max_blocks;
    int32_t            *out_rows;       /* [cap_out] */
    int32_t            *out_seq;        /* [cap_out] seq index, or -1 */
    int32_t            *out_pos;        /* [cap_out] position of the row */
    float              *logits;         /* [cap_out, n_vocab], or NULL
                                           where the backend's logits
                                           are read in place */

    /* prefix cache: blocks named by hash chains over this fingerprint;
     * the Redis tier (may be NULL) and a host block for its writes */
    int                 cache_on;
    uint8_t             cache_fp[32];
    llm_kv_tier        *tier;
    size_t              block_bytes;    /* one KV block, every layer */
    size_t              tier_payload;
    uint8_t            *tier_block;     /* [tier_payload] */
    uint64_t            tier_wait_ns;   /* longest wait for a lookup */
    int                 stalled;
    pthread_mutex_t     wake_mu;        /* guards wake, called from the
                                           tier thread */
    void              (*wake)(void *ud);
    void               *wake_ud;

    llm_engine_stats    stats;
};


/* ---- sequences ---------------------------------------------------- */

static void
seq_free(llm_engine *e, llm_seq *s)
{
    if (s == NULL) {
        return;
    }
    if (s->lora_dev != NULL) {
        llm_lora_pool_release(e->pool, &s->lora);
    }
    if (s->lora.lora != NULL) {
        llm_lora_registry_release(e->reg, &s->lora);
    }
    llm_block_table_destroy(&s->bt);
    llm_free(s->lora_name);
    llm_free(s->error);
    llm_free(s->cache_ns);
    llm_free(s->cache_shared_ns);
    llm_free(s->hashes);
    llm_sampler_free(s->sampler);
    llm_free(s->tokens);
    llm_free(s->stop_ids);
    llm_free(s);
}


static int
seq_is_stop(const llm_engine *e, const llm_seq *s, int32_t tok)
{
    int i;

    if (!s->ignore_eos && llm_tokenizer_is_eog(e->tok, tok)) {
        return 1;
    }
    for (i = 0; i < s->n_stop_ids; i++) {
        if (s->stop_ids[i] == tok) {
            return 1;
        }
    }
    return 0;
}


static llm_seq *engine_find(llm_engine *e, uint64_t id);


/* ---- prefix cache ------------------------------------------------- */

/* The chain hash of block j of s (its tokens must exist). */
static const uint8_t *
seq_hash(llm_engine *e, llm_seq *s, int j)
{
    const int B = LLM_KV_BLOCK_SIZE;

    while (s->n_hashes <= j) {
        int         k = s->n_hashes;
        const char *ns = (k + 1) * B <= s->cache_shared_tokens
                         ? s->cache_shared_ns : s->cache_ns;

        llm_prefix_block_hash(e->cache_fp,
                              s->lora.lora != NULL ? s->lora.lora->version
                                                   : NULL,
                              ns, k > 0 ? s->hashes[k - 1] : NULL,
                              s->tokens + (size_t) k * B, B, s->hashes[k]);
        s->n_hashes++;
    }
    return s->hashes[j];
}


/* Blocks of s that may come from the cache: full ones, leaving at least
 * the last token to compute (its logits are needed). */
static int
seq_cacheable_blocks(const llm_seq *s)
{
    return (s->n_tokens - 1) / LLM_KV_BLOCK_SIZE;
}


/* Scheduler hook at admission: the longest cached chain of s's tokens
 * becomes the start of its block table. */
static void
engine_attach(void *ud, llm_seq *s)
{
    llm_engine *e = ud;
    int         j, n_max;
    int32_t     id;

    s->n_registered = 0;
    if (!s->cache) {
        return;
    }
    n_max = seq_cacheable_blocks(s);
    for (j = 0; j < n_max; j++) {
        id = llm_kv_cache_get(e->kv, seq_hash(e, s, j));
        if (id < 0) {
            break;
        }
        if (llm_block_table_push(&s->bt, id) != 0) {
            llm_kv_unref(e->kv, id);
            break;
        }
    }
    s->n_computed = j * LLM_KV_BLOCK_SIZE;
    s->n_registered = j;
}


/* After a step: tags the blocks s has filled, and sends new prompt
 * blocks to the Redis tier. */
static void
engine_register_blocks(llm_engine *e, llm_seq *s)
{
    const int B = LLM_KV_BLOCK_SIZE;
    int       j, full = s->n_computed / B;

    if (!s->cache) {
        return;
    }
    for (j = s->n_registered; j < full && j < s->bt.n; j++) {
        const uint8_t *h = seq_hash(e, s, j);

        if (llm_kv_cache_put(e->kv, s->bt.ids[j], h) && e->tier != NULL
            && (j + 1) * B <= s->n_prompt
            && e->be->ops->kv_block_to_host(e->be, &e->fw.kv, s->bt.ids[j],
                                            e->tier_block) == 0)
        {
            /* a full queue drops it (counted by the tier) */
            (void) llm_kv_tier_put(e->tier, h, e->tier_block);
        }
    }
    s->n_registered = full;
}


/* Waiting sequences not asked yet: if their chain goes beyond what is
 * cached here, ask Redis for the rest; they wait (the rest runs) until
 * the answer or a deadline. */
static void
engine_tier_lookups(llm_engine *e)
{
    llm_seq *s;
    int      k, n, n_max;

    for (s = e->sched.waiting.head; s != NULL; s = s->next) {
        /* (the hashes name the adapter's version: pinned first) */
        if (!s->cache || s->tier_asked || s->lora_pending
            || s->n_computed > 0 || s->bt.n > 0)
        {
            continue;
        }
        s->tier_asked = 1;
        n_max = seq_cacheable_blocks(s);
        for (k = 0; k < n_max && llm_kv_cache_has(e->kv, seq_hash(e, s, k));
             k++)
        {
            /* the local part */
        }
        if (k == n_max) {
            continue;
        }
        n = n_max - k;
        if (n > LLM_KV_TIER_MAX_LOOKUP) {
            n = LLM_KV_TIER_MAX_LOOKUP;
        }
        (void) seq_hash(e, s, k + n - 1);
        if (llm_kv_tier_lookup(e->tier, s->id,
                               (const uint8_t (*)[32]) s->hashes + k, n)
            == 0)
        {
            s->tier_pending = 1;
            s->tier_first = k;
            s->tier_deadline_ns = llm_now_ns() + e->tier_wait_ns;
        }
    }
}


/* Finished lookups: valid blocks go into free (or evicted) blocks of the
 * pool, tagged and reusable, so that admission finds them locally. */
static void
engine_tier_results(llm_engine *e)
{
    llm_kv_tier_result r;
    llm_seq           *s;
    uint64_t           now;
    int                i;
    int32_t            id;

    while (llm_kv_tier_poll(e->tier, &r) == 1) {
        s = engine_find(e, r.tag);      /* NULL: cancelled meanwhile */
        for (i = 0; s != NULL && s->tier_pending && i < r.n_found; i++) {
            const uint8_t *h = s->hashes[s->tier_first + i];

            if (llm_kv_cache_has(e->kv, h)) {
                continue;
            }
            id = llm_kv_alloc(e->kv);
            if (id < 0) {
                break;
            }
            if (e->be->ops->kv_block_from_host(e->be, &e->fw.kv, id,
                                               r.payloads
                                               + (size_t) i
                                                 * e->tier_payload) != 0)
            {
                llm_kv_unref(e->kv, id);
                break;
            }
            (void) llm_kv_cache_put(e->kv, id, h);
            llm_kv_unref(e->kv, id);        /* reusable until admitted */
            e->stats.prefix_tier_hit_tokens += LLM_KV_BLOCK_SIZE;
        }
        if (s != NULL) {
            s->tier_pending = 0;
        }
        llm_kv_tier_result_free(&r);
    }

    /* an answer that is late is not waited for: compute instead */
    now = llm_now_ns();
    for (s = e->sched.waiting.head; s != NULL; s = s->next) {
        if (s->tier_pending && now > s->tier_deadline_ns) {
            s->tier_pending = 0;
        }
    }
}


/* From the tier or adapter loader thread: work finished. */
static void
engine_wake_cb(void *ud)
{
    llm_engine *e = ud;

    pthread_mutex_lock(&e->wake_mu);
    if (e->wake != NULL) {
        e->wake(e->wake_ud);
    }
    pthread_mutex_unlock(&e->wake_mu);
}


void
llm_engine_set_wake(llm_engine *e, void (*wake)(void *ud), void *ud)
{
    pthread_mutex_lock(&e->wake_mu);
    e->wake = wake;
    e->wake_ud = ud;
    pthread_mutex_unlock(&e->wake_mu);
}


/* ---- life cycle --------------------------------------------------- */

/* LLM_ADAPTER_*: its name, and the device pool's element type */
static const struct {
    const char *name;
    int         pool_type;
} adapter_dtypes[] = {
    [LLM_ADAPTER_DEFAULT] = { "auto", 0 },
    [LLM_ADAPTER_F32] = { "f32", LLM_F32 },
    [LLM_ADAPTER_F16] = { "f16", LLM_F16 },
    [LLM_ADAPTER_INT8] = { "int8", LLM_LORA_I8 },
};


int
llm_adapter_dtype_parse(const char *s)
{
    int d;

    for (d = LLM_ADAPTER_DEFAULT; d <= LLM_ADAPTER_INT8; d++) {
        if (strcmp(s, adapter_dtypes[d].name) == 0) {
            return d;
        }
    }
    return -1;
}


const char *
llm_adapter_dtype_name(int d)
{
    return d >= LLM_ADAPTER_DEFAULT && d <= LLM_ADAPTER_INT8
           ? adapter_dtypes[d].name : "?";
}


/* Whether every projection of every layer holds fewer than 8 bits per
 * weight (Q4_*, Q5_K, Q6_K): then the base's own rounding, and its 8-bit
 * activations, swamp what an int8 copy of an adapter changes (bench/
 * RESULTS.md: on SmolLM2 Q4_1 the f16 and int8 copies agree with the
 * exact model equally often), and half the bytes per step are worth
 * having. */
static int
base_below_8_bits(const llm_model *m)
{
    int l, i;

    for (l = 0; l < m->cfg.n_layers; l++) {
        const llm_layer_weights *w = &m->layers[l];
        const llm_tensor        *proj[] = { &w->wq, &w->wk, &w->wv, &w->wo,
                                            &w->w_gate, &w->w_up,
                                            &w->w_down };

        for (i = 0; i < (int) (sizeof(proj) / sizeof(proj[0])); i++) {
            const llm_dtype_info *ti = llm_dtype_get(proj[i]->type);

            if (ti == NULL || !ti->is_quant
                || ti->type_size * 8 >= (size_t) 8 * ti->block)
            {
                return 0;
            }
        }
    }
    return 1;
}


/* The LLM_ADAPTER_* of the pool's copies. */
static int
adapter_dtype_of_pool(const llm_lora_pool *pool)
{
    int d;

    for (d = LLM_ADAPTER_F32; d <= LLM_ADAPTER_INT8; d++) {
        if (adapter_dtypes[d].pool_type == llm_lora_pool_type(pool)) {
            break;
        }
    }
    return d;
}


/* The adapter copies' LLM_ADAPTER_* for the asked one (DEFAULT: auto). */
static int
adapter_dtype_pick(const llm_engine *e, int asked)
{
    if (asked != LLM_ADAPTER_DEFAULT) {
        return asked;
    }
    if (e->be->ops->lora_i8 && base_below_8_bits(e->model)) {
        return LLM_ADAPTER_INT8;
    }
    return e->be->ops->lora_f16 ? LLM_ADAPTER_F16 : LLM_ADAPTER_F32;
}


int
llm_kv_type_parse(const char *name)
{
    return strcmp(name, "f16") == 0 ? LLM_F16
           : strcmp(name, "f32") == 0 ? LLM_F32
           : strcmp(name, "q8_0") == 0 ? LLM_Q8_0 : -1;
}


const char *
llm_kv_type_name(int type)
{
    return type == LLM_F32 ? "f32" : type == LLM_Q8_0 ? "q8_0" : "f16";
}


llm_engine *
llm_engine_new(const llm_engine_params *p, llm_err *err)
{
    llm_engine       *e;
    size_t            block_bytes;
    int               n_blocks, cap_tokens, cap_out, n_vocab;
    const char       *device;

    e = llm_calloc(1, sizeof(*e));
    if (e == NULL) {
        llm_err_set(err, LLM_ENOMEM, "out of memory");
        return NULL;
    }
    e->p = *p;
    pthread_mutex_init(&e->wake_mu, NULL);
    e->wake = p->wake;
    e->wake_ud = p->wake_ud;
    if (e->p.kv_memory == 0) {
        e->p.kv_memory = (size_t) 256 << 20;
    }
    if (e->p.kv_type != LLM_F32 && e->p.kv_type != LLM_Q8_0) {
        e->p.kv_type = LLM_F16;
    }
    if (e->p.max_seqs <= 0) {
        e->p.max_seqs = 64;
    }
    if (e->p.max_step_tokens <= 0) {
        e->p.max_step_tokens = 512;
    }
    if (e->p.max_step_tokens < e->p.max_seqs) {
        e->p.max_step_tokens = e->p.max_seqs;
    }
    device = e->p.device != NULL ? e->p.device : "cpu";

    e->be = llm_backend_open(device, e->p.n_threads, err);
    if (e->be == NULL) {
        goto failed;
    }
    e->model = llm_model_load(p->model_path, e->be, p->progress,
                              p->progress_ud, err);
    if (e->model == NULL) {
        goto failed;
    }
    e->tok = llm_tokenizer_load(p->model_path, err);
    if (e->tok == NULL) {
        goto failed;
    }

    if (e->p.kv_type == LLM_Q8_0
        && (!e->be->ops->kv_q8_0
            || !llm_kv_type_ok(LLM_Q8_0, e->model->cfg.head_dim)))
    {
        llm_err_set(err, LLM_EUNSUP, "KV type q8_0: %s", !e->be->ops->kv_q8_0
                    ? "the backend does not implement Q8_0 KV pages; use "
                      "f16 or f32"
                    : "the head dimension is not a multiple of 32");
        goto failed;
    }

    e->n_ctx = e->model->cfg.n_ctx;
    if (p->n_ctx > 0 && p->n_ctx < e->n_ctx) {
        e->n_ctx = p->n_ctx;
    }
    n_vocab = e->model->cfg.n_vocab;

    block_bytes = llm_forward_kv_block_bytes(&e->model->cfg,
                                             LLM_KV_BLOCK_SIZE,
                                             e->p.kv_type);
    n_blocks = (int) (e->p.kv_memory / block_bytes);
    if (n_blocks < 2) {
        llm_err_set(err, LLM_EINVAL,
                    "kv memory of %zu bytes holds fewer than 2 blocks of "
                    "%zu bytes", e->p.kv_memory, block_bytes);
        goto failed;
    }
    e->block_bytes = block_bytes;
    e->kv = llm_kv_blocks_new(n_blocks, LLM_KV_BLOCK_SIZE, err);
    if (e->kv == NULL) {
        goto failed;
    }

    cap_tokens = e->p.max_step_tokens;
    /* one logits row per sequence; teacher-forced prompts use up to a
     * whole step */
    cap_out = cap_tokens;
    if (llm_forward_init(&e->fw, e->be, e->model, cap_tokens, cap_out,
                         n_blocks, LLM_KV_BLOCK_SIZE, e->p.kv_type, err)
        != 0)
    {
        goto failed;
    }

    e->max_blocks = (e->n_ctx + LLM_KV_BLOCK_SIZE - 1) / LLM_KV_BLOCK_SIZE;
    e->plan = llm_calloc((size_t) e->p.max_seqs, sizeof(llm_seq *));
    e->tokens = llm_calloc((size_t) cap_tokens, sizeof(int32_t));
    e->pos = llm_calloc((size_t) cap_tokens, sizeof(int32_t));
    e->tok_seq = llm_calloc((size_t) cap_tokens, sizeof(int32_t));
    e->seq_start = llm_calloc((size_t) e->p.max_seqs + 1, sizeof(int32_t));
    e->seq_kv_len = llm_calloc((size_t) e->p.max_seqs, sizeof(int32_t));
    e->block_table = llm_calloc((size_t) e->p.max_seqs
                                * (size_t) e->max_blocks, sizeof(int32_t));
    e->out_rows = llm_calloc((size_t) cap_out, sizeof(int32_t));
    e->out_seq = llm_calloc((size_t) cap_out, sizeof(int32_t));
    e->out_pos = llm_calloc((size_t) cap_out, sizeof(int32_t));
    if (llm_forward_logits(&e->fw) == NULL) {
        /* a device backend: the logits are downloaded here */
        e->logits = llm_malloc((size_t) cap_out * (size_t) n_vocab
                               * sizeof(float));
    }
    if (e->plan == NULL || e->tokens == NULL || e->pos == NULL
        || e->tok_seq == NULL || e->seq_start == NULL
        || e->seq_kv_len == NULL || e->block_table == NULL
        || e->out_rows == NULL || e->out_seq == NULL || e->out_pos == NULL
        || (e->logits == NULL && llm_forward_logits(&e->fw) == NULL))
    {
        llm_err_set(err, LLM_ENOMEM, "out of memory for step buffers");
        goto failed;
    }

    e->reg = llm_lora_registry_new(&e->model->cfg,
                                   e->p.adapter_host_memory
                                   ? e->p.adapter_host_memory
                                   : (size_t) 1 << 30, err);
    e->pool = e->reg ? llm_lora_pool_new(e->be, e->p.adapter_device_memory
                                         ? e->p.adapter_device_memory
                                         : (size_t) 512 << 20, err)
                     : NULL;
    if (e->pool != NULL) {
        int d = e->p.adapter_dtype;

        if (d < 0 || d > LLM_ADAPTER_INT8) {
            llm_err_set(err, LLM_EINVAL, "adapter_dtype %d: not one of "
                        "LLM_ADAPTER_*", d);
            goto failed;
        }
        d = adapter_dtype_pick(e, d);
        if (llm_lora_pool_set_type(e->pool, adapter_dtypes[d].pool_type)
            != 0)
        {
            llm_err_set(err, LLM_EUNSUP, "adapter weights in %s: not "
                        "supported by the %s backend",
                        adapter_dtypes[d].name, e->be->ops->name);
            goto failed;
        }
    }
    e->spans = llm_calloc((size_t) e->p.max_seqs, sizeof(llm_lora_span));
    if (e->reg == NULL || e->pool == NULL || e->spans == NULL) {
        if (e->spans == NULL) {
            llm_err_set(err, LLM_ENOMEM, "out of memory");
        }
        goto failed;
    }
    e->loader = llm_lora_loader_new(&e->model->cfg, engine_wake_cb, e, err);
    if (e->loader == NULL) {
        goto failed;
    }
    if (e->p.adapter_dir != NULL
        && llm_lora_registry_register_dir(e->reg, e->p.adapter_dir,
                                          e->p.adapter_refused,
                                          e->p.adapter_refused_ud, err) < 0)
    {
        goto failed;
    }

    /* Prefix cache and its Redis tier. */
    e->cache_on = !e->p.prefix_cache_off;
    llm_prefix_fingerprint(e->model->fingerprint, e->p.kv_type,
                           LLM_KV_BLOCK_SIZE, e->cache_fp);
    if (e->cache_on && e->p.kv_tier_addr != NULL
        && e->p.kv_tier_addr[0] != '\0')
    {
        llm_kv_tier_params tp;

        if (e->be->ops->kv_block_to_host == NULL
            || e->be->ops->kv_block_from_host == NULL)
        {
            llm_err_set(err, LLM_EUNSUP, "the %s backend cannot copy KV "
                        "blocks to host memory: no Redis tier",
                        e->be->ops->name);
            goto failed;
        }
        memset(&tp, 0, sizeof(tp));
        tp.addr = e->p.kv_tier_addr;
        tp.key_prefix = e->p.kv_tier_prefix;
        tp.ttl_s = e->p.kv_tier_ttl_s;
        tp.budget_bytes = e->p.kv_tier_budget;
        tp.timeout_ms = e->p.kv_tier_timeout_ms;
        memcpy(tp.fingerprint, e->cache_fp, 32);
        tp.dtype = e->p.kv_type;
        tp.block_size = LLM_KV_BLOCK_SIZE;
        tp.n_layers = e->fw.kv.n_layers;
        tp.n_kv_heads = e->fw.kv.n_kv_heads;
        tp.head_dim = e->fw.kv.head_dim;
        tp.wake = engine_wake_cb;
        tp.wake_ud = e;
        e->tier_payload = llm_kv_tier_payload_bytes(&tp);
        e->tier_block = llm_malloc(e->tier_payload);
        if (e->tier_block == NULL) {
            llm_err_set(err, LLM_ENOMEM, "out of memory");
            goto failed;
        }
        e->tier = llm_kv_tier_new(&tp, err);
        if (e->tier == NULL) {
            llm_err_wrap(err, "prefix cache tier at %s", e->p.kv_tier_addr);
            goto failed;
        }
        /* a lookup that takes longer than a few Redis round trips is
         * slower than computing */
        e->tier_wait_ns = (uint64_t) (e->p.kv_tier_timeout_ms
                                      ? e->p.kv_tier_timeout_ms : 200)
                          * 2000000ull;
    }
    e->sched.attach = engine_attach;
    e->sched.attach_ud = e;

    e->sched.kv = e->kv;
    e->sched.max_seqs = e->p.max_seqs;
    e->sched.max_step_tokens = e->p.max_step_tokens;
    e->next_id = 1;
    e->stats.kv_blocks_total = n_blocks;
    e->stats.block_size = LLM_KV_BLOCK_SIZE;
    return e;

failed:
    llm_engine_free(e);
    return NULL;
}


void
llm_engine_free(llm_engine *e)
{
    llm_seq_list *lists[4];
    llm_seq      *s, *next;
    int           i;

    if (e == NULL) {
        return;
    }
    /* its thread first: it calls back into e */
    llm_lora_loader_free(e->loader);
    e->loader = NULL;
    lists[0] = &e->sched.waiting;
    lists[1] = &e->sched.running;
    lists[2] = &e->cancelled;
    lists[3] = &e->failed;
    for (i = 0; i < 4; i++) {
        for (s = lists[i]->head; s != NULL; s = next) {
            next = s->next;
            if (e->kv != NULL) {
                llm_block_table_clear(e->kv, &s->bt);
            }
            seq_free(e, s);
        }
    }
    llm_scheduler_free(&e->sched);
    llm_kv_tier_free(e->tier);      /* its thread calls back into e */
    llm_free(e->tier_block);
    llm_lora_pool_free(e->pool);
    llm_lora_registry_free(e->reg);
    llm_free(e->spans);
    llm_forward_free(&e->fw);
    llm_kv_blocks_free(e->kv);
    llm_tokenizer_free(e->tok);
    llm_model_free(e->model);
    if (e->be != NULL) {
        e->be->ops->free(e->be);
    }
    llm_free(e->plan);
    llm_free(e->tokens);
    llm_free(e->pos);
    llm_free(e->tok_seq);
    llm_free(e->seq_start);
    llm_free(e->seq_kv_len);
    llm_free(e->block_table);
    llm_free(e->out_rows);
    llm_free(e->out_seq);
    llm_free(e->out_pos);
    llm_free(e->logits);
    pthread_mutex_destroy(&e->wake_mu);
    llm_free(e);
}


const llm_model *
llm_engine_model(const llm_engine *e)
{
    return e->model;
}


int
llm_engine_n_ctx(const llm_engine *e)
{
    return e->n_ctx;
}


const llm_tokenizer *
llm_engine_tokenizer(const llm_engine *e)
{
    return e->tok;
}


/* ---- adapters of sequences ---------------------------------------- */

/* Pins name's current version for s (loading it here if it is not in
 * the host cache) and checks that it can ever fit the device pool. */
static int
seq_pin_adapter(llm_engine *e, llm_seq *s, const char *name, llm_err *err)
{
    llm_lora_pool_stats ps;
    int                 rc;

    rc = llm_lora_registry_acquire(e->reg, name, &s->lora, err);
    if (rc != 0) {
        return rc;
    }
    llm_lora_pool_get_stats(e->pool, &ps);
    if (ps.budget != 0
        && llm_lora_pool_need(e->pool, s->lora.lora) > ps.budget)
    {
        return llm_err_set(err, LLM_EUNSUP, "adapter \"%s\" needs %zu "
                           "bytes on the device, more than the whole "
                           "adapter pool (%zu bytes)", name,
                           llm_lora_pool_need(e->pool, s->lora.lora),
                           ps.budget);
    }
    s->blocked = 1;             /* until its weights are on the device */
    return 0;
}


/* Takes a waiting sequence out with an error; its DONE comes from the
 * next step. */
static void
seq_fail(llm_engine *e, llm_seq *s, const char *msg)
{
    llm_scheduler_drop(&e->sched, s);
    s->error = llm_strdup(msg);
    llm_seq_list_push_back(&e->failed, s);
}


/* Finished background loads: the weights go into the registry's host
 * cache, then the sequences waiting for them pin them (or fail with the
 * loader's message). */
static void
engine_adapter_loads(llm_engine *e)
{
    llm_lora_loaded r;
    llm_seq        *s, *next;
    const char     *dir;
    llm_err         err;

    while (llm_lora_loader_poll(e->loader, &r) == 1) {
        dir = NULL;
        /* still the same registration, still not loaded: adopt (which
         * takes the weights in every case) */
        if (r.rc == 0 && llm_lora_registry_find(e->reg, r.name, &dir, NULL)
            && strcmp(dir, r.dir) == 0
            && !llm_lora_registry_is_loaded(e->reg, r.name))
        {
            memset(&err, 0, sizeof(err));
            (void) llm_lora_registry_adopt(e->reg, r.name, r.dir, r.lora,
                                           &err);
            r.lora = NULL;
        }
        for (s = e->sched.waiting.head; s != NULL; s = next) {
            next = s->next;
            if (!s->lora_pending || strcmp(s->lora_name, r.name) != 0) {
                continue;
            }
            memset(&err, 0, sizeof(err));
            if (r.rc != 0) {
                seq_fail(e, s, r.err.msg);
            } else if (seq_pin_adapter(e, s, r.name, &err) != 0) {
                seq_fail(e, s, err.msg);
            } else {
                s->lora_pending = 0;
            }
        }
        llm_lora_loaded_free(&r);
    }
}


/* ---- requests ----------------------------------------------------- */

int
llm_engine_submit(llm_engine *e, const llm_request *req, uint64_t *seq_id,
                  llm_err *err)
{
    llm_seq *s;
    int      i, total, rc;

    if (req->n_prompt <= 0 || req->prompt == NULL) {
        return llm_err_set(err, LLM_EINVAL, "the prompt is empty");
    }
    if (req->max_tokens <= 0) {
        return llm_err_set(err, LLM_EINVAL,
                           "max_tokens must be at least 1");
    }
    for (i = 0; i < req->n_prompt; i++) {
        if (req->prompt[i] < 0 || req->prompt[i] >= e->model->cfg.n_vocab) {
            return llm_err_set(err, LLM_EINVAL,
                               "prompt token %d (at %d) is outside the "
                               "vocabulary of %d", req->prompt[i], i,
                               e->model->cfg.n_vocab);
        }
    }
    total = req->n_prompt + req->max_tokens;
    if (req->n_prompt > e->n_ctx || total > e->n_ctx) {
        return llm_err_set(err, LLM_EINVAL,
                           "prompt (%d tokens) plus max_tokens (%d) exceeds "
                           "the context length of %d tokens", req->n_prompt,
                           req->max_tokens, e->n_ctx);
    }
    if (llm_kv_blocks_for(e->kv, total) > llm_kv_n_blocks(e->kv)) {
        return llm_err_set(err, LLM_EFULL,
                           "prompt plus max_tokens (%d tokens) exceeds the "
                           "whole KV cache (%d blocks of %d)", total,
                           llm_kv_n_blocks(e->kv), LLM_KV_BLOCK_SIZE);
    }
    if ((rc = llm_sampling_check(&req->sampling, err)) != 0) {
        return rc;
    }
    if (req->priority < 0 || req->priority >= LLM_N_CLASSES) {
        return llm_err_set(err, LLM_EINVAL, "unknown priority class %d",
                           req->priority);
    }
    if (req->weight < 0) {
        return llm_err_set(err, LLM_EINVAL, "weight must be positive");
    }
    if (req->tenant != NULL && strlen(req->tenant) > LLM_TENANT_NAME_MAX) {
        return llm_err_set(err, LLM_EINVAL,
                           "tenant name longer than %d bytes",
                           LLM_TENANT_NAME_MAX);
    }

    s = llm_calloc(1, sizeof(*s));
    if (s == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "out of memory");
    }
    s->cap = total;
    s->cache = e->cache_on && !req->no_cache && !req->prompt_logits;
    if (s->cache) {
        s->cache_ns = llm_strdup(req->cache_namespace != NULL
                                 ? req->cache_namespace : "");
        s->cache_shared_ns = llm_strdup(req->cache_shared_namespace != NULL
                                        ? req->cache_shared_namespace : "");
        s->cache_shared_tokens = req->cache_shared_tokens > 0
                                 ? req->cache_shared_tokens : 0;
        s->hashes = llm_malloc(((size_t) total / LLM_KV_BLOCK_SIZE + 1)
                               * sizeof(*s->hashes));
        if (s->cache_ns == NULL || s->cache_shared_ns == NULL
            || s->hashes == NULL)
        {
            seq_free(e, s);
            return llm_err_set(err, LLM_ENOMEM, "out of memory");
        }
    }
    s->tokens = llm_malloc((size_t) total * sizeof(int32_t));
    s->sampler = llm_sampler_new(&req->sampling, e->model->cfg.n_vocab,
                                 err);
    if (req->n_stop_ids > 0) {
        s->stop_ids = llm_malloc((size_t) req->n_stop_ids * sizeof(int32_t));
    }
    if (req->adapter != NULL && req->adapter[0] != '\0') {
        llm_lora_registry_stats rs;
        llm_lora_info           li;
        const char             *dir = NULL;

        /* an adapter larger than a whole budget would never run: refuse
         * it rather than queue it forever */
        llm_lora_registry_get_stats(e->reg, &rs);
        if (rs.budget != 0
            && llm_lora_registry_find(e->reg, req->adapter, NULL, &li)
            && li.bytes > rs.budget)
        {
            seq_free(e, s);
            return llm_err_set(err, LLM_EUNSUP, "adapter \"%s\" needs "
                               "%zu bytes of host memory, more than the "
                               "whole adapter cache (%zu bytes)",
                               req->adapter, li.bytes, rs.budget);
        }
        if (llm_lora_registry_find(e->reg, req->adapter, &dir, NULL)
            && !llm_lora_registry_is_loaded(e->reg, req->adapter))
        {
            /* not in the host cache: loaded in the background while the
             * batch runs (engine_adapter_loads pins it) */
            s->lora_name = llm_strdup(req->adapter);
            if (s->lora_name == NULL
                || (!llm_lora_loader_busy(e->loader, req->adapter)
                    && llm_lora_loader_submit(e->loader, req->adapter, dir)
                       != 0))
            {
                seq_free(e, s);
                return llm_err_set(err, LLM_ENOMEM, "out of memory");
            }
            s->lora_pending = 1;
        } else if ((rc = seq_pin_adapter(e, s, req->adapter, err)) != 0) {
            seq_free(e, s);
            return rc;
        }
        s->blocked = 1;         /* until its weights are on the device */
    }
    s->tenant = llm_scheduler_tenant(&e->sched, req->tenant);
    if (s->tokens == NULL || s->sampler == NULL || s->tenant == NULL
        || (req->n_stop_ids > 0 && s->stop_ids == NULL)
        || llm_sampler_add_prompt(s->sampler, req->prompt, req->n_prompt)
           != 0)
    {
        seq_free(e, s);
        return llm_err_set(err, LLM_ENOMEM, "out of memory");
    }
    memcpy(s->tokens, req->prompt, (size_t) req->n_prompt * sizeof(int32_t));
    if (req->n_stop_ids > 0) {
        memcpy(s->stop_ids, req->stop_ids,
               (size_t) req->n_stop_ids * sizeof(int32_t));
    }
    s->n_stop_ids = req->n_stop_ids;
    s->n_tokens = s->n_prompt = req->n_prompt;
    s->max_tokens = req->max_tokens;
    s->ignore_eos = req->ignore_eos;
    s->prompt_logits = req->prompt_logits;
    s->user_tag = req->user_tag;
    s->cls = req->priority;
    s->weight = req->weight > 0 ? req->weight : 1;
    s->id = e->next_id++;
    s->arrival_ns = llm_now_ns();
    if (req->queue_timeout_ms > 0) {
        s->deadline_ns = s->arrival_ns
                         + (uint64_t) req->queue_timeout_ms * 1000000ull;
    }
    llm_scheduler_enqueue(&e->sched, s);
    if (seq_id != NULL) {
        *seq_id = s->id;
    }
    return 0;
}


static llm_seq *
engine_find(llm_engine *e, uint64_t id)
{
    llm_seq_list *lists[2] = { &e->sched.running, &e->sched.waiting };
    llm_seq      *s;
    int           i;

    for (i = 0; i < 2; i++) {
        for (s = lists[i]->head; s != NULL; s = s->next) {
            if (s->id == id) {
                return s;
            }
        }
    }
    return NULL;
}


int
llm_engine_cancel(llm_engine *e, uint64_t seq_id)
{
    llm_seq *s = engine_find(e, seq_id);

    if (s == NULL) {
        return LLM_ENOTFOUND;
    }
    llm_scheduler_drop(&e->sched, s);   /* frees its KV blocks now */
    llm_seq_list_push_back(&e->cancelled, s);
    return 0;
}


int
llm_engine_stalled(const llm_engine *e)
{
    return e->stalled && e->cancelled.n == 0 && e->failed.n == 0;
}


int
llm_engine_idle(const llm_engine *e)
{
    return e->sched.waiting.n == 0 && e->sched.running.n == 0
           && e->cancelled.n == 0 && e->failed.n == 0;
}


void
llm_engine_get_stats(const llm_engine *e, llm_engine_stats *st)
{
    *st = e->stats;
    st->n_waiting = e->sched.waiting.n;
    st->n_running = e->sched.running.n;
    st->kv_blocks_used = llm_kv_n_blocks(e->kv) - llm_kv_n_free(e->kv);
    st->preemptions = e->sched.preemptions;
    {
        llm_lora_registry_stats rs;
        llm_lora_pool_stats     ps;

        llm_lora_registry_get_stats(e->reg, &rs);
        llm_lora_pool_get_stats(e->pool, &ps);
        st->adapters_registered = rs.registered;
        st->adapters_loaded = rs.loaded;
        st->adapter_host_bytes = rs.bytes;
        st->adapters_resident = ps.resident;
        st->adapter_dtype = adapter_dtype_of_pool(e->pool);
        st->adapter_device_bytes = ps.bytes;
        st->adapter_loads = rs.loads;
        st->adapter_uploads = ps.uploads;
        st->adapter_host_evictions = rs.evictions;
        st->adapter_device_evictions = ps.evictions;
    }
    {
        llm_kv_cache_stats cs;

        llm_kv_cache_get_stats(e->kv, &cs);
        st->prefix_blocks_cached = cs.tagged;
        st->prefix_blocks_reusable = cs.reusable;
        st->prefix_evictions = cs.evictions;
        st->prefix_bytes_cached = (uint64_t) cs.tagged * e->block_bytes;
    }
    if (e->tier != NULL) {
        llm_kv_tier_stats ts;

        llm_kv_tier_get_stats(e->tier, &ts);
        st->tier_enabled = 1;
        st->tier_connected = ts.connected;
        st->tier_puts = ts.puts;
        st->tier_put_bytes = ts.put_bytes;
        st->tier_puts_dropped = ts.puts_dropped;
        st->tier_lookups = ts.lookups;
        st->tier_blocks_hit = ts.blocks_hit;
        st->tier_blocks_missed = ts.blocks_missed;
        st->tier_corrupt = ts.corrupt;
        st->tier_errors = ts.errors;
        st->tier_stored_bytes = ts.stored_bytes;
    }
}


int
llm_engine_adapter_register(llm_engine *e, const char *name,
                            const char *dir, llm_err *err)
{
    if (llm_lora_registry_find(e->reg, name, NULL, NULL)) {
        return llm_lora_registry_reload(e->reg, name, dir, err);
    }
    return llm_lora_registry_register(e->reg, name, dir, err);
}


int
llm_engine_adapter_unregister(llm_engine *e, const char *name,
                              llm_err *err)
{
    return llm_lora_registry_unregister(e->reg, name, err);
}


const char *
llm_engine_adapter_name(const llm_engine *e, int i)
{
    return llm_lora_registry_name(e->reg, i);
}


int
llm_engine_adapter_info_get(const llm_engine *e, const char *name,
                            llm_engine_adapter_info *info)
{
    const llm_lora *lo = NULL;
    llm_lora_info   li;
    uint64_t        serial = 0;
    const char     *dir = NULL;

    memset(info, 0, sizeof(*info));
    if (name == NULL || !llm_lora_registry_find(e->reg, name, &dir, &li)) {
        return LLM_ENOTFOUND;
    }
    info->dir = dir;
    info->max_rank = li.max_rank;
    info->bytes = li.bytes;
    if (llm_lora_registry_peek(e->reg, name, &lo, &serial) == 1
        && lo != NULL)
    {
        info->loaded = 1;
        info->resident = llm_lora_pool_has(e->pool, serial);
        info->max_rank = lo->max_rank;
        info->bytes = lo->bytes;
        memcpy(info->version, lo->version_hex, sizeof(info->version));
    }
    return 0;
}


int
llm_engine_adapter_load(llm_engine *e, const char *name, const char *dir,
                        llm_engine_adapter_info *info, llm_err *err)
{
    llm_lora   *probe = NULL;
    const char *cur = NULL;
    char       *dir_copy = NULL;
    int         rc, known;

    if (name == NULL) {
        return llm_err_set(err, LLM_EINVAL, "no adapter name");
    }
    known = llm_lora_registry_find(e->reg, name, &cur, NULL);
    if (dir == NULL || dir[0] == '\0') {
        if (!known) {
            return llm_err_set(err, LLM_ENOTFOUND, "adapter \"%s\" is not "
                               "registered (give its folder to load it)",
                               name);
        }
        /* cur belongs to the record a reload replaces */
        dir = dir_copy = llm_strdup(cur);
        if (dir == NULL) {
            return llm_err_set(err, LLM_ENOMEM, "out of memory");
        }
    }

    /* The whole adapter first, weights included, so that files refused
     * for any reason leave the current version in place; the weights
     * then go into the host cache (if it has room) instead of loading
     * again at the first request. */
    rc = llm_lora_load(dir, &e->model->cfg, &probe, err);
    if (rc != 0) {
        llm_err_wrap(err, "adapter \"%s\"%s", name,
                     known ? " (the current version stays)" : "");
        llm_free(dir_copy);
        return rc;
    }
    rc = llm_lora_registry_adopt(e->reg, name, dir, probe, err);
    llm_free(dir_copy);
    if (rc != 0) {
        return rc;
    }
    if (info != NULL) {
        (void) llm_engine_adapter_info_get(e, name, info);
    }
    return 0;
}


/* Waiting sequences whose adapter is not on the device yet: upload it if
 * the pool has room (else they keep waiting while the rest runs). */
static void
engine_make_resident(llm_engine *e)
{
    llm_seq *s;

    for (s = e->sched.waiting.head; s != NULL; s = s->next) {
        if (s->blocked && !s->lora_pending
            && llm_lora_pool_acquire(e->pool, &s->lora,
                                                &s->lora_dev, NULL) == 0)
        {
            s->blocked = 0;
        }
    }
}


/* Batch order: sequences of one adapter next to each other, so that each
 * adapter's tokens form one segment (insertion sort: a few dozen). */
static void
sort_plan_by_adapter(llm_seq **plan, int n)
{
    int i, j;

    for (i = 1; i < n; i++) {
        llm_seq *s = plan[i];
        uint64_t k = s->lora.serial;
        for (j = i; j > 0 && plan[j - 1]->lora.serial > k; j--) {
            plan[j] = plan[j - 1];
        }
        plan[j] = s;
    }
}


/* The adapter spans of the batch built from e->plan. */
static int
build_spans(llm_engine *e, int n_seqs)
{
    int i, n = 0;

    for (i = 0; i < n_seqs; i++) {
        llm_seq *s = e->plan[i];
        int      first = e->seq_start[i];
        int      len = e->seq_start[i + 1] - first;

        if (s->lora.lora == NULL) {
            continue;
        }
        if (n > 0 && e->spans[n - 1].lora == s->lora.lora
            && e->spans[n - 1].first + e->spans[n - 1].n == first)
        {
            e->spans[n - 1].n += len;
            continue;
        }
        e->spans[n].first = first;
        e->spans[n].n = len;
        e->spans[n].lora = s->lora.lora;
        e->spans[n].dev = s->lora_dev;
        e->spans[n].type = llm_lora_pool_type(e->pool);
        n++;
    }
    return n;
}


/* ---- one step ----------------------------------------------------- */

static void
emit_done(llm_engine *e, llm_seq *s, int finish, const char *error,
          llm_event_fn cb, void *ud)
{
    llm_event ev;

    memset(&ev, 0, sizeof(ev));
    ev.type = LLM_EV_DONE;
    ev.seq_id = s->id;
    ev.user_tag = s->user_tag;
    ev.finish = finish;
    ev.n_prompt = s->n_prompt;
    ev.n_generated = s->n_tokens - s->n_prompt;
    ev.n_cached = s->n_cached;
    ev.error = error;
    cb(ud, &ev);
}


/* Lays the planned chunks out as one llm_batch. */
static void
build_batch(llm_engine *e, int n_seqs, llm_batch *b)
{
    int t = 0, n_out = 0, i, j;

    for (i = 0; i < n_seqs; i++) {
        llm_seq *s = e->plan[i];
        int      first = s->n_computed;
        int      end = first + s->chunk;

        e->seq_start[i] = t;
        e->seq_kv_len[i] = end;
        memcpy(e->block_table + (size_t) i * e->max_blocks, s->bt.ids,
               (size_t) s->bt.n * sizeof(int32_t));
        for (j = first; j < end; j++, t++) {
            e->tokens[t] = s->tokens[j];
            e->pos[t] = j;
            e->tok_seq[t] = i;
            if (s->prompt_logits && j < s->n_prompt) {
                /* teacher forcing: every prompt position has a row */
                e->out_rows[n_out] = t;
                e->out_seq[n_out] = j == s->n_tokens - 1 ? i : -1;
                e->out_pos[n_out] = j;
                n_out++;
            } else if (j == s->n_tokens - 1) {
                e->out_rows[n_out] = t;
                e->out_seq[n_out] = i;
                e->out_pos[n_out] = j;
                n_out++;
            }
        }
    }
    e->seq_start[n_seqs] = t;

    memset(b, 0, sizeof(*b));
    b->n_tokens = t;
    b->tokens = e->tokens;
    b->pos = e->pos;
    b->tok_seq = e->tok_seq;
    b->n_seqs = n_seqs;
    b->seq_start = e->seq_start;
    b->seq_kv_len = e->seq_kv_len;
    b->block_table = e->block_table;
    b->max_blocks = e->max_blocks;
    b->n_out = n_out;
    b->out_rows = e->out_rows;
}


/* Samples the next token of seq from its logits row; returns the finish
 * reason (LLM_FINISH_NONE to go on). */
static int
seq_advance(llm_engine *e, llm_seq *s, float *row, llm_event_fn cb,
            void *ud, int *failed)
{
    llm_event ev;
    int       n_gen;

    memset(&ev, 0, sizeof(ev));
    if (llm_sampler_sample(s->sampler, row, &ev.sample) != 0) {
        *failed = 1;
        return LLM_FINISH_ERROR;
    }
    s->tokens[s->n_tokens++] = ev.sample.token;
    e->stats.tokens_generated++;
    if (s->first_token_ns == 0) {
        s->first_token_ns = llm_now_ns();
    }
    ev.type = LLM_EV_TOKEN;
    ev.seq_id = s->id;
    ev.user_tag = s->user_tag;
    cb(ud, &ev);

    n_gen = s->n_tokens - s->n_prompt;
    if (seq_is_stop(e, s, ev.sample.token)) {
        return LLM_FINISH_STOP;
    }
    if (n_gen >= s->max_tokens || s->n_tokens >= e->n_ctx) {
        return LLM_FINISH_LENGTH;
    }
    return LLM_FINISH_NONE;
}


int
llm_engine_step(llm_engine *e, llm_event_fn cb, void *ud, llm_err *err)
{
    llm_batch  b;
    llm_seq   *s;
    float     *logits;
    int        n_seqs, n_spans, i, rc, n_vocab = e->model->cfg.n_vocab;

    /* Report cancellations first: their blocks are already free. */
    while ((s = e->cancelled.head) != NULL) {
        llm_seq_list_remove(&e->cancelled, s);
        emit_done(e, s, LLM_FINISH_CANCELLED, NULL, cb, ud);
        seq_free(e, s);
    }
    engine_adapter_loads(e);
    while ((s = e->failed.head) != NULL) {
        llm_seq_list_remove(&e->failed, s);
        emit_done(e, s, LLM_FINISH_ERROR, s->error != NULL ? s->error
                                                          : "out of memory",
                  cb, ud);
        seq_free(e, s);
    }
    /* Then requests that waited past their queue deadline. */
    if (e->sched.waiting.n > 0) {
        int n = llm_scheduler_expire(&e->sched, llm_now_ns(), e->plan,
                                     e->p.max_seqs);
        for (i = 0; i < n; i++) {
            e->stats.queue_timeouts++;
            emit_done(e, e->plan[i], LLM_FINISH_TIMEOUT,
                      "the request waited in the queue past its deadline",
                      cb, ud);
            seq_free(e, e->plan[i]);
        }
    }

    engine_make_resident(e);
    if (e->tier != NULL) {
        engine_tier_results(e);
        engine_tier_lookups(e);
    }
    n_seqs = llm_scheduler_plan(&e->sched, e->plan);
    e->stalled = n_seqs == 0 && e->sched.waiting.n > 0;
    if (n_seqs == 0) {
        e->stats.last_batch_tokens = 0;
        e->stats.last_batch_seqs = 0;
        return 0;
    }
    for (i = 0; i < n_seqs; i++) {
        s = e->plan[i];
        if (!s->admitted) {
            /* what the first admission found is what usage reports */
            s->admitted = 1;
            if (s->cache) {
                s->n_cached = s->n_computed < s->n_prompt ? s->n_computed
                                                          : s->n_prompt;
                e->stats.prefix_lookups++;
                e->stats.prefix_hit_tokens += (uint64_t) s->n_cached;
            }
        }
    }
    sort_plan_by_adapter(e->plan, n_seqs);
    build_batch(e, n_seqs, &b);
    n_spans = build_spans(e, n_seqs);

    /* the logits in place where the backend is host memory (the CPU,
     * e->logits NULL), else a copy in e->logits */
    rc = llm_forward_run(&e->fw, &b, e->spans, n_spans, e->logits, err);
    logits = e->logits != NULL ? e->logits : llm_forward_logits(&e->fw);
    if (rc != 0) {
        /* the batch's sequences cannot trust their pages any more */
        for (i = 0; i < n_seqs; i++) {
            s = e->plan[i];
            llm_scheduler_drop(&e->sched, s);
            emit_done(e, s, LLM_FINISH_ERROR,
                      err != NULL ? err->msg : "forward pass failed",
                      cb, ud);
            seq_free(e, s);
        }
        return rc;
    }

    e->stats.steps++;
    e->stats.last_batch_tokens = b.n_tokens;
    e->stats.last_batch_seqs = n_seqs;

    for (i = 0; i < n_seqs; i++) {
        s = e->plan[i];
        if (s->n_computed < s->n_prompt) {
            int end = s->n_computed + s->chunk;
            e->stats.tokens_prefilled +=
                (uint64_t) ((end < s->n_prompt ? end : s->n_prompt)
                            - s->n_computed);
        }
        s->n_computed += s->chunk;
        llm_scheduler_charge(&e->sched, s, s->chunk);
        engine_register_blocks(e, s);
    }

    /* Teacher-forced logits, then one sampled token per finished chunk. */
    for (i = 0; i < b.n_out; i++) {
        llm_event ev;
        int       si = -1, j;

        for (j = 0; j < n_seqs; j++) {
            if (b.out_rows[i] >= e->seq_start[j]
                && b.out_rows[i] < e->seq_start[j + 1])
            {
                si = j;
                break;
            }
        }
        s = e->plan[si];
        if (!s->prompt_logits || e->out_pos[i] >= s->n_prompt) {
            continue;
        }
        memset(&ev, 0, sizeof(ev));
        ev.type = LLM_EV_LOGITS;
        ev.seq_id = s->id;
        ev.user_tag = s->user_tag;
        ev.pos = e->out_pos[i];
        ev.logits = logits + (size_t) i * n_vocab;
        ev.n_vocab = n_vocab;
        cb(ud, &ev);
    }

    for (i = 0; i < b.n_out; i++) {
        int finish, failed = 0;

        if (e->out_seq[i] < 0) {
            continue;
        }
        s = e->plan[e->out_seq[i]];
        finish = seq_advance(e, s, logits + (size_t) i * n_vocab, cb, ud,
                             &failed);
        if (finish != LLM_FINISH_NONE) {
            llm_scheduler_drop(&e->sched, s);
            emit_done(e, s, finish, failed ? "out of memory in sampler"
                                           : NULL, cb, ud);
            seq_free(e, s);
        }
    }
    return 0;
}
