/*
 * Multi-LoRA deltas of the projections sharing x, segment by segment
 * (each segment is one adapter's contiguous rows of the batch, for one
 * of the outputs):
 *
 *     outs[out][t] += scale * (x[t] A^T) B^T,   t in [first, first + n)
 *
 * Two kernels (lora.cuh), shrink then expand, each launched once per
 * LORA_LAUNCH_SEGS segments with the segments in its parameters: a
 * decode step with 32 adapters is a few launches per projection group,
 * not a pair of cuBLAS calls per segment, and nothing is uploaded.
 * Ranks differ between segments; nothing is padded.
 *
 * Weights: f32 (B [out, rank]), or f16 or int8 with B transposed, [rank,
 * out] (lora_f16, lora_i8: the adapter pool stores them so), as on the
 * CPU backend.
 */
#include "cuda_internal.cuh"
#include "lora.cuh"

/* kernel parameters: 4 KiB on every toolkit and device we build for */
static_assert(sizeof(llm_cuda_lora_args) <= 4096,
              "LORA_LAUNCH_SEGS too large for a launch's parameters");


/* Segments' element type and layout as template arguments. */
template <typename W, bool BT>
static cudaError_t
lora_launch_typed(const llm_cuda_lora_args *args, int vec, int max_rows,
                  int max_od, cudaStream_t stream)
{
    unsigned tiles = (unsigned) ((max_rows + LORA_TILE_ROWS - 1)
                                 / LORA_TILE_ROWS);
    dim3     shrink_grid((unsigned) args->j0[args->n_segs], tiles);
    dim3     expand_grid((unsigned) args->n_segs, tiles,
                         (unsigned) ((max_od + LORA_EXPAND_THREADS - 1)
                                     / LORA_EXPAND_THREADS));

    if (vec) {
        lora_shrink_kernel<W, true><<<shrink_grid, LORA_SHRINK_THREADS, 0,
                                      stream>>>(*args);
    } else {
        lora_shrink_kernel<W, false><<<shrink_grid, LORA_SHRINK_THREADS, 0,
                                       stream>>>(*args);
    }
    CUDA_TRY(cudaGetLastError());
    lora_expand_kernel<W, BT><<<expand_grid, LORA_EXPAND_THREADS, 0,
                                stream>>>(*args);
    return cudaGetLastError();
}


/* One launch pair for args' segments, all of weight type `type`. */
static cudaError_t
launch_lora(const llm_cuda_lora_args *args, int type, cudaStream_t stream)
{
    int    i, vec, max_rows = 0, max_od = 0;
    size_t align = type == LLM_LORA_I8 ? 8 : 16;

    CUDA_CHECK_ARG(args->n_segs >= 0 && args->n_segs <= LORA_LAUNCH_SEGS
                   && args->in >= 0);
    if (args->n_segs == 0 || args->in == 0) {
        return cudaSuccess;
    }
    /* 16-byte loads of x and of A's rows (8-byte for int8) */
    vec = args->in % 8 == 0 && (uintptr_t) args->x % 16 == 0
          && args->x_ld % 4 == 0;
    for (i = 0; i < args->n_segs; i++) {
        const llm_cuda_lora_seg *s = &args->seg[i];

        CUDA_CHECK_ARG(args->j0[i + 1] - args->j0[i] == s->rank);
        CUDA_CHECK_ARG(s->n >= 1 && s->rank >= 1
                       && s->rank <= LORA_MAX_RANK && s->od >= 0
                       && s->a != NULL && s->b != NULL && s->out != NULL
                       && (type != LLM_LORA_I8
                           || (s->a_scale != NULL && s->b_scale != NULL)));
        vec = vec && (uintptr_t) s->a % align == 0;
        max_rows = s->n > max_rows ? s->n : max_rows;
        max_od = s->od > max_od ? s->od : max_od;
    }
    CUDA_CHECK_ARG((max_rows + LORA_TILE_ROWS - 1) / LORA_TILE_ROWS
                   <= 65535);
    if (max_od == 0) {
        return cudaSuccess;
    }
    switch (type) {
    case LLM_F32:
        return lora_launch_typed<float, false>(args, vec, max_rows, max_od,
                                               stream);
    case LLM_F16:
        return lora_launch_typed<__half, true>(args, vec, max_rows, max_od,
                                               stream);
    case LLM_LORA_I8:
        return lora_launch_typed<int8_t, true>(args, vec, max_rows, max_od,
                                               stream);
    default:
        return cudaErrorNotSupported;
    }
}


