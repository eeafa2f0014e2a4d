"""The shared prefix namespace (llm_cache_shared_namespace, a tenant's
"shared_cache_namespace"), what SUBMIT carries for the engine's prefix
cache, and the prefix cache metrics.

Engine-independent checks use a stand-in engine (cache_util.FakeEngine)
that records the SUBMITs the module sends: the tenant's namespace, the
shared namespace and cache_shared_tokens, which must be exactly the
tokens of the leading system (and developer) messages as the chat
template renders them alone (checked against llama.cpp's tokenizer of the
same GGUF file); never set by the client.  The same stand-in checks the
llm_prefix_cache_* metrics from STATS' prefix part, and that the prompt
cache key follows the adapter version and the model fingerprint.

End to end with the real llm-engine (skipped while its STATS has no
prefix cache part): tenant B reuses the blocks of tenant A's system
prompt through the shared namespace, and gets nothing of a private one.
"""

import json
import os
import time

import pytest

from cache_util import FakeEngine, model_vocab, pc_keys, post, wait_keys
from conftest import free_port, wait_until
from nginx_proc import nginx_module, start_nginx  # noqa: F401
from tenants_util import metric, metrics_text, tenant, write_tenants

MODEL = "smollm2"
KA = "sk-ns-a-00000000000000000000"
KB = "sk-ns-b-00000000000000000000"
KOWN = "sk-ns-own-000000000000000000"
KNONE = "sk-ns-none-00000000000000000"

TENANTS = [
    tenant("a", key=KA),
    tenant("b", key=KB),
    tenant("own", key=KOWN, shared_cache_namespace="own-public"),
    tenant("none", key=KNONE, shared_cache_namespace=""),
]

SYSTEM = "You are a terse assistant. Answer in one sentence."


def chat(port, key, messages, **kw):
    b = {"model": MODEL, "messages": messages, "max_tokens": 4,
         "temperature": 0}
    b.update(kw)
    st, h, data = post(port, "/chat/completions", b, key)
    return st, h, json.loads(data)


