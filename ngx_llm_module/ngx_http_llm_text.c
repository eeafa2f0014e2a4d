
/*
 * The text of one completion on its way out: stop strings and the
 * token records that logprobs report.
 *
 * Detokenized text is added token by token.  Text that could be the
 * beginning of a stop string is held back until the following tokens
 * show it is not; when a stop string appears the text is cut exactly
 * before it and nothing from the stop string on is ever released.
 * Token records (id, logprob, top alternatives, where the token's text
 * lies in the output) are released with the text they produced; those
 * whose text starts at or after a stop string are dropped.
 */


#include "ngx_http_llm_module.h"


static ngx_int_t ngx_http_llm_text_reserve(ngx_http_llm_text_t *t,
    size_t n);
static void ngx_http_llm_text_compact(ngx_http_llm_text_t *t);
static ngx_int_t ngx_http_llm_text_find_stop(ngx_http_llm_text_t *t,
    size_t from, size_t *pos);
static size_t ngx_http_llm_text_partial(ngx_http_llm_text_t *t);


ngx_int_t
ngx_http_llm_text_init(ngx_http_llm_text_t *t, ngx_pool_t *pool,
    ngx_str_t *stops, ngx_uint_t n_stops, ngx_uint_t logprobs)
{
    ngx_uint_t  i;

    ngx_memzero(t, sizeof(ngx_http_llm_text_t));

    t->pool = pool;
    t->stops = stops;
    t->n_stops = n_stops;

    for (i = 0; i < n_stops; i++) {
        if (stops[i].len > t->max_stop) {
            t->max_stop = stops[i].len;
        }
    }

    if (logprobs) {
        if (ngx_array_init(&t->tokens, pool, 16,
                           sizeof(ngx_http_llm_token_t))
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * Appends the text of one token (len may be 0: an incomplete UTF-8
 * sequence is held by the detokenizer) and, with logprobs, its record.
 * After a stop string was found everything added is ignored.
 */

ngx_int_t
ngx_http_llm_text_add(ngx_http_llm_text_t *t, u_char *data, size_t len,
    ngx_http_llm_token_t *tok)
{
    size_t                 from, pos;
    ngx_uint_t             i;
    ngx_http_llm_token_t  *tp;

    if (t->stopped) {
        return NGX_OK;
    }

    ngx_http_llm_text_compact(t);

    if (tok && t->tokens.elts) {
        tp = ngx_array_push(&t->tokens);
        if (tp == NULL) {
            return NGX_ERROR;
        }

        *tp = *tok;
        tp->start = t->offset + t->len;
        tp->end = tp->start + len;
    }

    if (len == 0) {
        return NGX_OK;
    }

    if (ngx_http_llm_text_reserve(t, len) != NGX_OK) {
        return NGX_ERROR;
    }

    /* a stop string not found before must end in the new text */

    from = t->len > t->max_stop ? t->len - t->max_stop + 1 : 0;

    ngx_memcpy(t->hold + t->len, data, len);
    t->len += len;

    if (t->n_stops == 0
        || ngx_http_llm_text_find_stop(t, from, &pos) != NGX_OK)
    {
        return NGX_OK;
    }

    t->len = pos;
    t->stopped = 1;

    /* drop the records of tokens whose text begins at the stop string */

    if (t->tokens.elts) {
        tp = t->tokens.elts;

        for (i = t->tok_head; i < t->tokens.nelts; i++) {
            if (tp[i].start >= t->offset + pos) {
                break;
            }
        }

        t->tokens.nelts = i;
    }

    return NGX_OK;
}


/*
 * What may go out now: out points at the text (valid until the next
 * add or release), toks at the records released with it.  last: the
 * completion ended, release everything held.
 */

void
ngx_http_llm_text_release(ngx_http_llm_text_t *t, ngx_uint_t last,
    ngx_str_t *out, ngx_http_llm_token_t **toks, ngx_uint_t *ntoks)
{
    size_t                 n, end;
    ngx_uint_t             i;
    ngx_http_llm_token_t  *tp;

    ngx_http_llm_text_compact(t);

    if (last || t->stopped) {
        n = t->len;

    } else {
        n = t->len - ngx_http_llm_text_partial(t);
    }

    out->data = t->hold;
    out->len = n;
    t->consumed = n;

    end = t->offset + n;

    *toks = NULL;
    *ntoks = 0;

    if (t->tokens.elts == NULL) {
        return;
    }

    tp = t->tokens.elts;

    for (i = t->tok_head; i < t->tokens.nelts; i++) {
        if (!(last || t->stopped) && tp[i].start >= end) {
            break;
        }
    }

    *toks = &tp[t->tok_head];
    *ntoks = i - t->tok_head;
    t->tok_consumed = *ntoks;
}


static void
ngx_http_llm_text_compact(ngx_http_llm_text_t *t)
{
    if (t->consumed) {
        ngx_memmove(t->hold, t->hold + t->consumed, t->len - t->consumed);
        t->len -= t->consumed;
        t->offset += t->consumed;
        t->consumed = 0;
    }

    if (t->tok_consumed) {
        t->tok_head += t->tok_consumed;
        t->tok_consumed = 0;

        if (t->tok_head == t->tokens.nelts) {
            t->tok_head = 0;
            t->tokens.nelts = 0;
        }
    }
}


static ngx_int_t
ngx_http_llm_text_reserve(ngx_http_llm_text_t *t, size_t n)
{
    size_t   size;
    u_char  *p;

    if (t->len + n <= t->size) {
        return NGX_OK;
    }

    size = ngx_max(t->size * 2, t->len + n);
    size = ngx_max(size, 256);

    p = ngx_pnalloc(t->pool, size);
    if (p == NULL) {
        return NGX_ERROR;
    }

    if (t->len) {
        ngx_memcpy(p, t->hold, t->len);
    }

    if (t->hold) {
        ngx_pfree(t->pool, t->hold);
    }

    t->hold = p;
    t->size = size;

    return NGX_OK;
}


/* The earliest stop string occurrence starting at or after from. */

static ngx_int_t
ngx_http_llm_text_find_stop(ngx_http_llm_text_t *t, size_t from,
    size_t *pos)
{
    u_char      *p, *best;
    ngx_str_t   *s;
    ngx_uint_t   i;

    best = NULL;

    for (i = 0; i < t->n_stops; i++) {
        s = &t->stops[i];

        if (s->len == 0 || s->len > t->len - from) {
            continue;
        }

        p = memmem(t->hold + from, t->len - from, s->data, s->len);

        if (p && (best == NULL || p < best)) {
            best = p;
        }
    }

    if (best == NULL) {
        return NGX_DECLINED;
    }

    *pos = best - t->hold;

    return NGX_OK;
}


/* The longest tail of the held text that begins some stop string. */

static size_t
ngx_http_llm_text_partial(ngx_http_llm_text_t *t)
{
    size_t       k, best;
    ngx_str_t   *s;
    ngx_uint_t   i;

    best = 0;

    for (i = 0; i < t->n_stops; i++) {
        s = &t->stops[i];

        for (k = ngx_min(s->len - 1, t->len); k > best; k--) {
            if (ngx_memcmp(t->hold + t->len - k, s->data, k) == 0) {
                best = k;
                break;
            }
        }
    }

    return best;
}
