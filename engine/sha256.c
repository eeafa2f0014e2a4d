/*
 * SHA-256 as specified in FIPS 180-4, section 6.2: 64-byte blocks, eight
 * 32-bit working variables, 64 rounds with the K constants (fractional
 * parts of the cube roots of the first 64 primes).  Where the CPU has the
 * x86 SHA extensions the blocks go through them (sha256rnds2 does two
 * rounds, sha256msg1/msg2 the message schedule): about 5x the portable
 * code, which matters for the model fingerprint and adapter versions
 * (every byte of the weights is hashed at load).
 */
#include "sha256.h"

#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif


static const uint32_t sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
    0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
    0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2
};


#define ROTR(x, n)  (((x) >> (n)) | ((x) << (32 - (n))))


static void
sha256_block_portable(uint32_t h[8], const uint8_t *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, hh, t1, t2;
    int      i;

    for (i = 0; i < 16; i++) {
        w[i] = (uint32_t) p[4 * i] << 24 | (uint32_t) p[4 * i + 1] << 16
               | (uint32_t) p[4 * i + 2] << 8 | (uint32_t) p[4 * i + 3];
    }
    for (i = 16; i < 64; i++) {
        uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18)
                      ^ (w[i - 15] >> 3);
        uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19)
                      ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }

    a = h[0]; b = h[1]; c = h[2]; d = h[3];
    e = h[4]; f = h[5]; g = h[6]; hh = h[7];

    for (i = 0; i < 64; i++) {
        t1 = hh + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25))
             + ((e & f) ^ (~e & g)) + sha256_k[i] + w[i];
        t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22))
             + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1;
        d = c; c = b; b = a; a = t1 + t2;
    }

    h[0] += a; h[1] += b; h[2] += c; h[3] += d;
    h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}


#if defined(__x86_64__)

/*
 * The same block with the SHA extensions.  The state lives in two
 * registers as the instructions want it, ABEF and CDGH (lane 3 first);
 * each group of four rounds adds K to four message words, runs two rounds
 * on the low pair and two on the high pair, swapping the registers' roles
 * (after two rounds the old A, B, E, F are the new C, D, G, H).  Words 16
 * on: msg1 gives W[t-16] + s0(W[t-15]), plus W[t-7], then msg2 adds
 * s1(W[t-2]).
 */
__attribute__((target("sha,sse4.1,ssse3")))
static void
sha256_block_shani(uint32_t h[8], const uint8_t *p)
{
    const __m128i be = _mm_set_epi64x(0x0c0d0e0f08090a0bll,
                                      0x0405060700010203ll);
    __m128i       abef, cdgh, t, abef0, cdgh0, m[4], w, k;
    int           g;

    t = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *) h), 0xb1);
    cdgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *) (h + 4)),
                             0x1b);
    abef = _mm_alignr_epi8(t, cdgh, 8);             /* F E B A */
    cdgh = _mm_blend_epi16(cdgh, t, 0xf0);          /* H G D C */
    abef0 = abef;
    cdgh0 = cdgh;

    for (g = 0; g < 4; g++) {
        m[g] = _mm_shuffle_epi8(_mm_loadu_si128(
                   (const __m128i *) (p + 16 * g)), be);
    }
    for (g = 0; g < 16; g++) {
        if (g < 4) {
            w = m[g];
        } else {
            w = _mm_sha256msg1_epu32(m[0], m[1]);
            w = _mm_add_epi32(w, _mm_alignr_epi8(m[3], m[2], 4));
            w = _mm_sha256msg2_epu32(w, m[3]);
            m[0] = m[1];
            m[1] = m[2];
            m[2] = m[3];
            m[3] = w;
        }
        k = _mm_add_epi32(w, _mm_loadu_si128(
                (const __m128i *) (sha256_k + 4 * g)));
        cdgh = _mm_sha256rnds2_epu32(cdgh, abef, k);
        abef = _mm_sha256rnds2_epu32(abef, cdgh,
                                     _mm_shuffle_epi32(k, 0x0e));
    }

    abef = _mm_add_epi32(abef, abef0);
    cdgh = _mm_add_epi32(cdgh, cdgh0);
    t = _mm_shuffle_epi32(abef, 0x1b);              /* A B E F */
    cdgh = _mm_shuffle_epi32(cdgh, 0xb1);           /* G H C D */
    _mm_storeu_si128((__m128i *) h, _mm_blend_epi16(t, cdgh, 0xf0));
    _mm_storeu_si128((__m128i *) (h + 4), _mm_alignr_epi8(cdgh, t, 8));
}


