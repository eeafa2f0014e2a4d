/*
 * One LoRA adapter: parse adapter_config.json, validate the safetensors
 * header against the base model's configuration, convert the weights to
 * f32 (see lora.h).
 *
 * Loading runs in two phases.  The plan (lora_plan_open) reads the config
 * and the safetensors header, maps every tensor to a (layer, target) slot
 * and checks names, dtypes, shapes and ranks; nothing there touches the
 * tensor data, so llm_lora_check() costs a header parse.  The load then
 * converts the data into one f32 block and hashes the files.
 */
#include "lora.h"

#include <errno.h>
#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "../engine/safetensors.h"
#include "../engine/sha256.h"
#include "../kernels/dtype.h"

#define LORA_PATH_MAX       4096
#define LORA_CONFIG_MAX     (16u << 20)
#define LORA_FLOAT_ALIGN    16          /* floats: 64-byte offsets */
#define LORA_MAX_LAYER      1000000


static const char *const target_names[LLM_LORA_N_TARGETS] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
    "down_proj"
};

/* the block of the decoder layer each target lives in */
static const char *const target_blocks[LLM_LORA_N_TARGETS] = {
    "self_attn", "self_attn", "self_attn", "self_attn", "mlp", "mlp", "mlp"
};

#define TARGET_LIST  "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, " \
                     "down_proj"


/* ---------------------------------------------------------------------- */
/* Configuration                                                            */
/* ---------------------------------------------------------------------- */

enum { TM_ANY = 0, TM_LIST, TM_REGEX };

typedef struct {
    regex_t     re;
    int         compiled;
    int         rank;           /* rank_pattern value */
    double      alpha;          /* alpha_pattern value */
} lora_pattern;

typedef struct {
    json_t         *root;
    int             r;
    double          alpha;
    int             rslora;
    int             tm_kind;
    json_t         *tm_list;        /* TM_LIST: borrowed from root */
    regex_t         tm_re;          /* TM_REGEX */
    int             tm_re_ok;
    lora_pattern   *rank_pat;
    int             n_rank_pat;
    lora_pattern   *alpha_pat;
    int             n_alpha_pat;
    char            base_model[256];
} lora_conf;


typedef struct {
    const llm_st_tensor *t[2];      /* lora_A, lora_B */
    int                  rank;
    int                  in, out;
    float                scale;
} lora_slot;


typedef struct {
    const char             *dir;
    const llm_model_config *cfg;
    llm_err                *err;
    char                    cfg_path[LORA_PATH_MAX];
    char                    st_path[LORA_PATH_MAX];
    uint8_t                *cfg_buf;
    size_t                  cfg_len;
    lora_conf               conf;
    llm_safetensors        *st;
    lora_slot              *slots;      /* [n_layers * N_TARGETS] */
    int                     max_rank;
    int                     n_weights;
    unsigned                targets;
    size_t                  n_floats;   /* of the data block */
} lora_plan;


const char *
llm_lora_target_name(int target)
{
    if (target < 0 || target >= LLM_LORA_N_TARGETS) {
        return NULL;
    }
    return target_names[target];
}


static void
target_dims(const llm_model_config *c, int t, int *in, int *out)
{
    int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;

    switch (t) {
    case LLM_LORA_Q:    *in = c->dim;     *out = qd;         break;
    case LLM_LORA_K:
    case LLM_LORA_V:    *in = c->dim;     *out = kvd;        break;
    case LLM_LORA_O:    *in = qd;         *out = c->dim;     break;
    case LLM_LORA_GATE:
    case LLM_LORA_UP:   *in = c->dim;     *out = c->ffn_dim; break;
    default:            *in = c->ffn_dim; *out = c->dim;     break;
    }
}


static void
module_name(char *buf, size_t size, int layer, int t)
{
    snprintf(buf, size, "model.layers.%d.%s.%s", layer, target_blocks[t],
             target_names[t]);
}


/* Python's re syntax to POSIX extended: \d, \D and (?:...) are the only
 * differences peft users commonly run into.  -1 if dst is too small. */
static int
py_to_ere(const char *src, char *dst, size_t size)
{
    size_t n = 0;

#define PUT(s)                                                              \
    do {                                                                    \
        size_t l_ = strlen(s);                                              \
        if (n + l_ >= size) {                                               \
            return -1;                                                      \
        }                                                                   \
        memcpy(dst + n, s, l_);                                             \
        n += l_;                                                            \
    } while (0)

    while (*src != '\0') {
        if (src[0] == '\\' && src[1] == 'd') {
            PUT("[0-9]");
            src += 2;
        } else if (src[0] == '\\' && src[1] == 'D') {
            PUT("[^0-9]");
            src += 2;
        } else if (src[0] == '(' && src[1] == '?' && src[2] == ':') {
            PUT("(");
            src += 3;
        } else if (src[0] == '\\' && src[1] != '\0') {
            char two[3] = { src[0], src[1], '\0' };

            PUT(two);
            src += 2;
        } else {
            char one[2] = { src[0], '\0' };

            PUT(one);
            src++;
        }
    }
    dst[n] = '\0';
    return 0;

#undef PUT
}


