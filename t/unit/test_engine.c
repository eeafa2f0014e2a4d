/*
 * The engine end to end on real weights: logits and greedy tokens against
 * llama.cpp (fixtures from tools/make_reference.py), batch invariance,
 * seeded sampling, preemption, KV page accounting.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "test.h"

#define F32_MODEL   ".models/smollm2-135m-f32.gguf"
#define REF_DIR     "t/fixtures/reference"
#define MAX_IDS     512
#define MAX_SEQS    64


typedef struct {
    char        name[64];
    int32_t     tokens[MAX_IDS];
    int         n_tokens;
    int32_t     greedy_f32[MAX_IDS];
    int         n_greedy_f32;
    int32_t     greedy_q41[MAX_IDS];
    int         n_greedy_q41;
    int         subset_rows;
} ref_prompt;


static int
parse_ids(const char *s, int32_t *out, int cap)
{
    int   n = 0;
    char *end;

    while (n < cap) {
        long v = strtol(s, &end, 10);
        if (end == s) {
            break;
        }
        out[n++] = (int32_t) v;
        s = end;
    }
    return n;
}


static int
load_ref(const char *name, ref_prompt *r)
{
    char  path[512], line[8192];
    FILE *f;

    memset(r, 0, sizeof(*r));
    snprintf(r->name, sizeof(r->name), "%s", name);
    snprintf(path, sizeof(path), "%s/%s.txt", REF_DIR, name);
    f = fopen(path, "r");
    if (f == NULL) {
        return -1;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        char *v = strchr(line, ':');
        if (v == NULL) {
            continue;
        }
        *v++ = '\0';
        if (strcmp(line, "tokens") == 0) {
            r->n_tokens = parse_ids(v, r->tokens, MAX_IDS);
        } else if (strcmp(line, "greedy_f32") == 0) {
            r->n_greedy_f32 = parse_ids(v, r->greedy_f32, MAX_IDS);
        } else if (strcmp(line, "greedy_q41") == 0) {
            r->n_greedy_q41 = parse_ids(v, r->greedy_q41, MAX_IDS);
        } else if (strcmp(line, "subset_rows") == 0) {
            r->subset_rows = atoi(v);
        }
    }
    fclose(f);
    return r->n_tokens > 0 ? 0 : -1;
}


static int
load_refs(ref_prompt *refs, int cap)
{
    char  line[256];
    FILE *f = fopen(REF_DIR "/INDEX", "r");
    int   n = 0;

    if (f == NULL) {
        return 0;
    }
    while (n < cap && fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == '#' || line[0] == '\0') {
            continue;
        }
        if (load_ref(line, &refs[n]) == 0) {
            n++;
        }
    }
    fclose(f);
    return n;
}


static llm_engine *
open_engine(const char *model, int kv_type, int max_seqs, size_t kv_memory)
{
    llm_engine_params p;
    llm_err           err = { 0, "" };
    llm_engine       *e;

    memset(&p, 0, sizeof(p));
    p.model_path = model;
    p.kv_type = kv_type;
    p.max_seqs = max_seqs;
    p.max_step_tokens = 256;
    p.kv_memory = kv_memory;
    e = llm_engine_new(&p, &err);
    if (e == NULL) {
        printf("       engine: %s\n", err.msg);
    }
    return e;
}


/* ---- collecting events -------------------------------------------- */

typedef struct {
    uint64_t    seq_id[MAX_SEQS];
    int32_t     out[MAX_SEQS][MAX_IDS];
    int         n_out[MAX_SEQS];
    int         finish[MAX_SEQS];
    int         n_seqs;
    /* teacher-forced logits of seq 0 */
    float      *logits;             /* [n_pos, n_vocab] */
    int         n_vocab;
    int         n_logits;
} collect;


static int
collect_index(collect *c, uint64_t id)
{
    int i;

    for (i = 0; i < c->n_seqs; i++) {
        if (c->seq_id[i] == id) {
            return i;
        }
    }
    return -1;
}


