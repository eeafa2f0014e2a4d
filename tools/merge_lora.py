#!/usr/bin/env python3
"""Fold a peft LoRA adapter into its base model and write the merged model
as an F32 GGUF file, so that llama.cpp on the merged file can be compared
with our engine on base + adapter:

    W' = W + scale * B @ A      scale = lora_alpha / r  (or / sqrt(r) with
                                use_rslora; rank_pattern / alpha_pattern
                                per module, as peft)

    tools/merge_lora.py --base BASE --adapter DIR --out MERGED.gguf

BASE is a GGUF file of any type gguf.quants.dequantize reads (every tensor
is dequantized to F32, metadata kept) or a Hugging Face folder as written
by tools/make_tiny_model.py (config.json + safetensors; the GGUF is
written with make_tiny_model's converter and the tokenizer of --vocab-from,
by default the SmolLM2 model's).

GGUF llama/mistral files store wq/wk with rows permuted for adjacent-pair
RoPE; the adapter is in Hugging Face layout, so the update of q and k is
permuted the same way before it is added.
"""

import argparse
import json
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_lora  # noqa: E402
import make_tiny_model as tiny  # noqa: E402

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
              "o_proj": "attn_output", "gate_proj": "ffn_gate",
              "up_proj": "ffn_up", "down_proj": "ffn_down"}
PERMUTED_ARCHS = ("llama", "mistral")


def delta(a, b, scale):
    """scale * B @ A in float64, returned as float32 [out, in]."""
    return (scale * (b.astype(np.float64) @ a.astype(np.float64))
            ).astype(np.float32)


def merge_gguf(base, pairs, out):
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize
    import dequantize_gguf

    r = GGUFReader(base)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    c = make_lora.base_config(base)
    by_name = {}
    for (layer, target), v in pairs.items():
        by_name[f"blk.{layer}.{GGUF_NAMES[target]}.weight"] = (target, v)

    tmp = out + ".tmp"
    w = GGUFWriter(tmp, arch)
    for field in r.fields.values():
        if field.name == "general.file_type":
            w.add_key_value(field.name, 0, GGUFValueType.UINT32)  # ALL_F32
            continue
        dequantize_gguf.copy_field(w, field)
    used = 0
    for t in r.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name in by_name:
            target, (a, b, scale) = by_name[t.name]
            d = delta(a, b, scale)
            if arch in PERMUTED_ARCHS and target in ("q_proj", "k_proj"):
                heads = c["heads"] if target == "q_proj" else c["kv_heads"]
                d = tiny.interleave_rows(d, heads)
            if d.shape != data.shape:
                raise SystemExit(f"{t.name}: base {data.shape}, adapter "
                                 f"update {d.shape}")
            data = data + d
            used += 1
        w.add_tensor(t.name, np.ascontiguousarray(data))
    if used != len(by_name):
        raise SystemExit(f"{base}: {len(by_name) - used} adapted matrices "
                         f"not found in the base")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)


def read_hf_weights(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    w = {}
    for name in files:
        w.update(make_lora.read_safetensors(os.path.join(d, name)))
    return w


def merge_hf(base, pairs, out, vocab_from):
    with open(os.path.join(base, "config.json")) as f:
        c = json.load(f)
    w = read_hf_weights(base)
    for (layer, target), (a, b, scale) in pairs.items():
        name = f"model.layers.{layer}.{make_lora.BLOCK[target]}.{target}" \
               f".weight"
        w[name] = w[name] + delta(a, b, scale)

    heads = c["num_attention_heads"]
    rs = c.get("rope_scaling") or {}
    rope_type = rs.get("rope_type", rs.get("type", "none"))
    # the namespace make_tiny_model.write_gguf reads its settings from
    ns = types.SimpleNamespace(
        qkv_bias=c.get("model_type") == "qwen2", ctx=c.get(
            "max_position_embeddings", 2048),
        dim=c["hidden_size"], layers=c["num_hidden_layers"],
        ffn=c["intermediate_size"], heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        eps=c.get("rms_norm_eps", 1e-5), rope_base=c.get("rope_theta",
                                                         10000.0),
        rope_scaling=rope_type if rope_type in ("linear", "llama3")
        else "none",
        rope_factor=rs.get("factor", 1.0),
        rope_low_freq=rs.get("low_freq_factor", 1.0),
        rope_high_freq=rs.get("high_freq_factor", 4.0),
        rope_orig_ctx=rs.get("original_max_position_embeddings", 8192),
        tied="lm_head.weight" not in w, gguf_type="f32")
    src = vocab_from or tiny.default_vocab_source()
    if src is None:
        raise SystemExit("no tokenizer source: pass --vocab-from FILE.gguf")
    meta = tiny.read_gguf_metadata(src)
    tmp = out + ".tmp"
    tiny.write_gguf(ns, tmp, w, meta, c["vocab_size"])
    os.replace(tmp, out)


def main():
    ap = argparse.ArgumentParser(
        description="Merge a peft LoRA adapter into its base; write F32 "
                    "GGUF.")
    ap.add_argument("--base", required=True,
                    help="GGUF file or Hugging Face folder")
    ap.add_argument("--adapter", required=True, help="peft adapter folder")
    ap.add_argument("--out", required=True, help="merged GGUF to write")
    ap.add_argument("--vocab-from", default=None,
                    help="tokenizer source for a Hugging Face base")
    a = ap.parse_args()

    _, pairs = make_lora.read_adapter(a.adapter)
    if os.path.isdir(a.base):
        merge_hf(a.base, pairs, a.out, a.vocab_from)
    else:
        merge_gguf(a.base, pairs, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
