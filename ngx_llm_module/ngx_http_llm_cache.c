
/*
 * The prompt cache, and the shared namespace of the engine's prefix
 * cache.
 *
 *   llm_prompt_cache on | off;             default off
 *   llm_prompt_cache_ttl TIME;             default 10m
 *   llm_prompt_cache_charge on | off;      default on
 *   llm_cache_shared_namespace NAME | off; default off
 *
 * Prompt cache: exact-match answers of deterministic requests kept in
 * Redis (llm_redis), opt-in per location or per tenant ("prompt_cache"
 * in the tenant directory wins over the location).  A request is
 * deterministic when it asks for greedy decoding (temperature 0, or
 * top_p 0) or gives a seed; n is always 1 here.  Its entry's key is the
 * SHA-256 of a length-prefixed tuple:
 *
 *   a format tag, the endpoint, the SHA-256 of the normalized request
 *   (the parsed body dumped as compact JSON with sorted keys, without
 *   "stream", "stream_options" and "user", which do not change the
 *   answer), the model name, the adapter and its content version (from
 *   the engines' adapter list), the engine's model fingerprint, the
 *   tenant's cache namespace, and the max_tokens the request runs with
 *   (llm_max_tokens_default and the tenant's ceiling included)
 *
 * so that tenants never see each other's entries (unless an operator
 * gives them one namespace), and a new model or adapter version never
 * hits an old answer.  The Redis key is "<prefix>pc:<hex key>".  The
 * value is a small versioned JSON record:
 *
 *   {"v": 1, "endpoint": "chat" | "completions", "text": ...,
 *    "finish_reason": "stop" | "length", "prompt_tokens": N,
 *    "completion_tokens": N, "cached_tokens": N,
 *    "system_fingerprint": "fp_...", "logprobs": {...} | null}
 *
 * which answers both forms: a hit is sent as the JSON response or as
 * SSE chunks (role, content, finish, usage if asked, [DONE]) with a new
 * id and time.  The lookup (GET) runs after the body is parsed and the
 * prompt counted and before the limits, from the event loop; Redis away,
 * slow (llm_redis timeout) or an entry that does not parse count as a
 * miss and the request runs live.  A miss is stored (SET ... EX ttl)
 * once the live answer finished with "stop" or "length"; answers cut by
 * an error or a client that left are not.  Answers carry
 * "X-LLM-Cache: HIT" or "MISS" when the cache applies, no header when it
 * does not (nor on error responses); $llm_cache says the same for logs.
 *
 * A hit goes through the API key, the tenant and the limits like any
 * request; with llm_prompt_cache_charge on it takes the tokens the live
 * answer took (prompt + completion) from the tenant's tokens per minute,
 * off: only the request counts.
 *
 * Shared prefix namespace: the engine's prefix cache keeps full KV
 * blocks under the tenant's cache namespace, so that no tenant can time
 * another's prompts.  A common system prompt is public: with a shared
 * namespace (the tenant's "shared_cache_namespace", else the location's
 * llm_cache_shared_namespace), the tokens of a chat request's leading
 * system (and developer) messages go to the engine as
 * cache_shared_tokens, cached under that namespace for every tenant
 * that names it, and the rest stays private.  The worker finds them by
 * rendering the chat template with those messages alone (no generation
 * prompt): if that text begins the full prompt, its tokens' common
 * prefix with the prompt's tokens is the shared part.  Completions and
 * requests without leading system messages share nothing; a client can
 * never choose the namespace or the count.
 */


#include "ngx_http_llm_module.h"

#include <hiredis/hiredis.h>


#define NGX_HTTP_LLM_PCACHE_FORMAT      1
#define NGX_HTTP_LLM_PCACHE_MAX_RECORD  (16 * 1024 * 1024)


/* A Redis command under way; outlives its request if need be. */
typedef struct {
    ngx_http_llm_ctx_t            *ctx;         /* NULL: request gone */
    u_char                         tenant[LLM_PROTO_MAX_TENANT];
    size_t                         tenant_len;
    u_char                         key[16];     /* the first hex digits,
                                                   for the log */
} ngx_http_llm_pcache_op_t;


