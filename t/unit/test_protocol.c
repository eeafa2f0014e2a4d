/*
 * The engine wire protocol: every message round-trips, malformed frames
 * are rejected without reading past them, and the streaming parser gives
 * the same frames whatever the split points.
 */
#include <stdlib.h>
#include <string.h>

#include "../../engine/protocol.h"
#include "test.h"


/* Wraps the single frame at b->data as a parsed frame. */
static int
frame_of(const llm_proto_buf *b, llm_proto_frame *f)
{
    llm_proto_header h;

    if (llm_proto_decode_header(b->data, b->len, &h, NULL) != 0) {
        return -1;
    }
    if (b->len != LLM_PROTO_HEADER_SIZE + h.length) {
        return -1;
    }
    f->version = h.version;
    f->type = h.type;
    f->req_id = h.req_id;
    f->length = h.length;
    f->payload = b->data + LLM_PROTO_HEADER_SIZE;
    return 0;
}


/* Decodes a copy of the payload cut to len bytes in an exact-size heap
 * block, so that a read past it is caught by ASan/valgrind too. */
typedef int (*decode_fn)(const llm_proto_frame *f, void *out, llm_err *e);

static int
decode_cut(const llm_proto_buf *b, size_t len, decode_fn fn, void *out)
{
    llm_proto_frame f;
    uint8_t        *copy;
    llm_err         err;
    int             rc;

    if (frame_of(b, &f) != 0) {
        return -100;
    }
    copy = malloc(len ? len : 1);
    memcpy(copy, f.payload, len);
    f.payload = copy;
    f.length = (uint32_t) len;
    rc = fn(&f, out, &err);
    free(copy);
    return rc;
}


static int
dec_hello(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_hello(f, o, e);
}


static int
dec_hello_ok(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_hello_ok(f, o, e);
}


static int
dec_submit(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_submit(f, o, e);
}


static int
dec_tokens(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_tokens(f, o, e);
}


static int
dec_done(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_done(f, o, e);
}


static int
dec_error(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_error(f, o, e);
}


static int
dec_stats(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_stats(f, o, e);
}


/* Every proper prefix of the payload and one extra byte must fail. */
static int
all_cuts_rejected(const llm_proto_buf *b, decode_fn fn, void *out)
{
    size_t          len = b->len - LLM_PROTO_HEADER_SIZE, i;
    llm_proto_buf   x;
    llm_proto_frame f;
    int             bad = 0;

    for (i = 0; i < len; i++) {
        if (decode_cut(b, i, fn, out) != LLM_EFORMAT) {
            bad++;
        }
    }
    /* One trailing byte. */
    llm_proto_buf_init(&x);
    frame_of(b, &f);
    llm_proto_encode_raw(&x, f.version, f.type, f.req_id, NULL, 0);
    x.len = 0;
    {
        uint8_t *tmp = malloc(len + 1);

        memcpy(tmp, f.payload, len);
        tmp[len] = 0;
        llm_proto_encode_raw(&x, f.version, f.type, f.req_id, tmp, len + 1);
        free(tmp);
    }
    if (decode_cut(&x, len + 1, fn, out) != LLM_EFORMAT) {
        bad++;
    }
    llm_proto_buf_free(&x);
    return bad == 0;
}


static void
build_submit(llm_proto_buf *b, uint32_t req, int n_prompt, int n_stop)
{
    llm_proto_submit s;
    int32_t          prompt[64], stop[8];
    int              i;

    for (i = 0; i < n_prompt; i++) {
        prompt[i] = 1000 + i * 7;
    }
    for (i = 0; i < n_stop; i++) {
        stop[i] = 2 + i;
    }
    llm_proto_submit_default(&s);
    s.max_tokens = 77;
    s.temperature = 0.7f;
    s.top_k = 40;
    s.top_p = 0.9f;
    s.min_p = 0.05f;
    s.repetition_penalty = 1.1f;
    s.frequency_penalty = 0.25f;
    s.presence_penalty = -0.5f;
    s.seed = 0x0123456789abcdefULL;
    s.flags = LLM_SUBMIT_HAS_SEED | LLM_SUBMIT_LOGPROBS;
    s.top_logprobs = 5;
    s.priority = 2;
    s.weight = 300;
    s.queue_timeout_ms = 1500;
    strcpy(s.tenant, "acme");
    strcpy(s.adapter, "acme-support-v2");
    strcpy(s.cache_namespace, "shared");
    strcpy(s.cache_shared_namespace, "pub");
    s.cache_shared_tokens = 32;
    s.n_stop = n_stop;
    s.stop_ids = stop;
    s.n_prompt = n_prompt;
    s.prompt = prompt;
    llm_proto_encode_submit(b, req, &s);
}