/*
 * Refuses an extended regular expression whose compiled form would be
 * huge: glibc's regcomp copies the operand of "+" and of "{m,n}" (x+ is
 * x x*, x{3} is x x x), so nested repetition grows exponentially, and an
 * adapter_config.json from a tenant could take the engine's memory
 * ("(((a+)+)+)+..." or "a{100}{100}{100}").  Estimates the node count of
 * the expanded expression; 0 if it stays under ERE_MAX_NODES and the
 * expression is well formed, -1 otherwise.  Two quantifiers in a row are
 * refused, as Python's re refuses them ("multiple repeat").
 */
#define ERE_MAX_NODES  20000
#define ERE_MAX_DEPTH  32

static int
ere_check(const char *s)
{
    struct { double total, alt, last; } f[ERE_MAX_DEPTH + 1];
    int     d = 0, can_repeat = 0;
    double  m, n;

    memset(f, 0, sizeof(f));

    while (*s != '\0') {
        if (*s == '*' || *s == '?' || *s == '+' || (*s == '{' && s[1] >= '0'
                                                  && s[1] <= '9'))
        {
            if (!can_repeat) {
                return -1;          /* nothing to repeat, or a repeat */
            }
            m = n = 1;
            if (*s == '+') {
                n = 2;
            } else if (*s == '{') {
                m = strtod(s + 1, (char **) &s);
                n = m;
                if (*s == ',') {
                    n = s[1] == '}' ? m + 1 : strtod(s + 1, (char **) &s);
                    s += s[1] == '}';
                }
                if (*s != '}' || n < m || n > ERE_MAX_NODES) {
                    return -1;
                }
                n = n > 1 ? n : 1;
            }
            f[d].alt += f[d].last * (n - 1) + 1;
            f[d].last = f[d].last * n + 1;
            can_repeat = 0;
            s++;
        } else if (*s == '(') {
            if (++d > ERE_MAX_DEPTH) {
                return -1;
            }
            memset(&f[d], 0, sizeof(f[d]));
            can_repeat = 0;
            s++;
        } else if (*s == ')' || *s == '|') {
            f[d].total += f[d].alt + 1;
            f[d].alt = 0;
            can_repeat = 0;
            if (*s++ == ')') {
                if (d == 0) {
                    return -1;
                }
                d--;
                f[d].last = f[d + 1].total;
                f[d].alt += f[d].last;
                can_repeat = 1;
            }
        } else {
            /* one atom: a character, an escape, or a bracket expression
             * (with its [:class:] parts and a leading ']' or '^]') */
            if (*s == '\\' && s[1] != '\0') {
                s += 2;
            } else if (*s == '[') {
                s += 1 + (s[1] == '^');
                s += *s == ']';
                while (*s != '\0' && *s != ']') {
                    if (*s == '[' && (s[1] == ':' || s[1] == '.'
                                      || s[1] == '='))
                    {
                        char        close[3] = { s[1], ']', '\0' };
                        const char *e = strstr(s + 2, close);

                        if (e == NULL) {
                            return -1;
                        }
                        s = e + 2;
                    } else {
                        s++;
                    }
                }
                if (*s++ != ']') {
                    return -1;
                }
            } else {
                s++;
            }
            f[d].last = 1;
            f[d].alt += 1;
            can_repeat = 1;
        }
        if (f[d].alt + f[d].total > ERE_MAX_NODES
            || f[d].last > ERE_MAX_NODES)
        {
            return -1;
        }
    }
    return d == 0 ? 0 : -1;
}


/* Compiles "^(prefix)(expr)$" from a Python-style expression. */
static int
compile_re(regex_t *re, const char *prefix, const char *expr)
{
    char ere[1024], full[1100];

    if (py_to_ere(expr, ere, sizeof(ere)) != 0 || ere_check(ere) != 0) {
        return -1;
    }
    snprintf(full, sizeof(full), "^%s(%s)$", prefix, ere);
    return regcomp(re, full, REG_EXTENDED | REG_NOSUB) == 0 ? 0 : -1;
}


static int
conf_patterns(lora_plan *p, const char *field, int is_rank,
              lora_pattern **out, int *n_out)
{
    json_t       *obj = json_object_get(p->conf.root, field), *v;
    const char   *key;
    lora_pattern *pat;
    int           n = 0;

    *out = NULL;
    *n_out = 0;
    if (obj == NULL || json_is_null(obj)) {
        return 0;
    }
    if (!json_is_object(obj)) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: field \"%s\" must be an object "
                           "{module pattern: value}", p->cfg_path, field);
    }
    if (json_object_size(obj) == 0) {
        return 0;
    }
    pat = llm_calloc(json_object_size(obj), sizeof(lora_pattern));
    if (pat == NULL) {
        return llm_err_set(p->err, LLM_ENOMEM, "%s: out of memory",
                           p->cfg_path);
    }
    *out = pat;

    /* jansson keeps the file's key order: the first match wins, as in
     * peft */
    json_object_foreach(obj, key, v) {
        lora_pattern *e = &pat[n];

        if (is_rank) {
            if (!json_is_integer(v) || json_integer_value(v) < 1
                || json_integer_value(v) > LLM_LORA_MAX_RANK)
            {
                return llm_err_set(p->err, LLM_EFORMAT,
                                   "%s: field \"%s\": \"%s\" must be a "
                                   "rank from 1 to %d", p->cfg_path, field,
                                   key, LLM_LORA_MAX_RANK);
            }
            e->rank = (int) json_integer_value(v);
        } else {
            if (!json_is_number(v) || !isfinite(json_number_value(v))) {
                return llm_err_set(p->err, LLM_EFORMAT,
                                   "%s: field \"%s\": \"%s\" must be a "
                                   "number", p->cfg_path, field, key);
            }
            e->alpha = json_number_value(v);
        }
        if (key[0] == '\0' || compile_re(&e->re, "(.*\\.)?", key) != 0) {
            return llm_err_set(p->err, LLM_EUNSUP,
                               "%s: field \"%s\": pattern \"%s\" is not a "
                               "supported regular expression (or repeats "
                               "too much)", p->cfg_path, field, key);
        }
        e->compiled = 1;
        *n_out = ++n;
    }
    return 0;
}


