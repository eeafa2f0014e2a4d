
/*
 * LoRA adapters in the module: the names clients use, /v1/models, and an
 * admin location that loads and unloads adapters in the engines.
 *
 *   llm_adapters_cache_time TIME;     default 2s: how long a worker keeps
 *                                     the engines' adapter list for
 *                                     /v1/models
 *
 *   location /admin/ {
 *       llm_admin;                    the admin API here
 *       llm_admin_key KEY;            optional: "Authorization: Bearer KEY"
 *                                     needed (compared in constant time)
 *       allow 127.0.0.1;              and/or the access module
 *       deny all;
 *   }
 *
 * Admin API (JSON):
 *
 *   GET    .../adapters               every engine's adapters: name,
 *                                     version, loaded, resident, max_rank,
 *                                     bytes, engines
 *   GET    .../adapters/NAME          one of them
 *   POST   .../adapters               {"name": N, "path": DIR} registers N
 *                                     from DIR on the engine hosts, or
 *                                     replaces its version; "path" left
 *                                     out reloads from the same folder
 *   DELETE .../adapters/NAME          unregisters N (running sequences
 *                                     finish with it)
 *
 * Each operation goes to every engine this worker is connected to; the
 * answer is an error if one of them refused (its message names the file
 * and the reason).  Engines keep what they were told until they restart:
 * adapters that must survive a restart belong in llm-engine --adapters.
 *
 * The request's "model" (see ngx_http_llm_tenant_model): the base
 * model's name, "base:adapter" or "adapter".  Without a tenant directory
 * every adapter name goes to the engine, which answers NOT_FOUND for
 * unknown ones: 404 model_not_found.  With one, the tenant's "adapters"
 * list decides, and /v1/models shows the base and the tenant's adapters
 * that the engines serve.
 */


#include "ngx_http_llm_module.h"

#include "engine/sha256.h"


#define NGX_HTTP_LLM_ADMIN_LIST      1
#define NGX_HTTP_LLM_ADMIN_ONE       2
#define NGX_HTTP_LLM_ADMIN_LOAD      3
#define NGX_HTTP_LLM_ADMIN_UNLOAD    4

#define NGX_HTTP_LLM_ADMIN_MAX_BODY  16384


typedef struct {
    ngx_msec_t                     cache_time;
} ngx_http_llm_adapters_main_conf_t;


typedef struct {
    ngx_flag_t                     admin;
    ngx_str_t                      key;         /* "": none */
} ngx_http_llm_adapters_loc_conf_t;


/* One adapter as the engines report it. */
typedef struct {
    ngx_str_t                      name;
    ngx_str_t                      version;
    ngx_uint_t                     flags;       /* LLM_ADAPTER_* (any) */
    ngx_uint_t                     max_rank;
    uint64_t                       bytes;
    ngx_uint_t                     engines;     /* how many have it */
    uint64_t                       mask;        /* which (first 64) */
    unsigned                       mixed:1;     /* engines differ on the
                                                   version */
} ngx_http_llm_adapter_t;


/*
 * One message to every ready engine, answers collected: the engine
 * client's control requests (ngx_http_llm_ctl_t), one per engine.
 */

typedef struct ngx_http_llm_fanout_s  ngx_http_llm_fanout_t;

struct ngx_http_llm_fanout_s {
    ngx_http_llm_ctl_t            *ctls;        /* [n] */
    ngx_uint_t                     n;
    ngx_uint_t                     pending;
    ngx_event_t                    timer;
    /* f: an engine's answer; NULL: it went away or timed out */
    void                         (*answer)(ngx_http_llm_fanout_t *fo,
                                           ngx_uint_t engine,
                                           llm_proto_frame *f);
    void                         (*done)(ngx_http_llm_fanout_t *fo);
    void                          *data;
};


/* The adapter lists of the engines, merged by name. */
typedef struct {
    ngx_pool_t                    *pool;
    ngx_array_t                   *list;        /* ngx_http_llm_adapter_t */
    ngx_uint_t                     answered;    /* engines that did */
} ngx_http_llm_adapter_list_t;


/* The per-worker cache behind /v1/models. */
typedef struct {
    ngx_http_llm_adapter_list_t    cur;
    ngx_msec_t                     updated;
    ngx_http_llm_adapter_list_t    next;        /* being refreshed */
    ngx_http_llm_fanout_t          fanout;
    ngx_queue_t                    waiting;     /* models requests */
    ngx_log_t                     *log;
    unsigned                       valid:1;
    unsigned                       refreshing:1;
} ngx_http_llm_adapter_cache_t;


typedef struct {
    ngx_queue_t                    queue;
    ngx_http_request_t            *request;
    ngx_uint_t                     endpoint;
    ngx_str_t                      id;
    /* not NULL: called instead of answering /v1/models */
    void                         (*ready)(ngx_http_request_t *r);
    unsigned                       waiting:1;
} ngx_http_llm_models_wait_t;


/* An admin request in flight. */
typedef struct {
    ngx_http_request_t            *request;
    ngx_uint_t                     op;          /* NGX_HTTP_LLM_ADMIN_* */
    ngx_str_t                      name;
    ngx_http_llm_fanout_t          fanout;
    ngx_http_llm_adapter_list_t    list;
    llm_proto_adapter_ok           ok;          /* the first success */
    ngx_uint_t                     n_ok;
    ngx_uint_t                     status;      /* first failure; 0 */
    ngx_str_t                      message;
    ngx_str_t                      failed_engine;
} ngx_http_llm_admin_ctx_t;


static ngx_int_t ngx_http_llm_fanout_start(ngx_http_llm_fanout_t *fo,
    ngx_pool_t *pool, ngx_log_t *log, int type, llm_proto_buf *frame,
    ngx_msec_t timeout);
static void ngx_http_llm_fanout_cancel(ngx_http_llm_fanout_t *fo);
static void ngx_http_llm_fanout_handler(ngx_http_llm_ctl_t *ctl,
    llm_proto_frame *f);
static void ngx_http_llm_fanout_timeout(ngx_event_t *ev);
static ngx_int_t ngx_http_llm_list_merge(ngx_http_llm_adapter_list_t *l,
    ngx_uint_t engine, llm_proto_frame *f, ngx_log_t *log);
static ngx_http_llm_adapter_t *ngx_http_llm_list_find(
    ngx_http_llm_adapter_list_t *l, ngx_str_t *name);
static ngx_int_t ngx_http_llm_list_refresh(ngx_http_request_t *r,
    ngx_http_llm_adapter_cache_t *cache, ngx_http_llm_models_wait_t *w);
static ngx_int_t ngx_http_llm_list_init(ngx_http_llm_adapter_list_t *l,
    ngx_log_t *log);
