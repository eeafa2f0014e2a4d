/*
 * The engine wire protocol: frame encoders, bounds-checked decoders and
 * the streaming frame parser.  See protocol.h for the layouts.
 *
 * Encoders compute the payload size first, reserve header + payload in
 * the output buffer, then write; so a frame is appended whole or not at
 * all.  Decoders read through a cursor that never moves past the end of
 * the payload: every read checks the bytes left first.
 */
#include <string.h>

#include "byteorder.h"
#include "protocol.h"


/* ---- writer: a cursor over reserved space -------------------------- */

typedef struct {
    uint8_t    *p;
} wr;


static void
w_u8(wr *w, uint8_t v)
{
    *w->p++ = v;
}


static void
w_u16(wr *w, uint16_t v)
{
    llm_put_le16(w->p, v);
    w->p += 2;
}


static void
w_u32(wr *w, uint32_t v)
{
    llm_put_le32(w->p, v);
    w->p += 4;
}


static void
w_i32(wr *w, int32_t v)
{
    w_u32(w, (uint32_t) v);
}


static void
w_u64(wr *w, uint64_t v)
{
    w_u32(w, (uint32_t) v);
    w_u32(w, (uint32_t) (v >> 32));
}


static void
w_f32(wr *w, float v)
{
    uint32_t u;

    memcpy(&u, &v, 4);
    w_u32(w, u);
}


static void
w_bytes(wr *w, const void *d, size_t n)
{
    if (n > 0) {
        memcpy(w->p, d, n);
        w->p += n;
    }
}


static void
w_str(wr *w, const char *s)
{
    size_t n = s ? strlen(s) : 0;

    w_u16(w, (uint16_t) n);
    w_bytes(w, s, n);
}


/* ---- reader: a bounds-checked cursor over one payload -------------- */

typedef struct {
    const uint8_t  *p;
    size_t          left;
    int             bad;        /* set once any read ran short */
    const char     *field;      /* the field that failed */
} rd;


static int
r_need(rd *r, size_t n, const char *field)
{
    if (r->bad) {
        return 0;
    }
    if (r->left < n) {
        r->bad = 1;
        r->field = field;
        return 0;
    }
    return 1;
}


static uint8_t
r_u8(rd *r, const char *field)
{
    uint8_t v;

    if (!r_need(r, 1, field)) {
        return 0;
    }
    v = r->p[0];
    r->p++;
    r->left--;
    return v;
}


static uint16_t
r_u16(rd *r, const char *field)
{
    uint16_t v;

    if (!r_need(r, 2, field)) {
        return 0;
    }
    v = llm_get_le16(r->p);
    r->p += 2;
    r->left -= 2;
    return v;
}


static uint32_t
r_u32(rd *r, const char *field)
{
    uint32_t v;

    if (!r_need(r, 4, field)) {
        return 0;
    }
    v = llm_get_le32(r->p);
    r->p += 4;
    r->left -= 4;
    return v;
}


static int32_t
r_i32(rd *r, const char *field)
{
    return (int32_t) r_u32(r, field);
}


static uint64_t
r_u64(rd *r, const char *field)
{
    uint64_t lo, hi;

    lo = r_u32(r, field);
    hi = r_u32(r, field);
    return lo | hi << 32;
}


static float
r_f32(rd *r, const char *field)
{
    uint32_t u = r_u32(r, field);
    float    v;

    memcpy(&v, &u, 4);
    return v;
}


static const uint8_t *
r_bytes(rd *r, size_t n, const char *field)
{
    const uint8_t *p;

    if (!r_need(r, n, field)) {
        return NULL;
    }
    p = r->p;
    r->p += n;
    r->left -= n;
    return p;
}


/* A string into out[max + 1]: longer than max or holding a NUL is
 * malformed. */
static void
r_str(rd *r, char *out, size_t max, const char *field)
{
    uint16_t       n;
    const uint8_t *s;

    out[0] = '\0';
    n = r_u16(r, field);
    if (r->bad) {
        return;
    }
    if (n > max) {
        r->bad = 1;
        r->field = field;
        return;
    }
    s = r_bytes(r, n, field);
    if (s == NULL) {
        return;
    }
    if (memchr(s, '\0', n) != NULL) {
        r->bad = 1;
        r->field = field;
        return;
    }
    memcpy(out, s, n);
    out[n] = '\0';
}


/* Common start of every decoder: type check, reader over the payload. */
static int
dec_begin(const llm_proto_frame *f, int type, rd *r, llm_err *err)
{
    if (f->type != type) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: expected %s frame, got %s (%u)",
                           llm_proto_type_name(type),
                           llm_proto_type_name(f->type), f->type);
    }
    if (f->length > 0 && f->payload == NULL) {
        return llm_err_set(err, LLM_EFORMAT, "protocol: %s: no payload",
                           llm_proto_type_name(type));
    }
    r->p = f->payload;
    r->left = f->length;
    r->bad = 0;
    r->field = NULL;
    return 0;
}


/* Common end: the payload must have been read exactly. */
static int
dec_end(const llm_proto_frame *f, rd *r, llm_err *err)
{
    if (r->bad) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: %s: field %s is truncated or out of "
                           "range", llm_proto_type_name(f->type),
                           r->field ? r->field : "?");
    }
    if (r->left != 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: %s: %zu trailing bytes",
                           llm_proto_type_name(f->type), r->left);
    }
    return 0;
}


/* ---- output buffer ------------------------------------------------- */

void
llm_proto_buf_init(llm_proto_buf *b)
{
    memset(b, 0, sizeof(*b));
}


void
llm_proto_buf_free(llm_proto_buf *b)
{
    if (!b->fixed) {
        llm_free(b->data);
    }
    b->data = NULL;
    b->len = b->cap = b->pos = 0;
}


int
llm_proto_buf_reserve(llm_proto_buf *b, size_t n)
{
    size_t   need, cap;
    uint8_t *d;

    if (n > SIZE_MAX - b->len) {
        return LLM_ENOMEM;
    }
    need = b->len + n;
    if (need <= b->cap) {
        return 0;
    }

    /* Sent bytes at the front are dead: reclaim them before growing. */
    if (b->pos > 0) {
        memmove(b->data, b->data + b->pos, b->len - b->pos);
        b->len -= b->pos;
        b->pos = 0;
        need = b->len + n;
        if (need <= b->cap) {
            return 0;
        }
    }
    if (b->fixed) {
        return LLM_EFULL;
    }

    cap = b->cap ? b->cap : 256;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    d = llm_realloc(b->data, cap);
    if (d == NULL) {
        return LLM_ENOMEM;
    }
    b->data = d;
    b->cap = cap;
    return 0;
}


