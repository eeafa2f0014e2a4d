/*
 * gpubench: forward-pass throughput of one backend, below the scheduler
 * (bench/gpu/README.md).  Built and run by bench/gpu/run.sh.
 *
 *   gpubench --model PATH [--device cuda:0] [--batches 1,2,4,...,256]
 *            [--context 512] [--steps 32] [--prefill 512,2048]
 *            [--kv-type f16|f32] [--lora 32,128]
 *
 * decode: B sequences already holding --context tokens each take --steps
 *   steps of one token each; tokens/s = B * steps / time.  Every step
 *   includes the copy of B rows of logits to the host, as the engine
 *   does.  The floor is the bytes a step must read (the weights once,
 *   as the device holds them, plus every sequence's K and V) over the
 *   copy bandwidth measured on the same device.
 * prefill: one chunk of P tokens of a new sequence; tokens/s = P / time;
 *   TFLOP/s counts 2 * (matrix parameters) per token.
 * lora: the multi-LoRA op alone of one decode step of N sequences over N
 *   distinct adapters (ranks 8/16, all seven projections, the model's
 *   shapes; bench/common/lora_step.c), per adapter dtype the backend
 *   takes; GB/s of adapter weights read, against the copy bandwidth.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/common.h"
#include "engine/forward.h"
#include "engine/model.h"
#include "kernels/backend.h"
#include "bench/common/lora_step.h"


#define MAX_LIST 32


static int
parse_list(const char *s, int *out, int cap)
{
    int n = 0;

    while (s != NULL && *s && n < cap) {
        out[n++] = atoi(s);
        s = strchr(s, ',');
        s = s != NULL ? s + 1 : NULL;
    }
    return n;
}


static double
now_s(void)
{
    return (double) llm_now_ns() / 1e9;
}


/* Bytes of one matrix as the device reads it: quantized types are held
 * as F16 by the CUDA backend. */
static double
dense_bytes(const llm_tensor *t)
{
    double n = (double) t->ne[0] * (double) t->ne[1];

    return t->type == LLM_F32 ? 4 * n : 2 * n;
}


static double
model_matrix_bytes(const llm_model *m, double *params)
{
    double b = 0, p = 0;
    int    l;

    for (l = 0; l < m->cfg.n_layers; l++) {
        const llm_layer_weights *w = &m->layers[l];
        const llm_tensor        *all[] = { &w->wq, &w->wk, &w->wv, &w->wo,
                                           &w->w_gate, &w->w_up,
                                           &w->w_down };
        size_t                   i;

        for (i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
            b += dense_bytes(all[i]);
            p += (double) all[i]->ne[0] * all[i]->ne[1];
        }
    }
    b += dense_bytes(&m->output);
    p += (double) m->output.ne[0] * m->output.ne[1];
    *params = p;
    return b;
}


/* Device copy bandwidth (bytes read + written per second), through
 * kv_copy_blocks on a 1 GiB pool. */
static double
copy_bandwidth(llm_backend *be)
{
    llm_kv_pool kv;
    int32_t    *src, *dst;
    int         n = 2048, i, rep;
    double      t0, t1, best = 1e30;

    memset(&kv, 0, sizeof(kv));
    kv.type = LLM_F16;
    kv.n_layers = 1;
    kv.n_blocks = 2 * n;
    kv.block_size = 16;
    kv.n_kv_heads = 16;
    kv.head_dim = 64;
    kv.layer_bytes = (size_t) kv.n_blocks * 16 * 16 * 64 * 2;  /* 128 KiB */
    kv.k = be->ops->alloc(be, kv.layer_bytes);
    kv.v = be->ops->alloc(be, kv.layer_bytes);
    src = malloc(sizeof(int32_t) * n);
    dst = malloc(sizeof(int32_t) * n);
    if (kv.k == NULL || kv.v == NULL || src == NULL || dst == NULL
        || be->ops->kv_copy_blocks == NULL)
    {
        return 0;
    }
    for (i = 0; i < n; i++) {
        src[i] = i;
        dst[i] = n + i;
    }
    for (rep = 0; rep < 6; rep++) {
        be->ops->synchronize(be);
        t0 = now_s();
        if (be->ops->kv_copy_blocks(be, &kv, src, dst, n) != 0
            || be->ops->synchronize(be) != 0)
        {
            fprintf(stderr, "gpubench: copy: %s\n", llm_backend_error(be));
            return 0;
        }
        t1 = now_s();
        if (rep > 0 && t1 - t0 < best) {
            best = t1 - t0;
        }
    }
    be->ops->release(be, kv.k);
    be->ops->release(be, kv.v);
    free(src);
    free(dst);
    /* K and V halves, each read and written */
    return 2.0 * 2.0 * (double) n * 16 * 16 * 64 * 2 / best;
}


