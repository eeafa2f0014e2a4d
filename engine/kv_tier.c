/*
 * The Redis tier of the prefix cache (see kv_tier.h).
 *
 * Two threads meet here.  The engine thread calls put, lookup and poll:
 * they copy what they need and touch three queues under t->mu, nothing
 * more.  The tier thread owns the hiredis context and makes every blocking
 * call (connect, pipelined GETs, the budget script), with the socket
 * timeouts of params.timeout_ms, so a slow or absent Redis costs the engine
 * nothing but misses.
 *
 * Connection: made on the first job; any error or timeout frees it and
 * starts a back-off (100 ms doubling to 5 s) during which lookups finish
 * at once with nothing found and writes are dropped.
 */
#include "kv_tier.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include "byteorder.h"
#include "sha256.h"
#include "kernels/backend.h"
#include "kernels/dtype.h"


/* ---- record layout ------------------------------------------------- */

#define REC_MAGIC           "LLMKV"
#define REC_MAGIC_LEN       5
#define REC_OFF_VERSION     5
#define REC_OFF_DTYPE       6
#define REC_OFF_RESERVED    7
#define REC_OFF_FP          8
#define REC_OFF_HASH        40
#define REC_OFF_BLOCK_SIZE  72
#define REC_OFF_LAYERS      74
#define REC_OFF_KV_HEADS    76
#define REC_OFF_HEAD_DIM    78
#define REC_OFF_PAYLOAD_LEN 80
#define REC_OFF_CHECKSUM    84
#define REC_HEADER          92

#define TIER_KEY_HEX        64

#define TIER_BACKOFF_MIN_MS 100
#define TIER_BACKOFF_MAX_MS 5000

/* one write pipeline carries at most this much (bounds how long a lookup
 * queued behind it waits, and hiredis' copy of the batch) */
#define TIER_BATCH_MAX      32
#define TIER_BATCH_BYTES    (2u << 20)


/* ---- the budget script --------------------------------------------- */

/*
 * KEYS[1] block key, KEYS[2] index zset (member = key, score = expiry in
 * Redis microseconds, so writes within one second keep their order),
 * KEYS[3] sizes hash (key -> record bytes), KEYS[4] byte total; ARGV[1]
 * value, ARGV[2] ttl_s, ARGV[3] budget (the brief's ARGV[4] "now" is not
 * needed: time is Redis' own (TIME), so every engine host agrees with the
 * keys' real expiry).  Returns {keys it deleted for the budget, the byte
 * total after the write}.
 *
 * Under Redis Cluster all four keys, and the block keys it deletes, must
 * hash to one slot: give key_prefix a hash tag ("{llm:kv}:").
 */
static const char tier_script[] =
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    "local tm = redis.call('TIME')\n"
    "local now = tonumber(tm[1]) * 1000000 + tonumber(tm[2])\n"
    "local ttl = tonumber(ARGV[2])\n"
    /* scores as integer strings: Lua would print 16 digits as 1.7e+15 */
    "local nows = string.format('%.0f', now)\n"
    "local exp = string.format('%.0f', now + ttl * 1000000)\n"
    "local budget = tonumber(ARGV[3])\n"
    "local total = tonumber(redis.call('GET', KEYS[4]) or 0)\n"
    /* expired keys leave the total (a bounded number per call) */
    "local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', nows,\n"
    "                        'LIMIT', 0, 256)\n"
    "for _, k in ipairs(gone) do\n"
    "  total = total - tonumber(redis.call('HGET', KEYS[3], k) or 0)\n"
    "  redis.call('HDEL', KEYS[3], k)\n"
    "  redis.call('ZREM', KEYS[2], k)\n"
    "end\n"
    /* present and counted: refresh TTL and expiry only */
    "local prev = redis.call('HGET', KEYS[3], KEYS[1])\n"
    "if prev and redis.call('EXPIRE', KEYS[1], ttl) == 1 then\n"
    "  redis.call('ZADD', KEYS[2], exp, KEYS[1])\n"
    "else\n"
    "  if prev then total = total - tonumber(prev) end\n"
    "  local size = string.len(ARGV[1])\n"
    "  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)\n"
    "  redis.call('ZADD', KEYS[2], exp, KEYS[1])\n"
    "  redis.call('HSET', KEYS[3], KEYS[1], size)\n"
    "  total = total + size\n"
    "end\n"
    /* over budget: the soonest to expire (the oldest written) go first */
    "local evicted = 0\n"
    "while total > budget do\n"
    "  local v = redis.call('ZRANGE', KEYS[2], 0, 0)[1]\n"
    "  if not v then total = 0 break end\n"
    "  total = total - tonumber(redis.call('HGET', KEYS[3], v) or 0)\n"
    "  redis.call('DEL', v)\n"
    "  redis.call('HDEL', KEYS[3], v)\n"
    "  redis.call('ZREM', KEYS[2], v)\n"
    "  evicted = evicted + 1\n"
    "end\n"
    "if total < 0 then total = 0 end\n"
    "redis.call('SET', KEYS[4], total)\n"
    "return {evicted, total}\n";


/* ---- types ---------------------------------------------------------- */

typedef struct tier_write {
    struct tier_write  *next;
    uint8_t             hash[32];
    uint8_t            *rec;        /* [record_bytes]: payload copied by put,
                                       header filled by the tier thread */
} tier_write;

