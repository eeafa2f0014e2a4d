/*
 * Model loading (see model.h): hyper-parameters from GGUF metadata or a
 * Hugging Face config.json, weights from the GGUF data section or from
 * safetensors files, handed to the backend without copies where it can
 * (adopt_weights on the mapping).
 *
 * Loading runs in two passes so that a bad file never leaves half a model
 * on the backend: first every tensor is looked up and its type and shape
 * checked against the configuration, then the weights are fingerprinted
 * and handed to the backend.
 */
#include "model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "gguf.h"
#include "mapped_file.h"
#include "safetensors.h"
#include "sha256.h"


/* ---------------------------------------------------------------------- */
/* Sources: one GGUF file or a set of safetensors files                     */
/* ---------------------------------------------------------------------- */

struct llm_model_source {
    llm_gguf          *gguf;
    llm_safetensors  **st;              /* [n_st] */
    int                n_st;
    float             *freq_factors;    /* [n_rot / 2] or NULL */
};


/* One tensor as found in a source, in the engine's shape convention. */
typedef struct {
    const char  *file;          /* for messages */
    int          type;          /* llm_dtype or -1 */
    const char  *dtype;         /* type name for messages */
    int          n_dims;
    int64_t      ne[4];         /* ne[0] = row length */
    const void  *data;
    size_t       nbytes;
} src_tensor;


static void
src_close(llm_model_source *src)
{
    int i;

    if (src == NULL) {
        return;
    }
    llm_gguf_close(src->gguf);
    for (i = 0; i < src->n_st; i++) {
        llm_safetensors_close(src->st[i]);
    }
    llm_free(src->st);
    llm_free(src->freq_factors);
    llm_free(src);
}


/* 0 and *out filled, or LLM_ENOTFOUND. */
static int
src_find(const llm_model_source *src, const char *name, src_tensor *out)
{
    int i, d;

    memset(out, 0, sizeof(*out));
    if (src->gguf != NULL) {
        const llm_gguf_tensor      *t = llm_gguf_find_tensor(src->gguf, name);
        const llm_dtype_info       *ti;

        if (t == NULL) {
            return LLM_ENOTFOUND;
        }
        ti = llm_dtype_get(t->type);
        out->file = src->gguf->path;
        out->type = t->type;
        out->dtype = ti != NULL ? ti->name : "?";
        out->n_dims = t->n_dims;
        for (d = 0; d < 4; d++) {
            out->ne[d] = t->ne[d];
        }
        out->data = t->data;
        out->nbytes = t->nbytes;
        return 0;
    }

    for (i = 0; i < src->n_st; i++) {
        const llm_st_tensor *t = llm_safetensors_find(src->st[i], name);

        if (t == NULL) {
            continue;
        }
        out->file = src->st[i]->path;
        out->type = t->type;
        out->dtype = t->dtype;
        out->n_dims = t->n_dims;
        for (d = 0; d < 4; d++) {
            out->ne[d] = 1;
        }
        /* PyTorch order (outermost first) to ne order; dims beyond the
         * fourth are left to the shape check through n_dims */
        for (d = 0; d < t->n_dims && d < 4; d++) {
            out->ne[d] = t->shape[t->n_dims - 1 - d];
        }
        out->data = t->data;
        out->nbytes = t->nbytes;
        return 0;
    }
    return LLM_ENOTFOUND;
}


/* "[1536, 576]" in the file's own convention: ne order for GGUF (as
 * gguf-dump prints), outermost first for safetensors (as PyTorch). */
static const char *
fmt_shape(int format, const int64_t *ne, int n_dims, char *buf, size_t size)
{
    size_t len = 0;
    int    d, i;

    len += snprintf(buf, size, "[");
    for (i = 0; i < n_dims && len < size; i++) {
        d = format == LLM_FORMAT_GGUF ? i : n_dims - 1 - i;
        len += snprintf(buf + len, size - len, "%s%lld", i ? ", " : "",
                        (long long) ne[d]);
    }
    if (len < size) {
        snprintf(buf + len, size - len, "]");
    }
    return buf;
}


/* ---------------------------------------------------------------------- */
/* Configuration                                                            */
/* ---------------------------------------------------------------------- */

/* Llama 3 rope scaling: per-frequency divisors of theta, as the
 * reference converters compute them.  The base frequencies are float32
 * (as torch computes them), the rest double. */
static void
rope_llama3_factors(float *out, int n_rot, float base, double factor,
                    double low_freq_factor, double high_freq_factor,
                    double orig_ctx)
{
    double low_wavelen = orig_ctx / low_freq_factor;
    double high_wavelen = orig_ctx / high_freq_factor;
    int    i;

    for (i = 0; i < n_rot / 2; i++) {
        float  expo = (float) (2 * i) / (float) n_rot;
        float  freq = 1.0f / powf(base, expo);
        double wavelen = 2.0 * M_PI / (double) freq;

        if (wavelen < high_wavelen) {
            out[i] = 1.0f;
        } else if (wavelen > low_wavelen) {
            out[i] = (float) factor;
        } else {
            double smooth = (orig_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
            out[i] = (float) (1.0 / ((1.0 - smooth) / factor + smooth));
        }
    }
}


static int
cfg_validate(llm_model_config *c, const char *file, int head_dim_given,
             llm_err *err)
{
    struct { const char *what; int v, lo, hi; } r[] = {
        { "number of layers", c->n_layers, 1, 4096 },
        { "hidden size", c->dim, 1, 1 << 20 },
        { "attention heads", c->n_heads, 1, 4096 },
        { "key/value heads", c->n_kv_heads, 1, 4096 },
        { "feed-forward size", c->ffn_dim, 1, 1 << 22 },
        { "vocabulary size", c->n_vocab, 1, 1 << 28 },
        { "context length", c->n_ctx, 1, 1 << 28 },
    };
    size_t i;

    for (i = 0; i < sizeof(r) / sizeof(r[0]); i++) {
        if (r[i].v < r[i].lo || r[i].v > r[i].hi) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: %s %d is out of range [%d, %d]", file,
                               r[i].what, r[i].v, r[i].lo, r[i].hi);
        }
    }
    if (!head_dim_given) {
        if (c->dim % c->n_heads != 0) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: hidden size %d is not a multiple of "
                               "the %d attention heads", file, c->dim,
                               c->n_heads);
        }
        c->head_dim = c->dim / c->n_heads;
    }
    if (c->head_dim < 2 || c->head_dim > 4096 || c->head_dim % 2 != 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: head dimension %d is invalid (even, "
                           "2..4096)", file, c->head_dim);
    }
    if ((int64_t) c->head_dim * c->n_heads > (1 << 20)) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: %d heads of %d dimensions is too large",
                           file, c->n_heads, c->head_dim);
    }
    if (c->n_heads % c->n_kv_heads != 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: %d attention heads are not a multiple of "
                           "the %d key/value heads", file, c->n_heads,
                           c->n_kv_heads);
    }
    if (c->rope.n_rot == 0) {
        c->rope.n_rot = c->head_dim;
    }
    if (c->rope.n_rot < 2 || c->rope.n_rot > c->head_dim
        || c->rope.n_rot % 2 != 0)
    {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: rotary dimension %d is invalid for head "
                           "dimension %d", file, c->rope.n_rot, c->head_dim);
    }
    if (!(c->norm_eps > 0.0f) || !isfinite(c->norm_eps)) {
        return llm_err_set(err, LLM_EFORMAT, "%s: invalid RMS norm epsilon",
                           file);
    }
    if (!(c->rope.freq_base > 0.0f) || !isfinite(c->rope.freq_base)
        || !(c->rope.freq_scale > 0.0f) || !isfinite(c->rope.freq_scale))
    {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: invalid rope base or scale", file);
    }
    return 0;
}


