/*
 * The CUDA backend: its ops table and context.  One device, one stream,
 * one cuBLAS handle bound to it.  Every op runs asynchronously on the
 * stream; download() and synchronize() wait for it.
 *
 * Weights: adopt_weights copies the bytes as they are.  Device kernels
 * read F32, F16 and BF16 only, so a block-quantized weight is expanded
 * once to F16 (BF16 where a value does not fit F16) with the reference
 * dequantizer: at load through the optional adopt_tensor hook (the
 * tensor's type changes), or else on first use by matmul/embed, kept
 * beside the original and keyed by its address (llm_cuda_weight_view).
 *
 * Nothing here ends the process: CUDA and cuBLAS failures become
 * LLM_EBACKEND with CUDA's message in error().
 */
#include "cuda_internal.cuh"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>


/* Bytes of f16 produced per host conversion chunk. */
#define CONVERT_CHUNK  ((size_t) 16 << 20)


/* ------------------------------------------------------------- helpers */

int
llm_cuda_fail(llm_cuda_ctx *c, int code, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(c->errmsg, sizeof(c->errmsg), fmt, ap);
    va_end(ap);
    return code;
}


int
llm_cuda_check(llm_cuda_ctx *c, cudaError_t e, const char *op,
               const char *what)
{
    if (e == cudaSuccess) {
        return 0;
    }
    return llm_cuda_fail(c, e == cudaErrorNotSupported ? LLM_EUNSUP
                                                       : LLM_EBACKEND,
                         "cuda: %s: %s: %s (%s)", op, what,
                         cudaGetErrorString(e), cudaGetErrorName(e));
}


void *
llm_cuda_buf_get(llm_cuda_ctx *c, llm_cuda_buf *b, size_t n, const char *op)
{
    cudaError_t e;
    void       *p = NULL;

    if (n <= b->size && b->p != NULL) {
        return b->p;
    }
    n += n / 4;                             /* grow with some slack */
    n = n < 256 ? 256 : n;
    /* kernels queued earlier may still read the old buffer */
    e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) {
        llm_cuda_check(c, e, op, "synchronize before growing a buffer");
        return NULL;
    }
    cudaFree(b->p);
    b->p = NULL;
    b->size = 0;
    e = cudaMalloc(&p, n);
    if (e != cudaSuccess) {
        cudaGetLastError();                 /* not sticky: clear it */
        llm_cuda_fail(c, LLM_ENOMEM, "cuda: %s: scratch of %zu bytes: %s",
                      op, n, cudaGetErrorString(e));
        return NULL;
    }
    b->p = p;
    b->size = n;
    return p;
}


void
llm_cuda_buf_free(llm_cuda_buf *b)
{
    if (b->p != NULL) {
        cudaFree(b->p);
    }
    b->p = NULL;
    b->size = 0;
}


int
llm_cuda_stage_upload(llm_cuda_ctx *c, llm_cuda_stage *s, llm_cuda_buf *dst,
                      const void *src, size_t n, const char *op)
{
    cudaError_t e;
    int         rc;

    if (n == 0) {
        return 0;
    }
    if (s->pending) {
        /* the previous copy out of the pinned buffer must have run */
        if ((rc = llm_cuda_check(c, cudaEventSynchronize(s->done), op,
                                 "wait for the previous upload")) != 0)
        {
            return rc;
        }
        s->pending = 0;
    }
    if (n > s->size) {
        size_t want = n + n / 4;
        void  *h = NULL;

        if (s->host != NULL) {
            cudaFreeHost(s->host);
            s->host = NULL;
            s->size = 0;
        }
        e = cudaMallocHost(&h, want);
        if (e != cudaSuccess) {
            cudaGetLastError();
            return llm_cuda_fail(c, LLM_ENOMEM, "cuda: %s: pinned buffer of"
                                 " %zu bytes: %s", op, want,
                                 cudaGetErrorString(e));
        }
        s->host = h;
        s->size = want;
    }
    if (llm_cuda_buf_get(c, dst, n, op) == NULL) {
        return LLM_ENOMEM;
    }
    memcpy(s->host, src, n);
    if ((rc = llm_cuda_check(c, cudaMemcpyAsync(dst->p, s->host, n,
                                                cudaMemcpyHostToDevice,
                                                c->stream), op, "upload"))
        != 0)
    {
        return rc;
    }
    if ((rc = llm_cuda_check(c, cudaEventRecord(s->done, c->stream), op,
                             "record upload")) != 0)
    {
        return rc;
    }
    s->pending = 1;
    return 0;
}


void
llm_cuda_stage_free(llm_cuda_stage *s)
{
    if (s->pending) {
        cudaEventSynchronize(s->done);
    }
    if (s->host != NULL) {
        cudaFreeHost(s->host);
    }
    if (s->done != NULL) {
        cudaEventDestroy(s->done);
    }
    memset(s, 0, sizeof(*s));
}


