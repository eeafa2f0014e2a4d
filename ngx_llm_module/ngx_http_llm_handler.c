
/*
 * The request lifecycle of llm_api locations:
 *
 *   route and method -> read the body (llm_max_body) -> tenant (API key
 *   or variable; maybe a Redis lookup) -> parse and validate -> chat
 *   template -> tokenize -> context check -> prompt cache (maybe a Redis
 *   GET) -> limits (maybe Redis, maybe a wait for a concurrency slot) ->
 *   a prompt cache hit is answered here; else SUBMIT ->
 *   NGX_DONE ... TOKENS: detokenize, stop strings, one SSE chunk per
 *   token (flushed) or accumulate ... DONE: final chunk or JSON, usage ->
 *   finalize.
 *
 * The request holds one reference (taken by the body reading) while the
 * engine works; it is released by ngx_http_finalize_request() from an
 * engine callback.  A client that goes away (ngx_http_test_reading, a
 * failed write, a timeout) terminates the request, and its cleanup
 * cancels the sequence in the engine.
 */


#include "ngx_http_llm_module.h"


static ngx_uint_t ngx_http_llm_route(ngx_http_request_t *r, ngx_str_t *id);
static ngx_int_t ngx_http_llm_models(ngx_http_request_t *r,
    ngx_uint_t endpoint, ngx_str_t *id);
static void ngx_http_llm_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_llm_read_body(ngx_http_request_t *r, u_char **body,
    size_t *len);
static ngx_int_t ngx_http_llm_prepare(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_start(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_prompt_text(ngx_http_request_t *r,
    ngx_http_llm_params_t *p);
static ngx_int_t ngx_http_llm_tokenize(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err);
static void ngx_http_llm_context_error(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_uint_t n_ctx, ngx_http_llm_error_t *err);
static void ngx_http_llm_on_tokens(ngx_http_llm_stream_t *s,
    llm_proto_tokens *t);
static void ngx_http_llm_on_done(ngx_http_llm_stream_t *s,
    const llm_proto_done *d);
static void ngx_http_llm_on_fail(ngx_http_llm_stream_t *s,
    ngx_http_llm_fail_e reason, const char *message);
static ngx_int_t ngx_http_llm_cached(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx);
static ngx_int_t ngx_http_llm_emit(ngx_http_llm_ctx_t *ctx, ngx_uint_t last);
static ngx_int_t ngx_http_llm_append(ngx_http_llm_ctx_t *ctx, ngx_str_t *s);
static ngx_int_t ngx_http_llm_finish(ngx_http_llm_ctx_t *ctx);
static ngx_int_t ngx_http_llm_stream_error(ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_send_sse_header(ngx_http_llm_ctx_t *ctx);
static ngx_int_t ngx_http_llm_send_chunk(ngx_http_llm_ctx_t *ctx,
    json_t *json);
static ngx_int_t ngx_http_llm_output(ngx_http_llm_ctx_t *ctx,
    ngx_chain_t *in);
static void ngx_http_llm_write_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_llm_simple_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, const char *code,
    const char *message);
static ngx_int_t ngx_http_llm_not_allowed(ngx_http_request_t *r,
    const char *allow);
static void ngx_http_llm_cleanup(void *data);
static void ngx_http_llm_make_id(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx);


ngx_int_t
ngx_http_llm_handler(ngx_http_request_t *r)
{
    ngx_int_t                  rc;
    ngx_str_t                  id;
    ngx_uint_t                 endpoint;
    ngx_http_llm_ctx_t        *ctx;
    ngx_http_cleanup_t        *cln;
    ngx_http_llm_error_t       err;
    ngx_http_llm_loc_conf_t   *llcf;
    ngx_http_llm_main_conf_t  *lmcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    ngx_str_null(&id);

    endpoint = ngx_http_llm_route(r, &id);

    if (endpoint == 0) {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        return ngx_http_llm_simple_error(r, NGX_HTTP_NOT_FOUND,
                                         "invalid_request_error",
                                         "unknown_url",
                                         "Unknown request URL.");
    }

    if (endpoint == NGX_HTTP_LLM_MODELS || endpoint == NGX_HTTP_LLM_MODEL) {
        if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
            return ngx_http_llm_not_allowed(r, "GET, HEAD");
        }

        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

        if (!lmcf->auth) {
            return ngx_http_llm_models(r, endpoint, &id);
        }

        /* with a tenant directory, listing models needs a key too */

        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_llm_ctx_t));
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->request = r;
        ctx->params.endpoint = endpoint;
        ctx->params.model = id;
        ctx->start = ngx_current_msec;

        ngx_http_set_ctx(r, ctx, ngx_http_llm_module);

        cln = ngx_http_cleanup_add(r, 0);
        if (cln == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        cln->handler = ngx_http_llm_cleanup;
        cln->data = ctx;

        rc = ngx_http_llm_tenant_identify(r, ctx, &err);

        switch (rc) {

        case NGX_OK:
            return ngx_http_llm_models(r, endpoint, &id);

        case NGX_AGAIN:
            /* ngx_http_llm_continue() answers */
            r->main->count++;
            return NGX_DONE;

        case NGX_DECLINED:
            return ngx_http_llm_send_error(r, &err);

        default:
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    if (r->method != NGX_HTTP_POST) {
        return ngx_http_llm_not_allowed(r, "POST");
    }

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    if (r->headers_in.content_length_n > (off_t) llcf->max_body) {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        return ngx_http_llm_simple_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                         "invalid_request_error",
                                         "request_too_large",
                                         "The request body is larger than "
                                         "this server accepts.");
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_llm_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->params.endpoint = endpoint;
    ctx->start = ngx_current_msec;

    ngx_http_set_ctx(r, ctx, ngx_http_llm_module);

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_llm_cleanup;
    cln->data = ctx;

    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r, ngx_http_llm_body_handler);

    if (rc == NGX_HTTP_REQUEST_ENTITY_TOO_LARGE) {
        return ngx_http_llm_simple_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                         "invalid_request_error",
                                         "request_too_large",
                                         "The request body is larger than "
                                         "this server accepts.");
    }

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


/*
 * The API's paths under the location: .../chat/completions,
 * .../completions, .../models, .../models/{id}.
 */

static ngx_uint_t
ngx_http_llm_route(ngx_http_request_t *r, ngx_str_t *id)
{
    u_char     *p, *last;
    ngx_str_t  *uri;

    uri = &r->uri;
    last = uri->data + uri->len;

    /* a trailing slash is tolerated */

    if (uri->len > 1 && last[-1] == '/') {
        last--;
    }

#define ngx_http_llm_ends(s)                                                  \
    ((size_t) (last - uri->data) >= sizeof(s) - 1                            \
     && ngx_strncmp(last - (sizeof(s) - 1), s, sizeof(s) - 1) == 0)

    if (ngx_http_llm_ends("/chat/completions")) {
        return NGX_HTTP_LLM_CHAT;
    }

    if (ngx_http_llm_ends("/completions")) {
        return NGX_HTTP_LLM_COMPLETIONS;
    }

    if (ngx_http_llm_ends("/models")) {
        return NGX_HTTP_LLM_MODELS;
    }

#undef ngx_http_llm_ends

    for (p = last; p > uri->data && p[-1] != '/'; p--) { /* void */ }

    if (p - uri->data >= (ssize_t) sizeof("/models/") - 1
        && ngx_strncmp(p - (sizeof("/models/") - 1), "/models/",
                       sizeof("/models/") - 1) == 0
        && p < last)
    {
        id->data = p;
        id->len = last - p;
        return NGX_HTTP_LLM_MODEL;
    }

    return 0;
}


static ngx_int_t
ngx_http_llm_models(ngx_http_request_t *r, ngx_uint_t endpoint,
    ngx_str_t *id)
{
    /*
     * the base model and the adapters the caller may use, which the
     * engines are asked for (ngx_http_llm_adapters.c): may return
     * NGX_DONE and answer later
     */

    return ngx_http_llm_adapters_models(r, endpoint, id);
}


static void
ngx_http_llm_body_handler(ngx_http_request_t *r)
{
    size_t                     len;
    u_char                    *body;
    ngx_http_llm_ctx_t        *ctx;
    ngx_http_llm_loc_conf_t   *llcf;

    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);
    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    if (ngx_http_llm_read_body(r, &body, &len) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    if (len > llcf->max_body) {
        ngx_http_finalize_request(r,
            ngx_http_llm_simple_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                      "invalid_request_error",
                                      "request_too_large",
                                      "The request body is larger than "
                                      "this server accepts."));
        return;
    }

    ctx->body = body;
    ctx->body_len = len;

    ngx_http_llm_continue(r);
}