/* --- GGUF --- */

static int
gguf_int(const llm_gguf *g, const char *arch, const char *key, int *out,
         int required, llm_err *err)
{
    char    full[128];
    int64_t v;
    int     rc;

    snprintf(full, sizeof(full), "%s.%s", arch, key);
    rc = llm_gguf_get_i64(g, full, &v, err);
    if (rc == LLM_ENOTFOUND) {
        if (required) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: metadata \"%s\" is missing", g->path,
                               full);
        }
        return 0;
    }
    if (rc != 0) {
        return rc;
    }
    if (v < 0 || v > INT32_MAX) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: metadata \"%s\" = %lld is out of range",
                           g->path, full, (long long) v);
    }
    *out = (int) v;
    return 0;
}


static int
gguf_float(const llm_gguf *g, const char *arch, const char *key, float *out,
           int required, llm_err *err)
{
    char full[128];
    int  rc;

    snprintf(full, sizeof(full), "%s.%s", arch, key);
    rc = llm_gguf_get_f32(g, full, out, err);
    if (rc == LLM_ENOTFOUND) {
        if (required) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: metadata \"%s\" is missing", g->path,
                               full);
        }
        return 0;
    }
    return rc;
}


/* ff: where to put rope_freqs.weight (a copy, [n_rot / 2]) or NULL. */
static int
gguf_read_config(const llm_gguf *g, llm_model_config *c, float **ff,
                 llm_err *err)
{
    char                   arch[32], type[32], buf[64];
    const char            *p;
    llm_str                s;
    const llm_gguf_kv     *kv;
    const llm_gguf_tensor *t;
    int                    rc, head_dim_given = 0, v = 0;
    float                  f;

    memset(c, 0, sizeof(*c));
    rc = llm_gguf_get_str(g, "general.architecture", &s, err);
    if (rc == LLM_ENOTFOUND) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: metadata \"general.architecture\" is "
                           "missing", g->path);
    }
    if (rc != 0) {
        return rc;
    }
    llm_str_cstr(s, arch, sizeof(arch));
    if (strcmp(arch, "llama") == 0 || strcmp(arch, "mistral") == 0) {
        c->rope.neox = 0;      /* the converter permuted wq and wk */
    } else if (strcmp(arch, "qwen2") == 0) {
        c->rope.neox = 1;
        c->qkv_bias = 1;
    } else {
        return llm_err_set(err, LLM_EUNSUP,
                           "%s: architecture \"%s\" is not supported "
                           "(llama, mistral, qwen2)", g->path, arch);
    }
    snprintf(c->arch, sizeof(c->arch), "%s", arch);

    if (llm_gguf_get_str(g, "general.name", &s, NULL) == 0) {
        llm_str_cstr(s, c->name, sizeof(c->name));
    } else {
        p = strrchr(g->path, '/');
        snprintf(c->name, sizeof(c->name), "%s", p ? p + 1 : g->path);
    }

    if ((rc = gguf_int(g, arch, "block_count", &c->n_layers, 1, err)) != 0
        || (rc = gguf_int(g, arch, "embedding_length", &c->dim, 1, err))
           != 0
        || (rc = gguf_int(g, arch, "feed_forward_length", &c->ffn_dim, 1,
                          err)) != 0
        || (rc = gguf_int(g, arch, "attention.head_count", &c->n_heads, 1,
                          err)) != 0
        || (rc = gguf_int(g, arch, "context_length", &c->n_ctx, 1, err))
           != 0
        || (rc = gguf_float(g, arch, "attention.layer_norm_rms_epsilon",
                            &c->norm_eps, 1, err)) != 0)
    {
        return rc;
    }
    c->n_kv_heads = c->n_heads;
    if ((rc = gguf_int(g, arch, "attention.head_count_kv", &c->n_kv_heads,
                       0, err)) != 0)
    {
        return rc;
    }
    if ((rc = gguf_int(g, arch, "attention.key_length", &v, 0, err)) != 0) {
        return rc;
    }
    if (v != 0) {
        int vl = v;

        c->head_dim = v;
        head_dim_given = 1;
        if ((rc = gguf_int(g, arch, "attention.value_length", &vl, 0, err))
            != 0)
        {
            return rc;
        }
        if (vl != v) {
            return llm_err_set(err, LLM_EUNSUP,
                               "%s: key length %d != value length %d is "
                               "not supported", g->path, v, vl);
        }
    }

    c->rope.freq_base = 10000.0f;
    c->rope.freq_scale = 1.0f;
    if ((rc = gguf_float(g, arch, "rope.freq_base", &c->rope.freq_base, 0,
                         err)) != 0
        || (rc = gguf_int(g, arch, "rope.dimension_count", &c->rope.n_rot,
                          0, err)) != 0)
    {
        return rc;
    }

    /* linear scaling: rope.scaling.type + factor, or the older
     * rope.scale_linear */
    f = 0.0f;
    snprintf(buf, sizeof(buf), "%s.rope.scaling.type", arch);
    rc = llm_gguf_get_str(g, buf, &s, err);
    if (rc != 0 && rc != LLM_ENOTFOUND) {
        return rc;
    }
    llm_str_cstr(rc == 0 ? s : (llm_str) { "none", 4 }, type, sizeof(type));
    if (strcmp(type, "linear") == 0) {
        if ((rc = gguf_float(g, arch, "rope.scaling.factor", &f, 1, err))
            != 0)
        {
            return rc;
        }
    } else if (strcmp(type, "none") != 0) {
        return llm_err_set(err, LLM_EUNSUP,
                           "%s: rope scaling \"%s\" is not supported "
                           "(none, linear)", g->path, type);
    } else if ((rc = gguf_float(g, arch, "rope.scale_linear", &f, 0, err))
               != 0)
    {
        return rc;
    }
    if (f != 0.0f) {
        if (!(f > 0.0f) || !isfinite(f)) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: invalid rope scaling factor", g->path);
        }
        c->rope.freq_scale = 1.0f / f;
    }

    /* vocabulary: explicit, else the tokenizer's, else the embedding's */
    if ((rc = gguf_int(g, arch, "vocab_size", &c->n_vocab, 0, err)) != 0) {
        return rc;
    }
    if (c->n_vocab == 0) {
        kv = llm_gguf_find(g, "tokenizer.ggml.tokens");
        t = llm_gguf_find_tensor(g, "token_embd.weight");
        if (kv != NULL && kv->type == LLM_GGUF_ARRAY) {
            c->n_vocab = kv->arr_n > INT32_MAX ? -1 : (int) kv->arr_n;
        } else if (t != NULL) {
            c->n_vocab = t->ne[1] > INT32_MAX ? -1 : (int) t->ne[1];
        }
    }

    c->tied_embeddings = llm_gguf_find_tensor(g, "output.weight") == NULL;
    if (llm_gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL) {
        c->qkv_bias = 1;
    }

    if ((rc = cfg_validate(c, g->path, head_dim_given, err)) != 0) {
        return rc;
    }

    /* Llama 3 scaling comes as a tensor of per-frequency divisors */
    t = llm_gguf_find_tensor(g, "rope_freqs.weight");
    if (t != NULL) {
        if (t->type != LLM_F32 || t->ne[0] != c->rope.n_rot / 2
            || t->ne[1] * t->ne[2] * t->ne[3] != 1)
        {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: tensor \"rope_freqs.weight\" must be "
                               "F32 [%d] (got %s [%lld, %lld])", g->path,
                               c->rope.n_rot / 2,
                               llm_dtype_get(t->type)
                               ? llm_dtype_get(t->type)->name : "?",
                               (long long) t->ne[0], (long long) t->ne[1]);
        }
        if (ff != NULL) {
            *ff = llm_malloc(t->nbytes);
            if (*ff == NULL) {
                return llm_err_set(err, LLM_ENOMEM, "%s: out of memory",
                                   g->path);
            }
            memcpy(*ff, t->data, t->nbytes);
            c->rope.freq_factors = *ff;
        }
    }
    return 0;
}