static void ngx_http_llm_pcache_adapters_ready(ngx_http_request_t *r);
static void ngx_http_llm_pcache_key(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, u_char *fp, ngx_str_t *version);
static void ngx_http_llm_pcache_tuple(llm_sha256_ctx *s, const void *data,
    size_t len);
static size_t ngx_http_llm_pcache_redis_key(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, u_char *buf, size_t size);
static ngx_http_llm_pcache_op_t *ngx_http_llm_pcache_op(
    ngx_http_llm_ctx_t *ctx, ngx_log_t *log);
static void ngx_http_llm_pcache_get_handler(void *data, void *reply);
static void ngx_http_llm_pcache_set_handler(void *data, void *reply);
static json_t *ngx_http_llm_pcache_parse(ngx_http_llm_ctx_t *ctx,
    const char *data, size_t len, const char **why);
static ngx_uint_t ngx_http_llm_pcache_count(json_t *o, const char *name,
    ngx_uint_t *n);
static void ngx_http_llm_pcache_decide(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, json_t *record);
static void ngx_http_llm_pcache_event(ngx_http_llm_ctx_t *ctx,
    ngx_uint_t event);
static int ngx_http_llm_pcache_hash(const char *buf, size_t size,
    void *data);


static ngx_str_t  ngx_http_llm_pcache_hit = ngx_string("HIT");
static ngx_str_t  ngx_http_llm_pcache_miss = ngx_string("MISS");


/* ---- configuration ------------------------------------------------------ */

char *
ngx_http_llm_shared_namespace_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_str_t  *field, *value;

    field = (ngx_str_t *) ((char *) conf + cmd->offset);

    if (field->data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 3 && ngx_strncmp(value[1].data, "off", 3) == 0) {
        ngx_str_set(field, "");
        return NGX_CONF_OK;
    }

    if (value[1].len == 0
        || ngx_http_llm_namespace_valid(value[1].data, value[1].len)
           != NGX_OK)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid shared namespace \"%V\": 1 to %d bytes "
                           "without control characters", &value[1],
                           LLM_PROTO_MAX_NAMESPACE);
        return NGX_CONF_ERROR;
    }

    *field = value[1];

    return NGX_CONF_OK;
}


char *
ngx_http_llm_prompt_cache_ttl_check(ngx_conf_t *cf, void *post, void *data)
{
    time_t  *sp = data;

    /* Redis' EX wants a positive number of seconds */

    if (*sp < 1 || *sp > 365 * 86400) {
        return "must be from 1s to 365d";
    }

    return NGX_CONF_OK;
}


/* A cache namespace: at most LLM_PROTO_MAX_NAMESPACE bytes, no control
 * characters (it goes into the engine's hash chain and its logs). */

ngx_int_t
ngx_http_llm_namespace_valid(u_char *p, size_t len)
{
    size_t  i;

    if (len > LLM_PROTO_MAX_NAMESPACE) {
        return NGX_ERROR;
    }

    for (i = 0; i < len; i++) {
        if (p[i] < 0x20 || p[i] == 0x7f) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* ---- the shared prefix namespace ---------------------------------------- */

/* The request's shared namespace, or NULL: none (the tenant decides
 * first, then the location). */

ngx_str_t *
ngx_http_llm_shared_namespace(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx)
{
    ngx_http_llm_tenant_t    *t;
    ngx_http_llm_loc_conf_t  *llcf;

    t = ctx ? ctx->tenant : NULL;

    if (t && t->shared_set) {
        return t->shared_cache_namespace.len ? &t->shared_cache_namespace
                                             : NULL;
    }

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    return llcf->shared_namespace.len ? &llcf->shared_namespace : NULL;
}


/*
 * ctx->shared_tokens: how many of the prompt's tokens are the public
 * prefix (params.shared_len bytes of the text, found by the chat
 * parser): the common prefix of that text's tokens with the prompt's.
 * Called once the prompt is tokenized.
 */

ngx_int_t
ngx_http_llm_shared_tokens(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx)
{
    int                        n, cap;
    int32_t                   *ids;
    ngx_uint_t                 i, m;
    ngx_http_llm_params_t     *p;
    ngx_http_llm_main_conf_t  *lmcf;

    p = &ctx->params;
    ctx->shared_tokens = 0;

    if (p->shared_len == 0 || p->prompt_ids || ctx->stream.n_prompt == 0
        || p->shared_len > p->prompt.len)
    {
        return NGX_OK;
    }

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    /* byte-level BPE: never more ids than bytes, plus BOS/EOS */

    cap = (int) p->shared_len + 8;

    for ( ;; ) {
        ids = ngx_pnalloc(r->pool, (size_t) cap * sizeof(int32_t));
        if (ids == NULL) {
            return NGX_ERROR;
        }

        n = llm_tokenize(lmcf->tokenizer, (const char *) p->prompt.data,
                         p->shared_len, 1, (int) p->parse_special, ids, cap);

        if (n < 0) {
            /* the shared part is an optimisation: go on without it */
            ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                          "llm: the shared prefix could not be tokenized");
            return NGX_OK;
        }

        if (n <= cap) {
            break;
        }

        cap = n;
    }

    /* [n] ids of the prefix text, [n_prompt] of the whole prompt */

    m = ngx_min((ngx_uint_t) n, ctx->stream.n_prompt);

    for (i = 0; i < m; i++) {
        if (ids[i] != ctx->stream.prompt[i]) {
            break;
        }
    }

    ctx->shared_tokens = i;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "llm: %ui shared prefix tokens of %ui",
                   ctx->shared_tokens, ctx->stream.n_prompt);

    return NGX_OK;
}


