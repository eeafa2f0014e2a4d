/*
 * safetensors reader (see safetensors.h).
 */
#include "safetensors.h"
#include "mapped_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "../kernels/dtype.h"

/* the reference implementation refuses headers above 100 MB */
#define ST_MAX_HEADER  (100u << 20)


static const struct {
    const char *name;
    int         type;       /* llm_dtype or -1 */
    size_t      size;       /* bytes per element */
} st_dtypes[] = {
    { "F32",  LLM_F32,  4 }, { "F16",  LLM_F16,  2 }, { "BF16", LLM_BF16, 2 },
    { "F64",  -1, 8 }, { "I64", -1, 8 }, { "U64", -1, 8 },
    { "I32",  -1, 4 }, { "U32", -1, 4 }, { "I16", -1, 2 }, { "U16", -1, 2 },
    { "I8",   -1, 1 }, { "U8",  -1, 1 }, { "BOOL", -1, 1 },
    { "F8_E4M3", -1, 1 }, { "F8_E5M2", -1, 1 }
};


static int
st_tensor_cmp(const void *a, const void *b)
{
    return strcmp(((const llm_st_tensor *) a)->name,
                  ((const llm_st_tensor *) b)->name);
}


/* Fills t from one header entry; every number is checked against the
 * data section of data_size bytes. */
static int
st_parse_entry(llm_safetensors *st, llm_st_tensor *t, json_t *v,
               size_t data_size, llm_err *err)
{
    json_t     *jd, *js, *jo, *x;
    const char *ds;
    size_t      i, esize = 0, n;
    uint64_t    nel = 1;
    json_int_t  b, e;

    if (!json_is_object(v)) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: tensor \"%s\": header entry is not an "
                           "object", st->path, t->name);
    }
    jd = json_object_get(v, "dtype");
    js = json_object_get(v, "shape");
    jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo)
        || json_array_size(jo) != 2)
    {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: tensor \"%s\": header entry needs dtype, "
                           "shape and data_offsets [begin, end]",
                           st->path, t->name);
    }

    ds = json_string_value(jd);
    snprintf(t->dtype, sizeof(t->dtype), "%s", ds);
    t->type = -1;
    for (i = 0; i < sizeof(st_dtypes) / sizeof(st_dtypes[0]); i++) {
        if (strcmp(ds, st_dtypes[i].name) == 0) {
            t->type = st_dtypes[i].type;
            esize = st_dtypes[i].size;
            break;
        }
    }

    n = json_array_size(js);
    if (n > LLM_ST_MAX_DIMS) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: tensor \"%s\" has %zu dimensions (at most "
                           "%d)", st->path, t->name, n, LLM_ST_MAX_DIMS);
    }
    t->n_dims = (int) n;
    for (i = 0; i < n; i++) {
        x = json_array_get(js, i);
        if (!json_is_integer(x) || json_integer_value(x) < 0
            || json_integer_value(x) > ((json_int_t) 1 << 40))
        {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: tensor \"%s\": invalid shape "
                               "dimension %zu", st->path, t->name, i);
        }
        t->shape[i] = (int64_t) json_integer_value(x);
        if (t->shape[i] != 0 && nel > ((uint64_t) 1 << 48) / t->shape[i]) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: tensor \"%s\": shape too large",
                               st->path, t->name);
        }
        nel *= (uint64_t) t->shape[i];
    }

    x = json_array_get(jo, 0);
    b = json_is_integer(x) ? json_integer_value(x) : -1;
    x = json_array_get(jo, 1);
    e = json_is_integer(x) ? json_integer_value(x) : -1;
    if (b < 0 || e < b || (uint64_t) e > data_size) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: tensor \"%s\": data_offsets [%lld, %lld] "
                           "outside the data section of %zu bytes "
                           "(truncated or corrupted)", st->path, t->name,
                           (long long) b, (long long) e, data_size);
    }
    t->nbytes = (size_t) (e - b);
    t->data = st->map + st->data_offset + b;

    if (esize == 0) {
        /* unknown dtype: the size cannot be checked; the caller refuses
         * it if it needs the tensor */
        return 0;
    }
    if (nel * esize != (uint64_t) t->nbytes) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: tensor \"%s\": %s shape holds %llu bytes "
                           "but data_offsets give %zu", st->path, t->name,
                           t->dtype, (unsigned long long) (nel * esize),
                           t->nbytes);
    }
    return 0;
}


