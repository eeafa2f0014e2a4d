/*
 * Device copies of adapters with a byte budget and LRU (see
 * device_pool.h).  A few dozen to a few thousand entries: a plain array
 * scanned linearly is enough next to the cost of an upload.
 */
#include "device_pool.h"

#include <string.h>

#include "lora.h"
#include "../kernels/dtype.h"


typedef struct {
    uint64_t    serial;
    void       *dev;
    size_t      bytes;
    int         pins;
    uint64_t    last_use;
} pool_entry;

struct llm_lora_pool {
    llm_backend    *be;
    int             type;       /* LLM_F32, LLM_F16 or LLM_LORA_I8 */
    size_t          budget;
    size_t          bytes;
    pool_entry     *e;
    int             n, cap;
    uint64_t        tick;
    uint64_t        uploads;
    uint64_t        evictions;
};


llm_lora_pool *
llm_lora_pool_new(llm_backend *be, size_t budget, llm_err *err)
{
    llm_lora_pool *p = llm_calloc(1, sizeof(*p));

    if (p == NULL) {
        llm_err_set(err, LLM_ENOMEM, "out of memory");
        return NULL;
    }
    p->be = be;
    p->type = be->ops->lora_f16 ? LLM_F16 : LLM_F32;
    p->budget = budget;
    return p;
}


int
llm_lora_pool_type(const llm_lora_pool *p)
{
    return p->type;
}


int
llm_lora_pool_set_type(llm_lora_pool *p, int type)
{
    if (p->n > 0 || p->uploads > 0) {
        return LLM_ESTATE;
    }
    if (type != LLM_F32 && !(type == LLM_F16 && p->be->ops->lora_f16)
        && !(type == LLM_LORA_I8 && p->be->ops->lora_i8))
    {
        return LLM_EUNSUP;
    }
    p->type = type;
    return 0;
}


size_t
llm_lora_pool_need(const llm_lora_pool *p, const llm_lora *lora)
{
    return p->type == LLM_F16 ? lora->bytes / 2
           : p->type == LLM_LORA_I8 ? lora->q_bytes : lora->bytes;
}


void
llm_lora_pool_seg(int type, const uint8_t *dev, const llm_lora_weight *w,
                  llm_lora_seg *seg)
{
    seg->type = type;
    seg->rank = w->rank;
    seg->scale = w->scale;
    seg->a_scale = NULL;
    seg->b_scale = NULL;
    if (type == LLM_LORA_I8) {
        llm_lora_q_layout q = llm_lora_q_layout_of(w->rank, w->in, w->out);
        const uint8_t    *m = dev + w->q_off;

        seg->a = m;
        seg->b = m + q.bt;
        seg->a_scale = (const float *) (m + q.a_scale);
        seg->b_scale = (const float *) (m + q.b_scale);
        return;
    }
    seg->a = dev + w->a_off * (type == LLM_F16 ? 2 : sizeof(float));
    seg->b = dev + w->b_off * (type == LLM_F16 ? 2 : sizeof(float));
}


/* n values at stride st from src to int8 at dst, scale = max |v| / 127
 * (0 for a row of zeros); returns the scale. */
static float
quant_row_i8(const float *src, size_t st, size_t n, int8_t *dst)
{
    float  amax = 0.0f, inv;
    size_t i;

    for (i = 0; i < n; i++) {
        float v = src[i * st] < 0 ? -src[i * st] : src[i * st];
        amax = v > amax ? v : amax;
    }
    inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (i = 0; i < n; i++) {
        float q = src[i * st] * inv;
        dst[i] = (int8_t) (q < 0 ? q - 0.5f : q + 0.5f);
    }
    return amax / 127.0f;
}


/* The int8 layout (lora.h, llm_lora_q_layout) of every matrix: A's rows,
 * and B's columns as the rows of B^T, each with its own scale. */
static void
pool_quantize(const llm_lora *lora, uint8_t *h)
{
    const llm_lora_weight *w;
    llm_lora_q_layout      q;
    uint8_t               *m;
    float                 *as, *bs;
    int                    k, j;

    for (k = 0; k < lora->n_layers * LLM_LORA_N_TARGETS; k++) {
        w = &lora->w[k];
        if (w->rank == 0) {
            continue;
        }
        q = llm_lora_q_layout_of(w->rank, w->in, w->out);
        m = h + w->q_off;
        as = (float *) (m + q.a_scale);
        bs = (float *) (m + q.b_scale);
        for (j = 0; j < w->rank; j++) {
            as[j] = quant_row_i8(lora->data + w->a_off + (size_t) j * w->in,
                                 1, (size_t) w->in,
                                 (int8_t *) m + (size_t) j * w->in);
            /* B [out, rank]: column j is row j of B^T */
            bs[j] = quant_row_i8(lora->data + w->b_off + j, (size_t) w->rank,
                                 (size_t) w->out,
                                 (int8_t *) m + q.bt + (size_t) j * w->out);
        }
    }
}


/* Copies h's weights to d in the pool's format: f32 as they are, f16
 * with every B transposed to [rank, out] (backend.h, llm_lora_seg), or
 * the int8 layout. */
