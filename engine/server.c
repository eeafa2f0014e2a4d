/*
 * The llm-engine daemon's event loop (see server.h).
 *
 * Objects:
 *   srv_listener  a listening socket (unix or TCP)
 *   srv_conn      a client connection: input parser, output buffer, the
 *                 requests it has in flight
 *   srv_req       one request: (connection, client request id) <-> engine
 *                 sequence id; its pointer is the sequence's user_tag
 *
 * The engine is single-threaded and its callbacks run inside step(), so
 * nothing in the callback touches the engine (no cancel) or closes a
 * connection: it only appends frames.  Connections that fail are closed
 * between steps; their requests are cancelled and stay allocated, with
 * conn == NULL, until the engine reports them done.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "protocol.h"
#include "tokenizer.h"

#define SRV_READ_CHUNK      (64 * 1024)
#define SRV_READ_BUDGET     (1024 * 1024)   /* per connection per wakeup */
#define SRV_MAX_EVENTS      256
#define SRV_FINAL_FLUSH_MS  2000

enum { SRV_LISTENER = 1, SRV_CONN = 2, SRV_WAKE = 3 };

_Static_assert(LLM_PROTO_MAX_TOP == LLM_MAX_TOP_LOGPROBS,
               "TOKENS frames carry every top logprob the sampler gives");
_Static_assert((int) LLM_PFINISH_STOP == (int) LLM_FINISH_STOP
               && (int) LLM_PFINISH_LENGTH == (int) LLM_FINISH_LENGTH
               && (int) LLM_PFINISH_CANCELLED == (int) LLM_FINISH_CANCELLED
               && (int) LLM_PFINISH_ERROR == (int) LLM_FINISH_ERROR,
               "DONE finish reasons are the engine's");


/* ---- logging ------------------------------------------------------- */

static int log_level = LLM_LOG_INFO;

static const char *log_names[] = { "error", "warn", "info", "debug" };


void
llm_log_set_level(int level)
{
    log_level = level;
}


int
llm_log_level(void)
{
    return log_level;
}


int
llm_log_parse_level(const char *name)
{
    int i;

    for (i = 0; i < 4; i++) {
        if (strcmp(name, log_names[i]) == 0) {
            return i;
        }
    }
    if (strcmp(name, "warning") == 0) {
        return LLM_LOG_WARN;
    }
    return -1;
}


