/*
 * llm-bench: prefill and decode throughput of the engine.
 *
 *   llm-bench --model PATH [--device cpu|cuda:N] [--threads N]
 *             [--prompt-tokens P] [--gen-tokens G]
 *             [--concurrency 1,8,32] [--repeat R] [--kv f16|f32|q8_0]
 *             [--profile]
 *
 * For each concurrency c: c sequences of P prompt tokens are submitted at
 * once; prefill tokens/s = c * P / time until every sequence has its first
 * token; decode tokens/s = tokens generated after that / the time they
 * took (aggregate over the c sequences; the sequences that finished their
 * prompt first also finish first, so the last steps hold fewer).  "step
 * ms" is the median time of the steps that decode all c sequences at
 * once.  Prompts are distinct token strings drawn from the vocabulary
 * (a seed per run, so no run reuses another's prompts through a prefix
 * cache); generation ignores EOS so every sequence runs G tokens.  The
 * KV pages are F16 (as llm-engine's) unless --kv f32, with room for every
 * sequence, so nothing is preempted.  Best of R runs is printed.
 * LLM_BENCH_STEPS=1 prints every decode step to stderr.
 *
 * --profile: the forward pass alone, each backend op timed (below).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/forward.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "kernels/backend.h"


typedef struct {
    int         n_done;
    uint64_t    tokens;
    uint64_t    tokens_at_prefill_end;
    uint64_t    prefill_end_ns;
    int         failed;
    int         n_started;      /* sequences with their first token */
    uint8_t     started[1024];  /* by user_tag */
} bench_state;


static void
on_event(void *ud, const llm_event *ev)
{
    bench_state *st = ud;

    if (ev->type == LLM_EV_TOKEN) {
        st->tokens++;
        if (ev->user_tag < sizeof(st->started) && !st->started[ev->user_tag])
        {
            st->started[ev->user_tag] = 1;
            st->n_started++;
        }
    } else if (ev->type == LLM_EV_DONE) {
        st->n_done++;
        if (ev->finish == LLM_FINISH_ERROR) {
            st->failed = 1;
        }
    }
}


static int
parse_list(const char *s, int *out, int cap)
{
    int n = 0;

    while (*s && n < cap) {
        out[n++] = atoi(s);
        s = strchr(s, ',');
        if (s == NULL) {
            break;
        }
        s++;
    }
    return n;
}


static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;

    return x < y ? -1 : x > y;
}


/* The next pseudo-random token id from state *x (an LCG), above the low
 * ids, which are special tokens. */
static int32_t
random_token(uint64_t *x, int n_vocab)
{
    *x = *x * 6364136223846793005ull + 1442695040888963407ull;
    return (int32_t) (256 + (*x >> 33) % (uint64_t) (n_vocab - 256));
}