void
llm_proto_buf_consume(llm_proto_buf *b, size_t n)
{
    if (n > b->len - b->pos) {
        n = b->len - b->pos;
    }
    b->pos += n;
    if (b->pos == b->len) {
        b->pos = b->len = 0;
    }
}


void
llm_proto_buf_set_version(llm_proto_buf *b, int version)
{
    b->version = version;
}


/* Reserves a frame of payload size n and writes its header; *w points at
 * the payload.  The caller writes exactly n bytes then calls frame_end. */
static int
frame_begin(llm_proto_buf *b, int version, int type, uint32_t req_id,
            size_t n, wr *w)
{
    int      rc;
    uint8_t *h;

    if (n > LLM_PROTO_MAX_PAYLOAD) {
        return LLM_EINVAL;
    }
    rc = llm_proto_buf_reserve(b, LLM_PROTO_HEADER_SIZE + n);
    if (rc != 0) {
        return rc;
    }
    if (version == 0) {
        version = b->version ? b->version : LLM_PROTO_VERSION;
    }
    h = b->data + b->len;
    llm_put_le32(h, LLM_PROTO_MAGIC);
    llm_put_le16(h + 4, (uint16_t) version);
    llm_put_le16(h + 6, (uint16_t) type);
    llm_put_le32(h + 8, (uint32_t) n);
    llm_put_le32(h + 12, req_id);
    w->p = h + LLM_PROTO_HEADER_SIZE;
    return 0;
}


static void
frame_end(llm_proto_buf *b, wr *w)
{
    b->len = (size_t) (w->p - b->data);
}


static size_t
str_size(const char *s)
{
    return 2 + (s ? strlen(s) : 0);
}


static int
str_ok(const char *s, size_t max)
{
    return s == NULL || strlen(s) <= max;
}


/* A string field held in a char array of cap bytes: at most max bytes
 * and NUL-ended inside the array. */
static int
field_ok(const char *s, size_t cap, size_t max)
{
    return strnlen(s, cap) <= max;
}


#define FIELD_OK(f, max)    field_ok(f, sizeof(f), max)
#define FIELD_SIZE(f)       (2 + strnlen(f, sizeof(f)))


/* STATS: the first part, then the adapter and prefix cache parts
 * (protocol.h). */
#define STATS_BASE_SIZE     (10 * 4 + 7 * 8)
#define STATS_ADAPTER_SIZE  (4 * 4 + 6 * 8)
#define STATS_PREFIX_SIZE   (2 * 4 + 4 * 8 + 2 * 4 + 10 * 8)


/* ---- encoders ------------------------------------------------------ */

int
llm_proto_encode_raw(llm_proto_buf *b, int version, int type,
                     uint32_t req_id, const void *payload, size_t len)
{
    wr  w;
    int rc;

    rc = frame_begin(b, version, type, req_id, len, &w);
    if (rc != 0) {
        return rc;
    }
    w_bytes(&w, payload, len);
    frame_end(b, &w);
    return 0;
}


int
llm_proto_encode_empty(llm_proto_buf *b, int type, uint32_t req_id)
{
    return llm_proto_encode_raw(b, 0, type, req_id, NULL, 0);
}


int
llm_proto_encode_hello(llm_proto_buf *b, const llm_proto_hello *m)
{
    wr     w;
    int    rc;
    size_t n;

    if (!str_ok(m->client_name, LLM_PROTO_MAX_NAME)) {
        return LLM_EINVAL;
    }
    n = 2 + 2 + 4 + str_size(m->client_name);
    /* HELLO is always version 1: its layout is the one fixed point. */
    rc = frame_begin(b, 1, LLM_MSG_HELLO, 0, n, &w);
    if (rc != 0) {
        return rc;
    }
    w_u16(&w, m->min_version);
    w_u16(&w, m->max_version);
    w_u32(&w, m->flags);
    w_str(&w, m->client_name);
    frame_end(b, &w);
    return 0;
}


int
llm_proto_encode_hello_ok(llm_proto_buf *b, const llm_proto_hello_ok *m)
{
    wr     w;
    int    rc, i;
    size_t n;

    if (!str_ok(m->model_name, LLM_PROTO_MAX_MODEL)
        || !str_ok(m->arch, LLM_PROTO_MAX_ARCH)
        || !str_ok(m->server_name, LLM_PROTO_MAX_NAME)
        || m->n_eog < 0 || m->n_eog > LLM_PROTO_MAX_EOG_IDS)
    {
        return LLM_EINVAL;
    }
    n = 2 + 2 + 4 + 7 * 4 + 32 + str_size(m->model_name)
        + str_size(m->arch) + str_size(m->server_name)
        + 2 + 4 * (size_t) m->n_eog;
    rc = frame_begin(b, m->version, LLM_MSG_HELLO_OK, 0, n, &w);
    if (rc != 0) {
        return rc;
    }
    w_u16(&w, m->version);
    w_u16(&w, 0);
    w_u32(&w, m->flags);
    w_u32(&w, m->n_ctx);
    w_u32(&w, m->n_vocab);
    w_u32(&w, m->block_size);
    w_u32(&w, m->max_seqs);
    w_u32(&w, m->kv_blocks_total);
    w_i32(&w, m->bos_id);
    w_i32(&w, m->eos_id);
    w_bytes(&w, m->fingerprint, 32);
    w_str(&w, m->model_name);
    w_str(&w, m->arch);
    w_str(&w, m->server_name);
    w_u16(&w, (uint16_t) m->n_eog);
    for (i = 0; i < m->n_eog; i++) {
        w_i32(&w, m->eog_ids[i]);
    }
    frame_end(b, &w);
    return 0;
}


void
llm_proto_submit_default(llm_proto_submit *s)
{
    memset(s, 0, sizeof(*s));
    s->max_tokens = 16;
    s->temperature = 0.0f;
    s->top_p = 1.0f;
    s->repetition_penalty = 1.0f;
}


