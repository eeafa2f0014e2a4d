/*
 * SHA-256 (FIPS 180-4), streaming.  Used for model fingerprints and for
 * content-addressed cache keys.
 */
#ifndef LLM_SHA256_H
#define LLM_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define LLM_SHA256_LEN  32

typedef struct llm_sha256 {
    uint32_t    h[8];
    uint64_t    len;        /* bytes hashed so far */
    uint8_t     buf[64];    /* pending partial block */
    size_t      n;          /* bytes in buf */
} llm_sha256_ctx;

void llm_sha256_init(llm_sha256_ctx *s);
void llm_sha256_update(llm_sha256_ctx *s, const void *data, size_t n);
void llm_sha256_final(llm_sha256_ctx *s, uint8_t out[LLM_SHA256_LEN]);

/* One-shot digest of data. */
void llm_sha256(const void *data, size_t n, uint8_t out[LLM_SHA256_LEN]);

/* 1: the blocks go through the x86 SHA extensions (the default where the
 * CPU has them); 0: the portable code (asked for, or no extensions).  For
 * tests and benchmarks; every digest is the same either way. */
int llm_sha256_use_extensions(int on);

/* Lower-case hex of a digest: writes 64 characters and a NUL. */
char *llm_sha256_hex(const uint8_t d[LLM_SHA256_LEN], char out[65]);

#endif /* LLM_SHA256_H */