int
llm_cuda_check_f32(llm_cuda_ctx *c, const llm_tensor *t, const char *op,
                   const char *what, int64_t cols, int64_t rows)
{
    if (t == NULL || (t->data == NULL && t->ne[1] > 0 && t->ne[0] > 0)) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: %s is NULL", op, what);
    }
    if (t->type != LLM_F32) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: %s must be F32", op,
                             what);
    }
    if ((cols >= 0 && t->ne[0] != cols) || (rows >= 0 && t->ne[1] != rows)
        || t->ne[0] < 0 || t->ne[1] < 0 || t->ne[0] > INT32_MAX
        || t->ne[1] > INT32_MAX
        || (t->ne[1] > 1 && t->nb < (size_t) t->ne[0] * 4)
        || t->nb % 4 != 0 || (uintptr_t) t->data % 4 != 0)
    {
        return llm_cuda_fail(c, LLM_EINVAL,
                             "cuda: %s: %s is [%lld, %lld] (row %zu bytes),"
                             " expected [%lld, %lld] F32", op, what,
                             (long long) t->ne[1], (long long) t->ne[0],
                             t->nb, (long long) rows, (long long) cols);
    }
    return 0;
}


int
llm_cuda_need_batch(llm_cuda_ctx *c, const char *op)
{
    if (!c->have_batch) {
        return llm_cuda_fail(c, LLM_ESTATE, "cuda: %s: no batch set", op);
    }
    return 0;
}


/* The shared KV checks (backend.c) on the host copy of the batch, plus
 * this backend's alignment rule. */
int
llm_cuda_check_kv(llm_cuda_ctx *c, const llm_kv_pool *kv, int layer,
                  const char *op)
{
    char msg[160];

    if (llm_kv_check_pool(kv, layer, msg, sizeof(msg)) != 0) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: %s", op, msg);
    }
    if (kv->type == LLM_Q8_0) {     /* ops.kv_q8_0 is 0 */
        return llm_cuda_fail(c, LLM_EUNSUP, "cuda: %s: Q8_0 KV pages are "
                             "not implemented", op);
    }
    if ((uintptr_t) kv->k % 16 != 0 || (uintptr_t) kv->v % 16 != 0
        || kv->layer_bytes % 16 != 0)
    {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: KV pool is not 16-byte"
                             " aligned", op);
    }
    /* the token walk once per step and pool geometry */
    if (c->kv_ok_step == c->step && c->kv_ok_block_size == kv->block_size
        && c->kv_ok_n_blocks == kv->n_blocks)
    {
        return 0;
    }
    if (c->batch.n_tokens > 0 && c->d_block_table == NULL) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: batch has no block"
                             " table", op);
    }
    if (llm_kv_check_batch(kv, &c->batch, msg, sizeof(msg)) != 0) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: %s", op, msg);
    }
    c->kv_ok_step = c->step;
    c->kv_ok_block_size = kv->block_size;
    c->kv_ok_n_blocks = kv->n_blocks;
    return 0;
}


/* ------------------------------------------------------------- weights */

static llm_cuda_weight *
weight_add(llm_cuda_ctx *c, void *key, size_t bytes, int owned)
{
    llm_cuda_weight *w;

    if (c->n_weights == c->cap_weights) {
        int   cap = c->cap_weights ? 2 * c->cap_weights : 64;
        void *p = llm_realloc(c->weights, sizeof(*w) * (size_t) cap);

        if (p == NULL) {
            llm_cuda_fail(c, LLM_ENOMEM, "cuda: out of host memory");
            return NULL;
        }
        c->weights = (llm_cuda_weight *) p;
        c->cap_weights = cap;
    }
    w = &c->weights[c->n_weights++];
    memset(w, 0, sizeof(*w));
    w->key = key;
    w->bytes = bytes;
    w->owned = owned;
    w->src_type = -1;
    return w;
}


/* The entry whose buffer holds address p, or NULL.  Lookups come in the
 * order of the forward pass: start from the last hit. */
static llm_cuda_weight *
weight_find(llm_cuda_ctx *c, const void *p)
{
    int i, k, n = c->n_weights;

    for (k = 0; k < n; k++) {
        llm_cuda_weight *w;

        i = (c->weight_hint + k) % n;
        w = &c->weights[i];
        if ((const uint8_t *) p == (const uint8_t *) w->key
            || ((const uint8_t *) p > (const uint8_t *) w->key
                && (const uint8_t *) p < (const uint8_t *) w->key + w->bytes))
        {
            c->weight_hint = i;
            return w;
        }
    }
    return NULL;
}


static void
weight_drop_conv(llm_cuda_weight *w)
{
    if (w->conv != NULL) {
        cudaFree(w->conv);
    }
    w->conv = NULL;
    w->src_type = -1;
}