/* Refuses peft features that change what the adapter computes beyond
 * B @ A on the supported targets. */
static int
conf_refuse_features(lora_plan *p)
{
    static const char *const flags[] = {
        "use_dora", "fan_in_fan_out", "lora_bias"
    };
    static const char *const nonnull[] = {
        "layer_replication", "trainable_token_indices",
        "alora_invocation_tokens", "target_parameters"
    };
    json_t *root = p->conf.root, *v;
    size_t  i;

    v = json_object_get(root, "peft_type");
    if (v != NULL && !json_is_null(v)
        && (!json_is_string(v) || strcmp(json_string_value(v), "LORA")))
    {
        return llm_err_set(p->err, LLM_EUNSUP,
                           "%s: field \"peft_type\": %s is not supported "
                           "(LORA)", p->cfg_path,
                           json_is_string(v) ? json_string_value(v)
                                             : "a non-string");
    }
    v = json_object_get(root, "modules_to_save");
    if (v != NULL && !json_is_null(v)
        && !(json_is_array(v) && json_array_size(v) == 0))
    {
        json_t     *m0 = json_is_array(v) ? json_array_get(v, 0) : NULL;

        return llm_err_set(p->err, LLM_EUNSUP,
                           "%s: field \"modules_to_save\" (%s%s) is not "
                           "supported: it replaces whole base modules, "
                           "only LoRA A/B weights can be served",
                           p->cfg_path,
                           json_is_string(m0) ? json_string_value(m0)
                                              : "non-empty",
                           json_is_array(v) && json_array_size(v) > 1
                           ? ", ..." : "");
    }
    v = json_object_get(root, "bias");
    if (v != NULL && !json_is_null(v)
        && (!json_is_string(v) || strcmp(json_string_value(v), "none")))
    {
        return llm_err_set(p->err, LLM_EUNSUP,
                           "%s: field \"bias\": only \"none\" is "
                           "supported", p->cfg_path);
    }

    for (i = 0; i < sizeof(flags) / sizeof(flags[0]); i++) {
        v = json_object_get(root, flags[i]);
        if (json_is_true(v)) {
            return llm_err_set(p->err, LLM_EUNSUP,
                               "%s: field \"%s\": true is not supported",
                               p->cfg_path, flags[i]);
        }
    }
    for (i = 0; i < sizeof(nonnull) / sizeof(nonnull[0]); i++) {
        v = json_object_get(root, nonnull[i]);
        if (v != NULL && !json_is_null(v)
            && !(json_is_array(v) && json_array_size(v) == 0)
            && !(json_is_object(v) && json_object_size(v) == 0))
        {
            return llm_err_set(p->err, LLM_EUNSUP,
                               "%s: field \"%s\" is not supported",
                               p->cfg_path, nonnull[i]);
        }
    }
    return 0;
}


/* The last dotted component of a target_modules entry must name a
 * supported projection. */
static int
conf_target_entry(lora_plan *p, const char *s)
{
    const char *last = strrchr(s, '.');
    int         t;

    last = last != NULL ? last + 1 : s;
    for (t = 0; t < LLM_LORA_N_TARGETS; t++) {
        if (strcmp(last, target_names[t]) == 0) {
            return 0;
        }
    }
    return llm_err_set(p->err, LLM_EUNSUP,
                       "%s: field \"target_modules\": module \"%s\" is not "
                       "supported (%s)", p->cfg_path, s, TARGET_LIST);
}


static int
conf_targets(lora_plan *p)
{
    json_t     *v = json_object_get(p->conf.root, "target_modules");
    size_t      i;
    int         rc;

    if (v == NULL || json_is_null(v)) {
        p->conf.tm_kind = TM_ANY;
        return 0;
    }
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        static const char *const other[] = { "lm_head",
                                             "model.embed_tokens" };

        if (strcmp(s, "all-linear") == 0) {
            p->conf.tm_kind = TM_ANY;
            return 0;
        }
        if (compile_re(&p->conf.tm_re, "", s) != 0) {
            return llm_err_set(p->err, LLM_EUNSUP,
                               "%s: field \"target_modules\": \"%s\" is not "
                               "a supported regular expression (or repeats "
                               "too much)", p->cfg_path, s);
        }
        p->conf.tm_re_ok = 1;
        p->conf.tm_kind = TM_REGEX;
        for (i = 0; i < sizeof(other) / sizeof(other[0]); i++) {
            if (regexec(&p->conf.tm_re, other[i], 0, NULL, 0) == 0) {
                return llm_err_set(p->err, LLM_EUNSUP,
                                   "%s: field \"target_modules\": \"%s\" "
                                   "matches %s, which is not supported "
                                   "(%s)", p->cfg_path, s, other[i],
                                   TARGET_LIST);
            }
        }
        return 0;
    }
    if (!json_is_array(v)) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: field \"target_modules\" must be a list of "
                           "module names or a string", p->cfg_path);
    }
    for (i = 0; i < json_array_size(v); i++) {
        json_t *e = json_array_get(v, i);

        if (!json_is_string(e)) {
            return llm_err_set(p->err, LLM_EFORMAT,
                               "%s: field \"target_modules\": item %zu is "
                               "not a string", p->cfg_path, i);
        }
        if ((rc = conf_target_entry(p, json_string_value(e))) != 0) {
            return rc;
        }
    }
    p->conf.tm_kind = TM_LIST;
    p->conf.tm_list = v;
    return 0;
}


