"""Limits on one host (llm_limits local): requests per minute, tokens per
minute (prompt exact, completion reserved then refunded), concurrency and
its queue, counted exactly across 4 workers in the shared zone; 429
bodies and headers; counters kept across nginx -s reload.
Real nginx, real llm-engine.
"""

import json
import re
import time

import pytest

from conftest import _tail
from nginx_proc import BAD_LOG, Nginx, nginx_module, start_nginx  # noqa: F401
from tenants_util import (DURATION, Holder, chat, nginx_with, parallel,
                          tenant, tenants_log, wait_for, wait_new_workers,
                          write_tenants)

RPM = "sk-rpm-test-000000000000000"
TPM = "sk-tpm-test-000000000000000"
BIG = "sk-big-test-000000000000000"
CONC = "sk-conc-test-00000000000000"
QUEUE = "sk-queue-test-0000000000000"
RELOAD = "sk-reload-test-000000000000"

TENANTS = [
    tenant("rpm", key=RPM, limits={"requests_per_minute": 5}),
    tenant("tpm", key=TPM, limits={"tokens_per_minute": 300}),
    tenant("big", key=BIG, limits={"tokens_per_minute": 20}),
    tenant("conc", key=CONC, limits={"max_concurrent": 2}),
    tenant("queue", key=QUEUE, limits={"max_concurrent": 1,
                                       "max_queued": 1}),
    tenant("reload", key=RELOAD, limits={"requests_per_minute": 3}),
]


