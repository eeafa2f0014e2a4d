/* Row-wise element kernels (launchers and ops: elementwise.cu). */
#ifndef LLM_CUDA_ELEMENTWISE_CUH
#define LLM_CUDA_ELEMENTWISE_CUH

#include "device.cuh"


#define EW_THREADS  256
#define EW_COLS     (EW_THREADS * 8)        /* columns per block */


/* op 0: out = a / (1 + exp(-a)) * b (the CPU's silu); op 1: out = a + b.
 * Each thread reads and writes only its own elements: out may alias a. */
__global__ void
ew_kernel(int op,
          float *out,                   /* [rows, cols] f32 */
          size_t out_nb,
          const float *a,               /* [rows, cols] f32 */
          size_t a_nb,
          const float *b,               /* [rows, cols] f32 */
          size_t b_nb,
          int cols)
{
    const float *ar = row_ptr(a, a_nb, blockIdx.x);
    const float *br = row_ptr(b, b_nb, blockIdx.x);
    float       *o = row_ptr(out, out_nb, blockIdx.x);
    int          i = blockIdx.y * EW_COLS + threadIdx.x;
    int          end = min(cols, (int) (blockIdx.y + 1) * EW_COLS);

    if (op == 0) {
        for (; i < end; i += EW_THREADS) {
            float g = ar[i];
            o[i] = g / (1.0f + expf(-g)) * br[i];
        }
    } else {
        for (; i < end; i += EW_THREADS) {
            o[i] = ar[i] + br[i];
        }
    }
}


__global__ void
gather_kernel(float *out,               /* [n, cols] f32 */
              size_t out_nb,
              const float *x,           /* [rows of x, cols] f32 */
              size_t x_nb,
              const int32_t *rows,      /* [n] */
              int cols)
{
    const float *src = row_ptr(x, x_nb, rows[blockIdx.x]);
    float       *dst = row_ptr(out, out_nb, blockIdx.x);
    int          i = blockIdx.y * EW_COLS + threadIdx.x;
    int          end = min(cols, (int) (blockIdx.y + 1) * EW_COLS);

    for (; i < end; i += EW_THREADS) {
        dst[i] = src[i];
    }
}


template <typename T>
__device__ __forceinline__ T cvt(float x);

template <>
__device__ __forceinline__ __half
cvt<__half>(float x)
{
    return __float2half_rn(x);
}

template <>
__device__ __forceinline__ __nv_bfloat16
cvt<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}


template <typename T>
__global__ void
convert_kernel(T *out,                  /* [rows, cols] contiguous */
               const float *x,          /* [rows, cols] f32 */
               size_t x_nb,
               int cols)
{
    const float *src = row_ptr(x, x_nb, blockIdx.x);
    T           *dst = out + (size_t) blockIdx.x * cols;
    int          i = blockIdx.y * EW_COLS + threadIdx.x;
    int          end = min(cols, (int) (blockIdx.y + 1) * EW_COLS);

    for (; i < end; i += EW_THREADS) {
        dst[i] = cvt<T>(src[i]);
    }
}


__global__ void
fill_kernel(float *out,                 /* [rows, cols] f32 */
            size_t out_nb,
            const float *bias,          /* [cols] f32 or NULL */
            int cols)
{
    float *dst = row_ptr(out, out_nb, blockIdx.x);
    int    i = blockIdx.y * EW_COLS + threadIdx.x;
    int    end = min(cols, (int) (blockIdx.y + 1) * EW_COLS);

    for (; i < end; i += EW_THREADS) {
        dst[i] = bias != NULL ? bias[i] : 0.0f;
    }
}

#endif /* LLM_CUDA_ELEMENTWISE_CUH */
