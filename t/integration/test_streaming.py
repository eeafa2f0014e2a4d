"""Streaming (Server-Sent Events) through NGINX, and the module's life
with its clients and engine: dropped clients, 64 concurrent streams,
reload under load, the daemon killed and restarted.
"""

import json
import os
import signal
import socket
import threading
import time

import openai
import pytest

from conftest import Engine, wait_until
from nginx_proc import nginx, nginx_factory, nginx_module  # noqa: F401

MODEL = "smollm2"
QUESTION = "What is the capital of France?"
# greedy continues this for as long as it is allowed to
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@pytest.fixture(scope="module")
def client(nginx):
    return nginx.openai()


def sse_events(resp):
    """Yields the data of each SSE event of an http.client response."""
    buf = b""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.rstrip(b"\r\n")
        if line == b"":
            if buf:
                yield buf.decode()
            buf = b""
            continue
        assert line.startswith(b"data: "), line
        buf += line[6:]


def open_stream(nginx, path, body):
    c = nginx.http()
    body = dict(body, stream=True)
    c.request("POST", "/v1" + path, json.dumps(body),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    return c, r


def wait_engine_idle(engine, timeout=10.0):
    with engine.client() as c:
        def idle():
            st = c.stats()
            return st["running"] == 0 and st["waiting"] == 0
        wait_until(idle, timeout, "engine idle", step=0.01)


# ---- the SSE format ----------------------------------------------------

def test_chat_stream_matches_non_stream(client):
    kw = dict(model=MODEL, temperature=0, max_tokens=24,
              messages=[{"role": "user", "content": QUESTION}])
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == \
        full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == MODEL for c in chunks)
    assert all(c.system_fingerprint.startswith("fp_") for c in chunks)


def test_raw_sse_framing(nginx):
    c, r = open_stream(nginx, "/chat/completions",
                       {"model": MODEL, "max_tokens": 6, "temperature": 0,
                        "messages": [{"role": "user", "content": QUESTION}]})
    try:
        assert r.status == 200
        assert r.getheader("Content-Type").startswith("text/event-stream")
        assert r.getheader("Cache-Control") == "no-cache"
        events = list(sse_events(r))
    finally:
        c.close()
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant",
                                              "content": ""}
    assert objs[-1]["choices"][0]["delta"] == {}
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in objs[-1]