/*
 * The steps after the body, each of which may wait (a Redis lookup, a
 * limiter verdict, a concurrency slot): called again by whoever ends the
 * wait.  Finalizes the request on refusals; after SUBMIT the engine's
 * callbacks take over.
 */

void
ngx_http_llm_continue(ngx_http_request_t *r)
{
    ngx_int_t                  rc;
    ngx_http_llm_ctx_t        *ctx;
    ngx_http_llm_error_t       err;
    ngx_http_llm_loc_conf_t   *llcf;
    ngx_http_llm_main_conf_t  *lmcf;

    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);
    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    rc = ngx_http_llm_tenant_identify(r, ctx, &err);

    if (rc == NGX_AGAIN) {
        return;
    }

    if (rc == NGX_DECLINED) {
        ngx_http_finalize_request(r, ngx_http_llm_send_error(r, &err));
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    if (ctx->params.endpoint == NGX_HTTP_LLM_MODELS
        || ctx->params.endpoint == NGX_HTTP_LLM_MODEL)
    {
        ngx_http_finalize_request(r,
                                  ngx_http_llm_models(r, ctx->params.endpoint,
                                                      &ctx->params.model));
        return;
    }

    if (!ctx->prepared) {
        if (ngx_http_llm_parse_request(r, lmcf, llcf, ctx->body,
                                       ctx->body_len, &ctx->params, &err)
            != NGX_OK
            || ngx_http_llm_prepare(r, ctx, &err) != NGX_OK)
        {
            ngx_http_finalize_request(r, ngx_http_llm_send_error(r, &err));
            return;
        }

        ctx->prepared = 1;
    }

    /* a deterministic request may have its answer in Redis */

    rc = ngx_http_llm_pcache_lookup(r, ctx);

    if (rc == NGX_AGAIN) {
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    rc = ngx_http_llm_limits_acquire(r, ctx, &err);

    if (rc == NGX_AGAIN) {
        return;
    }

    if (rc == NGX_DECLINED) {
        ngx_http_finalize_request(r, ngx_http_llm_send_error(r, &err));
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    if (ctx->pcache.state == NGX_HTTP_LLM_PCACHE_HIT) {
        r->read_event_handler = ngx_http_test_reading;
        r->write_event_handler = ngx_http_llm_write_handler;

        ngx_http_finalize_request(r, ngx_http_llm_cached(r, ctx));
        return;
    }

    if (ngx_http_llm_start(r, ctx, &err) != NGX_OK) {
        ngx_http_finalize_request(r, ngx_http_llm_send_error(r, &err));
        return;
    }

    /* the engine has it: watch the client meanwhile */

    ctx->submitted = 1;

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_llm_write_handler;
}


/* The body as one piece of memory. */

static ngx_int_t
ngx_http_llm_read_body(ngx_http_request_t *r, u_char **body, size_t *len)
{
    off_t         size;
    u_char       *p;
    ssize_t       n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    *body = (u_char *) "";
    *len = 0;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return NGX_OK;
    }

    cl = r->request_body->bufs;

    if (cl->next == NULL && !cl->buf->in_file) {
        *body = cl->buf->pos;
        *len = cl->buf->last - cl->buf->pos;
        return NGX_OK;
    }

    size = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        size += ngx_buf_size(cl->buf);
    }

    if (size > NGX_MAX_SIZE_T_VALUE / 2) {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(r->pool, (size_t) size + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    *body = p;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (!b->in_file) {
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
            continue;
        }

        /* a body larger than client_body_buffer_size: a local temp file */

        n = ngx_read_file(b->file, p, (size_t) (b->file_last - b->file_pos),
                          b->file_pos);

        if (n != b->file_last - b->file_pos) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "llm: cannot read the body from %V",
                          &b->file->name);
            return NGX_ERROR;
        }

        p += n;
    }

    *len = p - *body;

    return NGX_OK;
}


