/*
 * Causal attention over the paged KV cache.
 *
 * Token t of sequence s attends to positions 0 .. pos[t] of s, which
 * kv_store() has written (earlier steps' tokens and this step's).  The
 * query heads that share a KV head (GQA group) are done together, so each
 * cached K/V row is read once per group.
 *
 * Work items are (token, range of RANGE positions), every head: the
 * cached rows of a block are then read once per token.  A context longer
 * than RANGE gives several items, so that even one sequence's decode
 * keeps every thread busy; each such item leaves a partial softmax
 * (max m, sum l, unnormalised output o) and a second pass merges them in
 * order:  M = max m_i,  out = sum(o_i e^(m_i - M)) / sum(l_i e^(m_i - M)).
 * The split depends only on the token's context length, never on the
 * batch or the thread count, so a token's output is bit-identical alone
 * or in any batch.  Threads take items from a shared counter, as their
 * costs differ (causal: later tokens see more positions).  Tokens are
 * processed in waves so that the partials of a long prefill stay within
 * a bounded buffer.
 */
#include "cpu.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

/* Positions per work item. */
#define RANGE             1024

/* Partials kept at once (one per item of a split context). */
#define MAX_PARTIALS      256


typedef struct attn_item {
    int32_t  t;             /* token */
    int32_t  j0, j1;        /* positions [j0, j1) */
    int32_t  part;          /* partial slot, or -1: the whole context */
} attn_item;


typedef struct attn_job {
    llm_cpu_ctx        *c;
    llm_tensor         *out;
    const llm_tensor   *q;
    const llm_kv_pool  *kv;
    const uint8_t      *kbase, *vbase;
    int                 nh, g, hd;      /* query heads, per KV head, dim */
    float               scale;

    attn_item          *items;          /* [n_items] of this wave */
    int64_t             n_items;
    int32_t             t0, t1;         /* the wave's tokens */
    int32_t            *first;          /* [t1 - t0 + 1] first item of
                                           each token */
    float              *partial;        /* [partials, nh, hd + 2] */
    float              *scores;         /* [n_threads, nh, s_stride] */
    float              *obuf;           /* [n_threads, nh, hd + 2] */
    int                 s_stride;
    _Atomic int64_t     next;
} attn_job;


/* Bytes of n elements of the pool's rows. */
static size_t
kv_bytes(const llm_kv_pool *kv, size_t n)
{
    return llm_kv_bytes(kv->type, n);
}


/* Runs body for each run of consecutive positions within one block, with
 * at_ the offset of the run from j0, row_ the address of its first
 * position's row (KV head 0), cnt_ its length, and next_ the first row
 * of the run after it (tail after the last run).
 *
 * Decode attention streams every cached row of a sequence once, from
 * blocks scattered over the pool, so it waits on memory unless the next
 * rows are on their way: the kernels prefetch the rows of next_ while
 * they work on row_ (a few cache lines per group of positions, so that
 * the prefetches overlap the arithmetic instead of waiting for free
 * line-fill buffers). */
#define FOR_EACH_RUN(job, base, tail, s, j0, j1, body)                      \
    do {                                                                    \
        const llm_batch *b_ = &(job)->c->batch;                             \
        const int32_t   *bt_ = b_->block_table                              \
                               + (size_t) (s) * b_->max_blocks;             \
        int              bs_ = (job)->kv->block_size;                       \
        size_t           w_ = kv_bytes((job)->kv, (size_t)                 \
                                   (job)->kv->n_kv_heads * (job)->hd);      \
        int32_t          j_ = (j0);                                         \
        while (j_ < (j1)) {                                                 \
            int32_t off_ = j_ % bs_;                                        \
            int32_t cnt_ = bs_ - off_ < (j1) - j_ ? bs_ - off_ : (j1) - j_; \
            const uint8_t *row_ = (base)                                    \
                + ((size_t) bt_[j_ / bs_] * bs_ + off_) * w_;               \
            const uint8_t *next_ = j_ + cnt_ < (j1)                         \
                ? (base) + (size_t) bt_[(j_ + cnt_) / bs_] * bs_ * w_       \
                : (tail);                                                   \
            int32_t at_ = j_ - (j0);                                        \
            body;                                                           \
            j_ += cnt_;                                                     \
        }                                                                   \
    } while (0)


