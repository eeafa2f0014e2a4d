
/*
 * Redis from the NGINX event loop.
 *
 *   llm_redis 127.0.0.1:6379 [db=N] [password=S] [prefix=S]
 *             [connect_timeout=TIME] [timeout=TIME];
 *   llm_redis unix:/run/redis.sock ...;
 *
 * Two layers:
 *
 * The adapter plugs a hiredis async context into ngx_event, as hiredis'
 * own adapters do for libevent or libuv: the hooks addRead, delRead,
 * addWrite, delWrite and cleanup turn into ngx_add_event/ngx_del_event on
 * a connection taken with ngx_get_connection() for the hiredis socket.
 * hiredis 0.14 (Debian 12) has no timers of its own: the adapter keeps a
 * connect timeout, and a command timeout that runs while replies are
 * owed (no progress for "timeout" drops the connection; the pending
 * callbacks then get NULL replies).  It refuses a double attach, keeps
 * its hooks idempotent with a flags mask and, when hiredis frees the
 * context from inside one of the adapter's event handlers, defers its
 * own destruction to the end of that handler (ENTERED / DELETED).
 *
 * Events are level-triggered: hiredis reads at most one buffer per
 * redisAsyncHandleRead(), so with edge-triggered epoll (what
 * ngx_handle_read_event() asks for) a burst of replies larger than that
 * buffer would wait for the next unrelated event.
 *
 * The client keeps one connection per worker, reconnects with an
 * exponential backoff (100 ms to 5 s) and never waits: a command while
 * Redis is down fails at once (NGX_DECLINED) and the caller falls back
 * as configured.  The address is resolved at configuration time, so
 * hiredis' connect never needs the resolver.  EVALSHA goes first; a
 * NOSCRIPT answer (a restarted or flushed Redis) resends the script with
 * EVAL.
 */


#include "ngx_http_llm_module.h"

#include <ngx_sha1.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>


#define NGX_HTTP_LLM_REDIS_READING    0x01
#define NGX_HTTP_LLM_REDIS_WRITING    0x02
#define NGX_HTTP_LLM_REDIS_ENTERED    0x04
#define NGX_HTTP_LLM_REDIS_DELETED    0x08

#define NGX_HTTP_LLM_REDIS_DOWN        0
#define NGX_HTTP_LLM_REDIS_CONNECTING  1
#define NGX_HTTP_LLM_REDIS_READY       2

#define NGX_HTTP_LLM_REDIS_BACKOFF_MIN 100
#define NGX_HTTP_LLM_REDIS_BACKOFF_MAX 5000


/* ---- the adapter -------------------------------------------------------- */

typedef struct {
    redisAsyncContext             *ac;
    ngx_connection_t              *c;
    ngx_event_t                    timer;
    ngx_msec_t                     connect_timeout;
    ngx_msec_t                     timeout;
    ngx_uint_t                     flags;
    ngx_log_t                     *log;
} ngx_http_llm_redis_events_t;


/* ---- the client --------------------------------------------------------- */

typedef struct {
    ngx_http_llm_redis_conf_t     *conf;
    redisAsyncContext             *ac;          /* NULL: down */
    ngx_uint_t                     state;
    ngx_event_t                    reconnect;
    ngx_msec_t                     backoff;
    ngx_log_t                     *log;
    unsigned                       failed:1;    /* logged since up */
    unsigned                       exiting:1;
} ngx_http_llm_redis_client_t;


typedef struct {
    ngx_http_llm_redis_handler_pt  handler;
    void                          *data;
} ngx_http_llm_redis_call_t;


typedef struct {
    ngx_http_llm_redis_handler_pt  handler;
    void                          *data;
    ngx_http_llm_redis_script_t   *script;
    int                            argc;        /* with 2 slots in front */
    const char                   **argv;
    size_t                        *argvlen;
    unsigned                       retried:1;
} ngx_http_llm_redis_eval_t;


static int ngx_http_llm_redis_attach(redisAsyncContext *ac, ngx_log_t *log,
    ngx_msec_t connect_timeout, ngx_msec_t timeout);
