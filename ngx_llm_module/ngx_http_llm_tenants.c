
/*
 * Tenants: who is calling, and what they may do.
 *
 *   llm_tenants FILE;                 the directory, read at configuration
 *                                     time (nginx -t checks it, nginx -s
 *                                     reload re-reads it)
 *   llm_tenants_redis on;             keys not in the file are looked up
 *                                     in Redis (tenants added at run time)
 *   llm_tenants_cache_time 10s;       how long a worker keeps a Redis
 *                                     answer, found or not
 *   llm_tenant_variable $var;         a tenant name set by the gateway's
 *                                     own authentication
 *
 * The file (JSON):
 *
 *   {
 *     "defaults": { "priority": "standard", "weight": 1,
 *                   "max_tokens": 0, "limits": { ... } },
 *     "tenants": [
 *       {
 *         "name": "acme",                  1-64 of [A-Za-z0-9._-]
 *         "keys": ["sk-acme-...",          plain keys, or their SHA-256:
 *                  "sha256:<64 hex>"],     "sha256:" + hex(sha256(key))
 *         "priority": "interactive",       interactive | standard | batch
 *         "weight": 2,                     fair share, 1-65535
 *         "adapters": ["acme-support"],    adapters it may use; "*":
 *                                          any the engines serve
 *         "default_adapter": "acme-support",  used when "model" is the
 *                                          base model; one of "adapters"
 *         "max_tokens": 1024,              ceiling of max_tokens; 0: none
 *         "cache_namespace": "acme",       prefix cache; default: name
 *         "shared_cache_namespace": "public",  the leading system messages
 *                                          of chat requests go to this
 *                                          prefix cache namespace, shared
 *                                          by the tenants that name it;
 *                                          "" none; wins over the
 *                                          location's
 *                                          llm_cache_shared_namespace
 *         "prompt_cache": true,            exact answers of deterministic
 *                                          requests from Redis; wins over
 *                                          the location's llm_prompt_cache
 *         "disabled": false,               true: 403
 *         "limits": {
 *           "requests_per_minute": 60,     0 or absent: no limit
 *           "tokens_per_minute": 40000,    prompt + completion
 *           "max_concurrent": 4,           requests in flight
 *           "max_queued": 8                waiting for a slot (per host)
 *         }
 *       }
 *     ]
 *   }
 *
 * Unknown fields are errors (a typo must not silently lift a limit).
 *
 * Redis records (llm_tenants_redis on), one per key, values in the same
 * JSON as one tenant above ("keys" left out):
 *
 *   GET <prefix>key:<hex sha256 of the API key>     (Bearer keys)
 *   GET <prefix>tenant:<name>                       (llm_tenant_variable)
 *
 * so Redis never holds a key in clear.  A worker caches each answer
 * (found or not) for llm_tenants_cache_time.
 *
 * Keys are compared as SHA-256 digests, the final comparison in constant
 * time; a key is never logged, only masked ("sk-ab***yz").
 *
 * Adapters: "model" is the base model's name (the tenant's default
 * adapter, if any), "base:adapter" or "adapter".  An adapter the tenant
 * may not use gets the same 404 model_not_found as a model that does not
 * exist, so that other tenants' adapters are not revealed.
 */


#include "ngx_http_llm_module.h"

#include <hiredis/hiredis.h>

#include "engine/sha256.h"


#define NGX_HTTP_LLM_MAX_KEY           512
#define NGX_HTTP_LLM_CACHE_MAX         10000

#define NGX_HTTP_LLM_LOOKUP_KEY        1
#define NGX_HTTP_LLM_LOOKUP_NAME       2


typedef struct {
    u_char                         digest[LLM_SHA256_LEN];
    ngx_http_llm_tenant_t         *tenant;
} ngx_http_llm_key_t;


struct ngx_http_llm_directory_s {
    ngx_str_t                      file;
    ngx_http_llm_tenant_t        **tenants;     /* sorted by name */
    ngx_uint_t                     n_tenants;
    ngx_http_llm_key_t            *keys;        /* sorted by digest */
    ngx_uint_t                     n_keys;
};


/* A worker's copy of one Redis answer. */
typedef struct {
    ngx_rbtree_node_t              node;        /* key: digest's first bytes */
    ngx_queue_t                    queue;       /* LRU */
    u_char                         digest[LLM_SHA256_LEN];
    ngx_msec_t                     expires;
    ngx_pool_t                    *pool;        /* NULL: not found */
    ngx_http_llm_tenant_t         *tenant;
} ngx_http_llm_cached_t;


typedef struct {
    ngx_rbtree_t                   tree;
    ngx_rbtree_node_t              sentinel;
    ngx_queue_t                    lru;
    ngx_uint_t                     n;
    ngx_log_t                     *log;
} ngx_http_llm_cache_t;


/* A Redis lookup under way; outlives its request if need be. */
typedef struct {
    ngx_http_llm_ctx_t            *ctx;         /* NULL: request gone */
    ngx_uint_t                     kind;        /* NGX_HTTP_LLM_LOOKUP_* */
    u_char                         digest[LLM_SHA256_LEN];
    u_char                         shown[64];   /* masked key or name */
    size_t                         shown_len;
} ngx_http_llm_lookup_t;


static ngx_int_t ngx_http_llm_tenants_load(ngx_conf_t *cf,
    ngx_http_llm_directory_t *dir);
static ngx_int_t ngx_http_llm_tenants_load_keys(ngx_conf_t *cf,
    json_t *keys, ngx_http_llm_tenant_t *t, ngx_array_t *out,
    ngx_uint_t index);
static int ngx_libc_cdecl ngx_http_llm_key_cmp(const void *a, const void *b);
static int ngx_libc_cdecl ngx_http_llm_tenant_cmp(const void *a,
    const void *b);
static ngx_int_t ngx_http_llm_parse_limits(json_t *o,
    ngx_http_llm_limits_t *l, u_char *errbuf, size_t errlen);
static ngx_int_t ngx_http_llm_get_uint(json_t *o, const char *name,
    ngx_uint_t max, ngx_uint_t *v, u_char *errbuf, size_t errlen);
static ngx_int_t ngx_http_llm_valid_name(ngx_str_t *s, size_t max);
static ngx_http_llm_tenant_t *ngx_http_llm_directory_key(
    ngx_http_llm_directory_t *dir, u_char *digest);
static ngx_http_llm_tenant_t *ngx_http_llm_directory_name(
    ngx_http_llm_directory_t *dir, ngx_str_t *name);
