
/*
 * Prometheus metrics.
 *
 *   location = /metrics { llm_metrics; allow 127.0.0.1; deny all; }
 *   llm_metrics_zone SIZE;                 default 1m
 *
 * Per tenant ("-" without a tenant directory or before a key was
 * recognized), in a shared zone that every worker adds to when a request
 * of an llm_api location is logged:
 *
 *   llm_requests_total{tenant,code}             by HTTP status
 *   llm_rejections_total{tenant,reason}         refused before the engine
 *   llm_prompt_tokens_total{tenant}             ... completion, cached
 *   llm_queue_time_seconds{tenant}              histogram (engine queue)
 *   llm_time_to_first_token_seconds{tenant}     histogram
 *   llm_inter_token_latency_seconds{tenant}     histogram
 *   llm_request_duration_seconds{tenant}        histogram
 *   llm_prompt_cache_hits_total{tenant}         answered from the prompt
 *                                               cache
 *   llm_prompt_cache_misses_total{tenant}       looked up, not there (or
 *                                               Redis failed): run live
 *   llm_prompt_cache_stores_total{tenant}       answers written to Redis
 *   llm_prompt_cache_errors_total{tenant}       Redis unreachable, errors,
 *                                               timeouts, bad entries
 *
 * and per engine, asked with a STATS message when /metrics is scraped
 * (up to 1 s; an engine that does not answer in time is shown down):
 *
 *   llm_engine_up, llm_engine_queue_depth, llm_engine_running_requests,
 *   llm_engine_batch_size, llm_engine_batch_tokens,
 *   llm_engine_kv_pages_in_use, llm_engine_kv_pages_total, and the
 *   engine's own counters (steps, tokens, preemptions, requests);
 *
 * and, from engines with a prefix cache (STATS' prefix part), per engine:
 *
 *   llm_prefix_cache_blocks_cached              KV blocks holding a hash
 *   llm_prefix_cache_blocks_reusable            ... of those unused
 *   llm_prefix_cache_lookups_total              sequences looked up
 *   llm_prefix_cache_hit_tokens_total           prompt tokens reused
 *   llm_prefix_cache_tier_hit_tokens_total      ... of those from Redis
 *   llm_prefix_cache_evictions_total
 *   llm_prefix_cache_bytes                      device bytes of those blocks
 *   llm_prefix_cache_tier_stored_bytes          bytes of blocks in Redis
 *   llm_prefix_cache_tier_enabled, llm_prefix_cache_tier_connected
 *   llm_prefix_cache_tier_puts_total, ..._tier_put_bytes_total,
 *   ..._tier_puts_dropped_total, ..._tier_lookups_total,
 *   ..._tier_blocks_hit_total, ..._tier_blocks_missed_total,
 *   ..._tier_corrupt_total, ..._tier_errors_total (the Redis tier)
 *
 * Hit rates are for Prometheus to derive, e.g.
 * rate(llm_prefix_cache_hit_tokens_total[5m]) /
 * rate(llm_engine_prefill_tokens_total[5m] + ...hit_tokens_total[5m]),
 * or hits / (hits + misses) of the prompt cache.
 *
 * The zone keeps tenants in LRU order; when it is full the least recent
 * tenant's counters are dropped (Prometheus sees a counter reset).
 */


#include "ngx_http_llm_module.h"


#define NGX_HTTP_LLM_HIST_N           15        /* with +Inf */
#define NGX_HTTP_LLM_CODES_N          12
#define NGX_HTTP_LLM_STATS_TIMEOUT    1000      /* ms */
#define NGX_HTTP_LLM_MAX_ENGINES      64

#define ngx_http_llm_pcache_offset(ev)                                        \
    (offsetof(ngx_http_llm_counters_t, pcache) + (ev) * sizeof(uint64_t))


typedef struct {
    uint64_t                       bucket[NGX_HTTP_LLM_HIST_N];
    uint64_t                       sum;         /* ms */
    uint64_t                       count;
} ngx_http_llm_hist_t;