static int
cpu_has_sha(void)
{
    unsigned a, b, c, d;

    __builtin_cpu_init();
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29))
           && __builtin_cpu_supports("sse4.1")
           && __builtin_cpu_supports("ssse3");
}

#endif


static void (*sha256_block_fn)(uint32_t h[8], const uint8_t *p);


int
llm_sha256_use_extensions(int on)
{
#if defined(__x86_64__)
    if (on && cpu_has_sha()) {
        sha256_block_fn = sha256_block_shani;
        return 1;
    }
#endif
    (void) on;
    sha256_block_fn = sha256_block_portable;
    return 0;
}


static void
sha256_block(uint32_t h[8], const uint8_t *p)
{
    if (sha256_block_fn == NULL) {
        /* a race here only picks the same function twice */
        llm_sha256_use_extensions(1);
    }
    sha256_block_fn(h, p);
}


void
llm_sha256_init(llm_sha256_ctx *s)
{
    static const uint32_t iv[8] = {
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
    };

    memcpy(s->h, iv, sizeof(iv));
    s->len = 0;
    s->n = 0;
}


void
llm_sha256_update(llm_sha256_ctx *s, const void *data, size_t n)
{
    const uint8_t *p = data;
    size_t         take;

    s->len += n;
    if (s->n > 0) {
        take = 64 - s->n < n ? 64 - s->n : n;
        memcpy(s->buf + s->n, p, take);
        s->n += take;
        p += take;
        n -= take;
        if (s->n < 64) {
            return;
        }
        sha256_block(s->h, s->buf);
        s->n = 0;
    }
    while (n >= 64) {
        sha256_block(s->h, p);
        p += 64;
        n -= 64;
    }
    if (n > 0) {
        memcpy(s->buf, p, n);
        s->n = n;
    }
}


void
llm_sha256_final(llm_sha256_ctx *s, uint8_t out[LLM_SHA256_LEN])
{
    uint64_t bits = s->len * 8;
    int      i;

    /* padding: 0x80, zeros up to 56 mod 64, then the bit length (BE) */
    s->buf[s->n++] = 0x80;
    if (s->n > 56) {
        memset(s->buf + s->n, 0, 64 - s->n);
        sha256_block(s->h, s->buf);
        s->n = 0;
    }
    memset(s->buf + s->n, 0, 56 - s->n);
    for (i = 0; i < 8; i++) {
        s->buf[56 + i] = (uint8_t) (bits >> (56 - 8 * i));
    }
    sha256_block(s->h, s->buf);

    for (i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t) (s->h[i] >> 24);
        out[4 * i + 1] = (uint8_t) (s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t) (s->h[i] >> 8);
        out[4 * i + 3] = (uint8_t) s->h[i];
    }
}


void
llm_sha256(const void *data, size_t n, uint8_t out[LLM_SHA256_LEN])
{
    llm_sha256_ctx s;

    llm_sha256_init(&s);
    llm_sha256_update(&s, data, n);
    llm_sha256_final(&s, out);
}


char *
llm_sha256_hex(const uint8_t d[LLM_SHA256_LEN], char out[65])
{
    static const char hex[] = "0123456789abcdef";
    int               i;

    for (i = 0; i < LLM_SHA256_LEN; i++) {
        out[2 * i] = hex[d[i] >> 4];
        out[2 * i + 1] = hex[d[i] & 15];
    }
    out[64] = '\0';
    return out;
}
