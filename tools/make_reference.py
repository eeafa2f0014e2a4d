#!/usr/bin/env python3
"""Regenerates t/fixtures/reference/ with llama.cpp (llama-cpp-python), the
independent implementation our engine is checked against.

    tools/make_reference.py [--f32 .models/smollm2-135m-f32.gguf]
                            [--q41 <default model>] [--out t/fixtures/reference]

For every prompt in PROMPTS, on the F32 copy of the default model (made by
tools/dequantize_gguf.py; KV cache in F32 too, so only the arithmetic of the
forward pass differs):
  - prompt token ids, as llama.cpp tokenizes them;
  - teacher-forced logits: at every prompt position the logits of a fixed
    subset of 512 vocabulary ids plus that position's top 16 ids, and at
    the last position the whole row;
  - a greedy continuation of 64 tokens (EOS ignored).
And on the quantized default model, the greedy continuation, to report how
often our quantized arithmetic makes the same choices as llama.cpp's.

Files (little-endian): NAME.txt holds "tokens: ...", "greedy_f32: ...",
"greedy_q41: ...", "subset_rows: N"; NAME.sub.f32 holds N rows of
(id int32, position int32, logit float32); NAME.last.f32 the full last row.
"""
import argparse
import os
import subprocess
import sys

import numpy as np

PROMPTS = {
    "capital": "The capital of France is",
    "story": "Once upon a time, in a small village by the sea, there lived",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "chat": "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n"
            "<|im_start|>assistant\n",
    "list": "Three things to pack for a hike: 1.",
    "math": "Question: If I have 3 apples and buy 5 more, how many apples do"
            " I have?\nAnswer:",
    "unicode": "Le café coûte 3 €. 東京は日本の首都です。",
    "long": ("The history of the printing press begins in the fifteenth "
             "century, when Johannes Gutenberg combined movable metal type, "
             "oil-based inks and a wooden press adapted from wine making. "
             "Within decades, printing shops spread across Europe, and the "
             "cost of books fell sharply. Scholars argue that"),
}

N_GREEDY = 64
N_SUBSET = 512
N_TOP = 16


def default_model():
    out = subprocess.run(["tools/default-model.sh"], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def load(path):
    from llama_cpp import Llama
    return Llama(model_path=path, n_ctx=512, n_batch=512, n_ubatch=512,
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f32", default=".models/smollm2-135m-f32.gguf")
    ap.add_argument("--q41", default=None)
    ap.add_argument("--out", default="t/fixtures/reference")
    a = ap.parse_args()
    q41 = a.q41 or default_model()
    if not os.path.exists(a.f32):
        subprocess.run([sys.executable, "tools/dequantize_gguf.py", q41,
                        a.f32], check=True)
    os.makedirs(a.out, exist_ok=True)

    f32 = load(a.f32)
    vocab = f32.n_vocab()
    rng = np.random.default_rng(1234)
    subset = np.sort(rng.choice(vocab, N_SUBSET, replace=False))
    results = {}
    for name, text in PROMPTS.items():
        ids = f32.tokenize(text.encode(), add_bos=False, special=True)
        f32.reset()
        f32.eval(ids)
        logits = np.array(f32.scores[:len(ids)], dtype=np.float32)
        rows = []
        for p in range(len(ids)):
            top = np.argsort(-logits[p])[:N_TOP]
            for i in sorted(set(subset.tolist()) | set(top.tolist())):
                rows.append((i, p, logits[p, i]))
        sub = np.zeros(len(rows), dtype=[("id", "<i4"), ("pos", "<i4"),
                                         ("logit", "<f4")])
        sub[:] = rows
        sub.tofile(os.path.join(a.out, name + ".sub.f32"))
        logits[-1].astype("<f4").tofile(os.path.join(a.out,
                                                     name + ".last.f32"))
        results[name] = {"tokens": ids, "rows": len(rows),
                         "greedy_f32": greedy(f32, ids, N_GREEDY)}
    del f32

    q = load(q41)
    for name in PROMPTS:
        results[name]["greedy_q41"] = greedy(q, results[name]["tokens"],
                                             N_GREEDY)
    for name, r in results.items():
        with open(os.path.join(a.out, name + ".txt"), "w") as f:
            f.write("tokens: %s\n" % " ".join(map(str, r["tokens"])))
            f.write("greedy_f32: %s\n" % " ".join(map(str, r["greedy_f32"])))
            f.write("greedy_q41: %s\n" % " ".join(map(str, r["greedy_q41"])))
            f.write("subset_rows: %d\n" % r["rows"])
    with open(os.path.join(a.out, "INDEX"), "w") as f:
        f.write("# made by tools/make_reference.py with llama-cpp-python\n")
        for name in PROMPTS:
            f.write(name + "\n")
    print("wrote %d prompts to %s" % (len(PROMPTS), a.out))


if __name__ == "__main__":
    main()
