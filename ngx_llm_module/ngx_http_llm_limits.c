
/*
 * Per-tenant limits: requests per minute, tokens per minute, concurrent
 * requests, and a queue for concurrency slots.
 *
 *   llm_limits local | redis | off;        default local
 *   llm_limits_zone SIZE;                  default 1m
 *   llm_limits_fail open | closed | local; default local (Redis away)
 *   llm_limits_hosts N;                    default 1
 *   llm_limits_queue_timeout TIME;         default 30s
 *   llm_limits_lease TIME;                 default 10m, at least 1s
 *
 * Requests and tokens are token buckets (GCRA): a limit of L per minute
 * holds up to L and refills L every minute, continuously; a bucket is
 * kept in units of 1/60000 so that one millisecond refills exactly L
 * units and the arithmetic is exact.  Every request takes one request
 * and prompt + max_tokens tokens at admission (the prompt is tokenized
 * in the worker before, so its count is exact; max_tokens is reserved),
 * and gives back what the completion did not use when it ends, so no
 * request can overshoot the budget.  Concurrency counts requests from
 * admission to their end; a tenant with max_queued waits (up to
 * llm_limits_queue_timeout) for a slot instead of getting 429.
 *
 * The queue is first come, first served on one host: a waiter takes a
 * ticket in its tenant's record of the shared zone (an ordered list),
 * and only the waiter with the earliest ticket may take a freed slot; a
 * new request that finds waiters of its tenant queues behind them even
 * if a slot is free.  Waiters poll every 50 ms (a slot freed in the same
 * worker wakes its first waiter at once) and refresh their ticket each
 * time; a waiter that leaves (admitted, timed out, client gone) drops
 * its ticket, and a ticket not refreshed for a second (its worker died)
 * is dropped by the next one to look, so nobody blocks the line.  Across
 * hosts (llm_limits redis) the order is best effort: each host's first
 * waiter competes with the other hosts' for the tenant's slots in Redis.
 *
 * local: one record per tenant in a shared zone, so that all workers
 * count together; the zone survives "nginx -s reload" (same name and
 * size), and so do the counters.
 *
 * redis: one atomic Lua script per admission and one per end, keyed by
 * tenant ({tenant} hash tags keep a tenant's keys in one cluster slot),
 * on Redis' own clock, so that every NGINX host counts against one
 * global limit.  Concurrency slots are members of a sorted set scored
 * by their expiry, now + llm_limits_lease, in case a host dies with
 * requests in flight; every worker renews the slots of its running
 * requests every lease / 3 (one script per tenant, ZADD XX: a slot that
 * expired meanwhile is not taken back), so that a long request keeps
 * its slot and a dead host's slots are free within one lease.  When
 * Redis cannot be reached (not connected, an error, no reply in its
 * timeout):
 *
 *   open    admit; count on this host only to fill the headers
 *   closed  refuse with 503 (rate_limiter_unavailable)
 *   local   enforce this host's share: every limit divided by
 *           llm_limits_hosts (at least 1), in the shared zone
 *
 * and a renewal is tried again at the next tick (the slot keeps its old
 * expiry meanwhile).
 *
 * Responses carry x-ratelimit-{limit,remaining,reset}-{requests,tokens}
 * for the limits the tenant has; "reset" is the time until the bucket
 * is full again, in OpenAI's format ("1s", "6m0s", "350ms").  A refusal
 * is 429 with Retry-After and an error whose type says which limit:
 * "requests", "tokens" or "concurrency" (code "rate_limit_exceeded").
 */


#include "ngx_http_llm_module.h"

#include <hiredis/hiredis.h>


#define NGX_HTTP_LLM_W                60000     /* units per token */
#define NGX_HTTP_LLM_POLL             50        /* ms, queued requests */
#define NGX_HTTP_LLM_STALE            1000      /* ms, an unrefreshed
                                                   ticket */
#define NGX_HTTP_LLM_LEASE_MIN        1000      /* ms */
#define NGX_HTTP_LLM_RENEW_MAX        128       /* slots per script */

#define NGX_HTTP_LLM_OK               0
#define NGX_HTTP_LLM_OVER_REQUESTS    1
#define NGX_HTTP_LLM_OVER_TOKENS      2
#define NGX_HTTP_LLM_TOO_LARGE        3
#define NGX_HTTP_LLM_OVER_CONCURRENCY 4


typedef struct {
    int64_t                        level;       /* count x W */
    ngx_msec_t                     last;
    uint64_t                       cap;         /* per minute */
} ngx_http_llm_bucket_t;


/* A tenant's record in the zone. */
typedef struct {
    ngx_http_llm_bucket_t          req;
    ngx_http_llm_bucket_t          tok;
    ngx_uint_t                     active;      /* this host */
    ngx_uint_t                     queued;      /* tickets in line */
    uint64_t                       next_ticket;
    ngx_queue_t                    line;        /* ngx_http_llm_ticket_t,
                                                   by ticket */
} ngx_http_llm_limits_node_t;


/* A waiter's place in its tenant's line (in the zone). */
typedef struct {
    ngx_queue_t                    queue;
    uint64_t                       ticket;
    ngx_msec_t                     seen;        /* its last poll */
} ngx_http_llm_ticket_t;


/* One admission decision, from the zone or from Redis. */
typedef struct {
    ngx_uint_t                     status;      /* NGX_HTTP_LLM_OK, ... */
    ngx_http_llm_limits_t          caps;        /* as enforced */
    int64_t                        req_level;
    int64_t                        tok_level;
    ngx_msec_t                     retry;
    ngx_uint_t                     active;
    ngx_uint_t                     requested;   /* tokens */
} ngx_http_llm_verdict_t;


/* A Redis call under way; outlives its request if need be. */
typedef struct {
    ngx_http_llm_ctx_t            *ctx;         /* NULL: request gone */
    ngx_uint_t                     release;     /* an end, not admission */
    ngx_http_llm_limits_t          caps;
    ngx_uint_t                     reserved;
    u_char                         name[LLM_PROTO_MAX_TENANT];
    size_t                         name_len;
    u_char                         member[96];
    size_t                         member_len;
} ngx_http_llm_limits_op_t;


/* A renewal under way: for its log line. */
typedef struct {
    u_char                         name[LLM_PROTO_MAX_TENANT];
    size_t                         name_len;
} ngx_http_llm_renew_op_t;


static void ngx_http_llm_limits_node_init(void *value);
static ngx_int_t ngx_http_llm_limits_node_expire(ngx_http_llm_zone_t *z,
    void *value, ngx_uint_t force);
