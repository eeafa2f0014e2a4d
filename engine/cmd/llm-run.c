/*
 * llm-run: one-shot generation with the engine, for people and scripts.
 *
 *   llm-run --model PATH (--prompt TEXT | --chat TEXT) [--max-tokens N]
 *           [--temperature T] [--top-k K] [--top-p P] [--min-p P]
 *           [--seed S] [--threads N] [--kv-type f16|f32|q8_0] [--ignore-eos]
 *           [--adapter DIR] [--adapter-dtype auto|f16|f32|int8] [--tokens]
 *           [--logits-out F.npy] [--quiet]
 *
 * --tokens prints the prompt's token ids and exits (it reads the
 * tokenizer alone: no weights are loaded, a vocabulary-only GGUF file
 * will do); --logits-out writes
 * the teacher-forced logits of every prompt position as a float32 .npy
 * array [n_tokens, vocab] and exits.  --adapter applies a PEFT LoRA
 * adapter through the engine's batched multi-LoRA path, its weights on
 * the device in --adapter-dtype (as llm-engine's flag: compare the
 * logits of int8 with f16 before serving int8).  The generated text goes
 * to stdout, the model description and timings to stderr.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/chat_template.h"
#include "engine/engine.h"
#include "engine/tokenizer.h"


typedef struct {
    const char     *model;
    const char     *prompt;
    int             chat;
    int             max_tokens;
    int             threads;
    int             kv_type;
    int             ignore_eos;
    int             print_tokens;
    int             quiet;
    const char     *logits_out;
    const char     *adapter;
    int             adapter_dtype;
    llm_sampling    sampling;
} run_opts;

typedef struct {
    const llm_tokenizer *tok;
    llm_detok            detok;
    FILE                *npy;
    int                  n_prompt;
    int                  n_logits;
    int                  finish;
    int                  n_generated;
    const char          *error;
    uint64_t             first_ns;
} run_state;


static void
usage(void)
{
    fprintf(stderr,
        "usage: llm-run --model PATH (--prompt TEXT | --chat TEXT)\n"
        "               [--max-tokens N] [--temperature T] [--top-k K]\n"
        "               [--top-p P] [--min-p P] [--seed S] [--threads N]\n"
        "               [--kv-type f16|f32|q8_0] [--ignore-eos] [--tokens]\n"
        "               [--adapter DIR] [--adapter-dtype auto|f16|f32|int8]\n"
        "               [--logits-out FILE.npy] [--quiet]\n");
}


static int
parse_args(int argc, char **argv, run_opts *o)
{
    int i;

    memset(o, 0, sizeof(*o));
    o->max_tokens = 128;
    o->kv_type = LLM_F16;
    llm_sampling_default(&o->sampling);

    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;

#define NEEDV() do { if (v == NULL) { fprintf(stderr, "%s needs a value\n", \
                                              a); return -1; } i++; } while (0)
        if (strcmp(a, "--model") == 0) { NEEDV(); o->model = v; }
        else if (strcmp(a, "--prompt") == 0) { NEEDV(); o->prompt = v; }
        else if (strcmp(a, "--chat") == 0) {
            NEEDV(); o->prompt = v; o->chat = 1;
        }
        else if (strcmp(a, "--max-tokens") == 0) {
            NEEDV(); o->max_tokens = atoi(v);
        }
        else if (strcmp(a, "--temperature") == 0) {
            NEEDV(); o->sampling.temperature = strtof(v, NULL);
        }
        else if (strcmp(a, "--top-k") == 0) {
            NEEDV(); o->sampling.top_k = atoi(v);
        }
        else if (strcmp(a, "--top-p") == 0) {
            NEEDV(); o->sampling.top_p = strtof(v, NULL);
        }
        else if (strcmp(a, "--min-p") == 0) {
            NEEDV(); o->sampling.min_p = strtof(v, NULL);
        }
        else if (strcmp(a, "--seed") == 0) {
            NEEDV();
            o->sampling.seed = strtoull(v, NULL, 10);
            o->sampling.has_seed = 1;
        }
        else if (strcmp(a, "--threads") == 0) {
            NEEDV(); o->threads = atoi(v);
        }
        else if (strcmp(a, "--kv-type") == 0) {
            NEEDV();
            o->kv_type = llm_kv_type_parse(v);
            if (o->kv_type < 0) {
                fprintf(stderr, "--kv-type: f16, f32 or q8_0\n");
                return -1;
            }
        }
        else if (strcmp(a, "--logits-out") == 0) {
            NEEDV(); o->logits_out = v;
        }
        else if (strcmp(a, "--adapter") == 0) {
            NEEDV(); o->adapter = v;
        }
        else if (strcmp(a, "--adapter-dtype") == 0) {
            NEEDV();
            o->adapter_dtype = llm_adapter_dtype_parse(v);
            if (o->adapter_dtype < 0) {
                fprintf(stderr, "--adapter-dtype: auto, f16, f32 or int8\n");
                return -1;
            }
        }
        else if (strcmp(a, "--ignore-eos") == 0) { o->ignore_eos = 1; }
        else if (strcmp(a, "--tokens") == 0) { o->print_tokens = 1; }
        else if (strcmp(a, "--quiet") == 0) { o->quiet = 1; }
        else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage();
            exit(0);
        } else {
            fprintf(stderr, "unknown option %s\n", a);
            return -1;
        }
#undef NEEDV
    }
    if (o->model == NULL || o->prompt == NULL) {
        usage();
        return -1;
    }
    if (o->max_tokens <= 0) {
        fprintf(stderr, "--max-tokens must be at least 1\n");
        return -1;
    }
    return 0;
}


/* Renders the chat template around one user message. */
static char *
make_chat_prompt(const llm_tokenizer *tok, const char *user, llm_err *err)
{
    const char   *tmpl = llm_tokenizer_chat_template(tok);
    llm_chat_msg  msg;
    char         *out = NULL, bos[64];
    size_t        len = 0;
    int           kind, n;

    if (tmpl == NULL) {
        llm_err_set(err, LLM_EUNSUP, "the model has no chat template");
        return NULL;
    }
    kind = llm_chat_detect(tmpl);
    msg.role = "user";
    msg.role_len = 4;
    msg.content = user;
    msg.content_len = strlen(user);
    bos[0] = '\0';
    if (llm_tokenizer_bos(tok) >= 0) {
        n = llm_token_to_piece(tok, llm_tokenizer_bos(tok), 1, bos,
                               (int) sizeof(bos) - 1);
        bos[n > 0 && n < (int) sizeof(bos) ? n : 0] = '\0';
    }
    if (llm_chat_render(kind, tmpl, &msg, 1, 1, bos, &out, &len, err) != 0) {
        return NULL;
    }
    llm_chat_strip_bos(out, len, bos, llm_tokenizer_add_bos(tok));
    return out;
}


