/*
 * The engine itself under arbitrary request streams: each input is a
 * script of submits (any prompt ids, lengths, sampling values including
 * NaN and infinities, stop ids, classes, tenants, adapters registered or
 * not, cache namespaces), cancels and steps, run on one engine that
 * lives across inputs, as llm-engine serves many clients in turn.  A
 * small KV budget makes sequences wait, get preempted and share cached
 * prefix blocks; a small device pool makes adapters evict each other.
 *
 * The model is LLM_FUZZ_MODEL and the adapters LLM_FUZZ_ADAPTERS
 * (t/fuzz/run.sh: the seeds' tiny model and its adapters).  Properties
 * beyond "no crash": a refused submit says why; every accepted sequence
 * ends with exactly one DONE, after at most max_tokens tokens, all inside
 * the vocabulary; once everything has ended no KV block is left in use
 * (cached prefix blocks are all reusable) and no sequence is left; and
 * each sequence that ran to its end gives the same tokens and finish
 * when run again alone (every request is seeded): what else was in the
 * batch, preemption and recomputation, prefix-cache hits and adapter
 * evictions change no sequence's output.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/tokenizer.h"
#include "t/fuzz/fuzz.h"

#define MAX_LIVE    16
#define MAX_SEQS    (2 * MAX_LIVE)      /* the script's, then reruns */
#define MAX_STEPS   10000
#define MAX_GEN     48

static llm_engine *eng;
static int         n_vocab;

typedef struct live {
    uint64_t    id;
    llm_request rq;             /* as submitted, arrays below */
    int32_t     prompt[64];
    int32_t     stop[3];
    int         max_tokens;
    int         tokens;
    int32_t     out[MAX_GEN];   /* the tokens generated */
    int         done;
    int         finish;
} live;

typedef struct script {
    const uint8_t  *p;
    size_t          left;
} script;

static live  seqs[MAX_SEQS];
static int   n_seqs;
static int   verbose;       /* LLM_FUZZ_VERBOSE=1: say what the script does */


int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    llm_engine_params  p;
    llm_err            err;

    memset(&p, 0, sizeof(p));
    p.model_path = getenv("LLM_FUZZ_MODEL");
    p.adapter_dir = getenv("LLM_FUZZ_ADAPTERS");
    if (p.model_path == NULL || p.adapter_dir == NULL) {
        fuzz_fail("LLM_FUZZ_MODEL and LLM_FUZZ_ADAPTERS must be set",
                  "t/fuzz/run.sh sets them");
    }
    p.n_threads = 1;
    p.kv_memory = 32 * 1024;            /* 32 blocks of 16 tokens */
    p.max_seqs = 6;
    p.max_step_tokens = 48;
    p.n_ctx = 256;
    p.adapter_device_memory = 64 * 1024;
    eng = llm_engine_new(&p, &err);
    if (eng == NULL) {
        fuzz_fail("cannot start the engine", err.msg);
    }
    n_vocab = llm_tokenizer_n_vocab(llm_engine_tokenizer(eng));
    verbose = getenv("LLM_FUZZ_VERBOSE") != NULL;
    return 0;
}


static unsigned
take(script *s)
{
    if (s->left == 0) {
        return 0;
    }
    s->left--;
    return *s->p++;
}


/* Sampling values worth trying, by index. */
static float
value(unsigned i)
{
    static const float v[] = { 0.0f, 0.5f, 1.0f, 2.0f, -1.0f, 0.05f, 0.95f,
                               1e30f, 1e-30f, -0.0f, 10.0f, 1.5f };

    switch (i % 16) {
    case 12: return NAN;
    case 13: return INFINITY;
    case 14: return -INFINITY;
    case 15: return 100.0f;
    default: return v[i % 16];
    }
}


static void enqueue(const llm_request *req);


