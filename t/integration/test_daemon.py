"""llm-engine, the daemon, through its wire protocol (tools/llm_proto.py).

A real engine with the default SmolLM2 model; each test talks to it over
unix or TCP sockets as the NGINX module would.
"""

import os
import signal
import socket
import struct
import subprocess
import time

import pytest

import llm_proto
from llm_proto import (E_BAD_REQUEST, E_CONTEXT, E_DRAINING, E_DUPLICATE,
                       E_NOT_FOUND, E_PROTOCOL, E_VERSION)

PROMPT_TEXT = "The capital of France is"


def wait_idle(c, timeout=10.0):
    """Polls STATS until nothing runs or waits; returns the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        st = c.stats()
        if st["running"] == 0 and st["waiting"] == 0:
            return st
        if time.monotonic() > deadline:
            raise AssertionError("engine still busy: %r" % st)
        time.sleep(0.02)


def read_until_tokens(c, res, n, timeout=60.0):
    deadline = time.monotonic() + timeout
    while len(res.tokens) < n and not res.finished:
        assert time.monotonic() < deadline, "no tokens from the engine"
        assert c.poll(deadline - time.monotonic()) is not None


# ---- hello, stats, ping ------------------------------------------------

def test_hello_describes_the_model(engine):
    with engine.client(hello=False) as c:
        info = c.hello("pytest")
    assert info["version"] == 1
    assert info["n_vocab"] == 49152
    assert info["n_ctx"] >= 2048
    assert info["block_size"] > 0
    assert info["kv_blocks_total"] > 0
    assert info["arch"] == "llama"
    assert info["model_name"]
    assert info["fingerprint"] != "00" * 32
    assert info["eos_id"] in info["eog_ids"]
    assert info["server_name"].startswith("llm-engine")


def test_hello_over_tcp_and_ping(engine):
    with engine.client(tcp=True) as c:
        assert c.info["n_vocab"] == 49152
        assert c.ping()
        st = c.stats()
        assert st["connections"] >= 1
        assert st["kv_blocks_total"] == c.info["kv_blocks_total"]
        assert st["draining"] == 0


def test_no_common_version_is_refused(engine):
    with engine.client(hello=False) as c:
        with pytest.raises(llm_proto.EngineError) as ei:
            c.hello(min_version=7, max_version=9)
        assert ei.value.code == E_VERSION
        assert c.recv_frame(timeout=5) is None      # then closed


def test_frames_before_hello_are_refused(engine):
    with engine.client(hello=False) as c:
        c.send(llm_proto.encode_submit(1, [1, 2, 3]))
        fr = c.recv_frame(timeout=5)
        assert fr is not None and fr[0] == llm_proto.ERROR
        assert llm_proto.decode_error(fr[2])[0] == E_PROTOCOL
        assert c.recv_frame(timeout=5) is None


# ---- generation --------------------------------------------------------

def gguf_detokenizer(model):
    """Token id -> bytes, from the GGUF vocabulary (byte-level BPE), for
    comparing token ids with llm-run's text output."""
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(model)
    f = r.fields["tokenizer.ggml.tokens"]
    toks = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    tf = r.fields.get("tokenizer.ggml.token_type")
    types = [int(tf.parts[i][0]) for i in tf.data] if tf else [1] * len(toks)
    # GPT-2's byte <-> printable character table.
    bs = list(range(ord("!"), ord("~") + 1)) + \
        list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    u2b = {chr(c): b for b, c in zip(bs, cs)}

    def piece(i):
        t = types[i]
        if t == 3:                          # control: renders as nothing
            return b""
        if t == 4:                          # user-defined: text as is
            return toks[i].encode()
        if t == 6 and toks[i].startswith("<0x"):
            return bytes([int(toks[i][3:-1], 16)])
        return bytes(u2b.get(ch, 0x3f) for ch in toks[i])
    return piece