static ngx_int_t ngx_http_llm_identified(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_tenant_t *t, ngx_uint_t kind,
    u_char *shown, size_t shown_len, ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_bearer(ngx_http_request_t *r, ngx_str_t *key);
static size_t ngx_http_llm_mask(u_char *out, ngx_str_t *key);
static ngx_int_t ngx_http_llm_lookup_start(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_uint_t kind, u_char *digest,
    ngx_str_t *name, u_char *shown, size_t shown_len,
    ngx_http_llm_error_t *err);
static void ngx_http_llm_directory_unavailable(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err);
static void ngx_http_llm_lookup_handler(void *data, void *reply);
static ngx_http_llm_cached_t *ngx_http_llm_cache_find(u_char *digest);
static ngx_http_llm_cached_t *ngx_http_llm_cache_get(u_char *digest);
static void ngx_http_llm_cache_put(u_char *digest, ngx_pool_t *pool,
    ngx_http_llm_tenant_t *t);
static void ngx_http_llm_cache_free(ngx_http_llm_cached_t *e);
static ngx_http_llm_tenant_t *ngx_http_llm_tenant_copy(ngx_pool_t *pool,
    ngx_http_llm_tenant_t *src);
static void ngx_http_llm_lookup_digest(ngx_uint_t kind, u_char *data,
    size_t len, u_char *digest);
static ngx_uint_t ngx_http_llm_ct_equal(u_char *a, u_char *b, size_t n);


static ngx_http_llm_cache_t  *ngx_http_llm_cache;

static ngx_str_t  ngx_http_llm_challenge =
    ngx_string("Bearer realm=\"ngx_llm\"");


/* ---- configuration ---------------------------------------------------- */

char *
ngx_http_llm_tenants_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llm_main_conf_t *lmcf = conf;

    ngx_str_t                 *value;
    ngx_http_llm_directory_t  *dir;

    if (lmcf->directory) {
        return "is duplicate";
    }

    value = cf->args->elts;

    dir = ngx_pcalloc(cf->pool, sizeof(ngx_http_llm_directory_t));
    if (dir == NULL) {
        return NGX_CONF_ERROR;
    }

    dir->file = value[1];

    if (ngx_conf_full_name(cf->cycle, &dir->file, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_llm_tenants_load(cf, dir) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    lmcf->directory = dir;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_llm_tenants_load(ngx_conf_t *cf, ngx_http_llm_directory_t *dir)
{
    u_char                  errbuf[256], *p;
    json_t                 *root, *list, *o, *v;
    size_t                  i;
    ngx_uint_t              n;
    ngx_array_t             keys;
    json_error_t            je;
    ngx_http_llm_tenant_t   defaults, *t;

    root = json_load_file((char *) dir->file.data, JSON_REJECT_DUPLICATES,
                          &je);
    if (root == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "llm_tenants \"%V\": %s (line %d, column %d)",
                           &dir->file, je.text, je.line, je.column);
        return NGX_ERROR;
    }

    ngx_memzero(&defaults, sizeof(ngx_http_llm_tenant_t));
    defaults.priority = NGX_HTTP_LLM_PRIORITY_STANDARD;
    defaults.weight = 1;

    if (!json_is_object(root)) {
        p = ngx_cpymem(errbuf, "the file must hold a JSON object",
                       sizeof("the file must hold a JSON object") - 1);
        goto invalid;
    }

    {
        const char  *k;
        json_t      *val;

        json_object_foreach(root, k, val) {
            if (ngx_strcmp(k, "tenants") != 0
                && ngx_strcmp(k, "defaults") != 0)
            {
                p = ngx_snprintf(errbuf, sizeof(errbuf) - 1,
                                 "unknown field \"%s\"", k);
                goto invalid;
            }
        }
    }

    v = json_object_get(root, "defaults");

    if (v) {
        if (!json_is_object(v) || json_object_get(v, "name")
            || json_object_get(v, "keys") || json_object_get(v, "adapters")
            || json_object_get(v, "default_adapter")
            || json_object_get(v, "cache_namespace"))
        {
            p = ngx_cpymem(errbuf, "\"defaults\" must be an object without "
                           "name, keys, adapters, default_adapter or "
                           "cache_namespace",
                           sizeof("\"defaults\" must be an object without "
                                  "name, keys, adapters, default_adapter or "
                                  "cache_namespace") - 1);
            goto invalid;
        }

        json_object_set_new(v, "name", json_string("defaults"));

        if (ngx_http_llm_tenant_parse(v, cf->pool, &defaults, &defaults,
                                      errbuf, sizeof(errbuf))
            != NGX_OK)
        {
            p = errbuf + ngx_strlen(errbuf);
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "llm_tenants \"%V\": defaults: %*s",
                               &dir->file, p - errbuf, errbuf);
            json_decref(root);
            return NGX_ERROR;
        }

        ngx_str_null(&defaults.name);
        ngx_str_null(&defaults.cache_namespace);
    }

    list = json_object_get(root, "tenants");

    if (!json_is_array(list)) {
        p = ngx_cpymem(errbuf, "\"tenants\" must be an array",
                       sizeof("\"tenants\" must be an array") - 1);
        goto invalid;
    }

    n = json_array_size(list);

    dir->tenants = ngx_pcalloc(cf->pool,
                               (n ? n : 1) * sizeof(ngx_http_llm_tenant_t *));
    if (dir->tenants == NULL) {
        json_decref(root);
        return NGX_ERROR;
    }

    if (ngx_array_init(&keys, cf->temp_pool, 16, sizeof(ngx_http_llm_key_t))
        != NGX_OK)
    {
        json_decref(root);
        return NGX_ERROR;
    }

    json_array_foreach(list, i, o) {

        t = ngx_pcalloc(cf->pool, sizeof(ngx_http_llm_tenant_t));
        if (t == NULL) {
            json_decref(root);
            return NGX_ERROR;
        }

        if (!json_is_object(o)) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "llm_tenants \"%V\": tenant #%uz is not an "
                               "object", &dir->file, i + 1);
            json_decref(root);
            return NGX_ERROR;
        }

        if (ngx_http_llm_tenant_parse(o, cf->pool, &defaults, t, errbuf,
                                      sizeof(errbuf))
            != NGX_OK)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "llm_tenants \"%V\": tenant #%uz: %s",
                               &dir->file, i + 1, errbuf);
            json_decref(root);
            return NGX_ERROR;
        }

        if (ngx_http_llm_tenants_load_keys(cf, json_object_get(o, "keys"),
                                           t, &keys, i + 1)
            != NGX_OK)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "llm_tenants \"%V\": tenant #%uz (\"%V\") "
                               "has bad \"keys\"", &dir->file, i + 1,
                               &t->name);
            json_decref(root);
            return NGX_ERROR;
        }

        dir->tenants[dir->n_tenants++] = t;
    }

    json_decref(root);

    ngx_qsort(dir->tenants, dir->n_tenants, sizeof(ngx_http_llm_tenant_t *),
              ngx_http_llm_tenant_cmp);

    for (n = 1; n < dir->n_tenants; n++) {
        if (ngx_http_llm_tenant_cmp(&dir->tenants[n - 1], &dir->tenants[n])
            == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "llm_tenants \"%V\": duplicate tenant \"%V\"",
                               &dir->file, &dir->tenants[n]->name);
            return NGX_ERROR;
        }
    }

    dir->n_keys = keys.nelts;
    dir->keys = ngx_palloc(cf->pool,
                           (keys.nelts ? keys.nelts : 1)
                           * sizeof(ngx_http_llm_key_t));
    if (dir->keys == NULL) {
        return NGX_ERROR;
    }

    if (keys.nelts) {
        ngx_memcpy(dir->keys, keys.elts,
                   keys.nelts * sizeof(ngx_http_llm_key_t));
    }

    ngx_qsort(dir->keys, dir->n_keys, sizeof(ngx_http_llm_key_t),
              ngx_http_llm_key_cmp);

    for (n = 1; n < dir->n_keys; n++) {
        if (ngx_http_llm_key_cmp(&dir->keys[n - 1], &dir->keys[n]) == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "llm_tenants \"%V\": the same key is given "
                               "to tenants \"%V\" and \"%V\"", &dir->file,
                               &dir->keys[n - 1].tenant->name,
                               &dir->keys[n].tenant->name);
            return NGX_ERROR;
        }
    }

    ngx_conf_log_error(NGX_LOG_DEBUG, cf, 0,
                       "llm_tenants \"%V\": %ui tenants, %ui keys",
                       &dir->file, dir->n_tenants, dir->n_keys);

    return NGX_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "llm_tenants \"%V\": %*s",
                       &dir->file, p - errbuf, errbuf);
    json_decref(root);
    return NGX_ERROR;
}