int
llm_proto_encode_submit(llm_proto_buf *b, uint32_t req_id,
                        const llm_proto_submit *m)
{
    wr              w;
    int             rc, i;
    size_t          n;
    const int32_t  *stop = m->stop_ids, *prompt = m->prompt;

    if (!str_ok(m->tenant, LLM_PROTO_MAX_TENANT)
        || !str_ok(m->adapter, LLM_PROTO_MAX_ADAPTER)
        || !str_ok(m->cache_namespace, LLM_PROTO_MAX_NAMESPACE)
        || !str_ok(m->cache_shared_namespace, LLM_PROTO_MAX_NAMESPACE)
        || m->n_stop < 0 || m->n_stop > LLM_PROTO_MAX_STOP_IDS
        || m->n_prompt < 0 || m->n_prompt > LLM_PROTO_MAX_PROMPT
        || (m->n_stop > 0 && stop == NULL)
        || (m->n_prompt > 0 && prompt == NULL))
    {
        return LLM_EINVAL;
    }
    n = 4 + 7 * 4 + 8 + 2 + 1 + 1 + 2 + 2 + 4
        + str_size(m->tenant) + str_size(m->adapter)
        + str_size(m->cache_namespace)
        + 2 + 4 * (size_t) m->n_stop + 4 + 4 * (size_t) m->n_prompt
        + str_size(m->cache_shared_namespace) + 4;
    rc = frame_begin(b, 0, LLM_MSG_SUBMIT, req_id, n, &w);
    if (rc != 0) {
        return rc;
    }
    w_u32(&w, m->max_tokens);
    w_f32(&w, m->temperature);
    w_i32(&w, m->top_k);
    w_f32(&w, m->top_p);
    w_f32(&w, m->min_p);
    w_f32(&w, m->repetition_penalty);
    w_f32(&w, m->frequency_penalty);
    w_f32(&w, m->presence_penalty);
    w_u64(&w, m->seed);
    w_u16(&w, m->flags);
    w_u8(&w, m->top_logprobs);
    w_u8(&w, m->priority);
    w_u16(&w, m->weight);
    w_u16(&w, 0);
    w_u32(&w, m->queue_timeout_ms);
    w_str(&w, m->tenant);
    w_str(&w, m->adapter);
    w_str(&w, m->cache_namespace);
    w_u16(&w, (uint16_t) m->n_stop);
    for (i = 0; i < m->n_stop; i++) {
        w_i32(&w, stop[i]);
    }
    w_u32(&w, (uint32_t) m->n_prompt);
    for (i = 0; i < m->n_prompt; i++) {
        w_i32(&w, prompt[i]);
    }
    w_str(&w, m->cache_shared_namespace);
    w_u32(&w, m->cache_shared_tokens);
    frame_end(b, &w);
    return 0;
}


int
llm_proto_encode_tokens(llm_proto_buf *b, uint32_t req_id, unsigned flags,
                        const llm_proto_token *t, int n)
{
    wr     w;
    int    rc, i, j;
    size_t size;
    int    lp = (flags & LLM_TOKENS_LOGPROBS) != 0;

    if (n < 1 || n > LLM_PROTO_MAX_TOKENS_PER_FRAME
        || (flags & ~LLM_TOKENS_LOGPROBS) != 0)
    {
        return LLM_EINVAL;
    }
    size = 4;
    for (i = 0; i < n; i++) {
        size += 4;
        if (lp) {
            if (t[i].n_top < 0 || t[i].n_top > LLM_PROTO_MAX_TOP) {
                return LLM_EINVAL;
            }
            size += 4 + 1 + 8 * (size_t) t[i].n_top;
        }
    }
    rc = frame_begin(b, 0, LLM_MSG_TOKENS, req_id, size, &w);
    if (rc != 0) {
        return rc;
    }
    w_u16(&w, (uint16_t) n);
    w_u8(&w, (uint8_t) flags);
    w_u8(&w, 0);
    for (i = 0; i < n; i++) {
        w_i32(&w, t[i].id);
        if (lp) {
            w_f32(&w, t[i].logprob);
            w_u8(&w, (uint8_t) t[i].n_top);
            for (j = 0; j < t[i].n_top; j++) {
                w_i32(&w, t[i].top_ids[j]);
                w_f32(&w, t[i].top_logprobs[j]);
            }
        }
    }
    frame_end(b, &w);
    return 0;
}


int
llm_proto_encode_done(llm_proto_buf *b, uint32_t req_id,
                      const llm_proto_done *m)
{
    wr     w;
    int    rc;
    size_t n;

    if (!str_ok(m->message, LLM_PROTO_MAX_MESSAGE)) {
        return LLM_EINVAL;
    }
    n = 4 + 7 * 4 + str_size(m->message);
    rc = frame_begin(b, 0, LLM_MSG_DONE, req_id, n, &w);
    if (rc != 0) {
        return rc;
    }
    w_u8(&w, m->finish);
    w_u8(&w, 0);
    w_u8(&w, 0);
    w_u8(&w, 0);
    w_u32(&w, m->prompt_tokens);
    w_u32(&w, m->completion_tokens);
    w_u32(&w, m->cached_tokens);
    w_u32(&w, m->queue_ms);
    w_u32(&w, m->ttft_ms);
    w_u32(&w, m->total_ms);
    w_u32(&w, m->preemptions);
    w_str(&w, m->message);
    frame_end(b, &w);
    return 0;
}


int
llm_proto_encode_error(llm_proto_buf *b, uint32_t req_id, int code,
                       const char *message)
{
    wr     w;
    int    rc;
    size_t n, mlen;

    /* Messages come from anywhere (engine errors): cut, don't fail. */
    mlen = message ? strlen(message) : 0;
    if (mlen > LLM_PROTO_MAX_MESSAGE) {
        mlen = LLM_PROTO_MAX_MESSAGE;
    }
    n = 2 + 2 + 2 + mlen;
    rc = frame_begin(b, 0, LLM_MSG_ERROR, req_id, n, &w);
    if (rc != 0) {
        return rc;
    }
    w_u16(&w, (uint16_t) code);
    w_u16(&w, 0);
    w_u16(&w, (uint16_t) mlen);
    w_bytes(&w, message, mlen);
    frame_end(b, &w);
    return 0;
}