typedef struct tier_lookup {
    struct tier_lookup *next;
    uint64_t            tag;
    int                 n;
    uint8_t             hashes[][32];   /* [n] */
} tier_lookup;

typedef struct tier_done {
    struct tier_done   *next;
    llm_kv_tier_result  r;
} tier_done;


struct llm_kv_tier {
    llm_kv_tier_params  p;          /* addr and key_prefix: own copies */
    size_t              payload_bytes;
    size_t              record_bytes;
    size_t              prefix_len;
    char               *key_index;  /* key_prefix + "index" */
    char               *key_sizes;  /* key_prefix + "sizes" */
    char               *key_bytes;  /* key_prefix + "bytes" */
    char               *host;       /* TCP host, or NULL */
    char               *path;       /* unix socket path, or NULL */
    int                 port;

    pthread_t           thread;
    pthread_mutex_t     mu;
    pthread_cond_t      cv;
    int                 thread_started;

    /* ---- under mu */
    int                 stop;
    uint64_t            stop_deadline_ns;
    uint64_t            down_until_ns;  /* Redis away: put drops until */
    tier_write         *w_head, *w_tail;
    size_t              w_bytes;        /* payload bytes queued */
    tier_lookup        *l_head, *l_tail;
    tier_done          *d_head, *d_tail;
    llm_kv_tier_stats   st;

    /* ---- tier thread only */
    redisContext       *c;
    char                sha[41];        /* budget script; "" if not loaded */
    uint64_t            next_connect_ns;
    uint32_t            backoff_ms;
};


/* ---- checksum ------------------------------------------------------ */

#define CK_K1  0x9e3779b97f4a7c15ULL
#define CK_K2  0xd6e8feb86659fd93ULL
#define CK_K3  0xa0761d6478bd642fULL


/*
 * Mixes one word into a lane.  Every step is a bijection of the lane for a
 * fixed word (xor, rotation, multiply by an odd constant), so two inputs
 * differing in one word always leave that lane different: a flipped byte
 * is always caught, other damage with probability 1 - 2^-64.
 */
static inline uint64_t
ck_round(uint64_t v, uint64_t w)
{
    v ^= w * CK_K2;
    v = (v << 27) | (v >> 37);
    return v * CK_K1;
}


static inline uint64_t
ck_final(uint64_t h)
{
    h ^= h >> 31;
    h *= CK_K3;
    h ^= h >> 29;
    h *= CK_K2;
    h ^= h >> 32;
    return h;
}


/* Checksum of the payload: 4 independent lanes over 32-byte stripes (so
 * the multiplies overlap), then the rest word by word and the tail. */
static uint64_t
tier_checksum(const uint8_t *p, size_t n)
{
    uint64_t v0 = CK_K1, v1 = CK_K2, v2 = CK_K3, v3 = CK_K1 ^ CK_K2;
    uint64_t h, w;
    size_t   i = 0;

    for (; i + 32 <= n; i += 32) {
        v0 = ck_round(v0, llm_get_le64(p + i));
        v1 = ck_round(v1, llm_get_le64(p + i + 8));
        v2 = ck_round(v2, llm_get_le64(p + i + 16));
        v3 = ck_round(v3, llm_get_le64(p + i + 24));
    }
    for (; i + 8 <= n; i += 8) {
        v0 = ck_round(v0, llm_get_le64(p + i));
    }
    if (i < n) {
        w = 0;
        memcpy(&w, p + i, n - i);   /* tail, zero padded */
        v1 = ck_round(v1, w);
    }

    h = (uint64_t) n * CK_K3;
    h = ck_round(h, v0);
    h = ck_round(h, v1);
    h = ck_round(h, v2);
    h = ck_round(h, v3);
    return ck_final(h);
}


/* ---- record codec --------------------------------------------------- */

size_t
llm_kv_tier_payload_bytes(const llm_kv_tier_params *p)
{
    if (!llm_kv_type_ok(p->dtype, p->head_dim) || p->block_size <= 0
        || p->n_layers <= 0 || p->n_kv_heads <= 0 || p->head_dim <= 0)
    {
        return 0;
    }
    /* [n_layers, 2, block_size, n_kv_heads, head_dim] */
    return (size_t) p->n_layers * 2 * (size_t) p->block_size
           * llm_kv_bytes(p->dtype, (size_t) p->n_kv_heads * p->head_dim);
}


size_t
llm_kv_record_size(const llm_kv_tier_params *p)
{
    return REC_HEADER + llm_kv_tier_payload_bytes(p);
}


/* The offset of the first element of p[n] (F16 or F32, little-endian;
 * Q8_0: a block's F16 scale, every 34 bytes) that is a NaN or an
 * infinity (all exponent bits set), or n. */
static size_t
tier_nonfinite(const uint8_t *p, size_t n, int dtype)
{
    size_t i, step = dtype == LLM_Q8_0 ? 34 : 2;

    if (dtype == LLM_F32) {
        for (i = 0; i + 4 <= n; i += 4) {
            if ((llm_get_le32(p + i) & 0x7f800000u) == 0x7f800000u) {
                return i;
            }
        }
        return n;
    }
    for (i = 0; i + step <= n; i += step) {
        if ((llm_get_le16(p + i) & 0x7c00u) == 0x7c00u) {
            return i;
        }
    }
    return n;
}


