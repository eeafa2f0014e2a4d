
/*
 * ngx_http_llm_module: directives, configuration and process hooks.
 *
 *   load_module modules/ngx_http_llm_module.so;
 *
 *   http {
 *       llm_engine  unix:/run/ngx_llm/engine.sock;
 *       llm_model   smollm2 /var/lib/ngx_llm/model.gguf;
 *
 *       llm_tenants conf/tenants.json;        # optional: API keys
 *       llm_redis   127.0.0.1:6379;           # optional: limits across
 *       llm_limits  redis;                    # hosts, run-time tenants,
 *                                             # the prompt cache
 *
 *       server {
 *           location /v1/ {
 *               llm_api openai;
 *               llm_prompt_cache on;          # optional
 *               llm_cache_shared_namespace public;
 *           }
 *
 *           location = /metrics {
 *               llm_metrics;
 *           }
 *       }
 *   }
 */


#include "ngx_http_llm_module.h"


static ngx_int_t ngx_http_llm_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_llm_postconfiguration(ngx_conf_t *cf);
static void *ngx_http_llm_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_llm_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_llm_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_llm_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_llm_engine(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llm_model(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_llm_api(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static void ngx_http_llm_tokenizer_cleanup(void *data);
static ngx_int_t ngx_http_llm_init_process(ngx_cycle_t *cycle);
static void ngx_http_llm_exit_process(ngx_cycle_t *cycle);


static ngx_conf_num_bounds_t  ngx_http_llm_max_tokens_bounds = {
    ngx_conf_check_num_bounds, 1, 1048576
};


static ngx_conf_enum_t  ngx_http_llm_apis[] = {
    { ngx_string("openai"), NGX_HTTP_LLM_API_OPENAI },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_http_llm_limits_modes[] = {
    { ngx_string("off"), NGX_HTTP_LLM_LIMITS_OFF },
    { ngx_string("local"), NGX_HTTP_LLM_LIMITS_LOCAL },
    { ngx_string("redis"), NGX_HTTP_LLM_LIMITS_REDIS },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_http_llm_limits_fails[] = {
    { ngx_string("open"), NGX_HTTP_LLM_FAIL_OPEN },
    { ngx_string("closed"), NGX_HTTP_LLM_FAIL_CLOSED },
    { ngx_string("local"), NGX_HTTP_LLM_FAIL_LOCAL },
    { ngx_null_string, 0 }
};


static ngx_conf_num_bounds_t  ngx_http_llm_hosts_bounds = {
    ngx_conf_check_num_bounds, 1, 10000
};


static ngx_conf_post_t  ngx_http_llm_prompt_cache_ttl_post = {
    ngx_http_llm_prompt_cache_ttl_check
};


static ngx_command_t  ngx_http_llm_commands[] = {

    /*
     * llm_engine unix:/path | host:port;
     *
     * An llm-engine daemon.  Several directives give several engines:
     * requests go round-robin over those connected, and a request that
     * got no token yet moves to another engine when its engine goes
     * away.  Each worker keeps one connection per engine.
     */
    { ngx_string("llm_engine"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_llm_engine,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    /*
     * llm_model NAME PATH;
     *
     * The model clients name in "model", and its file (GGUF, or a
     * Hugging Face folder with tokenizer.json): the workers load its
     * tokenizer and chat template at configuration time, so "nginx -t"
     * reports a bad path.  The engines must serve the same model; their
     * vocabulary is checked at connection.
     */
    { ngx_string("llm_model"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE2,
      ngx_http_llm_model,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    /*
     * llm_api openai;
     *
     * Serves the OpenAI API in this location: POST .../chat/completions,
     * POST .../completions, GET .../models and .../models/{id}.  The
     * module enforces llm_max_body itself (client_max_body_size is
     * lifted here so that the 413 is an OpenAI error too).
     */
    { ngx_string("llm_api"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_llm_api,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llm_loc_conf_t, api),
      ngx_http_llm_apis },

    /*
     * llm_max_body SIZE;                   default 1m
     *
     * Largest request body; larger ones get 413.
     */
    { ngx_string("llm_max_body"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llm_loc_conf_t, max_body),
      NULL },

    /*
     * llm_max_tokens_default N;            default: none
     *
     * max_tokens of a request that gives none.  Without it, a chat
     * completion may run to the end of the context and a completion
     * gets 16 tokens, as OpenAI does.
     */
    { ngx_string("llm_max_tokens_default"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llm_loc_conf_t, max_tokens_default),
      &ngx_http_llm_max_tokens_bounds },

    /*
     * llm_engine_connect_timeout TIME;     default 3s
     *
     * Longest connect() to an engine.  A request that finds no engine
     * connected gets 503 at once; one that finds an engine connecting
     * waits for it (up to llm_engine_timeout).
     */
    { ngx_string("llm_engine_connect_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, connect_timeout),
      NULL },

    /*
     * llm_engine_timeout TIME;             default 60s
     *
     * Longest wait for the next frame of a running request (queueing
     * and prefill included), and for an engine's HELLO_OK; then the
     * request is cancelled and the client gets 504, or an error event
     * if streaming had begun.
     */
    { ngx_string("llm_engine_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, engine_timeout),
      NULL },

    /*
     * llm_system_fingerprint STRING;       default: from the engine
     *
     * "system_fingerprint" of responses; by default "fp_" and the
     * first bytes of the engine's model fingerprint in hex.
     */
    { ngx_string("llm_system_fingerprint"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, fingerprint),
      NULL },

    /*
     * llm_tenants FILE;                    default: none (no keys asked)
     *
     * The tenant directory (JSON; format in ngx_http_llm_tenants.c):
     * with it, every request of llm_api locations needs an API key
     * (Authorization: Bearer) or a tenant named by llm_tenant_variable.
     * Read at configuration time and again on reload.
     */
    { ngx_string("llm_tenants"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_llm_tenants_file,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    /*
     * llm_tenants_redis on | off;          default off
     *
     * Keys (and tenant names) not in the file are looked up in Redis
     * (llm_redis): tenants added at run time, without a reload.  Also
     * turns API keys on without llm_tenants.
     */
    { ngx_string("llm_tenants_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, tenants_redis),
      NULL },

    /*
     * llm_tenants_cache_time TIME;         default 10s
     *
     * How long a worker keeps a tenant read from Redis, or the absence
     * of one (changes in Redis show after at most this time).
     */
    { ngx_string("llm_tenants_cache_time"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, tenants_cache_time),
      NULL },

    /*
     * llm_tenant_variable $variable;       default: none
     *
     * For gateways that authenticate on their own (auth_request, map,
     * a trusted header): a non-empty value names the tenant and no key
     * is asked; an empty one falls back to the API key.  Only use
     * client headers ($http_x_tenant) behind a proxy that sets them.
     */
    { ngx_string("llm_tenant_variable"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llm_loc_conf_t, tenant_var),
      NULL },

    /*
     * llm_redis ADDRESS [db=N] [password=S] [prefix=S]
     *           [connect_timeout=TIME] [timeout=TIME];
     *
     * The Redis server for limits across hosts and run-time tenants:
     * host:port (resolved at configuration time) or unix:/path.
     * Defaults: port 6379, db 0, prefix "llm:", connect_timeout 1s,
     * timeout 500ms (a command not answered in it counts as Redis
     * away).  Each worker keeps one connection.
     */
    { ngx_string("llm_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_llm_redis,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    /*
     * llm_limits local | redis | off;      default local
     *
     * Where tenants' limits are counted: in a zone shared by this
     * host's workers, or in Redis for all hosts.
     */
    { ngx_string("llm_limits"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, limits.mode),
      ngx_http_llm_limits_modes },

    /*
     * llm_limits_zone SIZE;                default 1m
     *
     * The shared zone of the counters (about 200 bytes per tenant).
     */
    { ngx_string("llm_limits_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, limits.zone_size),
      NULL },

    /*
     * llm_limits_fail open | closed | local;   default local
     *
     * llm_limits redis, Redis away: admit (counted on this host for the
     * headers only), refuse with 503, or enforce this host's share of
     * each limit (divided by llm_limits_hosts) in the shared zone.
     */
    { ngx_string("llm_limits_fail"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, limits.fail),
      ngx_http_llm_limits_fails },

    /*
     * llm_limits_hosts N;                  default 1
     *
     * The number of NGINX hosts sharing the Redis limits: the share of
     * one host when Redis is away is the limit / N (at least 1).
     */
    { ngx_string("llm_limits_hosts"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, limits.hosts),
      &ngx_http_llm_hosts_bounds },

    /*
     * llm_limits_queue_timeout TIME;       default 30s
     *
     * Longest wait of a request for a concurrency slot (tenants with
     * max_queued, first come first served on one host); then 429.
     */
    { ngx_string("llm_limits_queue_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, limits.queue_timeout),
      NULL },

    /*
     * llm_limits_lease TIME;               default 10m
     *
     * llm_limits redis: a concurrency slot left by a host that died
     * is freed after this time; a running request's slot is renewed
     * every lease / 3.  At least 1s.
     */
    { ngx_string("llm_limits_lease"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, limits.lease),
      NULL },

    /*
     * llm_prompt_cache on | off;           default off
     *
     * Exact-match answers of deterministic requests (temperature 0 or a
     * fixed seed) kept in Redis (llm_redis): a repeated request is
     * answered from there, marked "X-LLM-Cache: HIT" (a looked-up one
     * that was not there: MISS).  A tenant's "prompt_cache" overrides
     * this.  See ngx_http_llm_cache.c.
     */
    { ngx_string("llm_prompt_cache"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llm_loc_conf_t, prompt_cache),
      NULL },

    /*
     * llm_prompt_cache_ttl TIME;           default 10m
     *
     * How long an answer stays in the prompt cache (Redis EX), 1s to
     * 365d.
     */
    { ngx_string("llm_prompt_cache_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llm_loc_conf_t, prompt_cache_ttl),
      &ngx_http_llm_prompt_cache_ttl_post },

    /*
     * llm_prompt_cache_charge on | off;    default on
     *
     * on: a hit counts against the tenant's tokens per minute as the
     * live answer did (prompt + completion tokens); off: only the
     * request counts.
     */
    { ngx_string("llm_prompt_cache_charge"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llm_loc_conf_t, prompt_cache_charge),
      NULL },

    /*
     * llm_cache_shared_namespace NAME | off;   default off
     *
     * The engine's prefix cache keeps the leading system (and developer)
     * messages of chat requests under this namespace, shared by all
     * tenants; the rest of each prompt stays in the tenant's own
     * namespace.  A tenant's "shared_cache_namespace" wins over this.
     */
    { ngx_string("llm_cache_shared_namespace"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_llm_shared_namespace_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llm_loc_conf_t, shared_namespace),
      NULL },

    /*
     * llm_metrics;
     *
     * Serves Prometheus metrics in this location (GET).
     */
    { ngx_string("llm_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_llm_metrics,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    /*
     * llm_metrics_zone SIZE;               default 1m
     *
     * The shared zone of the counters behind llm_metrics (about 1.5 KB
     * per tenant).
     */
    { ngx_string("llm_metrics_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_main_conf_t, metrics_zone_size),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_llm_module_ctx = {
    ngx_http_llm_preconfiguration,         /* preconfiguration */
    ngx_http_llm_postconfiguration,        /* postconfiguration */

    ngx_http_llm_create_main_conf,         /* create main configuration */
    ngx_http_llm_init_main_conf,           /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_llm_create_loc_conf,          /* create location configuration */
    ngx_http_llm_merge_loc_conf            /* merge location configuration */
};


ngx_module_t  ngx_http_llm_module = {
    NGX_MODULE_V1,
    &ngx_http_llm_module_ctx,              /* module context */
    ngx_http_llm_commands,                 /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_llm_init_process,             /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_llm_exit_process,             /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_request_body_filter_pt   ngx_http_next_request_body_filter;


/*
 * Counts the body as it arrives so that a chunked body cannot grow past
 * llm_max_body (a Content-Length over it is refused before reading).
 */
ngx_int_t
ngx_http_llm_request_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    off_t                     size;
    ngx_chain_t              *cl;
    ngx_http_llm_ctx_t       *ctx;
    ngx_http_llm_loc_conf_t  *llcf;

    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);

    if (ctx == NULL) {
        return ngx_http_next_request_body_filter(r, in);
    }

    size = 0;

    for (cl = in; cl; cl = cl->next) {
        size += ngx_buf_size(cl->buf);
    }

    ctx->received += size;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_module);

    if (ctx->received > (off_t) llcf->max_body) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "llm: request body over llm_max_body %uz",
                      llcf->max_body);
        return NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
    }

    return ngx_http_next_request_body_filter(r, in);
}


static ngx_int_t
ngx_http_llm_preconfiguration(ngx_conf_t *cf)
{
    return ngx_http_llm_add_variables(cf);
}


static ngx_int_t
ngx_http_llm_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_llm_module);

    if (lmcf->enabled) {
        if (lmcf->tokenizer == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"llm_api\" requires \"llm_model\"");
            return NGX_ERROR;
        }

        if (lmcf->engines == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"llm_api\" requires \"llm_engine\"");
            return NGX_ERROR;
        }
    }

    if (ngx_http_llm_limits_postconfiguration(cf, lmcf) != NGX_OK
        || ngx_http_llm_metrics_postconfiguration(cf, lmcf) != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_http_next_request_body_filter = ngx_http_top_request_body_filter;
    ngx_http_top_request_body_filter = ngx_http_llm_request_body_filter;

    return NGX_OK;
}


static void *
ngx_http_llm_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llm_main_conf_t));
    if (lmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     lmcf->engines = NULL;
     *     lmcf->model_name = { 0, NULL };
     *     lmcf->tokenizer = NULL;
     *     lmcf->fingerprint = { 0, NULL };
     *     lmcf->enabled = 0;
     */

    lmcf->chat_kind = -1;
    lmcf->connect_timeout = NGX_CONF_UNSET_MSEC;
    lmcf->engine_timeout = NGX_CONF_UNSET_MSEC;
    lmcf->tenants_redis = NGX_CONF_UNSET;
    lmcf->tenants_cache_time = NGX_CONF_UNSET_MSEC;
    lmcf->limits.mode = NGX_CONF_UNSET_UINT;
    lmcf->limits.fail = NGX_CONF_UNSET_UINT;
    lmcf->limits.hosts = NGX_CONF_UNSET_UINT;
    lmcf->limits.zone_size = NGX_CONF_UNSET_SIZE;
    lmcf->limits.queue_timeout = NGX_CONF_UNSET_MSEC;
    lmcf->limits.lease = NGX_CONF_UNSET_MSEC;
    lmcf->metrics_zone_size = NGX_CONF_UNSET_SIZE;

    return lmcf;
}


static char *
ngx_http_llm_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_llm_main_conf_t  *lmcf = conf;

    ngx_http_llm_tenant_t  *t;

    ngx_conf_init_msec_value(lmcf->connect_timeout, 3000);
    ngx_conf_init_msec_value(lmcf->engine_timeout, 60000);

    ngx_conf_init_value(lmcf->tenants_redis, 0);
    ngx_conf_init_msec_value(lmcf->tenants_cache_time, 10000);
    ngx_conf_init_uint_value(lmcf->limits.mode, NGX_HTTP_LLM_LIMITS_LOCAL);
    ngx_conf_init_uint_value(lmcf->limits.fail, NGX_HTTP_LLM_FAIL_LOCAL);
    ngx_conf_init_uint_value(lmcf->limits.hosts, 1);
    ngx_conf_init_size_value(lmcf->limits.zone_size, 1024 * 1024);
    ngx_conf_init_msec_value(lmcf->limits.queue_timeout, 30000);
    ngx_conf_init_msec_value(lmcf->limits.lease, 600000);
    ngx_conf_init_size_value(lmcf->metrics_zone_size, 1024 * 1024);

    if (lmcf->tenants_redis && lmcf->redis == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"llm_tenants_redis\" requires \"llm_redis\"");
        return NGX_CONF_ERROR;
    }

    if (lmcf->redis == NULL
        && (t = ngx_http_llm_tenants_prompt_cache(lmcf)) != NULL)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "tenant \"%V\" has \"prompt_cache\": true, "
                           "which requires \"llm_redis\"", &t->name);
        return NGX_CONF_ERROR;
    }

    if (lmcf->limits.zone_size < 8 * ngx_pagesize
        || lmcf->metrics_zone_size < 8 * ngx_pagesize)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "llm_limits_zone and llm_metrics_zone need at "
                           "least %uz bytes", 8 * ngx_pagesize);
        return NGX_CONF_ERROR;
    }

    /* keys are asked for once a directory exists */
    lmcf->auth = (lmcf->directory || lmcf->tenants_redis) ? 1 : 0;

    if (lmcf->fingerprint.data == NULL) {
        ngx_str_null(&lmcf->fingerprint);
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_llm_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_llm_loc_conf_t  *llcf;

    llcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llm_loc_conf_t));
    if (llcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     llcf->api = NGX_HTTP_LLM_API_OFF;
     *     llcf->clcf = NULL;
     *     llcf->shared_namespace = { 0, NULL };
     */

    llcf->max_body = NGX_CONF_UNSET_SIZE;
    llcf->max_tokens_default = NGX_CONF_UNSET_UINT;
    llcf->tenant_var = NGX_CONF_UNSET_PTR;
    llcf->prompt_cache = NGX_CONF_UNSET;
    llcf->prompt_cache_ttl = NGX_CONF_UNSET;
    llcf->prompt_cache_charge = NGX_CONF_UNSET;

    return llcf;
}


static char *
ngx_http_llm_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_llm_loc_conf_t *prev = parent;
    ngx_http_llm_loc_conf_t *conf = child;

    ngx_http_llm_main_conf_t  *lmcf;

    ngx_conf_merge_size_value(conf->max_body, prev->max_body, 1024 * 1024);
    ngx_conf_merge_uint_value(conf->max_tokens_default,
                              prev->max_tokens_default, 0);
    ngx_conf_merge_ptr_value(conf->tenant_var, prev->tenant_var, NULL);
    ngx_conf_merge_value(conf->prompt_cache, prev->prompt_cache, 0);
    ngx_conf_merge_sec_value(conf->prompt_cache_ttl, prev->prompt_cache_ttl,
                             600);
    ngx_conf_merge_value(conf->prompt_cache_charge, prev->prompt_cache_charge,
                         1);
    ngx_conf_merge_str_value(conf->shared_namespace, prev->shared_namespace,
                             "");

    if (conf->prompt_cache && conf->api != NGX_HTTP_LLM_API_OFF) {
        lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_llm_module);

        if (lmcf->redis == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"llm_prompt_cache\" requires "
                               "\"llm_redis\"");
            return NGX_CONF_ERROR;
        }
    }

    /*
     * The core module's configuration of this location is merged by
     * now (it comes first).  Its client_max_body_size check would
     * answer an oversized Content-Length with an HTML page before the
     * handler runs: lift it, the handler and the body filter enforce
     * llm_max_body with an OpenAI error.
     */

    if (conf->api != NGX_HTTP_LLM_API_OFF && conf->clcf) {
        conf->clcf->client_max_body_size = 0;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_llm_engine(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llm_main_conf_t *lmcf = conf;

    ngx_str_t                   *value;
    ngx_url_t                    u;
    ngx_http_llm_engine_addr_t  *e;

    value = cf->args->elts;

    if (lmcf->engines == NULL) {
        lmcf->engines = ngx_array_create(cf->pool, 2,
                                         sizeof(ngx_http_llm_engine_addr_t));
        if (lmcf->engines == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url = value[1];
    u.no_resolve = 0;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK) {
        if (u.err) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "%s in llm_engine \"%V\"", u.err, &u.url);
        }

        return NGX_CONF_ERROR;
    }

    if (u.no_port && u.family != AF_UNIX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "no port in llm_engine \"%V\"", &u.url);
        return NGX_CONF_ERROR;
    }

    if (u.naddrs == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "no address for llm_engine \"%V\"", &u.url);
        return NGX_CONF_ERROR;
    }

    e = ngx_array_push(lmcf->engines);
    if (e == NULL) {
        return NGX_CONF_ERROR;
    }

    e->addrs = u.addrs;
    e->naddrs = u.naddrs;
    e->name = u.url;

    return NGX_CONF_OK;
}


static char *
ngx_http_llm_model(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llm_main_conf_t *lmcf = conf;

    int                  n, max, i, bos;
    char                 piece[512];
    ngx_str_t           *value, path;
    llm_err              err;
    llm_tokenizer       *t;
    ngx_pool_cleanup_t  *cln;

    if (lmcf->tokenizer) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 0 || value[1].len > LLM_PROTO_MAX_MODEL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid model name \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    path = value[2];

    if (ngx_conf_full_name(cf->cycle, &path, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    /* path.data is NUL-terminated by ngx_conf_full_name() */

    ngx_memzero(&err, sizeof(llm_err));

    t = llm_tokenizer_load((char *) path.data, &err);
    if (t == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "llm_model \"%V\": %s", &path, err.msg);
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        llm_tokenizer_free(t);
        return NGX_CONF_ERROR;
    }

    if (llm_tokenizer_pre_fallback(t)) {
        llm_tokenizer_describe(t, piece, sizeof(piece));
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0, "llm_model \"%V\": %s",
                           &path, piece);
    }

    cln->handler = ngx_http_llm_tokenizer_cleanup;
    cln->data = t;

    lmcf->tokenizer = t;
    lmcf->model_name = value[1];
    lmcf->model_path = path;

    /* the room one token's text can need in llm_detok_push() */

    max = 0;
    n = llm_tokenizer_n_vocab(t);

    for (i = 0; i < n; i++) {
        int len = llm_token_to_piece(t, i, 1, piece, sizeof(piece));
        if (len > max) {
            max = len;
        }
    }

    lmcf->detok_cap = 64 + (size_t) max;

    ngx_str_set(&lmcf->bos_text, "");

    /*
     * The template's bos_token: BOS's text, which parse_special turns
     * back into the token; where the tokenizer adds BOS itself the
     * rendering's leading one is dropped (llm_chat_strip_bos()).
     */

    bos = llm_tokenizer_bos(t);

    if (bos >= 0) {
        n = llm_token_to_piece(t, bos, 1, piece, sizeof(piece) - 1);

        if (n > 0 && n < (int) sizeof(piece)) {
            lmcf->bos_text.data = ngx_pnalloc(cf->pool, n + 1);
            if (lmcf->bos_text.data == NULL) {
                return NGX_CONF_ERROR;
            }

            ngx_memcpy(lmcf->bos_text.data, piece, n);
            lmcf->bos_text.data[n] = '\0';
            lmcf->bos_text.len = n;
        }
    }

    lmcf->chat_template = llm_tokenizer_chat_template(t);

    if (lmcf->chat_template) {
        lmcf->chat_kind = llm_chat_detect(lmcf->chat_template);

        if (lmcf->chat_kind < 0) {
            ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                               "llm_model \"%V\": chat template not "
                               "recognized, using ChatML", &path);
            lmcf->chat_kind = LLM_CHAT_CHATML;
        }

    } else {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                           "llm_model \"%V\": no chat template, "
                           "using ChatML", &path);
        lmcf->chat_kind = LLM_CHAT_CHATML;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_llm_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llm_loc_conf_t *llcf = conf;

    char                      *rv;
    ngx_http_core_loc_conf_t  *clcf;
    ngx_http_llm_main_conf_t  *lmcf;

    if (llcf->api != NGX_HTTP_LLM_API_OFF) {
        return "is duplicate";
    }

    llcf->api = NGX_CONF_UNSET_UINT;

    rv = ngx_conf_set_enum_slot(cf, cmd, conf);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_llm_handler;

    llcf->clcf = clcf;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_llm_module);
    lmcf->enabled = 1;

    return NGX_CONF_OK;
}


static void
ngx_http_llm_tokenizer_cleanup(void *data)
{
    llm_tokenizer_free(data);
}


static ngx_int_t
ngx_http_llm_init_process(ngx_cycle_t *cycle)
{
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_llm_module);

    if (lmcf == NULL || !lmcf->enabled || lmcf->engines == NULL) {
        return NGX_OK;
    }

    if (ngx_http_llm_redis_init_process(cycle, lmcf) != NGX_OK
        || ngx_http_llm_tenants_init_process(cycle, lmcf) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_llm_engine_init_process(cycle, lmcf);
}


static void
ngx_http_llm_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_llm_engine_exit_process(cycle);
    ngx_http_llm_redis_exit_process(cycle);
    ngx_http_llm_tenants_exit_process(cycle);
}
