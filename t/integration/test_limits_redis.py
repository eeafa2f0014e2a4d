"""Limits across hosts (llm_limits redis): two nginx instances sharing one
real redis-server enforce one global limit; the Lua scripts survive a
SCRIPT FLUSH (EVALSHA falls back to EVAL); Redis stopped or frozen
mid-test: each llm_limits_fail mode does what it says, no worker blocks
or crashes, and the global limits resume when Redis returns.
"""

import json
import os
import signal
import time

import pytest

from nginx_proc import nginx_module, start_nginx  # noqa: F401
from tenants_util import (FixedRedis, Holder, chat, key_digest, nginx_with,
                          parallel, redis_set, tenant, wait_for,
                          write_tenants)

GLOBAL = "sk-global-test-00000000000000"
CONC = "sk-gconc-test-000000000000000"
TOK = "sk-gtok-test-0000000000000000"

TENANTS = [
    tenant("global", key=GLOBAL, limits={"requests_per_minute": 6}),
    tenant("gconc", key=CONC, limits={"max_concurrent": 1}),
    tenant("gtok", key=TOK, limits={"tokens_per_minute": 400}),
]


def two_hosts(nginx_module, engine, model_path, tmp_path, redis, tenants,
              http=""):
    f = write_tenants(str(tmp_path / "tenants.json"), tenants)
    hosts = []
    for name in ("a", "b"):
        def factory(engines, _name=name, **kw):
            return start_nginx(str(tmp_path / _name), engines, model_path,
                               **kw)
        hosts.append(nginx_with(factory, engine.addr, f, redis=redis,
                                workers=2,
                                http="llm_limits redis;\n    " + http))
    return hosts


@pytest.fixture
def hosts(nginx_module, engine, model_path, tmp_path, redis_server):
    redis_server.command("FLUSHALL")
    hs = two_hosts(nginx_module, engine, model_path, tmp_path, redis_server,
                   TENANTS)
    yield hs
    for h in hs:
        h.stop()
    for h in hs:
        h.check_log()


def test_two_hosts_one_global_limit(hosts, redis_server):
    a, b = hosts
    res = parallel(lambda i: chat(hosts[i % 2], key=GLOBAL), 10)
    codes = [r[0] for r in res]
    assert codes.count(200) == 6, codes
    assert codes.count(429) == 4, codes
    for st, h, doc in res:
        assert h["x-ratelimit-limit-requests"] == "6"
        if st == 429:
            assert doc["error"]["type"] == "requests"
            assert int(h["retry-after"]) >= 1
    assert sorted(int(h["x-ratelimit-remaining-requests"])
                  for st, h, _ in res if st == 200) == [0, 1, 2, 3, 4, 5]
    # the counters live in Redis, under the tenant's hash tag
    assert redis_server.command("EXISTS", "llm:rl:{global}") == b":1\r\n"


def test_concurrency_across_hosts(hosts, redis_server):
    a, b = hosts
    h = Holder(a, CONC)
    try:
        assert h.wait_admitted() == 200
        st, hdr, doc = chat(b, key=CONC)
        assert st == 429 and doc["error"]["type"] == "concurrency", doc
        h.close()
        wait_for(lambda: chat(b, key=CONC)[0] == 200, 10, "the slot back",
                 step=0.1)
    finally:
        h.close()
    # the slot set is empty again
    wait_for(lambda: redis_server.command("ZCARD", "llm:cc:{gconc}")
             == b":0\r\n", 5, "slot released")


def test_tokens_refunded_in_redis(hosts):
    a, b = hosts
    st, h, doc = chat(a, key=TOK, max_tokens=50, stop=[" "])
    assert st == 200, doc
    p1, c1 = doc["usage"]["prompt_tokens"], doc["usage"]["completion_tokens"]
    assert int(h["x-ratelimit-remaining-tokens"]) == 400 - p1 - 50
    t0 = time.monotonic()
    # the release script runs after the response: let it land
    time.sleep(0.2)
    st, h, doc = chat(b, key=TOK, max_tokens=50)
    assert st == 200, doc
    p2 = doc["usage"]["prompt_tokens"]
    low = 400 - (p1 + c1) - (p2 + 50)
    refill = int((time.monotonic() - t0 + 0.5) * 400 / 60) + 1
    got = int(h["x-ratelimit-remaining-tokens"])
    assert low <= got <= low + refill, (got, low, refill)


def test_scripts_survive_script_flush(hosts, redis_server):
    a, _ = hosts
    assert chat(a, key=GLOBAL)[0] == 200
    assert redis_server.command("SCRIPT", "FLUSH").startswith(b"+OK")
    st, h, doc = chat(a, key=GLOBAL)
    assert st == 200, doc
    assert h["x-ratelimit-remaining-requests"] == "4"


# ---- Redis away ----------------------------------------------------------