static ngx_int_t
ngx_http_llm_tenants_load_keys(ngx_conf_t *cf, json_t *keys,
    ngx_http_llm_tenant_t *t, ngx_array_t *out, ngx_uint_t index)
{
    size_t               i, len;
    u_char              *s, *d;
    json_t              *v;
    ngx_int_t            hi, lo;
    ngx_uint_t           k;
    ngx_http_llm_key_t  *key;

    if (keys == NULL) {
        return NGX_OK;          /* named by llm_tenant_variable only */
    }

    if (!json_is_array(keys)) {
        return NGX_ERROR;
    }

    json_array_foreach(keys, i, v) {

        if (!json_is_string(v)) {
            return NGX_ERROR;
        }

        s = (u_char *) json_string_value(v);
        len = json_string_length(v);

        key = ngx_array_push(out);
        if (key == NULL) {
            return NGX_ERROR;
        }

        key->tenant = t;

        if (len > 7 && ngx_strncmp(s, "sha256:", 7) == 0) {

            if (len != 7 + 2 * LLM_SHA256_LEN) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "key #%uz of tenant #%ui: \"sha256:\" "
                                   "needs 64 hex digits", i + 1, index);
                return NGX_ERROR;
            }

            d = key->digest;

            for (k = 0; k < LLM_SHA256_LEN; k++) {
                hi = ngx_hextoi(s + 7 + 2 * k, 1);
                lo = ngx_hextoi(s + 8 + 2 * k, 1);

                if (hi == NGX_ERROR || lo == NGX_ERROR) {
                    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                       "key #%uz of tenant #%ui: bad hex "
                                       "digit", i + 1, index);
                    return NGX_ERROR;
                }

                d[k] = (u_char) (hi << 4 | lo);
            }

            continue;
        }

        if (len < 8 || len > NGX_HTTP_LLM_MAX_KEY) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "key #%uz of tenant #%ui: a key has 8 to "
                               "%d characters", i + 1, index,
                               NGX_HTTP_LLM_MAX_KEY);
            return NGX_ERROR;
        }

        for (k = 0; k < len; k++) {
            if (s[k] <= 0x20 || s[k] >= 0x7f) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "key #%uz of tenant #%ui: a key is "
                                   "printable ASCII without spaces",
                                   i + 1, index);
                return NGX_ERROR;
            }
        }

        llm_sha256(s, len, key->digest);
    }

    return NGX_OK;
}


static int ngx_libc_cdecl
ngx_http_llm_key_cmp(const void *a, const void *b)
{
    const ngx_http_llm_key_t  *x = a, *y = b;

    return ngx_memcmp(x->digest, y->digest, LLM_SHA256_LEN);
}


static int ngx_libc_cdecl
ngx_http_llm_tenant_cmp(const void *a, const void *b)
{
    ngx_http_llm_tenant_t  *x = *(ngx_http_llm_tenant_t **) a;
    ngx_http_llm_tenant_t  *y = *(ngx_http_llm_tenant_t **) b;

    return ngx_memn2cmp(x->name.data, y->name.data, x->name.len,
                        y->name.len);
}


/*
 * One tenant object, from the file or from Redis; fields it leaves out
 * come from defaults.  Memory from pool.  NGX_ERROR with a message in
 * errbuf (NUL-terminated).
 */