@pytest.fixture(scope="module")
def vocab_tok(model_path):
    """llama.cpp's tokenizer of the model (an independent one)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        pytest.skip("llama_cpp not installed")
    m = Llama(model_path, vocab_only=True, verbose=False)
    return lambda text: m.tokenize(text.encode(), add_bos=False,
                                   special=True)


def chatml_system(*contents):
    """What SmolLM2's (ChatML) template renders for leading system
    messages alone, without the generation prompt."""
    return "".join("<|im_start|>system\n%s<|im_end|>\n" % c
                   for c in contents)


# ---- a stand-in engine ------------------------------------------------------

@pytest.fixture(scope="module")
def fake(model_path, tmp_path_factory):
    e = FakeEngine(tmp_path_factory.mktemp("fake"), model_vocab(model_path))
    yield e
    e.close()


@pytest.fixture(scope="module")
def ngf(nginx_module, fake, model_path, tmp_path_factory):
    """nginx in front of the stand-in: /v1/ with a shared namespace, a
    second server without one, /metrics."""
    d = tmp_path_factory.mktemp("ns")
    f = write_tenants(str(d / "tenants.json"), TENANTS)
    pport, mport = free_port(), free_port()
    n = start_nginx(str(d / "nginx"), fake.addr, model_path, workers=1,
                    location_extra="llm_cache_shared_namespace public;",
                    http_extra=ns_conf(f, pport, mport))
    n.plain_port, n.metrics_port = pport, mport
    try:
        yield n
    finally:
        n.stop()
        n.check_log()


def ns_conf(tenants_file, plain_port, metrics_port):
    return """
    llm_tenants %s;
    log_format ns '$llm_tenant shared=$llm_cache_shared_tokens';
    access_log ns.log ns;
    server { listen 127.0.0.1:%d;
             location /v1/ { llm_api openai; } }
    server { listen 127.0.0.1:%d; location = /metrics { llm_metrics; } }
    """ % (tenants_file, plain_port, metrics_port)


def submit_of(fake, fn):
    """Runs fn() and returns the SUBMIT it caused."""
    before = len(fake.submits)
    r = fn()
    wait_until(lambda: len(fake.submits) > before, 5, "SUBMIT")
    return r, fake.submits[before]


def test_shared_tokens_are_the_system_prompt(ngf, fake, vocab_tok):
    msgs = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hello there"}]
    (st, h, doc), s = submit_of(fake, lambda: chat(ngf.port, KA, msgs))
    assert st == 200, doc
    want = vocab_tok(chatml_system(SYSTEM))
    assert s["cache_namespace"] == "a"
    assert s["cache_shared_namespace"] == "public"
    assert s["cache_shared_tokens"] == len(want)
    assert s["prompt"][:len(want)] == want
    # the rest (the user turn) is not part of it
    assert s["n_prompt"] > len(want)
    assert doc["usage"]["prompt_tokens"] == s["n_prompt"]

    def logged():
        p = os.path.join(ngf.prefix, "ns.log")
        return os.path.exists(p) and \
            "a shared=%d" % len(want) in open(p).read()
    wait_until(logged, 5, "$llm_cache_shared_tokens in the access log")


def test_shared_tokens_cases(ngf, fake, vocab_tok):
    sys2 = "Be brief."
    cases = [
        # (messages, key, port, shared namespace, system contents)
        ([{"role": "developer", "content": SYSTEM},
          {"role": "user", "content": "Hi"}], KA, ngf.port, "public",
         [SYSTEM]),
        ([{"role": "system", "content": SYSTEM},
          {"role": "system", "content": sys2},
          {"role": "user", "content": "Hi"}], KB, ngf.port, "public",
         [SYSTEM, sys2]),
        # only the leading ones
        ([{"role": "system", "content": SYSTEM},
          {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."},
          {"role": "system", "content": sys2},
          {"role": "user", "content": "And?"}], KA, ngf.port, "public",
         [SYSTEM]),
        # no leading system message: nothing is public
        ([{"role": "user", "content": "Hi"},
          {"role": "system", "content": SYSTEM}], KA, ngf.port, "", []),
        # the tenant's own shared namespace wins over the location's
        ([{"role": "system", "content": SYSTEM},
          {"role": "user", "content": "Hi"}], KOWN, ngf.port, "own-public",
         [SYSTEM]),
        # "" in the tenant: none, whatever the location says
        ([{"role": "system", "content": SYSTEM},
          {"role": "user", "content": "Hi"}], KNONE, ngf.port, "", []),
        # a location without one
        ([{"role": "system", "content": SYSTEM},
          {"role": "user", "content": "Hi"}], KA, ngf.plain_port, "", []),
        # the tenant's field where the location has none
        ([{"role": "system", "content": SYSTEM},
          {"role": "user", "content": "Hi"}], KOWN, ngf.plain_port,
         "own-public", [SYSTEM]),
    ]
    for msgs, key, port, ns, systems in cases:
        (st, h, doc), s = submit_of(fake, lambda: chat(port, key, msgs))
        assert st == 200, doc
        want = vocab_tok(chatml_system(*systems)) if systems else []
        assert s["cache_shared_namespace"] == ns, (msgs, key)
        assert s["cache_shared_tokens"] == len(want), (msgs, key)
        assert s["prompt"][:len(want)] == want


def test_client_cannot_choose(ngf, fake):
    msgs = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi"}]
    (st, h, doc), s = submit_of(fake, lambda: chat(
        ngf.port, KB, msgs, cache_namespace="a",
        cache_shared_namespace="evil", cache_shared_tokens=9999))
    assert st == 200, doc
    assert s["cache_namespace"] == "b"
    assert s["cache_shared_namespace"] == "public"
    assert s["cache_shared_tokens"] < s["n_prompt"]


def test_completions_share_nothing(ngf, fake):
    (st, h, _), s = submit_of(fake, lambda: post(
        ngf.port, "/completions",
        {"model": MODEL, "prompt": "<|im_start|>system\nx<|im_end|>\n",
         "max_tokens": 2}, KA))
    assert st == 200
    assert s["cache_shared_tokens"] == 0
    assert s["cache_shared_namespace"] == ""
    assert s["cache_namespace"] == "a"


def test_prefix_metrics(ngf):
    _, text = metrics_text(ngf)
    eng = dict(engine=ngf_engine_name(ngf))
    assert metric(text, "llm_prefix_cache_hit_tokens_total", **eng) == 1234
    assert metric(text, "llm_prefix_cache_tier_hit_tokens_total",
                  **eng) == 567
    assert metric(text, "llm_prefix_cache_blocks_cached", **eng) == 7
    assert metric(text, "llm_prefix_cache_blocks_reusable", **eng) == 5
    assert metric(text, "llm_prefix_cache_lookups_total", **eng) == 11
    assert metric(text, "llm_prefix_cache_evictions_total", **eng) == 3
    assert metric(text, "llm_prefix_cache_tier_connected", **eng) == 1
    assert metric(text, "llm_prefix_cache_tier_enabled", **eng) == 1
    assert metric(text, "llm_prefix_cache_tier_puts_total", **eng) == 21
    assert metric(text, "llm_prefix_cache_tier_put_bytes_total",
                  **eng) == 4096
    assert metric(text, "llm_prefix_cache_tier_puts_dropped_total",
                  **eng) == 2
    assert metric(text, "llm_prefix_cache_tier_lookups_total", **eng) == 13
    assert metric(text, "llm_prefix_cache_tier_blocks_hit_total",
                  **eng) == 8
    assert metric(text, "llm_prefix_cache_tier_blocks_missed_total",
                  **eng) == 5
    assert metric(text, "llm_prefix_cache_tier_corrupt_total", **eng) == 1
    assert metric(text, "llm_prefix_cache_tier_errors_total", **eng) == 4
    assert metric(text, "llm_prefix_cache_bytes", **eng) == 2580480
    assert metric(text, "llm_prefix_cache_tier_stored_bytes", **eng) == 8192
    assert "# TYPE llm_prefix_cache_hit_tokens_total counter" in text
    assert "# TYPE llm_prefix_cache_blocks_cached gauge" in text


def ngf_engine_name(n):
    with open(n.conf) as f:
        for line in f:
            line = line.strip()
            if line.startswith("llm_engine "):
                return line.split()[1].rstrip(";")
    raise AssertionError("no llm_engine")


def test_no_prefix_metrics_without_that_part(nginx_module, model_path,
                                             tmp_path):
    e = FakeEngine(tmp_path, model_vocab(model_path), prefix_stats=False)
    mport = free_port()
    n = start_nginx(str(tmp_path / "nginx"), e.addr, model_path, workers=1,
                    http_extra="server { listen 127.0.0.1:%d; location = "
                               "/metrics { llm_metrics; } }" % mport)
    n.metrics_port = mport
    try:
        wait_until(lambda: "llm_engine_up{" in metrics_text(n)[1]
                   and metric(metrics_text(n)[1], "llm_engine_up",
                              engine=e.addr) == 1, 5, "engine up")
        _, text = metrics_text(n)
        assert "llm_prefix_cache" not in text
        assert metric(text, "llm_engine_steps_total", engine=e.addr) == 10
    finally:
        n.stop()
        n.check_log()
        e.close()


# ---- the prompt cache key: adapter version, model fingerprint -------------

def pc_nginx(tmp_path, name, engine, model_path, redis):
    return start_nginx(str(tmp_path / name), engine.addr, model_path,
                       workers=1,
                       http_extra="llm_redis %s timeout=300ms; "
                                  "llm_adapters_cache_time 100ms;"
                                  % redis.addr,
                       location_extra="llm_prompt_cache on;")


def warm(n):
    """The worker meets its engine (the fingerprint keys the cache); a
    sampled request, never cached."""
    st, h, _ = n.post("/chat/completions", {
        "model": MODEL, "temperature": 0.9, "max_tokens": 1,
        "messages": [{"role": "user", "content": "warm"}]})
    assert st == 200 and "x-llm-cache" not in h


def pc_chat(n, model=MODEL):
    st, h, data = n.post("/chat/completions", {
        "model": model, "temperature": 0, "max_tokens": 3,
        "messages": [{"role": "user", "content": "Key me."}]})
    return st, h.get("x-llm-cache"), data


def test_adapter_version_keys_the_cache(nginx_module, model_path, tmp_path,
                                        redis_server):
    redis_server.command("FLUSHALL")
    e = FakeEngine(tmp_path, model_vocab(model_path),
                   adapters=[("ad1", "00000000000000v1"), ("cold", "")])
    n = pc_nginx(tmp_path, "nginx", e, model_path, redis_server)
    try:
        warm(n)
        assert pc_chat(n, "ad1")[:2] == (200, "MISS")
        wait_keys(redis_server, 1)
        assert pc_chat(n, "ad1")[:2] == (200, "HIT")
        assert e.last_submit()["adapter"] == "ad1"

        # a new version of the adapter: a new key
        e.adapters = [("ad1", "00000000000000v2"), ("cold", "")]
        time.sleep(0.25)                    # llm_adapters_cache_time
        assert pc_chat(n, "ad1")[:2] == (200, "MISS")
        wait_keys(redis_server, 2)
        assert pc_chat(n, "ad1")[:2] == (200, "HIT")

        # weights not loaded (no version): the cache does not apply
        assert pc_chat(n, "cold")[:2] == (200, None)
        # an adapter no engine has: 404, no header
        st, hdr, _ = pc_chat(n, "nope")
        assert st == 404 and hdr is None
        assert len(pc_keys(redis_server)) == 2
    finally:
        n.stop()
        n.check_log()
        e.close()


def test_model_fingerprint_keys_the_cache(nginx_module, model_path,
                                          tmp_path, redis_server):
    redis_server.command("FLUSHALL")
    ea = FakeEngine(tmp_path, model_vocab(model_path),
                    fingerprint=b"\xaa" * 32)
    eb = FakeEngine(tmp_path, model_vocab(model_path),
                    fingerprint=b"\xbb" * 32)
    na = pc_nginx(tmp_path, "a", ea, model_path, redis_server)
    nb = pc_nginx(tmp_path, "b", eb, model_path, redis_server)
    try:
        warm(na)
        warm(nb)
        assert pc_chat(na)[1] == "MISS"
        wait_keys(redis_server, 1)
        assert pc_chat(na)[1] == "HIT"
        # another model: its own entry, never the other model's answer
        assert pc_chat(nb)[1] == "MISS"
        wait_keys(redis_server, 2)
        assert pc_chat(nb)[1] == "HIT"
        assert pc_chat(na)[1] == "HIT"
    finally:
        for n in (na, nb):
            n.stop()
            n.check_log()
        ea.close()
        eb.close()


# ---- end to end with the real engine ----------------------------------------

@pytest.fixture(scope="module")
def prefix_engine(engine):
    with engine.client(hello=True) as c:
        st = c.stats()
    if "prefix_hit_tokens" not in st:
        pytest.skip("the engine's STATS has no prefix cache part yet")
    return engine


@pytest.fixture(scope="module")
def ngr(nginx_module, prefix_engine, model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("nsreal")
    f = write_tenants(str(d / "tenants.json"), TENANTS)
    pport = free_port()
    n = start_nginx(str(d / "nginx"), prefix_engine.addr, model_path,
                    workers=1,
                    location_extra="llm_cache_shared_namespace public;",
                    http_extra=ns_conf(f, pport, free_port()))
    n.plain_port = pport
    try:
        yield n
    finally:
        n.stop()
        n.check_log()


def long_system(tag):
    return ("You are the support assistant of %s. " % tag) + " ".join(
        "Rule %d: answer politely, cite the manual, never guess." % i
        for i in range(12))


def cached(doc):
    return doc["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_tenant_b_hits_the_shared_prefix(ngr):
    s = long_system("Shared Corp")
    st, _, da = chat(ngr.port, KA, [{"role": "system", "content": s},
                                    {"role": "user", "content": "Hi A"}])
    assert st == 200, da
    st, _, db = chat(ngr.port, KB, [{"role": "system", "content": s},
                                    {"role": "user", "content": "Hi B"}])
    assert st == 200, db
    assert cached(db) > 0, db
    # never more than the public part
    assert cached(db) < db["usage"]["prompt_tokens"]


def test_private_prefix_is_not_shared(ngr):
    s = long_system("Private Inc")
    msgs = [{"role": "system", "content": s},
            {"role": "user", "content": "Same question"}]
    # the location without a shared namespace: all of it is a's
    st, _, d1 = chat(ngr.plain_port, KA, msgs)
    assert st == 200, d1
    st, _, d2 = chat(ngr.plain_port, KA, msgs)
    assert cached(d2) > 0           # a's own namespace works
    st, _, d3 = chat(ngr.plain_port, KB, msgs)
    assert st == 200 and cached(d3) == 0, d3
