/*
 * Causal attention over the paged KV cache.
 *
 * Token t of sequence s attends to positions 0 .. pos[t] of s (kv_store
 * has written them, this step's too).  Query head h reads KV head
 * h / g, g = n_heads / n_kv_heads.  Scores are scale * q.k in f32, the
 * softmax subtracts the running maximum, every sum is f32, K and V are
 * read as F16 or F32 pages through the sequence's block table: the CPU
 * backend's numbers, up to the order of the sums.
 *
 * Two kernels, chosen per run of a sequence's tokens in the batch:
 *
 *   split-K (decode, flash-decoding style): one block per (token, KV head
 *     and up to GT of its query heads, range of positions).  Each thread
 *     scores one position per chunk of 128 against the GT query heads
 *     (the K row is read once for them), the chunk's softmax is folded
 *     into running (max m, sum l) per head, and each thread accumulates
 *     output columns.  Long contexts with few tokens are split into
 *     ranges; each range leaves (o unnormalized, m, l) and a merge kernel
 *     combines them: M = max m_i, out = sum o_i e^(m_i-M) / sum l_i
 *     e^(m_i-M).
 *
 *   tiled (prefill chunks): one block per (tile of 32 query rows, KV
 *     head), a row being one (token, query head of the group) of one
 *     sequence, so a K/V tile in shared memory serves every query head
 *     of the group and 32 / g tokens.  K/V tiles of 32 positions; S = Q
 *     K^T, online softmax, O += P V, all f32 in shared memory and
 *     registers; rows mask positions past their own token.
 *
 * Supported head sizes: 32, 64, 80, 96, 128, 256 (a switch; others are
 * cudaErrorNotSupported).
 */
#include "cuda_internal.cuh"
#include "device.cuh"
#include "attention.cuh"

#include <math.h>
#include <string.h>


template <typename KV, int HD, int GT>
static cudaError_t
split_launch(const llm_cuda_attn_args *a, const int32_t *dec, int n_dec,
             int n_split, int split_len, float *part, cudaStream_t stream)
{
    const int g = a->n_heads / a->n_kv_heads;
    const int n_hgrp = (g + GT - 1) / GT;
    int       d0, nd;

    /* grid.y is at most 65535: tokens in slices */
    for (d0 = 0; d0 < n_dec; d0 += GRID_Y_MAX) {
        float *pp = part != NULL
                    ? part + (size_t) d0 * a->n_heads * n_split * (HD + 2)
                    : NULL;

        nd = n_dec - d0 < GRID_Y_MAX ? n_dec - d0 : GRID_Y_MAX;
        attn_split_kernel<KV, HD, GT>
            <<<dim3(a->n_kv_heads * n_hgrp, nd, n_split), SPLIT_THREADS, 0,
               stream>>>(*a, dec + d0, n_split, split_len,
                         n_split > 1 ? pp : NULL);
        CUDA_TRY(cudaGetLastError());
        if (n_split > 1) {
            attn_merge_kernel<<<dim3(a->n_heads, nd), 128, 0, stream>>>(
                *a, dec + d0, n_split, split_len, pp);
            CUDA_TRY(cudaGetLastError());
        }
    }
    return cudaSuccess;
}


template <typename KV, int HD>
static cudaError_t
split_gt(const llm_cuda_attn_args *a, const int32_t *dec, int n_dec,
         int n_split, int split_len, float *part, cudaStream_t stream)
{
    int g = a->n_heads / a->n_kv_heads;

    /* query heads per block: the group, or slices of 8 */
    if (g == 1) {
        return split_launch<KV, HD, 1>(a, dec, n_dec, n_split, split_len,
                                       part, stream);
    }
    if (g <= 4) {
        return split_launch<KV, HD, 4>(a, dec, n_dec, n_split, split_len,
                                       part, stream);
    }
    return split_launch<KV, HD, 8>(a, dec, n_dec, n_split, split_len, part,
                                   stream);
}


