/*
 * GGUF reader (see gguf.h).  Format: magic "GGUF", u32 version (2 or 3),
 * u64 tensor count, u64 kv count, the kv pairs, the tensor infos, padding
 * to general.alignment (default 32), then the tensor data.
 */
#include "gguf.h"
#include "mapped_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../kernels/dtype.h"


typedef struct {
    const llm_gguf *g;
    size_t          pos;
    llm_err        *err;
} gguf_cursor;


static int
gguf_need(gguf_cursor *c, uint64_t n, const char *what)
{
    if (n > c->g->size || c->pos > c->g->size - n) {
        return llm_err_set(c->err, LLM_EFORMAT,
                           "%s: truncated file: %s at offset %zu needs %llu "
                           "bytes, file has %zu",
                           c->g->path, what, c->pos, (unsigned long long) n,
                           c->g->size);
    }
    return 0;
}


static int
gguf_read(gguf_cursor *c, void *dst, size_t n, const char *what)
{
    int rc = gguf_need(c, n, what);

    if (rc == 0) {
        memcpy(dst, c->g->map + c->pos, n);
        c->pos += n;
    }
    return rc;
}


static int
gguf_read_str(gguf_cursor *c, llm_str *s, const char *what)
{
    uint64_t n;
    int      rc;

    if ((rc = gguf_read(c, &n, 8, what)) != 0) {
        return rc;
    }
    if ((rc = gguf_need(c, n, what)) != 0) {
        return rc;
    }
    s->p = (const char *) c->g->map + c->pos;
    s->n = n;
    c->pos += n;
    return 0;
}


size_t
llm_gguf_type_size(int t)
{
    switch (t) {
    case LLM_GGUF_U8: case LLM_GGUF_I8: case LLM_GGUF_BOOL: return 1;
    case LLM_GGUF_U16: case LLM_GGUF_I16: return 2;
    case LLM_GGUF_U32: case LLM_GGUF_I32: case LLM_GGUF_F32: return 4;
    case LLM_GGUF_U64: case LLM_GGUF_I64: case LLM_GGUF_F64: return 8;
    default: return 0;
    }
}


static int
gguf_read_kv(gguf_cursor *c, llm_gguf_kv *kv, uint64_t idx)
{
    char     key[96], what[160];
    uint32_t t, at;
    uint64_t n, i, sz;
    int      rc;

    snprintf(what, sizeof(what), "key of metadata entry %llu",
             (unsigned long long) idx);
    if ((rc = gguf_read_str(c, &kv->key, what)) != 0) {
        return rc;
    }
    llm_str_cstr(kv->key, key, sizeof(key));
    snprintf(what, sizeof(what), "metadata \"%s\"", key);

    if ((rc = gguf_read(c, &t, 4, what)) != 0) {
        return rc;
    }
    kv->type = (int) t;
    kv->data = c->g->map + c->pos;

    if (t == LLM_GGUF_STRING) {
        llm_str s;
        return gguf_read_str(c, &s, what);
    }
    if (t != LLM_GGUF_ARRAY) {
        if ((sz = llm_gguf_type_size((int) t)) == 0) {
            return llm_err_set(c->err, LLM_EFORMAT,
                               "%s: %s has unknown value type %u",
                               c->g->path, what, t);
        }
        if ((rc = gguf_need(c, sz, what)) != 0) {
            return rc;
        }
        c->pos += sz;
        return 0;
    }

    if ((rc = gguf_read(c, &at, 4, what)) != 0
        || (rc = gguf_read(c, &n, 8, what)) != 0)
    {
        return rc;
    }
    kv->arr_type = (int) at;
    kv->arr_n = n;
    kv->data = c->g->map + c->pos;

    if (at == LLM_GGUF_STRING) {
        /* each element is at least its 8-byte length */
        if (n > (c->g->size - c->pos) / 8) {
            return llm_err_set(c->err, LLM_EFORMAT,
                               "%s: %s: string array of %llu elements "
                               "exceeds the file", c->g->path, what,
                               (unsigned long long) n);
        }
        kv->str_off = llm_malloc((n ? n : 1) * sizeof(uint64_t));
        if (kv->str_off == NULL) {
            return llm_err_set(c->err, LLM_ENOMEM, "%s: %s: out of memory",
                               c->g->path, what);
        }
        for (i = 0; i < n; i++) {
            llm_str s;
            kv->str_off[i] = c->pos;
            if ((rc = gguf_read_str(c, &s, what)) != 0) {
                return rc;
            }
        }
        return 0;
    }

    if ((sz = llm_gguf_type_size((int) at)) == 0) {
        return llm_err_set(c->err, LLM_EFORMAT,
                           "%s: %s: array of unsupported element type %u",
                           c->g->path, what, at);
    }
    if (n > (c->g->size - c->pos) / sz) {
        return llm_err_set(c->err, LLM_EFORMAT,
                           "%s: truncated file: %s: array of %llu elements "
                           "exceeds the file", c->g->path, what,
                           (unsigned long long) n);
    }
    c->pos += n * sz;
    return 0;
}