/* --- Hugging Face config.json --- */

/* Reads an integer field; *given tells whether it was there (NULL:
 * required).  JSON null counts as absent. */
static int
json_int_field(json_t *root, const char *file, const char *key, int *out,
               int *given, llm_err *err)
{
    json_t *v = json_object_get(root, key);

    if (v == NULL || json_is_null(v)) {
        if (given == NULL) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: field \"%s\" is missing", file, key);
        }
        *given = 0;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0
        || json_integer_value(v) > INT32_MAX)
    {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: field \"%s\" must be a non-negative "
                           "integer", file, key);
    }
    *out = (int) json_integer_value(v);
    if (given != NULL) {
        *given = 1;
    }
    return 0;
}


/* Optional number (integer or real); leaves *out if absent. */
static int
json_num_field(json_t *obj, const char *file, const char *key, double *out,
               llm_err *err)
{
    json_t *v = json_object_get(obj, key);

    if (v == NULL || json_is_null(v)) {
        return 0;
    }
    if (!json_is_number(v)) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: field \"%s\" must be a number", file, key);
    }
    *out = json_number_value(v);
    return 0;
}


static int
json_bool_field(json_t *obj, const char *file, const char *key, int *out,
                llm_err *err)
{
    json_t *v = json_object_get(obj, key);

    if (v == NULL || json_is_null(v)) {
        return 0;
    }
    if (!json_is_boolean(v)) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: field \"%s\" must be true or false", file,
                           key);
    }
    *out = json_is_true(v);
    return 0;
}


static int
hf_rope_scaling(json_t *rs, const char *file, llm_model_config *c,
                float **ff, llm_err *err)
{
    json_t     *jt;
    const char *type;
    double      factor = 0, low = 1.0, high = 4.0, orig = 8192.0;
    int         rc;
    float      *f;

    if (rs == NULL || json_is_null(rs)) {
        return 0;
    }
    if (!json_is_object(rs)) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: field \"rope_scaling\" must be an object",
                           file);
    }
    jt = json_object_get(rs, "rope_type");
    if (jt == NULL) {
        jt = json_object_get(rs, "type");
    }
    if (!json_is_string(jt)) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: rope_scaling has no \"rope_type\"", file);
    }
    type = json_string_value(jt);
    if (strcmp(type, "default") == 0) {
        return 0;
    }
    if (strcmp(type, "linear") != 0 && strcmp(type, "llama3") != 0) {
        return llm_err_set(err, LLM_EUNSUP,
                           "%s: rope_scaling type \"%s\" is not supported "
                           "(linear, llama3)", file, type);
    }
    if ((rc = json_num_field(rs, file, "factor", &factor, err)) != 0) {
        return rc;
    }
    if (!(factor > 0.0) || !isfinite(factor)) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: rope_scaling needs a positive \"factor\"",
                           file);
    }
    if (strcmp(type, "linear") == 0) {
        c->rope.freq_scale = (float) (1.0 / factor);
        return 0;
    }

    if ((rc = json_num_field(rs, file, "low_freq_factor", &low, err)) != 0
        || (rc = json_num_field(rs, file, "high_freq_factor", &high, err))
           != 0
        || (rc = json_num_field(rs, file,
                                "original_max_position_embeddings", &orig,
                                err)) != 0)
    {
        return rc;
    }
    if (!(low > 0.0) || !(high > low) || !(orig > 0.0)
        || !isfinite(high) || !isfinite(orig))
    {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: rope_scaling llama3 needs 0 < "
                           "low_freq_factor < high_freq_factor and a "
                           "positive original_max_position_embeddings",
                           file);
    }
    if (ff == NULL) {
        /* llm_model_read_config: nothing would own the array */
        return 0;
    }
    f = llm_malloc(sizeof(float) * (size_t) (c->rope.n_rot / 2));
    if (f == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", file);
    }
    rope_llama3_factors(f, c->rope.n_rot, c->rope.freq_base, factor, low,
                        high, orig);
    *ff = f;
    c->rope.freq_factors = f;
    return 0;
}


