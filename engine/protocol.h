/*
 * The wire protocol between NGINX workers (ngx_llm_module) and the
 * llm-engine daemon.  This header is the one definition both sides use.
 *
 * Transport: a stream socket (unix or TCP).  Everything is little-endian.
 * Every frame is a fixed 16-byte header followed by its payload:
 *
 *     offset  size  field
 *          0     4  magic        'L' 'L' 'M' 'P' (LLM_PROTO_MAGIC as u32)
 *          4     2  version      protocol version of this frame
 *          6     2  type         LLM_MSG_*
 *          8     4  length       payload bytes (<= LLM_PROTO_MAX_PAYLOAD)
 *         12     4  request id   chosen by the client, unique among its
 *                                live requests on this connection;
 *                                0 for connection-level messages
 *
 * Payload primitives: u8/u16/u32/u64/i32/f32 little-endian, no padding;
 * "str" is a u16 byte length followed by that many bytes (no NUL; a NUL
 * inside is malformed; each string field has its own maximum below);
 * "ids" is a count followed by that many i32 token ids.  A payload must
 * be consumed exactly: short, long or inconsistent payloads are
 * malformed (LLM_EFORMAT).
 *
 * Conversation:
 *
 *   client                              server
 *   HELLO (req 0, header version 1) ->
 *                                   <-  HELLO_OK (req 0)  or ERROR+close
 *   SUBMIT (req N)                  ->
 *                                   <-  TOKENS (req N) ... (streamed)
 *                                   <-  DONE (req N)      or ERROR (req N)
 *   CANCEL (req N)                  ->  (a DONE with finish CANCELLED
 *                                        follows; unknown ids are ignored,
 *                                        since the request may have just
 *                                        finished)
 *   STATS_REQ (req any)             ->
 *                                   <-  STATS (same req id)
 *   ADAPTER_LOAD (req N)            ->  (register or reload, then load)
 *                                   <-  ADAPTER_OK (req N) or ERROR (req N)
 *   ADAPTER_UNLOAD (req N)          ->
 *                                   <-  ADAPTER_OK (req N) or ERROR (req N)
 *   ADAPTER_LIST (req N)            ->
 *                                   <-  ADAPTERS (req N)
 *   PING (req any)                  ->
 *                                   <-  PONG (same req id)
 *
 * Every SUBMIT ends with exactly one DONE or one ERROR on its id; nothing
 * is sent for that id afterwards.  TOKENS frames come in generation order
 * (the tokens of one engine step in one frame); after a CANCEL, tokens
 * already under way may still arrive before the DONE.  An end-of-
 * generation token (HELLO_OK eog_ids) is sent as a token, then DONE STOP.
 *
 * HELLO must be the first frame; it is always sent with header version 1
 * (its layout never changes).  The server answers with the highest
 * version both support; later frames carry that version.  A request id
 * stays in use until its DONE or ERROR; reusing a live id is an ERROR
 * (LLM_PERR_DUPLICATE) on that id.  A malformed frame is answered with a
 * connection-level ERROR (LLM_PERR_PROTOCOL) and the connection is
 * closed, which cancels its requests.  Closing the connection cancels
 * every request on it.
 *
 * The C side: encoders append whole frames to an llm_proto_buf; decoders
 * validate a complete frame and fill a struct whose array fields point
 * into the frame's payload (read them with llm_proto_id_at() or copy them
 * with llm_proto_copy_ids(); they stay valid as long as the frame's bytes
 * do).  llm_proto_parser splits a byte stream into frames.  This file
 * needs only common.h/common.c (errors, allocator), no engine or NGINX.
 */
#ifndef LLM_PROTOCOL_H
#define LLM_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LLM_PROTO_MAGIC         0x504d4c4cu     /* bytes "LLMP" */
#define LLM_PROTO_VERSION       1               /* highest we speak */
#define LLM_PROTO_VERSION_MIN   1               /* lowest we speak */
#define LLM_PROTO_HEADER_SIZE   16
#define LLM_PROTO_MAX_PAYLOAD   (4u << 20)      /* 4 MiB */