/*
 * Tokenizes, settles max_tokens (the tenant's ceiling included) and the
 * tokens the limiter reserves; NGX_ERROR with err filled when refused.
 */

static ngx_int_t
ngx_http_llm_prepare(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_error_t *err)
{
    ngx_uint_t                 n_ctx, max, ceiling;
    ngx_http_llm_params_t     *p;
    ngx_http_llm_stream_t     *s;
    ngx_http_llm_loc_conf_t   *llcf;

    p = &ctx->params;
    s = &ctx->stream;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    if (ngx_http_llm_tokenize(r, ctx, err) != NGX_OK) {
        return NGX_ERROR;
    }

    ceiling = ctx->tenant ? ctx->tenant->max_tokens : 0;

    /* max_tokens: asked, configured, or OpenAI's default (0: fill) */

    if (p->max_tokens > 0) {
        max = (ngx_uint_t) p->max_tokens;

        if (ceiling && max > ceiling) {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   "invalid_request_error", "max_tokens",
                                   "invalid_value",
                                   "max_tokens is too large: %ui. This "
                                   "account may ask for at most %ui "
                                   "completion tokens.", max, ceiling);
            return NGX_ERROR;
        }

    } else if (llcf->max_tokens_default) {
        max = llcf->max_tokens_default;

    } else {
        max = (p->endpoint == NGX_HTTP_LLM_COMPLETIONS) ? 16 : 0;
    }

    if (ceiling && (max == 0 || max > ceiling)) {
        max = ceiling;
    }

    n_ctx = ngx_http_llm_engine_n_ctx();

    if (n_ctx && (s->n_prompt >= n_ctx || s->n_prompt + max > n_ctx)) {
        s->max_tokens = max;
        ngx_http_llm_context_error(r, ctx, n_ctx, err);
        return NGX_ERROR;
    }

    s->max_tokens = max;

    /*
     * The limiter takes the prompt and the most the completion may use;
     * the unused part comes back at the end.  "Up to the context end"
     * reserves the rest of the context (of a typical one if no engine
     * is connected yet).
     */

    ctx->admit.reserved = s->n_prompt
                          + (max ? max : (n_ctx ? n_ctx - s->n_prompt
                                                : 2048));

    return NGX_OK;
}


/* Submits; NGX_ERROR with err filled when refused. */

static ngx_int_t
ngx_http_llm_start(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_error_t *err)
{
    ngx_int_t                  rc;
    ngx_str_t                 *ns;
    ngx_http_llm_params_t     *p;
    ngx_http_llm_stream_t     *s;
    ngx_http_llm_tenant_t     *t;
    ngx_http_llm_main_conf_t  *lmcf;

    p = &ctx->params;
    s = &ctx->stream;
    t = ctx->tenant;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    llm_proto_submit_default(&s->submit);

    s->submit.temperature = p->temperature;
    s->submit.top_p = p->top_p;
    s->submit.presence_penalty = p->presence_penalty;
    s->submit.frequency_penalty = p->frequency_penalty;
    s->submit.top_k = p->top_k;
    s->submit.min_p = p->min_p;
    s->submit.repetition_penalty = p->repetition_penalty;

    if (p->has_seed) {
        s->submit.seed = p->seed;
        s->submit.flags |= LLM_SUBMIT_HAS_SEED;
    }

    if (p->logprobs) {
        s->submit.flags |= LLM_SUBMIT_LOGPROBS;
        s->submit.top_logprobs = (uint8_t) p->top_logprobs;
    }

    /* the tenant's scheduling class, fair share and cache namespace */

    if (t) {
        s->submit.priority = (uint8_t) t->priority;
        s->submit.weight = (uint16_t) t->weight;

        ngx_cpystrn((u_char *) s->submit.tenant, t->name.data,
                    ngx_min(t->name.len, LLM_PROTO_MAX_TENANT) + 1);
        ngx_cpystrn((u_char *) s->submit.cache_namespace,
                    t->cache_namespace.data,
                    ngx_min(t->cache_namespace.len,
                            LLM_PROTO_MAX_NAMESPACE) + 1);
    }

    /* the public prefix (leading system messages) in the shared one */

    ns = ngx_http_llm_shared_namespace(r, ctx);

    if (ns && ctx->shared_tokens) {
        ngx_cpystrn((u_char *) s->submit.cache_shared_namespace, ns->data,
                    ngx_min(ns->len, LLM_PROTO_MAX_NAMESPACE) + 1);
        s->submit.cache_shared_tokens = (uint32_t) ctx->shared_tokens;
    }

    if (p->adapter.len) {
        ngx_cpystrn((u_char *) s->submit.adapter, p->adapter.data,
                    ngx_min(p->adapter.len, LLM_PROTO_MAX_ADAPTER) + 1);
    }

    s->log = r->connection->log;
    s->data = ctx;
    s->tokens = ngx_http_llm_on_tokens;
    s->done = ngx_http_llm_on_done;
    s->fail = ngx_http_llm_on_fail;

    /* output state */

    llm_detok_init(&ctx->detok, 0);

    ctx->scratch = ngx_pnalloc(r->pool, lmcf->detok_cap);
    if (ctx->scratch == NULL) {
        goto nomem;
    }

    if (ngx_http_llm_text_init(&ctx->text, r->pool, p->stop, p->n_stop,
                               p->logprobs)
        != NGX_OK)
    {
        goto nomem;
    }

    ngx_http_llm_make_id(r, ctx);
    ctx->created = ngx_time();

    if (p->echo) {

        /* logprobs' text_offset counts the echoed prompt */
        ctx->text.offset = p->prompt.len;

        if (!p->stream && ngx_http_llm_append(ctx, &p->prompt) != NGX_OK) {
            goto nomem;
        }
    }

    rc = ngx_http_llm_engine_submit(s);

    switch (rc) {

    case NGX_OK:
        return NGX_OK;

    case NGX_BUSY:
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_SERVICE_UNAVAILABLE,
                               "server_error", NULL, "engine_unavailable",
                               "The model engine is not available right "
                               "now; please retry.");
        return NGX_ERROR;

    case NGX_DECLINED:
        ngx_http_llm_context_error(r, ctx, s->n_ctx, err);
        return NGX_ERROR;

    default:
        goto nomem;
    }

