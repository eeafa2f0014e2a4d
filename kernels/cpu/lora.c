/*
 * Segmented multi-LoRA on the CPU (backend op `lora`, see backend.h):
 * for every segment of rows sharing an adapter,
 *
 *   shrink:  t[n, r]    = x[n, in] A[r, in]^T        (SGMV "shrink")
 *   expand:  out[n, o] += scale * t[n, r] B[o, r]^T   (SGMV "expand")
 *
 * Both passes cover all segments of the call in one trip through the
 * thread pool: shrink splits the (segment, rank row) pairs, expand splits
 * the output features, so each A and B row is read once per call however
 * many rows its segment has (rows go by in blocks of LORA_ROWS while the
 * weight row is in L1).  Ranks differ per segment; nothing is padded.
 *
 * Weights are f32, B [out, r], or f16 with B transposed, [r, out]
 * (seg->type; the adapter pool stores f16 on this backend, lora_f16 =
 * 1): decoding with many distinct adapters reads every adapter's A and B
 * once per step, so the step is bound by those bytes; f16 halves them
 * and B^T lets expand stream its rows.  Sums are f32 either way, and a
 * row's sums do not depend on the other rows of the call.
 *
 * The row kernels below are the portable ones; lora_avx512.c has the
 * same with AVX-512 (F16C conversions), chosen by the ISA at run time.
 */
#include "cpu.h"

#include <string.h>

#define LORA_ROWS  4        /* rows per pass over one A row */


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


typedef struct {
    const llm_lora_seg *segs;
    int                 n_segs;
    const llm_tensor   *x;
    llm_tensor         *out;
    float              *t;          /* per segment [n, rank], packed */
    const int64_t      *t_off;      /* [n_segs] offset of each in t */
    const int64_t      *pair_off;   /* [n_segs + 1] prefix of ranks */
    int64_t             n_pairs;
    int64_t             in, o;
    lora_shrink_fn      shrink;
    lora_expand_fn      expand;
} lora_task;


/* ---- portable row kernels ----------------------------------------- */

static float
weight_at(const void *w, int type, int64_t i)
{
    return type == LLM_F16 ? llm_f16_to_f32(((const uint16_t *) w)[i])
                           : ((const float *) w)[i];
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
                /* f16: B^T, [rank, od] */
                sum += t[r * rank + j]
                       * weight_at(b, type, type == LLM_F16 ? j * od + o
                                                            : o * rank + j);
            }
            out[r * os + o] += scale * sum;
        }
    }
}


/* ---- the two passes ------------------------------------------------ */

static size_t
elt_size(int type)
{
    return type == LLM_F16 ? 2 : 4;
}


static void
lora_shrink_chunk(void *arg, int c, int nc)
{
    lora_task   *tk = arg;
    int64_t      p0, p1, p;
    int          s = 0;

    llm_cpu_split(tk->n_pairs, c, nc, 1, &p0, &p1);
    for (p = p0; p < p1; p++) {
        const llm_lora_seg *sg;
        const float        *xr[LORA_ROWS];
        const void         *a;
        int64_t             j, row;
        int                 k, n;

        while (p >= tk->pair_off[s + 1]) {
            s++;
        }
        sg = &tk->segs[s];
        j = p - tk->pair_off[s];
        a = (const uint8_t *) sg->a + (size_t) j * tk->in
                                      * elt_size(sg->type);
        for (row = 0; row < sg->n; row += n) {
            n = sg->n - row < LORA_ROWS ? (int) (sg->n - row) : LORA_ROWS;
            for (k = 0; k < n; k++) {
                xr[k] = (const float *) ((const uint8_t *) tk->x->data
                                         + (size_t) (sg->first + row + k)
                                           * tk->x->nb);
            }
            tk->shrink(a, sg->type, tk->in, xr, n,
                       tk->t + tk->t_off[s] + row * sg->rank + j, sg->rank);
        }
    }
}


