/*
 * Multi-LoRA through the engine API on real weights: adapters of ranks 4,
 * 8 and 16 (different target sets, one with rslora, one with a
 * rank_pattern) and the bare base run in ONE batch, and each sequence's
 * teacher-forced logits and greedy tokens are checked against llama.cpp
 * running that adapter merged into the F32 model (fixtures from
 * tools/make_lora_reference.py).  The adapters themselves are written
 * again here by tools/make_lora.py from the seeds the fixtures list.
 * Changing the batch's composition must change no sequence's tokens.
 *
 * The engine keeps adapter weights in f16 on the CPU backend (half the
 * bytes to read per decode step); the same batch with f32 weights is
 * checked too, to a tighter bound.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "test.h"

#define F32_MODEL       ".models/smollm2-135m-f32.gguf"
#define LREF_DIR        "t/fixtures/lora_reference"
#define LMAX_MODELS     8       /* base + adapters */
#define LMAX_PROMPTS    4
#define LMAX_IDS        256
#define LMAX_SEQS       32
#define N_GEN           32


typedef struct {
    char        name[64];       /* "base" or the adapter's */
    char        args[512];      /* make_lora.py arguments */
} lref_model;

typedef struct {
    char        name[64];
    int32_t     ids[LMAX_IDS];
    int         n;
} lref_prompt;

typedef struct {
    lref_model  models[LMAX_MODELS];
    int         n_models;
    lref_prompt prompts[LMAX_PROMPTS];
    int         n_prompts;
} lref;


/* One sequence of a batch: which model and prompt, what came back. */
typedef struct {
    int         model;
    int         prompt;
    uint64_t    seq_id;
    float      *logits;         /* [n_prompt, n_vocab] */
    int         n_logits;
    int32_t     out[N_GEN];
    int         n_out;
    int         finish;
} lseq;

typedef struct {
    lseq        s[LMAX_SEQS];
    int         n;
    int         n_vocab;
} lbatch;


static int
lref_load(lref *r)
{
    char  line[1024], *sp;
    FILE *f;

    memset(r, 0, sizeof(*r));
    snprintf(r->models[0].name, sizeof(r->models[0].name), "base");
    r->n_models = 1;

    f = fopen(LREF_DIR "/ADAPTERS", "r");
    if (f == NULL) {
        return -1;
    }
    while (r->n_models < LMAX_MODELS && fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\r\n")] = '\0';
        sp = strchr(line, ' ');
        if (line[0] == '#' || sp == NULL) {
            continue;
        }
        *sp = '\0';
        snprintf(r->models[r->n_models].name, sizeof(r->models[0].name),
                 "%s", line);
        snprintf(r->models[r->n_models].args, sizeof(r->models[0].args),
                 "%s", sp + 1);
        r->n_models++;
    }
    fclose(f);

    f = fopen(LREF_DIR "/PROMPTS", "r");
    if (f == NULL) {
        return -1;
    }
    while (r->n_prompts < LMAX_PROMPTS && fgets(line, sizeof(line), f)) {
        lref_prompt *p = &r->prompts[r->n_prompts];
        char        *s, *end;

        sp = strchr(line, ' ');
        if (sp == NULL) {
            continue;
        }
        *sp = '\0';
        snprintf(p->name, sizeof(p->name), "%s", line);
        for (s = sp + 1; p->n < LMAX_IDS; s = end) {
            long v = strtol(s, &end, 10);
            if (end == s) {
                break;
            }
            p->ids[p->n++] = (int32_t) v;
        }
        r->n_prompts += p->n > 0;
    }
    fclose(f);
    return r->n_models > 1 && r->n_prompts > 0 ? 0 : -1;
}


/* 1 when the fixtures and the F32 model are there (r loaded); else the
 * current test is skipped. */
static int
lref_ready(lref *r)
{
    if (lref_load(r) != 0 || access(F32_MODEL, R_OK) != 0) {
        test_skip("needs " F32_MODEL " (make models) and "
                  LREF_DIR " fixtures");
        return 0;
    }
    return 1;
}


static int
lref_greedy(const char *model, const char *prompt, int32_t *out, int cap,
            int *subset_rows)
{
    char  path[512], line[8192];
    FILE *f;
    int   n = 0;

    snprintf(path, sizeof(path), LREF_DIR "/%s.%s.txt", model, prompt);
    f = fopen(path, "r");
    if (f == NULL) {
        return -1;
    }
    *subset_rows = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "greedy:", 7) == 0) {
            char *s = line + 7, *end;

            while (n < cap) {
                long v = strtol(s, &end, 10);
                if (end == s) {
                    break;
                }
                out[n++] = (int32_t) v;
                s = end;
            }
        } else if (strncmp(line, "subset_rows:", 12) == 0) {
            *subset_rows = atoi(line + 12);
        }
    }
    fclose(f);
    return n;
}