ngx_int_t
ngx_http_llm_tenant_parse(json_t *o, ngx_pool_t *pool,
    ngx_http_llm_tenant_t *defaults, ngx_http_llm_tenant_t *t,
    u_char *errbuf, size_t errlen)
{
    u_char       *p;
    size_t        i, n;
    json_t       *v, *a;
    ngx_str_t     s;
    ngx_uint_t    k, found;
    const char   *key;

    static const char  *known[] = {
        "name", "keys", "priority", "weight", "adapters", "default_adapter",
        "max_tokens", "cache_namespace", "shared_cache_namespace",
        "prompt_cache", "disabled", "limits", NULL
    };

#define ngx_http_llm_fail(...)                                                \
    do {                                                                      \
        p = ngx_snprintf(errbuf, errlen - 1, __VA_ARGS__);                    \
        *p = '\0';                                                            \
        return NGX_ERROR;                                                     \
    } while (0)

    if (!json_is_object(o)) {
        ngx_http_llm_fail("a tenant is a JSON object");
    }

    json_object_foreach(o, key, v) {
        for (k = 0; known[k]; k++) {
            if (ngx_strcmp(key, known[k]) == 0) {
                break;
            }
        }

        if (known[k] == NULL) {
            ngx_http_llm_fail("unknown field \"%s\"", key);
        }
    }

    if (t != defaults) {
        *t = *defaults;
    }

    v = json_object_get(o, "name");

    if (!json_is_string(v)) {
        ngx_http_llm_fail("\"name\" is required, a string");
    }

    s.data = (u_char *) json_string_value(v);
    s.len = json_string_length(v);

    if (ngx_http_llm_valid_name(&s, LLM_PROTO_MAX_TENANT) != NGX_OK) {
        ngx_http_llm_fail("\"name\" has 1 to %d of A-Z a-z 0-9 . _ -",
                          LLM_PROTO_MAX_TENANT);
    }

    t->name.data = ngx_pstrdup(pool, &s);
    if (t->name.data == NULL) {
        ngx_http_llm_fail("out of memory");
    }

    t->name.len = s.len;

    v = json_object_get(o, "priority");

    if (v) {
        if (!json_is_string(v)) {
            ngx_http_llm_fail("\"priority\" is interactive, standard or "
                              "batch");
        }

        if (ngx_strcmp(json_string_value(v), "interactive") == 0) {
            t->priority = NGX_HTTP_LLM_PRIORITY_INTERACTIVE;

        } else if (ngx_strcmp(json_string_value(v), "standard") == 0) {
            t->priority = NGX_HTTP_LLM_PRIORITY_STANDARD;

        } else if (ngx_strcmp(json_string_value(v), "batch") == 0) {
            t->priority = NGX_HTTP_LLM_PRIORITY_BATCH;

        } else {
            ngx_http_llm_fail("\"priority\" is interactive, standard or "
                              "batch, not \"%s\"", json_string_value(v));
        }
    }

    if (ngx_http_llm_get_uint(o, "weight", 65535, &t->weight, errbuf,
                              errlen)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (t->weight == 0) {
        ngx_http_llm_fail("\"weight\" is an integer from 1 to 65535");
    }

    if (ngx_http_llm_get_uint(o, "max_tokens", 1048576, &t->max_tokens,
                              errbuf, errlen)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    v = json_object_get(o, "disabled");

    if (v) {
        if (!json_is_boolean(v)) {
            ngx_http_llm_fail("\"disabled\" is true or false");
        }

        t->disabled = json_is_true(v) ? 1 : 0;
    }

    a = json_object_get(o, "adapters");

    if (a) {
        if (!json_is_array(a)) {
            ngx_http_llm_fail("\"adapters\" is an array of names");
        }

        n = json_array_size(a);

        t->adapters = ngx_pcalloc(pool, (n ? n : 1) * sizeof(ngx_str_t));
        if (t->adapters == NULL) {
            ngx_http_llm_fail("out of memory");
        }

        t->n_adapters = 0;

        json_array_foreach(a, i, v) {
            if (!json_is_string(v)) {
                ngx_http_llm_fail("\"adapters\" is an array of names");
            }

            s.data = (u_char *) json_string_value(v);
            s.len = json_string_length(v);

            if (s.len == 1 && s.data[0] == '*') {
                t->all_adapters = 1;
                continue;
            }

            if (ngx_http_llm_valid_name(&s, LLM_PROTO_MAX_ADAPTER) != NGX_OK) {
                ngx_http_llm_fail("adapter \"%s\": a name has 1 to %d of "
                                  "A-Z a-z 0-9 . _ -", s.data,
                                  LLM_PROTO_MAX_ADAPTER);
            }

            t->adapters[t->n_adapters].data = ngx_pstrdup(pool, &s);
            if (t->adapters[t->n_adapters].data == NULL) {
                ngx_http_llm_fail("out of memory");
            }

            t->adapters[t->n_adapters++].len = s.len;
        }
    }

    v = json_object_get(o, "default_adapter");

    if (v && !json_is_null(v)) {
        if (!json_is_string(v)) {
            ngx_http_llm_fail("\"default_adapter\" is a string");
        }

        s.data = (u_char *) json_string_value(v);
        s.len = json_string_length(v);

        found = (s.len == 0);

        for (k = 0; k < t->n_adapters && !found; k++) {
            if (t->adapters[k].len == s.len
                && ngx_strncmp(t->adapters[k].data, s.data, s.len) == 0)
            {
                found = 1;
                t->default_adapter = t->adapters[k];
            }
        }

        if (!found && t->all_adapters
            && ngx_http_llm_valid_name(&s, LLM_PROTO_MAX_ADAPTER) == NGX_OK)
        {
            /* any adapter: checked against the engines' list per request */
            t->default_adapter.data = ngx_pstrdup(pool, &s);
            if (t->default_adapter.data == NULL) {
                ngx_http_llm_fail("out of memory");
            }
            t->default_adapter.len = s.len;
            found = 1;
        }

        if (!found) {
            ngx_http_llm_fail("\"default_adapter\" \"%s\" is not one of "
                              "\"adapters\"", s.data);
        }
    }

    v = json_object_get(o, "cache_namespace");

    if (v) {
        if (!json_is_string(v)
            || json_string_length(v) > LLM_PROTO_MAX_NAMESPACE)
        {
            ngx_http_llm_fail("\"cache_namespace\" is a string of at most "
                              "%d bytes", LLM_PROTO_MAX_NAMESPACE);
        }

        s.data = (u_char *) json_string_value(v);
        s.len = json_string_length(v);

        for (k = 0; k < s.len; k++) {
            if (s.data[k] < 0x20 || s.data[k] == 0x7f) {
                ngx_http_llm_fail("\"cache_namespace\" has a control "
                                  "character");
            }
        }

        t->cache_namespace.data = ngx_pstrdup(pool, &s);
        if (t->cache_namespace.data == NULL && s.len) {
            ngx_http_llm_fail("out of memory");
        }

        t->cache_namespace.len = s.len;

    } else if (t->cache_namespace.data == NULL) {
        /* one tenant's prompts are never another's cache hits */
        t->cache_namespace = t->name;
    }

    v = json_object_get(o, "shared_cache_namespace");

    if (v && !json_is_null(v)) {
        if (!json_is_string(v)
            || ngx_http_llm_namespace_valid((u_char *) json_string_value(v),
                                            json_string_length(v))
               != NGX_OK)
        {
            ngx_http_llm_fail("\"shared_cache_namespace\" is a string of at "
                              "most %d bytes without control characters",
                              LLM_PROTO_MAX_NAMESPACE);
        }

        s.data = (u_char *) json_string_value(v);
        s.len = json_string_length(v);

        t->shared_cache_namespace.data = ngx_pnalloc(pool, s.len + 1);
        if (t->shared_cache_namespace.data == NULL) {
            ngx_http_llm_fail("out of memory");
        }

        ngx_memcpy(t->shared_cache_namespace.data, s.data, s.len);
        t->shared_cache_namespace.len = s.len;
        t->shared_set = 1;
    }

    v = json_object_get(o, "prompt_cache");

    if (v && !json_is_null(v)) {
        if (!json_is_boolean(v)) {
            ngx_http_llm_fail("\"prompt_cache\" is true or false");
        }

        t->prompt_cache = json_is_true(v) ? NGX_HTTP_LLM_TPC_ON
                                          : NGX_HTTP_LLM_TPC_OFF;
    }

    v = json_object_get(o, "limits");

    if (v && ngx_http_llm_parse_limits(v, &t->limits, errbuf, errlen)
             != NGX_OK)
    {
        return NGX_ERROR;
    }

#undef ngx_http_llm_fail

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_parse_limits(json_t *o, ngx_http_llm_limits_t *l,
    u_char *errbuf, size_t errlen)
{
    u_char      *p;
    json_t      *v;
    ngx_uint_t   k;
    const char  *key;

    static const char  *known[] = {
        "requests_per_minute", "tokens_per_minute", "max_concurrent",
        "max_queued", NULL
    };

    if (!json_is_object(o)) {
        p = ngx_snprintf(errbuf, errlen - 1, "\"limits\" is an object");
        *p = '\0';
        return NGX_ERROR;
    }

    json_object_foreach(o, key, v) {
        for (k = 0; known[k]; k++) {
            if (ngx_strcmp(key, known[k]) == 0) {
                break;
            }
        }

        if (known[k] == NULL) {
            p = ngx_snprintf(errbuf, errlen - 1,
                             "unknown field \"limits.%s\"", key);
            *p = '\0';
            return NGX_ERROR;
        }
    }

    if (ngx_http_llm_get_uint(o, "requests_per_minute", 100000000,
                              &l->requests_per_minute, errbuf, errlen)
        != NGX_OK
        || ngx_http_llm_get_uint(o, "tokens_per_minute", 100000000000ULL,
                                 &l->tokens_per_minute, errbuf, errlen)
           != NGX_OK
        || ngx_http_llm_get_uint(o, "max_concurrent", 1000000,
                                 &l->max_concurrent, errbuf, errlen)
           != NGX_OK
        || ngx_http_llm_get_uint(o, "max_queued", 1000000,
                                 &l->max_queued, errbuf, errlen)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* An optional integer field from 0 to max; absent leaves *v alone. */

static ngx_int_t
ngx_http_llm_get_uint(json_t *o, const char *name, ngx_uint_t max,
    ngx_uint_t *v, u_char *errbuf, size_t errlen)
{
    u_char      *p;
    json_t      *j;
    json_int_t   n;

    j = json_object_get(o, name);

    if (j == NULL || json_is_null(j)) {
        return NGX_OK;
    }

    n = json_is_integer(j) ? json_integer_value(j) : -1;

    if (n < 0 || (ngx_uint_t) n > max) {
        p = ngx_snprintf(errbuf, errlen - 1,
                         "\"%s\" is an integer from 0 to %ui", name, max);
        *p = '\0';
        return NGX_ERROR;
    }

    *v = (ngx_uint_t) n;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_valid_name(ngx_str_t *s, size_t max)
{
    size_t  i;
    u_char  c;

    if (s->len == 0 || s->len > max) {
        return NGX_ERROR;
    }

    for (i = 0; i < s->len; i++) {
        c = s->data[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* ---- worker ------------------------------------------------------------- */

ngx_int_t
ngx_http_llm_tenants_init_process(ngx_cycle_t *cycle,
    ngx_http_llm_main_conf_t *lmcf)
{
    ngx_http_llm_cache_t  *cache;

    if (!lmcf->tenants_redis || lmcf->redis == NULL) {
        return NGX_OK;
    }

    cache = ngx_pcalloc(cycle->pool, sizeof(ngx_http_llm_cache_t));
    if (cache == NULL) {
        return NGX_ERROR;
    }

    ngx_rbtree_init(&cache->tree, &cache->sentinel, ngx_rbtree_insert_value);
    ngx_queue_init(&cache->lru);
    cache->log = cycle->log;

    ngx_http_llm_cache = cache;

    return NGX_OK;
}


void
ngx_http_llm_tenants_exit_process(ngx_cycle_t *cycle)
{
    ngx_queue_t            *q;
    ngx_http_llm_cached_t  *e;

    if (ngx_http_llm_cache == NULL) {
        return;
    }

    while (!ngx_queue_empty(&ngx_http_llm_cache->lru)) {
        q = ngx_queue_head(&ngx_http_llm_cache->lru);
        e = ngx_queue_data(q, ngx_http_llm_cached_t, queue);
        ngx_http_llm_cache_free(e);
    }

    ngx_http_llm_cache = NULL;
}


/* ---- identification ----------------------------------------------------- */

/*
 * Sets ctx->tenant: NGX_OK; NGX_AGAIN: a Redis lookup is under way and
 * ngx_http_llm_continue() follows; NGX_DECLINED: refused, err filled
 * (401, 403, 503).
 */

ngx_int_t
ngx_http_llm_tenant_identify(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_error_t *err)
{
    u_char                     shown[64], digest[LLM_SHA256_LEN];
    size_t                     shown_len;
    ngx_str_t                  key, name;
    ngx_http_llm_cached_t     *e;
    ngx_http_llm_tenant_t     *t;
    ngx_http_llm_loc_conf_t   *llcf;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);
    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    if (!lmcf->auth || ctx->tenant) {
        return NGX_OK;
    }

    /* the gateway's own authentication named the tenant */

    if (llcf->tenant_var) {
        if (ngx_http_complex_value(r, llcf->tenant_var, &name) != NGX_OK) {
            return NGX_ERROR;
        }

        if (name.len) {
            shown_len = ngx_min(name.len, sizeof(shown));
            ngx_memcpy(shown, name.data, shown_len);

            t = lmcf->directory
                ? ngx_http_llm_directory_name(lmcf->directory, &name) : NULL;

            if (t == NULL && ngx_http_llm_cache
                && ngx_http_llm_valid_name(&name, LLM_PROTO_MAX_TENANT)
                   == NGX_OK)
            {
                ngx_http_llm_lookup_digest(NGX_HTTP_LLM_LOOKUP_NAME,
                                           name.data, name.len, digest);

                e = ngx_http_llm_cache_get(digest);

                if (e == NULL) {
                    return ngx_http_llm_lookup_start(r, ctx,
                                                     NGX_HTTP_LLM_LOOKUP_NAME,
                                                     digest, &name, shown,
                                                     shown_len, err);
                }

                t = e->tenant;

                if (t && (t = ngx_http_llm_tenant_copy(r->pool, t)) == NULL) {
                    return NGX_ERROR;
                }
            }

            return ngx_http_llm_identified(r, ctx, t,
                                           NGX_HTTP_LLM_LOOKUP_NAME, shown,
                                           shown_len, err);
        }
    }

    if (ngx_http_llm_bearer(r, &key) != NGX_OK) {
        ctx->reject = NGX_HTTP_LLM_REJECT_KEY;
        ngx_http_llm_add_header(r, "WWW-Authenticate",
                                &ngx_http_llm_challenge);
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_UNAUTHORIZED,
                               "invalid_request_error", NULL,
                               "invalid_api_key",
                               "You didn't provide an API key. You need to "
                               "provide your API key in an Authorization "
                               "header using Bearer auth (i.e. "
                               "Authorization: Bearer YOUR_KEY).");
        return NGX_DECLINED;
    }

    shown_len = ngx_http_llm_mask(shown, &key);

    ngx_http_llm_lookup_digest(NGX_HTTP_LLM_LOOKUP_KEY, key.data, key.len,
                               digest);

    t = lmcf->directory
        ? ngx_http_llm_directory_key(lmcf->directory, digest) : NULL;

    if (t == NULL && ngx_http_llm_cache) {
        e = ngx_http_llm_cache_get(digest);

        if (e == NULL) {
            return ngx_http_llm_lookup_start(r, ctx, NGX_HTTP_LLM_LOOKUP_KEY,
                                             digest, NULL, shown, shown_len,
                                             err);
        }

        t = e->tenant;

        if (t && (t = ngx_http_llm_tenant_copy(r->pool, t)) == NULL) {
            return NGX_ERROR;
        }
    }

    return ngx_http_llm_identified(r, ctx, t, NGX_HTTP_LLM_LOOKUP_KEY, shown,
                                   shown_len, err);
}


static ngx_int_t
ngx_http_llm_identified(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_tenant_t *t, ngx_uint_t kind, u_char *shown,
    size_t shown_len, ngx_http_llm_error_t *err)
{
    if (t == NULL) {

        if (kind == NGX_HTTP_LLM_LOOKUP_NAME) {
            ctx->reject = NGX_HTTP_LLM_REJECT_FORBIDDEN;
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_FORBIDDEN,
                                   "invalid_request_error", NULL,
                                   "unknown_tenant",
                                   "The tenant `%*s` is not known here.",
                                   shown_len, shown);
            return NGX_DECLINED;
        }

        ctx->reject = NGX_HTTP_LLM_REJECT_KEY;
        ngx_http_llm_add_header(r, "WWW-Authenticate",
                                &ngx_http_llm_challenge);
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_UNAUTHORIZED,
                               "invalid_request_error", NULL,
                               "invalid_api_key",
                               "Incorrect API key provided: %*s",
                               shown_len, shown);
        return NGX_DECLINED;
    }

    ctx->tenant = t;

    if (t->disabled) {
        ctx->reject = NGX_HTTP_LLM_REJECT_FORBIDDEN;
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_FORBIDDEN,
                               "invalid_request_error", NULL,
                               "tenant_disabled",
                               "This account is disabled; please contact "
                               "the service's operator.");
        return NGX_DECLINED;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "llm: tenant \"%V\"", &t->name);

    return NGX_OK;
}


/* The key of "Authorization: Bearer KEY". */

static ngx_int_t
ngx_http_llm_bearer(ngx_http_request_t *r, ngx_str_t *key)
{
    u_char     *p, *last;
    ngx_str_t  *h;

    if (r->headers_in.authorization == NULL) {
        return NGX_DECLINED;
    }

    h = &r->headers_in.authorization->value;

    if (h->len < sizeof("Bearer ") - 1
        || ngx_strncasecmp(h->data, (u_char *) "Bearer ",
                           sizeof("Bearer ") - 1) != 0)
    {
        return NGX_DECLINED;
    }

    p = h->data + sizeof("Bearer ") - 1;
    last = h->data + h->len;

    while (p < last && *p == ' ') {
        p++;
    }

    while (last > p && last[-1] == ' ') {
        last--;
    }

    if (p == last || last - p > NGX_HTTP_LLM_MAX_KEY) {
        return NGX_DECLINED;
    }

    key->data = p;
    key->len = last - p;

    return NGX_OK;
}


/* "sk-ab***yz": the first 5 and the last 2 characters of long keys. */

static size_t
ngx_http_llm_mask(u_char *out, ngx_str_t *key)
{
    u_char  *p;
    size_t   i;

    if (key->len < 12) {
        return ngx_cpymem(out, "***", 3) - out;
    }

    p = out;

    for (i = 0; i < 5; i++) {
        *p++ = (key->data[i] > 0x20 && key->data[i] < 0x7f)
               ? key->data[i] : '?';
    }

    p = ngx_cpymem(p, "***", 3);

    for (i = key->len - 2; i < key->len; i++) {
        *p++ = (key->data[i] > 0x20 && key->data[i] < 0x7f)
               ? key->data[i] : '?';
    }

    return p - out;
}


static ngx_http_llm_tenant_t *
ngx_http_llm_directory_key(ngx_http_llm_directory_t *dir, u_char *digest)
{
    int         c;
    ngx_uint_t  lo, hi, mid;

    lo = 0;
    hi = dir->n_keys;

    while (lo < hi) {
        mid = lo + (hi - lo) / 2;
        c = ngx_memcmp(digest, dir->keys[mid].digest, LLM_SHA256_LEN);

        if (c == 0) {
            break;
        }

        if (c < 0) {
            hi = mid;

        } else {
            lo = mid + 1;
        }
    }

    if (lo >= hi) {
        return NULL;
    }

    /* the digests' order is public; equality is checked in full */

    if (!ngx_http_llm_ct_equal(digest, dir->keys[mid].digest,
                               LLM_SHA256_LEN))
    {
        return NULL;
    }

    return dir->keys[mid].tenant;
}


static ngx_http_llm_tenant_t *
ngx_http_llm_directory_name(ngx_http_llm_directory_t *dir, ngx_str_t *name)
{
    ngx_int_t   c;
    ngx_uint_t  lo, hi, mid;

    lo = 0;
    hi = dir->n_tenants;

    while (lo < hi) {
        mid = lo + (hi - lo) / 2;
        c = ngx_memn2cmp(name->data, dir->tenants[mid]->name.data,
                         name->len, dir->tenants[mid]->name.len);

        if (c == 0) {
            return dir->tenants[mid];
        }

        if (c < 0) {
            hi = mid;

        } else {
            lo = mid + 1;
        }
    }

    return NULL;
}


static ngx_uint_t
ngx_http_llm_ct_equal(u_char *a, u_char *b, size_t n)
{
    size_t  i;
    u_char  d;

    d = 0;

    for (i = 0; i < n; i++) {
        d |= a[i] ^ b[i];
    }

    return d == 0;
}


/* The cache key of a lookup: keys and names never collide. */

static void
ngx_http_llm_lookup_digest(ngx_uint_t kind, u_char *data, size_t len,
    u_char *digest)
{
    u_char          tag;
    llm_sha256_ctx  s;

    if (kind == NGX_HTTP_LLM_LOOKUP_KEY) {
        llm_sha256(data, len, digest);
        return;
    }

    tag = 0;

    llm_sha256_init(&s);
    llm_sha256_update(&s, "tenant", sizeof("tenant"));   /* with its NUL */
    llm_sha256_update(&s, &tag, 1);
    llm_sha256_update(&s, data, len);
    llm_sha256_final(&s, digest);
}


/* ---- Redis lookups ------------------------------------------------------ */

static ngx_int_t
ngx_http_llm_lookup_start(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_uint_t kind, u_char *digest, ngx_str_t *name, u_char *shown,
    size_t shown_len, ngx_http_llm_error_t *err)
{
    char                       hex[2 * LLM_SHA256_LEN + 1];
    u_char                    *p, rkey[512];
    size_t                     len;
    ngx_int_t                  rc;
    const char                *argv[2];
    size_t                     argvlen[2];
    ngx_http_llm_lookup_t     *op;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    op = ngx_alloc(sizeof(ngx_http_llm_lookup_t), r->connection->log);
    if (op == NULL) {
        return NGX_ERROR;
    }

    op->ctx = ctx;
    op->kind = kind;
    ngx_memcpy(op->digest, digest, LLM_SHA256_LEN);
    ngx_memcpy(op->shown, shown, shown_len);
    op->shown_len = shown_len;

    if (kind == NGX_HTTP_LLM_LOOKUP_KEY) {
        llm_sha256_hex(digest, hex);
        p = ngx_snprintf(rkey, sizeof(rkey), "%Vkey:%s",
                         &lmcf->redis->prefix, hex);

    } else {
        p = ngx_snprintf(rkey, sizeof(rkey), "%Vtenant:%V",
                         &lmcf->redis->prefix, name);
    }

    len = p - rkey;

    argv[0] = "GET";
    argvlen[0] = 3;
    argv[1] = (const char *) rkey;
    argvlen[1] = len;

    rc = ngx_http_llm_redis_command(ngx_http_llm_lookup_handler, op, 2, argv,
                                    argvlen);

    if (rc != NGX_OK) {
        ngx_free(op);
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "llm: cannot look up a tenant: Redis is not "
                      "connected");
        ngx_http_llm_directory_unavailable(r, ctx, err);
        return NGX_DECLINED;
    }

    ctx->lookup = op;

    return NGX_AGAIN;
}


static void
ngx_http_llm_lookup_handler(void *data, void *reply)
{
    ngx_http_llm_lookup_t *op = data;

    u_char                 errbuf[256];
    json_t                *o;
    ngx_int_t              rc;
    ngx_log_t             *log;
    ngx_pool_t            *pool;
    redisReply            *rr;
    json_error_t           je;
    ngx_connection_t      *c;
    ngx_http_request_t    *r;
    ngx_http_llm_ctx_t    *ctx;
    ngx_http_llm_error_t   err;
    ngx_http_llm_tenant_t  defaults, *t;

    rr = reply;
    ctx = op->ctx;
    log = ctx ? ctx->request->connection->log : ngx_cycle->log;
    t = NULL;

    if (ctx) {
        ctx->lookup = NULL;
    }

    if (rr == NULL || rr->type == REDIS_REPLY_ERROR) {

        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "llm: tenant lookup in Redis failed%s%*s",
                      rr ? ": " : "", rr ? (size_t) rr->len : 0,
                      rr ? rr->str : "");

        if (ctx == NULL) {
            goto done;
        }

        r = ctx->request;
        c = r->connection;

        ngx_http_llm_directory_unavailable(r, ctx, &err);

        ngx_http_finalize_request(r, ngx_http_llm_send_error(r, &err));
        ngx_http_run_posted_requests(c);
        goto done;
    }

    if (rr->type == REDIS_REPLY_STRING) {
        o = json_loadb(rr->str, rr->len, JSON_REJECT_DUPLICATES, &je);

        pool = ngx_create_pool(1024, ngx_cycle->log);

        if (pool == NULL) {
            json_decref(o);
            goto failed;
        }

        ngx_memzero(&defaults, sizeof(ngx_http_llm_tenant_t));
        defaults.priority = NGX_HTTP_LLM_PRIORITY_STANDARD;
        defaults.weight = 1;

        t = ngx_pcalloc(pool, sizeof(ngx_http_llm_tenant_t));

        if (o == NULL) {
            ngx_snprintf(errbuf, sizeof(errbuf), "%s%Z", je.text);
            rc = NGX_ERROR;

        } else if (t == NULL) {
            ngx_snprintf(errbuf, sizeof(errbuf), "out of memory%Z");
            rc = NGX_ERROR;

        } else {
            rc = ngx_http_llm_tenant_parse(o, pool, &defaults, t, errbuf,
                                           sizeof(errbuf));
        }

        json_decref(o);

        if (rc != NGX_OK) {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llm: bad tenant record in Redis for %*s: %s",
                          op->shown_len, op->shown, errbuf);
            ngx_destroy_pool(pool);
            t = NULL;
            pool = NULL;
        }

        ngx_http_llm_cache_put(op->digest, pool, t);

    } else {
        /* nil: not found, remembered for the cache time too */
        ngx_http_llm_cache_put(op->digest, NULL, NULL);
    }

    if (ctx == NULL) {
        goto done;
    }

    r = ctx->request;
    c = r->connection;

    if (t && (t = ngx_http_llm_tenant_copy(r->pool, t)) == NULL) {
        goto failed;
    }

    rc = ngx_http_llm_identified(r, ctx, t, op->kind, op->shown,
                                 op->shown_len, &err);

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, ngx_http_llm_send_error(r, &err));

    } else {
        ngx_http_llm_continue(r);
    }

    ngx_http_run_posted_requests(c);

