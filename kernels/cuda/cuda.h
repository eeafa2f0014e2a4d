/*
 * The CUDA backend's few entry points besides the ops table (backend.h),
 * for C callers that know they hold a CUDA backend: the self-test
 * (engine/cmd/llm-selftest.c) and benchmarks.  Everything else goes
 * through llm_backend_ops.
 */
#ifndef LLM_CUDA_H
#define LLM_CUDA_H

#include <stddef.h>

#include "../backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Attention kernel choice: AUTO picks per sequence (tiled for chunks of
 * several tokens, split-K for decode); the others force one kernel for
 * every token, so the self-test can check both on any batch. */
enum {
    LLM_CUDA_ATTN_AUTO = 0,
    LLM_CUDA_ATTN_SPLIT = 1,
    LLM_CUDA_ATTN_TILED = 2
};

/* 1 if be is a CUDA backend. */
int llm_backend_is_cuda(const llm_backend *be);

/* 0, or LLM_EINVAL if be is not a CUDA backend or mode is unknown. */
int llm_cuda_set_attn_mode(llm_backend *be, int mode);

/* One line: device name, compute capability, multiprocessors, memory. */
int llm_cuda_describe(llm_backend *be, char *buf, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* LLM_CUDA_H */