TEST_SUITE(protocol_roundtrip)
{
    llm_proto_buf      b;
    llm_proto_frame    f;
    llm_err            err;
    int                i, ok;

    llm_proto_buf_init(&b);

    test("header layout: magic bytes LLMP, little-endian fields");
    llm_proto_encode_empty(&b, LLM_MSG_PING, 0x01020304);
    test_cond(b.len == LLM_PROTO_HEADER_SIZE);
    test_cond(memcmp(b.data, "LLMP", 4) == 0);
    test_cond(b.data[4] == LLM_PROTO_VERSION && b.data[5] == 0);
    test_cond(b.data[6] == LLM_MSG_PING && b.data[7] == 0);
    test_cond(b.data[8] == 0 && b.data[11] == 0);
    test_cond(b.data[12] == 4 && b.data[15] == 1);
    test_cond(frame_of(&b, &f) == 0 && f.req_id == 0x01020304);
    test_cond(llm_proto_decode_empty(&f, &err) == 0);

    test("HELLO round-trips and is always header version 1");
    {
        llm_proto_hello h = { 0 }, d;

        b.len = 0;
        llm_proto_buf_set_version(&b, 7);
        h.min_version = 1;
        h.max_version = 3;
        strcpy(h.client_name, "ngx_llm/1.0 worker 12");
        test_cond(llm_proto_encode_hello(&b, &h) == 0);
        llm_proto_buf_set_version(&b, 0);
        test_cond(frame_of(&b, &f) == 0);
        test_cond(f.version == 1 && f.type == LLM_MSG_HELLO && f.req_id == 0);
        test_cond(llm_proto_decode_hello(&f, &d, &err) == 0);
        test_cond(d.min_version == 1 && d.max_version == 3);
        test_cond(strcmp(d.client_name, h.client_name) == 0);
        test_cond(llm_proto_negotiate(&d) == LLM_PROTO_VERSION);
        test_cond(all_cuts_rejected(&b, dec_hello, &d));
        d.min_version = LLM_PROTO_VERSION + 1;
        d.max_version = LLM_PROTO_VERSION + 2;
        test_cond(llm_proto_negotiate(&d) == -1);
    }

    test("HELLO_OK round-trips");
    {
        llm_proto_hello_ok h, d;

        memset(&h, 0, sizeof(h));
        b.len = 0;
        h.version = 1;
        h.n_ctx = 8192;
        h.n_vocab = 49152;
        h.block_size = 16;
        h.max_seqs = 64;
        h.kv_blocks_total = 1234;
        h.bos_id = 1;
        h.eos_id = 2;
        for (i = 0; i < 32; i++) {
            h.fingerprint[i] = (uint8_t) (i * 11);
        }
        strcpy(h.model_name, "SmolLM2-135M-Instruct");
        strcpy(h.arch, "llama");
        strcpy(h.server_name, "llm-engine 0.1");
        h.n_eog = 2;
        h.eog_ids[0] = 2;
        h.eog_ids[1] = -5;
        test_cond(llm_proto_encode_hello_ok(&b, &h) == 0);
        test_cond(frame_of(&b, &f) == 0);
        test_cond(llm_proto_decode_hello_ok(&f, &d, &err) == 0);
        test_cond(memcmp(&h, &d, sizeof(h)) == 0);
        test_cond(all_cuts_rejected(&b, dec_hello_ok, &d));
        h.n_eog = LLM_PROTO_MAX_EOG_IDS + 1;
        test_cond(llm_proto_encode_hello_ok(&b, &h) == LLM_EINVAL);
    }

    test("SUBMIT round-trips every field, prompt and stop ids");
    {
        llm_proto_submit d;
        int32_t          ids[64];

        b.len = 0;
        build_submit(&b, 42, 50, 3);
        test_cond(frame_of(&b, &f) == 0 && f.req_id == 42);
        test_cond(llm_proto_decode_submit(&f, &d, &err) == 0);
        test_cond(d.max_tokens == 77 && d.temperature == 0.7f);
        test_cond(d.top_k == 40 && d.top_p == 0.9f && d.min_p == 0.05f);
        test_cond(d.repetition_penalty == 1.1f);
        test_cond(d.frequency_penalty == 0.25f);
        test_cond(d.presence_penalty == -0.5f);
        test_cond(d.seed == 0x0123456789abcdefULL);
        test_cond(d.flags == (LLM_SUBMIT_HAS_SEED | LLM_SUBMIT_LOGPROBS));
        test_cond(d.top_logprobs == 5 && d.priority == 2);
        test_cond(d.weight == 300 && d.queue_timeout_ms == 1500);
        test_cond(strcmp(d.tenant, "acme") == 0);
        test_cond(strcmp(d.adapter, "acme-support-v2") == 0);
        test_cond(strcmp(d.cache_namespace, "shared") == 0);
        test_cond(d.n_stop == 3 && llm_proto_id_at(d.stop_ids, 2) == 4);
        test_cond(d.n_prompt == 50);
        llm_proto_copy_ids(d.prompt, d.n_prompt, ids);
        ok = 1;
        for (i = 0; i < 50; i++) {
            ok &= ids[i] == 1000 + i * 7;
        }
        test_cond(ok);
        test_cond(strcmp(d.cache_shared_namespace, "pub") == 0);
        test_cond(d.cache_shared_tokens == 32);
        /* every cut is refused but the one at the end of the prompt (a
         * module from before the prefix cache): no shared part */
        ok = 1;
        for (i = 0; i < (int) f.length; i++) {
            int rc = decode_cut(&b, (size_t) i, dec_submit, &d);

            if (i == (int) f.length - (2 + 3) - 4) {
                ok &= rc == 0 && d.cache_shared_namespace[0] == '\0'
                      && d.cache_shared_tokens == 0 && d.n_prompt == 50;
            } else {
                ok &= rc == LLM_EFORMAT;
            }
        }
        test_cond(ok);
    }

    test("SUBMIT with an empty prompt and no strings round-trips");
    {
        llm_proto_submit s, d;

        b.len = 0;
        llm_proto_submit_default(&s);
        test_cond(llm_proto_encode_submit(&b, 1, &s) == 0);
        test_cond(frame_of(&b, &f) == 0);
        test_cond(llm_proto_decode_submit(&f, &d, &err) == 0);
        test_cond(d.n_prompt == 0 && d.n_stop == 0 && d.tenant[0] == 0);
        test_cond(d.max_tokens == 16 && d.top_p == 1.0f);
    }

    test("SUBMIT encoder refuses over-long fields");
    {
        llm_proto_submit s;
        size_t           before;

        llm_proto_submit_default(&s);
        memset(s.tenant, 'x', LLM_PROTO_MAX_TENANT);
        s.tenant[LLM_PROTO_MAX_TENANT] = '\0';
        before = b.len;
        test_cond(llm_proto_encode_submit(&b, 1, &s) == 0);
        s.tenant[0] = '\0';
        s.n_stop = LLM_PROTO_MAX_STOP_IDS + 1;
        test_cond(llm_proto_encode_submit(&b, 1, &s) == LLM_EINVAL);
        test_cond(b.len > before);
    }

    test("TOKENS round-trips, with and without logprobs");
    {
        llm_proto_token  t[3], o;
        llm_proto_tokens d;
        int              j;

        memset(t, 0, sizeof(t));
        for (i = 0; i < 3; i++) {
            t[i].id = 100 + i;
            t[i].logprob = -0.5f * i;
            t[i].n_top = i * 3;
            for (j = 0; j < t[i].n_top; j++) {
                t[i].top_ids[j] = 7 * j + i;
                t[i].top_logprobs[j] = -1.0f * j;
            }
        }
        b.len = 0;
        test_cond(llm_proto_encode_tokens(&b, 9, LLM_TOKENS_LOGPROBS, t, 3)
                  == 0);
        test_cond(frame_of(&b, &f) == 0 && f.req_id == 9);
        test_cond(llm_proto_decode_tokens(&f, &d, &err) == 0);
        test_cond(d.n_tokens == 3 && d.flags == LLM_TOKENS_LOGPROBS);
        ok = 1;
        for (i = 0; i < 3; i++) {
            ok &= llm_proto_tokens_next(&d, &o) == 1;
            ok &= o.id == t[i].id && o.logprob == t[i].logprob;
            ok &= o.n_top == t[i].n_top;
            for (j = 0; j < o.n_top; j++) {
                ok &= o.top_ids[j] == t[i].top_ids[j];
                ok &= o.top_logprobs[j] == t[i].top_logprobs[j];
            }
        }
        test_cond(ok);
        test_cond(llm_proto_tokens_next(&d, &o) == 0);
        test_cond(all_cuts_rejected(&b, dec_tokens, &d));

        b.len = 0;
        test_cond(llm_proto_encode_tokens(&b, 9, 0, t, 2) == 0);
        test_cond(b.len == LLM_PROTO_HEADER_SIZE + 4 + 8);
        test_cond(frame_of(&b, &f) == 0);
        test_cond(llm_proto_decode_tokens(&f, &d, &err) == 0);
        test_cond(llm_proto_tokens_next(&d, &o) == 1 && o.id == 100);
        test_cond(llm_proto_tokens_next(&d, &o) == 1 && o.id == 101);
        test_cond(llm_proto_tokens_next(&d, &o) == 0);
        test_cond(llm_proto_encode_tokens(&b, 9, 0, t, 0) == LLM_EINVAL);
        t[0].n_top = LLM_PROTO_MAX_TOP + 1;
        test_cond(llm_proto_encode_tokens(&b, 9, LLM_TOKENS_LOGPROBS, t, 1)
                  == LLM_EINVAL);
    }

    test("DONE round-trips");
    {
        llm_proto_done m, d;

        memset(&m, 0, sizeof(m));
        m.finish = LLM_PFINISH_LENGTH;
        m.prompt_tokens = 31;
        m.completion_tokens = 64;
        m.cached_tokens = 16;
        m.queue_ms = 3;
        m.ttft_ms = 40;
        m.total_ms = 900;
        m.preemptions = 1;
        strcpy(m.message, "");
        b.len = 0;
        test_cond(llm_proto_encode_done(&b, 5, &m) == 0);
        test_cond(frame_of(&b, &f) == 0);
        test_cond(llm_proto_decode_done(&f, &d, &err) == 0);
        test_cond(memcmp(&m, &d, sizeof(m)) == 0);
        test_cond(all_cuts_rejected(&b, dec_done, &d));
        m.finish = 9;
        b.len = 0;
        llm_proto_encode_done(&b, 5, &m);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_done(&f, &d, &err) == LLM_EFORMAT);
    }

    test("ERROR round-trips; long messages are cut, not refused");
    {
        llm_proto_error d;
        char            big[3000];

        b.len = 0;
        test_cond(llm_proto_encode_error(&b, 3, LLM_PERR_CONTEXT,
                                         "prompt too long") == 0);
        test_cond(frame_of(&b, &f) == 0 && f.req_id == 3);
        test_cond(llm_proto_decode_error(&f, &d, &err) == 0);
        test_cond(d.code == LLM_PERR_CONTEXT);
        test_cond(strcmp(d.message, "prompt too long") == 0);
        test_cond(all_cuts_rejected(&b, dec_error, &d));
        memset(big, 'e', sizeof(big) - 1);
        big[sizeof(big) - 1] = '\0';
        b.len = 0;
        test_cond(llm_proto_encode_error(&b, 0, LLM_PERR_INTERNAL, big) == 0);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_error(&f, &d, &err) == 0);
        test_cond(strlen(d.message) == LLM_PROTO_MAX_MESSAGE);
    }

    test("STATS round-trips");
    {
        llm_proto_stats m, d;

        memset(&m, 0, sizeof(m));
        m.waiting = 1;
        m.running = 2;
        m.kv_blocks_total = 3;
        m.kv_blocks_used = 4;
        m.block_size = 16;
        m.connections = 6;
        m.max_seqs = 7;
        m.last_batch_tokens = 8;
        m.last_batch_seqs = 9;
        m.draining = 1;
        m.steps = 1ULL << 40;
        m.tokens_prefilled = 11;
        m.tokens_generated = 12;
        m.preemptions = 13;
        m.requests_total = 14;
        m.requests_rejected = 15;
        m.uptime_ms = 16;
        m.has_adapters = 1;
        m.adapters_registered = 17;
        m.adapters_loaded = 18;
        m.adapters_resident = 19;
        m.adapter_host_bytes = 20ULL << 32;
        m.adapter_device_bytes = 21;
        m.adapter_loads = 22;
        m.adapter_uploads = 23;
        m.adapter_host_evictions = 24;
        m.adapter_device_evictions = 25;
        m.has_prefix_cache = 1;
        m.prefix_blocks_cached = 26;
        m.prefix_blocks_reusable = 27;
        m.prefix_lookups = 28;
        m.prefix_hit_tokens = 29ULL << 33;
        m.prefix_tier_hit_tokens = 30;
        m.prefix_evictions = 31;
        m.tier_connected = 1;
        m.tier_enabled = 1;
        m.tier_puts = 32;
        m.tier_put_bytes = 33;
        m.tier_puts_dropped = 34;
        m.tier_lookups = 35;
        m.tier_blocks_hit = 36;
        m.tier_blocks_missed = 37;
        m.tier_corrupt = 38;
        m.tier_errors = 39;
        m.prefix_bytes_cached = 40ULL << 34;
        m.tier_stored_bytes = 41;
        b.len = 0;
        test_cond(llm_proto_encode_stats(&b, 77, &m) == 0);
        test_cond(frame_of(&b, &f) == 0 && f.req_id == 77);
        test_cond(llm_proto_decode_stats(&f, &d, &err) == 0);
        test_cond(memcmp(&m, &d, sizeof(m)) == 0);

        /* every cut is refused but the one at the end of the first part
         * (an engine from before adapters): adapter fields read as 0 */
        ok = 1;
        for (i = 0; i < (int) f.length; i++) {
            int rc = decode_cut(&b, (size_t) i, dec_stats, &d);

            if (i == 10 * 4 + 7 * 8) {
                ok &= rc == 0 && d.has_adapters == 0 && d.uptime_ms == 16
                      && d.adapters_registered == 0;
            } else if (i == 10 * 4 + 7 * 8 + 4 * 4 + 6 * 8) {
                /* an engine from before the prefix cache */
                ok &= rc == 0 && d.has_adapters == 1
                      && d.has_prefix_cache == 0
                      && d.adapter_device_evictions == 25
                      && d.prefix_hit_tokens == 0;
            } else {
                ok &= rc == LLM_EFORMAT;
            }
        }
        test_cond(ok);
        {
            uint8_t *tmp = malloc(f.length + 1);
            llm_proto_buf x;

            memcpy(tmp, f.payload, f.length);
            tmp[f.length] = 0;
            llm_proto_buf_init(&x);
            llm_proto_encode_raw(&x, 0, LLM_MSG_STATS, 77, tmp,
                                 f.length + 1);
            test_cond(decode_cut(&x, f.length + 1, dec_stats, &d)
                      == LLM_EFORMAT);
            llm_proto_buf_free(&x);
            free(tmp);
        }
    }

    test("empty messages: CANCEL, STATS_REQ, PING, PONG");
    {
        int types[4] = { LLM_MSG_CANCEL, LLM_MSG_STATS_REQ, LLM_MSG_PING,
                         LLM_MSG_PONG };

        ok = 1;
        for (i = 0; i < 4; i++) {
            b.len = 0;
            ok &= llm_proto_encode_empty(&b, types[i], 11) == 0;
            ok &= frame_of(&b, &f) == 0 && f.type == types[i];
            ok &= llm_proto_decode_empty(&f, &err) == 0;
        }
        test_cond(ok);
        b.len = 0;
        llm_proto_encode_raw(&b, 0, LLM_MSG_CANCEL, 1, "x", 1);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_empty(&f, &err) == LLM_EFORMAT);
    }

    test("decoders refuse a frame of another type");
    b.len = 0;
    llm_proto_encode_empty(&b, LLM_MSG_PING, 1);
    frame_of(&b, &f);
    {
        llm_proto_submit d;

        test_cond(llm_proto_decode_submit(&f, &d, &err) == LLM_EFORMAT);
        test_cond(strstr(err.msg, "SUBMIT") != NULL);
    }

    llm_proto_buf_free(&b);
}


