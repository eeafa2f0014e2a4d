/*
 * Little-endian integers in byte buffers, for the wire protocol and the
 * prefix cache's Redis records (any host byte order, any alignment).
 */
#ifndef LLM_BYTEORDER_H
#define LLM_BYTEORDER_H

#include <stdint.h>

static inline void
llm_put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t) v;
    p[1] = (uint8_t) (v >> 8);
}


static inline void
llm_put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t) v;
    p[1] = (uint8_t) (v >> 8);
    p[2] = (uint8_t) (v >> 16);
    p[3] = (uint8_t) (v >> 24);
}


static inline void
llm_put_le64(uint8_t *p, uint64_t v)
{
    llm_put_le32(p, (uint32_t) v);
    llm_put_le32(p + 4, (uint32_t) (v >> 32));
}


static inline uint16_t
llm_get_le16(const uint8_t *p)
{
    return (uint16_t) (p[0] | p[1] << 8);
}


static inline uint32_t
llm_get_le32(const uint8_t *p)
{
    return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16
           | (uint32_t) p[3] << 24;
}


/* gcc folds this into one (unaligned) load on little-endian machines */
static inline uint64_t
llm_get_le64(const uint8_t *p)
{
    return (uint64_t) llm_get_le32(p) | (uint64_t) llm_get_le32(p + 4) << 32;
}

#endif /* LLM_BYTEORDER_H */