done:

    ngx_free(op);
    return;

failed:

    if (ctx) {
        c = ctx->request->connection;
        ngx_http_finalize_request(ctx->request,
                                  NGX_HTTP_INTERNAL_SERVER_ERROR);
        ngx_http_run_posted_requests(c);
    }

    ngx_free(op);
}


static void
ngx_http_llm_directory_unavailable(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err)
{
    static ngx_str_t  one = ngx_string("1");

    ctx->reject = NGX_HTTP_LLM_REJECT_UNAVAILABLE;

    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_SERVICE_UNAVAILABLE,
                           "server_error", NULL,
                           "tenant_directory_unavailable",
                           "The API key could not be checked right now; "
                           "please retry.");

    ngx_http_llm_add_header(r, "Retry-After", &one);
}


/* The request went away: its lookup, if any, will find no one. */

void
ngx_http_llm_tenant_cleanup(ngx_http_llm_ctx_t *ctx)
{
    ngx_http_llm_lookup_t  *op;

    op = ctx->lookup;

    if (op) {
        op->ctx = NULL;
        ctx->lookup = NULL;
    }
}


/* ---- the worker's cache of Redis answers -------------------------------- */

static ngx_http_llm_cached_t *
ngx_http_llm_cache_find(u_char *digest)
{
    ngx_rbtree_key_t    key;
    ngx_rbtree_node_t  *node, *sentinel;

    ngx_memcpy(&key, digest, sizeof(ngx_rbtree_key_t));

    node = ngx_http_llm_cache->tree.root;
    sentinel = ngx_http_llm_cache->tree.sentinel;

    while (node != sentinel) {

        if (key < node->key) {
            node = node->left;
            continue;
        }

        if (key > node->key) {
            node = node->right;
            continue;
        }

        return (ngx_http_llm_cached_t *) node;
    }

    return NULL;
}