static void
weight_remove(llm_cuda_ctx *c, llm_cuda_weight *w)
{
    weight_drop_conv(w);
    *w = c->weights[--c->n_weights];
    c->weight_hint = 0;
}


int
llm_cuda_dequant_upload(llm_cuda_ctx *c, const void *host, int type,
                        int64_t cols, int64_t rows, size_t nb, void **out,
                        int *out_type, const char *op)
{
    size_t    row16 = (size_t) cols * 2;
    int64_t   chunk_rows, r0, r, i;
    float    *f = NULL;
    uint16_t *h = NULL;
    void     *d = NULL;
    int       to = LLM_F16, rc = 0;

    *out = NULL;
    if (cols <= 0 || rows <= 0 || llm_row_bytes(type, cols) == 0
        || nb < llm_row_bytes(type, cols))
    {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: cannot expand a [%lld,"
                             " %lld] tensor of type %d", op,
                             (long long) rows, (long long) cols, type);
    }
    chunk_rows = (int64_t) (CONVERT_CHUNK / row16);
    chunk_rows = chunk_rows < 1 ? 1 : chunk_rows;
    chunk_rows = chunk_rows > rows ? rows : chunk_rows;
    f = (float *) llm_malloc(sizeof(float) * (size_t) cols);
    h = (uint16_t *) llm_malloc(row16 * (size_t) chunk_rows);
    if (f == NULL || h == NULL) {
        rc = llm_cuda_fail(c, LLM_ENOMEM, "cuda: %s: out of host memory", op);
        goto done;
    }
    if (cudaMalloc(&d, row16 * (size_t) rows) != cudaSuccess) {
        cudaGetLastError();
        d = NULL;
        rc = llm_cuda_fail(c, LLM_ENOMEM, "cuda: %s: cannot allocate %zu"
                           " bytes for a dequantized weight", op,
                           row16 * (size_t) rows);
        goto done;
    }

again:
    for (r0 = 0; r0 < rows; r0 += chunk_rows) {
        int64_t n = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;

        for (r = 0; r < n; r++) {
            const uint8_t *src = (const uint8_t *) host
                                 + (size_t) (r0 + r) * nb;
            uint16_t      *dst = h + (size_t) r * (size_t) cols;

            if (llm_dequantize_row(type, src, f, cols) != 0) {
                rc = llm_cuda_fail(c, LLM_EUNSUP, "cuda: %s: cannot"
                                   " dequantize type %d", op, type);
                goto done;
            }
            for (i = 0; i < cols; i++) {
                if (to == LLM_F16) {
                    if (fabsf(f[i]) > 65504.0f && isfinite(f[i])) {
                        to = LLM_BF16;      /* out of F16's range */
                        goto again;
                    }
                    dst[i] = llm_f32_to_f16(f[i]);
                } else {
                    dst[i] = llm_f32_to_bf16(f[i]);
                }
            }
        }
        /* synchronous: h is refilled next */
        if ((rc = llm_cuda_check(c, cudaMemcpyAsync((uint8_t *) d
                                                    + (size_t) r0 * row16,
                                                    h, row16 * (size_t) n,
                                                    cudaMemcpyHostToDevice,
                                                    c->stream),
                                 op, "upload dequantized weight")) != 0
            || (rc = llm_cuda_check(c, cudaStreamSynchronize(c->stream), op,
                                    "upload dequantized weight")) != 0)
        {
            goto done;
        }
    }
    *out = d;
    *out_type = to;
    d = NULL;

done:
    if (d != NULL) {
        cudaFree(d);
    }
    llm_free(f);
    llm_free(h);
    return rc;
}


