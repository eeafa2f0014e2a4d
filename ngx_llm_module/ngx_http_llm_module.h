
/*
 * ngx_http_llm_module: an OpenAI-compatible API served by NGINX workers,
 * backed by the llm-engine daemon.
 *
 * The types shared by the module's files:
 *
 *   ngx_http_llm_module.c     directives, configuration, process hooks
 *   ngx_http_llm_handler.c    routing, body, request lifecycle, output
 *   ngx_http_llm_openai.c     request JSON, response / SSE / error JSON
 *   ngx_http_llm_text.c       stop strings, held-back text, logprob tokens
 *   ngx_http_llm_engine.c     the per-worker client of llm-engine
 *   ngx_http_llm_variables.c  $llm_* variables for access logs
 *
 * The workers do all text work (chat template, tokenization, incremental
 * detokenization, stop strings); the engine sees token ids only.
 */


#ifndef _NGX_HTTP_LLM_MODULE_H_INCLUDED_
#define _NGX_HTTP_LLM_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <jansson.h>

#include "engine/common.h"
#include "engine/protocol.h"
#include "engine/tokenizer.h"
#include "engine/chat_template.h"


#define NGX_HTTP_LLM_MAX_STOP        4       /* stop strings, as OpenAI */
#define NGX_HTTP_LLM_MAX_STOP_LEN    256     /* bytes of one stop string */


/* ---- configuration -------------------------------------------------- */

typedef struct {
    ngx_addr_t                    *addrs;
    ngx_uint_t                     naddrs;
    ngx_str_t                      name;        /* as configured */
} ngx_http_llm_engine_addr_t;


typedef struct {
    ngx_array_t                   *engines;     /* ngx_http_llm_engine_addr_t */
    ngx_str_t                      model_name;
    ngx_str_t                      model_path;

    llm_tokenizer                 *tokenizer;
    const char                    *chat_template;   /* NULL: none */
    int                            chat_kind;
    ngx_str_t                      bos_text;        /* "" if no BOS */
    size_t                         detok_cap;   /* room llm_detok_push
                                                   needs for one token */

    ngx_msec_t                     connect_timeout;
    ngx_msec_t                     engine_timeout;
    ngx_str_t                      fingerprint;     /* "" = engine's */

    ngx_uint_t                     enabled;     /* some llm_api */
} ngx_http_llm_main_conf_t;


typedef struct {
    ngx_uint_t                     api;         /* NGX_HTTP_LLM_API_* */
    size_t                         max_body;
    ngx_uint_t                     max_tokens_default;
    ngx_http_core_loc_conf_t      *clcf;
} ngx_http_llm_loc_conf_t;


#define NGX_HTTP_LLM_API_OFF         0
#define NGX_HTTP_LLM_API_OPENAI      1


/* ---- errors --------------------------------------------------------- */

/* An OpenAI-shaped error: {"error": {"message", "type", "param",
 * "code"}} with its HTTP status.  param and code may be NULL. */
typedef struct {
    ngx_uint_t                     status;
    const char                    *type;
    const char                    *param;
    const char                    *code;
    ngx_str_t                      message;
} ngx_http_llm_error_t;


/* ---- the engine client ---------------------------------------------- */

/* Why a stream ended without a DONE. */
typedef enum {
    NGX_HTTP_LLM_FAIL_UNAVAILABLE = 1,  /* no engine, or connection lost */
    NGX_HTTP_LLM_FAIL_TIMEOUT,          /* no frame for engine_timeout */
    NGX_HTTP_LLM_FAIL_CONTEXT,          /* prompt + max_tokens > n_ctx */
    NGX_HTTP_LLM_FAIL_OVERLOADED,
    NGX_HTTP_LLM_FAIL_BAD_REQUEST,
    NGX_HTTP_LLM_FAIL_NOT_FOUND,
    NGX_HTTP_LLM_FAIL_INTERNAL
} ngx_http_llm_fail_e;


typedef struct ngx_http_llm_stream_s  ngx_http_llm_stream_t;