static int
hf_read_config(const char *dir, llm_model_config *c, float **ff,
               llm_err *err)
{
    char          file[4096];
    json_t       *root, *v;
    json_error_t  jerr;
    const char   *mt, *p;
    int           rc, hd_given = 0, kv_given = 0, ctx_given = 0, bias = 0;
    int           mlp_bias = 0;
    double        eps = 1e-6, theta = 10000.0;

    memset(c, 0, sizeof(*c));
    snprintf(file, sizeof(file), "%s/config.json", dir);
    root = json_load_file(file, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        struct stat sb;

        if (stat(file, &sb) != 0) {
            return llm_err_set(err, LLM_EIO, "%s: %s", file,
                               strerror(errno));
        }
        return llm_err_set(err, LLM_EFORMAT, "%s: line %d: %s", file,
                           jerr.line, jerr.text);
    }
    if (!json_is_object(root)) {
        json_decref(root);
        return llm_err_set(err, LLM_EFORMAT, "%s: not a JSON object", file);
    }

    v = json_object_get(root, "model_type");
    if (!json_is_string(v)) {
        rc = llm_err_set(err, LLM_EFORMAT,
                         "%s: field \"model_type\" is missing", file);
        goto done;
    }
    mt = json_string_value(v);
    if (strcmp(mt, "llama") == 0 || strcmp(mt, "mistral") == 0) {
        c->qkv_bias = 0;
    } else if (strcmp(mt, "qwen2") == 0) {
        c->qkv_bias = 1;       /* Qwen2 always has q/k/v biases */
    } else {
        rc = llm_err_set(err, LLM_EUNSUP,
                         "%s: model_type \"%s\" is not supported (llama, "
                         "mistral, qwen2)", file, mt);
        goto done;
    }
    snprintf(c->arch, sizeof(c->arch), "%s", mt);

    v = json_object_get(root, "_name_or_path");
    if (json_is_string(v) && json_string_length(v) > 0) {
        snprintf(c->name, sizeof(c->name), "%s", json_string_value(v));
    } else {
        p = strrchr(dir, '/');
        snprintf(c->name, sizeof(c->name), "%s",
                 p != NULL && p[1] != '\0' ? p + 1 : dir);
    }

    c->n_ctx = 2048;
    if ((rc = json_int_field(root, file, "hidden_size", &c->dim, NULL, err))
        != 0
        || (rc = json_int_field(root, file, "intermediate_size", &c->ffn_dim,
                                NULL, err)) != 0
        || (rc = json_int_field(root, file, "num_hidden_layers",
                                &c->n_layers, NULL, err)) != 0
        || (rc = json_int_field(root, file, "num_attention_heads",
                                &c->n_heads, NULL, err)) != 0
        || (rc = json_int_field(root, file, "vocab_size", &c->n_vocab, NULL,
                                err)) != 0
        || (rc = json_int_field(root, file, "num_key_value_heads",
                                &c->n_kv_heads, &kv_given, err)) != 0
        || (rc = json_int_field(root, file, "head_dim", &c->head_dim,
                                &hd_given, err)) != 0
        || (rc = json_int_field(root, file, "max_position_embeddings",
                                &c->n_ctx, &ctx_given, err)) != 0
        || (rc = json_num_field(root, file, "rms_norm_eps", &eps, err)) != 0
        || (rc = json_bool_field(root, file, "tie_word_embeddings",
                                 &c->tied_embeddings, err)) != 0
        || (rc = json_bool_field(root, file, "attention_bias", &bias, err))
           != 0
        || (rc = json_bool_field(root, file, "mlp_bias", &mlp_bias, err))
           != 0)
    {
        goto done;
    }
    if (!kv_given) {
        c->n_kv_heads = c->n_heads;
    }

    /* rope_theta, or inside rope_parameters (newer transformers) */
    v = json_object_get(root, "rope_parameters");
    if (json_is_object(v)) {
        if ((rc = json_num_field(v, file, "rope_theta", &theta, err)) != 0) {
            goto done;
        }
    }
    if ((rc = json_num_field(root, file, "rope_theta", &theta, err)) != 0) {
        goto done;
    }

    v = json_object_get(root, "hidden_act");
    if (v != NULL && (!json_is_string(v)
                      || strcmp(json_string_value(v), "silu") != 0))
    {
        rc = llm_err_set(err, LLM_EUNSUP,
                         "%s: hidden_act must be \"silu\"", file);
        goto done;
    }
    if (c->qkv_bias == 0 && bias) {
        /* Llama's attention_bias also adds an o_proj bias */
        rc = llm_err_set(err, LLM_EUNSUP,
                         "%s: attention_bias (with an o_proj bias) is not "
                         "supported", file);
        goto done;
    }
    if (mlp_bias) {
        rc = llm_err_set(err, LLM_EUNSUP, "%s: mlp_bias is not supported",
                         file);
        goto done;
    }
    v = json_object_get(root, "use_sliding_window");
    if (json_is_true(v)) {
        rc = llm_err_set(err, LLM_EUNSUP,
                         "%s: use_sliding_window is not supported", file);
        goto done;
    }

    c->norm_eps = (float) eps;
    c->rope.neox = 1;
    c->rope.freq_base = (float) theta;
    c->rope.freq_scale = 1.0f;
    c->rope.n_rot = 0;          /* = head_dim after validation */

    if ((rc = cfg_validate(c, file, hd_given, err)) != 0) {
        goto done;
    }

    v = json_object_get(root, "rope_scaling");
    if (v == NULL || json_is_null(v)) {
        v = json_object_get(root, "rope_parameters");
        if (v != NULL && json_object_get(v, "rope_type") == NULL) {
            v = NULL;
        }
    }
    rc = hf_rope_scaling(v, file, c, ff, err);

done:
    json_decref(root);
    return rc;
}


