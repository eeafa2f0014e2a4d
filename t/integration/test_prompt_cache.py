"""The prompt cache (llm_prompt_cache): exact answers of deterministic
requests in a real redis-server, in front of the real llm-engine.

MISS then HIT with the same content (JSON and SSE, chat and completions,
logprobs), a new id; stream and non-stream share an entry; requests that
are not deterministic get no header and are not stored; another tenant's
namespace misses, a shared one hits; a location or tenant that opts out
gets no header; another NGINX host on the same Redis hits; Redis stopped
or garbage in an entry: answers still come (MISS), no worker crashes;
llm_prompt_cache_charge on/off in x-ratelimit-remaining-tokens; the TTL;
the /metrics counters; nginx -t refuses bad values.
"""

import json
import os
import signal
import time

import pytest

import cache_util
from cache_util import (pc_keys, sse, sse_text, strip_volatile, wait_keys)
from conftest import free_port, wait_until
from nginx_proc import Nginx, nginx_module, start_nginx  # noqa: F401
from tenants_util import (FixedRedis, metric, metrics_text, redis_set,
                          tenant, write_tenants)

MODEL = "smollm2"
KA = "sk-pcache-a-000000000000000000"
KA2 = "sk-pcache-a2-00000000000000000"
KB = "sk-pcache-b-000000000000000000"
KOFF = "sk-pcache-off-0000000000000000"
KON = "sk-pcache-on-00000000000000000"
KTOK = "sk-pcache-tok-0000000000000000"
KRPM = "sk-pcache-rpm-0000000000000000"

TENANTS = [
    tenant("a", key=KA),
    tenant("a2", key=KA2, cache_namespace="a"),     # shares a's entries
    tenant("b", key=KB),
    tenant("off", key=KOFF, prompt_cache=False),
    tenant("on", key=KON, prompt_cache=True),
    tenant("tok", key=KTOK, limits={"tokens_per_minute": 600}),
    tenant("rpm", key=KRPM, limits={"requests_per_minute": 2}),
]


class Server:
    """One server block of the nginx under test (its own port)."""

    def __init__(self, n, port):
        self.n = n
        self.port = port

    def post(self, path, body, key=None, timeout=120.0):
        return cache_util.post(self.port, path, body, key, timeout)

    def chat(self, key, content, **kw):
        b = {"model": MODEL, "max_tokens": 8, "temperature": 0,
             "messages": [{"role": "user", "content": content}]}
        b.update(kw)
        st, h, data = self.post("/chat/completions", b, key)
        doc = json.loads(data) if not b.get("stream") and data else data
        return st, h, doc


def cache_conf(tenants_file, redis, metrics_port, port_off, port_nocharge,
               http=""):
    return """
    llm_tenants %s;
    llm_redis %s timeout=300ms connect_timeout=300ms;
    log_format pcache '$status $llm_tenant cache=[$llm_cache] '
                      'prompt=$llm_prompt_tokens '
                      'completion=$llm_completion_tokens';
    access_log pcache.log pcache;
    %s
    server { listen 127.0.0.1:%d; location = /metrics { llm_metrics; } }
    server { listen 127.0.0.1:%d;
             location /v1/ { llm_api openai; } }
    server { listen 127.0.0.1:%d;
             location /v1/ { llm_api openai; llm_prompt_cache on;
                             llm_prompt_cache_charge off; } }
    """ % (tenants_file, redis.addr, http, metrics_port, port_off,
           port_nocharge)


def start_cache_nginx(prefix, engine_addr, model_path, tenants_file, redis,
                      http="", location="llm_prompt_cache on;"):
    mport, poff, pnc = free_port(), free_port(), free_port()
    extra = cache_conf(tenants_file, redis, mport, poff, pnc, http)
    n = start_nginx(prefix, engine_addr, model_path, workers=1,
                    http_extra=extra, location_extra=location)
    n.metrics_port = mport
    n.main = Server(n, n.port)
    n.off = Server(n, poff)
    n.nocharge = Server(n, pnc)
    # the worker meets the engine (its fingerprint keys the cache)
    st, _, _ = n.main.chat(KA, "warm up", temperature=0.9, max_tokens=1)
    assert st == 200
    return n