/* The header of a record; the payload must already be at REC_HEADER. */
static void
tier_encode_header(const llm_kv_tier_params *p, size_t payload_bytes,
                   const uint8_t hash[32], uint8_t *out)
{
    memcpy(out, REC_MAGIC, REC_MAGIC_LEN);
    out[REC_OFF_VERSION] = LLM_KV_RECORD_VERSION;
    out[REC_OFF_DTYPE] = (uint8_t) p->dtype;
    out[REC_OFF_RESERVED] = 0;
    memcpy(out + REC_OFF_FP, p->fingerprint, 32);
    memcpy(out + REC_OFF_HASH, hash, 32);
    llm_put_le16(out + REC_OFF_BLOCK_SIZE, (uint16_t) p->block_size);
    llm_put_le16(out + REC_OFF_LAYERS, (uint16_t) p->n_layers);
    llm_put_le16(out + REC_OFF_KV_HEADS, (uint16_t) p->n_kv_heads);
    llm_put_le16(out + REC_OFF_HEAD_DIM, (uint16_t) p->head_dim);
    llm_put_le32(out + REC_OFF_PAYLOAD_LEN, (uint32_t) payload_bytes);
    llm_put_le64(out + REC_OFF_CHECKSUM,
         tier_checksum(out + REC_HEADER, payload_bytes));
}


void
llm_kv_record_encode(const llm_kv_tier_params *p, const uint8_t hash[32],
                     const void *payload, uint8_t *out)
{
    size_t n = llm_kv_tier_payload_bytes(p);

    memmove(out + REC_HEADER, payload, n);
    tier_encode_header(p, n, hash, out);
}


int
llm_kv_record_decode(const llm_kv_tier_params *p, const uint8_t hash[32],
                     const uint8_t *rec, size_t len,
                     const uint8_t **payload, llm_err *err)
{
    size_t   want = llm_kv_tier_payload_bytes(p), bad;
    uint32_t plen;
    char     hex[65];

    *payload = NULL;
    llm_sha256_hex(hash, hex);
    hex[16] = '\0';     /* enough to name the block in a message */

    if (rec == NULL || len < REC_HEADER) {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: truncated (%zu bytes, header "
                           "is %d)", hex, len, REC_HEADER);
    }
    if (memcmp(rec, REC_MAGIC, REC_MAGIC_LEN) != 0) {
        return llm_err_set(err, LLM_EFORMAT, "kv record %s: bad magic",
                           hex);
    }
    if (rec[REC_OFF_VERSION] != LLM_KV_RECORD_VERSION) {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: format version %u, expected %d",
                           hex, rec[REC_OFF_VERSION], LLM_KV_RECORD_VERSION);
    }
    if (memcmp(rec + REC_OFF_FP, p->fingerprint, 32) != 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: other model fingerprint", hex);
    }
    if (rec[REC_OFF_DTYPE] != (uint8_t) p->dtype) {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: dtype %u, expected %d", hex,
                           rec[REC_OFF_DTYPE], p->dtype);
    }
    if (llm_get_le16(rec + REC_OFF_BLOCK_SIZE) != p->block_size
        || llm_get_le16(rec + REC_OFF_LAYERS) != p->n_layers
        || llm_get_le16(rec + REC_OFF_KV_HEADS) != p->n_kv_heads
        || llm_get_le16(rec + REC_OFF_HEAD_DIM) != p->head_dim)
    {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: shape block %u layers %u "
                           "kv_heads %u head_dim %u, expected %d %d %d %d",
                           hex, llm_get_le16(rec + REC_OFF_BLOCK_SIZE),
                           llm_get_le16(rec + REC_OFF_LAYERS),
                           llm_get_le16(rec + REC_OFF_KV_HEADS),
                           llm_get_le16(rec + REC_OFF_HEAD_DIM), p->block_size,
                           p->n_layers, p->n_kv_heads, p->head_dim);
    }
    if (memcmp(rec + REC_OFF_HASH, hash, 32) != 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: holds another block's chain hash",
                           hex);
    }
    plen = llm_get_le32(rec + REC_OFF_PAYLOAD_LEN);
    if (plen != want) {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: payload_bytes %u, expected %zu",
                           hex, plen, want);
    }
    if (len != REC_HEADER + want) {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: %s (%zu bytes, expected %zu)",
                           hex, len < REC_HEADER + want ? "truncated"
                                                        : "oversized",
                           len, REC_HEADER + want);
    }
    if (llm_get_le64(rec + REC_OFF_CHECKSUM) != tier_checksum(rec + REC_HEADER,
                                                       want))
    {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: bad checksum", hex);
    }
    /* the checksum catches damage, not a record written to harm: a NaN
     * or infinity in a block would spread through every sequence that
     * attends to it */
    bad = tier_nonfinite(rec + REC_HEADER, want, p->dtype);
    if (bad < want) {
        return llm_err_set(err, LLM_EFORMAT,
                           "kv record %s: byte %zu of the payload holds a NaN "
                           "or an infinity", hex, bad);
    }

    *payload = rec + REC_HEADER;
    return 0;
}


/* ---- the tier thread: connection ------------------------------------ */

static struct timeval
tier_tv(uint32_t ms)
{
    struct timeval tv;

    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    return tv;
}


/* A write to a socket Redis closed raises SIGPIPE in this thread (hiredis
 * 0.14 uses write(2)); it is blocked here, so take it off the pending set
 * rather than let it pile up. */
static void
tier_eat_sigpipe(void)
{
    sigset_t        set;
    struct timespec zero = { 0, 0 };

    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    while (sigtimedwait(&set, NULL, &zero) > 0) {
        /* consumed */
    }
}