static void
on_event(void *ud, const llm_event *ev)
{
    collect *c = ud;
    int      i = collect_index(c, ev->seq_id);

    if (i < 0) {
        return;
    }
    if (ev->type == LLM_EV_TOKEN && c->n_out[i] < MAX_IDS) {
        c->out[i][c->n_out[i]++] = ev->sample.token;
    } else if (ev->type == LLM_EV_DONE) {
        c->finish[i] = ev->finish;
    } else if (ev->type == LLM_EV_LOGITS && c->logits != NULL
               && ev->pos < MAX_IDS)
    {
        memcpy(c->logits + (size_t) ev->pos * ev->n_vocab, ev->logits,
               (size_t) ev->n_vocab * sizeof(float));
        c->n_vocab = ev->n_vocab;
        c->n_logits++;
    }
}


static int
submit(llm_engine *e, collect *c, const int32_t *ids, int n, int max_tokens,
       const llm_sampling *s, int prompt_logits)
{
    llm_request req;
    llm_err     err = { 0, "" };

    memset(&req, 0, sizeof(req));
    req.prompt = ids;
    req.n_prompt = n;
    req.max_tokens = max_tokens;
    if (s != NULL) {
        req.sampling = *s;
    } else {
        llm_sampling_default(&req.sampling);
    }
    req.ignore_eos = 1;
    req.prompt_logits = prompt_logits;
    if (llm_engine_submit(e, &req, &c->seq_id[c->n_seqs], &err) != 0) {
        printf("       submit: %s\n", err.msg);
        return -1;
    }
    c->n_seqs++;
    return 0;
}


static int
run_all(llm_engine *e, collect *c)
{
    llm_err err = { 0, "" };
    int     steps = 0;

    while (!llm_engine_idle(e)) {
        if (llm_engine_step(e, on_event, c, &err) != 0) {
            printf("       step: %s\n", err.msg);
            return -1;
        }
        if (++steps > 100000) {
            printf("       engine did not finish\n");
            return -1;
        }
    }
    return 0;
}


/* ---- logits against llama.cpp (F32 weights, F32 KV) --------------- */

static float *
read_floats(const char *path, size_t *n)
{
    FILE  *f = fopen(path, "rb");
    float *buf;
    long   size;

    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t) size);
    if (buf == NULL || fread(buf, 1, (size_t) size, f) != (size_t) size) {
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *n = (size_t) size / sizeof(float);
    return buf;
}


/* max |ours - ref| / max |ref| over one row's compared entries */
static double
rel_err(const float *ours, const float *ref, int n)
{
    double dmax = 0, rmax = 0;
    int    i;

    for (i = 0; i < n; i++) {
        double d = fabs((double) ours[i] - ref[i]);
        dmax = d > dmax ? d : dmax;
        rmax = fabs(ref[i]) > rmax ? fabs(ref[i]) : rmax;
    }
    return rmax > 0 ? dmax / rmax : dmax;
}