template <typename KV>
static cudaError_t
split_hd(const llm_cuda_attn_args *a, const int32_t *dec, int n_dec,
         int n_split, int split_len, float *part, cudaStream_t stream)
{
    switch (a->head_dim) {
    case 32:
        return split_gt<KV, 32>(a, dec, n_dec, n_split, split_len, part,
                                stream);
    case 64:
        return split_gt<KV, 64>(a, dec, n_dec, n_split, split_len, part,
                                stream);
    case 80:
        return split_gt<KV, 80>(a, dec, n_dec, n_split, split_len, part,
                                stream);
    case 96:
        return split_gt<KV, 96>(a, dec, n_dec, n_split, split_len, part,
                                stream);
    case 128:
        return split_gt<KV, 128>(a, dec, n_dec, n_split, split_len, part,
                                 stream);
    case 256:
        return split_gt<KV, 256>(a, dec, n_dec, n_split, split_len, part,
                                 stream);
    default:
        return cudaErrorNotSupported;
    }
}


static cudaError_t
check_attn_args(const llm_cuda_attn_args *a)
{
    CUDA_CHECK_ARG(a != NULL && a->q != NULL && a->out != NULL
                   && a->k_pages != NULL && a->v_pages != NULL
                   && a->pos != NULL && a->tok_seq != NULL
                   && a->block_table != NULL);
    CUDA_CHECK_ARG(a->n_kv_heads > 0 && a->n_heads > 0
                   && a->n_heads % a->n_kv_heads == 0
                   && a->block_size > 0 && a->max_blocks > 0);
    /* K/V rows are read 16 bytes at a time */
    CUDA_CHECK_ARG((uintptr_t) a->k_pages % 16 == 0
                   && (uintptr_t) a->v_pages % 16 == 0);
    if (a->kv_type != LLM_F16 && a->kv_type != LLM_F32) {
        return cudaErrorNotSupported;
    }
    return cudaSuccess;
}


