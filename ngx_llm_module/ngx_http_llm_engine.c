
/*
 * The engine client: each worker keeps one connection to every
 * configured llm-engine, driven by the NGINX event loop (non-blocking
 * connect, HELLO handshake, then SUBMIT/CANCEL out and TOKENS/DONE/ERROR
 * in, multiplexed by request id).
 *
 * A lost engine fails its streams (or moves those that got no token yet
 * to another engine) and is reconnected with exponential backoff; a
 * request that finds no engine connected gets 503 at once, one that
 * finds an engine still connecting (or not yet past HELLO) waits for it:
 * up to llm_engine_timeout, or until every engine is known down.
 *
 * Re-entrancy: frames are dispatched from the read handler only, and
 * nothing is sent from inside a stream callback: submit and cancel
 * append to the output buffer and post the write event, so a callback
 * (which may finalize its request and cancel its stream) can never close
 * the connection under the dispatch loop.
 */


#include "ngx_http_llm_module.h"


#define NGX_HTTP_LLM_PEER_DOWN         0
#define NGX_HTTP_LLM_PEER_CONNECTING   1    /* connect() in progress */
#define NGX_HTTP_LLM_PEER_HELLO        2    /* HELLO sent */
#define NGX_HTTP_LLM_PEER_READY        3

#define NGX_HTTP_LLM_BACKOFF_MIN       100  /* ms */
#define NGX_HTTP_LLM_BACKOFF_MAX       2000
#define NGX_HTTP_LLM_READ_SIZE         16384


typedef struct ngx_http_llm_client_s  ngx_http_llm_client_t;


typedef struct {
    ngx_http_llm_client_t         *client;
    ngx_addr_t                    *addr;
    ngx_peer_connection_t          pc;
    ngx_uint_t                     state;

    llm_proto_parser               parser;
    llm_proto_buf                  out;

    ngx_event_t                    reconnect;
    ngx_msec_t                     backoff;
    ngx_msec_t                     last_attempt;

    ngx_rbtree_t                   streams;
    ngx_rbtree_node_t              sentinel;
    ngx_uint_t                     nstreams;
    uint32_t                       next_id;

    ngx_uint_t                     n_ctx;
    ngx_str_t                      fingerprint;
    u_char                         fp[16];

    llm_proto_stats                stats;       /* the last STATS */
    ngx_uint_t                     stats_pending;

    ngx_queue_t                    ctls;        /* ngx_http_llm_ctl_t */

    unsigned                       draining:1;
    unsigned                       failed:1;    /* logged since last OK */
    unsigned                       has_stats:1;
} ngx_http_llm_peer_t;


struct ngx_http_llm_client_s {
    ngx_http_llm_main_conf_t      *lmcf;
    ngx_http_llm_peer_t           *peers;
    ngx_uint_t                     npeers;
    ngx_uint_t                     rr;
    ngx_queue_t                    waiting;
    ngx_queue_t                    stats_waiting;   /* /metrics scrapes */
    ngx_log_t                     *log;
    u_char                         model_fp[32];    /* of the last engine
                                                       that said HELLO_OK */
    unsigned                       has_fp:1;
};


static void ngx_http_llm_peer_connect(ngx_http_llm_peer_t *peer);
static void ngx_http_llm_peer_down(ngx_http_llm_peer_t *peer);
static void ngx_http_llm_peer_reconnect_handler(ngx_event_t *ev);
static void ngx_http_llm_peer_write_handler(ngx_event_t *wev);
static void ngx_http_llm_peer_read_handler(ngx_event_t *rev);
static void ngx_http_llm_peer_post_write(ngx_http_llm_peer_t *peer);
static ngx_int_t ngx_http_llm_peer_test_connect(ngx_connection_t *c);
static ngx_int_t ngx_http_llm_peer_process(ngx_http_llm_peer_t *peer);
static ngx_int_t ngx_http_llm_peer_hello_ok(ngx_http_llm_peer_t *peer,
    llm_proto_frame *f);
static ngx_int_t ngx_http_llm_peer_dispatch(ngx_http_llm_peer_t *peer,
    llm_proto_frame *f);
static ngx_http_llm_stream_t *ngx_http_llm_peer_lookup(
    ngx_http_llm_peer_t *peer, uint32_t id);
static void ngx_http_llm_peer_remove(ngx_http_llm_peer_t *peer,
    ngx_http_llm_stream_t *s);
static void ngx_http_llm_peer_free_buffers(ngx_http_llm_peer_t *peer);
static ngx_http_llm_peer_t *ngx_http_llm_client_pick(
    ngx_http_llm_client_t *client);
static ngx_uint_t ngx_http_llm_client_pending(ngx_http_llm_client_t *client);
static void ngx_http_llm_client_flush(ngx_http_llm_client_t *client);
static void ngx_http_llm_client_fail_waiting(ngx_http_llm_client_t *client);
static ngx_int_t ngx_http_llm_submit_to(ngx_http_llm_peer_t *peer,
    ngx_http_llm_stream_t *s);
static ngx_int_t ngx_http_llm_stream_wait(ngx_http_llm_client_t *client,
    ngx_http_llm_stream_t *s);
static void ngx_http_llm_stream_move(ngx_http_llm_client_t *client,
    ngx_http_llm_stream_t *s);
static void ngx_http_llm_stream_timeout(ngx_event_t *ev);
static void ngx_http_llm_stats_check(ngx_http_llm_client_t *client);
static ngx_int_t ngx_http_llm_peer_ctl(ngx_http_llm_peer_t *peer,
    llm_proto_frame *f);
static void ngx_http_llm_peer_fail_ctls(ngx_http_llm_peer_t *peer);
static void ngx_http_llm_stats_timeout(ngx_event_t *ev);


/* one per worker process */
static ngx_http_llm_client_t  *ngx_http_llm_client;