int
llm_cuda_weight_view(llm_cuda_ctx *c, const llm_tensor *w, llm_tensor *view,
                     const char *op)
{
    const llm_dtype_info *ti = llm_dtype_get(w->type);
    llm_cuda_weight      *e;
    size_t                off, bytes;
    int64_t               rows;
    void                 *host = NULL;
    int                   rc;

    if (ti == NULL) {
        return llm_cuda_fail(c, LLM_EUNSUP, "cuda: %s: weight type %d not"
                             " supported", op, w->type);
    }
    if (!ti->is_quant) {
        *view = *w;
        return 0;
    }
    if (w->data == NULL || w->nb == 0 || w->ne[1] <= 0) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: empty %s weight", op,
                             ti->name);
    }

    e = weight_find(c, w->data);
    if (e == NULL) {
        e = weight_add(c, w->data, w->nb * (size_t) w->ne[1], 0);
        if (e == NULL) {
            return LLM_ENOMEM;
        }
    }
    bytes = e->bytes ? e->bytes : w->nb * (size_t) w->ne[1];
    off = (size_t) ((const uint8_t *) w->data - (const uint8_t *) e->key);
    if (off % w->nb != 0
        || off / w->nb + (size_t) w->ne[1] > bytes / w->nb)
    {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: %s weight view at"
                             " byte %zu of a %zu byte buffer", op, ti->name,
                             off, bytes);
    }
    rows = (int64_t) (bytes / w->nb);

    if (e->conv == NULL || e->src_type != w->type || e->cols != w->ne[0]
        || e->src_nb != w->nb || e->rows != rows)
    {
        /* first use: expand the whole buffer from its device bytes */
        weight_drop_conv(e);
        host = llm_malloc(w->nb * (size_t) rows);
        if (host == NULL) {
            return llm_cuda_fail(c, LLM_ENOMEM, "cuda: %s: out of host"
                                 " memory", op);
        }
        rc = llm_cuda_check(c, cudaMemcpyAsync(host, e->key,
                                               w->nb * (size_t) rows,
                                               cudaMemcpyDeviceToHost,
                                               c->stream), op,
                            "read quantized weight");
        if (rc == 0) {
            rc = llm_cuda_check(c, cudaStreamSynchronize(c->stream), op,
                                "read quantized weight");
        }
        if (rc == 0) {
            rc = llm_cuda_dequant_upload(c, host, w->type, w->ne[0], rows,
                                         w->nb, &e->conv, &e->conv_type, op);
        }
        llm_free(host);
        if (rc != 0) {
            e->conv = NULL;
            return rc;
        }
        e->src_type = w->type;
        e->cols = w->ne[0];
        e->rows = rows;
        e->src_nb = w->nb;
    }

    *view = *w;
    view->type = e->conv_type;
    view->nb = (size_t) w->ne[0] * 2;
    view->data = (uint8_t *) e->conv + off / w->nb * view->nb;
    return 0;
}


/* ---------------------------------------------------------------- ops */

static llm_cuda_ctx *
ctx_of(llm_backend *be)
{
    return (llm_cuda_ctx *) be->ctx;
}


/* Ops may be called from another thread than the one that made the
 * backend: make its device current there. */
static int
enter(llm_cuda_ctx *c, const char *op)
{
    return llm_cuda_check(c, cudaSetDevice(c->device), op, "cudaSetDevice");
}


static void
cuda_free(llm_backend *be)
{
    llm_cuda_ctx *c;
    int           i;

    if (be == NULL) {
        return;
    }
    c = ctx_of(be);
    if (c != NULL) {
        cudaSetDevice(c->device);
        if (c->stream != NULL) {
            cudaStreamSynchronize(c->stream);
        }
        for (i = 0; i < c->n_weights; i++) {
            weight_drop_conv(&c->weights[i]);
            if (c->weights[i].owned) {
                cudaFree(c->weights[i].key);
            }
        }
        llm_free(c->weights);
        llm_cuda_stage_free(&c->batch_stage);
        llm_cuda_stage_free(&c->misc_stage);
        llm_cuda_stage_free(&c->plan.stage);
        llm_cuda_buf_free(&c->d_batch);
        llm_cuda_buf_free(&c->plan.dev);
        llm_cuda_buf_free(&c->mm_scratch);
        llm_cuda_buf_free(&c->lora_scratch);
        llm_cuda_buf_free(&c->attn_scratch);
        llm_cuda_buf_free(&c->misc_scratch);
        llm_cuda_buf_free(&c->copy_ids);
        llm_free(c->plan.host);
        if (c->blas != NULL) {
            cublasDestroy(c->blas);
        }
        if (c->stream != NULL) {
            cudaStreamDestroy(c->stream);
        }
        cudaGetLastError();
        llm_free(c);
    }
    llm_free(be);
}


static const char *
cuda_error(llm_backend *be)
{
    return ctx_of(be)->errmsg;
}


static void *
cuda_alloc(llm_backend *be, size_t bytes)
{
    llm_cuda_ctx *c = ctx_of(be);
    void         *p = NULL;
    cudaError_t   e;

    if (enter(c, "alloc") != 0) {
        return NULL;
    }
    e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();
        llm_cuda_fail(c, LLM_ENOMEM, "cuda: alloc of %zu bytes: %s", bytes,
                      cudaGetErrorString(e));
        return NULL;
    }
    return p;
}


static void
cuda_release(llm_backend *be, void *data)
{
    llm_cuda_ctx    *c = ctx_of(be);
    llm_cuda_weight *w;
    int              i;

    if (data == NULL || enter(c, "release") != 0) {
        return;
    }
    /* kernels queued earlier may still use it */
    cudaStreamSynchronize(c->stream);
    for (i = 0; i < c->n_weights; i++) {
        w = &c->weights[i];
        if (w->key == data) {
            weight_remove(c, w);
            break;
        }
    }
    cudaFree(data);
}