nomem:

    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_INTERNAL_SERVER_ERROR,
                           "server_error", NULL, NULL,
                           "The server could not start the request.");
    return NGX_ERROR;
}


/*
 * The text of a prompt given as token ids, for echo: what the tokens
 * say, special tokens' text included, as valid UTF-8 (the incremental
 * detokenizer turns a broken sequence into U+FFFD, at most 3 bytes for
 * each byte of the tokens).
 */

static ngx_int_t
ngx_http_llm_prompt_text(ngx_http_request_t *r, ngx_http_llm_params_t *p)
{
    int                        n;
    size_t                     len, cap;
    u_char                    *buf;
    llm_detok                  d;
    ngx_uint_t                 i;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    len = 0;

    for (i = 0; i < p->n_prompt_ids; i++) {
        n = llm_token_to_piece(lmcf->tokenizer, p->prompt_ids[i], 1, NULL, 0);
        if (n < 0) {
            return NGX_ERROR;
        }

        len += (size_t) n;
    }

    cap = 3 * len + lmcf->detok_cap;

    buf = ngx_pnalloc(r->pool, cap + 1);
    if (buf == NULL) {
        return NGX_ERROR;
    }

    llm_detok_init(&d, 1);
    len = 0;

    for (i = 0; i < p->n_prompt_ids; i++) {
        n = llm_detok_push(&d, lmcf->tokenizer, p->prompt_ids[i],
                           (char *) buf + len, (int) (cap - len));
        if (n < 0) {
            return NGX_ERROR;
        }

        len += (size_t) n;
    }

    n = llm_detok_flush(&d, (char *) buf + len, (int) (cap - len));
    if (n < 0) {
        return NGX_ERROR;
    }

    len += (size_t) n;
    buf[len] = '\0';

    p->prompt.data = buf;
    p->prompt.len = len;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_tokenize(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_error_t *err)
{
    int                        n, cap;
    int32_t                   *ids;
    ngx_http_llm_params_t     *p;
    ngx_http_llm_main_conf_t  *lmcf;

    p = &ctx->params;
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    if (p->prompt_ids) {
        ctx->stream.prompt = p->prompt_ids;
        ctx->stream.n_prompt = p->n_prompt_ids;
        ctx->prompt_tokens = p->n_prompt_ids;

        if (p->echo && ngx_http_llm_prompt_text(r, p) != NGX_OK) {
            goto failed;
        }

        return NGX_OK;
    }

    if (p->prompt.len > (size_t) NGX_MAX_INT32_VALUE / 2) {
        goto too_long;
    }

    /* byte-level BPE: never more ids than bytes, plus BOS/EOS */

    cap = (int) p->prompt.len + 8;

    for ( ;; ) {
        ids = ngx_pnalloc(r->pool, (size_t) cap * sizeof(int32_t));
        if (ids == NULL) {
            goto failed;
        }

        n = llm_tokenize(lmcf->tokenizer, (const char *) p->prompt.data,
                         p->prompt.len, 1, (int) p->parse_special, ids, cap);

        if (n < 0) {
            goto failed;
        }

        if (n <= cap) {
            break;
        }

        cap = n;
    }

    if (n == 0) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               "invalid_request_error",
                               p->endpoint == NGX_HTTP_LLM_CHAT
                               ? "messages" : "prompt",
                               "invalid_value", "The prompt is empty.");
        return NGX_ERROR;
    }

    ctx->stream.prompt = ids;
    ctx->stream.n_prompt = n;
    ctx->prompt_tokens = n;

    if (ngx_http_llm_shared_tokens(r, ctx) != NGX_OK) {
        goto failed;
    }

    return NGX_OK;

too_long:

    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                           "invalid_request_error", "prompt",
                           "context_length_exceeded",
                           "The prompt is too long.");
    return NGX_ERROR;

failed:

    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_INTERNAL_SERVER_ERROR,
                           "server_error", NULL, NULL,
                           "The prompt could not be tokenized.");
    return NGX_ERROR;
}


static void
ngx_http_llm_context_error(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_uint_t n_ctx, ngx_http_llm_error_t *err)
{
    ngx_uint_t  n, max;

    n = ctx->stream.n_prompt;
    max = ctx->stream.max_tokens;

    if (max == 0) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               "invalid_request_error",
                               ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                               ? "messages" : "prompt",
                               "context_length_exceeded",
                               "This model's maximum context length is %ui "
                               "tokens. However, your %s resulted in %ui "
                               "tokens. Please reduce the length of the %s.",
                               n_ctx,
                               ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                               ? "messages" : "prompt", n,
                               ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                               ? "messages" : "prompt");
        return;
    }

    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                           "invalid_request_error",
                           ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                           ? "messages" : "prompt",
                           "context_length_exceeded",
                           "This model's maximum context length is %ui "
                           "tokens. However, you requested %ui tokens (%ui "
                           "in the %s, %ui in the completion). Please "
                           "reduce the length of the %s or completion.",
                           n_ctx, n + max, n,
                           ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                           ? "messages" : "prompt", max,
                           ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                           ? "messages" : "prompt");
}


