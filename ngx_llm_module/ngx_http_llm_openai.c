
/*
 * The OpenAI API's JSON: request parsing and validation (with the
 * statuses and error shapes OpenAI uses), chat template rendering, and
 * the response objects: chat.completion, text_completion, their
 * streaming chunks, models, errors.
 */


#include "ngx_http_llm_module.h"

#include <math.h>


#define NGX_HTTP_LLM_INVALID       "invalid_request_error"


static ngx_int_t ngx_http_llm_parse_chat(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, json_t *root, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_parse_content(ngx_http_request_t *r,
    json_t *v, ngx_uint_t i, llm_chat_msg *msg, ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_parse_prompt(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, json_t *root, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_parse_ids(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, json_t *a, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_parse_stop(ngx_http_request_t *r, json_t *root,
    ngx_http_llm_params_t *p, ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_parse_common(ngx_http_request_t *r,
    json_t *root, ngx_http_llm_params_t *p, ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_get_number(ngx_http_request_t *r,
    json_t *root, const char *name, double min, double max, float *out,
    ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_get_int(ngx_http_request_t *r, json_t *root,
    const char *name, json_int_t min, json_int_t max, json_int_t *out,
    ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_get_bool(ngx_http_request_t *r, json_t *root,
    const char *name, ngx_uint_t *out, ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_unsupported(ngx_http_request_t *r,
    json_t *root, ngx_http_llm_error_t *err);
static void ngx_http_llm_type_error(ngx_http_request_t *r,
    ngx_http_llm_error_t *err, const char *name, const char *expected,
    json_t *v);
static const char *ngx_http_llm_type_name(json_t *v);
static json_t *ngx_http_llm_json_bytes(u_char *p, size_t len);
static json_t *ngx_http_llm_json_logprob(float lp);
static json_t *ngx_http_llm_object_head(ngx_http_llm_ctx_t *ctx,
    const char *object);
static json_t *ngx_http_llm_usage_json(ngx_http_llm_ctx_t *ctx);
static json_t *ngx_http_llm_token_json(ngx_http_llm_ctx_t *ctx, int32_t id,
    float logprob, ngx_uint_t top, int32_t *top_ids, float *top_lps);


/* ---- requests ------------------------------------------------------- */

ngx_int_t
ngx_http_llm_parse_request(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, ngx_http_llm_loc_conf_t *llcf,
    u_char *body, size_t len, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err)
{
    json_t              *root, *v;
    ngx_int_t            rc;
    json_error_t         je;
    ngx_http_llm_ctx_t  *ctx;

    root = json_loadb((const char *) body, len, 0, &je);

    if (root == NULL) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, NULL, "invalid_json",
                               "We could not parse the JSON body of your "
                               "request: %s (line %d, column %d).",
                               je.text, je.line, je.column);
        return NGX_ERROR;
    }

    rc = NGX_ERROR;

    if (!json_is_object(root)) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, NULL, "invalid_type",
                               "The request body must be a JSON object, "
                               "not %s.", ngx_http_llm_type_name(root));
        goto done;
    }

    v = json_object_get(root, "model");

    if (v == NULL || json_is_null(v)) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "model",
                               "missing_required_parameter",
                               "You must provide a model parameter.");
        goto done;
    }

    if (!json_is_string(v)) {
        ngx_http_llm_type_error(r, err, "model", "a string", v);
        goto done;
    }

    p->model.len = json_string_length(v);
    p->model.data = ngx_pstrdup(r->pool, &(ngx_str_t) {
                                    p->model.len,
                                    (u_char *) json_string_value(v) });
    if (p->model.data == NULL) {
        goto nomem;
    }

    /* the base model, or an adapter the tenant may use (tenants.c) */

    if (ngx_http_llm_tenant_model(r, lmcf, p, err) != NGX_OK) {
        goto done;
    }

    if (ngx_http_llm_parse_common(r, root, p, err) != NGX_OK
        || ngx_http_llm_parse_stop(r, root, p, err) != NGX_OK
        || ngx_http_llm_unsupported(r, root, err) != NGX_OK)
    {
        goto done;
    }

    if (p->endpoint == NGX_HTTP_LLM_CHAT) {
        if (ngx_http_llm_parse_chat(r, lmcf, root, p, err) != NGX_OK) {
            goto done;
        }

    } else {
        if (ngx_http_llm_parse_prompt(r, lmcf, root, p, err) != NGX_OK) {
            goto done;
        }
    }

    /* the prompt cache's view of the request (the body changes) */

    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);

    if (ctx && p == &ctx->params
        && ngx_http_llm_pcache_normalize(r, ctx, root) != NGX_OK)
    {
        goto nomem;
    }

    rc = NGX_OK;
    goto done;

nomem:

    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_INTERNAL_SERVER_ERROR,
                           "server_error", NULL, NULL, "Out of memory.");

done:

    json_decref(root);

    return rc;
}


/* Parameters both endpoints take. */

static ngx_int_t
ngx_http_llm_parse_common(ngx_http_request_t *r, json_t *root,
    ngx_http_llm_params_t *p, ngx_http_llm_error_t *err)
{
    json_t      *v, *o;
    ngx_int_t    rc;
    ngx_uint_t   flag;
    json_int_t   n;

    p->max_tokens = -1;
    p->temperature = 1.0f;
    p->top_p = 1.0f;
    p->repetition_penalty = 1.0f;

    /* max_completion_tokens replaces max_tokens in the chat API */

    rc = ngx_http_llm_get_int(r, root, "max_completion_tokens", 1,
                              INT32_MAX, &n, err);
    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    if (rc == NGX_DECLINED) {
        rc = ngx_http_llm_get_int(r, root, "max_tokens", 1, INT32_MAX, &n,
                                  err);
        if (rc == NGX_ERROR) {
            return NGX_ERROR;
        }
    }

    if (rc == NGX_OK) {
        p->max_tokens = (ngx_int_t) n;
    }

    if (ngx_http_llm_get_number(r, root, "temperature", 0, 2,
                                &p->temperature, err) == NGX_ERROR
        || ngx_http_llm_get_number(r, root, "top_p", 0, 1,
                                   &p->top_p, err) == NGX_ERROR
        || ngx_http_llm_get_number(r, root, "presence_penalty", -2, 2,
                                   &p->presence_penalty, err) == NGX_ERROR
        || ngx_http_llm_get_number(r, root, "frequency_penalty", -2, 2,
                                   &p->frequency_penalty, err) == NGX_ERROR
        /* beyond OpenAI's API, as vLLM and llama.cpp's server take them
         * (the SDKs send them with extra_body) */
        || ngx_http_llm_get_number(r, root, "min_p", 0, 1,
                                   &p->min_p, err) == NGX_ERROR
        || ngx_http_llm_get_number(r, root, "repetition_penalty", 0, 10,
                                   &p->repetition_penalty, err)
           == NGX_ERROR)
    {
        return NGX_ERROR;
    }

    if (p->repetition_penalty == 0.0f) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "repetition_penalty",
                               "invalid_value", "Invalid "
                               "'repetition_penalty': expected a value "
                               "greater than 0 (1 is off).");
        return NGX_ERROR;
    }

    /* top_k: 0 or -1 (vLLM's "off") keep every token */

    rc = ngx_http_llm_get_int(r, root, "top_k", -1, INT32_MAX, &n, err);
    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    if (rc == NGX_OK && n > 0) {
        p->top_k = (int32_t) n;
    }

    /* top_p 0 keeps only the most likely token: greedy */

    if (p->top_p == 0.0f) {
        p->temperature = 0.0f;
        p->top_p = 1.0f;
    }

    rc = ngx_http_llm_get_int(r, root, "seed", INT64_MIN, INT64_MAX, &n,
                              err);
    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    if (rc == NGX_OK) {
        p->seed = (uint64_t) n;
        p->has_seed = 1;
    }

    rc = ngx_http_llm_get_int(r, root, "n", INT64_MIN, INT64_MAX, &n, err);
    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    if (rc == NGX_OK && n != 1) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "n", "invalid_value",
                               "Only n=1 is supported, got %L.",
                               (int64_t) n);
        return NGX_ERROR;
    }

    flag = 0;

    if (ngx_http_llm_get_bool(r, root, "stream", &flag, err) == NGX_ERROR) {
        return NGX_ERROR;
    }

    p->stream = flag;

    v = json_object_get(root, "stream_options");

    if (v && !json_is_null(v)) {
        if (!json_is_object(v)) {
            ngx_http_llm_type_error(r, err, "stream_options", "an object",
                                    v);
            return NGX_ERROR;
        }

        if (!p->stream) {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "stream_options",
                                   "invalid_value",
                                   "The 'stream_options' parameter is only "
                                   "allowed when 'stream' is enabled.");
            return NGX_ERROR;
        }

        flag = 0;

        if (ngx_http_llm_get_bool(r, v, "include_usage", &flag, err)
            == NGX_ERROR)
        {
            err->param = "stream_options.include_usage";
            return NGX_ERROR;
        }

        p->include_usage = flag;
    }

    v = json_object_get(root, "user");

    if (v && !json_is_null(v)) {
        if (!json_is_string(v)) {
            ngx_http_llm_type_error(r, err, "user", "a string", v);
            return NGX_ERROR;
        }

        p->user.len = json_string_length(v);
        p->user.data = ngx_pnalloc(r->pool, p->user.len);
        if (p->user.data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(p->user.data, json_string_value(v), p->user.len);
    }

    /* logprobs: a boolean in the chat API, a count (0-5) in completions */

    if (p->endpoint == NGX_HTTP_LLM_CHAT) {
        flag = 0;

        if (ngx_http_llm_get_bool(r, root, "logprobs", &flag, err)
            == NGX_ERROR)
        {
            return NGX_ERROR;
        }

        p->logprobs = flag;

        rc = ngx_http_llm_get_int(r, root, "top_logprobs", 0,
                                  LLM_PROTO_MAX_TOP, &n, err);
        if (rc == NGX_ERROR) {
            return NGX_ERROR;
        }

        if (rc == NGX_OK) {
            if (!p->logprobs && n > 0) {
                ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                       NGX_HTTP_LLM_INVALID, "top_logprobs",
                                       "invalid_value",
                                       "'top_logprobs' requires 'logprobs' "
                                       "to be true.");
                return NGX_ERROR;
            }

            p->top_logprobs = (ngx_uint_t) n;
        }

    } else {
        rc = ngx_http_llm_get_int(r, root, "logprobs", 0, 5, &n, err);
        if (rc == NGX_ERROR) {
            return NGX_ERROR;
        }

        if (rc == NGX_OK) {
            p->logprobs = 1;
            p->top_logprobs = (ngx_uint_t) n;
        }

        flag = 0;

        if (ngx_http_llm_get_bool(r, root, "echo", &flag, err) == NGX_ERROR) {
            return NGX_ERROR;
        }

        p->echo = flag;

        rc = ngx_http_llm_get_int(r, root, "best_of", 1, 1, &n, err);
        if (rc == NGX_ERROR) {
            return NGX_ERROR;
        }

        o = json_object_get(root, "suffix");

        if (o && !json_is_null(o)
            && !(json_is_string(o) && json_string_length(o) == 0))
        {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "suffix",
                                   "unsupported_parameter",
                                   "'suffix' is not supported.");
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* Parameters whose meaning we cannot honour: refused, not ignored. */

static ngx_int_t
ngx_http_llm_unsupported(ngx_http_request_t *r, json_t *root,
    ngx_http_llm_error_t *err)
{
    json_t      *v, *t;
    ngx_uint_t   i;

    static const char  *lists[] = { "tools", "functions", NULL };

    for (i = 0; lists[i]; i++) {
        v = json_object_get(root, lists[i]);

        if (v && !json_is_null(v)
            && !(json_is_array(v) && json_array_size(v) == 0))
        {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, lists[i],
                                   "unsupported_parameter",
                                   "'%s' is not supported by this server.",
                                   lists[i]);
            return NGX_ERROR;
        }
    }

    v = json_object_get(root, "logit_bias");

    if (v && !json_is_null(v)
        && !(json_is_object(v) && json_object_size(v) == 0))
    {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "logit_bias",
                               "unsupported_parameter",
                               "'logit_bias' is not supported by this "
                               "server.");
        return NGX_ERROR;
    }

    v = json_object_get(root, "response_format");

    if (v && !json_is_null(v)) {
        t = json_is_object(v) ? json_object_get(v, "type") : NULL;

        if (t == NULL || !json_is_string(t)
            || ngx_strcmp(json_string_value(t), "text") != 0)
        {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "response_format",
                                   "unsupported_parameter",
                                   "Only response_format {\"type\": "
                                   "\"text\"} is supported.");
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_parse_stop(ngx_http_request_t *r, json_t *root,
    ngx_http_llm_params_t *p, ngx_http_llm_error_t *err)
{
    size_t       len;
    json_t      *v, *s;
    ngx_uint_t   i, n;

    v = json_object_get(root, "stop");

    if (v == NULL || json_is_null(v)) {
        return NGX_OK;
    }

    if (json_is_string(v)) {
        n = 1;

    } else if (json_is_array(v)) {
        n = json_array_size(v);

        if (n > NGX_HTTP_LLM_MAX_STOP) {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "stop",
                                   "invalid_value",
                                   "At most %d stop sequences are allowed, "
                                   "got %ui.", NGX_HTTP_LLM_MAX_STOP, n);
            return NGX_ERROR;
        }

    } else {
        ngx_http_llm_type_error(r, err, "stop",
                                "a string or an array of strings", v);
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        s = json_is_string(v) ? v : json_array_get(v, i);

        if (!json_is_string(s)) {
            ngx_http_llm_type_error(r, err, "stop",
                                    "a string or an array of strings", s);
            return NGX_ERROR;
        }

        len = json_string_length(s);

        if (len == 0) {
            continue;
        }

        if (len > NGX_HTTP_LLM_MAX_STOP_LEN) {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "stop",
                                   "invalid_value",
                                   "A stop sequence is at most %d bytes.",
                                   NGX_HTTP_LLM_MAX_STOP_LEN);
            return NGX_ERROR;
        }

        p->stop[p->n_stop].data = ngx_pnalloc(r->pool, len);
        if (p->stop[p->n_stop].data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(p->stop[p->n_stop].data, json_string_value(s), len);
        p->stop[p->n_stop].len = len;
        p->n_stop++;
    }

    return NGX_OK;
}


