"""Helpers for the prompt cache and cache namespace tests.

    FakeEngine(workdir, n_vocab, ...)   a stand-in llm-engine speaking the
                    wire protocol (tools/llm_proto.py layouts): answers
                    HELLO, SUBMIT (a fixed completion), STATS (with or
                    without the prefix cache part), ADAPTER_LIST, PING;
                    records every SUBMIT it decodes (engine-independent
                    checks of what the module sends)
    model_vocab(path)               the model's vocabulary size (the module
                    checks an engine's against its tokenizer)
    sse(data)                       the JSON events of an SSE body, and
                    whether it ended with [DONE]
    pc_keys(redis)                  the prompt cache's keys in Redis
    strip_volatile(doc)             a response without id / created
"""

import http.client
import json
import os
import socket
import struct
import threading
import time

from conftest import REPO  # noqa: F401  (puts tools/ on sys.path)

import llm_proto as P  # noqa: E402

# the completion the fake engine gives: ids of plain text pieces of the
# default model's vocabulary (any valid ids would do)
FAKE_TOKENS = (28120, 314, 253, 1345, 30)


def model_vocab(path):
    """n_vocab of a GGUF model (its tokenizer's token list)."""
    try:
        import gguf
        r = gguf.GGUFReader(path)
        f = r.fields.get("tokenizer.ggml.tokens")
        if f is not None:
            return len(f.data)
    except Exception:       # noqa: BLE001 - any reader trouble: default
        pass
    return 49152


def _str(s):
    b = s.encode()
    return struct.pack("<H", len(b)) + b


