/*
 * The CPU side of emu.h: memory, copies, streams and events (all
 * synchronous), cuBLAS's GemmEx as a plain loop in double, and kernel
 * launches run block by block with one fiber per thread.
 *
 * Fibers switch with a few instructions (x86-64 only: callee-saved
 * registers and the stack pointer), so a block of 256 threads meeting at
 * barriers costs microseconds, not the milliseconds of OS threads.  The
 * scheduler runs every ready fiber until it blocks at a barrier or ends,
 * then releases a warp barrier when all live lanes of the warp wait at
 * it and the block barrier when all live threads do.  A barrier some
 * threads can never reach fails the launch (cudaErrorLaunchFailure from
 * cudaGetLastError), with a message on stderr.
 */
#include "emu.h"

#include <stdio.h>
#include <stdlib.h>

#include <vector>

#if !defined(__x86_64__)
#error "t/cuda_emu: the fiber switch is written for x86-64"
#endif


/* --------------------------------------------------------------- fibers */

extern "C" void emu_switch(void **save_sp, void *new_sp);

__asm__(
    ".text\n"
    ".globl emu_switch\n"
    ".type emu_switch,@function\n"
    "emu_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size emu_switch, .-emu_switch\n");

enum { F_READY, F_WAIT_BLOCK, F_WAIT_WARP, F_DONE };

#define STACK_SIZE  (128 * 1024)
#define MAX_THREADS 1024

struct fiber {
    void       *sp;
    char       *stack;
    int         tid;
    int         state;
};

static fiber                         fibers[MAX_THREADS];
static fiber                        *cur;
static void                         *sched_sp;
static const std::function<void()>  *cur_fn;
static int                           n_threads;
static float                         shfl_slot[MAX_THREADS];
static std::vector<unsigned char>    dyn_smem;
static cudaError_t                   last_error = cudaSuccess;
static const char                   *fail_why;

uint3 emu_block_idx;
dim3  emu_block_dim, emu_grid_dim;


uint3
emu_thread_idx(void)
{
    uint3 r = { (unsigned) cur->tid, 0, 0 };

    return r;
}


void *
emu_dyn_smem(void)
{
    return dyn_smem.data();
}


static const void                   *fault_addr;


void
emu_check_align(const void *p, size_t n)
{
    if ((uintptr_t) p % n != 0 && fault_addr == NULL) {
        fault_addr = p;
    }
}


static void
yield(int state)
{
    cur->state = state;
    emu_switch(&cur->sp, sched_sp);
}


void
emu_syncthreads(void)
{
    yield(F_WAIT_BLOCK);
}


void
emu_syncwarp(void)
{
    yield(F_WAIT_WARP);
}


float
emu_shfl_xor(float v, int lane_mask)
{
    int   tid = cur->tid, src = (tid & ~31) | ((tid & 31) ^ lane_mask);
    float r;

    shfl_slot[tid] = v;
    emu_syncwarp();
    r = src < n_threads ? shfl_slot[src] : v;
    emu_syncwarp();
    return r;
}


static void
fiber_main(void)
{
    (*cur_fn)();
    cur->state = F_DONE;
    emu_switch(&cur->sp, sched_sp);
    abort();                            /* never resumed */
}


static void
fiber_start(fiber *f, int tid)
{
    uintptr_t top;
    void    **sp;
    int       i;

    if (f->stack == NULL) {
        f->stack = (char *) malloc(STACK_SIZE);
        if (f->stack == NULL) {
            fprintf(stderr, "cuda-emu: out of memory\n");
            abort();
        }
    }
    top = ((uintptr_t) f->stack + STACK_SIZE) & ~(uintptr_t) 15;
    sp = (void **) top;
    *--sp = NULL;                       /* fiber_main's return address */
    *--sp = (void *) fiber_main;        /* where emu_switch returns to */
    for (i = 0; i < 6; i++) {
        *--sp = NULL;                   /* rbp rbx r12 r13 r14 r15 */
    }
    f->sp = sp;
    f->tid = tid;
    f->state = F_READY;
}


