/*
 * llm-bench: prefill and decode throughput of the engine.
 *
 *   llm-bench --model PATH [--device cpu|cuda:N] [--threads N]
 *             [--prompt-tokens P]
 *             [--gen-tokens G] [--concurrency 1,8,32] [--repeat R]
 *
 * For each concurrency c: c sequences of P prompt tokens are submitted at
 * once; prefill tokens/s = c * P / time until every sequence has its first
 * token; decode tokens/s = tokens generated after that / the time they
 * took (aggregate over the c sequences).  Prompts are distinct token
 * strings drawn from the vocabulary with a fixed seed; generation ignores
 * EOS so every sequence runs G tokens.  Best of R runs is printed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"


typedef struct {
    int         n_done;
    uint64_t    tokens;
    uint64_t    tokens_at_prefill_end;
    uint64_t    prefill_end_ns;
    int         failed;
} bench_state;


static void
on_event(void *ud, const llm_event *ev)
{
    bench_state *st = ud;

    if (ev->type == LLM_EV_TOKEN) {
        st->tokens++;
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
run_once(llm_engine *e, int c, int P, int G, uint32_t seed,
         double *prefill_tps, double *decode_tps, llm_err *err)
{
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
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            /* avoid the low ids, which are special tokens */
            prompt[j] = (int32_t) (256 + (x >> 33) % (uint64_t)
                                         (m->cfg.n_vocab - 256));
        }
        if (llm_engine_submit(e, &req, NULL, err) != 0) {
            llm_free(prompt);
            return err->code;
        }
    }
    llm_free(prompt);

    t0 = llm_now_ns();
    /* prefill: until every sequence produced its first token (the
     * scheduler serves waiting prompts in order, so the first c tokens
     * are the c first tokens) */
    while (st.tokens < (uint64_t) c && !llm_engine_idle(e)) {
        if (llm_engine_step(e, on_event, &st, err) != 0) {
            return err->code;
        }
    }
    t_prefill = llm_now_ns();
    st.tokens_at_prefill_end = st.tokens;
    while (!llm_engine_idle(e)) {
        if (llm_engine_step(e, on_event, &st, err) != 0) {
            return err->code;
        }
    }
    t_end = llm_now_ns();
    if (st.failed) {
        return llm_err_set(err, LLM_EBACKEND, "a sequence failed");
    }
    *prefill_tps = (double) c * P / ((double) (t_prefill - t0) / 1e9);
    *decode_tps = (double) (st.tokens - st.tokens_at_prefill_end)
                  / ((double) (t_end - t_prefill) / 1e9);
    return 0;
}


int
main(int argc, char **argv)
{
    llm_engine_params  ep;
    llm_engine        *e;
    llm_err            err = { 0, "" };
    const char        *model = NULL, *device = "cpu";
    int                threads = 0, P = 128, G = 64, repeat = 2;
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
        else if (strcmp(argv[i], "--concurrency") == 0) {
            n_conc = parse_list(v, conc, 16);
            i++;
        } else {
            fprintf(stderr,
                    "usage: llm-bench --model PATH [--device cpu|cuda:N] "
                    "[--threads N] "
                    "[--prompt-tokens P] [--gen-tokens G] "
                    "[--concurrency 1,8,32] [--repeat R]\n");
            return 2;
        }
    }
    if (model == NULL || P < 1 || G < 2 || n_conc < 1 || repeat < 1) {
        fprintf(stderr, "llm-bench: --model is required; P >= 1, G >= 2\n");
        return 2;
    }
    for (i = 0; i < n_conc; i++) {
        maxc = conc[i] > maxc ? conc[i] : maxc;
    }

    memset(&ep, 0, sizeof(ep));
    ep.model_path = model;
    ep.device = device;
    ep.n_threads = threads;
    ep.max_seqs = maxc;
    ep.max_step_tokens = 512 > maxc ? 512 : maxc;
    ep.kv_memory = (size_t) maxc * (size_t) (P + G + 16) * 32 * 1024;
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
    printf("# model=%s threads=%d prompt=%d gen=%d\n", model, threads, P, G);
    printf("%-12s %16s %16s %16s\n", "concurrency", "prefill tok/s",
           "decode tok/s", "per-seq tok/s");

    for (i = 0; i < n_conc; i++) {
        double best_p = 0, best_d = 0;
        for (r = 0; r < repeat; r++) {
            double p = 0, d = 0;
            if (run_once(e, conc[i], P, G, (uint32_t) (r + 1), &p, &d,
                         &err) != 0)
            {
                fprintf(stderr, "llm-bench: %s\n", err.msg);
                llm_engine_free(e);
                return 1;
            }
            best_p = p > best_p ? p : best_p;
            best_d = d > best_d ? d : best_d;
        }
        printf("%-12d %16.1f %16.1f %16.1f\n", conc[i], best_p, best_d,
               best_d / conc[i]);
        fflush(stdout);
    }
    llm_engine_free(e);
    return 0;
}