/* The row of position j0 of sequence s in the pages at base. */
static const uint8_t *
first_row(const attn_job *j, const uint8_t *base, int32_t s, int32_t j0)
{
    const llm_batch *b = &j->c->batch;
    int              bs = j->kv->block_size;
    size_t           w = kv_bytes(j->kv, (size_t) j->kv->n_kv_heads * j->hd);

    return base + ((size_t) b->block_table[(size_t) s * b->max_blocks
                                           + j0 / bs] * bs + j0 % bs) * w;
}


/* One item: every query head of token t over positions [j0, j1).  The KV
 * heads of a run are done one after the other, while its rows are in
 * L1.  next: the item this thread runs after this one (-1: none), whose
 * first K rows are prefetched during this one's last V rows. */
static void
attn_item_run(attn_job *j, int64_t idx, int64_t next, float *sc, float *obuf)
{
    const attn_item       *it = &j->items[idx];
    const llm_cpu_kernels *kn = &j->c->kern;
    const llm_kv_pool     *kv = j->kv;
    int32_t                s = j->c->batch.tok_seq[it->t];
    int                    nh = j->nh, g = j->g, hd = j->hd, h, e, kvh;
    int32_t                n = it->j1 - it->j0;
    size_t                 stride = (size_t) kv->n_kv_heads * hd;
    size_t                 hb = kv_bytes(kv, (size_t) hd); /* a head's row */
    const float           *q = (const float *) ((const uint8_t *) j->q->data
                                                + (size_t) it->t * j->q->nb);
    /* split context: this item's partial; else the thread's buffer */
    float                 *slot = it->part >= 0
                                  ? j->partial
                                    + (size_t) it->part * nh * (hd + 2)
                                  : obuf;
    float                 *o = slot;                    /* [nh, hd] */
    float                 *m = slot + (size_t) nh * hd; /* [nh] */
    float                 *l = m + nh;                  /* [nh] */
    const uint8_t         *v_first, *k_next = NULL;

    /* after the last K run: the first V run; after the last V run: the
     * next item's first K run */
    v_first = first_row(j, j->vbase, s, it->j0);
    if (next >= 0) {
        const attn_item *nx = &j->items[next];

        k_next = first_row(j, j->kbase, j->c->batch.tok_seq[nx->t], nx->j0);
    }

    FOR_EACH_RUN(j, j->kbase, v_first, s, it->j0, it->j1,
        for (kvh = 0; kvh < kv->n_kv_heads; kvh++) {
            kn->attn_scores(q + (size_t) kvh * g * hd, g, hd,
                            row_ + kvh * hb, kv->type, stride, cnt_,
                            j->scale,
                            sc + (size_t) kvh * g * j->s_stride + at_,
                            j->s_stride,
                            next_ != NULL ? next_ + kvh * hb : NULL);
        });

    for (h = 0; h < nh; h++) {
        float *sh = sc + (size_t) h * j->s_stride;

        m[h] = kn->vmax(sh, n);
        l[h] = kn->exp_sum(sh, n, m[h]);
    }

    memset(o, 0, (size_t) nh * hd * sizeof(float));
    FOR_EACH_RUN(j, j->vbase, k_next, s, it->j0, it->j1,
        for (kvh = 0; kvh < kv->n_kv_heads; kvh++) {
            kn->attn_accum(o + (size_t) kvh * g * hd, g, hd,
                           sc + (size_t) kvh * g * j->s_stride + at_,
                           j->s_stride, row_ + kvh * hb, kv->type, stride,
                           cnt_, next_ != NULL ? next_ + kvh * hb : NULL);
        });

    if (it->part < 0) {
        /* the item is the token's whole context: finish here */
        float *dst = (float *) ((uint8_t *) j->out->data
                                + (size_t) it->t * j->out->nb);
        for (h = 0; h < nh; h++) {
            float inv = 1.0f / l[h];
            for (e = 0; e < hd; e++) {
                dst[h * hd + e] = o[h * hd + e] * inv;
            }
        }
    }
}


