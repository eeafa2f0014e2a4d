/*
 * Backend-independent helpers: tensors allocated through a backend's ops,
 * row views, and opening a backend by name ("cpu", "cuda:N").
 */
#include "backend.h"

#include <stdlib.h>
#include <string.h>

#include "../engine/common.h"


int
llm_tensor_alloc(llm_backend *be, llm_tensor *t, int type, int64_t cols,
                 int64_t rows)
{
    size_t nb;

    memset(t, 0, sizeof(*t));
    if (cols < 0 || rows < 0) {
        return LLM_EINVAL;
    }
    nb = llm_row_bytes(type, cols);
    if (nb == 0 && cols != 0) {
        return LLM_EINVAL;          /* unknown type or not whole blocks */
    }
    if (rows > 0 && nb > SIZE_MAX / (size_t) rows) {
        return LLM_ENOMEM;
    }
    t->data = be->ops->alloc(be, nb * (size_t) rows);
    if (t->data == NULL) {
        return LLM_ENOMEM;
    }
    t->type = type;
    t->ne[0] = cols;
    t->ne[1] = rows;
    t->nb = nb;
    return 0;
}


void
llm_tensor_release(llm_backend *be, llm_tensor *t)
{
    if (t != NULL && t->data != NULL) {
        be->ops->release(be, t->data);
        t->data = NULL;
    }
}


llm_tensor
llm_tensor_rows(const llm_tensor *t, int64_t first, int64_t n)
{
    llm_tensor v = *t;

    /* clamp rather than point outside the tensor */
    if (first < 0) {
        first = 0;
    }
    if (first > t->ne[1]) {
        first = t->ne[1];
    }
    if (n < 0 || n > t->ne[1] - first) {
        n = t->ne[1] - first;
    }
    if (t->data != NULL) {
        v.data = (uint8_t *) t->data + (size_t) first * t->nb;
    }
    v.ne[1] = n;
    return v;
}


llm_backend *
llm_backend_open(const char *spec, int n_threads, llm_err *err)
{
    if (spec == NULL || strcmp(spec, "cpu") == 0) {
        return llm_backend_cpu_new(n_threads, err);
    }
    if (strncmp(spec, "cuda", 4) == 0
        && (spec[4] == '\0' || spec[4] == ':'))
    {
        long  dev = 0;
        char *end;

        if (spec[4] == ':') {
            dev = strtol(spec + 5, &end, 10);
            if (end == spec + 5 || *end != '\0' || dev < 0 || dev > 1024) {
                llm_err_set(err, LLM_EINVAL,
                            "backend \"%s\": bad device number", spec);
                return NULL;
            }
        }
#ifdef LLM_HAVE_CUDA
        return llm_backend_cuda_new((int) dev, err);
#else
        (void) dev;
        llm_err_set(err, LLM_EUNSUP, "backend \"%s\": built without CUDA",
                    spec);
        return NULL;
#endif
    }
    llm_err_set(err, LLM_EINVAL,
                "unknown backend \"%s\" (expected \"cpu\" or \"cuda:N\")",
                spec);
    return NULL;
}