static int
run_once(llm_engine *e, int c, int P, int G, uint32_t seed,
         double *prefill_tps, double *decode_tps, double *step_ms,
         llm_err *err)
{
    uint64_t         full[4096];
    int              n_full;
    const llm_model *m = llm_engine_model(e);
    bench_state      st;
    llm_request      req;
    int32_t         *prompt;
    uint64_t         t0, t_prefill, t_end;
    uint64_t         x = seed * 2654435761u + 1;
    int              i, j;

    prompt = llm_malloc((size_t) P * sizeof(int32_t));
    if (prompt == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "out of memory");
    }
    memset(&st, 0, sizeof(st));
    memset(&req, 0, sizeof(req));
    llm_sampling_default(&req.sampling);
    req.prompt = prompt;
    req.n_prompt = P;
    req.max_tokens = G;
    req.ignore_eos = 1;

    for (i = 0; i < c; i++) {
        for (j = 0; j < P; j++) {
            prompt[j] = random_token(&x, m->cfg.n_vocab);
        }
        req.user_tag = (uint64_t) i;
        if (llm_engine_submit(e, &req, NULL, err) != 0) {
            llm_free(prompt);
            return err->code;
        }
    }
    llm_free(prompt);

    t0 = llm_now_ns();
    /* prefill: until every sequence produced its first token (sequences
     * whose prompt is done decode meanwhile, in the same steps, so the
     * first c tokens are not the c first tokens) */
    while (st.n_started < c && !llm_engine_idle(e)) {
        if (llm_engine_step(e, on_event, &st, err) != 0) {
            return err->code;
        }
    }
    t_prefill = llm_now_ns();
    st.tokens_at_prefill_end = st.tokens;
    n_full = 0;
    while (!llm_engine_idle(e)) {
        uint64_t         ts = llm_now_ns();
        llm_engine_stats es;

        if (llm_engine_step(e, on_event, &st, err) != 0) {
            return err->code;
        }
        /* steps that decode every sequence, for the median */
        llm_engine_get_stats(e, &es);
        if (getenv("LLM_BENCH_STEPS") != NULL) {
            fprintf(stderr, "step: %d seqs %d tokens %.3f ms (preemptions"
                    " %llu, kv blocks %d of %d)\n",
                    es.last_batch_seqs, es.last_batch_tokens,
                    (double) (llm_now_ns() - ts) / 1e6,
                    (unsigned long long) es.preemptions, es.kv_blocks_used,
                    es.kv_blocks_total);
        }
        if (es.last_batch_seqs == c && es.last_batch_tokens == c
            && n_full < (int) (sizeof(full) / sizeof(full[0])))
        {
            full[n_full++] = llm_now_ns() - ts;
        }
    }
    t_end = llm_now_ns();
    *step_ms = 0;
    if (n_full > 0) {
        qsort(full, (size_t) n_full, sizeof(full[0]), cmp_u64);
        *step_ms = (double) full[n_full / 2] / 1e6;
    }
    if (st.failed) {
        return llm_err_set(err, LLM_EBACKEND, "a sequence failed");
    }
    *prefill_tps = (double) c * P / ((double) (t_prefill - t0) / 1e9);
    *decode_tps = (double) (st.tokens - st.tokens_at_prefill_end)
                  / ((double) (t_end - t_prefill) / 1e9);
    return 0;
}


/* ------------------------------------------------------------- profile */

/*
 * --profile: where the time of a decode step goes.  The forward pass is
 * driven directly (no scheduler, no sampler): c sequences of P prompt
 * tokens are prefilled one by one, then G decode steps run all c at
 * once, with every backend op timed through a wrapped ops table (the
 * backend's own table is copied and its entries replaced; each wrapper
 * synchronizes, so device backends are timed too).  Matrix products are
 * reported per weight shape.  Printed per op: the median and the smallest
 * of its time per step over the steps (the smallest is the figure least
 * disturbed by other processes), its calls per step and its share of the
 * median step; "(rest)" is the step time outside the ops (the forward
 * pass's own work, and the gaps).
 */

enum {
    PR_EMBED, PR_RMSNORM, PR_ROPE, PR_KV_STORE, PR_ATTENTION, PR_SILU_MUL,
    PR_ADD, PR_GATHER, PR_DOWNLOAD, PR_SET_BATCH, PR_N
};

static const char *pr_names[PR_N] = {
    "embed", "rmsnorm", "rope", "kv_store", "attention", "silu_mul",
    "add", "gather_out_rows", "download", "set_batch"
};

#define PR_MM_MAX  16
#define PR_KEYS    (PR_N + PR_MM_MAX)  /* ops, then matmul shapes */

typedef struct {
    const llm_backend_ops  *orig;
    int                     on;             /* count this step */
    uint64_t                ns[PR_KEYS];    /* cumulative */
    uint64_t                calls[PR_N];
    int                     n_mm;
    int64_t                 mm_m[PR_MM_MAX], mm_k[PR_MM_MAX];
    int                     mm_type[PR_MM_MAX];
    uint64_t                mm_calls[PR_MM_MAX];
} prof_state;