/* Field limits (bytes for strings, counts for arrays). */
#define LLM_PROTO_MAX_NAME      64      /* client / server name, tenant */
#define LLM_PROTO_MAX_TENANT    64
#define LLM_PROTO_MAX_ADAPTER   128
#define LLM_PROTO_MAX_NAMESPACE 128
#define LLM_PROTO_MAX_MODEL     128
#define LLM_PROTO_MAX_ARCH      32
#define LLM_PROTO_MAX_MESSAGE   1024
#define LLM_PROTO_MAX_STOP_IDS  64
#define LLM_PROTO_MAX_EOG_IDS   16
#define LLM_PROTO_MAX_TOP       20      /* == LLM_MAX_TOP_LOGPROBS */
#define LLM_PROTO_MAX_PROMPT    ((LLM_PROTO_MAX_PAYLOAD - 1024) / 4)
#define LLM_PROTO_MAX_TOKENS_PER_FRAME 4096
#define LLM_PROTO_MAX_PATH      1024    /* ADAPTER_LOAD folder */
#define LLM_PROTO_MAX_VERSION   64      /* adapter version text */

/* Message types.  Direction: C client -> server, S server -> client. */
enum {
    LLM_MSG_HELLO          = 1,     /* C */
    LLM_MSG_HELLO_OK       = 2,     /* S */
    LLM_MSG_SUBMIT         = 3,     /* C */
    LLM_MSG_CANCEL         = 4,     /* C, empty payload */
    LLM_MSG_TOKENS         = 5,     /* S */
    LLM_MSG_DONE           = 6,     /* S */
    LLM_MSG_ERROR          = 7,     /* S */
    LLM_MSG_STATS_REQ      = 8,     /* C, empty payload */
    LLM_MSG_STATS          = 9,     /* S */
    LLM_MSG_PING           = 10,    /* C, empty payload */
    LLM_MSG_PONG           = 11,    /* S, empty payload */
    /* LoRA adapters (layouts below STATS) */
    LLM_MSG_ADAPTER_LOAD   = 16,    /* C */
    LLM_MSG_ADAPTER_UNLOAD = 17,    /* C */
    LLM_MSG_ADAPTER_OK     = 18,    /* S */
    LLM_MSG_ADAPTER_LIST   = 19,    /* C, empty payload */
    LLM_MSG_ADAPTERS       = 20,    /* S */
    LLM_MSG_TYPE_MAX       = 31
};

/* ERROR codes. */
enum {
    LLM_PERR_BAD_REQUEST = 1,   /* invalid parameters or prompt */
    LLM_PERR_CONTEXT     = 2,   /* prompt + max_tokens beyond n_ctx */
    LLM_PERR_OVERLOADED  = 3,   /* queue full; retry later */
    LLM_PERR_DRAINING    = 4,   /* server shutting down; go elsewhere */
    LLM_PERR_INTERNAL    = 5,
    LLM_PERR_NOT_FOUND   = 6,   /* unknown adapter, ... */
    LLM_PERR_VERSION     = 7,   /* no common protocol version */
    LLM_PERR_PROTOCOL    = 8,   /* malformed frame; connection closes */
    LLM_PERR_DUPLICATE   = 9,   /* request id already live */
    LLM_PERR_UNSUPPORTED = 10   /* valid but not supported (yet) */
};

/* DONE finish reasons (the same numbers as engine.h's LLM_FINISH_*). */
enum {
    LLM_PFINISH_STOP      = 1,  /* end-of-generation or stop token */
    LLM_PFINISH_LENGTH    = 2,  /* max_tokens or context end */
    LLM_PFINISH_CANCELLED = 3,  /* CANCEL, or drain deadline */
    LLM_PFINISH_ERROR     = 4   /* engine failure; message says why */
};

/* SUBMIT flags. */
#define LLM_SUBMIT_HAS_SEED     0x0001u
#define LLM_SUBMIT_IGNORE_EOS   0x0002u
#define LLM_SUBMIT_LOGPROBS     0x0004u

/* TOKENS flags. */
#define LLM_TOKENS_LOGPROBS     0x01u   /* each token has logprob + top */


typedef struct llm_proto_header {
    uint32_t    magic;
    uint16_t    version;
    uint16_t    type;
    uint32_t    length;
    uint32_t    req_id;
} llm_proto_header;

/* A complete frame: payload points at length bytes. */
typedef struct llm_proto_frame {
    uint16_t        version;
    uint16_t        type;
    uint32_t        req_id;
    uint32_t        length;
    const uint8_t  *payload;
} llm_proto_frame;


/*
 * HELLO payload:
 *   u16 min_version, u16 max_version, u32 flags (0), str client_name
 */