/* ---- engine callbacks ----------------------------------------------- */

static void
ngx_http_llm_on_tokens(ngx_http_llm_stream_t *s, llm_proto_tokens *t)
{
    int                        n;
    ngx_uint_t                 k;
    llm_proto_token            tok;
    ngx_http_request_t        *r;
    ngx_http_llm_ctx_t        *ctx;
    ngx_http_llm_token_t       rec;
    ngx_http_llm_main_conf_t  *lmcf;

    ctx = s->data;
    r = ctx->request;
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    ngx_http_llm_metrics_token(ctx, (ngx_uint_t) t->n_tokens);

    while (!ctx->text.stopped && llm_proto_tokens_next(t, &tok)) {

        ctx->completion_tokens++;

        if (!ctx->first_token) {
            ctx->first_token = 1;
            ctx->ttft = ngx_current_msec - ctx->start;
        }

        /* end-of-generation tokens have no text; DONE follows */

        if (llm_tokenizer_is_eog(lmcf->tokenizer, tok.id)) {
            continue;
        }

        n = llm_detok_push(&ctx->detok, lmcf->tokenizer, tok.id,
                           (char *) ctx->scratch, (int) lmcf->detok_cap);
        if (n < 0 || (size_t) n > lmcf->detok_cap) {
            n = 0;
        }

        if (ctx->params.logprobs) {
            rec.id = tok.id;
            rec.logprob = tok.logprob;
            rec.n_top = ngx_min((ngx_uint_t) tok.n_top,
                                ctx->params.top_logprobs);

            for (k = 0; k < rec.n_top; k++) {
                rec.top_ids[k] = tok.top_ids[k];
                rec.top_logprobs[k] = tok.top_logprobs[k];
            }
        }

        if (ngx_http_llm_text_add(&ctx->text, ctx->scratch, n,
                                  ctx->params.logprobs ? &rec : NULL)
            != NGX_OK
            || ngx_http_llm_emit(ctx, 0) != NGX_OK)
        {
            ngx_http_finalize_request(r, NGX_ERROR);
            return;
        }
    }

    if (ctx->text.stopped && s->peer) {
        /*
         * A stop string: stop the sequence but keep listening, its DONE
         * brings the usage figures and ends the response.
         */
        ngx_http_llm_engine_stop(s);
    }
}


static void
ngx_http_llm_on_done(ngx_http_llm_stream_t *s, const llm_proto_done *d)
{
    int                        n;
    ngx_http_request_t        *r;
    ngx_http_llm_ctx_t        *ctx;
    ngx_http_llm_error_t       err;
    ngx_http_llm_main_conf_t  *lmcf;

    ctx = s->data;
    r = ctx->request;
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    ctx->cached_tokens = d->cached_tokens;
    ctx->queue_ms = d->queue_ms;
    ctx->got_done = 1;

    if (ctx->text.stopped) {
        ctx->finish = "stop";

    } else {
        switch (d->finish) {

        case LLM_PFINISH_STOP:
            ctx->finish = "stop";
            break;

        case LLM_PFINISH_LENGTH:
            ctx->finish = "length";
            break;

        case LLM_PFINISH_CANCELLED:
            ctx->finish = "cancelled";
            ngx_http_llm_error_set(r->pool, &err,
                                   NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "server_error", NULL, "engine_cancelled",
                                   "The engine cancelled the request "
                                   "(it is shutting down); please retry.");
            goto failed;

        default:
            ctx->finish = "error";
            ngx_http_llm_error_set(r->pool, &err,
                                   NGX_HTTP_INTERNAL_SERVER_ERROR,
                                   "server_error", NULL, "engine_error",
                                   "The engine failed: %s",
                                   d->message[0] ? d->message : "unknown");
            goto failed;
        }

        /* an incomplete UTF-8 tail is flushed as U+FFFD */

        n = llm_detok_flush(&ctx->detok, (char *) ctx->scratch,
                            (int) lmcf->detok_cap);

        if (n > 0 && (size_t) n <= lmcf->detok_cap
            && ngx_http_llm_text_add(&ctx->text, ctx->scratch, n, NULL)
               != NGX_OK)
        {
            ngx_http_finalize_request(r, NGX_ERROR);
            return;
        }
    }

    if (ngx_http_llm_emit(ctx, 1) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_ERROR);
        return;
    }

    ngx_http_finalize_request(r, ngx_http_llm_finish(ctx));
    return;

failed:

    ngx_http_finalize_request(r, ngx_http_llm_stream_error(ctx, &err));
}


