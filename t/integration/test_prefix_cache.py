"""The prefix cache with its Redis tier: the real llm-engine daemon, a
real redis-server and real nginx.

A long prompt repeated reports cached tokens; after the daemon restarts
(local cache empty) its prefix comes from Redis; a second daemon sharing
the Redis hits the first one's blocks; a block corrupted in Redis is
ignored and counted; Redis stopped mid-test changes speed, not answers.
Greedy outputs are always identical to a daemon without the cache.
"""
import json
import random

import pytest

from conftest import wait_until
from nginx_proc import nginx_module, nginx_factory  # noqa: F401

BLOCK = 16


def long_prompt(seed, n=400):
    rnd = random.Random(seed)
    return [rnd.randrange(200, 40000) for _ in range(n)]


def run(engine, prompt, max_tokens=8, **kw):
    with engine.client() as c:
        r = c.generate(prompt, max_tokens=max_tokens, ignore_eos=True, **kw)
    assert r.error is None, r.error
    return r.tokens, r.done["cached_tokens"]


def stats(engine):
    with engine.client() as c:
        return c.stats()


def tier_args(redis, prefix="llm:kv:t:"):
    return ["--kv-redis", redis.addr, "--kv-redis-prefix", prefix]


@pytest.fixture(scope="module")
def reference(engine_bin, model_path, tmp_path_factory):
    """Greedy answers of a daemon without the prefix cache."""
    from conftest import Engine
    e = Engine(engine_bin, model_path, str(tmp_path_factory.mktemp("ref")),
               ["--prefix-cache", "off"])
    e.wait_ready()
    memo = {}

    def answer(prompt, max_tokens=8):
        key = (tuple(prompt), max_tokens)
        if key not in memo:
            memo[key] = run(e, prompt, max_tokens)[0]
        return memo[key]
    yield answer
    e.stop()


def test_local_hit_reports_cached_tokens(start_engine, reference):
    e = start_engine()
    p = long_prompt(1)
    cold, c0 = run(e, p, cache_namespace="acme")
    warm, c1 = run(e, p, cache_namespace="acme")
    assert c0 == 0
    assert c1 == (len(p) - 1) // BLOCK * BLOCK
    assert cold == warm == reference(p)
    # a longer prompt with the same start: a partial hit
    q = p[:200] + long_prompt(2, 100)
    part, c2 = run(e, q, cache_namespace="acme")
    assert c2 == 192 and part == reference(q)
    # another namespace: nothing
    other, c3 = run(e, p, cache_namespace="globex")
    assert c3 == 0 and other == reference(p)
    s = stats(e)
    assert s["prefix_hit_tokens"] == c1 + c2
    assert s["tier_enabled"] == 0


def test_restart_is_served_from_redis(start_engine, redis_server, reference):
    p = long_prompt(3)
    n_blocks = (len(p) - 1) // BLOCK
    e1 = start_engine(tier_args(redis_server, "llm:kv:restart:"))
    cold, c0 = run(e1, p)
    assert c0 == 0
    # the writes are asynchronous: wait until every prompt block is in
    wait_until(lambda: stats(e1)["tier_puts"] >= len(p) // BLOCK, 20,
               "tier writes")
    assert e1.stop() == 0

    e2 = start_engine(tier_args(redis_server, "llm:kv:restart:"))
    warm, c1 = run(e2, p)
    s = stats(e2)
    assert c1 == n_blocks * BLOCK
    assert s["prefix_tier_hit_tokens"] == n_blocks * BLOCK
    assert s["tier_blocks_hit"] == n_blocks and s["tier_corrupt"] == 0
    assert cold == warm == reference(p)


def test_second_daemon_shares_blocks(start_engine, redis_server, reference):
    args = tier_args(redis_server, "llm:kv:shared:")
    a = start_engine(args)
    b = start_engine(args)
    p = long_prompt(4)
    ta, ca = run(a, p, cache_namespace="acme")
    wait_until(lambda: stats(a)["tier_puts"] >= len(p) // BLOCK, 20,
               "tier writes")
    tb, cb = run(b, p, cache_namespace="acme")
    assert ca == 0 and cb == (len(p) - 1) // BLOCK * BLOCK
    assert ta == tb == reference(p)
    # the namespace is part of the name in Redis too
    tc, cc = run(b, p, cache_namespace="globex")
    assert cc == 0 and tc == reference(p)


def _keys(redis, pattern):
    raw = redis.command("KEYS", pattern)
    # RESP array of bulk strings
    return [l.decode() for l in raw.split(b"\r\n")
            if l and not l.startswith((b"*", b"$"))]