void
llm_log(int level, const char *fmt, ...)
{
    struct timespec ts;
    struct tm       tm;
    char            line[2048];
    int             n, m;
    va_list         ap;

    if (level > log_level) {
        return;
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    n = snprintf(line, sizeof(line),
                 "%04d-%02d-%02d %02d:%02d:%02d.%03ld [%s] ",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                 tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                 log_names[level < 0 ? 0 : level > 3 ? 3 : level]);
    va_start(ap, fmt);
    m = vsnprintf(line + n, sizeof(line) - (size_t) n - 1, fmt, ap);
    va_end(ap);
    if (m < 0) {
        m = 0;
    }
    n += m;
    if (n > (int) sizeof(line) - 2) {
        n = (int) sizeof(line) - 2;
    }
    line[n++] = '\n';
    /* One write per line so that lines do not interleave. */
    if (write(STDERR_FILENO, line, (size_t) n) < 0) {
        /* nothing sensible to do */
    }
}


/* ---- types --------------------------------------------------------- */

typedef struct srv_conn srv_conn;
typedef struct srv_req  srv_req;

typedef struct {
    int             kind;       /* SRV_* (first member of every watched
                                   object: epoll data points at it) */
    int             fd;
} srv_watch;

typedef struct {
    srv_watch       w;
    int             is_unix;
    char            addr[160];  /* as reported */
    char           *unix_path;  /* to remove at exit */
    dev_t           unix_dev;
    ino_t           unix_ino;
} srv_listener;

struct srv_req {
    srv_conn       *conn;       /* NULL once its connection is gone */
    uint32_t        req_id;
    uint64_t        seq_id;
    uint64_t        key;        /* conn serial << 32 | req_id */
    uint64_t        submit_ns;
    uint64_t        first_ns;   /* first token */
    uint64_t        first_step_ns; /* start of the step of that token */
    int             cancelled;
    int             done;
    unsigned        tok_flags;  /* LLM_TOKENS_* */
    llm_proto_token *pend;      /* [cap_pend] tokens of the current step */
    int             n_pend;
    int             cap_pend;
    int             dirty;      /* in s->dirty[] */
    srv_req        *hnext;      /* hash chain */
    srv_req        *cprev, *cnext;  /* the connection's requests */
};

struct srv_conn {
    srv_watch       w;
    uint64_t        serial;
    char            peer[160];
    char            client[LLM_PROTO_MAX_NAME + 1];
    int             hello;      /* HELLO done */
    int             version;
    llm_proto_parser in;
    llm_proto_buf   out;
    int             want_out;   /* EPOLLOUT registered */
    int             closing;    /* flush what is queued, then close */
    int             dead;       /* closed; freed after this iteration */
    int             to_flush;   /* in s->flush list */
    int             n_reqs;
    srv_req        *reqs;
    srv_conn       *prev, *next;
    srv_conn       *flush_next;
    srv_conn       *dead_next;
};

struct llm_server {
    llm_engine         *e;
    llm_server_params   p;
    int                 ep;
    srv_watch           wake;       /* eventfd */
    int                 wake_set;   /* the engine calls server_wake */
    int                 spare_fd;   /* for accept() under EMFILE */
    srv_listener        ls[LLM_SERVER_MAX_LISTEN];
    int                 n_ls;

    srv_conn           *conns;
    int                 n_conns;
    uint64_t            next_serial;
    srv_conn           *flush;      /* connections with new output */
    srv_conn           *dead;

    srv_req           **htab;       /* [hcap] chains by key */
    size_t              hcap;
    size_t              n_reqs;

    srv_req           **dirty;      /* requests with tokens this step */
    int                 n_dirty;
    int                 cap_dirty;
    srv_req            *done_list;  /* finished this step, to free */

    int32_t            *ids;        /* scratch for prompt / stop ids */
    size_t              cap_ids;

    llm_proto_hello_ok  hello_ok;
    uint64_t            start_ns;
    uint64_t            step_ns;    /* start of the current step */
    uint64_t            requests_total;
    uint64_t            requests_rejected;

    volatile sig_atomic_t stop_requests;
    int                 draining;
    uint64_t            drain_deadline_ns;  /* 0: none */
    int                 drain_cancelled;
};


/* ---- request table ------------------------------------------------- */

static uint64_t
req_key(const srv_conn *c, uint32_t req_id)
{
    return c->serial << 32 | req_id;
}


static size_t
hash_slot(const llm_server *s, uint64_t key)
{
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (size_t) key & (s->hcap - 1);
}


static srv_req *
req_find(llm_server *s, srv_conn *c, uint32_t req_id)
{
    uint64_t key = req_key(c, req_id);
    srv_req *r;

    for (r = s->htab[hash_slot(s, key)]; r != NULL; r = r->hnext) {
        if (r->key == key) {
            return r;
        }
    }
    return NULL;
}


static int
req_table_grow(llm_server *s)
{
    srv_req **nt, *r, *next;
    size_t    ncap = s->hcap * 2, i, old = s->hcap;

    nt = llm_calloc(ncap, sizeof(*nt));
    if (nt == NULL) {
        return LLM_ENOMEM;
    }
    s->hcap = ncap;
    for (i = 0; i < old; i++) {
        for (r = s->htab[i]; r != NULL; r = next) {
            size_t h = hash_slot(s, r->key);

            next = r->hnext;
            r->hnext = nt[h];
            nt[h] = r;
        }
    }
    llm_free(s->htab);
    s->htab = nt;
    return 0;
}


static void
req_unhash(llm_server *s, srv_req *r)
{
    srv_req **pp;

    for (pp = &s->htab[hash_slot(s, r->key)]; *pp != NULL;
         pp = &(*pp)->hnext)
    {
        if (*pp == r) {
            *pp = r->hnext;
            s->n_reqs--;
            return;
        }
    }
}


static void
req_unlink_conn(srv_req *r)
{
    srv_conn *c = r->conn;

    if (c == NULL) {
        return;
    }
    if (r->cprev != NULL) {
        r->cprev->cnext = r->cnext;
    } else {
        c->reqs = r->cnext;
    }
    if (r->cnext != NULL) {
        r->cnext->cprev = r->cprev;
    }
    r->cprev = r->cnext = NULL;
    c->n_reqs--;
    r->conn = NULL;
}


static void
req_free(llm_server *s, srv_req *r)
{
    req_unhash(s, r);
    req_unlink_conn(r);
    llm_free(r->pend);
    llm_free(r);
}


/* ---- output -------------------------------------------------------- */

static void
conn_mark_flush(llm_server *s, srv_conn *c)
{
    if (!c->to_flush && !c->dead) {
        c->to_flush = 1;
        c->flush_next = s->flush;
        s->flush = c;
    }
}


static void
conn_set_out(llm_server *s, srv_conn *c, int want)
{
    struct epoll_event ev;

    if (c->want_out == want || c->dead) {
        return;
    }
    memset(&ev, 0, sizeof(ev));
    ev.events = (c->closing ? 0 : EPOLLIN) | (want ? EPOLLOUT : 0);
    ev.data.ptr = &c->w;
    if (epoll_ctl(s->ep, EPOLL_CTL_MOD, c->w.fd, &ev) == 0) {
        c->want_out = want;
    }
}


static void conn_close(llm_server *s, srv_conn *c, const char *why);
static void server_wake(void *ud);


/* Writes what the socket takes.  0, or -1 if the connection was closed. */
static int
conn_flush(llm_server *s, srv_conn *c)
{
    ssize_t n;

    while (llm_proto_buf_pending(&c->out) > 0) {
        n = send(c->w.fd, c->out.data + c->out.pos,
                 llm_proto_buf_pending(&c->out), MSG_NOSIGNAL);
        if (n > 0) {
            llm_proto_buf_consume(&c->out, (size_t) n);
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (llm_proto_buf_pending(&c->out) > s->p.max_out_bytes) {
                llm_log(LLM_LOG_WARN, "conn %llu (%s): client is not "
                        "reading (%zu bytes queued); dropping it",
                        (unsigned long long) c->serial, c->peer,
                        llm_proto_buf_pending(&c->out));
                conn_close(s, c, "output limit");
                return -1;
            }
            conn_set_out(s, c, 1);
            return 0;
        }
        conn_close(s, c, n == 0 ? "send returned 0" : strerror(errno));
        return -1;
    }
    conn_set_out(s, c, 0);
    if (c->closing) {
        conn_close(s, c, "closing after error");
        return -1;
    }
    return 0;
}


static void
flush_all(llm_server *s)
{
    srv_conn *c;

    while ((c = s->flush) != NULL) {
        s->flush = c->flush_next;
        c->flush_next = NULL;
        c->to_flush = 0;
        if (!c->dead) {
            (void) conn_flush(s, c);
        }
    }
}


/* Encoding fails only for lack of memory (or a bug): the connection
 * cannot be kept consistent then, so it is closed. */
static void
conn_encoded(llm_server *s, srv_conn *c, int rc, const char *what)
{
    if (rc == 0) {
        conn_mark_flush(s, c);
        return;
    }
    llm_log(LLM_LOG_ERROR, "conn %llu: cannot encode %s: %s",
            (unsigned long long) c->serial, what, llm_strerror(rc));
    c->closing = 1;
    conn_mark_flush(s, c);
}


static void
send_error(llm_server *s, srv_conn *c, uint32_t req_id, int code,
           const char *msg)
{
    llm_log(LLM_LOG_DEBUG, "conn %llu req %u: ERROR %s: %s",
            (unsigned long long) c->serial, req_id,
            llm_proto_error_name(code), msg);
    conn_encoded(s, c, llm_proto_encode_error(&c->out, req_id, code, msg),
                 "ERROR");
}


/* A connection-level failure: tell the client why, then close. */
static void
conn_fail(llm_server *s, srv_conn *c, int code, const char *msg)
{
    llm_log(LLM_LOG_WARN, "conn %llu (%s): %s; closing",
            (unsigned long long) c->serial, c->peer, msg);
    send_error(s, c, 0, code, msg);
    c->closing = 1;
    conn_mark_flush(s, c);
}


/* ---- connections --------------------------------------------------- */

static void
conn_cancel_all(llm_server *s, srv_conn *c)
{
    srv_req *r;

    while ((r = c->reqs) != NULL) {
        req_unlink_conn(r);
        if (!r->cancelled && !r->done) {
            r->cancelled = 1;
            if (llm_engine_cancel(s->e, r->seq_id) != 0) {
                /* Already gone from the engine: nothing will report it. */
                req_free(s, r);
            }
        }
    }
}


static void
conn_close(llm_server *s, srv_conn *c, const char *why)
{
    if (c->dead) {
        return;
    }
    llm_log(LLM_LOG_DEBUG, "conn %llu (%s): closed (%s), %d requests "
            "cancelled", (unsigned long long) c->serial, c->peer, why,
            c->n_reqs);
    conn_cancel_all(s, c);
    epoll_ctl(s->ep, EPOLL_CTL_DEL, c->w.fd, NULL);
    close(c->w.fd);
    c->w.fd = -1;
    c->dead = 1;
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else {
        s->conns = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    s->n_conns--;
    /* Freed after the current batch of epoll events, which may still
     * point at it. */
    c->dead_next = s->dead;
    s->dead = c;
}


static void
free_dead(llm_server *s)
{
    srv_conn *c, *flushing;

    /* A dead connection may still sit in the flush list: unlink it. */
    while (s->flush != NULL && s->flush->dead) {
        s->flush = s->flush->flush_next;
    }
    for (flushing = s->flush; flushing != NULL;
         flushing = flushing->flush_next)
    {
        while (flushing->flush_next != NULL && flushing->flush_next->dead) {
            flushing->flush_next = flushing->flush_next->flush_next;
        }
    }
    while ((c = s->dead) != NULL) {
        s->dead = c->dead_next;
        llm_proto_parser_free(&c->in);
        llm_proto_buf_free(&c->out);
        llm_free(c);
    }
}


static void
format_peer(const struct sockaddr_storage *ss, socklen_t len, char *out,
            size_t size)
{
    char host[INET6_ADDRSTRLEN];

    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const void *) ss;

        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        snprintf(out, size, "%s:%u", host, ntohs(a->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const void *) ss;

        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        snprintf(out, size, "[%s]:%u", host, ntohs(a->sin6_port));
    } else {
        snprintf(out, size, "unix");
    }
    (void) len;
}


static void
accept_conns(llm_server *s, srv_listener *l)
{
    struct sockaddr_storage ss;
    struct epoll_event      ev;
    socklen_t               len;
    srv_conn               *c;
    int                     fd, one = 1;

    for ( ;; ) {
        len = sizeof(ss);
        fd = accept4(l->w.fd, (struct sockaddr *) &ss, &len,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EMFILE || errno == ENFILE) {
                /* Out of descriptors: accept with the spare and close,
                 * so the listener does not stay readable forever. */
                llm_log(LLM_LOG_ERROR, "accept on %s: %s (raise the fd "
                        "limit)", l->addr, strerror(errno));
                if (s->spare_fd >= 0) {
                    close(s->spare_fd);
                    fd = accept(l->w.fd, NULL, NULL);
                    if (fd >= 0) {
                        close(fd);
                    }
                    s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                }
            } else if (errno != EAGAIN && errno != EWOULDBLOCK
                       && errno != ECONNABORTED)
            {
                llm_log(LLM_LOG_ERROR, "accept on %s: %s", l->addr,
                        strerror(errno));
            }
            return;
        }
        if (s->n_conns >= s->p.max_conns) {
            llm_log(LLM_LOG_WARN, "connection limit (%d) reached on %s; "
                    "refusing a client", s->p.max_conns, l->addr);
            close(fd);
            continue;
        }
        if (!l->is_unix) {
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        c = llm_calloc(1, sizeof(*c));
        if (c == NULL) {
            llm_log(LLM_LOG_ERROR, "out of memory accepting a client");
            close(fd);
            return;
        }
        c->w.kind = SRV_CONN;
        c->w.fd = fd;
        c->serial = ++s->next_serial;
        if (l->is_unix) {
            snprintf(c->peer, sizeof(c->peer), "%s", l->addr);
        } else {
            format_peer(&ss, len, c->peer, sizeof(c->peer));
        }
        llm_proto_parser_init(&c->in, 0);
        llm_proto_buf_init(&c->out);
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN;
        ev.data.ptr = &c->w;
        if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            llm_log(LLM_LOG_ERROR, "epoll_ctl: %s", strerror(errno));
            close(fd);
            llm_free(c);
            continue;
        }
        c->next = s->conns;
        if (s->conns != NULL) {
            s->conns->prev = c;
        }
        s->conns = c;
        s->n_conns++;
        llm_log(LLM_LOG_DEBUG, "conn %llu: accepted from %s",
                (unsigned long long) c->serial, c->peer);
    }
}


