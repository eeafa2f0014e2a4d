/*
 * Micro-benchmark of the CPU backend's matmul (and decode attention) at
 * SmolLM2-135M's shapes.
 *
 *   build-x/bench-kernels [-t threads] [-r passes] [-q] [-A] [-L] [types...]
 *
 * -q: the model step and Q4_1 only; -A: attention only (decode, and prefill
 * chunks; F16 and Q8_0 pages); -L: the
 * multi-LoRA op of a decode step only.
 *
 * Every matrix exists in 30 copies, one per layer, and a pass multiplies
 * each copy once, as a forward pass does: the weights come from memory or
 * the last-level cache, not from L1/L2.  The best of the passes is
 * reported (other processes share the cores).  Columns: weight bytes per
 * second and arithmetic rate, for n = 1, 8, 32 activation rows.
 * "model" lines time the full set of a forward step's matmuls (30 Q4_1
 * layers + the Q8_0 output), i.e. an upper bound of tokens/s.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/common.h"
#include "kernels/backend.h"
#include "bench/common/lora_step.h"

#define N_LAYERS  30
#define DIM       576
#define FFN       1536
#define VOCAB     49152


static uint64_t rng = 88172645463325252ull;


static float
frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float) ((rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}


/* A [m, k] weight of type with plausible values. */
static int
make_weight(llm_backend *be, llm_tensor *t, int type, int64_t k, int64_t m)
{
    size_t   rb = llm_row_bytes(type, k);
    float   *row = malloc((size_t) k * 4);
    int64_t  j, i;
    uint8_t *p;

    if (row == NULL || llm_tensor_alloc(be, t, type, k, m) != 0) {
        free(row);
        return -1;
    }
    p = t->data;
    for (j = 0; j < m; j++) {
        uint8_t *wr = p + (size_t) j * rb;
        if (type == LLM_Q4_K || type == LLM_Q5_K || type == LLM_Q6_K) {
            const llm_dtype_info *ti = llm_dtype_get(type);
            uint16_t d = llm_f32_to_f16(0.003f);
            for (i = 0; i < (int64_t) rb; i++) {
                wr[i] = (uint8_t) (rng >> (i % 56));
                frand();
            }
            for (i = 0; i < k / 256; i++) {
                memcpy(wr + i * ti->type_size
                       + (type == LLM_Q6_K ? 208 : 0), &d, 2);
                if (type != LLM_Q6_K) {
                    memcpy(wr + i * ti->type_size + 2, &d, 2);
                }
            }
        } else {
            for (i = 0; i < k; i++) {
                row[i] = frand() * 0.05f;
            }
            llm_quantize_row(type, row, wr, k);
        }
    }
    free(row);
    {
        /* as the engine hands model weights over: the backend may keep
         * them in its own layout (a copy it owns; kernels/backend.h) */
        llm_tensor a = *t;

        if (llm_backend_adopt_tensor(be, &a, t->data, rb * (size_t) m) != 0) {
            llm_tensor_release(be, t);
            return -1;
        }
        if (a.data != t->data) {
            llm_tensor_release(be, t);
        }
        *t = a;
    }
    return 0;
}


/* Frees a make_weight tensor (a copy the backend made is its own). */
static void
drop_weight(llm_backend *be, llm_tensor *t)
{
    if (t->layout == LLM_LAYOUT_ROWS) {
        llm_tensor_release(be, t);
    }
}


static double
now_s(void)
{
    return (double) llm_now_ns() * 1e-9;
}


typedef struct shape {
    const char *name;
    int64_t     k, m;
} shape;


static const shape shapes[] = {
    { "q/o  576x576 ", DIM, DIM },
    { "k/v  576x192 ", DIM, 192 },
    { "gate 576x1536", DIM, FFN },
    { "down 1536x576", FFN, DIM },
};