static ngx_int_t ngx_http_llm_limits_try(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_limits_redis(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_uint_t behind);
static void ngx_http_llm_limits_redis_handler(void *data, void *reply);
static ngx_int_t ngx_http_llm_limits_unreachable(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err);
static ngx_int_t ngx_http_llm_limits_local(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_uint_t share, ngx_uint_t enforce,
    ngx_http_llm_verdict_t *v);
static ngx_int_t ngx_http_llm_limits_decide(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_verdict_t *v,
    ngx_http_llm_error_t *err);
static ngx_uint_t ngx_http_llm_limits_has_line(ngx_http_llm_ctx_t *ctx);
static ngx_uint_t ngx_http_llm_line_behind(ngx_http_llm_zone_t *z,
    ngx_http_llm_limits_node_t *node, ngx_http_llm_ctx_t *ctx,
    ngx_msec_t now);
static void ngx_http_llm_line_take(ngx_http_llm_zone_t *z,
    ngx_http_llm_limits_node_t *node, ngx_http_llm_ctx_t *ctx,
    ngx_msec_t now);
static ngx_http_llm_ticket_t *ngx_http_llm_line_insert(
    ngx_http_llm_zone_t *z, ngx_http_llm_limits_node_t *node,
    uint64_t ticket, ngx_msec_t now);
static ngx_http_llm_ticket_t *ngx_http_llm_line_find(
    ngx_http_llm_limits_node_t *node, uint64_t ticket);
static void ngx_http_llm_line_drop(ngx_http_llm_zone_t *z,
    ngx_http_llm_limits_node_t *node, ngx_http_llm_ticket_t *t);
static void ngx_http_llm_line_purge(ngx_http_llm_zone_t *z,
    ngx_http_llm_limits_node_t *node, ngx_msec_t now);
static void ngx_http_llm_limits_enqueue(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx);
static void ngx_http_llm_limits_dequeue(ngx_http_llm_ctx_t *ctx);
static void ngx_http_llm_limits_wait_handler(ngx_event_t *ev);
static void ngx_http_llm_limits_wake(ngx_str_t *name);
static void ngx_http_llm_limits_headers(ngx_http_request_t *r,
    ngx_http_llm_verdict_t *v);
static void ngx_http_llm_limits_hold(ngx_http_llm_ctx_t *ctx);
static void ngx_http_llm_limits_renew_handler(ngx_event_t *ev);
static ngx_int_t ngx_http_llm_limits_renew(ngx_http_llm_ctx_t *first,
    ngx_uint_t tick, ngx_msec_t now);
static void ngx_http_llm_limits_renew_reply(void *data, void *reply);
static void ngx_http_llm_limits_release_redis(ngx_http_llm_ctx_t *ctx,
    ngx_uint_t refund);
static ngx_int_t ngx_http_llm_limits_send_release(ngx_str_t *name,
    ngx_uint_t tpm, ngx_uint_t refund, u_char *member, size_t member_len,
    ngx_http_llm_limits_op_t *op);
static void ngx_http_llm_bucket_refill(ngx_http_llm_bucket_t *b,
    uint64_t cap, ngx_msec_t now);
static ngx_uint_t ngx_http_llm_share(ngx_uint_t limit, ngx_uint_t hosts);
static ngx_http_llm_limits_conf_t *ngx_http_llm_limits_conf(void);


/*
 * KEYS: rate hash, concurrency set.  ARGV: requests/min, tokens/min,
 * tokens requested, max concurrent, lease ms, slot member, behind (1:
 * earlier waiters on this host come first: no slot, whatever is free).
 * Returns {status, requests level, tokens level, retry ms, active}.
 */

static ngx_http_llm_redis_script_t  ngx_http_llm_acquire_script = {
    "local W = 60000\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local n, maxc = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "local lease = tonumber(ARGV[5])\n"
    "local behind = ARGV[7] == '1'\n"
    "local h = redis.call('HMGET', KEYS[1], 'r', 'rt', 't', 'tt')\n"
    "local function level(v, at, cap)\n"
    "  if cap == 0 then return 0 end\n"
    "  local full = cap * W\n"
    "  if not v then return full end\n"
    "  local l = tonumber(v) + math.max(0, now - tonumber(at)) * cap\n"
    "  if l > full then l = full end\n"
    "  return l\n"
    "end\n"
    "local r = level(h[1], h[2], rpm)\n"
    "local k = level(h[3], h[4], tpm)\n"
    "local active = 0\n"
    "if maxc > 0 then\n"
    "  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)\n"
    "  active = redis.call('ZCARD', KEYS[2])\n"
    "end\n"
    "local status, retry = 0, 0\n"
    "if tpm > 0 and n > tpm then\n"
    "  status = 3\n"
    "elseif rpm > 0 and r < W then\n"
    "  status = 1\n"
    "  retry = math.ceil((W - r) / rpm)\n"
    "elseif tpm > 0 and k < n * W then\n"
    "  status = 2\n"
    "  retry = math.ceil((n * W - k) / tpm)\n"
    "elseif maxc > 0 and (active >= maxc or behind) then\n"
    "  status = 4\n"
    "else\n"
    "  if rpm > 0 then r = r - W end\n"
    "  if tpm > 0 then k = k - n * W end\n"
    "  if maxc > 0 then\n"
    "    redis.call('ZADD', KEYS[2], now + lease, ARGV[6])\n"
    "    redis.call('PEXPIRE', KEYS[2], lease)\n"
    "    active = active + 1\n"
    "  end\n"
    "end\n"
    "if rpm > 0 or tpm > 0 then\n"
    "  redis.call('HSET', KEYS[1], 'r', string.format('%.0f', r),\n"
    "             'rt', string.format('%.0f', now),\n"
    "             't', string.format('%.0f', k),\n"
    "             'tt', string.format('%.0f', now))\n"
    "  local ttl = 1000\n"
    "  if rpm > 0 then ttl = math.max(ttl, math.ceil((rpm * W - r) / rpm))"
    " end\n"
    "  if tpm > 0 then ttl = math.max(ttl, math.ceil((tpm * W - k) / tpm))"
    " end\n"
    "  redis.call('PEXPIRE', KEYS[1], ttl + 1000)\n"
    "end\n"
    "return {status, r, k, retry, active}\n",
    ""
};


/*
 * KEYS: rate hash, concurrency set.  ARGV: tokens/min, tokens to give
 * back, slot member ("" none).
 */

static ngx_http_llm_redis_script_t  ngx_http_llm_release_script = {
    "local W = 60000\n"
    "local tpm, n = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "if tpm > 0 and n > 0 then\n"
    "  local h = redis.call('HMGET', KEYS[1], 't', 'tt')\n"
    "  if h[1] then\n"
    "    local t = redis.call('TIME')\n"
    "    local now = tonumber(t[1]) * 1000"
    " + math.floor(tonumber(t[2]) / 1000)\n"
    "    local k = tonumber(h[1])"
    " + math.max(0, now - tonumber(h[2])) * tpm + n * W\n"
    "    if k > tpm * W then k = tpm * W end\n"
    "    redis.call('HSET', KEYS[1], 't', string.format('%.0f', k),\n"
    "               'tt', string.format('%.0f', now))\n"
    "  end\n"
    "end\n"
    "if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end\n"
    "return 1\n",
    ""
};


/*
 * KEYS: concurrency set.  ARGV: lease ms, then slot members.  Each slot
 * still in the set expires a lease from now; one that is gone (expired,
 * taken by others meanwhile) is not put back.  Returns how many were
 * gone.
 */

static ngx_http_llm_redis_script_t  ngx_http_llm_renew_script = {
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local lease = tonumber(ARGV[1])\n"
    "local gone = 0\n"
    "for i = 2, #ARGV do\n"
    "  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then\n"
    "    redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])\n"
    "  else\n"
    "    gone = gone + 1\n"
    "  end\n"
    "end\n"
    "if gone < #ARGV - 1 then redis.call('PEXPIRE', KEYS[1], lease) end\n"
    "return gone\n",
    ""
};


/* this worker's requests waiting for a concurrency slot, in order */
static ngx_queue_t  ngx_http_llm_limits_waiting;
static ngx_uint_t   ngx_http_llm_limits_seq;

/* this worker's requests holding a slot in Redis, and their renewal */
static ngx_queue_t  ngx_http_llm_limits_held;
static ngx_event_t  ngx_http_llm_limits_renew_ev;
static ngx_uint_t   ngx_http_llm_limits_renew_tick;
static ngx_uint_t   ngx_http_llm_limits_renew_failed;


/* ---- configuration ------------------------------------------------------ */

ngx_int_t
ngx_http_llm_limits_postconfiguration(ngx_conf_t *cf,
    ngx_http_llm_main_conf_t *lmcf)
{
    ngx_queue_init(&ngx_http_llm_limits_waiting);
    ngx_queue_init(&ngx_http_llm_limits_held);

    if (!lmcf->auth || lmcf->limits.mode == NGX_HTTP_LLM_LIMITS_OFF) {
        return NGX_OK;
    }

    if (lmcf->limits.mode == NGX_HTTP_LLM_LIMITS_REDIS
        && lmcf->redis == NULL)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"llm_limits redis\" requires \"llm_redis\"");
        return NGX_ERROR;
    }

    /* renewed every lease / 3: shorter would be mostly renewals */

    if (lmcf->limits.lease < NGX_HTTP_LLM_LEASE_MIN) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"llm_limits_lease\" must be at least %Mms",
                           (ngx_msec_t) NGX_HTTP_LLM_LEASE_MIN);
        return NGX_ERROR;
    }

    ngx_http_llm_redis_script_init(&ngx_http_llm_acquire_script);
    ngx_http_llm_redis_script_init(&ngx_http_llm_release_script);
    ngx_http_llm_redis_script_init(&ngx_http_llm_renew_script);

    lmcf->limits.shm_zone = ngx_http_llm_zone_add(cf, "llm_limits",
                                        lmcf->limits.zone_size,
                                        sizeof(ngx_http_llm_limits_node_t),
                                        ngx_http_llm_limits_node_init,
                                        ngx_http_llm_limits_node_expire);
    if (lmcf->limits.shm_zone == NULL) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_llm_limits_node_init(void *value)
{
    ngx_http_llm_limits_node_t  *node = value;

    ngx_queue_init(&node->line);
}