static void
on_event(void *ud, const llm_event *ev)
{
    int i;

    for (i = 0; i < n_seqs && seqs[i].id != ev->seq_id; i++) {
    }
    if (i == n_seqs) {
        fuzz_fail("an event for a sequence nobody submitted", NULL);
    }
    if (seqs[i].done) {
        fuzz_fail("an event after the sequence's DONE", NULL);
    }
    if (ev->type == LLM_EV_TOKEN) {
        if (ev->sample.token < 0 || ev->sample.token >= n_vocab) {
            fuzz_fail("a token outside the vocabulary", NULL);
        }
        if (seqs[i].tokens >= seqs[i].max_tokens) {
            fuzz_fail("more tokens than max_tokens", NULL);
        }
        seqs[i].out[seqs[i].tokens++] = ev->sample.token;
    } else if (ev->type == LLM_EV_DONE) {
        seqs[i].done = 1;
        seqs[i].finish = ev->finish;
        if (verbose) {
            fprintf(stderr, "done %llu: finish %d after %d tokens%s%s\n",
                    (unsigned long long) ev->seq_id, ev->finish,
                    seqs[i].tokens, ev->error ? ": " : "",
                    ev->error ? ev->error : "");
        }
    }
}


static void
step(void)
{
    llm_err err;

    err.msg[0] = '\0';
    if (llm_engine_step(eng, on_event, NULL, &err) != 0
        && err.msg[0] == '\0')
    {
        fuzz_fail("a failed step without a message", NULL);
    }
}


static void
submit(script *s)
{
    static const char *adapters[] = { NULL, "all", "qv-f16-pattern",
                                      "mlp-bf16-rslora", "unknown" };
    static const char *names[] = { NULL, "", "acme", "other" };
    int32_t      prompt[64], stop[3];
    llm_request  rq;
    unsigned     b;
    int          i;

    memset(&rq, 0, sizeof(rq));
    rq.n_prompt = (int) (take(s) % 64);         /* 0 is refused */
    for (i = 0; i < rq.n_prompt; i++) {
        b = take(s) | take(s) << 8;
        prompt[i] = (int32_t) (b % (unsigned) (n_vocab + 4)) - 2;
    }
    rq.prompt = prompt;
    rq.max_tokens = (int) (take(s) % MAX_GEN) - 1;
    b = take(s);
    rq.sampling.temperature = value(b);
    rq.sampling.top_p = (b & 0x80) ? value(take(s)) : 1.0f;
    b = take(s);
    rq.sampling.top_k = (int) (int8_t) b;
    rq.sampling.min_p = (b & 1) ? value(take(s)) : 0.0f;
    b = take(s);
    rq.sampling.repetition_penalty = (b & 1) ? value(take(s)) : 1.0f;
    rq.sampling.frequency_penalty = (b & 2) ? value(take(s)) : 0.0f;
    rq.sampling.presence_penalty = (b & 4) ? value(take(s)) : 0.0f;
    rq.sampling.has_seed = 1;           /* a clock seed would not replay */
    rq.sampling.seed = take(s);
    rq.sampling.logprobs = (b >> 3) & 1;
    rq.sampling.top_logprobs = (int) (take(s) % 24);
    rq.n_stop_ids = (int) (take(s) % 4);
    for (i = 0; i < rq.n_stop_ids && i < 3; i++) {
        stop[i] = (int32_t) take(s) + 2;
    }
    if (rq.n_stop_ids > 3) {
        rq.n_stop_ids = 3;
    }
    rq.stop_ids = stop;
    b = take(s);
    rq.ignore_eos = b & 1;
    rq.no_cache = (b >> 1) & 1;
    rq.priority = (int) ((b >> 2) % 4);         /* 3 is refused */
    rq.weight = (int) ((b >> 4) % 3);           /* 0 is taken as 1 */
    b = take(s);
    rq.adapter = adapters[b % 5];
    rq.tenant = names[(b >> 3) % 4];
    rq.cache_namespace = names[(b >> 5) % 4];
    rq.cache_shared_tokens = (int) (take(s) % 40);
    rq.cache_shared_namespace = rq.cache_shared_tokens ? "shared" : NULL;

    enqueue(&rq);
}