/* A write into a buffer that has a dense copy makes the copy stale. */
static void
invalidate(llm_cuda_ctx *c, void *dst, size_t n)
{
    const uint8_t *d0 = (const uint8_t *) dst, *d1 = d0 + n;
    int            i;

    for (i = 0; i < c->n_weights; i++) {
        llm_cuda_weight *w = &c->weights[i];
        const uint8_t   *k0 = (const uint8_t *) w->key;
        const uint8_t   *k1 = k0 + (w->bytes ? w->bytes : 1);

        if (w->conv != NULL && k0 < d1 && d0 < k1) {
            weight_drop_conv(w);
        }
    }
}


static int
cuda_upload(llm_backend *be, void *dst, const void *host, size_t n)
{
    llm_cuda_ctx *c = ctx_of(be);
    int           rc;

    if (n == 0) {
        return 0;
    }
    if (dst == NULL || host == NULL) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: upload: NULL");
    }
    if ((rc = enter(c, "upload")) != 0) {
        return rc;
    }
    invalidate(c, dst, n);
    /* ordered after queued work; synchronous so host may change after */
    if ((rc = llm_cuda_check(c, cudaMemcpyAsync(dst, host, n,
                                                cudaMemcpyHostToDevice,
                                                c->stream), "upload",
                             "cudaMemcpyAsync")) != 0)
    {
        return rc;
    }
    return llm_cuda_check(c, cudaStreamSynchronize(c->stream), "upload",
                          "synchronize (an earlier op may have failed)");
}


static int
cuda_download(llm_backend *be, void *host, const void *src, size_t n)
{
    llm_cuda_ctx *c = ctx_of(be);
    int           rc;

    if (n == 0) {
        return 0;
    }
    if (src == NULL || host == NULL) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: download: NULL");
    }
    if ((rc = enter(c, "download")) != 0
        || (rc = llm_cuda_check(c, cudaMemcpyAsync(host, src, n,
                                                   cudaMemcpyDeviceToHost,
                                                   c->stream), "download",
                                "cudaMemcpyAsync")) != 0)
    {
        return rc;
    }
    return llm_cuda_check(c, cudaStreamSynchronize(c->stream), "download",
                          "synchronize (an earlier op may have failed)");
}


static int
cuda_adopt_weights(llm_backend *be, const void *host, size_t n, void **out)
{
    llm_cuda_ctx *c = ctx_of(be);
    void         *p;
    int           rc;

    *out = NULL;
    p = cuda_alloc(be, n);
    if (p == NULL) {
        return LLM_ENOMEM;
    }
    if ((rc = cuda_upload(be, p, host, n)) != 0) {
        cudaFree(p);
        return rc;
    }
    if (weight_add(c, p, n, 1) == NULL) {
        cudaFree(p);
        return LLM_ENOMEM;
    }
    *out = p;
    return 0;
}


static int
cuda_adopt_tensor(llm_backend *be, llm_tensor *t, const void *host, size_t n)
{
    llm_cuda_ctx          *c = ctx_of(be);
    const llm_dtype_info  *ti;
    size_t                 rb;
    void                  *p = NULL;
    int                    rc, to;

    if (t == NULL || host == NULL) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: adopt_tensor: NULL");
    }
    ti = llm_dtype_get(t->type);
    rb = ti != NULL ? llm_row_bytes(t->type, t->ne[0]) : 0;
    if (ti == NULL || t->ne[0] <= 0 || t->ne[1] <= 0 || rb == 0) {
        /* nothing to expand: plain bytes */
        if ((rc = cuda_adopt_weights(be, host, n, &p)) != 0) {
            return rc;
        }
        t->data = p;
        return 0;
    }
    if (t->nb == 0) {
        t->nb = rb;
    }
    if (t->nb < rb || n < t->nb * (size_t) (t->ne[1] - 1) + rb) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: adopt_tensor: %zu bytes"
                             " for [%lld, %lld] %s", n,
                             (long long) t->ne[1], (long long) t->ne[0],
                             ti->name);
    }
    if (!ti->is_quant) {
        if ((rc = cuda_adopt_weights(be, host, n, &p)) != 0) {
            return rc;
        }
        t->data = p;
        return 0;
    }
    if ((rc = enter(c, "adopt_tensor")) != 0
        || (rc = llm_cuda_dequant_upload(c, host, t->type, t->ne[0],
                                         t->ne[1], t->nb, &p, &to,
                                         "adopt_tensor")) != 0)
    {
        return rc;
    }
    if (weight_add(c, p, (size_t) t->ne[0] * 2 * (size_t) t->ne[1], 1)
        == NULL)
    {
        cudaFree(p);
        return LLM_ENOMEM;
    }
    t->data = p;
    t->type = to;
    t->nb = (size_t) t->ne[0] * 2;
    return 0;
}


static int
cuda_synchronize(llm_backend *be)
{
    llm_cuda_ctx *c = ctx_of(be);
    int           rc;

    if ((rc = enter(c, "synchronize")) != 0) {
        return rc;
    }
    return llm_cuda_check(c, cudaStreamSynchronize(c->stream), "synchronize",
                          "cudaStreamSynchronize");
}


