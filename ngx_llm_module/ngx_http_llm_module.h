
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
 *   ngx_http_llm_tenants.c    tenant directory (JSON file, Redis), API keys
 *   ngx_http_llm_limits.c     per-tenant limits: shared zone and Redis
 *   ngx_http_llm_redis.c      hiredis async adapter for the event loop
 *   ngx_http_llm_metrics.c    counters zone and the /metrics handler
 *   ngx_http_llm_adapters.c   adapter names, /v1/models, the admin API
 *   ngx_http_llm_cache.c      prompt cache (Redis), shared prefix namespace
 *   ngx_http_llm_zone.c       shared zones of per-tenant records
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
#include "engine/sha256.h"


#define NGX_HTTP_LLM_MAX_STOP        4       /* stop strings, as OpenAI */
#define NGX_HTTP_LLM_MAX_STOP_LEN    256     /* bytes of one stop string */


/* ---- tenants, limits, Redis, metrics: types --------------------------- */

/* A tenant's class: SUBMIT's priority byte. */
#define NGX_HTTP_LLM_PRIORITY_INTERACTIVE  LLM_PROTO_CLASS_INTERACTIVE
#define NGX_HTTP_LLM_PRIORITY_STANDARD     LLM_PROTO_CLASS_STANDARD
#define NGX_HTTP_LLM_PRIORITY_BATCH        LLM_PROTO_CLASS_BATCH


typedef struct {
    ngx_uint_t                     requests_per_minute;    /* 0: none */
    ngx_uint_t                     tokens_per_minute;
    ngx_uint_t                     max_concurrent;
    ngx_uint_t                     max_queued;
} ngx_http_llm_limits_t;


typedef struct {
    ngx_str_t                      name;
    ngx_uint_t                     priority;    /* NGX_HTTP_LLM_PRIORITY_* */
    ngx_uint_t                     weight;      /* fair share, 1..65535 */
    ngx_str_t                     *adapters;    /* [n_adapters] allowed */
    ngx_uint_t                     n_adapters;
    ngx_uint_t                     all_adapters;    /* "adapters": ["*"]:
                                                       any the engines
                                                       serve */
    ngx_str_t                      default_adapter;     /* "" none */
    ngx_str_t                      cache_namespace;
    ngx_str_t                      shared_cache_namespace;  /* "": none */
    ngx_uint_t                     prompt_cache;    /* NGX_HTTP_LLM_TPC_* */
    ngx_uint_t                     max_tokens;  /* ceiling; 0: none */
    ngx_http_llm_limits_t          limits;
    unsigned                       disabled:1;
    unsigned                       shared_set:1;    /* the field was given:
                                                       it wins over the
                                                       location */
} ngx_http_llm_tenant_t;


/* A tenant's "prompt_cache" (zeroed: the location decides). */
#define NGX_HTTP_LLM_TPC_LOCATION    0
#define NGX_HTTP_LLM_TPC_OFF         1
#define NGX_HTTP_LLM_TPC_ON          2


typedef struct ngx_http_llm_directory_s  ngx_http_llm_directory_t;


typedef struct {
    ngx_str_t                      name;        /* as configured */
    ngx_str_t                      host;        /* numeric, NUL-ended */
    int                            port;        /* 0: unix socket */
    ngx_str_t                      path;        /* unix, NUL-ended */
    ngx_uint_t                     db;
    ngx_str_t                      password;
    ngx_str_t                      prefix;      /* of every key */
    ngx_msec_t                     connect_timeout;
    ngx_msec_t                     timeout;     /* of one command */
} ngx_http_llm_redis_conf_t;


#define NGX_HTTP_LLM_LIMITS_OFF      0
#define NGX_HTTP_LLM_LIMITS_LOCAL    1
#define NGX_HTTP_LLM_LIMITS_REDIS    2

#define NGX_HTTP_LLM_FAIL_OPEN       1
#define NGX_HTTP_LLM_FAIL_CLOSED     2
#define NGX_HTTP_LLM_FAIL_LOCAL      3


typedef struct {
    ngx_uint_t                     mode;        /* NGX_HTTP_LLM_LIMITS_* */
    ngx_uint_t                     fail;        /* NGX_HTTP_LLM_FAIL_* */
    ngx_uint_t                     hosts;
    size_t                         zone_size;
    ngx_msec_t                     queue_timeout;
    ngx_msec_t                     lease;
    ngx_shm_zone_t                *shm_zone;
} ngx_http_llm_limits_conf_t;