/*
 * A record may go when nothing runs or waits and its buckets are full
 * again; force (the zone is full): when nothing runs or waits, losing
 * its buckets' state.
 */

static ngx_int_t
ngx_http_llm_limits_node_expire(ngx_http_llm_zone_t *z, void *value,
    ngx_uint_t force)
{
    ngx_http_llm_limits_node_t  *node = value;

    ngx_msec_t  now;

    now = ngx_current_msec;

    ngx_http_llm_line_purge(z, node, now);

    if (node->active || node->queued) {
        return NGX_DECLINED;
    }

    if (!force) {
        ngx_http_llm_bucket_refill(&node->req, node->req.cap, now);
        ngx_http_llm_bucket_refill(&node->tok, node->tok.cap, now);

        if (node->req.level < (int64_t) node->req.cap * NGX_HTTP_LLM_W
            || node->tok.level < (int64_t) node->tok.cap * NGX_HTTP_LLM_W)
        {
            return NGX_DONE;
        }
    }

    return NGX_OK;
}


static ngx_http_llm_limits_conf_t *
ngx_http_llm_limits_conf(void)
{
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                               ngx_http_llm_module);

    return &lmcf->limits;
}


/* ---- admission ---------------------------------------------------------- */

/*
 * ctx->admit.reserved holds prompt + max_tokens.  NGX_OK: admitted
 * (headers added); NGX_AGAIN: Redis or a concurrency slot is awaited and
 * ngx_http_llm_continue() or a finalization follows; NGX_DECLINED:
 * refused, err filled (429, 503) and headers added; NGX_ERROR.
 */

ngx_int_t
ngx_http_llm_limits_acquire(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_error_t *err)
{
    ngx_http_llm_limits_conf_t  *lcf;

    lcf = ngx_http_llm_limits_conf();

    if (ctx->tenant == NULL || lcf->shm_zone == NULL || ctx->admit.done) {
        return NGX_OK;
    }

    if (ctx->admit.op || ctx->admit.queued) {
        return NGX_AGAIN;
    }

    return ngx_http_llm_limits_try(r, ctx, err);
}


static ngx_int_t
ngx_http_llm_limits_try(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_error_t *err)
{
    ngx_msec_t                   now;
    ngx_uint_t                   behind;
    ngx_http_llm_zone_t         *z;
    ngx_http_llm_verdict_t       v;
    ngx_http_llm_limits_node_t  *node;
    ngx_http_llm_limits_conf_t  *lcf;

    lcf = ngx_http_llm_limits_conf();

    if (lcf->mode == NGX_HTTP_LLM_LIMITS_REDIS) {

        /*
         * Redis counts the slots, this host keeps the line.  A request
         * takes its ticket on arrival, before Redis answers, so that
         * the line is in arrival order; only the first in line asks
         * Redis for a slot, the others poll the zone, and ask Redis
         * when their wait is over (for the headers of the refusal).
         */

        behind = 0;

        if (ngx_http_llm_limits_has_line(ctx)) {
            z = lcf->shm_zone->data;
            now = ngx_current_msec;

            ngx_shmtx_lock(&z->shpool->mutex);

            node = ngx_http_llm_zone_lookup(z, &ctx->tenant->name, 1);

            if (node) {
                if (ctx->admit.ticket == 0
                    && (ngx_msec_int_t) lcf->queue_timeout > 0)
                {
                    ngx_http_llm_line_take(z, node, ctx, now);
                }

                behind = ngx_http_llm_line_behind(z, node, ctx, now);
            }

            ngx_shmtx_unlock(&z->shpool->mutex);

            if (ctx->admit.ticket && !ctx->admit.queued) {
                ngx_http_llm_limits_enqueue(r, ctx);
            }

            if (behind && ctx->admit.queued
                && (ngx_msec_int_t) (ctx->admit.deadline - now) > 0)
            {
                ngx_add_timer(&ctx->admit.wait,
                              ngx_min(NGX_HTTP_LLM_POLL,
                                      ctx->admit.deadline - now));
                return NGX_AGAIN;
            }
        }

        if (ngx_http_llm_limits_redis(r, ctx, behind) == NGX_OK) {
            return NGX_AGAIN;
        }

        return ngx_http_llm_limits_unreachable(r, ctx, err);
    }

    if (ngx_http_llm_limits_local(r, ctx, 1, 1, &v) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_llm_limits_decide(r, ctx, &v, err);
}


/* Its tenant queues for concurrency slots. */

static ngx_uint_t
ngx_http_llm_limits_has_line(ngx_http_llm_ctx_t *ctx)
{
    return ctx->tenant->limits.max_concurrent
           && ctx->tenant->limits.max_queued;
}


/* The tenant's limits on this host: divided by llm_limits_hosts. */

static ngx_uint_t
ngx_http_llm_share(ngx_uint_t limit, ngx_uint_t hosts)
{
    if (limit == 0 || hosts <= 1) {
        return limit;
    }

    return ngx_max(limit / hosts, 1);
}


static ngx_int_t
ngx_http_llm_limits_local(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_uint_t share, ngx_uint_t enforce, ngx_http_llm_verdict_t *v)
{
    int64_t                      need;
    ngx_msec_t                   now;
    ngx_uint_t                   hosts, behind;
    ngx_http_llm_zone_t         *z;
    ngx_http_llm_ticket_t       *t;
    ngx_http_llm_limits_t       *l;
    ngx_http_llm_limits_node_t  *node;
    ngx_http_llm_limits_conf_t  *lcf;

    lcf = ngx_http_llm_limits_conf();
    z = lcf->shm_zone->data;
    l = &ctx->tenant->limits;

    hosts = share ? 1 : lcf->hosts;

    ngx_memzero(v, sizeof(ngx_http_llm_verdict_t));

    v->caps.requests_per_minute = ngx_http_llm_share(l->requests_per_minute,
                                                     hosts);
    v->caps.tokens_per_minute = ngx_http_llm_share(l->tokens_per_minute,
                                                   hosts);
    v->caps.max_concurrent = ngx_http_llm_share(l->max_concurrent, hosts);
    v->caps.max_queued = l->max_queued;
    v->requested = ctx->admit.reserved;

    now = ngx_current_msec;

    ngx_shmtx_lock(&z->shpool->mutex);

    node = ngx_http_llm_zone_lookup(z, &ctx->tenant->name, 1);

    if (node == NULL) {
        ngx_shmtx_unlock(&z->shpool->mutex);
        ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                      "llm: llm_limits_zone is full");
        return NGX_ERROR;
    }

    ngx_http_llm_bucket_refill(&node->req, v->caps.requests_per_minute, now);
    ngx_http_llm_bucket_refill(&node->tok, v->caps.tokens_per_minute, now);

    need = (int64_t) v->requested * NGX_HTTP_LLM_W;

    /* earlier waiters of the tenant on this host go first */

    behind = (enforce && ngx_http_llm_limits_has_line(ctx))
             ? ngx_http_llm_line_behind(z, node, ctx, now) : 0;

    if (!enforce) {
        v->status = NGX_HTTP_LLM_OK;

    } else if (v->caps.tokens_per_minute
               && v->requested > v->caps.tokens_per_minute)
    {
        v->status = NGX_HTTP_LLM_TOO_LARGE;

    } else if (v->caps.requests_per_minute
               && node->req.level < NGX_HTTP_LLM_W)
    {
        v->status = NGX_HTTP_LLM_OVER_REQUESTS;
        v->retry = (NGX_HTTP_LLM_W - node->req.level
                    + v->caps.requests_per_minute - 1)
                   / v->caps.requests_per_minute;

    } else if (v->caps.tokens_per_minute && node->tok.level < need) {
        v->status = NGX_HTTP_LLM_OVER_TOKENS;
        v->retry = (need - node->tok.level + v->caps.tokens_per_minute - 1)
                   / v->caps.tokens_per_minute;

    } else if (v->caps.max_concurrent
               && (node->active >= v->caps.max_concurrent || behind))
    {
        v->status = NGX_HTTP_LLM_OVER_CONCURRENCY;

    } else {
        v->status = NGX_HTTP_LLM_OK;
    }

    if (v->status == NGX_HTTP_LLM_OK) {
        if (v->caps.requests_per_minute) {
            node->req.level = ngx_max(node->req.level - NGX_HTTP_LLM_W, 0);
        }

        if (v->caps.tokens_per_minute) {
            node->tok.level = ngx_max(node->tok.level - need, 0);
        }

        node->active++;

        /* the slot and the end of the wait, at once for the others */

        if (ctx->admit.ticket
            && (t = ngx_http_llm_line_find(node, ctx->admit.ticket)))
        {
            ngx_http_llm_line_drop(z, node, t);
        }

    } else if (v->status == NGX_HTTP_LLM_OVER_CONCURRENCY
               && ctx->admit.ticket == 0
               && ngx_http_llm_limits_has_line(ctx)
               && (ngx_msec_int_t) lcf->queue_timeout > 0)
    {
        /* last in line, in the same breath as the verdict */
        ngx_http_llm_line_take(z, node, ctx, now);
    }

    v->req_level = node->req.level;
    v->tok_level = node->tok.level;
    v->active = node->active;

    ngx_shmtx_unlock(&z->shpool->mutex);

    if (v->status == NGX_HTTP_LLM_OK) {
        ctx->admit.where = NGX_HTTP_LLM_ADMIT_LOCAL;
        ctx->admit.tokens_per_minute = v->caps.tokens_per_minute;
    }

    return NGX_OK;
}