static int
path_is_dir(const char *path, int *is_dir, llm_err *err)
{
    struct stat sb;

    if (stat(path, &sb) != 0) {
        return llm_err_set(err, LLM_EIO, "%s: %s", path, strerror(errno));
    }
    *is_dir = S_ISDIR(sb.st_mode);
    return 0;
}


int
llm_model_read_config(const char *path, llm_model_config *cfg,
                      llm_err *err)
{
    llm_gguf *g;
    int       rc, is_dir;

    if ((rc = path_is_dir(path, &is_dir, err)) != 0) {
        return rc;
    }
    if (is_dir) {
        return hf_read_config(path, cfg, NULL, err);
    }
    if ((g = llm_gguf_open(path, err)) == NULL) {
        return err != NULL ? err->code : LLM_EFORMAT;
    }
    /* without a model to own them, Llama 3 freq factors are not kept:
     * cfg->rope.freq_factors stays NULL */
    rc = gguf_read_config(g, cfg, NULL, err);
    llm_gguf_close(g);
    return rc;
}


/* ---------------------------------------------------------------------- */
/* Opening the weight files of a Hugging Face folder                        */
/* ---------------------------------------------------------------------- */

static int
hf_add_shard(llm_model_source *src, const char *dir, const char *name,
             llm_err *err)
{
    char              file[4096];
    llm_safetensors **st;

    snprintf(file, sizeof(file), "%s/%s", dir, name);
    st = llm_realloc(src->st, sizeof(*st) * (size_t) (src->n_st + 1));
    if (st == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", file);
    }
    src->st = st;
    st[src->n_st] = llm_safetensors_open(file, err);
    if (st[src->n_st] == NULL) {
        return err != NULL ? err->code : LLM_EFORMAT;
    }
    src->n_st++;
    return 0;
}


static int
hf_open_weights(llm_model_source *src, const char *dir, llm_err *err)
{
    char          file[4096];
    json_t       *root, *wm, *v, *seen;
    json_error_t  jerr;
    const char   *key, *shard;
    struct stat   sb;
    int           rc = 0, i;

    snprintf(file, sizeof(file), "%s/model.safetensors", dir);
    if (stat(file, &sb) == 0) {
        return hf_add_shard(src, dir, "model.safetensors", err);
    }

    snprintf(file, sizeof(file), "%s/model.safetensors.index.json", dir);
    if (stat(file, &sb) != 0) {
        return llm_err_set(err, LLM_ENOTFOUND,
                           "%s: no model.safetensors or "
                           "model.safetensors.index.json", dir);
    }
    root = json_load_file(file, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        return llm_err_set(err, LLM_EFORMAT, "%s: line %d: %s", file,
                           jerr.line, jerr.text);
    }
    wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm) || json_object_size(wm) == 0) {
        json_decref(root);
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: no \"weight_map\" object", file);
    }
    if ((seen = json_object()) == NULL) {
        json_decref(root);
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", file);
    }

    json_object_foreach(wm, key, v) {
        if (!json_is_string(v)) {
            rc = llm_err_set(err, LLM_EFORMAT,
                             "%s: weight_map entry \"%s\" is not a file "
                             "name", file, key);
            break;
        }
        shard = json_string_value(v);
        /* a shard must be a plain file name inside the folder */
        if (shard[0] == '\0' || shard[0] == '.' || strchr(shard, '/')) {
            rc = llm_err_set(err, LLM_EFORMAT,
                             "%s: weight_map entry \"%s\": bad file name "
                             "\"%s\"", file, key, shard);
            break;
        }
        if (json_object_get(seen, shard) == NULL) {
            if (json_object_set_new(seen, shard, json_true()) != 0) {
                rc = llm_err_set(err, LLM_ENOMEM, "%s: out of memory",
                                 file);
                break;
            }
            if ((rc = hf_add_shard(src, dir, shard, err)) != 0) {
                break;
            }
        }
        /* the tensor must be in the shard the index names */
        for (i = 0; i < src->n_st; i++) {
            const char *b = strrchr(src->st[i]->path, '/');

            if (b != NULL && strcmp(b + 1, shard) == 0) {
                break;
            }
        }
        if (i < src->n_st && llm_safetensors_find(src->st[i], key) == NULL) {
            rc = llm_err_set(err, LLM_EFORMAT,
                             "%s/%s: tensor \"%s\" listed in "
                             "model.safetensors.index.json is missing", dir,
                             shard, key);
            break;
        }
    }
    json_decref(seen);
    json_decref(root);
    return rc;
}


/* ---------------------------------------------------------------------- */
/* The tensor plan                                                          */
/* ---------------------------------------------------------------------- */

enum { T_MATRIX = 0, T_VECTOR = 1 };

typedef struct {
    char        name[96];
    llm_tensor *dst;
    int64_t     ne0, ne1;       /* expected; ne1 = 1 for vectors */
    int         kind;           /* T_MATRIX: stored type; T_VECTOR: F32 */
    int         optional;
    int         found;
    src_tensor  st;
} plan_entry;


typedef struct {
    llm_model        *m;
    const char       *where;    /* path for messages not about one file */
    llm_err          *err;
    plan_entry       *plan;
    int               n_plan;
} loader;


static void
plan_add(loader *ld, const char *name, llm_tensor *dst, int64_t ne0,
         int64_t ne1, int kind, int optional)
{
    plan_entry *e = &ld->plan[ld->n_plan++];

    snprintf(e->name, sizeof(e->name), "%s", name);
    e->dst = dst;
    e->ne0 = ne0;
    e->ne1 = ne1;
    e->kind = kind;
    e->optional = optional;
}


