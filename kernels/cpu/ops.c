/*
 * The CPU backend's row-wise ops: embedding lookup, RMS norm, RoPE,
 * SiLU-gate, residual add, output-row gather, and the paged KV cache
 * writes and block copies.  Each op checks its arguments (shapes, types,
 * token ids, block ids) before any thread touches memory, then splits its
 * rows over the pool.
 */
#include "cpu.h"

#include <math.h>
#include <string.h>


/* Rows below which an op runs on the calling thread alone. */
#define SERIAL_ELEMS  16384


static float *
row_f32(const llm_tensor *t, int64_t r)
{
    return (float *) ((uint8_t *) t->data + (size_t) r * t->nb);
}


static int
check_rows(llm_cpu_ctx *c, const llm_tensor *t, const char *op,
           const char *what, int64_t cols, int64_t rows)
{
    if (t == NULL || (t->data == NULL && rows > 0)) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: %s: %s is NULL", op, what);
    }
    if (t->type != LLM_F32) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: %s: %s must be F32", op,
                            what);
    }
    if ((cols >= 0 && t->ne[0] != cols) || (rows >= 0 && t->ne[1] != rows)
        || t->ne[0] < 0 || t->ne[1] < 0
        || (t->ne[1] > 1 && t->nb < (size_t) t->ne[0] * 4))
    {
        return llm_cpu_fail(c, LLM_EINVAL,
                            "cpu: %s: %s is [%lld, %lld], expected [%lld, %lld]",
                            op, what, (long long) t->ne[1],
                            (long long) t->ne[0], (long long) rows,
                            (long long) cols);
    }
    return 0;
}


static int
need_batch(llm_cpu_ctx *c, const char *op)
{
    if (!c->have_batch) {
        return llm_cpu_fail(c, LLM_ESTATE, "cpu: %s: no batch set", op);
    }
    return 0;
}


/* Runs fn over the pool, or on this thread for small work. */
static void
run(llm_cpu_ctx *c, llm_cpu_task fn, void *arg, int64_t elems)
{
    if (elems < SERIAL_ELEMS || c->n_threads == 1) {
        fn(arg, 0, 1);
    } else {
        llm_cpu_pool_run(c->pool, fn, arg, c->n_threads);
    }
}


/* ---------------------------------------------------------------- embed */

typedef struct embed_job {
    llm_cpu_ctx        *c;
    llm_tensor         *out;
    const llm_tensor   *table;
    uint8_t            *rows;       /* ROWS16 table: a plain row per thread */
} embed_job;


static void
embed_task(void *arg, int ith, int nth)
{
    embed_job *j = arg;
    int64_t    t0, t1, t;

    llm_cpu_split(j->out->ne[1], ith, nth, 1, &t0, &t1);
    for (t = t0; t < t1; t++) {
        uint8_t       *buf = j->rows != NULL
                             ? j->rows + (size_t) ith * j->table->nb : NULL;
        const uint8_t *src = llm_cpu_tensor_row(j->table,
                                                j->c->batch.tokens[t], buf);
        float         *dst = row_f32(j->out, t);

        if (j->table->type == LLM_F16) {
            j->c->kern.f16_to_f32((const uint16_t *) src, dst,
                                  j->table->ne[0]);
        } else {
            llm_dequantize_row(j->table->type, src, dst, j->table->ne[0]);
        }
    }
}


int
llm_cpu_embed(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *table)
{
    embed_job j;
    int64_t   dim, t;
    int       rc;

    if ((rc = need_batch(c, "embed")) != 0) {
        return rc;
    }
    if (table == NULL || table->data == NULL
        || llm_dtype_get(table->type) == NULL
        || llm_row_bytes(table->type, table->ne[0]) == 0
        || table->nb < llm_row_bytes(table->type, table->ne[0])
        || !llm_cpu_layout_ok(table))
    {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: embed: bad table");
    }
    dim = table->ne[0];
    if ((rc = check_rows(c, out, "embed", "out", dim, c->batch.n_tokens))
        != 0)
    {
        return rc;
    }
    for (t = 0; t < c->batch.n_tokens; t++) {
        int32_t id = c->batch.tokens[t];
        if (id < 0 || id >= table->ne[1]) {
            return llm_cpu_fail(c, LLM_EINVAL,
                                "cpu: embed: token %d of the batch is %d,"
                                " outside the vocabulary of %lld", (int) t,
                                (int) id, (long long) table->ne[1]);
        }
    }
    j.c = c;
    j.out = out;
    j.table = table;
    j.rows = NULL;
    if (table->layout == LLM_LAYOUT_ROWS16) {
        j.rows = llm_malloc(table->nb * (size_t) c->n_threads);
        if (j.rows == NULL) {
            return llm_cpu_fail(c, LLM_ENOMEM, "cpu: embed: out of memory");
        }
    }
    run(c, embed_task, &j, c->batch.n_tokens * dim * 4);
    llm_free(j.rows);
    return 0;
}


