/*
 * Segmented multi-LoRA on the CPU (backend op `lora`, see backend.h):
 * for every segment of rows sharing an adapter,
 *
 *   shrink:  t[n, r]    = x[n, in] A[r, in]^T        (SGMV "shrink")
 *   expand:  out[n, o] += scale * t[n, r] B[o, r]^T   (SGMV "expand")
 *
 * One trip through the thread pool per call, for every segment of every
 * output of the call (q, k and v share one call, as do gate and up): the
 * work items are a segment's rows in chunks, each shrunk then expanded by
 * one thread, and the threads take contiguous runs of items of about
 * equal cost.  A decode step with many adapters is a few thousand small
 * items, so one dispatch instead of two per projection matters; an item
 * reads its A and B rows once per LORA_ROWS rows while they are in L1.
 * Ranks differ per segment; nothing is padded.
 *
 * Weights are f32, B [out, r], or f16 with B transposed, [r, out]
 * (seg->type; the adapter pool stores f16 on this backend, lora_f16 =
 * 1), or int8 with B transposed and a scale per row of A and of B^T
 * (LLM_LORA_I8, lora_i8 = 1, when the operator asks for it): decoding
 * with many distinct adapters reads every adapter's A and B once per
 * step, so the step is bound by those bytes; f16 halves them, int8
 * halves them again, and B^T lets expand stream its rows.  Sums are f32
 * in every case, and a row's sums do not depend on the other rows of
 * the call.
 *
 * The row kernels below are the portable ones; lora_avx512.c has the
 * same with AVX-512 (F16C conversions), chosen by the ISA at run time.
 */
#include "cpu.h"

#include <string.h>

#define LORA_ROWS  4        /* rows per pass over one A row */
#define LORA_CHUNK 32       /* most rows of one work item */


/* Row kernels: shrink: t[r * ts] = dot(x[r], a) for r < n (n <= 4);
 * expand: out[r * os + o] += scale * dot(t[r * rank ...], B row o) for
 * o in [o0, o1) and the n rows of a segment; B has od rows. */
typedef void (*lora_shrink_fn)(const void *a, int type, int64_t in,
                               const float *const *x, int n, float *t,
                               int64_t ts);
typedef void (*lora_expand_fn)(const void *b, int type, int rank,
                               int64_t od, const float *t, int n,
                               float scale, float *out, int64_t os,
                               int64_t o0, int64_t o1);

void llm_cpu_lora_shrink_avx512(const void *a, int type, int64_t in,
                                const float *const *x, int n, float *t,
                                int64_t ts);
void llm_cpu_lora_expand_avx512(const void *b, int type, int rank,
                                int64_t od, const float *t, int n,
                                float scale, float *out, int64_t os,
                                int64_t o0, int64_t o1);


/* A work item: rows [row0, row0 + rows) of one segment, shrunk then
 * expanded by one thread. */
typedef struct {
    int32_t             seg;
    int32_t             row0;
    int32_t             rows;
    int32_t             pad;
    int64_t             cost0;      /* cost of the items before this one */
} lora_item;

typedef struct {
    const llm_lora_seg *segs;
    llm_tensor *const  *outs;
    const llm_tensor   *x;
    float              *t;          /* per segment [n, rank], packed */
    const int64_t      *t_off;      /* [n_segs] offset of each in t */
    const lora_item    *items;
    int                 n_items;
    int64_t             cost;       /* of all items */
    int64_t             in;
    lora_shrink_fn      shrink;
    lora_expand_fn      expand;
} lora_task;


/* ---- portable row kernels ----------------------------------------- */

/* Element i of w; int8 unscaled (the row scales are applied around the
 * kernels, in lora_item_run). */
static float
weight_at(const void *w, int type, int64_t i)
{
    switch (type) {
    case LLM_F16:
        return llm_f16_to_f32(((const uint16_t *) w)[i]);
    case LLM_LORA_I8:
        return (float) ((const int8_t *) w)[i];
    default:
        return ((const float *) w)[i];
    }
}


static void
shrink_scalar(const void *a, int type, int64_t in, const float *const *x,
              int n, float *t, int64_t ts)
{
    /* eight partial sums per row: lets the compiler vectorise and keeps
     * the result independent of the thread split */
    float   s[LORA_ROWS][8];
    int64_t i;
    int     r, k;

    memset(s, 0, sizeof(s));
    for (i = 0; i + 8 <= in; i += 8) {
        float w[8];

        for (k = 0; k < 8; k++) {
            w[k] = weight_at(a, type, i + k);
        }
        for (r = 0; r < n; r++) {
            for (k = 0; k < 8; k++) {
                s[r][k] += w[k] * x[r][i + k];
            }
        }
    }
    for (; i < in; i++) {
        float w = weight_at(a, type, i);

        for (r = 0; r < n; r++) {
            s[r][0] += w * x[r][i];
        }
    }
    for (r = 0; r < n; r++) {
        t[r * ts] = ((s[r][0] + s[r][1]) + (s[r][2] + s[r][3]))
                    + ((s[r][4] + s[r][5]) + (s[r][6] + s[r][7]));
    }
}