int
llm_proto_encode_stats(llm_proto_buf *b, uint32_t req_id,
                       const llm_proto_stats *m)
{
    wr  w;
    int rc;

    rc = frame_begin(b, 0, LLM_MSG_STATS, req_id,
                     STATS_BASE_SIZE + STATS_ADAPTER_SIZE + STATS_PREFIX_SIZE,
                     &w);
    if (rc != 0) {
        return rc;
    }
    w_u32(&w, m->waiting);
    w_u32(&w, m->running);
    w_u32(&w, m->kv_blocks_total);
    w_u32(&w, m->kv_blocks_used);
    w_u32(&w, m->block_size);
    w_u32(&w, m->connections);
    w_u32(&w, m->max_seqs);
    w_u32(&w, m->last_batch_tokens);
    w_u32(&w, m->last_batch_seqs);
    w_u32(&w, m->draining);
    w_u64(&w, m->steps);
    w_u64(&w, m->tokens_prefilled);
    w_u64(&w, m->tokens_generated);
    w_u64(&w, m->preemptions);
    w_u64(&w, m->requests_total);
    w_u64(&w, m->requests_rejected);
    w_u64(&w, m->uptime_ms);
    w_u32(&w, m->adapters_registered);
    w_u32(&w, m->adapters_loaded);
    w_u32(&w, m->adapters_resident);
    w_u32(&w, 0);
    w_u64(&w, m->adapter_host_bytes);
    w_u64(&w, m->adapter_device_bytes);
    w_u64(&w, m->adapter_loads);
    w_u64(&w, m->adapter_uploads);
    w_u64(&w, m->adapter_host_evictions);
    w_u64(&w, m->adapter_device_evictions);
    w_u32(&w, m->prefix_blocks_cached);
    w_u32(&w, m->prefix_blocks_reusable);
    w_u64(&w, m->prefix_lookups);
    w_u64(&w, m->prefix_hit_tokens);
    w_u64(&w, m->prefix_tier_hit_tokens);
    w_u64(&w, m->prefix_evictions);
    w_u32(&w, m->tier_connected);
    w_u32(&w, m->tier_enabled);
    w_u64(&w, m->tier_puts);
    w_u64(&w, m->tier_put_bytes);
    w_u64(&w, m->tier_puts_dropped);
    w_u64(&w, m->tier_lookups);
    w_u64(&w, m->tier_blocks_hit);
    w_u64(&w, m->tier_blocks_missed);
    w_u64(&w, m->tier_corrupt);
    w_u64(&w, m->tier_errors);
    w_u64(&w, m->prefix_bytes_cached);
    w_u64(&w, m->tier_stored_bytes);
    frame_end(b, &w);
    return 0;
}


int
llm_proto_encode_adapter_load(llm_proto_buf *b, uint32_t req_id,
                              const llm_proto_adapter_load *m)
{
    wr  w;
    int rc;

    if (!FIELD_OK(m->name, LLM_PROTO_MAX_ADAPTER)
        || !FIELD_OK(m->path, LLM_PROTO_MAX_PATH))
    {
        return LLM_EINVAL;
    }
    rc = frame_begin(b, 0, LLM_MSG_ADAPTER_LOAD, req_id,
                     FIELD_SIZE(m->name) + FIELD_SIZE(m->path), &w);
    if (rc != 0) {
        return rc;
    }
    w_str(&w, m->name);
    w_str(&w, m->path);
    frame_end(b, &w);
    return 0;
}


int
llm_proto_encode_adapter_unload(llm_proto_buf *b, uint32_t req_id,
                                const char *name)
{
    wr  w;
    int rc;

    if (!str_ok(name, LLM_PROTO_MAX_ADAPTER)) {
        return LLM_EINVAL;
    }
    rc = frame_begin(b, 0, LLM_MSG_ADAPTER_UNLOAD, req_id, str_size(name),
                     &w);
    if (rc != 0) {
        return rc;
    }
    w_str(&w, name);
    frame_end(b, &w);
    return 0;
}


int
llm_proto_encode_adapter_ok(llm_proto_buf *b, uint32_t req_id,
                            const llm_proto_adapter_ok *m)
{
    wr  w;
    int rc;

    if (!FIELD_OK(m->name, LLM_PROTO_MAX_ADAPTER)
        || !FIELD_OK(m->version, LLM_PROTO_MAX_VERSION))
    {
        return LLM_EINVAL;
    }
    rc = frame_begin(b, 0, LLM_MSG_ADAPTER_OK, req_id,
                     FIELD_SIZE(m->name) + FIELD_SIZE(m->version) + 4 + 8, &w);
    if (rc != 0) {
        return rc;
    }
    w_str(&w, m->name);
    w_str(&w, m->version);
    w_u32(&w, m->max_rank);
    w_u64(&w, m->bytes);
    frame_end(b, &w);
    return 0;
}


static size_t
adapter_entry_size(const llm_proto_adapter_info *e)
{
    return FIELD_SIZE(e->name) + FIELD_SIZE(e->version) + 4 + 4 + 8;
}


int
llm_proto_encode_adapters(llm_proto_buf *b, uint32_t req_id,
                          uint32_t n_total, const llm_proto_adapter_info *e,
                          int n, int *sent)
{
    wr     w;
    int    rc, i, k;
    size_t size, one;

    if (n < 0 || (n > 0 && e == NULL) || (uint32_t) n > n_total) {
        return LLM_EINVAL;
    }
    /* as many entries as one payload holds */
    size = 8;
    for (k = 0; k < n; k++) {
        if (!FIELD_OK(e[k].name, LLM_PROTO_MAX_ADAPTER)
            || !FIELD_OK(e[k].version, LLM_PROTO_MAX_VERSION)
            || e[k].flags > 0xff)
        {
            return LLM_EINVAL;
        }
        one = adapter_entry_size(&e[k]);
        if (size + one > LLM_PROTO_MAX_PAYLOAD) {
            break;
        }
        size += one;
    }
    rc = frame_begin(b, 0, LLM_MSG_ADAPTERS, req_id, size, &w);
    if (rc != 0) {
        return rc;
    }
    w_u32(&w, n_total);
    w_u32(&w, (uint32_t) k);
    for (i = 0; i < k; i++) {
        w_str(&w, e[i].name);
        w_str(&w, e[i].version);
        w_u8(&w, (uint8_t) e[i].flags);
        w_u8(&w, 0);
        w_u8(&w, 0);
        w_u8(&w, 0);
        w_u32(&w, e[i].max_rank);
        w_u64(&w, e[i].bytes);
    }
    frame_end(b, &w);
    if (sent != NULL) {
        *sent = k;
    }
    return 0;
}