/* ---- the prompt cache: lookup ------------------------------------------- */

ngx_uint_t
ngx_http_llm_pcache_enabled(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx)
{
    ngx_http_llm_tenant_t     *t;
    ngx_http_llm_loc_conf_t   *llcf;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    if (lmcf->redis == NULL) {
        return 0;
    }

    t = ctx->tenant;

    if (t && t->prompt_cache != NGX_HTTP_LLM_TPC_LOCATION) {
        return t->prompt_cache == NGX_HTTP_LLM_TPC_ON;
    }

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    return llcf->prompt_cache ? 1 : 0;
}


/*
 * Called by the parser with the request's JSON once it is valid: if the
 * cache applies (on, deterministic), remembers the digest of the
 * normalized body.  The body is changed (it is not used after).
 */

ngx_int_t
ngx_http_llm_pcache_normalize(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    json_t *root)
{
    llm_sha256_ctx          s;
    ngx_http_llm_params_t  *p;
    ngx_http_llm_pcache_t  *pc;

    p = &ctx->params;
    pc = &ctx->pcache;

    pc->wanted = 0;

    if (!ngx_http_llm_pcache_enabled(r, ctx)) {
        return NGX_OK;
    }

    if (!(p->temperature == 0.0f || p->has_seed)) {
        return NGX_OK;
    }

    /* how the answer is delivered and who the client says it is */

    (void) json_object_del(root, "stream");
    (void) json_object_del(root, "stream_options");
    (void) json_object_del(root, "user");

    llm_sha256_init(&s);

    if (json_dump_callback(root, ngx_http_llm_pcache_hash, &s,
                           JSON_COMPACT | JSON_SORT_KEYS | JSON_ENSURE_ASCII
                           | JSON_REAL_PRECISION(17))
        != 0)
    {
        return NGX_ERROR;
    }

    llm_sha256_final(&s, pc->norm);

    pc->wanted = 1;

    return NGX_OK;
}


static int
ngx_http_llm_pcache_hash(const char *buf, size_t size, void *data)
{
    llm_sha256_update(data, buf, size);

    return 0;
}


/*
 * Decides hit or miss before the limits: NGX_OK (state OFF, MISS or HIT,
 * and the header set); NGX_AGAIN: Redis or the engines' adapter list is
 * awaited and ngx_http_llm_continue() follows; NGX_ERROR.
 */