static int
gguf_read_tensor_info(gguf_cursor *c, llm_gguf_tensor *t, uint64_t idx)
{
    char     what[160], name[128];
    uint32_t nd, type;
    int      rc, d;

    snprintf(what, sizeof(what), "tensor info %llu",
             (unsigned long long) idx);
    if ((rc = gguf_read_str(c, &t->name, what)) != 0) {
        return rc;
    }
    llm_str_cstr(t->name, name, sizeof(name));
    snprintf(what, sizeof(what), "tensor \"%s\"", name);

    if ((rc = gguf_read(c, &nd, 4, what)) != 0) {
        return rc;
    }
    if (nd < 1 || nd > 4) {
        return llm_err_set(c->err, LLM_EFORMAT,
                           "%s: %s has %u dimensions (1..4 allowed)",
                           c->g->path, what, nd);
    }
    t->n_dims = (int) nd;
    for (d = 0; d < 4; d++) {
        t->ne[d] = 1;
    }
    for (d = 0; d < (int) nd; d++) {
        uint64_t v;
        if ((rc = gguf_read(c, &v, 8, what)) != 0) {
            return rc;
        }
        if (v == 0 || v > ((uint64_t) 1 << 40)) {
            return llm_err_set(c->err, LLM_EFORMAT,
                               "%s: %s has invalid dimension %d = %llu",
                               c->g->path, what, d, (unsigned long long) v);
        }
        t->ne[d] = (int64_t) v;
    }
    if ((rc = gguf_read(c, &type, 4, what)) != 0
        || (rc = gguf_read(c, &t->offset, 8, what)) != 0)
    {
        return rc;
    }
    t->type = (int) type;
    return 0;
}