TEST_SUITE(protocol_malformed)
{
    llm_proto_buf   b;
    llm_proto_frame f;
    llm_proto_header h;
    llm_err         err;
    uint8_t         raw[64];

    llm_proto_buf_init(&b);

    test("header: bad magic, version, type and length are rejected");
    llm_proto_encode_empty(&b, LLM_MSG_PING, 1);
    memcpy(raw, b.data, 16);
    test_cond(llm_proto_decode_header(raw, 16, &h, &err) == 0);
    test_cond(llm_proto_decode_header(raw, 15, &h, &err) == LLM_EFORMAT);
    raw[0] = 'G';
    test_cond(llm_proto_decode_header(raw, 16, &h, &err) == LLM_EFORMAT);
    test_cond(strstr(err.msg, "magic") != NULL);
    memcpy(raw, b.data, 16);
    raw[4] = LLM_PROTO_VERSION + 1;
    test_cond(llm_proto_decode_header(raw, 16, &h, &err) == LLM_EFORMAT);
    test_cond(strstr(err.msg, "version") != NULL);
    raw[4] = 0;
    test_cond(llm_proto_decode_header(raw, 16, &h, &err) == LLM_EFORMAT);
    memcpy(raw, b.data, 16);
    raw[6] = 0;
    test_cond(llm_proto_decode_header(raw, 16, &h, &err) == LLM_EFORMAT);
    raw[6] = 200;
    test_cond(llm_proto_decode_header(raw, 16, &h, &err) == LLM_EFORMAT);
    memcpy(raw, b.data, 16);
    raw[8] = 0x01;      /* 4 MiB + 1 */
    raw[10] = 0x40;
    test_cond(llm_proto_decode_header(raw, 16, &h, &err) == LLM_EFORMAT);
    raw[8] = 0xff;
    raw[9] = 0xff;
    raw[10] = 0xff;
    raw[11] = 0xff;
    test_cond(llm_proto_decode_header(raw, 16, &h, &err) == LLM_EFORMAT);
    test_cond(strstr(err.msg, "limit") != NULL);

    test("SUBMIT: counts pointing past the payload are rejected");
    {
        llm_proto_submit d;
        size_t           off;

        b.len = 0;
        build_submit(&b, 1, 4, 1);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_submit(&f, &d, &err) == 0);
        /* n_prompt is the 4 bytes before the 16 prompt bytes, then the
         * shared namespace "pub" (2 + 3) and its token count (4). */
        off = b.len - 9 - 16 - 4;
        b.data[off] = 5;
        test_cond(llm_proto_decode_submit(&f, &d, &err) == LLM_EFORMAT);
        test_cond(d.prompt == NULL && d.n_prompt == 0);
        b.data[off] = 0xff;
        b.data[off + 3] = 0xff;
        test_cond(llm_proto_decode_submit(&f, &d, &err) == LLM_EFORMAT);
        b.data[off] = 3;
        b.data[off + 3] = 0;
        /* one prompt id too few: its bytes then fail as the shared part */
        test_cond(llm_proto_decode_submit(&f, &d, &err) == LLM_EFORMAT);
        b.data[off] = 4;
        /* n_stop (u16) is before the 4 stop bytes and n_prompt. */
        off = b.len - 9 - 16 - 4 - 4 - 2;
        test_cond(b.data[off] == 1);
        b.data[off] = 2;
        test_cond(llm_proto_decode_submit(&f, &d, &err) == LLM_EFORMAT);
        b.data[off] = 0xff;
        b.data[off + 1] = 0xff;
        test_cond(llm_proto_decode_submit(&f, &d, &err) == LLM_EFORMAT);
        b.data[off] = 1;
        b.data[off + 1] = 0;
        test_cond(llm_proto_decode_submit(&f, &d, &err) == 0);
    }

    test("SUBMIT: string length past the end, or NUL inside, rejected");
    {
        llm_proto_submit d;
        size_t           off = 4 + 7 * 4 + 8 + 2 + 1 + 1 + 2 + 2 + 4;
        uint8_t         *p;

        b.len = 0;
        build_submit(&b, 1, 4, 1);
        frame_of(&b, &f);
        p = b.data + LLM_PROTO_HEADER_SIZE + off;
        test_cond(p[0] == 4 && memcmp(p + 2, "acme", 4) == 0);
        p[0] = 0xff;
        p[1] = 0xff;
        test_cond(llm_proto_decode_submit(&f, &d, &err) == LLM_EFORMAT);
        test_cond(strstr(err.msg, "tenant") != NULL);
        p[0] = 4;
        p[1] = 0;
        p[3] = '\0';
        test_cond(llm_proto_decode_submit(&f, &d, &err) == LLM_EFORMAT);
        p[3] = 'c';
        test_cond(llm_proto_decode_submit(&f, &d, &err) == 0);
        /* Unknown flag bits. */
        p = b.data + LLM_PROTO_HEADER_SIZE + 4 + 7 * 4 + 8;
        p[1] = 0x80;
        test_cond(llm_proto_decode_submit(&f, &d, &err) == LLM_EFORMAT);
    }

    test("TOKENS: n_top beyond the limit or past the end rejected");
    {
        llm_proto_token  t;
        llm_proto_tokens d;

        memset(&t, 0, sizeof(t));
        t.id = 5;
        t.n_top = 1;
        b.len = 0;
        llm_proto_encode_tokens(&b, 1, LLM_TOKENS_LOGPROBS, &t, 1);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_tokens(&f, &d, &err) == 0);
        /* payload: u16 n, u8 flags, u8 0, i32 id, f32 lp, u8 n_top */
        b.data[LLM_PROTO_HEADER_SIZE + 12] = 2;
        test_cond(llm_proto_decode_tokens(&f, &d, &err) == LLM_EFORMAT);
        b.data[LLM_PROTO_HEADER_SIZE + 12] = LLM_PROTO_MAX_TOP + 1;
        test_cond(llm_proto_decode_tokens(&f, &d, &err) == LLM_EFORMAT);
        b.data[LLM_PROTO_HEADER_SIZE + 12] = 1;
        b.data[LLM_PROTO_HEADER_SIZE] = 2;      /* n_tokens 2 */
        test_cond(llm_proto_decode_tokens(&f, &d, &err) == LLM_EFORMAT);
        b.data[LLM_PROTO_HEADER_SIZE] = 0;      /* n_tokens 0 */
        test_cond(llm_proto_decode_tokens(&f, &d, &err) == LLM_EFORMAT);
        b.data[LLM_PROTO_HEADER_SIZE] = 1;
        b.data[LLM_PROTO_HEADER_SIZE + 2] = 0x10;   /* unknown flag */
        test_cond(llm_proto_decode_tokens(&f, &d, &err) == LLM_EFORMAT);
        test_cond(llm_proto_tokens_next(&d, &t) == 0);
    }

    test("HELLO: min_version > max_version, oversize name rejected");
    {
        llm_proto_hello h = { 0 }, d;

        h.min_version = 2;
        h.max_version = 1;
        b.len = 0;
        llm_proto_encode_hello(&b, &h);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_hello(&f, &d, &err) == LLM_EFORMAT);
        memset(h.client_name, 'n', LLM_PROTO_MAX_NAME);
        h.client_name[LLM_PROTO_MAX_NAME] = '\0';
        h.min_version = 1;
        b.len = 0;
        test_cond(llm_proto_encode_hello(&b, &h) == 0);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_hello(&f, &d, &err) == 0);
        /* Patch the name length to 65 and add a byte. */
        {
            uint8_t pl[128];
            size_t  n = b.len - LLM_PROTO_HEADER_SIZE;

            memcpy(pl, b.data + LLM_PROTO_HEADER_SIZE, n);
            pl[8] = LLM_PROTO_MAX_NAME + 1;
            pl[n] = 'n';
            b.len = 0;
            llm_proto_encode_raw(&b, 1, LLM_MSG_HELLO, 0, pl, n + 1);
            frame_of(&b, &f);
            test_cond(llm_proto_decode_hello(&f, &d, &err) == LLM_EFORMAT);
        }
    }

    test("fixed buffer: an encoder that does not fit leaves it unchanged");
    {
        llm_proto_buf fb;
        uint8_t       mem[40];

        memset(&fb, 0, sizeof(fb));
        fb.data = mem;
        fb.cap = sizeof(mem);
        fb.fixed = 1;
        test_cond(llm_proto_encode_empty(&fb, LLM_MSG_PING, 1) == 0);
        test_cond(llm_proto_encode_error(&fb, 1, 1, "0123456789abcdef")
                  == LLM_EFULL);
        test_cond(fb.len == LLM_PROTO_HEADER_SIZE);
        llm_proto_buf_consume(&fb, 16);
        test_cond(fb.len == 0 && fb.pos == 0);
        test_cond(llm_proto_encode_error(&fb, 1, 1, "0123456789") == 0);
        test_cond(fb.len == 16 + 6 + 10);
    }

    llm_proto_buf_free(&b);
}