ngx_int_t
ngx_http_llm_engine_init_process(ngx_cycle_t *cycle,
    ngx_http_llm_main_conf_t *lmcf)
{
    ngx_uint_t                   i, j, n;
    ngx_http_llm_peer_t         *peer;
    ngx_http_llm_client_t       *client;
    ngx_http_llm_engine_addr_t  *e;

    client = ngx_pcalloc(cycle->pool, sizeof(ngx_http_llm_client_t));
    if (client == NULL) {
        return NGX_ERROR;
    }

    e = lmcf->engines->elts;
    n = 0;

    for (i = 0; i < lmcf->engines->nelts; i++) {
        n += e[i].naddrs;
    }

    client->peers = ngx_pcalloc(cycle->pool, n * sizeof(ngx_http_llm_peer_t));
    if (client->peers == NULL) {
        return NGX_ERROR;
    }

    client->lmcf = lmcf;
    client->npeers = n;
    client->log = cycle->log;
    ngx_queue_init(&client->waiting);
    ngx_queue_init(&client->stats_waiting);

    peer = client->peers;

    for (i = 0; i < lmcf->engines->nelts; i++) {
        for (j = 0; j < e[i].naddrs; j++, peer++) {
            peer->client = client;
            peer->addr = &e[i].addrs[j];
            peer->next_id = 1;
            ngx_queue_init(&peer->ctls);

            ngx_rbtree_init(&peer->streams, &peer->sentinel,
                            ngx_rbtree_insert_value);

            llm_proto_parser_init(&peer->parser, 0);
            llm_proto_buf_init(&peer->out);

            peer->reconnect.handler = ngx_http_llm_peer_reconnect_handler;
            peer->reconnect.data = peer;
            peer->reconnect.log = cycle->log;
            peer->reconnect.cancelable = 1;
        }
    }

    ngx_http_llm_client = client;

    for (i = 0; i < client->npeers; i++) {
        ngx_http_llm_peer_connect(&client->peers[i]);
    }

    return NGX_OK;
}


void
ngx_http_llm_engine_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t              i;
    ngx_http_llm_peer_t    *peer;
    ngx_http_llm_client_t  *client;

    client = ngx_http_llm_client;

    if (client == NULL) {
        return;
    }

    for (i = 0; i < client->npeers; i++) {
        peer = &client->peers[i];

        if (peer->reconnect.timer_set) {
            ngx_del_timer(&peer->reconnect);
        }

        if (peer->pc.connection) {
            ngx_close_connection(peer->pc.connection);
            peer->pc.connection = NULL;
        }

        peer->state = NGX_HTTP_LLM_PEER_DOWN;
        ngx_http_llm_peer_free_buffers(peer);
    }

    ngx_http_llm_client = NULL;
}


/*
 * Queues a stream: NGX_OK (sent, or waiting for an engine that is
 * connecting), NGX_BUSY (no engine: 503), NGX_DECLINED (prompt plus
 * max_tokens beyond the engine's context; s->n_ctx says it),
 * NGX_ERROR.  Callbacks come later, never from inside this call.
 */

ngx_int_t
ngx_http_llm_engine_submit(ngx_http_llm_stream_t *s)
{
    ngx_http_llm_peer_t    *peer;
    ngx_http_llm_client_t  *client;

    client = ngx_http_llm_client;

    if (client == NULL) {
        return NGX_BUSY;
    }

    s->timer.handler = ngx_http_llm_stream_timeout;
    s->timer.data = s;
    s->timer.log = s->log;

    peer = ngx_http_llm_client_pick(client);

    if (peer) {
        return ngx_http_llm_submit_to(peer, s);
    }

    return ngx_http_llm_stream_wait(client, s);
}


/* Forgets a stream, telling the engine if it runs there.  Idempotent. */

void
ngx_http_llm_engine_cancel(ngx_http_llm_stream_t *s)
{
    uint32_t              id;
    ngx_http_llm_peer_t  *peer;

    if (s->waiting) {
        ngx_queue_remove(&s->queue);
        s->waiting = 0;
    }

    if (s->timer.timer_set) {
        ngx_del_timer(&s->timer);
    }

    peer = s->peer;

    if (peer == NULL) {
        return;
    }

    id = (uint32_t) s->node.key;

    ngx_http_llm_peer_remove(peer, s);

    if (peer->state != NGX_HTTP_LLM_PEER_READY) {
        return;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, s->log, 0,
                   "llm: cancel request %uD", id);

    if (llm_proto_encode_empty(&peer->out, LLM_MSG_CANCEL, id) != 0) {
        ngx_log_error(NGX_LOG_ALERT, s->log, 0,
                      "llm: cannot queue CANCEL");
        return;
    }

    ngx_http_llm_peer_post_write(peer);
}


/*
 * Asks the engine to end a stream early (a stop string was found): the
 * stream stays registered and its DONE, with the usage figures, still
 * comes.
 */

void
ngx_http_llm_engine_stop(ngx_http_llm_stream_t *s)
{
    ngx_http_llm_peer_t  *peer;

    peer = s->peer;

    if (peer == NULL || s->stopping
        || peer->state != NGX_HTTP_LLM_PEER_READY)
    {
        return;
    }

    s->stopping = 1;

    if (llm_proto_encode_empty(&peer->out, LLM_MSG_CANCEL,
                               (uint32_t) s->node.key)
        != 0)
    {
        ngx_log_error(NGX_LOG_ALERT, s->log, 0,
                      "llm: cannot queue CANCEL");
        return;
    }

    ngx_http_llm_peer_post_write(peer);
}


/* The context length of a connected engine, 0 if none is. */