/*
 * messages: [{"role": ..., "content": string | [parts] | null}, ...]
 * rendered with the model's chat template, generation prompt added.
 */

static ngx_int_t
ngx_http_llm_parse_chat(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, json_t *root, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err)
{
    int            rc;
    char          *out, *sys;
    size_t         len, out_len, sys_len;
    json_t        *msgs, *m, *v;
    llm_err        lerr;
    ngx_str_t     *ns;
    ngx_uint_t     i, n, k;
    const char    *role, *tmpl;
    llm_chat_msg  *cm;

    msgs = json_object_get(root, "messages");

    if (msgs == NULL || json_is_null(msgs)) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "messages",
                               "missing_required_parameter",
                               "Missing required parameter: 'messages'.");
        return NGX_ERROR;
    }

    if (!json_is_array(msgs)) {
        ngx_http_llm_type_error(r, err, "messages", "an array", msgs);
        return NGX_ERROR;
    }

    n = json_array_size(msgs);

    if (n == 0) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "messages",
                               "empty_array",
                               "Invalid 'messages': empty array. Expected "
                               "an array with minimum length 1, but got an "
                               "empty array instead.");
        return NGX_ERROR;
    }

    cm = ngx_pcalloc(r->pool, n * sizeof(llm_chat_msg));
    if (cm == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        m = json_array_get(msgs, i);

        if (!json_is_object(m)) {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "messages",
                                   "invalid_type",
                                   "Invalid type for 'messages[%ui]': "
                                   "expected an object, but got %s "
                                   "instead.", i, ngx_http_llm_type_name(m));
            return NGX_ERROR;
        }

        v = json_object_get(m, "role");

        if (v == NULL || !json_is_string(v)) {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "messages",
                                   v ? "invalid_type"
                                     : "missing_required_parameter",
                                   "'messages[%ui].role' must be a string.",
                                   i);
            return NGX_ERROR;
        }

        role = json_string_value(v);

        if (ngx_strcmp(role, "developer") == 0) {
            role = "system";

        } else if (ngx_strcmp(role, "system") != 0
                   && ngx_strcmp(role, "user") != 0
                   && ngx_strcmp(role, "assistant") != 0)
        {
            len = ngx_min(json_string_length(v), 64);

            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "messages",
                                   "invalid_value",
                                   "Invalid value for 'messages[%ui].role': "
                                   "'%*s'. Supported values are: 'system', "
                                   "'developer', 'user' and 'assistant'.",
                                   i, len, role);
            return NGX_ERROR;
        }

        cm[i].role = role;
        cm[i].role_len = ngx_strlen(role);

        if (ngx_http_llm_parse_content(r, json_object_get(m, "content"), i,
                                       &cm[i], err)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        if (cm[i].content == NULL) {
            if (ngx_strcmp(role, "assistant") != 0) {
                ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                       NGX_HTTP_LLM_INVALID, "messages",
                                       "missing_required_parameter",
                                       "'messages[%ui].content' is "
                                       "required.", i);
                return NGX_ERROR;
            }

            cm[i].content = "";
        }
    }

    tmpl = lmcf->chat_template ? lmcf->chat_template : "";
    out = NULL;
    out_len = 0;
    lerr.msg[0] = '\0';

    rc = llm_chat_render(lmcf->chat_kind, tmpl, cm, (int) n, 1,
                         (const char *) lmcf->bos_text.data, &out, &out_len,
                         &lerr);

    if (rc == 0) {
        out_len = llm_chat_strip_bos(out, out_len,
                                     (const char *) lmcf->bos_text.data,
                                     llm_tokenizer_add_bos(lmcf->tokenizer));
    }

    if (rc != 0) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "messages",
                               "invalid_value", "Invalid 'messages': %s.",
                               lerr.msg);
        return NGX_ERROR;
    }

    p->prompt.data = ngx_pnalloc(r->pool, out_len + 1);
    if (p->prompt.data == NULL) {
        llm_free(out);
        return NGX_ERROR;
    }

    ngx_memcpy(p->prompt.data, out, out_len);
    p->prompt.data[out_len] = '\0';
    p->prompt.len = out_len;
    p->parse_special = 1;

    llm_free(out);

    /*
     * With a shared prefix namespace: the leading system messages
     * rendered alone, without the generation prompt; if that text
     * begins the prompt, it is the public part (its tokens are counted
     * after tokenization).
     */

    p->shared_len = 0;

    ns = ngx_http_llm_shared_namespace(r, ngx_http_get_module_ctx(r,
                                                       ngx_http_llm_module));

    for (k = 0; k < n && ngx_strcmp(cm[k].role, "system") == 0; k++) {
        /* void */
    }

    if (ns == NULL || k == 0) {
        return NGX_OK;
    }

    sys = NULL;
    sys_len = 0;

    rc = llm_chat_render(lmcf->chat_kind, tmpl, cm, (int) k, 0,
                         (const char *) lmcf->bos_text.data, &sys, &sys_len,
                         &lerr);

    if (rc == 0) {
        sys_len = llm_chat_strip_bos(sys, sys_len,
                                     (const char *) lmcf->bos_text.data,
                                     llm_tokenizer_add_bos(lmcf->tokenizer));
    }

    if (rc == 0 && sys_len > 0 && sys_len <= p->prompt.len
        && ngx_memcmp(sys, p->prompt.data, sys_len) == 0)
    {
        p->shared_len = sys_len;
    }

    llm_free(sys);

    return NGX_OK;
}