/* -------------------------------------------------------------- rmsnorm */

typedef struct norm_job {
    llm_tensor         *out;
    const llm_tensor   *x;
    const float        *w;
    float               eps;
} norm_job;


static void
norm_task(void *arg, int ith, int nth)
{
    norm_job *j = arg;
    int64_t   r0, r1, r, i, n = j->x->ne[0];

    llm_cpu_split(j->x->ne[1], ith, nth, 1, &r0, &r1);
    for (r = r0; r < r1; r++) {
        const float *x = row_f32(j->x, r);
        float       *y = row_f32(j->out, r);
        double       a[8] = { 0 }, ss;
        float        scale;

        /* as llama.cpp: the squares summed in double, eps inside the
         * root; in eight running sums (element i into sum i % 8, then
         * pairwise) rather than one, whose chain of dependent adds made
         * this the slowest row op; in double the order moves the result
         * by ~1e-16 of it */
        for (i = 0; i + 8 <= n; i += 8) {
            a[0] += (double) (x[i] * x[i]);
            a[1] += (double) (x[i + 1] * x[i + 1]);
            a[2] += (double) (x[i + 2] * x[i + 2]);
            a[3] += (double) (x[i + 3] * x[i + 3]);
            a[4] += (double) (x[i + 4] * x[i + 4]);
            a[5] += (double) (x[i + 5] * x[i + 5]);
            a[6] += (double) (x[i + 6] * x[i + 6]);
            a[7] += (double) (x[i + 7] * x[i + 7]);
        }
        for (; i < n; i++) {
            a[i % 8] += (double) (x[i] * x[i]);
        }
        ss = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        scale = 1.0f / sqrtf((float) (ss / (double) n) + j->eps);
        for (i = 0; i < n; i++) {
            y[i] = (x[i] * scale) * j->w[i];
        }
    }
}


int
llm_cpu_rmsnorm(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *x,
                const llm_tensor *w, float eps)
{
    norm_job j;
    int      rc;

    if ((rc = check_rows(c, x, "rmsnorm", "x", -1, -1)) != 0
        || (rc = check_rows(c, out, "rmsnorm", "out", x->ne[0], x->ne[1]))
           != 0
        || (rc = check_rows(c, w, "rmsnorm", "w", x->ne[0], -1)) != 0)
    {
        return rc;
    }
    if (x->ne[0] == 0) {
        return 0;
    }
    j.out = out;
    j.x = x;
    j.w = w->data;
    j.eps = eps;
    run(c, norm_task, &j, x->ne[0] * x->ne[1]);
    return 0;
}


/* ----------------------------------------------------------------- rope */

/*
 * cos/sin of every token of the batch, computed once per step and rope
 * parameters: every layer rotates q and k at the same positions.
 * As llama.cpp: theta_0 = pos, theta_{i+1} = theta_i * base^(-2/n_rot)
 * (in float), divided by freq_factors[i] when given, times freq_scale.
 */
static int
rope_table(llm_cpu_ctx *c, const llm_rope_params *rp)
{
    const llm_batch *b = &c->batch;
    int              half = rp->n_rot / 2;
    size_t           need = (size_t) b->n_tokens * (size_t) half * 2;
    float            theta_scale;
    int64_t          t;
    int              i;

    if (c->rope_cs != NULL && c->rope_step == c->step
        && c->rope_n_rot == rp->n_rot && c->rope_base == rp->freq_base
        && c->rope_scale == rp->freq_scale
        && c->rope_factors == rp->freq_factors)
    {
        return 0;
    }
    if (need > c->rope_cs_cap) {
        float *p = llm_malloc((need ? need : 1) * sizeof(float));
        if (p == NULL) {
            return llm_cpu_fail(c, LLM_ENOMEM, "cpu: rope: out of memory");
        }
        llm_free(c->rope_cs);
        c->rope_cs = p;
        c->rope_cs_cap = need;
    }
    theta_scale = powf(rp->freq_base, -2.0f / (float) rp->n_rot);
    for (t = 0; t < b->n_tokens; t++) {
        float  theta = (float) b->pos[t];
        float *cs = c->rope_cs + (size_t) t * half * 2;

        for (i = 0; i < half; i++) {
            float th = theta;
            if (rp->freq_factors != NULL) {
                th /= rp->freq_factors[i];
            }
            th *= rp->freq_scale;
            cs[2 * i] = cosf(th);
            cs[2 * i + 1] = sinf(th);
            theta *= theta_scale;
        }
    }
    c->rope_step = c->step;
    c->rope_n_rot = rp->n_rot;
    c->rope_base = rp->freq_base;
    c->rope_scale = rp->freq_scale;
    c->rope_factors = rp->freq_factors;
    return 0;
}


