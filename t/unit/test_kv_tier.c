/*
 * The Redis tier of the prefix cache (engine/kv_tier.c): the record codec,
 * then the tier against a real redis-server started here on a free port
 * (skipped when /usr/bin/redis-server is absent).
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "test.h"
#include "engine/kv_tier.h"
#include "engine/sha256.h"
#include "kernels/dtype.h"

#define REDIS_BIN   "/usr/bin/redis-server"
#define REC_HEADER  92


/* ---- helpers -------------------------------------------------------- */

/* A small block: [2 layers, 2, 4 tokens, 1 head, 8] f16 = 256 bytes. */
static void
small_params(llm_kv_tier_params *p, const char *addr, const char *prefix)
{
    memset(p, 0, sizeof(*p));
    p->addr = addr;
    p->key_prefix = prefix;
    p->ttl_s = 60;
    p->timeout_ms = 200;
    memset(p->fingerprint, 0xa5, 32);
    p->dtype = LLM_F16;
    p->block_size = 4;
    p->n_layers = 2;
    p->n_kv_heads = 1;
    p->head_dim = 8;
}


static void
block_hash(int i, uint8_t out[32])
{
    char s[32];

    snprintf(s, sizeof(s), "block %d", i);
    llm_sha256(s, strlen(s), out);
}


/* Pseudo-random finite values: bit 14 of every 16-bit half cleared, so no
 * F16 (nor F32) exponent is all ones. */
static void
block_payload(int i, uint8_t *out, size_t n)
{
    uint64_t x = 0x9e3779b97f4a7c15ULL * (uint64_t) (i + 1), v;
    size_t   k;

    for (k = 0; k < n; k += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v = x & 0xbfffbfffbfffbfffULL;
        memcpy(out + k, &v, n - k < 8 ? n - k : 8);
    }
}


static int
has_msg(const llm_err *e, const char *word)
{
    return strstr(e->msg, word) != NULL;
}


/* ---- codec ---------------------------------------------------------- */