/* One step: add[s] tokens to each of n sequences holding len[s]. */
static int
step(llm_forward *fw, int n, int *len, const int *add, int32_t *table,
     int max_blocks, int n_vocab, float *logits, llm_err *err)
{
    llm_batch b;
    int       T = 0, s, i, t = 0, rc, n_out = 0;
    int32_t  *tok, *pos, *seq, *start, *kvl, *outr;

    for (s = 0; s < n; s++) {
        T += add[s];
    }
    tok = malloc(sizeof(int32_t) * T);
    pos = malloc(sizeof(int32_t) * T);
    seq = malloc(sizeof(int32_t) * T);
    start = malloc(sizeof(int32_t) * (n + 1));
    kvl = malloc(sizeof(int32_t) * n);
    outr = malloc(sizeof(int32_t) * n);
    for (s = 0; s < n; s++) {
        start[s] = t;
        for (i = 0; i < add[s]; i++, t++) {
            tok[t] = (int32_t) ((s * 7919u + (unsigned) (len[s] + i) * 104729u)
                                % (unsigned) n_vocab);
            pos[t] = len[s] + i;
            seq[t] = s;
        }
        kvl[s] = len[s] + add[s];
        if (add[s] > 0) {
            outr[n_out++] = t - 1;      /* the sequence's last token */
        }
    }
    start[n] = T;
    memset(&b, 0, sizeof(b));
    b.n_tokens = T;
    b.tokens = tok;
    b.pos = pos;
    b.tok_seq = seq;
    b.n_seqs = n;
    b.seq_start = start;
    b.seq_kv_len = kvl;
    b.block_table = table;
    b.max_blocks = max_blocks;
    b.n_out = n_out;
    b.out_rows = outr;
    rc = llm_forward_run(fw, &b, NULL, 0, logits, err);
    for (s = 0; s < n; s++) {
        len[s] += add[s];
    }
    free(tok);
    free(pos);
    free(seq);
    free(start);
    free(kvl);
    free(outr);
    return rc;
}