/* ---- the line for concurrency slots -------------------------------------- */

/*
 * Whether ctx must let earlier waiters of its tenant on this host go
 * first: any waiter, for a request without a ticket; one with an
 * earlier ticket, for one with a ticket, which is refreshed here (and
 * put back in its place if it was dropped as stale while its worker was
 * slow).  The zone is locked.
 */

static ngx_uint_t
ngx_http_llm_line_behind(ngx_http_llm_zone_t *z,
    ngx_http_llm_limits_node_t *node, ngx_http_llm_ctx_t *ctx,
    ngx_msec_t now)
{
    ngx_http_llm_ticket_t  *t;

    ngx_http_llm_line_purge(z, node, now);

    if (ctx->admit.ticket == 0) {
        return !ngx_queue_empty(&node->line);
    }

    t = ngx_http_llm_line_find(node, ctx->admit.ticket);

    if (t == NULL) {
        t = ngx_http_llm_line_insert(z, node, ctx->admit.ticket, now);

        if (t == NULL) {
            return !ngx_queue_empty(&node->line);
        }
    }

    t->seen = now;

    return ngx_queue_head(&node->line) != &t->queue;
}


/* A new ticket for ctx, last in line, if the line has room. */

static void
ngx_http_llm_line_take(ngx_http_llm_zone_t *z,
    ngx_http_llm_limits_node_t *node, ngx_http_llm_ctx_t *ctx,
    ngx_msec_t now)
{
    ngx_http_llm_ticket_t  *t;

    ngx_http_llm_line_purge(z, node, now);

    if (node->queued >= ctx->tenant->limits.max_queued) {
        return;
    }

    t = ngx_http_llm_line_insert(z, node, 0, now);

    if (t) {
        ctx->admit.ticket = t->ticket;
    }
}


/* A ticket in its place (0: a new one, last in line); NULL: no memory. */

static ngx_http_llm_ticket_t *
ngx_http_llm_line_insert(ngx_http_llm_zone_t *z,
    ngx_http_llm_limits_node_t *node, uint64_t ticket, ngx_msec_t now)
{
    ngx_queue_t            *q;
    ngx_http_llm_ticket_t  *t, *prev;

    t = ngx_slab_alloc_locked(z->shpool, sizeof(ngx_http_llm_ticket_t));
    if (t == NULL) {
        return NULL;
    }

    if (ticket == 0) {
        ticket = ++node->next_ticket;
    }

    t->ticket = ticket;
    t->seen = now;

    for (q = ngx_queue_last(&node->line);
         q != ngx_queue_sentinel(&node->line);
         q = ngx_queue_prev(q))
    {
        prev = ngx_queue_data(q, ngx_http_llm_ticket_t, queue);

        if (prev->ticket < ticket) {
            break;
        }
    }

    ngx_queue_insert_after(q, &t->queue);
    node->queued++;

    return t;
}


static ngx_http_llm_ticket_t *
ngx_http_llm_line_find(ngx_http_llm_limits_node_t *node, uint64_t ticket)
{
    ngx_queue_t            *q;
    ngx_http_llm_ticket_t  *t;

    for (q = ngx_queue_head(&node->line);
         q != ngx_queue_sentinel(&node->line);
         q = ngx_queue_next(q))
    {
        t = ngx_queue_data(q, ngx_http_llm_ticket_t, queue);

        if (t->ticket == ticket) {
            return t;
        }
    }

    return NULL;
}


static void
ngx_http_llm_line_drop(ngx_http_llm_zone_t *z,
    ngx_http_llm_limits_node_t *node, ngx_http_llm_ticket_t *t)
{
    ngx_queue_remove(&t->queue);
    ngx_slab_free_locked(z->shpool, t);

    if (node->queued) {
        node->queued--;
    }
}


/* Tickets whose waiters stopped polling: their worker died. */

static void
ngx_http_llm_line_purge(ngx_http_llm_zone_t *z,
    ngx_http_llm_limits_node_t *node, ngx_msec_t now)
{
    ngx_queue_t            *q, *next;
    ngx_http_llm_ticket_t  *t;

    for (q = ngx_queue_head(&node->line);
         q != ngx_queue_sentinel(&node->line);
         q = next)
    {
        next = ngx_queue_next(q);
        t = ngx_queue_data(q, ngx_http_llm_ticket_t, queue);

        if ((ngx_msec_int_t) (now - t->seen) > NGX_HTTP_LLM_STALE) {
            ngx_http_llm_line_drop(z, node, t);
        }
    }
}


/* ---- admission in Redis ------------------------------------------------- */

static ngx_int_t
ngx_http_llm_limits_redis(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_uint_t behind)
{
    u_char                       *p, k1[160], k2[160], a[5][NGX_INT64_LEN];
    ngx_int_t                     rc;
    ngx_uint_t                    i;
    const char                   *argv[10];
    size_t                        argvlen[10];
    ngx_http_llm_tenant_t        *t;
    ngx_http_llm_limits_op_t     *op;
    ngx_http_llm_main_conf_t     *lmcf;
    ngx_http_llm_limits_conf_t   *lcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_llm_module);
    lcf = &lmcf->limits;
    t = ctx->tenant;

    op = ngx_alloc(sizeof(ngx_http_llm_limits_op_t), r->connection->log);
    if (op == NULL) {
        return NGX_ERROR;
    }

    op->ctx = ctx;
    op->release = 0;
    op->caps = t->limits;
    op->reserved = ctx->admit.reserved;
    op->name_len = ngx_min(t->name.len, sizeof(op->name));
    ngx_memcpy(op->name, t->name.data, op->name_len);

    /* a slot name unique among hosts: host, pid, sequence */

    op->member_len = ngx_snprintf(op->member, sizeof(op->member),
                                  "%V:%P:%ui:%M",
                                  &ngx_cycle->hostname, ngx_pid,
                                  ++ngx_http_llm_limits_seq,
                                  (ngx_msec_t) ngx_time())
                     - op->member;

    argv[0] = "2";
    argvlen[0] = 1;

    p = ngx_snprintf(k1, sizeof(k1), "%Vrl:{%V}", &lmcf->redis->prefix,
                     &t->name);
    argv[1] = (const char *) k1;
    argvlen[1] = p - k1;

    p = ngx_snprintf(k2, sizeof(k2), "%Vcc:{%V}", &lmcf->redis->prefix,
                     &t->name);
    argv[2] = (const char *) k2;
    argvlen[2] = p - k2;

    argvlen[3] = ngx_sprintf(a[0], "%ui", t->limits.requests_per_minute)
                 - a[0];
    argvlen[4] = ngx_sprintf(a[1], "%ui", t->limits.tokens_per_minute) - a[1];
    argvlen[5] = ngx_sprintf(a[2], "%ui", ctx->admit.reserved) - a[2];
    argvlen[6] = ngx_sprintf(a[3], "%ui", t->limits.max_concurrent) - a[3];
    argvlen[7] = ngx_sprintf(a[4], "%M", lcf->lease) - a[4];

    for (i = 0; i < 5; i++) {
        argv[3 + i] = (const char *) a[i];
    }

    argv[8] = (const char *) op->member;
    argvlen[8] = op->member_len;

    argv[9] = behind ? "1" : "0";
    argvlen[9] = 1;

    rc = ngx_http_llm_redis_eval(&ngx_http_llm_acquire_script,
                                 ngx_http_llm_limits_redis_handler, op, 10,
                                 argv, argvlen);

    if (rc != NGX_OK) {
        ngx_free(op);
        return NGX_DECLINED;
    }

    ctx->admit.op = op;

    return NGX_OK;
}


