/*
 * llm-selftest: checks the CUDA backend against the CPU backend.
 *
 *   llm-selftest [--device cuda:N] [--model PATH] [--no-model] [--quick]
 *                [--seed N] [--threads N]
 *
 * Every op runs on both backends on the same random inputs, over many
 * shapes (ragged batches, short and long contexts, block boundaries, each
 * weight type, both attention kernels), and a table prints the relative
 * error ||gpu - cpu|| / ||cpu|| of each against its tolerance.  Then whole
 * models: a tiny random one built in memory, and SmolLM2 (--model, else
 * tools/default-model.sh): logits of prefill and of greedy decoding, and
 * the greedy tokens, against the CPU on the same weights expanded to F32
 * (tight) and on the quantized file itself (loose, plus tokens).
 *
 * Exit status: 0 all passed, or "skipped: no GPU" (no CUDA device, or a
 * build without CUDA); 1 a check failed; 2 bad usage or setup.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/common.h"
#include "engine/forward.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"          /* ROWS16 rows of CPU weights */
#ifdef LLM_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif


typedef struct {
    const char     *device;
    const char     *model;
    int             no_model;
    int             quick;
    int             threads;
    uint64_t        seed;
} st_opts;

static llm_backend *cpu, *gpu;
static int          n_rows, n_failed;
static uint64_t     rng_state = 0x9e3779b97f4a7c15ull;


/* ------------------------------------------------------------- report */

static void
header(const char *title)
{
    printf("\n%s\n%-16s %-44s %-6s %10s %9s\n", title, "op", "case", "type",
           "rel.err", "tol");
}


/* One table row; NaN or an error above tol fails.  err < 0: the op
 * itself failed (message in what). */
static int
row(const char *op, const char *type, double err, double tol,
    const char *fmt, ...)
{
    char    what[128];
    va_list ap;
    int     ok = err >= 0.0 && err <= tol;

    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    n_rows++;
    if (!ok) {
        n_failed++;
    }
    if (err < 0.0) {
        printf("%-16s %-44s %-6s %10s %9.1e  FAIL\n", op, what, type, "error",
               tol);
    } else {
        printf("%-16s %-44s %-6s %10.2e %9.1e  %s\n", op, what, type, err,
               tol, ok ? "ok" : "FAIL");
    }
    fflush(stdout);
    return ok;
}


static void
op_failed(llm_backend *be, const char *op)
{
    printf("  %s on %s: %s\n", op, be->ops->name, llm_backend_error(be));
}


/* ------------------------------------------------------------- random */

static uint64_t
rnd_u64(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}


static int
rnd_int(int n)
{
    return (int) (rnd_u64() % (uint64_t) n);
}


/* uniform in [-1, 1) */
static float
rnd_f(void)
{
    return (float) ((double) (rnd_u64() >> 11) / 9007199254740992.0 * 2.0
                    - 1.0);
}


static void
fill(float *x, size_t n, float scale)
{
    size_t i;

    for (i = 0; i < n; i++) {
        x[i] = rnd_f() * scale;
    }
}