/* ---- frames from clients ------------------------------------------- */

static int
ensure_ids(llm_server *s, size_t n)
{
    int32_t *p;

    if (n <= s->cap_ids) {
        return 0;
    }
    p = llm_realloc(s->ids, n * sizeof(int32_t));
    if (p == NULL) {
        return LLM_ENOMEM;
    }
    s->ids = p;
    s->cap_ids = n;
    return 0;
}


static void
on_hello(llm_server *s, srv_conn *c, const llm_proto_frame *f)
{
    llm_proto_hello    h;
    llm_proto_hello_ok ok;
    llm_err            err;
    char               msg[256];
    int                v;

    if (llm_proto_decode_hello(f, &h, &err) != 0) {
        conn_fail(s, c, LLM_PERR_PROTOCOL, err.msg);
        return;
    }
    v = llm_proto_negotiate(&h);
    if (v < 0) {
        snprintf(msg, sizeof(msg), "no common protocol version: client "
                 "speaks %u..%u, engine %d..%d", h.min_version,
                 h.max_version, LLM_PROTO_VERSION_MIN, LLM_PROTO_VERSION);
        conn_fail(s, c, LLM_PERR_VERSION, msg);
        return;
    }
    c->hello = 1;
    c->version = v;
    llm_proto_buf_set_version(&c->out, v);
    memcpy(c->client, h.client_name, sizeof(c->client));
    ok = s->hello_ok;
    ok.version = (uint16_t) v;
    llm_log(LLM_LOG_DEBUG, "conn %llu: HELLO from \"%s\", version %d",
            (unsigned long long) c->serial, c->client, v);
    conn_encoded(s, c, llm_proto_encode_hello_ok(&c->out, &ok), "HELLO_OK");
}


static void
reject(llm_server *s, srv_conn *c, uint32_t req_id, int code,
       const char *msg)
{
    s->requests_rejected++;
    send_error(s, c, req_id, code, msg);
}


/* The engine's class of a SUBMIT priority byte (unknown: standard). */
static int
proto_class(uint8_t p)
{
    switch (p) {
    case LLM_PROTO_CLASS_INTERACTIVE:
        return LLM_CLASS_INTERACTIVE;
    case LLM_PROTO_CLASS_BATCH:
        return LLM_CLASS_BATCH;
    default:
        return LLM_CLASS_STANDARD;
    }
}


/* The ERROR code of a failed llm_engine_submit. */
static int
submit_error_code(const llm_request *rq, int rc, const llm_err *err)
{
    switch (rc) {
    case LLM_ENOTFOUND:
        return LLM_PERR_NOT_FOUND;      /* unknown adapter */
    case LLM_ENOMEM:
        return LLM_PERR_INTERNAL;
    case LLM_EFULL:
        /* the KV cache cannot hold the request at all, or the adapter
         * host cache is full of adapters that running sequences pin
         * (the registry's message names the adapter): retry later */
        if (rq->adapter != NULL && strncmp(err->msg, "adapter", 7) == 0) {
            return LLM_PERR_OVERLOADED;
        }
        return LLM_PERR_CONTEXT;
    case LLM_EFORMAT:
    case LLM_EIO:
    case LLM_EUNSUP:
    case LLM_EBACKEND:
        /* a registered adapter whose files went bad since */
        return rq->adapter != NULL ? LLM_PERR_INTERNAL
                                   : LLM_PERR_BAD_REQUEST;
    default:
        return LLM_PERR_BAD_REQUEST;
    }
}


static void
on_submit(llm_server *s, srv_conn *c, const llm_proto_frame *f)
{
    llm_proto_submit  m;
    llm_request       rq;
    llm_engine_stats  st;
    llm_err           err;
    srv_req          *r;
    char              msg[LLM_ERR_MAX + 64];
    int               rc, n_ctx;
    size_t            h;

    if (llm_proto_decode_submit(f, &m, &err) != 0) {
        conn_fail(s, c, LLM_PERR_PROTOCOL, err.msg);
        return;
    }
    if (f->req_id == 0) {
        reject(s, c, 0, LLM_PERR_BAD_REQUEST,
               "request id 0 is reserved for connection messages");
        return;
    }
    if (req_find(s, c, f->req_id) != NULL) {
        snprintf(msg, sizeof(msg), "request id %u is already in use on "
                 "this connection", f->req_id);
        reject(s, c, f->req_id, LLM_PERR_DUPLICATE, msg);
        return;
    }
    if (s->draining) {
        reject(s, c, f->req_id, LLM_PERR_DRAINING,
               "the engine is shutting down and accepts no new requests");
        return;
    }
    memset(&rq, 0, sizeof(rq));
    llm_sampling_default(&rq.sampling);
    rq.sampling.temperature = m.temperature;
    rq.sampling.top_k = m.top_k;
    rq.sampling.top_p = m.top_p;
    rq.sampling.min_p = m.min_p;
    rq.sampling.repetition_penalty = m.repetition_penalty;
    rq.sampling.frequency_penalty = m.frequency_penalty;
    rq.sampling.presence_penalty = m.presence_penalty;
    rq.sampling.seed = m.seed;
    rq.sampling.has_seed = (m.flags & LLM_SUBMIT_HAS_SEED) != 0;
    rq.sampling.top_logprobs = m.top_logprobs;
    rq.sampling.logprobs = (m.flags & LLM_SUBMIT_LOGPROBS) != 0
                           || m.top_logprobs > 0;
    if (llm_sampling_check(&rq.sampling, &err) != 0) {
        reject(s, c, f->req_id, LLM_PERR_BAD_REQUEST, err.msg);
        return;
    }
    if (m.max_tokens == 0 || m.max_tokens > INT32_MAX) {
        reject(s, c, f->req_id, LLM_PERR_BAD_REQUEST,
               "max_tokens must be at least 1");
        return;
    }
    if (m.n_prompt == 0) {
        reject(s, c, f->req_id, LLM_PERR_BAD_REQUEST, "the prompt is empty");
        return;
    }
    n_ctx = llm_engine_n_ctx(s->e);
    if ((uint64_t) m.n_prompt + m.max_tokens > (uint64_t) n_ctx) {
        snprintf(msg, sizeof(msg), "prompt (%d tokens) plus max_tokens "
                 "(%u) exceeds the context length of %d tokens",
                 m.n_prompt, m.max_tokens, n_ctx);
        reject(s, c, f->req_id, LLM_PERR_CONTEXT, msg);
        return;
    }
    llm_engine_get_stats(s->e, &st);
    if (st.n_waiting >= s->p.max_queue) {
        snprintf(msg, sizeof(msg), "the engine queue is full (%d waiting)",
                 st.n_waiting);
        reject(s, c, f->req_id, LLM_PERR_OVERLOADED, msg);
        return;
    }

    if (ensure_ids(s, (size_t) m.n_prompt + (size_t) m.n_stop) != 0) {
        reject(s, c, f->req_id, LLM_PERR_INTERNAL, "out of memory");
        return;
    }
    llm_proto_copy_ids(m.prompt, m.n_prompt, s->ids);
    llm_proto_copy_ids(m.stop_ids, m.n_stop, s->ids + m.n_prompt);

    if (s->n_reqs + 1 > s->hcap && req_table_grow(s) != 0) {
        reject(s, c, f->req_id, LLM_PERR_INTERNAL, "out of memory");
        return;
    }
    r = llm_calloc(1, sizeof(*r));
    if (r == NULL) {
        reject(s, c, f->req_id, LLM_PERR_INTERNAL, "out of memory");
        return;
    }
    rq.prompt = s->ids;
    rq.n_prompt = m.n_prompt;
    rq.max_tokens = (int) m.max_tokens;
    rq.stop_ids = s->ids + m.n_prompt;
    rq.n_stop_ids = m.n_stop;
    rq.ignore_eos = (m.flags & LLM_SUBMIT_IGNORE_EOS) != 0;
    rq.user_tag = (uint64_t) (uintptr_t) r;
    rq.priority = proto_class(m.priority);
    rq.tenant = m.tenant;
    rq.weight = m.weight > 0 ? m.weight : 1;
    rq.queue_timeout_ms = m.queue_timeout_ms;
    rq.adapter = m.adapter[0] != '\0' ? m.adapter : NULL;
    rq.cache_namespace = m.cache_namespace;
    rq.cache_shared_namespace = m.cache_shared_namespace;
    rq.cache_shared_tokens = m.cache_shared_tokens > (uint32_t) m.n_prompt
                             ? m.n_prompt : (int) m.cache_shared_tokens;

    rc = llm_engine_submit(s->e, &rq, &r->seq_id, &err);
    if (rc != 0) {
        llm_free(r);
        reject(s, c, f->req_id, submit_error_code(&rq, rc, &err), err.msg);
        return;
    }

    r->conn = c;
    r->req_id = f->req_id;
    r->key = req_key(c, f->req_id);
    r->submit_ns = llm_now_ns();
    r->tok_flags = rq.sampling.logprobs ? LLM_TOKENS_LOGPROBS : 0;
    h = hash_slot(s, r->key);
    r->hnext = s->htab[h];
    s->htab[h] = r;
    s->n_reqs++;
    r->cnext = c->reqs;
    if (c->reqs != NULL) {
        c->reqs->cprev = r;
    }
    c->reqs = r;
    c->n_reqs++;
    s->requests_total++;
    llm_log(LLM_LOG_DEBUG, "conn %llu req %u: seq %llu, %d prompt tokens, "
            "max_tokens %u", (unsigned long long) c->serial, f->req_id,
            (unsigned long long) r->seq_id, m.n_prompt, m.max_tokens);
}


