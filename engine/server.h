/*
 * The llm-engine daemon's event loop: one thread, epoll, non-blocking
 * unix and TCP sockets speaking the protocol of protocol.h, in front of
 * one llm_engine.
 *
 * Between engine steps the loop polls the sockets without waiting, so
 * new requests join the running batch at the next step and the tokens of
 * every step are flushed as soon as it ends.  When the engine is idle the
 * loop blocks in epoll_wait.
 *
 * Stopping: llm_server_stop() (async-signal-safe, for SIGTERM/SIGINT)
 * starts a drain: new submits get ERROR LLM_PERR_DRAINING, running
 * sequences finish, and after drain_timeout_ms whatever still runs is
 * cancelled.  Then llm_server_run() returns.
 */
#ifndef LLM_SERVER_H
#define LLM_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "engine.h"

#define LLM_SERVER_MAX_LISTEN 16

typedef struct llm_server llm_server;

typedef struct llm_server_params {
    /* "unix:/path/to.sock", "HOST:PORT", "[V6]:PORT" or "PORT" */
    const char     *listen[LLM_SERVER_MAX_LISTEN];
    int             n_listen;
    int             socket_mode;    /* unix socket permissions; 0: 0660 */
    int             max_conns;      /* 0: 4096 */
    size_t          max_out_bytes;  /* per-connection unsent output before
                                       the client is dropped; 0: 8 MiB */
    int             max_queue;      /* waiting requests before submits
                                       get OVERLOADED; 0: 4096 */
    int             drain_timeout_ms; /* <0: wait forever; 0: 30 s */
    int             max_seqs;       /* reported in HELLO_OK / STATS */
} llm_server_params;

/* Binds every listen address (replacing a stale unix socket file). */
llm_server *llm_server_new(llm_engine *e, const llm_server_params *p,
                           llm_err *err);
/* Removes the unix socket files it created, closes everything. */
void        llm_server_free(llm_server *s);

/* Serves until a stop request has drained.  0, or an error that made
 * serving impossible (epoll failure). */
int         llm_server_run(llm_server *s, llm_err *err);

/* Async-signal-safe: asks the loop to drain and return. */
void        llm_server_stop(llm_server *s);

/* The bound addresses, for the start-up log ("unix:/x", "127.0.0.1:80"
 * with the real port when 0 was asked). */
int         llm_server_n_listen(const llm_server *s);
const char *llm_server_listen_addr(const llm_server *s, int i);


/* ---- logging: stderr, "2024-05-01 12:00:00.123 [info] message" ----- */

enum {
    LLM_LOG_ERROR = 0,
    LLM_LOG_WARN  = 1,
    LLM_LOG_INFO  = 2,
    LLM_LOG_DEBUG = 3
};

void llm_log_set_level(int level);
int  llm_log_level(void);
/* "error", "warn", "info", "debug" -> level, or -1. */
int  llm_log_parse_level(const char *name);
void llm_log(int level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#endif /* LLM_SERVER_H */