typedef struct llm_proto_hello {
    uint16_t    min_version;
    uint16_t    max_version;
    uint32_t    flags;
    char        client_name[LLM_PROTO_MAX_NAME + 1];
} llm_proto_hello;

/*
 * HELLO_OK payload:
 *   u16 version, u16 reserved (0), u32 flags (0),
 *   u32 n_ctx, u32 n_vocab, u32 block_size, u32 max_seqs,
 *   u32 kv_blocks_total, i32 bos_id (-1 none), i32 eos_id (-1 none),
 *   u8[32] fingerprint, str model_name, str arch, str server_name,
 *   u16 n_eog, i32[n_eog] eog_ids
 */
typedef struct llm_proto_hello_ok {
    uint16_t    version;
    uint32_t    flags;
    uint32_t    n_ctx;
    uint32_t    n_vocab;
    uint32_t    block_size;
    uint32_t    max_seqs;
    uint32_t    kv_blocks_total;
    int32_t     bos_id;
    int32_t     eos_id;
    uint8_t     fingerprint[32];
    char        model_name[LLM_PROTO_MAX_MODEL + 1];
    char        arch[LLM_PROTO_MAX_ARCH + 1];
    char        server_name[LLM_PROTO_MAX_NAME + 1];
    int         n_eog;
    int32_t     eog_ids[LLM_PROTO_MAX_EOG_IDS];
} llm_proto_hello_ok;

/*
 * SUBMIT payload (sampling fields as engine/sampler.h's llm_sampling):
 *   u32 max_tokens,
 *   f32 temperature, i32 top_k, f32 top_p, f32 min_p,
 *   f32 repetition_penalty, f32 frequency_penalty, f32 presence_penalty,
 *   u64 seed, u16 flags (LLM_SUBMIT_*), u8 top_logprobs,
 *   u8 priority (class: LLM_PROTO_CLASS_*; 0 = default = standard),
 *   u16 weight (fair share; 0 = 1),
 *   u16 reserved (0), u32 queue_timeout_ms (0 = none),
 *   str tenant, str adapter, str cache_namespace (empty = none/default),
 *   u16 n_stop, i32[n_stop] stop_ids,
 *   u32 n_prompt, i32[n_prompt] prompt,
 * then (added with the prefix cache; a decoder takes a payload without
 * this part as "" and 0):
 *   str cache_shared_namespace, u32 cache_shared_tokens
 *     the first cache_shared_tokens prompt tokens (a public prefix such
 *     as a common system prompt) are cached under the shared namespace,
 *     the rest under cache_namespace; both are set by the server, never
 *     by the client.
 */
/* Priority classes of SUBMIT (strict priority between classes). */
enum {
    LLM_PROTO_CLASS_DEFAULT     = 0,    /* standard */
    LLM_PROTO_CLASS_INTERACTIVE = 1,
    LLM_PROTO_CLASS_STANDARD    = 2,
    LLM_PROTO_CLASS_BATCH       = 3
};

typedef struct llm_proto_submit {
    uint32_t    max_tokens;
    float       temperature;
    int32_t     top_k;
    float       top_p;
    float       min_p;
    float       repetition_penalty;
    float       frequency_penalty;
    float       presence_penalty;
    uint64_t    seed;
    uint16_t    flags;
    uint8_t     top_logprobs;
    uint8_t     priority;
    uint16_t    weight;
    uint32_t    queue_timeout_ms;
    char        tenant[LLM_PROTO_MAX_TENANT + 1];
    char        adapter[LLM_PROTO_MAX_ADAPTER + 1];
    char        cache_namespace[LLM_PROTO_MAX_NAMESPACE + 1];
    char        cache_shared_namespace[LLM_PROTO_MAX_NAMESPACE + 1];
    uint32_t    cache_shared_tokens;
    /* Encoding: n_* int32 arrays.  Decoding: raw pointers into the
     * payload (unaligned little-endian i32); read with
     * llm_proto_id_at(), llm_proto_copy_ids(). */
    int         n_stop;
    const void *stop_ids;
    int         n_prompt;
    const void *prompt;
} llm_proto_submit;

/* Fills s with the defaults (greedy, no penalties, max_tokens 16). */
void llm_proto_submit_default(llm_proto_submit *s);