def llm_run(build, model, *args):
    exe = os.path.join(build, "llm-run")
    if not os.access(exe, os.X_OK):
        pytest.skip("%s not built" % exe)
    out = subprocess.run([exe, "--model", model, "--threads", "2", "--quiet"]
                         + list(args), capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout


def test_greedy_matches_llm_run(engine, llm_build, model_path):
    ids = [int(x) for x in
           llm_run(llm_build, model_path, "--prompt", PROMPT_TEXT,
                   "--tokens").split()]
    assert len(ids) > 2
    expected = llm_run(llm_build, model_path, "--prompt", PROMPT_TEXT,
                       "--max-tokens", "24")
    with engine.client() as c:
        res = c.generate(ids, max_tokens=24)
    assert res.error is None, res.error
    assert res.done["finish"] in ("stop", "length")
    assert res.done["prompt_tokens"] == len(ids)
    assert res.done["completion_tokens"] == len(res.tokens)
    assert 0 < len(res.tokens) <= 24
    piece = gguf_detokenizer(model_path)
    text = b"".join(piece(t) for t in res.tokens)
    assert text + b"\n" == expected, (text, expected)


def test_greedy_is_repeatable_and_reports_usage(engine):
    with engine.client() as c:
        a = c.generate([1, 504, 3458, 282, 4649, 314], max_tokens=12,
                       ignore_eos=True)
        b = c.generate([1, 504, 3458, 282, 4649, 314], max_tokens=12,
                       ignore_eos=True)
    assert a.tokens == b.tokens and len(a.tokens) == 12
    d = a.done
    assert d["finish"] == "length"
    assert (d["prompt_tokens"], d["completion_tokens"]) == (6, 12)
    assert d["ttft_ms"] <= d["total_ms"]
    assert d["queue_ms"] <= d["ttft_ms"]


def test_seeded_sampling_repeats(engine):
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234,
              ignore_eos=True)
    with engine.client() as c:
        a = c.generate([1, 504, 3458], **kw)
        b = c.generate([1, 504, 3458], **kw)
    assert a.tokens == b.tokens and len(a.tokens) == 16


def test_logprobs(engine):
    with engine.client() as c:
        r = c.generate([1, 504, 3458, 282], max_tokens=4, top_logprobs=3,
                       ignore_eos=True)
    assert len(r.tokens) == 4
    for tok, lp, top in zip(r.tokens, r.logprobs, r.top):
        assert lp is not None and lp <= 0.0
        assert len(top) == 3
        assert top[0][0] == tok                 # greedy: the best one
        assert abs(top[0][1] - lp) < 1e-4
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_stop_token_ids(engine):
    with engine.client() as c:
        free = c.generate([1, 504, 3458, 282], max_tokens=8,
                          ignore_eos=True)
        stop = free.tokens[2]
        r = c.generate([1, 504, 3458, 282], max_tokens=8, ignore_eos=True,
                       stop_ids=[stop])
    first = free.tokens.index(stop)
    assert r.tokens == free.tokens[:first + 1]
    assert r.done["finish"] == "stop"


def test_16_concurrent_submits_from_4_connections(engine):
    clients = [engine.client() for _ in range(4)]
    try:
        results = []
        for i, c in enumerate(clients):
            for j in range(4):
                prompt = [1, 504 + 17 * i + j, 3458, 282 + j]
                results.append((c, c.submit(prompt, max_tokens=6 + j,
                                            ignore_eos=True)))
        # Read the four connections in turn so that none stalls.
        deadline = time.monotonic() + 300
        while not all(r.finished for _, r in results):
            assert time.monotonic() < deadline
            for c in clients:
                mine = [r for cc, r in results if cc is c]
                if not all(r.finished for r in mine):
                    c.poll(300)
        for c, r in results:
            assert r.error is None, r.error
            assert r.done["finish"] == "length"
            assert len(r.tokens) == r.done["completion_tokens"]
        assert sorted(len(r.tokens) for _, r in results) == \
            sorted([6, 7, 8, 9] * 4)
        st = wait_idle(clients[0])
        assert st["kv_blocks_used"] == 0
    finally:
        for c in clients:
            c.close()


# ---- cancel, disconnect ------------------------------------------------

def test_cancel_mid_generation_frees_kv(engine):
    with engine.client() as c:
        r = c.submit([1, 504, 3458, 282] * 40, max_tokens=400,
                     ignore_eos=True)
        read_until_tokens(c, r, 3)
        st = c.stats()
        assert st["kv_blocks_used"] > 0 and st["running"] == 1
        c.cancel(r.req_id)
        c.wait([r], 30)
        assert r.done["finish"] == "cancelled"
        assert 3 <= r.done["completion_tokens"] < 400
        st = c.stats()
        assert st["kv_blocks_used"] == 0
        assert st["running"] == 0 and st["waiting"] == 0
        # Cancelling a finished request is harmless.
        c.cancel(r.req_id)
        assert c.ping()


def test_disconnect_mid_generation_frees_kv(engine):
    with engine.client() as watcher:
        gen_before = watcher.stats()["tokens_generated"]
        c = engine.client()
        r = c.submit([1, 504, 3458, 282] * 40, max_tokens=400,
                     ignore_eos=True)
        r2 = c.submit([1, 33, 44], max_tokens=400, ignore_eos=True)
        read_until_tokens(c, r, 2)
        assert watcher.stats()["kv_blocks_used"] > 0
        c.close()
        st = wait_idle(watcher, timeout=10)
        assert st["kv_blocks_used"] == 0
        # Well short of the 800 tokens the two would have made.
        assert st["tokens_generated"] - gen_before < 400
        assert not r2.finished