TEST_SUITE(kv_tier_codec)
{
    llm_kv_tier_params p, q;
    uint8_t            h[32], h2[32], *pl, *rec, *bad;
    const uint8_t     *out;
    size_t             pb, rs, k;
    llm_err            e;
    llm_kv_tier       *t;
    int                all;

    small_params(&p, "127.0.0.1:1", NULL);
    pb = llm_kv_tier_payload_bytes(&p);
    rs = llm_kv_record_size(&p);

    test("payload and record sizes");
    test_cond(pb == 2 * 2 * 4 * 1 * 8 * 2);
    test_cond(rs == pb + REC_HEADER);

    test("SmolLM2 f16 block is 368,640 payload bytes");
    q = p;
    q.block_size = 16;
    q.n_layers = 30;
    q.n_kv_heads = 3;
    q.head_dim = 64;
    test_cond(llm_kv_tier_payload_bytes(&q) == 368640);

    pl = malloc(pb);
    rec = malloc(rs + 8);
    bad = malloc(rs + 8);
    if (pl == NULL || rec == NULL || bad == NULL) {
        test("alloc");
        test_cond(0);
        free(pl);
        free(rec);
        free(bad);
        return;
    }
    block_hash(1, h);
    block_hash(2, h2);
    block_payload(1, pl, pb);
    llm_kv_record_encode(&p, h, pl, rec);

    test("round trip");
    out = NULL;
    test_cond(llm_kv_record_decode(&p, h, rec, rs, &out, &e) == 0);
    test_cond(out == rec + REC_HEADER);
    test_cond(out != NULL && memcmp(out, pl, pb) == 0);
    test_cond(memcmp(rec, "LLMKV", 5) == 0 && rec[5] == 1 && rec[6] == 1);

    test("flipped payload byte: bad checksum");
    memcpy(bad, rec, rs);
    bad[REC_HEADER + 100] ^= 0x10;
    test_cond(llm_kv_record_decode(&p, h, bad, rs, &out, &e)
              == LLM_EFORMAT);
    test_cond(has_msg(&e, "checksum"));
    test_cond(out == NULL);

    test("every single-bit flip of the payload is caught");
    all = 1;
    for (k = 0; k < pb * 8; k++) {
        memcpy(bad, rec, rs);
        bad[REC_HEADER + k / 8] ^= (uint8_t) (1u << (k % 8));
        if (llm_kv_record_decode(&p, h, bad, rs, &out, &e) != LLM_EFORMAT) {
            all = 0;
        }
    }
    test_cond(all);

    test("swapped payload words are caught");
    memcpy(bad, rec, rs);
    memcpy(bad + REC_HEADER, rec + REC_HEADER + 8, 8);
    memcpy(bad + REC_HEADER + 8, rec + REC_HEADER, 8);
    test_cond(memcmp(bad, rec, rs) != 0);
    test_cond(llm_kv_record_decode(&p, h, bad, rs, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "checksum"));

    test("a NaN or an infinity under a valid checksum is refused");
    {
        static const uint16_t nonfinite[] = { 0x7c00, 0xfc00, 0x7e00,
                                              0x7c01 };
        llm_kv_tier_params q = p;
        size_t             j;

        for (j = 0; j < 4; j++) {
            memcpy(bad, pl, pb);
            memcpy(bad + 2 * (30 + j), &nonfinite[j], 2);
            llm_kv_record_encode(&p, h, bad, bad);
            test_cond(llm_kv_record_decode(&p, h, bad, rs, &out, &e)
                      == LLM_EFORMAT && has_msg(&e, "NaN") && out == NULL);
        }
        /* the largest finite F16, and an F32 record with +inf */
        memcpy(bad, pl, pb);
        memcpy(bad + 60, &(uint16_t) { 0x7bff }, 2);
        llm_kv_record_encode(&p, h, bad, bad);
        test_cond(llm_kv_record_decode(&p, h, bad, rs, &out, &e) == 0);
        q.dtype = LLM_F32;
        q.head_dim = 4;         /* the same bytes as F32 */
        memcpy(bad, pl, pb);
        memcpy(bad + 64, &(uint32_t) { 0x7f800000u }, 4);
        llm_kv_record_encode(&q, h, bad, bad);
        test_cond(llm_kv_record_decode(&q, h, bad, rs, &out, &e)
                  == LLM_EFORMAT && has_msg(&e, "byte 64"));
    }

    test("Q8_0 records: a round trip; a NaN scale is refused");
    {
        llm_kv_tier_params q = p;
        uint8_t            qp[2 * 2 * 4 * 34], qr[REC_HEADER + sizeof(qp)];
        float              x[32];
        int                r;

        q.dtype = LLM_Q8_0;
        q.head_dim = 32;
        test_cond(llm_kv_tier_payload_bytes(&q) == sizeof(qp)
                  && llm_kv_record_size(&q) == sizeof(qr));
        for (r = 0; r < 16; r++) {
            for (k = 0; k < 32; k++) {
                x[k] = (float) ((r * 37 + (int) k * 11) % 23) - 11.0f;
            }
            llm_quantize_row(LLM_Q8_0, x, qp + 34 * r, 32);
        }
        llm_kv_record_encode(&q, h, qp, qr);
        test_cond(llm_kv_record_decode(&q, h, qr, sizeof(qr), &out, &e) == 0
                  && memcmp(out, qp, sizeof(qp)) == 0);
        memcpy(qp + 34 * 5, &(uint16_t) { 0x7e00 }, 2);
        llm_kv_record_encode(&q, h, qp, qr);
        test_cond(llm_kv_record_decode(&q, h, qr, sizeof(qr), &out, &e)
                  == LLM_EFORMAT && has_msg(&e, "byte 170"));
        q.head_dim = 16;        /* not whole Q8_0 blocks */
        test_cond(llm_kv_tier_payload_bytes(&q) == 0);
    }

    test("truncated record refused");
    test_cond(llm_kv_record_decode(&p, h, rec, rs - 1, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "truncated"));
    test_cond(llm_kv_record_decode(&p, h, rec, 10, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "truncated"));
    test_cond(llm_kv_record_decode(&p, h, rec, 0, &out, &e)
              == LLM_EFORMAT);

    test("oversized record refused");
    memcpy(bad, rec, rs);
    bad[rs] = 0;
    test_cond(llm_kv_record_decode(&p, h, bad, rs + 1, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "oversized"));

    test("bad magic refused");
    memcpy(bad, rec, rs);
    bad[0] = 'X';
    test_cond(llm_kv_record_decode(&p, h, bad, rs, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "magic"));

    test("other format version refused");
    memcpy(bad, rec, rs);
    bad[5] = 2;
    test_cond(llm_kv_record_decode(&p, h, bad, rs, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "version"));

    test("other model fingerprint refused");
    q = p;
    q.fingerprint[31] ^= 1;
    test_cond(llm_kv_record_decode(&q, h, rec, rs, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "fingerprint"));

    test("other chain hash refused (value copied under another key)");
    test_cond(llm_kv_record_decode(&p, h2, rec, rs, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "hash"));

    test("other dtype refused");
    q = p;
    q.dtype = LLM_F32;
    test_cond(llm_kv_record_decode(&q, h, rec, rs, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "dtype"));

    test("other shape refused");
    q = p;
    q.n_layers = 3;
    test_cond(llm_kv_record_decode(&q, h, rec, rs, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "shape"));
    q = p;
    q.head_dim = 4;
    test_cond(llm_kv_record_decode(&q, h, rec, rs, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "shape"));

    test("payload_bytes field disagreeing with the shape refused");
    memcpy(bad, rec, rs);
    bad[80] ^= 1;
    test_cond(llm_kv_record_decode(&p, h, bad, rs, &out, &e)
              == LLM_EFORMAT && has_msg(&e, "payload_bytes"));

    test("payload not a multiple of 8 bytes: tail covered");
    q = p;
    q.block_size = 1;
    q.n_layers = 1;
    q.head_dim = 3;     /* 2 * 3 * 2 = 12 bytes */
    pb = llm_kv_tier_payload_bytes(&q);
    test_cond(pb == 12);
    llm_kv_record_encode(&q, h, pl, rec);
    test_cond(llm_kv_record_decode(&q, h, rec, REC_HEADER + pb, &out, &e)
              == 0);
    all = 1;
    for (k = 0; k < pb; k++) {
        memcpy(bad, rec, REC_HEADER + pb);
        bad[REC_HEADER + k] ^= 0x80;
        if (llm_kv_record_decode(&q, h, bad, REC_HEADER + pb, &out, &e)
            != LLM_EFORMAT)
        {
            all = 0;
        }
    }
    test_cond(all);

    test("bad parameters refused by new");
    q = p;
    q.dtype = LLM_Q4_1;
    t = llm_kv_tier_new(&q, &e);
    test_cond(t == NULL && e.code == LLM_EINVAL);
    q = p;
    q.addr = "localhost:99999";
    t = llm_kv_tier_new(&q, &e);
    test_cond(t == NULL && has_msg(&e, "address"));
    q = p;
    q.n_layers = 0;
    t = llm_kv_tier_new(&q, &e);
    test_cond(t == NULL);
    q = p;
    q.addr = "unix:";
    t = llm_kv_tier_new(&q, &e);
    test_cond(t == NULL);

    free(pl);
    free(rec);
    free(bad);
}