def test_include_usage(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": QUESTION}]))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == (last.usage.prompt_tokens
                                       + last.usage.completion_tokens)
    assert last.usage.prompt_tokens_details.cached_tokens >= 0
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream(client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=8,
              temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_stop_string_never_sent(client):
    kw = dict(model=MODEL, temperature=0, max_tokens=24,
              messages=[{"role": "user", "content": QUESTION}])
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[8:12]
    chunks = list(client.chat.completions.create(stream=True, stop=stop,
                                                 **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_logprobs(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=6, stream=True,
        logprobs=True, top_logprobs=2,
        messages=[{"role": "user", "content": QUESTION}]))
    entries = [t for c in chunks if c.choices[0].logprobs
               for t in c.choices[0].logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "".join(t.token for t in entries) == text
    assert all(len(t.top_logprobs) == 2 for t in entries)


def test_tokens_are_flushed_as_they_come(nginx, engine):
    """The first chunk arrives while the engine is still generating."""
    c, r = open_stream(nginx, "/completions",
                       {"model": MODEL, "prompt": COUNTING,
                        "max_tokens": 64, "temperature": 0})
    try:
        assert r.status == 200
        ev = sse_events(r)
        first = json.loads(next(ev))
        assert first["choices"][0]["text"]
        with engine.client() as ec:
            st = ec.stats()
        assert st["running"] == 1, "the whole answer was buffered"
        rest = list(ev)
        assert rest[-1] == "[DONE]"
    finally:
        c.close()


# ---- clients that go away ----------------------------------------------

def test_client_disconnect_cancels_the_sequence(nginx, engine):
    wait_engine_idle(engine)
    with engine.client() as ec:
        before = ec.stats()["tokens_generated"]
    c, r = open_stream(nginx, "/completions",
                       {"model": MODEL, "prompt": COUNTING,
                        "max_tokens": 2000, "temperature": 0})
    ev = sse_events(r)
    next(ev)
    next(ev)
    # drop the connection mid-stream
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    t0 = time.monotonic()
    wait_engine_idle(engine, timeout=5.0)
    elapsed = time.monotonic() - t0
    with engine.client() as ec:
        generated = ec.stats()["tokens_generated"] - before
    assert generated < 200, "the sequence ran on after the client left"
    assert elapsed < 5.0
    # the access log says so
    wait_until(lambda: any("finish=cancelled" in l
                           for l in nginx.access_log_lines()),
               5, "access log line of the dropped request")
    nginx.check_log()


def test_client_disconnect_before_first_token(nginx, engine):
    wait_engine_idle(engine)
    s = socket.create_connection(("127.0.0.1", nginx.port))
    body = json.dumps({"model": MODEL, "prompt": COUNTING * 20,
                       "max_tokens": 500, "stream": True})
    s.sendall(("POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
               "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
               % len(body)).encode() + body.encode())
    s.close()
    wait_engine_idle(engine, timeout=10.0)
    nginx.check_log()


# ---- load --------------------------------------------------------------

def run_streams(nginx, n, max_tokens, results, start_barrier=None):
    def one(i):
        try:
            cl = nginx.openai()
            if start_barrier:
                start_barrier.wait()
            text, finish = "", None
            for ch in cl.chat.completions.create(
                    model=MODEL, max_tokens=max_tokens, temperature=0,
                    stream=True,
                    messages=[{"role": "user",
                               "content": "Count to ten, number %d." % i}]):
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
            results[i] = ("ok", text, finish)
        except Exception as e:      # noqa: BLE001 (recorded, checked)
            results[i] = ("error", repr(e), None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_64_concurrent_streams(nginx):
    results = {}
    threads = run_streams(nginx, 64, 8, results)
    for t in threads:
        t.join(300)
    assert len(results) == 64
    bad = {i: r for i, r in results.items() if r[0] != "ok" or not r[2]}
    assert not bad, bad
    nginx.check_log()


def test_reload_under_load(nginx, engine):
    engine_pid = engine.pid
    old_workers = set(nginx.worker_pids())
    results = {}
    barrier = threading.Barrier(8)
    threads = run_streams(nginx, 8, 48, results, barrier)
    time.sleep(0.5)
    nginx.reload()
    # new requests during the reload are served too
    extra = {}
    more = run_streams(nginx, 4, 8, extra)
    for t in threads + more:
        t.join(300)
    for rs in (results, extra):
        for i, r in rs.items():
            # a stream finished, or ended with a clean API error
            assert r[0] == "ok" and r[2] in ("stop", "length") \
                or r[0] == "error" and "APIError" in r[1], r
    assert sum(r[0] == "ok" for r in results.values()) >= 6
    wait_until(lambda: not (set(nginx.worker_pids()) & old_workers), 30,
               "old workers exit")
    assert engine.proc.poll() is None and engine.pid == engine_pid
    r = nginx.openai().chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": QUESTION}])
    assert r.choices[0].message.content
    nginx.check_log()


# ---- the daemon goes away ----------------------------------------------

def test_no_daemon_503(nginx_factory, tmp_path):
    n = nginx_factory("unix:%s/nothing.sock" % tmp_path)
    status, headers, body = n.post("/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 503
    err = json.loads(body)["error"]
    assert err["type"] == "server_error" and err["message"]
    assert "param" in err and "code" in err
    with pytest.raises(openai.APIStatusError) as e:
        n.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503


def test_daemon_killed_and_restarted(nginx_factory, engine_bin, model_path,
                                     tmp_path):
    work = str(tmp_path)
    eng = Engine(engine_bin, model_path, work, tcp=False).wait_ready()
    try:
        n = nginx_factory(eng.addr)
        cl = n.openai()
        ask = dict(model=MODEL, max_tokens=4, temperature=0,
                   messages=[{"role": "user", "content": QUESTION}])
        assert cl.chat.completions.create(**ask).choices[0].message.content

        # a stream in flight when the daemon dies ends with an error
        c, r = open_stream(n, "/completions",
                           {"model": MODEL, "prompt": COUNTING,
                            "max_tokens": 2000, "temperature": 0})
        ev = sse_events(r)
        next(ev)
        eng.signal(signal.SIGKILL)
        eng.wait()
        rest = list(ev)
        c.close()
        assert rest and "error" in json.loads(rest[-1])

        # down: 503, quickly, OpenAI-shaped
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            cl.chat.completions.create(**ask)
        assert e.value.status_code == 503
        assert e.value.body["type"] == "server_error"
        assert time.monotonic() - t0 < 5

        # back: served again without touching nginx
        eng.stop()
        eng = Engine(engine_bin, model_path, work, tcp=False).wait_ready()

        def served():
            try:
                return bool(cl.chat.completions.create(**ask).choices)
            except openai.APIStatusError as e:
                assert e.status_code == 503
                return False
        wait_until(served, 20, "reconnect to the restarted engine",
                   step=0.2)
        # every worker reconnects
        for _ in range(8):
            assert cl.chat.completions.create(**ask).choices
        n.check_log()
    finally:
        eng.stop()


def test_two_engines_round_robin_and_failover(nginx_factory, start_engine):
    a = start_engine(tcp=False)
    b = start_engine(tcp=False)
    n = nginx_factory([a.addr, b.addr], workers=1)
    cl = n.openai()
    ask = dict(model=MODEL, max_tokens=2, temperature=0,
               messages=[{"role": "user", "content": QUESTION}])

    def served(e):
        with e.client() as c:
            return c.stats()["requests_total"]

    before = served(a), served(b)
    for _ in range(6):
        assert cl.chat.completions.create(**ask).choices
    after = served(a), served(b)
    # one worker, round-robin: both engines took requests
    assert after[0] - before[0] >= 2 and after[1] - before[1] >= 2

    # one engine gone: the other serves everything, no 503
    a.signal(signal.SIGKILL)
    a.wait()
    for _ in range(6):
        assert cl.chat.completions.create(**ask).choices
    assert "lost engine" in n.error_log_text() \
        or "closed the connection" in n.error_log_text()


def test_engine_over_tcp(nginx_factory, engine):
    n = nginx_factory(engine.tcp_addr)
    chunks = list(n.openai().chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0, stream=True,
        messages=[{"role": "user", "content": QUESTION}]))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