static void
on_cancel(llm_server *s, srv_conn *c, const llm_proto_frame *f)
{
    llm_err  err;
    srv_req *r;

    if (llm_proto_decode_empty(f, &err) != 0) {
        conn_fail(s, c, LLM_PERR_PROTOCOL, err.msg);
        return;
    }
    r = req_find(s, c, f->req_id);
    if (r == NULL || r->cancelled || r->done) {
        return;     /* finished already: its DONE is on the way */
    }
    r->cancelled = 1;
    if (llm_engine_cancel(s->e, r->seq_id) != 0) {
        llm_log(LLM_LOG_WARN, "conn %llu req %u: engine does not know seq "
                "%llu", (unsigned long long) c->serial, r->req_id,
                (unsigned long long) r->seq_id);
    }
}


static void
fill_stats(llm_server *s, llm_proto_stats *m)
{
    llm_engine_stats st;

    llm_engine_get_stats(s->e, &st);
    memset(m, 0, sizeof(*m));
    m->waiting = (uint32_t) st.n_waiting;
    m->running = (uint32_t) st.n_running;
    m->kv_blocks_total = (uint32_t) st.kv_blocks_total;
    m->kv_blocks_used = (uint32_t) st.kv_blocks_used;
    m->block_size = (uint32_t) st.block_size;
    m->connections = (uint32_t) s->n_conns;
    m->max_seqs = (uint32_t) s->p.max_seqs;
    m->last_batch_tokens = (uint32_t) st.last_batch_tokens;
    m->last_batch_seqs = (uint32_t) st.last_batch_seqs;
    m->draining = (uint32_t) s->draining;
    m->steps = st.steps;
    m->tokens_prefilled = st.tokens_prefilled;
    m->tokens_generated = st.tokens_generated;
    m->preemptions = st.preemptions;
    m->requests_total = s->requests_total;
    m->requests_rejected = s->requests_rejected;
    m->uptime_ms = (llm_now_ns() - s->start_ns) / 1000000;
    m->adapters_registered = (uint32_t) st.adapters_registered;
    m->adapters_loaded = (uint32_t) st.adapters_loaded;
    m->adapters_resident = (uint32_t) st.adapters_resident;
    m->adapter_host_bytes = st.adapter_host_bytes;
    m->adapter_device_bytes = st.adapter_device_bytes;
    m->adapter_loads = st.adapter_loads;
    m->adapter_uploads = st.adapter_uploads;
    m->adapter_host_evictions = st.adapter_host_evictions;
    m->adapter_device_evictions = st.adapter_device_evictions;
    m->prefix_blocks_cached = (uint32_t) st.prefix_blocks_cached;
    m->prefix_blocks_reusable = (uint32_t) st.prefix_blocks_reusable;
    m->prefix_lookups = st.prefix_lookups;
    m->prefix_hit_tokens = st.prefix_hit_tokens;
    m->prefix_tier_hit_tokens = st.prefix_tier_hit_tokens;
    m->prefix_evictions = st.prefix_evictions;
    m->tier_enabled = (uint32_t) st.tier_enabled;
    m->tier_connected = (uint32_t) st.tier_connected;
    m->tier_puts = st.tier_puts;
    m->tier_put_bytes = st.tier_put_bytes;
    m->tier_puts_dropped = st.tier_puts_dropped;
    m->tier_lookups = st.tier_lookups;
    m->tier_blocks_hit = st.tier_blocks_hit;
    m->tier_blocks_missed = st.tier_blocks_missed;
    m->tier_corrupt = st.tier_corrupt;
    m->tier_errors = st.tier_errors;
    m->prefix_bytes_cached = st.prefix_bytes_cached;
    m->tier_stored_bytes = st.tier_stored_bytes;
}


/* ---- adapters ------------------------------------------------------ */

static void
adapter_ok(llm_server *s, srv_conn *c, uint32_t req_id, const char *name,
           const llm_engine_adapter_info *info)
{
    llm_proto_adapter_ok ok;

    memset(&ok, 0, sizeof(ok));
    snprintf(ok.name, sizeof(ok.name), "%s", name);
    if (info != NULL) {
        snprintf(ok.version, sizeof(ok.version), "%s", info->version);
        ok.max_rank = (uint32_t) info->max_rank;
        ok.bytes = info->bytes;
    }
    conn_encoded(s, c, llm_proto_encode_adapter_ok(&c->out, req_id, &ok),
                 "ADAPTER_OK");
}


/*
 * ADAPTER_LOAD: register or replace, weights checked first.  Loading
 * reads the files on this thread (tens of milliseconds for a rank-16
 * adapter of a small model): running sequences pause for that long.
 */