/* ---- a redis-server of our own -------------------------------------- */

static pid_t redis_pid = -1;
static int   redis_port;


static int
free_port(void)
{
    struct sockaddr_in a;
    socklen_t          len = sizeof(a);
    int                fd, port = -1;

    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        return -1;
    }
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *) &a, sizeof(a)) == 0
        && getsockname(fd, (struct sockaddr *) &a, &len) == 0)
    {
        port = ntohs(a.sin_port);
    }
    close(fd);
    return port;
}


/* A listening socket nobody accepts on: connects succeed (the kernel's
 * backlog), commands never get an answer.  The fd, or -1. */
static int
black_hole(int *port)
{
    struct sockaddr_in a;
    socklen_t          len = sizeof(a);
    int                fd;

    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        return -1;
    }
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *) &a, sizeof(a)) != 0
        || listen(fd, 16) != 0
        || getsockname(fd, (struct sockaddr *) &a, &len) != 0)
    {
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}


static redisContext *
redis_client(void)
{
    struct timeval tv = { 1, 0 };
    redisContext  *c;

    c = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
    if (c != NULL && c->err) {
        redisFree(c);
        return NULL;
    }
    if (c != NULL) {
        redisSetTimeout(c, tv);
    }
    return c;
}


static int
redis_ping(void)
{
    redisContext *c = redis_client();
    redisReply   *r;
    int           ok = 0;

    if (c == NULL) {
        return 0;
    }
    r = redisCommand(c, "PING");
    ok = r != NULL && r->type == REDIS_REPLY_STATUS
         && strcmp(r->str, "PONG") == 0;
    if (r != NULL) {
        freeReplyObject(r);
    }
    redisFree(c);
    return ok;
}


