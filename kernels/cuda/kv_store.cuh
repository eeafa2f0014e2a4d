/* KV page kernels: store rows, copy blocks (launchers and ops:
 * kv_store.cu). */
#ifndef LLM_CUDA_KV_STORE_CUH
#define LLM_CUDA_KV_STORE_CUH

#include "device.cuh"


template <typename KV>
__device__ __forceinline__ KV from_f32(float x);

template <>
__device__ __forceinline__ float
from_f32<float>(float x)
{
    return x;
}

template <>
__device__ __forceinline__ __half
from_f32<__half>(float x)
{
    return __float2half_rn(x);
}


template <typename KV>
__global__ void
kv_store_kernel(KV *k_pages,            /* [n_blocks, block_size, row] */
                KV *v_pages,
                const float *k,         /* [n_tokens, row] f32 */
                size_t k_nb,
                const float *v,         /* [n_tokens, row] f32 */
                size_t v_nb,
                const int32_t *pos,     /* [n_tokens] */
                const int32_t *tok_seq, /* [n_tokens] */
                const int32_t *block_table, /* [n_seqs, max_blocks] */
                int max_blocks, int block_size, int row_elems)
{
    int64_t      t = blockIdx.x;
    int32_t      p = pos[t], s = tok_seq[t];
    int32_t      blk = block_table[(size_t) s * max_blocks + p / block_size];
    size_t       slot = ((size_t) blk * block_size + p % block_size)
                        * (size_t) row_elems;
    const float *kr = row_ptr(k, k_nb, t);
    const float *vr = row_ptr(v, v_nb, t);
    int          e;

    for (e = threadIdx.x; e < row_elems; e += blockDim.x) {
        k_pages[slot + e] = from_f32<KV>(kr[e]);
        v_pages[slot + e] = from_f32<KV>(vr[e]);
    }
}


__global__ void
kv_copy_kernel(uint8_t *k,              /* [n_layers] x layer_bytes */
               uint8_t *v,
               size_t layer_bytes, size_t blk_bytes,
               const int32_t *src_blocks,   /* [n] */
               const int32_t *dst_blocks,   /* [n] */
               int vec16)
{
    int32_t        sb = src_blocks[blockIdx.x], db = dst_blocks[blockIdx.x];
    uint8_t       *base = (blockIdx.z == 0 ? k : v)
                          + (size_t) blockIdx.y * layer_bytes;
    const uint8_t *src = base + (size_t) sb * blk_bytes;
    uint8_t       *dst = base + (size_t) db * blk_bytes;
    size_t         i;

    if (sb == db) {
        return;
    }
    if (vec16) {
        LLM_CHECK_ALIGN(src, 16);
        LLM_CHECK_ALIGN(dst, 16);
        for (i = threadIdx.x; i < blk_bytes / 16; i += blockDim.x) {
            ((uint4 *) dst)[i] = ((const uint4 *) src)[i];
        }
    } else {
        for (i = threadIdx.x; i < blk_bytes; i += blockDim.x) {
            dst[i] = src[i];
        }
    }
}

#endif /* LLM_CUDA_KV_STORE_CUH */