/*
 * A live entry for the digest.  Two digests with the same first 8 bytes
 * (never seen in practice) share one slot: the later answer replaces the
 * earlier one.
 */

static ngx_http_llm_cached_t *
ngx_http_llm_cache_get(u_char *digest)
{
    ngx_http_llm_cached_t  *e;

    e = ngx_http_llm_cache_find(digest);

    if (e == NULL
        || !ngx_http_llm_ct_equal(e->digest, digest, LLM_SHA256_LEN))
    {
        return NULL;
    }

    if ((ngx_msec_int_t) (e->expires - ngx_current_msec) <= 0) {
        ngx_http_llm_cache_free(e);
        return NULL;
    }

    ngx_queue_remove(&e->queue);
    ngx_queue_insert_head(&ngx_http_llm_cache->lru, &e->queue);

    return e;
}


static void
ngx_http_llm_cache_put(u_char *digest, ngx_pool_t *pool,
    ngx_http_llm_tenant_t *t)
{
    ngx_queue_t               *q;
    ngx_http_llm_cache_t      *cache;
    ngx_http_llm_cached_t     *e;
    ngx_http_llm_main_conf_t  *lmcf;

    cache = ngx_http_llm_cache;

    if (cache == NULL) {
        if (pool) {
            ngx_destroy_pool(pool);
        }

        return;
    }

    /* an answer that raced with another lookup of the same key */

    e = ngx_http_llm_cache_find(digest);
    if (e) {
        ngx_http_llm_cache_free(e);
    }

    if (cache->n >= NGX_HTTP_LLM_CACHE_MAX) {
        q = ngx_queue_last(&cache->lru);
        ngx_http_llm_cache_free(ngx_queue_data(q, ngx_http_llm_cached_t,
                                               queue));
    }

    e = ngx_alloc(sizeof(ngx_http_llm_cached_t), cache->log);
    if (e == NULL) {
        if (pool) {
            ngx_destroy_pool(pool);
        }

        return;
    }

    lmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                               ngx_http_llm_module);

    ngx_memcpy(e->digest, digest, LLM_SHA256_LEN);
    ngx_memcpy(&e->node.key, digest, sizeof(ngx_rbtree_key_t));
    e->expires = ngx_current_msec + lmcf->tenants_cache_time;
    e->pool = pool;
    e->tenant = t;

    ngx_rbtree_insert(&cache->tree, &e->node);
    ngx_queue_insert_head(&cache->lru, &e->queue);
    cache->n++;
}


