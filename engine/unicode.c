/*
 * Unicode helpers (see unicode.h).
 */
#include "unicode.h"


unsigned
llm_unicode_flags(uint32_t cp)
{
    size_t lo, hi, mid;

    if (cp < 128) {
        return llm_unicode_ascii[cp];
    }
    if (cp >= LLM_UNICODE_MAX) {
        return LLM_U_UNDEF;
    }

    /* last range whose start <= cp; ranges[0].start == 0 */
    lo = 0;
    hi = llm_unicode_n_ranges;
    while (hi - lo > 1) {
        mid = lo + (hi - lo) / 2;
        if (llm_unicode_ranges[mid].start <= cp) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return llm_unicode_ranges[lo].flags;
}


uint32_t
llm_unicode_tolower(uint32_t cp)
{
    size_t lo, hi, mid;

    if (cp < 128) {
        return (cp >= 'A' && cp <= 'Z') ? cp + 32 : cp;
    }
    lo = 0;
    hi = llm_unicode_n_lower;
    while (lo < hi) {
        mid = lo + (hi - lo) / 2;
        if (llm_unicode_lower[mid].from < cp) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo < llm_unicode_n_lower && llm_unicode_lower[lo].from == cp) {
        return llm_unicode_lower[lo].to;
    }
    return cp;
}


uint32_t
llm_utf8_decode_lenient(const char *str, size_t len, size_t *i)
{
    const uint8_t *s = (const uint8_t *) str + *i;
    size_t         left = len - *i;
    uint32_t       cp;
    size_t         n, k;

    if (s[0] < 0x80) {
        *i += 1;
        return s[0];
    }
    if ((s[0] & 0x40) == 0) {
        n = 0;                              /* stray continuation byte */
    } else if ((s[0] & 0x20) == 0) {
        n = 2;
        cp = s[0] & 0x1f;
    } else if ((s[0] & 0x10) == 0) {
        n = 3;
        cp = s[0] & 0x0f;
    } else if ((s[0] & 0x08) == 0) {
        n = 4;
        cp = s[0] & 0x07;
    } else {
        n = 0;                              /* 0xF8..0xFF */
    }
    if (n == 0 || n > left) {
        *i += 1;
        return LLM_UNICODE_REPL;
    }
    for (k = 1; k < n; k++) {
        if ((s[k] & 0xc0) != 0x80) {
            *i += 1;
            return LLM_UNICODE_REPL;
        }
        cp = (cp << 6) | (s[k] & 0x3f);
    }
    *i += n;
    return cp < LLM_UNICODE_MAX ? cp : LLM_UNICODE_REPL;
}


int
llm_utf8_decode_strict(const char *str, size_t len, uint32_t *out)
{
    const uint8_t *s = (const uint8_t *) str;
    uint32_t       cp, min;
    size_t         n, k;

    if (len == 0) {
        return 0;
    }
    if (s[0] < 0x80) {
        *out = s[0];
        return 1;
    }
    if (s[0] >= 0xc2 && s[0] <= 0xdf) {
        n = 2;
        cp = s[0] & 0x1f;
        min = 0x80;
    } else if (s[0] >= 0xe0 && s[0] <= 0xef) {
        n = 3;
        cp = s[0] & 0x0f;
        min = 0x800;
    } else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
        n = 4;
        cp = s[0] & 0x07;
        min = 0x10000;
    } else {
        return -1;
    }
    for (k = 1; k < n; k++) {
        if (k >= len) {
            return 0;
        }
        if ((s[k] & 0xc0) != 0x80) {
            return -(int) k;            /* s[0..k) is the bad subpart */
        }
        cp = (cp << 6) | (s[k] & 0x3f);

        /* reject overlong forms, surrogates and > U+10FFFF as early as
         * the second byte allows, so a held tail is never hopeless */
        if (k == 1) {
            if ((s[0] == 0xe0 && s[1] < 0xa0)
                || (s[0] == 0xed && s[1] >= 0xa0)
                || (s[0] == 0xf0 && s[1] < 0x90)
                || (s[0] == 0xf4 && s[1] >= 0x90))
            {
                return -1;
            }
        }
    }
    if (cp < min) {
        return -1;
    }
    *out = cp;
    return (int) n;
}


int
llm_utf8_encode(uint32_t cp, char *out)
{
    uint8_t *o = (uint8_t *) out;

    if (cp < 0x80) {
        o[0] = (uint8_t) cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (uint8_t) (0xc0 | (cp >> 6));
        o[1] = (uint8_t) (0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (uint8_t) (0xe0 | (cp >> 12));
        o[1] = (uint8_t) (0x80 | ((cp >> 6) & 0x3f));
        o[2] = (uint8_t) (0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (uint8_t) (0xf0 | (cp >> 18));
    o[1] = (uint8_t) (0x80 | ((cp >> 12) & 0x3f));
    o[2] = (uint8_t) (0x80 | ((cp >> 6) & 0x3f));
    o[3] = (uint8_t) (0x80 | (cp & 0x3f));
    return 4;
}