/* Starts redis-server on redis_port; 0 once it answers PING. */
static int
redis_start(void)
{
    char   port[16];
    pid_t  pid;
    int    i, fd;
    const char *dir = llm_test_tmp_dir();

    snprintf(port, sizeof(port), "%d", redis_port);
    pid = fork();
    if (pid < 0) {
        return -1;
    }
    if (pid == 0) {
        fd = open("/dev/null", O_RDWR);
        if (fd >= 0) {
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execl(REDIS_BIN, "redis-server", "--port", port, "--bind",
              "127.0.0.1", "--save", "", "--appendonly", "no",
              "--daemonize", "no", "--dir", dir, (char *) NULL);
        _exit(127);
    }
    redis_pid = pid;
    for (i = 0; i < 300; i++) {
        if (redis_ping()) {
            return 0;
        }
        if (waitpid(pid, NULL, WNOHANG) == pid) {
            redis_pid = -1;
            return -1;
        }
        usleep(10000);
    }
    return -1;
}


static void
redis_stop(int sig)
{
    if (redis_pid > 0) {
        kill(redis_pid, sig);
        waitpid(redis_pid, NULL, 0);
        redis_pid = -1;
    }
}


static long long
redis_int(const char *fmt, const char *arg)
{
    redisContext *c = redis_client();
    redisReply   *r;
    long long     v = -1000;

    if (c == NULL) {
        return v;
    }
    r = redisCommand(c, fmt, arg);
    if (r != NULL && r->type == REDIS_REPLY_INTEGER) {
        v = r->integer;
    } else if (r != NULL && r->type == REDIS_REPLY_STRING) {
        v = atoll(r->str);
    } else if (r != NULL && r->type == REDIS_REPLY_NIL) {
        v = 0;
    }
    if (r != NULL) {
        freeReplyObject(r);
    }
    redisFree(c);
    return v;
}


static void
block_key(const char *prefix, int i, char *out)
{
    uint8_t h[32];
    size_t  n = strlen(prefix);

    block_hash(i, h);
    memcpy(out, prefix, n);
    llm_sha256_hex(h, out + n);
}


/* ---- tier helpers --------------------------------------------------- */

static atomic_int wakes;


static void
on_wake(void *ud)
{
    atomic_fetch_add(&wakes, 1);
    (void) ud;
}


/* Lookup of blocks first .. first+n-1; waits up to ms for the result. */
static int
lookup_wait(llm_kv_tier *t, uint64_t tag, int first, int n,
            llm_kv_tier_result *r, int ms)
{
    uint8_t (*h)[32];
    uint64_t  end = llm_now_ns() + (uint64_t) ms * 1000000u;
    int       i, got = 0;

    h = malloc((size_t) n * 32);
    if (h == NULL) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        block_hash(first + i, h[i]);
    }
    if (llm_kv_tier_lookup(t, tag, (const uint8_t (*)[32]) h, n) != 0) {
        free(h);
        return 0;
    }
    free(h);
    while (llm_now_ns() < end) {
        if (llm_kv_tier_poll(t, r)) {
            got = 1;
            break;
        }
        usleep(200);
    }
    return got && r->tag == tag;
}


static int
put_block(llm_kv_tier *t, int i, size_t pb)
{
    uint8_t  h[32];
    uint8_t *pl = malloc(pb);
    int      rc;

    if (pl == NULL) {
        return LLM_ENOMEM;
    }
    block_hash(i, h);
    block_payload(i, pl, pb);
    rc = llm_kv_tier_put(t, h, pl);
    free(pl);
    return rc;
}


/* Waits until puts + puts_dropped reaches n. */
static int
wait_puts(llm_kv_tier *t, uint64_t n, int ms)
{
    llm_kv_tier_stats s;
    uint64_t          end = llm_now_ns() + (uint64_t) ms * 1000000u;

    do {
        llm_kv_tier_get_stats(t, &s);
        if (s.puts + s.puts_dropped >= n) {
            return 1;
        }
        usleep(500);
    } while (llm_now_ns() < end);
    return 0;
}


static int
payloads_match(const llm_kv_tier_result *r, int first, size_t pb)
{
    uint8_t *want = malloc(pb);
    int      i, ok = 1;

    if (want == NULL) {
        return 0;
    }
    for (i = 0; i < r->n_found; i++) {
        block_payload(first + i, want, pb);
        if (memcmp(r->payloads + (size_t) i * pb, want, pb) != 0) {
            ok = 0;
        }
    }
    free(want);
    return ok;
}