/* Runs one block; 0 or -1 (with fail_why) on a barrier error. */
static int
run_block(int nt)
{
    int i, w, live, waiting_block, progress;

    for (i = 0; i < nt; i++) {
        fiber_start(&fibers[i], i);
    }
    for (;;) {
        progress = 0;
        for (i = 0; i < nt; i++) {
            if (fibers[i].state == F_READY) {
                cur = &fibers[i];
                emu_switch(&sched_sp, cur->sp);
                progress = 1;
            }
        }
        /* warp barriers: every live lane of the warp waits */
        for (w = 0; w < (nt + 31) / 32; w++) {
            int n_wait = 0, n_live = 0, n_other = 0;

            for (i = 32 * w; i < nt && i < 32 * w + 32; i++) {
                if (fibers[i].state != F_DONE) {
                    n_live++;
                    if (fibers[i].state == F_WAIT_WARP) {
                        n_wait++;
                    } else {
                        n_other++;
                    }
                }
            }
            if (n_wait > 0 && n_other == 0) {
                if (n_live < 32 && n_live < nt - 32 * w) {
                    fail_why = "__syncwarp/shuffle with exited lanes";
                    return -1;
                }
                for (i = 32 * w; i < nt && i < 32 * w + 32; i++) {
                    if (fibers[i].state == F_WAIT_WARP) {
                        fibers[i].state = F_READY;
                    }
                }
                progress = 1;
            }
        }
        if (progress) {
            continue;
        }
        /* block barrier: every live thread waits */
        live = waiting_block = 0;
        for (i = 0; i < nt; i++) {
            if (fibers[i].state != F_DONE) {
                live++;
                waiting_block += fibers[i].state == F_WAIT_BLOCK;
            }
        }
        if (live == 0) {
            return 0;
        }
        if (waiting_block == live) {
            if (live < nt) {
                fail_why = "__syncthreads after some threads exited";
                return -1;
            }
            for (i = 0; i < nt; i++) {
                fibers[i].state = F_READY;
            }
            continue;
        }
        fail_why = "deadlock: threads wait at different barriers";
        return -1;
    }
}


void
emu_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t s,
           const std::function<void()> &fn)
{
    unsigned x, y, z;

    if (block.y != 1 || block.z != 1 || block.x == 0
        || block.x > MAX_THREADS || grid.x == 0 || grid.y == 0
        || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    {
        fprintf(stderr, "cuda-emu: bad launch [%u %u %u] x [%u %u %u]\n",
                grid.x, grid.y, grid.z, block.x, block.y, block.z);
        last_error = cudaErrorInvalidValue;
        return;
    }
    emu_grid_dim = grid;
    emu_block_dim = block;
    n_threads = (int) block.x;
    cur_fn = &fn;
    dyn_smem.assign(smem + 16, 0xff);       /* NaN-filled, as garbage */
    for (z = 0; z < grid.z; z++) {
        for (y = 0; y < grid.y; y++) {
            for (x = 0; x < grid.x; x++) {
                emu_block_idx.x = x;
                emu_block_idx.y = y;
                emu_block_idx.z = z;
                if (run_block(n_threads) != 0 || fault_addr != NULL) {
                    if (fault_addr != NULL) {
                        fail_why = "misaligned vector load";
                        fault_addr = NULL;
                    }
                    fprintf(stderr, "cuda-emu: block (%u, %u, %u) of"
                            " [%u %u %u] x %u: %s\n", x, y, z, grid.x,
                            grid.y, grid.z, block.x, fail_why);
                    last_error = cudaErrorLaunchFailure;
                    return;
                }
            }
        }
    }
}


/* -------------------------------------------------------------- runtime */

struct emu_stream { int unused; };
struct emu_event { int unused; };
struct emu_blas { int unused; };


cudaError_t
cudaGetDeviceCount(int *n)
{
    *n = getenv("LLM_CUDA_EMU_NO_DEVICE") != NULL ? 0 : 1;
    return *n ? cudaSuccess : cudaErrorNoDevice;
}


cudaError_t
cudaSetDevice(int d)
{
    return d == 0 ? cudaSuccess : cudaErrorInvalidValue;
}


cudaError_t
cudaGetDeviceProperties(cudaDeviceProp *p, int d)
{
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "CUDA emulator on the CPU");
    p->major = 9;
    p->minor = 0;
    /* few multiprocessors: small batches already split long contexts */
    p->multiProcessorCount = 2;
    return cudaSuccess;
}


cudaError_t
cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d)
{
    *v = 227 * 1024;
    return cudaSuccess;
}


cudaError_t
cudaGetLastError(void)
{
    cudaError_t e = last_error;

    last_error = cudaSuccess;
    return e;
}


const char *
cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInsufficientDriver: return "CUDA driver version is"
                                             " insufficient";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    }
    return "unknown error";
}


const char *
cudaGetErrorName(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    }
    return "cudaErrorUnknown";
}


cudaError_t
cudaMalloc(void **p, size_t n)
{
    /* garbage, as device memory is: NaN bytes */
    *p = malloc(n ? n : 1);
    if (*p == NULL) {
        return cudaErrorMemoryAllocation;
    }
    memset(*p, 0xff, n);
    return cudaSuccess;
}


cudaError_t
cudaFree(void *p)
{
    free(p);
    return cudaSuccess;
}


cudaError_t
cudaMallocHost(void **p, size_t n)
{
    return cudaMalloc(p, n);
}


cudaError_t
cudaFreeHost(void *p)
{
    free(p);
    return cudaSuccess;
}


