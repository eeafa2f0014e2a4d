/*
 * Multi-LoRA serving throughput through the engine API (bench/RESULTS.md,
 * "Multi-LoRA"; driven by bench/lora_bench.py, which writes the adapters
 * and the merged models).
 *
 *   build-x/lora-bench --model BASE.gguf --adapters DIR [--seqs 32]
 *                      [--prompt 32] [--gen 64] [--repeat 3] [--threads N]
 *                      [--device cpu|cuda:N]
 *                      [--adapter-dtype auto|f16|f32|int8]
 *                      [--naive MERGED.gguf]... [--json]
 *
 * One engine, one process, the same 32 (--seqs) concurrent sequences in
 * every scenario: the base alone, then spread over 1, 8 and 32 distinct
 * adapters (the first k registered names, round robin).  "Decode tok/s"
 * looks only at steps in which every sequence decodes (no prefill
 * chunk): sequences / the median time of those steps, which a process
 * that takes the cores for a moment does not move.  Adapters are made
 * resident by a
 * warm-up pass first, so a scenario measures steady serving; the cold
 * load of each adapter (disk -> host cache: read, parse, hash, permute)
 * is timed separately on a fresh engine.
 *
 * The naive way (one adapter at a time, its weights merged in): every
 * --naive model, a merged copy of one adapter, is opened as its own
 * engine and serves one sequence alone; its time counts the open, the
 * prefill and the decode.  Serving 32 sequences of 32 adapters that way
 * takes 32 such runs, so the aggregate throughput is gen / (time per
 * run); "naive decode" leaves the open and prefill out.
 *
 * Scenarios take turns, --repeat rounds, and the best run of each is
 * kept: other processes share the cores.  Each round's figures are
 * printed too ("rounds"), so that ratios can be taken within a round,
 * between runs a few seconds apart.
 */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"

#define MAX_SEQS    256
#define MAX_NAMES   1024
#define MAX_NAIVE   16


typedef struct {
    const char *model;
    const char *adapters;
    int         seqs;
    int         prompt;
    int         gen;
    int         repeat;
    int         threads;
    const char *device;             /* NULL: the CPU */
    const char *naive[MAX_NAIVE];
    int         n_naive;
    int         json;
    int         adapter_dtype;      /* LLM_ADAPTER_* */
} bench_opts;

typedef struct {
    double      decode_tps;     /* best */
    double      step_ms;        /* median decode step, at the best run */
    double      mean_ms;        /* mean decode step, at the best run */
    double      total_s;        /* wall time of the best run */
    double      round_tps[64];  /* each round's figure */
    int         n_rounds;
} scenario;

#define MAX_STEPS   8192

static double step_ms[MAX_STEPS];
static int    n_step_ms;

typedef struct {
    int         done;
    int         n_tokens;
} collect;


static int32_t prompts[MAX_SEQS][512];
static char   *names[MAX_NAMES];
static int     n_names;


static void
on_event(void *ud, const llm_event *ev)
{
    collect *c = ud;

    if (ev->type == LLM_EV_TOKEN) {
        c->n_tokens++;
    } else if (ev->type == LLM_EV_DONE) {
        c->done++;
    }
}


static llm_engine *
open_engine(const bench_opts *o, const char *model, const char *adapters,
            int max_seqs)
{
    llm_engine_params p;
    llm_err           err = { 0, "" };
    llm_engine       *e;

    memset(&p, 0, sizeof(p));
    p.model_path = model;
    p.n_threads = o->threads;
    p.device = o->device;
    p.max_seqs = max_seqs;
    p.max_step_tokens = 2048;
    p.kv_memory = (size_t) 512 << 20;
    p.adapter_dir = adapters;
    p.adapter_host_memory = (size_t) 2 << 30;
    p.adapter_device_memory = (size_t) 2 << 30;
    p.adapter_dtype = o->adapter_dtype;
    e = llm_engine_new(&p, &err);
    if (e == NULL) {
        fprintf(stderr, "lora-bench: %s: %s\n", model, err.msg);
    }
    return e;
}


static int
submit(llm_engine *e, const bench_opts *o, int i, const char *adapter)
{
    llm_request req;
    llm_err     err = { 0, "" };
    uint64_t    id;

    memset(&req, 0, sizeof(req));
    llm_sampling_default(&req.sampling);
    req.prompt = prompts[i % MAX_SEQS];
    req.n_prompt = o->prompt;
    req.max_tokens = o->gen;
    req.ignore_eos = 1;
    req.adapter = adapter;
    if (llm_engine_submit(e, &req, &id, &err) != 0) {
        fprintf(stderr, "lora-bench: submit: %s\n", err.msg);
        return -1;
    }
    return 0;
}