static int
cuda_mem_info(llm_backend *be, size_t *free_bytes, size_t *total_bytes)
{
    llm_cuda_ctx *c = ctx_of(be);
    size_t        f = 0, t = 0;
    int           rc;

    if ((rc = enter(c, "mem_info")) != 0
        || (rc = llm_cuda_check(c, cudaMemGetInfo(&f, &t), "mem_info",
                                "cudaMemGetInfo")) != 0)
    {
        return rc;
    }
    if (free_bytes != NULL) {
        *free_bytes = f;
    }
    if (total_bytes != NULL) {
        *total_bytes = t;
    }
    return 0;
}


/* Checks the batch as the CPU backend does and uploads its index arrays
 * in one copy: tokens, pos, tok_seq, block_table, out_rows. */
static int
cuda_set_batch(llm_backend *be, const llm_batch *b)
{
    llm_cuda_ctx *c = ctx_of(be);
    size_t        T, nbt, nout, total, o;
    int32_t      *pack;
    const int32_t *base;
    int           rc;

    c->have_batch = 0;
    c->d_tokens = c->d_pos = c->d_tok_seq = NULL;
    c->d_block_table = c->d_out_rows = NULL;
    if (b == NULL || b->n_tokens < 0 || b->n_seqs < 0 || b->n_out < 0
        || (b->n_tokens > 0 && (b->tokens == NULL || b->pos == NULL
                                || b->tok_seq == NULL)))
    {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: set_batch: bad batch");
    }
    if ((rc = enter(c, "set_batch")) != 0) {
        return rc;
    }
    T = (size_t) b->n_tokens;
    nbt = b->block_table != NULL && b->max_blocks > 0
          ? (size_t) b->n_seqs * (size_t) b->max_blocks : 0;
    nout = b->out_rows != NULL ? (size_t) b->n_out : 0;
    total = 3 * T + nbt + nout;

    c->batch = *b;
    c->step++;
    if (total > 0) {
        /* packed in host memory first: one copy through the stage */
        pack = (int32_t *) llm_malloc(total * sizeof(int32_t));
        if (pack == NULL) {
            return llm_cuda_fail(c, LLM_ENOMEM, "cuda: set_batch: out of"
                                 " host memory");
        }
        memcpy(pack, b->tokens, T * 4);
        memcpy(pack + T, b->pos, T * 4);
        memcpy(pack + 2 * T, b->tok_seq, T * 4);
        o = 3 * T;
        if (nbt > 0) {
            memcpy(pack + o, b->block_table, nbt * 4);
        }
        if (nout > 0) {
            memcpy(pack + o + nbt, b->out_rows, nout * 4);
        }
        rc = llm_cuda_stage_upload(c, &c->batch_stage, &c->d_batch, pack,
                                   total * sizeof(int32_t), "set_batch");
        llm_free(pack);
        if (rc != 0) {
            return rc;
        }
        base = (const int32_t *) c->d_batch.p;
        c->d_tokens = base;
        c->d_pos = base + T;
        c->d_tok_seq = base + 2 * T;
        c->d_block_table = nbt > 0 ? base + 3 * T : NULL;
        c->d_out_rows = nout > 0 ? base + 3 * T + nbt : NULL;
    }
    c->have_batch = 1;
    return 0;
}


#define OP_ENTER(be, name)                                                  \
    llm_cuda_ctx *c = ctx_of(be);                                           \
    int           rc_ = enter(c, name);                                     \
    if (rc_ != 0) {                                                         \
        return rc_;                                                         \
    }


static int
cuda_embed(llm_backend *be, llm_tensor *out, const llm_tensor *table)
{
    OP_ENTER(be, "embed");
    return llm_cuda_embed(c, out, table);
}


static int
cuda_rmsnorm(llm_backend *be, llm_tensor *out, const llm_tensor *x,
             const llm_tensor *w, float eps)
{
    OP_ENTER(be, "rmsnorm");
    return llm_cuda_rmsnorm(c, out, x, w, eps);
}


static int
cuda_matmul(llm_backend *be, llm_tensor *out, const llm_tensor *x,
            const llm_tensor *w, const llm_tensor *bias)
{
    OP_ENTER(be, "matmul");
    return llm_cuda_matmul(c, out, x, w, bias);
}


static int
cuda_matmul_n(llm_backend *be, llm_tensor *const *outs, const llm_tensor *x,
              const llm_tensor *const *ws, const llm_tensor *const *biases,
              int n)
{
    OP_ENTER(be, "matmul_n");
    return llm_cuda_matmul_n(c, outs, x, ws, biases, n);
}


static int
cuda_rope(llm_backend *be, llm_tensor *x, int n_heads, int head_dim,
          const llm_rope_params *rp)
{
    OP_ENTER(be, "rope");
    return llm_cuda_rope(c, x, n_heads, head_dim, rp);
}