static int
write_npy_header(FILE *f, int rows, int cols)
{
    char hdr[128];
    int  n;

    n = snprintf(hdr, sizeof(hdr),
                 "{'descr': '<f4', 'fortran_order': False, "
                 "'shape': (%d, %d), }", rows, cols);
    /* magic(6) + version(2) + len(2) + header, padded to 64 with \n */
    while ((10 + n + 1) % 64 != 0) {
        hdr[n++] = ' ';
    }
    hdr[n++] = '\n';
    if (fwrite("\x93NUMPY\x01\x00", 1, 8, f) != 8) {
        return -1;
    }
    fputc(n & 0xff, f);
    fputc(n >> 8, f);
    return fwrite(hdr, 1, (size_t) n, f) == (size_t) n ? 0 : -1;
}


static void
on_event(void *ud, const llm_event *ev)
{
    run_state *st = ud;
    char       buf[512];
    int        n;

    switch (ev->type) {
    case LLM_EV_LOGITS:
        if (st->npy != NULL) {
            fwrite(ev->logits, sizeof(float), (size_t) ev->n_vocab, st->npy);
            st->n_logits++;
        }
        break;
    case LLM_EV_TOKEN:
        if (st->npy != NULL) {
            break;
        }
        if (st->first_ns == 0) {
            st->first_ns = llm_now_ns();
        }
        st->n_generated++;
        n = llm_detok_push(&st->detok, st->tok, ev->sample.token, buf,
                           (int) sizeof(buf));
        if (n > 0) {
            fwrite(buf, 1, (size_t) n, stdout);
            fflush(stdout);
        }
        break;
    case LLM_EV_DONE:
        st->finish = ev->finish;
        st->error = ev->error;
        break;
    }
}