/* ---- against a live Redis ------------------------------------------- */

static void
tier_live(const char *addr)
{
    llm_kv_tier_params p, q;
    llm_kv_tier       *t, *t2;
    llm_kv_tier_result r;
    llm_kv_tier_stats  s0, s;
    llm_err            e;
    redisContext      *c;
    redisReply        *rep;
    char               key[128];
    size_t             pb;
    long long          ttl;
    int                w0, ok;

    small_params(&p, addr, "t:kv:");
    p.wake = on_wake;
    t = llm_kv_tier_new(&p, &e);
    test("tier starts");
    test_cond(t != NULL);
    if (t == NULL) {
        return;
    }
    pb = llm_kv_tier_payload_bytes(&p);

    test("put 0,1,2,4 then lookup 0..4 finds the leading run of 3");
    test_cond(put_block(t, 0, pb) == 0);
    test_cond(put_block(t, 1, pb) == 0);
    test_cond(put_block(t, 2, pb) == 0);
    test_cond(put_block(t, 4, pb) == 0);
    test_cond(wait_puts(t, 4, 2000));
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.puts == 4 && s.puts_dropped == 0 && s.connected);
    test_cond(s.put_bytes == 4 * llm_kv_record_size(&p));
    w0 = atomic_load(&wakes);
    ok = lookup_wait(t, 77, 0, 5, &r, 2000);
    test_cond(ok);
    test_cond(ok && r.n_found == 3 && r.payloads != NULL);
    test_cond(ok && payloads_match(&r, 0, pb));
    if (ok) {
        llm_kv_tier_result_free(&r);
    }
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.lookups == 1 && s.blocks_hit == 3 && s.blocks_missed == 2);

    test("wake callback called for a finished lookup");
    test_cond(atomic_load(&wakes) > w0);

    test("lookup of an absent first block finds nothing");
    ok = lookup_wait(t, 78, 3, 2, &r, 2000);
    test_cond(ok && r.n_found == 0 && r.payloads == NULL);

    test("TTL set on the block key");
    block_key("t:kv:", 0, key);
    ttl = redis_int("TTL %s", key);
    test_cond(ttl > 0 && ttl <= 60);

    test("byte total and index kept");
    test_cond(redis_int("GET %s", "t:kv:bytes")
              == 4 * (long long) llm_kv_record_size(&p));
    test_cond(redis_int("ZCARD %s", "t:kv:index") == 4);

    test("rewriting a present block is not counted twice");
    test_cond(put_block(t, 0, pb) == 0);
    test_cond(wait_puts(t, 5, 2000));
    test_cond(redis_int("GET %s", "t:kv:bytes")
              == 4 * (long long) llm_kv_record_size(&p));

    test("record corrupted in Redis is refused, the lookup stops there");
    llm_kv_tier_get_stats(t, &s0);
    c = redis_client();
    block_key("t:kv:", 1, key);
    rep = c ? redisCommand(c, "GET %s", key) : NULL;
    ok = rep != NULL && rep->type == REDIS_REPLY_STRING
         && rep->len == llm_kv_record_size(&p);
    test_cond(ok);
    if (ok) {
        redisReply *r2;

        rep->str[REC_HEADER + 17] ^= 0x01;
        r2 = redisCommand(c, "SET %s %b", key, rep->str, rep->len);
        test_cond(r2 != NULL && r2->type == REDIS_REPLY_STATUS);
        if (r2 != NULL) {
            freeReplyObject(r2);
        }
    }
    if (rep != NULL) {
        freeReplyObject(rep);
    }
    ok = lookup_wait(t, 79, 0, 5, &r, 2000);
    test_cond(ok && r.n_found == 1);
    test_cond(ok && payloads_match(&r, 0, pb));
    if (ok) {
        llm_kv_tier_result_free(&r);
    }
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.corrupt == s0.corrupt + 1);

    test("truncated value in Redis is refused");
    if (c != NULL) {
        block_key("t:kv:", 0, key);
        rep = redisCommand(c, "SETRANGE %s %d %b", key, 0, "LLMKV", 5);
        if (rep != NULL) {
            freeReplyObject(rep);
        }
        rep = redisCommand(c, "GETRANGE %s 0 199", key);
        if (rep != NULL && rep->type == REDIS_REPLY_STRING) {
            redisReply *r2 = redisCommand(c, "SET %s %b", key, rep->str,
                                          rep->len);
            if (r2 != NULL) {
                freeReplyObject(r2);
            }
        }
        if (rep != NULL) {
            freeReplyObject(rep);
        }
    }
    ok = lookup_wait(t, 80, 0, 3, &r, 2000);
    test_cond(ok && r.n_found == 0);
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.corrupt == s0.corrupt + 2);

    test("record written under another fingerprint is refused");
    q = p;
    q.fingerprint[0] ^= 0xff;
    q.wake = NULL;
    t2 = llm_kv_tier_new(&q, &e);
    test_cond(t2 != NULL);
    if (t2 != NULL) {
        test_cond(put_block(t2, 10, pb) == 0);
        test_cond(wait_puts(t2, 1, 2000));
        ok = lookup_wait(t, 81, 10, 1, &r, 2000);
        test_cond(ok && r.n_found == 0);
        llm_kv_tier_get_stats(t, &s);
        test_cond(s.corrupt == s0.corrupt + 3);
        /* and the writer still reads its own */
        ok = lookup_wait(t2, 82, 10, 1, &r, 2000);
        test_cond(ok && r.n_found == 1);
        if (ok) {
            llm_kv_tier_result_free(&r);
        }
        llm_kv_tier_free(t2);
    }

    test("script cache flushed: NOSCRIPT falls back to EVAL");
    rep = c ? redisCommand(c, "SCRIPT FLUSH") : NULL;
    test_cond(rep != NULL && rep->type == REDIS_REPLY_STATUS);
    if (rep != NULL) {
        freeReplyObject(rep);
    }
    llm_kv_tier_get_stats(t, &s0);
    test_cond(put_block(t, 11, pb) == 0);
    test_cond(put_block(t, 12, pb) == 0);
    test_cond(wait_puts(t, s0.puts + s0.puts_dropped + 2, 2000));
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.puts == s0.puts + 2);
    ok = lookup_wait(t, 83, 11, 2, &r, 2000);
    test_cond(ok && r.n_found == 2 && payloads_match(&r, 11, pb));
    if (ok) {
        llm_kv_tier_result_free(&r);
    }
    if (c != NULL) {
        redisFree(c);
    }

    test("Redis killed: lookups find nothing at once, puts dropped");
    redis_stop(SIGKILL);
    llm_kv_tier_get_stats(t, &s0);
    ok = lookup_wait(t, 84, 11, 2, &r, 1000);
    test_cond(ok && r.n_found == 0);
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.errors > s0.errors && !s.connected);
    test_cond(put_block(t, 13, pb) == 0);
    test_cond(wait_puts(t, s.puts + s.puts_dropped + 1, 1000));
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.puts_dropped > s0.puts_dropped);

    test("Redis restarted: the tier reconnects after its back-off");
    ok = redis_start() == 0;
    test_cond(ok);
    if (ok) {
        uint64_t t0 = llm_now_ns(), end = t0 + 6000000000ull;
        int      back = 0;

        while (!back && llm_now_ns() < end) {
            put_block(t, 20, pb);
            if (lookup_wait(t, 85, 20, 1, &r, 1000) && r.n_found == 1) {
                back = payloads_match(&r, 20, pb);
                llm_kv_tier_result_free(&r);
            } else {
                usleep(50000);
            }
        }
        test_cond(back);
        llm_kv_tier_get_stats(t, &s);
        test_cond(s.connected);
        printf("       reconnected %.2f s after restart\n",
               (llm_now_ns() - t0) / 1e9);
    }

    llm_kv_tier_free(t);
}