/* Runs until idle; decode-only steps add to *dec_s / *dec_tok, and the
 * times of those with all `full` sequences go to step_ms[]. */
static int
run(llm_engine *e, int full, double *dec_s, long *dec_tok, double *wall_s)
{
    llm_engine_stats st;
    llm_err          err = { 0, "" };
    collect          c = { 0, 0 };
    uint64_t         t0 = llm_now_ns(), t;

    *dec_s = 0;
    *dec_tok = 0;
    while (!llm_engine_idle(e)) {
        t = llm_now_ns();
        if (llm_engine_step(e, on_event, &c, &err) != 0) {
            fprintf(stderr, "lora-bench: step: %s\n", err.msg);
            return -1;
        }
        if (llm_engine_stalled(e)) {
            usleep(500);        /* adapters loading in the background */
            continue;
        }
        llm_engine_get_stats(e, &st);
        if (st.last_batch_tokens == st.last_batch_seqs
            && st.last_batch_seqs > 0)
        {
            double s = (double) (llm_now_ns() - t) / 1e9;

            *dec_s += s;
            *dec_tok += st.last_batch_seqs;
            if (n_step_ms < MAX_STEPS && st.last_batch_seqs == full) {
                step_ms[n_step_ms++] = s * 1e3;
            }
        }
    }
    *wall_s = (double) (llm_now_ns() - t0) / 1e9;
    return 0;
}


static int
dbl_cmp(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;

    return x < y ? -1 : x > y;
}


/* One run of a scenario, kept in *sc if it is the best so far.  k == 0:
 * the base; else sequence i runs adapter names[i % k]. */
static int
scenario_run(llm_engine *e, const bench_opts *o, int k, scenario *sc)
{
    double dec_s, wall, med;
    long   dec_tok;
    int    i;

    for (i = 0; i < o->seqs; i++) {
        if (submit(e, o, i, k ? names[i % k] : NULL) != 0) {
            return -1;
        }
    }
    n_step_ms = 0;
    if (run(e, o->seqs, &dec_s, &dec_tok, &wall) != 0 || dec_tok == 0
        || n_step_ms == 0)
    {
        return -1;
    }
    qsort(step_ms, (size_t) n_step_ms, sizeof(double), dbl_cmp);
    med = step_ms[n_step_ms / 2];
    if (sc->n_rounds < 64) {
        sc->round_tps[sc->n_rounds++] = o->seqs * 1e3 / med;
    }
    if (o->seqs * 1e3 / med > sc->decode_tps) {
        sc->decode_tps = o->seqs * 1e3 / med;
        sc->step_ms = med;
        sc->mean_ms = dec_s * 1e3 / ((double) dec_tok / o->seqs);
        sc->total_s = wall;
    }
    return 0;
}


static int
name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *) a, *(char *const *) b);
}


static int
list_adapters(const char *dir)
{
    DIR           *d = opendir(dir);
    struct dirent *de;

    if (d == NULL) {
        return -1;
    }
    while ((de = readdir(d)) != NULL && n_names < MAX_NAMES) {
        if (de->d_name[0] != '.') {
            names[n_names++] = strdup(de->d_name);
        }
    }
    closedir(d);
    qsort(names, (size_t) n_names, sizeof(char *), name_cmp);
    return n_names;
}


/* Cold load: reading each adapter from disk into the host cache on a
 * fresh engine (llm_engine_adapter_load, the work the background loader
 * does off the engine thread), then a run that makes them resident. */
static int
cold_loads(const bench_opts *o, double *ms_mean, double *ms_max,
           double *bytes_r8, double *bytes_r16, double *bytes_mean)
{
    llm_engine             *e;
    llm_engine_adapter_info info;
    llm_engine_stats        st;
    double                  dec, wall, sum = 0, ms;
    long                    tok;
    uint64_t                t;
    int                     i, n = n_names < o->seqs ? n_names : o->seqs;

    e = open_engine(o, o->model, o->adapters, o->seqs);
    if (e == NULL) {
        return -1;
    }
    *ms_max = 0;
    *bytes_r8 = *bytes_r16 = 0;
    for (i = 0; i < n; i++) {
        t = llm_now_ns();
        if (llm_engine_adapter_load(e, names[i], NULL, NULL, NULL) != 0
            || submit(e, o, i, names[i]) != 0)
        {
            llm_engine_free(e);
            return -1;
        }
        ms = (double) (llm_now_ns() - t) / 1e6;
        sum += ms;
        *ms_max = fmax(*ms_max, ms);
        if (llm_engine_adapter_info_get(e, names[i], &info) == 0) {
            if (info.max_rank == 8) {
                *bytes_r8 = (double) info.bytes;
            } else if (info.max_rank == 16) {
                *bytes_r16 = (double) info.bytes;
            }
        }
    }
    *ms_mean = sum / n;
    /* uploads happen as the sequences are scheduled */
    if (run(e, 1 << 30, &dec, &tok, &wall) != 0) {
        llm_engine_free(e);
        return -1;
    }
    llm_engine_get_stats(e, &st);
    *bytes_mean = st.adapters_resident > 0
                  ? (double) st.adapter_device_bytes / st.adapters_resident
                  : 0;
    llm_engine_free(e);
    return 0;
}