/*
 * TOKENS payload: one or more tokens of one request, in order:
 *   u16 n_tokens, u8 flags (LLM_TOKENS_*), u8 reserved (0), then per
 *   token: i32 id, and if LLM_TOKENS_LOGPROBS: f32 logprob, u8 n_top,
 *   n_top x (i32 id, f32 logprob).
 */
typedef struct llm_proto_token {
    int32_t     id;
    float       logprob;
    int         n_top;
    int32_t     top_ids[LLM_PROTO_MAX_TOP];
    float       top_logprobs[LLM_PROTO_MAX_TOP];
} llm_proto_token;

typedef struct llm_proto_tokens {
    int             n_tokens;
    unsigned        flags;
    /* Decoding only: the validated token records; walk them with
     * llm_proto_tokens_next(). */
    const uint8_t  *raw;
    size_t          raw_len;
    size_t          off;        /* iterator position in raw */
} llm_proto_tokens;

/*
 * DONE payload:
 *   u8 finish (LLM_PFINISH_*), u8 reserved[3] (0),
 *   u32 prompt_tokens, u32 completion_tokens, u32 cached_tokens,
 *   u32 queue_ms, u32 ttft_ms, u32 total_ms, u32 preemptions,
 *   str message (empty unless finish is ERROR)
 */
typedef struct llm_proto_done {
    uint8_t     finish;
    uint32_t    prompt_tokens;
    uint32_t    completion_tokens;
    uint32_t    cached_tokens;
    uint32_t    queue_ms;       /* submit -> first scheduled */
    uint32_t    ttft_ms;        /* submit -> first token */
    uint32_t    total_ms;       /* submit -> done */
    uint32_t    preemptions;
    char        message[LLM_PROTO_MAX_MESSAGE + 1];
} llm_proto_done;

/*
 * ERROR payload: u16 code (LLM_PERR_*), u16 reserved (0), str message.
 * Request id: the failed request, or 0 for the connection.
 */
typedef struct llm_proto_error {
    uint16_t    code;
    char        message[LLM_PROTO_MAX_MESSAGE + 1];
} llm_proto_error;

/*
 * STATS payload:
 *   u32 waiting, u32 running, u32 kv_blocks_total, u32 kv_blocks_used,
 *   u32 block_size, u32 connections, u32 max_seqs,
 *   u32 last_batch_tokens, u32 last_batch_seqs, u32 draining (0/1),
 *   u64 steps, u64 tokens_prefilled, u64 tokens_generated,
 *   u64 preemptions, u64 requests_total, u64 requests_rejected,
 *   u64 uptime_ms,
 * then (added with adapters; a decoder takes a payload without this
 * part as all zeros, has_adapters = 0):
 *   u32 adapters_registered, u32 adapters_loaded (host cache),
 *   u32 adapters_resident (device pool), u32 reserved (0),
 *   u64 adapter_host_bytes, u64 adapter_device_bytes,
 *   u64 adapter_loads (host loads from disk), u64 adapter_uploads
 *   (device uploads), u64 adapter_host_evictions,
 *   u64 adapter_device_evictions
 * then (added with the prefix cache; absent: has_prefix_cache = 0):
 *   u32 prefix_blocks_cached (local blocks holding a hash, in use or
 *   not), u32 prefix_blocks_reusable (cached and unused: evictable),
 *   u64 prefix_lookups (sequences admitted with caching on),
 *   u64 prefix_hit_tokens (prompt tokens taken from the local cache),
 *   u64 prefix_tier_hit_tokens (of those, loaded from Redis first),
 *   u64 prefix_evictions,
 *   u32 tier_connected (0/1; 0 also when there is no Redis tier),
 *   u32 tier_enabled (0/1),
 *   u64 tier_puts (blocks written), u64 tier_put_bytes,
 *   u64 tier_puts_dropped (queue over budget),
 *   u64 tier_lookups, u64 tier_blocks_hit, u64 tier_blocks_missed,
 *   u64 tier_corrupt (records refused: bad checksum, other model or
 *   format, truncated), u64 tier_errors (Redis errors and timeouts),
 *   u64 prefix_bytes_cached (device bytes of the tagged blocks),
 *   u64 tier_stored_bytes (record bytes in Redis, as last seen)
 */
