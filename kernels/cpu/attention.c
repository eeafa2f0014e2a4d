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
 *
 * Consecutive tokens of one sequence (a prefill chunk) share items, up
 * to TILE of them.  Each block's K rows are converted to f32 once for
 * the tile and transposed (kt_build), so that every token's scores over
 * the block come from broadcast products, summed lane by lane in the
 * order the per-token kernel sums them (attn_scores_kt): the same bits
 * as the token alone, without its reductions across lanes.  V rows are
 * read in place, or converted once per tile from Q8_0 pages (converting
 * F16 is one instruction per 16 values; an f32 copy only doubles the
 * bytes loaded).  Kernels without attn_scores_kt tile only Q8_0 pages,
 * TILE_CONVERTED tokens sharing the converted rows.
 */
#include "cpu.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

/* Positions per work item. */
#define RANGE             1024

/* Partials kept at once (one per item of a split context). */
#define MAX_PARTIALS      256

/* Tokens of one sequence that share an item: with transposed K blocks
 * (kernels with attn_scores_kt), and without (Q8_0 pages only). */
#define TILE              16
#define TILE_CONVERTED    4


typedef struct attn_item {
    int32_t  t;             /* first token; the tile is t .. t + nt - 1 */
    int32_t  nt;
    int32_t  j0, j1;        /* positions [j0, j1) (each token stops at
                               its own length) */
    int32_t  part;          /* first token's partial slot (the next
                               token's is part + ranges ...), or -1: the
                               whole context */
    int32_t  ranges;        /* items per token of the tile */
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
    int32_t            *pfirst;         /* [t1 - t0] first partial slot of
                                           each token, -1 if not split */
    int32_t            *nparts;         /* [t1 - t0] its slots */
    float              *partial;        /* [partials, nh, hd + 2] */
    float              *scores;         /* [n_threads, tile, nh, s_stride] */
    float              *obuf;           /* [n_threads, tile, nh, hd + 2] */
    float              *rows;           /* [n_threads, block_size, kv row]
                                           f32 copies of a run's rows */
    float              *kt;             /* [n_threads, kt_size] a block's
                                           K rows of one head, transposed */
    size_t              kt_size;
    int                 s_stride;
    int                 tile;           /* tokens per item at most */
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


/* For a tile: the f32 values of the cnt rows at row (every KV head),
 * F32 pages in place, others converted into buf; the rows of the next
 * run (next, may be NULL) are prefetched. */
static const uint8_t *
tile_rows(const attn_job *j, const uint8_t *row, int32_t cnt,
          const uint8_t *next, float *buf)
{
    const llm_cpu_kernels *kn = &j->c->kern;
    size_t                 n = (size_t) cnt * j->kv->n_kv_heads * j->hd;

    if (next != NULL) {
        llm_cpu_prefetch(next, kv_bytes(j->kv, n));
    }
    switch (j->kv->type) {
    case LLM_F16:
        kn->f16_to_f32((const uint16_t *) row, buf, (int64_t) n);
        return (const uint8_t *) buf;
    case LLM_Q8_0:
        kn->dequant_q8_0(row, buf, (int64_t) n);
        return (const uint8_t *) buf;
    default:
        return row;
    }
}


/* The scores of a tile's tokens over one run of cnt positions (at its
 * offset at from the item's start), from its rows converted to f32:
 * each KV head's block transposed once, then every token whose context
 * covers the run's groups of four positions in one call; a token's last
 * positions short of a group of four, as alone. */
static void
tile_scores_kt(attn_job *j, const attn_item *it, const int32_t *end,
               const float *r, int32_t cnt, int32_t at, float *sc,
               float *kt)
{
    const llm_cpu_kernels *kn = &j->c->kern;
    int                    g = j->g, hd = j->hd, nt = it->nt, kvh, k, k1, i;
    size_t                 stride = (size_t) j->kv->n_kv_heads * hd;
    size_t                 sc_tok = (size_t) j->nh * j->s_stride;
    size_t                 q_tok = j->q->nb / sizeof(float);
    const float           *q0 = (const float *) j->q->data
                                + (size_t) it->t * q_tok;

    for (kvh = 0; kvh < j->kv->n_kv_heads; kvh++) {
        const float *rh = r + (size_t) kvh * hd;
        size_t       qh = (size_t) kvh * g * hd;
        size_t       sh = (size_t) kvh * g * j->s_stride + at;

        kn->kt_build(rh, stride, cnt, hd, kt);
        for (k = 0; k < nt; k = k1) {
            int32_t nk = end[k] - (it->j0 + at), n4;

            nk = nk < cnt ? nk : cnt;
            k1 = k + 1;
            if (nk <= 0) {
                continue;
            }
            if (nk == cnt) {
                k1 = nt;        /* the later tokens see the whole run too */
            }
            n4 = nk & ~3;
            if (n4 > 0) {
                kn->attn_scores_kt(kt, hd, q0 + (size_t) k * q_tok + qh, g,
                                   q_tok, k1 - k, j->scale,
                                   sc + k * sc_tok + sh, j->s_stride, sc_tok,
                                   n4);
            }
            for (i = k; nk > n4 && i < k1; i++) {
                kn->attn_scores(q0 + (size_t) i * q_tok + qh, g, hd,
                                rh + (size_t) n4 * stride, LLM_F32, stride,
                                nk - n4, j->scale, sc + i * sc_tok + sh + n4,
                                j->s_stride, NULL);
            }
        }
    }
}


/* One item: every query head of the tile's tokens over positions
 * [j0, j1) (each token up to its own length).  A token alone reads the
 * pages in place, its KV heads one after the other while a run's rows
 * are in L1.  next: the item this thread runs after this one (-1:
 * none), whose first K rows are prefetched during this one's last V
 * rows. */
static void
attn_item_run(attn_job *j, int64_t idx, int64_t next, float *sc, float *obuf,
              float *rows, float *kt)
{
    const attn_item       *it = &j->items[idx];
    const llm_cpu_kernels *kn = &j->c->kern;
    const llm_kv_pool     *kv = j->kv;
    const llm_batch       *b = &j->c->batch;
    int32_t                s = b->tok_seq[it->t];
    int                    nh = j->nh, g = j->g, hd = j->hd, h, e, kvh, k;
    int                    nt = it->nt;
    size_t                 stride = (size_t) kv->n_kv_heads * hd;
    size_t                 hb = kv_bytes(kv, (size_t) hd); /* a head's row */
    size_t                 sc_tok = (size_t) nh * j->s_stride;
    size_t                 slot_sz = (size_t) nh * (hd + 2);
    int                    tiled = nt > 1;
    int                    kt_tiles = tiled && j->kt_size > 0;
    /* K rows of a tile: converted to f32 once for its tokens (and
     * transposed from that copy); V rows only from Q8_0 pages (the
     * kernels convert F16 as fast as they would read an f32 copy) */
    int                    ktype = tiled ? LLM_F32 : kv->type;
    size_t                 khb = tiled ? (size_t) hd * 4 : hb;
    int                    vconv = tiled && kv->type == LLM_Q8_0;
    int                    vtype = vconv ? LLM_F32 : kv->type;
    size_t                 vhb = vconv ? (size_t) hd * 4 : hb;
    const uint8_t         *v_first, *k_next = NULL;
    int32_t                end[TILE];
    float                 *slot[TILE];

    for (k = 0; k < nt; k++) {
        int32_t len = b->pos[it->t + k] + 1;

        end[k] = len < it->j1 ? len : it->j1;
        /* split context: this token's partial; else the thread's buffer */
        slot[k] = it->part >= 0
                  ? j->partial + (size_t) (it->part + k * it->ranges)
                                 * slot_sz
                  : obuf + (size_t) k * slot_sz;
    }

    /* after the last K run: the first V run; after the last V run: the
     * next item's first K run */
    v_first = first_row(j, j->vbase, s, it->j0);
    if (next >= 0) {
        const attn_item *nx = &j->items[next];

        k_next = first_row(j, j->kbase, b->tok_seq[nx->t], nx->j0);
    }

    FOR_EACH_RUN(j, j->kbase, v_first, s, it->j0, it->j1,
        const uint8_t *r_ = tiled ? tile_rows(j, row_, cnt_, next_, rows)
                                  : row_;
        if (kt_tiles) {
            tile_scores_kt(j, it, end, (const float *) r_, cnt_, at_, sc, kt);
        } else {
            for (k = 0; k < nt; k++) {
                int32_t nk = end[k] - (it->j0 + at_);
                const float *q = (const float *) ((const uint8_t *)
                                 j->q->data + (size_t) (it->t + k) * j->q->nb);

                nk = nk < cnt_ ? nk : cnt_;
                for (kvh = 0; nk > 0 && kvh < kv->n_kv_heads; kvh++) {
                    kn->attn_scores(q + (size_t) kvh * g * hd, g, hd,
                                    r_ + kvh * khb, ktype, stride, nk,
                                    j->scale,
                                    sc + k * sc_tok
                                    + (size_t) kvh * g * j->s_stride + at_,
                                    j->s_stride,
                                    !tiled && next_ != NULL ? next_ + kvh * hb
                                                            : NULL);
                }
            }
        });

    for (k = 0; k < nt; k++) {
        float *m = slot[k] + (size_t) nh * hd;     /* [nh] */
        float *l = m + nh;                          /* [nh] */

        for (h = 0; h < nh; h++) {
            float *sh = sc + k * sc_tok + (size_t) h * j->s_stride;

            m[h] = kn->vmax(sh, end[k] - it->j0);
            l[h] = kn->exp_sum(sh, end[k] - it->j0, m[h]);
        }
        memset(slot[k], 0, (size_t) nh * hd * sizeof(float));
    }

    FOR_EACH_RUN(j, j->vbase, k_next, s, it->j0, it->j1,
        const uint8_t *r_ = vconv ? tile_rows(j, row_, cnt_, next_, rows)
                                  : row_;
        for (k = 0; k < nt; k++) {
            int32_t nk = end[k] - (it->j0 + at_);

            nk = nk < cnt_ ? nk : cnt_;
            for (kvh = 0; nk > 0 && kvh < kv->n_kv_heads; kvh++) {
                kn->attn_accum(slot[k] + (size_t) kvh * g * hd, g, hd,
                               sc + k * sc_tok
                               + (size_t) kvh * g * j->s_stride + at_,
                               j->s_stride, r_ + kvh * vhb, vtype, stride,
                               nk, !vconv && k == 0 && next_ != NULL
                                   ? next_ + kvh * hb : NULL);
            }
        });

    if (it->part < 0) {
        /* the item is each token's whole context: finish here */
        for (k = 0; k < nt; k++) {
            float       *dst = (float *) ((uint8_t *) j->out->data
                                          + (size_t) (it->t + k)
                                            * j->out->nb);
            const float *o = slot[k], *l = o + (size_t) nh * hd + nh;

            for (h = 0; h < nh; h++) {
                float inv = 1.0f / l[h];
                for (e = 0; e < hd; e++) {
                    dst[h * hd + e] = o[h * hd + e] * inv;
                }
            }
        }
    }
}


static void
attn_task(void *arg, int ith, int nth)
{
    attn_job *j = arg;
    float    *sc = j->scores + (size_t) ith * j->tile * j->nh * j->s_stride;
    float    *obuf = j->obuf + (size_t) ith * j->tile * j->nh * (j->hd + 2);
    float    *rows = j->rows + (size_t) ith * j->kv->block_size
                               * j->kv->n_kv_heads * j->hd;
    float    *kt = j->kt + (size_t) ith * j->kt_size;
    int64_t   idx, next;

    /* each item is claimed one item ahead, so that its first rows can
     * be prefetched during the current one */
    idx = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
    while (idx < j->n_items) {
        next = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        attn_item_run(j, idx, next < j->n_items ? next : -1, sc, obuf,
                      rows, kt);
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
        if (j->pfirst[tt] < 0) {
            continue;                   /* finished by its only item */
        }
        dst = (float *) ((uint8_t *) j->out->data + (size_t) t * j->out->nb)
              + (size_t) h * hd;
        for (i = j->pfirst[tt]; i < j->pfirst[tt] + j->nparts[tt]; i++) {
            const float *slot = j->partial + (size_t) i * nh * (hd + 2);
            mx = fmaxf(mx, slot[(size_t) nh * hd + h]);
        }
        for (e = 0; e < hd; e++) {
            dst[e] = 0.0f;
        }
        for (i = j->pfirst[tt]; i < j->pfirst[tt] + j->nparts[tt]; i++) {
            const float *slot = j->partial + (size_t) i * nh * (hd + 2);
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
    int              nkv, rc, nt, k;
    int              tile;
    int32_t          maxlen;
    size_t           sz_items, sz_first, sz_part, sz_sc, sz_o, sz_rows, sz_kt;
    size_t           need;
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
    /* tiles of a prefill chunk: with the K blocks transposed (kernels
     * that have them, blocks of up to 16 positions); else only for Q8_0
     * pages, whose rows the kernels would convert once per token */
    if (c->kern.attn_scores_kt != NULL && kv->block_size <= 16) {
        tile = TILE;
    } else {
        tile = kv->type == LLM_Q8_0 ? TILE_CONVERTED : 1;
    }
    j.tile = tile;
    j.kt_size = tile == TILE ? (size_t) ((j.hd + 15) & ~15) * 16 : 0;

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
    sz_first = align64(2 * ((size_t) T + 1) * sizeof(int32_t));
    sz_part = align64((size_t) parts * j.nh * (j.hd + 2) * sizeof(float));
    sz_sc = align64((size_t) c->n_threads * tile * j.nh * j.s_stride
                    * sizeof(float));
    sz_o = align64((size_t) c->n_threads * tile * j.nh * (j.hd + 2)
                   * sizeof(float));
    sz_rows = align64((size_t) c->n_threads * kv->block_size * nkv * j.hd
                      * sizeof(float));
    sz_kt = (size_t) c->n_threads * j.kt_size * sizeof(float);
    need = sz_items + sz_first + sz_part + sz_sc + sz_o + sz_rows + sz_kt;
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
    j.pfirst = (int32_t *) (mem + sz_items);
    j.nparts = j.pfirst + T + 1;
    j.partial = (float *) (mem + sz_items + sz_first);
    j.scores = (float *) (mem + sz_items + sz_first + sz_part);
    j.obuf = (float *) (mem + sz_items + sz_first + sz_part + sz_sc);
    j.rows = (float *) (mem + sz_items + sz_first + sz_part + sz_sc + sz_o);
    j.kt = (float *) (mem + sz_items + sz_first + sz_part + sz_sc + sz_o
                      + sz_rows);

    for (j.t0 = 0; j.t0 < T; j.t0 = j.t1) {
        int64_t used = 0;
        int     split = 0;

        /* the wave: tiles while their partials fit (at least one) */
        n_items = 0;
        for (j.t1 = j.t0; j.t1 < T; j.t1 += nt) {
            int32_t len = b->pos[j.t1] + 1, j0;
            int64_t ranges = (len + RANGE - 1) / RANGE;

            /* the tile: the next tokens of the same sequence at the next
             * positions, with as many ranges */
            for (nt = 1; nt < tile && j.t1 + nt < T
                         && b->tok_seq[j.t1 + nt] == b->tok_seq[j.t1]
                         && b->pos[j.t1 + nt] == b->pos[j.t1] + nt
                         && (b->pos[j.t1 + nt] + RANGE) / RANGE == ranges
                         && (ranges < 2 || (nt + 1) * ranges
                                           <= MAX_PARTIALS); nt++)
            {
            }
            if (j.t1 > j.t0 && ranges > 1
                && used + nt * ranges > MAX_PARTIALS)
            {
                break;
            }
            for (k = 0; k < nt; k++) {
                j.pfirst[j.t1 - j.t0 + k] = ranges > 1
                    ? (int32_t) (used + k * ranges) : -1;
                j.nparts[j.t1 - j.t0 + k] = (int32_t) ranges;
            }
            for (j0 = 0; j0 < len + nt - 1; j0 += RANGE) {
                attn_item *it = &j.items[n_items++];
                it->t = j.t1;
                it->nt = nt;
                it->j0 = j0;
                it->j1 = j0 + RANGE < len + nt - 1 ? j0 + RANGE
                                                   : len + nt - 1;
                it->part = ranges > 1 ? (int32_t) (used + j0 / RANGE) : -1;
                it->ranges = (int32_t) ranges;
            }
            used += ranges > 1 ? nt * ranges : 0;
            split |= ranges > 1;
        }
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