ngx_uint_t
ngx_http_llm_engine_n_ctx(void)
{
    ngx_uint_t              i;
    ngx_http_llm_client_t  *client;

    client = ngx_http_llm_client;

    if (client == NULL) {
        return 0;
    }

    for (i = 0; i < client->npeers; i++) {
        if (client->peers[i].state == NGX_HTTP_LLM_PEER_READY) {
            return client->peers[i].n_ctx;
        }
    }

    return 0;
}


/*
 * The model fingerprint (32 bytes) of the engine that last completed
 * HELLO in this worker, even if it went away since: NGX_DECLINED if none
 * did yet.  Part of the prompt cache's key.
 */

ngx_int_t
ngx_http_llm_engine_model_fingerprint(u_char *fp)
{
    ngx_http_llm_client_t  *client;

    client = ngx_http_llm_client;

    if (client == NULL || !client->has_fp) {
        return NGX_DECLINED;
    }

    ngx_memcpy(fp, client->model_fp, 32);

    return NGX_OK;
}


static void
ngx_http_llm_peer_connect(ngx_http_llm_peer_t *peer)
{
    ngx_int_t                  rc;
    ngx_file_info_t            fi;
    llm_proto_hello            hello;
    ngx_connection_t          *c;
    ngx_http_llm_client_t     *client;
#if (NGX_HAVE_UNIX_DOMAIN)
    struct sockaddr_un        *sun;
#endif

    client = peer->client;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    if (peer->reconnect.timer_set) {
        ngx_del_timer(&peer->reconnect);
    }

    peer->last_attempt = ngx_current_msec;

#if (NGX_HAVE_UNIX_DOMAIN)

    /*
     * A daemon that is not running may have left no socket file:
     * ngx_event_connect_peer() would log that at "crit" on every retry.
     */

    if (peer->addr->sockaddr->sa_family == AF_UNIX) {
        sun = (struct sockaddr_un *) peer->addr->sockaddr;

        if (ngx_file_info(sun->sun_path, &fi) == NGX_FILE_ERROR) {
            if (!peer->failed) {
                ngx_log_error(NGX_LOG_ERR, client->log, ngx_errno,
                              "llm: engine %V is not running",
                              &peer->addr->name);
            }

            ngx_http_llm_peer_down(peer);
            return;
        }

        if (access(sun->sun_path, R_OK|W_OK) == -1 && errno == EACCES) {
            if (!peer->failed) {
                ngx_log_error(NGX_LOG_ERR, client->log, ngx_errno,
                              "llm: the worker's user may not connect to "
                              "engine %V (see the \"user\" directive and "
                              "llm-engine --socket-mode)",
                              &peer->addr->name);
            }

            ngx_http_llm_peer_down(peer);
            return;
        }
    }

#endif

    ngx_memzero(&peer->pc, sizeof(ngx_peer_connection_t));

    peer->pc.sockaddr = peer->addr->sockaddr;
    peer->pc.socklen = peer->addr->socklen;
    peer->pc.name = &peer->addr->name;
    peer->pc.get = ngx_event_get_peer;
    peer->pc.log = client->log;
    peer->pc.log_error = NGX_ERROR_ERR;

    rc = ngx_event_connect_peer(&peer->pc);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        peer->pc.connection = NULL;
        ngx_http_llm_peer_down(peer);
        return;
    }

    /* rc == NGX_OK || rc == NGX_AGAIN */

    c = peer->pc.connection;
    c->data = peer;
    c->read->handler = ngx_http_llm_peer_read_handler;
    c->write->handler = ngx_http_llm_peer_write_handler;

    ngx_http_llm_peer_free_buffers(peer);
    llm_proto_parser_init(&peer->parser, 0);
    llm_proto_buf_init(&peer->out);

    ngx_memzero(&hello, sizeof(llm_proto_hello));
    hello.min_version = LLM_PROTO_VERSION_MIN;
    hello.max_version = LLM_PROTO_VERSION;
    ngx_cpystrn((u_char *) hello.client_name,
                (u_char *) "ngx_http_llm_module " NGINX_VER,
                sizeof(hello.client_name));

    if (llm_proto_encode_hello(&peer->out, &hello) != 0) {
        ngx_http_llm_peer_down(peer);
        return;
    }

    /*
     * HELLO_OK comes between two engine steps: a busy engine is given
     * llm_engine_timeout, as for any frame
     */

    ngx_add_timer(c->read, client->lmcf->engine_timeout);

    if (rc == NGX_AGAIN) {
        peer->state = NGX_HTTP_LLM_PEER_CONNECTING;
        ngx_add_timer(c->write, client->lmcf->connect_timeout);
        return;
    }

    peer->state = NGX_HTTP_LLM_PEER_HELLO;
    ngx_http_llm_peer_post_write(peer);
}


/*
 * Closes the connection, fails or moves its streams and schedules the
 * reconnection.
 */

static void
ngx_http_llm_peer_down(ngx_http_llm_peer_t *peer)
{
    ngx_rbtree_node_t      *node;
    ngx_http_llm_stream_t  *s;
    ngx_http_llm_client_t  *client;

    client = peer->client;

    if (peer->pc.connection) {
        ngx_close_connection(peer->pc.connection);
        peer->pc.connection = NULL;
    }

    if (peer->state == NGX_HTTP_LLM_PEER_READY) {
        ngx_log_error(NGX_LOG_ERR, client->log, 0,
                      "llm: lost engine %V, %ui requests in flight",
                      &peer->addr->name, peer->nstreams);
    }

    peer->state = NGX_HTTP_LLM_PEER_DOWN;
    peer->draining = 0;
    peer->failed = 1;
    peer->has_stats = 0;

    if (peer->stats_pending) {
        peer->stats_pending = 0;
        ngx_http_llm_stats_check(client);
    }

    ngx_http_llm_peer_fail_ctls(peer);

    ngx_http_llm_peer_free_buffers(peer);

    peer->backoff = peer->backoff ? ngx_min(peer->backoff * 2,
                                            NGX_HTTP_LLM_BACKOFF_MAX)
                                  : NGX_HTTP_LLM_BACKOFF_MIN;

    if (!(ngx_exiting || ngx_quit || ngx_terminate)) {
        ngx_add_timer(&peer->reconnect, peer->backoff);
    }

    /*
     * Streams that got no token yet can run elsewhere; the others fail.
     * The tree is re-read after every callback: the callback finalizes
     * its request, which may touch other streams' requests.
     */

    while (peer->streams.root != peer->streams.sentinel) {
        node = ngx_rbtree_min(peer->streams.root, peer->streams.sentinel);
        s = (ngx_http_llm_stream_t *) node;

        ngx_http_llm_peer_remove(peer, s);

        if (!s->got_tokens && s->tries < client->npeers
            && ngx_http_llm_client_pending(client))
        {
            ngx_http_llm_stream_move(client, s);
            continue;
        }

        s->fail(s, NGX_HTTP_LLM_FAIL_UNAVAILABLE,
                "the engine connection was lost");
    }

    if (!ngx_http_llm_client_pending(client)) {
        ngx_http_llm_client_fail_waiting(client);
    }
}


