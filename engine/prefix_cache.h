/*
 * Content addresses of full KV blocks, for the prefix cache (kv_cache.h
 * keeps the blocks, kv_tier.h the Redis copies).
 *
 * Block j of a sequence is named by a hash chain:
 *   h_j = SHA-256("ngx_llm kv block", u32 1 (format),
 *                 bytes fingerprint, bytes adapter version,
 *                 bytes namespace, bytes parent,
 *                 u32 n, i32[n] token ids)
 * where every "bytes" field is u32 length + data (so no two tuples hash
 * the same byte string), parent is h_{j-1} (empty for j = 0) and the
 * fingerprint names the model weights, the KV dtype and the block size.
 * The chain makes a block's name depend on every token before it, the
 * adapter (its content version: a reloaded adapter never reuses the old
 * one's blocks) and the cache namespace (set by the server per tenant:
 * one tenant cannot reach another's private blocks).
 */
#ifndef LLM_PREFIX_CACHE_H
#define LLM_PREFIX_CACHE_H

#include <stddef.h>
#include <stdint.h>

#define LLM_PREFIX_HASH_LEN 32

/* The fingerprint every block of one engine is hashed with. */
void llm_prefix_fingerprint(const uint8_t model_fp[32], int kv_type,
                            int block_size, uint8_t out[32]);

/* h of one block.  adapter_version: 32 bytes, or NULL for the base model;
 * parent: the previous block's hash, or NULL for the first block. */
void llm_prefix_block_hash(const uint8_t fp[32],
                           const uint8_t *adapter_version,
                           const char *ns, const uint8_t *parent,
                           const int32_t *tokens, int n, uint8_t out[32]);

#endif /* LLM_PREFIX_CACHE_H */