/* ---- decoders ------------------------------------------------------ */

int
llm_proto_decode_header(const uint8_t *p, size_t n, llm_proto_header *h,
                        llm_err *err)
{
    if (n < LLM_PROTO_HEADER_SIZE) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: header needs %d bytes, have %zu",
                           LLM_PROTO_HEADER_SIZE, n);
    }
    h->magic = llm_get_le32(p);
    h->version = llm_get_le16(p + 4);
    h->type = llm_get_le16(p + 6);
    h->length = llm_get_le32(p + 8);
    h->req_id = llm_get_le32(p + 12);
    if (h->magic != LLM_PROTO_MAGIC) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: bad magic 0x%08x (not an ngx_llm "
                           "engine stream)", h->magic);
    }
    if (h->version < LLM_PROTO_VERSION_MIN
        || h->version > LLM_PROTO_VERSION)
    {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: unsupported frame version %u "
                           "(supported %d..%d)", h->version,
                           LLM_PROTO_VERSION_MIN, LLM_PROTO_VERSION);
    }
    if (h->type == 0 || h->type > LLM_MSG_TYPE_MAX) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: bad frame type %u", h->type);
    }
    if (h->length > LLM_PROTO_MAX_PAYLOAD) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: payload of %u bytes exceeds the "
                           "%u byte limit", h->length,
                           LLM_PROTO_MAX_PAYLOAD);
    }
    return 0;
}


int
llm_proto_decode_hello(const llm_proto_frame *f, llm_proto_hello *m,
                       llm_err *err)
{
    rd  r;
    int rc;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_HELLO, &r, err);
    if (rc != 0) {
        return rc;
    }
    m->min_version = r_u16(&r, "min_version");
    m->max_version = r_u16(&r, "max_version");
    m->flags = r_u32(&r, "flags");
    r_str(&r, m->client_name, LLM_PROTO_MAX_NAME, "client_name");
    rc = dec_end(f, &r, err);
    if (rc != 0) {
        return rc;
    }
    if (m->min_version > m->max_version) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: HELLO: min_version %u > "
                           "max_version %u", m->min_version,
                           m->max_version);
    }
    return 0;
}


int
llm_proto_decode_hello_ok(const llm_proto_frame *f, llm_proto_hello_ok *m,
                          llm_err *err)
{
    rd             r;
    int            rc, i, n;
    const uint8_t *fp;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_HELLO_OK, &r, err);
    if (rc != 0) {
        return rc;
    }
    m->version = r_u16(&r, "version");
    (void) r_u16(&r, "reserved");
    m->flags = r_u32(&r, "flags");
    m->n_ctx = r_u32(&r, "n_ctx");
    m->n_vocab = r_u32(&r, "n_vocab");
    m->block_size = r_u32(&r, "block_size");
    m->max_seqs = r_u32(&r, "max_seqs");
    m->kv_blocks_total = r_u32(&r, "kv_blocks_total");
    m->bos_id = r_i32(&r, "bos_id");
    m->eos_id = r_i32(&r, "eos_id");
    fp = r_bytes(&r, 32, "fingerprint");
    if (fp != NULL) {
        memcpy(m->fingerprint, fp, 32);
    }
    r_str(&r, m->model_name, LLM_PROTO_MAX_MODEL, "model_name");
    r_str(&r, m->arch, LLM_PROTO_MAX_ARCH, "arch");
    r_str(&r, m->server_name, LLM_PROTO_MAX_NAME, "server_name");
    n = r_u16(&r, "n_eog");
    if (!r.bad && n > LLM_PROTO_MAX_EOG_IDS) {
        r.bad = 1;
        r.field = "n_eog";
    }
    for (i = 0; i < n && !r.bad; i++) {
        m->eog_ids[i] = r_i32(&r, "eog_ids");
    }
    m->n_eog = r.bad ? 0 : n;
    return dec_end(f, &r, err);
}


int
llm_proto_decode_submit(const llm_proto_frame *f, llm_proto_submit *m,
                        llm_err *err)
{
    rd       r;
    int      rc;
    uint32_t n;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_SUBMIT, &r, err);
    if (rc != 0) {
        return rc;
    }
    m->max_tokens = r_u32(&r, "max_tokens");
    m->temperature = r_f32(&r, "temperature");
    m->top_k = r_i32(&r, "top_k");
    m->top_p = r_f32(&r, "top_p");
    m->min_p = r_f32(&r, "min_p");
    m->repetition_penalty = r_f32(&r, "repetition_penalty");
    m->frequency_penalty = r_f32(&r, "frequency_penalty");
    m->presence_penalty = r_f32(&r, "presence_penalty");
    m->seed = r_u64(&r, "seed");
    m->flags = r_u16(&r, "flags");
    m->top_logprobs = r_u8(&r, "top_logprobs");
    m->priority = r_u8(&r, "priority");
    m->weight = r_u16(&r, "weight");
    (void) r_u16(&r, "reserved");
    m->queue_timeout_ms = r_u32(&r, "queue_timeout_ms");
    r_str(&r, m->tenant, LLM_PROTO_MAX_TENANT, "tenant");
    r_str(&r, m->adapter, LLM_PROTO_MAX_ADAPTER, "adapter");
    r_str(&r, m->cache_namespace, LLM_PROTO_MAX_NAMESPACE,
          "cache_namespace");

    n = r_u16(&r, "n_stop");
    if (!r.bad && n > LLM_PROTO_MAX_STOP_IDS) {
        r.bad = 1;
        r.field = "n_stop";
    }
    m->stop_ids = r_bytes(&r, 4 * (size_t) n, "stop_ids");
    m->n_stop = r.bad ? 0 : (int) n;

    n = r_u32(&r, "n_prompt");
    if (!r.bad && n > LLM_PROTO_MAX_PROMPT) {
        r.bad = 1;
        r.field = "n_prompt";
    }
    m->prompt = r.bad ? NULL : r_bytes(&r, 4 * (size_t) n, "prompt");
    m->n_prompt = r.bad ? 0 : (int) n;
    if (!r.bad && r.left > 0) {
        r_str(&r, m->cache_shared_namespace, LLM_PROTO_MAX_NAMESPACE,
              "cache_shared_namespace");
        m->cache_shared_tokens = r_u32(&r, "cache_shared_tokens");
    }

    rc = dec_end(f, &r, err);
    if (rc != 0) {
        m->n_stop = m->n_prompt = 0;
        m->stop_ids = m->prompt = NULL;
        return rc;
    }
    if ((m->flags & ~(LLM_SUBMIT_HAS_SEED | LLM_SUBMIT_IGNORE_EOS
                      | LLM_SUBMIT_LOGPROBS)) != 0)
    {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: SUBMIT: unknown flags 0x%x",
                           m->flags);
    }
    return 0;
}