typedef struct llm_proto_stats {
    uint32_t    waiting;
    uint32_t    running;
    uint32_t    kv_blocks_total;
    uint32_t    kv_blocks_used;
    uint32_t    block_size;
    uint32_t    connections;
    uint32_t    max_seqs;
    uint32_t    last_batch_tokens;
    uint32_t    last_batch_seqs;
    uint32_t    draining;
    uint64_t    steps;
    uint64_t    tokens_prefilled;
    uint64_t    tokens_generated;
    uint64_t    preemptions;
    uint64_t    requests_total;
    uint64_t    requests_rejected;
    uint64_t    uptime_ms;
    int         has_adapters;   /* decoding: the adapter part was there */
    uint32_t    adapters_registered;
    uint32_t    adapters_loaded;
    uint32_t    adapters_resident;
    uint64_t    adapter_host_bytes;
    uint64_t    adapter_device_bytes;
    uint64_t    adapter_loads;
    uint64_t    adapter_uploads;
    uint64_t    adapter_host_evictions;
    uint64_t    adapter_device_evictions;
    int         has_prefix_cache;   /* decoding: that part was there */
    uint32_t    prefix_blocks_cached;
    uint32_t    prefix_blocks_reusable;
    uint64_t    prefix_lookups;
    uint64_t    prefix_hit_tokens;
    uint64_t    prefix_tier_hit_tokens;
    uint64_t    prefix_evictions;
    uint32_t    tier_connected;
    uint32_t    tier_enabled;
    uint64_t    tier_puts;
    uint64_t    tier_put_bytes;
    uint64_t    tier_puts_dropped;
    uint64_t    tier_lookups;
    uint64_t    tier_blocks_hit;
    uint64_t    tier_blocks_missed;
    uint64_t    tier_corrupt;
    uint64_t    tier_errors;
    uint64_t    prefix_bytes_cached;
    uint64_t    tier_stored_bytes;
} llm_proto_stats;


/*
 * ADAPTER_LOAD payload: str name, str path.
 *   Registers name from the adapter folder path (on the engine's host)
 *   or, if name is registered, replaces it with a new version (sequences
 *   already running keep the old one); then loads its weights into the
 *   host cache so that the reply can give its version.  Refused files
 *   leave everything as it was: ERROR (BAD_REQUEST) naming the file and
 *   the reason.  An empty path reloads from the folder it came from.
 * ADAPTER_UNLOAD payload: str name.
 *   New requests can no longer name it (NOT_FOUND if it is not
 *   registered); running sequences finish with it.
 * ADAPTER_OK payload (the answer to both):
 *   str name, str version (16 hex digits of the content hash; "" if the
 *   weights are not loaded), u32 max_rank, u64 bytes (host bytes of the
 *   weights, or the size predicted from the file headers).
 */
typedef struct llm_proto_adapter_load {
    char        name[LLM_PROTO_MAX_ADAPTER + 1];
    char        path[LLM_PROTO_MAX_PATH + 1];
} llm_proto_adapter_load;

typedef struct llm_proto_adapter_ok {
    char        name[LLM_PROTO_MAX_ADAPTER + 1];
    char        version[LLM_PROTO_MAX_VERSION + 1];
    uint32_t    max_rank;
    uint64_t    bytes;
} llm_proto_adapter_ok;

/*
 * ADAPTERS payload (the answer to ADAPTER_LIST), registered adapters in
 * name order:
 *   u32 n_total (registered), u32 n (entries in this frame; fewer than
 *   n_total only if the payload limit cut the list), then per entry:
 *   str name, str version ("" if not loaded), u8 flags
 *   (LLM_ADAPTER_*), u8 reserved[3] (0), u32 max_rank, u64 bytes
 */
#define LLM_ADAPTER_LOADED      0x01u   /* weights in the host cache */
#define LLM_ADAPTER_RESIDENT    0x02u   /* a copy on the device */

typedef struct llm_proto_adapter_info {
    char        name[LLM_PROTO_MAX_ADAPTER + 1];
    char        version[LLM_PROTO_MAX_VERSION + 1];
    unsigned    flags;
    uint32_t    max_rank;
    uint64_t    bytes;
} llm_proto_adapter_info;

typedef struct llm_proto_adapters {
    uint32_t        n_total;
    uint32_t        n;
    /* Decoding only: the validated entries; walk them with
     * llm_proto_adapters_next(). */
    const uint8_t  *raw;
    size_t          raw_len;
    size_t          off;
} llm_proto_adapters;


/* ---- output buffer ------------------------------------------------- */