# ---- bad requests ------------------------------------------------------

def test_bad_submits_get_errors_and_connection_stays_usable(engine):
    with engine.client() as c:
        n_ctx = c.info["n_ctx"]
        n_vocab = c.info["n_vocab"]
        cases = [
            (dict(prompt=[]), E_BAD_REQUEST, "empty"),
            (dict(prompt=[1, n_vocab]), E_BAD_REQUEST, "vocabulary"),
            (dict(prompt=[1, -3]), E_BAD_REQUEST, "vocabulary"),
            (dict(prompt=[1, 2], max_tokens=n_ctx), E_CONTEXT, "context"),
            (dict(prompt=[1] * (n_ctx + 1), max_tokens=1), E_CONTEXT,
             "context"),
            (dict(prompt=[1, 2], max_tokens=0), E_BAD_REQUEST, "max_tokens"),
            (dict(prompt=[1, 2], top_p=1.5), E_BAD_REQUEST, "top_p"),
            (dict(prompt=[1, 2], temperature=-1.0), E_BAD_REQUEST,
             "temperature"),
            (dict(prompt=[1, 2], top_logprobs=50), E_BAD_REQUEST,
             "logprobs"),
            (dict(prompt=[1, 2], adapter="nope"), E_NOT_FOUND, "adapter"),
        ]
        for kw, code, word in cases:
            prompt = kw.pop("prompt")
            r = c.generate(prompt, **kw)
            assert r.error is not None, kw
            assert r.error[0] == code, (kw, r.error)
            assert word in r.error[1].lower(), (kw, r.error)
            assert r.tokens == []
        ok = c.generate([1, 504, 3458], max_tokens=3, ignore_eos=True)
        assert ok.error is None and len(ok.tokens) == 3
        st = c.stats()
        assert st["requests_rejected"] >= len(cases)


def test_duplicate_live_request_id(engine):
    with engine.client() as c:
        r = c.submit([1, 504, 3458], req_id=77, max_tokens=40,
                     ignore_eos=True)
        c.send(llm_proto.encode_submit(77, [1, 2], max_tokens=2))
        deadline = time.monotonic() + 60
        dup = None
        while not r.finished and time.monotonic() < deadline:
            fr = c.recv_frame()
            if fr[0] == llm_proto.ERROR and fr[1] == 77:
                dup = llm_proto.decode_error(fr[2])
                continue
            c.handle(fr)
        assert dup is not None and dup[0] == E_DUPLICATE
        assert r.done is not None and len(r.tokens) == 40
        # Once done, the id may be used again.
        again = c.generate([1, 2], req_id=77, max_tokens=2, ignore_eos=True)
        assert again.error is None and len(again.tokens) == 2


def test_garbage_closes_only_that_connection(engine):
    with engine.client() as good:
        r = good.submit([1, 504, 3458], max_tokens=30, ignore_eos=True)
        # Not our protocol at all.
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.settimeout(10)
        bad.connect(engine.sock_path)
        bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            d = bad.recv(4096)
            if not d:
                break
            data += d
        bad.close()
        assert data[:4] == b"LLMP"      # an ERROR frame, then EOF
        _, _, ftype, n, rid = llm_proto.HEADER.unpack_from(data)
        assert ftype == llm_proto.ERROR and rid == 0
        code, msg = llm_proto.decode_error(data[16:16 + n])
        assert code == E_PROTOCOL and "magic" in msg

        # A well-framed SUBMIT whose payload lies about its lengths.
        with engine.client() as liar:
            lr = liar.submit([1, 2, 3], max_tokens=500, ignore_eos=True)
            p = llm_proto.encode_submit(5, [1, 2, 3])[16:]
            # n_prompt: before the 3 ids (12 bytes) and the shared
            # namespace part ("" = 2 bytes, u32 tokens)
            p = p[:-22] + struct.pack("<I", 1000) + p[-18:]
            liar.send(llm_proto.frame(llm_proto.SUBMIT, 5, p))
            errs = []
            while True:
                fr = liar.recv_frame(timeout=30)
                if fr is None:
                    break
                if fr[0] == llm_proto.ERROR and fr[1] == 0:
                    errs.append(llm_proto.decode_error(fr[2]))
            assert errs and errs[0][0] == E_PROTOCOL
            assert not lr.finished or lr.finish == "cancelled"

        # Oversized length in the header.
        with engine.client() as big:
            big.send(struct.pack("<IHHII", llm_proto.MAGIC, 1,
                                 llm_proto.SUBMIT, 0xFFFFFFF0, 9))
            fr = big.recv_frame(timeout=10)
            assert fr[0] == llm_proto.ERROR
            assert llm_proto.decode_error(fr[2])[0] == E_PROTOCOL
            assert big.recv_frame(timeout=10) is None

        good.wait([r], 60)
        assert r.error is None and len(r.tokens) == 30
        st = wait_idle(good)
        assert st["kv_blocks_used"] == 0


