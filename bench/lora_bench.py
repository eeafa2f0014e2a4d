#!/usr/bin/env python3
"""Multi-LoRA benchmark for bench/RESULTS.md ("Multi-LoRA").

    bench/lora_bench.py [--build build] [--work /tmp/lora-bench]
                        [--seqs 32] [--gen 64] [--repeat 3] [--naive 2]
                        [--targets q,k,v,o,gate,up,down]

1. Writes 32 random adapters for the default model (SmolLM2-135M Q4_1)
   with tools/make_lora.py: ranks 8 and 16 alternating, the given target
   set (default: every projection, the costliest case).
2. For the naive baseline, merges --naive of them into copies of the base
   kept in the base's own types (W + scale * B @ A dequantized, added and
   quantized back to Q4_1): the model one would serve per adapter.
3. Runs $BUILD/lora-bench (bench/lora/lora_bench.c, make bench-lora): one
   engine, 32 concurrent sequences, aggregate decode tok/s for the base
   alone and spread over 1, 8 and 32 adapters; the naive runs; cold load
   time and bytes per adapter.  Prints the JSON and a Markdown table.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(REPO, "tools"))

import make_lora  # noqa: E402
import make_tiny_model as tiny  # noqa: E402


def default_model():
    return subprocess.run([os.path.join(REPO, "tools", "default-model.sh")],
                          capture_output=True, text=True,
                          check=True).stdout.strip()


def merge_keep_types(base, adapter, out):
    """The adapter folded into the base, every tensor in its base type."""
    from gguf import GGUFReader, GGUFWriter
    from gguf.quants import dequantize, quantize
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import dequantize_gguf
    import merge_lora

    r = GGUFReader(base)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    c = make_lora.base_config(base)
    _, pairs = make_lora.read_adapter(adapter)
    by_name = {"blk.%d.%s.weight" % (layer, merge_lora.GGUF_NAMES[t]):
               (t, v) for (layer, t), v in pairs.items()}
    tmp = out + ".tmp"
    w = GGUFWriter(tmp, arch)
    for field in r.fields.values():
        dequantize_gguf.copy_field(w, field)
    for t in r.tensors:
        if t.name not in by_name:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape,
                         raw_dtype=t.tensor_type)
            continue
        target, (a, b, scale) = by_name[t.name]
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        d = merge_lora.delta(a, b, scale)
        if arch in merge_lora.PERMUTED_ARCHS and target in ("q_proj",
                                                            "k_proj"):
            heads = c["heads"] if target == "q_proj" else c["kv_heads"]
            d = tiny.interleave_rows(d, heads)
        q = quantize(data + d, t.tensor_type)
        w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.environ.get("BUILD", "build"))
    ap.add_argument("--work", default="/tmp/lora-bench")
    ap.add_argument("--adapter-dtype", default="f16",
                    choices=["auto", "f16", "f32", "int8"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--naive", type=int, default=2)
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down")
    a = ap.parse_args()

    model = a.model or default_model()
    binary = os.path.join(REPO, a.build, "lora-bench")
    if not os.access(binary, os.X_OK):
        sys.exit("%s missing: make BUILD=%s bench-lora" % (binary, a.build))
    tag = a.targets.replace(",", "")
    adir = os.path.join(a.work, "adapters-" + tag)
    os.makedirs(adir, exist_ok=True)
    for i in range(32):
        out = os.path.join(adir, "a%02d" % i)
        if not os.path.exists(os.path.join(out, "adapter_config.json")):
            subprocess.run([sys.executable,
                            os.path.join(REPO, "tools", "make_lora.py"),
                            "--base", model, "--out", out,
                            "--rank", "8" if i % 2 == 0 else "16",
                            "--targets", a.targets, "--seed", str(1000 + i)],
                           check=True)
    naive = []
    for i in range(a.naive):
        out = os.path.join(a.work, "merged-%s-a%02d.gguf" % (tag, i))
        if not os.path.exists(out):
            t0 = time.time()
            merge_keep_types(model, os.path.join(adir, "a%02d" % i), out)
            print("merged a%02d in %.0f s" % (i, time.time() - t0),
                  file=sys.stderr)
        naive.append(out)

    cmd = [binary, "--model", model, "--adapters", adir, "--seqs",
           str(a.seqs), "--prompt", str(a.prompt), "--gen", str(a.gen),
           "--repeat", str(a.repeat), "--threads", str(a.threads),
           "--adapter-dtype", a.adapter_dtype, "--json"]
    for n in naive:
        cmd += ["--naive", n]
    print(" ".join(cmd), file=sys.stderr)
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                    check=True).stdout)
    res["targets"] = a.targets
    res["adapter_dtype"] = a.adapter_dtype
    res["machine"] = "%s, %d CPUs" % (platform.processor() or
                                      platform.machine(), os.cpu_count())
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(res, indent=1))

    b = res["base"]
    print()
    print("| %d sequences, %s, adapters in %s | decode tok/s | vs base |"
          % (a.seqs, a.targets, a.adapter_dtype))
    print("|---|---:|---:|")
    for k, label in (("base", "base only"), ("adapters_1", "1 adapter"),
                     ("adapters_8", "8 adapters"),
                     ("adapters_32", "32 adapters")):
        print("| %s | %.1f | %.0f%% |" % (label, res[k], 100 * res[k] / b))
    print("| naive: merged model per adapter, batch 1, decode only | %.1f "
          "| %.0f%% |" % (res["naive_decode"], 100 * res["naive_decode"] / b))
    print("| naive, with the model switch (open + prefill) | %.1f | %.0f%% |"
          % (res["naive_with_switch"], 100 * res["naive_with_switch"] / b))
    print()
    if res["naive_decode"] > 0:
        print("32 adapters / naive: %.1fx (decode only), %.1fx (with switch)"
              % (res["adapters_32"] / res["naive_decode"],
                 res["adapters_32"] / max(res["naive_with_switch"], 1e-9)))
    # within-round ratios: runs seconds apart see the same machine
    rounds = np.array(res["rounds"])
    ratios = rounds[:, 1:] / rounds[:, :1]
    print("per-round ratio to the base, median of %d rounds: 1 adapter "
          "%.0f%%, 8: %.0f%%, 32: %.0f%%" % ((len(rounds),) + tuple(
              100 * np.median(ratios, axis=0))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