def _get(redis, key):
    import socket
    req = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode())
    with socket.create_connection((redis.host, redis.port), 5) as s:
        s.sendall(req)
        data = b""
        while b"\r\n" not in data:
            data += s.recv(65536)
        head, _, rest = data.partition(b"\r\n")
        n = int(head[1:])
        while len(rest) < n + 2:
            rest += s.recv(1 << 20)
        return rest[:n]


def _set(redis, key, value):
    redis_cmd = [b"SET", key.encode(), value]
    import socket
    req = b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a)
                               for a in redis_cmd)
    with socket.create_connection((redis.host, redis.port), 5) as s:
        s.sendall(req)
        assert s.recv(100).startswith(b"+OK")


def test_corrupt_block_is_ignored(start_engine, redis_server, reference):
    prefix = "llm:kv:corrupt:"
    p = long_prompt(5)
    e1 = start_engine(tier_args(redis_server, prefix))
    cold, _ = run(e1, p)
    wait_until(lambda: stats(e1)["tier_puts"] >= len(p) // BLOCK, 20,
               "tier writes")
    assert e1.stop() == 0

    # flip one payload byte of every stored block: each is refused
    keys = [k for k in _keys(redis_server, prefix + "*")
            if len(k) == len(prefix) + 64]
    assert len(keys) >= len(p) // BLOCK
    for k in keys:
        v = bytearray(_get(redis_server, k))
        v[-100] ^= 0x40
        _set(redis_server, k, bytes(v))

    e2 = start_engine(tier_args(redis_server, prefix))
    warm, cached = run(e2, p)
    s = stats(e2)
    assert cached == 0
    assert s["tier_corrupt"] >= 1 and s["prefix_tier_hit_tokens"] == 0
    assert warm == cold == reference(p)


def test_redis_stopped_changes_speed_not_answers(start_engine, redis_bin,
                                                 tmp_path_factory,
                                                 reference):
    from conftest import Redis
    r = Redis(str(tmp_path_factory.mktemp("redis-stop")), redis_bin)
    r.wait_ready()
    e = start_engine(tier_args(r, "llm:kv:stop:")
                     + ["--kv-redis-timeout", "100"])
    p, q = long_prompt(6), long_prompt(7)
    assert run(e, p)[0] == reference(p)
    r.stop()
    # new prompts: the lookups fail at once, the engine computes
    for prompt in (q, p[:300] + q[:50]):
        assert run(e, prompt)[0] == reference(prompt)
    s = stats(e)
    assert s["tier_errors"] >= 1 and s["tier_connected"] == 0
    # the local cache still works without Redis
    assert run(e, p)[1] > 0


def test_usage_reports_cached_tokens_through_nginx(nginx_module,  # noqa
                                                   start_engine,
                                                   nginx_factory):
    e = start_engine()
    n = nginx_factory(e.addr)
    system = "You are a careful assistant. " * 60
    body = {"model": "smollm2", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "Say hello."}]}
    st, _, b1 = n.post("/chat/completions", body)
    assert st == 200
    st, _, b2 = n.post("/chat/completions", body)
    assert st == 200
    r1, r2 = json.loads(b1), json.loads(b2)
    assert r1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= r2["usage"]["prompt_tokens"] - BLOCK
    assert cached % BLOCK == 0
    assert r1["choices"][0]["message"]["content"] == \
        r2["choices"][0]["message"]["content"]


def test_q8_0_pages_through_redis(start_engine, redis_server):
    """--kv-type q8_0: blocks go to Redis and come back after a restart
    with the answers of a q8_0 daemon without the cache; a daemon with F16
    pages on the same keys never takes them (the fingerprint holds the
    page type)."""
    q8 = ["--kv-type", "q8_0"]
    p = long_prompt(11)
    n_blocks = (len(p) - 1) // BLOCK
    ref = run(start_engine(q8 + ["--prefix-cache", "off"]), p)[0]

    e1 = start_engine(q8 + tier_args(redis_server, "llm:kv:q8:"))
    cold, c0 = run(e1, p)
    wait_until(lambda: stats(e1)["tier_puts"] >= len(p) // BLOCK, 20,
               "tier writes")
    assert e1.stop() == 0
    e2 = start_engine(q8 + tier_args(redis_server, "llm:kv:q8:"))
    warm, c1 = run(e2, p)
    s = stats(e2)
    assert c0 == 0 and c1 == n_blocks * BLOCK
    assert s["tier_blocks_hit"] == n_blocks and s["tier_corrupt"] == 0
    assert cold == warm == ref

    f16 = start_engine(tier_args(redis_server, "llm:kv:q8:"))
    _, c2 = run(f16, p)
    assert c2 == 0 and stats(f16)["tier_blocks_hit"] == 0