static void
ngx_http_llm_limits_redis_handler(void *data, void *reply)
{
    ngx_http_llm_limits_op_t *op = data;

    ngx_int_t                rc;
    ngx_str_t                name;
    ngx_uint_t               i;
    redisReply              *rr, *e;
    ngx_connection_t        *c;
    ngx_http_request_t      *r;
    ngx_http_llm_ctx_t      *ctx;
    ngx_http_llm_error_t     err;
    ngx_http_llm_verdict_t   v;
    int64_t                  n[5];

    rr = reply;
    ctx = op->ctx;

    if (op->release) {
        if (rr == NULL || rr->type == REDIS_REPLY_ERROR) {
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                          "llm: Redis limits: the end of a request of "
                          "\"%*s\" was not counted%s%*s", op->name_len,
                          op->name, rr ? ": " : "",
                          rr ? (size_t) rr->len : 0, rr ? rr->str : "");
        }

        ngx_free(op);
        return;
    }

    /* the reply: {status, requests level, tokens level, retry, active} */

    if (rr && rr->type == REDIS_REPLY_ARRAY && rr->elements == 5) {
        for (i = 0; i < 5; i++) {
            e = rr->element[i];

            if (e->type != REDIS_REPLY_INTEGER) {
                break;
            }

            n[i] = e->integer;
        }

        if (i < 5) {
            rr = NULL;
        }

    } else {
        if (rr) {
            ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                          "llm: Redis limits script failed: %*s",
                          rr->type == REDIS_REPLY_ERROR ? (size_t) rr->len
                                                        : 0,
                          rr->type == REDIS_REPLY_ERROR ? rr->str : "");
        }

        rr = NULL;
    }

    if (ctx == NULL) {
        /* the client left: give back what was taken */

        if (rr && n[0] == NGX_HTTP_LLM_OK) {
            op->release = 1;

            name.data = op->name;
            name.len = op->name_len;

            if (ngx_http_llm_limits_send_release(&name,
                                                 op->caps.tokens_per_minute,
                                                 op->reserved, op->member,
                                                 op->member_len, op)
                == NGX_OK)
            {
                return;
            }
        }

        ngx_free(op);
        return;
    }

    ctx->admit.op = NULL;
    r = ctx->request;
    c = r->connection;

    if (rr == NULL) {
        rc = ngx_http_llm_limits_unreachable(r, ctx, &err);
        goto decided;
    }

    ngx_memzero(&v, sizeof(ngx_http_llm_verdict_t));

    v.status = (ngx_uint_t) n[0];
    v.caps = op->caps;
    v.req_level = n[1];
    v.tok_level = n[2];
    v.retry = (ngx_msec_t) n[3];
    v.active = (ngx_uint_t) n[4];
    v.requested = op->reserved;

    if (v.status == NGX_HTTP_LLM_OK) {
        ctx->admit.where = NGX_HTTP_LLM_ADMIT_REDIS;
        ctx->admit.tokens_per_minute = op->caps.tokens_per_minute;

        ctx->admit.member.data = ngx_pnalloc(r->pool, op->member_len);
        if (ctx->admit.member.data) {
            ngx_memcpy(ctx->admit.member.data, op->member, op->member_len);
            ctx->admit.member.len = op->member_len;

            if (op->caps.max_concurrent) {
                ngx_http_llm_limits_hold(ctx);
            }
        }
    }

    ngx_free(op);
    op = NULL;

    rc = ngx_http_llm_limits_decide(r, ctx, &v, &err);

decided:

    if (op) {
        ngx_free(op);
    }

    switch (rc) {

    case NGX_OK:
        ngx_http_llm_continue(r);
        break;

    case NGX_AGAIN:
        break;

    case NGX_DECLINED:
        ngx_http_finalize_request(r, ngx_http_llm_send_error(r, &err));
        break;

    default:
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        break;
    }

    ngx_http_run_posted_requests(c);
}


/* Redis is away: llm_limits_fail. */

static ngx_int_t
ngx_http_llm_limits_unreachable(ngx_http_request_t *r,
    ngx_http_llm_ctx_t *ctx, ngx_http_llm_error_t *err)
{
    ngx_http_llm_verdict_t       v;
    ngx_http_llm_limits_conf_t  *lcf;

    static ngx_str_t  one = ngx_string("1");

    lcf = ngx_http_llm_limits_conf();

    switch (lcf->fail) {

    case NGX_HTTP_LLM_FAIL_CLOSED:
        ctx->reject = NGX_HTTP_LLM_REJECT_UNAVAILABLE;
        ngx_http_llm_add_header(r, "Retry-After", &one);
        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_SERVICE_UNAVAILABLE,
                               "server_error", NULL,
                               "rate_limiter_unavailable",
                               "The rate limiter is not available right "
                               "now; please retry.");
        return NGX_DECLINED;

    case NGX_HTTP_LLM_FAIL_OPEN:
        if (ngx_http_llm_limits_local(r, ctx, 0, 0, &v) != NGX_OK) {
            return NGX_ERROR;
        }

        return ngx_http_llm_limits_decide(r, ctx, &v, err);

    default: /* NGX_HTTP_LLM_FAIL_LOCAL */
        if (ngx_http_llm_limits_local(r, ctx, 0, 1, &v) != NGX_OK) {
            return NGX_ERROR;
        }

        return ngx_http_llm_limits_decide(r, ctx, &v, err);
    }
}


/* ---- the verdict -------------------------------------------------------- */

static ngx_int_t
ngx_http_llm_limits_decide(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx,
    ngx_http_llm_verdict_t *v, ngx_http_llm_error_t *err)
{
    u_char                       wait[64], *p;
    ngx_str_t                    s;
    ngx_msec_t                   now;
    ngx_uint_t                   used;
    ngx_http_llm_zone_t         *z;
    ngx_http_llm_tenant_t       *t;
    ngx_http_llm_limits_node_t  *node;
    ngx_http_llm_limits_conf_t  *lcf;

    lcf = ngx_http_llm_limits_conf();
    t = ctx->tenant;
    now = ngx_current_msec;

    if (v->status == NGX_HTTP_LLM_OK) {

        ngx_http_llm_limits_dequeue(ctx);

        if (ctx->admit.where == NGX_HTTP_LLM_ADMIT_REDIS) {
            /* this host's count too: for the fallback */

            z = lcf->shm_zone->data;

            ngx_shmtx_lock(&z->shpool->mutex);

            node = ngx_http_llm_zone_lookup(z, &t->name, 1);
            if (node) {
                node->active++;
            }

            ngx_shmtx_unlock(&z->shpool->mutex);
        }

        ctx->admit.done = 1;
        ngx_http_llm_limits_headers(r, v);

        return NGX_OK;
    }

    /* concurrency: wait for a slot if the tenant has a queue */

    if (v->status == NGX_HTTP_LLM_OVER_CONCURRENCY
        && t->limits.max_queued
        && (ctx->admit.queued || (ngx_msec_int_t) lcf->queue_timeout > 0))
    {
        if (ctx->admit.queued) {
            if ((ngx_msec_int_t) (ctx->admit.deadline - now) > 0) {
                ngx_add_timer(&ctx->admit.wait,
                              ngx_min(NGX_HTTP_LLM_POLL,
                                      ctx->admit.deadline - now));
                return NGX_AGAIN;
            }

            ngx_http_llm_limits_dequeue(ctx);
            goto refuse;
        }

        /* a ticket, last in the tenant's line on this host */

        if (ctx->admit.ticket == 0) {
            z = lcf->shm_zone->data;

            ngx_shmtx_lock(&z->shpool->mutex);

            node = ngx_http_llm_zone_lookup(z, &t->name, 1);
            if (node) {
                ngx_http_llm_line_take(z, node, ctx, now);
            }

            ngx_shmtx_unlock(&z->shpool->mutex);
        }

        if (ctx->admit.ticket) {
            ngx_http_llm_limits_enqueue(r, ctx);

            ngx_add_timer(&ctx->admit.wait,
                          ngx_min(NGX_HTTP_LLM_POLL, lcf->queue_timeout));

            ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                           "llm: tenant \"%V\" queued for a slot, "
                           "ticket %uL", &t->name, ctx->admit.ticket);

            return NGX_AGAIN;
        }
    }

    ngx_http_llm_limits_dequeue(ctx);

