#!/usr/bin/env python3
"""TTFT of a long shared prefix plus a short question: cold, local prefix
cache hit, and Redis tier hit after the daemon restarted (local cache
empty), in the same run.

Starts its own redis-server and llm-engine (BUILD/llm-engine) and talks
the engine protocol (tools/llm_proto.py), so the figures are the engine's
own; nginx adds the same small constant to each.

    python3 bench/prefix_cache.py [--build build] [--prefix 1500]
        [--question 24] [--reps 5] [--threads 2]

Prints a markdown table for bench/RESULTS.md.
"""
import argparse
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import llm_proto  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("timed out waiting for " + what)


def start_engine(a, model, workdir, redis_addr, tag):
    sock = os.path.join(workdir, "engine-%s.sock" % tag)
    log = open(os.path.join(workdir, "engine-%s.log" % tag), "ab")
    p = subprocess.Popen(
        [os.path.join(a.build, "llm-engine"), "--model", model,
         "--listen", "unix:" + sock, "--threads", str(a.threads),
         "--kv-redis", redis_addr, "--kv-redis-prefix", "bench:kv:"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ready():
        if not os.path.exists(sock):
            return False
        with llm_proto.Client("unix:" + sock, timeout=5, hello=True):
            return True
    wait_for(ready, 120, "llm-engine")
    return p, "unix:" + sock


def ttft(addr, prompt):
    with llm_proto.Client(addr, timeout=120, hello=True) as c:
        r = c.generate(prompt, max_tokens=1, ignore_eos=True,
                       cache_namespace="bench")
        if r.error:
            raise SystemExit("engine error: %s" % (r.error,))
        return (r.t_first - r.t_submit) * 1000.0, r.done["cached_tokens"]


def stats(addr):
    with llm_proto.Client(addr, timeout=10, hello=True) as c:
        return c.stats()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--prefix", type=int, default=1500)
    ap.add_argument("--question", type=int, default=24)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    model = a.model or subprocess.run(
        [os.path.join(ROOT, "tools/default-model.sh")], capture_output=True,
        text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="prefix-bench-")
    rport = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    raddr = "127.0.0.1:%d" % rport
    wait_for(lambda: socket.create_connection(("127.0.0.1", rport), 1)
             .close() is None, 20, "redis-server")

    rnd = random.Random(2026)
    prefixes = [[rnd.randrange(200, 40000) for _ in range(a.prefix)]
                for _ in range(a.reps)]

    def question():
        return [rnd.randrange(200, 40000) for _ in range(a.question)]

    cold, local, tier = [], [], []
    cached_local, cached_tier = [], []
    eng, addr = start_engine(a, model, work, raddr, "a")
    try:
        ttft(addr, question())          # warm-up: threads, caches
        for p in prefixes:
            cold.append(ttft(addr, p + question())[0])
            t, c = ttft(addr, p + question())
            local.append(t)
            cached_local.append(c)
        want = sum(a.prefix // 16 for _ in prefixes)
        wait_for(lambda: stats(addr)["tier_puts"] >= want, 60,
                 "tier writes")
    finally:
        eng.terminate()
        eng.wait(30)

    eng, addr = start_engine(a, model, work, raddr, "b")
    try:
        ttft(addr, question())
        for p in prefixes:
            t, c = ttft(addr, p + question())
            tier.append(t)
            cached_tier.append(c)
        st = stats(addr)
    finally:
        eng.terminate()
        eng.wait(30)
        redis.terminate()
        redis.wait(10)

    mc, ml, mt = (statistics.median(x) for x in (cold, local, tier))
    print("Prefix cache TTFT, %d-token shared prefix + %d-token question, "
          "SmolLM2-135M Q4_1, %d threads, median of %d" %
          (a.prefix, a.question, a.threads, a.reps))
    print("machine: %s, %d cores; date %s" %
          (platform.processor() or platform.machine(), os.cpu_count(),
           time.strftime("%Y-%m-%d")))
    print()
    print("| case | TTFT ms (median) | min..max | cached tokens | "
          "vs cold |")
    print("|---|---|---|---|---|")
    print("| cold (no hit) | %.1f | %.1f..%.1f | 0 | 1.00 |" %
          (mc, min(cold), max(cold)))
    print("| local hit | %.1f | %.1f..%.1f | %d | %.3f |" %
          (ml, min(local), max(local), cached_local[0], ml / mc))
    print("| Redis hit after restart | %.1f | %.1f..%.1f | %d | %.3f |" %
          (mt, min(tier), max(tier), cached_tier[0], mt / mc))
    print()
    print("tier after restart: %d blocks hit, %d corrupt, %d errors" %
          (st["tier_blocks_hit"], st["tier_corrupt"], st["tier_errors"]))


if __name__ == "__main__":
    main()
