/*
 * Prefix cache block names (see prefix_cache.h).
 */
#include "prefix_cache.h"

#include <string.h>

#include "byteorder.h"
#include "sha256.h"


static void
put_u32(llm_sha256_ctx *h, uint32_t v)
{
    uint8_t b[4];

    llm_put_le32(b, v);
    llm_sha256_update(h, b, 4);
}


static void
put_bytes(llm_sha256_ctx *h, const void *p, size_t n)
{
    put_u32(h, (uint32_t) n);
    if (n > 0) {
        llm_sha256_update(h, p, n);
    }
}


void
llm_prefix_fingerprint(const uint8_t model_fp[32], int kv_type,
                       int block_size, uint8_t out[32])
{
    llm_sha256_ctx h;

    llm_sha256_init(&h);
    put_bytes(&h, "ngx_llm kv fingerprint", 22);
    put_bytes(&h, model_fp, 32);
    put_u32(&h, (uint32_t) kv_type);
    put_u32(&h, (uint32_t) block_size);
    llm_sha256_final(&h, out);
}


void
llm_prefix_block_hash(const uint8_t fp[32], const uint8_t *adapter_version,
                      const char *ns, const uint8_t *parent,
                      const int32_t *tokens, int n, uint8_t out[32])
{
    llm_sha256_ctx h;
    uint8_t        buf[256];
    int            i, k;

    llm_sha256_init(&h);
    put_bytes(&h, "ngx_llm kv block", 16);
    put_u32(&h, 1);
    put_bytes(&h, fp, 32);
    put_bytes(&h, adapter_version, adapter_version != NULL ? 32 : 0);
    put_bytes(&h, ns != NULL ? ns : "", ns != NULL ? strlen(ns) : 0);
    put_bytes(&h, parent, parent != NULL ? 32 : 0);
    put_u32(&h, (uint32_t) n);
    /* token ids little-endian, a buffer at a time */
    for (i = 0; i < n; ) {
        for (k = 0; k + 4 <= (int) sizeof(buf) && i < n; i++, k += 4) {
            llm_put_le32(buf + k, (uint32_t) tokens[i]);
        }
        llm_sha256_update(&h, buf, (size_t) k);
    }
    llm_sha256_final(&h, out);
}
