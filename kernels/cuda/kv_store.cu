/*
 * The paged KV cache: writing this step's K and V rows into their pages,
 * and copying whole blocks (copy-on-write of shared prefix blocks).
 *
 * Layout, as the CPU backend: each layer's K (and V) is [n_blocks,
 * block_size, n_kv_heads, head_dim] of F16 or F32; position p of sequence
 * s lives in block block_table[s, p / block_size], row p % block_size.
 */
#include "cuda_internal.cuh"
#include "device.cuh"
#include "kv_store.cuh"

#include <string.h>


/* ------------------------------------------------------------ kv_store */

cudaError_t
launch_kv_store(void *k_pages, void *v_pages, int kv_type, const float *k,
                size_t k_nb, const float *v, size_t v_nb, const int32_t *pos,
                const int32_t *tok_seq, const int32_t *block_table,
                int max_blocks, int block_size, int row_elems, int n_tokens,
                cudaStream_t stream)
{
    int threads = row_elems >= 256 ? 256 : 128;

    CUDA_CHECK_ARG(n_tokens >= 0 && row_elems > 0 && block_size > 0
                   && max_blocks > 0);
    if (n_tokens == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(k_pages != NULL && v_pages != NULL && k != NULL
                   && v != NULL && pos != NULL && tok_seq != NULL
                   && block_table != NULL);
    switch (kv_type) {
    case LLM_F16:
        kv_store_kernel<__half><<<n_tokens, threads, 0, stream>>>(
            (__half *) k_pages, (__half *) v_pages, k, k_nb, v, v_nb, pos,
            tok_seq, block_table, max_blocks, block_size, row_elems);
        break;
    case LLM_F32:
        kv_store_kernel<float><<<n_tokens, threads, 0, stream>>>(
            (float *) k_pages, (float *) v_pages, k, k_nb, v, v_nb, pos,
            tok_seq, block_table, max_blocks, block_size, row_elems);
        break;
    default:
        return cudaErrorNotSupported;
    }
    return cudaGetLastError();
}


int
llm_cuda_kv_store(llm_cuda_ctx *c, const llm_kv_pool *kv, int layer,
                  const llm_tensor *k, const llm_tensor *v)
{
    int64_t n;
    size_t  off;
    int     rc;

    if ((rc = llm_cuda_need_batch(c, "kv_store")) != 0
        || (rc = llm_cuda_check_kv(c, kv, layer, "kv_store")) != 0)
    {
        return rc;
    }
    n = (int64_t) kv->n_kv_heads * kv->head_dim;
    if ((rc = llm_cuda_check_f32(c, k, "kv_store", "k", n,
                                 c->batch.n_tokens)) != 0
        || (rc = llm_cuda_check_f32(c, v, "kv_store", "v", n,
                                    c->batch.n_tokens)) != 0)
    {
        return rc;
    }
    if (c->batch.n_tokens == 0) {
        return 0;
    }
    off = (size_t) layer * kv->layer_bytes;
    return llm_cuda_check(c, launch_kv_store((uint8_t *) kv->k + off,
                                             (uint8_t *) kv->v + off,
                                             kv->type,
                                             (const float *) k->data, k->nb,
                                             (const float *) v->data, v->nb,
                                             c->d_pos, c->d_tok_seq,
                                             c->d_block_table,
                                             c->batch.max_blocks,
                                             kv->block_size, (int) n,
                                             c->batch.n_tokens, c->stream),
                          "kv_store", "launch");
}


/* ------------------------------------------------------ kv_copy_blocks */

cudaError_t
launch_kv_copy_blocks(void *k, void *v, size_t layer_bytes, int n_layers,
                      size_t blk_bytes, const int32_t *src_blocks,
                      const int32_t *dst_blocks, int n, cudaStream_t stream)
{
    dim3 grid(n, n_layers, 2);
    int  vec16;

    CUDA_CHECK_ARG(n >= 0 && n_layers > 0 && n_layers <= 65535);
    if (n == 0 || blk_bytes == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(k != NULL && v != NULL && src_blocks != NULL
                   && dst_blocks != NULL);
    vec16 = blk_bytes % 16 == 0 && layer_bytes % 16 == 0
            && (uintptr_t) k % 16 == 0 && (uintptr_t) v % 16 == 0;
    kv_copy_kernel<<<grid, 256, 0, stream>>>((uint8_t *) k, (uint8_t *) v,
                                             layer_bytes, blk_bytes,
                                             src_blocks, dst_blocks, vec16);
    return cudaGetLastError();
}


int
llm_cuda_kv_copy_blocks(llm_cuda_ctx *c, const llm_kv_pool *kv,
                        const int32_t *src, const int32_t *dst, int n)
{
    size_t   blk_bytes, es;
    uint8_t *seen;
    int32_t *ids;
    int      i, l, chained = 0, rc;

    if (n == 0) {
        return 0;
    }
    if (kv == NULL || kv->k == NULL || kv->v == NULL || n < 0 || src == NULL
        || dst == NULL || (kv->type != LLM_F16 && kv->type != LLM_F32)
        || kv->block_size <= 0 || kv->n_kv_heads <= 0 || kv->head_dim <= 0
        || kv->n_layers <= 0 || kv->n_blocks <= 0)
    {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: kv_copy_blocks: bad"
                             " arguments");
    }
    es = kv->type == LLM_F16 ? 2 : 4;
    blk_bytes = (size_t) kv->block_size * kv->n_kv_heads * kv->head_dim * es;
    if (kv->layer_bytes < (size_t) kv->n_blocks * blk_bytes) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: kv_copy_blocks: bad pool");
    }
    for (i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= kv->n_blocks || dst[i] < 0
            || dst[i] >= kv->n_blocks)
        {
            return llm_cuda_fail(c, LLM_EINVAL, "cuda: kv_copy_blocks: block"
                                 " %d -> %d outside the pool of %d",
                                 (int) src[i], (int) dst[i], kv->n_blocks);
        }
    }

    /* The CPU backend copies pair after pair.  When a block is written
     * and also read (or written twice), order matters: keep it, one copy
     * at a time on the stream.  Otherwise one kernel does every pair. */
    seen = (uint8_t *) llm_calloc((size_t) kv->n_blocks, 1);
    if (seen == NULL) {
        return llm_cuda_fail(c, LLM_ENOMEM, "cuda: kv_copy_blocks: out of"
                             " host memory");
    }
    for (i = 0; i < n; i++) {
        if (src[i] != dst[i]) {
            seen[src[i]] |= 1;
        }
    }
    for (i = 0; i < n && !chained; i++) {
        if (src[i] != dst[i]) {
            chained = (seen[dst[i]] & 3) != 0;
            seen[dst[i]] |= 2;
        }
    }
    llm_free(seen);

    if (chained) {
        for (l = 0; l < kv->n_layers; l++) {
            uint8_t *kb = (uint8_t *) kv->k + (size_t) l * kv->layer_bytes;
            uint8_t *vb = (uint8_t *) kv->v + (size_t) l * kv->layer_bytes;

            for (i = 0; i < n; i++) {
                if (src[i] == dst[i]) {
                    continue;
                }
                if ((rc = llm_cuda_check(c, cudaMemcpyAsync(
                         kb + (size_t) dst[i] * blk_bytes,
                         kb + (size_t) src[i] * blk_bytes, blk_bytes,
                         cudaMemcpyDeviceToDevice, c->stream),
                         "kv_copy_blocks", "copy K")) != 0
                    || (rc = llm_cuda_check(c, cudaMemcpyAsync(
                            vb + (size_t) dst[i] * blk_bytes,
                            vb + (size_t) src[i] * blk_bytes, blk_bytes,
                            cudaMemcpyDeviceToDevice, c->stream),
                            "kv_copy_blocks", "copy V")) != 0)
                {
                    return rc;
                }
            }
        }
        return 0;
    }

    ids = (int32_t *) llm_malloc(sizeof(int32_t) * 2 * (size_t) n);
    if (ids == NULL) {
        return llm_cuda_fail(c, LLM_ENOMEM, "cuda: kv_copy_blocks: out of"
                             " host memory");
    }
    memcpy(ids, src, sizeof(int32_t) * (size_t) n);
    memcpy(ids + n, dst, sizeof(int32_t) * (size_t) n);
    rc = llm_cuda_stage_upload(c, &c->misc_stage, &c->copy_ids, ids,
                               sizeof(int32_t) * 2 * (size_t) n,
                               "kv_copy_blocks");
    llm_free(ids);
    if (rc != 0) {
        return rc;
    }
    return llm_cuda_check(c, launch_kv_copy_blocks(
                              kv->k, kv->v, kv->layer_bytes, kv->n_layers,
                              blk_bytes, (const int32_t *) c->copy_ids.p,
                              (const int32_t *) c->copy_ids.p + n, n,
                              c->stream),
                          "kv_copy_blocks", "launch");
}