/* The prompt's token ids (*ids, allocated; returns their count or a
 * negative code, err set): the chat template applied with --chat,
 * whose special token texts are tokens; BOS is the tokenizer's to add
 * (make_chat_prompt left the template's first one out), as for the
 * NGINX module. */
static int
prompt_ids(const llm_tokenizer *tok, const run_opts *o, int32_t **ids,
           llm_err *err)
{
    char *text;
    int   n, cap;

    *ids = NULL;
    text = o->chat ? make_chat_prompt(tok, o->prompt, err)
                   : llm_strdup(o->prompt);
    if (text == NULL) {
        if (err->msg[0] == '\0') {
            llm_err_set(err, LLM_ENOMEM, "out of memory");
        }
        return LLM_ENOMEM;
    }
    cap = (int) strlen(text) + 16;
    *ids = llm_malloc((size_t) cap * sizeof(int32_t));
    n = *ids ? llm_tokenize(tok, text, strlen(text), 1, o->chat, *ids, cap)
             : LLM_ENOMEM;
    llm_free(text);
    if (n < 0 || n > cap) {
        llm_err_set(err, n < 0 ? n : LLM_EFULL, "tokenization failed (%d)",
                    n);
        return n < 0 ? n : LLM_EFULL;
    }
    return n;
}


/* --tokens: the tokenizer alone, no weights (a vocabulary-only GGUF
 * will do). */
static int
print_tokens(const run_opts *o)
{
    llm_err        err = { 0, "" };
    llm_tokenizer *tok = llm_tokenizer_load(o->model, &err);
    int32_t       *ids = NULL;
    int            n, i;

    if (tok == NULL) {
        fprintf(stderr, "llm-run: %s\n", err.msg);
        return 1;
    }
    n = prompt_ids(tok, o, &ids, &err);
    if (n < 0) {
        fprintf(stderr, "llm-run: %s\n", err.msg);
    }
    for (i = 0; i < n; i++) {
        printf(i ? " %d" : "%d", ids[i]);
    }
    if (n >= 0) {
        printf("\n");
    }
    llm_free(ids);
    llm_tokenizer_free(tok);
    return n < 0;
}