static void ngx_http_llm_cache_answer(ngx_http_llm_fanout_t *fo,
    ngx_uint_t engine, llm_proto_frame *f);
static void ngx_http_llm_cache_done(ngx_http_llm_fanout_t *fo);
static void ngx_http_llm_models_wait_cleanup(void *data);
static ngx_int_t ngx_http_llm_models_send(ngx_http_request_t *r,
    ngx_uint_t endpoint, ngx_str_t *id);
static ngx_uint_t ngx_http_llm_adapter_allowed(ngx_http_request_t *r,
    ngx_str_t *name);
static json_t *ngx_http_llm_adapter_model_json(
    ngx_http_llm_main_conf_t *lmcf, ngx_str_t *name);
static ngx_int_t ngx_http_llm_adapter_split(ngx_http_llm_main_conf_t *lmcf,
    ngx_str_t *model, ngx_str_t *adapter);
static ngx_int_t ngx_http_llm_admin_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_llm_admin_auth(ngx_http_request_t *r,
    ngx_http_llm_adapters_loc_conf_t *alcf);
static void ngx_http_llm_admin_body(ngx_http_request_t *r);
static ngx_int_t ngx_http_llm_admin_start(ngx_http_llm_admin_ctx_t *ctx,
    ngx_str_t *path);
static void ngx_http_llm_admin_answer(ngx_http_llm_fanout_t *fo,
    ngx_uint_t engine, llm_proto_frame *f);
static void ngx_http_llm_admin_done(ngx_http_llm_fanout_t *fo);
static void ngx_http_llm_admin_cleanup(void *data);
static json_t *ngx_http_llm_admin_entry_json(ngx_http_llm_adapter_t *a);
static ngx_int_t ngx_http_llm_admin_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *code, const char *fmt, ...);
static ngx_uint_t ngx_http_llm_adapter_name_valid(ngx_str_t *name);
static void *ngx_http_llm_adapters_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_llm_adapters_init_main_conf(ngx_conf_t *cf,
    void *conf);