static void ngx_http_llm_redis_add_read(void *privdata);
static void ngx_http_llm_redis_del_read(void *privdata);
static void ngx_http_llm_redis_add_write(void *privdata);
static void ngx_http_llm_redis_del_write(void *privdata);
static void ngx_http_llm_redis_cleanup(void *privdata);
static void ngx_http_llm_redis_read_handler(ngx_event_t *rev);
static void ngx_http_llm_redis_write_handler(ngx_event_t *wev);
static void ngx_http_llm_redis_timeout_handler(ngx_event_t *ev);
static void ngx_http_llm_redis_arm(ngx_http_llm_redis_events_t *e);

static void ngx_http_llm_redis_connect(ngx_http_llm_redis_client_t *client);
static void ngx_http_llm_redis_schedule(ngx_http_llm_redis_client_t *client);
static void ngx_http_llm_redis_reconnect_handler(ngx_event_t *ev);
static void ngx_http_llm_redis_connected(const redisAsyncContext *ac,
    int status);
static void ngx_http_llm_redis_disconnected(const redisAsyncContext *ac,
    int status);
static void ngx_http_llm_redis_setup_reply(redisAsyncContext *ac,
    void *reply, void *privdata);
static void ngx_http_llm_redis_call_reply(redisAsyncContext *ac,
    void *reply, void *privdata);
static void ngx_http_llm_redis_eval_reply(redisAsyncContext *ac,
    void *reply, void *privdata);
static ngx_uint_t ngx_http_llm_redis_usable(
    ngx_http_llm_redis_client_t *client);


static ngx_http_llm_redis_client_t  *ngx_http_llm_redis_client;


/* ---- configuration ------------------------------------------------------ */

char *
ngx_http_llm_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_llm_main_conf_t *lmcf = conf;

    u_char                     *p;
    ngx_str_t                  *value, s;
    ngx_url_t                   u;
    ngx_int_t                   n;
    ngx_uint_t                  i;
    ngx_http_llm_redis_conf_t  *rcf;

    if (lmcf->redis) {
        return "is duplicate";
    }

    value = cf->args->elts;

    rcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_llm_redis_conf_t));
    if (rcf == NULL) {
        return NGX_CONF_ERROR;
    }

    rcf->name = value[1];
    rcf->connect_timeout = 1000;
    rcf->timeout = 500;
    ngx_str_set(&rcf->prefix, "llm:");

    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url = value[1];
    u.default_port = 6379;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK) {
        if (u.err) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "%s in llm_redis \"%V\"", u.err, &u.url);
        }

        return NGX_CONF_ERROR;
    }

    if (u.naddrs == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "no address for llm_redis \"%V\"", &u.url);
        return NGX_CONF_ERROR;
    }

#if (NGX_HAVE_UNIX_DOMAIN)

    if (u.family == AF_UNIX) {
        s.len = ngx_strlen(((struct sockaddr_un *) u.addrs[0].sockaddr)
                           ->sun_path);
        s.data = (u_char *) ((struct sockaddr_un *) u.addrs[0].sockaddr)
                 ->sun_path;

        rcf->path.data = ngx_pnalloc(cf->pool, s.len + 1);
        if (rcf->path.data == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_cpystrn(rcf->path.data, s.data, s.len + 1);
        rcf->path.len = s.len;

    } else
#endif
    {
        /* the numeric address: hiredis must not need the resolver */

        rcf->host.data = ngx_pnalloc(cf->pool, NGX_SOCKADDR_STRLEN + 1);
        if (rcf->host.data == NULL) {
            return NGX_CONF_ERROR;
        }

        rcf->host.len = ngx_sock_ntop(u.addrs[0].sockaddr,
                                      u.addrs[0].socklen, rcf->host.data,
                                      NGX_SOCKADDR_STRLEN, 0);
        rcf->host.data[rcf->host.len] = '\0';
        rcf->port = ngx_inet_get_port(u.addrs[0].sockaddr);
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            n = ngx_atoi(value[i].data + 3, value[i].len - 3);
            if (n == NGX_ERROR || n > 65535) {
                goto invalid;
            }

            rcf->db = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
            rcf->password.data = value[i].data + 9;
            rcf->password.len = value[i].len - 9;
            continue;
        }

        if (ngx_strncmp(value[i].data, "prefix=", 7) == 0) {
            rcf->prefix.data = value[i].data + 7;
            rcf->prefix.len = value[i].len - 7;

            for (p = rcf->prefix.data;
                 p < rcf->prefix.data + rcf->prefix.len; p++)
            {
                if (*p <= 0x20 || *p >= 0x7f) {
                    goto invalid;
                }
            }

            if (rcf->prefix.len > 64) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "connect_timeout=", 16) == 0) {
            s.data = value[i].data + 16;
            s.len = value[i].len - 16;

            n = ngx_parse_time(&s, 0);
            if (n == NGX_ERROR || n == 0) {
                goto invalid;
            }

            rcf->connect_timeout = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;

            n = ngx_parse_time(&s, 0);
            if (n == NGX_ERROR || n == 0) {
                goto invalid;
            }

            rcf->timeout = n;
            continue;
        }

        goto invalid;
    }

    lmcf->redis = rcf;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);
    return NGX_CONF_ERROR;
}


