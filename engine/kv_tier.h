/*
 * The Redis tier of the prefix cache: full KV blocks serialized into Redis
 * so that a restarted engine, or another engine with the same model, can
 * skip the prefill of a prefix it has never computed itself.
 *
 * A thread of its own talks to Redis (hiredis, blocking calls with
 * timeouts); the engine thread only queues writes and lookups and collects
 * finished lookups, so a slow or absent Redis never stalls the batch loop:
 * a lookup that fails or times out finds nothing and the engine computes.
 *
 * One Redis string per block, key = key_prefix + 64 hex digits of the
 * block's chain hash (prefix_cache.h), value = record:
 *   "LLMKV" (5 bytes), u8 format version (1), u8 dtype (llm_dtype),
 *   u8 reserved (0), u8[32] model fingerprint, u8[32] chain hash (the
 *   key's own: a value copied under another key is refused),
 *   u16 block_size, u16 n_layers, u16 n_kv_heads, u16 head_dim,
 *   u32 payload_bytes, u64 checksum of the payload, payload
 * (little-endian).  Header and data travel in one value, so eviction can
 * never separate them.  The payload is the block of every layer:
 *   [n_layers, 2 (K then V), block_size, n_kv_heads, head_dim] of dtype,
 * as the backend's kv_block_to_host op writes it.
 *
 * Byte budget: every write goes through one Lua script that also keeps an
 * index of the prefix's keys (sorted by expiry) with their sizes and a
 * byte total; expired keys leave the total, and the oldest keys are
 * deleted while the total is over budget.  TTL on every key.
 */
#ifndef LLM_KV_TIER_H
#define LLM_KV_TIER_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

#define LLM_KV_TIER_MAX_LOOKUP  4096    /* blocks per lookup */
#define LLM_KV_RECORD_VERSION   1

typedef struct llm_kv_tier llm_kv_tier;

typedef struct llm_kv_tier_params {
    const char *addr;           /* "host:port" or "unix:/path/to.sock" */
    const char *key_prefix;     /* NULL: "llm:kv:" */
    uint32_t    ttl_s;          /* 0: 3600 */
    uint64_t    budget_bytes;   /* record bytes under key_prefix; 0: 1 GiB */
    uint32_t    timeout_ms;     /* connect / command timeout; 0: 200 */
    size_t      queue_bytes;    /* payload bytes of writes waiting; more
                                   are dropped and counted; 0: 64 MiB */

    /* what every record must match */
    uint8_t     fingerprint[32];
    int         dtype;          /* LLM_F16, LLM_F32 or LLM_Q8_0 */
    int         block_size;
    int         n_layers;
    int         n_kv_heads;
    int         head_dim;

    /* called from the tier thread when a lookup has finished (may be
     * NULL): the owner's loop wakes up and calls llm_kv_tier_poll */
    void      (*wake)(void *ud);
    void       *wake_ud;
} llm_kv_tier_params;

/* Payload bytes of one block for p. */
size_t llm_kv_tier_payload_bytes(const llm_kv_tier_params *p);

/* Starts the tier thread.  Does not need Redis to be up: the thread
 * connects on demand and retries with a back-off, lookups meanwhile find
 * nothing.  NULL with err on bad parameters or no memory. */
llm_kv_tier *llm_kv_tier_new(const llm_kv_tier_params *p, llm_err *err);
/* Stops the thread (writes still queued get at most timeout_ms), frees
 * everything including unpolled results. */
void         llm_kv_tier_free(llm_kv_tier *t);

/* Queues a write of one block (payload copied, payload_bytes).  0, or
 * LLM_EFULL when the queue is over its budget (dropped, counted). */
int  llm_kv_tier_put(llm_kv_tier *t, const uint8_t hash[32],
                     const void *payload);

/* Starts a lookup of the chain hashes[0 .. n) (consecutive blocks of one
 * prompt, 1 <= n <= LLM_KV_TIER_MAX_LOOKUP), pipelined in one round
 * trip.  The result comes back through poll, with tag. */
int  llm_kv_tier_lookup(llm_kv_tier *t, uint64_t tag,
                        const uint8_t (*hashes)[32], int n);

typedef struct llm_kv_tier_result {
    uint64_t    tag;
    int         n_found;        /* leading blocks present and valid: the
                                   first missing or refused one ends it */
    uint8_t    *payloads;       /* [n_found, payload_bytes] */
} llm_kv_tier_result;

/* A finished lookup: 1 (r filled; release with result_free), 0 if none. */
int  llm_kv_tier_poll(llm_kv_tier *t, llm_kv_tier_result *r);
void llm_kv_tier_result_free(llm_kv_tier_result *r);

typedef struct llm_kv_tier_stats {
    int         connected;      /* the last command reached Redis */
    uint64_t    puts;           /* blocks written */
    uint64_t    put_bytes;      /* record bytes written */
    uint64_t    puts_dropped;   /* queue over budget, or Redis away */
    uint64_t    lookups;
    uint64_t    blocks_hit;     /* valid records returned */
    uint64_t    blocks_missed;  /* asked for, absent (or after the first
                                   absent or refused one of a lookup) */
    uint64_t    corrupt;        /* records refused (checksum, model,
                                   format, size, hash) */
    uint64_t    errors;         /* connection errors, timeouts, Redis
                                   error replies */
    uint64_t    evicted;        /* keys the budget script deleted */
    uint64_t    stored_bytes;   /* record bytes under the prefix in
                                   Redis, as the last write saw it */
} llm_kv_tier_stats;

void llm_kv_tier_get_stats(llm_kv_tier *t, llm_kv_tier_stats *s);

/* ---- record codec (also used by tests) ---------------------------- */

size_t llm_kv_record_size(const llm_kv_tier_params *p);
/* Writes the record of (hash, payload) into out[llm_kv_record_size]. */
void   llm_kv_record_encode(const llm_kv_tier_params *p,
                            const uint8_t hash[32], const void *payload,
                            uint8_t *out);
/* Checks a record read under hash: 0 and *payload pointing into rec, or
 * LLM_EFORMAT with err saying why (truncated, bad magic, other format
 * version, other model, other shape or dtype, other hash, checksum). */
int    llm_kv_record_decode(const llm_kv_tier_params *p,
                            const uint8_t hash[32], const uint8_t *rec,
                            size_t len, const uint8_t **payload,
                            llm_err *err);

#endif /* LLM_KV_TIER_H */