static void *
xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);

    if (p == NULL) {
        fprintf(stderr, "llm-selftest: out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}


/* ----------------------------------------------------------- tensors */

static const char *
tname(int type)
{
    const llm_dtype_info *ti = llm_dtype_get(type);

    return ti != NULL ? ti->name : "?";
}


/* f32 values -> a row-major [rows, cols] buffer of type (host bytes).
 * K-quants, which have no quantizer here, get random blocks with sane
 * scales.  Returns the bytes; *nb gets the row size. */
static uint8_t *
make_weights(int type, const float *f, int64_t cols, int64_t rows,
             size_t *nb)
{
    size_t   rb = llm_row_bytes(type, cols), i;
    uint8_t *b = xmalloc(rb * (size_t) rows);
    int64_t  r;

    *nb = rb;
    for (r = 0; r < rows; r++) {
        uint8_t *dst = b + (size_t) r * rb;

        if (type == LLM_F32) {
            memcpy(dst, f + (size_t) r * cols, (size_t) cols * 4);
        } else if (type == LLM_Q4_K || type == LLM_Q5_K
                   || type == LLM_Q6_K)
        {
            const llm_dtype_info *ti = llm_dtype_get(type);
            size_t                nblk = (size_t) cols / ti->block, k;

            for (i = 0; i < rb; i++) {
                dst[i] = (uint8_t) rnd_u64();
            }
            for (k = 0; k < nblk; k++) {
                uint8_t *blk = dst + k * ti->type_size;
                uint16_t d = llm_f32_to_f16(0.002f + 0.004f * (rnd_f() + 1));
                uint16_t dm = llm_f32_to_f16(0.001f + 0.002f * (rnd_f() + 1));

                if (type == LLM_Q6_K) {
                    memcpy(blk + 208, &d, 2);       /* d after ql, qh, sc */
                } else {
                    memcpy(blk, &d, 2);             /* d, dmin first */
                    memcpy(blk + 2, &dm, 2);
                }
            }
        } else if (llm_quantize_row(type, f + (size_t) r * cols, dst, cols)
                   != 0)
        {
            fprintf(stderr, "llm-selftest: cannot quantize to %s\n",
                    tname(type));
            exit(2);
        }
    }
    return b;
}


/* A tensor on be holding bytes (alloc + upload). */
static llm_tensor
put(llm_backend *be, int type, int64_t cols, int64_t rows, const void *bytes)
{
    llm_tensor t;

    if (llm_tensor_alloc(be, &t, type, cols, rows) != 0
        || (bytes != NULL
            && be->ops->upload(be, t.data, bytes, t.nb * (size_t) rows) != 0))
    {
        fprintf(stderr, "llm-selftest: %s: cannot allocate a [%lld, %lld]"
                " %s tensor: %s\n", be->ops->name, (long long) rows,
                (long long) cols, tname(type), llm_backend_error(be));
        exit(2);
    }
    return t;
}


static llm_tensor
put_f32(llm_backend *be, int64_t cols, int64_t rows, const float *x)
{
    return put(be, LLM_F32, cols, rows, x);
}


/* The f32 contents of t, [rows, cols] packed. */
static float *
get_f32(llm_backend *be, const llm_tensor *t)
{
    size_t  row = (size_t) t->ne[0] * 4;
    float  *x = xmalloc(row * (size_t) t->ne[1]);
    uint8_t *tmp = xmalloc(t->nb * (size_t) (t->ne[1] > 0 ? t->ne[1] : 1));
    int64_t r;

    if (be->ops->download(be, tmp, t->data, t->nb * (size_t) t->ne[1]) != 0) {
        op_failed(be, "download");
        memset(x, 0xff, row * (size_t) t->ne[1]);   /* NaN */
    } else {
        for (r = 0; r < t->ne[1]; r++) {
            memcpy((uint8_t *) x + (size_t) r * row, tmp + (size_t) r * t->nb,
                   row);
        }
    }
    free(tmp);
    return x;
}


/* ||a - b|| / ||b||; any NaN gives infinity. */
static double
rel_err(const float *a, const float *b, size_t n)
{
    double num = 0.0, den = 0.0;
    size_t i;

    for (i = 0; i < n; i++) {
        double d = (double) a[i] - (double) b[i];

        if (isnan(a[i]) || isnan(b[i])) {
            return INFINITY;
        }
        num += d * d;
        den += (double) b[i] * b[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}


static double
compare(llm_backend *be_a, const llm_tensor *a, llm_backend *be_b,
        const llm_tensor *b)
{
    float  *x = get_f32(be_a, a), *y = get_f32(be_b, b);
    double  e = rel_err(x, y, (size_t) a->ne[0] * (size_t) a->ne[1]);

    free(x);
    free(y);
    return e;
}


static void
release2(llm_tensor *c, llm_tensor *g)
{
    llm_tensor_release(cpu, c);
    llm_tensor_release(gpu, g);
}


/* A batch of tokens over sequences: seq s gets add[s] tokens after its
 * len[s] cached ones; block tables are given. */
typedef struct {
    llm_batch   b;
    int32_t    *tokens, *pos, *tok_seq, *seq_start, *kv_len, *out_rows;
} st_batch;


static void
batch_make(st_batch *sb, int n_seqs, const int *len, const int *add,
           const int32_t *table, int max_blocks, int n_vocab)
{
    int T = 0, s, i, t = 0;

    for (s = 0; s < n_seqs; s++) {
        T += add[s];
    }
    sb->tokens = xmalloc(sizeof(int32_t) * (T + 1));
    sb->pos = xmalloc(sizeof(int32_t) * (T + 1));
    sb->tok_seq = xmalloc(sizeof(int32_t) * (T + 1));
    sb->out_rows = xmalloc(sizeof(int32_t) * (T + 1));
    sb->seq_start = xmalloc(sizeof(int32_t) * (n_seqs + 1));
    sb->kv_len = xmalloc(sizeof(int32_t) * (n_seqs + 1));
    for (s = 0; s < n_seqs; s++) {
        sb->seq_start[s] = t;
        sb->kv_len[s] = len[s] + add[s];
        for (i = 0; i < add[s]; i++, t++) {
            sb->tokens[t] = rnd_int(n_vocab);
            sb->pos[t] = len[s] + i;
            sb->tok_seq[t] = s;
        }
    }
    sb->seq_start[n_seqs] = T;
    memset(&sb->b, 0, sizeof(sb->b));
    sb->b.n_tokens = T;
    sb->b.tokens = sb->tokens;
    sb->b.pos = sb->pos;
    sb->b.tok_seq = sb->tok_seq;
    sb->b.n_seqs = n_seqs;
    sb->b.seq_start = sb->seq_start;
    sb->b.seq_kv_len = sb->kv_len;
    sb->b.block_table = table;
    sb->b.max_blocks = max_blocks;
    sb->b.out_rows = sb->out_rows;
}


static void
batch_free(st_batch *sb)
{
    free(sb->tokens);
    free(sb->pos);
    free(sb->tok_seq);
    free(sb->out_rows);
    free(sb->seq_start);
    free(sb->kv_len);
}


/* set_batch on both backends. */
static int
set_both(const llm_batch *b)
{
    if (cpu->ops->set_batch(cpu, b) != 0) {
        op_failed(cpu, "set_batch");
        return -1;
    }
    if (gpu->ops->set_batch(gpu, b) != 0) {
        op_failed(gpu, "set_batch");
        return -1;
    }
    return 0;
}


/* ------------------------------------------------------------- embed */

static void
test_embed(void)
{
    static const int types[] = { LLM_F32, LLM_F16, LLM_BF16, LLM_Q8_0,
                                 LLM_Q4_0, LLM_Q4_1, LLM_Q4_K, LLM_Q6_K };
    int64_t          vocab = 1000, dim = 512;
    int              T = 37, lens[1] = { 0 }, adds[1], ti;
    int32_t          table[64];
    float           *f = xmalloc(sizeof(float) * vocab * dim);
    st_batch         sb;

    for (ti = 0; ti < 64; ti++) {
        table[ti] = ti;
    }
    adds[0] = T;
    batch_make(&sb, 1, lens, adds, table, 64, (int) vocab);
    sb.tokens[0] = 0;                       /* first and last rows */
    sb.tokens[1] = (int32_t) vocab - 1;
    fill(f, vocab * dim, 1.0f);
    if (set_both(&sb.b) != 0) {
        row("embed", "-", -1, 0, "set_batch");
        return;
    }
    for (ti = 0; ti < (int) (sizeof(types) / sizeof(types[0])); ti++) {
        int        type = types[ti];
        size_t     nb;
        uint8_t   *w = make_weights(type, f, dim, vocab, &nb);
        llm_tensor tc = put(cpu, type, dim, vocab, w);
        llm_tensor tg = put(gpu, type, dim, vocab, w);
        llm_tensor oc = put_f32(cpu, dim, T, NULL);
        llm_tensor og = put_f32(gpu, dim, T, NULL);
        /* quantized tables are expanded to F16 on the GPU */
        double     tol = llm_dtype_get(type)->is_quant ? 1e-3 : 0.0;

        if (cpu->ops->embed(cpu, &oc, &tc) != 0) {
            op_failed(cpu, "embed");
        }
        if (gpu->ops->embed(gpu, &og, &tg) != 0) {
            op_failed(gpu, "embed");
            row("embed", tname(type), -1, tol, "vocab %lld dim %lld, %d tokens",
                (long long) vocab, (long long) dim, T);
        } else {
            row("embed", tname(type), compare(gpu, &og, cpu, &oc), tol,
                "vocab %lld dim %lld, %d tokens", (long long) vocab,
                (long long) dim, T);
        }
        release2(&tc, &tg);
        release2(&oc, &og);
        free(w);
    }
    batch_free(&sb);
    free(f);
}


/* ----------------------------------------------------------- rmsnorm */

static void
test_rmsnorm(void)
{
    static const int shapes[][2] = { { 1, 64 }, { 7, 576 }, { 33, 1000 },
                                     { 300, 4096 }, { 2, 8192 } };
    int              i, inplace;

    for (i = 0; i < (int) (sizeof(shapes) / sizeof(shapes[0])); i++) {
        int        n = shapes[i][0], d = shapes[i][1];
        float     *x = xmalloc(sizeof(float) * n * d);
        float     *w = xmalloc(sizeof(float) * d);

        fill(x, (size_t) n * d, 3.0f);
        fill(w, (size_t) d, 1.0f);
        for (inplace = 0; inplace < 2; inplace++) {
            llm_tensor xc = put_f32(cpu, d, n, x), xg = put_f32(gpu, d, n, x);
            llm_tensor wc = put_f32(cpu, d, 1, w), wg = put_f32(gpu, d, 1, w);
            llm_tensor oc = inplace ? xc : put_f32(cpu, d, n, NULL);
            llm_tensor og = inplace ? xg : put_f32(gpu, d, n, NULL);
            int        rc;

            cpu->ops->rmsnorm(cpu, &oc, &xc, &wc, 1e-5f);
            rc = gpu->ops->rmsnorm(gpu, &og, &xg, &wg, 1e-5f);
            if (rc != 0) {
                op_failed(gpu, "rmsnorm");
            }
            row("rmsnorm", "F32", rc ? -1 : compare(gpu, &og, cpu, &oc),
                1e-5, "[%d, %d]%s", n, d, inplace ? " in place" : "");
            if (!inplace) {
                release2(&oc, &og);
            }
            release2(&xc, &xg);
            release2(&wc, &wg);
        }
        free(x);
        free(w);
    }
}


/* ------------------------------------------------------------ matmul */

static double
matmul_tol(int type, int n)
{
    switch (type) {
    case LLM_F32:
        return 2e-5;
    case LLM_F16:
        /* few rows: f32 activations (GEMV); else rounded to F16 */
        return n <= 4 ? 1e-5 : 2e-3;
    case LLM_BF16:
        return n <= 4 ? 1e-5 : 1.5e-2;
    default:
        /* the CPU rounds activations to 8 bits, the GPU to F16 */
        return 2.5e-2;
    }
}


static void
test_matmul(int quick)
{
    static const int types[] = { LLM_F32, LLM_F16, LLM_BF16, LLM_Q8_0,
                                 LLM_Q4_0, LLM_Q4_1, LLM_Q4_K, LLM_Q5_K,
                                 LLM_Q6_K };
    /* n (rows of x), k, m; a bias on odd entries */
    static const int shapes[][3] = {
        { 1, 576, 1536 }, { 2, 256, 100 }, { 3, 512, 33 }, { 4, 1536, 576 },
        { 5, 768, 576 }, { 17, 256, 1000 }, { 64, 1536, 576 },
        { 257, 512, 1536 }, { 1, 96, 40 }, { 9, 160, 48 } };
    int              ti, si, n_shapes = sizeof(shapes) / sizeof(shapes[0]);

    for (ti = 0; ti < (int) (sizeof(types) / sizeof(types[0])); ti++) {
        int                   type = types[ti];
        const llm_dtype_info *inf = llm_dtype_get(type);

        for (si = 0; si < n_shapes; si++) {
            int        n = shapes[si][0], k = shapes[si][1], m = shapes[si][2];
            float     *x, *wf, *bias = NULL;
            uint8_t   *w;
            size_t     nb;
            llm_tensor xc, xg, wc, wg, oc, og, bc, bg;
            int        rc;

            if (k % inf->block != 0 || (quick && si % 2 == 1)) {
                continue;
            }
            x = xmalloc(sizeof(float) * n * k);
            wf = xmalloc(sizeof(float) * m * k);
            fill(x, (size_t) n * k, 2.0f);
            fill(wf, (size_t) m * k, 1.0f / sqrtf((float) k));
            w = make_weights(type, wf, k, m, &nb);
            xc = put_f32(cpu, k, n, x);
            xg = put_f32(gpu, k, n, x);
            wc = put(cpu, type, k, m, w);
            wg = put(gpu, type, k, m, w);
            oc = put_f32(cpu, m, n, NULL);
            og = put_f32(gpu, m, n, NULL);
            memset(&bc, 0, sizeof(bc));
            memset(&bg, 0, sizeof(bg));
            if (si % 2 == 1) {
                bias = xmalloc(sizeof(float) * m);
                fill(bias, (size_t) m, 0.5f);
                bc = put_f32(cpu, m, 1, bias);
                bg = put_f32(gpu, m, 1, bias);
            }
            if (cpu->ops->matmul(cpu, &oc, &xc, &wc, bias ? &bc : NULL)
                != 0)
            {
                op_failed(cpu, "matmul");
            }
            rc = gpu->ops->matmul(gpu, &og, &xg, &wg, bias ? &bg : NULL);
            if (rc != 0) {
                op_failed(gpu, "matmul");
            }
            row("matmul", inf->name,
                rc ? -1 : compare(gpu, &og, cpu, &oc), matmul_tol(type, n),
                "x [%d, %d] w [%d, %d]%s", n, k, m, k, bias ? " + bias" : "");
            release2(&xc, &xg);
            release2(&wc, &wg);
            release2(&oc, &og);
            if (bias != NULL) {
                release2(&bc, &bg);
                free(bias);
            }
            free(x);
            free(wf);
            free(w);
        }
    }

    /* the load-time path: a Q4_1 tensor adopted (expanded to F16) */
    if (gpu->ops->adopt_tensor != NULL) {
        int        n = 8, k = 576, m = 300;
        float     *x = xmalloc(sizeof(float) * n * k);
        float     *wf = xmalloc(sizeof(float) * m * k);
        size_t     nb;
        uint8_t   *w;
        llm_tensor xc, xg, wc, wg, oc, og;
        int        rc;

        fill(x, (size_t) n * k, 2.0f);
        fill(wf, (size_t) m * k, 0.05f);
        w = make_weights(LLM_Q4_1, wf, k, m, &nb);
        xc = put_f32(cpu, k, n, x);
        xg = put_f32(gpu, k, n, x);
        wc = put(cpu, LLM_Q4_1, k, m, w);
        memset(&wg, 0, sizeof(wg));
        wg.type = LLM_Q4_1;
        wg.ne[0] = k;
        wg.ne[1] = m;
        wg.nb = nb;
        rc = llm_backend_adopt_tensor(gpu, &wg, w, nb * (size_t) m);
        oc = put_f32(cpu, m, n, NULL);
        og = put_f32(gpu, m, n, NULL);
        cpu->ops->matmul(cpu, &oc, &xc, &wc, NULL);
        if (rc == 0) {
            rc = gpu->ops->matmul(gpu, &og, &xg, &wg, NULL);
        }
        if (rc != 0) {
            op_failed(gpu, "adopt_tensor + matmul");
        }
        row("matmul", "Q4_1", rc ? -1 : compare(gpu, &og, cpu, &oc), 2.5e-2,
            "adopted as %s, x [%d, %d] w [%d, %d]", tname(wg.type), n, k, m,
            k);
        release2(&xc, &xg);
        release2(&oc, &og);
        release2(&wc, &wg);
        free(x);
        free(wf);
        free(w);                    /* the GPU holds its own copy */
    }
}


/* matmul_n (q, k and v of one x): each output as the GPU's own matmul
 * gives it, bit for bit, and near the CPU's; few rows (one GEMV launch
 * for all three) and more (a product each). */
static void
test_matmul_n(void)
{
    static const int types[] = { LLM_F16, LLM_Q4_1 };
    static const int rows[] = { 1, 3, 8 };
    enum { K = 576, P = 3 };
    static const int ms[P] = { 576, 192, 192 };
    int ti, ri, p;

    if (gpu->ops->matmul_n == NULL || cpu->ops->matmul_n == NULL) {
        return;
    }
    for (ti = 0; ti < 2; ti++) {
        for (ri = 0; ri < 3; ri++) {
            int               type = types[ti], n = rows[ri], rc, same = 1;
            float            *x = xmalloc(sizeof(float) * n * K), *bias;
            llm_tensor        xc, xg, wc[P], wg[P], oc[P], og[P], one[P];
            llm_tensor        bc, bg, *outs_c[P], *outs_g[P];
            const llm_tensor *ws_c[P], *ws_g[P], *bs_c[P], *bs_g[P];
            double            err = 0.0;

            fill(x, (size_t) n * K, 2.0f);
            xc = put_f32(cpu, K, n, x);
            xg = put_f32(gpu, K, n, x);
            bias = xmalloc(sizeof(float) * ms[0]);
            fill(bias, (size_t) ms[0], 0.5f);
            bc = put_f32(cpu, ms[0], 1, bias);
            bg = put_f32(gpu, ms[0], 1, bias);
            for (p = 0; p < P; p++) {
                float   *wf = xmalloc(sizeof(float) * ms[p] * K);
                size_t   nb;
                uint8_t *w;

                fill(wf, (size_t) ms[p] * K, 1.0f / sqrtf((float) K));
                w = make_weights(type, wf, K, ms[p], &nb);
                wc[p] = put(cpu, type, K, ms[p], w);
                wg[p] = put(gpu, type, K, ms[p], w);
                oc[p] = put_f32(cpu, ms[p], n, NULL);
                og[p] = put_f32(gpu, ms[p], n, NULL);
                one[p] = put_f32(gpu, ms[p], n, NULL);
                outs_c[p] = &oc[p];
                outs_g[p] = &og[p];
                ws_c[p] = &wc[p];
                ws_g[p] = &wg[p];
                bs_c[p] = p == 0 ? &bc : NULL;
                bs_g[p] = p == 0 ? &bg : NULL;
                if (gpu->ops->matmul(gpu, &one[p], &xg, &wg[p], bs_g[p])
                    != 0)
                {
                    op_failed(gpu, "matmul");
                }
                free(wf);
                free(w);
            }
            if (cpu->ops->matmul_n(cpu, outs_c, &xc, ws_c, bs_c, P) != 0) {
                op_failed(cpu, "matmul_n");
            }
            rc = gpu->ops->matmul_n(gpu, outs_g, &xg, ws_g, bs_g, P);
            if (rc != 0) {
                op_failed(gpu, "matmul_n");
            }
            for (p = 0; rc == 0 && p < P; p++) {
                float  *a = get_f32(gpu, &og[p]), *b = get_f32(gpu, &one[p]);
                double  e = compare(gpu, &og[p], cpu, &oc[p]);

                same &= memcmp(a, b, sizeof(float) * n * ms[p]) == 0;
                err = e > err ? e : err;
                free(a);
                free(b);
            }
            row("matmul_n", tname(type), rc || !same ? -1 : err,
                matmul_tol(type, n), "q/k/v x [%d, %d]%s", n, K,
                same ? ", == matmul" : ", != matmul");
            for (p = 0; p < P; p++) {
                release2(&wc[p], &wg[p]);
                release2(&oc[p], &og[p]);
                llm_tensor_release(gpu, &one[p]);
            }
            release2(&xc, &xg);
            release2(&bc, &bg);
            free(x);
            free(bias);
        }
    }
}


/* --------------------------------------------------------------- rope *//* --------------------------------------------------------------- rope */

static void
test_rope(void)
{
    static const struct { int heads, hd, n_rot, neox, factors;
                          float base, scale; } cases[] = {
        { 9, 64, 64, 0, 0, 100000.0f, 1.0f },
        { 9, 64, 64, 1, 0, 10000.0f, 1.0f },
        { 3, 64, 32, 0, 0, 10000.0f, 1.0f },
        { 32, 128, 128, 1, 1, 500000.0f, 1.0f },
        { 8, 128, 96, 1, 0, 10000.0f, 0.25f },
        { 4, 256, 256, 0, 1, 1000000.0f, 0.5f },
    };
    int   lens[5] = { 0, 17, 4000, 39990, 0 }, adds[5] = { 9, 1, 33, 3, 16 };
    int32_t table[5 * 4096];
    int   i;
    st_batch sb;

    for (i = 0; i < 5 * 4096; i++) {
        table[i] = 0;
    }
    batch_make(&sb, 5, lens, adds, table, 4096, 100);
    if (set_both(&sb.b) != 0) {
        row("rope", "-", -1, 0, "set_batch");
        return;
    }
    for (i = 0; i < (int) (sizeof(cases) / sizeof(cases[0])); i++) {
        int             T = sb.b.n_tokens, w = cases[i].heads * cases[i].hd;
        float          *x = xmalloc(sizeof(float) * T * w);
        float           ff[256];
        llm_rope_params rp;
        llm_tensor      xc, xg;
        int             rc, j;

        fill(x, (size_t) T * w, 2.0f);
        for (j = 0; j < 256; j++) {
            ff[j] = 1.0f + 7.0f * (rnd_f() + 1.0f) / 2.0f;
        }
        memset(&rp, 0, sizeof(rp));
        rp.n_rot = cases[i].n_rot;
        rp.neox = cases[i].neox;
        rp.freq_base = cases[i].base;
        rp.freq_scale = cases[i].scale;
        rp.freq_factors = cases[i].factors ? ff : NULL;
        xc = put_f32(cpu, w, T, x);
        xg = put_f32(gpu, w, T, x);
        cpu->ops->rope(cpu, &xc, cases[i].heads, cases[i].hd, &rp);
        rc = gpu->ops->rope(gpu, &xg, cases[i].heads, cases[i].hd, &rp);
        if (rc != 0) {
            op_failed(gpu, "rope");
        }
        row("rope", "F32", rc ? -1 : compare(gpu, &xg, cpu, &xc), 1e-5,
            "%d x %d, n_rot %d, %s%s, scale %g, pos to 39992", cases[i].heads,
            cases[i].hd, rp.n_rot, rp.neox ? "neox" : "pairs",
            rp.freq_factors ? ", factors" : "", rp.freq_scale);
        release2(&xc, &xg);
        free(x);
    }
    batch_free(&sb);
}


/* ----------------------------------------------- silu_mul, add, gather */

static void
test_rowwise(void)
{
    static const int shapes[][2] = { { 1, 1536 }, { 37, 8960 },
                                     { 513, 576 }, { 3, 7 } };
    int              i, op;

    for (i = 0; i < (int) (sizeof(shapes) / sizeof(shapes[0])); i++) {
        int    n = shapes[i][0], d = shapes[i][1];
        float *a = xmalloc(sizeof(float) * n * d);
        float *b = xmalloc(sizeof(float) * n * d);

        fill(a, (size_t) n * d, 12.0f);     /* large and tiny gates */
        fill(b, (size_t) n * d, 2.0f);
        for (op = 0; op < 2; op++) {
            llm_tensor ac = put_f32(cpu, d, n, a), ag = put_f32(gpu, d, n, a);
            llm_tensor bc = put_f32(cpu, d, n, b), bg = put_f32(gpu, d, n, b);
            int        rc;

            /* in place, as the forward pass calls them */
            if (op == 0) {
                cpu->ops->silu_mul(cpu, &ac, &ac, &bc);
                rc = gpu->ops->silu_mul(gpu, &ag, &ag, &bg);
            } else {
                cpu->ops->add(cpu, &ac, &ac, &bc);
                rc = gpu->ops->add(gpu, &ag, &ag, &bg);
            }
            if (rc != 0) {
                op_failed(gpu, op ? "add" : "silu_mul");
            }
            row(op ? "add" : "silu_mul", "F32",
                rc ? -1 : compare(gpu, &ag, cpu, &ac), op ? 0.0 : 1e-6,
                "[%d, %d] in place", n, d);
            release2(&ac, &ag);
            release2(&bc, &bg);
        }
        free(a);
        free(b);
    }

    /* gather_out_rows: last rows of ragged sequences, and every row */
    {
        int      lens[3] = { 0, 5, 0 }, adds[3] = { 7, 1, 12 }, d = 576;
        int32_t  table[3 * 8] = { 0 };
        st_batch sb;
        int      all, T, j, rc;
        float   *x;

        batch_make(&sb, 3, lens, adds, table, 8, 100);
        T = sb.b.n_tokens;
        x = xmalloc(sizeof(float) * T * d);
        fill(x, (size_t) T * d, 1.0f);
        for (all = 0; all < 2; all++) {
            llm_tensor xc = put_f32(cpu, d, T, x), xg = put_f32(gpu, d, T, x);
            llm_tensor oc, og;

            if (all) {
                for (j = 0; j < T; j++) {
                    sb.out_rows[j] = T - 1 - j;
                }
                sb.b.n_out = T;
            } else {
                sb.out_rows[0] = 6;
                sb.out_rows[1] = 7;
                sb.out_rows[2] = 19;
                sb.b.n_out = 3;
            }
            oc = put_f32(cpu, d, sb.b.n_out, NULL);
            og = put_f32(gpu, d, sb.b.n_out, NULL);
            rc = set_both(&sb.b);
            if (rc == 0) {
                cpu->ops->gather_out_rows(cpu, &oc, &xc);
                rc = gpu->ops->gather_out_rows(gpu, &og, &xg);
                if (rc != 0) {
                    op_failed(gpu, "gather_out_rows");
                }
            }
            row("gather_out_rows", "F32",
                rc ? -1 : compare(gpu, &og, cpu, &oc), 0.0, "%d of %d rows%s",
                sb.b.n_out, T, all ? ", reversed" : "");
            release2(&xc, &xg);
            release2(&oc, &og);
        }
        free(x);
        batch_free(&sb);
    }
}


/* --------------------------------------------------- kv and attention */

typedef struct {
    int     n_heads, n_kv, hd, kv_type, block_size;
} attn_cfg;

typedef struct {
    attn_cfg    cfg;
    llm_kv_pool kc, kg;             /* the same pool on each backend */
    int         n_seqs, cap, max_blocks, layer;
    int32_t    *table;              /* [n_seqs, max_blocks] */
    int32_t     spare[5];           /* blocks no sequence uses */
    int        *len;                /* [n_seqs] cached positions */
    double      err[3];             /* worst error per attention mode */
    int         failed[3];
} attn_state;


static void
pool_make(llm_backend *be, llm_kv_pool *kv, const attn_cfg *c, int n_blocks)
{
    size_t  es = c->kv_type == LLM_F16 ? 2 : 4;
    void   *zero;

    memset(kv, 0, sizeof(*kv));
    kv->type = c->kv_type;
    kv->n_layers = 2;
    kv->n_blocks = n_blocks;
    kv->block_size = c->block_size;
    kv->n_kv_heads = c->n_kv;
    kv->head_dim = c->hd;
    kv->layer_bytes = (size_t) n_blocks * c->block_size * c->n_kv * c->hd
                      * es;
    kv->k = be->ops->alloc(be, 2 * kv->layer_bytes);
    kv->v = be->ops->alloc(be, 2 * kv->layer_bytes);
    zero = calloc(1, 2 * kv->layer_bytes);
    if (kv->k == NULL || kv->v == NULL || zero == NULL
        || be->ops->upload(be, kv->k, zero, 2 * kv->layer_bytes) != 0
        || be->ops->upload(be, kv->v, zero, 2 * kv->layer_bytes) != 0)
    {
        fprintf(stderr, "llm-selftest: %s: cannot allocate a KV pool\n",
                be->ops->name);
        exit(2);
    }
    free(zero);
}


static void
pool_free(llm_backend *be, llm_kv_pool *kv)
{
    be->ops->release(be, kv->k);
    be->ops->release(be, kv->v);
}


/* One step: add[s] new tokens per sequence; store, then attend on the CPU
 * once and on the GPU with each kernel choice. */
static void
attn_step(attn_state *A, const int *add)
{
    const attn_cfg *c = &A->cfg;
    int             row_w = c->n_kv * c->hd, qw = c->n_heads * c->hd, T;
    int             mode, rc, s;
    float          *q, *k, *v, *ref;
    float           scale = 1.0f / sqrtf((float) c->hd);
    st_batch        sb;
    llm_tensor      qc, qg, kc, kg, vc, vg, oc, og;

    batch_make(&sb, A->n_seqs, A->len, add, A->table, A->max_blocks, 100);
    T = sb.b.n_tokens;
    q = xmalloc(sizeof(float) * T * qw);
    k = xmalloc(sizeof(float) * T * row_w);
    v = xmalloc(sizeof(float) * T * row_w);
    fill(q, (size_t) T * qw, 1.0f);
    fill(k, (size_t) T * row_w, 1.0f);
    fill(v, (size_t) T * row_w, 1.0f);
    qc = put_f32(cpu, qw, T, q);
    qg = put_f32(gpu, qw, T, q);
    kc = put_f32(cpu, row_w, T, k);
    kg = put_f32(gpu, row_w, T, k);
    vc = put_f32(cpu, row_w, T, v);
    vg = put_f32(gpu, row_w, T, v);
    oc = put_f32(cpu, qw, T, NULL);
    og = put_f32(gpu, qw, T, NULL);

    rc = set_both(&sb.b);
    if (rc == 0 && (cpu->ops->kv_store(cpu, &A->kc, A->layer, &kc, &vc) != 0
                    || cpu->ops->attention(cpu, &oc, &qc, &A->kc, A->layer,
                                           c->n_heads, scale) != 0))
    {
        op_failed(cpu, "kv_store/attention");
        rc = -1;
    }
    if (rc == 0 && gpu->ops->kv_store(gpu, &A->kg, A->layer, &kg, &vg) != 0) {
        op_failed(gpu, "kv_store");
        rc = -1;
    }
    ref = rc == 0 ? get_f32(cpu, &oc) : NULL;
    for (mode = 0; mode < 3; mode++) {
        double e = -1.0;

#ifdef LLM_HAVE_CUDA
        if (llm_backend_is_cuda(gpu)) {
            llm_cuda_set_attn_mode(gpu, mode);
        }
#endif
        if (rc == 0) {
            if (gpu->ops->attention(gpu, &og, &qg, &A->kg, A->layer,
                                    c->n_heads, scale) != 0)
            {
                op_failed(gpu, "attention");
            } else {
                float *got = get_f32(gpu, &og);

                e = rel_err(got, ref, (size_t) T * qw);
                free(got);
            }
        }
        if (e < 0.0) {
            A->failed[mode] = 1;
        } else if (e > A->err[mode]) {
            A->err[mode] = e;
        }
    }
#ifdef LLM_HAVE_CUDA
    if (llm_backend_is_cuda(gpu)) {
        llm_cuda_set_attn_mode(gpu, LLM_CUDA_ATTN_AUTO);
    }
#endif
    for (s = 0; s < A->n_seqs; s++) {
        A->len[s] += add[s];
    }
    free(ref);
    free(q);
    free(k);
    free(v);
    release2(&qc, &qg);
    release2(&kc, &kg);
    release2(&vc, &vg);
    release2(&oc, &og);
    batch_free(&sb);
}


static void
test_attention_cfg(const attn_cfg *c, int quick)
{
    /* ragged prefill chunks (one ending on a block boundary), a chunk on
     * top of cached tokens with decodes beside it, long-context decode
     * (split ranges), long prefill chunks */
    static const int steps[][4] = {
        { 37, 5, 16, 400 }, { 10, 1, 1, 0 }, { 0, 0, 0, 1 }, { 1, 1, 1, 1 },
        { 0, 0, 600, 1500 }, { 1, 1, 1, 1 }, { 3, 0, 1, 1 } };
    static const char *modes[3] = { "auto", "split-K", "tiled" };
    attn_state  A;
    int         n_blocks, i, m, n_steps = sizeof(steps) / sizeof(steps[0]);
    size_t      bytes;
    char        what[96];
    const char *kt = c->kv_type == LLM_F16 ? "F16" : "F32";

    memset(&A, 0, sizeof(A));
    A.cfg = *c;
    A.n_seqs = 4;
    A.cap = 2560;
    A.max_blocks = A.cap / c->block_size;
    A.layer = 1;
    n_blocks = A.n_seqs * A.max_blocks + 5;
    A.table = xmalloc(sizeof(int32_t) * A.n_seqs * A.max_blocks);
    A.len = calloc(A.n_seqs, sizeof(int));
    /* physical blocks in scrambled order */
    {
        int32_t *perm = xmalloc(sizeof(int32_t) * n_blocks);

        for (i = 0; i < n_blocks; i++) {
            perm[i] = i;
        }
        for (i = n_blocks - 1; i > 0; i--) {
            int     r = rnd_int(i + 1);
            int32_t t = perm[i];

            perm[i] = perm[r];
            perm[r] = t;
        }
        memcpy(A.table, perm, sizeof(int32_t) * A.n_seqs * A.max_blocks);
        memcpy(A.spare, perm + A.n_seqs * A.max_blocks, sizeof(A.spare));
        free(perm);
    }
    pool_make(cpu, &A.kc, c, n_blocks);
    pool_make(gpu, &A.kg, c, n_blocks);

    for (i = 0; i < n_steps; i++) {
        if (quick && i == 4) {
            continue;
        }
        attn_step(&A, steps[i]);
    }

    snprintf(what, sizeof(what), "%d/%d heads, hd %d, block %d", c->n_heads,
             c->n_kv, c->hd, c->block_size);
    for (m = 0; m < 3; m++) {
        row("attention", kt, A.failed[m] ? -1 : A.err[m], 1e-4, "%s, %s",
            what, modes[m]);
    }

    /* the pages the GPU wrote are the CPU's, bit for bit */
    bytes = 2 * A.kc.layer_bytes;
    {
        uint8_t *a = xmalloc(bytes), *b = xmalloc(bytes);
        int      same, rc;

        rc = cpu->ops->download(cpu, a, A.kc.k, bytes)
             | gpu->ops->download(gpu, b, A.kg.k, bytes);
        same = rc == 0 && memcmp(a, b, bytes) == 0;
        rc |= cpu->ops->download(cpu, a, A.kc.v, bytes)
              | gpu->ops->download(gpu, b, A.kg.v, bytes);
        same = same && rc == 0 && memcmp(a, b, bytes) == 0;
        row("kv_store", kt, rc ? -1 : same ? 0.0 : 1.0, 0.0,
            "%s, pages bit-exact", what);

        /* copy blocks: disjoint pairs (one kernel), then a chain */
        if (gpu->ops->kv_copy_blocks != NULL
            && cpu->ops->kv_copy_blocks != NULL)
        {
            int32_t src[6], dst[6];

            for (i = 0; i < 4; i++) {
                src[i] = A.table[i];                /* seq 0's blocks */
                dst[i] = A.spare[i];
            }
            rc = cpu->ops->kv_copy_blocks(cpu, &A.kc, src, dst, 4)
                 | gpu->ops->kv_copy_blocks(gpu, &A.kg, src, dst, 4);
            /* order matters: spare 0 is read, then overwritten */
            src[0] = A.spare[0];
            dst[0] = A.spare[4];
            src[1] = A.table[A.max_blocks];
            dst[1] = A.spare[0];
            src[2] = A.spare[1];
            dst[2] = A.spare[1];                    /* no-op */
            rc |= cpu->ops->kv_copy_blocks(cpu, &A.kc, src, dst, 3)
                  | gpu->ops->kv_copy_blocks(gpu, &A.kg, src, dst, 3);
            if (rc != 0) {
                op_failed(gpu, "kv_copy_blocks");
            }
            rc |= cpu->ops->download(cpu, a, A.kc.k, bytes)
                  | gpu->ops->download(gpu, b, A.kg.k, bytes);
            same = rc == 0 && memcmp(a, b, bytes) == 0;
            rc |= cpu->ops->download(cpu, a, A.kc.v, bytes)
                  | gpu->ops->download(gpu, b, A.kg.v, bytes);
            same = same && rc == 0 && memcmp(a, b, bytes) == 0;
            row("kv_copy_blocks", kt, rc ? -1 : same ? 0.0 : 1.0, 0.0,
                "%s, 4 pairs + a chain", what);
        }

        /* one block of every layer to host and back (prefix cache tier):
         * the host copies agree, and a block written from host lands
         * where the CPU puts it */
        if (gpu->ops->kv_block_to_host != NULL
            && gpu->ops->kv_block_from_host != NULL
            && cpu->ops->kv_block_to_host != NULL)
        {
            size_t   hb = (size_t) A.kc.n_layers * 2 * A.kc.block_size
                          * A.kc.n_kv_heads * A.kc.head_dim
                          * (A.kc.type == LLM_F16 ? 2 : 4);
            uint8_t *hc = xmalloc(hb), *hg = xmalloc(hb);

            rc = cpu->ops->kv_block_to_host(cpu, &A.kc, A.table[1], hc)
                 | gpu->ops->kv_block_to_host(gpu, &A.kg, A.table[1], hg);
            same = rc == 0 && memcmp(hc, hg, hb) == 0;
            rc |= cpu->ops->kv_block_from_host(cpu, &A.kc, A.spare[2], hc)
                  | gpu->ops->kv_block_from_host(gpu, &A.kg, A.spare[2],
                                                 hc);
            if (rc != 0) {
                op_failed(gpu, "kv_block_to_host/from_host");
            }
            rc |= cpu->ops->download(cpu, a, A.kc.k, bytes)
                  | gpu->ops->download(gpu, b, A.kg.k, bytes);
            same = same && rc == 0 && memcmp(a, b, bytes) == 0;
            rc |= cpu->ops->download(cpu, a, A.kc.v, bytes)
                  | gpu->ops->download(gpu, b, A.kg.v, bytes);
            same = same && rc == 0 && memcmp(a, b, bytes) == 0;
            row("kv_block_host", kt, rc ? -1 : same ? 0.0 : 1.0, 0.0,
                "%s, out and back", what);
            free(hc);
            free(hg);
        }
        free(a);
        free(b);
    }

    pool_free(cpu, &A.kc);
    pool_free(gpu, &A.kg);
    free(A.table);
    free(A.len);
}


static void
test_attention(int quick)
{
    static const attn_cfg cfgs[] = {
        { 9, 3, 64, LLM_F16, 16 },          /* SmolLM2 */
        { 32, 8, 128, LLM_F16, 16 },        /* Llama 3 8B */
        { 4, 4, 32, LLM_F32, 16 },          /* MHA */
        { 20, 2, 80, LLM_F16, 32 },         /* 10 per group: 8 + 2 */
        { 14, 2, 96, LLM_F32, 16 },         /* 7 per group */
        { 8, 1, 256, LLM_F16, 16 },         /* >48 KiB shared, tiled */
        { 12, 12, 64, LLM_F16, 8 },
    };
    int i;

    for (i = 0; i < (int) (sizeof(cfgs) / sizeof(cfgs[0])); i++) {
        if (quick && i >= 3) {
            break;
        }
        test_attention_cfg(&cfgs[i], quick);
    }
}


/* --------------------------------------------------------------- lora */

static void
test_lora(void)
{
    int            T = 40, in = 576, od = 192, i, s, t, j, rc;
    int            ranks[3] = { 8, 16, 4 }, first[3] = { 0, 13, 30 };
    int            n[3] = { 13, 10, 7 };
    float         *x, *o, *ref, *a[3], *b[3];
    llm_tensor     xg, og, ag[3], bg[3];
    llm_tensor    *og_outs[] = { &og };
    llm_lora_seg   seg[3];

    if (gpu->ops->lora == NULL) {
        return;
    }
    x = xmalloc(sizeof(float) * T * in);
    o = xmalloc(sizeof(float) * T * od);
    fill(x, (size_t) T * in, 1.0f);
    fill(o, (size_t) T * od, 1.0f);
    ref = xmalloc(sizeof(float) * T * od);
    memcpy(ref, o, sizeof(float) * T * od);
    xg = put_f32(gpu, in, T, x);
    og = put_f32(gpu, od, T, o);
    for (s = 0; s < 3; s++) {
        a[s] = xmalloc(sizeof(float) * ranks[s] * in);
        b[s] = xmalloc(sizeof(float) * od * ranks[s]);
        fill(a[s], (size_t) ranks[s] * in, 0.1f);
        fill(b[s], (size_t) od * ranks[s], 0.1f);
        ag[s] = put_f32(gpu, in, ranks[s], a[s]);
        bg[s] = put_f32(gpu, ranks[s], od, b[s]);
        memset(&seg[s], 0, sizeof(seg[s]));
        seg[s].type = LLM_F32;
        seg[s].first = first[s];
        seg[s].n = n[s];
        seg[s].rank = ranks[s];
        seg[s].scale = 0.5f + s;
        seg[s].a = ag[s].data;
        seg[s].b = bg[s].data;
        /* reference in double: out += scale * (x A^T) B^T */
        for (t = first[s]; t < first[s] + n[s]; t++) {
            double mid[16];

            for (i = 0; i < ranks[s]; i++) {
                mid[i] = 0.0;
                for (j = 0; j < in; j++) {
                    mid[i] += (double) x[t * in + j] * a[s][i * in + j];
                }
            }
            for (j = 0; j < od; j++) {
                double acc = 0.0;
                for (i = 0; i < ranks[s]; i++) {
                    acc += mid[i] * b[s][j * ranks[s] + i];
                }
                ref[t * od + j] += (float) (seg[s].scale * acc);
            }
        }
    }
    rc = gpu->ops->lora(gpu, og_outs, 1, &xg, seg, 3);
    if (rc != 0) {
        op_failed(gpu, "lora");
        row("lora", "F32", -1, 1e-5, "3 segments");
    } else {
        float *got = get_f32(gpu, &og);

        row("lora", "F32", rel_err(got, ref, (size_t) T * od), 1e-5,
            "3 segments, ranks 8/16/4, vs f64 host");
        /* and against the CPU op, where it has one */
        if (cpu->ops->lora != NULL) {
            llm_tensor   xc = put_f32(cpu, in, T, x);
            llm_tensor   oc = put_f32(cpu, od, T, o);
            llm_tensor   ac[3], bc[3];
            llm_tensor  *oc_outs[] = { &oc };
            llm_lora_seg sc[3];

            for (s = 0; s < 3; s++) {
                ac[s] = put_f32(cpu, in, ranks[s], a[s]);
                bc[s] = put_f32(cpu, ranks[s], od, b[s]);
                sc[s] = seg[s];
                sc[s].a = ac[s].data;
                sc[s].b = bc[s].data;
            }
            if (cpu->ops->lora(cpu, oc_outs, 1, &xc, sc, 3) != 0) {
                op_failed(cpu, "lora");
            } else {
                float *want = get_f32(cpu, &oc);

                row("lora", "F32", rel_err(got, want, (size_t) T * od), 1e-5,
                    "3 segments, ranks 8/16/4, vs cpu");
                free(want);
            }
            llm_tensor_release(cpu, &xc);
            llm_tensor_release(cpu, &oc);
            for (s = 0; s < 3; s++) {
                llm_tensor_release(cpu, &ac[s]);
                llm_tensor_release(cpu, &bc[s]);
            }
        }
        free(got);
    }
    llm_tensor_release(gpu, &xg);
    llm_tensor_release(gpu, &og);
    for (s = 0; s < 3; s++) {
        llm_tensor_release(gpu, &ag[s]);
        llm_tensor_release(gpu, &bg[s]);
        free(a[s]);
        free(b[s]);
    }
    free(x);
    free(o);
    free(ref);
}


/*
 * The op as the engine calls it: a group of two outputs sharing x, many
 * segments (decode rows alone, prefill runs of several tiles; more than
 * one launch's worth), ranks 1 to 256, in the pool's formats (f32; f16
 * and int8 with B transposed), against the CPU op on the same bytes.
 */
static void
lora_group_case(int type, int in)
{
    enum { T = 64, NS = 2 * T };
    static const int od[2] = { 192, 320 };
    static const int ranks[] = { 1, 8, 16, 3, 64, 256, 12 };
    llm_lora_seg  gs[NS], cs[NS];
    void         *gb[NS], *cb[NS];
    llm_tensor    xg, xc, og[2], oc[2];
    llm_tensor   *go[2] = { &og[0], &og[1] }, *co[2] = { &oc[0], &oc[1] };
    float        *x, *o[2];
    size_t        esz = type == LLM_F32 ? 4 : type == LLM_F16 ? 2 : 1;
    int           n = 0, j, r, out, rc_g, rc_c;
    double        err = 0.0;

    x = xmalloc(sizeof(float) * T * in);
    fill(x, (size_t) T * in, 1.0f);
    xg = put_f32(gpu, in, T, x);
    xc = put_f32(cpu, in, T, x);
    for (out = 0; out < 2; out++) {
        o[out] = xmalloc(sizeof(float) * T * od[out]);
        fill(o[out], (size_t) T * od[out], 1.0f);
        og[out] = put_f32(gpu, od[out], T, o[out]);
        oc[out] = put_f32(cpu, od[out], T, o[out]);
    }
    /* output 0: 40 single rows, then runs of 13 and 11; output 1: a run
     * of 20, then single rows */
    for (out = 0; out < 2; out++) {
        for (r = 0; r < T; n++) {
            int     len = out == 0 ? (r < 40 ? 1 : r < 53 ? 13 : 11)
                                   : (r == 0 ? 20 : 1);
            int     rank = ranks[n % (int) (sizeof(ranks) / sizeof(ranks[0]))];
            size_t  na = (size_t) rank * in, nb = (size_t) rank * od[out];
            size_t  bytes = (na + nb) * esz + 2 * (size_t) rank * 4 + 64;
            size_t  bo = (na * esz + 15) / 16 * 16, so = bo + nb * esz;
            uint8_t *h = xmalloc(bytes);
            float   *w = xmalloc(sizeof(float) * (na + nb));

            so = (so + 15) / 16 * 16;
            fill(w, na + nb, 0.1f);
            memset(h, 0, bytes);
            for (j = 0; j < (int) (na + nb); j++) {
                uint8_t *d = h + (j < (int) na ? (size_t) j * esz
                                               : bo + (size_t) (j - na) * esz);
                if (type == LLM_F32) {
                    memcpy(d, &w[j], 4);
                } else if (type == LLM_F16) {
                    uint16_t v = llm_f32_to_f16(w[j]);
                    memcpy(d, &v, 2);
                } else {
                    *(int8_t *) d = (int8_t) (w[j] * 1270.0f);
                }
            }
            for (j = 0; j < 2 * rank; j++) {
                float sc = (1.0f + 0.01f * (float) j) / 1270.0f;
                memcpy(h + so + (size_t) j * 4, &sc, 4);
            }
            memset(&gs[n], 0, sizeof(gs[n]));
            gs[n].type = type;
            gs[n].first = r;
            gs[n].n = len;
            gs[n].rank = rank;
            gs[n].scale = 0.25f + 0.125f * (float) (n % 5);
            gs[n].out = out;
            cs[n] = gs[n];
            gb[n] = gpu->ops->alloc(gpu, bytes);
            cb[n] = cpu->ops->alloc(cpu, bytes);
            if (gb[n] == NULL || cb[n] == NULL
                || gpu->ops->upload(gpu, gb[n], h, bytes) != 0
                || cpu->ops->upload(cpu, cb[n], h, bytes) != 0)
            {
                fprintf(stderr, "llm-selftest: lora: cannot place %zu "
                        "bytes\n", bytes);
                exit(2);
            }
            gs[n].a = gb[n];
            gs[n].b = (uint8_t *) gb[n] + bo;
            cs[n].a = cb[n];
            cs[n].b = (uint8_t *) cb[n] + bo;
            if (type == LLM_LORA_I8) {
                gs[n].a_scale = (const float *) ((uint8_t *) gb[n] + so);
                gs[n].b_scale = gs[n].a_scale + rank;
                cs[n].a_scale = (const float *) ((uint8_t *) cb[n] + so);
                cs[n].b_scale = cs[n].a_scale + rank;
            }
            free(h);
            free(w);
            r += len;
        }
    }
    rc_g = gpu->ops->lora(gpu, go, 2, &xg, gs, n);
    rc_c = cpu->ops->lora(cpu, co, 2, &xc, cs, n);
    if (rc_g != 0) {
        op_failed(gpu, "lora");
    }
    if (rc_c != 0) {
        op_failed(cpu, "lora");
    }
    for (out = 0; rc_g == 0 && rc_c == 0 && out < 2; out++) {
        float  *got = get_f32(gpu, &og[out]), *want = get_f32(cpu, &oc[out]);
        double  e = rel_err(got, want, (size_t) T * od[out]);

        err = e > err ? e : err;
        free(got);
        free(want);
    }
    row("lora", type == LLM_LORA_I8 ? "I8" : tname(type),
        rc_g == 0 && rc_c == 0 ? err : -1.0, 1e-5,
        "%d segs, 2 outputs, ranks 1-256, k %d, vs cpu", n, in);
    for (j = 0; j < n; j++) {
        gpu->ops->release(gpu, gb[j]);
        cpu->ops->release(cpu, cb[j]);
    }
    llm_tensor_release(gpu, &xg);
    llm_tensor_release(cpu, &xc);
    for (out = 0; out < 2; out++) {
        llm_tensor_release(gpu, &og[out]);
        llm_tensor_release(cpu, &oc[out]);
        free(o[out]);
    }
    free(x);
}


static void
test_lora_group(void)
{
    if (gpu->ops->lora == NULL || cpu->ops->lora == NULL) {
        return;
    }
    if (gpu->ops->lora_f16 && cpu->ops->lora_f16) {
        lora_group_case(LLM_F16, 576);
        lora_group_case(LLM_F16, 100);
    }
    if (gpu->ops->lora_i8 && cpu->ops->lora_i8) {
        lora_group_case(LLM_LORA_I8, 576);
        lora_group_case(LLM_LORA_I8, 100);
    }
    lora_group_case(LLM_F32, 576);
}


/* ------------------------------------------------------------ refusals */

/* Bad arguments come back as errors with a message, never a crash. */
static void
test_refusals(void)
{
    int32_t     table[4] = { 0, 1, 99, 3 };
    int         lens[1] = { 40 }, adds[1] = { 2 }, ok = 1;
    float       x[64 * 8];
    llm_tensor  a, b, o;
    llm_kv_pool kv;
    attn_cfg    c = { 4, 2, 48, LLM_F16, 16 };
    st_batch    sb;

    memset(x, 0, sizeof(x));
    batch_make(&sb, 1, lens, adds, table, 4, 100);
    sb.tokens[0] = 100;                     /* outside a vocab of 100 */
    if (gpu->ops->set_batch(gpu, &sb.b) != 0) {
        op_failed(gpu, "set_batch");
        ok = 0;
    }
    a = put_f32(gpu, 64, 2, x);
    b = put_f32(gpu, 48, 8, x);
    o = put_f32(gpu, 8, 2, NULL);
    /* shapes that do not match */
    ok &= gpu->ops->matmul(gpu, &o, &a, &b, NULL) == LLM_EINVAL
          && llm_backend_error(gpu)[0] != '\0';
    /* a token outside the table */
    ok &= gpu->ops->embed(gpu, &o, &b) == LLM_EINVAL;
    /* position 40 lies in block 2 = 99, outside a pool of 8 blocks */
    pool_make(gpu, &kv, &c, 8);
    ok &= gpu->ops->kv_store(gpu, &kv, 0, &a, &a) == LLM_EINVAL;
    table[2] = 2;
    gpu->ops->set_batch(gpu, &sb.b);
#ifdef LLM_HAVE_CUDA
    /* a head size without a kernel */
    if (llm_backend_is_cuda(gpu)) {
        llm_tensor q = put_f32(gpu, 4 * 48, 2, NULL);

        ok &= gpu->ops->attention(gpu, &q, &q, &kv, 0, 4, 0.1f) == LLM_EUNSUP
              && strstr(llm_backend_error(gpu), "head size") != NULL;
        llm_tensor_release(gpu, &q);
    }
#endif
    /* and the backend still works afterwards */
    ok &= gpu->ops->synchronize(gpu) == 0;
    row("refusals", "-", ok ? 0.0 : 1.0, 0.0,
        "bad shapes, tokens, blocks, head size: errors");
    pool_free(gpu, &kv);
    llm_tensor_release(gpu, &a);
    llm_tensor_release(gpu, &b);
    llm_tensor_release(gpu, &o);
    batch_free(&sb);
}


/* ------------------------------------------------------- whole models */

/* A model's weights expanded to F32 on the CPU (the reference the GPU's
 * dense copies should match). */
typedef struct {
    void  **bufs;
    int     n;
} st_owned;


static void
expand_f32(llm_tensor *t, st_owned *own)
{
    const llm_dtype_info *ti = llm_dtype_get(t->type);
    float                *f;
    uint8_t              *row;
    int64_t               r;

    if (t->data == NULL || ti == NULL || t->type == LLM_F32) {
        return;
    }
    f = xmalloc(sizeof(float) * t->ne[0] * t->ne[1]);
    row = xmalloc(t->nb);
    for (r = 0; r < t->ne[1]; r++) {
        llm_dequantize_row(t->type, llm_cpu_tensor_row(t, r, row),
                           f + (size_t) r * t->ne[0], t->ne[0]);
    }
    free(row);
    own->bufs = realloc(own->bufs, sizeof(void *) * (own->n + 1));
    own->bufs[own->n++] = f;
    t->data = f;
    t->type = LLM_F32;
    t->nb = (size_t) t->ne[0] * 4;
    t->layout = LLM_LAYOUT_ROWS;
}


/* On a CPU model: every matrix to F32 (host memory of the CPU backend). */
static void
model_expand_f32(llm_model *m, st_owned *own)
{
    int tied = m->output.data == m->tok_embd.data, l;

    expand_f32(&m->tok_embd, own);
    if (tied) {
        m->output = m->tok_embd;
    } else {
        expand_f32(&m->output, own);
    }
    for (l = 0; l < m->cfg.n_layers; l++) {
        llm_layer_weights *w = &m->layers[l];

        expand_f32(&w->wq, own);
        expand_f32(&w->wk, own);
        expand_f32(&w->wv, own);
        expand_f32(&w->wo, own);
        expand_f32(&w->w_gate, own);
        expand_f32(&w->w_up, own);
        expand_f32(&w->w_down, own);
    }
}


static void
owned_free(st_owned *own)
{
    int i;

    for (i = 0; i < own->n; i++) {
        free(own->bufs[i]);
    }
    free(own->bufs);
    memset(own, 0, sizeof(*own));
}


/* The tiny model: random weights built in memory for a backend. */
typedef struct {
    llm_model_config cfg;
    float          **f;             /* host f32 of each matrix */
    int              n;
} tiny_src;


static void
tiny_tensor(llm_backend *be, llm_tensor *t, int type, const float *f,
            int64_t cols, int64_t rows, st_owned *own)
{
    size_t   nb;
    uint8_t *w = make_weights(type, f, cols, rows, &nb);
    int      rc;

    memset(t, 0, sizeof(*t));
    t->type = type;
    t->ne[0] = cols;
    t->ne[1] = rows;
    t->nb = nb;
    /* adopt_tensor where there is one (the CPU keeps w: not freed) */
    rc = llm_backend_adopt_tensor(be, t, w, nb * (size_t) rows);
    if (rc != 0) {
        fprintf(stderr, "llm-selftest: %s: adopt: %s\n", be->ops->name,
                llm_backend_error(be));
        exit(2);
    }
    own->bufs = realloc(own->bufs, sizeof(void *) * (own->n + 1));
    own->bufs[own->n++] = w;
}


static llm_model *
tiny_model(llm_backend *be, const tiny_src *src, int type, st_owned *own)
{
    llm_model              *m = calloc(1, sizeof(*m));
    const llm_model_config *c = &src->cfg;
    int                     l, i = 0, qd = c->n_heads * c->head_dim;
    int                     kvd = c->n_kv_heads * c->head_dim;

    m->cfg = *c;
    m->be = be;
    m->layers = calloc(c->n_layers, sizeof(llm_layer_weights));
    tiny_tensor(be, &m->tok_embd, type, src->f[i++], c->dim, c->n_vocab, own);
    m->output = m->tok_embd;
    tiny_tensor(be, &m->out_norm, LLM_F32, src->f[i++], c->dim, 1, own);
    for (l = 0; l < c->n_layers; l++) {
        llm_layer_weights *w = &m->layers[l];

        tiny_tensor(be, &w->attn_norm, LLM_F32, src->f[i++], c->dim, 1, own);
        tiny_tensor(be, &w->ffn_norm, LLM_F32, src->f[i++], c->dim, 1, own);
        tiny_tensor(be, &w->wq, type, src->f[i++], c->dim, qd, own);
        tiny_tensor(be, &w->wk, type, src->f[i++], c->dim, kvd, own);
        tiny_tensor(be, &w->wv, type, src->f[i++], c->dim, kvd, own);
        tiny_tensor(be, &w->wo, type, src->f[i++], qd, c->dim, own);
        tiny_tensor(be, &w->w_gate, type, src->f[i++], c->dim, c->ffn_dim,
                    own);
        tiny_tensor(be, &w->w_up, type, src->f[i++], c->dim, c->ffn_dim, own);
        tiny_tensor(be, &w->w_down, type, src->f[i++], c->ffn_dim, c->dim,
                    own);
    }
    return m;
}


/* Frees the device copies of a tiny model's tensors. */
static void
tiny_free(llm_model *m)
{
    int l;

    if (m == NULL) {
        return;
    }
    /* a CPU backend adopted our host buffers in place (freed with own) */
    if (strcmp(m->be->ops->name, "cpu") != 0) {
        llm_tensor_release(m->be, &m->tok_embd);
        llm_tensor_release(m->be, &m->out_norm);
        for (l = 0; l < m->cfg.n_layers; l++) {
            llm_layer_weights *w = &m->layers[l];
            llm_tensor *all[] = { &w->attn_norm, &w->ffn_norm, &w->wq,
                                  &w->wk, &w->wv, &w->wo, &w->w_gate,
                                  &w->w_up, &w->w_down };
            size_t      j;

            for (j = 0; j < sizeof(all) / sizeof(all[0]); j++) {
                llm_tensor_release(m->be, all[j]);
            }
        }
    }
    free(m->layers);
    free(m);
}


static void
tiny_src_make(tiny_src *s)
{
    llm_model_config *c = &s->cfg;
    int               l, qd, kvd;

    memset(s, 0, sizeof(*s));
    snprintf(c->arch, sizeof(c->arch), "llama");
    c->n_vocab = 1024;
    c->dim = 256;
    c->n_layers = 4;
    c->n_heads = 8;
    c->n_kv_heads = 2;
    c->head_dim = 32;
    c->ffn_dim = 512;
    c->n_ctx = 2048;
    c->norm_eps = 1e-5f;
    c->rope.n_rot = 32;
    c->rope.neox = 0;
    c->rope.freq_base = 10000.0f;
    c->rope.freq_scale = 1.0f;
    c->tied_embeddings = 1;
    qd = c->n_heads * c->head_dim;
    kvd = c->n_kv_heads * c->head_dim;
    s->f = xmalloc(sizeof(float *) * (2 + 9 * c->n_layers));

#define TINY_MAT(cols, rows, sc)                                            \
    do {                                                                    \
        float *f_ = xmalloc(sizeof(float) * (size_t) (cols) * (rows));      \
        fill(f_, (size_t) (cols) * (rows), (sc));                           \
        s->f[s->n++] = f_;                                                  \
    } while (0)
#define TINY_NORM(len)                                                      \
    do {                                                                    \
        float *f_ = xmalloc(sizeof(float) * (size_t) (len));                \
        int    i_;                                                          \
        for (i_ = 0; i_ < (len); i_++) {                                    \
            f_[i_] = 1.0f + 0.2f * rnd_f();                                 \
        }                                                                   \
        s->f[s->n++] = f_;                                                  \
    } while (0)

    TINY_MAT(c->dim, c->n_vocab, 1.0f);
    TINY_NORM(c->dim);
    for (l = 0; l < c->n_layers; l++) {
        TINY_NORM(c->dim);
        TINY_NORM(c->dim);
        TINY_MAT(c->dim, qd, 1.7f / sqrtf((float) c->dim));
        TINY_MAT(c->dim, kvd, 1.7f / sqrtf((float) c->dim));
        TINY_MAT(c->dim, kvd, 1.7f / sqrtf((float) c->dim));
        TINY_MAT(qd, c->dim, 1.7f / sqrtf((float) qd));
        TINY_MAT(c->dim, c->ffn_dim, 1.7f / sqrtf((float) c->dim));
        TINY_MAT(c->dim, c->ffn_dim, 1.7f / sqrtf((float) c->dim));
        TINY_MAT(c->ffn_dim, c->dim, 1.7f / sqrtf((float) c->ffn_dim));
    }
#undef TINY_MAT
#undef TINY_NORM
}


static void
tiny_src_free(tiny_src *s)
{
    int i;

    for (i = 0; i < s->n; i++) {
        free(s->f[i]);
    }
    free(s->f);
}


/* Whole-model runs: every engine gets the same batches in lockstep, one
 * prefill step of all prompts, then greedy decode steps teacher-forced
 * with engine 0's choices (the CPU backend on the model as loaded), so
 * every step compares like with like.  Each comparison (engine a against
 * reference b) takes the worst logits error over all rows and counts the
 * rows whose argmax differs; a differing argmax fails unless the
 * reference barely prefers its own token (a near tie). */
#define E2E_MAX 3

typedef struct {
    const char     *name;
    llm_forward     fw;
    int             ok;
} e2e_engine;

typedef struct {
    int             a, b;           /* engines: checked, reference */
    double          tol;
    double          err;
    int             diff, hard;     /* argmax differs; not a near tie */
} e2e_cmp;


static void
e2e_run(const char *label, e2e_engine *e, int n_e, e2e_cmp *cmp, int n_cmp,
        int n_vocab, int n_seqs, int32_t **prompts, const int *plen,
        int n_decode)
{
    int       max_blocks = 64, s, i, j, step, n_tok = 0, n_checked = 0;
    int32_t  *table = xmalloc(sizeof(int32_t) * n_seqs * max_blocks);
    int      *len = calloc(n_seqs, sizeof(int));
    int      *add = calloc(n_seqs, sizeof(int));
    int32_t  *next = calloc(n_seqs, sizeof(int32_t));
    float    *lg[E2E_MAX];

    for (i = 0; i < n_seqs * max_blocks; i++) {
        table[i] = i;
    }
    for (s = 0; s < n_seqs; s++) {
        n_tok += plen[s];
    }
    for (j = 0; j < n_e; j++) {
        lg[j] = xmalloc(sizeof(float) * (size_t) n_seqs * n_vocab);
    }

    for (step = 0; step <= n_decode; step++) {
        st_batch sb;
        int      t = 0;

        for (s = 0; s < n_seqs; s++) {
            add[s] = step == 0 ? plen[s] : 1;
        }
        batch_make(&sb, n_seqs, len, add, table, max_blocks, n_vocab);
        for (s = 0; s < n_seqs; s++) {
            for (i = 0; i < add[s]; i++, t++) {
                sb.tokens[t] = step == 0 ? prompts[s][i] : next[s];
            }
            sb.out_rows[s] = t - 1;     /* each sequence's last token */
        }
        sb.b.n_out = n_seqs;
        for (j = 0; j < n_e; j++) {
            llm_err err;

            if (e[j].ok
                && llm_forward_run(&e[j].fw, &sb.b, NULL, 0, lg[j], &err)
                   != 0)
            {
                printf("  %s, %s: %s\n", label, e[j].name, err.msg);
                e[j].ok = 0;
            }
        }
        for (s = 0; s < n_seqs; s++) {
            for (j = 0; j < n_cmp; j++) {
                const float *g = lg[cmp[j].a] + (size_t) s * n_vocab;
                const float *r = lg[cmp[j].b] + (size_t) s * n_vocab;
                double       er, rms = 0.0;
                int          ta = 0, tb = 0;

                if (!e[cmp[j].a].ok || !e[cmp[j].b].ok) {
                    continue;
                }
                er = rel_err(g, r, (size_t) n_vocab);
                cmp[j].err = er > cmp[j].err ? er : cmp[j].err;
                for (i = 1; i < n_vocab; i++) {
                    ta = g[i] > g[ta] ? i : ta;
                    tb = r[i] > r[tb] ? i : tb;
                }
                for (i = 0; i < n_vocab; i++) {
                    rms += ((double) g[i] - r[i]) * ((double) g[i] - r[i]);
                }
                rms = sqrt(rms / n_vocab);
                if (ta != tb) {
                    cmp[j].diff++;
                    if (r[tb] - r[ta] > 4.0 * rms + 1e-4) {
                        cmp[j].hard++;
                    }
                }
            }
            /* engine 0 chooses the next token for everyone */
            {
                const float *r = lg[0] + (size_t) s * n_vocab;
                int          top = 0;

                for (i = 1; i < n_vocab; i++) {
                    top = r[i] > r[top] ? i : top;
                }
                next[s] = top;
            }
            n_checked++;
        }
        for (s = 0; s < n_seqs; s++) {
            len[s] += add[s];
        }
        batch_free(&sb);
    }

    for (j = 0; j < n_cmp; j++) {
        e2e_cmp *c = &cmp[j];
        int      ok = e[c->a].ok && e[c->b].ok;

        row("logits", "F32", ok ? c->err : -1, c->tol,
            "%s: %s vs %s, %d prompts (%d tokens) + %d", label,
            e[c->a].name, e[c->b].name, n_seqs, n_tok, n_decode);
        n_rows++;
        if (!ok || c->hard > 0) {
            n_failed++;
        }
        printf("%-16s %-44s %-6s %6d/%d same%s\n", "greedy tokens", "", "",
               n_checked - c->diff, n_checked,
               !ok || c->hard ? "  FAIL"
               : c->diff ? "  ok (near ties)" : "  ok");
    }
    for (j = 0; j < n_e; j++) {
        free(lg[j]);
    }
    free(table);
    free(len);
    free(add);
    free(next);
}


static void
e2e_init(e2e_engine *e, const char *name, llm_backend *be,
         const llm_model *m)
{
    llm_err err;

    memset(e, 0, sizeof(*e));
    e->name = name;
    e->ok = 1;
    if (llm_forward_init(&e->fw, be, m, 256, 8, 3 * 64, 16, LLM_F16, &err)
        != 0)
    {
        printf("  %s: %s\n", name, err.msg);
        e->ok = 0;
    }
}


static void
e2e_free(e2e_engine *e, int n)
{
    int i;

    for (i = 0; i < n; i++) {
        if (e[i].fw.be != NULL) {
            llm_forward_free(&e[i].fw);
        }
    }
}


/* The comparisons of a model: quantized weights are checked tightly
 * against the CPU on the same weights in F32 (the GPU computes with their
 * F16 expansion) and loosely against the CPU's own quantized path (which
 * rounds activations to 8 bits); F32 weights only tightly. */
static int
e2e_plan(e2e_cmp *cmp, int quantized, double tight)
{
    memset(cmp, 0, 2 * sizeof(*cmp));
    /* engines: 0 cpu (as loaded), 1 cuda, 2 cpu-f32 */
    cmp[0].a = 1;
    cmp[0].b = quantized ? 2 : 0;
    cmp[0].tol = tight;
    if (!quantized) {
        return 1;
    }
    cmp[1].a = 1;
    cmp[1].b = 0;
    cmp[1].tol = 0.3;
    return 2;
}


static void
test_tiny(void)
{
    static const int types[] = { LLM_F32, LLM_F16, LLM_Q8_0, LLM_Q4_1 };
    tiny_src         src;
    int              ti, s;
    int32_t         *prompts[3];
    int              plen[3] = { 40, 23, 1 };

    tiny_src_make(&src);
    for (s = 0; s < 3; s++) {
        int i;

        prompts[s] = xmalloc(sizeof(int32_t) * plen[s]);
        for (i = 0; i < plen[s]; i++) {
            prompts[s][i] = rnd_int(src.cfg.n_vocab);
        }
    }
    for (ti = 0; ti < (int) (sizeof(types) / sizeof(types[0])); ti++) {
        int         type = types[ti], quant = type != LLM_F32, n_e, n_cmp;
        st_owned    oc = { 0 }, of = { 0 }, og = { 0 };
        llm_model  *mc = tiny_model(cpu, &src, type, &oc);
        llm_model  *mg = tiny_model(gpu, &src, type, &og);
        llm_model  *mf = quant ? tiny_model(cpu, &src, type, &of) : NULL;
        e2e_engine  e[3];
        e2e_cmp     cmp[2];
        char        label[64];

        snprintf(label, sizeof(label), "tiny %s", tname(type));
        e2e_init(&e[0], "cpu", cpu, mc);
        e2e_init(&e[1], "cuda", gpu, mg);
        n_e = 2;
        if (quant) {
            model_expand_f32(mf, &of);
            e2e_init(&e[2], "cpu-f32", cpu, mf);
            n_e = 3;
        }
        n_cmp = e2e_plan(cmp, quant, type == LLM_F32 ? 1e-3 : 2e-2);
        e2e_run(label, e, n_e, cmp, n_cmp, src.cfg.n_vocab, 3, prompts,
                plen, 12);
        e2e_free(e, n_e);
        tiny_free(mc);
        tiny_free(mg);
        tiny_free(mf);
        owned_free(&oc);
        owned_free(&of);
        owned_free(&og);
    }
    for (s = 0; s < 3; s++) {
        free(prompts[s]);
    }
    tiny_src_free(&src);
}


static void
test_file_model(const char *path, int quick)
{
    static const char *texts[2] = {
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    };
    llm_err        err;
    llm_tokenizer *tok = llm_tokenizer_load(path, &err);
    llm_model     *mc = NULL, *mf = NULL, *mg = NULL;
    st_owned       of = { 0 };
    e2e_engine     e[3];
    e2e_cmp        cmp[2];
    int32_t       *prompts[2] = { NULL, NULL };
    int            plen[2], s, quant = 0, l, n_cmp;
    const char    *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;

    if (tok == NULL) {
        printf("  %s: %s\n", path, err.msg);
        row("model", "-", -1, 0, "%s: tokenizer", base);
        return;
    }
    for (s = 0; s < 2; s++) {
        prompts[s] = xmalloc(sizeof(int32_t) * 256);
        plen[s] = llm_tokenize(tok, texts[s], strlen(texts[s]), 1, 0,
                               prompts[s], 256);
        if (plen[s] <= 0 || plen[s] > 256) {
            plen[s] = 1;
            prompts[s][0] = 1;
        }
    }
    mc = llm_model_load(path, cpu, NULL, NULL, &err);
    mg = mc != NULL ? llm_model_load(path, gpu, NULL, NULL, &err) : NULL;
    if (mg != NULL) {
        for (l = 0; l < LLM_DTYPE_COUNT; l++) {
            quant |= l != LLM_F32 && llm_dtype_get(l) != NULL
                     && mc->type_counts[l] > 0;
        }
        if (quant) {
            mf = llm_model_load(path, cpu, NULL, NULL, &err);
        }
    }
    if (mg == NULL || (quant && mf == NULL)) {
        printf("  %s: %s\n", path, err.msg);
        row("model", "-", -1, 0, "%s: load", base);
    } else {
        e2e_init(&e[0], "cpu", cpu, mc);
        e2e_init(&e[1], "cuda", gpu, mg);
        if (quant) {
            model_expand_f32(mf, &of);
            e2e_init(&e[2], "cpu-f32", cpu, mf);
        }
        n_cmp = e2e_plan(cmp, quant, quant ? 3e-2 : 1e-3);
        e2e_run(base, e, quant ? 3 : 2, cmp, n_cmp, mc->cfg.n_vocab, 2,
                prompts, plen, quick ? 8 : 24);
        e2e_free(e, quant ? 3 : 2);
    }
    llm_model_free(mg);
    llm_model_free(mf);
    llm_model_free(mc);
    owned_free(&of);
    for (s = 0; s < 2; s++) {
        free(prompts[s]);
    }
    llm_tokenizer_free(tok);
}


/* ---------------------------------------------------------------- main */

static void
usage(void)
{
    fprintf(stderr,
        "usage: llm-selftest [--device cuda:N] [--model PATH] [--no-model]\n"
        "                    [--quick] [--seed N] [--threads N]\n");
}


static const char *
default_model(void)
{
    static char path[4096];
    const char *env = getenv("LLM_TEST_MODEL");
    FILE       *p;

    if (env != NULL && access(env, R_OK) == 0) {
        return env;
    }
    p = popen("tools/default-model.sh 2>/dev/null", "r");
    if (p == NULL) {
        return NULL;
    }
    if (fgets(path, sizeof(path), p) == NULL) {
        path[0] = '\0';
    }
    pclose(p);
    path[strcspn(path, "\n")] = '\0';
    return path[0] && access(path, R_OK) == 0 ? path : NULL;
}


int
main(int argc, char **argv)
{
    st_opts  o;
    llm_err  err;
    int      i;
    char     desc[512];

    memset(&o, 0, sizeof(o));
    o.device = "cuda:0";
    o.seed = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (strcmp(a, "--device") == 0 && v != NULL) {
            o.device = v;
            i++;
        } else if (strcmp(a, "--model") == 0 && v != NULL) {
            o.model = v;
            i++;
        } else if (strcmp(a, "--seed") == 0 && v != NULL) {
            o.seed = strtoull(v, NULL, 10);
            i++;
        } else if (strcmp(a, "--threads") == 0 && v != NULL) {
            o.threads = atoi(v);
            i++;
        } else if (strcmp(a, "--no-model") == 0) {
            o.no_model = 1;
        } else if (strcmp(a, "--quick") == 0) {
            o.quick = 1;
        } else {
            usage();
            return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* "--device cpu" runs the harness against the CPU itself */
#ifndef LLM_HAVE_CUDA
    if (strncmp(o.device, "cuda", 4) == 0) {
        printf("llm-selftest: skipped: no GPU (built without CUDA)\n");
        return 0;
    }
#endif
    gpu = llm_backend_open(o.device, o.threads, &err);
    if (gpu == NULL) {
        if (err.code == LLM_ENOTFOUND) {
            printf("llm-selftest: skipped: no GPU (%s)\n", err.msg);
            return 0;
        }
        printf("llm-selftest: FAIL: %s: %s\n", o.device, err.msg);
        return 1;
    }
    cpu = llm_backend_open("cpu", o.threads, &err);
    if (cpu == NULL) {
        printf("llm-selftest: FAIL: cpu: %s\n", err.msg);
        gpu->ops->free(gpu);
        return 1;
    }
    /* splitmix64 of the seed: never the all-zero xorshift state */
    rng_state = o.seed + 0x9e3779b97f4a7c15ull;
    rng_state = (rng_state ^ (rng_state >> 30)) * 0xbf58476d1ce4e5b9ull;
    rng_state = (rng_state ^ (rng_state >> 27)) * 0x94d049bb133111ebull;
    rng_state ^= rng_state >> 31;
    rng_state |= 1;
    snprintf(desc, sizeof(desc), "%s", gpu->ops->name);
#ifdef LLM_HAVE_CUDA
    if (llm_backend_is_cuda(gpu)) {
        llm_cuda_describe(gpu, desc, sizeof(desc));
    }
#endif
    printf("llm-selftest: %s against the CPU backend (seed %llu)\n", desc,
           (unsigned long long) o.seed);
    printf("rel.err = ||cuda - cpu|| / ||cpu|| over each output; tolerances"
           " per type: exact\n(0) where both compute the same values, f32"
           " sums ~1e-5, F16/BF16 activations\n2e-3/1.5e-2, quantized"
           " weights 2.5e-2 (the CPU rounds activations to 8 bits).\n");

    header("ops");
    test_embed();
    test_rmsnorm();
    test_matmul(o.quick);
    test_matmul_n();
    test_rope();
    test_rowwise();
    test_lora();
    test_lora_group();
    test_refusals();
    header("paged KV cache and attention (per kernel: auto, split-K, tiled)");
    test_attention(o.quick);

    header("whole models (cpu-f32: the CPU on the same weights expanded to"
           " F32)");
    test_tiny();
    if (!o.no_model) {
        const char *path = o.model != NULL ? o.model : default_model();

        if (path == NULL) {
            printf("%-16s %-44s skipped (no model: --model PATH)\n", "model",
                   "SmolLM2");
        } else {
            test_file_model(path, o.quick);
        }
    }

    printf("\nllm-selftest: %d checks, %d failed\n", n_rows, n_failed);
    gpu->ops->free(gpu);
    cpu->ops->free(cpu);
    return n_failed ? 1 : 0;
}