/* content: a string, an array of {"type": "text", "text": ...}, null */

static ngx_int_t
ngx_http_llm_parse_content(ngx_http_request_t *r, json_t *v, ngx_uint_t i,
    llm_chat_msg *msg, ngx_http_llm_error_t *err)
{
    size_t       len;
    u_char      *p, *q;
    json_t      *part, *type, *text;
    ngx_uint_t   k, n;

    if (v == NULL || json_is_null(v)) {
        msg->content = NULL;
        return NGX_OK;
    }

    if (json_is_string(v)) {
        msg->content = json_string_value(v);
        msg->content_len = json_string_length(v);
        return NGX_OK;
    }

    if (!json_is_array(v)) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "messages",
                               "invalid_type",
                               "Invalid type for 'messages[%ui].content': "
                               "expected a string or an array of content "
                               "parts, but got %s instead.",
                               i, ngx_http_llm_type_name(v));
        return NGX_ERROR;
    }

    n = json_array_size(v);
    len = 0;

    for (k = 0; k < n; k++) {
        part = json_array_get(v, k);
        type = json_is_object(part) ? json_object_get(part, "type") : NULL;
        text = json_is_object(part) ? json_object_get(part, "text") : NULL;

        if (type == NULL || !json_is_string(type)
            || ngx_strcmp(json_string_value(type), "text") != 0
            || text == NULL || !json_is_string(text))
        {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "messages",
                                   "invalid_value",
                                   "'messages[%ui].content[%ui]': only "
                                   "{\"type\": \"text\", \"text\": string} "
                                   "parts are supported.", i, k);
            return NGX_ERROR;
        }

        len += json_string_length(text) + 1;
    }

    p = ngx_pnalloc(r->pool, len + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    /* parts are joined with newlines */

    q = p;

    for (k = 0; k < n; k++) {
        text = json_object_get(json_array_get(v, k), "text");

        if (k) {
            *q++ = '\n';
        }

        q = ngx_cpymem(q, json_string_value(text), json_string_length(text));
    }

    *q = '\0';

    msg->content = (const char *) p;
    msg->content_len = q - p;

    return NGX_OK;
}