typedef struct rope_job {
    llm_cpu_ctx        *c;
    llm_tensor         *x;
    int                 n_heads, head_dim, half, neox;
} rope_job;


static void
rope_task(void *arg, int ith, int nth)
{
    rope_job *j = arg;
    int64_t   t0, t1, t;
    int       h, i;

    llm_cpu_split(j->x->ne[1], ith, nth, 1, &t0, &t1);
    for (t = t0; t < t1; t++) {
        const float *cs = j->c->rope_cs + (size_t) t * j->half * 2;
        float       *row = row_f32(j->x, t);

        for (h = 0; h < j->n_heads; h++) {
            float *x = row + (size_t) h * j->head_dim;

            for (i = 0; i < j->half; i++) {
                /* neox: (x[i], x[i + n_rot/2]); else (x[2i], x[2i+1]) */
                int   a = j->neox ? i : 2 * i;
                int   b = j->neox ? i + j->half : 2 * i + 1;
                float x0 = x[a], x1 = x[b];

                x[a] = x0 * cs[2 * i] - x1 * cs[2 * i + 1];
                x[b] = x0 * cs[2 * i + 1] + x1 * cs[2 * i];
            }
        }
    }
}


int
llm_cpu_rope(llm_cpu_ctx *c, llm_tensor *x, int n_heads, int head_dim,
             const llm_rope_params *rp)
{
    rope_job j;
    int      rc;

    if ((rc = need_batch(c, "rope")) != 0) {
        return rc;
    }
    if (rp == NULL || n_heads <= 0 || head_dim <= 0 || rp->n_rot <= 0
        || rp->n_rot > head_dim || rp->n_rot % 2 != 0
        || !(rp->freq_base > 0.0f))
    {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: rope: bad parameters"
                            " (heads %d, head_dim %d, n_rot %d)", n_heads,
                            head_dim, rp ? rp->n_rot : 0);
    }
    if ((rc = check_rows(c, x, "rope", "x", (int64_t) n_heads * head_dim,
                         c->batch.n_tokens)) != 0)
    {
        return rc;
    }
    if ((rc = rope_table(c, rp)) != 0) {
        return rc;
    }
    j.c = c;
    j.x = x;
    j.n_heads = n_heads;
    j.head_dim = head_dim;
    j.half = rp->n_rot / 2;
    j.neox = rp->neox;
    run(c, rope_task, &j, x->ne[0] * x->ne[1]);
    return 0;
}


/* ------------------------------------------------------------- kv cache */

/* Bytes of one position's row (every KV head) and of a block. */
static size_t
kv_row_bytes(const llm_kv_pool *kv)
{
    return llm_kv_bytes(kv->type, (size_t) kv->n_kv_heads * kv->head_dim);
}


int
llm_cpu_check_kv(llm_cpu_ctx *c, const llm_kv_pool *kv, int layer,
                 const char *op)
{
    char msg[160];

    if (llm_kv_check_pool(kv, layer, msg, sizeof(msg)) != 0
        || llm_kv_check_batch(kv, &c->batch, msg, sizeof(msg)) != 0)
    {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: %s: %s", op, msg);
    }
    return 0;
}


/* Address of (position pos of seq s, kv head 0) in layer base. */
static uint8_t *
kv_slot(const llm_cpu_ctx *c, const llm_kv_pool *kv, uint8_t *base,
        int32_t s, int32_t pos)
{
    const llm_batch *b = &c->batch;
    int32_t          blk = b->block_table[(size_t) s * b->max_blocks
                                          + pos / kv->block_size];
    size_t           row = (size_t) blk * kv->block_size
                           + pos % kv->block_size;

    return base + row * kv_row_bytes(kv);
}