@pytest.fixture(scope="module")
def ng(nginx_module, engine, model_path, redis_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("pcache")
    f = write_tenants(str(d / "tenants.json"), TENANTS)
    n = start_cache_nginx(str(d / "nginx"), engine.addr, model_path, f,
                          redis_server,
                          location="llm_prompt_cache on; "
                                   "llm_prompt_cache_ttl 42s;")
    n.tenants_file = f
    try:
        yield n
    finally:
        n.stop()
        n.check_log()


@pytest.fixture(autouse=True)
def flush(redis_server):
    redis_server.command("FLUSHALL")


def same_answer(a, b):
    """Two live answers: the same choices and token counts (the engine's
    prefix cache may reuse a different number of prompt tokens)."""
    return (a["choices"] == b["choices"]
            and a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
            and a["usage"]["completion_tokens"]
            == b["usage"]["completion_tokens"])


def access(n):
    p = os.path.join(n.prefix, "pcache.log")
    with open(p) as f:
        return f.read().splitlines()


# ---- MISS, HIT ------------------------------------------------------------

def test_miss_then_hit_same_body(ng, redis_server):
    st, h1, d1 = ng.main.chat(KA, "Name a colour.")
    assert st == 200, d1
    assert h1["x-llm-cache"] == "MISS"
    wait_keys(redis_server, 1)

    st, h2, d2 = ng.main.chat(KA, "Name a colour.")
    assert st == 200, d2
    assert h2["x-llm-cache"] == "HIT"
    assert d2["id"] != d1["id"] and d2["id"].startswith("chatcmpl-")
    assert d2["created"] >= d1["created"]
    assert strip_volatile(d2) == strip_volatile(d1)
    assert d2["usage"]["prompt_tokens_details"]["cached_tokens"] == \
        d1["usage"]["prompt_tokens_details"]["cached_tokens"]

    # "user" does not change the answer: the same entry
    st, h3, d3 = ng.main.chat(KA, "Name a colour.", user="someone")
    assert h3["x-llm-cache"] == "HIT"
    assert strip_volatile(d3) == strip_volatile(d1)

    # another max_tokens is another request
    st, h4, _ = ng.main.chat(KA, "Name a colour.", max_tokens=5)
    assert h4["x-llm-cache"] == "MISS"

    def logged():
        return any("cache=[HIT]" in l for l in access(ng))
    wait_until(logged, 5, "access log")
    assert any(l.startswith("200 a cache=[HIT] prompt=%d completion=%d"
                            % (d1["usage"]["prompt_tokens"],
                               d1["usage"]["completion_tokens"]))
               for l in access(ng))


def test_stream_hit_matches_live(ng, redis_server):
    body = dict(stream=True, stream_options={"include_usage": True})
    st, h1, raw1 = ng.main.chat(KA, "Count to five.", **body)
    assert st == 200 and h1["x-llm-cache"] == "MISS"
    ev1, done1 = sse(raw1)
    assert done1
    wait_keys(redis_server, 1)

    st, h2, raw2 = ng.main.chat(KA, "Count to five.", **body)
    assert st == 200 and h2["x-llm-cache"] == "HIT"
    assert h2["content-type"].startswith("text/event-stream")
    ev2, done2 = sse(raw2)
    assert done2
    assert sse_text(ev2) == sse_text(ev1) != ""

    # the shape of a live stream: role, content, finish, usage
    assert ev2[0]["choices"][0]["delta"] == {"role": "assistant",
                                             "content": ""}
    finals = [e for e in ev2 if e["choices"]
              and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    assert finals[0]["choices"][0]["finish_reason"] == \
        [e for e in ev1 if e["choices"]
         and e["choices"][0]["finish_reason"]][0]["choices"][0][
             "finish_reason"]
    assert ev2[-1]["choices"] == [] and ev2[-1]["usage"] == ev1[-1]["usage"]
    ids = {e["id"] for e in ev2}
    assert len(ids) == 1 and ids != {e["id"] for e in ev1}
    for e in ev2:
        assert e["object"] == "chat.completion.chunk"
        assert e["model"] == MODEL
        if e["choices"]:
            assert e["usage"] is None

    # the same request without stream: the same entry
    st, h3, d3 = ng.main.chat(KA, "Count to five.")
    assert h3["x-llm-cache"] == "HIT"
    assert d3["choices"][0]["message"]["content"] == sse_text(ev1)
    assert d3["usage"] == ev1[-1]["usage"]


def test_openai_sdk_hit(ng, redis_server):
    import openai
    c = openai.OpenAI(base_url=ng.base_url, api_key=KA, max_retries=0,
                      timeout=120)
    msgs = [{"role": "user", "content": "Say hi to the SDK."}]
    r1 = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert r1.headers["x-llm-cache"] == "MISS"
    wait_keys(redis_server, 1)
    r2 = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert r2.headers["x-llm-cache"] == "HIT"
    a, b = r1.parse(), r2.parse()
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=6, temperature=0,
        stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks
                   if ch.choices) == a.choices[0].message.content


def test_completions_logprobs_echo(ng, redis_server):
    b = {"model": MODEL, "prompt": "The capital of France is",
         "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True}
    st, h1, d1 = ng.main.post("/completions", b, KA)
    assert st == 200 and h1["x-llm-cache"] == "MISS", d1
    wait_keys(redis_server, 1)
    st, h2, d2 = ng.main.post("/completions", b, KA)
    assert st == 200 and h2["x-llm-cache"] == "HIT", d2
    d1, d2 = json.loads(d1), json.loads(d2)
    assert d2["id"].startswith("cmpl-") and d2["id"] != d1["id"]
    assert strip_volatile(d2) == strip_volatile(d1)
    assert d2["choices"][0]["text"].startswith("The capital of France is")
    assert d2["choices"][0]["logprobs"]["text_offset"] == \
        d1["choices"][0]["logprobs"]["text_offset"]

    # streamed from the entry
    b["stream"] = True
    st, h3, raw = ng.main.post("/completions", b, KA)
    assert h3["x-llm-cache"] == "HIT"
    ev, done = sse(raw)
    assert done and sse_text(ev) == d1["choices"][0]["text"]


def test_chat_logprobs(ng, redis_server):
    kw = dict(logprobs=True, top_logprobs=2)
    st, h1, d1 = ng.main.chat(KA, "One word please.", **kw)
    assert h1["x-llm-cache"] == "MISS"
    wait_keys(redis_server, 1)
    st, h2, d2 = ng.main.chat(KA, "One word please.", **kw)
    assert h2["x-llm-cache"] == "HIT"
    assert d2["choices"][0]["logprobs"] == d1["choices"][0]["logprobs"]
    assert d2["choices"][0]["logprobs"]["content"]
    # without logprobs: another request
    st, h3, d3 = ng.main.chat(KA, "One word please.")
    assert h3["x-llm-cache"] == "MISS"
    assert d3["choices"][0]["logprobs"] is None


# ---- what is cached -------------------------------------------------------

def test_seed_is_deterministic(ng, redis_server):
    kw = dict(temperature=0.8, seed=1234)
    st, h1, d1 = ng.main.chat(KA, "Tell me a fruit.", **kw)
    assert h1["x-llm-cache"] == "MISS"
    wait_keys(redis_server, 1)
    st, h2, d2 = ng.main.chat(KA, "Tell me a fruit.", **kw)
    assert h2["x-llm-cache"] == "HIT"
    assert strip_volatile(d2) == strip_volatile(d1)


def test_random_sampling_not_cached(ng, redis_server):
    for _ in range(2):
        st, h, d = ng.main.chat(KA, "Random words.", temperature=0.8)
        assert st == 200, d
        assert "x-llm-cache" not in h
    # nothing was stored (the SET would follow the response)
    time.sleep(0.3)
    assert pc_keys(redis_server) == []

    def logged():
        return sum("cache=[]" in l for l in access(ng)) >= 2
    wait_until(logged, 5, "access log")


def test_errors_are_not_stored(ng, redis_server):
    # refused before the lookup (context length): no header, nothing kept
    st, h, d = ng.main.chat(KA, "x" * 10, max_tokens=10 ** 6)
    assert st == 400 and "x-llm-cache" not in h
    time.sleep(0.2)
    assert pc_keys(redis_server) == []


# ---- namespaces and opt-in -------------------------------------------------

def test_tenant_namespaces(ng, redis_server):
    st, h, d1 = ng.main.chat(KA, "Which namespace?")
    assert h["x-llm-cache"] == "MISS"
    wait_keys(redis_server, 1)
    # b has its own namespace: never a's answers
    st, h, _ = ng.main.chat(KB, "Which namespace?")
    assert h["x-llm-cache"] == "MISS"
    # a2 was given a's namespace by the operator
    st, h, d2 = ng.main.chat(KA2, "Which namespace?")
    assert h["x-llm-cache"] == "HIT"
    assert strip_volatile(d2) == strip_volatile(d1)
    wait_keys(redis_server, 2)
    assert len(pc_keys(redis_server)) == 2


def test_opt_out_and_tenant_override(ng, redis_server):
    # a location without llm_prompt_cache: no header, nothing stored
    st, h, _ = ng.off.chat(KA, "Opt out?")
    assert st == 200 and "x-llm-cache" not in h
    # a tenant with "prompt_cache": false at a location with it on
    st, h, _ = ng.main.chat(KOFF, "Opt out?")
    assert st == 200 and "x-llm-cache" not in h
    time.sleep(0.2)
    assert pc_keys(redis_server) == []
    # a tenant with "prompt_cache": true where the location has it off
    st, h, _ = ng.off.chat(KON, "Opt in?")
    assert h["x-llm-cache"] == "MISS"
    wait_keys(redis_server, 1)
    st, h, _ = ng.off.chat(KON, "Opt in?")
    assert h["x-llm-cache"] == "HIT"


def test_ttl(ng, redis_server):
    ng.main.chat(KA, "How long?")
    (k,) = wait_keys(redis_server, 1)
    ttl = int(redis_server.command("TTL", k)[1:].split(b"\r\n")[0])
    assert 0 < ttl <= 42
    assert k.startswith("llm:pc:") and len(k) == len("llm:pc:") + 64


def test_another_host_hits(ng, nginx_module, engine, model_path,
                           redis_server, tmp_path):
    st, h, d1 = ng.main.chat(KA, "Across hosts.")
    assert h["x-llm-cache"] == "MISS"
    wait_keys(redis_server, 1)
    n2 = start_cache_nginx(str(tmp_path / "host2"), engine.addr, model_path,
                           ng.tenants_file, redis_server)
    try:
        st, h, d2 = n2.main.chat(KA, "Across hosts.")
        assert h["x-llm-cache"] == "HIT"
        assert strip_volatile(d2) == strip_volatile(d1)
    finally:
        n2.stop()
        n2.check_log()


# ---- limits ----------------------------------------------------------------

def remaining(h):
    return int(h["x-ratelimit-remaining-tokens"])


def test_charge_on_and_off(ng, redis_server):
    t0 = time.monotonic()
    st, h1, d1 = ng.main.chat(KTOK, "Charge me.")
    assert st == 200 and h1["x-llm-cache"] == "MISS", d1
    p, c = d1["usage"]["prompt_tokens"], d1["usage"]["completion_tokens"]
    r1 = remaining(h1)
    assert r1 <= 600 - p - 8
    wait_keys(redis_server, 1)
    time.sleep(0.1)         # the refund of the unused max_tokens lands

    # llm_prompt_cache_charge on: the hit takes prompt + completion
    st, h2, _ = ng.main.chat(KTOK, "Charge me.")
    assert h2["x-llm-cache"] == "HIT"
    slack = int((time.monotonic() - t0) * 600 / 60) + 2
    expect = r1 + (8 - c) - (p + c)
    assert expect - 1 <= remaining(h2) <= expect + slack, \
        (remaining(h2), expect, slack)

    # off: only the request counts
    t1 = time.monotonic()
    st, h3, _ = ng.nocharge.chat(KTOK, "Charge me.")
    assert h3["x-llm-cache"] == "HIT"
    slack = int((time.monotonic() - t1) * 600 / 60) + 2
    assert remaining(h2) - 1 <= remaining(h3) <= remaining(h2) + slack
    assert remaining(h3) > remaining(h2) - (p + c)


def test_a_hit_still_counts_as_a_request(ng, redis_server):
    assert ng.main.chat(KRPM, "Limit me.")[1]["x-llm-cache"] == "MISS"
    wait_keys(redis_server, 1)
    st, h, _ = ng.main.chat(KRPM, "Limit me.")
    assert st == 200 and h["x-llm-cache"] == "HIT"
    assert h["x-ratelimit-remaining-requests"] == "0"
    # refused: the error carries no X-LLM-Cache
    st, h, d = ng.main.chat(KRPM, "Limit me.")
    assert st == 429 and d["error"]["type"] == "requests", d
    assert "x-llm-cache" not in h


# ---- Redis trouble ---------------------------------------------------------

def test_corrupt_entry_is_a_miss(ng, redis_server):
    st, h, d1 = ng.main.chat(KA, "Corrupt me.")
    (k,) = wait_keys(redis_server, 1)
    for garbage in (b"\x00\xffgarbage", b'{"v": 2, "text": "x"}',
                    b'{"v": 1, "endpoint": "chat", "text": "trunc',
                    b'{"v": 1, "endpoint": "chat", "text": "x", '
                    b'"finish_reason": "stop", "prompt_tokens": -1}'):
        redis_set(redis_server, k, garbage)
        st, h, d = ng.main.chat(KA, "Corrupt me.")
        assert st == 200, d
        assert h["x-llm-cache"] == "MISS"
        assert same_answer(d, d1)
        # the live answer replaced the bad entry
        wait_until(lambda: not redis_server.command("GET", k)
                   .split(b"\r\n")[1].startswith(garbage[:8]), 5,
                   "entry rewritten")
    st, h, d = ng.main.chat(KA, "Corrupt me.")
    assert h["x-llm-cache"] == "HIT"
    assert "ignored a bad entry" in ng.error_log_text()


def test_redis_stopped(nginx_module, engine, model_path, redis_bin,
                       tmp_path):
    r = FixedRedis(str(tmp_path)).wait_ready()
    f = write_tenants(str(tmp_path / "tenants.json"), TENANTS)
    n = start_cache_nginx(str(tmp_path / "nginx"), engine.addr, model_path,
                          f, r)
    try:
        pids = n.worker_pids()
        st, h, d1 = n.main.chat(KA, "Redis away.")
        assert h["x-llm-cache"] == "MISS"
        wait_keys(r, 1)
        assert n.main.chat(KA, "Redis away.")[1]["x-llm-cache"] == "HIT"

        # frozen: the GET times out (llm_redis timeout=300ms), a miss
        os.kill(r.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            st, h, d = n.main.chat(KA, "Redis away.")
            assert st == 200 and h["x-llm-cache"] == "MISS", d
            assert time.monotonic() - t0 < 10
        finally:
            os.kill(r.pid, signal.SIGCONT)
        r.stop()

        for i in range(3):
            for stream in (False, True):
                st, h, d = n.main.chat(KA, "Redis away.", stream=stream)
                assert st == 200, d
                assert h.get("x-llm-cache", "MISS") == "MISS"
        st, h, d = n.main.chat(KA, "Redis away.")
        assert same_answer(d, d1)
        assert n.worker_pids() == pids

        # Redis back: stored and hit again
        r2 = FixedRedis(str(tmp_path), port=r.port).wait_ready()
        try:
            def cached():
                n.main.chat(KA, "Redis back.")
                return n.main.chat(KA, "Redis back.")[1].get(
                    "x-llm-cache") == "HIT"
            wait_until(cached, 20, "prompt cache after Redis returned",
                       step=0.3)
        finally:
            r2.stop()
    finally:
        n.stop()
        n.check_log()


# ---- metrics ---------------------------------------------------------------

def test_metrics_counters(ng, redis_server):
    _, t0 = metrics_text(ng)

    def v(text, name):
        return metric(text, name, tenant="b") or 0

    ng.main.chat(KB, "Metrics one.")
    wait_keys(redis_server, 1)
    ng.main.chat(KB, "Metrics one.")
    ng.main.chat(KB, "Metrics one.")

    def counted():
        _, t = metrics_text(ng)
        return (v(t, "llm_prompt_cache_hits_total")
                == v(t0, "llm_prompt_cache_hits_total") + 2
                and v(t, "llm_prompt_cache_misses_total")
                == v(t0, "llm_prompt_cache_misses_total") + 1
                and v(t, "llm_prompt_cache_stores_total")
                == v(t0, "llm_prompt_cache_stores_total") + 1)
    wait_until(counted, 5, "prompt cache counters")
    _, t = metrics_text(ng)
    assert "# TYPE llm_prompt_cache_errors_total counter" in t


# ---- nginx -t ----------------------------------------------------------------

BAD = [
    ("", "llm_prompt_cache on;", "requires \"llm_redis\""),
    ("llm_redis 127.0.0.1:1;", "llm_prompt_cache maybe;",
     "invalid value"),
    ("llm_redis 127.0.0.1:1;", "llm_prompt_cache_ttl 0;",
     "must be from 1s to 365d"),
    ("llm_redis 127.0.0.1:1;", "llm_prompt_cache_ttl forever;",
     "invalid value"),
    ("", "llm_prompt_cache_charge sometimes;", "invalid value"),
    ("", "llm_cache_shared_namespace \"a\tb\";", "invalid shared namespace"),
    ("", "llm_cache_shared_namespace %s;" % ("n" * 129),
     "invalid shared namespace"),
]


@pytest.mark.parametrize("http,location,message", BAD)
def test_nginx_t_refuses(nginx_module, model_path, tmp_path, http, location,
                         message):
    n = Nginx(str(tmp_path), "unix:" + str(tmp_path / "none.sock"),
              model_path, http_extra=http, location_extra=location)
    t = n.test_config()
    assert t.returncode != 0
    assert message in t.stderr, t.stderr


@pytest.mark.parametrize("fields,message", [
    ({"prompt_cache": "yes"}, "\"prompt_cache\" is true or false"),
    ({"shared_cache_namespace": 5}, "\"shared_cache_namespace\" is a string"),
    ({"shared_cache_namespace": "a\nb"},
     "\"shared_cache_namespace\" is a string"),
    ({"prompt_cache": True}, "requires \"llm_redis\""),
])
def test_nginx_t_refuses_tenant_fields(nginx_module, model_path, tmp_path,
                                       fields, message):
    f = write_tenants(str(tmp_path / "t.json"),
                      [tenant("x", key="sk-x-0000000000000000", **fields)])
    n = Nginx(str(tmp_path), "unix:" + str(tmp_path / "none.sock"),
              model_path, http_extra="llm_tenants %s;" % f)
    t = n.test_config()
    assert t.returncode != 0
    assert message in t.stderr, t.stderr


def test_nginx_t_accepts(nginx_module, model_path, tmp_path):
    f = write_tenants(str(tmp_path / "t.json"), [
        tenant("x", key="sk-x-0000000000000000", prompt_cache=True,
               shared_cache_namespace="public"),
        tenant("y", key="sk-y-0000000000000000", prompt_cache=False,
               shared_cache_namespace="")],
        defaults={"prompt_cache": False, "shared_cache_namespace": "pub"})
    n = Nginx(str(tmp_path), "unix:" + str(tmp_path / "none.sock"),
              model_path,
              http_extra="llm_tenants %s; llm_redis 127.0.0.1:1; "
                         "llm_prompt_cache_ttl 1h;" % f,
              location_extra="llm_prompt_cache on; "
                             "llm_prompt_cache_charge off; "
                             "llm_cache_shared_namespace public;")
    t = n.test_config()
    assert t.returncode == 0, t.stderr