/* Submits rq and follows its events in seqs[]; a refusal must say why. */
static void
enqueue(const llm_request *req)
{
    llm_request  rq = *req;
    live        *l = &seqs[n_seqs];
    llm_err      err;
    uint64_t     id;

    if (n_seqs == MAX_SEQS) {
        fuzz_fail("more sequences than the script can hold", NULL);
    }
    memcpy(l->prompt, rq.prompt, sizeof(int32_t) * (size_t) rq.n_prompt);
    memcpy(l->stop, rq.stop_ids, sizeof(int32_t) * (size_t) rq.n_stop_ids);
    rq.prompt = l->prompt;
    rq.stop_ids = l->stop;

    err.msg[0] = '\0';
    if (llm_engine_submit(eng, &rq, &id, &err) != 0) {
        if (err.msg[0] == '\0') {
            fuzz_fail("a refused submit without a message", NULL);
        }
        if (verbose) {
            fprintf(stderr, "submit refused: %s\n", err.msg);
        }
        return;
    }
    if (verbose) {
        fprintf(stderr, "submitted %llu: %d prompt tokens, max_tokens %d, "
                "adapter %s\n", (unsigned long long) id, rq.n_prompt,
                rq.max_tokens, rq.adapter ? rq.adapter : "-");
    }
    l->id = id;
    l->rq = rq;
    l->max_tokens = rq.max_tokens;
    l->tokens = 0;
    l->done = 0;
    l->finish = 0;
    n_seqs++;
}


/* Steps until nothing is queued or running; then every sequence must have
 * had its DONE. */
static void
run_to_idle(void)
{
    int n, i;

    for (n = 0; n < MAX_STEPS && !llm_engine_idle(eng); n++) {
        if (llm_engine_stalled(eng)) {
            usleep(1000);       /* an adapter loading in the background */
        }
        step();
    }
    if (!llm_engine_idle(eng)) {
        fuzz_fail("the engine is still busy after many steps", NULL);
    }
    for (i = 0; i < n_seqs; i++) {
        if (!seqs[i].done) {
            fuzz_fail("a sequence ended without DONE", NULL);
        }
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    script            s = { data, size };
    llm_engine_stats  st;
    int               i, n, n_script;

    n_seqs = 0;
    while (s.left > 0) {
        unsigned op = take(&s) % 8;

        if (op < 4 && n_seqs < MAX_LIVE) {
            submit(&s);
        } else if (op < 6) {
            if (n_seqs > 0) {
                (void) llm_engine_cancel(eng,
                                         seqs[take(&s) % n_seqs].id);
            }
        } else {
            for (n = (int) (take(&s) % 8); n >= 0; n--) {
                step();
            }
        }
    }
    run_to_idle();
    n_script = n_seqs;

    /* each sequence that ran to its end, again alone */
    for (i = 0; i < n_script; i++) {
        const live *a = &seqs[i], *b = &seqs[n_seqs];

        if (a->finish != LLM_FINISH_STOP && a->finish != LLM_FINISH_LENGTH) {
            continue;
        }
        enqueue(&a->rq);
        if (b != &seqs[n_seqs - 1]) {
            fuzz_fail("a request taken once is refused the second time",
                      NULL);
        }
        run_to_idle();
        if (b->finish != a->finish || b->tokens != a->tokens
            || memcmp(b->out, a->out, sizeof(int32_t) * (size_t) a->tokens)
               != 0)
        {
            char why[96];

            snprintf(why, sizeof(why), "sequence %d: %d tokens, finish %d "
                     "in the batch; %d, finish %d alone", i, a->tokens,
                     a->finish, b->tokens, b->finish);
            fuzz_fail("a sequence's output depends on the batch", why);
        }
    }
    llm_engine_get_stats(eng, &st);
    if (verbose) {
        fprintf(stderr, "engine: %llu preemptions, %llu prompt tokens "
                "from the prefix cache, %d adapters resident\n",
                (unsigned long long) st.preemptions,
                (unsigned long long) st.prefix_hit_tokens,
                st.adapters_resident);
    }
    if (st.n_waiting != 0 || st.n_running != 0 || st.kv_blocks_used != 0
        || st.prefix_blocks_cached != st.prefix_blocks_reusable)
    {
        char why[128];

        snprintf(why, sizeof(why), "waiting %d, running %d, KV blocks in "
                 "use %d, cached %d, reusable %d", st.n_waiting,
                 st.n_running, st.kv_blocks_used, st.prefix_blocks_cached,
                 st.prefix_blocks_reusable);
        fuzz_fail("state left behind once every sequence ended", why);
    }
    return 0;
}