static int
conf_parse(lora_plan *p)
{
    lora_conf    *c = &p->conf;
    json_error_t  jerr;
    json_t       *v;
    int           rc;

    c->root = json_loadb((const char *) p->cfg_buf, p->cfg_len,
                         JSON_REJECT_DUPLICATES, &jerr);
    if (c->root == NULL) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: invalid JSON: %s (line %d, column %d)",
                           p->cfg_path, jerr.text, jerr.line, jerr.column);
    }
    if (!json_is_object(c->root)) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: not a JSON object", p->cfg_path);
    }
    if ((rc = conf_refuse_features(p)) != 0) {
        return rc;
    }

    /* peft's LoraConfig defaults for absent fields */
    c->r = 8;
    c->alpha = 8.0;
    v = json_object_get(c->root, "r");
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_integer(v)) {
            return llm_err_set(p->err, LLM_EFORMAT,
                               "%s: field \"r\" must be an integer",
                               p->cfg_path);
        }
        if (json_integer_value(v) < 1
            || json_integer_value(v) > LLM_LORA_MAX_RANK)
        {
            return llm_err_set(p->err, LLM_EUNSUP,
                               "%s: field \"r\": %lld is out of range "
                               "(1 to %d)", p->cfg_path,
                               (long long) json_integer_value(v),
                               LLM_LORA_MAX_RANK);
        }
        c->r = (int) json_integer_value(v);
    }
    v = json_object_get(c->root, "lora_alpha");
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_number(v) || !isfinite(json_number_value(v))) {
            return llm_err_set(p->err, LLM_EFORMAT,
                               "%s: field \"lora_alpha\" must be a number",
                               p->cfg_path);
        }
        c->alpha = json_number_value(v);
    }
    v = json_object_get(c->root, "use_rslora");
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_boolean(v)) {
            return llm_err_set(p->err, LLM_EFORMAT,
                               "%s: field \"use_rslora\" must be true or "
                               "false", p->cfg_path);
        }
        c->rslora = json_is_true(v);
    }
    v = json_object_get(c->root, "base_model_name_or_path");
    if (json_is_string(v)) {
        snprintf(c->base_model, sizeof(c->base_model), "%s",
                 json_string_value(v));
    }

    if ((rc = conf_targets(p)) != 0
        || (rc = conf_patterns(p, "rank_pattern", 1, &c->rank_pat,
                               &c->n_rank_pat)) != 0
        || (rc = conf_patterns(p, "alpha_pattern", 0, &c->alpha_pat,
                               &c->n_alpha_pat)) != 0)
    {
        return rc;
    }
    return 0;
}


static void
conf_free(lora_conf *c)
{
    int i;

    for (i = 0; c->rank_pat != NULL && i < c->n_rank_pat; i++) {
        if (c->rank_pat[i].compiled) {
            regfree(&c->rank_pat[i].re);
        }
    }
    for (i = 0; c->alpha_pat != NULL && i < c->n_alpha_pat; i++) {
        if (c->alpha_pat[i].compiled) {
            regfree(&c->alpha_pat[i].re);
        }
    }
    llm_free(c->rank_pat);
    llm_free(c->alpha_pat);
    if (c->tm_re_ok) {
        regfree(&c->tm_re);
    }
    if (c->root != NULL) {
        json_decref(c->root);
    }
    memset(c, 0, sizeof(*c));
}


static int
conf_targets_match(const lora_conf *c, const char *module)
{
    size_t i, ml = strlen(module);

    if (c->tm_kind == TM_ANY) {
        return 1;
    }
    if (c->tm_kind == TM_REGEX) {
        return regexec(&c->tm_re, module, 0, NULL, 0) == 0;
    }
    for (i = 0; i < json_array_size(c->tm_list); i++) {
        const char *e = json_string_value(json_array_get(c->tm_list, i));
        size_t      el = strlen(e);

        if (strcmp(module, e) == 0
            || (ml > el && strcmp(module + ml - el, e) == 0
                && module[ml - el - 1] == '.'))
        {
            return 1;
        }
    }
    return 0;
}


static const lora_pattern *
conf_pattern(const lora_pattern *pat, int n, const char *module)
{
    int i;

    for (i = 0; i < n; i++) {
        if (pat[i].compiled
            && regexec(&pat[i].re, module, 0, NULL, 0) == 0)
        {
            return &pat[i];
        }
    }
    return NULL;
}


/* ---------------------------------------------------------------------- */
/* Tensor names                                                             */
/* ---------------------------------------------------------------------- */

enum { KEY_OK = 0, KEY_UNEXPECTED, KEY_MODULE, KEY_DORA, KEY_BIAS };

/* Parses a peft key into layer, target and A (0) / B (1).  module gets
 * the module path (prefix dropped) for messages. */