static void
on_adapter_load(llm_server *s, srv_conn *c, const llm_proto_frame *f)
{
    llm_proto_adapter_load  m;
    llm_engine_adapter_info info;
    llm_err                 err;
    uint64_t                t0;
    int                     rc;

    if (llm_proto_decode_adapter_load(f, &m, &err) != 0) {
        conn_fail(s, c, LLM_PERR_PROTOCOL, err.msg);
        return;
    }
    t0 = llm_now_ns();
    memset(&err, 0, sizeof(err));
    rc = llm_engine_adapter_load(s->e, m.name, m.path, &info, &err);
    if (rc != 0) {
        llm_log(LLM_LOG_WARN, "adapter load refused: %s", err.msg);
        /* NOT_FOUND: a reload of a name never registered; a folder
         * that is missing or refused is a bad request */
        send_error(s, c, f->req_id,
                   rc == LLM_ENOTFOUND && m.path[0] == '\0'
                   ? LLM_PERR_NOT_FOUND
                   : rc == LLM_ENOMEM ? LLM_PERR_INTERNAL
                   : LLM_PERR_BAD_REQUEST, err.msg);
        return;
    }
    llm_log(LLM_LOG_INFO, "adapter \"%s\" loaded from %s: version %s, "
            "rank <= %d, %zu bytes, %.1f ms", m.name,
            info.dir ? info.dir : "?", info.version[0] ? info.version : "-",
            info.max_rank, info.bytes,
            (double) (llm_now_ns() - t0) / 1e6);
    adapter_ok(s, c, f->req_id, m.name, &info);
}


static void
on_adapter_unload(llm_server *s, srv_conn *c, const llm_proto_frame *f)
{
    llm_engine_adapter_info info;
    llm_err                 err;
    char                    name[LLM_PROTO_MAX_ADAPTER + 1];

    if (llm_proto_decode_adapter_unload(f, name, &err) != 0) {
        conn_fail(s, c, LLM_PERR_PROTOCOL, err.msg);
        return;
    }
    if (llm_engine_adapter_info_get(s->e, name, &info) != 0) {
        snprintf(err.msg, sizeof(err.msg), "adapter \"%s\" is not "
                 "registered", name);
        send_error(s, c, f->req_id, LLM_PERR_NOT_FOUND, err.msg);
        return;
    }
    if (llm_engine_adapter_unregister(s->e, name, &err) != 0) {
        send_error(s, c, f->req_id, LLM_PERR_NOT_FOUND, err.msg);
        return;
    }
    llm_log(LLM_LOG_INFO, "adapter \"%s\" unloaded (version %s)", name,
            info.version[0] ? info.version : "-");
    info.dir = NULL;
    adapter_ok(s, c, f->req_id, name, &info);
}


static void
on_adapter_list(llm_server *s, srv_conn *c, const llm_proto_frame *f)
{
    llm_proto_adapter_info *list;
    llm_engine_adapter_info info;
    llm_engine_stats        st;
    llm_err                 err;
    const char             *name;
    int                     i, n = 0;

    if (llm_proto_decode_empty(f, &err) != 0) {
        conn_fail(s, c, LLM_PERR_PROTOCOL, err.msg);
        return;
    }
    llm_engine_get_stats(s->e, &st);
    list = llm_calloc((size_t) (st.adapters_registered > 0
                                ? st.adapters_registered : 1),
                      sizeof(*list));
    if (list == NULL) {
        send_error(s, c, f->req_id, LLM_PERR_INTERNAL, "out of memory");
        return;
    }
    for (i = 0; i < st.adapters_registered
                && (name = llm_engine_adapter_name(s->e, i)) != NULL; i++)
    {
        if (llm_engine_adapter_info_get(s->e, name, &info) != 0) {
            continue;
        }
        snprintf(list[n].name, sizeof(list[n].name), "%s", name);
        snprintf(list[n].version, sizeof(list[n].version), "%s",
                 info.version);
        list[n].flags = (info.loaded ? LLM_ADAPTER_LOADED : 0)
                        | (info.resident ? LLM_ADAPTER_RESIDENT : 0);
        list[n].max_rank = (uint32_t) info.max_rank;
        list[n].bytes = info.bytes;
        n++;
    }
    conn_encoded(s, c, llm_proto_encode_adapters(&c->out, f->req_id,
                                                 (uint32_t) n, list, n,
                                                 NULL), "ADAPTERS");
    llm_free(list);
}


static void
on_frame(llm_server *s, srv_conn *c, const llm_proto_frame *f)
{
    llm_proto_stats st;
    llm_err         err;
    char            msg[128];

    if (!c->hello) {
        if (f->type != LLM_MSG_HELLO) {
            snprintf(msg, sizeof(msg), "expected HELLO first, got %s",
                     llm_proto_type_name(f->type));
            conn_fail(s, c, LLM_PERR_PROTOCOL, msg);
            return;
        }
        on_hello(s, c, f);
        return;
    }
    if (f->version != c->version) {
        snprintf(msg, sizeof(msg), "frame version %u, but version %d was "
                 "agreed", f->version, c->version);
        conn_fail(s, c, LLM_PERR_PROTOCOL, msg);
        return;
    }

    switch (f->type) {
    case LLM_MSG_SUBMIT:
        on_submit(s, c, f);
        break;
    case LLM_MSG_CANCEL:
        on_cancel(s, c, f);
        break;
    case LLM_MSG_STATS_REQ:
    case LLM_MSG_PING:
        if (llm_proto_decode_empty(f, &err) != 0) {
            conn_fail(s, c, LLM_PERR_PROTOCOL, err.msg);
            break;
        }
        if (f->type == LLM_MSG_PING) {
            conn_encoded(s, c, llm_proto_encode_empty(&c->out, LLM_MSG_PONG,
                                                      f->req_id), "PONG");
            break;
        }
        fill_stats(s, &st);
        conn_encoded(s, c, llm_proto_encode_stats(&c->out, f->req_id, &st),
                     "STATS");
        break;
    case LLM_MSG_ADAPTER_LOAD:
        on_adapter_load(s, c, f);
        break;
    case LLM_MSG_ADAPTER_UNLOAD:
        on_adapter_unload(s, c, f);
        break;
    case LLM_MSG_ADAPTER_LIST:
        on_adapter_list(s, c, f);
        break;
    default:
        snprintf(msg, sizeof(msg), "unexpected %s (%u) frame from a client",
                 llm_proto_type_name(f->type), f->type);
        conn_fail(s, c, LLM_PERR_PROTOCOL, msg);
        break;
    }
}


/* A closing connection: cancel its requests now, read nothing more,
 * wait for the queued output (the ERROR saying why) to leave, close. */
static void
conn_stop_reading(llm_server *s, srv_conn *c)
{
    conn_cancel_all(s, c);
    shutdown(c->w.fd, SHUT_RD);
    c->want_out = -1;               /* force the epoll update */
    conn_set_out(s, c, 1);
    conn_mark_flush(s, c);
}


static void
conn_read(llm_server *s, srv_conn *c)
{
    llm_proto_frame f;
    llm_err         err;
    size_t          budget = SRV_READ_BUDGET;
    ssize_t         n;
    uint8_t        *buf;
    int             rc = 0, eof = 0;

    while (budget > 0 && !c->closing) {
        buf = llm_proto_parser_space(&c->in, SRV_READ_CHUNK);
        if (buf == NULL) {
            conn_fail(s, c, LLM_PERR_INTERNAL, "out of memory");
            break;
        }
        n = recv(c->w.fd, buf, SRV_READ_CHUNK, 0);
        if (n > 0) {
            llm_proto_parser_commit(&c->in, (size_t) n);
            budget -= (size_t) n < budget ? (size_t) n : budget;
        } else if (n == 0) {
            eof = 1;
            break;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            break;
        } else {
            conn_close(s, c, strerror(errno));
            return;
        }

        /* Frames complete so far; the parser keeps partial ones. */
        while (!c->closing
               && (rc = llm_proto_parser_next(&c->in, &f, &err)) == 1)
        {
            on_frame(s, c, &f);
            /* Replies pile up for a client that sends without reading:
             * hold it to the output bound here too. */
            if (llm_proto_buf_pending(&c->out) > s->p.max_out_bytes
                && conn_flush(s, c) != 0)
            {
                return;
            }
        }
        if (!c->closing && rc < 0) {
            conn_fail(s, c, LLM_PERR_PROTOCOL, err.msg);
        }
    }

    if (c->closing) {
        conn_stop_reading(s, c);
    } else if (eof) {
        conn_close(s, c, "client closed");
    }
}