static void
plan_build(loader *ld)
{
    llm_model              *m = ld->m;
    const llm_model_config *c = &m->cfg;
    int                     gguf = m->format == LLM_FORMAT_GGUF;
    int64_t                 qd = (int64_t) c->n_heads * c->head_dim;
    int64_t                 kvd = (int64_t) c->n_kv_heads * c->head_dim;
    char                    n[96];
    int                     l, i;
    static const struct {
        const char *gguf, *hf;
        int         which;      /* index into the table below */
    } names[] = {
        { "attn_norm.weight",   "input_layernorm.weight", 0 },
        { "attn_q.weight",      "self_attn.q_proj.weight", 1 },
        { "attn_k.weight",      "self_attn.k_proj.weight", 2 },
        { "attn_v.weight",      "self_attn.v_proj.weight", 3 },
        { "attn_output.weight", "self_attn.o_proj.weight", 4 },
        { "attn_q.bias",        "self_attn.q_proj.bias", 5 },
        { "attn_k.bias",        "self_attn.k_proj.bias", 6 },
        { "attn_v.bias",        "self_attn.v_proj.bias", 7 },
        { "ffn_norm.weight",    "post_attention_layernorm.weight", 8 },
        { "ffn_gate.weight",    "mlp.gate_proj.weight", 9 },
        { "ffn_up.weight",      "mlp.up_proj.weight", 10 },
        { "ffn_down.weight",    "mlp.down_proj.weight", 11 },
    };

    plan_add(ld, gguf ? "token_embd.weight" : "model.embed_tokens.weight",
             &m->tok_embd, c->dim, c->n_vocab, T_MATRIX, 0);
    plan_add(ld, gguf ? "output_norm.weight" : "model.norm.weight",
             &m->out_norm, c->dim, 1, T_VECTOR, 0);
    if (!c->tied_embeddings) {
        plan_add(ld, gguf ? "output.weight" : "lm_head.weight", &m->output,
                 c->dim, c->n_vocab, T_MATRIX, 0);
    }

    for (l = 0; l < c->n_layers; l++) {
        llm_layer_weights *w = &m->layers[l];
        struct { llm_tensor *t; int64_t ne0, ne1; int kind; } d[] = {
            { &w->attn_norm, c->dim, 1, T_VECTOR },
            { &w->wq, c->dim, qd, T_MATRIX },
            { &w->wk, c->dim, kvd, T_MATRIX },
            { &w->wv, c->dim, kvd, T_MATRIX },
            { &w->wo, qd, c->dim, T_MATRIX },
            { &w->bq, qd, 1, T_VECTOR },
            { &w->bk, kvd, 1, T_VECTOR },
            { &w->bv, kvd, 1, T_VECTOR },
            { &w->ffn_norm, c->dim, 1, T_VECTOR },
            { &w->w_gate, c->dim, c->ffn_dim, T_MATRIX },
            { &w->w_up, c->dim, c->ffn_dim, T_MATRIX },
            { &w->w_down, c->ffn_dim, c->dim, T_MATRIX },
        };

        for (i = 0; i < (int) (sizeof(names) / sizeof(names[0])); i++) {
            int k = names[i].which;

            if (k >= 5 && k <= 7 && !c->qkv_bias) {
                continue;
            }
            if (gguf) {
                snprintf(n, sizeof(n), "blk.%d.%s", l, names[i].gguf);
            } else {
                snprintf(n, sizeof(n), "model.layers.%d.%s", l,
                         names[i].hf);
            }
            plan_add(ld, n, d[k].t, d[k].ne0, d[k].ne1, d[k].kind, 0);
        }
    }
}


/* Looks up every planned tensor and checks its type and shape. */
static int
plan_check(loader *ld, llm_model_source *src)
{
    llm_model  *m = ld->m;
    char        got[96], want[96];
    int64_t     ne[2];
    int         i, d;

    for (i = 0; i < ld->n_plan; i++) {
        plan_entry *e = &ld->plan[i];
        src_tensor *t = &e->st;
        int         ok;

        if (src_find(src, e->name, t) != 0) {
            if (e->optional) {
                continue;
            }
            return llm_err_set(ld->err, LLM_ENOTFOUND,
                               "%s: missing tensor \"%s\"", ld->where,
                               e->name);
        }
        e->found = 1;

        if (llm_dtype_get(t->type) == NULL) {
            return llm_err_set(ld->err, LLM_EUNSUP,
                               "%s: tensor \"%s\" has unsupported type %s",
                               t->file, e->name, t->dtype);
        }
        if (e->kind == T_VECTOR && t->type != LLM_F32 && t->type != LLM_F16
            && t->type != LLM_BF16)
        {
            return llm_err_set(ld->err, LLM_EUNSUP,
                               "%s: tensor \"%s\" has type %s; norms and "
                               "biases must be F32, F16 or BF16", t->file,
                               e->name, t->dtype);
        }

        /* vectors may come as [n] or [1, n]; matrices must be 2-D */
        ne[0] = e->ne0;
        ne[1] = e->ne1;
        ok = t->n_dims <= 4 && t->ne[0] == e->ne0 && t->ne[1] == e->ne1
             && t->ne[2] == 1 && t->ne[3] == 1;
        if (e->kind == T_MATRIX) {
            ok = ok && t->n_dims == 2;
        } else {
            ok = ok && t->n_dims >= 1 && t->n_dims <= 2;
        }
        if (!ok) {
            int64_t tne[4];

            for (d = 0; d < 4; d++) {
                tne[d] = t->ne[d];
            }
            return llm_err_set(ld->err, LLM_EFORMAT,
                               "%s: tensor \"%s\" has shape %s, expected "
                               "%s from the configuration", t->file,
                               e->name,
                               fmt_shape(m->format, tne,
                                         t->n_dims > 4 ? 4 : t->n_dims, got,
                                         sizeof(got)),
                               fmt_shape(m->format, ne,
                                         e->kind == T_VECTOR ? 1 : 2, want,
                                         sizeof(want)));
        }
        if (llm_row_bytes(t->type, t->ne[0]) * (size_t) t->ne[1]
            != t->nbytes)
        {
            return llm_err_set(ld->err, LLM_EFORMAT,
                               "%s: tensor \"%s\": %zu bytes of data for "
                               "its shape and type", t->file, e->name,
                               t->nbytes);
        }
    }
    return 0;
}


/* ---------------------------------------------------------------------- */
/* Handing weights to the backend                                           */
/* ---------------------------------------------------------------------- */

static int
own_buffer(llm_model *m, void *p)
{
    void **o = llm_realloc(m->owned, sizeof(void *) * (size_t) (m->n_owned
                                                                + 1));

    if (o == NULL) {
        return LLM_ENOMEM;
    }
    m->owned = o;
    m->owned[m->n_owned++] = p;
    return 0;
}