static int
parse_key(const char *key, int *layer, int *target, int *ab, char *module,
          size_t msize)
{
    static const char  prefix[] = "base_model.model.";
    const char        *p, *m, *rest, *dot, *first;
    size_t             mlen, bl;
    long               l = 0;
    int                t, digits = 0;

    p = strstr(key, ".lora_");
    if (p == NULL) {
        snprintf(module, msize, "%s", key);
        return KEY_UNEXPECTED;
    }
    m = key;
    if (strncmp(m, prefix, sizeof(prefix) - 1) == 0) {
        m += sizeof(prefix) - 1;
    }
    mlen = p > m ? (size_t) (p - m) : 0;
    snprintf(module, msize, "%.*s", (int) mlen, m);

    rest = p + 6;
    if (strncmp(rest, "magnitude_vector", 16) == 0) {
        return KEY_DORA;
    }
    if ((rest[0] != 'A' && rest[0] != 'B') || rest[1] != '.') {
        /* lora_embedding_A and the like: a module we do not serve */
        return KEY_MODULE;
    }
    *ab = rest[0] == 'B';
    rest += 2;
    dot = strchr(rest, '.');
    if (dot != NULL && dot != rest && strchr(dot + 1, '.') == NULL) {
        rest = dot + 1;         /* the adapter name: "default" */
    }
    if (strcmp(rest, "bias") == 0) {
        return KEY_BIAS;
    }
    if (strcmp(rest, "weight") != 0) {
        return KEY_UNEXPECTED;
    }

    /* [model.]layers.<n>.<self_attn|mlp>.<target> (without "model."
     * when peft wrapped the bare decoder) */
    m = module;
    if (strncmp(m, "model.", 6) == 0) {
        m += 6;
    }
    if (strncmp(m, "layers.", 7) != 0) {
        return KEY_MODULE;
    }
    m += 7;
    first = m;
    while (*m >= '0' && *m <= '9' && digits < 8) {
        l = l * 10 + (*m - '0');
        m++;
        digits++;
    }
    if (digits == 0 || digits > 7 || *m != '.'
        || (digits > 1 && first[0] == '0'))
    {
        return KEY_MODULE;
    }
    m++;
    for (t = 0; t < LLM_LORA_N_TARGETS; t++) {
        bl = strlen(target_blocks[t]);
        if (strncmp(m, target_blocks[t], bl) == 0 && m[bl] == '.'
            && strcmp(m + bl + 1, target_names[t]) == 0)
        {
            *layer = (int) l;
            *target = t;
            return KEY_OK;
        }
    }
    return KEY_MODULE;
}


/* ---------------------------------------------------------------------- */
/* The plan: config + header, no tensor data                                */
/* ---------------------------------------------------------------------- */

static int
read_whole(lora_plan *p)
{
    FILE        *f;
    struct stat  sb;
    size_t       n;

    f = fopen(p->cfg_path, "rb");
    if (f == NULL) {
        return llm_err_set(p->err, errno == ENOENT ? LLM_ENOTFOUND
                                                   : LLM_EIO,
                           "%s: %s", p->cfg_path, strerror(errno));
    }
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return llm_err_set(p->err, LLM_EIO, "%s: not a regular file",
                           p->cfg_path);
    }
    if ((uint64_t) sb.st_size > LORA_CONFIG_MAX) {
        fclose(f);
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: %lld bytes is too large for an adapter "
                           "config", p->cfg_path, (long long) sb.st_size);
    }
    p->cfg_buf = llm_malloc((size_t) sb.st_size + 1);
    if (p->cfg_buf == NULL) {
        fclose(f);
        return llm_err_set(p->err, LLM_ENOMEM, "%s: out of memory",
                           p->cfg_path);
    }
    n = fread(p->cfg_buf, 1, (size_t) sb.st_size, f);
    if (ferror(f) || n != (size_t) sb.st_size) {
        fclose(f);
        return llm_err_set(p->err, LLM_EIO, "%s: read error", p->cfg_path);
    }
    fclose(f);
    p->cfg_len = n;
    return 0;
}


static int
open_weights(lora_plan *p)
{
    char        bin[LORA_PATH_MAX];
    struct stat sb;

    if (stat(p->st_path, &sb) != 0 && errno == ENOENT) {
        snprintf(bin, sizeof(bin), "%s/adapter_model.bin", p->dir);
        if (stat(bin, &sb) == 0) {
            return llm_err_set(p->err, LLM_EUNSUP,
                               "%s: missing; %s (a pickle) is not "
                               "supported: save the adapter with "
                               "safe_serialization=True", p->st_path, bin);
        }
        return llm_err_set(p->err, LLM_ENOTFOUND, "%s: %s", p->st_path,
                           strerror(ENOENT));
    }
    p->st = llm_safetensors_open(p->st_path, p->err);
    return p->st == NULL ? (p->err != NULL ? p->err->code : LLM_EFORMAT)
                         : 0;
}


