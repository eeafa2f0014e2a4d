#!/usr/bin/env python3
"""Priority and fair share between tenants, measured end to end: the
stock nginx loading our module, the real llm-engine daemon with the
default model, a generated tenants file, load over HTTP (issue 5).

    bench/tenants_sched.py [--build build] [--tests priority,fair,weighted]
                           [--threads 2] [--workers 2] [--rounds 2]
                           [--probes 15] [--engine-args "..."]
                           [--engine-probes] [--json FILE]

Each test starts its own llm-engine (--threads 2, --prefix-cache off:
the prompts share nothing anyway) and /usr/sbin/nginx (2 workers) in a
temp dir with t/integration's process helpers and a tenants file written
for it, and stops both by pid at the end.  Tenant limits are left out (no
limit), so that nothing but the engine's scheduler decides who is served.
Requests are streaming /v1/completions with a prompt of random token ids
(exact prompt lengths), greedy, stream_options.include_usage; each load
stream is a closed loop on one keep-alive connection.

priority   engine --max-seqs 8.  An interactive-class tenant sends probes
           one at a time (16-token prompt, max_tokens 8, a random pause
           of 0.3-0.7 s before each, so that they land at random points
           of the engine's steps).  Phases in turn: idle, then --rounds x
           (saturated, idle), --probes probes each; saturated = two
           batch-class tenants keep 2 x 8 streams going (prompts 64-192
           tokens, max_tokens 128-256: every slot busy and about 8
           requests queued in the engine), started --saturate-s before
           the probes.  Alternating spreads the machine's drift (other
           jobs) over both.  TTFT = request sent -> first SSE event with
           a choice, at the client; $llm_ttft (the module's own, from
           the access log) is shown beside it.  Target: the saturated
           median within 2x the idle median.
fair       engine --max-seqs 4.  Two standard-class tenants of weight 1:
           "heavy" keeps 10x the concurrent requests of "light" (40 vs
           4), prompts 32-96 tokens, max_tokens 32-96, both tenants'
           requests drawn from the same distribution.  After --warmup-s,
           served tokens per tenant over --window-s: a request's prompt
           tokens count when its first token arrives (prefill done), its
           completion tokens as they arrive (the usage's count spread
           over its SSE events; requests still running at the end of the
           window count one token per event).  Target: light / heavy
           within 20% of 1.
weighted   the same with "light" of weight 2 (and 6 streams against 60,
           so that it stays backlogged while it holds two thirds of the
           slots).  Target: light / heavy = 2 within 20%.

Also reported: the engine's running / waiting sequences, KV blocks, mean
step time and preemptions (STATS, sampled while loaded); for fair and
weighted how often the light tenant had a request waiting for its first
token (it must be backlogged for the ratio to mean anything); the load
average of the machine.  --engine-probes also sends each phase's probes
straight to the engine (protocol, class interactive) and shows the
engine's own queue time and TTFT from DONE.  --engine-args passes more
llm-engine flags (e.g. "--max-step-tokens 64").
"""

import argparse
import asyncio
import datetime
import json
import os
import random
import struct
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(REPO, "tools"))

import llm_proto as P  # noqa: E402
from loadgen import pct, read_chunked_sse  # noqa: E402  (bench/)

MODEL = "smollm2"


# ---- servers -----------------------------------------------------------