MODES = {
    # mode: what 5 requests get while Redis is away (limit 4, 2 hosts)
    "open": [200] * 5,
    "closed": [503] * 5,
    "local": [200, 200, 429, 429, 429],
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_redis_stopped_mid_test(nginx_module, engine, model_path, tmp_path,
                                redis_bin, mode):
    key = "sk-mode-%s-000000000000000" % mode
    r = FixedRedis(str(tmp_path)).wait_ready()
    f = write_tenants(str(tmp_path / "tenants.json"), [
        tenant("m", key=key, limits={"requests_per_minute": 4})])

    def factory(engines, **kw):
        return start_nginx(str(tmp_path / "nginx"), engines, model_path,
                           **kw)

    n = nginx_with(factory, engine.addr, f, redis=r, workers=4,
                   http="llm_limits redis; llm_limits_fail %s; "
                        "llm_limits_hosts 2;" % mode)
    try:
        pids = set(wait_for(lambda: len(n.worker_pids()) == 4
                            and n.worker_pids(), 10, "4 workers"))
        assert chat(n, key=key)[0] == 200          # counted in Redis
        r.stop()

        got = []
        for i in range(5):
            t0 = time.monotonic()
            st, h, doc = chat(n, key=key, timeout=10)
            assert time.monotonic() - t0 < 3, "a worker waited for Redis"
            got.append(st)
            if st == 503:
                assert doc["error"]["code"] == "rate_limiter_unavailable"
                assert h["retry-after"] == "1"
            if st == 429:
                assert doc["error"]["type"] == "requests"
                assert h["x-ratelimit-limit-requests"] == "2"   # 4 / 2
            if st == 200 and mode == "local":
                assert h["x-ratelimit-limit-requests"] == "2"
        assert got == MODES[mode], got

        # Redis returns (empty, on the same port): the global limit of 4
        # holds again once the workers have reconnected
        r = FixedRedis(str(tmp_path), port=r.port).wait_ready()

        def counted():
            st, h, doc = chat(n, key=key)
            return r.command("EXISTS", "llm:rl:{m}") == b":1\r\n"
        wait_for(counted, 15, "requests counted in Redis again", step=0.2)
        r.command("DEL", "llm:rl:{m}")

        # every worker is back on Redis: 4 pass in all, then 429
        wait_for(lambda: all(chat(n, key=key)[1].get(
                                 "x-ratelimit-limit-requests") == "4"
                             for _ in range(8)), 15, "all workers on Redis",
                 step=0.2)
        r.command("DEL", "llm:rl:{m}")
        res = parallel(lambda i: chat(n, key=key), 6)
        codes = sorted(x[0] for x in res)
        assert codes == [200] * 4 + [429] * 2, codes

        # no worker crashed or was replaced
        assert set(n.worker_pids()) == pids
    finally:
        n.stop()
        r.stop()
    n.check_log()


def test_frozen_redis_times_out_and_falls_back(nginx_module, engine,
                                               model_path, tmp_path,
                                               redis_bin):
    """A Redis that accepts but never answers (SIGSTOP): the command
    timeout (300 ms) gives up, the fallback decides, nothing blocks."""
    key = "sk-frozen-test-000000000000"
    r = FixedRedis(str(tmp_path)).wait_ready()
    f = write_tenants(str(tmp_path / "tenants.json"), [
        tenant("f", key=key, limits={"requests_per_minute": 100})])

    def factory(engines, **kw):
        return start_nginx(str(tmp_path / "nginx"), engines, model_path,
                           **kw)

    n = nginx_with(factory, engine.addr, f, redis=r, workers=2,
                   http="llm_limits redis; llm_limits_fail local;")
    try:
        assert chat(n, key=key)[0] == 200
        r.proc.send_signal(signal.SIGSTOP)
        for i in range(3):
            t0 = time.monotonic()
            st, h, doc = chat(n, key=key, timeout=10)
            took = time.monotonic() - t0
            assert st == 200, doc
            assert took < 2.5, took
        # meanwhile the worker still serves requests that need no Redis
        st, _, data = n.request("GET", "/v1/models",
                                headers={"Authorization": "Bearer " + key})
        assert st == 200
        r.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: (chat(n, key=key)[0] == 200 and
                          r.command("EXISTS", "llm:rl:{f}") == b":1\r\n"),
                 15, "back on Redis", step=0.2)
    finally:
        try:
            r.proc.send_signal(signal.SIGCONT)
        except OSError:
            pass
        n.stop()
        r.stop()
    n.check_log()
    assert "no reply in 300 ms" in n.error_log_text()


def test_limits_redis_needs_llm_redis(nginx_module, model_path, tmp_path):
    from nginx_proc import Nginx
    f = write_tenants(str(tmp_path / "t.json"), TENANTS)
    n = Nginx(str(tmp_path), "unix:/nonexistent.sock", model_path,
              http_extra="llm_tenants %s; llm_limits redis;" % f)
    t = n.test_config()
    assert t.returncode != 0 and "llm_redis" in t.stderr, t.stderr
