/*
 * Embedding lookup: out[t] = table[tokens[t]] as f32.  One block per
 * token.  Block-quantized tables are read through their dense copy
 * (llm_cuda_weight_view), so the kernel knows F32, F16 and BF16 only.
 */
#include "cuda_internal.cuh"
#include "device.cuh"
#include "embed.cuh"


cudaError_t
launch_embed(float *out, size_t out_nb, const void *table, int table_type,
             size_t table_nb, const int32_t *tokens, int n_tokens, int dim,
             cudaStream_t stream)
{
    int threads = dim >= 256 ? 256 : 128;

    CUDA_CHECK_ARG(n_tokens >= 0 && dim >= 0);
    if (n_tokens == 0 || dim == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(out != NULL && table != NULL && tokens != NULL);
    switch (table_type) {
    case LLM_F32:
        embed_kernel<float><<<n_tokens, threads, 0, stream>>>(
            out, out_nb, (const float *) table, table_nb, tokens, dim);
        break;
    case LLM_F16:
        embed_kernel<__half><<<n_tokens, threads, 0, stream>>>(
            out, out_nb, (const __half *) table, table_nb, tokens, dim);
        break;
    case LLM_BF16:
        embed_kernel<__nv_bfloat16><<<n_tokens, threads, 0, stream>>>(
            out, out_nb, (const __nv_bfloat16 *) table, table_nb, tokens,
            dim);
        break;
    default:
        return cudaErrorNotSupported;
    }
    return cudaGetLastError();
}


int
llm_cuda_embed(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *table)
{
    const llm_batch *b = &c->batch;
    llm_tensor       tv;
    int64_t          dim, t;
    int              rc;

    if ((rc = llm_cuda_need_batch(c, "embed")) != 0) {
        return rc;
    }
    if (table == NULL || table->data == NULL
        || llm_dtype_get(table->type) == NULL
        || llm_row_bytes(table->type, table->ne[0]) == 0
        || table->nb < llm_row_bytes(table->type, table->ne[0]))
    {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: embed: bad table");
    }
    dim = table->ne[0];
    if ((rc = llm_cuda_check_f32(c, out, "embed", "out", dim, b->n_tokens))
        != 0)
    {
        return rc;
    }
    for (t = 0; t < b->n_tokens; t++) {
        int32_t id = b->tokens[t];

        if (id < 0 || id >= table->ne[1]) {
            return llm_cuda_fail(c, LLM_EINVAL, "cuda: embed: token %lld of"
                                 " the batch is %d, outside the vocabulary of"
                                 " %lld", (long long) t, (int) id,
                                 (long long) table->ne[1]);
        }
    }
    if (b->n_tokens == 0) {
        return 0;
    }
    if ((rc = llm_cuda_weight_view(c, table, &tv, "embed")) != 0) {
        return rc;
    }
    return llm_cuda_check(c, launch_embed((float *) out->data, out->nb,
                                          tv.data, tv.type, tv.nb,
                                          c->d_tokens, b->n_tokens,
                                          (int) dim, c->stream),
                          "embed", "launch");
}