def write_tenants(path, tenants):
    """tenants: [(name, key, priority, weight)]; no limits."""
    doc = {"tenants": [{"name": n, "keys": [k], "priority": p, "weight": w}
                       for n, k, p, w in tenants]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


class Stack:
    """One llm-engine and one nginx with a tenants file."""

    def __init__(self, args, tmp, tenants, max_seqs):
        os.environ["LLM_BUILD"] = args.build
        sys.path.insert(0, os.path.join(REPO, "t", "integration"))
        import conftest
        import nginx_proc
        model = args.model or conftest.default_model()
        if model is None:
            sys.exit("default model not installed (tools/default-model.sh)")
        binary = os.path.join(conftest.build_dir(), "llm-engine")
        if not os.access(binary, os.X_OK):
            sys.exit("%s not built (make BUILD=%s)" % (binary, args.build))
        self.engine = self.nginx = None
        ed = os.path.join(tmp, "engine")
        os.makedirs(ed)
        extra = ["--max-seqs", str(max_seqs),
                 "--prefix-cache", args.prefix_cache]
        extra += args.engine_args.split()
        self.engine = conftest.Engine(binary, model, ed, tcp=False,
                                      threads=args.threads,
                                      extra_args=extra)
        try:
            self.engine.wait_ready()
            nd = os.path.join(tmp, "nginx")
            os.makedirs(nd)
            tf = os.path.join(tmp, "tenants.json")
            write_tenants(tf, tenants)
            self.nginx = nginx_proc.start_nginx(
                nd, self.engine.addr, model, workers=args.workers,
                model_name=MODEL,
                http_extra="llm_tenants %s;\n    llm_engine_timeout 300s;"
                % tf)
            self.port = self.nginx.port
            with P.Client(self.engine.addr, hello=True) as c:
                self.vocab = c.info["n_vocab"]
        except BaseException:
            self.stop()
            raise

    def stats(self):
        """The base fields of STATS only (waiting, running, KV blocks,
        steps, preemptions), so that fields added later do not matter."""
        with P.Client(self.engine.addr, hello=True, timeout=10) as c:
            p = c._request(P.STATS_REQ, P.STATS)
        n = struct.calcsize("<10I7Q")
        return dict(zip(P.STATS_FIELDS, struct.unpack("<10I7Q", p[:n])))

    def stop(self):
        if self.nginx is not None:
            self.nginx.stop()
            self.nginx.check_log()
        if self.engine is not None:
            self.engine.stop()


# ---- the client ----------------------------------------------------------

class Req:
    """One request's timeline."""

    def __init__(self, tenant, n_prompt):
        self.tenant = tenant
        self.n_prompt = n_prompt
        self.t0 = None
        self.first = None           # first SSE event with a choice
        self.events = []            # times of events carrying text
        self.usage = None
        self.status = None
        self.error = None

    def ttft(self):
        return None if self.first is None else self.first - self.t0


class Conn:
    """A keep-alive HTTP/1.1 connection sending streaming completions."""

    def __init__(self, port, key):
        self.port = port
        self.key = key
        self.reader = self.writer = None

    async def send(self, req, prompt, max_tokens):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                "127.0.0.1", self.port)
        body = json.dumps({
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}).encode()
        head = ("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Authorization: Bearer %s\r\n"
                "Content-Type: application/json\r\n"
                "Content-Length: %d\r\n\r\n" % (self.key, len(body)))
        req.t0 = time.monotonic()
        self.writer.write(head.encode() + body)
        r = self.reader
        status = await r.readline()
        if not status:
            raise ConnectionError("connection closed")
        headers = {}
        while True:
            ln = await r.readline()
            if ln in (b"\r\n", b"\n", b""):
                break
            k, _, v = ln.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        req.status = int(status.split()[1])
        if req.status != 200 or "chunked" not in headers.get(
                "transfer-encoding", ""):
            n = int(headers.get("content-length", 0))
            data = await r.readexactly(n) if n else b""
            req.error = "%d %s" % (req.status, data[:200])
            if headers.get("connection") == "close":
                self.close()
            return

        def on_event(data):
            now = time.monotonic()
            if data == b"[DONE]":
                return
            d = json.loads(data)
            if "error" in d:
                req.error = str(d["error"])
                return
            ch = d.get("choices") or []
            if ch and req.first is None:
                req.first = now
            if ch and ch[0].get("text"):
                req.events.append(now)
            if d.get("usage"):
                req.usage = d["usage"]

        await read_chunked_sse(r, on_event)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def random_prompt(rng, vocab, n):
    # skip the low ids: special and byte tokens
    return [rng.randrange(256, vocab) for _ in range(n)]


async def load_stream(port, key, tenant, rng, vocab, prompt_range,
                      gen_range, out):
    """A closed loop: one request after another until cancelled."""
    c = Conn(port, key)
    try:
        while True:
            prompt = random_prompt(rng, vocab, rng.randint(*prompt_range))
            req = Req(tenant, len(prompt))
            out.append(req)
            try:
                await c.send(req, prompt, rng.randint(*gen_range))
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                req.error = "connection: %s" % e
                c.close()
                await asyncio.sleep(0.1)
    finally:
        c.close()


async def cancel_all(tasks):
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def loadavg():
    return "%.2f %.2f %.2f" % os.getloadavg()