typedef struct {
    uint64_t                       requests[NGX_HTTP_LLM_CODES_N];
    uint64_t                       rejected[NGX_HTTP_LLM_REJECT_N];
    uint64_t                       prompt_tokens;
    uint64_t                       completion_tokens;
    uint64_t                       cached_tokens;
    ngx_http_llm_hist_t            queue;
    ngx_http_llm_hist_t            ttft;
    ngx_http_llm_hist_t            duration;
    uint64_t                       itl[NGX_HTTP_LLM_ITL_BUCKETS];
    uint64_t                       itl_sum;
    uint64_t                       itl_count;
    uint64_t                       pcache[NGX_HTTP_LLM_PCACHE_EV_N];
} ngx_http_llm_counters_t;


/* A copy taken under the lock, rendered without it. */
typedef struct {
    u_char                         name[LLM_PROTO_MAX_TENANT + 16];
    size_t                         len;
    ngx_http_llm_counters_t        c;
} ngx_http_llm_snapshot_t;


typedef struct {
    ngx_http_request_t            *request;
    ngx_http_llm_stats_wait_t      wait;
} ngx_http_llm_scrape_t;


static ngx_int_t ngx_http_llm_metrics_handler(ngx_http_request_t *r);
static void ngx_http_llm_metrics_stats_done(ngx_http_llm_stats_wait_t *w);
static void ngx_http_llm_metrics_scrape_cleanup(void *data);
static ngx_int_t ngx_http_llm_metrics_send(ngx_http_request_t *r);
static ngx_int_t ngx_http_llm_metrics_log(ngx_http_request_t *r);
static void ngx_http_llm_hist_add(ngx_http_llm_hist_t *h, ngx_msec_t ms);
static u_char *ngx_http_llm_render_hist(u_char *p, const char *name,
    ngx_http_llm_snapshot_t *s, ngx_uint_t n, size_t offset);
static u_char *ngx_http_llm_render_counter(u_char *p, const char *name,
    const char *help, ngx_http_llm_snapshot_t *s, ngx_uint_t n,
    size_t offset);
static u_char *ngx_http_llm_label(u_char *p, u_char *s, size_t len);
static ngx_uint_t ngx_http_llm_code_index(ngx_uint_t status);


/* histogram bounds, ms; the last bucket is +Inf */

static ngx_msec_t  ngx_http_llm_bounds[NGX_HTTP_LLM_HIST_N - 1] = {
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    120000
};

static ngx_msec_t  ngx_http_llm_itl_bounds[NGX_HTTP_LLM_ITL_BUCKETS - 1] = {
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000
};

static ngx_uint_t  ngx_http_llm_codes[NGX_HTTP_LLM_CODES_N - 1] = {
    200, 400, 401, 403, 404, 413, 429, 499, 500, 503, 504
};

static const char  *ngx_http_llm_pcache_names[NGX_HTTP_LLM_PCACHE_EV_N] = {
    "llm_prompt_cache_hits_total", "llm_prompt_cache_misses_total",
    "llm_prompt_cache_stores_total", "llm_prompt_cache_errors_total"
};

static const char  *ngx_http_llm_pcache_help[NGX_HTTP_LLM_PCACHE_EV_N] = {
    "Requests answered from the prompt cache.",
    "Prompt cache lookups that found no answer (run live).",
    "Answers written to the prompt cache.",
    "Prompt cache Redis failures, timeouts and bad entries."
};

static const char  *ngx_http_llm_reasons[NGX_HTTP_LLM_REJECT_N] = {
    NULL, "invalid_api_key", "forbidden", "model_not_found", "requests",
    "tokens", "concurrency", "unavailable"
};


/* ---- configuration ------------------------------------------------------ */

char *
ngx_http_llm_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;
    ngx_http_llm_main_conf_t  *lmcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler == ngx_http_llm_metrics_handler) {
        return "is duplicate";
    }

    clcf->handler = ngx_http_llm_metrics_handler;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_llm_module);
    lmcf->metrics = 1;

    return NGX_CONF_OK;
}