int
llm_cuda_lora(llm_cuda_ctx *c, llm_tensor *const *outs, int n_outs,
              const llm_tensor *x, const llm_lora_seg *segs, int n_segs)
{
    llm_cuda_lora_args  args;
    size_t              need = 0;
    float              *t;
    int64_t             T;
    int                 i, rc, type;

    if ((rc = llm_cuda_check_f32(c, x, "lora", "x", -1, -1)) != 0) {
        return rc;
    }
    for (i = 0; i < n_outs; i++) {
        if ((rc = llm_cuda_check_f32(c, outs[i], "lora", "out", -1,
                                     x->ne[1])) != 0)
        {
            return rc;
        }
    }
    if (n_segs < 0 || (n_segs > 0 && segs == NULL)) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: lora: bad segments");
    }
    T = x->ne[1];
    for (i = 0; i < n_segs; i++) {
        const llm_lora_seg *g = &segs[i];

        if (g->type != LLM_F32 && g->type != LLM_F16
            && !(g->type == LLM_LORA_I8 && g->a_scale != NULL
                 && g->b_scale != NULL))
        {
            return llm_cuda_fail(c, LLM_EUNSUP, "cuda: lora: segment %d:"
                                 " weights of type %d (f32, f16, or int8 "
                                 "with row scales expected)", i,
                                 (int) g->type);
        }
        if (g->first < 0 || g->n < 0 || (int64_t) g->first + g->n > T
            || g->rank <= 0 || g->rank > LORA_MAX_RANK || g->out < 0
            || g->out >= n_outs
            || (g->n > 0 && (g->a == NULL || g->b == NULL)))
        {
            return llm_cuda_fail(c, LLM_EINVAL, "cuda: lora: segment %d"
                                 " (rows %d + %d of %lld, rank %d, output "
                                 "%d) is bad", i, (int) g->first,
                                 (int) g->n, (long long) T, (int) g->rank,
                                 (int) g->out);
        }
        need += (size_t) g->n * (size_t) g->rank;
    }
    if (need == 0 || x->ne[0] == 0) {
        return 0;
    }
    if (x->ne[0] > INT32_MAX || x->nb / 4 > UINT32_MAX) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: lora: x too wide");
    }
    t = (float *) llm_cuda_buf_get(c, &c->lora_scratch,
                                   need * sizeof(float), "lora");
    if (t == NULL) {
        return LLM_ENOMEM;
    }

    /* launches of up to LORA_LAUNCH_SEGS segments of one weight type; t
     * holds every segment's rows, so no launch waits for another */
    memset(&args, 0, sizeof(args));
    args.x = (const float *) x->data;
    args.t = t;
    args.x_ld = (uint32_t) (x->nb / 4 < (size_t) x->ne[0]
                            ? (size_t) x->ne[0] : x->nb / 4);
    args.in = (int32_t) x->ne[0];
    need = 0;
    type = -1;
    for (i = 0; i <= n_segs; i++) {
        const llm_lora_seg *g = i < n_segs ? &segs[i] : NULL;

        if (args.n_segs > 0
            && (g == NULL || g->type != type
                || args.n_segs == LORA_LAUNCH_SEGS))
        {
            rc = llm_cuda_check(c, launch_lora(&args, type, c->stream),
                                "lora", "launch");
            if (rc != 0) {
                return rc;
            }
            args.n_segs = 0;
            args.j0[0] = 0;
        }
        if (g == NULL || g->n == 0) {
            continue;
        }
        {
            const llm_tensor  *out = outs[g->out];
            llm_cuda_lora_seg *s = &args.seg[args.n_segs++];
            size_t             ld = out->nb / 4;

            ld = ld < (size_t) out->ne[0] ? (size_t) out->ne[0] : ld;
            type = g->type;
            s->a = g->a;
            s->b = g->b;
            s->a_scale = g->type == LLM_LORA_I8 ? g->a_scale : NULL;
            s->b_scale = g->type == LLM_LORA_I8 ? g->b_scale : NULL;
            s->out = (float *) ((uint8_t *) out->data
                                + (size_t) g->first * out->nb);
            s->t_off = (int64_t) need;
            s->out_ld = (uint32_t) ld;
            s->first = g->first;
            s->n = g->n;
            s->rank = g->rank;
            s->od = (int32_t) out->ne[0];
            s->scale = g->scale;
            args.j0[args.n_segs] = args.j0[args.n_segs - 1] + g->rank;
            need += (size_t) g->n * (size_t) g->rank;
        }
    }
    return 0;
}