class Sampler:
    """Samples the engine's STATS (and a callback) every period."""

    def __init__(self, stack, period=0.5, extra=None):
        self.stack = stack
        self.period = period
        self.extra = extra
        self.samples = []
        self.extra_samples = []

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            try:
                st = await loop.run_in_executor(None, self.stack.stats)
                st["t"] = time.monotonic()
                self.samples.append(st)
            except (OSError, P.ProtocolError):
                pass
            if self.extra is not None:
                self.extra_samples.append(self.extra())
            await asyncio.sleep(self.period)

    def clear(self):
        self.samples.clear()
        self.extra_samples.clear()


def engine_summary(samples):
    """Means over STATS samples; steps and preemptions are counted from
    the first to the last sample of each list (one list per window)."""
    flat = [s for w in samples for s in w]
    if not flat:
        return {}
    run = [s["running"] for s in flat]
    wait = [s["waiting"] for s in flat]
    steps = sum(w[-1]["steps"] - w[0]["steps"] for w in samples if w)
    secs = sum(w[-1]["t"] - w[0]["t"] for w in samples if w)
    return dict(samples=len(run), running_mean=sum(run) / len(run),
                running_min=min(run), waiting_mean=sum(wait) / len(wait),
                waiting_min=min(wait),
                kv_used_max=max(s["kv_blocks_used"] for s in flat),
                kv_total=flat[0]["kv_blocks_total"],
                step_ms=1e3 * secs / steps if steps else float("nan"),
                preemptions=sum(w[-1]["preemptions"] - w[0]["preemptions"]
                                for w in samples if w))


# ---- priority ------------------------------------------------------------

async def probes(port, key, vocab, n, rng):
    """n interactive requests one at a time: their TTFTs in ms."""
    c = Conn(port, key)
    out = []
    try:
        for _ in range(n):
            await asyncio.sleep(rng.uniform(0.3, 0.7))
            req = Req("interactive", 16)
            await c.send(req, random_prompt(rng, vocab, 16), 8)
            if req.error or req.first is None:
                raise RuntimeError("probe failed: %s" % req.error)
            out.append(req.ttft() * 1e3)
    finally:
        c.close()
    return out


def engine_probes(addr, vocab, n, rng):
    """The same probes sent straight to the engine (protocol, class
    interactive): the engine's own queue_ms and ttft_ms from DONE."""
    out = []
    with P.Client(addr, hello=True, timeout=60) as c:
        for _ in range(n):
            time.sleep(rng.uniform(0.3, 0.7))
            r = c.generate(random_prompt(rng, vocab, 16), max_tokens=8,
                           priority=0, weight=1, tenant="inter-direct")
            if r.done is None:
                raise RuntimeError("engine probe failed: %s" % (r.error,))
            out.append((r.done["queue_ms"], r.done["ttft_ms"]))
    return out


def module_ttfts(stack, skip):
    """$llm_ttft (ms) of the probes (16 prompt tokens) in the access log
    lines after the first skip; and the count of lines."""
    lines = stack.nginx.access_log_lines()
    out = []
    for ln in lines[skip:]:
        f = dict(x.split("=", 1) for x in ln.split() if "=" in x)
        if f.get("prompt") == "16" and f.get("ttft", "-") != "-":
            out.append(float(f["ttft"]) * 1e3)
    return out, len(lines)


async def phase_probes(args, stack, key, n, rng):
    """n probes through nginx, then (--engine-probes) n straight to the
    engine; returns (client TTFTs, module TTFTs, [(queue_ms, ttft_ms)])."""
    await asyncio.sleep(0.5)        # the access log is written
    _, skip = module_ttfts(stack, 0)
    xs = await probes(stack.port, key, stack.vocab, n, rng)
    await asyncio.sleep(0.2)
    mod, _ = module_ttfts(stack, skip)
    eng = []
    if args.engine_probes:
        loop = asyncio.get_running_loop()
        eng = await loop.run_in_executor(None, engine_probes,
                                         stack.engine.addr, stack.vocab, n,
                                         rng)
    return xs, mod, eng


def ttft_row(name, xs, la, mod, eng=()):
    r = dict(phase=name, n=len(xs), p50=pct(xs, 50), p90=pct(xs, 90),
             mean=sum(xs) / len(xs), max=max(xs), loadavg=la,
             module_p50=pct(mod, 50), module_n=len(mod))
    if eng:
        r["engine_queue_p50"] = pct([q for q, _ in eng], 50)
        r["engine_ttft_p50"] = pct([t for _, t in eng], 50)
        r["engine_ttft_p90"] = pct([t for _, t in eng], 90)
    return r