int
main(int argc, char **argv)
{
    run_opts           o;
    run_state          st;
    llm_engine_params  ep;
    llm_engine        *e;
    llm_request        req;
    llm_err            err = { 0, "" };
    int32_t           *ids = NULL;
    char               buf[64];
    int                n, rc = 0;
    uint64_t           t0, t1;

    if (parse_args(argc, argv, &o) != 0) {
        return 2;
    }
    if (o.print_tokens) {
        return print_tokens(&o);
    }

    memset(&ep, 0, sizeof(ep));
    ep.model_path = o.model;
    ep.n_threads = o.threads;
    ep.kv_type = o.kv_type;
    ep.max_seqs = 1;
    ep.max_step_tokens = 512;
    ep.adapter_dtype = o.adapter_dtype;

    t0 = llm_now_ns();
    e = llm_engine_new(&ep, &err);
    if (e == NULL) {
        fprintf(stderr, "llm-run: %s\n", err.msg);
        return 1;
    }
    if (o.adapter != NULL
        && llm_engine_adapter_register(e, "cli", o.adapter, &err) != 0)
    {
        fprintf(stderr, "llm-run: %s\n", err.msg);
        llm_engine_free(e);
        return 1;
    }
    if (!o.quiet) {
        char desc[2048], tdesc[512];
        llm_model_describe(llm_engine_model(e), desc, sizeof(desc));
        llm_tokenizer_describe(llm_engine_tokenizer(e), tdesc, sizeof(tdesc));
        fprintf(stderr, "%stokenizer: %s\n(loaded in %.2f s)\n", desc, tdesc,
                (double) (llm_now_ns() - t0) / 1e9);
        if (o.adapter != NULL) {
            llm_engine_stats st;

            llm_engine_get_stats(e, &st);
            fprintf(stderr, "adapter %s, on the device in %s%s\n",
                    o.adapter, llm_adapter_dtype_name(st.adapter_dtype),
                    o.adapter_dtype == LLM_ADAPTER_DEFAULT ? " (auto)" : "");
        }
    }

    memset(&st, 0, sizeof(st));
    st.tok = llm_engine_tokenizer(e);
    llm_detok_init(&st.detok, 0);

    n = prompt_ids(st.tok, &o, &ids, &err);
    if (n < 0) {
        fprintf(stderr, "llm-run: %s\n", err.msg);
        rc = 1;
        goto done;
    }

    memset(&req, 0, sizeof(req));
    req.prompt = ids;
    req.n_prompt = n;
    req.max_tokens = o.max_tokens;
    req.sampling = o.sampling;
    req.ignore_eos = o.ignore_eos;
    req.adapter = o.adapter != NULL ? "cli" : NULL;
    if (o.logits_out != NULL) {
        st.npy = fopen(o.logits_out, "wb");
        if (st.npy == NULL || write_npy_header(st.npy, n,
                                 llm_engine_model(e)->cfg.n_vocab) != 0)
        {
            fprintf(stderr, "llm-run: %s: %s\n", o.logits_out,
                    strerror(errno));
            rc = 1;
            goto done;
        }
        req.prompt_logits = 1;
        req.max_tokens = 1;
    }
    if (llm_engine_submit(e, &req, NULL, &err) != 0) {
        fprintf(stderr, "llm-run: %s\n", err.msg);
        rc = 1;
        goto done;
    }

    t0 = llm_now_ns();
    while (!llm_engine_idle(e)) {
        if (llm_engine_step(e, on_event, &st, &err) != 0) {
            fprintf(stderr, "llm-run: %s\n", err.msg);
            rc = 1;
            break;
        }
        if (llm_engine_stalled(e)) {
            usleep(1000);       /* the adapter is loading */
        }
    }
    t1 = llm_now_ns();
    n = llm_detok_flush(&st.detok, buf, (int) sizeof(buf));
    if (n > 0) {
        fwrite(buf, 1, (size_t) n, stdout);
    }

    if (st.npy != NULL) {
        if (fclose(st.npy) != 0 || st.n_logits != req.n_prompt) {
            fprintf(stderr, "llm-run: %s: wrote %d of %d rows\n",
                    o.logits_out, st.n_logits, req.n_prompt);
            rc = 1;
        }
        st.npy = NULL;
    } else {
        printf("\n");
        if (st.finish == LLM_FINISH_ERROR) {
            fprintf(stderr, "llm-run: %s\n", st.error ? st.error : "error");
            rc = 1;
        }
        if (!o.quiet && st.n_generated > 0) {
            double total = (double) (t1 - t0) / 1e9;
            double ttft = (double) (st.first_ns - t0) / 1e9;
            fprintf(stderr, "prompt %d tokens, generated %d tokens; "
                    "first token %.1f ms, decode %.1f tokens/s\n",
                    req.n_prompt, st.n_generated, ttft * 1e3,
                    st.n_generated > 1
                        ? (st.n_generated - 1) / (total - ttft) : 0.0);
        }
    }

done:
    if (st.npy != NULL) {
        fclose(st.npy);
    }
    llm_free(ids);
    llm_engine_free(e);
    return rc;
}