void
ngx_http_llm_redis_script_init(ngx_http_llm_redis_script_t *script)
{
    u_char     digest[20];
    ngx_sha1_t sha1;

    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, script->text, ngx_strlen(script->text));
    ngx_sha1_final(digest, &sha1);

    ngx_hex_dump(script->sha1, digest, 20);
    script->sha1[40] = '\0';
}


/* ---- the adapter -------------------------------------------------------- */

static int
ngx_http_llm_redis_attach(redisAsyncContext *ac, ngx_log_t *log,
    ngx_msec_t connect_timeout, ngx_msec_t timeout)
{
    ngx_connection_t             *c;
    ngx_http_llm_redis_events_t  *e;

    /* nothing may be attached twice */

    if (ac->ev.data != NULL) {
        return REDIS_ERR;
    }

    e = ngx_calloc(sizeof(ngx_http_llm_redis_events_t), log);
    if (e == NULL) {
        return REDIS_ERR;
    }

    c = ngx_get_connection(ac->c.fd, log);
    if (c == NULL) {
        ngx_free(e);
        return REDIS_ERR;
    }

    c->data = e;
    c->read->handler = ngx_http_llm_redis_read_handler;
    c->write->handler = ngx_http_llm_redis_write_handler;
    c->read->log = log;
    c->write->log = log;

    e->ac = ac;
    e->c = c;
    e->log = log;
    e->connect_timeout = connect_timeout;
    e->timeout = timeout;

    e->timer.handler = ngx_http_llm_redis_timeout_handler;
    e->timer.data = e;
    e->timer.log = log;
    e->timer.cancelable = 1;

    ac->ev.addRead = ngx_http_llm_redis_add_read;
    ac->ev.delRead = ngx_http_llm_redis_del_read;
    ac->ev.addWrite = ngx_http_llm_redis_add_write;
    ac->ev.delWrite = ngx_http_llm_redis_del_write;
    ac->ev.cleanup = ngx_http_llm_redis_cleanup;
    ac->ev.data = e;

    if (!(ac->c.flags & REDIS_CONNECTED)) {
        ngx_add_timer(&e->timer, connect_timeout);
    }

    return REDIS_OK;
}


static void
ngx_http_llm_redis_add_read(void *privdata)
{
    ngx_http_llm_redis_events_t *e = privdata;

    if (e->flags & NGX_HTTP_LLM_REDIS_READING) {
        return;
    }

    if (ngx_add_event(e->c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ALERT, e->log, 0,
                      "llm: cannot watch the Redis connection");
        return;
    }

    e->flags |= NGX_HTTP_LLM_REDIS_READING;
}


static void
ngx_http_llm_redis_del_read(void *privdata)
{
    ngx_http_llm_redis_events_t *e = privdata;

    if (!(e->flags & NGX_HTTP_LLM_REDIS_READING)) {
        return;
    }

    (void) ngx_del_event(e->c->read, NGX_READ_EVENT, 0);

    e->flags &= ~NGX_HTTP_LLM_REDIS_READING;
}