static void
tier_budget(const char *addr)
{
    llm_kv_tier_params p;
    llm_kv_tier       *t;
    llm_kv_tier_stats  s;
    llm_err            e;
    char               key[128];
    size_t             pb, rs;
    int                i, gone;

    small_params(&p, addr, "b:kv:");
    rs = llm_kv_record_size(&p);
    pb = llm_kv_tier_payload_bytes(&p);
    p.budget_bytes = 3 * rs + rs / 2;

    test("byte budget: 6 writes into room for 3 keep the newest 3");
    t = llm_kv_tier_new(&p, &e);
    test_cond(t != NULL);
    if (t == NULL) {
        return;
    }
    for (i = 0; i < 6; i++) {
        test_cond(put_block(t, 100 + i, pb) == 0);
    }
    test_cond(wait_puts(t, 6, 2000));
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.puts == 6);
    test_cond(s.evicted == 3);
    test_cond(s.stored_bytes == 3 * (uint64_t) rs);
    test_cond(redis_int("GET %s", "b:kv:bytes") <= (long long) p.budget_bytes);
    test_cond(redis_int("GET %s", "b:kv:bytes") == 3 * (long long) rs);
    test_cond(redis_int("ZCARD %s", "b:kv:index") == 3);
    test_cond(redis_int("HLEN %s", "b:kv:sizes") == 3);
    gone = 0;
    for (i = 0; i < 3; i++) {
        block_key("b:kv:", 100 + i, key);
        gone += redis_int("EXISTS %s", key) == 0;
    }
    test_cond(gone == 3);
    block_key("b:kv:", 105, key);
    test_cond(redis_int("EXISTS %s", key) == 1);

    test("byte budget: expired index entries leave the total");
    /* block 103 expires (as Redis would) without the script knowing */
    block_key("b:kv:", 103, key);
    test_cond(redis_int("DEL %s", key) == 1);
    {
        redisContext *c = redis_client();
        redisReply   *r = c ? redisCommand(c, "ZADD b:kv:index 1 %s", key)
                            : NULL;

        test_cond(r != NULL && r->type == REDIS_REPLY_INTEGER);
        if (r != NULL) {
            freeReplyObject(r);
        }
        if (c != NULL) {
            redisFree(c);
        }
    }
    test_cond(put_block(t, 106, pb) == 0);
    test_cond(wait_puts(t, 7, 2000));
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.evicted == 3);     /* room was made by the expiry */
    test_cond(redis_int("GET %s", "b:kv:bytes") == 3 * (long long) rs);
    test_cond(redis_int("ZCARD %s", "b:kv:index") == 3);

    llm_kv_tier_free(t);
}