/* A stream of assorted frames for the parser tests. */
static void
build_stream(llm_proto_buf *b)
{
    llm_proto_token t[2];
    llm_proto_hello h = { 1, 1, 0, "t" };

    memset(t, 0, sizeof(t));
    t[0].id = 1;
    t[1].id = 2;
    llm_proto_encode_hello(b, &h);
    build_submit(b, 1, 40, 2);
    llm_proto_encode_empty(b, LLM_MSG_CANCEL, 1);
    llm_proto_encode_tokens(b, 1, 0, t, 2);
    llm_proto_encode_error(b, 2, LLM_PERR_DRAINING, "draining");
    llm_proto_encode_empty(b, LLM_MSG_STATS_REQ, 3);
    build_submit(b, 4, 1, 0);
}


static const int stream_types[] = {
    LLM_MSG_HELLO, LLM_MSG_SUBMIT, LLM_MSG_CANCEL, LLM_MSG_TOKENS,
    LLM_MSG_ERROR, LLM_MSG_STATS_REQ, LLM_MSG_SUBMIT
};
#define N_STREAM (int) (sizeof(stream_types) / sizeof(stream_types[0]))


/* Feeds the stream in chunks (sizes from chunk()), checks every frame. */
static int
parse_in_chunks(const llm_proto_buf *s, unsigned seed, int mode)
{
    llm_proto_parser p;
    llm_proto_frame  f;
    llm_err          err;
    size_t           off = 0, n;
    int              got = 0, rc, ok = 1;
    llm_proto_submit sub;

    llm_proto_parser_init(&p, 0);
    while (off < s->len) {
        if (mode == 0) {
            n = 1;
        } else {
            seed = seed * 1103515245u + 12345u;
            n = 1 + (seed >> 16) % 97;
        }
        if (n > s->len - off) {
            n = s->len - off;
        }
        if (mode == 2) {
            uint8_t *d = llm_proto_parser_space(&p, n);

            memcpy(d, s->data + off, n);
            llm_proto_parser_commit(&p, n);
        } else {
            llm_proto_parser_feed(&p, s->data + off, n);
        }
        off += n;
        while ((rc = llm_proto_parser_next(&p, &f, &err)) == 1) {
            if (got >= N_STREAM || f.type != stream_types[got]) {
                ok = 0;
            }
            if (f.type == LLM_MSG_SUBMIT) {
                ok &= llm_proto_decode_submit(&f, &sub, &err) == 0;
                ok &= sub.n_prompt == (f.req_id == 1 ? 40 : 1);
                ok &= llm_proto_id_at(sub.prompt, 0) == 1000;
            }
            got++;
        }
        if (rc != 0) {
            ok = 0;
        }
    }
    ok &= got == N_STREAM && llm_proto_parser_pending(&p) == 0;
    llm_proto_parser_free(&p);
    return ok;
}