static void
ngx_http_llm_redis_add_write(void *privdata)
{
    ngx_http_llm_redis_events_t *e = privdata;

    /* a command was queued: replies are owed from now on */

    if (!e->timer.timer_set) {
        ngx_http_llm_redis_arm(e);
    }

    if (e->flags & NGX_HTTP_LLM_REDIS_WRITING) {
        return;
    }

    if (ngx_add_event(e->c->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ALERT, e->log, 0,
                      "llm: cannot watch the Redis connection");
        return;
    }

    e->flags |= NGX_HTTP_LLM_REDIS_WRITING;
}


static void
ngx_http_llm_redis_del_write(void *privdata)
{
    ngx_http_llm_redis_events_t *e = privdata;

    if (!(e->flags & NGX_HTTP_LLM_REDIS_WRITING)) {
        return;
    }

    (void) ngx_del_event(e->c->write, NGX_WRITE_EVENT, 0);

    e->flags &= ~NGX_HTTP_LLM_REDIS_WRITING;
}


/*
 * hiredis frees the context: called before it closes the socket, so the
 * events are removed here and the connection goes back to NGINX without
 * being closed (the fd is hiredis').
 */

static void
ngx_http_llm_redis_cleanup(void *privdata)
{
    ngx_http_llm_redis_events_t *e = privdata;

    ngx_connection_t  *c;

    if (e == NULL) {
        return;
    }

    if (e->timer.timer_set) {
        ngx_del_timer(&e->timer);
    }

    c = e->c;

    if (c) {
        if (c->read->active) {
            (void) ngx_del_event(c->read, NGX_READ_EVENT, NGX_CLOSE_EVENT);
        }

        if (c->write->active) {
            (void) ngx_del_event(c->write, NGX_WRITE_EVENT, NGX_CLOSE_EVENT);
        }

        if (c->read->posted) {
            ngx_delete_posted_event(c->read);
        }

        if (c->write->posted) {
            ngx_delete_posted_event(c->write);
        }

        /* the event loop skips stale events of a connection with no fd */

        ngx_free_connection(c);
        c->fd = (ngx_socket_t) -1;

        e->c = NULL;
    }

    e->ac->ev.data = NULL;
    e->ac = NULL;
    e->flags &= ~(NGX_HTTP_LLM_REDIS_READING|NGX_HTTP_LLM_REDIS_WRITING);

    if (e->flags & NGX_HTTP_LLM_REDIS_ENTERED) {
        e->flags |= NGX_HTTP_LLM_REDIS_DELETED;
        return;
    }

    ngx_free(e);
}


static void
ngx_http_llm_redis_read_handler(ngx_event_t *rev)
{
    ngx_connection_t             *c;
    ngx_http_llm_redis_events_t  *e;

    c = rev->data;
    e = c->data;

    e->flags |= NGX_HTTP_LLM_REDIS_ENTERED;
    redisAsyncHandleRead(e->ac);
    e->flags &= ~NGX_HTTP_LLM_REDIS_ENTERED;

    if (e->flags & NGX_HTTP_LLM_REDIS_DELETED) {
        ngx_free(e);
        return;
    }

    ngx_http_llm_redis_arm(e);
}


static void
ngx_http_llm_redis_write_handler(ngx_event_t *wev)
{
    ngx_connection_t             *c;
    ngx_http_llm_redis_events_t  *e;

    c = wev->data;
    e = c->data;

    e->flags |= NGX_HTTP_LLM_REDIS_ENTERED;
    redisAsyncHandleWrite(e->ac);
    e->flags &= ~NGX_HTTP_LLM_REDIS_ENTERED;

    if (e->flags & NGX_HTTP_LLM_REDIS_DELETED) {
        ngx_free(e);
        return;
    }

    ngx_http_llm_redis_arm(e);
}


/*
 * Connecting: the connect timeout.  Connected: the command timeout runs
 * while replies are owed and restarts with every read.
 */

static void
ngx_http_llm_redis_arm(ngx_http_llm_redis_events_t *e)
{
    redisAsyncContext  *ac;

    ac = e->ac;

    if (!(ac->c.flags & REDIS_CONNECTED)) {
        if (!e->timer.timer_set) {
            ngx_add_timer(&e->timer, e->connect_timeout);
        }

        return;
    }

    if (ac->replies.head) {
        ngx_add_timer(&e->timer, e->timeout);
        return;
    }

    if (e->timer.timer_set) {
        ngx_del_timer(&e->timer);
    }
}


