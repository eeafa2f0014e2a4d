"""Helpers for the tenant, limit and metrics tests: a tenants file, an
nginx with tenants (and optionally Redis and /metrics), raw requests with
API keys, Redis at a fixed port (to stop and restart it mid-test).

    nginx_with(factory, engine, tenants, tmp, redis=None, http="",
               location="", workers=4, metrics=False) -> Nginx
    chat(n, key, max_tokens=1, **body) -> (status, headers, json or bytes)
"""

import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time

from conftest import Redis, free_port, stop_pid, wait_until

MODEL = "smollm2"
MSGS = [{"role": "user", "content": "Hi"}]

# OpenAI's duration format: "0s", "350ms", "1s", "1.5s", "6m0s", "1h2m3s"
DURATION = re.compile(r"^(0s|\d+ms|(\d+h)?(\d+m)?\d+(\.\d{1,3})?s)$")


def key_digest(key):
    return hashlib.sha256(key.encode()).hexdigest()


def write_tenants(path, tenants, defaults=None):
    doc = {"tenants": tenants}
    if defaults is not None:
        doc["defaults"] = defaults
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def tenant(name, key=None, keys=None, **kw):
    t = {"name": name}
    if key is not None:
        t["keys"] = [key]
    if keys is not None:
        t["keys"] = keys
    if "limits" in kw:
        kw["limits"] = dict(kw["limits"])
    t.update(kw)
    return t


def nginx_with(factory, engine_addr, tenants_file, redis=None, http="",
               location="", workers=4, metrics=False):
    """An nginx (4 workers) with llm_tenants, optionally llm_redis and a
    second server with /metrics (its port in n.metrics_port)."""
    extra = []
    if tenants_file:
        extra.append("llm_tenants %s;" % tenants_file)
    if redis is not None:
        extra.append("llm_redis %s timeout=300ms connect_timeout=300ms;"
                     % redis.addr)
    extra.append("log_format tenants '$status $llm_tenant $llm_reject "
                 "$llm_adapter';")
    extra.append("access_log tenants.log tenants;")
    mport = None
    if metrics:
        mport = free_port()
        extra.append("server { listen 127.0.0.1:%d; "
                     "location = /metrics { llm_metrics; } }" % mport)
    extra.append(http)
    n = factory(engine_addr, workers=workers,
                http_extra="\n    ".join(extra), location_extra=location)
    n.metrics_port = mport
    return n


def chat(n, key=None, max_tokens=1, headers=None, timeout=120.0, **body):
    b = {"model": MODEL, "messages": MSGS, "max_tokens": max_tokens,
         "temperature": 0}
    b.update(body)
    if b.get("max_tokens") is None:
        del b["max_tokens"]
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = "Bearer " + key
    status, hdrs, data = n.post("/chat/completions", b, headers=h,
                                timeout=timeout)
    try:
        doc = json.loads(data)
    except ValueError:
        doc = data
    return status, hdrs, doc


def parallel(fn, n):
    """Runs fn(i) in n threads at once; the results in order."""
    out = [None] * n
    go = threading.Barrier(n)

    def run(i):
        go.wait()
        out[i] = fn(i)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(180)
    return out


def tenants_log(n):
    p = os.path.join(n.prefix, "tenants.log")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return f.read().splitlines()


def metrics_text(n):
    c = http.client.HTTPConnection("127.0.0.1", n.metrics_port, timeout=30)
    try:
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read().decode()
        assert r.status == 200, body
        return r.getheader("content-type"), body
    finally:
        c.close()


def metric(text, name, **labels):
    """The value of one sample, or None."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(4))
    return None


class Holder:
    """A streaming request that holds a concurrency slot until closed:
    the first SSE bytes say it was admitted (or the status says not)."""

    def __init__(self, n, key, max_tokens=2000):
        self.sock = socket.create_connection(("127.0.0.1", n.port),
                                             timeout=120)
        body = json.dumps({"model": MODEL, "messages": [
            {"role": "user", "content": "Write a very long story about "
                                        "a dragon."}],
            "max_tokens": max_tokens, "stream": True,
            "temperature": 0}).encode()
        self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n"
                          b"Host: x\r\nContent-Type: application/json\r\n"
                          b"Authorization: Bearer " + key.encode() +
                          b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                          + body)
        self.head = b""

    def wait_admitted(self):
        while b"\r\n\r\n" not in self.head:
            d = self.sock.recv(65536)
            if not d:
                break
            self.head += d
        line = self.head.split(b"\r\n", 1)[0]
        return int(line.split()[1])

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class FixedRedis(Redis):
    """A redis-server on a given port (to restart it on the same one)."""

    def __init__(self, workdir, port=None, binary="redis-server"):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.addr = "%s:%d" % (self.host, self.port)
        self.url = "redis://%s/0" % self.addr
        self.log = os.path.join(workdir, "redis-%d.log" % self.port)
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", self.host,
             "--save", "", "--appendonly", "no", "--dir", workdir,
             "--daemonize", "no", "--protected-mode", "yes"],
            stdout=self._logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid


def redis_set(r, key, value):
    out = r.command("SET", key, value)
    assert out.startswith(b"+OK"), out


def wait_for(pred, timeout, what, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise TimeoutError(what)


def wait_new_workers(n, old, timeout=20.0):
    """After a reload: the old workers are gone and as many new ones
    run."""
    def done():
        now = set(n.worker_pids())
        return now and not (now & set(old)) and len(now) == len(old)
    wait_for(done, timeout, "new workers after reload")


__all__ = ["MODEL", "MSGS", "DURATION", "key_digest", "write_tenants",
           "tenant", "nginx_with", "chat", "parallel", "tenants_log",
           "metrics_text", "metric", "Holder", "FixedRedis", "redis_set",
           "wait_for", "wait_new_workers", "stop_pid", "wait_until"]