typedef void (*ngx_http_llm_tokens_pt)(ngx_http_llm_stream_t *s,
    llm_proto_tokens *t);
typedef void (*ngx_http_llm_done_pt)(ngx_http_llm_stream_t *s,
    const llm_proto_done *d);
typedef void (*ngx_http_llm_fail_pt)(ngx_http_llm_stream_t *s,
    ngx_http_llm_fail_e reason, const char *message);


/*
 * One sequence in the engine, owned by its request (allocated from the
 * request pool).  The engine client calls exactly one of done() or
 * fail() unless the owner cancels first; after either call, and after
 * ngx_http_llm_engine_cancel(), the client no longer touches it.
 */
struct ngx_http_llm_stream_s {
    ngx_rbtree_node_t              node;        /* key: request id */
    ngx_queue_t                    queue;       /* waiting for an engine */
    void                          *peer;        /* NULL: not submitted */
    ngx_event_t                    timer;

    llm_proto_submit               submit;      /* sampling, prompt */
    int32_t                       *prompt;      /* [n_prompt] */
    ngx_uint_t                     n_prompt;
    ngx_uint_t                     max_tokens;  /* 0: up to n_ctx */
    ngx_uint_t                     n_ctx;       /* of the chosen engine */
    ngx_str_t                      fingerprint; /* of the chosen engine */
    ngx_uint_t                     tries;

    ngx_log_t                     *log;
    void                          *data;
    ngx_http_llm_tokens_pt         tokens;
    ngx_http_llm_done_pt           done;
    ngx_http_llm_fail_pt           fail;

    unsigned                       waiting:1;
    unsigned                       got_tokens:1;
    unsigned                       stopping:1;
};


ngx_int_t ngx_http_llm_engine_init_process(ngx_cycle_t *cycle,
    ngx_http_llm_main_conf_t *lmcf);
void ngx_http_llm_engine_exit_process(ngx_cycle_t *cycle);
ngx_int_t ngx_http_llm_engine_submit(ngx_http_llm_stream_t *s);
void ngx_http_llm_engine_cancel(ngx_http_llm_stream_t *s);
void ngx_http_llm_engine_stop(ngx_http_llm_stream_t *s);
ngx_uint_t ngx_http_llm_engine_n_ctx(void);


/* ---- request parameters --------------------------------------------- */

#define NGX_HTTP_LLM_CHAT            1
#define NGX_HTTP_LLM_COMPLETIONS     2
#define NGX_HTTP_LLM_MODELS          3
#define NGX_HTTP_LLM_MODEL           4      /* GET /v1/models/{id} */


typedef struct {
    ngx_uint_t                     endpoint;
    ngx_str_t                      model;

    ngx_str_t                      prompt;      /* rendered text */
    int32_t                       *prompt_ids;  /* given as token ids */
    ngx_uint_t                     n_prompt_ids;
    ngx_uint_t                     parse_special;

    ngx_int_t                      max_tokens;  /* -1: not given */
    float                          temperature;
    float                          top_p;
    float                          presence_penalty;
    float                          frequency_penalty;
    uint64_t                       seed;

    ngx_str_t                      stop[NGX_HTTP_LLM_MAX_STOP];
    ngx_uint_t                     n_stop;

    ngx_uint_t                     top_logprobs;
    ngx_str_t                      user;

    unsigned                       has_seed:1;
    unsigned                       stream:1;
    unsigned                       include_usage:1;
    unsigned                       logprobs:1;
    unsigned                       echo:1;
} ngx_http_llm_params_t;


/* ---- text: stop strings and token records --------------------------- */

typedef struct {
    int32_t                        id;
    float                          logprob;
    size_t                         start;       /* its text in the output */
    size_t                         end;
    ngx_uint_t                     n_top;
    int32_t                        top_ids[LLM_PROTO_MAX_TOP];
    float                          top_logprobs[LLM_PROTO_MAX_TOP];
} ngx_http_llm_token_t;