/* ------------------------------------------------------ kv_block_host */

/* One block of every layer <-> host [n_layers, 2, block]: K of all
 * layers is one strided 2D copy (source pitch layer_bytes, host pitch two
 * blocks), V another; synchronous, so the host buffer is free on return.
 * Pageable host memory: these run once per cached block, off the hot
 * path of a step. */
int
llm_cuda_kv_block_host(llm_cuda_ctx *c, const llm_kv_pool *kv, int32_t block,
                       void *host, int to_host)
{
    const char *op = to_host ? "kv_block_to_host" : "kv_block_from_host";
    size_t      blk_bytes;
    uint8_t    *h = (uint8_t *) host;
    uint8_t    *kb, *vb;
    cudaMemcpyKind kind = to_host ? cudaMemcpyDeviceToHost
                                  : cudaMemcpyHostToDevice;
    char        msg[160];
    int         rc;

    /* the pool only: no batch is involved */
    if (llm_kv_check_pool(kv, 0, msg, sizeof(msg)) != 0) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: %s", op, msg);
    }
    if (kv->type == LLM_Q8_0) {     /* ops.kv_q8_0 is 0 */
        return llm_cuda_fail(c, LLM_EUNSUP, "cuda: %s: Q8_0 KV pages are "
                             "not implemented", op);
    }
    if (host == NULL || block < 0 || block >= kv->n_blocks) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: %s: block %d outside "
                             "the pool of %d", op, (int) block,
                             kv->n_blocks);
    }
    blk_bytes = (size_t) kv->block_size * kv->n_kv_heads * kv->head_dim
                * (kv->type == LLM_F16 ? 2 : 4);
    kb = (uint8_t *) kv->k + (size_t) block * blk_bytes;
    vb = (uint8_t *) kv->v + (size_t) block * blk_bytes;
    if (to_host) {
        rc = llm_cuda_check(c, cudaMemcpy2DAsync(h, 2 * blk_bytes, kb,
                                                 kv->layer_bytes, blk_bytes,
                                                 (size_t) kv->n_layers, kind,
                                                 c->stream), op, "K");
        if (rc == 0) {
            rc = llm_cuda_check(c, cudaMemcpy2DAsync(h + blk_bytes,
                                                     2 * blk_bytes, vb,
                                                     kv->layer_bytes,
                                                     blk_bytes,
                                                     (size_t) kv->n_layers,
                                                     kind, c->stream),
                                op, "V");
        }
    } else {
        rc = llm_cuda_check(c, cudaMemcpy2DAsync(kb, kv->layer_bytes, h,
                                                 2 * blk_bytes, blk_bytes,
                                                 (size_t) kv->n_layers, kind,
                                                 c->stream), op, "K");
        if (rc == 0) {
            rc = llm_cuda_check(c, cudaMemcpy2DAsync(vb, kv->layer_bytes,
                                                     h + blk_bytes,
                                                     2 * blk_bytes,
                                                     blk_bytes,
                                                     (size_t) kv->n_layers,
                                                     kind, c->stream),
                                op, "V");
        }
    }
    if (rc == 0) {
        rc = llm_cuda_check(c, cudaStreamSynchronize(c->stream), op,
                            "synchronize");
    }
    return rc;
}