static void
attn_task(void *arg, int ith, int nth)
{
    attn_job *j = arg;
    float    *sc = j->scores + (size_t) ith * j->nh * j->s_stride;
    float    *obuf = j->obuf + (size_t) ith * j->nh * (j->hd + 2);
    int64_t   idx, next;

    /* each item is claimed one item ahead, so that its first rows can
     * be prefetched during the current one */
    idx = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
    while (idx < j->n_items) {
        next = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        attn_item_run(j, idx, next < j->n_items ? next : -1, sc, obuf);
        idx = next;
    }
}


/* Second pass: merges the ranges of each split token, head by head, in
 * range order. */
static void
attn_merge_task(void *arg, int ith, int nth)
{
    attn_job *j = arg;
    int       nh = j->nh, hd = j->hd, h, e;
    int64_t   n = (int64_t) (j->t1 - j->t0) * nh, p0, p1, p, i;

    llm_cpu_split(n, ith, nth, 1, &p0, &p1);
    for (p = p0; p < p1; p++) {
        int64_t tt = p / nh, t = j->t0 + tt;
        float  *dst;
        float   mx = -INFINITY, sum = 0.0f;

        h = (int) (p % nh);
        if (j->first[tt + 1] - j->first[tt] < 2) {
            continue;                   /* finished by its only item */
        }
        dst = (float *) ((uint8_t *) j->out->data + (size_t) t * j->out->nb)
              + (size_t) h * hd;
        for (i = j->first[tt]; i < j->first[tt + 1]; i++) {
            const float *slot = j->partial
                                + (size_t) j->items[i].part * nh * (hd + 2);
            mx = fmaxf(mx, slot[(size_t) nh * hd + h]);
        }
        for (e = 0; e < hd; e++) {
            dst[e] = 0.0f;
        }
        for (i = j->first[tt]; i < j->first[tt + 1]; i++) {
            const float *slot = j->partial
                                + (size_t) j->items[i].part * nh * (hd + 2);
            float        w = expf(slot[(size_t) nh * hd + h] - mx);

            sum += slot[(size_t) nh * hd + nh + h] * w;
            for (e = 0; e < hd; e++) {
                dst[e] += slot[(size_t) h * hd + e] * w;
            }
        }
        for (e = 0; e < hd; e++) {
            dst[e] /= sum;
        }
    }
}


static size_t
align64(size_t n)
{
    return (n + 63) & ~(size_t) 63;
}


