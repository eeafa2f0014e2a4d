/*
 * The CPU backend: its ops table and context.  Memory is plain host memory
 * (64-byte aligned); weights are used in place, still quantized; every op
 * runs on the backend's thread pool with the instruction set chosen at
 * creation (cpu_features.c).
 */
#include "cpu.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>


/* ------------------------------------------------------------- helpers */

void *
llm_cpu_aligned_alloc(size_t n)
{
    uint8_t   *raw, *p;
    uintptr_t  a;

    if (n > SIZE_MAX - 64 - sizeof(void *)) {
        return NULL;
    }
    raw = llm_malloc(n + 64 + sizeof(void *));
    if (raw == NULL) {
        return NULL;
    }
    a = ((uintptr_t) raw + sizeof(void *) + 63) & ~(uintptr_t) 63;
    p = (uint8_t *) a;
    memcpy(p - sizeof(void *), &raw, sizeof(void *));
    return p;
}


void
llm_cpu_aligned_free(void *p)
{
    void *raw;

    if (p != NULL) {
        memcpy(&raw, (uint8_t *) p - sizeof(void *), sizeof(void *));
        llm_free(raw);
    }
}


int
llm_cpu_fail(llm_cpu_ctx *c, int code, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(c->errmsg, sizeof(c->errmsg), fmt, ap);
    va_end(ap);
    return code;
}


void *
llm_cpu_scratch(llm_cpu_ctx *c, size_t n)
{
    void *p;

    if (n <= c->scratch_size) {
        return c->scratch;
    }
    n += n / 4;                         /* grow with some slack */
    p = llm_cpu_aligned_alloc(n);
    if (p == NULL) {
        llm_cpu_fail(c, LLM_ENOMEM, "cpu: scratch of %zu bytes: out of memory",
                     n);
        return NULL;
    }
    llm_cpu_aligned_free(c->scratch);
    c->scratch = p;
    c->scratch_size = n;
    return p;
}


/* ---------------------------------------------------------------- ops */

static llm_cpu_ctx *
ctx_of(llm_backend *be)
{
    return be->ctx;
}


static void
cpu_free(llm_backend *be)
{
    llm_cpu_ctx *c;

    if (be == NULL) {
        return;
    }
    c = be->ctx;
    if (c != NULL) {
        llm_cpu_pool_free(c->pool);
        llm_cpu_aligned_free(c->scratch);
        llm_cpu_aligned_free(c->attn_scratch);
        llm_free(c->rope_cs);
        while (c->n_adopted > 0) {
            llm_cpu_aligned_free(c->adopted[--c->n_adopted]);
        }
        llm_free(c->adopted);
        llm_free(c);
    }
    llm_free(be);
}


static const char *
cpu_error(llm_backend *be)
{
    return ctx_of(be)->errmsg;
}


static void *
cpu_alloc(llm_backend *be, size_t bytes)
{
    void *p = llm_cpu_aligned_alloc(bytes ? bytes : 1);

    if (p == NULL) {
        llm_cpu_fail(ctx_of(be), LLM_ENOMEM,
                     "cpu: alloc of %zu bytes: out of memory", bytes);
    }
    return p;
}


static void
cpu_release(llm_backend *be, void *data)
{
    llm_cpu_aligned_free(data);
}


static int
cpu_upload(llm_backend *be, void *dst, const void *host, size_t n)
{
    if (n > 0 && (dst == NULL || host == NULL)) {
        return llm_cpu_fail(ctx_of(be), LLM_EINVAL, "cpu: upload: NULL");
    }
    if (n > 0 && dst != host) {
        memmove(dst, host, n);
    }
    return 0;
}


static int
cpu_download(llm_backend *be, void *host, const void *src, size_t n)
{
    if (n > 0 && (src == NULL || host == NULL)) {
        return llm_cpu_fail(ctx_of(be), LLM_EINVAL, "cpu: download: NULL");
    }
    if (n > 0 && host != src) {
        memmove(host, src, n);
    }
    return 0;
}


static int
cpu_adopt_weights(llm_backend *be, const void *host, size_t n, void **out)
{
    /* zero copy: the mapping stays valid while the backend lives */
    *out = (void *) host;
    return 0;
}


/* Weights whose batched products the kernels read faster in the ROWS16
 * layout get a rearranged copy (the backend's memory: the mapping's pages
 * are then not read again); others are used in place. */
