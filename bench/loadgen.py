#!/usr/bin/env python3
"""Load generator: the same streaming load sent straight to llm-engine's
protocol and through NGINX (the module's OpenAI API), in one run.

    bench/loadgen.py [--build build] [--streams 32] [--requests 3]
                     [--modes direct,nginx,direct]
                     [--engine unix:PATH] [--url http://127.0.0.1:PORT]

Without --engine/--url it starts one llm-engine (the default model,
--threads 2, --max-seqs 64) and one /usr/sbin/nginx (2 workers, no tenants
file: no API key) in a temp dir, reusing t/integration's process helpers,
and stops both by pid at the end.

Each mode runs N concurrent streams; each stream sends R requests back to
back on its own connection (engine: one protocol connection; nginx: one
HTTP/1.1 keep-alive connection).  Request k of stream s has the same
prompt (uniform 16..128 random token ids) and max_tokens (uniform 32..96)
in every mode (fixed seed), greedy, EOS not ignored (the OpenAI API has no
ignore_eos), so both modes generate the same tokens; throughput counts the
tokens actually generated (DONE / usage).

Per request: TTFT (send -> first token), every inter-token gap (between
TOKENS frames, or between SSE chunks carrying text: a token without text
of its own, e.g. half a UTF-8 character, merges into the next chunk),
tokens.  Per mode: aggregate tokens/s (completion tokens / wall time),
p50/p90/p99 of TTFT and ITL; then the nginx/direct ratios.  Mode
"mixed" sends half the workload's streams both ways at the same time (the
same engine steps and machine noise for both), for noisy machines.
"""

import argparse
import asyncio
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


# ---- the workload ------------------------------------------------------

def workload(streams, requests, seed, vocab, lo_p=16, hi_p=128, lo_m=32,
             hi_m=96):
    """[[(prompt ids, max_tokens), ... R], ... N]: identical in all modes."""
    rng = random.Random(seed)
    w = []
    for _ in range(streams):
        reqs = []
        for _ in range(requests):
            n = rng.randint(lo_p, hi_p)
            # skip the low ids: special and byte tokens
            prompt = [rng.randrange(256, vocab) for _ in range(n)]
            reqs.append((prompt, rng.randint(lo_m, hi_m)))
        w.append(reqs)
    return w


class Rec:
    """One request's measurements."""

    def __init__(self):
        self.t0 = None
        self.ttft = None
        self.gaps = []
        self.tokens = 0
        self.events = 0
        self.error = None
        self.last = None

    def token_event(self, now, n=1):
        if self.ttft is None:
            self.ttft = now - self.t0
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.events += 1


# ---- straight to the engine --------------------------------------------

async def open_engine(addr):
    if addr.startswith("unix:"):
        return await asyncio.open_unix_connection(addr[5:])
    host, _, port = addr.rpartition(":")
    return await asyncio.open_connection(host or "127.0.0.1", int(port))


async def read_frame(reader):
    h = await reader.readexactly(P.HEADER_SIZE)
    magic, _, ftype, n, rid = P.HEADER.unpack(h)
    if magic != P.MAGIC:
        raise P.ProtocolError("bad magic")
    p = await reader.readexactly(n) if n else b""
    return ftype, rid, p


async def direct_stream(addr, reqs, recs):
    reader, writer = await open_engine(addr)
    try:
        writer.write(P.encode_hello("loadgen"))
        ftype, _, p = await read_frame(reader)
        if ftype != P.HELLO_OK:
            raise P.ProtocolError("no HELLO_OK (%d)" % ftype)
        for i, (prompt, max_tokens) in enumerate(reqs):
            rec = Rec()
            recs.append(rec)
            rec.t0 = time.monotonic()
            writer.write(P.encode_submit(i + 1, prompt, max_tokens=max_tokens,
                                         temperature=0.0))
            while True:
                ftype, rid, p = await read_frame(reader)
                now = time.monotonic()
                if ftype == P.TOKENS:
                    n = struct.unpack_from("<H", p)[0]
                    rec.token_event(now, n)
                elif ftype == P.DONE:
                    rec.tokens = P.decode_done(p)["completion_tokens"]
                    break
                elif ftype == P.ERROR:
                    rec.error = P.decode_error(p)
                    break
    finally:
        writer.close()


# ---- through NGINX -----------------------------------------------------

async def read_chunked_sse(reader, on_event):
    """Reads a chunked body, calling on_event(data) for each SSE data
    line; returns when the body ends."""
    buf = b""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed in the body")
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readline()            # the last CRLF (no trailers)
            return
        buf += await reader.readexactly(size)
        await reader.readexactly(2)
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            for ln in ev.split(b"\n"):
                if ln.startswith(b"data:"):
                    on_event(ln[5:].strip())