/* 100 SmolLM2 f16 blocks: write throughput and one lookup. */
static void
tier_perf(const char *addr)
{
    llm_kv_tier_params p;
    llm_kv_tier       *t;
    llm_kv_tier_result r;
    llm_err            e;
    uint8_t           *pl, (*h)[32];
    size_t             pb;
    uint64_t           t0, t1, t2;
    int                i, n = 100, ok;

    small_params(&p, addr, "p:kv:");
    p.block_size = 16;
    p.n_layers = 30;
    p.n_kv_heads = 3;
    p.head_dim = 64;
    p.timeout_ms = 1000;
    pb = llm_kv_tier_payload_bytes(&p);

    test("100 blocks of 368,640 bytes: write, then one lookup");
    t = llm_kv_tier_new(&p, &e);
    pl = malloc((size_t) n * pb);       /* [n, payload_bytes] */
    h = malloc((size_t) n * 32);
    test_cond(t != NULL && pl != NULL && h != NULL);
    if (t == NULL || pl == NULL || h == NULL) {
        llm_kv_tier_free(t);
        free(pl);
        free(h);
        return;
    }
    for (i = 0; i < n; i++) {
        block_hash(1000 + i, h[i]);
    }
    /* connect first, so the figures do not include it */
    ok = lookup_wait(t, 1, 5000, 1, &r, 2000);
    test_cond(ok);

    for (i = 0; i < n; i++) {
        block_payload(1000 + i, pl + (size_t) i * pb, pb);
    }
    t0 = llm_now_ns();
    for (i = 0; i < n; i++) {
        if (llm_kv_tier_put(t, h[i], pl + (size_t) i * pb) != 0) {
            break;
        }
    }
    test_cond(i == n);
    test_cond(wait_puts(t, n, 5000));
    t1 = llm_now_ns();

    ok = lookup_wait(t, 2, 1000, n, &r, 5000);
    t2 = llm_now_ns();
    test_cond(ok && r.n_found == n);
    test_cond(ok && payloads_match(&r, 1000, pb));
    if (ok) {
        llm_kv_tier_result_free(&r);
    }
    printf("       write %.0f MB/s (%d records in %.1f ms), "
           "lookup of %d blocks %.1f ms\n",
           (double) n * llm_kv_record_size(&p) / ((t1 - t0) / 1e3),
           n, (t1 - t0) / 1e6, n, (t2 - t1) / 1e6);
    llm_kv_tier_free(t);
    free(pl);
    free(h);
}