TEST_SUITE(protocol_parser)
{
    llm_proto_buf    s;
    llm_proto_parser p;
    llm_proto_frame  f;
    llm_err          err;
    unsigned         seed;
    size_t           cut;
    int              ok, got, rc;

    llm_proto_buf_init(&s);
    build_stream(&s);

    test("parser: whole stream at once gives every frame in order");
    llm_proto_parser_init(&p, 0);
    llm_proto_parser_feed(&p, s.data, s.len);
    got = 0;
    ok = 1;
    while ((rc = llm_proto_parser_next(&p, &f, &err)) == 1) {
        ok &= got < N_STREAM && f.type == stream_types[got];
        got++;
    }
    test_cond(ok && rc == 0 && got == N_STREAM);
    llm_proto_parser_free(&p);

    test("parser: byte by byte");
    test_cond(parse_in_chunks(&s, 0, 0));

    test("parser: 200 random chunkings (feed and space/commit)");
    ok = 1;
    for (seed = 1; seed <= 100; seed++) {
        ok &= parse_in_chunks(&s, seed, 1);
        ok &= parse_in_chunks(&s, seed * 7919, 2);
    }
    test_cond(ok);

    test("parser: every two-piece split point");
    ok = 1;
    for (cut = 0; cut <= s.len; cut++) {
        llm_proto_parser_init(&p, 0);
        llm_proto_parser_feed(&p, s.data, cut);
        got = 0;
        while (llm_proto_parser_next(&p, &f, &err) == 1) {
            got++;
        }
        llm_proto_parser_feed(&p, s.data + cut, s.len - cut);
        while ((rc = llm_proto_parser_next(&p, &f, &err)) == 1) {
            got++;
        }
        ok &= rc == 0 && got == N_STREAM;
        llm_proto_parser_free(&p);
    }
    test_cond(ok);

    test("parser: garbage is rejected at its first bytes and stays failed");
    llm_proto_parser_init(&p, 0);
    llm_proto_parser_feed(&p, "GET / HTTP/1.1\r\n", 2);
    test_cond(llm_proto_parser_next(&p, &f, &err) == LLM_EFORMAT);
    test_cond(strstr(err.msg, "magic") != NULL);
    llm_proto_parser_feed(&p, s.data, s.len);
    test_cond(llm_proto_parser_next(&p, &f, &err) == LLM_EFORMAT);
    llm_proto_parser_free(&p);

    test("parser: valid frames, then a bad header after them");
    llm_proto_parser_init(&p, 0);
    llm_proto_parser_feed(&p, s.data, s.len);
    llm_proto_parser_feed(&p, "LLMP\x09\x00", 6);
    got = 0;
    while ((rc = llm_proto_parser_next(&p, &f, &err)) == 1) {
        got++;
    }
    test_cond(got == N_STREAM && rc == 0);
    llm_proto_parser_feed(&p, "\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00",
                          10);
    test_cond(llm_proto_parser_next(&p, &f, &err) == LLM_EFORMAT);
    llm_proto_parser_free(&p);

    test("parser: payload over the parser's own limit rejected from header");
    llm_proto_parser_init(&p, 64);
    llm_proto_parser_feed(&p, s.data, s.len);
    test_cond(llm_proto_parser_next(&p, &f, &err) == 1);       /* HELLO */
    test_cond(llm_proto_parser_next(&p, &f, &err) == LLM_EFORMAT);
    llm_proto_parser_free(&p);

    test("parser: a large frame (1 MiB prompt) across many feeds");
    {
        llm_proto_buf    big;
        llm_proto_submit sub;
        int32_t         *ids;
        int              i, n = 1 << 18;

        ids = malloc(sizeof(int32_t) * n);
        for (i = 0; i < n; i++) {
            ids[i] = i;
        }
        llm_proto_buf_init(&big);
        llm_proto_submit_default(&sub);
        sub.n_prompt = n;
        sub.prompt = ids;
        test_cond(llm_proto_encode_submit(&big, 5, &sub) == 0);
        llm_proto_parser_init(&p, 0);
        got = 0;
        ok = 1;
        for (cut = 0; cut < big.len; cut += 65536) {
            size_t k = big.len - cut < 65536 ? big.len - cut : 65536;

            llm_proto_parser_feed(&p, big.data + cut, k);
            while ((rc = llm_proto_parser_next(&p, &f, &err)) == 1) {
                ok &= llm_proto_decode_submit(&f, &sub, &err) == 0;
                ok &= sub.n_prompt == n;
                ok &= llm_proto_id_at(sub.prompt, n - 1) == n - 1;
                got++;
            }
            ok &= rc == 0;
        }
        test_cond(ok && got == 1);
        llm_proto_parser_free(&p);
        llm_proto_buf_free(&big);
        free(ids);
    }

    test("output buffer: consume compacts; reserve reuses sent space");
    {
        llm_proto_buf b;
        size_t        cap;

        llm_proto_buf_init(&b);
        llm_proto_encode_error(&b, 1, 1, "hello");
        llm_proto_encode_error(&b, 2, 1, "world");
        test_cond(llm_proto_buf_pending(&b) == 2 * (16 + 6 + 5));
        llm_proto_buf_consume(&b, 10);
        test_cond(b.pos == 10 && llm_proto_buf_pending(&b) == 44);
        cap = b.cap;
        test_cond(llm_proto_buf_reserve(&b, cap - b.len + 5) == 0);
        test_cond(b.pos == 0 && b.len == 44 && b.data[2] == 1);
        llm_proto_buf_consume(&b, 1000);
        test_cond(b.len == 0 && b.pos == 0);
        llm_proto_buf_free(&b);
    }

    llm_proto_buf_free(&s);
}


