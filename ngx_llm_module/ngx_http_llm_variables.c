
/*
 * Variables for access logs:
 *
 *   $llm_model              the model asked for
 *   $llm_prompt_tokens      prompt tokens (after the chat template)
 *   $llm_completion_tokens  tokens generated
 *   $llm_cached_tokens      prompt tokens served from the prefix cache
 *   $llm_ttft               time to first token, seconds with ms
 *   $llm_finish_reason      stop, length, cancelled (client gone), error
 *   $llm_tenant             the tenant (API key or llm_tenant_variable)
 *   $llm_adapter            the adapter the request runs with
 *   $llm_reject             why it was refused before the engine:
 *                           invalid_api_key, forbidden, model_not_found,
 *                           requests, tokens, concurrency, unavailable
 *   $llm_cache              the prompt cache: HIT, MISS, or empty when it
 *                           does not apply
 *   $llm_cache_shared_tokens  prompt tokens sent as the shared prefix
 *                           (cache_shared_tokens of SUBMIT; 0: none)
 *
 * Requests that did not reach the engine leave them not found ("-"),
 * but for $llm_model once the body named one, and for the usage of a
 * prompt cache hit (as stored).
 */


#include "ngx_http_llm_module.h"


#define NGX_HTTP_LLM_VAR_MODEL        0
#define NGX_HTTP_LLM_VAR_PROMPT       1
#define NGX_HTTP_LLM_VAR_COMPLETION   2
#define NGX_HTTP_LLM_VAR_CACHED       3
#define NGX_HTTP_LLM_VAR_TTFT         4
#define NGX_HTTP_LLM_VAR_FINISH       5
#define NGX_HTTP_LLM_VAR_TENANT       6
#define NGX_HTTP_LLM_VAR_ADAPTER      7
#define NGX_HTTP_LLM_VAR_REJECT       8
#define NGX_HTTP_LLM_VAR_CACHE        9
#define NGX_HTTP_LLM_VAR_SHARED       10


static ngx_int_t ngx_http_llm_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);


static ngx_http_variable_t  ngx_http_llm_vars[] = {

    { ngx_string("llm_model"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_MODEL, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_prompt_tokens"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_PROMPT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_completion_tokens"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_COMPLETION, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_cached_tokens"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_CACHED, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_ttft"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_TTFT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_finish_reason"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_FINISH, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_tenant"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_TENANT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_adapter"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_ADAPTER, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_reject"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_REJECT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_cache"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_CACHE, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("llm_cache_shared_tokens"), NULL, ngx_http_llm_variable,
      NGX_HTTP_LLM_VAR_SHARED, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


ngx_int_t
ngx_http_llm_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_llm_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
    uintptr_t data)
{
    u_char              *p;
    ngx_uint_t           n;
    ngx_http_llm_ctx_t  *ctx;

    static const char  *rejects[] = {
        NULL, "invalid_api_key", "forbidden", "model_not_found",
        "requests", "tokens", "concurrency", "unavailable"
    };

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_llm_module);

    if (ctx == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    switch (data) {

    case NGX_HTTP_LLM_VAR_TENANT:
        if (ctx->tenant == NULL) {
            v->not_found = 1;
            return NGX_OK;
        }

        v->data = ctx->tenant->name.data;
        v->len = ctx->tenant->name.len;
        goto found;

    case NGX_HTTP_LLM_VAR_ADAPTER:
        if (ctx->params.adapter.len == 0) {
            v->not_found = 1;
            return NGX_OK;
        }

        v->data = ctx->params.adapter.data;
        v->len = ctx->params.adapter.len;
        goto found;

    case NGX_HTTP_LLM_VAR_REJECT:
        if (ctx->reject == 0
            || ctx->reject >= sizeof(rejects) / sizeof(rejects[0]))
        {
            v->not_found = 1;
            return NGX_OK;
        }

        v->data = (u_char *) rejects[ctx->reject];
        v->len = ngx_strlen(rejects[ctx->reject]);
        goto found;

    case NGX_HTTP_LLM_VAR_CACHE:
        switch (ctx->pcache.state) {

        case NGX_HTTP_LLM_PCACHE_HIT:
            ngx_str_set(v, "HIT");
            break;

        case NGX_HTTP_LLM_PCACHE_MISS:
            ngx_str_set(v, "MISS");
            break;

        default:
            ngx_str_set(v, "");
        }

        goto found;

    case NGX_HTTP_LLM_VAR_SHARED:
        if (!ctx->prepared) {
            v->not_found = 1;
            return NGX_OK;
        }

        p = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->data = p;
        v->len = ngx_sprintf(p, "%ui", ctx->shared_tokens) - p;
        goto found;
    }

    if (data == NGX_HTTP_LLM_VAR_MODEL
        ? ctx->params.model.len == 0
        : !ctx->submitted && ctx->pcache.state != NGX_HTTP_LLM_PCACHE_HIT)
    {
        v->not_found = 1;
        return NGX_OK;
    }

    switch (data) {

    case NGX_HTTP_LLM_VAR_MODEL:
        v->data = ctx->params.model.data;
        v->len = ctx->params.model.len;
        goto found;

    case NGX_HTTP_LLM_VAR_FINISH:
        if (ctx->finish == NULL) {
            v->not_found = 1;
            return NGX_OK;
        }

        v->data = (u_char *) ctx->finish;
        v->len = ngx_strlen(ctx->finish);
        goto found;

    case NGX_HTTP_LLM_VAR_TTFT:
        if (!ctx->first_token) {
            v->not_found = 1;
            return NGX_OK;
        }

        p = ngx_pnalloc(r->pool, NGX_TIME_T_LEN + 4);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->data = p;
        v->len = ngx_sprintf(p, "%T.%03M", (time_t) ctx->ttft / 1000,
                             ctx->ttft % 1000)
                 - p;
        goto found;

    case NGX_HTTP_LLM_VAR_PROMPT:
        n = ctx->prompt_tokens;
        break;

    case NGX_HTTP_LLM_VAR_COMPLETION:
        n = ctx->completion_tokens;
        break;

    default: /* NGX_HTTP_LLM_VAR_CACHED */
        n = ctx->cached_tokens;
        break;
    }

    p = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->data = p;
    v->len = ngx_sprintf(p, "%ui", n) - p;

found:

    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}