/* ---- engine events ------------------------------------------------- */

static int
push_dirty(llm_server *s, srv_req *r)
{
    srv_req **d;
    int       cap;

    if (r->dirty) {
        return 0;
    }
    if (s->n_dirty == s->cap_dirty) {
        cap = s->cap_dirty ? s->cap_dirty * 2 : 64;
        d = llm_realloc(s->dirty, (size_t) cap * sizeof(*d));
        if (d == NULL) {
            return LLM_ENOMEM;
        }
        s->dirty = d;
        s->cap_dirty = cap;
    }
    s->dirty[s->n_dirty++] = r;
    r->dirty = 1;
    return 0;
}


/* Sends the tokens a request collected in this step as one frame. */
static void
req_flush_tokens(llm_server *s, srv_req *r)
{
    if (r->n_pend == 0) {
        return;
    }
    if (r->conn != NULL && !r->conn->closing) {
        conn_encoded(s, r->conn,
                     llm_proto_encode_tokens(&r->conn->out, r->req_id,
                                             r->tok_flags, r->pend,
                                             r->n_pend), "TOKENS");
    }
    r->n_pend = 0;
}


static void
on_token(llm_server *s, srv_req *r, const llm_event *ev)
{
    llm_proto_token *t;
    int              i, cap;

    if (r->first_ns == 0) {
        r->first_ns = llm_now_ns();
        r->first_step_ns = s->step_ns;
    }
    if (r->conn == NULL) {
        return;             /* cancelled: nobody to tell */
    }
    if (r->n_pend == r->cap_pend
        || r->n_pend == LLM_PROTO_MAX_TOKENS_PER_FRAME)
    {
        if (r->n_pend == LLM_PROTO_MAX_TOKENS_PER_FRAME) {
            req_flush_tokens(s, r);
        } else {
            cap = r->cap_pend ? r->cap_pend * 2 : 4;
            t = llm_realloc(r->pend, (size_t) cap * sizeof(*t));
            if (t == NULL) {
                req_flush_tokens(s, r);     /* what we have, then this */
                if (r->cap_pend == 0) {
                    r->conn->closing = 1;
                    conn_mark_flush(s, r->conn);
                    return;
                }
            } else {
                r->pend = t;
                r->cap_pend = cap;
            }
        }
    }
    t = &r->pend[r->n_pend++];
    t->id = ev->sample.token;
    t->logprob = ev->sample.logprob;
    t->n_top = ev->sample.n_top;
    if (t->n_top < 0 || t->n_top > LLM_PROTO_MAX_TOP) {
        t->n_top = 0;
    }
    for (i = 0; i < t->n_top; i++) {
        t->top_ids[i] = ev->sample.top_ids[i];
        t->top_logprobs[i] = ev->sample.top_logprobs[i];
    }
    if (push_dirty(s, r) != 0) {
        req_flush_tokens(s, r);
    }
}


static uint32_t
ms_between(uint64_t a, uint64_t b)
{
    return b > a ? (uint32_t) ((b - a) / 1000000) : 0;
}


static void
on_done(llm_server *s, srv_req *r, const llm_event *ev)
{
    llm_proto_done d;
    uint64_t       now = llm_now_ns();

    req_flush_tokens(s, r);
    r->done = 1;
    if (ev->finish == LLM_FINISH_TIMEOUT) {
        /* never started: the client may retry elsewhere or later */
        if (r->conn != NULL && !r->conn->closing) {
            send_error(s, r->conn, r->req_id, LLM_PERR_OVERLOADED,
                       ev->error ? ev->error : "queue timeout");
        }
    } else if (r->conn != NULL && !r->conn->closing) {
        memset(&d, 0, sizeof(d));
        d.finish = (uint8_t) (ev->finish >= LLM_PFINISH_STOP
                              && ev->finish <= LLM_PFINISH_ERROR
                              ? ev->finish : LLM_PFINISH_ERROR);
        d.prompt_tokens = (uint32_t) ev->n_prompt;
        d.completion_tokens = (uint32_t) ev->n_generated;
        d.cached_tokens = (uint32_t) ev->n_cached;
        /* The engine does not say when a sequence was first scheduled;
         * the start of the step that gave its first token is the bound
         * we have (exact unless its prefill was split over steps). */
        d.queue_ms = r->first_ns ? ms_between(r->submit_ns, r->first_step_ns)
                                 : ms_between(r->submit_ns, now);
        d.ttft_ms = r->first_ns ? ms_between(r->submit_ns, r->first_ns) : 0;
        d.total_ms = ms_between(r->submit_ns, now);
        if (ev->finish == LLM_FINISH_ERROR) {
            snprintf(d.message, sizeof(d.message), "%s",
                     ev->error ? ev->error : "engine error");
        }
        llm_log(LLM_LOG_DEBUG, "conn %llu req %u: done (%s), %d+%d tokens, "
                "ttft %u ms, total %u ms",
                (unsigned long long) r->conn->serial, r->req_id,
                llm_proto_finish_name(d.finish), ev->n_prompt,
                ev->n_generated, d.ttft_ms, d.total_ms);
        conn_encoded(s, r->conn,
                     llm_proto_encode_done(&r->conn->out, r->req_id, &d),
                     "DONE");
    }
    if (ev->finish == LLM_FINISH_ERROR) {
        llm_log(LLM_LOG_ERROR, "seq %llu failed: %s",
                (unsigned long long) r->seq_id,
                ev->error ? ev->error : "engine error");
    }
    /* Freed after the step: it may sit in the dirty list. */
    req_unlink_conn(r);
    r->cnext = s->done_list;
    s->done_list = r;
}


static void
on_event(void *ud, const llm_event *ev)
{
    llm_server *s = ud;
    srv_req    *r = (srv_req *) (uintptr_t) ev->user_tag;

    if (r == NULL || r->done) {
        return;
    }
    switch (ev->type) {
    case LLM_EV_TOKEN:
        on_token(s, r, ev);
        break;
    case LLM_EV_DONE:
        on_done(s, r, ev);
        break;
    default:
        break;
    }
}


static void
engine_step(llm_server *s)
{
    llm_err  err;
    srv_req *r;
    int      i, rc;

    s->step_ns = llm_now_ns();
    rc = llm_engine_step(s->e, on_event, s, &err);
    if (rc != 0) {
        llm_log(LLM_LOG_ERROR, "engine step failed: %s", err.msg);
    }
    for (i = 0; i < s->n_dirty; i++) {
        r = s->dirty[i];
        r->dirty = 0;
        req_flush_tokens(s, r);
    }
    s->n_dirty = 0;
    while ((r = s->done_list) != NULL) {
        s->done_list = r->cnext;
        r->cnext = NULL;
        req_free(s, r);
    }
    flush_all(s);
}


/* ---- listeners ----------------------------------------------------- */