static void
ngx_http_llm_cache_free(ngx_http_llm_cached_t *e)
{
    ngx_rbtree_delete(&ngx_http_llm_cache->tree, &e->node);
    ngx_queue_remove(&e->queue);
    ngx_http_llm_cache->n--;

    if (e->pool) {
        ngx_destroy_pool(e->pool);
    }

    ngx_free(e);
}


/* A cached tenant may be evicted while its request runs: copy it. */

static ngx_http_llm_tenant_t *
ngx_http_llm_tenant_copy(ngx_pool_t *pool, ngx_http_llm_tenant_t *src)
{
    ngx_uint_t              i;
    ngx_http_llm_tenant_t  *t;

    t = ngx_palloc(pool, sizeof(ngx_http_llm_tenant_t));
    if (t == NULL) {
        return NULL;
    }

    *t = *src;

    t->name.data = ngx_pstrdup(pool, &src->name);
    t->cache_namespace.data = ngx_pstrdup(pool, &src->cache_namespace);
    t->shared_cache_namespace.data = ngx_pstrdup(pool,
                                                 &src->shared_cache_namespace);

    if (t->name.data == NULL
        || (t->cache_namespace.data == NULL && src->cache_namespace.len)
        || (t->shared_cache_namespace.data == NULL
            && src->shared_cache_namespace.len))
    {
        return NULL;
    }

    t->adapters = ngx_palloc(pool, (src->n_adapters ? src->n_adapters : 1)
                                   * sizeof(ngx_str_t));
    if (t->adapters == NULL) {
        return NULL;
    }

    ngx_str_null(&t->default_adapter);

    for (i = 0; i < src->n_adapters; i++) {
        t->adapters[i].len = src->adapters[i].len;
        t->adapters[i].data = ngx_pstrdup(pool, &src->adapters[i]);

        if (t->adapters[i].data == NULL) {
            return NULL;
        }

        if (src->default_adapter.data == src->adapters[i].data) {
            t->default_adapter = t->adapters[i];
        }
    }

    if (src->default_adapter.len && t->default_adapter.data == NULL) {
        /* "*": a name outside the list */
        t->default_adapter.data = ngx_pstrdup(pool, &src->default_adapter);
        if (t->default_adapter.data == NULL) {
            return NULL;
        }
        t->default_adapter.len = src->default_adapter.len;
    }

    return t;
}