static void
ngx_http_llm_on_fail(ngx_http_llm_stream_t *s, ngx_http_llm_fail_e reason,
    const char *message)
{
    ngx_http_request_t    *r;
    ngx_http_llm_ctx_t    *ctx;
    ngx_http_llm_error_t   err;

    ctx = s->data;
    r = ctx->request;

    if (ctx->text.stopped) {

        /* a stop string ended the answer already: only DONE was missing */

        ctx->finish = "stop";

        if (ngx_http_llm_emit(ctx, 1) != NGX_OK) {
            ngx_http_finalize_request(r, NGX_ERROR);
            return;
        }

        ngx_http_finalize_request(r, ngx_http_llm_finish(ctx));
        return;
    }

    ctx->finish = "error";

    switch (reason) {

    case NGX_HTTP_LLM_FAIL_CONTEXT:
        ngx_http_llm_context_error(r, ctx, s->n_ctx, &err);
        break;

    case NGX_HTTP_LLM_FAIL_TIMEOUT:
        ngx_http_llm_error_set(r->pool, &err, NGX_HTTP_GATEWAY_TIME_OUT,
                               "server_error", NULL, "engine_timeout",
                               "The model engine did not answer in time.");
        break;

    case NGX_HTTP_LLM_FAIL_OVERLOADED:
        ngx_http_llm_error_set(r->pool, &err, NGX_HTTP_SERVICE_UNAVAILABLE,
                               "server_error", NULL, "engine_overloaded",
                               "The model engine is overloaded; please "
                               "retry later.");
        break;

    case NGX_HTTP_LLM_FAIL_BAD_REQUEST:
        ngx_http_llm_error_set(r->pool, &err, NGX_HTTP_BAD_REQUEST,
                               "invalid_request_error", NULL,
                               "invalid_value", "%s",
                               message ? message : "Invalid request.");
        break;

    case NGX_HTTP_LLM_FAIL_NOT_FOUND:
        /* no adapter of that name in the engine: 404 model_not_found */
        ngx_http_llm_adapter_not_found(r, ctx, message, &err);
        break;

    case NGX_HTTP_LLM_FAIL_UNAVAILABLE:
        ngx_http_llm_error_set(r->pool, &err, NGX_HTTP_SERVICE_UNAVAILABLE,
                               "server_error", NULL, "engine_unavailable",
                               "The model engine is not available right "
                               "now%s%s; please retry.",
                               message ? ": " : "", message ? message : "");
        break;

    default:
        ngx_http_llm_error_set(r->pool, &err, NGX_HTTP_INTERNAL_SERVER_ERROR,
                               "server_error", NULL, "engine_error",
                               "The model engine failed: %s",
                               message ? message : "unknown error");
        break;
    }

    ngx_http_finalize_request(r, ngx_http_llm_stream_error(ctx, &err));
}


/* ---- output --------------------------------------------------------- */

/*
 * A prompt cache hit: the stored answer as the live one would have been
 * sent (the JSON response, or the role, content, finish and usage
 * chunks), with a new id and time.
 */