int
llm_proto_decode_tokens(const llm_proto_frame *f, llm_proto_tokens *m,
                        llm_err *err)
{
    rd       r;
    int      rc, i;
    unsigned n, n_top;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_TOKENS, &r, err);
    if (rc != 0) {
        return rc;
    }
    n = r_u16(&r, "n_tokens");
    m->flags = r_u8(&r, "flags");
    (void) r_u8(&r, "reserved");
    if (!r.bad && (n == 0 || n > LLM_PROTO_MAX_TOKENS_PER_FRAME)) {
        r.bad = 1;
        r.field = "n_tokens";
    }
    if (!r.bad && (m->flags & ~LLM_TOKENS_LOGPROBS) != 0) {
        r.bad = 1;
        r.field = "flags";
    }
    m->raw = r.p;

    /* Walk every record once so that the iterator cannot run short. */
    for (i = 0; i < (int) n && !r.bad; i++) {
        (void) r_bytes(&r, 4, "id");
        if (m->flags & LLM_TOKENS_LOGPROBS) {
            (void) r_bytes(&r, 4, "logprob");
            n_top = r_u8(&r, "n_top");
            if (!r.bad && n_top > LLM_PROTO_MAX_TOP) {
                r.bad = 1;
                r.field = "n_top";
            }
            (void) r_bytes(&r, 8 * (size_t) n_top, "top");
        }
    }
    rc = dec_end(f, &r, err);
    if (rc != 0) {
        m->raw = NULL;
        return rc;
    }
    m->n_tokens = (int) n;
    m->raw_len = (size_t) (r.p - m->raw);
    m->off = 0;
    return 0;
}


int
llm_proto_tokens_next(llm_proto_tokens *m, llm_proto_token *t)
{
    rd  r;
    int i;

    if (m->raw == NULL || m->off >= m->raw_len) {
        return 0;
    }
    r.p = m->raw + m->off;
    r.left = m->raw_len - m->off;
    r.bad = 0;
    r.field = NULL;

    t->id = r_i32(&r, "id");
    t->logprob = 0.0f;
    t->n_top = 0;
    if (m->flags & LLM_TOKENS_LOGPROBS) {
        t->logprob = r_f32(&r, "logprob");
        t->n_top = r_u8(&r, "n_top");
        if (t->n_top > LLM_PROTO_MAX_TOP) {     /* validated; belt */
            t->n_top = 0;
            r.bad = 1;
        }
        for (i = 0; i < t->n_top; i++) {
            t->top_ids[i] = r_i32(&r, "top_id");
            t->top_logprobs[i] = r_f32(&r, "top_logprob");
        }
    }
    if (r.bad) {
        m->off = m->raw_len;
        return 0;
    }
    m->off = (size_t) (r.p - m->raw);
    return 1;
}


int
llm_proto_decode_done(const llm_proto_frame *f, llm_proto_done *m,
                      llm_err *err)
{
    rd  r;
    int rc;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_DONE, &r, err);
    if (rc != 0) {
        return rc;
    }
    m->finish = r_u8(&r, "finish");
    (void) r_bytes(&r, 3, "reserved");
    m->prompt_tokens = r_u32(&r, "prompt_tokens");
    m->completion_tokens = r_u32(&r, "completion_tokens");
    m->cached_tokens = r_u32(&r, "cached_tokens");
    m->queue_ms = r_u32(&r, "queue_ms");
    m->ttft_ms = r_u32(&r, "ttft_ms");
    m->total_ms = r_u32(&r, "total_ms");
    m->preemptions = r_u32(&r, "preemptions");
    r_str(&r, m->message, LLM_PROTO_MAX_MESSAGE, "message");
    if (!r.bad && (m->finish < LLM_PFINISH_STOP
                   || m->finish > LLM_PFINISH_ERROR))
    {
        r.bad = 1;
        r.field = "finish";
    }
    return dec_end(f, &r, err);
}


int
llm_proto_decode_error(const llm_proto_frame *f, llm_proto_error *m,
                       llm_err *err)
{
    rd  r;
    int rc;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_ERROR, &r, err);
    if (rc != 0) {
        return rc;
    }
    m->code = r_u16(&r, "code");
    (void) r_u16(&r, "reserved");
    r_str(&r, m->message, LLM_PROTO_MAX_MESSAGE, "message");
    return dec_end(f, &r, err);
}