TEST_SUITE(engine_reference_logits)
{
    static ref_prompt refs[16];
    llm_engine       *e;
    int               n_refs, i, p;
    double            worst = 0;

    test("teacher-forced logits match llama.cpp (F32 model) within 1e-3");
    n_refs = load_refs(refs, 16);
    if (n_refs == 0 || access(F32_MODEL, R_OK) != 0) {
        test_skip("needs " F32_MODEL " (make models) and reference "
                  "fixtures");
        return;
    }
    e = open_engine(F32_MODEL, LLM_F32, 16, (size_t) 64 << 20);
    test_cond(e != NULL);
    if (e == NULL) {
        return;
    }
    for (i = 0; i < n_refs; i++) {
        ref_prompt *r = &refs[i];
        collect    *c = calloc(1, sizeof(*c));
        int         n_vocab = llm_engine_model(e)->cfg.n_vocab;
        char        path[512];
        float      *sub, *last;
        size_t      n_sub = 0, n_last = 0;
        double      err_last, err_sub = 0;

        c->logits = malloc((size_t) r->n_tokens * n_vocab * sizeof(float));
        test_cond(submit(e, c, r->tokens, r->n_tokens, 1, NULL, 1) == 0);
        test_cond(run_all(e, c) == 0);
        test_cond(c->n_logits == r->n_tokens);

        snprintf(path, sizeof(path), "%s/%s.last.f32", REF_DIR, r->name);
        last = read_floats(path, &n_last);
        snprintf(path, sizeof(path), "%s/%s.sub.f32", REF_DIR, r->name);
        sub = read_floats(path, &n_sub);
        test_cond(last != NULL && n_last == (size_t) n_vocab);
        test_cond(sub != NULL && n_sub == (size_t) r->subset_rows * 3);
        if (last == NULL || sub == NULL || c->n_logits != r->n_tokens) {
            free(last); free(sub); free(c->logits); free(c);
            continue;
        }
        err_last = rel_err(c->logits + (size_t) (r->n_tokens - 1) * n_vocab,
                           last, n_vocab);
        /* subset rows: (id, pos, logit); per position, the max error over
         * its entries relative to the position's largest |logit| */
        for (p = 0; p < r->n_tokens; p++) {
            double dmax = 0, rmax = 0;
            size_t k;
            for (k = 0; k < (size_t) r->subset_rows; k++) {
                int32_t id, pos;
                float   ref;
                memcpy(&id, &sub[k * 3], 4);
                memcpy(&pos, &sub[k * 3 + 1], 4);
                ref = sub[k * 3 + 2];
                if (pos != p) {
                    continue;
                }
                dmax = fmax(dmax, fabs(c->logits[(size_t) p * n_vocab + id]
                                       - ref));
                rmax = fmax(rmax, fabs(ref));
            }
            err_sub = fmax(err_sub, rmax > 0 ? dmax / rmax : dmax);
        }
        printf("       %-8s %3d positions: rel err last row %.2e, all "
               "positions %.2e\n", r->name, r->n_tokens, err_last, err_sub);
        worst = fmax(worst, fmax(err_last, err_sub));
        free(last);
        free(sub);
        free(c->logits);
        free(c);
    }
    test_cond(worst <= 1e-3);
    llm_engine_free(e);
}


static int
greedy_batch(const char *model, int kv_type, ref_prompt *refs, int n,
             collect *c, int n_gen)
{
    llm_engine *e = open_engine(model, kv_type, 16, (size_t) 128 << 20);
    int         i;

    if (e == NULL) {
        return -1;
    }
    memset(c, 0, sizeof(*c));
    for (i = 0; i < n; i++) {
        if (submit(e, c, refs[i].tokens, refs[i].n_tokens, n_gen, NULL, 0)
            != 0)
        {
            llm_engine_free(e);
            return -1;
        }
    }
    i = run_all(e, c);
    llm_engine_free(e);
    return i;
}