ngx_int_t
ngx_http_llm_pcache_lookup(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx)
{
    u_char                     fp[32], rkey[256];
    size_t                     len;
    ngx_int_t                  rc;
    ngx_str_t                  version;
    const char                *argv[2];
    size_t                     argvlen[2];
    ngx_http_llm_params_t     *p;
    ngx_http_llm_pcache_t     *pc;
    ngx_http_llm_pcache_op_t  *op;

    p = &ctx->params;
    pc = &ctx->pcache;

    switch (pc->state) {

    case NGX_HTTP_LLM_PCACHE_UNKNOWN:
        break;

    case NGX_HTTP_LLM_PCACHE_LOOKUP:
        return NGX_AGAIN;

    default:
        return NGX_OK;
    }

    if (!pc->wanted) {
        pc->state = NGX_HTTP_LLM_PCACHE_OFF;
        return NGX_OK;
    }

    /* an answer belongs to one model: no engine met yet, no cache */

    if (ngx_http_llm_engine_model_fingerprint(fp) != NGX_OK) {
        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "llm: prompt cache: no engine fingerprint yet");
        pc->state = NGX_HTTP_LLM_PCACHE_OFF;
        return NGX_OK;
    }

    ngx_str_null(&version);

    if (p->adapter.len) {
        rc = ngx_http_llm_adapter_version(r, &p->adapter, !pc->asked,
                                          ngx_http_llm_pcache_adapters_ready,
                                          &version);

        switch (rc) {

        case NGX_OK:
            break;

        case NGX_AGAIN:
            pc->asked = 1;
            pc->state = NGX_HTTP_LLM_PCACHE_LOOKUP;
            return NGX_AGAIN;

        case NGX_DECLINED:
            /* an adapter whose content is not known cannot be keyed */
            ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                           "llm: prompt cache: no version of adapter "
                           "\"%V\"", &p->adapter);
            pc->state = NGX_HTTP_LLM_PCACHE_OFF;
            return NGX_OK;

        default:
            return NGX_ERROR;
        }
    }

    ngx_http_llm_pcache_key(r, ctx, fp, &version);

    len = ngx_http_llm_pcache_redis_key(r, ctx, rkey, sizeof(rkey));

    op = ngx_http_llm_pcache_op(ctx, r->connection->log);
    if (op == NULL) {
        return NGX_ERROR;
    }

    argv[0] = "GET";
    argvlen[0] = 3;
    argv[1] = (const char *) rkey;
    argvlen[1] = len;

    rc = ngx_http_llm_redis_command(ngx_http_llm_pcache_get_handler, op, 2,
                                    argv, argvlen);

    if (rc == NGX_OK) {
        pc->op = op;
        pc->state = NGX_HTTP_LLM_PCACHE_LOOKUP;
        return NGX_AGAIN;
    }

    ngx_free(op);

    /* Redis away: a miss, answered live at once */

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "llm: prompt cache: Redis is not connected");

    ngx_http_llm_pcache_event(ctx, NGX_HTTP_LLM_PCACHE_EV_ERROR);
    ngx_http_llm_pcache_decide(r, ctx, NULL);

    return NGX_OK;
}


static void
ngx_http_llm_pcache_adapters_ready(ngx_http_request_t *r)
{
    ngx_connection_t    *c;
    ngx_http_llm_ctx_t  *ctx;

    c = r->connection;
    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);

    if (ctx == NULL) {
        return;
    }

    /* once more with the list as it is now */

    ctx->pcache.state = NGX_HTTP_LLM_PCACHE_UNKNOWN;

    ngx_http_llm_continue(r);
    ngx_http_run_posted_requests(c);
}


static void
ngx_http_llm_pcache_key(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    u_char *fp, ngx_str_t *version)
{
    u_char                    *n, num[NGX_INT_T_LEN];
    llm_sha256_ctx             s;
    ngx_str_t                  ns;
    const char                *endpoint;
    ngx_http_llm_params_t     *p;
    ngx_http_llm_main_conf_t  *lmcf;

    static const char  tag[] = "ngx_llm prompt cache 1";

    p = &ctx->params;
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    endpoint = (p->endpoint == NGX_HTTP_LLM_CHAT) ? "chat" : "completions";

    if (ctx->tenant) {
        ns = ctx->tenant->cache_namespace;

    } else {
        ngx_str_set(&ns, "");
    }

    n = ngx_sprintf(num, "%ui", ctx->stream.max_tokens);

    llm_sha256_init(&s);

    ngx_http_llm_pcache_tuple(&s, tag, sizeof(tag) - 1);
    ngx_http_llm_pcache_tuple(&s, endpoint, ngx_strlen(endpoint));
    ngx_http_llm_pcache_tuple(&s, ctx->pcache.norm, LLM_SHA256_LEN);
    ngx_http_llm_pcache_tuple(&s, lmcf->model_name.data,
                              lmcf->model_name.len);
    ngx_http_llm_pcache_tuple(&s, p->adapter.data, p->adapter.len);
    ngx_http_llm_pcache_tuple(&s, version->data, version->len);
    ngx_http_llm_pcache_tuple(&s, fp, 32);
    ngx_http_llm_pcache_tuple(&s, ns.data, ns.len);
    ngx_http_llm_pcache_tuple(&s, num, n - num);

    llm_sha256_final(&s, ctx->pcache.key);
}