/* Why a request was refused before the engine ($llm_reject, metrics). */
#define NGX_HTTP_LLM_REJECT_NONE          0
#define NGX_HTTP_LLM_REJECT_KEY           1     /* 401 */
#define NGX_HTTP_LLM_REJECT_FORBIDDEN     2     /* 403 */
#define NGX_HTTP_LLM_REJECT_MODEL         3     /* 404: adapter */
#define NGX_HTTP_LLM_REJECT_REQUESTS      4     /* 429 */
#define NGX_HTTP_LLM_REJECT_TOKENS        5
#define NGX_HTTP_LLM_REJECT_CONCURRENCY   6
#define NGX_HTTP_LLM_REJECT_UNAVAILABLE   7     /* 503: limiter, directory */
#define NGX_HTTP_LLM_REJECT_N             8


/* Inter-token latency of one request, flushed to the zone at its end. */
#define NGX_HTTP_LLM_ITL_BUCKETS     12

typedef struct {
    uint32_t                       bucket[NGX_HTTP_LLM_ITL_BUCKETS];
    uint64_t                       sum;         /* ms */
    uint32_t                       count;
} ngx_http_llm_itl_t;


/* A request's admission by the limiter. */
#define NGX_HTTP_LLM_ADMIT_NONE      0
#define NGX_HTTP_LLM_ADMIT_LOCAL     1      /* counted in the zone */
#define NGX_HTTP_LLM_ADMIT_REDIS     2      /* counted in Redis */

typedef struct {
    ngx_uint_t                     where;       /* NGX_HTTP_LLM_ADMIT_* */
    ngx_uint_t                     reserved;    /* prompt + completion */
    ngx_uint_t                     tokens_per_minute;
    ngx_str_t                      member;      /* Redis concurrency slot */
    ngx_queue_t                    lease;       /* slots this worker renews */
    ngx_msec_t                     renewed;     /* the slot's last lease */
    ngx_uint_t                     renew_tick;
    ngx_event_t                    wait;        /* queued for a slot */
    ngx_queue_t                    queue;       /* this worker's waiters */
    uint64_t                       ticket;      /* place in the host's line */
    ngx_msec_t                     deadline;
    void                          *op;          /* pending Redis call */
    unsigned                       queued:1;
    unsigned                       held:1;      /* in the lease list */
    unsigned                       done:1;      /* admitted or refused */
} ngx_http_llm_admit_t;


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

    ngx_http_llm_directory_t      *directory;   /* llm_tenants FILE */
    ngx_flag_t                     tenants_redis;
    ngx_msec_t                     tenants_cache_time;
    ngx_uint_t                     auth;        /* a directory is set */
    ngx_http_llm_redis_conf_t     *redis;       /* llm_redis */
    ngx_http_llm_limits_conf_t     limits;
    size_t                         metrics_zone_size;
    ngx_shm_zone_t                *metrics_zone;
    ngx_uint_t                     metrics;     /* some llm_metrics */
} ngx_http_llm_main_conf_t;