static void
expand_scalar(const void *b, int type, int rank, int64_t od, const float *t,
              int n, float scale, float *out, int64_t os, int64_t o0,
              int64_t o1)
{
    int64_t o;
    int     j, r;

    for (r = 0; r < n; r++) {
        for (o = o0; o < o1; o++) {
            float sum = 0.0f;

            for (j = 0; j < rank; j++) {
                /* f16, int8: B^T, [rank, od] */
                sum += t[r * rank + j]
                       * weight_at(b, type, type == LLM_F32 ? o * rank + j
                                                            : j * od + o);
            }
            out[r * os + o] += scale * sum;
        }
    }
}


/* ---- one pass: items split between the threads ------------------ */

static size_t
elt_size(int type)
{
    return type == LLM_F16 ? 2 : type == LLM_LORA_I8 ? 1 : 4;
}


/* Runs item `it`; `next` (or NULL) is the item the thread runs after it. */
static void
lora_item_run(const lora_task *tk, const lora_item *it,
              const lora_item *next)
{
    const llm_lora_seg *sg = &tk->segs[it->seg];
    const llm_tensor   *out = tk->outs[sg->out];
    const float        *xr[LORA_ROWS];
    float              *t = tk->t + tk->t_off[it->seg]
                            + (int64_t) it->row0 * sg->rank;
    float              *o0;
    size_t              esz = elt_size(sg->type);
    size_t              b_row = (size_t) out->ne[0] * esz;
    size_t              na = 0, na_step = 0;
    const uint8_t      *next_a = NULL;
    int64_t             j;
    int                 row, k, n;

    if (next != NULL) {
        const llm_lora_seg *ns = &tk->segs[next->seg];

        next_a = ns->a;
        na = (size_t) ns->rank * tk->in * elt_size(ns->type);
        na_step = (na + sg->rank - 1) / sg->rank;
    }

    /* shrink: t[row, j] = x[row] . A[j], each A row once per LORA_ROWS;
     * meanwhile B's bytes are asked for, a rank's share per A row, and
     * so are the next item's A's.  A decode item is two short streams
     * (A, then B), each far too short for the hardware prefetcher to
     * reach full speed alone: this keeps streams going while A is read
     * (the LoRA terms of a 32-adapter decode step, on the 2-core VM of
     * bench/RESULTS.md, 2026-11-25: 10.8 ms without B's, 8.6 ms with;
     * the next A's then took int8 copies from 5.9 to 4.8 ms, f16 10.2 to
     * 10.1). */
    for (j = 0; j < sg->rank; j++) {
        const void *a = (const uint8_t *) sg->a + (size_t) j * tk->in * esz;

        for (row = 0; row < it->rows; row += n) {
            n = it->rows - row < LORA_ROWS ? it->rows - row : LORA_ROWS;
            for (k = 0; k < n; k++) {
                xr[k] = (const float *) ((const uint8_t *) tk->x->data
                                         + (size_t) (sg->first + it->row0
                                                     + row + k)
                                           * tk->x->nb);
            }
            tk->shrink(a, sg->type, tk->in, xr, n,
                       t + (int64_t) row * sg->rank + j, sg->rank);
        }
        llm_cpu_prefetch((const uint8_t *) sg->b + (size_t) j * b_row,
                         b_row);
        if ((size_t) j * na_step < na) {
            size_t off = (size_t) j * na_step;

            llm_cpu_prefetch(next_a + off,
                             na - off < na_step ? na - off : na_step);
        }
    }
    if (sg->type == LLM_LORA_I8) {
        /* int8 rows: t[row, j] times A row j's scale, and times B^T row
         * j's scale, which expand would otherwise apply per output */
        for (row = 0; row < it->rows; row++) {
            for (j = 0; j < sg->rank; j++) {
                t[(int64_t) row * sg->rank + j] *= sg->a_scale[j]
                                                   * sg->b_scale[j];
            }
        }
    }

    /* expand: out[row] += scale * t[row] B^T over every output */
    o0 = (float *) ((uint8_t *) out->data
                    + (size_t) (sg->first + it->row0) * out->nb);
    tk->expand(sg->b, sg->type, sg->rank, out->ne[0], t, it->rows,
               sg->scale, o0, (int64_t) (out->nb / sizeof(float)), 0,
               out->ne[0]);
}


/* Thread c takes the items whose cost starts in its share of the total:
 * contiguous runs of about equal bytes and flops.  Which thread runs an
 * item changes no number (a row's sums never depend on the split). */
static void
lora_chunk(void *arg, int c, int nc)
{
    lora_task *tk = arg;
    int        i;

    for (i = 0; i < tk->n_items; i++) {
        int64_t owner = tk->items[i].cost0 * nc / tk->cost;

        if (owner > c) {
            break;
        }
        if (owner == c) {
            lora_item_run(tk, &tk->items[i],
                          i + 1 < tk->n_items
                          && tk->items[i + 1].cost0 * nc / tk->cost == c
                          ? &tk->items[i + 1] : NULL);
        }
    }
}