static void
ngx_http_llm_peer_reconnect_handler(ngx_event_t *ev)
{
    ngx_http_llm_peer_connect(ev->data);
}


static void
ngx_http_llm_peer_post_write(ngx_http_llm_peer_t *peer)
{
    ngx_connection_t  *c;

    c = peer->pc.connection;

    if (c == NULL || peer->state < NGX_HTTP_LLM_PEER_HELLO) {
        return;
    }

    ngx_post_event(c->write, &ngx_posted_events);
}


static void
ngx_http_llm_peer_write_handler(ngx_event_t *wev)
{
    ssize_t               n;
    size_t                size;
    ngx_connection_t     *c;
    ngx_http_llm_peer_t  *peer;

    c = wev->data;
    peer = c->data;

    if (wev->timedout) {
        ngx_log_error(NGX_LOG_ERR, c->log, NGX_ETIMEDOUT,
                      "llm: connecting to engine %V timed out",
                      &peer->addr->name);
        ngx_http_llm_peer_down(peer);
        return;
    }

    if (peer->state == NGX_HTTP_LLM_PEER_CONNECTING) {
        if (ngx_http_llm_peer_test_connect(c) != NGX_OK) {
            ngx_http_llm_peer_down(peer);
            return;
        }

        if (wev->timer_set) {
            ngx_del_timer(wev);
        }

        peer->state = NGX_HTTP_LLM_PEER_HELLO;
    }

    while ((size = llm_proto_buf_pending(&peer->out)) > 0) {

        n = c->send(c, peer->out.data + peer->out.pos, size);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_http_llm_peer_down(peer);
            return;
        }

        llm_proto_buf_consume(&peer->out, n);
    }

    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        ngx_http_llm_peer_down(peer);
    }
}


static void
ngx_http_llm_peer_read_handler(ngx_event_t *rev)
{
    ssize_t               n;
    u_char               *p;
    ngx_connection_t     *c;
    ngx_http_llm_peer_t  *peer;

    c = rev->data;
    peer = c->data;

    if (rev->timedout) {
        ngx_log_error(NGX_LOG_ERR, c->log, NGX_ETIMEDOUT,
                      "llm: engine %V did not answer HELLO",
                      &peer->addr->name);
        ngx_http_llm_peer_down(peer);
        return;
    }

    for ( ;; ) {
        p = llm_proto_parser_space(&peer->parser, NGX_HTTP_LLM_READ_SIZE);
        if (p == NULL) {
            ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                          "llm: no memory for engine input");
            ngx_http_llm_peer_down(peer);
            return;
        }

        n = c->recv(c, p, NGX_HTTP_LLM_READ_SIZE);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == 0) {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "llm: engine %V closed the connection",
                          &peer->addr->name);
            ngx_http_llm_peer_down(peer);
            return;
        }

        if (n == NGX_ERROR) {
            ngx_http_llm_peer_down(peer);
            return;
        }

        llm_proto_parser_commit(&peer->parser, n);

        if (ngx_http_llm_peer_process(peer) != NGX_OK) {
            ngx_http_llm_peer_down(peer);
            return;
        }
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_llm_peer_down(peer);
    }
}