class FakeEngine:
    """A protocol-level engine on a unix socket, in a thread."""

    def __init__(self, workdir, n_vocab, fingerprint=b"\x11" * 32,
                 prefix_stats=True, adapters=(), tokens=FAKE_TOKENS,
                 n_ctx=8192):
        self.path = os.path.join(str(workdir), "fake-%d.sock" % id(self))
        self.addr = "unix:" + self.path
        self.n_vocab = n_vocab
        self.fingerprint = fingerprint
        self.prefix_stats = prefix_stats
        self.adapters = list(adapters)      # [(name, version), ...]
        self.tokens = list(tokens)
        self.n_ctx = n_ctx
        self.submits = []                   # decoded SUBMITs
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(64)
        self.closing = False
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    # ---- server ------------------------------------------------------

    def _accept(self):
        while not self.closing:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,),
                             daemon=True).start()

    def _read(self, c, n):
        b = b""
        while len(b) < n:
            d = c.recv(n - len(b))
            if not d:
                raise EOFError
            b += d
        return b

    def _serve(self, c):
        try:
            while True:
                h = self._read(c, P.HEADER_SIZE)
                magic, version, ftype, length, req = P.HEADER.unpack(h)
                if magic != P.MAGIC:
                    return
                payload = self._read(c, length)
                out = self._handle(ftype, req, payload)
                if out:
                    c.sendall(out)
        except (EOFError, OSError):
            pass
        finally:
            c.close()

    def _handle(self, ftype, req, p):
        if ftype == P.HELLO:
            body = struct.pack("<HHIIIIIIii", 1, 0, 0, self.n_ctx,
                               self.n_vocab, 16, 64, 4096, -1, -1)
            body += self.fingerprint
            body += _str("fake") + _str("llama") + _str("fake-engine")
            body += struct.pack("<H", 0)
            return P.frame(P.HELLO_OK, 0, body)
        if ftype == P.SUBMIT:
            s = decode_submit(p)
            with self.lock:
                self.submits.append(s)
            if s["adapter"] and s["adapter"] not in dict(self.adapters):
                return P.frame(P.ERROR, req, struct.pack("<HH", 6, 0)
                               + _str("unknown adapter"))
            n = min(len(self.tokens), s["max_tokens"] or len(self.tokens))
            toks = self.tokens[:n]
            out = P.frame(P.TOKENS, req, struct.pack("<HBB", len(toks), 0, 0)
                          + struct.pack("<%di" % len(toks), *toks))
            finish = P.FINISH_LENGTH if n == s["max_tokens"] \
                else P.FINISH_STOP
            out += P.frame(P.DONE, req, struct.pack(
                "<BBBBIIIIIII", finish, 0, 0, 0, s["n_prompt"], n,
                0, 0, 1, 1, 0) + _str(""))
            return out
        if ftype == P.STATS_REQ:
            body = struct.pack("<10I7Q", 0, 0, 4096, 1, 16, 1, 64, 0, 0, 0,
                               10, 20, 30, 0, 5, 0, 1000)
            body += struct.pack("<4I6Q", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
            if self.prefix_stats:
                body += struct.pack("<2I4Q2I10Q", 7, 5, 11, 1234, 567, 3,
                                    1, 1, 21, 4096, 2, 13, 8, 5, 1, 4,
                                    2580480, 8192)
            return P.frame(P.STATS, req, body)
        if ftype == P.ADAPTER_LIST:
            body = struct.pack("<II", len(self.adapters), len(self.adapters))
            for name, version in sorted(self.adapters):
                body += _str(name) + _str(version)
                body += struct.pack("<BBBBIQ", 1 if version else 0,
                                    0, 0, 0, 8, 1000)
            return P.frame(P.ADAPTERS, req, body)
        if ftype == P.PING:
            return P.frame(P.PONG, req)
        return b""          # CANCEL and the rest: nothing to say

    def close(self):
        self.closing = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def last_submit(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.submits:
                    return self.submits[-1]
            time.sleep(0.01)
        raise TimeoutError("no SUBMIT")


def decode_submit(p):
    r = P.Reader(p)
    (max_tokens, temperature, top_k, top_p, min_p, rep, freq, pres, seed,
     flags, top_lp, priority, weight, _, qt) = r.unpack("IfifffffQHBBHHI")
    tenant, adapter, ns = r.str(), r.str(), r.str()
    (n_stop,) = r.unpack("H")
    stop = list(r.unpack("%di" % n_stop))
    (n_prompt,) = r.unpack("I")
    prompt = list(r.unpack("%di" % n_prompt))
    shared_ns, shared = "", 0
    if r.o < len(r.d):
        shared_ns = r.str()
        (shared,) = r.unpack("I")
    r.end()
    return dict(max_tokens=max_tokens, temperature=temperature, seed=seed,
                flags=flags, tenant=tenant, adapter=adapter,
                cache_namespace=ns, stop_ids=stop, n_prompt=n_prompt,
                prompt=prompt, cache_shared_namespace=shared_ns,
                cache_shared_tokens=shared, priority=priority)


# ---- responses -------------------------------------------------------

def sse(data):
    """(events, done): the JSON objects of "data:" lines, and whether the
    stream ended with data: [DONE]."""
    events, done = [], False
    text = data.decode() if isinstance(data, bytes) else data
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        assert not done, "event after [DONE]"
        if payload == "[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    return events, done


def sse_text(events):
    out = []
    for e in events:
        for ch in e.get("choices", []):
            if "delta" in ch:
                out.append(ch["delta"].get("content") or "")
            else:
                out.append(ch.get("text") or "")
    return "".join(out)


def strip_volatile(doc):
    d = dict(doc)
    d.pop("id", None)
    d.pop("created", None)
    return d


def pc_keys(redis, prefix="llm:"):
    """The prompt cache's keys (RESP array of bulk strings)."""
    out = redis.command("KEYS", prefix + "pc:*")
    keys = []
    lines = out.split(b"\r\n")
    for i, line in enumerate(lines):
        if line.startswith(b"$") and line != b"$-1":
            keys.append(lines[i + 1].decode())
    return keys


def wait_keys(redis, n, timeout=5.0):
    """Waits until the prompt cache holds at least n keys (the SET goes
    out after the response)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        k = pc_keys(redis)
        if len(k) >= n:
            return k
        time.sleep(0.02)
    raise TimeoutError("prompt cache keys: %s" % pc_keys(redis))


def post(port, path, body, key=None, timeout=120.0):
    """POST /v1 + path to nginx on port: (status, headers, body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = {"Content-Type": "application/json"}
        if key:
            h["Authorization"] = "Bearer " + key
        c.request("POST", "/v1" + path, body=json.dumps(body), headers=h)
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()