TEST_SUITE(engine_reference_greedy)
{
    static ref_prompt refs[16];
    static collect    c;
    int               n_refs, i, same = 0, same_q = 0;

    n_refs = load_refs(refs, 16);

    test("greedy 64 tokens identical to llama.cpp on the F32 model");
    if (n_refs == 0 || access(F32_MODEL, R_OK) != 0) {
        test_skip("needs " F32_MODEL " and reference fixtures");
    } else {
        test_cond(greedy_batch(F32_MODEL, LLM_F32, refs, n_refs, &c, 64)
                  == 0);
        for (i = 0; i < n_refs; i++) {
            int ok = c.n_out[i] == refs[i].n_greedy_f32
                     && memcmp(c.out[i], refs[i].greedy_f32,
                               sizeof(int32_t) * c.n_out[i]) == 0;
            if (!ok) {
                printf("       %s differs from llama.cpp\n", refs[i].name);
            }
            same += ok;
        }
        printf("       F32: %d of %d prompts identical over 64 tokens\n",
               same, n_refs);
        test_cond(same == n_refs);
    }

    /*
     * With Q4_1 weights the activations are quantized to 8 bits before
     * every matrix product (as llama.cpp does), so a difference in the
     * last bit of a sum can flip a rounding and the flip grows through
     * the layers: our own scalar and AVX-512 paths differ from each
     * other as much as from llama.cpp.  What is checked: the first token
     * of every prompt; what is reported: how long each continuation
     * stays identical (bench/RESULTS.md keeps the figure).
     */
    test("greedy on the Q4_1 model: first token as llama.cpp, agreement "
         "reported");
    if (n_refs == 0 || llm_test_default_model() == NULL) {
        test_skip("needs the default model and reference fixtures");
        return;
    }
    /* the reference ran with an F32 KV cache too */
    test_cond(greedy_batch(llm_test_default_model(), LLM_F32, refs, n_refs,
                           &c, 64) == 0);
    {
        int first_ok = 0, total = 0;
        for (i = 0; i < n_refs; i++) {
            int k = 0;
            while (k < c.n_out[i] && k < refs[i].n_greedy_q41
                   && c.out[i][k] == refs[i].greedy_q41[k])
            {
                k++;
            }
            printf("       Q4_1 %-8s first %2d of 64 tokens identical\n",
                   refs[i].name, k);
            same_q += k == 64;
            first_ok += k > 0;
            total += k;
        }
        printf("       Q4_1: %d of %d prompts identical over 64 tokens; "
               "%.1f identical tokens on average\n", same_q, n_refs,
               (double) total / n_refs);
        test_cond(first_ok == n_refs);
    }

    /*
     * The same choices given the same context: each prompt followed by
     * llama.cpp's own Q4_1 continuation, teacher-forced; at every position
     * our argmax should be llama.cpp's next token.  Where the two differ
     * it is a near tie: llama.cpp's token a few per cent below our top
     * logit, the size by which the 8-bit activations move logits (our
     * own ISA paths differ from each other by 2 to 5%).  This agreement
     * does not depend on where a free run first flips.
     */
    test("Q4_1 model fed llama.cpp's continuation: llama.cpp's next token "
         "is our argmax at 95% of the positions or more, near ties else");
    {
        int    agree = 0, total = 0, bad = 0, k;
        double gap = 0;

        for (i = 0; i < n_refs && !bad; i++) {
            llm_engine *e = open_engine(llm_test_default_model(), LLM_F32,
                                        1, (size_t) 64 << 20);
            int32_t     ids[MAX_IDS];
            int         n = refs[i].n_tokens, g = refs[i].n_greedy_q41 - 1;

            if (e == NULL || n + g > MAX_IDS) {
                bad = 1;
                llm_engine_free(e);
                break;
            }
            memcpy(ids, refs[i].tokens, sizeof(int32_t) * n);
            memcpy(ids + n, refs[i].greedy_q41, sizeof(int32_t) * g);
            memset(&c, 0, sizeof(c));
            c.logits = malloc(sizeof(float) * (size_t) (n + g)
                              * llm_engine_model(e)->cfg.n_vocab);
            bad = c.logits == NULL
                  || submit(e, &c, ids, n + g, 1, NULL, 1) != 0
                  || run_all(e, &c) != 0 || c.n_logits != n + g;
            for (k = 0; !bad && k <= g; k++) {
                const float *row = c.logits + (size_t) (n - 1 + k)
                                              * c.n_vocab;
                int          v, best = 0;

                for (v = 1; v < c.n_vocab; v++) {
                    best = row[v] > row[best] ? v : best;
                }
                agree += best == refs[i].greedy_q41[k];
                total++;
                /* how far llama.cpp's choice is below ours */
                gap = fmax(gap, (row[best] - row[refs[i].greedy_q41[k]])
                                / fabs(row[best]));
            }
            free(c.logits);
            c.logits = NULL;
            llm_engine_free(e);
        }
        printf("       Q4_1, teacher-forced: %d of %d next tokens as "
               "llama.cpp's; where not, its token's logit is at most "
               "%.1f%% below our top one\n", agree, total, 100 * gap);
        test_cond(!bad && total > 0 && agree * 100 >= total * 95
                  && gap < 0.05);
    }
}


/* ---- batch invariance, seeds, preemption -------------------------- */