@pytest.fixture(scope="module")
def ng(nginx_module, engine, model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("limits")
    f = write_tenants(str(d / "tenants.json"), TENANTS)

    def factory(engines, **kw):
        return start_nginx(str(d / "nginx"), engines, model_path, **kw)

    n = nginx_with(factory, engine.addr, f,
                   http="llm_limits_queue_timeout 3s;")
    n.tenants_file = f
    try:
        yield n
    finally:
        n.stop()
        bad = [l for l in n.error_log_text().splitlines()
               if BAD_LOG.search(l)]
        assert not bad, "\n".join(bad[:20]) + _tail(n.error_log)


def rate_limited(st, h, doc, type_):
    assert st == 429, doc
    assert h["content-type"] == "application/json"
    e = doc["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert e["code"] == "rate_limit_exceeded"
    assert e["type"] == type_
    return e


# ---- requests per minute ------------------------------------------------

def test_requests_per_minute_exact_across_workers(ng):
    res = parallel(lambda i: chat(ng, key=RPM), 8)
    ok = [r for r in res if r[0] == 200]
    refused = [r for r in res if r[0] != 200]
    assert len(ok) == 5, [r[0] for r in res]
    assert len(refused) == 3

    # each admission saw a different remaining count
    assert sorted(int(h["x-ratelimit-remaining-requests"])
                  for _, h, _ in ok) == [0, 1, 2, 3, 4]
    for _, h, _ in ok + refused:
        assert h["x-ratelimit-limit-requests"] == "5"
        assert DURATION.match(h["x-ratelimit-reset-requests"]), h
        assert "x-ratelimit-limit-tokens" not in h     # no token limit

    for st, h, doc in refused:
        e = rate_limited(st, h, doc, "requests")
        assert "requests per min (RPM): Limit 5, Used 5" in e["message"]
        # one request comes back every 12 s
        assert 1 <= int(h["retry-after"]) <= 12
        assert h["x-ratelimit-remaining-requests"] == "0"

    # the refusals are in the access log with their reason
    wait_for(lambda: sum(l == "429 rpm requests -"
                         for l in tenants_log(ng)) == 3, 5, "log lines")


def test_reset_is_time_to_full(ng):
    st, h, _ = chat(ng, key=RPM)
    assert st == 429
    # 5 requests used within the last seconds: 5 x 12 s to refill, minus
    # what came back since
    reset = h["x-ratelimit-reset-requests"]
    m = re.match(r"^(\d+)m(\d+(\.\d+)?)s$|^(\d+(\.\d+)?)s$", reset)
    assert m, reset
    secs = (int(m.group(1)) * 60 + float(m.group(2))) if m.group(1) \
        else float(m.group(4))
    assert 40 <= secs <= 60, reset


# ---- tokens per minute ----------------------------------------------------

def test_tokens_reserved_then_refunded(ng):
    # 1: prompt + max_tokens are taken at admission
    t0 = time.monotonic()
    st, h, doc = chat(ng, key=TPM, max_tokens=40, stop=[" "])
    assert st == 200, doc
    p1 = doc["usage"]["prompt_tokens"]
    c1 = doc["usage"]["completion_tokens"]
    assert h["x-ratelimit-limit-tokens"] == "300"
    assert int(h["x-ratelimit-remaining-tokens"]) == 300 - (p1 + 40)
    assert DURATION.match(h["x-ratelimit-reset-tokens"])

    # 2: the unused part of 1 came back (the stop string ended it early).
    # The refund is made when the worker finalizes request 1, which can
    # come a moment after the client has the last byte on a loaded host.
    time.sleep(0.5)
    st, h, doc = chat(ng, key=TPM, max_tokens=40, stop=[" "])
    elapsed = time.monotonic() - t0
    assert st == 200, doc
    p2 = doc["usage"]["prompt_tokens"]
    c2 = doc["usage"]["completion_tokens"]
    low = 300 - (p1 + c1) - (p2 + 40)
    refill = int(elapsed * 300 / 60) + 1
    got = int(h["x-ratelimit-remaining-tokens"])
    assert low <= got <= low + refill, (got, low, refill, c1)
    assert c1 < 40, "the stop string did not end request 1 early"

    # 3: more than what is left -> 429 naming tokens
    st, h, doc = chat(ng, key=TPM, max_tokens=300 - p2 - 5)
    e = rate_limited(st, h, doc, "tokens")
    assert "tokens per min (TPM): Limit 300" in e["message"]
    assert int(h["retry-after"]) >= 1
    assert h["x-ratelimit-limit-tokens"] == "300"

    # the budget never went over: used tokens <= limit + refill
    used = (p1 + c1) + (p2 + c2)
    assert used <= 300 + refill


def test_request_larger_than_the_token_limit(ng):
    st, h, doc = chat(ng, key=BIG, max_tokens=100)
    e = rate_limited(st, h, doc, "tokens")
    assert e["message"].startswith("Request too large for big on tokens "
                                   "per min (TPM): Limit 20, Requested ")
    assert "retry-after" not in h       # waiting would not help


# ---- concurrency ----------------------------------------------------------

def test_concurrency_exact(ng):
    holders = [Holder(ng, CONC) for _ in range(2)]
    try:
        assert [h.wait_admitted() for h in holders] == [200, 200]
        # every worker sees both slots taken
        res = parallel(lambda i: chat(ng, key=CONC), 4)
        for st, h, doc in res:
            e = rate_limited(st, h, doc, "concurrency")
            assert "concurrent requests: Limit 2, Running 2" in e["message"]
            assert h["retry-after"] == "1"
        holders[0].close()
        # the slot comes back when nginx sees the client gone
        wait_for(lambda: chat(ng, key=CONC)[0] == 200, 10,
                 "a free slot", step=0.1)
    finally:
        for h in holders:
            h.close()
    wait_for(lambda: all(r[0] == 200 for r in
                         parallel(lambda i: chat(ng, key=CONC), 2)),
             10, "both slots free", step=0.2)


def test_queue_waits_for_a_slot(ng):
    holder = Holder(ng, QUEUE)
    try:
        assert holder.wait_admitted() == 200
        out = {}

        import threading

        def queued():
            res = chat(ng, key=QUEUE)
            out["a"] = (time.monotonic(), res)

        t = threading.Thread(target=queued)
        t.start()
        time.sleep(0.5)
        # the queue (1) is full: refused at once
        st, h, doc = chat(ng, key=QUEUE)
        rate_limited(st, h, doc, "concurrency")
        assert "a" not in out
        closed = time.monotonic()
        holder.close()
        t.join(30)
        done, (st, h, doc) = out["a"]
        assert st == 200, doc
        assert done >= closed
    finally:
        holder.close()


def test_queue_wait_times_out(ng):
    holder = Holder(ng, QUEUE)
    try:
        assert holder.wait_admitted() == 200
        t0 = time.monotonic()
        st, h, doc = chat(ng, key=QUEUE)
        waited = time.monotonic() - t0
        e = rate_limited(st, h, doc, "concurrency")
        assert "timed out" in e["message"]
        assert 2.5 <= waited <= 6, waited       # llm_limits_queue_timeout 3s
    finally:
        holder.close()


# ---- headers on every response ---------------------------------------------

def test_streaming_response_has_the_headers(ng):
    s = Holder(ng, CONC, max_tokens=2)
    try:
        assert s.wait_admitted() == 200
        head = s.head.split(b"\r\n\r\n")[0].decode().lower()
        assert "x-ratelimit-limit-requests" not in head     # none set
        assert "content-type: text/event-stream" in head
    finally:
        s.close()
    s = Holder(ng, RPM, max_tokens=2)
    try:
        s.wait_admitted()
        head = s.head.split(b"\r\n\r\n")[0].decode().lower()
        assert "x-ratelimit-limit-requests: 5" in head
    finally:
        s.close()


# ---- reload ---------------------------------------------------------------

def test_reload_keeps_the_counters(ng):
    for i in range(3):
        st, h, _ = chat(ng, key=RELOAD)
        assert st == 200
    assert chat(ng, key=RELOAD)[0] == 429
    old = ng.worker_pids()
    ng.reload()
    wait_new_workers(ng, old)
    st, h, doc = chat(ng, key=RELOAD)
    rate_limited(st, h, doc, "requests")
    assert h["x-ratelimit-remaining-requests"] == "0"