ngx_int_t
ngx_http_llm_metrics_postconfiguration(ngx_conf_t *cf,
    ngx_http_llm_main_conf_t *lmcf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    if (!lmcf->metrics) {
        return NGX_OK;
    }

    /* full: the least recently seen tenant's counters go */

    lmcf->metrics_zone = ngx_http_llm_zone_add(cf, "llm_metrics",
                                               lmcf->metrics_zone_size,
                                               sizeof(ngx_http_llm_counters_t),
                                               NULL, NULL);
    if (lmcf->metrics_zone == NULL) {
        return NGX_ERROR;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_llm_metrics_log;

    return NGX_OK;
}


/* ---- recording ---------------------------------------------------------- */

/* A prompt cache event (hit, miss, store, error) of a tenant, at once. */

void
ngx_http_llm_metrics_pcache(ngx_str_t *tenant, ngx_uint_t event)
{
    ngx_http_llm_zone_t        *z;
    ngx_http_llm_counters_t    *c;
    ngx_http_llm_main_conf_t   *lmcf;

    if (event >= NGX_HTTP_LLM_PCACHE_EV_N) {
        return;
    }

    lmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                               ngx_http_llm_module);

    if (lmcf == NULL || lmcf->metrics_zone == NULL) {
        return;
    }

    z = lmcf->metrics_zone->data;

    ngx_shmtx_lock(&z->shpool->mutex);

    c = ngx_http_llm_zone_lookup(z, tenant, 1);

    if (c) {
        c->pcache[event]++;
    }

    ngx_shmtx_unlock(&z->shpool->mutex);
}


/* n tokens arrived in one frame: n inter-token gaps of equal share. */

void
ngx_http_llm_metrics_token(ngx_http_llm_ctx_t *ctx, ngx_uint_t n)
{
    ngx_uint_t   i, b;
    ngx_msec_t   now, gap;

    now = ngx_current_msec;

    if (n == 0) {
        return;
    }

    if (ctx->last_token == 0) {
        ctx->last_token = now ? now : 1;
        n--;            /* the first token's wait is TTFT */

        if (n == 0) {
            return;
        }

        gap = 0;

    } else {
        gap = (now - ctx->last_token) / n;
        ctx->last_token = now;
    }

    for (b = 0; b < NGX_HTTP_LLM_ITL_BUCKETS - 1; b++) {
        if (gap <= ngx_http_llm_itl_bounds[b]) {
            break;
        }
    }

    for (i = 0; i < n; i++) {
        ctx->itl.bucket[b]++;
    }

    ctx->itl.sum += (uint64_t) gap * n;
    ctx->itl.count += n;
}


static ngx_int_t
ngx_http_llm_metrics_log(ngx_http_request_t *r)
{
    ngx_str_t                   name;
    ngx_uint_t                  i;
    ngx_http_llm_ctx_t         *ctx;
    ngx_http_llm_zone_t        *z;
    ngx_http_llm_counters_t    *c;
    ngx_http_llm_main_conf_t   *lmcf;

    if (r != r->main) {
        return NGX_OK;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_llm_module);
    if (ctx == NULL) {
        return NGX_OK;
    }

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);
    if (lmcf->metrics_zone == NULL) {
        return NGX_OK;
    }

    z = lmcf->metrics_zone->data;

    if (ctx->tenant) {
        name = ctx->tenant->name;

    } else {
        ngx_str_set(&name, "-");
    }

    ngx_shmtx_lock(&z->shpool->mutex);

    c = ngx_http_llm_zone_lookup(z, &name, 1);

    if (c == NULL) {
        ngx_shmtx_unlock(&z->shpool->mutex);
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "llm: llm_metrics_zone is full");
        return NGX_OK;
    }

    c->requests[ngx_http_llm_code_index(r->headers_out.status)]++;

    if (ctx->reject < NGX_HTTP_LLM_REJECT_N && ctx->reject) {
        c->rejected[ctx->reject]++;
    }

    if (ctx->submitted) {
        c->prompt_tokens += ctx->prompt_tokens;
        c->completion_tokens += ctx->completion_tokens;
        c->cached_tokens += ctx->cached_tokens;

        ngx_http_llm_hist_add(&c->duration, ngx_current_msec - ctx->start);

        if (ctx->got_done) {
            ngx_http_llm_hist_add(&c->queue, ctx->queue_ms);
        }

        if (ctx->first_token) {
            ngx_http_llm_hist_add(&c->ttft, ctx->ttft);
        }

        for (i = 0; i < NGX_HTTP_LLM_ITL_BUCKETS; i++) {
            c->itl[i] += ctx->itl.bucket[i];
        }

        c->itl_sum += ctx->itl.sum;
        c->itl_count += ctx->itl.count;
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    return NGX_OK;
}


