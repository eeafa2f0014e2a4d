/*
 * Error messages and allocator hooks (see common.h).
 */
#include "common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>


static llm_allocators llm_alloc = { malloc, calloc, realloc, free };


int
llm_err_set(llm_err *err, int code, const char *fmt, ...)
{
    va_list ap;

    if (err != NULL) {
        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
    }
    return code;
}


int
llm_err_wrap(llm_err *err, const char *fmt, ...)
{
    char    prefix[LLM_ERR_MAX], old[LLM_ERR_MAX];
    va_list ap;

    if (err == NULL) {
        return LLM_EINVAL;
    }
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof(old));
    snprintf(err->msg, sizeof(err->msg), "%s: %s", prefix, old);
    return err->code;
}


const char *
llm_strerror(int code)
{
    switch (code) {
    case LLM_OK:        return "ok";
    case LLM_EINVAL:    return "invalid argument";
    case LLM_ENOMEM:    return "out of memory";
    case LLM_EIO:       return "i/o error";
    case LLM_EFORMAT:   return "malformed file";
    case LLM_EUNSUP:    return "unsupported";
    case LLM_EFULL:     return "no capacity";
    case LLM_ENOTFOUND: return "not found";
    case LLM_EBACKEND:  return "backend failure";
    case LLM_ESTATE:    return "invalid state";
    default:            return "unknown error";
    }
}


llm_allocators
llm_set_allocators(const llm_allocators *a)
{
    llm_allocators old = llm_alloc;

    if (a != NULL) {
        llm_alloc = *a;
    }
    return old;
}


void
llm_reset_allocators(void)
{
    llm_alloc.malloc_fn = malloc;
    llm_alloc.calloc_fn = calloc;
    llm_alloc.realloc_fn = realloc;
    llm_alloc.free_fn = free;
}


void *
llm_malloc(size_t n)
{
    return llm_alloc.malloc_fn(n ? n : 1);
}


void *
llm_calloc(size_t n, size_t size)
{
    return llm_alloc.calloc_fn(n ? n : 1, size ? size : 1);
}


void *
llm_realloc(void *p, size_t n)
{
    return llm_alloc.realloc_fn(p, n ? n : 1);
}


void
llm_free(void *p)
{
    if (p != NULL) {
        llm_alloc.free_fn(p);
    }
}


char *
llm_strdup(const char *s)
{
    size_t  n = strlen(s) + 1;
    char   *d = llm_malloc(n);

    if (d != NULL) {
        memcpy(d, s, n);
    }
    return d;
}


uint64_t
llm_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}