/* 16 prompts of mixed lengths cut from the reference prompts. */
static int
mixed_prompts(ref_prompt *refs, int n_refs, int32_t (*ids)[MAX_IDS],
              int *lens, int n)
{
    int i, k;

    for (i = 0; i < n; i++) {
        ref_prompt *r = &refs[i % n_refs];
        int len = 1 + (i * 7) % r->n_tokens;
        for (k = 0; k < len; k++) {
            ids[i][k] = r->tokens[k];
        }
        /* vary the tail so repeated prompts differ */
        ids[i][len] = 300 + i;
        lens[i] = len + 1;
    }
    return n;
}


/* The 16 mixed prompts, each alone then all in one batch, 24 greedy
 * tokens: the number of sequences whose tokens are the same both ways
 * (alone: their tokens, for the caller). */
static int
batch_vs_alone(llm_engine *e, int32_t (*ids)[MAX_IDS], const int *lens,
               collect *alone)
{
    static collect batch;
    int            i, same = 0;

    memset(alone, 0, sizeof(*alone));
    for (i = 0; i < 16; i++) {
        collect one;
        memset(&one, 0, sizeof(one));
        submit(e, &one, ids[i], lens[i], 24, NULL, 0);
        run_all(e, &one);
        memcpy(alone->out[i], one.out[0], sizeof(one.out[0]));
        alone->n_out[i] = one.n_out[0];
    }
    memset(&batch, 0, sizeof(batch));
    for (i = 0; i < 16; i++) {
        submit(e, &batch, ids[i], lens[i], 24, NULL, 0);
    }
    if (run_all(e, &batch) != 0) {
        return -1;
    }
    for (i = 0; i < 16; i++) {
        same += batch.n_out[i] == 24 && alone->n_out[i] == 24
                && memcmp(batch.out[i], alone->out[i], 24 * 4) == 0;
    }
    printf("       %d of 16 sequences identical\n", same);
    return same;
}


TEST_SUITE(engine_batch_invariance)
{
    static ref_prompt refs[16];
    static int32_t    ids[16][MAX_IDS];
    static collect    alone, batch;
    int               lens[16], n_refs, i, same;
    const char       *model = llm_test_default_model();
    llm_engine       *e;
    llm_sampling      s;

    test("16 mixed sequences in one batch give the tokens each gives alone");
    n_refs = load_refs(refs, 16);
    if (model == NULL || n_refs == 0) {
        test_skip("needs the default model and reference fixtures");
        return;
    }
    mixed_prompts(refs, n_refs, ids, lens, 16);
    e = open_engine(model, LLM_F16, 16, (size_t) 128 << 20);
    test_cond(e != NULL);
    if (e == NULL) {
        return;
    }
    test_cond(batch_vs_alone(e, ids, lens, &alone) == 16);

    test("same seed, same tokens, alone or in a batch; other seeds differ");
    llm_sampling_default(&s);
    s.temperature = 0.9f;
    s.top_p = 0.95f;
    s.has_seed = 1;
    s.seed = 42;
    {
        collect a, b2;
        memset(&a, 0, sizeof(a));
        memset(&b2, 0, sizeof(b2));
        submit(e, &a, ids[3], lens[3], 32, &s, 0);
        run_all(e, &a);
        for (i = 0; i < 8; i++) {
            llm_sampling s2 = s;
            s2.seed = (uint64_t) (i == 4 ? 42 : 1000 + i);
            submit(e, &b2, ids[i == 4 ? 3 : i], lens[i == 4 ? 3 : i], 32,
                   &s2, 0);
        }
        run_all(e, &b2);
        test_cond(a.n_out[0] == 32 && b2.n_out[4] == 32
                  && memcmp(a.out[0], b2.out[4], 32 * 4) == 0);
        /* seq 3 of the batch has the same prompt, another seed */
        test_cond(memcmp(b2.out[3], b2.out[4], 32 * 4) != 0);
    }
    llm_engine_free(e);

    test("preemption under a small KV budget changes no output");
    {
        llm_engine_stats st;
        /* ~24 blocks of 16 tokens: 16 sequences cannot all fit */
        e = open_engine(model, LLM_F16, 16, (size_t) 24 * 368640);
        test_cond(e != NULL);
        if (e == NULL) {
            return;
        }
        memset(&batch, 0, sizeof(batch));
        for (i = 0; i < 16; i++) {
            submit(e, &batch, ids[i], lens[i], 24, NULL, 0);
        }
        test_cond(run_all(e, &batch) == 0);
        llm_engine_get_stats(e, &st);
        printf("       %llu preemptions\n",
               (unsigned long long) st.preemptions);
        same = 0;
        for (i = 0; i < 16; i++) {
            same += batch.n_out[i] == 24
                    && memcmp(batch.out[i], alone.out[i], 24 * 4) == 0;
        }
        test_cond(same == 16);
        test_cond(st.preemptions > 0);
        test_cond(st.kv_blocks_used == 0);
        llm_engine_free(e);
    }
}