/* No Redis at all: nothing blocks, errors are counted. */
static void
tier_absent(void)
{
    llm_kv_tier_params p;
    llm_kv_tier       *t;
    llm_kv_tier_result r;
    llm_kv_tier_stats  s;
    llm_err            e;
    char               addr[64];
    uint64_t           t0, dt;
    size_t             pb;
    int                i, ok, hole, port = free_port();

    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    small_params(&p, addr, NULL);
    p.wake = on_wake;
    pb = llm_kv_tier_payload_bytes(&p);

    test("Redis absent: lookup finds nothing quickly, errors counted");
    t = llm_kv_tier_new(&p, &e);
    test_cond(t != NULL);
    if (t == NULL) {
        return;
    }
    t0 = llm_now_ns();
    ok = lookup_wait(t, 5, 0, 4, &r, 1000);
    dt = llm_now_ns() - t0;
    test_cond(ok && r.n_found == 0);
    test_cond(dt < 300000000u);
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.errors >= 1 && !s.connected && s.lookups == 1);

    test("Redis absent: put returns at once and is dropped");
    t0 = llm_now_ns();
    for (i = 0; i < 50; i++) {
        test_cond(put_block(t, i, pb) == 0);
    }
    dt = llm_now_ns() - t0;
    test_cond(dt < 50000000u);
    test_cond(wait_puts(t, 50, 1000));
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.puts == 0 && s.puts_dropped == 50);

    llm_kv_tier_free(t);

    /* a "Redis" that accepts connections and never answers */
    hole = black_hole(&port);
    test("Redis hanging: lookup gives up after timeout_ms");
    if (hole < 0) {
        test_skip("no loopback listener");
        return;
    }
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    p.timeout_ms = 100;
    t = llm_kv_tier_new(&p, &e);
    test_cond(t != NULL);
    if (t == NULL) {
        close(hole);
        return;
    }
    t0 = llm_now_ns();
    ok = lookup_wait(t, 6, 0, 4, &r, 2000);
    dt = llm_now_ns() - t0;
    test_cond(ok && r.n_found == 0);
    test_cond(dt >= 90000000u && dt < 500000000u);
    llm_kv_tier_get_stats(t, &s);
    test_cond(s.errors >= 1 && !s.connected);
    llm_kv_tier_free(t);

    test("queue over its byte budget: LLM_EFULL, put never waits");
    /* the thread is stuck for timeout_ms on the first write, so the
     * queue (room for 2) fills */
    p.queue_bytes = 2 * pb;
    t = llm_kv_tier_new(&p, &e);
    test_cond(t != NULL);
    if (t == NULL) {
        close(hole);
        return;
    }
    {
        int full = 0;

        t0 = llm_now_ns();
        for (i = 0; i < 10 && !full; i++) {
            full = put_block(t, i, pb) == LLM_EFULL;
        }
        dt = llm_now_ns() - t0;
        test_cond(full && i <= 4);
        test_cond(dt < 20000000u);
        llm_kv_tier_get_stats(t, &s);
        test_cond(s.puts_dropped >= 1);
    }

    test("free is prompt with writes pending and Redis hanging");
    t0 = llm_now_ns();
    llm_kv_tier_free(t);
    dt = llm_now_ns() - t0;
    test_cond(dt < 400000000u);
    close(hole);

    test("bad lookup sizes refused");
    t = llm_kv_tier_new(&p, &e);
    test_cond(t != NULL);
    if (t != NULL) {
        uint8_t hh[1][32];

        memset(hh, 0, sizeof(hh));
        test_cond(llm_kv_tier_lookup(t, 1, (const uint8_t (*)[32]) hh, 0)
                  == LLM_EINVAL);
        test_cond(llm_kv_tier_lookup(t, 1, (const uint8_t (*)[32]) hh,
                                     LLM_KV_TIER_MAX_LOOKUP + 1)
                  == LLM_EINVAL);
        llm_kv_tier_free(t);
    }
}


TEST_SUITE(kv_tier_redis)
{
    char addr[64];

    tier_absent();

    test("redis-server available");
    if (access(REDIS_BIN, X_OK) != 0) {
        test_skip(REDIS_BIN " not installed");
        return;
    }
    redis_port = free_port();
    if (redis_port <= 0 || redis_start() != 0) {
        test_cond(0);
        redis_stop(SIGKILL);
        return;
    }
    test_cond(1);
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", redis_port);

    tier_budget(addr);
    tier_perf(addr);
    tier_live(addr);        /* last: kills and restarts the server */

    redis_stop(SIGTERM);
}