/* prompt: a string, [string], [ids] or [[ids]] */

static ngx_int_t
ngx_http_llm_parse_prompt(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, json_t *root, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err)
{
    json_t  *v, *e;

    v = json_object_get(root, "prompt");

    if (v == NULL || json_is_null(v)) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "prompt",
                               "missing_required_parameter",
                               "Missing required parameter: 'prompt'.");
        return NGX_ERROR;
    }

    if (json_is_array(v)) {

        if (json_array_size(v) == 0) {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "prompt",
                                   "empty_array",
                                   "Invalid 'prompt': empty array.");
            return NGX_ERROR;
        }

        e = json_array_get(v, 0);

        if (json_is_integer(e)) {
            return ngx_http_llm_parse_ids(r, lmcf, v, p, err);
        }

        if (json_array_size(v) > 1) {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "prompt",
                                   "invalid_value",
                                   "Only one prompt per request is "
                                   "supported.");
            return NGX_ERROR;
        }

        if (json_is_array(e)) {
            return ngx_http_llm_parse_ids(r, lmcf, e, p, err);
        }

        v = e;
    }

    if (!json_is_string(v)) {
        ngx_http_llm_type_error(r, err, "prompt",
                                "a string, an array of strings or an "
                                "array of token ids", v);
        return NGX_ERROR;
    }

    p->prompt.len = json_string_length(v);
    p->prompt.data = ngx_pnalloc(r->pool, p->prompt.len + 1);
    if (p->prompt.data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(p->prompt.data, json_string_value(v), p->prompt.len);
    p->prompt.data[p->prompt.len] = '\0';
    p->parse_special = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_parse_ids(ngx_http_request_t *r, ngx_http_llm_main_conf_t *lmcf,
    json_t *a, ngx_http_llm_params_t *p, ngx_http_llm_error_t *err)
{
    json_t      *e;
    ngx_uint_t   i, n, n_vocab;
    json_int_t   id;

    n = json_array_size(a);
    n_vocab = llm_tokenizer_n_vocab(lmcf->tokenizer);

    if (n == 0) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, "prompt",
                               "empty_array", "Invalid 'prompt': empty "
                               "array.");
        return NGX_ERROR;
    }

    p->prompt_ids = ngx_pnalloc(r->pool, n * sizeof(int32_t));
    if (p->prompt_ids == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        e = json_array_get(a, i);
        id = json_is_integer(e) ? json_integer_value(e) : -1;

        if (id < 0 || id >= (json_int_t) n_vocab) {
            ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                                   NGX_HTTP_LLM_INVALID, "prompt",
                                   "invalid_value",
                                   "Invalid token id at 'prompt[%ui]': "
                                   "expected an integer from 0 to %ui.",
                                   i, n_vocab - 1);
            return NGX_ERROR;
        }

        p->prompt_ids[i] = (int32_t) id;
    }

    p->n_prompt_ids = n;

    return NGX_OK;
}