/* ---- Q8_0 KV pages ------------------------------------------------ */

TEST_SUITE(engine_kv_q8_0)
{
    static ref_prompt refs[16];
    static int32_t    ids[16][MAX_IDS];
    static collect    alone, c32, c8;
    int               lens[16], n_refs, i, k;
    int               agree[2] = { 0, 0 }, total[2] = { 0, 0 };
    const char       *model = llm_test_default_model();
    llm_engine       *e, *e32, *e16;
    double            err_sum[2] = { 0, 0 };

    test("Q8_0 KV pages: 16 mixed sequences in one batch give the tokens "
         "each gives alone");
    n_refs = load_refs(refs, 16);
    if (model == NULL || n_refs == 0) {
        test_skip("needs the default model and reference fixtures");
        return;
    }
    mixed_prompts(refs, n_refs, ids, lens, 16);
    e = open_engine(model, LLM_Q8_0, 16, (size_t) 64 << 20);
    test_cond(e != NULL);
    if (e == NULL) {
        return;
    }
    test_cond(batch_vs_alone(e, ids, lens, &alone) == 16);

    /*
     * Teacher-forced on each reference prompt and its llama.cpp
     * continuation, against F32 pages: the argmax at (nearly) every
     * position, and logits moved hardly more than F16 pages move them
     * (on this Q4_1 model the 8-bit activations move them most).
     */
    test("Q8_0 KV pages: next tokens as F32 pages give them at 95% of the "
         "positions or more");
    e32 = open_engine(model, LLM_F32, 1, (size_t) 64 << 20);
    e16 = open_engine(model, LLM_F16, 1, (size_t) 64 << 20);
    test_cond(e32 != NULL && e16 != NULL);
    for (i = 0; e32 != NULL && e16 != NULL && i < n_refs; i++) {
        int32_t      seq[MAX_IDS];
        int          n = refs[i].n_tokens, g = refs[i].n_greedy_q41, v, w;
        int          nv = llm_engine_model(e)->cfg.n_vocab;
        llm_engine  *other[2] = { e, e16 };

        if (n + g > MAX_IDS) {
            continue;
        }
        memcpy(seq, refs[i].tokens, sizeof(int32_t) * n);
        memcpy(seq + n, refs[i].greedy_q41, sizeof(int32_t) * g);
        memset(&c32, 0, sizeof(c32));
        c32.logits = malloc(sizeof(float) * (size_t) (n + g) * nv);
        if (c32.logits == NULL || submit(e32, &c32, seq, n + g, 1, NULL, 1)
            || run_all(e32, &c32) != 0 || c32.n_logits != n + g)
        {
            free(c32.logits);
            continue;
        }
        for (w = 0; w < 2; w++) {
            memset(&c8, 0, sizeof(c8));
            c8.logits = malloc(sizeof(float) * (size_t) (n + g) * nv);
            if (c8.logits != NULL
                && submit(other[w], &c8, seq, n + g, 1, NULL, 1) == 0
                && run_all(other[w], &c8) == 0 && c8.n_logits == n + g)
            {
                for (k = 0; k < n + g; k++) {
                    const float *a = c32.logits + (size_t) k * nv;
                    const float *b = c8.logits + (size_t) k * nv;
                    int          ba = 0, bb = 0;
                    float        top = 0, d = 0;

                    for (v = 0; v < nv; v++) {
                        ba = a[v] > a[ba] ? v : ba;
                        bb = b[v] > b[bb] ? v : bb;
                        top = fmaxf(top, fabsf(a[v]));
                        d = fmaxf(d, fabsf(a[v] - b[v]));
                    }
                    agree[w] += ba == bb;
                    total[w]++;
                    err_sum[w] += d / top;
                }
            }
            free(c8.logits);
        }
        free(c32.logits);
    }
    for (k = 0; k < 2; k++) {
        printf("       %s: %d of %d positions with F32's argmax; logits "
               "off by %.2f%% of the largest on average\n",
               k == 0 ? "Q8_0" : "F16 ", agree[k], total[k],
               total[k] ? 100 * err_sum[k] / total[k] : 0.0);
    }
    test_cond(total[0] > 0 && total[1] == total[0]
              && agree[0] * 100 >= total[0] * 95
              && err_sum[0] < 1.5 * err_sum[1]);
    llm_engine_free(e32);

    test("Q8_0 KV pages take about half the bytes of F16");
    {
        llm_engine_stats st8, st16;

        llm_engine_get_stats(e, &st8);
        test_cond(e16 != NULL);
        if (e16 != NULL) {
            llm_engine_get_stats(e16, &st16);
            printf("       64 MiB: %d blocks of Q8_0, %d of F16\n",
                   (int) st8.kv_blocks_total, (int) st16.kv_blocks_total);
            test_cond(st8.kv_blocks_total * 32 >= st16.kv_blocks_total * 60);
            llm_engine_free(e16);
        }
    }
    llm_engine_free(e);
}