def test_client_that_stops_reading_is_dropped(engine):
    """Output queued for a client is bounded (8 MiB): one that sends
    without reading is dropped and its requests cancelled; others go on."""
    with engine.client() as good:
        hog = engine.client()
        r = hog.submit([1, 504, 3458], max_tokens=2000, ignore_eos=True)
        req = llm_proto.frame(llm_proto.STATS_REQ, 3) * 4096
        dropped = False
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                hog.sock.settimeout(5)
                hog.send(req)           # 64 KiB asking for 450 KiB
        except (BrokenPipeError, ConnectionResetError):
            dropped = True      # (a send timeout would mean it stopped
                                # reading us: that fails the test)
        hog.close()
        assert dropped
        st = wait_idle(good, timeout=30)
        assert st["kv_blocks_used"] == 0
        assert "not reading" in engine.log_text()
        ok = good.generate([1, 504, 3458], max_tokens=2, ignore_eos=True)
        assert len(ok.tokens) == 2
    assert not r.finished


# ---- shutdown ----------------------------------------------------------

def test_sigterm_drains(start_engine):
    e = start_engine()
    a = e.client()
    b = e.client()
    r = a.submit([1, 504, 3458, 282], max_tokens=96, ignore_eos=True)
    read_until_tokens(a, r, 2)
    e.signal(signal.SIGTERM)
    # Stats from b tell us when the drain has begun.
    deadline = time.monotonic() + 30
    while not b.stats()["draining"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    refused = b.generate([1, 2, 3], max_tokens=4)
    assert refused.error is not None and refused.error[0] == E_DRAINING
    a.wait([r], 120)
    assert r.done["finish"] == "length" and len(r.tokens) == 96
    assert e.wait(60) == 0
    assert not os.path.exists(e.sock_path)
    log = e.log_text()
    assert "draining" in log and "llm-engine stopped" in log
    a.close()
    b.close()


def test_drain_timeout_cancels(start_engine):
    e = start_engine(["--drain-timeout", "0.3"])
    with e.client() as c:
        r = c.submit([1, 504, 3458, 282], max_tokens=3000, ignore_eos=True)
        read_until_tokens(c, r, 2)
        t0 = time.monotonic()
        e.signal(signal.SIGTERM)
        c.wait([r], 60)
        assert r.done["finish"] == "cancelled"
    assert e.wait(60) == 0
    assert time.monotonic() - t0 < 30
    assert "cancelling" in e.log_text()


def test_sigterm_when_idle_exits_at_once(start_engine):
    e = start_engine()
    e.signal(signal.SIGINT)
    assert e.wait(30) == 0
    assert not os.path.exists(e.sock_path)


def test_stale_socket_replaced_and_live_one_kept(start_engine,
                                                 engine_bin, model_path,
                                                 tmp_path):
    # A socket file nobody listens on (a crashed engine's).
    path = str(tmp_path / "engine.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert os.path.exists(path)
    from conftest import Engine
    e = Engine(engine_bin, model_path, str(tmp_path), tcp=False)
    try:
        e.wait_ready()
        with e.client() as c:
            assert c.ping()
        # A second engine on the same path must not steal it.
        d2 = tmp_path / "second"
        d2.mkdir()
        second = subprocess.run(
            [engine_bin, "--model", model_path, "--listen", "unix:" + path,
             "--threads", "1"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert "another process" in second.stderr
        with e.client() as c:
            assert c.ping()
    finally:
        assert e.stop() == 0


def test_bad_flags_fail_fast(engine_bin, model_path, tmp_path):
    for args in (["--kv-memory", "lots"], ["--threads", "x"],
                 ["--log-level", "loud"], ["--bogus", "1"], []):
        base = [engine_bin] + (["--model", model_path] if args else [])
        out = subprocess.run(base + args, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 2, (args, out.stderr)
    out = subprocess.run([engine_bin, "--model", str(tmp_path / "nope.gguf"),
                          "--listen", "unix:" + str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "nope.gguf" in out.stderr