/* One merged model serving one sequence alone.  The open is timed
 * --repeat times, the fastest kept, as for every other figure here. */
static int
naive_run(const bench_opts *o, const char *model, double *open_s,
          double *total_s, double *decode_tps)
{
    llm_engine *e = NULL;
    double      dec, wall, best = 0;
    long        tok;
    uint64_t    t0;
    int         r;

    *open_s = 1e30;
    for (r = 0; r < o->repeat; r++) {
        if (e != NULL) {
            llm_engine_free(e);
        }
        t0 = llm_now_ns();
        e = open_engine(o, model, NULL, 1);
        if (e == NULL) {
            return -1;
        }
        *open_s = fmin(*open_s, (double) (llm_now_ns() - t0) / 1e9);
    }
    *total_s = 1e30;
    for (r = 0; r < o->repeat; r++) {
        n_step_ms = 0;
        if (submit(e, o, 0, NULL) != 0
            || run(e, 1, &dec, &tok, &wall) != 0 || n_step_ms == 0)
        {
            llm_engine_free(e);
            return -1;
        }
        qsort(step_ms, (size_t) n_step_ms, sizeof(double), dbl_cmp);
        best = fmax(best, 1e3 / step_ms[n_step_ms / 2]);
        *total_s = fmin(*total_s, wall);
    }
    *decode_tps = best;
    llm_engine_free(e);
    return 0;
}


static void
usage(void)
{
    fprintf(stderr, "usage: lora-bench --model BASE --adapters DIR "
            "[--seqs N] [--prompt N] [--gen N] [--repeat N] [--threads N] "
            "[--device cpu|cuda:N] "
            "[--adapter-dtype auto|f16|f32|int8] [--naive MERGED]... [--json]\n");
}