static int
gguf_parse(llm_gguf *g, llm_err *err)
{
    gguf_cursor  c = { g, 0, err };
    uint32_t     magic;
    uint64_t     i;
    int          rc;

    if ((rc = gguf_read(&c, &magic, 4, "magic")) != 0) {
        return rc;
    }
    if (memcmp(&magic, "GGUF", 4) != 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: not a GGUF file (bad magic)", g->path);
    }
    if ((rc = gguf_read(&c, &g->version, 4, "version")) != 0) {
        return rc;
    }
    if (g->version < 2 || g->version > 3) {
        return llm_err_set(err, LLM_EUNSUP,
                           "%s: GGUF version %u is not supported (2, 3)",
                           g->path, g->version);
    }
    if ((rc = gguf_read(&c, &g->n_tensors, 8, "tensor count")) != 0
        || (rc = gguf_read(&c, &g->n_kv, 8, "metadata count")) != 0)
    {
        return rc;
    }
    /* every kv takes at least 12 bytes, every tensor info at least 28 */
    if (g->n_kv > g->size / 12 || g->n_tensors > g->size / 28) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: header claims %llu metadata entries and %llu "
                           "tensors, more than the file can hold", g->path,
                           (unsigned long long) g->n_kv,
                           (unsigned long long) g->n_tensors);
    }

    g->kv = llm_calloc(g->n_kv, sizeof(llm_gguf_kv));
    g->tensors = llm_calloc(g->n_tensors, sizeof(llm_gguf_tensor));
    if (g->kv == NULL || g->tensors == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", g->path);
    }

    for (i = 0; i < g->n_kv; i++) {
        if ((rc = gguf_read_kv(&c, &g->kv[i], i)) != 0) {
            return rc;
        }
    }

    g->alignment = 32;
    {
        int64_t a;
        rc = llm_gguf_get_i64(g, "general.alignment", &a, err);
        if (rc == 0) {
            if (a <= 0 || a > 65536 || (a & (a - 1)) != 0) {
                return llm_err_set(err, LLM_EFORMAT,
                                   "%s: general.alignment %lld is not a "
                                   "power of two", g->path, (long long) a);
            }
            g->alignment = (uint64_t) a;
        } else if (rc != LLM_ENOTFOUND) {
            return rc;
        }
    }

    for (i = 0; i < g->n_tensors; i++) {
        if ((rc = gguf_read_tensor_info(&c, &g->tensors[i], i)) != 0) {
            return rc;
        }
    }

    g->data_offset = (c.pos + g->alignment - 1) / g->alignment
                     * g->alignment;
    if (g->n_tensors == 0 && g->data_offset > g->size) {
        g->data_offset = g->size;   /* vocabulary only: may end unpadded */
    }
    if (g->data_offset > g->size) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: truncated file: no tensor data section",
                           g->path);
    }

    for (i = 0; i < g->n_tensors; i++) {
        llm_gguf_tensor       *t = &g->tensors[i];
        const llm_dtype_info  *ti = llm_dtype_get(t->type);
        char                   name[128];
        uint64_t               nel, nbytes;

        llm_str_cstr(t->name, name, sizeof(name));
        if (ti == NULL) {
            return llm_err_set(err, LLM_EUNSUP,
                               "%s: tensor \"%s\" has unsupported type %d",
                               g->path, name, t->type);
        }
        if (t->ne[0] % ti->block != 0) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: tensor \"%s\": row of %lld elements is "
                               "not a multiple of the %s block (%d)",
                               g->path, name, (long long) t->ne[0], ti->name,
                               ti->block);
        }
        /* each dimension may be up to 2^40: check the products */
        if (__builtin_mul_overflow((uint64_t) t->ne[1],
                                   (uint64_t) t->ne[2], &nel)
            || __builtin_mul_overflow(nel, (uint64_t) t->ne[3], &nel)
            || __builtin_mul_overflow(nel,
                                      (uint64_t) llm_row_bytes(t->type,
                                                               t->ne[0]),
                                      &nbytes)
            || nbytes > SIZE_MAX)
        {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: tensor \"%s\": shape too large "
                               "(corrupted)", g->path, name);
        }
        t->nbytes = (size_t) nbytes;
        if (t->offset % g->alignment != 0
            || t->offset > g->size - g->data_offset
            || t->nbytes > g->size - g->data_offset - t->offset)
        {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: tensor \"%s\": data [%llu, +%zu) lies "
                               "outside the file (truncated or corrupted)",
                               g->path, name,
                               (unsigned long long) t->offset, t->nbytes);
        }
        t->data = g->map + g->data_offset + t->offset;
    }
    return 0;
}


llm_gguf *
llm_gguf_open(const char *path, llm_err *err)
{
    llm_gguf *g;
    const void  *map;
    size_t       size;

    map = llm_map_file(path, 24, &size, err);
    if (map == NULL) {
        return NULL;
    }
    g = llm_calloc(1, sizeof(llm_gguf));
    if (g == NULL || (g->path = llm_strdup(path)) == NULL) {
        llm_free(g);
        llm_unmap_file(map, size);
        llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
        return NULL;
    }
    g->map = map;
    g->size = size;

    if (gguf_parse(g, err) != 0) {
        llm_gguf_close(g);
        return NULL;
    }
    return g;
}


void
llm_gguf_close(llm_gguf *g)
{
    uint64_t i;

    if (g == NULL) {
        return;
    }
    if (g->kv != NULL) {
        for (i = 0; i < g->n_kv; i++) {
            llm_free(g->kv[i].str_off);
        }
    }
    llm_free(g->kv);
    llm_free(g->tensors);
    llm_unmap_file(g->map, g->size);
    llm_free(g->path);
    llm_free(g);
}


const llm_gguf_kv *
llm_gguf_find(const llm_gguf *g, const char *key)
{
    uint64_t i;

    for (i = 0; i < g->n_kv; i++) {
        if (llm_str_eq(g->kv[i].key, key)) {
            return &g->kv[i];
        }
    }
    return NULL;
}


const llm_gguf_tensor *
llm_gguf_find_tensor(const llm_gguf *g, const char *name)
{
    uint64_t i;

    for (i = 0; i < g->n_tensors; i++) {
        if (llm_str_eq(g->tensors[i].name, name)) {
            return &g->tensors[i];
        }
    }
    return NULL;
}