static int
listen_unix(llm_server *s, srv_listener *l, const char *path, llm_err *err)
{
    struct sockaddr_un sa;
    struct stat        st;
    int                fd, probe, mode;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        return llm_err_set(err, LLM_EINVAL, "unix:%s: path too long "
                           "(max %zu bytes)", path, sizeof(sa.sun_path) - 1);
    }
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, strlen(path));

    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            return llm_err_set(err, LLM_EINVAL, "unix:%s exists and is not "
                               "a socket; not replacing it", path);
        }
        /* A live engine answers; a stale file refuses. */
        probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0) {
            int live = connect(probe, (struct sockaddr *) &sa,
                               sizeof(sa)) == 0;

            close(probe);
            if (live) {
                return llm_err_set(err, LLM_EIO, "unix:%s: another process "
                                   "is listening there", path);
            }
        }
        llm_log(LLM_LOG_INFO, "removing stale socket file %s", path);
        if (unlink(path) != 0 && errno != ENOENT) {
            return llm_err_set(err, LLM_EIO, "unix:%s: cannot remove the "
                               "stale socket: %s", path, strerror(errno));
        }
    }

    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return llm_err_set(err, LLM_EIO, "socket: %s", strerror(errno));
    }
    if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) != 0) {
        llm_err_set(err, LLM_EIO, "unix:%s: bind: %s", path,
                    strerror(errno));
        close(fd);
        return LLM_EIO;
    }
    mode = s->p.socket_mode ? s->p.socket_mode : 0660;
    if (chmod(path, (mode_t) mode) != 0) {
        llm_log(LLM_LOG_WARN, "unix:%s: chmod %o: %s", path, mode,
                strerror(errno));
    }
    if (listen(fd, 511) != 0) {
        llm_err_set(err, LLM_EIO, "unix:%s: listen: %s", path,
                    strerror(errno));
        close(fd);
        unlink(path);
        return LLM_EIO;
    }
    if (stat(path, &st) == 0) {
        l->unix_dev = st.st_dev;
        l->unix_ino = st.st_ino;
    }
    l->unix_path = llm_strdup(path);
    if (l->unix_path == NULL) {
        close(fd);
        unlink(path);
        return llm_err_set(err, LLM_ENOMEM, "out of memory");
    }
    l->w.fd = fd;
    l->is_unix = 1;
    snprintf(l->addr, sizeof(l->addr), "unix:%s", path);
    return 0;
}


static int
listen_tcp(srv_listener *l, const char *spec, llm_err *err)
{
    struct addrinfo         hints, *res = NULL, *ai;
    struct sockaddr_storage ss;
    socklen_t               len = sizeof(ss);
    char                    host[128], port[16], shown[140];
    const char             *colon, *h;
    int                     fd = -1, one = 1, rc;
    size_t                  hl;

    /* "PORT", "HOST:PORT", "[V6]:PORT", "*:PORT" */
    colon = strrchr(spec, ':');
    if (colon == NULL) {
        h = "";
        hl = 0;
        colon = spec - 1;
    } else {
        h = spec;
        hl = (size_t) (colon - spec);
        if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
            h++;
            hl -= 2;
        }
    }
    if (hl >= sizeof(host) || strlen(colon + 1) == 0
        || strlen(colon + 1) >= sizeof(port)
        || strspn(colon + 1, "0123456789") != strlen(colon + 1))
    {
        return llm_err_set(err, LLM_EINVAL, "listen \"%s\": expected "
                           "unix:PATH, HOST:PORT or PORT", spec);
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    snprintf(port, sizeof(port), "%s", colon + 1);
    if (strcmp(host, "*") == 0) {
        host[0] = '\0';
    }

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (rc != 0) {
        return llm_err_set(err, LLM_EINVAL, "listen \"%s\": %s", spec,
                           gai_strerror(rc));
    }
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family,
                    ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0
            && listen(fd, 511) == 0)
        {
            break;
        }
        llm_err_set(err, LLM_EIO, "listen \"%s\": %s", spec,
                    strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        if (err != NULL && err->code == 0) {
            llm_err_set(err, LLM_EIO, "listen \"%s\": no usable address",
                        spec);
        }
        return LLM_EIO;
    }
    l->w.fd = fd;
    l->is_unix = 0;
    if (getsockname(fd, (struct sockaddr *) &ss, &len) == 0) {
        format_peer(&ss, len, shown, sizeof(shown));
        snprintf(l->addr, sizeof(l->addr), "%s", shown);
    } else {
        snprintf(l->addr, sizeof(l->addr), "%s", spec);
    }
    return 0;
}


/* ---- life cycle ---------------------------------------------------- */

static void
build_hello_ok(llm_server *s)
{
    const llm_model     *m = llm_engine_model(s->e);
    const llm_tokenizer *t = llm_engine_tokenizer(s->e);
    llm_proto_hello_ok  *h = &s->hello_ok;
    llm_engine_stats     st;
    int                  id;

    memset(h, 0, sizeof(*h));
    llm_engine_get_stats(s->e, &st);
    h->version = LLM_PROTO_VERSION;
    h->n_ctx = (uint32_t) llm_engine_n_ctx(s->e);
    h->n_vocab = (uint32_t) m->cfg.n_vocab;
    h->block_size = (uint32_t) st.block_size;
    h->max_seqs = (uint32_t) s->p.max_seqs;
    h->kv_blocks_total = (uint32_t) st.kv_blocks_total;
    h->bos_id = -1;
    h->eos_id = -1;
    memcpy(h->fingerprint, m->fingerprint, 32);
    snprintf(h->model_name, sizeof(h->model_name), "%s", m->cfg.name);
    snprintf(h->arch, sizeof(h->arch), "%s", m->cfg.arch);
    snprintf(h->server_name, sizeof(h->server_name), "llm-engine/0.1");
    if (t != NULL) {
        h->bos_id = llm_tokenizer_bos(t);
        h->eos_id = llm_tokenizer_eos(t);
        /* The module strips these from text; list them once here. */
        for (id = 0; id < m->cfg.n_vocab
                     && h->n_eog < LLM_PROTO_MAX_EOG_IDS; id++)
        {
            if (llm_tokenizer_is_eog(t, id)) {
                h->eog_ids[h->n_eog++] = id;
            }
        }
    }
}


llm_server *
llm_server_new(llm_engine *e, const llm_server_params *p, llm_err *err)
{
    llm_server        *s;
    struct epoll_event ev;
    int                i, rc;

    if (p->n_listen <= 0 || p->n_listen > LLM_SERVER_MAX_LISTEN) {
        llm_err_set(err, LLM_EINVAL, "between 1 and %d listen addresses "
                    "are needed", LLM_SERVER_MAX_LISTEN);
        return NULL;
    }
    s = llm_calloc(1, sizeof(*s));
    if (s == NULL) {
        llm_err_set(err, LLM_ENOMEM, "out of memory");
        return NULL;
    }
    s->e = e;
    s->p = *p;
    if (s->p.max_conns <= 0) {
        s->p.max_conns = 4096;
    }
    if (s->p.max_out_bytes == 0) {
        s->p.max_out_bytes = (size_t) 8 << 20;
    }
    if (s->p.max_queue <= 0) {
        s->p.max_queue = 4096;
    }
    if (s->p.drain_timeout_ms == 0) {
        s->p.drain_timeout_ms = 30000;
    }
    s->ep = -1;
    s->wake.fd = -1;
    s->wake.kind = SRV_WAKE;
    s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    s->start_ns = llm_now_ns();
    s->hcap = 256;
    s->htab = llm_calloc(s->hcap, sizeof(*s->htab));
    if (s->htab == NULL) {
        llm_err_set(err, LLM_ENOMEM, "out of memory");
        goto failed;
    }

    s->ep = epoll_create1(EPOLL_CLOEXEC);
    s->wake.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->ep < 0 || s->wake.fd < 0) {
        llm_err_set(err, LLM_EIO, "epoll/eventfd: %s", strerror(errno));
        goto failed;
    }
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.ptr = &s->wake;
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->wake.fd, &ev) != 0) {
        llm_err_set(err, LLM_EIO, "epoll_ctl: %s", strerror(errno));
        goto failed;
    }

    for (i = 0; i < p->n_listen; i++) {
        srv_listener *l = &s->ls[s->n_ls];
        const char   *a = p->listen[i];

        memset(l, 0, sizeof(*l));
        l->w.kind = SRV_LISTENER;
        l->w.fd = -1;
        if (err != NULL) {
            err->code = 0;
        }
        rc = strncmp(a, "unix:", 5) == 0 ? listen_unix(s, l, a + 5, err)
                                         : listen_tcp(l, a, err);
        if (rc != 0) {
            goto failed;
        }
        s->n_ls++;
        ev.events = EPOLLIN;
        ev.data.ptr = &l->w;
        if (epoll_ctl(s->ep, EPOLL_CTL_ADD, l->w.fd, &ev) != 0) {
            llm_err_set(err, LLM_EIO, "epoll_ctl: %s", strerror(errno));
            goto failed;
        }
    }
    build_hello_ok(s);
    llm_engine_set_wake(e, server_wake, s);
    s->wake_set = 1;
    return s;