TEST_SUITE(engine_kv_accounting)
{
    const char       *model = llm_test_default_model();
    llm_engine       *e;
    llm_engine_stats  st;
    static collect    c;
    int32_t           ids[40];
    int               round, i, k, cancelled = 0;
    uint64_t          x = 7;

    test("thousands of sequences with cancellations leak no KV block");
    if (model == NULL) {
        test_skip("needs the default model");
        return;
    }
    e = open_engine(model, LLM_F16, 32, (size_t) 40 * 368640);
    test_cond(e != NULL);
    if (e == NULL) {
        return;
    }
    for (round = 0; round < 70; round++) {
        memset(&c, 0, sizeof(c));
        for (i = 0; i < 32; i++) {
            int len = 1 + (int) (x % 37);
            for (k = 0; k < len; k++) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                ids[k] = (int32_t) (300 + (x >> 33) % 40000);
            }
            submit(e, &c, ids, len, 1 + (int) ((x >> 20) % 3), NULL, 0);
        }
        /* one step, then cancel a few running or waiting ones */
        llm_engine_step(e, on_event, &c, NULL);
        for (i = 0; i < 32; i += 5) {
            cancelled += llm_engine_cancel(e, c.seq_id[i]) == 0;
        }
        test_cond(run_all(e, &c) == 0);
        for (i = 0; i < 32; i++) {
            if (c.finish[i] == 0 || c.finish[i] == LLM_FINISH_ERROR) {
                break;
            }
        }
        test_cond(i == 32);
    }
    llm_engine_get_stats(e, &st);
    printf("       %d rounds of 32 (%d cancelled), %llu preemptions, "
           "%d of %d blocks in use at the end\n", round, cancelled,
           (unsigned long long) st.preemptions, st.kv_blocks_used,
           st.kv_blocks_total);
    test_cond(st.kv_blocks_used == 0);
    test_cond(cancelled > 0);
    test_cond(llm_engine_cancel(e, 999999) == LLM_ENOTFOUND);
    llm_engine_free(e);
}