static int
slot_add(lora_plan *p, const llm_st_tensor *t)
{
    char    module[256], canon[128];
    int     layer = 0, target = 0, ab = 0, kind;
    lora_slot *s;

    kind = parse_key(t->name, &layer, &target, &ab, module, sizeof(module));
    switch (kind) {
    case KEY_OK:
        break;
    case KEY_DORA:
        return llm_err_set(p->err, LLM_EUNSUP,
                           "%s: tensor \"%s\": DoRA (use_dora) is not "
                           "supported", p->st_path, t->name);
    case KEY_BIAS:
        return llm_err_set(p->err, LLM_EUNSUP,
                           "%s: tensor \"%s\": LoRA biases (lora_bias) are "
                           "not supported", p->st_path, t->name);
    case KEY_MODULE:
        return llm_err_set(p->err, LLM_EUNSUP,
                           "%s: tensor \"%s\": target module \"%s\" is not "
                           "supported (%s of the decoder layers)",
                           p->st_path, t->name, module, TARGET_LIST);
    default:
        return llm_err_set(p->err, LLM_EUNSUP,
                           "%s: tensor \"%s\" is not a LoRA A/B weight "
                           "(modules_to_save and full module weights are "
                           "not supported)", p->st_path, t->name);
    }
    if (layer >= p->cfg->n_layers) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: tensor \"%s\": layer %d, but the model has "
                           "%d layers", p->st_path, t->name, layer,
                           p->cfg->n_layers);
    }
    module_name(canon, sizeof(canon), layer, target);
    if (!conf_targets_match(&p->conf, canon)) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: tensor \"%s\": module \"%s\" is not in "
                           "target_modules of %s", p->st_path, t->name,
                           canon, p->cfg_path);
    }
    s = &p->slots[(size_t) layer * LLM_LORA_N_TARGETS + target];
    if (s->t[ab] != NULL) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: tensor \"%s\": a second lora_%c for module "
                           "\"%s\" (also \"%s\")", p->st_path, t->name,
                           ab ? 'B' : 'A', canon, s->t[ab]->name);
    }
    if (t->type != LLM_F32 && t->type != LLM_F16 && t->type != LLM_BF16) {
        return llm_err_set(p->err, LLM_EUNSUP,
                           "%s: tensor \"%s\": dtype %s is not supported "
                           "(F32, F16, BF16)", p->st_path, t->name,
                           t->dtype);
    }
    if (t->n_dims != 2) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: tensor \"%s\" has %d dimensions, expected "
                           "2", p->st_path, t->name, t->n_dims);
    }
    s->t[ab] = t;
    return 0;
}


/* Both halves present, shapes [r, in] and [out, r], r as configured. */
static int
slot_check(lora_plan *p, lora_slot *s, int layer, int target)
{
    const llm_st_tensor *a = s->t[0], *b = s->t[1];
    const lora_pattern  *pat;
    char                 canon[128], other[512], *q;
    int                  in, out, want_r;
    double               alpha;
    int64_t              r;

    if (a == NULL || b == NULL) {
        const llm_st_tensor *have = a != NULL ? a : b;

        snprintf(other, sizeof(other), "%s", have->name);
        q = strstr(other, a != NULL ? ".lora_A" : ".lora_B");
        if (q != NULL) {
            q[6] = a != NULL ? 'B' : 'A';
        }
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: tensor \"%s\" is missing (its pair \"%s\" "
                           "is present)", p->st_path, other, have->name);
    }

    target_dims(p->cfg, target, &in, &out);
    r = a->shape[0];
    if (r < 1 || r > LLM_LORA_MAX_RANK) {
        return llm_err_set(p->err, LLM_EUNSUP,
                           "%s: tensor \"%s\": rank %lld is out of range "
                           "(1 to %d)", p->st_path, a->name, (long long) r,
                           LLM_LORA_MAX_RANK);
    }
    if (a->shape[1] != in) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: tensor \"%s\" has shape [%lld, %lld], "
                           "expected [%lld, %d] for %s of the base model "
                           "(adapter made for another model?)", p->st_path,
                           a->name, (long long) a->shape[0],
                           (long long) a->shape[1], (long long) r, in,
                           target_names[target]);
    }
    if (b->shape[0] != out || b->shape[1] != r) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: tensor \"%s\" has shape [%lld, %lld], "
                           "expected [%d, %lld] for %s of the base model "
                           "(adapter made for another model?)", p->st_path,
                           b->name, (long long) b->shape[0],
                           (long long) b->shape[1], out, (long long) r,
                           target_names[target]);
    }

    module_name(canon, sizeof(canon), layer, target);
    pat = conf_pattern(p->conf.rank_pat, p->conf.n_rank_pat, canon);
    want_r = pat != NULL ? pat->rank : p->conf.r;
    if (r != want_r) {
        return llm_err_set(p->err, LLM_EFORMAT,
                           "%s: tensor \"%s\": rank %lld, but %s gives "
                           "rank %d to \"%s\"", p->st_path, a->name,
                           (long long) r, p->cfg_path, want_r, canon);
    }
    pat = conf_pattern(p->conf.alpha_pat, p->conf.n_alpha_pat, canon);
    alpha = pat != NULL ? pat->alpha : p->conf.alpha;

    s->rank = (int) r;
    s->in = in;
    s->out = out;
    s->scale = (float) (p->conf.rslora ? alpha / sqrt((double) r)
                                       : alpha / (double) r);
    return 0;
}


static size_t
pad_floats(size_t n)
{
    return (n + LORA_FLOAT_ALIGN - 1) / LORA_FLOAT_ALIGN * LORA_FLOAT_ALIGN;
}


static void
lora_plan_close(lora_plan *p)
{
    conf_free(&p->conf);
    llm_safetensors_close(p->st);
    llm_free(p->slots);
    llm_free(p->cfg_buf);
    p->st = NULL;
    p->slots = NULL;
    p->cfg_buf = NULL;
}