failed:
    llm_server_free(s);
    return NULL;
}


void
llm_server_free(llm_server *s)
{
    srv_conn *c;
    srv_req  *r;
    size_t    i;
    int       k;

    if (s == NULL) {
        return;
    }
    if (s->wake_set) {
        llm_engine_set_wake(s->e, NULL, NULL);  /* before the fd closes */
    }
    while ((c = s->conns) != NULL) {
        conn_close(s, c, "server exit");
    }
    free_dead(s);
    for (k = 0; k < s->n_ls; k++) {
        srv_listener *l = &s->ls[k];
        struct stat   st;

        if (l->w.fd >= 0) {
            close(l->w.fd);
        }
        /* Remove the file only if it is still the one we made. */
        if (l->unix_path != NULL) {
            if (stat(l->unix_path, &st) == 0 && st.st_dev == l->unix_dev
                && st.st_ino == l->unix_ino)
            {
                unlink(l->unix_path);
            }
            llm_free(l->unix_path);
        }
    }
    if (s->htab != NULL) {
        for (i = 0; i < s->hcap; i++) {
            while ((r = s->htab[i]) != NULL) {
                s->htab[i] = r->hnext;
                llm_free(r->pend);
                llm_free(r);
            }
        }
    }
    llm_free(s->htab);
    llm_free(s->dirty);
    llm_free(s->ids);
    if (s->wake.fd >= 0) {
        close(s->wake.fd);
    }
    if (s->ep >= 0) {
        close(s->ep);
    }
    if (s->spare_fd >= 0) {
        close(s->spare_fd);
    }
    llm_free(s);
}


/* The engine's wake callback (another thread): the loop turns. */
static void
server_wake(void *ud)
{
    llm_server *s = ud;
    uint64_t    one = 1;

    if (write(s->wake.fd, &one, sizeof(one)) < 0) {
        /* the counter is already non-zero */
    }
}


void
llm_server_stop(llm_server *s)
{
    uint64_t one = 1;

    s->stop_requests++;
    if (write(s->wake.fd, &one, sizeof(one)) < 0) {
        /* the counter is read on the next loop turn anyway */
    }
}


int
llm_server_n_listen(const llm_server *s)
{
    return s->n_ls;
}


const char *
llm_server_listen_addr(const llm_server *s, int i)
{
    return i >= 0 && i < s->n_ls ? s->ls[i].addr : NULL;
}


static void
cancel_everything(llm_server *s)
{
    srv_req *r, *next;
    size_t   i;

    for (i = 0; i < s->hcap; i++) {
        for (r = s->htab[i]; r != NULL; r = next) {
            next = r->hnext;
            /* Cancelled ones already have their DONE queued. */
            if (r->done || r->cancelled) {
                continue;
            }
            r->cancelled = 1;
            if (llm_engine_cancel(s->e, r->seq_id) != 0) {
                /* The engine no longer knows it: nothing will report
                 * it, so stop waiting for it. */
                req_free(s, r);
            }
        }
    }
}


static void
check_stop(llm_server *s)
{
    llm_engine_stats st;

    if (s->stop_requests == 0) {
        return;
    }
    if (!s->draining) {
        s->draining = 1;
        llm_engine_get_stats(s->e, &st);
        if (s->p.drain_timeout_ms > 0) {
            s->drain_deadline_ns = llm_now_ns()
                                   + (uint64_t) s->p.drain_timeout_ms
                                     * 1000000;
        }
        llm_log(LLM_LOG_INFO, "stop requested: draining %d running and %d "
                "waiting sequences (timeout %s%d ms); new requests are "
                "refused", st.n_running, st.n_waiting,
                s->p.drain_timeout_ms < 0 ? "none, " : "",
                s->p.drain_timeout_ms < 0 ? 0 : s->p.drain_timeout_ms);
    }
    /* A second signal, or the deadline: stop waiting for them. */
    if (!s->drain_cancelled
        && (s->stop_requests > 1
            || (s->drain_deadline_ns != 0
                && llm_now_ns() >= s->drain_deadline_ns)))
    {
        llm_log(LLM_LOG_WARN, "drain %s: cancelling %zu unfinished "
                "requests", s->stop_requests > 1 ? "interrupted"
                                                 : "timed out", s->n_reqs);
        s->drain_cancelled = 1;
        cancel_everything(s);
    }
}


/* Last chance for queued output (DONE frames of the drain) to leave. */
static void
final_flush(llm_server *s)
{
    struct epoll_event evs[SRV_MAX_EVENTS];
    uint64_t           end = llm_now_ns()
                             + (uint64_t) SRV_FINAL_FLUSH_MS * 1000000;
    srv_conn          *c, *next;
    int                pending, n, i;

    for ( ;; ) {
        pending = 0;
        for (c = s->conns; c != NULL; c = next) {
            next = c->next;
            if (llm_proto_buf_pending(&c->out) > 0
                && conn_flush(s, c) == 0
                && llm_proto_buf_pending(&c->out) > 0)
            {
                pending = 1;
            }
        }
        free_dead(s);
        if (!pending || llm_now_ns() >= end) {
            break;
        }
        n = epoll_wait(s->ep, evs, SRV_MAX_EVENTS, 50);
        for (i = 0; i < n; i++) {
            (void) evs[i];      /* writability is re-tried above */
        }
    }
}


int
llm_server_run(llm_server *s, llm_err *err)
{
    struct epoll_event evs[SRV_MAX_EVENTS];
    srv_watch         *w;
    uint64_t           junk, now;
    int                n, i, timeout, busy;

    for ( ;; ) {
        check_stop(s);
        busy = !llm_engine_idle(s->e);
        if (s->draining && !busy && s->n_reqs == 0) {
            break;
        }

        if (busy) {
            /* sequences that only wait for Redis: the wake callback
             * ends the sleep; the timeout covers adapter waits */
            timeout = llm_engine_stalled(s->e) ? 5 : 0;
        } else if (s->draining && s->drain_deadline_ns != 0) {
            now = llm_now_ns();
            timeout = now >= s->drain_deadline_ns ? 0
                      : (int) ((s->drain_deadline_ns - now) / 1000000) + 1;
        } else {
            timeout = -1;
        }

        n = epoll_wait(s->ep, evs, SRV_MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return llm_err_set(err, LLM_EIO, "epoll_wait: %s",
                               strerror(errno));
        }
        for (i = 0; i < n; i++) {
            w = evs[i].data.ptr;
            if (w->kind == SRV_WAKE) {
                while (read(s->wake.fd, &junk, sizeof(junk)) > 0) {
                    /* drain the counter */
                }
            } else if (w->kind == SRV_LISTENER) {
                accept_conns(s, (srv_listener *) w);
            } else {
                srv_conn *c = (srv_conn *) w;

                if (c->dead) {
                    continue;
                }
                if (evs[i].events & EPOLLOUT) {
                    if (conn_flush(s, c) != 0) {
                        continue;
                    }
                }
                if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                    if (evs[i].events & (EPOLLHUP | EPOLLERR)
                        && c->closing)
                    {
                        conn_close(s, c, "hang-up");
                    } else if (c->closing) {
                        conn_stop_reading(s, c);
                    } else {
                        conn_read(s, c);
                    }
                }
            }
        }
        /* Replies (HELLO_OK, STATS, ERROR) go out before the step. */
        flush_all(s);
        free_dead(s);

        check_stop(s);
        if (!llm_engine_idle(s->e)) {
            engine_step(s);
            free_dead(s);
        }
    }

    final_flush(s);
    llm_log(LLM_LOG_INFO, "drained: %llu requests served, %llu refused",
            (unsigned long long) s->requests_total,
            (unsigned long long) s->requests_rejected);
    return 0;
}