typedef struct {
    ngx_uint_t                     api;         /* NGX_HTTP_LLM_API_* */
    size_t                         max_body;
    ngx_uint_t                     max_tokens_default;
    ngx_http_core_loc_conf_t      *clcf;
    ngx_http_complex_value_t      *tenant_var;  /* llm_tenant_variable */

    ngx_flag_t                     prompt_cache;
    time_t                         prompt_cache_ttl;
    ngx_flag_t                     prompt_cache_charge;
    ngx_str_t                      shared_namespace;    /* "": off */
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
ngx_int_t ngx_http_llm_engine_model_fingerprint(u_char *fp);


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
    int32_t                        top_k;       /* 0: off */
    float                          min_p;       /* 0: off */
    float                          repetition_penalty;  /* 1: off */
    uint64_t                       seed;

    ngx_str_t                      stop[NGX_HTTP_LLM_MAX_STOP];
    ngx_uint_t                     n_stop;

    ngx_uint_t                     top_logprobs;
    ngx_str_t                      user;
    ngx_str_t                      adapter;     /* of "model"; "" none */

    size_t                         shared_len;  /* bytes of prompt that
                                                   render the leading
                                                   system messages */

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


/* ---- the prompt cache of one request --------------------------------- */

#define NGX_HTTP_LLM_PCACHE_UNKNOWN  0      /* not decided yet */
#define NGX_HTTP_LLM_PCACHE_OFF      1      /* does not apply: no header */
#define NGX_HTTP_LLM_PCACHE_LOOKUP   2      /* GET or adapter list awaited */
#define NGX_HTTP_LLM_PCACHE_MISS     3      /* answer live, then store */
#define NGX_HTTP_LLM_PCACHE_HIT      4      /* answer from the record */

typedef struct {
    ngx_uint_t                     state;       /* NGX_HTTP_LLM_PCACHE_* */
    void                          *op;          /* pending GET */
    u_char                         norm[LLM_SHA256_LEN];    /* of the
                                                   normalized request */
    u_char                         key[LLM_SHA256_LEN];     /* the entry */
    json_t                        *record;      /* a hit's stored answer */
    ngx_table_elt_t               *header;      /* X-LLM-Cache */

    u_char                        *text;        /* a miss: the answer's */
    size_t                         len;         /* text, to store */
    size_t                         size;
    json_t                        *logprobs;

    unsigned                       wanted:1;    /* on, deterministic */
    unsigned                       asked:1;     /* adapter list awaited */
    unsigned                       charged:1;   /* a hit counts tokens */
    unsigned                       stored:1;    /* a miss was SET */
} ngx_http_llm_pcache_t;


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

    u_char                        *body;        /* the request body */
    size_t                         body_len;
    ngx_http_llm_tenant_t         *tenant;      /* NULL: no directory */
    void                          *lookup;      /* pending Redis lookup */
    ngx_http_llm_admit_t           admit;
    ngx_uint_t                     reject;      /* NGX_HTTP_LLM_REJECT_* */
    ngx_uint_t                     queue_ms;    /* in the engine's queue */
    ngx_msec_t                     last_token;
    ngx_http_llm_itl_t             itl;

    ngx_uint_t                     shared_tokens;   /* SUBMIT's
                                                       cache_shared_tokens */
    ngx_http_llm_pcache_t          pcache;

    unsigned                       header_sent:1;
    unsigned                       first_token:1;
    unsigned                       submitted:1;
    unsigned                       finished:1;
    unsigned                       prepared:1;  /* tokenized, checked */
    unsigned                       got_done:1;  /* queue_ms is known */
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
json_t *ngx_http_llm_json_text(u_char *p, size_t len);
ngx_buf_t *ngx_http_llm_json_buf(ngx_pool_t *pool, ngx_chain_t **free,
    json_t *json, ngx_uint_t sse);

void ngx_http_llm_continue(ngx_http_request_t *r);
ngx_int_t ngx_http_llm_send_error(ngx_http_request_t *r,
    ngx_http_llm_error_t *err);
ngx_str_t *ngx_http_llm_log_text(ngx_pool_t *pool, ngx_str_t *text);
ngx_int_t ngx_http_llm_send_json(ngx_http_request_t *r, ngx_uint_t status,
    json_t *json);
ngx_int_t ngx_http_llm_send_buf(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, ngx_buf_t *b);
void ngx_http_llm_add_header(ngx_http_request_t *r, const char *key,
    ngx_str_t *value);


/* ---- tenants: ngx_http_llm_tenants.c -------------------------------- */

char *ngx_http_llm_tenants_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_llm_tenants_init_process(ngx_cycle_t *cycle,
    ngx_http_llm_main_conf_t *lmcf);
void ngx_http_llm_tenants_exit_process(ngx_cycle_t *cycle);
ngx_int_t ngx_http_llm_tenant_identify(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err);
ngx_int_t ngx_http_llm_tenant_model(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err);
void ngx_http_llm_tenant_cleanup(ngx_http_llm_ctx_t *ctx);
ngx_int_t ngx_http_llm_tenant_parse(json_t *o, ngx_pool_t *pool,
    ngx_http_llm_tenant_t *defaults, ngx_http_llm_tenant_t *t,
    u_char *errbuf, size_t errlen);
ngx_http_llm_tenant_t *ngx_http_llm_tenants_prompt_cache(
    ngx_http_llm_main_conf_t *lmcf);


/* ---- limits: ngx_http_llm_limits.c ---------------------------------- */

ngx_int_t ngx_http_llm_limits_postconfiguration(ngx_conf_t *cf,
    ngx_http_llm_main_conf_t *lmcf);
ngx_int_t ngx_http_llm_limits_acquire(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err);
void ngx_http_llm_limits_release(ngx_http_llm_ctx_t *ctx);
void ngx_http_llm_limits_exit_process(ngx_cycle_t *cycle);
u_char *ngx_http_llm_duration(u_char *p, ngx_msec_t ms);


/* ---- Redis: ngx_http_llm_redis.c ------------------------------------ */

/* A command's reply (a redisReply *), or NULL: Redis failed or left. */
typedef void (*ngx_http_llm_redis_handler_pt)(void *data, void *reply);

typedef struct {
    const char                    *text;
    u_char                         sha1[41];    /* hex, NUL-ended */
} ngx_http_llm_redis_script_t;

char *ngx_http_llm_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
ngx_int_t ngx_http_llm_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_llm_main_conf_t *lmcf);
void ngx_http_llm_redis_exit_process(ngx_cycle_t *cycle);
ngx_int_t ngx_http_llm_redis_command(ngx_http_llm_redis_handler_pt handler,
    void *data, int argc, const char **argv, const size_t *argvlen);
