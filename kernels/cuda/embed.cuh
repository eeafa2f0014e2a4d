/* Embedding lookup kernel (launcher and op: embed.cu). */
#ifndef LLM_CUDA_EMBED_CUH
#define LLM_CUDA_EMBED_CUH

#include "device.cuh"


template <typename T>
__global__ void
embed_kernel(float *out,                /* [n_tokens, dim] f32 */
             size_t out_nb,
             const T *table,            /* [n_vocab, dim] */
             size_t table_nb,
             const int32_t *tokens,     /* [n_tokens] */
             int dim)
{
    int64_t  t = blockIdx.x;
    const T *src = row_ptr(table, table_nb, tokens[t]);
    float   *dst = row_ptr(out, out_nb, t);
    int      i;

    for (i = threadIdx.x; i < dim; i += blockDim.x) {
        dst[i] = to_f32(src[i]);
    }
}

#endif /* LLM_CUDA_EMBED_CUH */