static void
tier_fail(llm_kv_tier *t)
{
    uint64_t now = llm_now_ns();

    if (t->c != NULL) {
        redisFree(t->c);
        t->c = NULL;
    }
    tier_eat_sigpipe();

    t->next_connect_ns = now + (uint64_t) t->backoff_ms * 1000000u;
    t->backoff_ms *= 2;
    if (t->backoff_ms > TIER_BACKOFF_MAX_MS) {
        t->backoff_ms = TIER_BACKOFF_MAX_MS;
    }

    pthread_mutex_lock(&t->mu);
    t->st.errors++;
    t->st.connected = 0;
    t->down_until_ns = t->next_connect_ns;
    pthread_mutex_unlock(&t->mu);
}


static void
tier_set_connected(llm_kv_tier *t, int on)
{
    pthread_mutex_lock(&t->mu);
    t->st.connected = on;
    pthread_mutex_unlock(&t->mu);
}


static void
tier_count_error(llm_kv_tier *t)
{
    pthread_mutex_lock(&t->mu);
    t->st.errors++;
    pthread_mutex_unlock(&t->mu);
}


/* Loads the budget script; an error reply (scripting disabled, ...) only
 * means every write goes through EVAL. */
static int
tier_load_script(llm_kv_tier *t)
{
    redisReply *r;

    t->sha[0] = '\0';
    r = redisCommand(t->c, "SCRIPT LOAD %s", tier_script);
    if (r == NULL) {
        return -1;
    }
    if (r->type == REDIS_REPLY_STRING && r->len == 40) {
        memcpy(t->sha, r->str, 40);
        t->sha[40] = '\0';
    } else {
        tier_count_error(t);
    }
    freeReplyObject(r);
    return 0;
}


/* 0 with t->c ready, or -1: Redis away (back-off running or this attempt
 * failed).  Connects only when the back-off allows. */
static int
tier_connect(llm_kv_tier *t)
{
    struct timeval tv = tier_tv(t->p.timeout_ms);

    if (t->c != NULL) {
        return 0;
    }
    if (llm_now_ns() < t->next_connect_ns) {
        return -1;
    }

    if (t->path != NULL) {
        t->c = redisConnectUnixWithTimeout(t->path, tv);
    } else {
        t->c = redisConnectWithTimeout(t->host, t->port, tv);
    }
    if (t->c == NULL || t->c->err
        || redisSetTimeout(t->c, tv) != REDIS_OK
        || tier_load_script(t) != 0)
    {
        tier_fail(t);
        return -1;
    }

    t->backoff_ms = TIER_BACKOFF_MIN_MS;
    pthread_mutex_lock(&t->mu);
    t->st.connected = 1;
    t->down_until_ns = 0;
    pthread_mutex_unlock(&t->mu);
    return 0;
}


/* key_prefix + hex of hash, NUL-terminated, into out[prefix_len + 65] */
static void
tier_key(llm_kv_tier *t, const uint8_t hash[32], char *out)
{
    memcpy(out, t->p.key_prefix, t->prefix_len);
    llm_sha256_hex(hash, out + t->prefix_len);
}


/* ---- the tier thread: lookups --------------------------------------- */

static void
tier_finish_lookup(llm_kv_tier *t, tier_lookup *l, tier_done *d)
{
    pthread_mutex_lock(&t->mu);
    if (t->d_tail != NULL) {
        t->d_tail->next = d;
    } else {
        t->d_head = d;
    }
    t->d_tail = d;
    pthread_mutex_unlock(&t->mu);

    llm_free(l);
    if (t->p.wake != NULL) {
        t->p.wake(t->p.wake_ud);
    }
}


/* The budget script's answer {evicted, total bytes}: 1 and the counts
 * added, or 0 if r is something else (an error). */
static int
tier_script_reply(const redisReply *r, uint64_t *evicted, long long *stored)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2
        || r->element[0]->type != REDIS_REPLY_INTEGER
        || r->element[1]->type != REDIS_REPLY_INTEGER)
    {
        return 0;
    }
    *evicted += (uint64_t) r->element[0]->integer;
    *stored = r->element[1]->integer;
    return 1;
}


/*
 * One pipelined round: GET of every key, then every reply in order.  The
 * leading run of valid records is copied out; replies after the first
 * missing or refused one are read (the pipeline must be drained) and left.
 */