ngx_int_t ngx_http_llm_redis_eval(ngx_http_llm_redis_script_t *script,
    ngx_http_llm_redis_handler_pt handler, void *data, int argc,
    const char **argv, const size_t *argvlen);
void ngx_http_llm_redis_script_init(ngx_http_llm_redis_script_t *script);


/* ---- shared zones of per-tenant records: ngx_http_llm_zone.c --------- */

typedef struct {
    ngx_rbtree_t                   rbtree;
    ngx_rbtree_node_t              sentinel;
    ngx_queue_t                    queue;       /* LRU */
} ngx_http_llm_zone_sh_t;

typedef struct ngx_http_llm_zone_s  ngx_http_llm_zone_t;

/* A new record, zeroed: set what zero does not. */
typedef void (*ngx_http_llm_zone_init_pt)(void *value);

/* May the record go?  NGX_OK: yes; NGX_DECLINED: in use; NGX_DONE: no,
 * nor any more recent one (force: the zone is full). */
typedef ngx_int_t (*ngx_http_llm_zone_expire_pt)(ngx_http_llm_zone_t *z,
    void *value, ngx_uint_t force);

struct ngx_http_llm_zone_s {
    ngx_http_llm_zone_sh_t        *sh;
    ngx_slab_pool_t               *shpool;      /* its mutex guards all */
    size_t                         value_size;
    ngx_http_llm_zone_init_pt      init;
    ngx_http_llm_zone_expire_pt    expire;
};

ngx_shm_zone_t *ngx_http_llm_zone_add(ngx_conf_t *cf, char *name,
    size_t size, size_t value_size, ngx_http_llm_zone_init_pt init,
    ngx_http_llm_zone_expire_pt expire);
void *ngx_http_llm_zone_lookup(ngx_http_llm_zone_t *z, ngx_str_t *name,
    ngx_uint_t create);
void ngx_http_llm_zone_expire(ngx_http_llm_zone_t *z, ngx_uint_t force);
void *ngx_http_llm_zone_next(ngx_http_llm_zone_t *z, ngx_queue_t **q,
    ngx_str_t *name);


/* ---- metrics: ngx_http_llm_metrics.c -------------------------------- */

char *ngx_http_llm_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
ngx_int_t ngx_http_llm_metrics_postconfiguration(ngx_conf_t *cf,
    ngx_http_llm_main_conf_t *lmcf);
void ngx_http_llm_metrics_token(ngx_http_llm_ctx_t *ctx, ngx_uint_t n);

/* prompt cache events, counted per tenant ("-": none) at once */
#define NGX_HTTP_LLM_PCACHE_EV_HIT     0
#define NGX_HTTP_LLM_PCACHE_EV_MISS    1
#define NGX_HTTP_LLM_PCACHE_EV_STORE   2
#define NGX_HTTP_LLM_PCACHE_EV_ERROR   3
#define NGX_HTTP_LLM_PCACHE_EV_N       4

void ngx_http_llm_metrics_pcache(ngx_str_t *tenant, ngx_uint_t event);


/* ---- engine statistics (ngx_http_llm_engine.c) for /metrics ---------- */

typedef struct ngx_http_llm_stats_wait_s  ngx_http_llm_stats_wait_t;