/* NGX_OK: set; NGX_DECLINED: absent or null; NGX_ERROR: err filled. */

static ngx_int_t
ngx_http_llm_get_number(ngx_http_request_t *r, json_t *root,
    const char *name, double min, double max, float *out,
    ngx_http_llm_error_t *err)
{
    double   d;
    json_t  *v;

    v = json_object_get(root, name);

    if (v == NULL || json_is_null(v)) {
        return NGX_DECLINED;
    }

    if (!json_is_number(v)) {
        ngx_http_llm_type_error(r, err, name, "a number", v);
        return NGX_ERROR;
    }

    d = json_number_value(v);

    if (!(d >= min && d <= max)) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, name, "invalid_value",
                               "Invalid '%s': expected a value from %.1f "
                               "to %.1f, but got %.4f instead.",
                               name, min, max, d);
        return NGX_ERROR;
    }

    *out = (float) d;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_get_int(ngx_http_request_t *r, json_t *root, const char *name,
    json_int_t min, json_int_t max, json_int_t *out,
    ngx_http_llm_error_t *err)
{
    double      d;
    json_t     *v;
    json_int_t  n;

    v = json_object_get(root, name);

    if (v == NULL || json_is_null(v)) {
        return NGX_DECLINED;
    }

    d = json_is_real(v) ? json_real_value(v) : 0.5;

    if (json_is_integer(v)) {
        n = json_integer_value(v);

    } else if (d == floor(d)
               && d >= -9007199254740992.0 && d <= 9007199254740992.0)
    {
        n = (json_int_t) d;

    } else {
        ngx_http_llm_type_error(r, err, name, "an integer", v);
        return NGX_ERROR;
    }

    if (n < min || n > max) {
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                               NGX_HTTP_LLM_INVALID, name, "invalid_value",
                               "Invalid '%s': expected an integer from %L "
                               "to %L, but got %L instead.",
                               name, (int64_t) min, (int64_t) max,
                               (int64_t) n);
        return NGX_ERROR;
    }

    *out = n;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_get_bool(ngx_http_request_t *r, json_t *root, const char *name,
    ngx_uint_t *out, ngx_http_llm_error_t *err)
{
    json_t  *v;

    v = json_object_get(root, name);

    if (v == NULL || json_is_null(v)) {
        return NGX_DECLINED;
    }

    if (!json_is_boolean(v)) {
        ngx_http_llm_type_error(r, err, name, "a boolean", v);
        return NGX_ERROR;
    }

    *out = json_is_true(v);

    return NGX_OK;
}


