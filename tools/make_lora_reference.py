#!/usr/bin/env python3
"""Regenerates t/fixtures/lora_reference/ with llama.cpp (llama-cpp-python)
running each test adapter merged into the F32 copy of the default model:
the reference the engine's multi-LoRA batches are checked against
(t/unit/test_engine_lora.c).

    tools/make_lora_reference.py [--f32 .models/smollm2-135m-f32.gguf]
                                 [--out t/fixtures/lora_reference]
                                 [--work /tmp/lora-reference]

The adapters are not stored: ADAPTERS in the output lists each one's
tools/make_lora.py arguments (a seed among them), so the C test writes the
same files again.  For each adapter (and the bare base, "base"), on the
merged F32 model (tools/merge_lora.py) with an F32 KV cache:

  - teacher-forced logits of every prompt position: a fixed subset of
    N_SUBSET vocabulary ids plus that position's top N_TOP ids;
  - the whole last row, for the first prompt of each adapter only (files
    stay under 1 MB);
  - a greedy continuation of N_GREEDY tokens (EOS ignored).

Files (little-endian):
  ADAPTERS                  "NAME make_lora.py args..." per line
  PROMPTS                   "NAME id id id ..." per line
  NAME.PROMPT.txt           "greedy: ...", "subset_rows: N"
  NAME.PROMPT.sub.f32       N rows of (id int32, position int32, logit f32)
  NAME.PROMPT.last.f32      the full last row (first prompt, adapters)
"""
import argparse
import os
import shlex
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# ranks 4, 8 and 16 (with a rank_pattern), different target sets, rslora
ADAPTERS = {
    "r4": "--rank 4 --targets q,k,v,o,gate,up,down --seed 401",
    "r8": "--rank 8 --alpha 16 --targets q,v --rslora --seed 402",
    "r16": "--rank 16 --targets k,o,up,down --rank-pattern down_proj=6 "
           "--seed 403",
}

PROMPTS = {
    "story": "Once upon a time, in a small village by the sea, there lived",
    "chat": "<|im_start|>user\nWhat is the boiling point of water?"
            "<|im_end|>\n<|im_start|>assistant\n",
}

N_GREEDY = 32
N_SUBSET = 160
N_TOP = 16


def load(path):
    from llama_cpp import Llama
    return Llama(model_path=path, n_ctx=256, n_batch=256, n_ubatch=256,
                 logits_all=True, type_k=0, type_v=0, n_threads=2,
                 verbose=False, seed=0)


def greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def reference(model_path, name, prompts, subset, out):
    llm = load(model_path)
    for i, (pname, ids) in enumerate(prompts.items()):
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
        rows = []
        for p in range(len(ids)):
            top = np.argsort(-logits[p])[:N_TOP]
            for t in sorted(set(subset.tolist()) | set(top.tolist())):
                rows.append((t, p, logits[p, t]))
        sub = np.zeros(len(rows), dtype=[("id", "<i4"), ("pos", "<i4"),
                                         ("logit", "<f4")])
        sub[:] = rows
        stem = os.path.join(out, "%s.%s" % (name, pname))
        sub.tofile(stem + ".sub.f32")
        if i == 0 and name != "base":
            # (the base's rows are in t/fixtures/reference already)
            logits[-1].astype("<f4").tofile(stem + ".last.f32")
        g = greedy(llm, ids, N_GREEDY)
        with open(stem + ".txt", "w") as f:
            f.write("greedy: %s\n" % " ".join(map(str, g)))
            f.write("subset_rows: %d\n" % len(rows))
        print("%-5s %-6s %2d positions, greedy %s ..." % (
            name, pname, len(ids), " ".join(map(str, g[:8]))))
    del llm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f32", default=".models/smollm2-135m-f32.gguf")
    ap.add_argument("--out", default="t/fixtures/lora_reference")
    ap.add_argument("--work", default="/tmp/lora-reference",
                    help="scratch folder for adapters and merged models")
    a = ap.parse_args()
    if not os.path.exists(a.f32):
        sys.exit("%s is missing: make models" % a.f32)
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)

    from llama_cpp import Llama
    vocab = Llama(model_path=a.f32, vocab_only=True, verbose=False)
    prompts = {k: vocab.tokenize(v.encode(), add_bos=False, special=True)
               for k, v in PROMPTS.items()}
    n_vocab = vocab.n_vocab()
    del vocab
    subset = np.sort(np.random.default_rng(4321).choice(
        n_vocab, N_SUBSET, replace=False))

    with open(os.path.join(a.out, "ADAPTERS"), "w") as f:
        for name, args in ADAPTERS.items():
            f.write("%s %s\n" % (name, args))
    with open(os.path.join(a.out, "PROMPTS"), "w") as f:
        for name, ids in prompts.items():
            f.write("%s %s\n" % (name, " ".join(map(str, ids))))

    reference(a.f32, "base", prompts, subset, a.out)
    for name, args in ADAPTERS.items():
        d = os.path.join(a.work, name)
        merged = os.path.join(a.work, name + ".gguf")
        subprocess.run([sys.executable, os.path.join(HERE, "make_lora.py"),
                        "--base", a.f32, "--out", d] + shlex.split(args),
                       check=True)
        subprocess.run([sys.executable, os.path.join(HERE, "merge_lora.py"),
                        "--base", a.f32, "--adapter", d, "--out", merged],
                       check=True)
        reference(merged, name, prompts, subset, a.out)
        os.remove(merged)
    total = sum(os.path.getsize(os.path.join(a.out, f))
                for f in os.listdir(a.out))
    print("wrote %s (%.0f KB)" % (a.out, total / 1024))


if __name__ == "__main__":
    main()