static void
tier_do_lookup(llm_kv_tier *t, tier_lookup *l, tier_done *d)
{
    size_t       klen = t->prefix_len + TIER_KEY_HEX;
    size_t       pb = t->payload_bytes;
    char        *keys = NULL;       /* [n, klen + 1] */
    uint8_t     *out = NULL;        /* [cap, payload_bytes] */
    const uint8_t *payload;
    redisReply  *r;
    const char  *argv[2];
    size_t       argvlen[2];
    int          i, n = l->n, cap = 0, found = 0, broken = 0;
    int          refused = 0, err_replies = 0, sent = 0;
    uint8_t     *grown;

    if (tier_connect(t) != 0) {
        goto done;
    }

    keys = llm_malloc((size_t) n * (klen + 1));
    if (keys == NULL) {
        goto done;
    }
    argv[0] = "GET";
    argvlen[0] = 3;
    argvlen[1] = klen;
    for (i = 0; i < n; i++) {
        tier_key(t, l->hashes[i], keys + (size_t) i * (klen + 1));
        argv[1] = keys + (size_t) i * (klen + 1);
        if (redisAppendCommandArgv(t->c, 2, argv, argvlen) != REDIS_OK) {
            break;
        }
        sent++;
    }

    for (i = 0; i < sent; i++) {
        if (redisGetReply(t->c, (void **) &r) != REDIS_OK || r == NULL) {
            /* connection lost or timed out: keep the run so far */
            tier_fail(t);
            goto done;
        }
        if (!broken) {
            llm_err e;

            if (r->type == REDIS_REPLY_NIL) {
                broken = 1;
            } else if (r->type != REDIS_REPLY_STRING) {
                err_replies = 1;
                broken = 1;
            } else if (llm_kv_record_decode(&t->p, l->hashes[i],
                                            (const uint8_t *) r->str,
                                            r->len, &payload, &e) != 0)
            {
                refused = 1;
                broken = 1;
            } else {
                if (found == cap) {
                    cap = cap ? cap * 2 : (n < 8 ? n : 8);
                    if (cap > n) {
                        cap = n;
                    }
                    grown = llm_realloc(out, (size_t) cap * pb);
                    if (grown == NULL) {
                        broken = 1;
                        freeReplyObject(r);
                        continue;
                    }
                    out = grown;
                }
                memcpy(out + (size_t) found * pb, payload, pb);
                found++;
            }
        }
        freeReplyObject(r);
    }
    if (sent == n) {
        tier_set_connected(t, 1);
    } else {
        tier_fail(t);       /* an append failed: no memory for the buffer */
    }

done:
    llm_free(keys);
    if (found == 0) {
        llm_free(out);
        out = NULL;
    }
    d->r.tag = l->tag;
    d->r.n_found = found;
    d->r.payloads = out;

    pthread_mutex_lock(&t->mu);
    t->st.lookups++;
    t->st.blocks_hit += found;
    t->st.corrupt += refused;
    t->st.errors += err_replies;
    t->st.blocks_missed += n - found - refused - err_replies;
    pthread_mutex_unlock(&t->mu);

    tier_finish_lookup(t, l, d);
}


/* ---- the tier thread: writes ---------------------------------------- */

static void
tier_free_writes(tier_write *w)
{
    tier_write *next;

    for (; w != NULL; w = next) {
        next = w->next;
        llm_free(w->rec);
        llm_free(w);
    }
}


/* The argv of the budget script for one write: EVALSHA sha 4 keys...
 * value ttl budget (or EVAL script ... when use_eval). */
static int
tier_append_write(llm_kv_tier *t, tier_write *w, char *key, int use_eval)
{
    char        ttl[24], budget[24];
    const char *argv[10];
    size_t      argvlen[10];

    snprintf(ttl, sizeof(ttl), "%u", t->p.ttl_s);
    snprintf(budget, sizeof(budget), "%llu",
             (unsigned long long) t->p.budget_bytes);

    argv[0] = use_eval ? "EVAL" : "EVALSHA";
    argv[1] = use_eval ? tier_script : t->sha;
    argv[2] = "4";
    argv[3] = key;
    argv[4] = t->key_index;
    argv[5] = t->key_sizes;
    argv[6] = t->key_bytes;
    argv[7] = (const char *) w->rec;
    argv[8] = ttl;
    argv[9] = budget;
    argvlen[0] = strlen(argv[0]);
    argvlen[1] = strlen(argv[1]);
    argvlen[2] = 1;
    argvlen[3] = t->prefix_len + TIER_KEY_HEX;
    argvlen[4] = strlen(t->key_index);
    argvlen[5] = strlen(t->key_sizes);
    argvlen[6] = strlen(t->key_bytes);
    argvlen[7] = t->record_bytes;
    argvlen[8] = strlen(ttl);
    argvlen[9] = strlen(budget);

    return redisAppendCommandArgv(t->c, 10, argv, argvlen) == REDIS_OK
           ? 0 : -1;
}


/*
 * Writes a batch in one pipeline.  A NOSCRIPT reply (Redis restarted or
 * its script cache flushed) is retried with EVAL, which also caches the
 * script again.
 */