static int
cpu_adopt_tensor(llm_backend *be, llm_tensor *t, const void *host, size_t n)
{
    llm_cpu_ctx *c = ctx_of(be);
    size_t       rb, bytes;
    void       **list;
    uint8_t     *p;

    if (t == NULL || host == NULL) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: adopt_tensor: NULL");
    }
    t->data = (void *) host;
    t->layout = LLM_LAYOUT_ROWS;
    rb = llm_dtype_get(t->type) != NULL && t->ne[0] > 0
         ? llm_row_bytes(t->type, t->ne[0]) : 0;
    if (!c->kern.rows16 || !llm_cpu_rows16_type(t->type) || rb == 0
        || t->ne[1] < 16 || t->nb != rb
        || (uint64_t) t->ne[1] > (SIZE_MAX - 64) / rb
        || n < rb * (size_t) t->ne[1])
    {
        return 0;
    }
    bytes = rb * (size_t) t->ne[1];
    list = llm_realloc(c->adopted, sizeof(void *) * (size_t) (c->n_adopted
                                                              + 1));
    if (list == NULL) {
        return llm_cpu_fail(c, LLM_ENOMEM, "cpu: adopt_tensor: out of memory");
    }
    c->adopted = list;
    p = llm_cpu_aligned_alloc(bytes);
    if (p == NULL) {
        return llm_cpu_fail(c, LLM_ENOMEM, "cpu: adopt_tensor: %zu bytes:"
                            " out of memory", bytes);
    }
    c->adopted[c->n_adopted++] = p;
    llm_cpu_rows16_pack(t->type, host, t->ne[1], t->ne[0], p);
    t->data = p;
    t->layout = LLM_LAYOUT_ROWS16;
    return 0;
}


static int
cpu_synchronize(llm_backend *be)
{
    return 0;
}


static int
cpu_set_batch(llm_backend *be, const llm_batch *b)
{
    llm_cpu_ctx *c = ctx_of(be);

    if (b == NULL || b->n_tokens < 0 || b->n_seqs < 0 || b->n_out < 0
        || (b->n_tokens > 0 && (b->tokens == NULL || b->pos == NULL
                                || b->tok_seq == NULL)))
    {
        c->have_batch = 0;
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: set_batch: bad batch");
    }
    c->batch = *b;
    c->have_batch = 1;
    c->step++;
    return 0;
}


static int
cpu_embed(llm_backend *be, llm_tensor *out, const llm_tensor *table)
{
    return llm_cpu_embed(ctx_of(be), out, table);
}


static int
cpu_rmsnorm(llm_backend *be, llm_tensor *out, const llm_tensor *x,
            const llm_tensor *w, float eps)
{
    return llm_cpu_rmsnorm(ctx_of(be), out, x, w, eps);
}


static int
cpu_matmul(llm_backend *be, llm_tensor *out, const llm_tensor *x,
           const llm_tensor *w, const llm_tensor *bias)
{
    return llm_cpu_matmul(ctx_of(be), out, x, w, bias);
}


static int
cpu_matmul_n(llm_backend *be, llm_tensor *const *outs, const llm_tensor *x,
             const llm_tensor *const *ws, const llm_tensor *const *biases,
             int n)
{
    return llm_cpu_matmul_n(ctx_of(be), outs, x, ws, biases, n);
}


static int
cpu_rope(llm_backend *be, llm_tensor *x, int n_heads, int head_dim,
         const llm_rope_params *rp)
{
    return llm_cpu_rope(ctx_of(be), x, n_heads, head_dim, rp);
}


static int
cpu_kv_store(llm_backend *be, const llm_kv_pool *kv, int layer,
             const llm_tensor *k, const llm_tensor *v)
{
    return llm_cpu_kv_store(ctx_of(be), kv, layer, k, v);
}


static int
cpu_attention(llm_backend *be, llm_tensor *out, const llm_tensor *q,
              const llm_kv_pool *kv, int layer, int n_heads, float scale)
{
    return llm_cpu_attention(ctx_of(be), out, q, kv, layer, n_heads, scale);
}


static int
cpu_silu_mul(llm_backend *be, llm_tensor *out, const llm_tensor *gate,
             const llm_tensor *up)
{
    return llm_cpu_silu_mul(ctx_of(be), out, gate, up);
}


static int
cpu_add(llm_backend *be, llm_tensor *out, const llm_tensor *a,
        const llm_tensor *b)
{
    return llm_cpu_add(ctx_of(be), out, a, b);
}