static int
cuda_kv_store(llm_backend *be, const llm_kv_pool *kv, int layer,
              const llm_tensor *k, const llm_tensor *v)
{
    OP_ENTER(be, "kv_store");
    return llm_cuda_kv_store(c, kv, layer, k, v);
}


static int
cuda_attention(llm_backend *be, llm_tensor *out, const llm_tensor *q,
               const llm_kv_pool *kv, int layer, int n_heads, float scale)
{
    OP_ENTER(be, "attention");
    return llm_cuda_attention(c, out, q, kv, layer, n_heads, scale);
}


static int
cuda_silu_mul(llm_backend *be, llm_tensor *out, const llm_tensor *gate,
              const llm_tensor *up)
{
    OP_ENTER(be, "silu_mul");
    return llm_cuda_silu_mul(c, out, gate, up);
}


static int
cuda_add(llm_backend *be, llm_tensor *out, const llm_tensor *a,
         const llm_tensor *b)
{
    OP_ENTER(be, "add");
    return llm_cuda_add(c, out, a, b);
}


static int
cuda_gather_out_rows(llm_backend *be, llm_tensor *out, const llm_tensor *x)
{
    OP_ENTER(be, "gather_out_rows");
    return llm_cuda_gather_out_rows(c, out, x);
}


static int
cuda_lora(llm_backend *be, llm_tensor *const *outs, int n_outs,
          const llm_tensor *x, const llm_lora_seg *segs, int n_segs)
{
    OP_ENTER(be, "lora");
    return llm_cuda_lora(c, outs, n_outs, x, segs, n_segs);
}


static int
cuda_kv_copy_blocks(llm_backend *be, const llm_kv_pool *kv,
                    const int32_t *src, const int32_t *dst, int n)
{
    OP_ENTER(be, "kv_copy_blocks");
    return llm_cuda_kv_copy_blocks(c, kv, src, dst, n);
}


static int
cuda_kv_block_to_host(llm_backend *be, const llm_kv_pool *kv, int32_t block,
                      void *host)
{
    OP_ENTER(be, "kv_block_to_host");
    return llm_cuda_kv_block_host(c, kv, block, host, 1);
}


static int
cuda_kv_block_from_host(llm_backend *be, const llm_kv_pool *kv,
                        int32_t block, const void *host)
{
    OP_ENTER(be, "kv_block_from_host");
    return llm_cuda_kv_block_host(c, kv, block, (void *) host, 0);
}


/* Filled by name at load time: robust to fields added to the table. */
static llm_backend_ops
make_ops(void)
{
    llm_backend_ops o;

    memset(&o, 0, sizeof(o));
    o.name = "cuda";
    o.free = cuda_free;
    o.error = cuda_error;
    o.alloc = cuda_alloc;
    o.release = cuda_release;
    o.upload = cuda_upload;
    o.download = cuda_download;
    o.adopt_weights = cuda_adopt_weights;
    o.synchronize = cuda_synchronize;
    o.set_batch = cuda_set_batch;
    o.embed = cuda_embed;
    o.rmsnorm = cuda_rmsnorm;
    o.matmul = cuda_matmul;
    o.matmul_n = cuda_matmul_n;
    o.rope = cuda_rope;
    o.kv_store = cuda_kv_store;
    o.attention = cuda_attention;
    o.silu_mul = cuda_silu_mul;
    o.add = cuda_add;
    o.gather_out_rows = cuda_gather_out_rows;
    o.lora = cuda_lora;
    o.lora_f16 = 1;             /* lora.cu: f16 and int8 with B^T */
    o.lora_i8 = 1;
    o.kv_copy_blocks = cuda_kv_copy_blocks;
    o.kv_block_to_host = cuda_kv_block_to_host;
    o.kv_block_from_host = cuda_kv_block_from_host;
    o.adopt_tensor = cuda_adopt_tensor;
    o.mem_info = cuda_mem_info;
    return o;
}


static const llm_backend_ops cuda_ops = make_ops();


/* ---------------------------------------------------------- creation */