/*
 * A growable byte buffer the encoders append to.  Zero-initialise it
 * (or llm_proto_buf_init) for a heap buffer grown with llm_realloc; or
 * point data/cap at caller memory and set fixed = 1: an encoder that
 * would overflow then returns LLM_EFULL and leaves len unchanged.
 * Encoders are all-or-nothing: on any error len is unchanged.  Any
 * encoder call may move the unsent bytes (data + pos) to the front or
 * to new memory: do not keep pointers into data across calls.
 */
typedef struct llm_proto_buf {
    uint8_t    *data;
    size_t      len;        /* bytes written */
    size_t      cap;
    size_t      pos;        /* bytes already consumed (sent) by the
                               owner; llm_proto_buf_consume() */
    int         fixed;
    int         version;    /* header version of frames; 0: latest */
} llm_proto_buf;

void llm_proto_buf_init(llm_proto_buf *b);
void llm_proto_buf_free(llm_proto_buf *b);
/* Makes room for n more bytes.  0, LLM_ENOMEM or LLM_EFULL. */
int  llm_proto_buf_reserve(llm_proto_buf *b, size_t n);
/* Marks n bytes from pos as sent; compacts when everything was. */
void llm_proto_buf_consume(llm_proto_buf *b, size_t n);
/* Bytes not yet consumed: data + pos, len - pos. */
static inline size_t
llm_proto_buf_pending(const llm_proto_buf *b)
{
    return b->len - b->pos;
}


/* ---- encoders: append one frame; 0, LLM_ENOMEM, LLM_EFULL, or
 *      LLM_EINVAL (a field beyond its limit) ----------------------- */

int llm_proto_encode_hello(llm_proto_buf *b, const llm_proto_hello *m);
int llm_proto_encode_hello_ok(llm_proto_buf *b, const llm_proto_hello_ok *m);
/* m->stop_ids and m->prompt point at int32_t arrays. */
int llm_proto_encode_submit(llm_proto_buf *b, uint32_t req_id,
                            const llm_proto_submit *m);
int llm_proto_encode_tokens(llm_proto_buf *b, uint32_t req_id,
                            unsigned flags, const llm_proto_token *t,
                            int n);
int llm_proto_encode_done(llm_proto_buf *b, uint32_t req_id,
                          const llm_proto_done *m);
int llm_proto_encode_error(llm_proto_buf *b, uint32_t req_id, int code,
                           const char *message);
int llm_proto_encode_stats(llm_proto_buf *b, uint32_t req_id,
                           const llm_proto_stats *m);
int llm_proto_encode_adapter_load(llm_proto_buf *b, uint32_t req_id,
                                  const llm_proto_adapter_load *m);
int llm_proto_encode_adapter_unload(llm_proto_buf *b, uint32_t req_id,
                                    const char *name);
int llm_proto_encode_adapter_ok(llm_proto_buf *b, uint32_t req_id,
                                const llm_proto_adapter_ok *m);
/* n_total registered, e[0..n-1] the entries to send.  If they do not fit
 * one payload, as many as fit are sent (*sent says how many; may be
 * NULL). */
int llm_proto_encode_adapters(llm_proto_buf *b, uint32_t req_id,
                              uint32_t n_total,
                              const llm_proto_adapter_info *e, int n,
                              int *sent);
/* A frame with an empty payload: CANCEL, STATS_REQ, PING, PONG,
 * ADAPTER_LIST. */
int llm_proto_encode_empty(llm_proto_buf *b, int type, uint32_t req_id);
/* Any frame from a prepared payload (tests, future messages). */
int llm_proto_encode_raw(llm_proto_buf *b, int version, int type,
                         uint32_t req_id, const void *payload,
                         size_t len);

/* The version later frames of this connection carry (set after HELLO;
 * default LLM_PROTO_VERSION).  Per buffer so that both sides can run
 * several connections. */
void llm_proto_buf_set_version(llm_proto_buf *b, int version);


/* ---- decoders: validate one frame of the right type; 0 or
 *      LLM_EFORMAT (err says which field and why) --------------------- */

int llm_proto_decode_header(const uint8_t *p, size_t n,
                            llm_proto_header *h, llm_err *err);

int llm_proto_decode_hello(const llm_proto_frame *f, llm_proto_hello *m,
                           llm_err *err);
int llm_proto_decode_hello_ok(const llm_proto_frame *f,
                              llm_proto_hello_ok *m, llm_err *err);