static prof_state  prof_st;


static void
prof_note(int op, uint64_t t0, llm_backend *be)
{
    prof_st.orig->synchronize(be);
    if (prof_st.on) {
        prof_st.ns[op] += llm_now_ns() - t0;
        prof_st.calls[op]++;
    }
}


#define PR_WRAP(name, op, params, args)                                     \
static int                                                                  \
prof_##name params                                                          \
{                                                                           \
    uint64_t t0 = llm_now_ns();                                             \
    int      rc = prof_st.orig->name args;                                  \
    prof_note(op, t0, be);                                                  \
    return rc;                                                              \
}

PR_WRAP(embed, PR_EMBED,
        (llm_backend *be, llm_tensor *out, const llm_tensor *table),
        (be, out, table))
PR_WRAP(rmsnorm, PR_RMSNORM,
        (llm_backend *be, llm_tensor *out, const llm_tensor *x,
         const llm_tensor *w, float eps),
        (be, out, x, w, eps))
PR_WRAP(rope, PR_ROPE,
        (llm_backend *be, llm_tensor *x, int n_heads, int head_dim,
         const llm_rope_params *rp),
        (be, x, n_heads, head_dim, rp))
PR_WRAP(kv_store, PR_KV_STORE,
        (llm_backend *be, const llm_kv_pool *kv, int layer,
         const llm_tensor *k, const llm_tensor *v),
        (be, kv, layer, k, v))
PR_WRAP(attention, PR_ATTENTION,
        (llm_backend *be, llm_tensor *out, const llm_tensor *q,
         const llm_kv_pool *kv, int layer, int n_heads, float scale),
        (be, out, q, kv, layer, n_heads, scale))
PR_WRAP(silu_mul, PR_SILU_MUL,
        (llm_backend *be, llm_tensor *out, const llm_tensor *gate,
         const llm_tensor *up),
        (be, out, gate, up))
PR_WRAP(add, PR_ADD,
        (llm_backend *be, llm_tensor *out, const llm_tensor *a,
         const llm_tensor *b),
        (be, out, a, b))
PR_WRAP(gather_out_rows, PR_GATHER,
        (llm_backend *be, llm_tensor *out, const llm_tensor *x),
        (be, out, x))
PR_WRAP(download, PR_DOWNLOAD,
        (llm_backend *be, void *host, const void *src, size_t n),
        (be, host, src, n))
PR_WRAP(set_batch, PR_SET_BATCH,
        (llm_backend *be, const llm_batch *b), (be, b))


/* A product of weights [m, k] of type took dt; q, k and v in one call
 * count as one product of their rows together. */
static void
prof_mm_note(int64_t m, int64_t k, int type, uint64_t dt)
{
    int i;

    for (i = 0; i < prof_st.n_mm; i++) {
        if (prof_st.mm_m[i] == m && prof_st.mm_k[i] == k
            && prof_st.mm_type[i] == type)
        {
            break;
        }
    }
    if (i == prof_st.n_mm) {
        if (i == PR_MM_MAX) {
            i = PR_MM_MAX - 1;          /* lumps the rest together */
        } else {
            prof_st.n_mm++;
            prof_st.mm_m[i] = m;
            prof_st.mm_k[i] = k;
            prof_st.mm_type[i] = type;
        }
    }
    prof_st.ns[PR_N + i] += dt;
    prof_st.mm_calls[i]++;
}


static int
prof_matmul(llm_backend *be, llm_tensor *out, const llm_tensor *x,
            const llm_tensor *w, const llm_tensor *bias)
{
    uint64_t t0 = llm_now_ns();
    int      rc = prof_st.orig->matmul(be, out, x, w, bias);

    prof_st.orig->synchronize(be);
    if (prof_st.on) {
        prof_mm_note(w->ne[1], w->ne[0], w->type, llm_now_ns() - t0);
    }
    return rc;
}