int
llm_cpu_lora(llm_cpu_ctx *c, llm_tensor *const *outs, int n_outs,
             const llm_tensor *x, const llm_lora_seg *segs, int n_segs)
{
    lora_task  tk;
    lora_item *items;
    int64_t   *t_off, t_total = 0, cost = 0, per;
    size_t     off_bytes, item_bytes;
    int        s, i, nth, chunk, n_items = 0, row;

    if (n_segs <= 0) {
        return 0;
    }
    if (x->type != LLM_F32) {
        return llm_cpu_fail(c, LLM_EINVAL, "lora: x must be f32");
    }
    for (i = 0; i < n_outs; i++) {
        if (outs[i]->type != LLM_F32 || outs[i]->ne[1] != x->ne[1]) {
            return llm_cpu_fail(c, LLM_EINVAL, "lora: output %d must be "
                                "f32 with the rows of x", i);
        }
    }
    nth = c->n_threads;
    for (s = 0; s < n_segs; s++) {
        if (segs[s].rank <= 0 || segs[s].n <= 0 || segs[s].first < 0
            || segs[s].first + segs[s].n > x->ne[1] || segs[s].a == NULL
            || segs[s].b == NULL || segs[s].out < 0 || segs[s].out >= n_outs)
        {
            return llm_cpu_fail(c, LLM_EINVAL, "lora: bad segment %d "
                                "(rows %d+%d of %lld, rank %d, output %d)",
                                s, segs[s].first, segs[s].n,
                                (long long) x->ne[1], segs[s].rank,
                                segs[s].out);
        }
        if (segs[s].type != LLM_F32 && segs[s].type != LLM_F16
            && !(segs[s].type == LLM_LORA_I8 && segs[s].a_scale != NULL
                 && segs[s].b_scale != NULL))
        {
            return llm_cpu_fail(c, LLM_EINVAL, "lora: segment %d: weights "
                                "of type %d (f32, f16, or int8 with row "
                                "scales expected)", s, segs[s].type);
        }
        t_total += (int64_t) segs[s].n * segs[s].rank;
        n_items += (segs[s].n + LORA_ROWS - 1) / LORA_ROWS;
    }

    /* scratch: t offsets, items, then t, each 64-byte aligned */
    off_bytes = ((size_t) n_segs * sizeof(int64_t) + 63) / 64 * 64;
    item_bytes = ((size_t) n_items * sizeof(lora_item) + 63) / 64 * 64;
    t_off = llm_cpu_scratch(c, off_bytes + item_bytes
                               + (size_t) t_total * sizeof(float));
    if (t_off == NULL) {
        return LLM_ENOMEM;
    }
    items = (lora_item *) ((uint8_t *) t_off + off_bytes);
    memset(&tk, 0, sizeof(tk));
    tk.t = (float *) ((uint8_t *) items + item_bytes);

    /* items: a segment's rows in chunks of a multiple of LORA_ROWS, about
     * one per thread (a chunk re-reads the segment's A and B, from cache
     * when it is not the first), at most LORA_CHUNK rows */
    n_items = 0;
    for (s = 0, t_total = 0; s < n_segs; s++) {
        const llm_lora_seg *sg = &segs[s];
        int64_t             w = (int64_t) sg->rank
                                * (x->ne[0] + outs[sg->out]->ne[0]);

        t_off[s] = t_total;
        t_total += (int64_t) sg->n * sg->rank;
        chunk = (sg->n + nth - 1) / nth;
        chunk = (chunk + LORA_ROWS - 1) / LORA_ROWS * LORA_ROWS;
        chunk = chunk > LORA_CHUNK ? LORA_CHUNK : chunk;
        for (row = 0; row < sg->n; row += chunk) {
            items[n_items].seg = s;
            items[n_items].row0 = row;
            items[n_items].rows = sg->n - row < chunk ? sg->n - row : chunk;
            items[n_items].pad = 0;
            items[n_items].cost0 = cost;
            /* weight bytes to stream, plus the rows' multiply-adds */
            per = w * ((int64_t) elt_size(sg->type) * 8
                       + items[n_items].rows);
            cost += per;
            n_items++;
        }
    }
    tk.segs = segs;
    tk.outs = outs;
    tk.x = x;
    tk.t_off = t_off;
    tk.items = items;
    tk.n_items = n_items;
    tk.cost = cost;
    tk.in = x->ne[0];
    if (c->isa >= LLM_ISA_AVX512) {
        tk.shrink = llm_cpu_lora_shrink_avx512;
        tk.expand = llm_cpu_lora_expand_avx512;
    } else {
        tk.shrink = shrink_scalar;
        tk.expand = expand_scalar;
    }

    llm_cpu_pool_run(c->pool, lora_chunk, &tk,
                     n_items < nth ? n_items : nth);
    return 0;
}