int
main(int argc, char **argv)
{
    bench_opts  o;
    llm_engine *e;
    scenario    sc[4], base1;
    int         ks[4] = { 0, 1, 8, 32 }, i, j, n_vocab;
    double      cold_mean = 0, cold_max = 0, b8 = 0, b16 = 0, bmean = 0;
    double      nv_open = 0, nv_total = 0, nv_dec = 0;
    uint64_t    rng = 0x9e3779b97f4a7c15ull;
    static char rounds[8192];

    memset(&o, 0, sizeof(o));
    o.seqs = 32;
    o.prompt = 32;
    o.gen = 64;
    o.repeat = 3;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (strcmp(a, "--json") == 0) {
            o.json = 1;
            continue;
        }
        if (v == NULL) {
            usage();
            return 2;
        }
        i++;
        if (strcmp(a, "--model") == 0) {
            o.model = v;
        } else if (strcmp(a, "--adapters") == 0) {
            o.adapters = v;
        } else if (strcmp(a, "--seqs") == 0) {
            o.seqs = atoi(v);
        } else if (strcmp(a, "--prompt") == 0) {
            o.prompt = atoi(v);
        } else if (strcmp(a, "--gen") == 0) {
            o.gen = atoi(v);
        } else if (strcmp(a, "--repeat") == 0) {
            o.repeat = atoi(v);
        } else if (strcmp(a, "--threads") == 0) {
            o.threads = atoi(v);
        } else if (strcmp(a, "--device") == 0) {
            o.device = v;
        } else if (strcmp(a, "--adapter-dtype") == 0) {
            o.adapter_dtype = llm_adapter_dtype_parse(v);
            if (o.adapter_dtype < 0) {
                usage();
                return 2;
            }
        } else if (strcmp(a, "--naive") == 0 && o.n_naive < MAX_NAIVE) {
            o.naive[o.n_naive++] = v;
        } else {
            usage();
            return 2;
        }
    }
    if (o.model == NULL || o.adapters == NULL || o.seqs < 1
        || o.seqs > MAX_SEQS || o.prompt < 1 || o.prompt > 512 || o.gen < 2
        || o.repeat < 1)
    {
        usage();
        return 2;
    }
    if (list_adapters(o.adapters) < 32) {
        fprintf(stderr, "lora-bench: %s: 32 adapter folders needed\n",
                o.adapters);
        return 1;
    }

    e = open_engine(&o, o.model, o.adapters, o.seqs);
    if (e == NULL) {
        return 1;
    }
    n_vocab = llm_engine_model(e)->cfg.n_vocab;
    for (i = 0; i < MAX_SEQS; i++) {
        for (j = 0; j < o.prompt; j++) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            prompts[i][j] = (int32_t) (100 + rng % (uint64_t) (n_vocab
                                                               - 200));
        }
    }

    /* warm-up: every adapter loaded and resident, caches hot */
    {
        scenario    w;
        bench_opts  wo = o;

        double dec, wall;
        long   tok;

        memset(&w, 0, sizeof(w));
        wo.gen = 4;
        /* adapters load in the background: this pass may never have a
         * full-batch step to time, only its completion counts */
        for (i = 0; i < o.seqs; i++) {
            if (submit(e, &wo, i, names[i % 32 % n_names]) != 0) {
                return 1;
            }
        }
        if (run(e, o.seqs, &dec, &tok, &wall) != 0) {
            return 1;
        }
    }
    /* round robin over the scenarios, so that a busy moment of the
     * machine does not fall on one scenario only; the best run of each */
    memset(sc, 0, sizeof(sc));
    for (j = 0; j < o.repeat; j++) {
        for (i = 0; i < 4; i++) {
            if (scenario_run(e, &o, ks[i], &sc[i]) != 0) {
                return 1;
            }
        }
    }
    for (i = 0; i < 4 && !o.json; i++) {
        fprintf(stderr, "%2d adapters %8.1f tok/s decode (%.1f ms/step)\n",
                ks[i], sc[i].decode_tps, sc[i].step_ms);
    }
    llm_engine_free(e);

    /* the base at batch 1: what the naive way gets at best */
    {
        double open_s, total_s, tps;

        if (naive_run(&o, o.model, &open_s, &total_s, &tps) != 0) {
            return 1;
        }
        base1.decode_tps = tps;
        base1.total_s = total_s;
    }
    for (i = 0; i < o.n_naive; i++) {
        double open_s, total_s, tps;

        if (naive_run(&o, o.naive[i], &open_s, &total_s, &tps) != 0) {
            return 1;
        }
        nv_open += open_s / o.n_naive;
        nv_total += total_s / o.n_naive;
        nv_dec += tps / o.n_naive;
    }
    if (cold_loads(&o, &cold_mean, &cold_max, &b8, &b16, &bmean) != 0) {
        return 1;
    }
    /* [[base, 1, 8, 32], ...] per round */
    {
        size_t len = 0;
        int    r;

        rounds[0] = '\0';
        for (r = 0; r < sc[0].n_rounds && len + 64 < sizeof(rounds); r++) {
            len += (size_t) snprintf(rounds + len, sizeof(rounds) - len,
                                     "%s[%.1f, %.1f, %.1f, %.1f]",
                                     r ? ", " : "", sc[0].round_tps[r],
                                     sc[1].round_tps[r], sc[2].round_tps[r],
                                     sc[3].round_tps[r]);
        }
    }

    printf("{\"seqs\": %d, \"prompt\": %d, \"gen\": %d, \"repeat\": %d,\n"
           " \"base\": %.1f, \"adapters_1\": %.1f, \"adapters_8\": %.1f,"
           " \"adapters_32\": %.1f,\n"
           " \"step_ms\": [%.2f, %.2f, %.2f, %.2f],\n"
           " \"mean_step_ms\": [%.2f, %.2f, %.2f, %.2f],\n"
           " \"base_batch1\": %.1f,\n"
           " \"rounds\": [%s],\n"
           " \"naive_models\": %d, \"naive_open_s\": %.3f,"
           " \"naive_run_s\": %.3f, \"naive_decode\": %.1f,"
           " \"naive_with_switch\": %.1f,\n"
           " \"cold_load_ms_mean\": %.1f, \"cold_load_ms_max\": %.1f,\n"
           " \"bytes_rank8\": %.0f, \"bytes_rank16\": %.0f,"
           " \"bytes_resident_mean\": %.0f}\n",
           o.seqs, o.prompt, o.gen, o.repeat, sc[0].decode_tps,
           sc[1].decode_tps, sc[2].decode_tps, sc[3].decode_tps,
           sc[0].step_ms, sc[1].step_ms, sc[2].step_ms, sc[3].step_ms,
           sc[0].mean_ms, sc[1].mean_ms, sc[2].mean_ms, sc[3].mean_ms,
           base1.decode_tps, rounds, o.n_naive, nv_open, nv_total, nv_dec,
           o.n_naive ? o.gen / (nv_open + nv_total) : 0.0,
           cold_mean, cold_max, b8, b16, bmean);
    for (i = 0; i < n_names; i++) {
        free(names[i]);
    }
    return 0;
}