/* Copies host bytes into a new backend buffer the model owns. */
static int
upload_copy(loader *ld, const char *name, const void *host, size_t n,
            void **out)
{
    llm_backend *be = ld->m->be;
    void        *p;

    p = be->ops->alloc(be, n);
    if (p == NULL) {
        return llm_err_set(ld->err, LLM_ENOMEM,
                           "%s: tensor \"%s\": cannot allocate %zu bytes "
                           "on backend %s", ld->where, name, n,
                           be->ops->name);
    }
    if (own_buffer(ld->m, p) != 0) {
        be->ops->release(be, p);
        return llm_err_set(ld->err, LLM_ENOMEM, "%s: out of memory",
                           ld->where);
    }
    if (be->ops->upload(be, p, host, n) != 0) {
        return llm_err_set(ld->err, LLM_EBACKEND,
                           "%s: tensor \"%s\": upload failed: %s",
                           ld->where, name, llm_backend_error(be));
    }
    *out = p;
    return 0;
}


static size_t
type_align(int type)
{
    return type == LLM_F32 ? 4 : 2;    /* f16 scales start every block */
}


static int
load_entry(loader *ld, plan_entry *e)
{
    llm_backend *be = ld->m->be;
    src_tensor  *t = &e->st;
    llm_tensor  *dst = e->dst;
    void        *p = NULL;
    int          rc;

    dst->ne[0] = t->ne[0];
    dst->ne[1] = t->ne[1];

    if (e->kind == T_VECTOR && t->type != LLM_F32) {
        /* F16 / BF16 norm or bias: converted to F32 */
        const uint16_t *h = t->data;
        float          *f;
        int64_t         i, n = t->ne[0];

        f = llm_malloc(sizeof(float) * (size_t) n);
        if (f == NULL) {
            return llm_err_set(ld->err, LLM_ENOMEM, "%s: out of memory",
                               ld->where);
        }
        for (i = 0; i < n; i++) {
            uint16_t u;

            memcpy(&u, h + i, 2);        /* may be unaligned */
            f[i] = t->type == LLM_F16 ? llm_f16_to_f32(u)
                                      : llm_bf16_to_f32(u);
        }
        rc = upload_copy(ld, e->name, f, sizeof(float) * (size_t) n, &p);
        llm_free(f);
        if (rc != 0) {
            return rc;
        }
        dst->type = LLM_F32;
        dst->nb = sizeof(float) * (size_t) n;
        dst->data = p;
        return 0;
    }

    dst->type = t->type;
    dst->nb = llm_row_bytes(t->type, t->ne[0]);
    if ((uintptr_t) t->data % type_align(t->type) != 0) {
        /* safetensors does not promise aligned data: copy */
        rc = upload_copy(ld, e->name, t->data, t->nbytes, &p);
        ld->m->copied_bytes += rc == 0 ? t->nbytes : 0;
    } else {
        /* a device backend may convert the type here (quantized weights
         * expanded once at load), so the tensor is handed over whole */
        rc = llm_backend_adopt_tensor(be, dst, t->data, t->nbytes);
        p = dst->data;
        if (rc == 0 && p != t->data) {
            /* the backend keeps its own copy (another layout or type):
             * the mapping's pages of this tensor are not read again */
            llm_map_file_drop(t->data, t->nbytes);
            ld->m->copied_bytes += t->nbytes;
        }
        if (rc != 0) {
            rc = llm_err_set(ld->err, rc == LLM_ENOMEM ? LLM_ENOMEM
                                                      : LLM_EBACKEND,
                             "%s: tensor \"%s\": %s", ld->where, e->name,
                             llm_backend_error(be));
        }
    }
    if (rc != 0) {
        return rc;
    }
    dst->data = p;
    return 0;
}


/* ---------------------------------------------------------------------- */
/* Fingerprint                                                              */
/* ---------------------------------------------------------------------- */

#define FP_SAMPLE   4096
#define FP_STRIDE   (1u << 20)


static void
fp_bytes(llm_sha256_ctx *h, const uint8_t *p, size_t n)
{
    size_t off;

    if (n <= 2 * FP_SAMPLE) {
        llm_sha256_update(h, p, n);
        return;
    }
    llm_sha256_update(h, p, FP_SAMPLE);
    for (off = FP_STRIDE; off + FP_SAMPLE <= n - FP_SAMPLE;
         off += FP_STRIDE)
    {
        llm_sha256_update(h, p + off, FP_SAMPLE);
    }
    llm_sha256_update(h, p + n - FP_SAMPLE, FP_SAMPLE);
}


static uint32_t
fbits(float f)
{
    uint32_t u;

    memcpy(&u, &f, 4);
    return u;
}


/* Canonical description: configuration numbers, then for every tensor
 * its name, stored type and shape and samples of its bytes. */
static void
fp_compute(loader *ld)
{
    const llm_model_config *c = &ld->m->cfg;
    llm_sha256_ctx          h;
    char                    line[512];
    int                     i, n;

    llm_sha256_init(&h);
    n = snprintf(line, sizeof(line),
                 "ngx_llm model v1\narch %s\nvocab %d dim %d layers %d "
                 "heads %d kv %d head_dim %d ffn %d ctx %d eps %08x\n"
                 "rope %d neox %d base %08x scale %08x tied %d bias %d\n",
                 c->arch, c->n_vocab, c->dim, c->n_layers, c->n_heads,
                 c->n_kv_heads, c->head_dim, c->ffn_dim, c->n_ctx,
                 fbits(c->norm_eps), c->rope.n_rot, c->rope.neox,
                 fbits(c->rope.freq_base), fbits(c->rope.freq_scale),
                 c->tied_embeddings, c->qkv_bias);
    llm_sha256_update(&h, line, (size_t) n);
    if (c->rope.freq_factors != NULL) {
        llm_sha256_update(&h, "freq_factors\n", 13);
        llm_sha256_update(&h, c->rope.freq_factors,
                          sizeof(float) * (size_t) (c->rope.n_rot / 2));
    }

    for (i = 0; i < ld->n_plan; i++) {
        plan_entry *e = &ld->plan[i];

        if (!e->found) {
            continue;
        }
        n = snprintf(line, sizeof(line), "%s %d %lld %lld\n", e->name,
                     e->st.type, (long long) e->st.ne[0],
                     (long long) e->st.ne[1]);
        llm_sha256_update(&h, line, (size_t) n);
        fp_bytes(&h, e->st.data, e->st.nbytes);
    }
    llm_sha256_final(&h, ld->m->fingerprint);
}


/* ---------------------------------------------------------------------- */
/* Load and free                                                            */
/* ---------------------------------------------------------------------- */