async def run_priority(args, stack):
    keys = {"inter": "sk-sched-inter", "bulk1": "sk-sched-bulk1",
            "bulk2": "sk-sched-bulk2"}
    rng = random.Random(args.seed)
    v = stack.vocab
    n = args.probes
    # warm-up: page in the model, first connections
    await probes(stack.port, keys["inter"], v, 3, random.Random(0))

    phases = {"idle": [], "saturated": []}      # (xs, mod, eng, loadavg)
    windows = []
    reqs = []
    batch_s = 0.0

    async def idle():
        xs, mod, eng = await phase_probes(args, stack, keys["inter"], n, rng)
        phases["idle"].append((xs, mod, eng, loadavg()))
        print("idle: p50 %.1f ms" % pct(xs, 50), flush=True)

    async def saturated(rnd):
        nonlocal batch_s
        tasks = []
        for t in ("bulk1", "bulk2"):
            for i in range(args.batch_streams):
                tasks.append(asyncio.ensure_future(load_stream(
                    stack.port, keys[t], t,
                    random.Random("%s-%d-%d-%d" % (t, i, rnd, args.seed)),
                    v, args.batch_prompt, args.batch_gen, reqs)))
        sampler = Sampler(stack)
        st = asyncio.ensure_future(sampler.run())
        t0 = time.monotonic()
        try:
            await asyncio.sleep(args.saturate_s)
            sampler.clear()
            xs, mod, eng = await phase_probes(args, stack, keys["inter"], n,
                                              rng)
            la = loadavg()
        finally:
            batch_s += time.monotonic() - t0
            await cancel_all(tasks + [st])
        windows.append(list(sampler.samples))
        phases["saturated"].append((xs, mod, eng, la))
        print("saturated: p50 %.1f ms" % pct(xs, 50), flush=True)
        await asyncio.sleep(2.0)    # the cancelled streams leave the engine

    # idle and saturated phases in turn, so that the machine's drift
    # (other jobs) falls on both
    await idle()
    for rnd in range(args.rounds):
        await saturated(rnd)
        await idle()

    rows = []
    for name, label in (("idle", "idle"),
                        ("saturated", "saturated by batch class")):
        xs = [x for p in phases[name] for x in p[0]]
        mod = [x for p in phases[name] for x in p[1]]
        eng = [x for p in phases[name] for x in p[2]]
        rows.append(ttft_row(label, xs, ", ".join(p[3] for p in phases[name]),
                             mod, eng))
    batch_tokens = sum(len(r.events) for r in reqs)
    batch_errors = [r.error for r in reqs if r.error
                    and not r.error.startswith("connection")]
    return dict(test="priority", rows=rows, engine=engine_summary(windows),
                rounds=args.rounds, batch_streams=2 * args.batch_streams,
                batch_tok_s=batch_tokens / max(batch_s, 1e-9),
                batch_errors=len(batch_errors),
                first_batch_error=batch_errors[0] if batch_errors else "",
                ratio_p50=rows[1]["p50"] / rows[0]["p50"],
                ratio_p90=rows[1]["p90"] / rows[0]["p90"])


# ---- fair share -----------------------------------------------------------

def served_in_window(reqs, w0, w1):
    """Tokens served to each tenant in [w0, w1): prompt at the first
    token, completion tokens as they arrive."""
    out = {}
    for r in reqs:
        if r.first is None:
            continue
        tok = out.setdefault(r.tenant, dict(prompt=0.0, completion=0.0,
                                            requests=0))
        if w0 <= r.first < w1:
            tok["prompt"] += (r.usage["prompt_tokens"] if r.usage
                              else r.n_prompt)
        if r.usage and r.events:
            per = r.usage["completion_tokens"] / len(r.events)
        else:
            per = 1.0
        tok["completion"] += per * sum(1 for t in r.events if w0 <= t < w1)
        if r.usage and r.events and w0 <= r.events[-1] < w1:
            tok["requests"] += 1
    return out