static int
cpu_lora(llm_backend *be, llm_tensor *const *outs, int n_outs,
         const llm_tensor *x, const llm_lora_seg *segs, int n_segs)
{
    return llm_cpu_lora(ctx_of(be), outs, n_outs, x, segs, n_segs);
}


static int
cpu_gather_out_rows(llm_backend *be, llm_tensor *out, const llm_tensor *x)
{
    return llm_cpu_gather_out_rows(ctx_of(be), out, x);
}


static int
cpu_kv_copy_blocks(llm_backend *be, const llm_kv_pool *kv,
                   const int32_t *src, const int32_t *dst, int n)
{
    return llm_cpu_kv_copy_blocks(ctx_of(be), kv, src, dst, n);
}


static int
cpu_kv_block_to_host(llm_backend *be, const llm_kv_pool *kv, int32_t block,
                     void *host)
{
    return llm_cpu_kv_block_host(ctx_of(be), kv, block, host, 1);
}


static int
cpu_kv_block_from_host(llm_backend *be, const llm_kv_pool *kv,
                       int32_t block, const void *host)
{
    return llm_cpu_kv_block_host(ctx_of(be), kv, block, (void *) host, 0);
}


static const llm_backend_ops cpu_ops = {
    .name = "cpu",
    .free = cpu_free,
    .error = cpu_error,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .upload = cpu_upload,
    .download = cpu_download,
    .adopt_weights = cpu_adopt_weights,
    .adopt_tensor = cpu_adopt_tensor,
    .synchronize = cpu_synchronize,
    .set_batch = cpu_set_batch,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .matmul_n = cpu_matmul_n,
    .rope = cpu_rope,
    .kv_store = cpu_kv_store,
    .attention = cpu_attention,
    .silu_mul = cpu_silu_mul,
    .add = cpu_add,
    .gather_out_rows = cpu_gather_out_rows,
    .lora = cpu_lora,
    .lora_f16 = 1,
    .lora_i8 = 1,
    .host_memory = 1,
    .kv_q8_0 = 1,
    .kv_copy_blocks = cpu_kv_copy_blocks,
    .kv_block_to_host = cpu_kv_block_to_host,
    .kv_block_from_host = cpu_kv_block_from_host,
};


llm_backend *
llm_backend_cpu_new(int n_threads, llm_err *err)
{
    llm_backend *be;
    llm_cpu_ctx *c;

    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int) n : 1;
    }
    if (n_threads > 256) {
        n_threads = 256;
    }

    be = llm_calloc(1, sizeof(*be));
    c = llm_calloc(1, sizeof(*c));
    if (be == NULL || c == NULL) {
        llm_free(be);
        llm_free(c);
        llm_err_set(err, LLM_ENOMEM, "cpu backend: out of memory");
        return NULL;
    }
    be->ops = &cpu_ops;
    be->ctx = c;

    c->n_threads = n_threads;
    c->isa = llm_cpu_isa_detect();
    llm_cpu_kernels_scalar(&c->kern);
    if (c->isa >= LLM_ISA_AVX2) {
        llm_cpu_kernels_avx2(&c->kern);
    }
    if (c->isa >= LLM_ISA_AVX512) {
        llm_cpu_kernels_avx512(&c->kern);
    }
    c->kern.isa = c->isa;
    if (getenv("LLM_CPU_BATCH_ROWS") != NULL) {          /* benchmarks */
        c->kern.batch_rows = atoi(getenv("LLM_CPU_BATCH_ROWS"));
    }
    if (getenv("LLM_CPU_ROWS16") != NULL                 /* benchmarks */
        && strcmp(getenv("LLM_CPU_ROWS16"), "0") == 0)
    {
        c->kern.rows16 = 0;
    }

    /* OpenBLAS for large F32 products only on request (LLM_CPU_BLAS=1):
     * it sums in another order than our kernels, so a row's result would
     * depend on the batch it is in, and it was barely faster
     * (bench/kernels/RESULTS.md).  It runs on our threads, one slice
     * each (matmul.c). */
    c->blas = getenv("LLM_CPU_BLAS") != NULL
              && strcmp(getenv("LLM_CPU_BLAS"), "1") == 0;
    if (c->blas) {
        openblas_set_num_threads(1);
    }

    c->pool = llm_cpu_pool_new(n_threads, err);
    if (c->pool == NULL) {
        cpu_free(be);
        return NULL;
    }
    return be;
}