typedef struct store_job {
    llm_cpu_ctx        *c;
    const llm_kv_pool  *kv;
    uint8_t            *kbase, *vbase;
    const llm_tensor   *k, *v;
} store_job;


static void
store_task(void *arg, int ith, int nth)
{
    store_job *j = arg;
    int64_t    t0, t1, t;
    int64_t    n = (int64_t) j->kv->n_kv_heads * j->kv->head_dim;

    llm_cpu_split(j->k->ne[1], ith, nth, 1, &t0, &t1);
    for (t = t0; t < t1; t++) {
        int32_t  s = j->c->batch.tok_seq[t], p = j->c->batch.pos[t];
        uint8_t *kd = kv_slot(j->c, j->kv, j->kbase, s, p);
        uint8_t *vd = kv_slot(j->c, j->kv, j->vbase, s, p);

        if (j->kv->type == LLM_F16) {
            j->c->kern.f32_to_f16(row_f32(j->k, t), (uint16_t *) kd, n);
            j->c->kern.f32_to_f16(row_f32(j->v, t), (uint16_t *) vd, n);
        } else if (j->kv->type == LLM_Q8_0) {
            /* blocks of 32 never straddle heads: head_dim % 32 == 0 */
            j->c->kern.quant_q8_0(row_f32(j->k, t), kd, n);
            j->c->kern.quant_q8_0(row_f32(j->v, t), vd, n);
        } else {
            memcpy(kd, row_f32(j->k, t), (size_t) n * 4);
            memcpy(vd, row_f32(j->v, t), (size_t) n * 4);
        }
    }
}


int
llm_cpu_kv_store(llm_cpu_ctx *c, const llm_kv_pool *kv, int layer,
                 const llm_tensor *k, const llm_tensor *v)
{
    store_job j;
    int64_t   n;
    int       rc;

    if ((rc = need_batch(c, "kv_store")) != 0
        || (rc = llm_cpu_check_kv(c, kv, layer, "kv_store")) != 0)
    {
        return rc;
    }
    n = (int64_t) kv->n_kv_heads * kv->head_dim;
    if ((rc = check_rows(c, k, "kv_store", "k", n, c->batch.n_tokens)) != 0
        || (rc = check_rows(c, v, "kv_store", "v", n, c->batch.n_tokens))
           != 0)
    {
        return rc;
    }
    j.c = c;
    j.kv = kv;
    j.kbase = (uint8_t *) kv->k + (size_t) layer * kv->layer_bytes;
    j.vbase = (uint8_t *) kv->v + (size_t) layer * kv->layer_bytes;
    j.k = k;
    j.v = v;
    run(c, store_task, &j, 2 * n * c->batch.n_tokens);
    return 0;
}


int
llm_cpu_kv_copy_blocks(llm_cpu_ctx *c, const llm_kv_pool *kv,
                       const int32_t *src, const int32_t *dst, int n)
{
    char   msg[128];
    size_t blk_bytes;
    int    i, l;

    if (n == 0) {
        return 0;
    }
    if (n < 0 || src == NULL || dst == NULL) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: kv_copy_blocks: bad"
                            " arguments");
    }
    if (llm_kv_check_pool(kv, 0, msg, sizeof(msg)) != 0) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: kv_copy_blocks: %s", msg);
    }
    blk_bytes = (size_t) kv->block_size * kv_row_bytes(kv);
    for (i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= kv->n_blocks || dst[i] < 0
            || dst[i] >= kv->n_blocks)
        {
            return llm_cpu_fail(c, LLM_EINVAL, "cpu: kv_copy_blocks: block"
                                " %d -> %d outside the pool of %d",
                                (int) src[i], (int) dst[i], kv->n_blocks);
        }
    }
    for (l = 0; l < kv->n_layers; l++) {
        uint8_t *kb = (uint8_t *) kv->k + (size_t) l * kv->layer_bytes;
        uint8_t *vb = (uint8_t *) kv->v + (size_t) l * kv->layer_bytes;

        for (i = 0; i < n; i++) {
            if (src[i] == dst[i]) {
                continue;
            }
            memcpy(kb + (size_t) dst[i] * blk_bytes,
                   kb + (size_t) src[i] * blk_bytes, blk_bytes);
            memcpy(vb + (size_t) dst[i] * blk_bytes,
                   vb + (size_t) src[i] * blk_bytes, blk_bytes);
        }
    }
    return 0;
}


/* One block of every layer <-> host [n_layers, 2, block]: to_host 1
 * copies out of the pool, 0 into it. */