int
llm_gguf_get_i64(const llm_gguf *g, const char *key, int64_t *out,
                 llm_err *err)
{
    const llm_gguf_kv *kv = llm_gguf_find(g, key);
    const uint8_t     *d;
    uint64_t           u;

    if (kv == NULL) {
        return LLM_ENOTFOUND;
    }
    d = kv->data;
    switch (kv->type) {
    case LLM_GGUF_U8:  *out = *d; return 0;
    case LLM_GGUF_I8:  *out = (int8_t) *d; return 0;
    case LLM_GGUF_U16: { uint16_t v; memcpy(&v, d, 2); *out = v; return 0; }
    case LLM_GGUF_I16: { int16_t v; memcpy(&v, d, 2); *out = v; return 0; }
    case LLM_GGUF_U32: { uint32_t v; memcpy(&v, d, 4); *out = v; return 0; }
    case LLM_GGUF_I32: { int32_t v; memcpy(&v, d, 4); *out = v; return 0; }
    case LLM_GGUF_I64: { int64_t v; memcpy(&v, d, 8); *out = v; return 0; }
    case LLM_GGUF_U64:
        memcpy(&u, d, 8);
        if (u > INT64_MAX) {
            break;
        }
        *out = (int64_t) u;
        return 0;
    default:
        break;
    }
    return llm_err_set(err, LLM_EFORMAT,
                       "%s: metadata \"%s\" is not a usable integer "
                       "(type %d)", g->path, key, kv->type);
}


int
llm_gguf_get_f32(const llm_gguf *g, const char *key, float *out,
                 llm_err *err)
{
    const llm_gguf_kv *kv = llm_gguf_find(g, key);
    int64_t            i;

    if (kv == NULL) {
        return LLM_ENOTFOUND;
    }
    if (kv->type == LLM_GGUF_F32) {
        memcpy(out, kv->data, 4);
        return 0;
    }
    if (kv->type == LLM_GGUF_F64) {
        double v;
        memcpy(&v, kv->data, 8);
        *out = (float) v;
        return 0;
    }
    if (llm_gguf_get_i64(g, key, &i, NULL) == 0) {
        *out = (float) i;
        return 0;
    }
    return llm_err_set(err, LLM_EFORMAT,
                       "%s: metadata \"%s\" is not a number (type %d)",
                       g->path, key, kv->type);
}


int
llm_gguf_get_bool(const llm_gguf *g, const char *key, int *out,
                  llm_err *err)
{
    const llm_gguf_kv *kv = llm_gguf_find(g, key);

    if (kv == NULL) {
        return LLM_ENOTFOUND;
    }
    if (kv->type != LLM_GGUF_BOOL) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: metadata \"%s\" is not a bool (type %d)",
                           g->path, key, kv->type);
    }
    *out = *(const uint8_t *) kv->data != 0;
    return 0;
}


int
llm_gguf_get_str(const llm_gguf *g, const char *key, llm_str *out,
                 llm_err *err)
{
    const llm_gguf_kv *kv = llm_gguf_find(g, key);
    uint64_t           n;

    if (kv == NULL) {
        return LLM_ENOTFOUND;
    }
    if (kv->type != LLM_GGUF_STRING) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: metadata \"%s\" is not a string (type %d)",
                           g->path, key, kv->type);
    }
    memcpy(&n, kv->data, 8);
    out->p = (const char *) kv->data + 8;
    out->n = n;
    return 0;
}


int
llm_gguf_arr_str(const llm_gguf_kv *kv, uint64_t i, llm_str *out)
{
    const uint8_t *base;
    uint64_t       n;

    if (kv->type != LLM_GGUF_ARRAY || kv->arr_type != LLM_GGUF_STRING
        || i >= kv->arr_n || kv->str_off == NULL)
    {
        return LLM_EINVAL;
    }
    /* data points at element 0, whose offset is str_off[0] */
    base = (const uint8_t *) kv->data - kv->str_off[0];
    memcpy(&n, base + kv->str_off[i], 8);
    out->p = (const char *) base + kv->str_off[i] + 8;
    out->n = n;
    return 0;
}


char *
llm_str_cstr(llm_str s, char *buf, size_t size)
{
    size_t n = s.n < size - 1 ? (size_t) s.n : size - 1;

    memcpy(buf, s.p, n);
    buf[n] = '\0';
    return buf;
}


int
llm_str_eq(llm_str s, const char *c)
{
    size_t n = strlen(c);

    return s.n == n && memcmp(s.p, c, n) == 0;
}