/* One field of the key: its length (u32, little-endian), its bytes. */

static void
ngx_http_llm_pcache_tuple(llm_sha256_ctx *s, const void *data, size_t len)
{
    u_char  n[4];

    n[0] = (u_char) len;
    n[1] = (u_char) (len >> 8);
    n[2] = (u_char) (len >> 16);
    n[3] = (u_char) (len >> 24);

    llm_sha256_update(s, n, 4);

    if (len) {
        llm_sha256_update(s, data, len);
    }
}


static size_t
ngx_http_llm_pcache_redis_key(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    u_char *buf, size_t size)
{
    char                       hex[2 * LLM_SHA256_LEN + 1];
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    llm_sha256_hex(ctx->pcache.key, hex);

    /* prefix: at most 64 bytes (llm_redis) */

    return ngx_snprintf(buf, size, "%Vpc:%s", &lmcf->redis->prefix, hex)
           - buf;
}


static ngx_http_llm_pcache_op_t *
ngx_http_llm_pcache_op(ngx_http_llm_ctx_t *ctx, ngx_log_t *log)
{
    char                       hex[2 * LLM_SHA256_LEN + 1];
    ngx_str_t                 *name;
    ngx_http_llm_pcache_op_t  *op;

    op = ngx_alloc(sizeof(ngx_http_llm_pcache_op_t), log);
    if (op == NULL) {
        return NULL;
    }

    op->ctx = ctx;

    name = ctx->tenant ? &ctx->tenant->name : NULL;

    if (name) {
        op->tenant_len = ngx_min(name->len, sizeof(op->tenant));
        ngx_memcpy(op->tenant, name->data, op->tenant_len);

    } else {
        op->tenant[0] = '-';
        op->tenant_len = 1;
    }

    llm_sha256_hex(ctx->pcache.key, hex);
    ngx_memcpy(op->key, hex, sizeof(op->key));

    return op;
}


static void
ngx_http_llm_pcache_get_handler(void *data, void *reply)
{
    ngx_http_llm_pcache_op_t *op = data;

    json_t              *record;
    ngx_str_t            tenant;
    redisReply          *rr;
    const char          *why;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;
    ngx_http_llm_ctx_t  *ctx;

    rr = reply;
    ctx = op->ctx;
    record = NULL;

    tenant.data = op->tenant;
    tenant.len = op->tenant_len;

    if (ctx == NULL) {
        /* the request went away meanwhile */
        if (rr == NULL || rr->type == REDIS_REPLY_ERROR) {
            ngx_http_llm_metrics_pcache(&tenant, NGX_HTTP_LLM_PCACHE_EV_ERROR);
        }

        ngx_free(op);
        return;
    }

    ctx->pcache.op = NULL;
    r = ctx->request;
    c = r->connection;

    if (rr == NULL || rr->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "llm: prompt cache lookup in Redis failed%s%*s",
                      rr ? ": " : "", rr ? (size_t) rr->len : 0,
                      rr ? rr->str : "");
        ngx_http_llm_pcache_event(ctx, NGX_HTTP_LLM_PCACHE_EV_ERROR);

    } else if (rr->type == REDIS_REPLY_STRING) {
        why = "";
        record = ngx_http_llm_pcache_parse(ctx, rr->str, rr->len, &why);

        if (record == NULL) {
            ngx_log_error(NGX_LOG_WARN, c->log, 0,
                          "llm: prompt cache: ignored a bad entry "
                          "pc:%*s...: %s", sizeof(op->key), op->key, why);
            ngx_http_llm_pcache_event(ctx, NGX_HTTP_LLM_PCACHE_EV_ERROR);
        }
    }

    /* nil or anything else: not there */

    ngx_free(op);

    ngx_http_llm_pcache_decide(r, ctx, record);

    ngx_http_llm_continue(r);
    ngx_http_run_posted_requests(c);
}