typedef struct {
    ngx_pool_t                    *pool;
    ngx_str_t                     *stops;
    ngx_uint_t                     n_stops;
    size_t                         max_stop;

    u_char                        *hold;        /* text not yet released */
    size_t                         len;
    size_t                         size;
    size_t                         consumed;    /* released, to drop */
    size_t                         offset;      /* output offset of hold */

    ngx_array_t                    tokens;      /* ngx_http_llm_token_t */
    ngx_uint_t                     tok_head;    /* first not released */
    ngx_uint_t                     tok_consumed;

    unsigned                       stopped:1;
} ngx_http_llm_text_t;


ngx_int_t ngx_http_llm_text_init(ngx_http_llm_text_t *t, ngx_pool_t *pool,
    ngx_str_t *stops, ngx_uint_t n_stops, ngx_uint_t logprobs);
ngx_int_t ngx_http_llm_text_add(ngx_http_llm_text_t *t, u_char *data,
    size_t len, ngx_http_llm_token_t *tok);
void ngx_http_llm_text_release(ngx_http_llm_text_t *t, ngx_uint_t last,
    ngx_str_t *out, ngx_http_llm_token_t **toks, ngx_uint_t *ntoks);


/* ---- the request context -------------------------------------------- */

typedef struct {
    ngx_http_request_t            *request;
    ngx_http_llm_params_t          params;
    ngx_http_llm_stream_t          stream;
    ngx_http_llm_text_t            text;
    llm_detok                      detok;
    u_char                        *scratch;     /* [detok_cap] */

    u_char                        *acc;         /* non-streaming text */
    size_t                         acc_len;
    size_t                         acc_size;
    json_t                        *logprobs;    /* non-streaming entries */

    ngx_chain_t                   *free;
    ngx_chain_t                   *busy;

    off_t                          received;    /* body bytes */

    ngx_str_t                      id;
    time_t                         created;
    ngx_msec_t                     start;
    ngx_msec_t                     ttft;        /* ms after start */

    ngx_uint_t                     prompt_tokens;
    ngx_uint_t                     completion_tokens;
    ngx_uint_t                     cached_tokens;
    const char                    *finish;      /* "stop", "length", ... */

    unsigned                       header_sent:1;
    unsigned                       first_token:1;
    unsigned                       submitted:1;
    unsigned                       finished:1;
} ngx_http_llm_ctx_t;


/* ---- across files --------------------------------------------------- */

ngx_int_t ngx_http_llm_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_llm_request_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
ngx_int_t ngx_http_llm_add_variables(ngx_conf_t *cf);

ngx_int_t ngx_http_llm_parse_request(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, ngx_http_llm_loc_conf_t *llcf,
    u_char *body, size_t len, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err);
void ngx_http_llm_error_set(ngx_pool_t *pool, ngx_http_llm_error_t *err,
    ngx_uint_t status, const char *type, const char *param,
    const char *code, const char *fmt, ...);
json_t *ngx_http_llm_error_json(ngx_http_llm_error_t *err);
json_t *ngx_http_llm_models_json(ngx_http_llm_main_conf_t *lmcf,
    ngx_uint_t one);
json_t *ngx_http_llm_chunk_json(ngx_http_llm_ctx_t *ctx, ngx_str_t *text,
    ngx_uint_t role, json_t *logprobs, const char *finish);
json_t *ngx_http_llm_usage_chunk_json(ngx_http_llm_ctx_t *ctx);
json_t *ngx_http_llm_response_json(ngx_http_llm_ctx_t *ctx);
json_t *ngx_http_llm_logprobs_json(ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_token_t *toks, ngx_uint_t n, json_t *into);
ngx_buf_t *ngx_http_llm_json_buf(ngx_pool_t *pool, ngx_chain_t **free,
    json_t *json, ngx_uint_t sse);


extern ngx_module_t  ngx_http_llm_module;


#endif /* _NGX_HTTP_LLM_MODULE_H_INCLUDED_ */