int
llm_proto_decode_stats(const llm_proto_frame *f, llm_proto_stats *m,
                       llm_err *err)
{
    rd  r;
    int rc;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_STATS, &r, err);
    if (rc != 0) {
        return rc;
    }
    m->waiting = r_u32(&r, "waiting");
    m->running = r_u32(&r, "running");
    m->kv_blocks_total = r_u32(&r, "kv_blocks_total");
    m->kv_blocks_used = r_u32(&r, "kv_blocks_used");
    m->block_size = r_u32(&r, "block_size");
    m->connections = r_u32(&r, "connections");
    m->max_seqs = r_u32(&r, "max_seqs");
    m->last_batch_tokens = r_u32(&r, "last_batch_tokens");
    m->last_batch_seqs = r_u32(&r, "last_batch_seqs");
    m->draining = r_u32(&r, "draining");
    m->steps = r_u64(&r, "steps");
    m->tokens_prefilled = r_u64(&r, "tokens_prefilled");
    m->tokens_generated = r_u64(&r, "tokens_generated");
    m->preemptions = r_u64(&r, "preemptions");
    m->requests_total = r_u64(&r, "requests_total");
    m->requests_rejected = r_u64(&r, "requests_rejected");
    m->uptime_ms = r_u64(&r, "uptime_ms");
    if (!r.bad && r.left > 0) {
        m->has_adapters = 1;
        m->adapters_registered = r_u32(&r, "adapters_registered");
        m->adapters_loaded = r_u32(&r, "adapters_loaded");
        m->adapters_resident = r_u32(&r, "adapters_resident");
        (void) r_u32(&r, "reserved");
        m->adapter_host_bytes = r_u64(&r, "adapter_host_bytes");
        m->adapter_device_bytes = r_u64(&r, "adapter_device_bytes");
        m->adapter_loads = r_u64(&r, "adapter_loads");
        m->adapter_uploads = r_u64(&r, "adapter_uploads");
        m->adapter_host_evictions = r_u64(&r, "adapter_host_evictions");
        m->adapter_device_evictions = r_u64(&r, "adapter_device_evictions");
    }
    if (!r.bad && r.left > 0) {
        m->has_prefix_cache = 1;
        m->prefix_blocks_cached = r_u32(&r, "prefix_blocks_cached");
        m->prefix_blocks_reusable = r_u32(&r, "prefix_blocks_reusable");
        m->prefix_lookups = r_u64(&r, "prefix_lookups");
        m->prefix_hit_tokens = r_u64(&r, "prefix_hit_tokens");
        m->prefix_tier_hit_tokens = r_u64(&r, "prefix_tier_hit_tokens");
        m->prefix_evictions = r_u64(&r, "prefix_evictions");
        m->tier_connected = r_u32(&r, "tier_connected");
        m->tier_enabled = r_u32(&r, "tier_enabled");
        m->tier_puts = r_u64(&r, "tier_puts");
        m->tier_put_bytes = r_u64(&r, "tier_put_bytes");
        m->tier_puts_dropped = r_u64(&r, "tier_puts_dropped");
        m->tier_lookups = r_u64(&r, "tier_lookups");
        m->tier_blocks_hit = r_u64(&r, "tier_blocks_hit");
        m->tier_blocks_missed = r_u64(&r, "tier_blocks_missed");
        m->tier_corrupt = r_u64(&r, "tier_corrupt");
        m->tier_errors = r_u64(&r, "tier_errors");
        m->prefix_bytes_cached = r_u64(&r, "prefix_bytes_cached");
        m->tier_stored_bytes = r_u64(&r, "tier_stored_bytes");
    }
    return dec_end(f, &r, err);
}


int
llm_proto_decode_adapter_load(const llm_proto_frame *f,
                              llm_proto_adapter_load *m, llm_err *err)
{
    rd  r;
    int rc;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_ADAPTER_LOAD, &r, err);
    if (rc != 0) {
        return rc;
    }
    r_str(&r, m->name, LLM_PROTO_MAX_ADAPTER, "name");
    r_str(&r, m->path, LLM_PROTO_MAX_PATH, "path");
    return dec_end(f, &r, err);
}


int
llm_proto_decode_adapter_unload(const llm_proto_frame *f, char *name,
                                llm_err *err)
{
    rd  r;
    int rc;

    name[0] = '\0';
    rc = dec_begin(f, LLM_MSG_ADAPTER_UNLOAD, &r, err);
    if (rc != 0) {
        return rc;
    }
    r_str(&r, name, LLM_PROTO_MAX_ADAPTER, "name");
    return dec_end(f, &r, err);
}


int
llm_proto_decode_adapter_ok(const llm_proto_frame *f,
                            llm_proto_adapter_ok *m, llm_err *err)
{
    rd  r;
    int rc;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_ADAPTER_OK, &r, err);
    if (rc != 0) {
        return rc;
    }
    r_str(&r, m->name, LLM_PROTO_MAX_ADAPTER, "name");
    r_str(&r, m->version, LLM_PROTO_MAX_VERSION, "version");
    m->max_rank = r_u32(&r, "max_rank");
    m->bytes = r_u64(&r, "bytes");
    return dec_end(f, &r, err);
}


/* One ADAPTERS entry; with e == NULL only validates and skips it. */
static void
r_adapter(rd *r, llm_proto_adapter_info *e)
{
    llm_proto_adapter_info tmp;

    if (e == NULL) {
        e = &tmp;
    }
    r_str(r, e->name, LLM_PROTO_MAX_ADAPTER, "name");
    r_str(r, e->version, LLM_PROTO_MAX_VERSION, "version");
    e->flags = r_u8(r, "flags");
    (void) r_bytes(r, 3, "reserved");
    e->max_rank = r_u32(r, "max_rank");
    e->bytes = r_u64(r, "bytes");
}


int
llm_proto_decode_adapters(const llm_proto_frame *f, llm_proto_adapters *m,
                          llm_err *err)
{
    rd       r;
    int      rc;
    uint32_t i;

    memset(m, 0, sizeof(*m));
    rc = dec_begin(f, LLM_MSG_ADAPTERS, &r, err);
    if (rc != 0) {
        return rc;
    }
    m->n_total = r_u32(&r, "n_total");
    m->n = r_u32(&r, "n");
    if (!r.bad && m->n > m->n_total) {
        r.bad = 1;
        r.field = "n";
    }
    m->raw = r.p;
    /* walk every entry once so that the iterator cannot run short */
    for (i = 0; i < m->n && !r.bad; i++) {
        r_adapter(&r, NULL);
    }
    rc = dec_end(f, &r, err);
    if (rc != 0) {
        m->raw = NULL;
        m->n = m->n_total = 0;
        return rc;
    }
    m->raw_len = (size_t) (r.p - m->raw);
    m->off = 0;
    return 0;
}


int
llm_proto_adapters_next(llm_proto_adapters *m, llm_proto_adapter_info *e)
{
    rd r;

    if (m->raw == NULL || m->off >= m->raw_len) {
        return 0;
    }
    r.p = m->raw + m->off;
    r.left = m->raw_len - m->off;
    r.bad = 0;
    r.field = NULL;
    memset(e, 0, sizeof(*e));
    r_adapter(&r, e);
    if (r.bad) {                /* validated; belt */
        m->off = m->raw_len;
        return 0;
    }
    m->off = (size_t) (r.p - m->raw);
    return 1;
}


int
llm_proto_decode_empty(const llm_proto_frame *f, llm_err *err)
{
    if (f->length != 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: %s: expected an empty payload, got "
                           "%u bytes", llm_proto_type_name(f->type),
                           f->length);
    }
    return 0;
}


void
llm_proto_copy_ids(const void *ids, int n, int32_t *out)
{
    int i;

    for (i = 0; i < n; i++) {
        out[i] = llm_proto_id_at(ids, i);
    }
}