async def run_fair(args, stack, weights, light_n, heavy_n):
    keys = {"light": "sk-sched-light", "heavy": "sk-sched-heavy"}
    v = stack.vocab
    reqs = []
    tasks = []
    for t, n in (("light", light_n), ("heavy", heavy_n)):
        for i in range(n):
            tasks.append(asyncio.ensure_future(load_stream(
                stack.port, keys[t], t,
                random.Random("%s-%d-%d" % (t, i, args.seed)), v,
                (32, 96), (32, 96), reqs)))

    def light_waiting():
        # requests of light sent and still without a first token
        return sum(1 for r in reqs if r.tenant == "light"
                   and r.t0 is not None and r.first is None
                   and r.status in (None, 200) and not r.error)

    sampler = Sampler(stack, 0.25, light_waiting)
    st = asyncio.ensure_future(sampler.run())
    try:
        await asyncio.sleep(args.warmup_s)
        sampler.clear()
        la0 = loadavg()
        w0 = time.monotonic()
        await asyncio.sleep(args.window_s)
        w1 = time.monotonic()
        la1 = loadavg()
    finally:
        await cancel_all(tasks + [st])
    served = served_in_window(reqs, w0, w1)
    tot = {t: served.get(t, {}).get("prompt", 0)
           + served.get(t, {}).get("completion", 0)
           for t in ("light", "heavy")}
    ratio = tot["light"] / tot["heavy"] if tot["heavy"] else float("nan")
    target = weights["light"] / weights["heavy"]
    errors = [r.error for r in reqs if r.error
              and not r.error.startswith("connection")]
    lw = sampler.extra_samples
    done = {t: served.get(t, {}).get("requests", 0)
            for t in ("light", "heavy")}
    return dict(test="fair" if target == 1 else "weighted",
                weights=weights, streams=dict(light=light_n, heavy=heavy_n),
                window_s=w1 - w0, served=served, total=tot,
                requests_done=done, ratio=ratio, target=target,
                deviation=ratio / target - 1,
                light_backlogged=(sum(1 for x in lw if x > 0) / len(lw)
                                  if lw else float("nan")),
                engine=engine_summary([sampler.samples]),
                errors=len(errors),
                first_error=errors[0] if errors else "",
                loadavg="%s -> %s" % (la0, la1))


# ---- main -----------------------------------------------------------------

def print_priority(r):
    print()
    print("Priority: interactive TTFT (ms), %d batch streams (prompts "
          "%d-%d tokens, max_tokens %d-%d) on --max-seqs %d"
          % (r["batch_streams"], r["batch_prompt"][0], r["batch_prompt"][1],
             r["batch_gen"][0], r["batch_gen"][1], r["max_seqs"]))
    print()
    eng = "engine_ttft_p50" in r["rows"][0]
    print("| phase (%d rounds) | probes | p50 | p90 | mean | max | "
          "$llm_ttft p50 | load average |" % r["rounds"]
          + (" engine: queue p50 / TTFT p50 / p90 |" if eng else ""))
    print("| --- | --- | --- | --- | --- | --- | --- | --- |"
          + (" --- |" if eng else ""))
    for x in r["rows"]:
        print("| %s | %d | %.1f | %.1f | %.1f | %.1f | %.0f | %s |"
              % (x["phase"], x["n"], x["p50"], x["p90"], x["mean"], x["max"],
                 x["module_p50"], x["loadavg"])
              + (" %.0f / %.0f / %.0f |" % (x["engine_queue_p50"],
                                            x["engine_ttft_p50"],
                                            x["engine_ttft_p90"])
                 if "engine_ttft_p50" in x else " |" if eng else ""))
    e = r["engine"]
    print()
    print("engine while saturated: running %.1f (min %d) of %d, waiting "
          "%.1f (min %d), KV blocks used <= %d of %d, mean step %.1f ms, "
          "%d preemptions; batch %.0f tok/s, %d errors %s"
          % (e.get("running_mean", 0), e.get("running_min", 0),
             r["max_seqs"], e.get("waiting_mean", 0),
             e.get("waiting_min", 0), e.get("kv_used_max", 0),
             e.get("kv_total", 0), e.get("step_ms", 0),
             e.get("preemptions", 0), r["batch_tok_s"], r["batch_errors"],
             r["first_batch_error"]))
    print("saturated / idle: p50 %.2f, p90 %.2f; "
          "target p50 <= 2: %s"
          % (r["ratio_p50"], r["ratio_p90"],
             "met" if r["ratio_p50"] <= 2 else "NOT met"))


