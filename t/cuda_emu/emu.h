/*
 * A CPU stand-in for the part of CUDA and cuBLAS the CUDA backend uses,
 * so that kernels/cuda compiles with g++ and runs on a machine without a
 * GPU: every kernel launch runs each block's threads as fibers on the
 * calling thread (emu_runtime.cpp), with __syncthreads, __syncwarp and
 * warp shuffles as real barriers between them, one block at a time.
 *
 * It checks index math, barriers and host logic; not timing, memory
 * ordering between blocks, or the GPU's float rounding.  A barrier not
 * reached by every thread of the block (or warp) is reported as a launch
 * failure, as is a deadlock.
 *
 * Force-included (-include) before each transformed .cu (transform.py
 * turns kernel<<<g, b, s, st>>>(args) into emu_launch(...)).
 */
#ifndef LLM_CUDA_EMU_H
#define LLM_CUDA_EMU_H

#define LLM_CUDA_EMU 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>

#include "kernels/dtype.h"


/* ---------------------------------------------------- device keywords */

#define __global__
#define __device__
#define __host__
#define __forceinline__         inline
#define __launch_bounds__(...)
#define __grid_constant__
/* one block runs at a time, all its threads on this OS thread */
#define __shared__              static
#define LLM_EXTERN_SHARED(type, name) \
    type *name = (type *) emu_dyn_smem()


struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct int4 { int x, y, z, w; };

uint3  emu_thread_idx(void);
extern uint3 emu_block_idx;
extern dim3  emu_block_dim, emu_grid_dim;
void  *emu_dyn_smem(void);

#define threadIdx   (emu_thread_idx())
#define blockIdx    (emu_block_idx)
#define blockDim    (emu_block_dim)
#define gridDim     (emu_grid_dim)

/* Fails the launch if p is not n-byte aligned (vector loads). */
void  emu_check_align(const void *p, size_t n);
void  emu_syncthreads(void);
void  emu_syncwarp(void);
float emu_shfl_xor(float v, int lane_mask);

static inline void __syncthreads(void) { emu_syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { emu_syncwarp(); }

static inline float
__shfl_xor_sync(unsigned mask, float v, int lane_mask)
{
    return emu_shfl_xor(v, lane_mask);
}

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }


/* 16-bit floats: the bits, converted by the reference code (round to
 * nearest even, as __float2half_rn). */
struct __half { uint16_t x; };
struct __half2 { __half x, y; };
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };

static inline float __half2float(__half h) { return llm_f16_to_f32(h.x); }

static inline __half
__float2half_rn(float f)
{
    __half h;

    h.x = llm_f32_to_f16(f);
    return h;
}

static inline float2
__half22float2(__half2 h)
{
    float2 r = { __half2float(h.x), __half2float(h.y) };

    return r;
}

static inline float
__bfloat162float(__nv_bfloat16 h)
{
    return llm_bf16_to_f32(h.x);
}

static inline __nv_bfloat16
__float2bfloat16_rn(float f)
{
    __nv_bfloat16 h;

    h.x = llm_f32_to_bf16(f);
    return h;
}

static inline float2
__bfloat1622float2(__nv_bfloat162 h)
{
    float2 r = { __bfloat162float(h.x), __bfloat162float(h.y) };

    return r;
}


/* ------------------------------------------------------- runtime API */

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorLaunchFailure = 719,
    cudaErrorNotSupported = 801
};
typedef enum cudaError_t cudaError_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

typedef struct emu_stream *cudaStream_t;
typedef struct emu_event *cudaEvent_t;
#define cudaStreamNonBlocking   1
#define cudaEventDisableTiming  2

struct cudaDeviceProp {
    char    name[256];
    int     major, minor;
    int     multiProcessorCount;
};

cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d);
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d);
cudaError_t cudaGetLastError(void);
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);
cudaError_t cudaMalloc(void **p, size_t n);
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n,
                            cudaMemcpyKind k, cudaStream_t s);
cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src,
                              size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind k, cudaStream_t s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s);
cudaError_t cudaEventSynchronize(cudaEvent_t e);

template <typename F>
static inline cudaError_t
cudaFuncSetAttribute(F, cudaFuncAttribute, int)
{
    return cudaSuccess;
}

/* Runs fn once per thread of every block (1-D blocks). */
void emu_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                const std::function<void()> &fn);


/* ------------------------------------------------------------ cuBLAS */

enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cudaDataType { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0 };
typedef struct emu_blas *cublasHandle_t;

cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
const char    *cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta,
                            cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *a, cudaDataType at,
                            int lda, const void *b, cudaDataType bt, int ldb,
                            const void *beta, void *c, cudaDataType ct,
                            int ldc, cublasComputeType_t ctype,
                            cublasGemmAlgo_t algo);

#endif /* LLM_CUDA_EMU_H */