static int
pool_upload(llm_lora_pool *p, void *d, const llm_lora *lora, size_t need)
{
    uint16_t              *h;
    const float           *src;
    const llm_lora_weight *w;
    size_t                 i, n;
    int                    rc, k, j, o;

    if (p->type == LLM_F32) {
        return p->be->ops->upload(p->be, d, lora->data, need);
    }
    if (p->type == LLM_LORA_I8) {
        uint8_t *q = llm_calloc(1, need ? need : 1);

        if (q == NULL) {
            return LLM_ENOMEM;
        }
        pool_quantize(lora, q);
        rc = p->be->ops->upload(p->be, d, q, need);
        llm_free(q);
        return rc;
    }
    n = lora->bytes / sizeof(float);
    h = llm_malloc(n * sizeof(uint16_t));
    if (h == NULL) {
        return LLM_ENOMEM;
    }
    for (i = 0; i < n; i++) {
        h[i] = llm_f32_to_f16(lora->data[i]);
    }
    for (k = 0; k < lora->n_layers * LLM_LORA_N_TARGETS; k++) {
        w = &lora->w[k];
        if (w->rank == 0) {
            continue;
        }
        src = lora->data + w->b_off;            /* [out, rank] */
        for (o = 0; o < w->out; o++) {
            for (j = 0; j < w->rank; j++) {
                h[w->b_off + (size_t) j * w->out + o] =
                    llm_f32_to_f16(src[(size_t) o * w->rank + j]);
            }
        }
    }
    rc = p->be->ops->upload(p->be, d, h, need);
    llm_free(h);
    return rc;
}


static void
pool_evict(llm_lora_pool *p, int i)
{
    p->be->ops->release(p->be, p->e[i].dev);
    p->bytes -= p->e[i].bytes;
    p->e[i] = p->e[--p->n];
    p->evictions++;
}


void
llm_lora_pool_free(llm_lora_pool *p)
{
    if (p == NULL) {
        return;
    }
    while (p->n > 0) {
        pool_evict(p, p->n - 1);
    }
    llm_free(p->e);
    llm_free(p);
}


static int
pool_find(const llm_lora_pool *p, uint64_t serial)
{
    int i;

    for (i = 0; i < p->n; i++) {
        if (p->e[i].serial == serial) {
            return i;
        }
    }
    return -1;
}


int
llm_lora_pool_acquire(llm_lora_pool *p, const llm_lora_handle *h,
                      const uint8_t **dev, llm_err *err)
{
    size_t  need = llm_lora_pool_need(p, h->lora);
    void   *d;
    int     i = pool_find(p, h->serial);

    if (i >= 0) {
        p->e[i].pins++;
        p->e[i].last_use = ++p->tick;
        *dev = p->e[i].dev;
        return 0;
    }

    /* make room: least recently used unpinned copies first */
    while (p->budget != 0 && p->bytes + need > p->budget) {
        int victim = -1;
        for (i = 0; i < p->n; i++) {
            if (p->e[i].pins == 0
                && (victim < 0 || p->e[i].last_use < p->e[victim].last_use))
            {
                victim = i;
            }
        }
        if (victim < 0) {
            return llm_err_set(err, LLM_EFULL,
                               "adapter device pool full: %zu of %zu bytes "
                               "pinned by running sequences", p->bytes,
                               p->budget);
        }
        pool_evict(p, victim);
    }

    if (p->n == p->cap) {
        int         cap = p->cap ? 2 * p->cap : 16;
        pool_entry *ne = llm_realloc(p->e, (size_t) cap * sizeof(*ne));
        if (ne == NULL) {
            return llm_err_set(err, LLM_ENOMEM, "out of memory");
        }
        p->e = ne;
        p->cap = cap;
    }
    d = p->be->ops->alloc(p->be, need);
    if (d == NULL) {
        return llm_err_set(err, LLM_ENOMEM,
                           "cannot allocate %zu bytes for adapter %s", need,
                           h->lora->version_hex);
    }
    if (pool_upload(p, d, h->lora, need) != 0) {
        llm_err_set(err, LLM_EBACKEND, "adapter upload: %s",
                    llm_backend_error(p->be));
        p->be->ops->release(p->be, d);
        return LLM_EBACKEND;
    }
    p->e[p->n].serial = h->serial;
    p->e[p->n].dev = d;
    p->e[p->n].bytes = need;
    p->e[p->n].pins = 1;
    p->e[p->n].last_use = ++p->tick;
    p->n++;
    p->bytes += need;
    p->uploads++;
    *dev = d;
    return 0;
}


void
llm_lora_pool_release(llm_lora_pool *p, const llm_lora_handle *h)
{
    int i = pool_find(p, h->serial);

    if (i >= 0 && p->e[i].pins > 0) {
        p->e[i].pins--;
        p->e[i].last_use = ++p->tick;
    }
}


void
llm_lora_pool_get_stats(const llm_lora_pool *p, llm_lora_pool_stats *st)
{
    int i;

    memset(st, 0, sizeof(*st));
    st->resident = p->n;
    st->bytes = p->bytes;
    st->budget = p->budget;
    st->uploads = p->uploads;
    st->evictions = p->evictions;
    for (i = 0; i < p->n; i++) {
        st->pinned += p->e[i].pins > 0;
    }
}


int
llm_lora_pool_has(const llm_lora_pool *p, uint64_t serial)
{
    return p != NULL && serial != 0 && pool_find(p, serial) >= 0;
}