def print_fair(r):
    print()
    print("%s: weights light %d / heavy %d, streams %d / %d, --max-seqs %d,"
          " window %.0f s, load average %s"
          % (r["test"].capitalize(), r["weights"]["light"],
             r["weights"]["heavy"], r["streams"]["light"],
             r["streams"]["heavy"], r["max_seqs"], r["window_s"],
             r["loadavg"]))
    print()
    print("| tenant | weight | streams | prompt tok | completion tok | "
          "served tok | requests finished |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for t in ("light", "heavy"):
        s = r["served"].get(t, {})
        print("| %s | %d | %d | %.0f | %.0f | %.0f | %d |"
              % (t, r["weights"][t], r["streams"][t], s.get("prompt", 0),
                 s.get("completion", 0), r["total"][t],
                 r["requests_done"][t]))
    e = r["engine"]
    print()
    print("light / heavy = %.3f (target %.0f, %+.1f%%: %s); light had a "
          "request waiting in %.0f%% of samples; engine running %.1f, "
          "waiting %.1f, %d preemptions; %d errors %s"
          % (r["ratio"], r["target"], 100 * r["deviation"],
             "met" if abs(r["deviation"]) <= 0.2 else "NOT met",
             100 * r["light_backlogged"], e.get("running_mean", 0),
             e.get("waiting_mean", 0), e.get("preemptions", 0),
             r["errors"], r["first_error"]))


def int_range(s):
    lo, _, hi = s.partition(",")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError("LO,HI with 1 <= LO <= HI")
    return lo, hi


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="build",
                    help="build folder (llm-engine, the module)")
    ap.add_argument("--model", help="GGUF (default tools/default-model.sh)")
    ap.add_argument("--tests", default="priority,fair,weighted")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefix-cache", default="off", choices=("on", "off"))
    ap.add_argument("--engine-args", default="",
                    help="more llm-engine flags, e.g. \"--max-step-tokens "
                    "128\"")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--probes", type=int, default=15,
                    help="interactive probes per phase")
    ap.add_argument("--rounds", type=int, default=2,
                    help="saturated phases, each followed by an idle one")
    ap.add_argument("--priority-max-seqs", type=int, default=8)
    ap.add_argument("--batch-streams", type=int, default=8,
                    help="streams of each of the two batch tenants")
    ap.add_argument("--batch-prompt", type=int_range, default=(64, 192),
                    help="prompt tokens of batch requests, LO,HI")
    ap.add_argument("--batch-gen", type=int_range, default=(128, 256),
                    help="max_tokens of batch requests, LO,HI")
    ap.add_argument("--engine-probes", action="store_true",
                    help="also send each phase's probes straight to the "
                    "engine (its own queue and TTFT figures)")
    ap.add_argument("--saturate-s", type=float, default=8.0,
                    help="batch load before the probes start")
    ap.add_argument("--fair-max-seqs", type=int, default=4)
    ap.add_argument("--warmup-s", type=float, default=15.0)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    tests = args.tests.split(",")
    print("# %s, %s, load average %s" % (
        " ".join(["bench/tenants_sched.py"] + (argv or sys.argv[1:])),
        datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%MZ"), loadavg()), flush=True)
    results = []
    for test in tests:
        tmp = tempfile.TemporaryDirectory(prefix="tenants-sched-")
        stack = None
        try:
            if test == "priority":
                stack = Stack(args, tmp.name, [
                    ("inter", "sk-sched-inter", "interactive", 1),
                    ("bulk1", "sk-sched-bulk1", "batch", 1),
                    ("bulk2", "sk-sched-bulk2", "batch", 1)],
                    args.priority_max_seqs)
                r = asyncio.run(run_priority(args, stack))
                r["max_seqs"] = args.priority_max_seqs
                r["batch_prompt"] = args.batch_prompt
                r["batch_gen"] = args.batch_gen
                print_priority(r)
            elif test in ("fair", "weighted"):
                w = 1 if test == "fair" else 2
                light_n, heavy_n = (4, 40) if w == 1 else (6, 60)
                stack = Stack(args, tmp.name, [
                    ("light", "sk-sched-light", "standard", w),
                    ("heavy", "sk-sched-heavy", "standard", 1)],
                    args.fair_max_seqs)
                r = asyncio.run(run_fair(args, stack,
                                         dict(light=w, heavy=1),
                                         light_n, heavy_n))
                r["max_seqs"] = args.fair_max_seqs
                print_fair(r)
            else:
                sys.exit("unknown test %r" % test)
            sys.stdout.flush()
            results.append(r)
        finally:
            if stack is not None:
                stack.stop()
            tmp.cleanup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
