/*
 * llm-engine: the daemon that owns the model and serves NGINX workers
 * (and any other client of engine/protocol.h) over unix or TCP sockets.
 *
 *   llm-engine --model PATH [--listen unix:PATH | HOST:PORT]...
 *              [--device cpu|cuda:N] [--threads N] [--kv-memory SIZE]
 *              [--kv-type f16|f32|q8_0] [--max-seqs N]
 *              [--max-step-tokens N]
 *              [--ctx N] [--max-queue N] [--max-conns N]
 *              [--socket-mode OCTAL] [--drain-timeout SEC]
 *              [--adapters DIR] [--adapter-host-memory SIZE]
 *              [--adapter-device-memory SIZE]
 *              [--adapter-dtype auto|f16|f32|int8]
 *              [--log-level error|warn|info|debug]
 *
 * --adapters DIR registers every subfolder of DIR holding a peft adapter
 * under the folder's name (weights load at first use); more are loaded
 * and unloaded at run time with ADAPTER_LOAD / ADAPTER_UNLOAD.
 *
 * SIGTERM or SIGINT drains: running requests finish (up to
 * --drain-timeout seconds, then they are cancelled), new ones are refused,
 * and the process exits 0.  A second signal cancels at once.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/protocol.h"
#include "engine/server.h"
#include "engine/tokenizer.h"

#define DEFAULT_LISTEN "unix:/run/ngx_llm/engine.sock"

static llm_server           *the_server;
static volatile sig_atomic_t stop_early;


static void
usage(FILE *f)
{
    fprintf(f,
        "usage: llm-engine --model PATH [options]\n"
        "  --listen ADDR          unix:PATH, HOST:PORT or PORT; repeatable\n"
        "                         (default " DEFAULT_LISTEN ")\n"
        "  --device DEV           cpu (default) or cuda:N\n"
        "  --threads N            compute threads (default: all cores)\n"
        "  --kv-memory SIZE       KV cache budget, e.g. 512M, 2G "
        "(default 256M)\n"
        "  --kv-type f16|f32|q8_0 KV cache element type (default f16;\n"
        "                         q8_0: about half the bytes of f16)\n"
        "  --max-seqs N           sequences running at once (default 64)\n"
        "  --max-step-tokens N    token budget of one step (default 512)\n"
        "  --ctx N                context length (default: the model's)\n"
        "  --max-queue N          waiting requests before OVERLOADED "
        "(default 4096)\n"
        "  --max-conns N          client connections (default 4096)\n"
        "  --socket-mode OCTAL    unix socket permissions (default 0660)\n"
        "  --drain-timeout SEC    on SIGTERM, wait this long for running\n"
        "                         requests (default 30; -1: forever)\n"
        "  --adapters DIR         register every LoRA adapter folder in "
        "DIR\n"
        "                         under its folder name\n"
        "  --adapter-host-memory SIZE   host cache of adapter weights "
        "(default 1G)\n"
        "  --adapter-device-memory SIZE device pool of adapter weights "
        "(default 512M)\n"
        "  --adapter-dtype auto|f16|f32|int8  adapter weights on the "
        "device:\n"
        "                         f16 half the bytes of f32, int8 a "
        "quarter,\n"
        "                         lossy; auto (default): int8 on "
        "a base\n"
        "                         quantized below 8 bits, else f16 where "
        "the\n"
        "                         backend takes it\n"
        "  --prefix-cache on|off  reuse the KV blocks of known prefixes "
        "(default on)\n"
        "  --kv-redis ADDR        Redis tier of the prefix cache: "
        "HOST:PORT or\n"
        "                         unix:PATH (default: none)\n"
        "  --kv-redis-prefix S    its key prefix (default llm:kv:)\n"
        "  --kv-redis-ttl SEC     lifetime of a block in Redis "
        "(default 3600)\n"
        "  --kv-redis-budget SIZE bytes of blocks kept in Redis "
        "(default 1G)\n"
        "  --kv-redis-timeout MS  connect/command timeout (default 200)\n"
        "  --log-level LEVEL      error, warn, info (default), debug\n");
}


/* "512M", "2G", "1048576", "1.5GiB" -> bytes; 0 on error. */
static size_t
parse_size(const char *s)
{
    char   *end;
    double  v = strtod(s, &end);
    double  mul = 1;

    if (end == s || v < 0) {
        return 0;
    }
    switch (*end) {
    case 'k': case 'K': mul = 1024.0; end++; break;
    case 'm': case 'M': mul = 1024.0 * 1024; end++; break;
    case 'g': case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
    case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (strcmp(end, "iB") == 0 || strcmp(end, "B") == 0
        || strcmp(end, "b") == 0)
    {
        end += strlen(end);
    }
    if (*end != '\0' || v * mul < 1 || v * mul > 1e15) {
        return 0;
    }
    return (size_t) (v * mul);
}


static int
parse_int(const char *flag, const char *v, long lo, long hi, long *out)
{
    char *end;
    long  n;

    errno = 0;
    n = strtol(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || n < lo || n > hi) {
        fprintf(stderr, "llm-engine: %s: expected an integer in %ld..%ld, "
                "got \"%s\"\n", flag, lo, hi, v);
        return -1;
    }
    *out = n;
    return 0;
}


static void
on_signal(int sig)
{
    (void) sig;
    if (the_server != NULL) {
        llm_server_stop(the_server);
    } else {
        stop_early = 1;
    }
}


static void
on_adapter_refused(void *ud, const char *name, const llm_err *err)
{
    (void) ud;
    llm_log(LLM_LOG_WARN, "adapter folder \"%s\" refused: %s", name,
            err->msg);
}


static void
log_lines(const char *text)
{
    const char *p = text, *nl;

    while (*p != '\0') {
        nl = strchr(p, '\n');
        if (nl == NULL) {
            llm_log(LLM_LOG_INFO, "%s", p);
            break;
        }
        if (nl > p) {
            llm_log(LLM_LOG_INFO, "%.*s", (int) (nl - p), p);
        }
        p = nl + 1;
    }
}


int
main(int argc, char **argv)
{
    llm_engine_params  ep;
    llm_server_params  sp;
    llm_engine        *e;
    llm_server        *s;
    llm_err            err;
    struct sigaction   sa;
    char               desc[4096];
    double             drain = 30.0;
    long               n;
    int                i, rc, level;

    memset(&ep, 0, sizeof(ep));
    memset(&sp, 0, sizeof(sp));
    memset(&err, 0, sizeof(err));
    ep.device = "cpu";
    ep.kv_type = LLM_F16;
    ep.adapter_refused = on_adapter_refused;

    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "--version") == 0) {
            printf("llm-engine 0.1 (protocol %d..%d)\n",
                   LLM_PROTO_VERSION_MIN, LLM_PROTO_VERSION);
            return 0;
        }
        if (strncmp(a, "--", 2) != 0 || v == NULL) {
            fprintf(stderr, "llm-engine: %s\n", v == NULL
                    && strncmp(a, "--", 2) == 0 ? "option needs a value"
                    : "unexpected argument");
            fprintf(stderr, "  at \"%s\"\n", a);
            usage(stderr);
            return 2;
        }
        i++;
        if (strcmp(a, "--model") == 0) {
            ep.model_path = v;
        } else if (strcmp(a, "--listen") == 0) {
            if (sp.n_listen == LLM_SERVER_MAX_LISTEN) {
                fprintf(stderr, "llm-engine: at most %d --listen\n",
                        LLM_SERVER_MAX_LISTEN);
                return 2;
            }
            sp.listen[sp.n_listen++] = v;
        } else if (strcmp(a, "--device") == 0) {
            ep.device = v;
        } else if (strcmp(a, "--threads") == 0) {
            if (parse_int(a, v, 0, 1024, &n) != 0) {
                return 2;
            }
            ep.n_threads = (int) n;
        } else if (strcmp(a, "--kv-memory") == 0) {
            ep.kv_memory = parse_size(v);
            if (ep.kv_memory == 0) {
                fprintf(stderr, "llm-engine: --kv-memory: expected a size "
                        "like 512M or 2G, got \"%s\"\n", v);
                return 2;
            }
        } else if (strcmp(a, "--kv-type") == 0) {
            ep.kv_type = llm_kv_type_parse(v);
            if (ep.kv_type < 0) {
                fprintf(stderr, "llm-engine: --kv-type: f16, f32 or q8_0\n");
                return 2;
            }
        } else if (strcmp(a, "--max-seqs") == 0) {
            if (parse_int(a, v, 1, 65536, &n) != 0) {
                return 2;
            }
            ep.max_seqs = (int) n;
        } else if (strcmp(a, "--max-step-tokens") == 0) {
            if (parse_int(a, v, 1, 1 << 20, &n) != 0) {
                return 2;
            }
            ep.max_step_tokens = (int) n;
        } else if (strcmp(a, "--ctx") == 0) {
            if (parse_int(a, v, 1, 1 << 24, &n) != 0) {
                return 2;
            }
            ep.n_ctx = (int) n;
        } else if (strcmp(a, "--max-queue") == 0) {
            if (parse_int(a, v, 1, 1 << 24, &n) != 0) {
                return 2;
            }
            sp.max_queue = (int) n;
        } else if (strcmp(a, "--max-conns") == 0) {
            if (parse_int(a, v, 1, 1 << 20, &n) != 0) {
                return 2;
            }
            sp.max_conns = (int) n;
        } else if (strcmp(a, "--socket-mode") == 0) {
            char *end;

            n = strtol(v, &end, 8);
            if (end == v || *end != '\0' || n <= 0 || n > 0777) {
                fprintf(stderr, "llm-engine: --socket-mode: octal like "
                        "0660\n");
                return 2;
            }
            sp.socket_mode = (int) n;
        } else if (strcmp(a, "--drain-timeout") == 0) {
            char *end;

            drain = strtod(v, &end);
            if (end == v || *end != '\0' || drain > 86400.0) {
                fprintf(stderr, "llm-engine: --drain-timeout: seconds, "
                        "-1 for no limit\n");
                return 2;
            }
        } else if (strcmp(a, "--adapters") == 0) {
            ep.adapter_dir = v;
        } else if (strcmp(a, "--prefix-cache") == 0) {
            if (strcmp(v, "on") != 0 && strcmp(v, "off") != 0) {
                fprintf(stderr, "llm-engine: --prefix-cache: on or off\n");
                return 2;
            }
            ep.prefix_cache_off = strcmp(v, "off") == 0;
        } else if (strcmp(a, "--kv-redis") == 0) {
            ep.kv_tier_addr = v;
        } else if (strcmp(a, "--kv-redis-prefix") == 0) {
            ep.kv_tier_prefix = v;
        } else if (strcmp(a, "--kv-redis-ttl") == 0) {
            if (parse_int(a, v, 1, 365L * 86400, &n) != 0) {
                return 2;
            }
            ep.kv_tier_ttl_s = (uint32_t) n;
        } else if (strcmp(a, "--kv-redis-timeout") == 0) {
            if (parse_int(a, v, 1, 60000, &n) != 0) {
                return 2;
            }
            ep.kv_tier_timeout_ms = (uint32_t) n;
        } else if (strcmp(a, "--kv-redis-budget") == 0) {
            size_t size = parse_size(v);

            if (size == 0) {
                fprintf(stderr, "llm-engine: %s: expected a size like "
                        "256M or 2G, got \"%s\"\n", a, v);
                return 2;
            }
            ep.kv_tier_budget = size;
        } else if (strcmp(a, "--adapter-host-memory") == 0
                   || strcmp(a, "--adapter-device-memory") == 0)
        {
            size_t size = parse_size(v);

            if (size == 0) {
                fprintf(stderr, "llm-engine: %s: expected a size like "
                        "256M or 2G, got \"%s\"\n", a, v);
                return 2;
            }
            if (strcmp(a, "--adapter-host-memory") == 0) {
                ep.adapter_host_memory = size;
            } else {
                ep.adapter_device_memory = size;
            }
        } else if (strcmp(a, "--adapter-dtype") == 0) {
            ep.adapter_dtype = llm_adapter_dtype_parse(v);
            if (ep.adapter_dtype < 0) {
                fprintf(stderr, "llm-engine: --adapter-dtype: auto, f16, "
                        "f32 or int8\n");
                return 2;
            }
        } else if (strcmp(a, "--log-level") == 0) {
            level = llm_log_parse_level(v);
            if (level < 0) {
                fprintf(stderr, "llm-engine: --log-level: error, warn, "
                        "info or debug\n");
                return 2;
            }
            llm_log_set_level(level);
        } else {
            fprintf(stderr, "llm-engine: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (ep.model_path == NULL) {
        fprintf(stderr, "llm-engine: --model is required\n");
        usage(stderr);
        return 2;
    }
    if (sp.n_listen == 0) {
        sp.listen[sp.n_listen++] = DEFAULT_LISTEN;
    }
    /* 0 means "default" to the server: a zero timeout is 1 ms. */
    sp.drain_timeout_ms = drain < 0 ? -1
                          : drain * 1000 < 1 ? 1 : (int) (drain * 1000);
    sp.max_seqs = ep.max_seqs > 0 ? ep.max_seqs : 64;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    llm_log(LLM_LOG_INFO, "llm-engine 0.1 (protocol %d) starting: model %s, "
            "device %s", LLM_PROTO_VERSION, ep.model_path, ep.device);
    e = llm_engine_new(&ep, &err);
    if (e == NULL) {
        llm_log(LLM_LOG_ERROR, "cannot load the model: %s", err.msg);
        return 1;
    }
    desc[0] = '\0';
    llm_model_describe(llm_engine_model(e), desc, sizeof(desc));
    log_lines(desc);
    llm_tokenizer_describe(llm_engine_tokenizer(e), desc, sizeof(desc));
    llm_log(llm_tokenizer_pre_fallback(llm_engine_tokenizer(e))
            ? LLM_LOG_WARN : LLM_LOG_INFO, "tokenizer: %s", desc);

    s = llm_server_new(e, &sp, &err);
    if (s == NULL) {
        llm_log(LLM_LOG_ERROR, "cannot listen: %s", err.msg);
        llm_engine_free(e);
        return 1;
    }
    {
        llm_engine_stats st;

        llm_engine_get_stats(e, &st);
        llm_log(LLM_LOG_INFO, "context %d tokens, KV cache %d blocks of %d "
                "tokens, max %d sequences", llm_engine_n_ctx(e),
                st.kv_blocks_total, st.block_size, sp.max_seqs);
        if (ep.adapter_dir != NULL) {
            llm_log(LLM_LOG_INFO, "%d adapters registered from %s",
                    st.adapters_registered, ep.adapter_dir);
        }
        llm_log(LLM_LOG_INFO, "adapter weights on the device in %s%s",
                llm_adapter_dtype_name(st.adapter_dtype),
                ep.adapter_dtype == LLM_ADAPTER_DEFAULT
                ? " (--adapter-dtype auto)" : "");
        llm_log(LLM_LOG_INFO, "prefix cache %s%s%s",
                ep.prefix_cache_off ? "off" : "on",
                !ep.prefix_cache_off && ep.kv_tier_addr != NULL
                ? ", Redis tier at " : "",
                !ep.prefix_cache_off && ep.kv_tier_addr != NULL
                ? ep.kv_tier_addr : "");
    }
    for (i = 0; i < llm_server_n_listen(s); i++) {
        llm_log(LLM_LOG_INFO, "listening on %s", llm_server_listen_addr(s, i));
    }
    the_server = s;
    if (stop_early) {
        llm_server_stop(s);
    }

    rc = llm_server_run(s, &err);
    the_server = NULL;
    if (rc != 0) {
        llm_log(LLM_LOG_ERROR, "server failed: %s", err.msg);
    }
    llm_server_free(s);
    llm_engine_free(e);
    llm_log(LLM_LOG_INFO, "llm-engine stopped");
    return rc == 0 ? 0 : 1;
}