static void
ngx_http_llm_redis_timeout_handler(ngx_event_t *ev)
{
    ngx_http_llm_redis_events_t *e = ev->data;

    redisAsyncContext  *ac;

    ac = e->ac;

    ac->c.err = REDIS_ERR_IO;
    ac->err = REDIS_ERR_IO;
    ac->errstr = ac->c.errstr;

    if (!(ac->c.flags & REDIS_CONNECTED)) {
        ngx_cpystrn((u_char *) ac->c.errstr, (u_char *) "connect timed out",
                    sizeof(ac->c.errstr));

        /* as hiredis does when connect() fails: onConnect, then free */

        if (ac->onConnect) {
            ac->onConnect(ac, REDIS_ERR);
        }

    } else {
        ngx_snprintf((u_char *) ac->c.errstr, sizeof(ac->c.errstr) - 1,
                     "no reply in %M ms%Z", e->timeout);
    }

    /* the pending callbacks get NULL replies; the cleanup hook frees e */

    redisAsyncFree(ac);
}


/* ---- the client --------------------------------------------------------- */

ngx_int_t
ngx_http_llm_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_llm_main_conf_t *lmcf)
{
    ngx_http_llm_redis_client_t  *client;

    if (lmcf->redis == NULL) {
        return NGX_OK;
    }

    client = ngx_pcalloc(cycle->pool, sizeof(ngx_http_llm_redis_client_t));
    if (client == NULL) {
        return NGX_ERROR;
    }

    client->conf = lmcf->redis;
    client->log = cycle->log;

    client->reconnect.handler = ngx_http_llm_redis_reconnect_handler;
    client->reconnect.data = client;
    client->reconnect.log = cycle->log;
    client->reconnect.cancelable = 1;

    ngx_http_llm_redis_client = client;

    ngx_http_llm_redis_connect(client);

    return NGX_OK;
}


void
ngx_http_llm_redis_exit_process(ngx_cycle_t *cycle)
{
    redisAsyncContext            *ac;
    ngx_http_llm_redis_client_t  *client;

    client = ngx_http_llm_redis_client;

    if (client == NULL) {
        return;
    }

    client->exiting = 1;

    if (client->reconnect.timer_set) {
        ngx_del_timer(&client->reconnect);
    }

    ac = client->ac;

    if (ac) {
        client->ac = NULL;
        redisAsyncFree(ac);
    }

    ngx_http_llm_redis_client = NULL;
}