async def nginx_stream(host, port, model, reqs, recs):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for prompt, max_tokens in reqs:
            rec = Rec()
            recs.append(rec)
            body = json.dumps({
                "model": model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
            }).encode()
            head = ("POST /v1/completions HTTP/1.1\r\nHost: %s:%d\r\n"
                    "Content-Type: application/json\r\n"
                    "Content-Length: %d\r\n\r\n" % (host, port, len(body)))
            rec.t0 = time.monotonic()
            writer.write(head.encode() + body)
            status = await reader.readline()
            headers = {}
            while True:
                ln = await reader.readline()
                if ln in (b"\r\n", b"\n", b""):
                    break
                k, _, v = ln.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            code = int(status.split()[1])
            chunked = "chunked" in headers.get("transfer-encoding", "")
            if code != 200 or not chunked:
                n = int(headers.get("content-length", 0))
                data = await reader.readexactly(n) if n else b""
                rec.error = (code, data[:200])
                if headers.get("connection") == "close":
                    break
                continue

            def on_event(data, rec=rec):
                now = time.monotonic()
                if data == b"[DONE]":
                    return
                d = json.loads(data)
                if "error" in d:
                    rec.error = d["error"]
                    return
                ch = d.get("choices") or []
                if ch and ch[0].get("text"):
                    rec.token_event(now)
                if d.get("usage"):
                    rec.tokens = d["usage"]["completion_tokens"]

            await read_chunked_sse(reader, on_event)
    finally:
        writer.close()


# ---- running and reporting ---------------------------------------------

def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


async def timed(coro):
    await coro
    return time.monotonic()