static ngx_int_t
ngx_http_llm_cached(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx)
{
    json_t                 *rec, *v, *lp;
    ngx_str_t               text, fp;
    ngx_http_llm_params_t  *p;

    p = &ctx->params;
    rec = ctx->pcache.record;

    v = json_object_get(rec, "text");
    text.data = (u_char *) json_string_value(v);
    text.len = json_string_length(v);

    v = json_object_get(rec, "finish_reason");
    ctx->finish = (ngx_strcmp(json_string_value(v), "length") == 0)
                  ? "length" : "stop";

    /* the fingerprint of the engine that computed it */

    v = json_object_get(rec, "system_fingerprint");
    fp.len = json_string_length(v);
    fp.data = ngx_pnalloc(r->pool, fp.len + 1);
    if (fp.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_memcpy(fp.data, json_string_value(v), fp.len);
    fp.data[fp.len] = '\0';
    ctx->stream.fingerprint = fp;

    ngx_http_llm_make_id(r, ctx);
    ctx->created = ngx_time();

    lp = json_object_get(rec, "logprobs");
    lp = json_is_object(lp) ? json_deep_copy(lp) : NULL;

    if (!p->stream) {
        if ((p->echo && ngx_http_llm_append(ctx, &p->prompt) != NGX_OK)
            || (text.len && ngx_http_llm_append(ctx, &text) != NGX_OK))
        {
            json_decref(lp);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->logprobs = lp;

        return ngx_http_llm_finish(ctx);
    }

    if (ngx_http_llm_send_sse_header(ctx) != NGX_OK) {
        json_decref(lp);
        return NGX_ERROR;
    }

    if (text.len || lp) {
        if (ngx_http_llm_send_chunk(ctx,
                                    ngx_http_llm_chunk_json(ctx, &text, 0, lp,
                                                            NULL))
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return ngx_http_llm_finish(ctx);
}


/* Sends (or accumulates) what the stop-string matcher releases. */

static ngx_int_t
ngx_http_llm_emit(ngx_http_llm_ctx_t *ctx, ngx_uint_t last)
{
    json_t                *lp;
    ngx_str_t              out;
    ngx_uint_t             ntoks;
    ngx_http_llm_token_t  *toks;

    ngx_http_llm_text_release(&ctx->text, last, &out, &toks, &ntoks);

    /* a prompt cache miss keeps what the client gets, to store it */

    if (ngx_http_llm_pcache_collect(ctx, &out, toks, ntoks) != NGX_OK) {
        return NGX_ERROR;
    }

    if (!ctx->params.stream) {
        if (out.len && ngx_http_llm_append(ctx, &out) != NGX_OK) {
            return NGX_ERROR;
        }

        if (ntoks) {
            ctx->logprobs = ngx_http_llm_logprobs_json(ctx, toks, ntoks,
                                                       ctx->logprobs);
            if (ctx->logprobs == NULL) {
                return NGX_ERROR;
            }
        }

        return NGX_OK;
    }

    if (out.len == 0 && ntoks == 0) {
        return NGX_OK;
    }

    if (!ctx->header_sent && ngx_http_llm_send_sse_header(ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    lp = NULL;

    if (ntoks) {
        lp = ngx_http_llm_logprobs_json(ctx, toks, ntoks, NULL);
        if (lp == NULL) {
            return NGX_ERROR;
        }
    }

    return ngx_http_llm_send_chunk(ctx,
                                   ngx_http_llm_chunk_json(ctx, &out, 0, lp,
                                                           NULL));
}


static ngx_int_t
ngx_http_llm_append(ngx_http_llm_ctx_t *ctx, ngx_str_t *s)
{
    size_t   size;
    u_char  *p;

    if (ctx->acc_len + s->len > ctx->acc_size) {
        size = ngx_max(ctx->acc_size * 2, ctx->acc_len + s->len);
        size = ngx_max(size, 1024);

        p = ngx_pnalloc(ctx->request->pool, size);
        if (p == NULL) {
            return NGX_ERROR;
        }

        if (ctx->acc_len) {
            ngx_memcpy(p, ctx->acc, ctx->acc_len);
        }

        if (ctx->acc) {
            ngx_pfree(ctx->request->pool, ctx->acc);
        }

        ctx->acc = p;
        ctx->acc_size = size;
    }

    ngx_memcpy(ctx->acc + ctx->acc_len, s->data, s->len);
    ctx->acc_len += s->len;

    return NGX_OK;
}


/* The end: the last chunks and [DONE], or the whole JSON response. */

static ngx_int_t
ngx_http_llm_finish(ngx_http_llm_ctx_t *ctx)
{
    ngx_int_t            rc;
    ngx_buf_t           *b;
    ngx_chain_t         *cl;
    ngx_http_request_t  *r;

    r = ctx->request;
    ctx->finished = 1;

    ngx_http_llm_pcache_store(ctx);

    if (!ctx->params.stream) {
        return ngx_http_llm_send_json(r, NGX_HTTP_OK,
                                      ngx_http_llm_response_json(ctx));
    }

    if (!ctx->header_sent && ngx_http_llm_send_sse_header(ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    rc = ngx_http_llm_send_chunk(ctx,
                                 ngx_http_llm_chunk_json(ctx, NULL, 0, NULL,
                                                         ctx->finish));
    if (rc != NGX_OK) {
        return NGX_ERROR;
    }

    if (ctx->params.include_usage) {
        rc = ngx_http_llm_send_chunk(ctx, ngx_http_llm_usage_chunk_json(ctx));
        if (rc != NGX_OK) {
            return NGX_ERROR;
        }
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = (u_char *) "data: [DONE]\n\n";
    b->last = b->pos + sizeof("data: [DONE]\n\n") - 1;
    b->memory = 1;
    b->flush = 1;
    b->last_buf = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    return ngx_http_output_filter(r, cl);
}


/*
 * An error after submission: a JSON error response if nothing was sent
 * yet, else an error event that ends the stream cleanly.
 */

static ngx_int_t
ngx_http_llm_stream_error(ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err)
{
    ngx_buf_t           *b;
    ngx_chain_t         *cl;
    ngx_http_request_t  *r;

    r = ctx->request;
    ctx->finished = 1;

    if (!ctx->header_sent) {
        return ngx_http_llm_send_error(r, err);
    }

    b = ngx_http_llm_json_buf(r->pool, &ctx->free,
                              ngx_http_llm_error_json(err), 1);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->flush = 1;
    b->last_buf = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    return ngx_http_output_filter(r, cl);
}


static ngx_int_t
ngx_http_llm_send_sse_header(ngx_http_llm_ctx_t *ctx)
{
    ngx_int_t            rc;
    ngx_table_elt_t     *h;
    ngx_http_request_t  *r;

    r = ctx->request;

    r->headers_out.status = NGX_HTTP_OK;
    ngx_str_set(&r->headers_out.content_type, "text/event-stream");
    r->headers_out.content_type_len = sizeof("text/event-stream") - 1;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = -1;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "no-cache");

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    /* no buffering by a proxy in front of us either */

    h->hash = 1;
    ngx_str_set(&h->key, "X-Accel-Buffering");
    ngx_str_set(&h->value, "no");

    ctx->header_sent = 1;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return NGX_ERROR;
    }

    if (ctx->params.endpoint == NGX_HTTP_LLM_CHAT) {
        return ngx_http_llm_send_chunk(ctx,
                                       ngx_http_llm_chunk_json(ctx, NULL, 1,
                                                               NULL, NULL));
    }

    if (ctx->params.echo) {
        return ngx_http_llm_send_chunk(ctx,
                                       ngx_http_llm_chunk_json(ctx,
                                                   &ctx->params.prompt, 0,
                                                   NULL, NULL));
    }

    return NGX_OK;
}


/* One SSE event, flushed at once. */

static ngx_int_t
ngx_http_llm_send_chunk(ngx_http_llm_ctx_t *ctx, json_t *json)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    b = ngx_http_llm_json_buf(ctx->request->pool, &ctx->free, json, 1);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->flush = 1;

    cl = ngx_alloc_chain_link(ctx->request->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    return ngx_http_llm_output(ctx, cl);
}


/*
 * Passes chunks on and recycles the sent buffers; a slow client gets
 * send_timeout, as ngx_http_writer() would give it.
 */

static ngx_int_t
ngx_http_llm_output(ngx_http_llm_ctx_t *ctx, ngx_chain_t *in)
{
    ngx_int_t                  rc;
    ngx_event_t               *wev;
    ngx_connection_t          *c;
    ngx_http_request_t        *r;
    ngx_http_core_loc_conf_t  *clcf;

    r = ctx->request;
    c = r->connection;
    wev = c->write;

    rc = ngx_http_output_filter(r, in);

    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &in,
                            (ngx_buf_tag_t) &ngx_http_llm_module);

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (r->buffered || c->buffered || ctx->busy) {
        if (!wev->delayed && !wev->timer_set) {
            ngx_add_timer(wev, clcf->send_timeout);
        }

        if (ngx_handle_write_event(wev, clcf->send_lowat) != NGX_OK) {
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    if (wev->timer_set) {
        ngx_del_timer(wev);
    }

    return NGX_OK;
}


static void
ngx_http_llm_write_handler(ngx_http_request_t *r)
{
    ngx_event_t         *wev;
    ngx_http_llm_ctx_t  *ctx;

    wev = r->connection->write;
    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);

    if (wev->timedout) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, NGX_ETIMEDOUT,
                      "client timed out");
        r->connection->timedout = 1;
        ngx_http_finalize_request(r, NGX_HTTP_REQUEST_TIME_OUT);
        return;
    }

    if (ctx == NULL || !ctx->header_sent) {
        return;
    }

    if (ngx_http_llm_output(ctx, NULL) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_ERROR);
    }
}


/* A whole JSON response (json is consumed; NULL: out of memory). */

ngx_int_t
ngx_http_llm_send_json(ngx_http_request_t *r, ngx_uint_t status,
    json_t *json)
{
    ngx_buf_t  *b;

    static ngx_str_t  type = ngx_string("application/json");

    b = ngx_http_llm_json_buf(r->pool, NULL, json, 0);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_llm_send_buf(r, status, &type, b);
}


/* A whole response in one buffer (JSON, /metrics' text). */

ngx_int_t
ngx_http_llm_send_buf(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, ngx_buf_t *b)
{
    u_char       *semi;
    ngx_int_t     rc;
    ngx_chain_t   out;

    r->headers_out.status = status;
    r->headers_out.content_type = *type;

    /* the length of the type without its parameters ("; charset=") */

    semi = ngx_strlchr(type->data, type->data + type->len, ';');
    r->headers_out.content_type_len = semi ? (size_t) (semi - type->data)
                                           : type->len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = b->last - b->pos;

    if (r->headers_out.content_length) {
        r->headers_out.content_length->hash = 0;
        r->headers_out.content_length = NULL;
    }

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


ngx_int_t
ngx_http_llm_send_error(ngx_http_request_t *r, ngx_http_llm_error_t *err)
{
    ngx_http_llm_ctx_t  *ctx;

    /* no answer, from the prompt cache or not: no X-LLM-Cache */

    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);

    if (ctx && ctx->pcache.header) {
        ctx->pcache.header->hash = 0;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "llm: %ui %s: %V", err->status,
                  err->code ? err->code : err->type,
                  ngx_http_llm_log_text(r->pool, &err->message));

    return ngx_http_llm_send_json(r, err->status,
                                  ngx_http_llm_error_json(err));
}


/*
 * text made safe for error.log: error messages quote what the client
 * sent (a model name, a role), and a newline there would start a log line
 * of the client's writing.  Control bytes and backslash become \xNN.  On
 * allocation failure, a placeholder.
 */

ngx_str_t *
ngx_http_llm_log_text(ngx_pool_t *pool, ngx_str_t *text)
{
    u_char            *p;
    size_t             i, n;
    ngx_str_t         *out;
    static ngx_str_t   unavailable = ngx_string("(text not shown)");
    static u_char      hex[] = "0123456789abcdef";

    n = 0;

    for (i = 0; i < text->len; i++) {
        if (text->data[i] < 0x20 || text->data[i] == 0x7f
            || text->data[i] == '\\')
        {
            n++;
        }
    }

    if (n == 0) {
        return text;
    }

    out = ngx_palloc(pool, sizeof(ngx_str_t));
    p = ngx_pnalloc(pool, text->len + 3 * n);

    if (out == NULL || p == NULL) {
        return &unavailable;
    }

    out->data = p;

    for (i = 0; i < text->len; i++) {
        u_char  c = text->data[i];

        if (c < 0x20 || c == 0x7f || c == '\\') {
            *p++ = '\\';
            *p++ = 'x';
            *p++ = hex[c >> 4];
            *p++ = hex[c & 0xf];

        } else {
            *p++ = c;
        }
    }

    out->len = p - out->data;

    return out;
}


static ngx_int_t
ngx_http_llm_simple_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *code, const char *message)
{
    ngx_http_llm_error_t  err;

    err.status = status;
    err.type = type;
    err.param = NULL;
    err.code = code;
    err.message.data = (u_char *) message;
    err.message.len = ngx_strlen(message);

    return ngx_http_llm_send_error(r, &err);
}


/* An output header; value must live as long as the request. */

void
ngx_http_llm_add_header(ngx_http_request_t *r, const char *key,
    ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return;
    }

    h->hash = 1;
    h->key.data = (u_char *) key;
    h->key.len = ngx_strlen(key);
    h->value = *value;
}


static ngx_int_t
ngx_http_llm_not_allowed(ngx_http_request_t *r, const char *allow)
{
    ngx_int_t         rc;
    ngx_table_elt_t  *h;

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Allow");
    h->value.data = (u_char *) allow;
    h->value.len = ngx_strlen(allow);

    return ngx_http_llm_simple_error(r, NGX_HTTP_NOT_ALLOWED,
                                     "invalid_request_error",
                                     "method_not_allowed",
                                     "Method not allowed.");
}


static void
ngx_http_llm_cleanup(void *data)
{
    ngx_http_llm_ctx_t  *ctx = data;

    /* a client that went away, or the end: the engine forgets it */

    ngx_http_llm_engine_cancel(&ctx->stream);

    /* a Redis lookup under way forgets us; limits get back what is due */

    ngx_http_llm_tenant_cleanup(ctx);
    ngx_http_llm_limits_release(ctx);
    ngx_http_llm_pcache_cleanup(ctx);

    if (ctx->finish == NULL && ctx->submitted) {
        ctx->finish = "cancelled";
    }

    if (ctx->logprobs) {
        json_decref(ctx->logprobs);
        ctx->logprobs = NULL;
    }
}


/* "chatcmpl-" or "cmpl-" and 24 random characters. */

static void
ngx_http_llm_make_id(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx)
{
    u_char      *p;
    ngx_uint_t   i;

    static u_char  alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

    p = ngx_pnalloc(r->pool, sizeof("chatcmpl-") - 1 + 24);
    if (p == NULL) {
        ngx_str_set(&ctx->id, "chatcmpl-0");
        return;
    }

    ctx->id.data = p;

    p = (ctx->params.endpoint == NGX_HTTP_LLM_CHAT)
        ? ngx_cpymem(p, "chatcmpl-", sizeof("chatcmpl-") - 1)
        : ngx_cpymem(p, "cmpl-", sizeof("cmpl-") - 1);

    for (i = 0; i < 24; i++) {
        *p++ = alphabet[ngx_random() % (sizeof(alphabet) - 1)];
    }

    ctx->id.len = p - ctx->id.data;
}