static ngx_int_t
ngx_http_llm_peer_test_connect(ngx_connection_t *c)
{
    int        err;
    socklen_t  len;

    err = 0;
    len = sizeof(int);

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1) {
        err = ngx_socket_errno;
    }

    if (err) {
        (void) ngx_connection_error(c, err, "connect() failed");
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_peer_process(ngx_http_llm_peer_t *peer)
{
    int              rc;
    llm_err          err;
    llm_proto_frame  f;

    for ( ;; ) {
        err.msg[0] = '\0';

        rc = llm_proto_parser_next(&peer->parser, &f, &err);

        if (rc == 0) {
            return NGX_OK;
        }

        if (rc < 0) {
            ngx_log_error(NGX_LOG_ERR, peer->client->log, 0,
                          "llm: bad frame from engine %V: %s",
                          &peer->addr->name, err.msg);
            return NGX_ERROR;
        }

        if (peer->state == NGX_HTTP_LLM_PEER_HELLO) {
            if (ngx_http_llm_peer_hello_ok(peer, &f) != NGX_OK) {
                return NGX_ERROR;
            }

            continue;
        }

        if (ngx_http_llm_peer_dispatch(peer, &f) != NGX_OK) {
            return NGX_ERROR;
        }
    }
}


static ngx_int_t
ngx_http_llm_peer_hello_ok(ngx_http_llm_peer_t *peer, llm_proto_frame *f)
{
    int                        bos, eos, n_vocab;
    size_t                     len;
    llm_err                    err;
    ngx_log_t                 *log;
    llm_proto_error            e;
    llm_proto_hello_ok         ok;
    ngx_connection_t          *c;
    ngx_http_llm_main_conf_t  *lmcf;

    lmcf = peer->client->lmcf;
    log = peer->client->log;
    c = peer->pc.connection;
    err.msg[0] = '\0';

    if (f->type == LLM_MSG_ERROR) {
        if (llm_proto_decode_error(f, &e, &err) != 0) {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llm: engine %V: bad ERROR: %s",
                          &peer->addr->name, err.msg);
            return NGX_ERROR;
        }

        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "llm: engine %V refused HELLO: %s (%s)",
                      &peer->addr->name, e.message,
                      llm_proto_error_name(e.code));
        return NGX_ERROR;
    }

    if (f->type != LLM_MSG_HELLO_OK) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "llm: engine %V sent %s before HELLO_OK",
                      &peer->addr->name, llm_proto_type_name(f->type));
        return NGX_ERROR;
    }

    if (llm_proto_decode_hello_ok(f, &ok, &err) != 0) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "llm: engine %V: bad HELLO_OK: %s",
                      &peer->addr->name, err.msg);
        return NGX_ERROR;
    }

    /* the engine must serve the model whose tokenizer we loaded */

    n_vocab = llm_tokenizer_n_vocab(lmcf->tokenizer);
    bos = llm_tokenizer_bos(lmcf->tokenizer);
    eos = llm_tokenizer_eos(lmcf->tokenizer);

    if ((int) ok.n_vocab != n_vocab
        || (ok.bos_id >= 0 && bos >= 0 && ok.bos_id != bos)
        || (ok.eos_id >= 0 && eos >= 0 && ok.eos_id != eos)
        || ok.n_ctx < 2)
    {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "llm: engine %V serves \"%s\" (vocabulary %uD, "
                      "bos %D, eos %D, context %uD), which does not match "
                      "llm_model \"%V\" (vocabulary %d, bos %d, eos %d)",
                      &peer->addr->name, ok.model_name, ok.n_vocab,
                      ok.bos_id, ok.eos_id, ok.n_ctx, &lmcf->model_path,
                      n_vocab, bos, eos);
        return NGX_ERROR;
    }

    llm_proto_buf_set_version(&peer->out, ok.version);

    peer->n_ctx = ok.n_ctx;

    /* "fp_" and the first 5 bytes of the model fingerprint */

    len = ngx_sprintf(peer->fp, "fp_%*xs", (size_t) 5, ok.fingerprint)
          - peer->fp;
    peer->fingerprint.data = peer->fp;
    peer->fingerprint.len = len;

    if (peer->client->has_fp
        && ngx_memcmp(peer->client->model_fp, ok.fingerprint, 32) != 0)
    {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "llm: engine %V serves another model fingerprint "
                      "than the engine before it", &peer->addr->name);
    }

    ngx_memcpy(peer->client->model_fp, ok.fingerprint, 32);
    peer->client->has_fp = 1;

    peer->state = NGX_HTTP_LLM_PEER_READY;
    peer->backoff = 0;
    peer->failed = 0;
    peer->draining = 0;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    ngx_log_error(NGX_LOG_NOTICE, log, 0,
                  "llm: engine %V ready: model \"%s\" (%s), context %uD, "
                  "protocol %d, server \"%s\"",
                  &peer->addr->name, ok.model_name, ok.arch, ok.n_ctx,
                  (int) ok.version, ok.server_name);

    ngx_http_llm_client_flush(peer->client);

    return NGX_OK;
}


static ngx_int_t
ngx_http_llm_peer_dispatch(ngx_http_llm_peer_t *peer, llm_proto_frame *f)
{
    llm_err                 err;
    ngx_log_t              *log;
    llm_proto_done          done;
    llm_proto_error         e;
    llm_proto_tokens        tokens;
    ngx_http_llm_fail_e     reason;
    ngx_http_llm_stream_t  *s;

    log = peer->client->log;
    err.msg[0] = '\0';

    switch (f->type) {

    case LLM_MSG_TOKENS:
        if (llm_proto_decode_tokens(f, &tokens, &err) != 0) {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llm: engine %V: bad TOKENS: %s",
                          &peer->addr->name, err.msg);
            return NGX_ERROR;
        }

        s = ngx_http_llm_peer_lookup(peer, f->req_id);
        if (s == NULL) {
            return NGX_OK;      /* cancelled: its DONE is on its way */
        }

        ngx_add_timer(&s->timer, peer->client->lmcf->engine_timeout);
        s->got_tokens = 1;

        s->tokens(s, &tokens);
        return NGX_OK;

    case LLM_MSG_DONE:
        if (llm_proto_decode_done(f, &done, &err) != 0) {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llm: engine %V: bad DONE: %s",
                          &peer->addr->name, err.msg);
            return NGX_ERROR;
        }

        s = ngx_http_llm_peer_lookup(peer, f->req_id);
        if (s == NULL) {
            return NGX_OK;
        }

        ngx_http_llm_peer_remove(peer, s);

        s->done(s, &done);
        return NGX_OK;

    case LLM_MSG_ERROR:
        if (llm_proto_decode_error(f, &e, &err) != 0) {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llm: engine %V: bad ERROR: %s",
                          &peer->addr->name, err.msg);
            return NGX_ERROR;
        }

        if (f->req_id == 0) {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llm: engine %V: %s (%s)", &peer->addr->name,
                          e.message, llm_proto_error_name(e.code));
            return NGX_ERROR;
        }

        s = ngx_http_llm_peer_lookup(peer, f->req_id);
        if (s == NULL) {
            /* a refused adapter operation, or a finished stream */
            (void) ngx_http_llm_peer_ctl(peer, f);
            return NGX_OK;
        }

        ngx_http_llm_peer_remove(peer, s);

        switch (e.code) {

        case LLM_PERR_DRAINING:
            /* the daemon is stopping: no new work there */
            peer->draining = 1;

            if (!s->got_tokens && ngx_http_llm_client_pending(peer->client)) {
                ngx_http_llm_stream_move(peer->client, s);
                return NGX_OK;
            }

            reason = NGX_HTTP_LLM_FAIL_UNAVAILABLE;
            break;

        case LLM_PERR_CONTEXT:
            reason = NGX_HTTP_LLM_FAIL_CONTEXT;
            break;

        case LLM_PERR_OVERLOADED:
            reason = NGX_HTTP_LLM_FAIL_OVERLOADED;
            break;

        case LLM_PERR_BAD_REQUEST:
        case LLM_PERR_UNSUPPORTED:
            reason = NGX_HTTP_LLM_FAIL_BAD_REQUEST;
            break;

        case LLM_PERR_NOT_FOUND:
            reason = NGX_HTTP_LLM_FAIL_NOT_FOUND;
            break;

        default:
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llm: engine %V failed request %uD: %s (%s)",
                          &peer->addr->name, f->req_id, e.message,
                          llm_proto_error_name(e.code));
            reason = NGX_HTTP_LLM_FAIL_INTERNAL;
            break;
        }

        s->fail(s, reason, e.message);
        return NGX_OK;

    case LLM_MSG_STATS:
        if (llm_proto_decode_stats(f, &peer->stats, &err) != 0) {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "llm: engine %V: bad STATS: %s",
                          &peer->addr->name, err.msg);
            return NGX_ERROR;
        }

        peer->has_stats = 1;

        if (peer->stats_pending) {
            peer->stats_pending--;
            ngx_http_llm_stats_check(peer->client);
        }

        return NGX_OK;

    case LLM_MSG_PONG:
        return NGX_OK;

    default:
        /* ADAPTER_OK, ADAPTERS: answers to control requests */

        if (ngx_http_llm_peer_ctl(peer, f) == NGX_OK) {
            return NGX_OK;
        }

        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "llm: engine %V sent unexpected %s",
                      &peer->addr->name, llm_proto_type_name(f->type));
        return NGX_OK;
    }
}