struct ngx_http_llm_stats_wait_s {
    ngx_queue_t                    queue;
    ngx_event_t                    timer;
    ngx_uint_t                     pending;     /* STATS still expected */
    void                         (*handler)(ngx_http_llm_stats_wait_t *w);
    void                          *data;
    unsigned                       waiting:1;
};

typedef struct {
    ngx_str_t                      name;
    ngx_uint_t                     up;          /* past HELLO */
    ngx_uint_t                     fresh;       /* stats answered now */
    llm_proto_stats                stats;
} ngx_http_llm_engine_stats_t;

ngx_int_t ngx_http_llm_engine_stats_request(ngx_http_llm_stats_wait_t *w,
    ngx_msec_t timeout);
void ngx_http_llm_engine_stats_cancel(ngx_http_llm_stats_wait_t *w);
ngx_uint_t ngx_http_llm_engine_stats_get(ngx_http_llm_engine_stats_t *out,
    ngx_uint_t max);


/* ---- control requests to the engines (ngx_http_llm_engine.c) --------- */

/*
 * A request that is not a sequence (adapter load, unload, list) sent to
 * one engine; handler() gets its answer frame (valid during the call
 * only), or NULL if the engine went away first.  After handler() or
 * ngx_http_llm_engine_ctl_cancel() the client no longer touches it.
 */

typedef struct ngx_http_llm_ctl_s  ngx_http_llm_ctl_t;

typedef void (*ngx_http_llm_ctl_pt)(ngx_http_llm_ctl_t *ctl,
    llm_proto_frame *f);

struct ngx_http_llm_ctl_s {
    ngx_queue_t                    queue;       /* in its engine's list */
    void                          *peer;        /* NULL: not pending */
    uint32_t                       id;
    ngx_uint_t                     engine;      /* index */
    ngx_http_llm_ctl_pt            handler;
    void                          *data;
};

/* Engines of this worker (every address of every llm_engine). */
ngx_uint_t ngx_http_llm_engine_count(void);
ngx_str_t *ngx_http_llm_engine_name(ngx_uint_t i);
/* Sends a frame of type with that payload to engine i: NGX_OK,
 * NGX_DECLINED (engine i is not ready), NGX_ERROR. */
ngx_int_t ngx_http_llm_engine_ctl_send(ngx_http_llm_ctl_t *ctl, ngx_uint_t i,
    int type, const u_char *payload, size_t len);
void ngx_http_llm_engine_ctl_cancel(ngx_http_llm_ctl_t *ctl);


/* ---- adapters: ngx_http_llm_adapters.c ------------------------------- */

ngx_int_t ngx_http_llm_adapter_model(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err);
void ngx_http_llm_adapter_not_found(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, const char *message, ngx_http_llm_error_t *err);
ngx_int_t ngx_http_llm_adapters_models(ngx_http_request_t *r,
    ngx_uint_t endpoint, ngx_str_t *id);
ngx_int_t ngx_http_llm_adapter_version(ngx_http_request_t *r,
    ngx_str_t *name, ngx_uint_t refresh, void (*ready)(ngx_http_request_t *r),
    ngx_str_t *version);


/* ---- prompt cache, shared prefix: ngx_http_llm_cache.c --------------- */

char *ngx_http_llm_shared_namespace_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_llm_prompt_cache_ttl_check(ngx_conf_t *cf, void *post,
    void *data);
ngx_int_t ngx_http_llm_namespace_valid(u_char *p, size_t len);
ngx_str_t *ngx_http_llm_shared_namespace(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx);
ngx_int_t ngx_http_llm_shared_tokens(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx);
ngx_uint_t ngx_http_llm_pcache_enabled(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx);
ngx_int_t ngx_http_llm_pcache_normalize(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, json_t *root);
ngx_int_t ngx_http_llm_pcache_lookup(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx);
ngx_int_t ngx_http_llm_pcache_collect(ngx_http_llm_ctx_t *ctx,
    ngx_str_t *text, ngx_http_llm_token_t *toks, ngx_uint_t n);
void ngx_http_llm_pcache_store(ngx_http_llm_ctx_t *ctx);
void ngx_http_llm_pcache_cleanup(ngx_http_llm_ctx_t *ctx);


extern ngx_module_t  ngx_http_llm_module;
extern ngx_module_t  ngx_http_llm_adapters_module;


#endif /* _NGX_HTTP_LLM_MODULE_H_INCLUDED_ */