static void
bench_shape(llm_backend *be, int type, const shape *s, int passes)
{
    static const int ns[3] = { 1, 8, 32 };
    llm_tensor        w[N_LAYERS], x, out;
    int               l, ni, p;
    double            best[3];

    if (llm_row_bytes(type, s->k) == 0) {
        return;                 /* k is not a multiple of the block */
    }
    for (l = 0; l < N_LAYERS; l++) {
        if (make_weight(be, &w[l], type, s->k, s->m) != 0) {
            printf("  %s: out of memory\n", s->name);
            return;
        }
    }
    llm_tensor_alloc(be, &x, LLM_F32, s->k, 32);
    llm_tensor_alloc(be, &out, LLM_F32, s->m, 32);
    for (l = 0; l < 32 * s->k; l++) {
        ((float *) x.data)[l] = frand();
    }
    for (ni = 0; ni < 3; ni++) {
        llm_tensor xv = llm_tensor_rows(&x, 0, ns[ni]);
        llm_tensor ov = llm_tensor_rows(&out, 0, ns[ni]);

        best[ni] = 1e30;
        for (p = 0; p < passes; p++) {
            double t0 = now_s();
            for (l = 0; l < N_LAYERS; l++) {
                be->ops->matmul(be, &ov, &xv, &w[l], NULL);
            }
            t0 = (now_s() - t0) / N_LAYERS;
            best[ni] = t0 < best[ni] ? t0 : best[ni];
        }
    }
    printf("  %-5s %s", llm_dtype_get(type)->name, s->name);
    for (ni = 0; ni < 3; ni++) {
        double bytes = (double) w[0].nb * s->m;
        double flops = 2.0 * ns[ni] * s->k * s->m;
        printf("  | n=%-2d %7.1f us %6.1f GB/s %6.1f GF/s", ns[ni],
               best[ni] * 1e6, bytes / best[ni] * 1e-9, flops / best[ni] * 1e-9);
    }
    printf("\n");
    for (l = 0; l < N_LAYERS; l++) {
        drop_weight(be, &w[l]);
    }
    llm_tensor_release(be, &x);
    llm_tensor_release(be, &out);
}


/* The matmuls of one forward step of SmolLM2-135M (Q4_1 layers, Q8_0
 * tied output) with n tokens, all of them producing logits. */
static void
bench_model(llm_backend *be, int passes)
{
    static const int ns[4] = { 1, 8, 16, 32 };
    llm_tensor  wq[N_LAYERS], wk[N_LAYERS], wv[N_LAYERS], wo[N_LAYERS];
    llm_tensor  wg[N_LAYERS], wu[N_LAYERS], wd[N_LAYERS], wout;
    llm_tensor  x, xf, o, of, logits;
    int         l, ni, p;
    double      bytes = 0.0;

    for (l = 0; l < N_LAYERS; l++) {
        if (make_weight(be, &wq[l], LLM_Q4_1, DIM, DIM)
            || make_weight(be, &wk[l], LLM_Q4_1, DIM, 192)
            || make_weight(be, &wv[l], LLM_Q4_1, DIM, 192)
            || make_weight(be, &wo[l], LLM_Q4_1, DIM, DIM)
            || make_weight(be, &wg[l], LLM_Q4_1, DIM, FFN)
            || make_weight(be, &wu[l], LLM_Q4_1, DIM, FFN)
            || make_weight(be, &wd[l], LLM_Q4_1, FFN, DIM))
        {
            printf("model: out of memory\n");
            return;
        }
        bytes += (double) wq[l].nb * (2 * DIM + 2 * 192 + 2 * FFN)
                 + (double) wd[l].nb * DIM;
    }
    make_weight(be, &wout, LLM_Q8_0, DIM, VOCAB);
    bytes += (double) wout.nb * VOCAB;
    llm_tensor_alloc(be, &x, LLM_F32, DIM, 32);
    llm_tensor_alloc(be, &xf, LLM_F32, FFN, 32);
    llm_tensor_alloc(be, &o, LLM_F32, DIM, 32);
    llm_tensor_alloc(be, &of, LLM_F32, FFN, 32);
    llm_tensor_alloc(be, &logits, LLM_F32, VOCAB, 32);
    for (l = 0; l < 32 * DIM; l++) {
        ((float *) x.data)[l] = frand();
    }
    for (l = 0; l < 32 * FFN; l++) {
        ((float *) xf.data)[l] = frand();
    }

    printf("model: SmolLM2-135M step matmuls (%.1f MB of weights)\n",
           bytes / 1e6);
    for (ni = 0; ni < 4; ni++) {
        int        n = ns[ni];
        llm_tensor xv = llm_tensor_rows(&x, 0, n);
        llm_tensor fv = llm_tensor_rows(&xf, 0, n);
        llm_tensor ov = llm_tensor_rows(&o, 0, n);
        llm_tensor qv, kvv, gv, lv = llm_tensor_rows(&logits, 0, n);
        double     best = 1e30;

        qv = ov;
        kvv = llm_tensor_rows(&of, 0, n);
        kvv.ne[0] = 192;
        gv = llm_tensor_rows(&of, 0, n);
        for (p = 0; p < passes; p++) {
            double t0 = now_s();
            for (l = 0; l < N_LAYERS; l++) {
                be->ops->matmul(be, &qv, &xv, &wq[l], NULL);
                be->ops->matmul(be, &kvv, &xv, &wk[l], NULL);
                be->ops->matmul(be, &kvv, &xv, &wv[l], NULL);
                be->ops->matmul(be, &ov, &xv, &wo[l], NULL);
                be->ops->matmul(be, &gv, &xv, &wg[l], NULL);
                be->ops->matmul(be, &gv, &xv, &wu[l], NULL);
                be->ops->matmul(be, &ov, &fv, &wd[l], NULL);
            }
            be->ops->matmul(be, &lv, &xv, &wout, NULL);
            t0 = now_s() - t0;
            best = t0 < best ? t0 : best;
        }
        printf("  n=%-2d  %7.2f ms/step  %7.1f tokens/s  %6.1f GB/s\n", n,
               best * 1e3, n / best, bytes / best * 1e-9);
    }
    for (l = 0; l < N_LAYERS; l++) {
        drop_weight(be, &wq[l]);
        drop_weight(be, &wk[l]);
        drop_weight(be, &wv[l]);
        drop_weight(be, &wo[l]);
        drop_weight(be, &wg[l]);
        drop_weight(be, &wu[l]);
        drop_weight(be, &wd[l]);
    }
    drop_weight(be, &wout);
    llm_tensor_release(be, &x);
    llm_tensor_release(be, &xf);
    llm_tensor_release(be, &o);
    llm_tensor_release(be, &of);
    llm_tensor_release(be, &logits);
}


