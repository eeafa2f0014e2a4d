"""/metrics (llm_metrics): Prometheus text format; per-tenant requests,
tokens, rejections by reason, queue time / TTFT / inter-token latency /
duration histograms summed over all workers; the engine's batch size, KV
pages and queue depth from its STATS message; counters kept across
reload.
"""

import re

import pytest

from conftest import _tail, wait_until
from nginx_proc import BAD_LOG, nginx_module, start_nginx  # noqa: F401
from tenants_util import (chat, metric, metrics_text, nginx_with, parallel,
                          tenant, wait_new_workers, write_tenants)

KEY = "sk-metrics-test-0000000000000"
LIMITED = "sk-metrics-lim-00000000000000"

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*'
                    r'(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})?'
                    r' -?[0-9.e+]+(Inf)?$')


@pytest.fixture(scope="module")
def ng(nginx_module, engine, model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics")
    f = write_tenants(str(d / "tenants.json"), [
        tenant("met", key=KEY),
        tenant("lim", key=LIMITED, limits={"requests_per_minute": 1})])

    def factory(engines, **kw):
        return start_nginx(str(d / "nginx"), engines, model_path, **kw)

    n = nginx_with(factory, engine.addr, f, metrics=True)
    try:
        yield n
    finally:
        n.stop()
        bad = [l for l in n.error_log_text().splitlines()
               if BAD_LOG.search(l)]
        assert not bad, "\n".join(bad[:20]) + _tail(n.error_log)


def check_format(text):
    """Every line a comment or a sample; a family's samples together."""
    seen, current = set(), None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split()[2]
            assert name == current or name not in seen, \
                "family %s split" % name
            if line.startswith("# TYPE "):
                assert line.split()[3] in ("counter", "gauge", "histogram")
            seen.add(name)
            current = name
            continue
        assert SAMPLE.match(line), line
        base = re.sub(r"_(bucket|sum|count)$", "", line.split("{")[0])
        assert base == current or line.split("{")[0] == current, line


def test_format_and_counters(ng):
    ctype, before = metrics_text(ng)
    assert ctype.startswith("text/plain; version=0.0.4")
    check_format(before)
    req0 = metric(before, "llm_requests_total", tenant="met",
                  code="200") or 0
    comp0 = metric(before, "llm_completion_tokens_total", tenant="met") or 0

    # requests through all 4 workers
    res = parallel(lambda i: chat(ng, key=KEY, max_tokens=3), 8)
    assert all(r[0] == 200 for r in res)
    completion = sum(r[2]["usage"]["completion_tokens"] for r in res)
    prompt = sum(r[2]["usage"]["prompt_tokens"] for r in res)

    # counters are recorded in each worker's log phase, which can run a
    # moment after the client has its response
    def counted():
        _, t = metrics_text(ng)
        return metric(t, "llm_requests_total", tenant="met",
                      code="200") == req0 + 8

    wait_until(counted, 5, "request counters")
    _, text = metrics_text(ng)
    check_format(text)
    assert metric(text, "llm_requests_total", tenant="met",
                  code="200") == req0 + 8
    assert metric(text, "llm_completion_tokens_total",
                  tenant="met") == comp0 + completion
    assert metric(text, "llm_prompt_tokens_total", tenant="met") >= prompt

    for h in ("llm_time_to_first_token_seconds", "llm_queue_time_seconds",
              "llm_request_duration_seconds",
              "llm_inter_token_latency_seconds"):
        count = metric(text, h + "_count", tenant="met")
        inf = metric(text, h + "_bucket", tenant="met", le="+Inf")
        assert count == inf, h
        buckets = [float(v) for v in re.findall(
            r'^%s_bucket\{tenant="met",le="[^"]+"\} (\S+)$' % h, text,
            re.M)]
        assert buckets == sorted(buckets), h     # cumulative
        assert metric(text, h + "_sum", tenant="met") >= 0
    assert metric(text, "llm_time_to_first_token_seconds_count",
                  tenant="met") >= 8
    # 3 tokens a request: 2 gaps each
    assert metric(text, "llm_inter_token_latency_seconds_count",
                  tenant="met") >= 8


def test_rejections_by_reason(ng):
    chat(ng, key=LIMITED)
    for _ in range(3):
        assert chat(ng, key=LIMITED)[0] == 429
    chat(ng, key="sk-not-a-key-000000000000")
    chat(ng, key=KEY, model="nope")
    _, text = metrics_text(ng)
    assert metric(text, "llm_rejections_total", tenant="lim",
                  reason="requests") >= 3
    assert metric(text, "llm_requests_total", tenant="lim",
                  code="429") >= 3
    assert metric(text, "llm_rejections_total", tenant="-",
                  reason="invalid_api_key") >= 1
    assert metric(text, "llm_requests_total", tenant="-", code="401") >= 1
    assert metric(text, "llm_rejections_total", tenant="met",
                  reason="model_not_found") >= 1


def test_engine_stats(ng, engine):
    _, text = metrics_text(ng)
    e = engine.addr
    assert metric(text, "llm_engine_up", engine=e) == 1
    assert metric(text, "llm_engine_kv_pages_total", engine=e) > 0
    assert metric(text, "llm_engine_kv_pages_in_use", engine=e) >= 0
    assert metric(text, "llm_engine_queue_depth", engine=e) >= 0
    assert metric(text, "llm_engine_batch_size", engine=e) >= 0
    assert metric(text, "llm_engine_generated_tokens_total", engine=e) > 0


def test_metrics_only_get(ng):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", ng.metrics_port, timeout=10)
    c.request("POST", "/metrics", body="x")
    r = c.getresponse()
    r.read()
    assert r.status == 405


def test_counters_survive_reload(ng):
    _, before = metrics_text(ng)
    n0 = metric(before, "llm_requests_total", tenant="met", code="200")
    assert n0 and n0 > 0
    old = ng.worker_pids()
    ng.reload()
    wait_new_workers(ng, old)
    _, after = metrics_text(ng)
    assert metric(after, "llm_requests_total", tenant="met",
                  code="200") == n0


def test_engine_down_is_shown(nginx_module, start_engine, model_path,
                              tmp_path):
    e = start_engine()

    def factory(engines, **kw):
        return start_nginx(str(tmp_path / "nginx"), engines, model_path,
                           **kw)

    n = nginx_with(factory, e.addr, None, workers=1, metrics=True)
    try:
        assert chat(n)[0] == 200        # no tenants: tenant "-"
        _, text = metrics_text(n)
        assert metric(text, "llm_engine_up", engine=e.addr) == 1
        assert metric(text, "llm_requests_total", tenant="-",
                      code="200") == 1
        e.stop()
        import time
        time.sleep(0.3)
        _, text = metrics_text(n)
        assert metric(text, "llm_engine_up", engine=e.addr) == 0
        assert metric(text, "llm_engine_queue_depth", engine=e.addr) is None
    finally:
        n.stop()