static void
ngx_http_llm_hist_add(ngx_http_llm_hist_t *h, ngx_msec_t ms)
{
    ngx_uint_t  b;

    for (b = 0; b < NGX_HTTP_LLM_HIST_N - 1; b++) {
        if (ms <= ngx_http_llm_bounds[b]) {
            break;
        }
    }

    h->bucket[b]++;
    h->sum += ms;
    h->count++;
}


static ngx_uint_t
ngx_http_llm_code_index(ngx_uint_t status)
{
    ngx_uint_t  i;

    for (i = 0; i < NGX_HTTP_LLM_CODES_N - 1; i++) {
        if (ngx_http_llm_codes[i] == status) {
            return i;
        }
    }

    return NGX_HTTP_LLM_CODES_N - 1;
}


/* ---- /metrics ----------------------------------------------------------- */

static ngx_int_t
ngx_http_llm_metrics_handler(ngx_http_request_t *r)
{
    ngx_int_t               rc;
    ngx_http_cleanup_t     *cln;
    ngx_http_llm_scrape_t  *sc;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    sc = ngx_pcalloc(r->pool, sizeof(ngx_http_llm_scrape_t));
    if (sc == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    sc->request = r;
    sc->wait.handler = ngx_http_llm_metrics_stats_done;
    sc->wait.data = sc;

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_llm_metrics_scrape_cleanup;
    cln->data = sc;

    rc = ngx_http_llm_engine_stats_request(&sc->wait,
                                           NGX_HTTP_LLM_STATS_TIMEOUT);

    if (rc == NGX_AGAIN) {
        r->main->count++;
        return NGX_DONE;
    }

    return ngx_http_llm_metrics_send(r);
}


static void
ngx_http_llm_metrics_stats_done(ngx_http_llm_stats_wait_t *w)
{
    ngx_connection_t       *c;
    ngx_http_request_t     *r;
    ngx_http_llm_scrape_t  *sc;

    sc = w->data;
    r = sc->request;
    c = r->connection;

    ngx_http_finalize_request(r, ngx_http_llm_metrics_send(r));
    ngx_http_run_posted_requests(c);
}


static void
ngx_http_llm_metrics_scrape_cleanup(void *data)
{
    ngx_http_llm_scrape_t  *sc = data;

    ngx_http_llm_engine_stats_cancel(&sc->wait);
}


static ngx_int_t
ngx_http_llm_metrics_send(ngx_http_request_t *r)
{
    u_char                       *p;
    size_t                        size;
    ngx_buf_t                    *b;
    ngx_uint_t                    n, i, ne;
    ngx_str_t                     name;
    ngx_queue_t                  *q;
    ngx_http_llm_zone_t          *z;
    ngx_http_llm_counters_t      *c;
    ngx_http_llm_snapshot_t      *snap;
    ngx_http_llm_main_conf_t     *lmcf;
    ngx_http_llm_engine_stats_t  *es;

    static ngx_str_t  type =
        ngx_string("text/plain; version=0.0.4; charset=utf-8");

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);

    snap = NULL;
    n = 0;

    if (lmcf->metrics_zone) {
        z = lmcf->metrics_zone->data;

        ngx_shmtx_lock(&z->shpool->mutex);

        q = NULL;

        while (ngx_http_llm_zone_next(z, &q, &name)) {
            n++;
        }

        snap = ngx_palloc(r->pool,
                          (n ? n : 1) * sizeof(ngx_http_llm_snapshot_t));

        if (snap == NULL) {
            ngx_shmtx_unlock(&z->shpool->mutex);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        i = 0;
        q = NULL;

        while (i < n && (c = ngx_http_llm_zone_next(z, &q, &name))) {
            snap[i].len = ngx_min(name.len, sizeof(snap[i].name));
            ngx_memcpy(snap[i].name, name.data, snap[i].len);
            snap[i].c = *c;
            i++;
        }

        ngx_shmtx_unlock(&z->shpool->mutex);
    }

    es = ngx_palloc(r->pool,
                    NGX_HTTP_LLM_MAX_ENGINES
                    * sizeof(ngx_http_llm_engine_stats_t));
    if (es == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ne = ngx_http_llm_engine_stats_get(es, NGX_HTTP_LLM_MAX_ENGINES);

    /* lines per tenant: 4 histograms of up to 18, counters */

    size = 16384 + n * (4 * 18 + NGX_HTTP_LLM_CODES_N
                        + NGX_HTTP_LLM_REJECT_N + 16) * 256;

    /* engine lines: 12 plain, 18 of the prefix cache */

    for (i = 0; i < ne; i++) {
        size += 32 * (128 + 2 * es[i].name.len);
    }

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = b->last;

    /* requests by status */

    p = ngx_cpymem(p, "# HELP llm_requests_total API requests by tenant and "
                   "HTTP status.\n# TYPE llm_requests_total counter\n",
                   sizeof("# HELP llm_requests_total API requests by tenant "
                          "and HTTP status.\n# TYPE llm_requests_total "
                          "counter\n") - 1);

    for (i = 0; i < n; i++) {
        ngx_uint_t  k;

        for (k = 0; k < NGX_HTTP_LLM_CODES_N; k++) {
            if (snap[i].c.requests[k] == 0) {
                continue;
            }

            p = ngx_cpymem(p, "llm_requests_total{tenant=\"",
                           sizeof("llm_requests_total{tenant=\"") - 1);
            p = ngx_http_llm_label(p, snap[i].name, snap[i].len);

            if (k < NGX_HTTP_LLM_CODES_N - 1) {
                p = ngx_sprintf(p, "\",code=\"%ui\"} %uL\n",
                                ngx_http_llm_codes[k], snap[i].c.requests[k]);

            } else {
                p = ngx_sprintf(p, "\",code=\"other\"} %uL\n",
                                snap[i].c.requests[k]);
            }
        }
    }

    p = ngx_cpymem(p, "# HELP llm_rejections_total Requests refused before "
                   "the engine, by reason.\n# TYPE llm_rejections_total "
                   "counter\n",
                   sizeof("# HELP llm_rejections_total Requests refused "
                          "before the engine, by reason.\n# TYPE "
                          "llm_rejections_total counter\n") - 1);

    for (i = 0; i < n; i++) {
        ngx_uint_t  k;

        for (k = 1; k < NGX_HTTP_LLM_REJECT_N; k++) {
            if (snap[i].c.rejected[k] == 0) {
                continue;
            }

            p = ngx_cpymem(p, "llm_rejections_total{tenant=\"",
                           sizeof("llm_rejections_total{tenant=\"") - 1);
            p = ngx_http_llm_label(p, snap[i].name, snap[i].len);
            p = ngx_sprintf(p, "\",reason=\"%s\"} %uL\n",
                            ngx_http_llm_reasons[k], snap[i].c.rejected[k]);
        }
    }

    p = ngx_http_llm_render_counter(p, "llm_prompt_tokens_total",
                                    "Prompt tokens of requests run.", snap,
                                    n, offsetof(ngx_http_llm_counters_t,
                                                prompt_tokens));
    p = ngx_http_llm_render_counter(p, "llm_completion_tokens_total",
                                    "Tokens generated.", snap, n,
                                    offsetof(ngx_http_llm_counters_t,
                                             completion_tokens));
    p = ngx_http_llm_render_counter(p, "llm_cached_tokens_total",
                                    "Prompt tokens served from the prefix "
                                    "cache.", snap, n,
                                    offsetof(ngx_http_llm_counters_t,
                                             cached_tokens));

    for (i = 0; i < NGX_HTTP_LLM_PCACHE_EV_N; i++) {
        p = ngx_http_llm_render_counter(p, ngx_http_llm_pcache_names[i],
                                        ngx_http_llm_pcache_help[i], snap, n,
                                        ngx_http_llm_pcache_offset(i));
    }

    p = ngx_http_llm_render_hist(p, "llm_queue_time_seconds", snap, n,
                                 offsetof(ngx_http_llm_counters_t, queue));
    p = ngx_http_llm_render_hist(p, "llm_time_to_first_token_seconds", snap,
                                 n, offsetof(ngx_http_llm_counters_t, ttft));
    p = ngx_http_llm_render_hist(p, "llm_request_duration_seconds", snap, n,
                                 offsetof(ngx_http_llm_counters_t,
                                          duration));

    /* inter-token latency: its own bounds */

    p = ngx_cpymem(p, "# TYPE llm_inter_token_latency_seconds histogram\n",
                   sizeof("# TYPE llm_inter_token_latency_seconds "
                          "histogram\n") - 1);

    for (i = 0; i < n; i++) {
        ngx_uint_t  k;
        uint64_t    cum;

        cum = 0;

        for (k = 0; k < NGX_HTTP_LLM_ITL_BUCKETS; k++) {
            cum += snap[i].c.itl[k];

            p = ngx_cpymem(p, "llm_inter_token_latency_seconds_bucket"
                           "{tenant=\"",
                           sizeof("llm_inter_token_latency_seconds_bucket"
                                  "{tenant=\"") - 1);
            p = ngx_http_llm_label(p, snap[i].name, snap[i].len);

            if (k < NGX_HTTP_LLM_ITL_BUCKETS - 1) {
                p = ngx_sprintf(p, "\",le=\"%M.%03M\"} %uL\n",
                                ngx_http_llm_itl_bounds[k] / 1000,
                                ngx_http_llm_itl_bounds[k] % 1000, cum);

            } else {
                p = ngx_sprintf(p, "\",le=\"+Inf\"} %uL\n", cum);
            }
        }

        p = ngx_cpymem(p, "llm_inter_token_latency_seconds_sum{tenant=\"",
                       sizeof("llm_inter_token_latency_seconds_sum"
                              "{tenant=\"") - 1);
        p = ngx_http_llm_label(p, snap[i].name, snap[i].len);
        p = ngx_sprintf(p, "\"} %uL.%03uL\n", snap[i].c.itl_sum / 1000,
                        snap[i].c.itl_sum % 1000);

        p = ngx_cpymem(p, "llm_inter_token_latency_seconds_count{tenant=\"",
                       sizeof("llm_inter_token_latency_seconds_count"
                              "{tenant=\"") - 1);
        p = ngx_http_llm_label(p, snap[i].name, snap[i].len);
        p = ngx_sprintf(p, "\"} %uL\n", snap[i].c.itl_count);
    }

    /* engines */

/* One series per engine that answered STATS and for which want holds. */
#define ngx_http_llm_engine_series(metric, type, help, want, expr)            \
    p = ngx_sprintf(p, "# HELP " metric " " help "\n# TYPE " metric " "       \
                    type "\n");                                               \
    for (i = 0; i < ne; i++) {                                                \
        if (!es[i].up || !(want)) {                                           \
            continue;                                                         \
        }                                                                     \
        p = ngx_cpymem(p, metric "{engine=\"",                               \
                       sizeof(metric "{engine=\"") - 1);                      \
        p = ngx_http_llm_label(p, es[i].name.data, es[i].name.len);           \
        p = ngx_sprintf(p, "\"} %uL\n", (uint64_t) (expr));                   \
    }

#define ngx_http_llm_engine_metric(metric, type, help, expr)                  \
    ngx_http_llm_engine_series(metric, type, help, 1, expr)

    p = ngx_sprintf(p, "# HELP llm_engine_up Whether the engine answered "
                    "STATS.\n# TYPE llm_engine_up gauge\n");

    for (i = 0; i < ne; i++) {
        p = ngx_cpymem(p, "llm_engine_up{engine=\"",
                       sizeof("llm_engine_up{engine=\"") - 1);
        p = ngx_http_llm_label(p, es[i].name.data, es[i].name.len);
        p = ngx_sprintf(p, "\"} %ui\n", es[i].up);
    }

    ngx_http_llm_engine_metric("llm_engine_queue_depth", "gauge",
                               "Requests waiting in the engine.",
                               es[i].stats.waiting)
    ngx_http_llm_engine_metric("llm_engine_running_requests", "gauge",
                               "Requests running in the engine.",
                               es[i].stats.running)
    ngx_http_llm_engine_metric("llm_engine_batch_size", "gauge",
                               "Sequences in the last engine step.",
                               es[i].stats.last_batch_seqs)
    ngx_http_llm_engine_metric("llm_engine_batch_tokens", "gauge",
                               "Tokens in the last engine step.",
                               es[i].stats.last_batch_tokens)
    ngx_http_llm_engine_metric("llm_engine_kv_pages_in_use", "gauge",
                               "KV cache pages in use.",
                               es[i].stats.kv_blocks_used)
    ngx_http_llm_engine_metric("llm_engine_kv_pages_total", "gauge",
                               "KV cache pages.",
                               es[i].stats.kv_blocks_total)
    ngx_http_llm_engine_metric("llm_engine_steps_total", "counter",
                               "Engine steps.", es[i].stats.steps)
    ngx_http_llm_engine_metric("llm_engine_prefill_tokens_total", "counter",
                               "Prompt tokens computed.",
                               es[i].stats.tokens_prefilled)
    ngx_http_llm_engine_metric("llm_engine_generated_tokens_total", "counter",
                               "Tokens generated.",
                               es[i].stats.tokens_generated)
    ngx_http_llm_engine_metric("llm_engine_preemptions_total", "counter",
                               "Sequences preempted.",
                               es[i].stats.preemptions)
    ngx_http_llm_engine_metric("llm_engine_requests_total", "counter",
                               "Requests the engine accepted.",
                               es[i].stats.requests_total)
    ngx_http_llm_engine_metric("llm_engine_rejected_total", "counter",
                               "Requests the engine refused.",
                               es[i].stats.requests_rejected)

#undef ngx_http_llm_engine_metric

    /* the prefix cache, from engines whose STATS has that part */

    for (i = 0; i < ne; i++) {
        if (es[i].up && es[i].stats.has_prefix_cache) {
            break;
        }
    }

    if (i < ne) {

#define ngx_http_llm_prefix_metric(metric, type, help, field)                  \
    ngx_http_llm_engine_series(metric, type, help,                            \
                               es[i].stats.has_prefix_cache,                 \
                               es[i].stats.field)

        ngx_http_llm_prefix_metric("llm_prefix_cache_blocks_cached", "gauge",
                                   "KV blocks in the prefix cache (in use "
                                   "or not).", prefix_blocks_cached)
        ngx_http_llm_prefix_metric("llm_prefix_cache_blocks_reusable",
                                   "gauge", "Cached KV blocks no sequence "
                                   "uses (evictable).",
                                   prefix_blocks_reusable)
        ngx_http_llm_prefix_metric("llm_prefix_cache_lookups_total",
                                   "counter", "Sequences admitted with the "
                                   "prefix cache on.", prefix_lookups)
        ngx_http_llm_prefix_metric("llm_prefix_cache_hit_tokens_total",
                                   "counter", "Prompt tokens taken from the "
                                   "prefix cache.", prefix_hit_tokens)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_hit_tokens_total",
                                   "counter", "Of those, tokens loaded from "
                                   "the Redis tier.", prefix_tier_hit_tokens)
        ngx_http_llm_prefix_metric("llm_prefix_cache_evictions_total",
                                   "counter", "Cached KV blocks evicted.",
                                   prefix_evictions)
        ngx_http_llm_prefix_metric("llm_prefix_cache_bytes", "gauge",
                                   "Device bytes of the cached KV blocks.",
                                   prefix_bytes_cached)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_stored_bytes",
                                   "gauge", "Bytes of KV blocks kept in "
                                   "Redis (as the engine last saw them).",
                                   tier_stored_bytes)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_enabled", "gauge",
                                   "Whether the engine has a Redis tier.",
                                   tier_enabled)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_connected", "gauge",
                                   "Whether the Redis tier is connected.",
                                   tier_connected)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_puts_total",
                                   "counter", "KV blocks written to Redis.",
                                   tier_puts)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_put_bytes_total",
                                   "counter", "Bytes of KV blocks written "
                                   "to Redis.", tier_put_bytes)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_puts_dropped_total",
                                   "counter", "KV block writes dropped "
                                   "(queue over its budget).",
                                   tier_puts_dropped)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_lookups_total",
                                   "counter", "Lookups in the Redis tier.",
                                   tier_lookups)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_blocks_hit_total",
                                   "counter", "KV blocks found in Redis.",
                                   tier_blocks_hit)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_blocks_missed_total",
                                   "counter", "KV blocks not found in "
                                   "Redis.", tier_blocks_missed)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_corrupt_total",
                                   "counter", "Redis entries refused (bad "
                                   "checksum, other model or format, "
                                   "truncated).", tier_corrupt)
        ngx_http_llm_prefix_metric("llm_prefix_cache_tier_errors_total",
                                   "counter", "Redis tier errors and "
                                   "timeouts.", tier_errors)