/*
 * A tenant of the file whose "prompt_cache" is true, or NULL: nginx -t
 * refuses that without llm_redis.
 */

ngx_http_llm_tenant_t *
ngx_http_llm_tenants_prompt_cache(ngx_http_llm_main_conf_t *lmcf)
{
    ngx_uint_t                 i;
    ngx_http_llm_directory_t  *dir;

    dir = lmcf->directory;

    if (dir == NULL) {
        return NULL;
    }

    for (i = 0; i < dir->n_tenants; i++) {
        if (dir->tenants[i]->prompt_cache == NGX_HTTP_LLM_TPC_ON) {
            return dir->tenants[i];
        }
    }

    return NULL;
}


/* ---- the model field: base model and adapters --------------------------- */

/*
 * "model": the base model's name (then the tenant's default adapter),
 * "base:adapter", or "adapter".  Sets p->adapter; an unknown model and
 * an adapter the tenant may not use get the same 404.
 */

ngx_int_t
ngx_http_llm_tenant_model(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err)
{
    ngx_str_t               *base, adapter;
    ngx_uint_t               i;
    ngx_http_llm_ctx_t      *ctx;
    ngx_http_llm_tenant_t   *t;

    base = &lmcf->model_name;
    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);
    t = ctx ? ctx->tenant : NULL;

    ngx_str_null(&p->adapter);

    if (p->model.len == base->len
        && ngx_strncmp(p->model.data, base->data, base->len) == 0)
    {
        if (t) {
            p->adapter = t->default_adapter;
        }

        return NGX_OK;
    }

    if (t == NULL) {
        if (lmcf->auth) {
            goto not_found;
        }

        /* no tenant directory: any adapter the engines serve */
        return ngx_http_llm_adapter_model(r, lmcf, p, err);
    }

    if (t->all_adapters) {
        /* "adapters": ["*"]: likewise */
        return ngx_http_llm_adapter_model(r, lmcf, p, err);
    }

    adapter = p->model;

    if (adapter.len > base->len + 1
        && adapter.data[base->len] == ':'
        && ngx_strncmp(adapter.data, base->data, base->len) == 0)
    {
        adapter.data += base->len + 1;
        adapter.len -= base->len + 1;
    }

    for (i = 0; i < t->n_adapters; i++) {
        if (t->adapters[i].len == adapter.len
            && ngx_strncmp(t->adapters[i].data, adapter.data, adapter.len)
               == 0)
        {
            p->adapter = t->adapters[i];
            return NGX_OK;
        }
    }

not_found:

    if (ctx) {
        ctx->reject = NGX_HTTP_LLM_REJECT_MODEL;
    }

    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_NOT_FOUND,
                           "invalid_request_error", "model",
                           "model_not_found",
                           "The model `%*s` does not exist or you do not "
                           "have access to it.",
                           ngx_min(p->model.len, 256), p->model.data);
    return NGX_ERROR;
}
