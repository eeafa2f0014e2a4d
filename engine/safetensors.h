/*
 * safetensors reader: maps the file read-only, parses its JSON header and
 * checks every tensor's dtype, shape and data_offsets against the file, so
 * that a truncated or corrupted file gives an error naming the file, the
 * tensor and the reason instead of an out-of-bounds read.
 *
 * Format: u64 little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "F32", "shape": [rows, cols], "data_offsets":
 * [begin, end]}, ..., "__metadata__": {...}}, then the data; offsets are
 * relative to the first byte after the header.
 */
#ifndef LLM_SAFETENSORS_H
#define LLM_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

#define LLM_ST_MAX_DIMS  8

typedef struct llm_st_tensor {
    char        *name;
    char         dtype[16];     /* as written: "F32", "BF16", "I64", ... */
    int          type;          /* llm_dtype (F32, F16, BF16) or -1 */
    int          n_dims;
    int64_t      shape[LLM_ST_MAX_DIMS];   /* outermost first, as PyTorch */
    const void  *data;          /* inside the mapping */
    size_t       nbytes;
} llm_st_tensor;

typedef struct llm_safetensors {
    char            *path;
    const uint8_t   *map;
    size_t           size;
    size_t           data_offset;   /* 8 + header length */
    int              n_tensors;
    llm_st_tensor   *tensors;       /* sorted by name */
} llm_safetensors;

/* Opens and validates path.  Tensors of dtypes the engine cannot use are
 * listed with type -1 (their sizes are still checked when the dtype is a
 * known safetensors one); the caller decides whether it needs them.  On
 * error returns NULL and err names the file, the tensor and the reason. */
llm_safetensors *llm_safetensors_open(const char *path, llm_err *err);
void             llm_safetensors_close(llm_safetensors *st);

const llm_st_tensor *llm_safetensors_find(const llm_safetensors *st,
                                          const char *name);

#endif /* LLM_SAFETENSORS_H */