llm_model *
llm_model_load(const char *path, llm_backend *be, llm_progress_fn progress,
               void *progress_ud, llm_err *err)
{
    llm_model        *m;
    llm_model_source *src;
    loader            ld;
    size_t            total = 0, done = 0;
    int               rc, is_dir, i;

    if (path == NULL || be == NULL) {
        llm_err_set(err, LLM_EINVAL, "llm_model_load: no path or backend");
        return NULL;
    }
    if (path_is_dir(path, &is_dir, err) != 0) {
        return NULL;
    }

    m = llm_calloc(1, sizeof(llm_model));
    src = llm_calloc(1, sizeof(llm_model_source));
    if (m == NULL || src == NULL || (m->path = llm_strdup(path)) == NULL) {
        llm_free(m);
        llm_free(src);
        llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
        return NULL;
    }
    m->be = be;
    m->src = src;
    memset(&ld, 0, sizeof(ld));
    ld.m = m;
    ld.where = path;
    ld.err = err;

    if (is_dir) {
        m->format = LLM_FORMAT_HF;
        rc = hf_read_config(path, &m->cfg, &src->freq_factors, err);
        if (rc == 0) {
            rc = hf_open_weights(src, path, err);
        }
    } else {
        m->format = LLM_FORMAT_GGUF;
        src->gguf = llm_gguf_open(path, err);
        rc = src->gguf == NULL
             ? (err != NULL ? err->code : LLM_EFORMAT)
             : gguf_read_config(src->gguf, &m->cfg, &src->freq_factors,
                                err);
    }
    if (rc != 0) {
        goto failed;
    }

    if (m->format == LLM_FORMAT_HF) {
        /* no lm_head: tied, whatever config.json says */
        src_tensor t;

        if (src_find(src, "lm_head.weight", &t) != 0) {
            m->cfg.tied_embeddings = 1;
        }
        if (src_find(src, "model.layers.0.self_attn.o_proj.bias", &t) == 0) {
            llm_err_set(err, LLM_EUNSUP,
                        "%s: o_proj bias is not supported", path);
            goto failed;
        }
    } else if (llm_gguf_find_tensor(src->gguf, "blk.0.attn_output.bias")
               != NULL)
    {
        llm_err_set(err, LLM_EUNSUP,
                    "%s: attn_output bias is not supported", path);
        goto failed;
    }

    m->layers = llm_calloc((size_t) m->cfg.n_layers,
                           sizeof(llm_layer_weights));
    ld.plan = llm_calloc(3 + 12 * (size_t) m->cfg.n_layers,
                         sizeof(plan_entry));
    if (m->layers == NULL || ld.plan == NULL) {
        llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
        goto failed;
    }
    plan_build(&ld);
    if (plan_check(&ld, src) != 0) {
        goto failed;
    }

    fp_compute(&ld);

    for (i = 0; i < ld.n_plan; i++) {
        total += ld.plan[i].found ? ld.plan[i].st.nbytes : 0;
    }
    if (progress != NULL) {
        progress(progress_ud, 0, total);
    }
    for (i = 0; i < ld.n_plan; i++) {
        plan_entry *e = &ld.plan[i];

        if (!e->found) {
            continue;
        }
        if (load_entry(&ld, e) != 0) {
            goto failed;
        }
        m->type_counts[e->dst->type]++;
        m->weight_bytes += e->dst->nb * (size_t) e->dst->ne[1];
        done += e->st.nbytes;
        if (progress != NULL) {
            progress(progress_ud, done, total);
        }
    }
    if (m->cfg.tied_embeddings) {
        m->output = m->tok_embd;
    }

    llm_free(ld.plan);
    return m;

failed:
    llm_free(ld.plan);
    llm_model_free(m);
    return NULL;
}


void
llm_model_free(llm_model *m)
{
    int i;

    if (m == NULL) {
        return;
    }
    /* adopted weights belong to the backend (the CPU backend hands back
     * the mapping itself); only buffers allocated here are released */
    for (i = 0; i < m->n_owned; i++) {
        m->be->ops->release(m->be, m->owned[i]);
    }
    llm_free(m->owned);
    llm_free(m->layers);
    src_close(m->src);
    llm_free(m->path);
    llm_free(m);
}


void
llm_model_describe(const llm_model *m, char *buf, size_t size)
{
    const llm_model_config *c = &m->cfg;
    char                    hex[65];
    size_t                  len = 0;
    int                     t, n = 0, first = 1;

    if (size == 0) {
        return;
    }
    buf[0] = '\0';

#define DESC(...)                                                           \
    do {                                                                    \
        if (len < size) {                                                   \
            int w_ = snprintf(buf + len, size - len, __VA_ARGS__);          \
            len += w_ > 0 ? (size_t) w_ : 0;                                \
        }                                                                   \
    } while (0)

    DESC("model: %s (%s, %s)\n", c->name, c->arch,
         m->format == LLM_FORMAT_GGUF ? "gguf" : "hf safetensors");
    DESC("layers %d, dim %d, heads %d, kv heads %d, head_dim %d, ffn %d, "
         "vocab %d, ctx %d\n", c->n_layers, c->dim, c->n_heads,
         c->n_kv_heads, c->head_dim, c->ffn_dim, c->n_vocab, c->n_ctx);
    DESC("rope: base %g, dims %d, %s, scale %g%s; norm eps %g; "
         "%s embeddings%s\n", c->rope.freq_base, c->rope.n_rot,
         c->rope.neox ? "neox" : "normal", 1.0 / c->rope.freq_scale,
         c->rope.freq_factors ? ", llama3 freq factors" : "",
         c->norm_eps, c->tied_embeddings ? "tied" : "untied",
         c->qkv_bias ? ", qkv bias" : "");
    for (t = 0; t < LLM_DTYPE_COUNT; t++) {
        n += m->type_counts[t];
    }
    DESC("tensors: %d (", n);
    for (t = 0; t < LLM_DTYPE_COUNT; t++) {
        if (m->type_counts[t] > 0) {
            DESC("%s%s x%d", first ? "" : ", ", llm_dtype_get(t)->name,
                 m->type_counts[t]);
            first = 0;
        }
    }
    DESC("), weights %.1f MiB", (double) m->weight_bytes / (1 << 20));
    if (m->copied_bytes > 0) {
        DESC(" (the %s backend holds its own copy of %.1f MiB)",
             m->be != NULL ? m->be->ops->name : "?",
             (double) m->copied_bytes / (1 << 20));
    }
    DESC("\n");
    DESC("fingerprint: %s\n", llm_sha256_hex(m->fingerprint, hex));

#undef DESC
}