static void *ngx_http_llm_adapters_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_llm_adapters_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static char *ngx_http_llm_admin(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_llm_adapters_init_process(ngx_cycle_t *cycle);
static void ngx_http_llm_adapters_exit_process(ngx_cycle_t *cycle);


static ngx_command_t  ngx_http_llm_adapters_commands[] = {

    /*
     * llm_admin;
     *
     * The adapter admin API in this location (see above).  Guard it:
     * allow/deny, llm_admin_key, or both.
     */
    { ngx_string("llm_admin"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_llm_admin,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    /*
     * llm_admin_key KEY;                   default: none
     *
     * Admin requests must carry "Authorization: Bearer KEY".
     */
    { ngx_string("llm_admin_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_llm_adapters_loc_conf_t, key),
      NULL },

    /*
     * llm_adapters_cache_time TIME;        default 2s
     *
     * How long a worker keeps the engines' adapter list for /v1/models
     * (loads through the admin API show at once in that worker, in the
     * others after at most this time).
     */
    { ngx_string("llm_adapters_cache_time"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_llm_adapters_main_conf_t, cache_time),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_llm_adapters_module_ctx = {
    NULL,                                  /* preconfiguration */
    NULL,                                  /* postconfiguration */

    ngx_http_llm_adapters_create_main_conf, /* create main configuration */
    ngx_http_llm_adapters_init_main_conf,  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_llm_adapters_create_loc_conf, /* create location configuration */
    ngx_http_llm_adapters_merge_loc_conf   /* merge location configuration */
};


ngx_module_t  ngx_http_llm_adapters_module = {
    NGX_MODULE_V1,
    &ngx_http_llm_adapters_module_ctx,     /* module context */
    ngx_http_llm_adapters_commands,        /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_llm_adapters_init_process,    /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_llm_adapters_exit_process,    /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* one per worker process */
static ngx_http_llm_adapter_cache_t  *ngx_http_llm_adapter_cache;


/* ---- the "model" field ---------------------------------------------- */

/*
 * "model" without a tenant directory: the base model, "base:adapter" or
 * "adapter" (any well-formed name: the engine says whether it has it).
 */

ngx_int_t
ngx_http_llm_adapter_model(ngx_http_request_t *r,
    ngx_http_llm_main_conf_t *lmcf, ngx_http_llm_params_t *p,
    ngx_http_llm_error_t *err)
{
    ngx_str_t            adapter;
    ngx_http_llm_ctx_t  *ctx;

    ngx_str_null(&p->adapter);

    if (p->model.len == lmcf->model_name.len
        && ngx_strncmp(p->model.data, lmcf->model_name.data,
                       p->model.len) == 0)
    {
        return NGX_OK;
    }

    if (ngx_http_llm_adapter_split(lmcf, &p->model, &adapter) == NGX_OK) {
        p->adapter = adapter;
        return NGX_OK;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);

    if (ctx) {
        ctx->reject = NGX_HTTP_LLM_REJECT_MODEL;
    }

    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_NOT_FOUND,
                           "invalid_request_error", "model",
                           "model_not_found",
                           "The model `%*s` does not exist",
                           ngx_min(p->model.len, 256), p->model.data);
    return NGX_ERROR;
}


/* The engine has no adapter of the name the request gave: 404. */

void
ngx_http_llm_adapter_not_found(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, const char *message, ngx_http_llm_error_t *err)
{
    ngx_str_t  *model, text;

    ctx->reject = NGX_HTTP_LLM_REJECT_MODEL;

    /* the engine's message quotes the adapter name the client gave */

    ngx_str_set(&text, "not found");

    if (message) {
        text.data = (u_char *) message;
        text.len = ngx_strlen(message);
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "llm: engine: %V", ngx_http_llm_log_text(r->pool, &text));

    /* the list /v1/models shows is out of date */

    if (ngx_http_llm_adapter_cache) {
        ngx_http_llm_adapter_cache->valid = 0;
    }

    model = &ctx->params.model;

    ngx_http_llm_error_set(r->pool, err, NGX_HTTP_NOT_FOUND,
                           "invalid_request_error", "model",
                           "model_not_found",
                           "The model `%*s` does not exist",
                           ngx_min(model->len, 256), model->data);
}


/* "base:adapter" or "adapter" -> adapter, if well-formed. */

static ngx_int_t
ngx_http_llm_adapter_split(ngx_http_llm_main_conf_t *lmcf, ngx_str_t *model,
    ngx_str_t *adapter)
{
    ngx_str_t  *base;

    base = &lmcf->model_name;
    *adapter = *model;

    if (model->len > base->len + 1
        && model->data[base->len] == ':'
        && ngx_strncmp(model->data, base->data, base->len) == 0)
    {
        adapter->data += base->len + 1;
        adapter->len -= base->len + 1;
    }

    return ngx_http_llm_adapter_name_valid(adapter) ? NGX_OK : NGX_DECLINED;
}


/* The engine's rule (adapters/registry.h): 1-127 of [A-Za-z0-9._:@+-],
 * not starting with '.'. */

static ngx_uint_t
ngx_http_llm_adapter_name_valid(ngx_str_t *name)
{
    u_char      c;
    ngx_uint_t  i;

    if (name->len == 0 || name->len > LLM_PROTO_MAX_ADAPTER - 1
        || name->data[0] == '.')
    {
        return 0;
    }

    for (i = 0; i < name->len; i++) {
        c = name->data[i];

        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == ':'
            || c == '@' || c == '+' || c == '-')
        {
            continue;
        }

        return 0;
    }

    return 1;
}


/* ---- fan-out: one message to every engine ----------------------------- */

/*
 * Sends the frame in "frame" (one frame of that type, request id 0, as
 * an encoder wrote it) to every ready engine.  NGX_OK: fo->done follows
 * (never from inside this call); NGX_DECLINED: no engine is ready.
 */

static ngx_int_t
ngx_http_llm_fanout_start(ngx_http_llm_fanout_t *fo, ngx_pool_t *pool,
    ngx_log_t *log, int type, llm_proto_buf *frame, ngx_msec_t timeout)
{
    ngx_int_t    rc;
    ngx_uint_t   i, n;

    n = ngx_http_llm_engine_count();

    if (fo->ctls == NULL || fo->n < n) {
        fo->ctls = ngx_pcalloc(pool, (n ? n : 1) * sizeof(ngx_http_llm_ctl_t));
        if (fo->ctls == NULL) {
            return NGX_ERROR;
        }
    }

    fo->n = n;
    fo->pending = 0;

    for (i = 0; i < n; i++) {
        ngx_memzero(&fo->ctls[i], sizeof(ngx_http_llm_ctl_t));
        fo->ctls[i].handler = ngx_http_llm_fanout_handler;
        fo->ctls[i].data = fo;

        rc = ngx_http_llm_engine_ctl_send(&fo->ctls[i], i, type,
                                          frame->data + LLM_PROTO_HEADER_SIZE,
                                          frame->len - LLM_PROTO_HEADER_SIZE);
        if (rc == NGX_OK) {
            fo->pending++;

        } else if (rc == NGX_ERROR) {
            ngx_http_llm_fanout_cancel(fo);
            return NGX_ERROR;
        }
    }

    if (fo->pending == 0) {
        return NGX_DECLINED;
    }

    fo->timer.handler = ngx_http_llm_fanout_timeout;
    fo->timer.data = fo;
    fo->timer.log = log;
    fo->timer.cancelable = 1;

    ngx_add_timer(&fo->timer, timeout);

    return NGX_OK;
}


static void
ngx_http_llm_fanout_cancel(ngx_http_llm_fanout_t *fo)
{
    ngx_uint_t  i;

    for (i = 0; i < fo->n; i++) {
        ngx_http_llm_engine_ctl_cancel(&fo->ctls[i]);
    }

    fo->pending = 0;

    if (fo->timer.timer_set) {
        ngx_del_timer(&fo->timer);
    }
}


static void
ngx_http_llm_fanout_handler(ngx_http_llm_ctl_t *ctl, llm_proto_frame *f)
{
    ngx_http_llm_fanout_t  *fo;

    fo = ctl->data;

    fo->answer(fo, ctl->engine, f);

    if (--fo->pending > 0) {
        return;
    }

    if (fo->timer.timer_set) {
        ngx_del_timer(&fo->timer);
    }

    fo->done(fo);
}


static void
ngx_http_llm_fanout_timeout(ngx_event_t *ev)
{
    ngx_uint_t              i;
    ngx_http_llm_fanout_t  *fo;

    fo = ev->data;

    for (i = 0; i < fo->n; i++) {
        if (fo->ctls[i].peer) {
            ngx_http_llm_engine_ctl_cancel(&fo->ctls[i]);
            fo->answer(fo, i, NULL);
        }
    }

    fo->pending = 0;
    fo->done(fo);
}


/* ---- adapter lists ---------------------------------------------------- */

static ngx_int_t
ngx_http_llm_list_init(ngx_http_llm_adapter_list_t *l, ngx_log_t *log)
{
    l->pool = ngx_create_pool(4096, log);
    if (l->pool == NULL) {
        return NGX_ERROR;
    }

    l->list = ngx_array_create(l->pool, 8, sizeof(ngx_http_llm_adapter_t));
    if (l->list == NULL) {
        ngx_destroy_pool(l->pool);
        l->pool = NULL;
        return NGX_ERROR;
    }

    l->answered = 0;

    return NGX_OK;
}


static void
ngx_http_llm_list_free(ngx_http_llm_adapter_list_t *l)
{
    if (l->pool) {
        ngx_destroy_pool(l->pool);
    }

    l->pool = NULL;
    l->list = NULL;
    l->answered = 0;
}


static ngx_http_llm_adapter_t *
ngx_http_llm_list_find(ngx_http_llm_adapter_list_t *l, ngx_str_t *name)
{
    ngx_uint_t               i;
    ngx_http_llm_adapter_t  *a;

    if (l->list == NULL) {
        return NULL;
    }

    a = l->list->elts;

    for (i = 0; i < l->list->nelts; i++) {
        if (a[i].name.len == name->len
            && ngx_strncmp(a[i].name.data, name->data, name->len) == 0)
        {
            return &a[i];
        }
    }

    return NULL;
}


/* Adds one engine's ADAPTERS (or ignores another frame). */

static ngx_int_t
ngx_http_llm_list_merge(ngx_http_llm_adapter_list_t *l, ngx_uint_t engine,
    llm_proto_frame *f, ngx_log_t *log)
{
    llm_err                  err;
    ngx_str_t                name;
    llm_proto_adapters       m;
    llm_proto_adapter_info   e;
    ngx_http_llm_adapter_t  *a;

    if (f == NULL || f->type != LLM_MSG_ADAPTERS) {
        return NGX_DECLINED;
    }

    if (llm_proto_decode_adapters(f, &m, &err) != 0) {
        ngx_log_error(NGX_LOG_ERR, log, 0, "llm: bad ADAPTERS: %s", err.msg);
        return NGX_DECLINED;
    }

    l->answered++;

    while (llm_proto_adapters_next(&m, &e)) {
        name.data = (u_char *) e.name;
        name.len = ngx_strlen(e.name);

        a = ngx_http_llm_list_find(l, &name);

        if (a == NULL) {
            a = ngx_array_push(l->list);
            if (a == NULL) {
                return NGX_ERROR;
            }

            ngx_memzero(a, sizeof(ngx_http_llm_adapter_t));

            a->name.data = ngx_pstrdup(l->pool, &name);
            a->version.len = ngx_strlen(e.version);
            a->version.data = ngx_pnalloc(l->pool, a->version.len + 1);

            if (a->name.data == NULL || a->version.data == NULL) {
                return NGX_ERROR;
            }

            a->name.len = name.len;
            ngx_cpystrn(a->version.data, (u_char *) e.version,
                        a->version.len + 1);
            a->max_rank = e.max_rank;
            a->bytes = e.bytes;

        } else if (a->version.len != ngx_strlen(e.version)
                   || ngx_strncmp(a->version.data, e.version,
                                  a->version.len) != 0)
        {
            a->mixed = 1;
        }

        a->flags |= e.flags;
        a->engines++;

        if (engine < 64) {
            a->mask |= (uint64_t) 1 << engine;
        }
    }

    return NGX_OK;
}


/* ---- /v1/models --------------------------------------------------------- */

/*
 * GET /v1/models and /v1/models/{id}: the base model and the adapters
 * the caller may use, from a list of the engines' adapters kept for
 * llm_adapters_cache_time.  May wait for the engines (NGX_DONE, the
 * request's count raised).
 */

ngx_int_t
ngx_http_llm_adapters_models(ngx_http_request_t *r, ngx_uint_t endpoint,
    ngx_str_t *id)
{
    ngx_int_t                           rc;
    ngx_http_llm_models_wait_t         *w;
    ngx_http_llm_adapter_cache_t       *cache;
    ngx_http_llm_main_conf_t           *lmcf;
    ngx_http_llm_adapters_main_conf_t  *amcf;

    cache = ngx_http_llm_adapter_cache;
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);
    amcf = ngx_http_get_module_main_conf(r, ngx_http_llm_adapters_module);

    if (cache == NULL
        || (cache->valid
            && ngx_current_msec - cache->updated < amcf->cache_time))
    {
        return ngx_http_llm_models_send(r, endpoint, id);
    }

    /* the base model needs no engine */

    if (endpoint == NGX_HTTP_LLM_MODEL
        && id->len == lmcf->model_name.len
        && ngx_strncmp(id->data, lmcf->model_name.data, id->len) == 0)
    {
        return ngx_http_llm_models_send(r, endpoint, id);
    }

    w = ngx_pcalloc(r->pool, sizeof(ngx_http_llm_models_wait_t));
    if (w == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    w->request = r;
    w->endpoint = endpoint;
    w->id = *id;

    rc = ngx_http_llm_list_refresh(r, cache, w);

    if (rc == NGX_DECLINED) {
        /* no engine to ask: what was known last, or the base only */
        return ngx_http_llm_models_send(r, endpoint, id);
    }

    if (rc != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    r->main->count++;

    return NGX_DONE;
}


/*
 * Asks the engines for their adapters (unless that is under way) and
 * queues w for the answer: NGX_OK; NGX_DECLINED: no engine is ready;
 * NGX_ERROR.
 */

static ngx_int_t
ngx_http_llm_list_refresh(ngx_http_request_t *r,
    ngx_http_llm_adapter_cache_t *cache, ngx_http_llm_models_wait_t *w)
{
    ngx_int_t                  rc;
    llm_proto_buf              frame;
    ngx_pool_cleanup_t        *cln;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    if (!cache->refreshing) {
        if (ngx_http_llm_list_init(&cache->next, cache->log) != NGX_OK) {
            return NGX_ERROR;
        }

        llm_proto_buf_init(&frame);

        if (llm_proto_encode_empty(&frame, LLM_MSG_ADAPTER_LIST, 0) != 0) {
            llm_proto_buf_free(&frame);
            ngx_http_llm_list_free(&cache->next);
            return NGX_ERROR;
        }

        rc = ngx_http_llm_fanout_start(&cache->fanout, ngx_cycle->pool,
                                       cache->log, LLM_MSG_ADAPTER_LIST,
                                       &frame, lmcf->engine_timeout);
        llm_proto_buf_free(&frame);

        if (rc != NGX_OK) {
            ngx_http_llm_list_free(&cache->next);
            return NGX_DECLINED;
        }

        cache->refreshing = 1;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_http_llm_models_wait_cleanup;
    cln->data = w;

    ngx_queue_insert_tail(&cache->waiting, &w->queue);
    w->waiting = 1;

    return NGX_OK;
}


/*
 * The content version of an adapter as this worker's list of the
 * engines' adapters has it, for the prompt cache key.  NGX_OK: *version
 * set; NGX_DECLINED: not known (no engine has it loaded, the engines
 * disagree, none answers); NGX_AGAIN: the list is older than
 * llm_adapters_cache_time and being refreshed, ready(r) follows (refresh
 * 0 takes the list as it is).  NGX_ERROR.
 */

ngx_int_t
ngx_http_llm_adapter_version(ngx_http_request_t *r, ngx_str_t *name,
    ngx_uint_t refresh, void (*ready)(ngx_http_request_t *r),
    ngx_str_t *version)
{
    ngx_int_t                           rc;
    ngx_http_llm_adapter_t             *a;
    ngx_http_llm_models_wait_t         *w;
    ngx_http_llm_adapter_cache_t       *cache;
    ngx_http_llm_adapters_main_conf_t  *amcf;

    cache = ngx_http_llm_adapter_cache;
    amcf = ngx_http_get_module_main_conf(r, ngx_http_llm_adapters_module);

    if (cache == NULL) {
        return NGX_DECLINED;
    }

    if (refresh
        && !(cache->valid
             && ngx_current_msec - cache->updated < amcf->cache_time))
    {
        w = ngx_pcalloc(r->pool, sizeof(ngx_http_llm_models_wait_t));
        if (w == NULL) {
            return NGX_ERROR;
        }

        w->request = r;
        w->ready = ready;

        rc = ngx_http_llm_list_refresh(r, cache, w);

        if (rc != NGX_DECLINED) {
            return (rc == NGX_OK) ? NGX_AGAIN : NGX_ERROR;
        }

        /* no engine to ask: what was known last */
    }

    if (!cache->valid) {
        return NGX_DECLINED;
    }

    a = ngx_http_llm_list_find(&cache->cur, name);

    if (a == NULL || a->mixed || a->version.len == 0) {
        return NGX_DECLINED;
    }

    *version = a->version;

    return NGX_OK;
}


static void
ngx_http_llm_models_wait_cleanup(void *data)
{
    ngx_http_llm_models_wait_t  *w = data;

    if (w->waiting) {
        ngx_queue_remove(&w->queue);
        w->waiting = 0;
    }
}


static void
ngx_http_llm_cache_answer(ngx_http_llm_fanout_t *fo, ngx_uint_t engine,
    llm_proto_frame *f)
{
    ngx_http_llm_adapter_cache_t  *cache = fo->data;

    (void) ngx_http_llm_list_merge(&cache->next, engine, f, cache->log);
}


static void
ngx_http_llm_cache_done(ngx_http_llm_fanout_t *fo)
{
    ngx_queue_t                   *q;
    ngx_http_request_t            *r;
    ngx_http_llm_models_wait_t    *w;
    ngx_http_llm_adapter_cache_t  *cache;

    cache = fo->data;
    cache->refreshing = 0;

    if (cache->next.answered) {
        ngx_http_llm_list_free(&cache->cur);
        cache->cur = cache->next;
        cache->updated = ngx_current_msec;
        cache->valid = 1;

    } else {
        /* no engine answered: keep what was known */
        ngx_http_llm_list_free(&cache->next);
    }

    ngx_memzero(&cache->next, sizeof(ngx_http_llm_adapter_list_t));

    while (!ngx_queue_empty(&cache->waiting)) {
        q = ngx_queue_head(&cache->waiting);
        w = ngx_queue_data(q, ngx_http_llm_models_wait_t, queue);

        ngx_queue_remove(q);
        w->waiting = 0;

        r = w->request;

        if (w->ready) {
            w->ready(r);
            continue;
        }

        ngx_http_finalize_request(r, ngx_http_llm_models_send(r, w->endpoint,
                                                              &w->id));
    }
}


static ngx_int_t
ngx_http_llm_models_send(ngx_http_request_t *r, ngx_uint_t endpoint,
    ngx_str_t *id)
{
    json_t                        *list, *data, *o;
    ngx_str_t                      name;
    ngx_uint_t                     i;
    ngx_http_llm_error_t           err;
    ngx_http_llm_adapter_t        *a;
    ngx_http_llm_main_conf_t      *lmcf;
    ngx_http_llm_adapter_cache_t  *cache;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);
    cache = ngx_http_llm_adapter_cache;

    if (endpoint == NGX_HTTP_LLM_MODEL) {

        if (id->len == lmcf->model_name.len
            && ngx_strncmp(id->data, lmcf->model_name.data, id->len) == 0)
        {
            return ngx_http_llm_send_json(r, NGX_HTTP_OK,
                                   ngx_http_llm_models_json(lmcf, 1));
        }

        if (cache && cache->valid
            && ngx_http_llm_adapter_split(lmcf, id, &name) == NGX_OK
            && ngx_http_llm_list_find(&cache->cur, &name) != NULL
            && ngx_http_llm_adapter_allowed(r, &name))
        {
            return ngx_http_llm_send_json(r, NGX_HTTP_OK,
                                   ngx_http_llm_adapter_model_json(lmcf,
                                                                   &name));
        }

        ngx_http_llm_error_set(r->pool, &err, NGX_HTTP_NOT_FOUND,
                               "invalid_request_error", "model",
                               "model_not_found",
                               "The model `%*s` does not exist",
                               ngx_min(id->len, 256), id->data);
        return ngx_http_llm_send_error(r, &err);
    }

    list = ngx_http_llm_models_json(lmcf, 0);
    data = list ? json_object_get(list, "data") : NULL;

    if (data == NULL) {
        json_decref(list);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (cache && cache->valid && cache->cur.list) {
        a = cache->cur.list->elts;

        for (i = 0; i < cache->cur.list->nelts; i++) {
            if (!ngx_http_llm_adapter_allowed(r, &a[i].name)) {
                continue;
            }

            o = ngx_http_llm_adapter_model_json(lmcf, &a[i].name);

            if (o == NULL || json_array_append_new(data, o) != 0) {
                json_decref(list);
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
        }
    }

    return ngx_http_llm_send_json(r, NGX_HTTP_OK, list);
}


/* With a tenant directory: only the tenant's own adapters. */

static ngx_uint_t
ngx_http_llm_adapter_allowed(ngx_http_request_t *r, ngx_str_t *name)
{
    ngx_uint_t                 i;
    ngx_http_llm_ctx_t        *ctx;
    ngx_http_llm_tenant_t     *t;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    if (!lmcf->auth) {
        return 1;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);
    t = ctx ? ctx->tenant : NULL;

    if (t == NULL) {
        return 0;
    }

    if (t->all_adapters) {
        return 1;
    }

    for (i = 0; i < t->n_adapters; i++) {
        if (t->adapters[i].len == name->len
            && ngx_strncmp(t->adapters[i].data, name->data, name->len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


static json_t *
ngx_http_llm_adapter_model_json(ngx_http_llm_main_conf_t *lmcf,
    ngx_str_t *name)
{
    return json_pack("{s:s%, s:s, s:I, s:s, s:s%}",
                     "id", (char *) name->data, name->len,
                     "object", "model",
                     "created", (json_int_t) ngx_time(),
                     "owned_by", "ngx_llm",
                     "parent", (char *) lmcf->model_name.data,
                     lmcf->model_name.len);
}


/* ---- the admin location ------------------------------------------------ */

static ngx_int_t
ngx_http_llm_admin_handler(ngx_http_request_t *r)
{
    u_char                            *p, *last;
    ngx_int_t                          rc;
    ngx_str_t                          name;
    ngx_uint_t                         op;
    ngx_http_cleanup_t                *cln;
    ngx_http_llm_admin_ctx_t          *ctx;
    ngx_http_llm_adapters_loc_conf_t  *alcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_llm_adapters_module);

    if (ngx_http_llm_admin_auth(r, alcf) != NGX_OK) {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        ngx_str_set(&name, "Bearer realm=\"llm_admin\"");
        ngx_http_llm_add_header(r, "WWW-Authenticate", &name);

        return ngx_http_llm_admin_error(r, NGX_HTTP_UNAUTHORIZED,
                                        "invalid_admin_key",
                                        "A valid admin key is needed "
                                        "(Authorization: Bearer KEY).");
    }

    /* .../adapters or .../adapters/NAME */

    last = r->uri.data + r->uri.len;

    if (r->uri.len > 1 && last[-1] == '/') {
        last--;
    }

    for (p = last; p > r->uri.data && p[-1] != '/'; p--) { /* void */ }

    ngx_str_null(&name);

    if (last - p == sizeof("adapters") - 1
        && ngx_strncmp(p, "adapters", sizeof("adapters") - 1) == 0)
    {
        if (r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD)) {
            op = NGX_HTTP_LLM_ADMIN_LIST;

        } else if (r->method == NGX_HTTP_POST) {
            op = NGX_HTTP_LLM_ADMIN_LOAD;

        } else {
            goto not_allowed;
        }

    } else if (p - r->uri.data >= (ssize_t) sizeof("/adapters/") - 1
               && ngx_strncmp(p - (sizeof("/adapters/") - 1), "/adapters/",
                              sizeof("/adapters/") - 1) == 0
               && p < last)
    {
        name.data = p;
        name.len = last - p;

        if (r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD)) {
            op = NGX_HTTP_LLM_ADMIN_ONE;

        } else if (r->method == NGX_HTTP_DELETE) {
            op = NGX_HTTP_LLM_ADMIN_UNLOAD;

        } else if (r->method == NGX_HTTP_POST) {
            op = NGX_HTTP_LLM_ADMIN_LOAD;

        } else {
            goto not_allowed;
        }

    } else {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        return ngx_http_llm_admin_error(r, NGX_HTTP_NOT_FOUND, "unknown_url",
                                        "Unknown admin URL (try "
                                        "/adapters).");
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_llm_admin_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->op = op;
    ctx->name = name;

    ngx_http_set_ctx(r, ctx, ngx_http_llm_adapters_module);

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_llm_admin_cleanup;
    cln->data = ctx;

    if (op == NGX_HTTP_LLM_ADMIN_LOAD) {
        r->request_body_in_single_buf = 1;

        rc = ngx_http_read_client_request_body(r, ngx_http_llm_admin_body);

        if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
            return rc;
        }

        return NGX_DONE;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (name.len && !ngx_http_llm_adapter_name_valid(&name)) {
        return ngx_http_llm_admin_error(r, NGX_HTTP_NOT_FOUND,
                                        "adapter_not_found",
                                        "No adapter is named \"%*s\".",
                                        ngx_min(name.len, 256), name.data);
    }

    rc = ngx_http_llm_admin_start(ctx, NULL);

    if (rc == NGX_OK) {
        r->main->count++;
        return NGX_DONE;
    }

    return rc;

not_allowed:

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    return ngx_http_llm_admin_error(r, NGX_HTTP_NOT_ALLOWED,
                                    "method_not_allowed",
                                    "Method not allowed here.");
}


/* llm_admin_key: "Authorization: Bearer KEY", compared as digests. */

static ngx_int_t
ngx_http_llm_admin_auth(ngx_http_request_t *r,
    ngx_http_llm_adapters_loc_conf_t *alcf)
{
    u_char            want[LLM_SHA256_LEN], got[LLM_SHA256_LEN], diff;
    ngx_str_t         v;
    ngx_uint_t        i;
    ngx_table_elt_t  *h;

    if (alcf->key.len == 0) {
        return NGX_OK;
    }

    h = r->headers_in.authorization;

    if (h == NULL || h->value.len < sizeof("Bearer ") - 1
        || ngx_strncasecmp(h->value.data, (u_char *) "Bearer ",
                           sizeof("Bearer ") - 1) != 0)
    {
        return NGX_DECLINED;
    }

    v.data = h->value.data + sizeof("Bearer ") - 1;
    v.len = h->value.len - (sizeof("Bearer ") - 1);

    while (v.len && v.data[0] == ' ') {
        v.data++;
        v.len--;
    }

    /* equal-length digests: the time taken says nothing of the key */

    llm_sha256(alcf->key.data, alcf->key.len, want);
    llm_sha256(v.data, v.len, got);

    diff = 0;

    for (i = 0; i < LLM_SHA256_LEN; i++) {
        diff |= want[i] ^ got[i];
    }

    return diff == 0 ? NGX_OK : NGX_DECLINED;
}


/* POST: {"name": "...", "path": "..."} (name may come from the URL). */

static void
ngx_http_llm_admin_body(ngx_http_request_t *r)
{
    u_char                    *body;
    size_t                     len;
    json_t                    *root, *v;
    ngx_str_t                  path, name;
    ngx_int_t                  rc;
    ngx_buf_t                 *b;
    json_error_t               je;
    ngx_chain_t               *cl;
    ngx_http_llm_admin_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_adapters_module);

    body = (u_char *) "";
    len = 0;

    if (r->request_body && r->request_body->bufs) {
        cl = r->request_body->bufs;
        b = cl->buf;

        if (cl->next || b->in_file
            || b->last - b->pos > NGX_HTTP_LLM_ADMIN_MAX_BODY)
        {
            ngx_http_finalize_request(r,
                ngx_http_llm_admin_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                         "request_too_large",
                                         "The body must be a small JSON "
                                         "object (at most %d bytes).",
                                         NGX_HTTP_LLM_ADMIN_MAX_BODY));
            return;
        }

        body = b->pos;
        len = b->last - b->pos;
    }

    root = json_loadb((char *) body, len, 0, &je);

    if (root == NULL || !json_is_object(root)) {
        json_decref(root);
        ngx_http_finalize_request(r,
            ngx_http_llm_admin_error(r, NGX_HTTP_BAD_REQUEST, "invalid_json",
                                     "The body must be a JSON object "
                                     "{\"name\": ..., \"path\": ...}."));
        return;
    }

    ngx_str_null(&path);
    name = ctx->name;

    v = json_object_get(root, "name");

    if (v && json_is_string(v)) {
        name.len = json_string_length(v);
        name.data = ngx_pnalloc(r->pool, name.len + 1);
        if (name.data == NULL) {
            json_decref(root);
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }

        ngx_memcpy(name.data, json_string_value(v), name.len);

        if (ctx->name.len
            && (ctx->name.len != name.len
                || ngx_strncmp(ctx->name.data, name.data, name.len) != 0))
        {
            json_decref(root);
            ngx_http_finalize_request(r,
                ngx_http_llm_admin_error(r, NGX_HTTP_BAD_REQUEST,
                                         "invalid_value",
                                         "\"name\" differs from the URL."));
            return;
        }

    } else if (v && !json_is_null(v)) {
        name.len = 0;
    }

    v = json_object_get(root, "path");

    if (v && json_is_string(v)) {
        path.len = json_string_length(v);
        path.data = ngx_pnalloc(r->pool, path.len + 1);
        if (path.data == NULL) {
            json_decref(root);
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }

        ngx_memcpy(path.data, json_string_value(v), path.len);
        path.data[path.len] = '\0';

    } else if (v && !json_is_null(v)) {
        json_decref(root);
        ngx_http_finalize_request(r,
            ngx_http_llm_admin_error(r, NGX_HTTP_BAD_REQUEST,
                                     "invalid_type",
                                     "\"path\" must be a string."));
        return;
    }

    json_decref(root);

    if (!ngx_http_llm_adapter_name_valid(&name)) {
        ngx_http_finalize_request(r,
            ngx_http_llm_admin_error(r, NGX_HTTP_BAD_REQUEST, "invalid_name",
                                     "\"name\" must be 1 to %d characters "
                                     "of A-Z a-z 0-9 . _ : @ + -, not "
                                     "starting with '.'.",
                                     LLM_PROTO_MAX_ADAPTER - 1));
        return;
    }

    /* a path with a NUL inside would name another folder */

    if (path.data != NULL
        && (path.len > LLM_PROTO_MAX_PATH
            || ngx_strlen(path.data) != path.len))
    {
        ngx_http_finalize_request(r,
            ngx_http_llm_admin_error(r, NGX_HTTP_BAD_REQUEST, "invalid_path",
                                     "\"path\" must be a folder path of at "
                                     "most %d bytes.", LLM_PROTO_MAX_PATH));
        return;
    }

    ctx->name = name;

    rc = ngx_http_llm_admin_start(ctx, &path);

    if (rc == NGX_OK) {
        /* the body reading's reference is kept until the answers */
        return;
    }

    ngx_http_finalize_request(r, rc);
}


/* Sends the admin operation to every engine: NGX_OK (answers follow) or
 * a response already sent / a status. */

static ngx_int_t
ngx_http_llm_admin_start(ngx_http_llm_admin_ctx_t *ctx, ngx_str_t *path)
{
    int                        type, rc;
    u_char                     name[LLM_PROTO_MAX_ADAPTER + 1];
    ngx_int_t                  n;
    llm_proto_buf              frame;
    ngx_http_request_t        *r;
    llm_proto_adapter_load     load;
    ngx_http_llm_main_conf_t  *lmcf;

    r = ctx->request;
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    llm_proto_buf_init(&frame);

    ngx_cpystrn(name, ctx->name.data,
                ngx_min(ctx->name.len, LLM_PROTO_MAX_ADAPTER) + 1);

    switch (ctx->op) {

    case NGX_HTTP_LLM_ADMIN_LOAD:
        type = LLM_MSG_ADAPTER_LOAD;
        ngx_memzero(&load, sizeof(llm_proto_adapter_load));
        ngx_cpystrn((u_char *) load.name, name, sizeof(load.name));

        if (path && path->len) {
            ngx_cpystrn((u_char *) load.path, path->data, sizeof(load.path));
        }

        rc = llm_proto_encode_adapter_load(&frame, 0, &load);
        break;

    case NGX_HTTP_LLM_ADMIN_UNLOAD:
        type = LLM_MSG_ADAPTER_UNLOAD;
        rc = llm_proto_encode_adapter_unload(&frame, 0, (char *) name);
        break;

    default:
        type = LLM_MSG_ADAPTER_LIST;
        rc = llm_proto_encode_empty(&frame, LLM_MSG_ADAPTER_LIST, 0);

        if (rc == 0 && ngx_http_llm_list_init(&ctx->list, r->connection->log)
                       != NGX_OK)
        {
            rc = LLM_ENOMEM;
        }

        break;
    }

    if (rc != 0) {
        llm_proto_buf_free(&frame);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->fanout.answer = ngx_http_llm_admin_answer;
    ctx->fanout.done = ngx_http_llm_admin_done;
    ctx->fanout.data = ctx;

    n = ngx_http_llm_fanout_start(&ctx->fanout, r->pool, r->connection->log,
                                  type, &frame, lmcf->engine_timeout);
    llm_proto_buf_free(&frame);

    if (n == NGX_DECLINED) {
        return ngx_http_llm_admin_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "engine_unavailable",
                                        "No model engine is connected.");
    }

    if (n != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_llm_admin_answer(ngx_http_llm_fanout_t *fo, ngx_uint_t engine,
    llm_proto_frame *f)
{
    llm_err                    err;
    ngx_str_t                 *ename;
    ngx_uint_t                 status;
    llm_proto_error            e;
    llm_proto_adapter_ok       ok;
    ngx_http_request_t        *r;
    ngx_http_llm_admin_ctx_t  *ctx;

    ctx = fo->data;
    r = ctx->request;
    ename = ngx_http_llm_engine_name(engine);

    if (f && f->type == LLM_MSG_ADAPTERS) {
        if (ngx_http_llm_list_merge(&ctx->list, engine, f, r->connection->log)
            == NGX_OK)
        {
            ctx->n_ok++;
        }

        return;
    }

    if (f && f->type == LLM_MSG_ADAPTER_OK
        && llm_proto_decode_adapter_ok(f, &ok, &err) == 0)
    {
        if (ctx->n_ok++ == 0) {
            ctx->ok = ok;
        }

        ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                      "llm: adapter \"%s\" %s on engine %V: version %s",
                      ok.name, ctx->op == NGX_HTTP_LLM_ADMIN_UNLOAD
                               ? "unloaded" : "loaded",
                      ename, ok.version[0] ? ok.version : "-");
        return;
    }

    if (ctx->status) {
        return;             /* the first failure tells */
    }

    if (f && f->type == LLM_MSG_ERROR
        && llm_proto_decode_error(f, &e, &err) == 0)
    {
        status = e.code == LLM_PERR_NOT_FOUND ? NGX_HTTP_NOT_FOUND
                 : e.code == LLM_PERR_BAD_REQUEST ? NGX_HTTP_BAD_REQUEST
                 : NGX_HTTP_BAD_GATEWAY;

        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "llm: engine %V: %s", ename, e.message);

    } else {
        status = f ? NGX_HTTP_BAD_GATEWAY : NGX_HTTP_GATEWAY_TIME_OUT;
        ngx_cpystrn((u_char *) e.message,
                    (u_char *) (f ? "unexpected answer"
                                  : "no answer (engine lost or timed out)"),
                    sizeof(e.message));
    }

    ctx->status = status;
    ctx->message.len = ngx_strlen(e.message);
    ctx->message.data = ngx_pnalloc(r->pool, ctx->message.len + 1);

    if (ctx->message.data) {
        ngx_memcpy(ctx->message.data, e.message, ctx->message.len + 1);

    } else {
        ctx->message.len = 0;
    }

    if (ename) {
        ctx->failed_engine = *ename;
    }
}


static void
ngx_http_llm_admin_done(ngx_http_llm_fanout_t *fo)
{
    json_t                    *o, *data;
    ngx_uint_t                 i;
    ngx_http_request_t        *r;
    ngx_http_llm_adapter_t    *a;
    ngx_http_llm_admin_ctx_t  *ctx;

    ctx = fo->data;
    r = ctx->request;

    if (ctx->op == NGX_HTTP_LLM_ADMIN_LOAD
        || ctx->op == NGX_HTTP_LLM_ADMIN_UNLOAD)
    {
        /* /v1/models of this worker shows the change at once */

        if (ngx_http_llm_adapter_cache) {
            ngx_http_llm_adapter_cache->valid = 0;
        }
    }

    if (ctx->status) {
        ngx_http_finalize_request(r,
            ngx_http_llm_admin_error(r, ctx->status,
                                     ctx->status == NGX_HTTP_NOT_FOUND
                                     ? "adapter_not_found"
                                     : ctx->status == NGX_HTTP_BAD_REQUEST
                                     ? "adapter_refused" : "engine_error",
                                     "%V%s%V%s", &ctx->message,
                                     ctx->failed_engine.len
                                     ? " (engine " : "",
                                     &ctx->failed_engine,
                                     ctx->failed_engine.len ? ")" : ""));
        return;
    }

    if (ctx->n_ok == 0) {
        ngx_http_finalize_request(r,
            ngx_http_llm_admin_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                     "engine_unavailable",
                                     "No model engine answered."));
        return;
    }

    switch (ctx->op) {

    case NGX_HTTP_LLM_ADMIN_LIST:
        data = json_array();
        o = data ? json_pack("{s:s, s:o}", "object", "list", "data", data)
                 : NULL;

        if (o == NULL) {
            break;
        }

        a = ctx->list.list->elts;

        for (i = 0; i < ctx->list.list->nelts; i++) {
            if (json_array_append_new(data,
                                      ngx_http_llm_admin_entry_json(&a[i]))
                != 0)
            {
                json_decref(o);
                o = NULL;
                break;
            }
        }

        break;

    case NGX_HTTP_LLM_ADMIN_ONE:
        a = ngx_http_llm_list_find(&ctx->list, &ctx->name);

        if (a == NULL) {
            ngx_http_finalize_request(r,
                ngx_http_llm_admin_error(r, NGX_HTTP_NOT_FOUND,
                                         "adapter_not_found",
                                         "No adapter is named \"%V\".",
                                         &ctx->name));
            return;
        }

        o = ngx_http_llm_admin_entry_json(a);
        break;

    default:
        o = json_pack("{s:s, s:s, s:s, s:i, s:I, s:i, s:b}",
                      "object", "adapter",
                      "name", ctx->ok.name,
                      "version", ctx->ok.version,
                      "max_rank", (int) ctx->ok.max_rank,
                      "bytes", (json_int_t) ctx->ok.bytes,
                      "engines", (int) ctx->n_ok,
                      "loaded", ctx->op == NGX_HTTP_LLM_ADMIN_LOAD);
        break;
    }

    if (o == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    ngx_http_finalize_request(r, ngx_http_llm_send_json(r, NGX_HTTP_OK,
                                                            o));
}


static json_t *
ngx_http_llm_admin_entry_json(ngx_http_llm_adapter_t *a)
{
    return json_pack("{s:s%, s:s, s:s%, s:b, s:b, s:i, s:I, s:i}",
                     "name", (char *) a->name.data, a->name.len,
                     "object", "adapter",
                     "version", (char *) a->version.data, a->version.len,
                     "loaded", (a->flags & LLM_ADAPTER_LOADED) != 0,
                     "resident", (a->flags & LLM_ADAPTER_RESIDENT) != 0,
                     "max_rank", (int) a->max_rank,
                     "bytes", (json_int_t) a->bytes,
                     "engines", (int) a->engines);
}


static void
ngx_http_llm_admin_cleanup(void *data)
{
    ngx_http_llm_admin_ctx_t  *ctx = data;

    ngx_http_llm_fanout_cancel(&ctx->fanout);
    ngx_http_llm_list_free(&ctx->list);
}


/* ---- output -------------------------------------------------------------- */

static ngx_int_t
ngx_http_llm_admin_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *fmt, ...)
{
    u_char                *p, buf[2048];
    va_list                args;
    ngx_http_llm_error_t   err;

    va_start(args, fmt);
    p = ngx_vslprintf(buf, buf + sizeof(buf), fmt, args);
    va_end(args);

    err.status = status;
    err.type = status >= 500 ? "server_error" : "invalid_request_error";
    err.param = NULL;
    err.code = code;
    err.message.data = buf;
    err.message.len = p - buf;

    return ngx_http_llm_send_error(r, &err);
}


/* ---- configuration and process hooks ------------------------------------ */

static void *
ngx_http_llm_adapters_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_llm_adapters_main_conf_t  *amcf;

    amcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llm_adapters_main_conf_t));
    if (amcf == NULL) {
        return NULL;
    }

    amcf->cache_time = NGX_CONF_UNSET_MSEC;

    return amcf;
}


static char *
ngx_http_llm_adapters_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_llm_adapters_main_conf_t  *amcf = conf;

    ngx_conf_init_msec_value(amcf->cache_time, 2000);

    return NGX_CONF_OK;
}


static void *
ngx_http_llm_adapters_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_llm_adapters_loc_conf_t  *alcf;

    alcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llm_adapters_loc_conf_t));
    if (alcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     alcf->key = { 0, NULL };
     */

    alcf->admin = NGX_CONF_UNSET;

    return alcf;
}


static char *
ngx_http_llm_adapters_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_llm_adapters_loc_conf_t *prev = parent;
    ngx_http_llm_adapters_loc_conf_t *conf = child;

    ngx_conf_merge_value(conf->admin, prev->admin, 0);
    ngx_conf_merge_str_value(conf->key, prev->key, "");

    if (conf->admin && conf->key.len == 0) {
        ngx_conf_log_error(NGX_LOG_NOTICE, cf, 0,
                           "\"llm_admin\" without \"llm_admin_key\": "
                           "guard the location with allow/deny");
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_llm_admin(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llm_adapters_loc_conf_t *alcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    if (alcf->admin != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    alcf->admin = 1;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_llm_admin_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_llm_adapters_init_process(ngx_cycle_t *cycle)
{
    ngx_http_llm_adapter_cache_t  *cache;

    cache = ngx_pcalloc(cycle->pool, sizeof(ngx_http_llm_adapter_cache_t));
    if (cache == NULL) {
        return NGX_ERROR;
    }

    cache->log = cycle->log;
    cache->fanout.answer = ngx_http_llm_cache_answer;
    cache->fanout.done = ngx_http_llm_cache_done;
    cache->fanout.data = cache;
    ngx_queue_init(&cache->waiting);

    ngx_http_llm_adapter_cache = cache;

    return NGX_OK;
}


static void
ngx_http_llm_adapters_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_llm_adapter_cache_t  *cache;

    cache = ngx_http_llm_adapter_cache;

    if (cache == NULL) {
        return;
    }

    ngx_http_llm_fanout_cancel(&cache->fanout);
    ngx_http_llm_list_free(&cache->cur);
    ngx_http_llm_list_free(&cache->next);

    ngx_http_llm_adapter_cache = NULL;
}