/* HIT (record: the entry) or MISS: the header, the counters, the
 * tokens the limiter takes for a hit. */

static void
ngx_http_llm_pcache_decide(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    json_t *record)
{
    ngx_uint_t                n;
    ngx_http_llm_pcache_t    *pc;
    ngx_http_llm_loc_conf_t  *llcf;

    pc = &ctx->pcache;

    /* an error response hides it (ngx_http_llm_send_error) */

    pc->header = ngx_list_push(&r->headers_out.headers);

    if (pc->header) {
        pc->header->hash = 1;
        ngx_str_set(&pc->header->key, "X-LLM-Cache");
        pc->header->value = record ? ngx_http_llm_pcache_hit
                                   : ngx_http_llm_pcache_miss;
    }

    if (record == NULL) {
        pc->state = NGX_HTTP_LLM_PCACHE_MISS;
        ngx_http_llm_pcache_event(ctx, NGX_HTTP_LLM_PCACHE_EV_MISS);
        return;
    }

    pc->state = NGX_HTTP_LLM_PCACHE_HIT;
    pc->record = record;

    /* usage as the live answer reported it */

    (void) ngx_http_llm_pcache_count(record, "prompt_tokens", &n);
    ctx->prompt_tokens = n;
    (void) ngx_http_llm_pcache_count(record, "completion_tokens", &n);
    ctx->completion_tokens = n;
    (void) ngx_http_llm_pcache_count(record, "cached_tokens", &n);
    ctx->cached_tokens = n;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    pc->charged = llcf->prompt_cache_charge ? 1 : 0;

    ctx->admit.reserved = pc->charged
                          ? ctx->prompt_tokens + ctx->completion_tokens : 0;

    ngx_http_llm_pcache_event(ctx, NGX_HTTP_LLM_PCACHE_EV_HIT);
}


/*
 * An entry as read from Redis, checked field by field against what this
 * request can send; NULL (why says what is wrong) for anything else:
 * garbage, another format, a truncated value.
 */

static json_t *
ngx_http_llm_pcache_parse(ngx_http_llm_ctx_t *ctx, const char *data,
    size_t len, const char **why)
{
    json_t        *o, *v, *lp;
    ngx_uint_t     pt, ct, kt;
    const char    *s;
    json_error_t   je;

    if (len > NGX_HTTP_LLM_PCACHE_MAX_RECORD) {
        *why = "too large";
        return NULL;
    }

    o = json_loadb(data, len, JSON_REJECT_DUPLICATES, &je);

    if (o == NULL) {
        *why = "not JSON";
        return NULL;
    }

    if (!json_is_object(o)) {
        *why = "not an object";
        goto bad;
    }

    v = json_object_get(o, "v");

    if (!json_is_integer(v)
        || json_integer_value(v) != NGX_HTTP_LLM_PCACHE_FORMAT)
    {
        *why = "another format";
        goto bad;
    }

    v = json_object_get(o, "endpoint");
    s = (ctx->params.endpoint == NGX_HTTP_LLM_CHAT) ? "chat" : "completions";

    if (!json_is_string(v) || ngx_strcmp(json_string_value(v), s) != 0) {
        *why = "another endpoint";
        goto bad;
    }

    if (!json_is_string(json_object_get(o, "text"))) {
        *why = "no text";
        goto bad;
    }

    v = json_object_get(o, "finish_reason");

    if (!json_is_string(v)
        || (ngx_strcmp(json_string_value(v), "stop") != 0
            && ngx_strcmp(json_string_value(v), "length") != 0))
    {
        *why = "bad finish_reason";
        goto bad;
    }

    if (!ngx_http_llm_pcache_count(o, "prompt_tokens", &pt)
        || !ngx_http_llm_pcache_count(o, "completion_tokens", &ct)
        || !ngx_http_llm_pcache_count(o, "cached_tokens", &kt)
        || pt == 0 || kt > pt)
    {
        *why = "bad usage";
        goto bad;
    }

    v = json_object_get(o, "system_fingerprint");

    if (!json_is_string(v) || json_string_length(v) > 64) {
        *why = "bad system_fingerprint";
        goto bad;
    }

    lp = json_object_get(o, "logprobs");

    if (!ctx->params.logprobs) {
        if (!json_is_null(lp)) {
            *why = "unexpected logprobs";
            goto bad;
        }

    } else if (ctx->params.endpoint == NGX_HTTP_LLM_CHAT) {
        if (!json_is_object(lp)
            || !json_is_array(json_object_get(lp, "content")))
        {
            *why = "bad logprobs";
            goto bad;
        }

    } else {
        if (!json_is_object(lp)
            || !json_is_array(json_object_get(lp, "tokens"))
            || !json_is_array(json_object_get(lp, "token_logprobs"))
            || !json_is_array(json_object_get(lp, "top_logprobs"))
            || !json_is_array(json_object_get(lp, "text_offset")))
        {
            *why = "bad logprobs";
            goto bad;
        }
    }

    return o;

bad:

    json_decref(o);
    return NULL;
}