static int
lora_plan_open(lora_plan *p, const char *dir, const llm_model_config *cfg,
               llm_err *err)
{
    const llm_model_config *c = cfg;
    int                     i, l, t, n, rc;

    memset(p, 0, sizeof(*p));
    p->dir = dir;
    p->cfg = cfg;
    p->err = err;
    if (dir == NULL || cfg == NULL) {
        return llm_err_set(err, LLM_EINVAL, "lora: no folder or model "
                           "configuration");
    }
    if (c->n_layers <= 0 || c->dim <= 0 || c->n_heads <= 0
        || c->n_kv_heads <= 0 || c->head_dim <= 0 || c->ffn_dim <= 0
        || (int64_t) c->n_heads * c->head_dim > INT32_MAX)
    {
        return llm_err_set(err, LLM_EINVAL,
                           "%s: invalid base model configuration", dir);
    }
    if (c->rope.neox == 0 && c->head_dim % 2 != 0) {
        return llm_err_set(err, LLM_EUNSUP,
                           "%s: odd head_dim %d with a permuted (GGUF "
                           "llama) base", dir, c->head_dim);
    }
    n = snprintf(p->cfg_path, sizeof(p->cfg_path), "%s/%s", dir,
                 LLM_LORA_CONFIG_FILE);
    if (n < 0 || (size_t) n >= sizeof(p->cfg_path)
        || (size_t) snprintf(p->st_path, sizeof(p->st_path), "%s/%s", dir,
                             LLM_LORA_WEIGHTS_FILE) >= sizeof(p->st_path))
    {
        return llm_err_set(err, LLM_EINVAL, "%.200s...: path too long",
                           dir);
    }

    if ((rc = read_whole(p)) != 0 || (rc = conf_parse(p)) != 0
        || (rc = open_weights(p)) != 0)
    {
        return rc;
    }

    p->slots = llm_calloc((size_t) c->n_layers * LLM_LORA_N_TARGETS,
                          sizeof(lora_slot));
    if (p->slots == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory",
                           p->st_path);
    }
    for (i = 0; i < p->st->n_tensors; i++) {
        if ((rc = slot_add(p, &p->st->tensors[i])) != 0) {
            return rc;
        }
    }

    for (l = 0; l < c->n_layers; l++) {
        for (t = 0; t < LLM_LORA_N_TARGETS; t++) {
            lora_slot *s = &p->slots[(size_t) l * LLM_LORA_N_TARGETS + t];

            if (s->t[0] == NULL && s->t[1] == NULL) {
                continue;
            }
            if ((rc = slot_check(p, s, l, t)) != 0) {
                return rc;
            }
            p->n_weights++;
            p->targets |= 1u << t;
            if (s->rank > p->max_rank) {
                p->max_rank = s->rank;
            }
            p->n_floats += pad_floats((size_t) s->rank * (size_t) s->in)
                           + pad_floats((size_t) s->rank * (size_t) s->out);
        }
    }
    if (p->n_weights == 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: no LoRA tensors (expected names like "
                           "\"base_model.model.model.layers.0.self_attn."
                           "q_proj.lora_A.weight\")", p->st_path);
    }
    return 0;
}


/* ---------------------------------------------------------------------- */
/* Loading                                                                  */
/* ---------------------------------------------------------------------- */

static float
elem(const llm_st_tensor *t, size_t i)
{
    uint16_t h;
    float    f;

    /* safetensors does not promise alignment: memcpy */
    if (t->type == LLM_F32) {
        memcpy(&f, (const uint8_t *) t->data + 4 * i, 4);
        return f;
    }
    memcpy(&h, (const uint8_t *) t->data + 2 * i, 2);
    return t->type == LLM_F16 ? llm_f16_to_f32(h) : llm_bf16_to_f32(h);
}


/* dst [rows, cols] f32 from t; head_dim > 0 permutes the rows as
 * llm_lora_permute_rows does.  Returns -1, or the index in t of a value
 * that is not finite (a NaN or infinity would reach every token of the
 * adapter's sequences, so such a file is refused). */
static int64_t
convert(const llm_st_tensor *t, float *dst, int64_t rows, int64_t cols,
        int head_dim)
{
    int64_t r, c, src_r, half = head_dim / 2;

    for (r = 0; r < rows; r++) {
        float *d = dst + r * cols;

        src_r = r;
        if (head_dim > 0) {
            int64_t h = r / head_dim, k = r % head_dim;

            src_r = h * head_dim + (k % 2) * half + k / 2;
        }
        if (t->type == LLM_F32) {
            memcpy(d, (const uint8_t *) t->data + 4 * (size_t) (src_r * cols),
                   4 * (size_t) cols);
        } else {
            for (c = 0; c < cols; c++) {
                d[c] = elem(t, (size_t) (src_r * cols + c));
            }
        }
        for (c = 0; c < cols; c++) {
            if (!isfinite(d[c])) {
                return src_r * cols + c;
            }
        }
    }
    return -1;
}


void
llm_lora_permute_rows(float *dst, const float *src, int64_t rows,
                      int64_t cols, int head_dim)
{
    int64_t r, half = head_dim / 2;

    for (r = 0; r < rows; r++) {
        int64_t h = r / head_dim, k = r % head_dim;
        int64_t s = h * head_dim + (k % 2) * half + k / 2;

        memcpy(dst + r * cols, src + s * cols, sizeof(float) * (size_t) cols);
    }
}