cudaError_t
cudaMemGetInfo(size_t *free_bytes, size_t *total)
{
    *free_bytes = (size_t) 6 << 30;
    *total = (size_t) 8 << 30;
    return cudaSuccess;
}


cudaError_t
cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k,
                cudaStream_t s)
{
    if (n > 0 && (dst == NULL || src == NULL)) {
        return cudaErrorInvalidValue;
    }
    memmove(dst, src, n);
    return cudaSuccess;
}


cudaError_t
cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch,
                  size_t width, size_t height, cudaMemcpyKind k,
                  cudaStream_t s)
{
    size_t r;

    if (width > dpitch || width > spitch) {
        return cudaErrorInvalidValue;
    }
    for (r = 0; r < height; r++) {
        memmove((char *) dst + r * dpitch, (const char *) src + r * spitch,
                width);
    }
    return cudaSuccess;
}


cudaError_t
cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    *s = (cudaStream_t) calloc(1, sizeof(emu_stream));
    return cudaSuccess;
}


cudaError_t
cudaStreamDestroy(cudaStream_t s)
{
    free(s);
    return cudaSuccess;
}


cudaError_t
cudaStreamSynchronize(cudaStream_t s)
{
    return cudaSuccess;
}


cudaError_t
cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags)
{
    *e = (cudaEvent_t) calloc(1, sizeof(emu_event));
    return cudaSuccess;
}


cudaError_t
cudaEventDestroy(cudaEvent_t e)
{
    free(e);
    return cudaSuccess;
}


cudaError_t
cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    return cudaSuccess;
}


cudaError_t
cudaEventSynchronize(cudaEvent_t e)
{
    return cudaSuccess;
}


/* --------------------------------------------------------------- cuBLAS */

cublasStatus_t
cublasCreate(cublasHandle_t *h)
{
    *h = (cublasHandle_t) calloc(1, sizeof(emu_blas));
    return CUBLAS_STATUS_SUCCESS;
}


cublasStatus_t
cublasDestroy(cublasHandle_t h)
{
    free(h);
    return CUBLAS_STATUS_SUCCESS;
}


cublasStatus_t
cublasSetStream(cublasHandle_t h, cudaStream_t s)
{
    return CUBLAS_STATUS_SUCCESS;
}


cublasStatus_t
cublasSetMathMode(cublasHandle_t h, cublasMath_t m)
{
    return CUBLAS_STATUS_SUCCESS;
}


const char *
cublasGetStatusString(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "the operation completed successfully";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid value was used";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested"
                                             " is not supported";
    }
    return "unknown error";
}


static double
elem(const void *p, cudaDataType t, size_t i)
{
    switch (t) {
    case CUDA_R_32F:
        return ((const float *) p)[i];
    case CUDA_R_16F:
        return llm_f16_to_f32(((const uint16_t *) p)[i]);
    case CUDA_R_16BF:
        return llm_bf16_to_f32(((const uint16_t *) p)[i]);
    }
    return NAN;
}


/* Column-major C [m, n] = alpha op(A) op(B) + beta C, as cuBLAS; the
 * argument rules cuBLAS checks are checked here too. */
cublasStatus_t
cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
             int m, int n, int k, const void *alpha, const void *a,
             cudaDataType at, int lda, const void *b, cudaDataType bt,
             int ldb, const void *beta, void *c, cudaDataType ct, int ldc,
             cublasComputeType_t ctype, cublasGemmAlgo_t algo)
{
    float  al = *(const float *) alpha, be = *(const float *) beta;
    float *C = (float *) c;
    int    i, j, p;

    if (m < 0 || n < 0 || k < 0 || ct != CUDA_R_32F || at != bt
        || ctype != CUBLAS_COMPUTE_32F
        || lda < (ta == CUBLAS_OP_N ? (m > 1 ? m : 1) : (k > 1 ? k : 1))
        || ldb < (tb == CUBLAS_OP_N ? (k > 1 ? k : 1) : (n > 1 ? n : 1))
        || ldc < (m > 1 ? m : 1))
    {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    for (j = 0; j < n; j++) {
        for (i = 0; i < m; i++) {
            double acc = 0.0;

            for (p = 0; p < k; p++) {
                size_t ia = ta == CUBLAS_OP_N ? (size_t) p * lda + i
                                              : (size_t) i * lda + p;
                size_t ib = tb == CUBLAS_OP_N ? (size_t) j * ldb + p
                                              : (size_t) p * ldb + j;
                double x = elem(a, at, ia), y = elem(b, bt, ib);
                acc += x * y;
            }
            /* beta 0: C is not read (may hold garbage) */
            C[(size_t) j * ldc + i] = (float) (al * acc
                + (be != 0.0f ? be * C[(size_t) j * ldc + i] : 0.0));
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}