cudaError_t
launch_attn_split(const llm_cuda_attn_args *a, const int32_t *dec, int n_dec,
                  int n_split, int split_len, float *part,
                  cudaStream_t stream)
{
    CUDA_TRY(check_attn_args(a));
    CUDA_CHECK_ARG(n_dec >= 0 && n_split >= 1 && n_split <= 65535
                   && split_len > 0);
    if (n_dec == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(dec != NULL && (n_split == 1 || part != NULL));
    if (a->kv_type == LLM_F16) {
        return split_hd<__half>(a, dec, n_dec, n_split, split_len, part,
                                stream);
    }
    return split_hd<float>(a, dec, n_dec, n_split, split_len, part, stream);
}


template <typename KV, int HD>
static cudaError_t
tiled_launch(const llm_cuda_attn_args *a, const int4 *tiles, int n_tiles,
             size_t smem_optin, cudaStream_t stream)
{
    size_t smem = tiled_smem<HD>();

    if (smem > smem_optin) {
        return cudaErrorNotSupported;
    }
    if (smem > 48 * 1024) {
        CUDA_TRY(cudaFuncSetAttribute(
                     attn_tiled_kernel<KV, HD>,
                     cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem));
    }
    attn_tiled_kernel<KV, HD>
        <<<dim3(n_tiles, a->n_kv_heads), TILED_THREADS, smem, stream>>>(
            *a, tiles);
    return cudaGetLastError();
}


template <typename KV>
static cudaError_t
tiled_hd(const llm_cuda_attn_args *a, const int4 *tiles, int n_tiles,
         size_t smem_optin, cudaStream_t stream)
{
    switch (a->head_dim) {
    case 32:
        return tiled_launch<KV, 32>(a, tiles, n_tiles, smem_optin, stream);
    case 64:
        return tiled_launch<KV, 64>(a, tiles, n_tiles, smem_optin, stream);
    case 80:
        return tiled_launch<KV, 80>(a, tiles, n_tiles, smem_optin, stream);
    case 96:
        return tiled_launch<KV, 96>(a, tiles, n_tiles, smem_optin, stream);
    case 128:
        return tiled_launch<KV, 128>(a, tiles, n_tiles, smem_optin, stream);
    case 256:
        return tiled_launch<KV, 256>(a, tiles, n_tiles, smem_optin, stream);
    default:
        return cudaErrorNotSupported;
    }
}


cudaError_t
launch_attn_tiled(const llm_cuda_attn_args *a, const int4 *tiles,
                  int n_tiles, size_t smem_optin, cudaStream_t stream)
{
    CUDA_TRY(check_attn_args(a));
    CUDA_CHECK_ARG(n_tiles >= 0 && a->n_kv_heads <= GRID_Y_MAX);
    if (n_tiles == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(tiles != NULL);
    if (a->kv_type == LLM_F16) {
        return tiled_hd<__half>(a, tiles, n_tiles, smem_optin, stream);
    }
    return tiled_hd<float>(a, tiles, n_tiles, smem_optin, stream);
}


/* -------------------------------------------------------------- the op */

static int
supported_head_dim(int hd)
{
    return hd == 32 || hd == 64 || hd == 80 || hd == 96 || hd == 128
           || hd == 256;
}


/* Splits the batch between the kernels (once per step and group size)
 * and uploads the lists. */
static int
build_plan(llm_cuda_ctx *c, const llm_kv_pool *kv, int g)
{
    llm_cuda_attn_plan *p = &c->plan;
    const llm_batch    *b = &c->batch;
    int                 T = b->n_tokens, t, te, r0, n_tok, rows, i;
    int                 n_dec = 0, n_tiles = 0, gt, groups, maxlen = 0;
    int64_t             total = 0, target, len;
    size_t              cap, dec_ints;
    int32_t            *dec, *tiles;
    int                 rc;

    if (p->step == c->step && p->g == g && p->mode == c->attn_mode
        && p->nkv == kv->n_kv_heads)
    {
        return 0;
    }

    /* worst case: every token in the split list, or tiles of one row */
    cap = (size_t) T + 4 + 4 * ((size_t) T * g / TILE_Q + (size_t) T + 1);
    if (cap > p->host_cap) {
        void *n = llm_realloc(p->host, cap * sizeof(int32_t));
        if (n == NULL) {
            return llm_cuda_fail(c, LLM_ENOMEM, "cuda: attention: out of"
                                 " host memory");
        }
        p->host = (int32_t *) n;
        p->host_cap = cap;
    }
    dec = p->host;

    /* the split list first (counted), the tiles after it */
    for (t = 0; t < T; t = te) {
        for (te = t + 1; te < T && b->tok_seq[te] == b->tok_seq[t]; te++) {
        }
        n_tok = te - t;
        if (c->attn_mode == LLM_CUDA_ATTN_TILED
            || (c->attn_mode == LLM_CUDA_ATTN_AUTO
                && n_tok >= TILED_MIN_TOKENS))
        {
            continue;
        }
        for (i = t; i < te; i++) {
            dec[n_dec++] = i;
            len = (int64_t) b->pos[i] + 1;
            total += len;
            maxlen = len > maxlen ? (int) len : maxlen;
        }
    }
    dec_ints = ((size_t) n_dec + 3) & ~(size_t) 3;  /* int4 alignment */
    tiles = dec + dec_ints;
    for (t = 0; t < T; t = te) {
        for (te = t + 1; te < T && b->tok_seq[te] == b->tok_seq[t]; te++) {
        }
        n_tok = te - t;
        if (!(c->attn_mode == LLM_CUDA_ATTN_TILED
              || (c->attn_mode == LLM_CUDA_ATTN_AUTO
                  && n_tok >= TILED_MIN_TOKENS)))
        {
            continue;
        }
        rows = n_tok * g;
        for (r0 = 0; r0 < rows; r0 += TILE_Q) {
            int r_end = r0 + TILE_Q < rows ? r0 + TILE_Q : rows;
            int maxpos = 0;

            /* tokens t + r0 / g .. t + (r_end - 1) / g */
            for (i = t + r0 / g; i <= t + (r_end - 1) / g; i++) {
                maxpos = b->pos[i] > maxpos ? b->pos[i] : maxpos;
            }
            tiles[4 * n_tiles] = t;
            tiles[4 * n_tiles + 1] = n_tok;
            tiles[4 * n_tiles + 2] = r0;
            tiles[4 * n_tiles + 3] = maxpos + 1;
            n_tiles++;
        }
    }

    /* split-K: enough blocks to fill the device, ranges of whole chunks */
    gt = g == 1 ? 1 : g <= 4 ? 4 : 8;
    groups = kv->n_kv_heads * ((g + gt - 1) / gt);
    target = 4 * (int64_t) c->n_sm;
    p->split_len = (maxlen + SPLIT_CH - 1) / SPLIT_CH * SPLIT_CH;
    if (n_dec > 0 && (int64_t) n_dec * groups < target
        && c->attn_mode != LLM_CUDA_ATTN_TILED)
    {
        int64_t len2 = (total * groups + target - 1) / target;
        int64_t floor = ((int64_t) maxlen + SPLIT_MAX - 1) / SPLIT_MAX;

        len2 = len2 < floor ? floor : len2;
        len2 = (len2 + SPLIT_CH - 1) / SPLIT_CH * SPLIT_CH;
        p->split_len = len2 < p->split_len ? (int) len2 : p->split_len;
    }
    if (p->split_len < SPLIT_CH) {
        p->split_len = SPLIT_CH;
    }
    p->n_split = maxlen > 0 ? (maxlen + p->split_len - 1) / p->split_len : 1;
    p->n_dec = n_dec;
    p->n_tiles = n_tiles;

    rc = llm_cuda_stage_upload(c, &p->stage, &p->dev, p->host,
                               (dec_ints + 4 * (size_t) n_tiles)
                               * sizeof(int32_t), "attention");
    if (rc != 0) {
        p->step = 0;
        return rc;
    }
    p->d_dec = (int32_t *) p->dev.p;
    p->d_tiles = (int4 *) ((int32_t *) p->dev.p + dec_ints);
    p->step = c->step;
    p->g = g;
    p->mode = c->attn_mode;
    p->nkv = kv->n_kv_heads;
    return 0;
}


int
llm_cuda_attention(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *q,
                   const llm_kv_pool *kv, int layer, int n_heads, float scale)
{
    llm_cuda_attn_plan *p = &c->plan;
    llm_cuda_attn_args  a;
    int64_t             width;
    float              *part = NULL;
    size_t              off;
    int                 nkv, rc;

    if ((rc = llm_cuda_need_batch(c, "attention")) != 0
        || (rc = llm_cuda_check_kv(c, kv, layer, "attention")) != 0)
    {
        return rc;
    }
    nkv = kv->n_kv_heads;
    if (n_heads <= 0 || n_heads % nkv != 0) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: attention: %d heads over"
                             " %d KV heads", n_heads, nkv);
    }
    width = (int64_t) n_heads * kv->head_dim;
    if ((rc = llm_cuda_check_f32(c, q, "attention", "q", width,
                                 c->batch.n_tokens)) != 0
        || (rc = llm_cuda_check_f32(c, out, "attention", "out", width,
                                    c->batch.n_tokens)) != 0)
    {
        return rc;
    }
    if (c->batch.n_tokens == 0) {
        return 0;
    }
    if (!supported_head_dim(kv->head_dim)) {
        return llm_cuda_fail(c, LLM_EUNSUP, "cuda: attention: head size %d"
                             " not supported (32, 64, 80, 96, 128, 256)",
                             kv->head_dim);
    }
    if (nkv > GRID_Y_MAX) {
        return llm_cuda_fail(c, LLM_EUNSUP, "cuda: attention: %d KV heads",
                             nkv);
    }
    if ((rc = build_plan(c, kv, n_heads / nkv)) != 0) {
        return rc;
    }

    off = (size_t) layer * kv->layer_bytes;
    memset(&a, 0, sizeof(a));
    a.q = (const float *) q->data;
    a.q_nb = q->nb;
    a.out = (float *) out->data;
    a.out_nb = out->nb;
    a.k_pages = (const uint8_t *) kv->k + off;
    a.v_pages = (const uint8_t *) kv->v + off;
    a.kv_type = kv->type;
    a.pos = c->d_pos;
    a.tok_seq = c->d_tok_seq;
    a.block_table = c->d_block_table;
    a.max_blocks = c->batch.max_blocks;
    a.block_size = kv->block_size;
    a.n_heads = n_heads;
    a.n_kv_heads = nkv;
    a.head_dim = kv->head_dim;
    a.scale = scale;

    if (p->n_dec > 0) {
        if (p->n_split > 1) {
            part = (float *) llm_cuda_buf_get(c, &c->attn_scratch,
                                              (size_t) p->n_dec * n_heads
                                              * p->n_split
                                              * (kv->head_dim + 2)
                                              * sizeof(float), "attention");
            if (part == NULL) {
                return LLM_ENOMEM;
            }
        }
        if ((rc = llm_cuda_check(c, launch_attn_split(&a, p->d_dec, p->n_dec,
                                                      p->n_split,
                                                      p->split_len, part,
                                                      c->stream),
                                 "attention", "split-K launch")) != 0)
        {
            return rc;
        }
    }
    if (p->n_tiles > 0) {
        return llm_cuda_check(c, launch_attn_tiled(&a, p->d_tiles,
                                                   p->n_tiles, c->smem_optin,
                                                   c->stream),
                              "attention", "tiled launch");
    }
    return 0;
}
