#!/usr/bin/env python3
"""What the adapter dtype on the device costs in accuracy (bench/RESULTS.md,
"Multi-LoRA", int8 adapters).

    bench/lora_dtype_quality.py [--build build] [--work /tmp/lora-bench]
                                [--adapters 8] [--gen 64]

For the first --adapters adapters written by bench/lora_bench.py (ranks 8
and 16, every projection, for the default model) and a few chat prompts,
runs llm-run with the adapter's device copy in f32 (the exact reference),
f16 (the default) and int8, on the F32 copy of the default model that
`make models` writes (on the Q4_1 file the 8-bit activations of every
product turn any last-bit difference into a different rounding, which
would hide what the adapter copy itself costs):

- teacher-forced logits: per position max |x - ref| / max |ref|, the
  worst over positions (the measure of the unit tests against llama.cpp);
- greedy continuations of --gen tokens (EOS ignored): identical, or the
  number of leading tokens that agree.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain in two sentences what a hash table is.",
    "List three uses of copper.",
    "What is 17 times 23? Show your steps.",
]


def run(binary, args):
    return subprocess.run([binary] + args, capture_output=True, text=True,
                          check=True).stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--work", default="/tmp/lora-bench")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--model", default=os.path.join(
        REPO, ".models", "smollm2-135m-f32.gguf"))
    a = ap.parse_args()

    model = a.model
    if not os.path.exists(model):
        sys.exit("%s: missing (make models writes it)" % model)
    binary = os.path.join(REPO, a.build, "llm-run")
    adir = os.path.join(a.work, "adapters-qkvogateupdown")
    names = sorted(os.listdir(adir))[:a.adapters] if os.path.isdir(adir) \
        else []
    if len(names) < a.adapters:
        sys.exit("run bench/lora_bench.py first (it writes the adapters "
                 "into %s)" % adir)

    worst = {"f16": 0.0, "int8": 0.0}
    same = {"f16": 0, "int8": 0}
    lead = {"f16": [], "int8": []}
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for i, prompt in enumerate(PROMPTS):
                common = ["--model", model, "--adapter",
                          os.path.join(adir, name), "--chat", prompt,
                          "--threads", "2", "--quiet"]
                logits, tokens = {}, {}
                for dt in ("f32", "f16", "int8"):
                    npy = os.path.join(tmp, "%s-%d-%s.npy" % (name, i, dt))
                    run(binary, common + ["--adapter-dtype", dt,
                                          "--logits-out", npy])
                    logits[dt] = np.load(npy)
                    tokens[dt] = run(binary, common + [
                        "--adapter-dtype", dt, "--max-tokens", str(a.gen),
                        "--ignore-eos", "--temperature", "0"])
                ref = logits["f32"]
                for dt in ("f16", "int8"):
                    d = np.abs(logits[dt] - ref).max(axis=1)
                    e = float((d / np.abs(ref).max(axis=1)).max())
                    worst[dt] = max(worst[dt], e)
                    if tokens[dt] == tokens["f32"]:
                        same[dt] += 1
                    k = 0
                    while (k < min(len(tokens[dt]), len(tokens["f32"]))
                           and tokens[dt][k] == tokens["f32"][k]):
                        k += 1
                    lead[dt].append(k / max(len(tokens["f32"]), 1))
                n += 1
    print("%d adapters x %d prompts = %d runs, greedy %d tokens, "
          "reference: adapters in f32" % (len(names), len(PROMPTS), n, a.gen))
    print()
    print("| device copy | worst logit rel err | greedy text identical | "
          "mean share of the text (characters) before the first difference |")
    print("|---|---:|---:|---:|")
    for dt in ("f16", "int8"):
        print("| %s | %.2e | %d / %d | %.0f%% |"
              % (dt, worst[dt], same[dt], n, 100 * np.mean(lead[dt])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