static void
ngx_http_llm_type_error(ngx_http_request_t *r, ngx_http_llm_error_t *err,
    const char *name, const char *expected, json_t *v)
{
    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_BAD_REQUEST,
                           NGX_HTTP_LLM_INVALID, name, "invalid_type",
                           "Invalid type for '%s': expected %s, but got "
                           "%s instead.", name, expected,
                           ngx_http_llm_type_name(v));
}


static const char *
ngx_http_llm_type_name(json_t *v)
{
    if (v == NULL) {
        return "nothing";
    }

    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a decimal";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}


/* ---- errors --------------------------------------------------------- */

void
ngx_http_llm_error_set(ngx_pool_t *pool, ngx_http_llm_error_t *err,
    ngx_uint_t status, const char *type, const char *param,
    const char *code, const char *fmt, ...)
{
    u_char   *p, buf[1024];
    va_list   args;

    va_start(args, fmt);
    p = ngx_vslprintf(buf, buf + sizeof(buf), fmt, args);
    va_end(args);

    err->status = status;
    err->type = type;
    err->param = param;
    err->code = code;

    err->message.data = ngx_pnalloc(pool, p - buf);

    if (err->message.data == NULL) {
        ngx_str_set(&err->message, "Out of memory.");
        return;
    }

    err->message.len = p - buf;
    ngx_memcpy(err->message.data, buf, p - buf);
}


json_t *
ngx_http_llm_error_json(ngx_http_llm_error_t *err)
{
    return json_pack("{s:{s:o, s:s, s:s?, s:s?}}", "error",
                     "message",
                     ngx_http_llm_json_text(err->message.data,
                                            err->message.len),
                     "type", err->type,
                     "param", err->param,
                     "code", err->code);
}


/* ---- responses ------------------------------------------------------ */

json_t *
ngx_http_llm_models_json(ngx_http_llm_main_conf_t *lmcf, ngx_uint_t one)
{
    json_t  *model;

    model = json_pack("{s:s%, s:s, s:I, s:s}",
                      "id", (char *) lmcf->model_name.data,
                      lmcf->model_name.len,
                      "object", "model",
                      "created", (json_int_t) ngx_time(),
                      "owned_by", "ngx_llm");

    if (one || model == NULL) {
        return model;
    }

    return json_pack("{s:s, s:[o]}", "object", "list", "data", model);
}


/*
 * One streaming chunk: role (the first one), text, or the finish reason
 * (the last one).  Chat: "delta"; completions: "text".
 */

json_t *
ngx_http_llm_chunk_json(ngx_http_llm_ctx_t *ctx, ngx_str_t *text,
    ngx_uint_t role, json_t *logprobs, const char *finish)
{
    json_t  *o, *choice, *delta;

    o = ngx_http_llm_object_head(ctx,
                 ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                 ? "chat.completion.chunk" : "text_completion");
    if (o == NULL) {
        json_decref(logprobs);
        return NULL;
    }

    if (ctx->params.endpoint == NGX_HTTP_LLM_CHAT) {

        if (role) {
            delta = json_pack("{s:s, s:s}", "role", "assistant",
                              "content", "");

        } else if (text) {
            delta = json_pack("{s:o}", "content",
                              ngx_http_llm_json_text(text->data, text->len));

        } else {
            delta = json_object();
        }

        choice = json_pack("{s:i, s:o, s:o, s:s?}",
                           "index", 0,
                           "delta", delta,
                           "logprobs", logprobs ? logprobs : json_null(),
                           "finish_reason", finish);

    } else {
        choice = json_pack("{s:i, s:o, s:o, s:s?}",
                           "index", 0,
                           "text", text ? ngx_http_llm_json_text(text->data,
                                                                 text->len)
                                        : json_string(""),
                           "logprobs", logprobs ? logprobs : json_null(),
                           "finish_reason", finish);
    }

    if (choice == NULL
        || json_object_set_new(o, "choices", json_pack("[o]", choice)) != 0)
    {
        json_decref(o);
        return NULL;
    }

    if (ctx->params.include_usage
        && json_object_set_new(o, "usage", json_null()) != 0)
    {
        json_decref(o);
        return NULL;
    }

    return o;
}


/* The last chunk of stream_options.include_usage: no choices, usage. */

json_t *
ngx_http_llm_usage_chunk_json(ngx_http_llm_ctx_t *ctx)
{
    json_t  *o;

    o = ngx_http_llm_object_head(ctx,
                 ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                 ? "chat.completion.chunk" : "text_completion");
    if (o == NULL) {
        return NULL;
    }

    if (json_object_set_new(o, "choices", json_array()) != 0
        || json_object_set_new(o, "usage", ngx_http_llm_usage_json(ctx)) != 0)
    {
        json_decref(o);
        return NULL;
    }

    return o;
}


/* The non-streaming response. */

json_t *
ngx_http_llm_response_json(ngx_http_llm_ctx_t *ctx)
{
    json_t  *o, *choice, *lp;

    o = ngx_http_llm_object_head(ctx,
                 ctx->params.endpoint == NGX_HTTP_LLM_CHAT
                 ? "chat.completion" : "text_completion");
    if (o == NULL) {
        return NULL;
    }

    lp = ctx->logprobs;
    ctx->logprobs = NULL;

    if (lp == NULL && ctx->params.logprobs) {
        lp = ngx_http_llm_logprobs_json(ctx, NULL, 0, NULL);
    }

    if (ctx->params.endpoint == NGX_HTTP_LLM_CHAT) {
        choice = json_pack("{s:i, s:{s:s, s:o}, s:o, s:s}",
                           "index", 0,
                           "message",
                               "role", "assistant",
                               "content",
                               ngx_http_llm_json_text(ctx->acc,
                                                      ctx->acc_len),
                           "logprobs", lp ? lp : json_null(),
                           "finish_reason", ctx->finish);

    } else {
        choice = json_pack("{s:o, s:i, s:o, s:s}",
                           "text", ngx_http_llm_json_text(ctx->acc,
                                                          ctx->acc_len),
                           "index", 0,
                           "logprobs", lp ? lp : json_null(),
                           "finish_reason", ctx->finish);
    }

    if (choice == NULL
        || json_object_set_new(o, "choices", json_pack("[o]", choice)) != 0
        || json_object_set_new(o, "usage", ngx_http_llm_usage_json(ctx)) != 0)
    {
        json_decref(o);
        return NULL;
    }

    return o;
}


/*
 * Appends token records to a logprobs object (creating it when into is
 * NULL).  Chat: {"content": [{"token", "logprob", "bytes",
 * "top_logprobs": [...]}]}; completions: {"tokens", "token_logprobs",
 * "top_logprobs", "text_offset"}.
 */

json_t *
ngx_http_llm_logprobs_json(ngx_http_llm_ctx_t *ctx, ngx_http_llm_token_t *toks,
    ngx_uint_t n, json_t *into)
{
    int                        len;
    char                       piece[512];
    json_t                    *o, *top, *e, *t;
    ngx_uint_t                 i, k;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(ctx->request, ngx_http_llm_module);

    o = into;

    if (o == NULL) {
        if (ctx->params.endpoint == NGX_HTTP_LLM_CHAT) {
            o = json_pack("{s:[]}", "content");

        } else {
            o = json_pack("{s:[], s:[], s:[], s:[]}", "tokens",
                          "token_logprobs", "top_logprobs", "text_offset");
        }

        if (o == NULL) {
            return NULL;
        }
    }

    for (i = 0; i < n; i++) {

        if (ctx->params.endpoint == NGX_HTTP_LLM_CHAT) {
            e = ngx_http_llm_token_json(ctx, toks[i].id, toks[i].logprob,
                                        toks[i].n_top, toks[i].top_ids,
                                        toks[i].top_logprobs);

            if (e == NULL
                || json_array_append_new(json_object_get(o, "content"), e)
                   != 0)
            {
                json_decref(o);
                return NULL;
            }

            continue;
        }

        top = json_object();

        for (k = 0; top && k < toks[i].n_top; k++) {
            len = llm_token_to_piece(lmcf->tokenizer, toks[i].top_ids[k], 1,
                                     piece, sizeof(piece) - 1);
            len = (len < 0 || len >= (int) sizeof(piece)) ? 0 : len;

            t = ngx_http_llm_json_text((u_char *) piece, len);

            if (t == NULL
                || json_object_set_new(top, json_string_value(t),
                       ngx_http_llm_json_logprob(toks[i].top_logprobs[k]))
                   != 0)
            {
                json_decref(t);
                json_decref(top);
                top = NULL;
                break;
            }

            json_decref(t);
        }

        len = llm_token_to_piece(lmcf->tokenizer, toks[i].id, 1, piece,
                                 sizeof(piece));
        len = (len < 0 || len > (int) sizeof(piece)) ? 0 : len;

        if (top == NULL
            || json_array_append_new(json_object_get(o, "tokens"),
                   ngx_http_llm_json_text((u_char *) piece, len)) != 0
            || json_array_append_new(json_object_get(o, "token_logprobs"),
                   ngx_http_llm_json_logprob(toks[i].logprob)) != 0
            || json_array_append_new(json_object_get(o, "top_logprobs"),
                                     top) != 0
            || json_array_append_new(json_object_get(o, "text_offset"),
                   json_integer((json_int_t) toks[i].start)) != 0)
        {
            json_decref(o);
            return NULL;
        }
    }

    return o;
}


static json_t *
ngx_http_llm_token_json(ngx_http_llm_ctx_t *ctx, int32_t id, float logprob,
    ngx_uint_t top, int32_t *top_ids, float *top_lps)
{
    int                        len;
    char                       piece[512];
    json_t                    *e, *list;
    ngx_uint_t                 k;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(ctx->request, ngx_http_llm_module);

    len = llm_token_to_piece(lmcf->tokenizer, id, 1, piece, sizeof(piece));
    len = (len < 0 || len > (int) sizeof(piece)) ? 0 : len;

    list = NULL;

    if (top_ids) {
        list = json_array();

        for (k = 0; list && k < ngx_min(top, ctx->params.top_logprobs); k++) {
            e = ngx_http_llm_token_json(ctx, top_ids[k], top_lps[k], 0,
                                        NULL, NULL);

            if (e == NULL || json_array_append_new(list, e) != 0) {
                json_decref(list);
                return NULL;
            }
        }

        if (list == NULL) {
            return NULL;
        }
    }

    return json_pack("{s:o, s:o, s:o, s:o*}",
                     "token", ngx_http_llm_json_text((u_char *) piece, len),
                     "logprob", ngx_http_llm_json_logprob(logprob),
                     "bytes", ngx_http_llm_json_bytes((u_char *) piece, len),
                     "top_logprobs", list);
}


static json_t *
ngx_http_llm_object_head(ngx_http_llm_ctx_t *ctx, const char *object)
{
    ngx_str_t                 *fp;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(ctx->request, ngx_http_llm_module);

    /* llm_system_fingerprint, or the engine's that took the request */

    fp = lmcf->fingerprint.len ? &lmcf->fingerprint
                               : &ctx->stream.fingerprint;

    return json_pack("{s:s%, s:s, s:I, s:s%, s:s%}",
                     "id", (char *) ctx->id.data, ctx->id.len,
                     "object", object,
                     "created", (json_int_t) ctx->created,
                     "model", (char *) ctx->params.model.data,
                     ctx->params.model.len,
                     "system_fingerprint",
                     fp->data ? (char *) fp->data : "", fp->len);
}


static json_t *
ngx_http_llm_usage_json(ngx_http_llm_ctx_t *ctx)
{
    return json_pack("{s:I, s:I, s:I, s:{s:I}}",
                     "prompt_tokens", (json_int_t) ctx->prompt_tokens,
                     "completion_tokens",
                     (json_int_t) ctx->completion_tokens,
                     "total_tokens",
                     (json_int_t) (ctx->prompt_tokens
                                   + ctx->completion_tokens),
                     "prompt_tokens_details",
                         "cached_tokens", (json_int_t) ctx->cached_tokens);
}


/* A JSON string of text that should be UTF-8; invalid bytes become
 * U+FFFD rather than failing the response. */

json_t *
ngx_http_llm_json_text(u_char *p, size_t len)
{
    u_char    *s, *q, *d, *copy, *last;
    json_t    *j;
    uint32_t   c;

    j = json_stringn((const char *) (p ? p : (u_char *) ""), len);
    if (j) {
        return j;
    }

    copy = ngx_alloc(len * 3 + 1, ngx_cycle->log);
    if (copy == NULL) {
        return NULL;
    }

    s = p;
    last = p + len;
    d = copy;

    while (s < last) {
        if (*s < 0x80) {
            *d++ = *s++;
            continue;
        }

        q = s;
        c = ngx_utf8_decode(&q, last - s);

        if (c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) {
            *d++ = 0xef; *d++ = 0xbf; *d++ = 0xbd;      /* U+FFFD */
            s++;
            continue;
        }

        d = ngx_cpymem(d, s, q - s);
        s = q;
    }

    j = json_stringn((const char *) copy, d - copy);
    ngx_free(copy);

    return j;
}


static json_t *
ngx_http_llm_json_bytes(u_char *p, size_t len)
{
    json_t  *a;
    size_t   i;

    a = json_array();

    for (i = 0; a && i < len; i++) {
        if (json_array_append_new(a, json_integer(p[i])) != 0) {
            json_decref(a);
            return NULL;
        }
    }

    return a;
}


static json_t *
ngx_http_llm_json_logprob(float lp)
{
    /* JSON has no -Infinity; OpenAI reports -9999 for such tokens */

    return json_real(isfinite(lp) ? (double) lp : -9999.0);
}


/*
 * Serializes json (consumed) into a buffer: "data: {...}\n\n" for SSE,
 * the bare object otherwise.  Reuses a free buffer when one is large
 * enough.
 */

ngx_buf_t *
ngx_http_llm_json_buf(ngx_pool_t *pool, ngx_chain_t **free, json_t *json,
    ngx_uint_t sse)
{
    size_t        size, n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl, **ll;

    if (json == NULL) {
        return NULL;
    }

    n = json_dumpb(json, NULL, 0, JSON_COMPACT | JSON_REAL_PRECISION(9));
    if (n == 0) {
        json_decref(json);
        return NULL;
    }

    size = n + (sse ? sizeof("data: \n\n") - 1 : 0);

    b = NULL;

    for (ll = free; free && *ll; ll = &(*ll)->next) {
        cl = *ll;

        if ((size_t) (cl->buf->end - cl->buf->start) >= size) {
            *ll = cl->next;
            b = cl->buf;
            b->pos = b->start;
            b->last = b->start;
            b->flush = 0;
            b->last_buf = 0;
            break;
        }
    }

    if (b == NULL) {
        b = ngx_create_temp_buf(pool, ngx_max(size, 512));
        if (b == NULL) {
            json_decref(json);
            return NULL;
        }

        b->tag = (ngx_buf_tag_t) &ngx_http_llm_module;
    }

    if (sse) {
        b->last = ngx_cpymem(b->last, "data: ", sizeof("data: ") - 1);
    }

    b->last += json_dumpb(json, (char *) b->last, n,
                          JSON_COMPACT | JSON_REAL_PRECISION(9));

    if (sse) {
        *b->last++ = '\n';
        *b->last++ = '\n';
    }

    json_decref(json);

    return b;
}