char *
llm_lora_version_short(const uint8_t v[LLM_LORA_VERSION_LEN], char out[17])
{
    static const char hex[] = "0123456789abcdef";
    int               i;

    for (i = 0; i < 8; i++) {
        out[2 * i] = hex[v[i] >> 4];
        out[2 * i + 1] = hex[v[i] & 15];
    }
    out[16] = '\0';
    return out;
}


static void
put_u64le(uint8_t b[8], uint64_t v)
{
    int i;

    for (i = 0; i < 8; i++) {
        b[i] = (uint8_t) (v >> (8 * i));
    }
}


static void
lora_version(const lora_plan *p, uint8_t out[LLM_LORA_VERSION_LEN])
{
    llm_sha256_ctx h;
    uint8_t        len[8];

    llm_sha256_init(&h);
    put_u64le(len, p->cfg_len);
    llm_sha256_update(&h, len, 8);
    llm_sha256_update(&h, p->cfg_buf, p->cfg_len);
    put_u64le(len, p->st->size);
    llm_sha256_update(&h, len, 8);
    llm_sha256_update(&h, p->st->map, p->st->size);
    llm_sha256_final(&h, out);
}


int
llm_lora_check(const char *dir, const llm_model_config *cfg,
               llm_lora_info *info, llm_err *err)
{
    lora_plan p;
    int       rc;

    rc = lora_plan_open(&p, dir, cfg, err);
    if (rc == 0 && info != NULL) {
        memset(info, 0, sizeof(*info));
        info->r = p.conf.r;
        info->alpha = (float) p.conf.alpha;
        info->use_rslora = p.conf.rslora;
        info->max_rank = p.max_rank;
        info->n_weights = p.n_weights;
        info->targets = p.targets;
        info->bytes = p.n_floats * sizeof(float);
        snprintf(info->base_model, sizeof(info->base_model), "%s",
                 p.conf.base_model);
    }
    lora_plan_close(&p);
    return rc;
}


int
llm_lora_load(const char *dir, const llm_model_config *cfg, llm_lora **out,
              llm_err *err)
{
    lora_plan  p;
    llm_lora  *lo = NULL;
    size_t     off = 0;
    int64_t    bad;
    int        rc, l, t, which;

    if (out == NULL) {
        return llm_err_set(err, LLM_EINVAL, "llm_lora_load: no output");
    }
    *out = NULL;
    if ((rc = lora_plan_open(&p, dir, cfg, err)) != 0) {
        goto done;
    }

    lo = llm_calloc(1, sizeof(llm_lora));
    if (lo == NULL
        || (lo->w = llm_calloc((size_t) cfg->n_layers * LLM_LORA_N_TARGETS,
                               sizeof(llm_lora_weight))) == NULL
        || (lo->data = llm_malloc(p.n_floats * sizeof(float))) == NULL
        || (lo->dir = llm_strdup(dir)) == NULL
        || (lo->base_model = llm_strdup(p.conf.base_model)) == NULL)
    {
        rc = llm_err_set(err, LLM_ENOMEM, "%s: out of memory (%zu bytes of "
                         "adapter weights)", p.st_path,
                         p.n_floats * sizeof(float));
        goto done;
    }
    lo->n_layers = cfg->n_layers;
    lo->max_rank = p.max_rank;
    lo->n_weights = p.n_weights;
    lo->targets = p.targets;
    lo->permuted = cfg->rope.neox == 0;
    lo->bytes = p.n_floats * sizeof(float);

    for (l = 0; l < cfg->n_layers; l++) {
        for (t = 0; t < LLM_LORA_N_TARGETS; t++) {
            lora_slot       *s = &p.slots[(size_t) l * LLM_LORA_N_TARGETS
                                          + t];
            llm_lora_weight *w = llm_lora_at(lo, l, t);
            int              perm;

            if (s->rank == 0) {
                continue;
            }
            perm = lo->permuted && (t == LLM_LORA_Q || t == LLM_LORA_K);
            w->rank = s->rank;
            w->in = s->in;
            w->out = s->out;
            w->scale = s->scale;
            w->a_off = off;
            off += pad_floats((size_t) s->rank * (size_t) s->in);
            w->b_off = off;
            off += pad_floats((size_t) s->rank * (size_t) s->out);
            w->q_off = lo->q_bytes;
            lo->q_bytes += llm_lora_q_layout_of(s->rank, s->in,
                                                s->out).bytes;
            w->a = lo->data + w->a_off;
            w->b = lo->data + w->b_off;
            /* A: [rank, in]; B: [out, rank] */
            which = 0;
            bad = convert(s->t[0], w->a, s->rank, s->in, 0);
            if (bad < 0) {
                which = 1;
                bad = convert(s->t[1], w->b, s->out, s->rank,
                              perm ? cfg->head_dim : 0);
            }
            if (bad >= 0) {
                rc = llm_err_set(err, LLM_EFORMAT, "%s: tensor %s: element "
                                 "%lld is not a finite number", p.st_path,
                                 s->t[which]->name, (long long) bad);
                goto done;
            }
        }
    }

    lora_version(&p, lo->version);
    llm_lora_version_short(lo->version, lo->version_hex);
    *out = lo;
    lo = NULL;

done:
    llm_lora_free(lo);
    lora_plan_close(&p);
    return rc;
}


void
llm_lora_free(llm_lora *lora)
{
    if (lora == NULL) {
        return;
    }
    llm_free(lora->data);
    llm_free(lora->w);
    llm_free(lora->dir);
    llm_free(lora->base_model);
    llm_free(lora);
}