static int
prof_matmul_n(llm_backend *be, llm_tensor *const *outs, const llm_tensor *x,
              const llm_tensor *const *ws, const llm_tensor *const *biases,
              int n)
{
    uint64_t t0 = llm_now_ns();
    int      rc = prof_st.orig->matmul_n(be, outs, x, ws, biases, n), i;
    int64_t  m = 0;

    prof_st.orig->synchronize(be);
    if (prof_st.on) {
        for (i = 0; i < n; i++) {
            m += ws[i]->ne[1];
        }
        prof_mm_note(m, ws[0]->ne[0], ws[0]->type, llm_now_ns() - t0);
    }
    return rc;
}


/* The median (or with lowest, the smallest) of n values v[0], v[stride],
 * ... (sorts a copy). */
static uint64_t
median_u64(const uint64_t *v, int n, int stride, int lowest)
{
    uint64_t tmp[4096];
    int      i;

    if (n <= 0) {
        return 0;
    }
    n = n < 4096 ? n : 4096;
    for (i = 0; i < n; i++) {
        tmp[i] = v[(size_t) i * stride];
    }
    qsort(tmp, (size_t) n, sizeof(tmp[0]), cmp_u64);
    return lowest ? tmp[0] : tmp[n / 2];
}


static int
profile(const char *model, const char *device, int threads, int c, int P,
        int G, int kv_type)
{
    static llm_backend_ops  ops;
    llm_err                 err = { 0, "" };
    llm_backend            *be;
    llm_model              *m = NULL;
    llm_forward             fw;
    llm_batch               b;
    int                     bs = LLM_KV_BLOCK_SIZE;
    int                     max_blocks = (P + G + bs - 1) / bs;
    int                     cap = P > c ? P : c, s, t, i, g, rc = 1;
    int32_t                *tokens, *pos, *tok_seq, *seq_start, *kv_len;
    int32_t                *table, *out_rows;
    float                  *logits;
    uint64_t                t0, total = 0, sum, sum_min, med_step;
    uint64_t                min_step;
    uint64_t                x = 12345, prev[PR_KEYS];
    uint64_t               *hist;          /* [G - 1, PR_KEYS + 1] */

    be = llm_backend_open(device, threads, &err);
    if (be == NULL) {
        fprintf(stderr, "llm-bench: %s\n", err.msg);
        return 1;
    }
    m = llm_model_load(model, be, NULL, NULL, &err);
    if (m == NULL) {
        fprintf(stderr, "llm-bench: %s\n", err.msg);
        be->ops->free(be);
        return 1;
    }
    memset(&fw, 0, sizeof(fw));
    tokens = llm_calloc((size_t) cap, sizeof(int32_t));
    pos = llm_calloc((size_t) cap, sizeof(int32_t));
    tok_seq = llm_calloc((size_t) cap, sizeof(int32_t));
    seq_start = llm_calloc((size_t) c + 1, sizeof(int32_t));
    kv_len = llm_calloc((size_t) c, sizeof(int32_t));
    table = llm_calloc((size_t) c * (size_t) max_blocks, sizeof(int32_t));
    out_rows = llm_calloc((size_t) cap, sizeof(int32_t));
    logits = llm_malloc((size_t) c * (size_t) m->cfg.n_vocab
                        * sizeof(float));
    hist = llm_calloc((size_t) G * (PR_KEYS + 1), sizeof(uint64_t));
    if (tokens == NULL || pos == NULL || tok_seq == NULL || seq_start == NULL
        || kv_len == NULL || table == NULL || out_rows == NULL
        || logits == NULL || hist == NULL)
    {
        fprintf(stderr, "llm-bench: out of memory\n");
        goto done;
    }
    if (llm_forward_init(&fw, be, m, cap, c, c * max_blocks, bs, kv_type,
                         &err) != 0)
    {
        fprintf(stderr, "llm-bench: %s\n", err.msg);
        goto done;
    }
    /* sequence s owns blocks [s * max_blocks, (s + 1) * max_blocks) */
    for (i = 0; i < c * max_blocks; i++) {
        table[i] = i;
    }

    ops = *be->ops;
    prof_st.orig = be->ops;
    ops.embed = prof_embed;
    ops.rmsnorm = prof_rmsnorm;
    ops.matmul = prof_matmul;
    if (ops.matmul_n != NULL) {
        ops.matmul_n = prof_matmul_n;
    }
    ops.rope = prof_rope;
    ops.kv_store = prof_kv_store;
    ops.attention = prof_attention;
    ops.silu_mul = prof_silu_mul;
    ops.add = prof_add;
    ops.gather_out_rows = prof_gather_out_rows;
    ops.download = prof_download;
    ops.set_batch = prof_set_batch;
    be->ops = &ops;

    memset(&b, 0, sizeof(b));
    b.tokens = tokens;
    b.pos = pos;
    b.tok_seq = tok_seq;
    b.seq_start = seq_start;
    b.seq_kv_len = kv_len;
    b.out_rows = out_rows;
    b.max_blocks = max_blocks;

    /* prefill, one sequence at a time (not timed) */
    for (s = 0; s < c; s++) {
        for (t = 0; t < P; t++) {
            tokens[t] = random_token(&x, m->cfg.n_vocab);
            pos[t] = t;
            tok_seq[t] = 0;
        }
        b.n_tokens = P;
        b.n_seqs = 1;
        seq_start[0] = 0;
        seq_start[1] = P;
        kv_len[0] = P;
        b.block_table = table + (size_t) s * max_blocks;
        b.n_out = 1;
        out_rows[0] = P - 1;
        /* as the engine: logits in place where the backend allows */
        if (llm_forward_run(&fw, &b, NULL, 0,
                            llm_forward_logits(&fw) ? NULL : logits, &err)
            != 0)
        {
            fprintf(stderr, "llm-bench: prefill: %s\n", err.msg);
            goto done;
        }
    }

    /* decode: every sequence one token per step */
    b.n_tokens = c;
    b.n_seqs = c;
    b.n_out = c;
    b.block_table = table;
    for (g = 0; g < G; g++) {
        for (s = 0; s < c; s++) {
            tokens[s] = random_token(&x, m->cfg.n_vocab);
            pos[s] = P + g;
            tok_seq[s] = s;
            seq_start[s] = s;
            kv_len[s] = P + g + 1;
            out_rows[s] = s;
        }
        seq_start[c] = c;
        prof_st.on = g > 0;                /* the first step warms up */
        memcpy(prev, prof_st.ns, sizeof(prev));
        t0 = llm_now_ns();
        if (llm_forward_run(&fw, &b, NULL, 0,
                            llm_forward_logits(&fw) ? NULL : logits, &err)
            != 0)
        {
            fprintf(stderr, "llm-bench: decode: %s\n", err.msg);
            goto done;
        }
        if (prof_st.on) {
            uint64_t *row = hist + (size_t) (g - 1) * (PR_KEYS + 1);

            row[PR_KEYS] = llm_now_ns() - t0;
            total += row[PR_KEYS];
            for (i = 0; i < PR_KEYS; i++) {
                row[i] = prof_st.ns[i] - prev[i];
            }
        }
    }

    printf("# profile: %d sequences, context %d..%d, %d threads, %d steps"
           "\n", c, P + 1, P + G, threads, G - 1);
    printf("%-28s %10s %10s %8s %7s\n", "op", "median ms", "min ms", "calls",
           "share");
    med_step = median_u64(hist + PR_KEYS, G - 1, PR_KEYS + 1, 0);
    min_step = median_u64(hist + PR_KEYS, G - 1, PR_KEYS + 1, 1);
    sum = 0;
    sum_min = 0;
    for (i = 0; i < PR_KEYS; i++) {
        char     name[64];
        uint64_t calls = i < PR_N ? prof_st.calls[i]
                                  : prof_st.mm_calls[i - PR_N];
        uint64_t med, low;

        if (calls == 0) {
            continue;
        }
        if (i < PR_N) {
            snprintf(name, sizeof(name), "%s", pr_names[i]);
        } else {
            snprintf(name, sizeof(name), "matmul %s %lldx%lld",
                     llm_dtype_get(prof_st.mm_type[i - PR_N])->name,
                     (long long) prof_st.mm_m[i - PR_N],
                     (long long) prof_st.mm_k[i - PR_N]);
        }
        med = median_u64(hist + i, G - 1, PR_KEYS + 1, 0);
        low = median_u64(hist + i, G - 1, PR_KEYS + 1, 1);
        printf("%-28s %10.3f %10.3f %8.0f %6.1f%%\n", name, med / 1e6,
               low / 1e6, (double) calls / (G - 1), 100.0 * med / med_step);
        sum += med;
        sum_min += low;
    }
    printf("%-28s %10.3f %10.3f %8s %6.1f%%\n", "(rest)",
           ((double) med_step - (double) sum) / 1e6,
           ((double) min_step - (double) sum_min) / 1e6, "",
           100.0 * ((double) med_step - (double) sum) / med_step);
    printf("%-28s %10.3f %10.3f %8s  %.1f tok/s at the median step, %.1f"
           " at the fastest\n", "step", med_step / 1e6, min_step / 1e6, "",
           c / (med_step / 1e9), c / (min_step / 1e9));
    printf("%-28s %10s %10.3f %8s  (sum of each op's fastest)\n",
           "step lower bound", "", sum_min / 1e6, "");
    (void) total;
    rc = 0;

done:
    be->ops = prof_st.orig != NULL ? prof_st.orig : be->ops;
    llm_forward_free(&fw);
    llm_free(tokens);
    llm_free(pos);
    llm_free(tok_seq);
    llm_free(seq_start);
    llm_free(kv_len);
    llm_free(table);
    llm_free(out_rows);
    llm_free(logits);
    llm_free(hist);
    llm_model_free(m);
    be->ops->free(be);
    return rc;
}