static ngx_http_llm_stream_t *
ngx_http_llm_peer_lookup(ngx_http_llm_peer_t *peer, uint32_t id)
{
    ngx_rbtree_key_t    key;
    ngx_rbtree_node_t  *node, *sentinel;

    key = id;
    node = peer->streams.root;
    sentinel = peer->streams.sentinel;

    while (node != sentinel) {

        if (key < node->key) {
            node = node->left;
            continue;
        }

        if (key > node->key) {
            node = node->right;
            continue;
        }

        return (ngx_http_llm_stream_t *) node;
    }

    return NULL;
}


static void
ngx_http_llm_peer_remove(ngx_http_llm_peer_t *peer, ngx_http_llm_stream_t *s)
{
    ngx_rbtree_delete(&peer->streams, &s->node);
    peer->nstreams--;
    s->peer = NULL;

    if (s->timer.timer_set) {
        ngx_del_timer(&s->timer);
    }
}


static void
ngx_http_llm_peer_free_buffers(ngx_http_llm_peer_t *peer)
{
    llm_proto_parser_free(&peer->parser);
    llm_proto_buf_free(&peer->out);
}


static ngx_http_llm_peer_t *
ngx_http_llm_client_pick(ngx_http_llm_client_t *client)
{
    ngx_uint_t            i, n;
    ngx_http_llm_peer_t  *peer;

    for (i = 0; i < client->npeers; i++) {
        n = (client->rr + i) % client->npeers;
        peer = &client->peers[n];

        if (peer->state == NGX_HTTP_LLM_PEER_READY && !peer->draining) {
            client->rr = n + 1;
            return peer;
        }
    }

    return NULL;
}


/* Is some engine ready or about to be? */

static ngx_uint_t
ngx_http_llm_client_pending(ngx_http_llm_client_t *client)
{
    ngx_uint_t            i;
    ngx_http_llm_peer_t  *peer;

    for (i = 0; i < client->npeers; i++) {
        peer = &client->peers[i];

        if (peer->state != NGX_HTTP_LLM_PEER_DOWN && !peer->draining) {
            return 1;
        }
    }

    return 0;
}


/* An engine became ready: submit the streams that waited for one. */

static void
ngx_http_llm_client_flush(ngx_http_llm_client_t *client)
{
    ngx_int_t               rc;
    ngx_queue_t            *q;
    ngx_http_llm_peer_t    *peer;
    ngx_http_llm_stream_t  *s;

    while (!ngx_queue_empty(&client->waiting)) {

        peer = ngx_http_llm_client_pick(client);
        if (peer == NULL) {
            return;
        }

        q = ngx_queue_head(&client->waiting);
        s = ngx_queue_data(q, ngx_http_llm_stream_t, queue);

        ngx_queue_remove(q);
        s->waiting = 0;

        if (s->timer.timer_set) {
            ngx_del_timer(&s->timer);
        }

        rc = ngx_http_llm_submit_to(peer, s);

        if (rc == NGX_DECLINED) {
            s->fail(s, NGX_HTTP_LLM_FAIL_CONTEXT, NULL);

        } else if (rc != NGX_OK) {
            s->fail(s, NGX_HTTP_LLM_FAIL_INTERNAL, "cannot submit");
        }
    }
}


static void
ngx_http_llm_client_fail_waiting(ngx_http_llm_client_t *client)
{
    ngx_queue_t            *q;
    ngx_http_llm_stream_t  *s;

    while (!ngx_queue_empty(&client->waiting)) {
        q = ngx_queue_head(&client->waiting);
        s = ngx_queue_data(q, ngx_http_llm_stream_t, queue);

        ngx_queue_remove(q);
        s->waiting = 0;

        if (s->timer.timer_set) {
            ngx_del_timer(&s->timer);
        }

        s->fail(s, NGX_HTTP_LLM_FAIL_UNAVAILABLE, NULL);
    }
}