const char *
llm_proto_type_name(int type)
{
    switch (type) {
    case LLM_MSG_HELLO:          return "HELLO";
    case LLM_MSG_HELLO_OK:       return "HELLO_OK";
    case LLM_MSG_SUBMIT:         return "SUBMIT";
    case LLM_MSG_CANCEL:         return "CANCEL";
    case LLM_MSG_TOKENS:         return "TOKENS";
    case LLM_MSG_DONE:           return "DONE";
    case LLM_MSG_ERROR:          return "ERROR";
    case LLM_MSG_STATS_REQ:      return "STATS_REQ";
    case LLM_MSG_STATS:          return "STATS";
    case LLM_MSG_PING:           return "PING";
    case LLM_MSG_PONG:           return "PONG";
    case LLM_MSG_ADAPTER_LOAD:   return "ADAPTER_LOAD";
    case LLM_MSG_ADAPTER_UNLOAD: return "ADAPTER_UNLOAD";
    case LLM_MSG_ADAPTER_OK:     return "ADAPTER_OK";
    case LLM_MSG_ADAPTER_LIST:   return "ADAPTER_LIST";
    case LLM_MSG_ADAPTERS:       return "ADAPTERS";
    default:                     return "unknown";
    }
}


const char *
llm_proto_error_name(int code)
{
    switch (code) {
    case LLM_PERR_BAD_REQUEST: return "bad_request";
    case LLM_PERR_CONTEXT:     return "context_length_exceeded";
    case LLM_PERR_OVERLOADED:  return "overloaded";
    case LLM_PERR_DRAINING:    return "draining";
    case LLM_PERR_INTERNAL:    return "internal";
    case LLM_PERR_NOT_FOUND:   return "not_found";
    case LLM_PERR_VERSION:     return "version";
    case LLM_PERR_PROTOCOL:    return "protocol";
    case LLM_PERR_DUPLICATE:   return "duplicate_request_id";
    case LLM_PERR_UNSUPPORTED: return "unsupported";
    default:                   return "unknown";
    }
}


const char *
llm_proto_finish_name(int finish)
{
    switch (finish) {
    case LLM_PFINISH_STOP:      return "stop";
    case LLM_PFINISH_LENGTH:    return "length";
    case LLM_PFINISH_CANCELLED: return "cancelled";
    case LLM_PFINISH_ERROR:     return "error";
    default:                    return "unknown";
    }
}


int
llm_proto_negotiate(const llm_proto_hello *h)
{
    int hi = h->max_version < LLM_PROTO_VERSION ? h->max_version
                                                : LLM_PROTO_VERSION;
    int lo = h->min_version > LLM_PROTO_VERSION_MIN ? h->min_version
                                                    : LLM_PROTO_VERSION_MIN;

    return hi >= lo ? hi : -1;
}


/* ---- streaming parser ---------------------------------------------- */

void
llm_proto_parser_init(llm_proto_parser *p, size_t max_payload)
{
    memset(p, 0, sizeof(*p));
    p->max_payload = max_payload ? max_payload : LLM_PROTO_MAX_PAYLOAD;
    if (p->max_payload > LLM_PROTO_MAX_PAYLOAD) {
        p->max_payload = LLM_PROTO_MAX_PAYLOAD;
    }
}


void
llm_proto_parser_free(llm_proto_parser *p)
{
    llm_free(p->data);
    p->data = NULL;
    p->len = p->cap = p->off = 0;
}


uint8_t *
llm_proto_parser_space(llm_proto_parser *p, size_t want)
{
    size_t   need, cap;
    uint8_t *d;

    /* Drop the frames already handed out (their bytes are dead now). */
    if (p->off > 0) {
        memmove(p->data, p->data + p->off, p->len - p->off);
        p->len -= p->off;
        p->off = 0;
    }
    if (want > SIZE_MAX - p->len) {
        return NULL;
    }
    need = p->len + want;
    if (need > p->cap) {
        cap = p->cap ? p->cap : 4096;
        while (cap < need) {
            cap *= 2;
        }
        d = llm_realloc(p->data, cap);
        if (d == NULL) {
            return NULL;
        }
        p->data = d;
        p->cap = cap;
    }
    return p->data + p->len;
}


void
llm_proto_parser_commit(llm_proto_parser *p, size_t n)
{
    if (n > p->cap - p->len) {
        n = p->cap - p->len;
    }
    p->len += n;
}


int
llm_proto_parser_feed(llm_proto_parser *p, const void *data, size_t n)
{
    uint8_t *d;

    if (n == 0) {
        return 0;
    }
    d = llm_proto_parser_space(p, n);
    if (d == NULL) {
        return LLM_ENOMEM;
    }
    memcpy(d, data, n);
    p->len += n;
    return 0;
}


int
llm_proto_parser_next(llm_proto_parser *p, llm_proto_frame *f,
                      llm_err *err)
{
    llm_proto_header h;
    size_t           avail;
    int              rc;

    if (p->error) {
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: stream already failed");
    }
    avail = p->len - p->off;
    if (avail < LLM_PROTO_HEADER_SIZE) {
        /* Reject a bad magic as soon as its bytes arrive, so that a
         * stray client (an HTTP request, say) is told at once. */
        static const uint8_t magic[4] = { 'L', 'L', 'M', 'P' };
        size_t k = avail < 4 ? avail : 4;

        if (k > 0 && memcmp(p->data + p->off, magic, k) != 0) {
            p->error = 1;
            return llm_err_set(err, LLM_EFORMAT,
                               "protocol: bad magic (not an ngx_llm "
                               "engine stream)");
        }
        return 0;
    }
    rc = llm_proto_decode_header(p->data + p->off, avail, &h, err);
    if (rc != 0) {
        p->error = 1;
        return rc;
    }
    if (h.length > p->max_payload) {
        p->error = 1;
        return llm_err_set(err, LLM_EFORMAT,
                           "protocol: payload of %u bytes exceeds the "
                           "%zu byte limit", h.length, p->max_payload);
    }
    if (avail - LLM_PROTO_HEADER_SIZE < h.length) {
        return 0;
    }
    f->version = h.version;
    f->type = h.type;
    f->req_id = h.req_id;
    f->length = h.length;
    f->payload = p->data + p->off + LLM_PROTO_HEADER_SIZE;
    p->off += LLM_PROTO_HEADER_SIZE + h.length;
    return 1;
}


size_t
llm_proto_parser_pending(const llm_proto_parser *p)
{
    return p->len - p->off;
}
