/*
 * GGUF reader: maps the file read-only and indexes its key/value metadata
 * and tensor directory, checking every length and offset against the file
 * size, so that a truncated or corrupted file gives an error naming the
 * file, the field and the reason instead of an out-of-bounds read.
 *
 * Strings point into the mapping and are NOT NUL-terminated (llm_str).
 */
#ifndef LLM_GGUF_H
#define LLM_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

typedef struct llm_str {
    const char *p;
    uint64_t    n;
} llm_str;

enum {
    LLM_GGUF_U8 = 0, LLM_GGUF_I8 = 1, LLM_GGUF_U16 = 2, LLM_GGUF_I16 = 3,
    LLM_GGUF_U32 = 4, LLM_GGUF_I32 = 5, LLM_GGUF_F32 = 6, LLM_GGUF_BOOL = 7,
    LLM_GGUF_STRING = 8, LLM_GGUF_ARRAY = 9, LLM_GGUF_U64 = 10,
    LLM_GGUF_I64 = 11, LLM_GGUF_F64 = 12
};

typedef struct llm_gguf_kv {
    llm_str      key;
    int          type;        /* LLM_GGUF_* */
    int          arr_type;    /* element type when type == ARRAY */
    uint64_t     arr_n;       /* element count when type == ARRAY */
    const void  *data;        /* value (scalar) or first element (array);
                                 for STRING arrays the first length field */
    uint64_t    *str_off;     /* STRING arrays: file offset of each
                                 element's length field (built at open) */
} llm_gguf_kv;

typedef struct llm_gguf_tensor {
    llm_str      name;
    int          type;        /* llm_dtype */
    int          n_dims;
    int64_t      ne[4];       /* ne[0] innermost */
    uint64_t     offset;      /* from the start of the data section */
    size_t       nbytes;
    const void  *data;        /* inside the mapping */
} llm_gguf_tensor;

typedef struct llm_gguf {
    char            *path;
    const uint8_t   *map;
    size_t           size;
    uint32_t         version;
    uint64_t         n_kv;
    llm_gguf_kv     *kv;
    uint64_t         n_tensors;
    llm_gguf_tensor *tensors;
    uint64_t         alignment;
    size_t           data_offset;
} llm_gguf;

/* Opens and validates path.  On error returns NULL and err names the file,
 * the field or tensor and the reason. */
llm_gguf *llm_gguf_open(const char *path, llm_err *err);
void      llm_gguf_close(llm_gguf *g);

const llm_gguf_kv     *llm_gguf_find(const llm_gguf *g, const char *key);
const llm_gguf_tensor *llm_gguf_find_tensor(const llm_gguf *g,
                                            const char *name);

/* Typed getters: 0 on success; LLM_ENOTFOUND if absent (err untouched);
 * LLM_EFORMAT with a message if present with an unusable type. Integer
 * getters accept any integer type whose value fits. */
int llm_gguf_get_i64(const llm_gguf *g, const char *key, int64_t *out,
                     llm_err *err);
int llm_gguf_get_f32(const llm_gguf *g, const char *key, float *out,
                     llm_err *err);
int llm_gguf_get_bool(const llm_gguf *g, const char *key, int *out,
                      llm_err *err);
int llm_gguf_get_str(const llm_gguf *g, const char *key, llm_str *out,
                     llm_err *err);

/* Array access.  For a STRING array, element i (bounds were checked at
 * open).  For numeric arrays, the element size. */
int    llm_gguf_arr_str(const llm_gguf_kv *kv, uint64_t i, llm_str *out);
size_t llm_gguf_type_size(int gguf_type);

/* Copies s into buf as a C string (truncating); returns buf. */
char *llm_str_cstr(llm_str s, char *buf, size_t size);
int   llm_str_eq(llm_str s, const char *c);

#endif /* LLM_GGUF_H */