static int
st_parse(llm_safetensors *st, llm_err *err)
{
    uint64_t     hlen;
    json_t      *root, *v;
    json_error_t jerr;
    const char  *key;
    int          i, rc = 0;

    if (st->size < 8) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: truncated file (%zu bytes, no header)",
                           st->path, st->size);
    }
    memcpy(&hlen, st->map, 8);       /* little-endian hosts only */
    if (hlen < 2 || hlen > ST_MAX_HEADER || hlen > st->size - 8) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: header length %llu does not fit the file "
                           "of %zu bytes (truncated or not safetensors)",
                           st->path, (unsigned long long) hlen, st->size);
    }
    st->data_offset = 8 + (size_t) hlen;

    root = json_loadb((const char *) st->map + 8, (size_t) hlen,
                      JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: header is not valid JSON: %s (at byte %d)",
                           st->path, jerr.text, jerr.position);
    }
    if (!json_is_object(root)) {
        json_decref(root);
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: header is not a JSON object", st->path);
    }

    st->tensors = llm_calloc(json_object_size(root) + 1,
                             sizeof(llm_st_tensor));
    if (st->tensors == NULL) {
        json_decref(root);
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", st->path);
    }

    json_object_foreach(root, key, v) {
        llm_st_tensor *t;

        if (strcmp(key, "__metadata__") == 0) {
            continue;
        }
        t = &st->tensors[st->n_tensors];
        if ((t->name = llm_strdup(key)) == NULL) {
            rc = llm_err_set(err, LLM_ENOMEM, "%s: out of memory",
                             st->path);
            break;
        }
        st->n_tensors++;
        rc = st_parse_entry(st, t, v, st->size - st->data_offset, err);
        if (rc != 0) {
            break;
        }
    }
    json_decref(root);
    if (rc != 0) {
        return rc;
    }

    qsort(st->tensors, st->n_tensors, sizeof(llm_st_tensor), st_tensor_cmp);
    for (i = 1; i < st->n_tensors; i++) {
        /* jansson rejected duplicate keys already; kept as a guard */
        if (strcmp(st->tensors[i - 1].name, st->tensors[i].name) == 0) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: tensor \"%s\" listed twice", st->path,
                               st->tensors[i].name);
        }
    }
    return 0;
}


llm_safetensors *
llm_safetensors_open(const char *path, llm_err *err)
{
    llm_safetensors *st;
    const void  *map;
    size_t       size;

    map = llm_map_file(path, 8, &size, err);
    if (map == NULL) {
        return NULL;
    }
    st = llm_calloc(1, sizeof(llm_safetensors));
    if (st == NULL || (st->path = llm_strdup(path)) == NULL) {
        llm_free(st);
        llm_unmap_file(map, size);
        llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
        return NULL;
    }
    st->map = map;
    st->size = size;

    if (st_parse(st, err) != 0) {
        llm_safetensors_close(st);
        return NULL;
    }
    return st;
}


void
llm_safetensors_close(llm_safetensors *st)
{
    int i;

    if (st == NULL) {
        return;
    }
    if (st->tensors != NULL) {
        for (i = 0; i < st->n_tensors; i++) {
            llm_free(st->tensors[i].name);
        }
    }
    llm_free(st->tensors);
    llm_unmap_file(st->map, st->size);
    llm_free(st->path);
    llm_free(st);
}


const llm_st_tensor *
llm_safetensors_find(const llm_safetensors *st, const char *name)
{
    llm_st_tensor key;

    if (st->n_tensors == 0) {
        return NULL;
    }
    key.name = (char *) name;
    return bsearch(&key, st->tensors, st->n_tensors, sizeof(llm_st_tensor),
                   st_tensor_cmp);
}