int
main(int argc, char **argv)
{
    const char  *model = NULL, *device = "cuda:0";
    int          batches[MAX_LIST], prefill[MAX_LIST], loras[MAX_LIST];
    int          nb, np, nl;
    int          ctx = 512, steps = 32, kv_type = LLM_F16, i, j, s;
    llm_err      err;
    llm_backend *be;
    llm_model   *m;
    double       bw, wbytes, params, kv_tok;
    size_t       fr = 0, tot = 0;

    nb = parse_list("1,2,4,8,16,32,64,128,256", batches, MAX_LIST);
    np = parse_list("512,2048", prefill, MAX_LIST);
    nl = parse_list("32,128", loras, MAX_LIST);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (v == NULL) {
            goto usage;
        }
        i++;
        if (strcmp(a, "--model") == 0) {
            model = v;
        } else if (strcmp(a, "--device") == 0) {
            device = v;
        } else if (strcmp(a, "--batches") == 0) {
            nb = parse_list(v, batches, MAX_LIST);
        } else if (strcmp(a, "--prefill") == 0) {
            np = parse_list(v, prefill, MAX_LIST);
        } else if (strcmp(a, "--context") == 0) {
            ctx = atoi(v);
        } else if (strcmp(a, "--steps") == 0) {
            steps = atoi(v);
        } else if (strcmp(a, "--lora") == 0) {
            nl = strcmp(v, "0") == 0 ? 0 : parse_list(v, loras, MAX_LIST);
        } else if (strcmp(a, "--kv-type") == 0) {
            kv_type = strcmp(v, "f32") == 0 ? LLM_F32 : LLM_F16;
        } else {
            goto usage;
        }
    }
    if (model == NULL || ctx < 1 || steps < 1) {
        goto usage;
    }

    be = llm_backend_open(device, 0, &err);
    if (be == NULL) {
        fprintf(stderr, "gpubench: %s: %s\n", device, err.msg);
        return 1;
    }
    m = llm_model_load(model, be, NULL, NULL, &err);
    if (m == NULL) {
        fprintf(stderr, "gpubench: %s\n", err.msg);
        return 1;
    }
    llm_backend_mem_info(be, &fr, &tot);
    wbytes = model_matrix_bytes(m, &params);
    kv_tok = 2.0 * m->cfg.n_layers * m->cfg.n_kv_heads * m->cfg.head_dim
             * (kv_type == LLM_F32 ? 4 : 2);
    bw = copy_bandwidth(be);
    printf("# model %s: %d layers, dim %d, %d/%d heads, hd %d, ffn %d,"
           " vocab %d\n", model, m->cfg.n_layers, m->cfg.dim,
           m->cfg.n_heads, m->cfg.n_kv_heads, m->cfg.head_dim,
           m->cfg.ffn_dim, m->cfg.n_vocab);
    printf("# device %s (%s): %.1f GiB free of %.1f; matrices %.2f G params,"
           " %.2f GB as read; copy bandwidth %.0f GB/s\n", device,
           be->ops->name, fr / 1073741824.0, tot / 1073741824.0,
           params / 1e9, wbytes / 1e9, bw / 1e9);

    /* ---- decode */
    printf("\n# decode: context %d, %d steps, logits copied every step\n",
           ctx, steps);
    printf("%6s %10s %12s %12s %10s\n", "batch", "ms/step", "tokens/s",
           "floor tok/s", "of floor");
    for (j = 0; j < nb; j++) {
        int          B = batches[j], max_blocks, n_blocks, *len, *add;
        llm_forward  fw;
        int32_t     *table;
        float       *logits;
        double       t0, t1, floor_s;
        int          rc = 0;

        max_blocks = (ctx + steps + 8 + 15) / 16;
        n_blocks = B * max_blocks;
        if (llm_forward_init(&fw, be, m, B > 512 ? B : 512, B, n_blocks, 16,
                             kv_type, &err) != 0)
        {
            printf("%6d  %s\n", B, err.msg);
            continue;
        }
        table = malloc(sizeof(int32_t) * n_blocks);
        len = calloc(B, sizeof(int));
        add = calloc(B, sizeof(int));
        logits = malloc(sizeof(float) * (size_t) B * m->cfg.n_vocab);
        for (i = 0; i < n_blocks; i++) {
            table[i] = i;
        }
        /* fill the contexts, 512 tokens a step (untimed) */
        for (s = 0; s < B && rc == 0; ) {
            int budget = 512, k;

            memset(add, 0, sizeof(int) * B);
            for (k = s; k < B && budget > 0; k++) {
                int want = ctx - len[k];

                add[k] = want < budget ? want : budget;
                budget -= add[k];
                if (len[k] + add[k] >= ctx) {
                    s = k + 1;
                }
            }
            rc = step(&fw, B, len, add, table, max_blocks, m->cfg.n_vocab,
                      logits, &err);
        }
        for (i = 0; i < B; i++) {
            add[i] = 1;
        }
        for (i = 0; i < 2 && rc == 0; i++) {                /* warm up */
            rc = step(&fw, B, len, add, table, max_blocks, m->cfg.n_vocab,
                      logits, &err);
        }
        t0 = now_s();
        for (i = 0; i < steps && rc == 0; i++) {
            rc = step(&fw, B, len, add, table, max_blocks, m->cfg.n_vocab,
                      logits, &err);
        }
        t1 = now_s();
        if (rc != 0) {
            printf("%6d  %s\n", B, err.msg);
        } else {
            floor_s = bw > 0 ? (wbytes + (double) B * (len[0] - steps / 2)
                                * kv_tok) / bw : 0;
            printf("%6d %10.3f %12.1f %12.1f %9.0f%%\n", B,
                   (t1 - t0) * 1e3 / steps, B * steps / (t1 - t0),
                   floor_s > 0 ? B / floor_s : 0,
                   floor_s > 0 ? 100.0 * floor_s * steps / (t1 - t0) : 0);
        }
        fflush(stdout);
        llm_forward_free(&fw);
        free(table);
        free(len);
        free(add);
        free(logits);
    }

    /* ---- prefill */
    printf("\n# prefill: one chunk of P tokens of a new sequence\n");
    printf("%6s %10s %12s %10s\n", "P", "ms", "tokens/s", "TFLOP/s");
    for (j = 0; j < np; j++) {
        int          P = prefill[j], max_blocks = (P + 15) / 16, len, add;
        llm_forward  fw;
        int32_t     *table;
        float       *logits;
        double       t0, best = 1e30;
        int          rc = 0, r;

        if (llm_forward_init(&fw, be, m, P, 1, max_blocks, 16, kv_type,
                             &err) != 0)
        {
            printf("%6d  %s\n", P, err.msg);
            continue;
        }
        table = malloc(sizeof(int32_t) * max_blocks);
        logits = malloc(sizeof(float) * m->cfg.n_vocab);
        for (i = 0; i < max_blocks; i++) {
            table[i] = i;
        }
        for (r = 0; r < 4 && rc == 0; r++) {        /* first: warm-up */
            len = 0;
            add = P;
            t0 = now_s();
            rc = step(&fw, 1, &len, &add, table, max_blocks, m->cfg.n_vocab,
                      logits, &err);
            if (r > 0 && now_s() - t0 < best) {
                best = now_s() - t0;
            }
        }
        if (rc != 0) {
            printf("%6d  %s\n", P, err.msg);
        } else {
            printf("%6d %10.2f %12.1f %10.1f\n", P, best * 1e3, P / best,
                   2.0 * params * P / best / 1e12);
        }
        fflush(stdout);
        llm_forward_free(&fw);
        free(table);
        free(logits);
    }

    /* ---- multi-LoRA op */
    if (nl > 0 && be->ops->lora != NULL) {
        static const struct { const char *name; int type; } dts[] = {
            { "f16", LLM_F16 }, { "int8", LLM_LORA_I8 }, { "f32", LLM_F32 },
        };

        printf("\n# multi-LoRA op of a decode step: N rows over N distinct"
               " adapters, ranks 8/16, all projections, %d layers\n",
               m->cfg.n_layers);
        printf("%6s %6s %10s %10s %10s %9s\n", "N", "dtype", "MB", "ms",
               "GB/s", "of copy");
        for (j = 0; j < nl; j++) {
            for (i = 0; i < 3; i++) {
                llm_lora_step_shape  sh;
                llm_lora_step_result r;

                if ((dts[i].type == LLM_F16 && !be->ops->lora_f16)
                    || (dts[i].type == LLM_LORA_I8 && !be->ops->lora_i8))
                {
                    continue;
                }
                sh.n_layers = m->cfg.n_layers;
                sh.dim = m->cfg.dim;
                sh.q_dim = m->cfg.n_heads * m->cfg.head_dim;
                sh.kv_dim = m->cfg.n_kv_heads * m->cfg.head_dim;
                sh.ffn = m->cfg.ffn_dim;
                sh.n_adapters = loras[j];
                sh.rows = 1;
                if (llm_bench_lora_step(be, dts[i].type, &sh, 10, &r) == 0) {
                    printf("%6d %6s %10.1f %10.3f %10.1f %8.0f%%\n",
                           loras[j], dts[i].name, r.bytes * 1e-6,
                           r.median_s * 1e3, r.bytes / r.median_s * 1e-9,
                           bw > 0 ? 100.0 * r.bytes / r.median_s / bw : 0);
                }
                fflush(stdout);
            }
        }
    }
    llm_model_free(m);
    be->ops->free(be);
    return 0;

usage:
    fprintf(stderr,
            "usage: gpubench --model PATH [--device cuda:0] [--batches LIST]"
            "\n                [--context N] [--steps N] [--prefill LIST]"
            " [--kv-type f16|f32]\n                [--lora LIST|0]\n");
    return 2;
}