int llm_proto_decode_submit(const llm_proto_frame *f,
                            llm_proto_submit *m, llm_err *err);
int llm_proto_decode_tokens(const llm_proto_frame *f,
                            llm_proto_tokens *m, llm_err *err);
/* Next token of a decoded TOKENS frame: 1 (filled), 0 at the end. */
int llm_proto_tokens_next(llm_proto_tokens *m, llm_proto_token *t);
int llm_proto_decode_done(const llm_proto_frame *f, llm_proto_done *m,
                          llm_err *err);
int llm_proto_decode_error(const llm_proto_frame *f, llm_proto_error *m,
                           llm_err *err);
int llm_proto_decode_stats(const llm_proto_frame *f, llm_proto_stats *m,
                           llm_err *err);
int llm_proto_decode_adapter_load(const llm_proto_frame *f,
                                  llm_proto_adapter_load *m, llm_err *err);
/* ADAPTER_UNLOAD: name[LLM_PROTO_MAX_ADAPTER + 1]. */
int llm_proto_decode_adapter_unload(const llm_proto_frame *f, char *name,
                                    llm_err *err);
int llm_proto_decode_adapter_ok(const llm_proto_frame *f,
                                llm_proto_adapter_ok *m, llm_err *err);
int llm_proto_decode_adapters(const llm_proto_frame *f,
                              llm_proto_adapters *m, llm_err *err);
/* Next entry of a decoded ADAPTERS frame: 1 (filled), 0 at the end. */
int llm_proto_adapters_next(llm_proto_adapters *m,
                            llm_proto_adapter_info *e);
/* CANCEL, STATS_REQ, PING, PONG, ADAPTER_LIST: checks the payload is
 * empty. */
int llm_proto_decode_empty(const llm_proto_frame *f, llm_err *err);

/* Token id i of a decoded id array (stop_ids, prompt). */
static inline int32_t
llm_proto_id_at(const void *ids, int i)
{
    const uint8_t *p = (const uint8_t *) ids + (size_t) i * 4;

    return (int32_t) ((uint32_t) p[0] | (uint32_t) p[1] << 8
                      | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24);
}

void llm_proto_copy_ids(const void *ids, int n, int32_t *out);

const char *llm_proto_type_name(int type);
const char *llm_proto_error_name(int code);
const char *llm_proto_finish_name(int finish);

/* Picks the version for a HELLO: the highest in both ranges, or -1. */
int llm_proto_negotiate(const llm_proto_hello *h);


/* ---- streaming parser ---------------------------------------------- */

/*
 * Splits a byte stream into frames.  Feed bytes (or read straight into
 * llm_proto_parser_space()), then call llm_proto_parser_next() until it
 * returns 0.  A frame returned by next() stays valid until the following
 * feed/space/next call.  Header errors (bad magic, unknown version,
 * length over max_payload) are sticky: the stream cannot resync, so the
 * connection should be closed.
 */
typedef struct llm_proto_parser {
    uint8_t    *data;
    size_t      len;        /* bytes held */
    size_t      cap;
    size_t      off;        /* start of the first unparsed frame */
    size_t      max_payload;
    int         error;      /* sticky LLM_EFORMAT once a header failed */
} llm_proto_parser;

/* max_payload: 0 for LLM_PROTO_MAX_PAYLOAD. */
void llm_proto_parser_init(llm_proto_parser *p, size_t max_payload);
void llm_proto_parser_free(llm_proto_parser *p);
/* Copies n bytes in.  0 or LLM_ENOMEM. */
int  llm_proto_parser_feed(llm_proto_parser *p, const void *data, size_t n);
/* Room to read into directly: returns a pointer to at least want
 * bytes of free space (NULL: LLM_ENOMEM); then parser_commit(n). */
uint8_t *llm_proto_parser_space(llm_proto_parser *p, size_t want);
void     llm_proto_parser_commit(llm_proto_parser *p, size_t n);
/* 1: f holds the next frame; 0: need more bytes; LLM_EFORMAT: bad
 * header (err says why). */
int  llm_proto_parser_next(llm_proto_parser *p, llm_proto_frame *f,
                           llm_err *err);
/* Bytes held but not yet returned as frames. */
size_t llm_proto_parser_pending(const llm_proto_parser *p);

#ifdef __cplusplus
}
#endif

#endif /* LLM_PROTOCOL_H */