static ngx_int_t
ngx_http_llm_submit_to(ngx_http_llm_peer_t *peer, ngx_http_llm_stream_t *s)
{
    int        rc;
    uint32_t   id;
    ngx_uint_t n_ctx, max;

    n_ctx = peer->n_ctx;
    s->n_ctx = n_ctx;

    if (s->n_prompt >= n_ctx) {
        return NGX_DECLINED;
    }

    max = s->max_tokens ? s->max_tokens : n_ctx - s->n_prompt;

    if (s->n_prompt + max > n_ctx) {
        return NGX_DECLINED;
    }

    s->submit.max_tokens = (uint32_t) max;
    s->submit.prompt = s->prompt;
    s->submit.n_prompt = (int) s->n_prompt;

    /* ids are not reused before 2^32 requests on one connection */

    do {
        id = peer->next_id++;
    } while (id == 0 || ngx_http_llm_peer_lookup(peer, id) != NULL);

    rc = llm_proto_encode_submit(&peer->out, id, &s->submit);

    if (rc != 0) {
        ngx_log_error(NGX_LOG_ERR, s->log, 0,
                      "llm: cannot encode SUBMIT: %s", llm_strerror(rc));
        return NGX_ERROR;
    }

    s->node.key = id;
    ngx_rbtree_insert(&peer->streams, &s->node);
    peer->nstreams++;

    s->peer = peer;
    s->fingerprint = peer->fingerprint;
    s->tries++;

    ngx_add_timer(&s->timer, peer->client->lmcf->engine_timeout);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, s->log, 0,
                   "llm: submit request %uD, %ui prompt tokens",
                   id, s->n_prompt);

    ngx_http_llm_peer_post_write(peer);

    return NGX_OK;
}


/*
 * No engine is ready: wait for one that is connecting, trying at once
 * those that are down (a restarted daemon is picked up by the first
 * request), or give up.
 */

static ngx_int_t
ngx_http_llm_stream_wait(ngx_http_llm_client_t *client,
    ngx_http_llm_stream_t *s)
{
    ngx_uint_t            i;
    ngx_http_llm_peer_t  *peer;

    for (i = 0; i < client->npeers; i++) {
        peer = &client->peers[i];

        if (peer->state == NGX_HTTP_LLM_PEER_DOWN
            && ngx_current_msec - peer->last_attempt
               >= NGX_HTTP_LLM_BACKOFF_MIN)
        {
            ngx_http_llm_peer_connect(peer);
        }
    }

    if (!ngx_http_llm_client_pending(client)) {
        return NGX_BUSY;
    }

    /* waiting ends early if every engine turns out down */

    ngx_queue_insert_tail(&client->waiting, &s->queue);
    s->waiting = 1;

    ngx_add_timer(&s->timer, client->lmcf->engine_timeout);

    return NGX_OK;
}


/* Its engine went away before the first token: run it elsewhere. */

static void
ngx_http_llm_stream_move(ngx_http_llm_client_t *client,
    ngx_http_llm_stream_t *s)
{
    ngx_int_t             rc;
    ngx_http_llm_peer_t  *peer;

    peer = ngx_http_llm_client_pick(client);

    if (peer == NULL) {
        ngx_queue_insert_tail(&client->waiting, &s->queue);
        s->waiting = 1;
        ngx_add_timer(&s->timer, client->lmcf->engine_timeout);
        return;
    }

    rc = ngx_http_llm_submit_to(peer, s);

    if (rc == NGX_DECLINED) {
        s->fail(s, NGX_HTTP_LLM_FAIL_CONTEXT, NULL);

    } else if (rc != NGX_OK) {
        s->fail(s, NGX_HTTP_LLM_FAIL_INTERNAL, "cannot submit");
    }
}


static void
ngx_http_llm_stream_timeout(ngx_event_t *ev)
{
    ngx_http_llm_stream_t  *s;

    s = ev->data;

    if (s->waiting) {
        ngx_queue_remove(&s->queue);
        s->waiting = 0;

        s->fail(s, NGX_HTTP_LLM_FAIL_UNAVAILABLE,
                "no engine became ready in time");
        return;
    }

    ngx_log_error(NGX_LOG_ERR, s->log, 0,
                  "llm: engine sent nothing for request %uA in time",
                  (ngx_atomic_uint_t) s->node.key);

    ngx_http_llm_engine_cancel(s);

    s->fail(s, NGX_HTTP_LLM_FAIL_TIMEOUT, NULL);
}


/* ---- engine statistics for /metrics ---------------------------------- */

/*
 * Asks every ready engine for STATS: NGX_OK if none is ready (nothing to
 * wait for), NGX_AGAIN: w->handler follows when all have answered or
 * after timeout.
 */

ngx_int_t
ngx_http_llm_engine_stats_request(ngx_http_llm_stats_wait_t *w,
    ngx_msec_t timeout)
{
    ngx_uint_t              i, n;
    ngx_http_llm_peer_t    *peer;
    ngx_http_llm_client_t  *client;

    client = ngx_http_llm_client;

    if (client == NULL) {
        return NGX_OK;
    }

    n = 0;

    for (i = 0; i < client->npeers; i++) {
        peer = &client->peers[i];

        if (peer->state != NGX_HTTP_LLM_PEER_READY) {
            continue;
        }

        if (llm_proto_encode_empty(&peer->out, LLM_MSG_STATS_REQ, 0) != 0) {
            continue;
        }

        peer->stats_pending++;
        ngx_http_llm_peer_post_write(peer);
        n++;
    }

    if (n == 0) {
        return NGX_OK;
    }

    w->timer.handler = ngx_http_llm_stats_timeout;
    w->timer.data = w;
    w->timer.log = client->log;

    ngx_queue_insert_tail(&client->stats_waiting, &w->queue);
    w->waiting = 1;

    ngx_add_timer(&w->timer, timeout);

    return NGX_AGAIN;
}