int
llm_cpu_attention(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *q,
                  const llm_kv_pool *kv, int layer, int n_heads, float scale)
{
    const llm_batch *b = &c->batch;
    attn_job         j;
    int64_t          T, t, n_items, parts, width;
    int              nkv, rc;
    int32_t          maxlen;
    size_t           sz_items, sz_first, sz_part, sz_sc, sz_o, need;
    uint8_t         *mem;

    if (!c->have_batch) {
        return llm_cpu_fail(c, LLM_ESTATE, "cpu: attention: no batch set");
    }
    if ((rc = llm_cpu_check_kv(c, kv, layer, "attention")) != 0) {
        return rc;
    }
    nkv = kv->n_kv_heads;
    if (n_heads <= 0 || n_heads % nkv != 0) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: attention: %d heads over %d"
                            " KV heads", n_heads, nkv);
    }
    T = b->n_tokens;
    width = (int64_t) n_heads * kv->head_dim;
    if (q == NULL || out == NULL || q->data == NULL || out->data == NULL
        || q->type != LLM_F32 || out->type != LLM_F32
        || q->ne[0] != width || out->ne[0] != width || q->ne[1] != T
        || out->ne[1] != T || q->nb < (size_t) width * 4
        || out->nb < (size_t) width * 4)
    {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: attention: q and out must"
                            " be [%lld, %lld] F32", (long long) T,
                            (long long) width);
    }
    if (T == 0) {
        return 0;
    }

    memset(&j, 0, sizeof(j));
    j.c = c;
    j.out = out;
    j.q = q;
    j.kv = kv;
    j.kbase = (const uint8_t *) kv->k + (size_t) layer * kv->layer_bytes;
    j.vbase = (const uint8_t *) kv->v + (size_t) layer * kv->layer_bytes;
    j.nh = n_heads;
    j.g = n_heads / nkv;
    j.hd = kv->head_dim;
    j.scale = scale;

    /* buffers sized for the largest wave: every item of a split context
     * needs a partial; a wave holds MAX_PARTIALS of them, or one token */
    maxlen = 0;
    n_items = 0;
    parts = 0;
    for (t = 0; t < T; t++) {
        int64_t ranges = ((int64_t) b->pos[t] + RANGE) / RANGE;
        maxlen = b->pos[t] + 1 > maxlen ? b->pos[t] + 1 : maxlen;
        n_items += ranges;
        parts += ranges > 1 ? ranges : 0;
    }
    {
        int64_t cap = ((int64_t) maxlen + RANGE - 1) / RANGE;
        cap = cap > MAX_PARTIALS ? cap : MAX_PARTIALS;
        parts = parts < cap ? parts : cap;
    }
    j.s_stride = (int) (((maxlen < RANGE ? maxlen : RANGE) + 15) & ~15);

    sz_items = align64((size_t) n_items * sizeof(attn_item));
    sz_first = align64(((size_t) T + 1) * sizeof(int32_t));
    sz_part = align64((size_t) parts * j.nh * (j.hd + 2) * sizeof(float));
    sz_sc = align64((size_t) c->n_threads * j.nh * j.s_stride * sizeof(float));
    sz_o = align64((size_t) c->n_threads * j.nh * (j.hd + 2) * sizeof(float));
    need = sz_items + sz_first + sz_part + sz_sc + sz_o;
    if (need > c->attn_scratch_size) {
        void *p = llm_cpu_aligned_alloc(need + need / 4);
        if (p == NULL) {
            return llm_cpu_fail(c, LLM_ENOMEM, "cpu: attention: scratch of"
                                " %zu bytes: out of memory", need);
        }
        llm_cpu_aligned_free(c->attn_scratch);
        c->attn_scratch = p;
        c->attn_scratch_size = need + need / 4;
    }
    mem = c->attn_scratch;
    j.items = (attn_item *) mem;
    j.first = (int32_t *) (mem + sz_items);
    j.partial = (float *) (mem + sz_items + sz_first);
    j.scores = (float *) (mem + sz_items + sz_first + sz_part);
    j.obuf = (float *) (mem + sz_items + sz_first + sz_part + sz_sc);

    for (j.t0 = 0; j.t0 < T; j.t0 = j.t1) {
        int64_t used = 0;
        int     split = 0;

        /* the wave: tokens while their partials fit (at least one) */
        n_items = 0;
        for (j.t1 = j.t0; j.t1 < T; j.t1++) {
            int32_t len = b->pos[j.t1] + 1, j0;
            int64_t ranges = (len + RANGE - 1) / RANGE;

            if (j.t1 > j.t0 && ranges > 1 && used + ranges > MAX_PARTIALS) {
                break;
            }
            j.first[j.t1 - j.t0] = (int32_t) n_items;
            for (j0 = 0; j0 < len; j0 += RANGE) {
                attn_item *it = &j.items[n_items++];
                it->t = j.t1;
                it->j0 = j0;
                it->j1 = j0 + RANGE < len ? j0 + RANGE : len;
                it->part = ranges > 1 ? (int32_t) used++ : -1;
            }
            split |= ranges > 1;
        }
        j.first[j.t1 - j.t0] = (int32_t) n_items;
        j.n_items = n_items;
        atomic_store(&j.next, 0);

        if (n_items == 1 || c->n_threads == 1) {
            attn_task(&j, 0, 1);
        } else {
            llm_cpu_pool_run(c->pool, attn_task, &j, c->n_threads);
        }
        if (split) {
            llm_cpu_pool_run(c->pool, attn_merge_task, &j, c->n_threads);
        }
    }
    return 0;
}