/* Decode attention of one token per sequence (n_seqs of them) at a given
 * context length, F16 pages, SmolLM2's heads; 30 layers, each with its
 * own pages (as in a forward step: the KV of a whole step does not stay
 * in the caches). */
static void
bench_attention(llm_backend *be, int type, int ctx, int chunk, int n_seqs,
                int passes)
{
    enum { NH = 9, NKV = 3, HD = 64, BS = 16 };
    int         max_blocks = (ctx + BS - 1) / BS, s, i, p, c;
    int         n_blocks = max_blocks * n_seqs, T = n_seqs * chunk;
    llm_kv_pool kv;
    llm_batch   b;
    int32_t    *table = malloc(sizeof(int32_t) * n_blocks);
    int32_t    *pos = malloc(sizeof(int32_t) * T);
    int32_t    *seq = malloc(sizeof(int32_t) * T);
    int32_t    *tok = calloc(T, sizeof(int32_t));
    int32_t    *start = malloc(sizeof(int32_t) * (n_seqs + 1));
    llm_tensor  q, out;
    double      best = 1e30, pairs = 0;

    memset(&kv, 0, sizeof(kv));
    kv.type = type;
    kv.n_layers = N_LAYERS;
    kv.n_blocks = n_blocks;
    kv.block_size = BS;
    kv.n_kv_heads = NKV;
    kv.head_dim = HD;
    kv.layer_bytes = (size_t) n_blocks * BS
                     * llm_kv_bytes(type, (size_t) NKV * HD);
    kv.k = be->ops->alloc(be, kv.layer_bytes * N_LAYERS);
    kv.v = be->ops->alloc(be, kv.layer_bytes * N_LAYERS);
    if (kv.k == NULL || kv.v == NULL) {
        printf("attention: out of memory\n");
        return;
    }
    /* 0x3c: 1.0 in F16 halves; in Q8_0 a scale of 1.0 and quants 60 */
    memset(kv.k, 0x3c, kv.layer_bytes * N_LAYERS);
    memset(kv.v, 0x3c, kv.layer_bytes * N_LAYERS);
    for (i = 0; i < n_blocks; i++) {
        table[i] = (i * 7919) % n_blocks;   /* scattered blocks */
    }
    /* each sequence's last chunk positions: decode at chunk 1, else the
     * last chunk of a prefill */
    for (s = 0; s < n_seqs; s++) {
        start[s] = s * chunk;
        for (c = 0; c < chunk; c++) {
            pos[s * chunk + c] = ctx - chunk + c;
            seq[s * chunk + c] = s;
            pairs += ctx - chunk + c + 1;
        }
    }
    start[n_seqs] = T;
    memset(&b, 0, sizeof(b));
    b.n_tokens = T;
    b.tokens = tok;
    b.pos = pos;
    b.tok_seq = seq;
    b.n_seqs = n_seqs;
    b.seq_start = start;
    b.block_table = table;
    b.max_blocks = max_blocks;
    be->ops->set_batch(be, &b);
    llm_tensor_alloc(be, &q, LLM_F32, NH * HD, T);
    llm_tensor_alloc(be, &out, LLM_F32, NH * HD, T);
    for (i = 0; i < NH * HD * T; i++) {
        ((float *) q.data)[i] = frand();
    }
    for (p = 0; p < passes; p++) {
        double t0 = now_s();
        for (i = 0; i < N_LAYERS; i++) {
            be->ops->attention(be, &out, &q, &kv, i, NH, 0.125f);
        }
        t0 = now_s() - t0;
        best = t0 < best ? t0 : best;
    }
    if (chunk == 1) {
        printf("  attention decode ctx=%-5d seqs=%-2d %s %7.3f ms per step"
               " (30 layers)  %6.1f GB/s of KV\n", ctx, n_seqs,
               type == LLM_Q8_0 ? "q8_0" : "f16 ", best * 1e3,
               2.0 * n_seqs * llm_kv_bytes(type, (size_t) ctx * NKV * HD)
               * N_LAYERS / best * 1e-9);
    } else {
        printf("  attention prefill ctx=%-5d chunk=%-4d %s %7.3f ms per "
               "chunk (30 layers)  %6.1f GFLOP/s\n", ctx, chunk,
               type == LLM_Q8_0 ? "q8_0" : "f16 ", best * 1e3,
               4.0 * pairs * NH * HD * N_LAYERS / best * 1e-9);
    }
    be->ops->release(be, kv.k);
    be->ops->release(be, kv.v);
    llm_tensor_release(be, &q);
    llm_tensor_release(be, &out);
    free(table);
    free(pos);
    free(seq);
    free(tok);
    free(start);
}