/* ---- adapter messages ------------------------------------------------ */

static int
dec_adapter_load(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_adapter_load(f, o, e);
}


static int
dec_adapter_unload(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_adapter_unload(f, o, e);
}


static int
dec_adapter_ok(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_adapter_ok(f, o, e);
}


static int
dec_adapters(const llm_proto_frame *f, void *o, llm_err *e)
{
    return llm_proto_decode_adapters(f, o, e);
}


TEST_SUITE(protocol_adapters)
{
    llm_proto_buf    b;
    llm_proto_frame  f;
    llm_err          err;
    int              ok, i, sent;

    llm_proto_buf_init(&b);

    test("ADAPTER_LOAD round-trips name and path");
    {
        llm_proto_adapter_load m, d;

        memset(&m, 0, sizeof(m));
        strcpy(m.name, "acme-support");
        strcpy(m.path, "/var/lib/ngx_llm/adapters/acme-support");
        test_cond(llm_proto_encode_adapter_load(&b, 5, &m) == 0);
        test_cond(frame_of(&b, &f) == 0 && f.type == LLM_MSG_ADAPTER_LOAD
                  && f.req_id == 5);
        test_cond(llm_proto_decode_adapter_load(&f, &d, &err) == 0);
        test_cond(strcmp(d.name, m.name) == 0
                  && strcmp(d.path, m.path) == 0);
        test_cond(all_cuts_rejected(&b, dec_adapter_load, &d));
    }

    test("ADAPTER_LOAD with an empty path (reload) round-trips");
    {
        llm_proto_adapter_load m, d;

        memset(&m, 0, sizeof(m));
        strcpy(m.name, "x");
        b.len = 0;
        test_cond(llm_proto_encode_adapter_load(&b, 6, &m) == 0);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_adapter_load(&f, &d, &err) == 0
                  && d.path[0] == '\0' && strcmp(d.name, "x") == 0);
    }

    test("ADAPTER_LOAD: over-long name or path refused by the encoder, "
         "and by the decoder");
    {
        llm_proto_adapter_load  d;
        static char             big[LLM_PROTO_MAX_PATH + 8];
        uint8_t                 raw[2 + sizeof(big) + 4];
        size_t                  n;

        memset(big, 'p', sizeof(big) - 1);
        big[sizeof(big) - 1] = '\0';
        /* the struct cannot hold it: build a payload by hand */
        n = strlen(big);
        raw[0] = 1;
        raw[1] = 0;
        raw[2] = 'a';
        raw[3] = (uint8_t) n;
        raw[4] = (uint8_t) (n >> 8);
        memcpy(raw + 5, big, n);
        b.len = 0;
        test_cond(llm_proto_encode_raw(&b, 0, LLM_MSG_ADAPTER_LOAD, 1, raw,
                                       5 + n) == 0);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_adapter_load(&f, &d, &err)
                  == LLM_EFORMAT);
        test_cond(strstr(err.msg, "path") != NULL);
        {
            /* a NUL inside the name */
            uint8_t bad[] = { 3, 0, 'a', 0, 'b', 0, 0 };

            b.len = 0;
            llm_proto_encode_raw(&b, 0, LLM_MSG_ADAPTER_LOAD, 1, bad,
                                 sizeof(bad));
            frame_of(&b, &f);
            test_cond(llm_proto_decode_adapter_load(&f, &d, &err)
                      == LLM_EFORMAT && strstr(err.msg, "name") != NULL);
        }
    }

    test("ADAPTER_UNLOAD round-trips; encoder refuses a long name");
    {
        char name[LLM_PROTO_MAX_ADAPTER + 1];
        char big[LLM_PROTO_MAX_ADAPTER + 2];

        b.len = 0;
        test_cond(llm_proto_encode_adapter_unload(&b, 9, "tenant:a") == 0);
        frame_of(&b, &f);
        test_cond(f.type == LLM_MSG_ADAPTER_UNLOAD);
        test_cond(llm_proto_decode_adapter_unload(&f, name, &err) == 0
                  && strcmp(name, "tenant:a") == 0);
        test_cond(all_cuts_rejected(&b, dec_adapter_unload, name));
        memset(big, 'n', sizeof(big) - 1);
        big[sizeof(big) - 1] = '\0';
        b.len = 0;
        test_cond(llm_proto_encode_adapter_unload(&b, 9, big) == LLM_EINVAL
                  && b.len == 0);
    }

    test("ADAPTER_OK round-trips");
    {
        llm_proto_adapter_ok m, d;

        memset(&m, 0, sizeof(m));
        strcpy(m.name, "a1");
        strcpy(m.version, "0123456789abcdef");
        m.max_rank = 16;
        m.bytes = (5ULL << 32) + 7;
        b.len = 0;
        test_cond(llm_proto_encode_adapter_ok(&b, 12, &m) == 0);
        frame_of(&b, &f);
        test_cond(f.type == LLM_MSG_ADAPTER_OK && f.req_id == 12);
        test_cond(llm_proto_decode_adapter_ok(&f, &d, &err) == 0);
        test_cond(memcmp(&m, &d, sizeof(m)) == 0);
        test_cond(all_cuts_rejected(&b, dec_adapter_ok, &d));
    }

    test("ADAPTERS round-trips a list; the iterator gives every entry");
    {
        llm_proto_adapter_info  e[3], got;
        llm_proto_adapters      d;

        memset(e, 0, sizeof(e));
        strcpy(e[0].name, "alpha");
        strcpy(e[0].version, "00112233aabbccdd");
        e[0].flags = LLM_ADAPTER_LOADED | LLM_ADAPTER_RESIDENT;
        e[0].max_rank = 8;
        e[0].bytes = 123456;
        strcpy(e[1].name, "beta");
        e[1].max_rank = 256;
        e[1].bytes = 1ULL << 33;
        strcpy(e[2].name, "gamma");
        strcpy(e[2].version, "ffff");
        e[2].flags = LLM_ADAPTER_LOADED;
        b.len = 0;
        test_cond(llm_proto_encode_adapters(&b, 3, 3, e, 3, &sent) == 0
                  && sent == 3);
        frame_of(&b, &f);
        test_cond(f.type == LLM_MSG_ADAPTERS);
        test_cond(llm_proto_decode_adapters(&f, &d, &err) == 0
                  && d.n == 3 && d.n_total == 3);
        ok = 1;
        for (i = 0; llm_proto_adapters_next(&d, &got); i++) {
            ok &= i < 3 && memcmp(&got, &e[i], sizeof(got)) == 0;
        }
        test_cond(ok && i == 3);
        test_cond(all_cuts_rejected(&b, dec_adapters, &d));
    }

    test("ADAPTERS: empty list; n > n_total and bad strings rejected");
    {
        llm_proto_adapters      d;
        llm_proto_adapter_info  got;
        uint8_t                 bad[8] = { 1, 0, 0, 0, 2, 0, 0, 0 };

        b.len = 0;
        test_cond(llm_proto_encode_adapters(&b, 1, 0, NULL, 0, &sent) == 0
                  && sent == 0);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_adapters(&f, &d, &err) == 0
                  && d.n == 0 && !llm_proto_adapters_next(&d, &got));
        b.len = 0;
        llm_proto_encode_raw(&b, 0, LLM_MSG_ADAPTERS, 1, bad, sizeof(bad));
        frame_of(&b, &f);
        test_cond(llm_proto_decode_adapters(&f, &d, &err) == LLM_EFORMAT);
        /* n (3) larger than n_total (1) is refused by the encoder */
        {
            llm_proto_adapter_info e[3];

            memset(e, 0, sizeof(e));
            b.len = 0;
            test_cond(llm_proto_encode_adapters(&b, 1, 1, e, 3, NULL)
                      == LLM_EINVAL && b.len == 0);
        }
    }

    test("ADAPTERS: a list larger than one payload is cut, n_total says "
         "so");
    {
        int                     n = 30000;
        llm_proto_adapter_info *e = calloc((size_t) n, sizeof(*e));
        llm_proto_adapters      d;
        llm_proto_adapter_info  got;

        for (i = 0; i < n; i++) {
            snprintf(e[i].name, sizeof(e[i].name), "adapter-%06d-%0100d",
                     i, 0);
            strcpy(e[i].version, "0123456789abcdef");
        }
        b.len = 0;
        test_cond(llm_proto_encode_adapters(&b, 1, (uint32_t) n, e, n,
                                            &sent) == 0);
        test_cond(sent > 1000 && sent < n);
        test_cond(b.len <= LLM_PROTO_HEADER_SIZE + LLM_PROTO_MAX_PAYLOAD);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_adapters(&f, &d, &err) == 0
                  && d.n == (uint32_t) sent && d.n_total == (uint32_t) n);
        ok = 1;
        for (i = 0; llm_proto_adapters_next(&d, &got); i++) {
            ok &= strcmp(got.name, e[i].name) == 0;
        }
        test_cond(ok && i == sent);
        free(e);
    }

    test("ADAPTER_LIST is an empty message; type names known");
    b.len = 0;
    test_cond(llm_proto_encode_empty(&b, LLM_MSG_ADAPTER_LIST, 4) == 0);
    frame_of(&b, &f);
    test_cond(llm_proto_decode_empty(&f, &err) == 0);
    test_cond(strcmp(llm_proto_type_name(LLM_MSG_ADAPTERS), "ADAPTERS") == 0
              && strcmp(llm_proto_type_name(LLM_MSG_ADAPTER_OK),
                        "ADAPTER_OK") == 0);

    test("adapter decoders refuse frames of another type");
    {
        llm_proto_adapter_ok d;

        b.len = 0;
        llm_proto_encode_empty(&b, LLM_MSG_PING, 1);
        frame_of(&b, &f);
        test_cond(llm_proto_decode_adapter_ok(&f, &d, &err) == LLM_EFORMAT);
        test_cond(strstr(err.msg, "ADAPTER_OK") != NULL);
    }

    llm_proto_buf_free(&b);
}