TEST_SUITE(engine_submit_errors)
{
    const char  *model = llm_test_default_model();
    llm_engine  *e;
    llm_request  req;
    llm_err      err = { 0, "" };
    int32_t      ids[4] = { 1, 2, 3, 4 };

    test("bad submits are refused with a message");
    if (model == NULL) {
        test_skip("needs the default model");
        return;
    }
    e = open_engine(model, LLM_F16, 4, (size_t) 16 << 20);
    test_cond(e != NULL);
    if (e == NULL) {
        return;
    }
    memset(&req, 0, sizeof(req));
    llm_sampling_default(&req.sampling);
    req.prompt = ids;
    req.n_prompt = 0;
    req.max_tokens = 4;
    test_cond(llm_engine_submit(e, &req, NULL, &err) == LLM_EINVAL);
    req.n_prompt = 4;
    ids[2] = 1 << 20;
    test_cond(llm_engine_submit(e, &req, NULL, &err) == LLM_EINVAL);
    test_cond(strstr(err.msg, "vocabulary") != NULL);
    ids[2] = 3;
    req.max_tokens = llm_engine_n_ctx(e);
    test_cond(llm_engine_submit(e, &req, NULL, &err) == LLM_EINVAL);
    test_cond(strstr(err.msg, "context") != NULL);
    req.max_tokens = 4;
    req.sampling.temperature = 5;
    test_cond(llm_engine_submit(e, &req, NULL, &err) == LLM_EINVAL);
    test_cond(llm_engine_idle(e));
    llm_engine_free(e);
}


/* ---- tiny models: the same weights in both layouts ----------------- */

static int
tiny_logits(const char *path, const int32_t *ids, int n, float *out,
            int *n_vocab)
{
    llm_engine *e = open_engine(path, LLM_F32, 2, (size_t) 8 << 20);
    collect    *c;
    int         rc;

    if (e == NULL) {
        return -1;
    }
    *n_vocab = llm_engine_model(e)->cfg.n_vocab;
    c = calloc(1, sizeof(*c));
    c->logits = out;
    rc = submit(e, c, ids, n, 1, NULL, 1) == 0 && run_all(e, c) == 0
         && c->n_logits == n ? 0 : -1;
    free(c);
    llm_engine_free(e);
    return rc;
}


TEST_SUITE(engine_tiny_layouts)
{
    static const struct { const char *name, *args; } models[] = {
        { "gqa-untied", "--layers 2 --dim 64 --heads 4 --kv-heads 2 "
                        "--ffn 160 --untied" },
        { "qwen2-bias", "--layers 2 --dim 64 --heads 4 --kv-heads 1 "
                        "--ffn 128 --qkv-bias --tied" },
        { "llama3-rope", "--layers 2 --dim 64 --heads 2 --ffn 96 "
                         "--rope-scaling llama3 --ctx 4096" },
    };
    int32_t ids[24];
    size_t  m;
    int     i;

    for (i = 0; i < 24; i++) {
        ids[i] = 100 + i * 977 % 40000;
    }
    for (m = 0; m < sizeof(models) / sizeof(models[0]); m++) {
        char   dir[512], cmd[1024], path[600];
        float *a, *b;
        int    nv = 0, nv2 = 0;

        test(models[m].name);
        snprintf(dir, sizeof(dir), "%s/tiny-%s", llm_test_tmp_dir(),
                 models[m].name);
        snprintf(cmd, sizeof(cmd), "python3 tools/make_tiny_model.py %s "
                 "--gguf-type f32 --dtype f32 --seed 3 --out %s "
                 ">/dev/null 2>&1", models[m].args, dir);
        if (system(cmd) != 0) {
            test_skip("tools/make_tiny_model.py failed (python3, gguf?)");
            continue;
        }
        a = calloc((size_t) 24 * 49152, sizeof(float));
        b = calloc((size_t) 24 * 49152, sizeof(float));
        snprintf(path, sizeof(path), "%s/model.gguf", dir);
        test_cond(tiny_logits(path, ids, 24, a, &nv) == 0);
        snprintf(path, sizeof(path), "%s/hf", dir);
        test_cond(tiny_logits(path, ids, 24, b, &nv2) == 0);
        test_cond(nv == nv2 && nv > 0);
        if (nv == nv2 && nv > 0) {
            double worst = 0;
            for (i = 0; i < 24; i++) {
                worst = fmax(worst, rel_err(a + (size_t) i * nv,
                                            b + (size_t) i * nv, nv));
            }
            printf("       GGUF vs Hugging Face layout: rel err %.2e\n",
                   worst);
            test_cond(worst < 1e-4);
        }
        free(a);
        free(b);
    }
}