extern "C" llm_backend *
llm_backend_cuda_new(int device, llm_err *err)
{
    llm_backend    *be;
    llm_cuda_ctx   *c;
    cudaDeviceProp  prop;
    cudaError_t     e;
    cublasStatus_t  s;
    int             n = 0, v = 0;

    e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        cudaGetLastError();
        llm_err_set(err, LLM_ENOTFOUND, "no CUDA device: cudaGetDeviceCount:"
                    " %s%s", e != cudaSuccess ? cudaGetErrorString(e)
                                              : "no device found",
                    e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice
                    ? "; no usable NVIDIA GPU and driver on this machine"
                    : "");
        return NULL;
    }
    if (device < 0 || device >= n) {
        llm_err_set(err, LLM_ENOTFOUND, "no CUDA device cuda:%d (%d device%s"
                    " present)", device, n, n == 1 ? "" : "s");
        return NULL;
    }
    e = cudaSetDevice(device);
    if (e == cudaSuccess) {
        e = cudaFree(0);                    /* creates the context now */
    }
    if (e != cudaSuccess) {
        cudaGetLastError();
        llm_err_set(err, LLM_EBACKEND, "cuda:%d: cannot use the device: %s",
                    device, cudaGetErrorString(e));
        return NULL;
    }
    e = cudaGetDeviceProperties(&prop, device);
    if (e != cudaSuccess) {
        llm_err_set(err, LLM_EBACKEND, "cuda:%d: cudaGetDeviceProperties: %s",
                    device, cudaGetErrorString(e));
        return NULL;
    }
    if (prop.major < 8) {
        llm_err_set(err, LLM_EUNSUP, "cuda:%d: %s has compute capability"
                    " %d.%d; the CUDA backend needs 8.0 or later", device,
                    prop.name, prop.major, prop.minor);
        return NULL;
    }

    be = (llm_backend *) llm_calloc(1, sizeof(*be));
    c = (llm_cuda_ctx *) llm_calloc(1, sizeof(*c));
    if (be == NULL || c == NULL) {
        llm_free(be);
        llm_free(c);
        llm_err_set(err, LLM_ENOMEM, "cuda backend: out of memory");
        return NULL;
    }
    be->ops = &cuda_ops;
    be->ctx = c;
    c->device = device;
    c->cc_major = prop.major;
    c->cc_minor = prop.minor;
    snprintf(c->name, sizeof(c->name), "%s", prop.name);
    c->n_sm = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                               device) == cudaSuccess && v > 0)
    {
        c->smem_optin = (size_t) v;
    } else {
        c->smem_optin = 48 * 1024;
    }
    c->attn_mode = LLM_CUDA_ATTN_AUTO;

    e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        c->stream = NULL;
        llm_err_set(err, LLM_EBACKEND, "cuda:%d: cudaStreamCreate: %s",
                    device, cudaGetErrorString(e));
        cuda_free(be);
        return NULL;
    }
    e = cudaEventCreateWithFlags(&c->batch_stage.done,
                                 cudaEventDisableTiming);
    if (e == cudaSuccess) {
        e = cudaEventCreateWithFlags(&c->misc_stage.done,
                                     cudaEventDisableTiming);
    }
    if (e == cudaSuccess) {
        e = cudaEventCreateWithFlags(&c->plan.stage.done,
                                     cudaEventDisableTiming);
    }
    if (e != cudaSuccess) {
        llm_err_set(err, LLM_EBACKEND, "cuda:%d: cudaEventCreate: %s",
                    device, cudaGetErrorString(e));
        cuda_free(be);
        return NULL;
    }
    s = cublasCreate(&c->blas);
    if (s != CUBLAS_STATUS_SUCCESS) {
        c->blas = NULL;
        llm_err_set(err, LLM_EBACKEND, "cuda:%d: cublasCreate: %s", device,
                    cublasGetStatusString(s));
        cuda_free(be);
        return NULL;
    }
    s = cublasSetStream(c->blas, c->stream);
    if (s == CUBLAS_STATUS_SUCCESS) {
        /* plain FP32 for F32 weights: no TF32 unless asked */
        s = cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH);
    }
    if (s != CUBLAS_STATUS_SUCCESS) {
        llm_err_set(err, LLM_EBACKEND, "cuda:%d: cuBLAS setup: %s", device,
                    cublasGetStatusString(s));
        cuda_free(be);
        return NULL;
    }
    return be;
}


/* ------------------------------------------------------------ cuda.h */

extern "C" int
llm_backend_is_cuda(const llm_backend *be)
{
    return be != NULL && be->ops == &cuda_ops;
}


extern "C" int
llm_cuda_set_attn_mode(llm_backend *be, int mode)
{
    if (!llm_backend_is_cuda(be) || mode < LLM_CUDA_ATTN_AUTO
        || mode > LLM_CUDA_ATTN_TILED)
    {
        return LLM_EINVAL;
    }
    ctx_of(be)->attn_mode = mode;
    ctx_of(be)->plan.step = 0;              /* rebuild the plan */
    return 0;
}


extern "C" int
llm_cuda_describe(llm_backend *be, char *buf, size_t size)
{
    llm_cuda_ctx *c;
    size_t        f = 0, t = 0;

    if (!llm_backend_is_cuda(be) || buf == NULL || size == 0) {
        return LLM_EINVAL;
    }
    c = ctx_of(be);
    cuda_mem_info(be, &f, &t);
    snprintf(buf, size, "cuda:%d %s, compute %d.%d, %d SMs, %.1f GiB free"
             " of %.1f GiB", c->device, c->name, c->cc_major, c->cc_minor,
             c->n_sm, (double) f / (1 << 30), (double) t / (1 << 30));
    return 0;
}