static void
tier_do_writes(llm_kv_tier *t, tier_write *batch, int n)
{
    size_t      klen = t->prefix_len + TIER_KEY_HEX;
    char       *keys = NULL;        /* [n, klen + 1] */
    uint8_t     retry[TIER_BATCH_MAX];
    tier_write *w;
    redisReply *r;
    int         i, sent = 0, ok = 0, errs = 0, n_retry = 0;
    uint64_t    evicted = 0;
    long long   stored = -1;

    if (tier_connect(t) != 0) {
        goto done;
    }
    keys = llm_malloc((size_t) n * (klen + 1));
    if (keys == NULL) {
        goto done;
    }

    for (w = batch, i = 0; w != NULL; w = w->next, i++) {
        tier_encode_header(&t->p, t->payload_bytes, w->hash, w->rec);
        tier_key(t, w->hash, keys + (size_t) i * (klen + 1));
        if (tier_append_write(t, w, keys + (size_t) i * (klen + 1),
                              t->sha[0] == '\0') != 0)
        {
            break;
        }
        sent++;
    }

    memset(retry, 0, sizeof(retry));
    for (i = 0; i < sent; i++) {
        if (redisGetReply(t->c, (void **) &r) != REDIS_OK || r == NULL) {
            tier_fail(t);
            goto done;
        }
        if (tier_script_reply(r, &evicted, &stored)) {
            ok++;
        } else if (r->type == REDIS_REPLY_ERROR
                   && strncmp(r->str, "NOSCRIPT", 8) == 0)
        {
            retry[i] = 1;
            n_retry++;
        } else {
            errs++;
        }
        freeReplyObject(r);
    }

    if (n_retry > 0) {
        t->sha[0] = '\0';
        for (w = batch, i = 0; w != NULL && i < sent; w = w->next, i++) {
            if (!retry[i]) {
                continue;
            }
            if (tier_append_write(t, w, keys + (size_t) i * (klen + 1), 1)
                != 0
                || redisGetReply(t->c, (void **) &r) != REDIS_OK
                || r == NULL)
            {
                tier_fail(t);
                goto done;
            }
            if (tier_script_reply(r, &evicted, &stored)) {
                ok++;
            } else {
                errs++;
            }
            freeReplyObject(r);
        }
        if (tier_load_script(t) != 0) {
            tier_fail(t);
            goto done;
        }
    }

    if (sent == n) {
        tier_set_connected(t, 1);
    } else {
        tier_fail(t);
    }

done:
    llm_free(keys);
    tier_free_writes(batch);

    pthread_mutex_lock(&t->mu);
    t->st.puts += ok;
    t->st.put_bytes += (uint64_t) ok * t->record_bytes;
    t->st.puts_dropped += n - ok;
    t->st.errors += errs;
    t->st.evicted += evicted;
    if (stored >= 0) {
        t->st.stored_bytes = (uint64_t) stored;
    }
    pthread_mutex_unlock(&t->mu);
}


/* ---- the tier thread: loop ------------------------------------------ */

/* Takes up to TIER_BATCH_MAX writes / TIER_BATCH_BYTES off the queue
 * (under mu).  Their bytes leave the queue budget now. */
static tier_write *
tier_take_writes(llm_kv_tier *t, int *n)
{
    tier_write *head = t->w_head, *w = head, *last = NULL;
    size_t      bytes = 0;
    int         k = 0;

    while (w != NULL && k < TIER_BATCH_MAX
           && (k == 0 || bytes + t->record_bytes <= TIER_BATCH_BYTES))
    {
        bytes += t->record_bytes;
        last = w;
        w = w->next;
        k++;
    }
    if (last != NULL) {
        last->next = NULL;
    }
    t->w_head = w;
    if (w == NULL) {
        t->w_tail = NULL;
    }
    t->w_bytes -= (size_t) k * t->payload_bytes;
    *n = k;
    return head;
}


static void *
tier_thread(void *arg)
{
    llm_kv_tier *t = arg;
    tier_lookup *l;
    tier_done   *d;
    tier_write  *batch;
    uint64_t     now, left;
    int          n, away;

    pthread_mutex_lock(&t->mu);
    for (;;) {
        while (!t->stop && t->l_head == NULL && t->w_head == NULL) {
            pthread_cond_wait(&t->cv, &t->mu);
        }

        now = llm_now_ns();
        away = t->c == NULL && now < t->next_connect_ns;

        if (t->stop) {
            /* nobody polls any more: lookups are dropped; writes get
             * until the deadline, and only on a live connection */
            while ((l = t->l_head) != NULL) {
                t->l_head = l->next;
                llm_free(l);
            }
            t->l_tail = NULL;
            if (t->w_head == NULL || away || now >= t->stop_deadline_ns) {
                break;
            }
            left = (t->stop_deadline_ns - now) / 1000000u;
            batch = tier_take_writes(t, &n);
            pthread_mutex_unlock(&t->mu);

            if (t->c != NULL) {
                redisSetTimeout(t->c, tier_tv(left > 0 ? (uint32_t) left
                                                       : 1));
            }
            tier_do_writes(t, batch, n);

            pthread_mutex_lock(&t->mu);
            continue;
        }

        if ((l = t->l_head) != NULL) {
            t->l_head = l->next;
            if (t->l_head == NULL) {
                t->l_tail = NULL;
            }
            pthread_mutex_unlock(&t->mu);

            /* allocated here so that a finished lookup always has a
             * result to post; without memory it is dropped (the owner
             * never hears of it, as if Redis never answered) */
            d = llm_calloc(1, sizeof(*d));
            if (d == NULL) {
                llm_free(l);
            } else if (away) {
                d->r.tag = l->tag;
                pthread_mutex_lock(&t->mu);
                t->st.lookups++;
                t->st.blocks_missed += l->n;
                pthread_mutex_unlock(&t->mu);
                tier_finish_lookup(t, l, d);
            } else {
                tier_do_lookup(t, l, d);
            }

            pthread_mutex_lock(&t->mu);
            continue;
        }

        batch = tier_take_writes(t, &n);
        pthread_mutex_unlock(&t->mu);
        if (away) {
            tier_free_writes(batch);
            pthread_mutex_lock(&t->mu);
            t->st.puts_dropped += n;
            pthread_mutex_unlock(&t->mu);
        } else {
            tier_do_writes(t, batch, n);
        }
        pthread_mutex_lock(&t->mu);
    }
    pthread_mutex_unlock(&t->mu);

    if (t->c != NULL) {
        redisFree(t->c);
        t->c = NULL;
    }
    return NULL;
}


/* ---- public API ----------------------------------------------------- */

