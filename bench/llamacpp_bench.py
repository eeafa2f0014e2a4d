#!/usr/bin/env python3
"""The peer figure: llama.cpp (llama-cpp-python) decode throughput on the
same GGUF file and thread count as build/llm-bench, same shape of load.

    bench/llamacpp_bench.py --model M [--threads 2] [--prompt-tokens 128]
                            [--gen-tokens 64] [--concurrency 1,8,32]

For each concurrency c, c sequences of P random prompt tokens are prefilled
(one llama_decode over all of them), then decoded together one token per
sequence per llama_decode (greedy, EOS ignored) for G tokens.  Prints
prefill and aggregate decode tokens/s, best of --repeat runs, in the same
format as llm-bench.
"""
import argparse
import ctypes
import time

import numpy as np
import llama_cpp as L


def run(ctx, model, n_vocab, c, P, G, seed):
    rng = np.random.default_rng(seed)
    mem = L.llama_get_memory(ctx)
    L.llama_memory_clear(mem, True)
    batch = L.llama_batch_init(max(c * P, c), 0, c)
    try:
        # prefill: all prompts in one batch, logits at each last token
        n = 0
        for s in range(c):
            toks = rng.integers(256, n_vocab, P)
            for p in range(P):
                batch.token[n] = int(toks[p])
                batch.pos[n] = p
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = s
                batch.logits[n] = 1 if p == P - 1 else 0
                n += 1
        batch.n_tokens = n
        t0 = time.perf_counter()
        # llama.cpp splits a batch larger than n_batch itself? no: chunk it
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError("llama_decode prefill: %d" % rc)
        t1 = time.perf_counter()
        last = []
        for s in range(c):
            row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, s * P + P - 1),
                                        shape=(n_vocab,))
            last.append(int(np.argmax(row)))
        t2 = time.perf_counter()
        for g in range(1, G):
            for s in range(c):
                batch.token[s] = last[s]
                batch.pos[s] = P + g - 1
                batch.n_seq_id[s] = 1
                batch.seq_id[s][0] = s
                batch.logits[s] = 1
            batch.n_tokens = c
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError("llama_decode: %d" % rc)
            for s in range(c):
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, s),
                                            shape=(n_vocab,))
                last[s] = int(np.argmax(row))
        t3 = time.perf_counter()
    finally:
        L.llama_batch_free(batch)
    return c * P / (t1 - t0), c * (G - 1) / (t3 - t2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    conc = [int(x) for x in a.concurrency.split(",")]
    P, G = a.prompt_tokens, a.gen_tokens

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    cp = L.llama_context_default_params()
    cp.n_ctx = max(conc) * (P + G + 8)
    cp.n_batch = max(conc) * P
    cp.n_ubatch = max(conc) * P
    cp.n_seq_max = max(conc)
    cp.n_threads = a.threads
    cp.n_threads_batch = a.threads
    cp.kv_unified = True
    ctx = L.llama_init_from_model(model, cp)
    print("# llama.cpp %s model=%s threads=%d prompt=%d gen=%d"
          % (L.__version__, a.model, a.threads, P, G))
    print("%-12s %16s %16s %16s" % ("concurrency", "prefill tok/s",
                                     "decode tok/s", "per-seq tok/s"))
    for c in conc:
        best_p = best_d = 0.0
        for r in range(a.repeat):
            p, d = run(ctx, model, n_vocab, c, P, G, r + 1)
            best_p, best_d = max(best_p, p), max(best_d, d)
        print("%-12d %16.1f %16.1f %16.1f" % (c, best_p, best_d, best_d / c),
              flush=True)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