static ngx_uint_t
ngx_http_llm_pcache_count(json_t *o, const char *name, ngx_uint_t *n)
{
    json_t  *v;

    v = json_object_get(o, name);

    *n = 0;

    if (!json_is_integer(v) || json_integer_value(v) < 0
        || json_integer_value(v) > NGX_MAX_INT32_VALUE)
    {
        return 0;
    }

    *n = (ngx_uint_t) json_integer_value(v);

    return 1;
}


/* ---- the prompt cache: store -------------------------------------------- */

/* A miss: the released text and token records, as the client gets them. */

ngx_int_t
ngx_http_llm_pcache_collect(ngx_http_llm_ctx_t *ctx, ngx_str_t *text,
    ngx_http_llm_token_t *toks, ngx_uint_t n)
{
    size_t                  size;
    u_char                 *p;
    ngx_http_llm_pcache_t  *pc;

    pc = &ctx->pcache;

    if (pc->state != NGX_HTTP_LLM_PCACHE_MISS || pc->stored) {
        return NGX_OK;
    }

    if (text->len) {
        if (pc->len + text->len > pc->size) {
            size = ngx_max(pc->size * 2, pc->len + text->len);
            size = ngx_max(size, 256);

            p = ngx_pnalloc(ctx->request->pool, size);
            if (p == NULL) {
                return NGX_ERROR;
            }

            if (pc->len) {
                ngx_memcpy(p, pc->text, pc->len);
            }

            if (pc->text) {
                ngx_pfree(ctx->request->pool, pc->text);
            }

            pc->text = p;
            pc->size = size;
        }

        ngx_memcpy(pc->text + pc->len, text->data, text->len);
        pc->len += text->len;
    }

    if (n) {
        pc->logprobs = ngx_http_llm_logprobs_json(ctx, toks, n, pc->logprobs);
        if (pc->logprobs == NULL) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * The live answer finished (stop, length) with the engine's DONE: SET
 * its record with the TTL.  Fire and forget: the reply is only counted.
 */

void
ngx_http_llm_pcache_store(ngx_http_llm_ctx_t *ctx)
{
    u_char                    *value, rkey[256];
    size_t                     n, len;
    json_t                    *rec, *lp;
    ngx_int_t                  rc;
    const char                *argv[5];
    size_t                     argvlen[5];
    u_char                     ttl[NGX_TIME_T_LEN];
    ngx_str_t                 *fp;
    ngx_http_request_t        *r;
    ngx_http_llm_pcache_t     *pc;
    ngx_http_llm_pcache_op_t  *op;
    ngx_http_llm_loc_conf_t   *llcf;

    pc = &ctx->pcache;
    r = ctx->request;

    if (pc->state != NGX_HTTP_LLM_PCACHE_MISS || pc->stored
        || !ctx->got_done || ctx->finish == NULL
        || (ngx_strcmp(ctx->finish, "stop") != 0
            && ngx_strcmp(ctx->finish, "length") != 0))
    {
        return;
    }

    pc->stored = 1;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    lp = pc->logprobs;
    pc->logprobs = NULL;

    if (lp == NULL && ctx->params.logprobs) {
        lp = ngx_http_llm_logprobs_json(ctx, NULL, 0, NULL);
        if (lp == NULL) {
            return;
        }
    }

    fp = &ctx->stream.fingerprint;

    rec = json_pack("{s:i, s:s, s:o, s:s, s:I, s:I, s:I, s:s%, s:o}",
                    "v", NGX_HTTP_LLM_PCACHE_FORMAT,
                    "endpoint", ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                                ? "chat" : "completions",
                    "text", ngx_http_llm_json_text(pc->text, pc->len),
                    "finish_reason", ctx->finish,
                    "prompt_tokens", (json_int_t) ctx->prompt_tokens,
                    "completion_tokens", (json_int_t) ctx->completion_tokens,
                    "cached_tokens", (json_int_t) ctx->cached_tokens,
                    "system_fingerprint",
                    fp->data ? (char *) fp->data : "", fp->len,
                    "logprobs", lp ? lp : json_null());
    if (rec == NULL) {
        return;
    }

    n = json_dumpb(rec, NULL, 0, JSON_COMPACT | JSON_REAL_PRECISION(9));

    value = (n && n <= NGX_HTTP_LLM_PCACHE_MAX_RECORD)
            ? ngx_alloc(n, r->connection->log) : NULL;

    if (value == NULL) {
        json_decref(rec);
        return;
    }

    n = json_dumpb(rec, (char *) value, n,
                   JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(rec);

    op = ngx_http_llm_pcache_op(ctx, r->connection->log);
    if (op == NULL) {
        ngx_free(value);
        return;
    }

    /* the SET's reply may come after the request is gone */
    op->ctx = NULL;

    len = ngx_http_llm_pcache_redis_key(r, ctx, rkey, sizeof(rkey));

    argv[0] = "SET";
    argvlen[0] = 3;
    argv[1] = (const char *) rkey;
    argvlen[1] = len;
    argv[2] = (const char *) value;
    argvlen[2] = n;
    argv[3] = "EX";
    argvlen[3] = 2;
    argv[4] = (const char *) ttl;
    argvlen[4] = ngx_sprintf(ttl, "%T", llcf->prompt_cache_ttl) - ttl;

    /* hiredis copies the command into its buffer */

    rc = ngx_http_llm_redis_command(ngx_http_llm_pcache_set_handler, op, 5,
                                    argv, argvlen);
    ngx_free(value);

    if (rc != NGX_OK) {
        ngx_free(op);
        ngx_http_llm_pcache_event(ctx, NGX_HTTP_LLM_PCACHE_EV_ERROR);
    }
}


static void
ngx_http_llm_pcache_set_handler(void *data, void *reply)
{
    ngx_http_llm_pcache_op_t *op = data;

    ngx_str_t    tenant;
    redisReply  *rr;

    rr = reply;

    tenant.data = op->tenant;
    tenant.len = op->tenant_len;

    if (rr && rr->type == REDIS_REPLY_STATUS) {
        ngx_http_llm_metrics_pcache(&tenant, NGX_HTTP_LLM_PCACHE_EV_STORE);

    } else {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "llm: prompt cache store in Redis failed%s%*s",
                      rr && rr->type == REDIS_REPLY_ERROR ? ": " : "",
                      rr && rr->type == REDIS_REPLY_ERROR
                      ? (size_t) rr->len : 0,
                      rr && rr->type == REDIS_REPLY_ERROR ? rr->str : "");
        ngx_http_llm_metrics_pcache(&tenant, NGX_HTTP_LLM_PCACHE_EV_ERROR);
    }

    ngx_free(op);
}


/* The request ends: a GET under way forgets it; JSON goes. */

void
ngx_http_llm_pcache_cleanup(ngx_http_llm_ctx_t *ctx)
{
    ngx_http_llm_pcache_t     *pc;
    ngx_http_llm_pcache_op_t  *op;

    pc = &ctx->pcache;

    op = pc->op;

    if (op) {
        op->ctx = NULL;
        pc->op = NULL;
    }

    if (pc->record) {
        json_decref(pc->record);
        pc->record = NULL;
    }

    if (pc->logprobs) {
        json_decref(pc->logprobs);
        pc->logprobs = NULL;
    }
}


static void
ngx_http_llm_pcache_event(ngx_http_llm_ctx_t *ctx, ngx_uint_t event)
{
    ngx_str_t  name;

    if (ctx->tenant) {
        name = ctx->tenant->name;

    } else {
        ngx_str_set(&name, "-");
    }

    ngx_http_llm_metrics_pcache(&name, event);
}