int
llm_cpu_kv_block_host(llm_cpu_ctx *c, const llm_kv_pool *kv, int32_t block,
                      void *host, int to_host)
{
    char     msg[128];
    size_t   blk_bytes;
    uint8_t *h = host;
    int      l;

    if (llm_kv_check_pool(kv, 0, msg, sizeof(msg)) != 0) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: kv_block_host: %s", msg);
    }
    if (host == NULL || block < 0 || block >= kv->n_blocks) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: kv_block_host: block %d "
                            "outside the pool of %d", (int) block,
                            kv->n_blocks);
    }
    blk_bytes = (size_t) kv->block_size * kv_row_bytes(kv);
    for (l = 0; l < kv->n_layers; l++, h += 2 * blk_bytes) {
        uint8_t *kb = (uint8_t *) kv->k + (size_t) l * kv->layer_bytes
                      + (size_t) block * blk_bytes;
        uint8_t *vb = (uint8_t *) kv->v + (size_t) l * kv->layer_bytes
                      + (size_t) block * blk_bytes;

        if (to_host) {
            memcpy(h, kb, blk_bytes);
            memcpy(h + blk_bytes, vb, blk_bytes);
        } else {
            memcpy(kb, h, blk_bytes);
            memcpy(vb, h + blk_bytes, blk_bytes);
        }
    }
    return 0;
}


/* ------------------------------------------------- silu_mul, add, gather */

typedef struct ew_job {
    llm_cpu_ctx        *c;
    llm_tensor         *out;
    const llm_tensor   *a, *b;
    int                 op;             /* 0 silu_mul, 1 add */
} ew_job;


static void
ew_task(void *arg, int ith, int nth)
{
    ew_job  *j = arg;
    int64_t  r0, r1, r, i, n = j->a->ne[0];

    llm_cpu_split(j->a->ne[1], ith, nth, 1, &r0, &r1);
    for (r = r0; r < r1; r++) {
        float       *o = row_f32(j->out, r);
        const float *a = row_f32(j->a, r);
        const float *b = row_f32(j->b, r);

        if (j->op == 0) {
            j->c->kern.silu_mul(o, a, b, n);
        } else {
            for (i = 0; i < n; i++) {
                o[i] = a[i] + b[i];
            }
        }
    }
}


static int
elementwise(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *a,
            const llm_tensor *b, int op, const char *name)
{
    ew_job j;
    int    rc;

    if ((rc = check_rows(c, a, name, op ? "a" : "gate", -1, -1)) != 0
        || (rc = check_rows(c, b, name, op ? "b" : "up", a->ne[0], a->ne[1]))
           != 0
        || (rc = check_rows(c, out, name, "out", a->ne[0], a->ne[1])) != 0)
    {
        return rc;
    }
    j.c = c;
    j.out = out;
    j.a = a;
    j.b = b;
    j.op = op;
    /* silu costs an exp: split earlier */
    run(c, ew_task, &j, a->ne[0] * a->ne[1] * (op == 0 ? 8 : 1));
    return 0;
}


int
llm_cpu_silu_mul(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *gate,
                 const llm_tensor *up)
{
    return elementwise(c, out, gate, up, 0, "silu_mul");
}


int
llm_cpu_add(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *a,
            const llm_tensor *b)
{
    return elementwise(c, out, a, b, 1, "add");
}


int
llm_cpu_gather_out_rows(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *x)
{
    const llm_batch *b = &c->batch;
    int              i, rc;

    if ((rc = need_batch(c, "gather_out_rows")) != 0
        || (rc = check_rows(c, x, "gather_out_rows", "x", -1, -1)) != 0
        || (rc = check_rows(c, out, "gather_out_rows", "out", x->ne[0],
                            b->n_out)) != 0)
    {
        return rc;
    }
    if (b->n_out > 0 && b->out_rows == NULL) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: gather_out_rows: no rows");
    }
    for (i = 0; i < b->n_out; i++) {
        if (b->out_rows[i] < 0 || b->out_rows[i] >= x->ne[1]) {
            return llm_cpu_fail(c, LLM_EINVAL, "cpu: gather_out_rows: row %d"
                                " of %lld", (int) b->out_rows[i],
                                (long long) x->ne[1]);
        }
    }
    for (i = 0; i < b->n_out; i++) {
        memmove(row_f32(out, i), row_f32(x, b->out_rows[i]),
                (size_t) x->ne[0] * 4);
    }
    return 0;
}