void
ngx_http_llm_engine_stats_cancel(ngx_http_llm_stats_wait_t *w)
{
    if (w->waiting) {
        ngx_queue_remove(&w->queue);
        w->waiting = 0;
    }

    if (w->timer.timer_set) {
        ngx_del_timer(&w->timer);
    }
}


/* The engines as last seen: up (ready and answered STATS) and stats. */

ngx_uint_t
ngx_http_llm_engine_stats_get(ngx_http_llm_engine_stats_t *out,
    ngx_uint_t max)
{
    ngx_uint_t              i, n;
    ngx_http_llm_peer_t    *peer;
    ngx_http_llm_client_t  *client;

    client = ngx_http_llm_client;

    if (client == NULL) {
        return 0;
    }

    n = 0;

    for (i = 0; i < client->npeers && n < max; i++) {
        peer = &client->peers[i];

        out[n].name = peer->addr->name;
        out[n].up = (peer->state == NGX_HTTP_LLM_PEER_READY
                     && peer->has_stats);
        out[n].fresh = out[n].up && peer->stats_pending == 0;
        out[n].stats = peer->stats;
        n++;
    }

    return n;
}


/* Every STATS asked for has come (or its engine went away). */

static void
ngx_http_llm_stats_check(ngx_http_llm_client_t *client)
{
    ngx_uint_t                  i;
    ngx_queue_t                *q;
    ngx_http_llm_stats_wait_t  *w;

    for (i = 0; i < client->npeers; i++) {
        if (client->peers[i].stats_pending) {
            return;
        }
    }

    while (!ngx_queue_empty(&client->stats_waiting)) {
        q = ngx_queue_head(&client->stats_waiting);
        w = ngx_queue_data(q, ngx_http_llm_stats_wait_t, queue);

        ngx_http_llm_engine_stats_cancel(w);

        w->handler(w);
    }
}


static void
ngx_http_llm_stats_timeout(ngx_event_t *ev)
{
    ngx_http_llm_stats_wait_t  *w = ev->data;

    ngx_http_llm_engine_stats_cancel(w);

    w->handler(w);
}


/* ---- control requests: adapter load, unload, list ---------------------- */

ngx_uint_t
ngx_http_llm_engine_count(void)
{
    return ngx_http_llm_client ? ngx_http_llm_client->npeers : 0;
}


ngx_str_t *
ngx_http_llm_engine_name(ngx_uint_t i)
{
    ngx_http_llm_client_t  *client;

    client = ngx_http_llm_client;

    if (client == NULL || i >= client->npeers) {
        return NULL;
    }

    return &client->peers[i].addr->name;
}


ngx_int_t
ngx_http_llm_engine_ctl_send(ngx_http_llm_ctl_t *ctl, ngx_uint_t i, int type,
    const u_char *payload, size_t len)
{
    uint32_t                id;
    ngx_http_llm_peer_t    *peer;
    ngx_http_llm_client_t  *client;

    client = ngx_http_llm_client;

    if (client == NULL || i >= client->npeers) {
        return NGX_DECLINED;
    }

    peer = &client->peers[i];

    if (peer->state != NGX_HTTP_LLM_PEER_READY) {
        return NGX_DECLINED;
    }

    /* the ids of streams and control requests come from one counter */

    do {
        id = peer->next_id++;
    } while (id == 0 || ngx_http_llm_peer_lookup(peer, id) != NULL);

    if (llm_proto_encode_raw(&peer->out, 0, type, id, payload, len) != 0) {
        ngx_log_error(NGX_LOG_ALERT, client->log, 0,
                      "llm: cannot queue %s", llm_proto_type_name(type));
        return NGX_ERROR;
    }

    ctl->id = id;
    ctl->engine = i;
    ctl->peer = peer;
    ngx_queue_insert_tail(&peer->ctls, &ctl->queue);

    ngx_http_llm_peer_post_write(peer);

    return NGX_OK;
}


/* Forgets a control request; its answer, if it comes, is dropped. */

void
ngx_http_llm_engine_ctl_cancel(ngx_http_llm_ctl_t *ctl)
{
    if (ctl->peer) {
        ngx_queue_remove(&ctl->queue);
        ctl->peer = NULL;
    }
}


/* An answer for a control request: NGX_OK if one was waiting for it. */

static ngx_int_t
ngx_http_llm_peer_ctl(ngx_http_llm_peer_t *peer, llm_proto_frame *f)
{
    ngx_queue_t         *q;
    ngx_http_llm_ctl_t  *ctl;

    for (q = ngx_queue_head(&peer->ctls);
         q != ngx_queue_sentinel(&peer->ctls);
         q = ngx_queue_next(q))
    {
        ctl = ngx_queue_data(q, ngx_http_llm_ctl_t, queue);

        if (ctl->id != f->req_id) {
            continue;
        }

        ngx_queue_remove(q);
        ctl->peer = NULL;

        ctl->handler(ctl, f);
        return NGX_OK;
    }

    return NGX_DECLINED;
}


/* The engine went away: control requests get no answer. */

static void
ngx_http_llm_peer_fail_ctls(ngx_http_llm_peer_t *peer)
{
    ngx_queue_t         *q;
    ngx_http_llm_ctl_t  *ctl;

    while (!ngx_queue_empty(&peer->ctls)) {
        q = ngx_queue_head(&peer->ctls);
        ctl = ngx_queue_data(q, ngx_http_llm_ctl_t, queue);

        ngx_queue_remove(q);
        ctl->peer = NULL;

        ctl->handler(ctl, NULL);
    }
}