int
main(int argc, char **argv)
{
    llm_engine_params  ep;
    llm_engine        *e;
    llm_err            err = { 0, "" };
    const char        *model = NULL, *device = "cpu";
    int                threads = 0, P = 128, G = 64, repeat = 2, prof = 0;
    int                kv_type = LLM_F16;
    int                conc[16] = { 1, 8, 32 }, n_conc = 3, i, r, maxc = 0;
    char               desc[2048];

    for (i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (strcmp(argv[i], "--model") == 0) { model = v; i++; }
        else if (strcmp(argv[i], "--threads") == 0) { threads = atoi(v); i++; }
        else if (strcmp(argv[i], "--device") == 0) { device = v; i++; }
        else if (strcmp(argv[i], "--prompt-tokens") == 0) { P = atoi(v); i++; }
        else if (strcmp(argv[i], "--gen-tokens") == 0) { G = atoi(v); i++; }
        else if (strcmp(argv[i], "--repeat") == 0) { repeat = atoi(v); i++; }
        else if (strcmp(argv[i], "--profile") == 0) { prof = 1; }
        else if (strcmp(argv[i], "--kv") == 0) {
            kv_type = llm_kv_type_parse(v);
            if (kv_type < 0) {
                fprintf(stderr, "llm-bench: --kv f16|f32|q8_0\n");
                return 2;
            }
            i++;
        }
        else if (strcmp(argv[i], "--concurrency") == 0) {
            n_conc = parse_list(v, conc, 16);
            i++;
        } else {
            fprintf(stderr,
                    "usage: llm-bench --model PATH [--device cpu|cuda:N] "
                    "[--threads N] "
                    "[--prompt-tokens P] [--gen-tokens G] "
                    "[--concurrency 1,8,32] [--repeat R] [--kv f16|f32|q8_0] "
                    "[--profile]\n");
            return 2;
        }
    }
    if (model == NULL || P < 1 || G < 2 || n_conc < 1 || repeat < 1) {
        fprintf(stderr, "llm-bench: --model is required; P >= 1, G >= 2\n");
        return 2;
    }
    for (i = 0; i < n_conc; i++) {
        if (conc[i] < 1 || conc[i] > 1024) {
            fprintf(stderr, "llm-bench: concurrency must be 1..1024\n");
            return 2;
        }
        maxc = conc[i] > maxc ? conc[i] : maxc;
    }
    if (prof) {
        for (i = 0; i < n_conc; i++) {
            for (r = 0; r < repeat; r++) {
                memset(&prof_st, 0, sizeof(prof_st));
                if (profile(model, device, threads, conc[i], P, G,
                            kv_type) != 0)
                {
                    return 1;
                }
            }
        }
        return 0;
    }

    memset(&ep, 0, sizeof(ep));
    ep.model_path = model;
    ep.device = device;
    ep.n_threads = threads;
    ep.max_seqs = maxc;
    ep.max_step_tokens = 512 > maxc ? 512 : maxc;
    /* F16 pages, as llm-engine and llm-run use (a zeroed kv_type would
     * be LLM_F32, twice the bytes for attention to read), and room for
     * every sequence's whole context plus one block each: a benchmark of
     * the decode step must not preempt and recompute sequences */
    ep.kv_type = kv_type;
    {
        llm_model_config cfg;
        size_t           blocks;

        if (llm_model_read_config(model, &cfg, &err) != 0) {
            fprintf(stderr, "llm-bench: %s\n", err.msg);
            return 1;
        }
        blocks = (size_t) maxc * (size_t) ((P + G + LLM_KV_BLOCK_SIZE - 1)
                                           / LLM_KV_BLOCK_SIZE + 1);
        ep.kv_memory = blocks * llm_forward_kv_block_bytes(
            &cfg, LLM_KV_BLOCK_SIZE, ep.kv_type);
    }
    if (ep.kv_memory < ((size_t) 64 << 20)) {
        ep.kv_memory = (size_t) 64 << 20;
    }
    e = llm_engine_new(&ep, &err);
    if (e == NULL) {
        fprintf(stderr, "llm-bench: %s\n", err.msg);
        return 1;
    }
    llm_model_describe(llm_engine_model(e), desc, sizeof(desc));
    fprintf(stderr, "%s", desc);
    printf("# model=%s threads=%d prompt=%d gen=%d kv=%s\n", model, threads,
           P, G, llm_kv_type_name(kv_type));
    printf("%-12s %16s %16s %16s %14s\n", "concurrency", "prefill tok/s",
           "decode tok/s", "per-seq tok/s", "step ms (med)");

    for (i = 0; i < n_conc; i++) {
        double best_p = 0, best_d = 0, best_s = 0;
        for (r = 0; r < repeat; r++) {
            double p = 0, d = 0, sm = 0;
            /* a seed per run: no prompt repeats, so a prefix cache
             * never serves one */
            if (run_once(e, conc[i], P, G, (uint32_t) (1000 * i + r + 1),
                         &p, &d, &sm,
                         &err) != 0)
            {
                fprintf(stderr, "llm-bench: %s\n", err.msg);
                llm_engine_free(e);
                return 1;
            }
            best_p = p > best_p ? p : best_p;
            best_d = d > best_d ? d : best_d;
            best_s = best_s == 0 || (sm > 0 && sm < best_s) ? sm : best_s;
        }
        printf("%-12d %16.1f %16.1f %16.1f %14.2f\n", conc[i], best_p,
               best_d, best_d / conc[i], best_s);
        fflush(stdout);
    }
    llm_engine_free(e);
    return 0;
}
