/*
 * ngx_llm engine: error reporting and allocator hooks shared by every part
 * of the engine, the kernels and the tools.
 *
 * Errors: every fallible function returns 0 on success or a negative
 * LLM_E* code, and writes a human readable message into an llm_err the
 * caller passed (may be NULL).  Nothing in the engine calls exit().
 *
 * Allocation: all engine memory goes through llm_malloc/llm_calloc/
 * llm_realloc/llm_free so that tests can inject failures
 * (llm_set_allocators), like hiredisSetAllocators.
 */
#ifndef LLM_COMMON_H
#define LLM_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    LLM_OK        =  0,
    LLM_EINVAL    = -1,   /* bad argument or bad input data */
    LLM_ENOMEM    = -2,   /* allocation failed */
    LLM_EIO       = -3,   /* file or socket error */
    LLM_EFORMAT   = -4,   /* malformed or truncated file */
    LLM_EUNSUP    = -5,   /* valid but unsupported (type, architecture) */
    LLM_EFULL     = -6,   /* out of KV blocks / queue full */
    LLM_ENOTFOUND = -7,
    LLM_EBACKEND  = -8,   /* backend (device) failure */
    LLM_ESTATE    = -9    /* operation not valid in this state */
};

#define LLM_ERR_MAX 512

typedef struct llm_err {
    int  code;
    char msg[LLM_ERR_MAX];
} llm_err;

/* Sets err (if not NULL) and returns code, so callers can write
 * "return llm_err_set(err, LLM_EFORMAT, "%s: ...", path);" */
int llm_err_set(llm_err *err, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Prefixes an existing message: "ctx: old message". */
int llm_err_wrap(llm_err *err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

const char *llm_strerror(int code);


typedef struct llm_allocators {
    void *(*malloc_fn)(size_t);
    void *(*calloc_fn)(size_t, size_t);
    void *(*realloc_fn)(void *, size_t);
    void  (*free_fn)(void *);
} llm_allocators;

/* Returns the previous set.  Not thread safe: call at start-up or in tests. */
llm_allocators llm_set_allocators(const llm_allocators *a);
void           llm_reset_allocators(void);

void *llm_malloc(size_t n);
void *llm_calloc(size_t n, size_t size);
void *llm_realloc(void *p, size_t n);
void  llm_free(void *p);
char *llm_strdup(const char *s);

/* Monotonic clock in nanoseconds. */
uint64_t llm_now_ns(void);

#ifdef __cplusplus
}
#endif

#endif /* LLM_COMMON_H */
