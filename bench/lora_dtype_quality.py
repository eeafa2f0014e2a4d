#!/usr/bin/env python3
"""What the adapter dtype on the device costs in accuracy (bench/RESULTS.md,
"Multi-LoRA", int8 adapters).

    bench/lora_dtype_quality.py [--build build] [--work /tmp/lora-bench]
                                [--adapters 8] [--gen 64]
                                [--quantized [MODEL.gguf]]

For the first --adapters adapters written by bench/lora_bench.py (ranks 8
and 16, every projection, for the default model) and a few chat prompts,
runs llm-run with the adapter's device copy in f32 (the exact reference),
f16 and int8, on the F32 copy of the default model that `make models`
writes: there only the adapter copy differs.  With --quantized, also on
the quantized base (by default the default model's own Q4_1 file), where
8-bit activations before every product turn any last-bit difference into
a different rounding: each copy there against the exact pair (F32 base,
f32 adapter: what a user gets against the ideal) and against the f32
copy on the same quantized base.

- teacher-forced logits: per position max |x - ref| / max |ref| (the
  measure of the unit tests against llama.cpp), worst and mean; the share
  of positions whose top token is the reference's;
- greedy continuations of --gen tokens (EOS ignored): identical, or the
  share of the text that agrees before the first difference.
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


def default_model():
    return subprocess.run([os.path.join(REPO, "tools", "default-model.sh")],
                          capture_output=True, text=True,
                          check=True).stdout.strip()


def compare(logits, tokens, ref, dt):
    """dt against ref: teacher-forced rel. logit error per position (max
    |x - ref| / max |ref|), its worst and its mean; the share of positions
    whose top token is ref's; whether the greedy texts are identical, and
    the share of ref's text before the first difference."""
    d = np.abs(logits[dt] - logits[ref]).max(axis=1)
    e = d / np.abs(logits[ref]).max(axis=1)
    top = np.mean(logits[dt].argmax(axis=1) == logits[ref].argmax(axis=1))
    k = 0
    while (k < min(len(tokens[dt]), len(tokens[ref]))
           and tokens[dt][k] == tokens[ref][k]):
        k += 1
    return (float(e.max()), float(e.mean()), float(top),
            tokens[dt] == tokens[ref], k / max(len(tokens[ref]), 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--work", default="/tmp/lora-bench")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--model", default=os.path.join(
        REPO, ".models", "smollm2-135m-f32.gguf"))
    ap.add_argument("--quantized", nargs="?", const="default", default=None,
                    help="also run the quantized base (default: the "
                         "default model's own file)")
    a = ap.parse_args()

    model = a.model
    if not os.path.exists(model):
        sys.exit("%s: missing (make models writes it)" % model)
    bases = {"F32": model}
    if a.quantized is not None:
        bases["Q"] = (default_model() if a.quantized == "default"
                      else a.quantized)
    binary = os.path.join(REPO, a.build, "llm-run")
    adir = os.path.join(a.work, "adapters-qkvogateupdown")
    names = sorted(os.listdir(adir))[:a.adapters] if os.path.isdir(adir) \
        else []
    if len(names) < a.adapters:
        sys.exit("run bench/lora_bench.py first (it writes the adapters "
                 "into %s)" % adir)

    # (compared, reference): the adapter copy on the F32 base against
    # the exact f32 one; with --quantized also each copy on the
    # quantized base against the exact F32 pair (what the user gets vs
    # the ideal) and against the f32 copy on the same quantized base
    rows = [(("F32", "f16"), ("F32", "f32")),
            (("F32", "int8"), ("F32", "f32"))]
    if "Q" in bases:
        rows += [(("Q", dt), ("F32", "f32")) for dt in ("f32", "f16", "int8")]
        rows += [(("Q", dt), ("Q", "f32")) for dt in ("f16", "int8")]
    configs = sorted({c for row in rows for c in row})
    stats = {row: ([], [], [], [], []) for row in rows}
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for i, prompt in enumerate(PROMPTS):
                logits, tokens = {}, {}
                for base, dt in configs:
                    common = ["--model", bases[base], "--adapter",
                              os.path.join(adir, name), "--chat", prompt,
                              "--threads", "2", "--quiet",
                              "--adapter-dtype", dt]
                    npy = os.path.join(tmp, "%s-%d-%s-%s.npy"
                                       % (name, i, base, dt))
                    run(binary, common + ["--logits-out", npy])
                    logits[base, dt] = np.load(npy)
                    tokens[base, dt] = run(binary, common + [
                        "--max-tokens", str(a.gen), "--ignore-eos",
                        "--temperature", "0"])
                for row in rows:
                    for acc, v in zip(stats[row],
                                      compare(logits, tokens, row[1],
                                              row[0])):
                        acc.append(v)
                n += 1
    print("%d adapters x %d prompts = %d runs, greedy %d tokens; bases: %s"
          % (len(names), len(PROMPTS), n, a.gen,
             ", ".join("%s = %s" % (k, os.path.basename(v))
                       for k, v in bases.items())))
    print()
    print("| base, device copy | against | logit rel err: worst / mean | "
          "same top token (teacher-forced) | greedy text identical | "
          "mean share of the text (characters) before the first "
          "difference |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        worst, mean, top, same, lead = stats[row]
        print("| %s, %s | %s, %s | %.2e / %.2e | %.1f%% | %d / %d | %.0f%% |"
              % (row[0] + row[1] + (max(worst), np.mean(mean),
                                    100 * np.mean(top), sum(same), n,
                                    100 * np.mean(lead))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