refuse:

    ngx_http_llm_limits_headers(r, v);

    if (v->status != NGX_HTTP_LLM_TOO_LARGE) {
        s.data = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
        if (s.data == NULL) {
            return NGX_ERROR;
        }

        s.len = ngx_sprintf(s.data, "%M",
                            (ngx_msec_t) ngx_max((v->retry + 999) / 1000, 1))
                - s.data;
        ngx_http_llm_add_header(r, "Retry-After", &s);
    }

    p = ngx_http_llm_duration(wait, v->retry ? v->retry : 1000);
    *p = '\0';

    switch (v->status) {

    case NGX_HTTP_LLM_OVER_REQUESTS:
        ctx->reject = NGX_HTTP_LLM_REJECT_REQUESTS;
        used = v->caps.requests_per_minute
               - (ngx_uint_t) (v->req_level / NGX_HTTP_LLM_W);

        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_TOO_MANY_REQUESTS,
                               "requests", NULL, "rate_limit_exceeded",
                               "Rate limit reached for %V on requests per "
                               "min (RPM): Limit %ui, Used %ui, Requested 1. "
                               "Please try again in %s.",
                               &t->name, v->caps.requests_per_minute, used,
                               wait);
        break;

    case NGX_HTTP_LLM_OVER_TOKENS:
        ctx->reject = NGX_HTTP_LLM_REJECT_TOKENS;
        used = v->caps.tokens_per_minute
               - (ngx_uint_t) (v->tok_level / NGX_HTTP_LLM_W);

        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_TOO_MANY_REQUESTS,
                               "tokens", NULL, "rate_limit_exceeded",
                               "Rate limit reached for %V on tokens per min "
                               "(TPM): Limit %ui, Used %ui, Requested %ui. "
                               "Please try again in %s.",
                               &t->name, v->caps.tokens_per_minute, used,
                               v->requested, wait);
        break;

    case NGX_HTTP_LLM_TOO_LARGE:
        ctx->reject = NGX_HTTP_LLM_REJECT_TOKENS;

        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_TOO_MANY_REQUESTS,
                               "tokens", NULL, "rate_limit_exceeded",
                               "Request too large for %V on tokens per min "
                               "(TPM): Limit %ui, Requested %ui. The input "
                               "or output tokens must be reduced in order "
                               "to run successfully.",
                               &t->name, v->caps.tokens_per_minute,
                               v->requested);
        break;

    default: /* NGX_HTTP_LLM_OVER_CONCURRENCY */
        ctx->reject = NGX_HTTP_LLM_REJECT_CONCURRENCY;

        ngx_http_llm_error_set(r->pool, err, NGX_HTTP_TOO_MANY_REQUESTS,
                               "concurrency", NULL, "rate_limit_exceeded",
                               "Rate limit reached for %V on concurrent "
                               "requests: Limit %ui, Running %ui%s. Please "
                               "try again when one of them has finished.",
                               &t->name, v->caps.max_concurrent, v->active,
                               t->limits.max_queued
                               ? ", and the queue is full or its wait "
                                 "timed out" : "");
        break;
    }

    return NGX_DECLINED;
}


static void
ngx_http_llm_limits_wait_handler(ngx_event_t *ev)
{
    ngx_http_llm_ctx_t *ctx = ev->data;

    ngx_int_t              rc;
    ngx_connection_t      *c;
    ngx_http_request_t    *r;
    ngx_http_llm_error_t   err;

    r = ctx->request;
    c = r->connection;

    if (ctx->admit.op) {
        return;         /* a retry in Redis is under way */
    }

    rc = ngx_http_llm_limits_try(r, ctx, &err);

    switch (rc) {

    case NGX_OK:
        ngx_http_llm_continue(r);
        break;

    case NGX_AGAIN:
        return;

    case NGX_DECLINED:
        ngx_http_finalize_request(r, ngx_http_llm_send_error(r, &err));
        break;

    default:
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        break;
    }

    ngx_http_run_posted_requests(c);
}


/* Waits for a slot with its ticket: polled, woken, up to the timeout. */

static void
ngx_http_llm_limits_enqueue(ngx_http_request_t *r, ngx_http_llm_ctx_t *ctx)
{
    ngx_http_llm_limits_conf_t  *lcf;

    lcf = ngx_http_llm_limits_conf();

    ctx->admit.queued = 1;
    ctx->admit.deadline = ngx_current_msec + lcf->queue_timeout;

    ctx->admit.wait.handler = ngx_http_llm_limits_wait_handler;
    ctx->admit.wait.data = ctx;
    ctx->admit.wait.log = r->connection->log;

    ngx_queue_insert_tail(&ngx_http_llm_limits_waiting, &ctx->admit.queue);
}


/*
 * Leaves the line (admitted, refused, timed out, or the client left):
 * the ticket goes at once, and this worker's next waiter of the tenant
 * looks whether it is first now.
 */