#undef ngx_http_llm_prefix_metric
#undef ngx_http_llm_engine_series
    }

    b->last = p;

    return ngx_http_llm_send_buf(r, NGX_HTTP_OK, &type, b);
}


static u_char *
ngx_http_llm_render_counter(u_char *p, const char *name, const char *help,
    ngx_http_llm_snapshot_t *s, ngx_uint_t n, size_t offset)
{
    ngx_uint_t  i;

    p = ngx_sprintf(p, "# HELP %s %s\n# TYPE %s counter\n", name, help,
                    name);

    for (i = 0; i < n; i++) {
        p = ngx_sprintf(p, "%s{tenant=\"", name);
        p = ngx_http_llm_label(p, s[i].name, s[i].len);
        p = ngx_sprintf(p, "\"} %uL\n",
                        *(uint64_t *) ((u_char *) &s[i].c + offset));
    }

    return p;
}


static u_char *
ngx_http_llm_render_hist(u_char *p, const char *name,
    ngx_http_llm_snapshot_t *s, ngx_uint_t n, size_t offset)
{
    uint64_t              cum;
    ngx_uint_t            i, k;
    ngx_http_llm_hist_t  *h;

    p = ngx_sprintf(p, "# TYPE %s histogram\n", name);

    for (i = 0; i < n; i++) {
        h = (ngx_http_llm_hist_t *) ((u_char *) &s[i].c + offset);
        cum = 0;

        for (k = 0; k < NGX_HTTP_LLM_HIST_N; k++) {
            cum += h->bucket[k];

            p = ngx_sprintf(p, "%s_bucket{tenant=\"", name);
            p = ngx_http_llm_label(p, s[i].name, s[i].len);

            if (k < NGX_HTTP_LLM_HIST_N - 1) {
                p = ngx_sprintf(p, "\",le=\"%M.%03M\"} %uL\n",
                                ngx_http_llm_bounds[k] / 1000,
                                ngx_http_llm_bounds[k] % 1000, cum);

            } else {
                p = ngx_sprintf(p, "\",le=\"+Inf\"} %uL\n", cum);
            }
        }

        p = ngx_sprintf(p, "%s_sum{tenant=\"", name);
        p = ngx_http_llm_label(p, s[i].name, s[i].len);
        p = ngx_sprintf(p, "\"} %uL.%03uL\n", h->sum / 1000, h->sum % 1000);

        p = ngx_sprintf(p, "%s_count{tenant=\"", name);
        p = ngx_http_llm_label(p, s[i].name, s[i].len);
        p = ngx_sprintf(p, "\"} %uL\n", h->count);
    }

    return p;
}


/* A label value, escaped as the text format wants; at most 2 * len. */

static u_char *
ngx_http_llm_label(u_char *p, u_char *s, size_t len)
{
    size_t  i;

    for (i = 0; i < len; i++) {
        switch (s[i]) {

        case '\\':
        case '"':
            *p++ = '\\';
            *p++ = s[i];
            break;

        case '\n':
            *p++ = '\\';
            *p++ = 'n';
            break;

        default:
            *p++ = s[i];
        }
    }

    return p;
}
