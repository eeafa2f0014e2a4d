#!/usr/bin/env python3
"""How often greedy continuations on the quantized default model agree with
llama.cpp's, for our engine and for llama.cpp itself (bench/RESULTS.md,
"Correctness figures"; issue 2's "match llama.cpp's on most prompts").

    bench/q41_agreement.py [--build build] [--threads 2]

The reference is the committed fixture (t/fixtures/reference/*.txt,
greedy_q41: tools/make_reference.py): llama.cpp (llama-cpp-python) on
SmolLM2-135M-Instruct.Q4_1.gguf, F32 KV cache, no flash attention, 64
greedy tokens, EOS ignored, for 8 prompts.  Against it, each row counts
the leading tokens that agree, per prompt:

- llama.cpp itself with settings that change only the order or the
  precision of intermediate sums: flash attention, its default F16 KV
  cache; and two that change nothing (1 thread, prompt in chunks of 8
  tokens), as a check that the measure itself is deterministic;
- our engine (llm-engine over its protocol, prefix cache off) with an
  F32 and an F16 KV cache, and on each CPU path (LLM_CPU_ISA).

Both run the same Q4_1 weights with 8-bit activations before every
product; where two runs' sums differ in the last bit, an activation can
round the other way, the logits move by a few per cent of their range,
and a near tie flips.  The table shows how far that goes for any pair of
implementations, llama.cpp's own included.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(REPO, "tools"))

import llm_proto  # noqa: E402
import make_reference  # noqa: E402

FIXTURES = os.path.join(REPO, "t", "fixtures", "reference")
N = 64


def fixtures():
    out = {}
    for name in make_reference.PROMPTS:
        f = {}
        with open(os.path.join(FIXTURES, name + ".txt")) as fh:
            for line in fh:
                k, _, v = line.partition(":")
                f[k] = [int(x) for x in v.split()] if k != "subset_rows" \
                    else v
        out[name] = (f["tokens"], f["greedy_q41"][:N])
    return out


def lead(a, b):
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def llamacpp_runs(model, refs, threads):
    from llama_cpp import Llama
    base = dict(model_path=model, n_ctx=512, n_batch=512, n_ubatch=512,
                logits_all=True, type_k=0, type_v=0, n_threads=threads,
                verbose=False, seed=0)
    variants = [
        ("llama.cpp, flash attention", dict(flash_attn=True)),
        ("llama.cpp, F16 KV cache (its default)", dict(type_k=1, type_v=1)),
        ("llama.cpp, 1 thread (control)", dict(n_threads=1)),
        ("llama.cpp, prompt in chunks of 8 (control)",
         dict(n_batch=8, n_ubatch=8)),
    ]
    rows = []
    for label, kw in variants:
        llm = Llama(**dict(base, **kw))
        rows.append((label, [lead(make_reference.greedy(llm, ids, N), ref)
                             for ids, ref in refs.values()]))
        del llm
    return rows


def engine_run(build, model, refs, threads, kv, isa):
    env = dict(os.environ)
    if isa:
        env["LLM_CPU_ISA"] = isa
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "engine.sock")
        p = subprocess.Popen(
            [os.path.join(build, "llm-engine"), "--model", model,
             "--listen", "unix:" + sock, "--threads", str(threads),
             "--kv-type", kv, "--prefix-cache", "off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, env=env)
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(sock):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("llm-engine did not start")
                time.sleep(0.05)
            with llm_proto.Client("unix:" + sock, timeout=300,
                                  hello=True) as c:
                res = [c.submit(ids, max_tokens=N, ignore_eos=True)
                       for ids, _ in refs.values()]
                c.wait(res)
            for r in res:
                if r.error:
                    raise SystemExit("engine error: %s" % (r.error,))
            return [lead(r.tokens, ref)
                    for r, (_, ref) in zip(res, refs.values())]
        finally:
            p.terminate()
            p.wait(30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.environ.get("BUILD", "build"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    model = make_reference.default_model()
    refs = fixtures()
    build = os.path.join(REPO, a.build)

    rows = []
    for kv in ("f32", "f16"):
        rows.append(("ngx_llm, %s KV cache" % kv.upper(),
                     engine_run(build, model, refs, a.threads, kv, None)))
    for isa in ("avx512", "avx2", "scalar"):
        rows.append(("ngx_llm, F32 KV, LLM_CPU_ISA=%s" % isa,
                     engine_run(build, model, refs, a.threads, "f32", isa)))
    rows += llamacpp_runs(model, refs, a.threads)

    print("reference: llama.cpp, F32 KV, no flash attention (committed "
          "fixture); %d greedy tokens, %d prompts (%s); %s"
          % (N, len(refs), " ".join(refs),
             time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    print()
    print("| run | leading tokens identical, per prompt | mean | prompts "
          "identical over %d |" % N)
    print("|---|---|---:|---:|")
    for label, leads in rows:
        print("| %s | %s | %.1f | %d / %d |"
              % (label, " ".join(map(str, leads)), np.mean(leads),
                 sum(x == N for x in leads), len(leads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
