"""Concurrency slots: the lease of a Redis slot is renewed while its
request runs (a request longer than llm_limits_lease keeps its slot) and
a slot whose worker was killed is free within about one lease; the queue
for slots is first come, first served across the workers of one host
(tickets in the shared zone), and a waiter that leaves or whose worker
dies does not block the line.  Real nginx (4 workers), real llm-engine,
real redis-server.
"""

import json
import os
import signal
import socket
import threading
import time

import pytest

from conftest import free_port
from nginx_proc import BAD_LOG, nginx_module, start_nginx  # noqa: F401
from tenants_util import (chat, nginx_with, tenant, wait_for,
                          write_tenants)

LONG = "sk-slots-long-000000000000000"
LINE = "sk-slots-line-000000000000000"

LEASE_S = 2.0

TENANTS = [
    tenant("long", key=LONG, limits={"max_concurrent": 1}),
    tenant("line", key=LINE, limits={"max_concurrent": 1, "max_queued": 8}),
]

# every waiter logs its order and worker when it ends
ORDER_LOG = ("log_format order '$http_x_order $status $pid $msec "
             "$request_time';\n"
             "    access_log order.log order;")


# ---- raw clients ---------------------------------------------------------

class Stream:
    """A streaming completion that runs long (a counting prompt, which
    the model does not end) and holds its slot until closed; the client
    reads nothing after the headers."""

    def __init__(self, port, key, max_tokens=4000, headers=None):
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=120)
        body = json.dumps({"model": "smollm2",
                           "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
                           "max_tokens": max_tokens, "stream": True,
                           "temperature": 0}).encode()
        extra = "".join("%s: %s\r\n" % kv for kv in (headers or {}).items())
        self.sock.sendall(b"POST /v1/completions HTTP/1.1\r\n"
                          b"Host: x\r\nContent-Type: application/json\r\n"
                          b"Authorization: Bearer " + key.encode() +
                          b"\r\n" + extra.encode() +
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.head = b""

    def status(self):
        while b"\r\n\r\n" not in self.head:
            d = self.sock.recv(65536)
            if not d:
                break
            self.head += d
        return int(self.head.split(b"\r\n", 1)[0].split()[1])

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def post_chat(port, key, order, result, max_tokens=2, sock=None):
    """One chat request on its own connection (or sock), with X-Order;
    the status lands in result[order]."""
    body = json.dumps({"model": "smollm2",
                       "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    try:
        s = sock or socket.create_connection(("127.0.0.1", port),
                                             timeout=120)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + key.encode() + b"\r\n"
                  b"X-Order: %d\r\nContent-Length: %d\r\n\r\n"
                  % (order, len(body)) + body)
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
        s.close()
        result[order] = int(data.split(b"\r\n", 1)[0].split()[1])
    except (OSError, ValueError, IndexError) as e:
        result[order] = repr(e)


def worker_of(n, sock, port):
    """The pid of the nginx worker holding the server side of sock."""
    lport = sock.getsockname()[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if (int(f[1].rsplit(":", 1)[1], 16) == port
                    and int(f[2].rsplit(":", 1)[1], 16) == lport):
                inodes.add("socket:[%s]" % f[9])
    for pid in n.worker_pids():
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) in inodes:
                    return pid
            except OSError:
                continue
    return None


def order_log(n):
    p = os.path.join(n.prefix, "order.log")
    if not os.path.exists(p):
        return []
    out = []
    with open(p) as f:
        for line in f:
            o, status, pid, msec, took = line.split()
            if o != "-":
                # order, status, worker, end, start (s)
                out.append((int(o), int(status), int(pid), float(msec),
                            round(float(msec) - float(took), 3)))
    return out


def check_log_except(n, killed):
    """error.log is clean but for the workers the test killed."""
    bad = [l for l in n.error_log_text().splitlines()
           if BAD_LOG.search(l)
           and not any("%d exited on signal 9" % p in l for p in killed)]
    assert not bad, "nginx error.log:\n" + "\n".join(bad[:20])


def slots_nginx(factory, engine, f, redis=None, mode="local", http=""):
    """4 workers; a second listener with reuseport, so that connections
    spread over the workers by hash (its port in n.spread_port)."""
    spread = free_port()
    conf = ("llm_limits %s;\n    %s\n    %s\n"
            "    server { listen 127.0.0.1:%d reuseport;\n"
            "             location /v1/ { llm_api openai; } }"
            % (mode, http, ORDER_LOG, spread))
    n = nginx_with(factory, engine.addr, f, redis=redis, workers=4,
                   http=conf)
    n.spread_port = spread
    wait_for(lambda: len(n.worker_pids()) == 4, 10, "4 workers")
    return n


@pytest.fixture
def factory(tmp_path, model_path):
    def start(engines, **kw):
        return start_nginx(str(tmp_path / "nginx"), engines, model_path,
                           **kw)
    return start


# ---- the lease of a Redis slot --------------------------------------------

def test_lease_renewed_while_the_request_runs(factory, engine, tmp_path,
                                              redis_server):
    redis_server.command("FLUSHALL")
    f = write_tenants(str(tmp_path / "tenants.json"), TENANTS)
    n = slots_nginx(factory, engine, f, redis=redis_server, mode="redis",
                    http="llm_limits_lease %ds;" % LEASE_S)
    killed = []
    s = None
    try:
        s = Stream(n.port, LONG)
        assert s.status() == 200
        t0 = time.monotonic()

        # past 2.5 leases the slot is still held: a second request is
        # refused (without renewal the slot would have expired at 2 s)
        for at in (0.5, LEASE_S * 1.5, LEASE_S * 2.5):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            st, h, doc = chat(n, key=LONG)
            assert st == 429, (at, st, doc)
            assert doc["error"]["type"] == "concurrency"
        # its expiry in Redis is always less than a lease away, and the
        # set itself lives on
        z = redis_server.command("ZRANGE", "llm:cc:{long}", "0", "-1",
                                 "WITHSCORES").split(b"\r\n")
        assert z[0] == b"*2", z
        score = int(z[4])
        tm = redis_server.command("TIME").split(b"\r\n")
        now_ms = int(tm[2]) * 1000 + int(tm[4]) // 1000
        assert 0 < score - now_ms <= LEASE_S * 1000, score - now_ms
        ttl = int(redis_server.command("PTTL", "llm:cc:{long}")[1:-2])
        assert ttl > 0, ttl

        # the worker that holds it dies: nothing releases the slot, it
        # expires within one lease of the last renewal
        pid = worker_of(n, s.sock, n.port)
        assert pid, "no worker holds the stream"
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        t_kill = time.monotonic()
        st, h, doc = chat(n, key=LONG)
        assert st == 429, doc
        wait_for(lambda: chat(n, key=LONG)[0] == 200, LEASE_S + 3.0,
                 "the slot of the dead worker expires", step=0.1)
        freed = time.monotonic() - t_kill
        assert freed <= LEASE_S + 1.5, freed
    finally:
        if s:
            s.close()
        n.stop()
    check_log_except(n, killed)


def test_lease_too_short_fails_at_config_time(nginx_module, model_path,
                                              tmp_path):
    from nginx_proc import Nginx
    f = write_tenants(str(tmp_path / "t.json"), TENANTS)
    n = Nginx(str(tmp_path), "unix:/nonexistent.sock", model_path,
              http_extra="llm_tenants %s; llm_limits_lease 500ms;" % f)
    t = n.test_config()
    assert t.returncode != 0 and "llm_limits_lease" in t.stderr, t.stderr


# ---- the line for slots ----------------------------------------------------

@pytest.mark.parametrize("mode", ["local", "redis"])
def test_waiters_admitted_in_arrival_order(factory, engine, tmp_path,
                                           redis_server, mode):
    redis_server.command("FLUSHALL")
    f = write_tenants(str(tmp_path / "tenants.json"), TENANTS)
    n = slots_nginx(factory, engine, f, mode=mode,
                    redis=redis_server if mode == "redis" else None)
    count = 8
    result = {}
    threads = []
    holder = None
    try:
        holder = Stream(n.port, LINE, max_tokens=1000)
        assert holder.status() == 200

        # one connection each, 50 ms apart: they land on several workers
        # and each joins the line before the next arrives
        for i in range(count):
            t = threading.Thread(target=post_chat,
                                 args=(n.spread_port, LINE, i, result))
            t.start()
            threads.append(t)
            time.sleep(0.05)
        time.sleep(0.3)
        assert result == {}, result         # all wait
        holder.close()
        for t in threads:
            t.join(120)
    finally:
        if holder:
            holder.close()
    try:
        assert result == {i: 200 for i in range(count)}, result
        wait_for(lambda: len(order_log(n)) == count, 10, "log lines")
        log = sorted(order_log(n), key=lambda e: e[3])
        assert [e[0] for e in log] == list(range(count)), log
        assert len({e[2] for e in log}) >= 2, \
            "all requests landed on one worker: %s" % log
    finally:
        n.stop()
    n.check_log()


def test_waiter_that_leaves_does_not_block(factory, engine, tmp_path):
    f = write_tenants(str(tmp_path / "tenants.json"), TENANTS)
    n = slots_nginx(factory, engine, f)
    holder = gone = None
    result = {}
    try:
        holder = Stream(n.port, LINE, max_tokens=1000)
        assert holder.status() == 200
        # an earlier waiter whose client goes away
        gone = Stream(n.spread_port, LINE, max_tokens=2)
        time.sleep(0.2)
        t = threading.Thread(target=post_chat,
                             args=(n.spread_port, LINE, 1, result))
        t.start()
        time.sleep(0.3)
        gone.close()
        time.sleep(0.2)
        t0 = time.monotonic()
        holder.close()
        t.join(60)
        took = time.monotonic() - t0
        assert result == {1: 200}, result
        # well under the time a stale ticket takes to be dropped (1 s)
        assert took < 0.9, took
    finally:
        for s in (holder, gone):
            if s:
                s.close()
        n.stop()
    n.check_log()


def connect_avoiding(n, port, avoid):
    """A connection that a worker not in avoid has accepted."""
    for _ in range(100):
        c = socket.create_connection(("127.0.0.1", port), timeout=120)
        pid = wait_for(lambda: worker_of(n, c, port), 5, "accepted")
        if pid not in avoid:
            return c, pid
        c.close()
    raise AssertionError("every connection landed in %s" % avoid)


def test_waiter_of_a_dead_worker_does_not_block(factory, engine, tmp_path):
    f = write_tenants(str(tmp_path / "tenants.json"), TENANTS)
    n = slots_nginx(factory, engine, f)
    holder = None
    socks = []
    killed = []
    result = {}
    try:
        holder = Stream(n.port, LINE, max_tokens=1000)
        assert holder.status() == 200
        hpid = worker_of(n, holder.sock, n.port)

        def waiter(order, avoid):
            """A waiter in a worker not in avoid: (thread, its worker)."""
            c, pid = connect_avoiding(n, n.spread_port, avoid)
            socks.append(c)
            t = threading.Thread(target=post_chat,
                                 args=(n.spread_port, LINE, order, result),
                                 kwargs={"sock": c})
            t.start()
            time.sleep(0.3)
            return t, pid

        # an earlier waiter in a worker of its own, which is killed later,
        # and a later waiter in another worker
        t1, victim = waiter(0, {hpid})
        t2, _ = waiter(1, {victim})
        assert result == {}, result

        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        t0 = time.monotonic()
        holder.close()
        t2.join(60)
        took = time.monotonic() - t0
        t1.join(10)
        assert result.get(1) == 200, result
        # it waited for the dead waiter's ticket to go stale (1 s) and no
        # longer
        assert 0.5 <= took < 3.0, took
    finally:
        for s in socks + [holder]:
            if s:
                s.close()
        n.stop()
    check_log_except(n, killed)