async def run_mode(mode, args, work):
    """mode direct or nginx: every stream that way; mixed: the first half
    of the workload's streams sent both ways at once (same engine steps,
    same machine noise), returned as two results."""
    hp = args.url.split("://", 1)[-1].rstrip("/")
    host, _, port = hp.rpartition(":")

    def stream(how, reqs, out):
        if how == "direct":
            return direct_stream(args.engine, reqs, out)
        return nginx_stream(host, int(port), args.model_name, reqs, out)

    if mode == "mixed":
        half = work[:len(work) // 2]
        plan = [(h, reqs) for reqs in half for h in ("direct", "nginx")]
    else:
        plan = [(mode, reqs) for reqs in work]
    per_stream = [[] for _ in plan]
    t0 = time.monotonic()
    ends = await asyncio.gather(*[timed(stream(h, reqs, per_stream[i]))
                                  for i, (h, reqs) in enumerate(plan)])
    if mode != "mixed":
        return [summarize(mode, max(ends) - t0, per_stream)]
    out = []
    for how in ("direct", "nginx"):
        idx = [i for i, (h, _) in enumerate(plan) if h == how]
        out.append(summarize("mixed:" + how,
                             max(ends[i] for i in idx) - t0,
                             [per_stream[i] for i in idx]))
    return out


def summarize(mode, wall, per_stream):
    recs = [r for s in per_stream for r in s]
    errs = [r.error for r in recs if r.error]
    toks = sum(r.tokens for r in recs)
    ttft = [r.ttft * 1e3 for r in recs if r.ttft is not None]
    itl = [g * 1e3 for r in recs for g in r.gaps]
    return dict(mode=mode, wall_s=wall, requests=len(recs), errors=len(errs),
                first_error=str(errs[0]) if errs else "",
                tokens=toks, events=sum(r.events for r in recs),
                tok_s=toks / wall if wall > 0 else 0.0,
                ttft_p50=pct(ttft, 50), ttft_p90=pct(ttft, 90),
                ttft_p99=pct(ttft, 99), itl_p50=pct(itl, 50),
                itl_p90=pct(itl, 90), itl_p99=pct(itl, 99),
                n_gaps=len(itl))


def fmt_row(r):
    return ("| %s | %d | %d | %d | %.1f | %.1f | %.0f / %.0f / %.0f | "
            "%.1f / %.1f / %.1f |" % (
                r["mode"], r["requests"], r["errors"], r["tokens"],
                r["wall_s"], r["tok_s"], r["ttft_p50"], r["ttft_p90"],
                r["ttft_p99"], r["itl_p50"], r["itl_p90"], r["itl_p99"]))


def start_servers(args, tmp):
    """Starts llm-engine and nginx with t/integration's helpers."""
    os.environ["LLM_BUILD"] = args.build
    sys.path.insert(0, os.path.join(REPO, "t", "integration"))
    import conftest
    import nginx_proc
    model = args.model or conftest.default_model()
    if model is None:
        sys.exit("default model not installed (tools/default-model.sh)")
    binary = os.path.join(conftest.build_dir(), "llm-engine")
    ed = os.path.join(tmp, "engine")
    os.makedirs(ed)
    eng = conftest.Engine(binary, model, ed, tcp=False,
                          threads=args.threads,
                          extra_args=["--max-seqs", str(args.max_seqs)])
    eng.wait_ready()
    nd = os.path.join(tmp, "nginx")
    os.makedirs(nd)
    ngx = nginx_proc.start_nginx(nd, eng.addr, model, workers=args.workers,
                                 model_name=args.model_name)
    return eng, ngx


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="build",
                    help="build folder (llm-engine, the module)")
    ap.add_argument("--model", help="GGUF (default tools/default-model.sh)")
    ap.add_argument("--model-name", default="smollm2")
    ap.add_argument("--engine", help="unix:PATH or HOST:PORT of a running "
                    "engine (with --url: start nothing)")
    ap.add_argument("--url", help="http://HOST:PORT of a running nginx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--modes", default="direct,nginx,direct")
    ap.add_argument("--warmup", type=int, default=4,
                    help="requests sent straight to the engine first")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    eng = ngx = None
    tmp = tempfile.TemporaryDirectory(prefix="loadgen-")
    try:
        if not (args.engine and args.url):
            eng, ngx = start_servers(args, tmp.name)
            args.engine = args.engine or eng.addr
            args.url = args.url or "http://127.0.0.1:%d" % ngx.port
        with P.Client(args.engine, hello=True) as c:
            vocab = c.info["n_vocab"]
            wl = workload(max(args.warmup, 1), 1, args.seed + 1, vocab)
            for i in range(args.warmup):
                c.generate(wl[i][0][0], max_tokens=8)
        work = workload(args.streams, args.requests, args.seed, vocab)
        print("%d streams x %d requests; prompts %d tokens, max_tokens %d"
              % (args.streams, args.requests,
                 sum(len(p) for s in work for p, _ in s),
                 sum(m for s in work for _, m in s)), flush=True)
        results = []
        for mode in args.modes.split(","):
            for r in asyncio.run(run_mode(mode, args, work)):
                results.append(r)
                print(fmt_row(r), flush=True)
                if r["errors"]:
                    print("  first error: %s" % r["first_error"],
                          flush=True)

        print()
        print("| mode | requests | errors | tokens | wall s | tok/s | "
              "TTFT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(fmt_row(r))
        direct = [r for r in results if r["mode"] == "direct"]
        ng = [r for r in results if r["mode"] == "nginx"]
        mx = {r["mode"]: r for r in results if r["mode"].startswith("mixed")}
        if len(mx) == 2:
            d, n = mx["mixed:direct"], mx["mixed:nginx"]
            print("mixed (%d workloads each way at once): tok/s nginx/direct"
                  " %.3f; ITL p50 %+.2f ms, p99 %+.2f ms; TTFT p50 %+.1f ms"
                  % (args.streams // 2, n["tok_s"] / d["tok_s"],
                     n["itl_p50"] - d["itl_p50"], n["itl_p99"] - d["itl_p99"],
                     n["ttft_p50"] - d["ttft_p50"]))
        if direct and ng:
            d_tok = sum(r["tok_s"] for r in direct) / len(direct)
            d_itl = sum(r["itl_p99"] for r in direct) / len(direct)
            n_tok = sum(r["tok_s"] for r in ng) / len(ng)
            n_itl = sum(r["itl_p99"] for r in ng) / len(ng)
            n = ng[0]
            print()
            print("tok/s: direct (mean of %d runs) %.1f, nginx (mean of %d) "
                  "%.1f: nginx/direct %.3f (%.1f%% %s)"
                  % (len(direct), d_tok, len(ng), n_tok, n_tok / d_tok,
                     abs(1 - n_tok / d_tok) * 100,
                     "lost" if n_tok < d_tok else "gained"))
            print("p99 ITL: direct (mean) %.2f ms, nginx (mean) %.2f ms: "
                  "%+.2f ms" % (d_itl, n_itl, n_itl - d_itl))
            print("nginx SSE text chunks %d for %d tokens; direct TOKENS "
                  "frames %d for %d tokens"
                  % (n["events"], n["tokens"], direct[0]["events"],
                     direct[0]["tokens"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        if ngx is not None:
            ngx.stop()
            ngx.check_log()
        if eng is not None:
            eng.stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