/* "host:port", "[v6]:port", "host" (port 6379) or "unix:/path" */
static int
tier_parse_addr(llm_kv_tier *t, const char *addr, llm_err *err)
{
    const char *colon, *h = addr, *hend;
    char       *end;
    long        port = 6379;

    if (strncmp(addr, "unix:", 5) == 0) {
        if (addr[5] == '\0') {
            return llm_err_set(err, LLM_EINVAL,
                               "kv tier: empty unix socket path in \"%s\"",
                               addr);
        }
        t->path = llm_strdup(addr + 5);
        return t->path ? 0 : llm_err_set(err, LLM_ENOMEM, "kv tier: no "
                                         "memory");
    }

    if (addr[0] == '[') {
        h = addr + 1;
        hend = strchr(h, ']');
        if (hend == NULL) {
            goto bad;
        }
        colon = hend[1] == ':' ? hend + 1 : NULL;
        if (hend[1] != '\0' && colon == NULL) {
            goto bad;
        }
    } else {
        colon = strrchr(addr, ':');
        hend = colon ? colon : addr + strlen(addr);
    }
    if (hend == h) {
        goto bad;
    }
    if (colon != NULL) {
        errno = 0;
        port = strtol(colon + 1, &end, 10);
        if (errno || end == colon + 1 || *end != '\0' || port <= 0
            || port > 65535)
        {
            goto bad;
        }
    }

    t->host = llm_malloc((size_t) (hend - h) + 1);
    if (t->host == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "kv tier: no memory");
    }
    memcpy(t->host, h, (size_t) (hend - h));
    t->host[hend - h] = '\0';
    t->port = (int) port;
    return 0;

bad:
    return llm_err_set(err, LLM_EINVAL,
                       "kv tier: bad Redis address \"%s\" (host:port or "
                       "unix:/path)", addr);
}


static char *
tier_concat(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char  *s = llm_malloc(la + lb + 1);

    if (s != NULL) {
        memcpy(s, a, la);
        memcpy(s + la, b, lb + 1);
    }
    return s;
}


static void
tier_release(llm_kv_tier *t)
{
    tier_lookup *l, *ln;
    tier_done   *d, *dn;

    if (t->c != NULL) {
        redisFree(t->c);
    }
    tier_free_writes(t->w_head);
    for (l = t->l_head; l != NULL; l = ln) {
        ln = l->next;
        llm_free(l);
    }
    for (d = t->d_head; d != NULL; d = dn) {
        dn = d->next;
        llm_free(d->r.payloads);
        llm_free(d);
    }
    llm_free((char *) t->p.addr);
    llm_free((char *) t->p.key_prefix);
    llm_free(t->key_index);
    llm_free(t->key_sizes);
    llm_free(t->key_bytes);
    llm_free(t->host);
    llm_free(t->path);
    llm_free(t);
}


llm_kv_tier *
llm_kv_tier_new(const llm_kv_tier_params *p, llm_err *err)
{
    llm_kv_tier *t;
    sigset_t     all, old;
    int          rc;

    if (p == NULL || p->addr == NULL || p->addr[0] == '\0') {
        llm_err_set(err, LLM_EINVAL, "kv tier: no Redis address");
        return NULL;
    }
    if (!llm_kv_type_ok(p->dtype, p->head_dim)) {
        llm_err_set(err, LLM_EINVAL, "kv tier: dtype %d with head_dim %d "
                    "is not a KV page type (F16, F32, or Q8_0 with a "
                    "head_dim multiple of 32)", p->dtype, p->head_dim);
        return NULL;
    }
    if (p->block_size <= 0 || p->block_size > 65535 || p->n_layers <= 0
        || p->n_layers > 65535 || p->n_kv_heads <= 0
        || p->n_kv_heads > 65535 || p->head_dim <= 0
        || p->head_dim > 65535)
    {
        llm_err_set(err, LLM_EINVAL, "kv tier: shape block %d layers %d "
                    "kv_heads %d head_dim %d out of range (1..65535)",
                    p->block_size, p->n_layers, p->n_kv_heads,
                    p->head_dim);
        return NULL;
    }
    if (llm_kv_tier_payload_bytes(p) > UINT32_MAX) {
        llm_err_set(err, LLM_EINVAL, "kv tier: a block of %zu bytes does "
                    "not fit a record", llm_kv_tier_payload_bytes(p));
        return NULL;
    }

    t = llm_calloc(1, sizeof(*t));
    if (t == NULL) {
        llm_err_set(err, LLM_ENOMEM, "kv tier: no memory");
        return NULL;
    }
    t->p = *p;
    t->p.addr = NULL;
    t->p.key_prefix = NULL;
    if (t->p.ttl_s == 0) {
        t->p.ttl_s = 3600;
    }
    if (t->p.budget_bytes == 0) {
        t->p.budget_bytes = 1ull << 30;
    }
    if (t->p.timeout_ms == 0) {
        t->p.timeout_ms = 200;
    }
    if (t->p.queue_bytes == 0) {
        t->p.queue_bytes = 64u << 20;
    }
    t->payload_bytes = llm_kv_tier_payload_bytes(p);
    t->record_bytes = REC_HEADER + t->payload_bytes;
    t->backoff_ms = TIER_BACKOFF_MIN_MS;

    if (tier_parse_addr(t, p->addr, err) != 0) {
        tier_release(t);
        return NULL;
    }
    t->p.addr = llm_strdup(p->addr);
    t->p.key_prefix = llm_strdup(p->key_prefix ? p->key_prefix
                                               : "llm:kv:");
    if (t->p.addr == NULL || t->p.key_prefix == NULL) {
        goto nomem;
    }
    t->prefix_len = strlen(t->p.key_prefix);
    t->key_index = tier_concat(t->p.key_prefix, "index");
    t->key_sizes = tier_concat(t->p.key_prefix, "sizes");
    t->key_bytes = tier_concat(t->p.key_prefix, "bytes");
    if (t->key_index == NULL || t->key_sizes == NULL
        || t->key_bytes == NULL)
    {
        goto nomem;
    }

    if (pthread_mutex_init(&t->mu, NULL) != 0) {
        goto nomem;
    }
    if (pthread_cond_init(&t->cv, NULL) != 0) {
        pthread_mutex_destroy(&t->mu);
        goto nomem;
    }

    /* the thread takes no signals: they belong to the owner's threads,
     * and SIGPIPE from a dead socket must not kill the process */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&t->thread, NULL, tier_thread, t);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        pthread_cond_destroy(&t->cv);
        pthread_mutex_destroy(&t->mu);
        llm_err_set(err, LLM_ENOMEM, "kv tier: cannot start thread: %s",
                    strerror(rc));
        tier_release(t);
        return NULL;
    }
    t->thread_started = 1;
    return t;