static void
ngx_http_llm_limits_dequeue(ngx_http_llm_ctx_t *ctx)
{
    ngx_http_llm_zone_t         *z;
    ngx_http_llm_ticket_t       *t;
    ngx_http_llm_limits_node_t  *node;
    ngx_http_llm_limits_conf_t  *lcf;

    if (ctx->admit.queued) {
        ctx->admit.queued = 0;
        ngx_queue_remove(&ctx->admit.queue);

        if (ctx->admit.wait.timer_set) {
            ngx_del_timer(&ctx->admit.wait);
        }

        if (ctx->admit.wait.posted) {
            ngx_delete_posted_event(&ctx->admit.wait);
        }
    }

    if (ctx->admit.ticket == 0) {
        return;
    }

    lcf = ngx_http_llm_limits_conf();
    z = lcf->shm_zone->data;

    ngx_shmtx_lock(&z->shpool->mutex);

    node = ngx_http_llm_zone_lookup(z, &ctx->tenant->name, 0);

    if (node && (t = ngx_http_llm_line_find(node, ctx->admit.ticket))) {
        ngx_http_llm_line_drop(z, node, t);
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    ctx->admit.ticket = 0;

    ngx_http_llm_limits_wake(&ctx->tenant->name);
}


/*
 * A slot of this tenant freed here, or its line moved: its first waiter
 * here (the one with the earliest ticket of this worker) tries now.
 */

static void
ngx_http_llm_limits_wake(ngx_str_t *name)
{
    ngx_queue_t         *q;
    ngx_http_llm_ctx_t  *ctx;

    for (q = ngx_queue_head(&ngx_http_llm_limits_waiting);
         q != ngx_queue_sentinel(&ngx_http_llm_limits_waiting);
         q = ngx_queue_next(q))
    {
        ctx = ngx_queue_data(q, ngx_http_llm_ctx_t, admit.queue);

        if (ctx->tenant->name.len != name->len
            || ngx_strncmp(ctx->tenant->name.data, name->data, name->len)
               != 0
            || ctx->admit.op || ctx->admit.wait.posted)
        {
            continue;
        }

        if (ctx->admit.wait.timer_set) {
            ngx_del_timer(&ctx->admit.wait);
        }

        ngx_post_event(&ctx->admit.wait, &ngx_posted_events);
        return;
    }
}


/* ---- headers ------------------------------------------------------------ */

/* The OpenAI-style trio of one limit: its cap, what is left and when it
 * is full again (the bucket refills at cap per minute). */

static ngx_int_t
ngx_http_llm_limit_headers(ngx_http_request_t *r, ngx_uint_t cap,
    int64_t level, const char *limit, const char *remaining,
    const char *reset)
{
    u_char     *p;
    int64_t     full;
    ngx_str_t   s;

    level = ngx_max(level, 0);
    full = (int64_t) cap * NGX_HTTP_LLM_W;

    p = ngx_pnalloc(r->pool, 3 * NGX_INT64_LEN + 64);
    if (p == NULL) {
        return NGX_ERROR;
    }

    s.data = p;
    s.len = ngx_sprintf(p, "%ui", cap) - p;
    ngx_http_llm_add_header(r, limit, &s);

    s.data += s.len;
    s.len = ngx_sprintf(s.data, "%L", level / NGX_HTTP_LLM_W) - s.data;
    ngx_http_llm_add_header(r, remaining, &s);

    s.data += s.len;
    s.len = ngx_http_llm_duration(s.data,
                                  (ngx_msec_t) ((full - level + cap - 1)
                                                / cap))
            - s.data;
    ngx_http_llm_add_header(r, reset, &s);

    return NGX_OK;
}


static void
ngx_http_llm_limits_headers(ngx_http_request_t *r, ngx_http_llm_verdict_t *v)
{
    if (v->caps.requests_per_minute
        && ngx_http_llm_limit_headers(r, v->caps.requests_per_minute,
                                      v->req_level,
                                      "x-ratelimit-limit-requests",
                                      "x-ratelimit-remaining-requests",
                                      "x-ratelimit-reset-requests")
           != NGX_OK)
    {
        return;
    }

    if (v->caps.tokens_per_minute) {
        (void) ngx_http_llm_limit_headers(r, v->caps.tokens_per_minute,
                                          v->tok_level,
                                          "x-ratelimit-limit-tokens",
                                          "x-ratelimit-remaining-tokens",
                                          "x-ratelimit-reset-tokens");
    }
}


/*
 * A duration as OpenAI writes it (Go's format): "0s", "350ms", "1s",
 * "1.5s", "6m0s", "1h2m3s".  At most 32 bytes.
 */

u_char *
ngx_http_llm_duration(u_char *p, ngx_msec_t ms)
{
    ngx_msec_t  h, m, s, f;

    if (ms == 0) {
        return ngx_cpymem(p, "0s", 2);
    }

    if (ms < 1000) {
        return ngx_sprintf(p, "%Mms", ms);
    }

    h = ms / 3600000;
    m = ms / 60000 % 60;
    s = ms / 1000 % 60;
    f = ms % 1000;

    if (h) {
        p = ngx_sprintf(p, "%Mh", h);
    }

    if (h || m) {
        p = ngx_sprintf(p, "%Mm", m);
    }

    p = ngx_sprintf(p, "%M", s);

    if (f) {
        /* ".5", ".25", ".125": no trailing zeros */
        if (f % 100 == 0) {
            p = ngx_sprintf(p, ".%M", f / 100);

        } else if (f % 10 == 0) {
            p = ngx_sprintf(p, ".%02M", f / 10);

        } else {
            p = ngx_sprintf(p, ".%03M", f);
        }
    }

    *p++ = 's';

    return p;
}


/* ---- the end of a request ----------------------------------------------- */

/*
 * Gives back the unused completion tokens and the concurrency slot, or
 * leaves the queue.  Idempotent; called from the request's cleanup.
 */

void
ngx_http_llm_limits_release(ngx_http_llm_ctx_t *ctx)
{
    ngx_msec_t                   now;
    ngx_uint_t                   used, refund;
    ngx_http_llm_zone_t         *z;
    ngx_http_llm_limits_op_t    *op;
    ngx_http_llm_limits_node_t  *node;
    ngx_http_llm_limits_conf_t  *lcf;

    op = ctx->admit.op;

    if (op) {
        /* its reply gives the slot back if it was granted */
        op->ctx = NULL;
        ctx->admit.op = NULL;
    }

    ngx_http_llm_limits_dequeue(ctx);

    if (ctx->admit.held) {
        ngx_queue_remove(&ctx->admit.lease);
        ctx->admit.held = 0;
    }

    if (ctx->admit.where == NGX_HTTP_LLM_ADMIT_NONE) {
        return;
    }

    lcf = ngx_http_llm_limits_conf();
    z = lcf->shm_zone->data;

    /*
     * A request the engine never took gives back its prompt too; a
     * prompt cache hit with llm_prompt_cache_charge on keeps what the
     * live answer took (its reservation was exactly that).
     */

    used = (ctx->submitted || ctx->pcache.charged)
           ? ctx->prompt_tokens + ctx->completion_tokens : 0;
    refund = ctx->admit.reserved > used ? ctx->admit.reserved - used : 0;

    now = ngx_current_msec;

    ngx_shmtx_lock(&z->shpool->mutex);

    node = ngx_http_llm_zone_lookup(z, &ctx->tenant->name, 0);

    if (node) {
        if (node->active) {
            node->active--;
        }

        if (ctx->admit.where == NGX_HTTP_LLM_ADMIT_LOCAL
            && ctx->admit.tokens_per_minute && refund)
        {
            ngx_http_llm_bucket_refill(&node->tok,
                                       ctx->admit.tokens_per_minute, now);

            node->tok.level = ngx_min(node->tok.level
                                      + (int64_t) refund * NGX_HTTP_LLM_W,
                                      (int64_t) node->tok.cap
                                      * NGX_HTTP_LLM_W);
        }
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    if (ctx->admit.where == NGX_HTTP_LLM_ADMIT_REDIS) {
        ngx_http_llm_limits_release_redis(ctx, refund);
    }

    ctx->admit.where = NGX_HTTP_LLM_ADMIT_NONE;

    ngx_http_llm_limits_wake(&ctx->tenant->name);
}


static void
ngx_http_llm_limits_release_redis(ngx_http_llm_ctx_t *ctx, ngx_uint_t refund)
{
    ngx_http_llm_tenant_t     *t;
    ngx_http_llm_limits_op_t  *op;

    t = ctx->tenant;

    if (refund == 0 && ctx->admit.member.len == 0) {
        return;
    }

    op = ngx_alloc(sizeof(ngx_http_llm_limits_op_t), ngx_cycle->log);
    if (op == NULL) {
        return;
    }

    op->ctx = NULL;
    op->release = 1;
    op->name_len = ngx_min(t->name.len, sizeof(op->name));
    ngx_memcpy(op->name, t->name.data, op->name_len);

    if (ngx_http_llm_limits_send_release(&t->name,
                                         ctx->admit.tokens_per_minute,
                                         refund, ctx->admit.member.data,
                                         ctx->admit.member.len, op)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "llm: Redis limits: the end of a request of \"%V\" "
                      "was not counted: Redis is not connected", &t->name);
        ngx_free(op);
    }
}


/* The release script: tokens back, slot freed; op's handler follows. */

static ngx_int_t
ngx_http_llm_limits_send_release(ngx_str_t *name, ngx_uint_t tpm,
    ngx_uint_t refund, u_char *member, size_t member_len,
    ngx_http_llm_limits_op_t *op)
{
    u_char                    *p, k1[160], k2[160], a[2][NGX_INT64_LEN];
    const char                *argv[6];
    size_t                     argvlen[6];
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                               ngx_http_llm_module);

    argv[0] = "2";
    argvlen[0] = 1;

    p = ngx_snprintf(k1, sizeof(k1), "%Vrl:{%V}", &lmcf->redis->prefix,
                     name);
    argv[1] = (const char *) k1;
    argvlen[1] = p - k1;

    p = ngx_snprintf(k2, sizeof(k2), "%Vcc:{%V}", &lmcf->redis->prefix,
                     name);
    argv[2] = (const char *) k2;
    argvlen[2] = p - k2;

    argvlen[3] = ngx_sprintf(a[0], "%ui", tpm) - a[0];
    argv[3] = (const char *) a[0];
    argvlen[4] = ngx_sprintf(a[1], "%ui", refund) - a[1];
    argv[4] = (const char *) a[1];

    argv[5] = member ? (const char *) member : "";
    argvlen[5] = member ? member_len : 0;

    return ngx_http_llm_redis_eval(&ngx_http_llm_release_script,
                                   ngx_http_llm_limits_redis_handler, op, 6,
                                   argv, argvlen);
}


void
ngx_http_llm_limits_exit_process(ngx_cycle_t *cycle)
{
    /* queued requests are finalized with their connections */
}


/* ---- renewing the leases of Redis slots ---------------------------------- */