static void
lora_expand_chunk(void *arg, int c, int nc)
{
    lora_task *tk = arg;
    int64_t    j0, j1;
    int        s;

    llm_cpu_split(tk->o, c, nc, 16, &j0, &j1);
    if (j0 >= j1) {
        return;
    }
    for (s = 0; s < tk->n_segs; s++) {
        const llm_lora_seg *sg = &tk->segs[s];
        float              *out0 = (float *) ((uint8_t *) tk->out->data
                                              + (size_t) sg->first
                                                * tk->out->nb);

        tk->expand(sg->b, sg->type, sg->rank, tk->o, tk->t + tk->t_off[s],
                   sg->n, sg->scale, out0,
                   (int64_t) (tk->out->nb / sizeof(float)), j0, j1);
    }
}


int
llm_cpu_lora(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *x,
             const llm_lora_seg *segs, int n_segs)
{
    lora_task  tk;
    int64_t   *offs, t_total = 0;
    size_t     need;
    int        s, nth;

    if (n_segs <= 0) {
        return 0;
    }
    if (x->type != LLM_F32 || out->type != LLM_F32 || x->ne[1] != out->ne[1])
    {
        return llm_cpu_fail(c, LLM_EINVAL, "lora: x and out must be f32 "
                            "with the same rows");
    }
    for (s = 0; s < n_segs; s++) {
        if (segs[s].rank <= 0 || segs[s].n <= 0 || segs[s].first < 0
            || segs[s].first + segs[s].n > x->ne[1] || segs[s].a == NULL
            || segs[s].b == NULL)
        {
            return llm_cpu_fail(c, LLM_EINVAL, "lora: bad segment %d "
                                "(rows %d+%d of %lld, rank %d)", s,
                                segs[s].first, segs[s].n,
                                (long long) x->ne[1], segs[s].rank);
        }
        if (segs[s].type != LLM_F32 && segs[s].type != LLM_F16) {
            return llm_cpu_fail(c, LLM_EINVAL, "lora: segment %d: weights "
                                "of type %d (f32 or f16 expected)", s,
                                segs[s].type);
        }
        t_total += (int64_t) segs[s].n * segs[s].rank;
    }

    /* scratch: offsets (2 n_segs + 1) then t, 64-byte aligned */
    need = ((size_t) (2 * n_segs + 1) * sizeof(int64_t) + 63) / 64 * 64
           + (size_t) t_total * sizeof(float);
    offs = llm_cpu_scratch(c, need);
    if (offs == NULL) {
        return LLM_ENOMEM;
    }
    memset(&tk, 0, sizeof(tk));
    tk.t_off = offs;
    tk.pair_off = offs + n_segs;
    tk.t = (float *) ((uint8_t *) offs
                      + ((size_t) (2 * n_segs + 1) * sizeof(int64_t) + 63)
                        / 64 * 64);
    offs[n_segs] = 0;
    for (s = 0, t_total = 0; s < n_segs; s++) {
        offs[s] = t_total;                              /* t_off */
        t_total += (int64_t) segs[s].n * segs[s].rank;
        offs[n_segs + s + 1] = offs[n_segs + s] + segs[s].rank; /* pairs */
    }
    tk.segs = segs;
    tk.n_segs = n_segs;
    tk.x = x;
    tk.out = out;
    tk.n_pairs = tk.pair_off[n_segs];
    tk.in = x->ne[0];
    tk.o = out->ne[0];
    if (c->isa >= LLM_ISA_AVX512) {
        tk.shrink = llm_cpu_lora_shrink_avx512;
        tk.expand = llm_cpu_lora_expand_avx512;
    } else {
        tk.shrink = shrink_scalar;
        tk.expand = expand_scalar;
    }

    nth = c->n_threads;
    llm_cpu_pool_run(c->pool, lora_shrink_chunk, &tk,
                     (int) (tk.n_pairs < nth ? tk.n_pairs : nth));
    llm_cpu_pool_run(c->pool, lora_expand_chunk, &tk, nth);
    return 0;
}