nomem:
    llm_err_set(err, LLM_ENOMEM, "kv tier: no memory");
    tier_release(t);
    return NULL;
}


void
llm_kv_tier_free(llm_kv_tier *t)
{
    if (t == NULL) {
        return;
    }
    if (t->thread_started) {
        pthread_mutex_lock(&t->mu);
        t->stop = 1;
        t->stop_deadline_ns = llm_now_ns()
                              + (uint64_t) t->p.timeout_ms * 1000000u;
        pthread_cond_signal(&t->cv);
        pthread_mutex_unlock(&t->mu);
        pthread_join(t->thread, NULL);
        pthread_cond_destroy(&t->cv);
        pthread_mutex_destroy(&t->mu);
    }
    tier_release(t);
}


int
llm_kv_tier_put(llm_kv_tier *t, const uint8_t hash[32], const void *payload)
{
    tier_write *w;
    int         drop;

    /* Redis known to be away: drop before paying for the copy */
    pthread_mutex_lock(&t->mu);
    drop = t->down_until_ns != 0 && llm_now_ns() < t->down_until_ns;
    if (drop) {
        t->st.puts_dropped++;
    }
    pthread_mutex_unlock(&t->mu);
    if (drop) {
        return 0;
    }

    /* the copy is made outside the lock: the tier thread never waits
     * for it */
    w = llm_malloc(sizeof(*w));
    if (w == NULL) {
        return LLM_ENOMEM;
    }
    w->rec = llm_malloc(t->record_bytes);
    if (w->rec == NULL) {
        llm_free(w);
        return LLM_ENOMEM;
    }
    w->next = NULL;
    memcpy(w->hash, hash, 32);
    memcpy(w->rec + REC_HEADER, payload, t->payload_bytes);

    pthread_mutex_lock(&t->mu);
    if (t->stop || t->w_bytes + t->payload_bytes > t->p.queue_bytes) {
        t->st.puts_dropped++;
        pthread_mutex_unlock(&t->mu);
        llm_free(w->rec);
        llm_free(w);
        return LLM_EFULL;
    }
    if (t->w_tail != NULL) {
        t->w_tail->next = w;
    } else {
        t->w_head = w;
    }
    t->w_tail = w;
    t->w_bytes += t->payload_bytes;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
    return 0;
}


int
llm_kv_tier_lookup(llm_kv_tier *t, uint64_t tag,
                   const uint8_t (*hashes)[32], int n)
{
    tier_lookup *l;

    if (n < 1 || n > LLM_KV_TIER_MAX_LOOKUP || hashes == NULL) {
        return LLM_EINVAL;
    }
    l = llm_malloc(sizeof(*l) + (size_t) n * 32);
    if (l == NULL) {
        return LLM_ENOMEM;
    }
    l->next = NULL;
    l->tag = tag;
    l->n = n;
    memcpy(l->hashes, hashes, (size_t) n * 32);

    pthread_mutex_lock(&t->mu);
    if (t->stop) {
        pthread_mutex_unlock(&t->mu);
        llm_free(l);
        return LLM_ESTATE;
    }
    if (t->l_tail != NULL) {
        t->l_tail->next = l;
    } else {
        t->l_head = l;
    }
    t->l_tail = l;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
    return 0;
}


int
llm_kv_tier_poll(llm_kv_tier *t, llm_kv_tier_result *r)
{
    tier_done *d;

    pthread_mutex_lock(&t->mu);
    d = t->d_head;
    if (d != NULL) {
        t->d_head = d->next;
        if (t->d_head == NULL) {
            t->d_tail = NULL;
        }
    }
    pthread_mutex_unlock(&t->mu);

    if (d == NULL) {
        return 0;
    }
    *r = d->r;
    llm_free(d);
    return 1;
}


void
llm_kv_tier_result_free(llm_kv_tier_result *r)
{
    if (r != NULL) {
        llm_free(r->payloads);
        r->payloads = NULL;
        r->n_found = 0;
    }
}


void
llm_kv_tier_get_stats(llm_kv_tier *t, llm_kv_tier_stats *s)
{
    pthread_mutex_lock(&t->mu);
    *s = t->st;
    pthread_mutex_unlock(&t->mu);
}