static void
ngx_http_llm_redis_connect(ngx_http_llm_redis_client_t *client)
{
    const char                 *argv[2];
    size_t                      argvlen[2];
    u_char                      db[NGX_INT_T_LEN];
    redisAsyncContext          *ac;
    ngx_http_llm_redis_conf_t  *rcf;

    rcf = client->conf;

    if (client->exiting || ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    if (rcf->port) {
        ac = redisAsyncConnect((char *) rcf->host.data, rcf->port);

    } else {
        ac = redisAsyncConnectUnix((char *) rcf->path.data);
    }

    if (ac == NULL) {
        ngx_log_error(NGX_LOG_ALERT, client->log, 0,
                      "llm: no memory for a Redis connection");
        ngx_http_llm_redis_schedule(client);
        return;
    }

    if (ac->err) {
        if (!client->failed) {
            ngx_log_error(NGX_LOG_ERR, client->log, 0,
                          "llm: cannot connect to Redis %V: %s",
                          &rcf->name, ac->errstr);
        }

        redisAsyncFree(ac);
        ngx_http_llm_redis_schedule(client);
        return;
    }

    ac->data = client;

    if (ngx_http_llm_redis_attach(ac, client->log, rcf->connect_timeout,
                                  rcf->timeout)
        != REDIS_OK)
    {
        ngx_log_error(NGX_LOG_ALERT, client->log, 0,
                      "llm: cannot attach the Redis connection");
        redisAsyncFree(ac);
        ngx_http_llm_redis_schedule(client);
        return;
    }

    client->ac = ac;
    client->state = NGX_HTTP_LLM_REDIS_CONNECTING;

    redisAsyncSetConnectCallback(ac, ngx_http_llm_redis_connected);
    redisAsyncSetDisconnectCallback(ac, ngx_http_llm_redis_disconnected);

    /* sent first once connected; a refusal drops the connection */

    if (rcf->password.len) {
        argv[0] = "AUTH";
        argvlen[0] = 4;
        argv[1] = (const char *) rcf->password.data;
        argvlen[1] = rcf->password.len;

        (void) redisAsyncCommandArgv(ac, ngx_http_llm_redis_setup_reply,
                                     client, 2, argv, argvlen);
    }

    if (rcf->db) {
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argv[1] = (const char *) db;
        argvlen[1] = ngx_sprintf(db, "%ui", rcf->db) - db;

        (void) redisAsyncCommandArgv(ac, ngx_http_llm_redis_setup_reply,
                                     client, 2, argv, argvlen);
    }
}


static void
ngx_http_llm_redis_schedule(ngx_http_llm_redis_client_t *client)
{
    client->ac = NULL;
    client->state = NGX_HTTP_LLM_REDIS_DOWN;
    client->failed = 1;

    if (client->exiting || ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    client->backoff = client->backoff
                      ? ngx_min(client->backoff * 2,
                                NGX_HTTP_LLM_REDIS_BACKOFF_MAX)
                      : NGX_HTTP_LLM_REDIS_BACKOFF_MIN;

    ngx_add_timer(&client->reconnect, client->backoff);
}


static void
ngx_http_llm_redis_reconnect_handler(ngx_event_t *ev)
{
    ngx_http_llm_redis_connect(ev->data);
}


static void
ngx_http_llm_redis_connected(const redisAsyncContext *ac, int status)
{
    ngx_http_llm_redis_client_t *client = ac->data;

    if (status != REDIS_OK) {
        if (!client->failed) {
            ngx_log_error(NGX_LOG_ERR, client->log, 0,
                          "llm: cannot connect to Redis %V: %s",
                          &client->conf->name,
                          ac->errstr ? ac->errstr : "error");
        }

        /* hiredis frees the context after this callback */
        ngx_http_llm_redis_schedule(client);
        return;
    }

    if (client->failed) {
        ngx_log_error(NGX_LOG_NOTICE, client->log, 0,
                      "llm: connected to Redis %V", &client->conf->name);
    }

    client->state = NGX_HTTP_LLM_REDIS_READY;
    client->backoff = 0;
    client->failed = 0;
}


static void
ngx_http_llm_redis_disconnected(const redisAsyncContext *ac, int status)
{
    ngx_http_llm_redis_client_t *client = ac->data;

    if (client->exiting) {
        return;
    }

    ngx_log_error(NGX_LOG_ERR, client->log, 0,
                  "llm: lost the Redis connection to %V: %s",
                  &client->conf->name,
                  ac->err && ac->errstr ? ac->errstr : "closed");

    ngx_http_llm_redis_schedule(client);
}


static void
ngx_http_llm_redis_setup_reply(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    redisReply                   *rr = reply;
    ngx_http_llm_redis_client_t  *client = privdata;

    if (rr == NULL || rr->type != REDIS_REPLY_ERROR) {
        return;
    }

    ngx_log_error(NGX_LOG_ERR, client->log, 0,
                  "llm: Redis %V refused the connection setup: %*s",
                  &client->conf->name, (size_t) rr->len, rr->str);

    /* inside a callback: hiredis frees the context when it returns */
    redisAsyncFree(ac);
}


/*
 * Commands wait in hiredis while the first connection is being made; once
 * Redis has failed, they are refused until a reconnection succeeds, so
 * that requests do not wait for each retry's connect timeout.
 */

static ngx_uint_t
ngx_http_llm_redis_usable(ngx_http_llm_redis_client_t *client)
{
    if (client == NULL || client->ac == NULL) {
        return 0;
    }

    return client->state == NGX_HTTP_LLM_REDIS_READY || !client->failed;
}


/*
 * Sends one command.  NGX_OK: handler(data, reply) follows exactly once,
 * reply NULL if Redis failed or went away; NGX_DECLINED: Redis is not
 * connected, nothing follows.
 */

ngx_int_t
ngx_http_llm_redis_command(ngx_http_llm_redis_handler_pt handler, void *data,
    int argc, const char **argv, const size_t *argvlen)
{
    ngx_http_llm_redis_call_t    *call;
    ngx_http_llm_redis_client_t  *client;

    client = ngx_http_llm_redis_client;

    if (!ngx_http_llm_redis_usable(client)) {
        return NGX_DECLINED;
    }

    call = ngx_alloc(sizeof(ngx_http_llm_redis_call_t), client->log);
    if (call == NULL) {
        return NGX_ERROR;
    }

    call->handler = handler;
    call->data = data;

    if (redisAsyncCommandArgv(client->ac, ngx_http_llm_redis_call_reply,
                              call, argc, argv, argvlen)
        != REDIS_OK)
    {
        ngx_free(call);
        return NGX_DECLINED;
    }

    return NGX_OK;
}


static void
ngx_http_llm_redis_call_reply(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_http_llm_redis_call_t *call = privdata;

    call->handler(call->data, reply);

    ngx_free(call);
}


/*
 * EVALSHA script, argv (KEYS and ARGV as EVAL takes them: numkeys
 * first); EVAL if Redis does not know the script.  As
 * ngx_http_llm_redis_command().
 */

ngx_int_t
ngx_http_llm_redis_eval(ngx_http_llm_redis_script_t *script,
    ngx_http_llm_redis_handler_pt handler, void *data, int argc,
    const char **argv, const size_t *argvlen)
{
    int                           i;
    u_char                       *p;
    size_t                        size;
    ngx_http_llm_redis_eval_t    *op;
    ngx_http_llm_redis_client_t  *client;

    client = ngx_http_llm_redis_client;

    if (!ngx_http_llm_redis_usable(client)) {
        return NGX_DECLINED;
    }

    /* one block: the op, then argv[2 + argc], argvlen[2 + argc], bytes */

    size = sizeof(ngx_http_llm_redis_eval_t)
           + (2 + argc) * (sizeof(char *) + sizeof(size_t));

    for (i = 0; i < argc; i++) {
        size += argvlen[i];
    }

    op = ngx_alloc(size, client->log);
    if (op == NULL) {
        return NGX_ERROR;
    }

    op->handler = handler;
    op->data = data;
    op->script = script;
    op->argc = 2 + argc;
    op->argv = (const char **) (op + 1);
    op->argvlen = (size_t *) (op->argv + 2 + argc);
    op->retried = 0;

    p = (u_char *) (op->argvlen + 2 + argc);

    for (i = 0; i < argc; i++) {
        op->argv[2 + i] = (const char *) p;
        op->argvlen[2 + i] = argvlen[i];
        p = ngx_cpymem(p, argv[i], argvlen[i]);
    }

    op->argv[0] = "EVALSHA";
    op->argvlen[0] = 7;
    op->argv[1] = (const char *) script->sha1;
    op->argvlen[1] = 40;

    if (redisAsyncCommandArgv(client->ac, ngx_http_llm_redis_eval_reply, op,
                              op->argc, op->argv, op->argvlen)
        != REDIS_OK)
    {
        ngx_free(op);
        return NGX_DECLINED;
    }

    return NGX_OK;
}


static void
ngx_http_llm_redis_eval_reply(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_http_llm_redis_eval_t *op = privdata;

    redisReply  *rr = reply;

    if (rr && rr->type == REDIS_REPLY_ERROR && !op->retried
        && rr->len >= 8 && ngx_strncmp(rr->str, "NOSCRIPT", 8) == 0)
    {
        op->retried = 1;
        op->argv[0] = "EVAL";
        op->argvlen[0] = 4;
        op->argv[1] = op->script->text;
        op->argvlen[1] = ngx_strlen(op->script->text);

        if (redisAsyncCommandArgv(ac, ngx_http_llm_redis_eval_reply, op,
                                  op->argc, op->argv, op->argvlen)
            == REDIS_OK)
        {
            return;
        }

        rr = NULL;
    }

    op->handler(op->data, rr);

    ngx_free(op);
}