static float *
read_file_floats(const char *path, size_t *n)
{
    FILE  *f = fopen(path, "rb");
    float *buf;
    long   size;

    *n = 0;
    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = size > 0 ? malloc((size_t) size) : NULL;
    if (buf == NULL || fread(buf, 1, (size_t) size, f) != (size_t) size) {
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *n = (size_t) size / sizeof(float);
    return buf;
}


/* Writes the fixtures' adapters into dir with tools/make_lora.py. */
static int
make_adapters(const lref *r, const char *dir)
{
    char cmd[2048];
    int  i;

    for (i = 1; i < r->n_models; i++) {
        snprintf(cmd, sizeof(cmd), "python3 tools/make_lora.py --base %s "
                 "--out %s/%s %s >/dev/null 2>&1", F32_MODEL, dir,
                 r->models[i].name, r->models[i].args);
        if (system(cmd) != 0) {
            return -1;
        }
    }
    return 0;
}


static llm_engine *
lora_engine_of(const char *model, const char *adapter_dir, int max_seqs,
               int adapter_dtype)
{
    llm_engine_params p;
    llm_err           err = { 0, "" };
    llm_engine       *e;

    memset(&p, 0, sizeof(p));
    p.model_path = model;
    p.kv_type = LLM_F32;
    p.max_seqs = max_seqs;
    p.max_step_tokens = 512;
    p.kv_memory = (size_t) 96 << 20;
    p.adapter_dir = adapter_dir;
    p.adapter_dtype = adapter_dtype;
    e = llm_engine_new(&p, &err);
    if (e == NULL) {
        printf("       engine: %s: %s\n", model, err.msg);
    }
    return e;
}


/* The engine of the reference checks: the F32 copy of the model. */
static llm_engine *
lora_engine(const char *adapter_dir, int max_seqs, int adapter_dtype)
{
    return lora_engine_of(F32_MODEL, adapter_dir, max_seqs, adapter_dtype);
}


static void
lbatch_event(void *ud, const llm_event *ev)
{
    lbatch *b = ud;
    lseq   *s = NULL;
    int     i;

    for (i = 0; i < b->n; i++) {
        if (b->s[i].seq_id == ev->seq_id) {
            s = &b->s[i];
            break;
        }
    }
    if (s == NULL) {
        return;
    }
    if (ev->type == LLM_EV_TOKEN && s->n_out < N_GEN) {
        s->out[s->n_out++] = ev->sample.token;
    } else if (ev->type == LLM_EV_DONE) {
        s->finish = ev->finish;
    } else if (ev->type == LLM_EV_LOGITS && s->logits != NULL
               && ev->pos >= 0 && ev->pos < LMAX_IDS)
    {
        memcpy(s->logits + (size_t) ev->pos * ev->n_vocab, ev->logits,
               (size_t) ev->n_vocab * sizeof(float));
        b->n_vocab = ev->n_vocab;
        s->n_logits++;
    }
}


/* Runs (model, prompt) pairs as one batch: everything is submitted before
 * the first step.  logits: keep teacher-forced rows. */
static int
run_batch(llm_engine *e, const lref *r, const int (*pairs)[2], int n,
          int logits, lbatch *b)
{
    llm_err err = { 0, "" };
    int     i, steps = 0, n_vocab = llm_engine_model(e)->cfg.n_vocab;

    memset(b, 0, sizeof(*b));
    for (i = 0; i < n; i++) {
        const lref_prompt *p = &r->prompts[pairs[i][1]];
        llm_request        req;
        lseq              *s = &b->s[i];

        s->model = pairs[i][0];
        s->prompt = pairs[i][1];
        if (logits) {
            s->logits = malloc((size_t) p->n * n_vocab * sizeof(float));
            if (s->logits == NULL) {
                return -1;
            }
        }
        memset(&req, 0, sizeof(req));
        llm_sampling_default(&req.sampling);
        req.prompt = p->ids;
        req.n_prompt = p->n;
        req.max_tokens = N_GEN;
        req.ignore_eos = 1;
        req.prompt_logits = logits;
        req.adapter = s->model > 0 ? r->models[s->model].name : NULL;
        if (llm_engine_submit(e, &req, &s->seq_id, &err) != 0) {
            printf("       submit: %s\n", err.msg);
            return -1;
        }
        b->n++;
    }
    while (!llm_engine_idle(e)) {
        if (llm_engine_step(e, lbatch_event, b, &err) != 0) {
            printf("       step: %s\n", err.msg);
            return -1;
        }
        if (llm_engine_stalled(e)) {
            usleep(1000);       /* adapters loading in the background */
            continue;
        }
        if (++steps > 10000) {
            printf("       the batch did not finish\n");
            return -1;
        }
    }
    return 0;
}


static void
lbatch_free(lbatch *b)
{
    int i;

    for (i = 0; i < b->n; i++) {
        free(b->s[i].logits);
    }
    b->n = 0;
}


/*
 * The worst relative error of a sequence's logits against the fixtures:
 * per position, max |ours - ref| over the stored ids / max |ref| (the
 * measure of test_engine.c), and the full last row where stored.
 */
static double
logits_error(const lref *r, const lseq *s, int n_vocab, int *checked)
{
    const char  *mname = r->models[s->model].name;
    const char  *pname = r->prompts[s->prompt].name;
    int          n_pos = r->prompts[s->prompt].n, rows, p;
    char         path[512];
    float       *sub, *last;
    size_t       n_sub, n_last, k;
    int32_t      tmp[N_GEN];
    double       worst = 0;

    *checked = 0;
    if (lref_greedy(mname, pname, tmp, N_GEN, &rows) < 0) {
        return INFINITY;
    }
    snprintf(path, sizeof(path), LREF_DIR "/%s.%s.sub.f32", mname, pname);
    sub = read_file_floats(path, &n_sub);
    if (sub == NULL || n_sub != (size_t) rows * 3) {
        free(sub);
        return INFINITY;
    }
    for (p = 0; p < n_pos; p++) {
        double dmax = 0, rmax = 0;

        for (k = 0; k < (size_t) rows; k++) {
            int32_t id, pos;
            float   ref;

            memcpy(&id, &sub[k * 3], 4);
            memcpy(&pos, &sub[k * 3 + 1], 4);
            ref = sub[k * 3 + 2];
            if (pos != p || id < 0 || id >= n_vocab) {
                continue;
            }
            dmax = fmax(dmax, fabs(s->logits[(size_t) p * n_vocab + id]
                                   - ref));
            rmax = fmax(rmax, fabs(ref));
            (*checked)++;
        }
        worst = fmax(worst, rmax > 0 ? dmax / rmax : dmax);
    }
    free(sub);

    snprintf(path, sizeof(path), LREF_DIR "/%s.%s.last.f32", mname, pname);
    last = read_file_floats(path, &n_last);
    if (last != NULL) {
        double dmax = 0, rmax = 0;
        int    i;

        if (n_last != (size_t) n_vocab) {
            free(last);
            return INFINITY;
        }
        for (i = 0; i < n_vocab; i++) {
            dmax = fmax(dmax, fabs(s->logits[(size_t) (n_pos - 1) * n_vocab
                                             + i] - last[i]));
            rmax = fmax(rmax, fabs(last[i]));
        }
        worst = fmax(worst, rmax > 0 ? dmax / rmax : dmax);
        *checked += n_vocab;
        free(last);
    }
    return worst;
}


static int
same_tokens(const lseq *a, const lseq *b)
{
    return a->n_out == b->n_out
           && memcmp(a->out, b->out, (size_t) a->n_out * sizeof(int32_t))
              == 0;
}


/* The sequence of batch b running (model, prompt), or NULL. */
static const lseq *
find_seq(const lbatch *b, int model, int prompt)
{
    int i;

    for (i = 0; i < b->n; i++) {
        if (b->s[i].model == model && b->s[i].prompt == prompt) {
            return &b->s[i];
        }
    }
    return NULL;
}


TEST_SUITE(engine_lora_mixed_batch)
{
    static lref   r;
    static lbatch mix, one, other;
    static int    pairs[LMAX_SEQS][2];
    char          dir[512];
    llm_engine   *e;
    int           n, i, j, m, p, ok, checked, total_checked = 0;
    double        worst = 0, err;

    test("adapters from the fixtures' seeds (tools/make_lora.py)");
    if (!lref_ready(&r)) {
        return;
    }
    snprintf(dir, sizeof(dir), "%s/lora-mixed", llm_test_tmp_dir());
    {
        char cmd[600];

        snprintf(cmd, sizeof(cmd), "mkdir -p %s", dir);
        if (system(cmd) != 0 || make_adapters(&r, dir) != 0) {
            test_skip("tools/make_lora.py failed (python3 with numpy and "
                      "gguf needed)");
            return;
        }
    }
    test_cond(1);

    e = lora_engine(dir, LMAX_SEQS, LLM_ADAPTER_DEFAULT);
    test("engine with the base and every adapter registered");
    test_cond(e != NULL);
    if (e == NULL) {
        return;
    }
    {
        llm_engine_stats st;

        llm_engine_get_stats(e, &st);
        test_cond(st.adapters_registered == r.n_models - 1);
    }

    /* every model x every prompt, interleaved so that no two sequences
     * of one adapter are submitted next to each other */
    n = 0;
    for (p = 0; p < r.n_prompts; p++) {
        for (m = 0; m < r.n_models; m++) {
            pairs[n][0] = (m + p) % r.n_models;
            pairs[n][1] = p;
            n++;
        }
    }

    test("one mixed batch (base + adapters of ranks 4, 8, 16): teacher-"
         "forced logits match llama.cpp on the merged F32 models within "
         "1e-3");
    if (run_batch(e, &r, (const int (*)[2]) pairs, n, 1, &mix) != 0) {
        test_cond(0);
        llm_engine_free(e);
        return;
    }
    ok = 1;
    for (i = 0; i < mix.n; i++) {
        lseq *s = &mix.s[i];

        ok &= s->n_logits == r.prompts[s->prompt].n;
        err = logits_error(&r, s, mix.n_vocab, &checked);
        printf("       %-5s %-6s %2d positions: rel err %.2e (%d logits)\n",
               r.models[s->model].name, r.prompts[s->prompt].name,
               r.prompts[s->prompt].n, err, checked);
        worst = fmax(worst, err);
        total_checked += checked;
    }
    test_cond(ok);
    test_cond(total_checked > 10000);
    test_cond(worst <= 1e-3);

    test("greedy tokens in the mixed batch identical to llama.cpp's");
    ok = 1;
    for (i = 0; i < mix.n; i++) {
        lseq    *s = &mix.s[i];
        int32_t  ref[N_GEN];
        int      rows, nr;

        nr = lref_greedy(r.models[s->model].name, r.prompts[s->prompt].name,
                         ref, N_GEN, &rows);
        if (nr != N_GEN || s->n_out != N_GEN
            || memcmp(ref, s->out, sizeof(ref)) != 0)
        {
            for (j = 0; j < s->n_out && j < nr && ref[j] == s->out[j]; j++) {
                /* first difference */
            }
            printf("       %-5s %-6s differs from llama.cpp at token %d\n",
                   r.models[s->model].name, r.prompts[s->prompt].name, j);
            ok = 0;
        }
    }
    test_cond(ok);

    test("the adapters change the logits (each differs from the base)");
    ok = 1;
    for (m = 1; m < r.n_models; m++) {
        const lseq *a = find_seq(&mix, m, 0), *base = find_seq(&mix, 0, 0);
        double      d = 0;
        size_t      k, len;

        if (a == NULL || base == NULL) {
            ok = 0;
            continue;
        }
        len = (size_t) r.prompts[0].n * mix.n_vocab;
        for (k = 0; k < len; k++) {
            d = fmax(d, fabs(a->logits[k] - base->logits[k]));
        }
        ok &= d > 0.5;
    }
    test_cond(ok);

    test("each sequence alone gives the tokens it gave in the mix");
    ok = 1;
    for (i = 0; i < n; i++) {
        if (run_batch(e, &r, (const int (*)[2]) &pairs[i], 1, 0, &one)
            != 0)
        {
            ok = 0;
            break;
        }
        if (!same_tokens(&one.s[0], find_seq(&mix, pairs[i][0],
                                              pairs[i][1])))
        {
            printf("       %-5s %-6s alone differs from the mix\n",
                   r.models[pairs[i][0]].name,
                   r.prompts[pairs[i][1]].name);
            ok = 0;
        }
        lbatch_free(&one);
    }
    test_cond(ok);

    test("another composition (adapters repeated, order reversed) "
         "changes no sequence's tokens");
    {
        int k = 0;

        for (i = n - 1; i >= 0; i--) {
            pairs[n + k][0] = pairs[i][0];
            pairs[n + k][1] = pairs[i][1];
            k++;
            if (pairs[i][0] != 0 && n + k < LMAX_SEQS) {
                pairs[n + k][0] = pairs[i][0];      /* twice */
                pairs[n + k][1] = pairs[i][1];
                k++;
            }
        }
        ok = run_batch(e, &r, (const int (*)[2]) &pairs[n], k, 0, &other)
             == 0;
        for (i = 0; ok && i < other.n; i++) {
            ok &= same_tokens(&other.s[i], find_seq(&mix, other.s[i].model,
                                                     other.s[i].prompt));
        }
        test_cond(ok);
        lbatch_free(&other);
    }

    test("adapters unregistered while idle: their requests are refused");
    {
        llm_request req;
        llm_err     e2 = { 0, "" };
        uint64_t    id;

        memset(&req, 0, sizeof(req));
        llm_sampling_default(&req.sampling);
        req.prompt = r.prompts[0].ids;
        req.n_prompt = r.prompts[0].n;
        req.max_tokens = 1;
        req.adapter = r.models[1].name;
        test_cond(llm_engine_adapter_unregister(e, r.models[1].name, &e2)
                  == 0);
        test_cond(llm_engine_submit(e, &req, &id, &e2) == LLM_ENOTFOUND);
        test_cond(strstr(e2.msg, r.models[1].name) != NULL);
    }

    lbatch_free(&mix);
    llm_engine_free(e);
}


/*
 * Every (model, prompt) pair of the fixtures in one batch, on an engine
 * whose adapters are kept in adapter_dtype (folder sub of the test tmp
 * dir): *worst = the worst logits error against llama.cpp, *same = the
 * sequences whose greedy tokens are llama.cpp's.  NULL (the test skipped
 * or failed) or the engine, for the caller to free.
 */
static llm_engine *
dtype_mix(const char *sub, int adapter_dtype, lref *r, lbatch *mix,
          int (*pairs)[2], int *n, double *worst, int *same)
{
    char        dir[512], cmd[600];
    llm_engine *e;
    int         i, m, p, checked, rows;

    if (!lref_ready(r)) {
        return NULL;
    }
    snprintf(dir, sizeof(dir), "%s/%s", llm_test_tmp_dir(), sub);
    snprintf(cmd, sizeof(cmd), "mkdir -p %s", dir);
    if (system(cmd) != 0 || make_adapters(r, dir) != 0) {
        test_skip("tools/make_lora.py failed");
        return NULL;
    }
    e = lora_engine(dir, LMAX_SEQS, adapter_dtype);
    test_cond(e != NULL);
    if (e == NULL) {
        return NULL;
    }
    *n = 0;
    for (p = 0; p < r->n_prompts; p++) {
        for (m = 0; m < r->n_models; m++) {
            pairs[*n][0] = m;
            pairs[*n][1] = p;
            (*n)++;
        }
    }
    if (run_batch(e, r, (const int (*)[2]) pairs, *n, 1, mix) != 0) {
        test_cond(0);
        llm_engine_free(e);
        return NULL;
    }
    *worst = 0;
    *same = 0;
    for (i = 0; i < mix->n; i++) {
        lseq    *s = &mix->s[i];
        int32_t  ref[N_GEN];

        *worst = fmax(*worst, logits_error(r, s, mix->n_vocab, &checked));
        *same += lref_greedy(r->models[s->model].name,
                             r->prompts[s->prompt].name, ref, N_GEN, &rows)
                 == N_GEN
                 && s->n_out == N_GEN
                 && memcmp(ref, s->out, sizeof(ref)) == 0;
    }
    return e;
}


/* The same batch with the adapters kept in f32: llama.cpp's arithmetic up
 * to summation order. */
TEST_SUITE(engine_lora_f32)
{
    static lref   r;
    static lbatch mix;
    static int    pairs[LMAX_SEQS][2];
    llm_engine   *e;
    int           n, same;
    double        worst;

    test("adapters kept f32 (adapter_f32): logits within 1e-4 of "
         "llama.cpp, greedy tokens identical");
    e = dtype_mix("lora-f32", LLM_ADAPTER_F32, &r, &mix, pairs, &n, &worst,
                  &same);
    if (e == NULL) {
        return;
    }
    printf("       worst rel err %.2e\n", worst);
    test_cond(worst <= 1e-4);
    test_cond(same == mix.n);
    lbatch_free(&mix);
    llm_engine_free(e);
}


/* The same batch with the adapters in int8 (--adapter-dtype int8): lossy
 * by design, so near llama.cpp rather than within 1e-3, and still the
 * same tokens for a sequence whatever the batch. */
TEST_SUITE(engine_lora_int8)
{
    static lref       r;
    static lbatch     mix, one;
    static int        pairs[LMAX_SEQS][2];
    llm_engine       *e;
    llm_engine_stats  st;
    int               n, i, m, ok = 1, same;
    double            worst;

    test("adapters in int8: a quarter of the f32 bytes on the device, "
         "logits within 2e-2 of llama.cpp on the merged F32 models");
    e = dtype_mix("lora-int8", LLM_ADAPTER_INT8, &r, &mix, pairs, &n,
                  &worst, &same);
    if (e == NULL) {
        return;
    }
    llm_engine_get_stats(e, &st);
    printf("       worst rel err %.2e; greedy tokens identical to "
           "llama.cpp's for %d of %d sequences; %zu bytes on the device for "
           "%d adapters\n", worst, same, mix.n, st.adapter_device_bytes,
           st.adapters_resident);
    test_cond(worst <= 2e-2);
    test_cond(st.adapters_resident == r.n_models - 1);
    {
        llm_engine_adapter_info info;
        size_t                  f32 = 0;

        for (m = 1; m < r.n_models; m++) {
            if (llm_engine_adapter_info_get(e, r.models[m].name, &info)
                == 0)
            {
                f32 += info.bytes;
            }
        }
        test_cond(f32 > 0 && st.adapter_device_bytes * 3 < f32);
    }

    test("adapters in int8: each sequence alone gives the tokens it gave "
         "in the mix");
    for (i = 0; i < n; i++) {
        if (run_batch(e, &r, (const int (*)[2]) &pairs[i], 1, 0, &one)
            != 0)
        {
            ok = 0;
            break;
        }
        ok &= same_tokens(&one.s[0], find_seq(&mix, pairs[i][0],
                                               pairs[i][1]));
        lbatch_free(&one);
    }
    test_cond(ok);
    lbatch_free(&mix);
    llm_engine_free(e);
}


/* The device copies' dtype that --adapter-dtype auto (the default)
 * picks for a model at path, or -1 if the engine does not start. */
static int
auto_dtype(const char *path, int asked)
{
    llm_engine_stats  st;
    llm_engine       *e = lora_engine_of(path, NULL, 2, asked);

    if (e == NULL) {
        return -1;
    }
    llm_engine_get_stats(e, &st);
    llm_engine_free(e);
    return st.adapter_dtype;
}


/* auto: int8 copies on a base quantized below 8 bits per weight, f16 on
 * any other; an explicit choice is kept. */
TEST_SUITE(engine_lora_auto_dtype)
{
    const char *q4 = llm_test_default_model();
    char        dir[512], cmd[1200], q8[600];

    test("--adapter-dtype auto: f16 on an F32 base");
    if (access(F32_MODEL, R_OK) != 0) {
        test_skip("needs " F32_MODEL " (make models)");
    } else {
        test_cond(auto_dtype(F32_MODEL, LLM_ADAPTER_DEFAULT)
                  == LLM_ADAPTER_F16);
    }

    test("--adapter-dtype auto: int8 on the Q4_1 default model; an "
         "explicit f16 or f32 is kept");
    if (q4 == NULL) {
        test_skip("default model not installed");
    } else {
        test_cond(auto_dtype(q4, LLM_ADAPTER_DEFAULT) == LLM_ADAPTER_INT8);
        test_cond(auto_dtype(q4, LLM_ADAPTER_F16) == LLM_ADAPTER_F16);
        test_cond(auto_dtype(q4, LLM_ADAPTER_F32) == LLM_ADAPTER_F32);
    }

    test("--adapter-dtype auto: f16 on a Q8_0 base (8.5 bits per weight)");
    snprintf(dir, sizeof(dir), "%s/auto-dtype-q8", llm_test_tmp_dir());
    snprintf(q8, sizeof(q8), "%s/model.gguf", dir);
    snprintf(cmd, sizeof(cmd), "python3 tools/make_tiny_model.py --layers 2 "
             "--dim 64 --heads 4 --kv-heads 2 --ffn 128 --gguf-type q8_0 "
             "--no-hf --seed 7 --out %s >/dev/null 2>&1", dir);
    if (system(cmd) != 0) {
        test_skip("tools/make_tiny_model.py failed (python3 with gguf?)");
    } else {
        test_cond(auto_dtype(q8, LLM_ADAPTER_DEFAULT) == LLM_ADAPTER_F16);
    }
    test("llm_adapter_dtype_parse: auto and the names round-trip");
    test_cond(llm_adapter_dtype_parse("auto") == LLM_ADAPTER_DEFAULT
              && llm_adapter_dtype_parse("int8") == LLM_ADAPTER_INT8
              && llm_adapter_dtype_parse("int4") == -1
              && strcmp(llm_adapter_dtype_name(LLM_ADAPTER_F16), "f16")
                 == 0);
}

TEST_SUITE(engine_lora_admin)
{
    static lref             r;
    char                    dir[512], bad[600], cmd[1400];
    llm_engine             *e;
    llm_engine_adapter_info info, info2;
    llm_err                 err = { 0, "" };
    FILE                   *f;

    test("llm_engine_adapter_load: register, version, reload, refusal");
    if (!lref_ready(&r)) {
        return;
    }
    snprintf(dir, sizeof(dir), "%s/lora-admin", llm_test_tmp_dir());
    snprintf(cmd, sizeof(cmd), "mkdir -p %s", dir);
    if (system(cmd) != 0 || make_adapters(&r, dir) != 0) {
        test_skip("tools/make_lora.py failed");
        return;
    }
    e = lora_engine(NULL, 4, LLM_ADAPTER_DEFAULT);
    test_cond(e != NULL);
    if (e == NULL) {
        return;
    }
    snprintf(bad, sizeof(bad), "%s/%s", dir, r.models[1].name);
    test_cond(llm_engine_adapter_load(e, "x", bad, &info, &err) == 0);
    test_cond(info.loaded && strlen(info.version) == 16 && info.bytes > 0
              && info.max_rank == 4);

    test("a folder with its weights cut short is refused; the loaded "
         "version stays");
    snprintf(bad, sizeof(bad), "%s/broken", dir);
    snprintf(cmd, sizeof(cmd), "cp -r %s/%s %s && truncate -s 100000 "
             "%s/adapter_model.safetensors", dir, r.models[2].name, bad,
             bad);
    test_cond(system(cmd) == 0);
    err.msg[0] = '\0';
    test_cond(llm_engine_adapter_load(e, "x", bad, NULL, &err) != 0);
    test_cond(strstr(err.msg, "adapter_model.safetensors") != NULL);
    test_cond(strstr(err.msg, "current version stays") != NULL);
    test_cond(llm_engine_adapter_info_get(e, "x", &info2) == 0
              && strcmp(info2.version, info.version) == 0);
    test_cond(llm_engine_adapter_load(e, "y", bad, NULL, &err) != 0);
    test_cond(llm_engine_adapter_info_get(e, "y", &info2) == LLM_ENOTFOUND);

    test("a garbage config is refused with the file named");
    snprintf(cmd, sizeof(cmd), "%s/adapter_config.json", bad);
    f = fopen(cmd, "w");
    test_cond(f != NULL);
    if (f != NULL) {
        fputs("{\"r\": ", f);
        fclose(f);
    }
    test_cond(llm_engine_adapter_load(e, "y", bad, NULL, &err) != 0
              && strstr(err.msg, "adapter_config.json") != NULL);

    test("reload (no folder) keeps the version of unchanged files; a new "
         "folder gives a new version");
    test_cond(llm_engine_adapter_load(e, "x", NULL, &info2, &err) == 0
              && strcmp(info2.version, info.version) == 0);
    snprintf(bad, sizeof(bad), "%s/%s", dir, r.models[3].name);
    test_cond(llm_engine_adapter_load(e, "x", bad, &info2, &err) == 0
              && strcmp(info2.version, info.version) != 0
              && info2.max_rank == 16);
    test_cond(llm_engine_adapter_load(e, "never", NULL, NULL, &err)
              == LLM_ENOTFOUND);
    llm_engine_free(e);

    test("a host cache too small for an adapter: registered, not kept; "
         "its requests are refused, not queued forever");
    {
        llm_engine_params p;
        llm_request       req;
        uint64_t          id;

        memset(&p, 0, sizeof(p));
        p.model_path = F32_MODEL;
        p.max_seqs = 2;
        p.kv_memory = (size_t) 16 << 20;
        p.adapter_host_memory = 100000;
        e = llm_engine_new(&p, &err);
        test_cond(e != NULL);
        if (e == NULL) {
            return;
        }
        snprintf(bad, sizeof(bad), "%s/%s", dir, r.models[1].name);
        test_cond(llm_engine_adapter_load(e, "x", bad, &info, &err) == 0);
        test_cond(!info.loaded && info.version[0] == '\0'
                  && info.bytes > 100000);
        memset(&req, 0, sizeof(req));
        llm_sampling_default(&req.sampling);
        req.prompt = r.prompts[0].ids;
        req.n_prompt = r.prompts[0].n;
        req.max_tokens = 1;
        req.adapter = "x";
        test_cond(llm_engine_submit(e, &req, &id, &err) == LLM_EUNSUP
                  && strstr(err.msg, "more than the whole") != NULL);
        llm_engine_free(e);
    }
}


/* Events of the background-load test: tokens per sequence, in the order
 * they came. */
typedef struct {
    uint64_t    id[3];
    int         n_out[3];
    int32_t     out[3][N_GEN];
    int         finish[3];
    char        error[3][256];
    int         base_before_adapter;    /* base tokens before the
                                           adapter's first one */
} bgload;


static void
bgload_event(void *ud, const llm_event *ev)
{
    bgload *b = ud;
    int     i;

    for (i = 0; i < 3; i++) {
        if (b->id[i] != ev->seq_id) {
            continue;
        }
        if (ev->type == LLM_EV_TOKEN && b->n_out[i] < N_GEN) {
            b->out[i][b->n_out[i]++] = ev->sample.token;
            if (i == 0 && b->n_out[1] == 0) {
                b->base_before_adapter++;
            }
        } else if (ev->type == LLM_EV_DONE) {
            b->finish[i] = ev->finish;
            snprintf(b->error[i], sizeof(b->error[i]), "%s",
                     ev->error != NULL ? ev->error : "");
        }
    }
}


static int
bgload_submit(llm_engine *e, const lref_prompt *p, const char *adapter,
              int max_tokens, uint64_t *id)
{
    llm_request req;
    llm_err     err = { 0, "" };

    memset(&req, 0, sizeof(req));
    llm_sampling_default(&req.sampling);
    req.prompt = p->ids;
    req.n_prompt = p->n;
    req.max_tokens = max_tokens;
    req.ignore_eos = 1;
    req.adapter = adapter;
    if (llm_engine_submit(e, &req, id, &err) != 0) {
        printf("       submit: %s\n", err.msg);
        return -1;
    }
    return 0;
}


static void
bgload_run(llm_engine *e, bgload *b)
{
    int guard = 0;

    while (!llm_engine_idle(e) && guard++ < 1000000) {
        (void) llm_engine_step(e, bgload_event, b, NULL);
        if (llm_engine_stalled(e)) {
            usleep(200);
        }
    }
}


TEST_SUITE(engine_lora_background_load)
{
    static lref   r;
    static bgload b, ref;
    char          dir[512], cmd[1400];
    llm_engine   *e;
    int           i;

    test("an adapter loads in the background while the batch runs");
    if (!lref_ready(&r)) {
        return;
    }
    /* rank 64 on every projection: tens of MB to read and convert */
    snprintf(dir, sizeof(dir), "%s/lora-bg", llm_test_tmp_dir());
    snprintf(cmd, sizeof(cmd), "rm -rf %s && python3 tools/make_lora.py "
             "--base %s --out %s/big --rank 64 "
             "--targets q,k,v,o,gate,up,down --seed 9 >/dev/null 2>&1 && "
             "cp -r %s/big %s/broken", dir, F32_MODEL, dir, dir, dir);
    if (system(cmd) != 0) {
        test_skip("tools/make_lora.py failed");
        return;
    }
    e = lora_engine(NULL, 4, LLM_ADAPTER_DEFAULT);
    test_cond(e != NULL);
    if (e == NULL) {
        return;
    }
    snprintf(cmd, sizeof(cmd), "%s/big", dir);
    test_cond(llm_engine_adapter_register(e, "big", cmd, NULL) == 0);
    snprintf(cmd, sizeof(cmd), "%s/broken", dir);
    test_cond(llm_engine_adapter_register(e, "broken", cmd, NULL) == 0);
    /* its weights cut after registration: the load finds out */
    snprintf(cmd, sizeof(cmd), "truncate -s 200000 "
             "%s/broken/adapter_model.safetensors", dir);
    test_cond(system(cmd) == 0);

    /* a base sequence decoding, then the adapter's request arrives */
    memset(&b, 0, sizeof(b));
    test_cond(bgload_submit(e, &r.prompts[0], NULL, N_GEN, &b.id[0]) == 0);
    for (i = 0; i < 3; i++) {
        llm_engine_step(e, bgload_event, &b, NULL);
    }
    test_cond(bgload_submit(e, &r.prompts[1], "big", 8, &b.id[1]) == 0);
    bgload_run(e, &b);
    printf("       %d base tokens came while the adapter loaded\n",
           b.base_before_adapter - 3);
    test_cond(b.finish[0] == LLM_FINISH_LENGTH
              && b.finish[1] == LLM_FINISH_LENGTH);
    /* loading in submit() would give the base no step in between */
    test_cond(b.base_before_adapter - 3 >= 2);

    test("the same tokens as with the adapter already in the host cache");
    memset(&ref, 0, sizeof(ref));
    test_cond(bgload_submit(e, &r.prompts[1], "big", 8, &ref.id[1]) == 0);
    bgload_run(e, &ref);
    test_cond(ref.n_out[1] == 8 && b.n_out[1] == 8
              && memcmp(ref.out[1], b.out[1], 8 * 4) == 0);

    test("weights that fail to load end only their request, with the file "
         "named");
    memset(&b, 0, sizeof(b));
    test_cond(bgload_submit(e, &r.prompts[0], NULL, 6, &b.id[0]) == 0);
    test_cond(bgload_submit(e, &r.prompts[1], "broken", 6, &b.id[1]) == 0);
    test_cond(bgload_submit(e, &r.prompts[2 % r.n_prompts], "broken", 6,
                            &b.id[2]) == 0);
    bgload_run(e, &b);
    test_cond(b.finish[0] == LLM_FINISH_LENGTH && b.n_out[0] == 6);
    test_cond(b.finish[1] == LLM_FINISH_ERROR
              && b.finish[2] == LLM_FINISH_ERROR);
    test_cond(strstr(b.error[1], "adapter_model.safetensors") != NULL);
    printf("       %s\n", b.error[1]);
    llm_engine_free(e);
}