/*
 * A request admitted in Redis holds its slot until it ends; the slot's
 * lease is renewed from here every lease / 3 while it runs.  The timer
 * runs only while this worker holds slots, and does not keep an exiting
 * worker alive.
 */

static void
ngx_http_llm_limits_hold(ngx_http_llm_ctx_t *ctx)
{
    ngx_http_llm_limits_conf_t  *lcf;

    lcf = ngx_http_llm_limits_conf();

    ctx->admit.renewed = ngx_current_msec;
    ctx->admit.renew_tick = ngx_http_llm_limits_renew_tick;
    ctx->admit.held = 1;

    ngx_queue_insert_tail(&ngx_http_llm_limits_held, &ctx->admit.lease);

    if (!ngx_http_llm_limits_renew_ev.timer_set) {
        ngx_http_llm_limits_renew_ev.handler =
                                           ngx_http_llm_limits_renew_handler;
        ngx_http_llm_limits_renew_ev.log = ngx_cycle->log;
        ngx_http_llm_limits_renew_ev.cancelable = 1;

        ngx_add_timer(&ngx_http_llm_limits_renew_ev, lcf->lease / 3);
    }
}


static void
ngx_http_llm_limits_renew_handler(ngx_event_t *ev)
{
    ngx_msec_t                   now, tick;
    ngx_queue_t                 *q;
    ngx_http_llm_ctx_t          *ctx;
    ngx_http_llm_limits_conf_t  *lcf;

    if (ngx_queue_empty(&ngx_http_llm_limits_held)) {
        return;
    }

    lcf = ngx_http_llm_limits_conf();
    tick = lcf->lease / 3;
    now = ngx_current_msec;

    /* a slot is renewed once a tick, with the others of its tenant */

    ngx_http_llm_limits_renew_tick++;

    for (q = ngx_queue_head(&ngx_http_llm_limits_held);
         q != ngx_queue_sentinel(&ngx_http_llm_limits_held);
         q = ngx_queue_next(q))
    {
        ctx = ngx_queue_data(q, ngx_http_llm_ctx_t, admit.lease);

        if (ctx->admit.renew_tick == ngx_http_llm_limits_renew_tick) {
            continue;
        }

        if (ngx_http_llm_limits_renew(ctx, tick, now) != NGX_OK) {
            /* Redis away: next tick; the slots keep their expiry */
            break;
        }
    }

    ngx_add_timer(ev, tick);
}


/*
 * Renews first's slot and those of its tenant after it in the list that
 * are due (not leased in the last half tick), in one script.
 */

static ngx_int_t
ngx_http_llm_limits_renew(ngx_http_llm_ctx_t *first, ngx_uint_t tick,
    ngx_msec_t now)
{
    u_char                      *p, key[160], lease[NGX_INT64_LEN];
    size_t                      *argvlen;
    ngx_int_t                    rc;
    ngx_str_t                   *name;
    ngx_uint_t                   n, gen;
    ngx_queue_t                 *q;
    const char                 **argv;
    ngx_http_llm_ctx_t          *ctx;
    ngx_http_llm_renew_op_t     *op;
    ngx_http_llm_main_conf_t    *lmcf;

    static const char           *av[3 + NGX_HTTP_LLM_RENEW_MAX];
    static size_t                avlen[3 + NGX_HTTP_LLM_RENEW_MAX];

    lmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                               ngx_http_llm_module);

    argv = av;
    argvlen = avlen;
    gen = ngx_http_llm_limits_renew_tick;
    name = &first->tenant->name;

    /* numkeys, the set, the lease, then members */

    argv[0] = "1";
    argvlen[0] = 1;

    p = ngx_snprintf(key, sizeof(key), "%Vcc:{%V}", &lmcf->redis->prefix,
                     name);
    argv[1] = (const char *) key;
    argvlen[1] = p - key;

    argvlen[2] = ngx_sprintf(lease, "%M", lmcf->limits.lease) - lease;
    argv[2] = (const char *) lease;

    n = 0;

    for (q = &first->admit.lease;
         q != ngx_queue_sentinel(&ngx_http_llm_limits_held)
         && n < NGX_HTTP_LLM_RENEW_MAX;
         q = ngx_queue_next(q))
    {
        ctx = ngx_queue_data(q, ngx_http_llm_ctx_t, admit.lease);

        if (ctx->admit.renew_tick == gen
            || ctx->tenant->name.len != name->len
            || ngx_strncmp(ctx->tenant->name.data, name->data, name->len)
               != 0)
        {
            continue;
        }

        ctx->admit.renew_tick = gen;

        if ((ngx_msec_int_t) (now - ctx->admit.renewed)
            < (ngx_msec_int_t) (tick / 2))
        {
            continue;
        }

        argv[3 + n] = (const char *) ctx->admit.member.data;
        argvlen[3 + n] = ctx->admit.member.len;
        n++;
    }

    if (n == 0) {
        return NGX_OK;
    }

    op = ngx_alloc(sizeof(ngx_http_llm_renew_op_t), ngx_cycle->log);
    if (op == NULL) {
        return NGX_ERROR;
    }

    op->name_len = ngx_min(name->len, sizeof(op->name));
    ngx_memcpy(op->name, name->data, op->name_len);

    rc = ngx_http_llm_redis_eval(&ngx_http_llm_renew_script,
                                 ngx_http_llm_limits_renew_reply, op,
                                 3 + n, argv, argvlen);

    if (rc != NGX_OK) {
        ngx_free(op);

        if (!ngx_http_llm_limits_renew_failed) {
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                          "llm: Redis limits: concurrency slots of \"%V\" "
                          "not renewed: Redis is not connected", name);
            ngx_http_llm_limits_renew_failed = 1;
        }

        return NGX_DECLINED;
    }

    /* sent: the slots are leased again (or the next tick retries) */

    for (q = &first->admit.lease;
         q != ngx_queue_sentinel(&ngx_http_llm_limits_held);
         q = ngx_queue_next(q))
    {
        ctx = ngx_queue_data(q, ngx_http_llm_ctx_t, admit.lease);

        if (ctx->admit.renew_tick == gen
            && ctx->tenant->name.len == name->len
            && ngx_strncmp(ctx->tenant->name.data, name->data, name->len)
               == 0
            && (ngx_msec_int_t) (now - ctx->admit.renewed)
               >= (ngx_msec_int_t) (tick / 2))
        {
            ctx->admit.renewed = now;
        }
    }

    return NGX_OK;
}


static void
ngx_http_llm_limits_renew_reply(void *data, void *reply)
{
    ngx_http_llm_renew_op_t *op = data;

    redisReply  *rr = reply;

    if (rr == NULL || rr->type != REDIS_REPLY_INTEGER) {
        if (!ngx_http_llm_limits_renew_failed) {
            ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                          "llm: Redis limits: concurrency slots of \"%*s\" "
                          "not renewed%s%*s", op->name_len, op->name,
                          rr ? ": " : "",
                          rr && rr->type == REDIS_REPLY_ERROR
                          ? (size_t) rr->len : 0,
                          rr && rr->type == REDIS_REPLY_ERROR
                          ? rr->str : "");
            ngx_http_llm_limits_renew_failed = 1;
        }

        ngx_free(op);
        return;
    }

    ngx_http_llm_limits_renew_failed = 0;

    if (rr->integer > 0) {
        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "llm: Redis limits: %L concurrency slots of \"%*s\" "
                      "had expired before their renewal (Redis away for "
                      "longer than llm_limits_lease?)", (int64_t) rr->integer,
                      op->name_len, op->name);
    }

    ngx_free(op);
}


/* ---- buckets ------------------------------------------------------------ */

/* Refills a bucket up to now; a new or changed limit starts full. */

static void
ngx_http_llm_bucket_refill(ngx_http_llm_bucket_t *b, uint64_t cap,
    ngx_msec_t now)
{
    int64_t  full;

    full = (int64_t) cap * NGX_HTTP_LLM_W;

    if (b->cap != cap) {
        b->level = (b->cap == 0) ? full : ngx_min(b->level, full);
        b->cap = cap;
        b->last = now;
        return;
    }

    if ((ngx_msec_int_t) (now - b->last) > 0) {
        b->level += (int64_t) (now - b->last) * (int64_t) cap;
        b->last = now;
    }

    if (b->level > full) {
        b->level = full;
    }
}