/*
 * -L: the multi-LoRA op of one decode step of 32 sequences (bench/
 * RESULTS.md, "Multi-LoRA"): SmolLM2's shapes, 30 layers, ranks 8/16,
 * all seven projections (bench/common/lora_step.c), over 32 distinct
 * adapters (bound by their bytes), 8 (4 rows each) or 1 (32 rows: bound
 * by the multiply-adds).
 */
static void
bench_lora(llm_backend *be, int type, int adapters, int passes)
{
    llm_lora_step_shape  sh = { N_LAYERS, DIM, DIM, 192, FFN, adapters,
                                32 / adapters };
    llm_lora_step_result r;

    if (llm_bench_lora_step(be, type, &sh, passes, &r) != 0) {
        return;
    }
    printf("  lora decode step, 32 rows over %2d adapters (ranks 8/16, all "
           "projections), %s: %6.1f MB, %7.3f ms, %5.1f GB/s, %5.1f "
           "GFLOP/s\n", adapters, type == LLM_F16 ? "f16 " : "int8",
           r.bytes * 1e-6, r.best_s * 1e3, r.bytes / r.best_s * 1e-9,
           r.flops / r.best_s * 1e-9);
}


int
main(int argc, char **argv)
{
    static const struct { const char *name; int type; } types[] = {
        { "q4_1", LLM_Q4_1 }, { "q4_0", LLM_Q4_0 }, { "q8_0", LLM_Q8_0 },
        { "q4_k", LLM_Q4_K }, { "q5_k", LLM_Q5_K }, { "q6_k", LLM_Q6_K },
        { "f16", LLM_F16 }, { "bf16", LLM_BF16 }, { "f32", LLM_F32 },
    };
    int          threads = 2, passes = 7, quick = 0, i, j, any = 0;
    int          attn_only = 0, lora_only = 0;
    int          want[16];
    llm_err      err;
    llm_backend *be;

    memset(want, 0, sizeof(want));
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-t") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "-r") == 0 && i + 1 < argc) {
            passes = atoi(argv[++i]);
        } else if (strcmp(argv[i], "-q") == 0) {
            quick = 1;
        } else if (strcmp(argv[i], "-A") == 0) {
            attn_only = 1;
        } else if (strcmp(argv[i], "-L") == 0) {
            lora_only = 1;
        } else {
            for (j = 0; j < (int) (sizeof(types) / sizeof(types[0])); j++) {
                if (strcmp(argv[i], types[j].name) == 0) {
                    want[j] = 1;
                    any = 1;
                }
            }
        }
    }
    be = llm_backend_cpu_new(threads, &err);
    if (be == NULL) {
        fprintf(stderr, "bench-kernels: %s\n", err.msg);
        return 1;
    }
    printf("bench-kernels: %d threads, best of %d passes, LLM_CPU_ISA=%s\n",
           threads, passes, getenv("LLM_CPU_ISA") ? getenv("LLM_CPU_ISA")
                                                  : "(best)");

    if (lora_only) {
        bench_lora(be, LLM_F16, 32, passes);
        bench_lora(be, LLM_LORA_I8, 32, passes);
        bench_lora(be, LLM_F16, 8, passes);
        bench_lora(be, LLM_F16, 1, passes);
        be->ops->free(be);
        return 0;
    }
    if (!attn_only) {
        bench_model(be, passes);
    }
    if (!quick) {
        for (i = 0; i < 2; i++) {
            int t = i == 0 ? LLM_F16 : LLM_Q8_0;

            bench_attention(be, t, 1024, 1, 1, passes);
            bench_attention(be, t, 8192, 1, 1, passes);
            bench_attention(be, t, 160, 1, 32, passes);
            bench_attention(be, t, 1024, 1, 32, passes);
            bench_attention(be, t, 1024, 256, 1, passes);
            bench_attention(be, t, 4096, 256, 1, passes);
        }
    }
    if (attn_only) {
        be->ops->free(be);
        return 0;
    }
    for (j = 0; j < (int) (sizeof(types) / sizeof(types[0])); j++) {
        if (any ? !want[j] : quick && j > 0) {
            continue;
        }
        for (i = 0; i < (int) (sizeof(shapes) / sizeof(shapes[0])); i++) {
            bench_shape(be, types[j].type, &shapes[i], passes);
        }
    }
    if (!quick && (!any || want[2])) {
        /* the tied output matrix: one copy, 28 MB */
        llm_tensor w, x, out;
        static const int ns[3] = { 1, 8, 32 };
        make_weight(be, &w, LLM_Q8_0, DIM, VOCAB);
        llm_tensor_alloc(be, &x, LLM_F32, DIM, 32);
        llm_tensor_alloc(be, &out, LLM_F32, VOCAB, 32);
        for (i = 0; i < 32 * DIM; i++) {
            ((float *) x.data)[i] = frand();
        }
        printf("  Q8_0  out  576x49152");
        for (i = 0; i < 3; i++) {
            llm_tensor xv = llm_tensor_rows(&x, 0, ns[i]);
            llm_tensor ov = llm_tensor_rows(&out, 0, ns[i]);
            double     best = 1e30;
            for (j = 0; j < passes; j++) {
                double t0 = now_s();
                be->ops->matmul(be, &ov, &xv, &w, NULL);
                t0 = now_s() - t0;
                best = t0 < best ? t0 : best;
            }
            printf("  | n=%-2d %7.1f us %6.1f GB/s %6.1f GF/s", ns[i],
                   best * 1e6, (double) w.nb * VOCAB / best * 1e-9,
                   2.0 * ns[i] * DIM * VOCAB / best * 1e-9);
        }
        printf("\n");
        drop_weight(be, &w);
        llm_tensor_release(be, &x);
        llm_tensor_release(be, &out);
    }
    be->ops->free(be);
    return 0;
}
