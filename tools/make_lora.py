#!/usr/bin/env python3
"""Write a random LoRA adapter in Hugging Face peft's layout, for a base
model given as a GGUF file (the default SmolLM2 model) or a Hugging Face
folder (the tiny test models of tools/make_tiny_model.py):

  OUT/adapter_config.json         r, lora_alpha, target_modules, use_rslora,
                                  rank_pattern, alpha_pattern, ...
  OUT/adapter_model.safetensors   base_model.model.model.layers.N.self_attn.
                                  q_proj.lora_A.weight [r, in] and
                                  ...lora_B.weight [out, r], as peft saves

Weights are in Hugging Face layout (peft's), whatever the base file: a
GGUF llama base stores q/k permuted, and the loader permutes B to match.

A and B are random, with the low-rank update scale * B @ A having entries
of about --scale-std / sqrt(in): 1.0 is as large as the base weights of a
freshly initialized model, the default 0.5 changes greedy outputs visibly.

Example: tools/make_lora.py --base "$(tools/default-model.sh)" --rank 8 \\
             --targets q,k,v,o,gate,up,down --out /tmp/lora-a

This module also holds the helpers tools/merge_lora.py uses to read an
adapter (read_adapter) and a safetensors file (read_safetensors).
"""

import argparse
import json
import math
import os
import re
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny_model as tiny  # noqa: E402


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"]
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
         "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp",
         "down_proj": "mlp"}
SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
         "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

# peft's key: base_model.model.<module>.lora_A[.<adapter name>].weight
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\."
                    r"(self_attn|mlp)\.([a-z]+_proj)\.lora_([AB])"
                    r"(?:\.[^.]+)?\.weight$")


# --------------------------------------------------------------------------
# Base model configuration
# --------------------------------------------------------------------------

def base_config(path):
    """{dim, layers, heads, kv_heads, head_dim, ffn, arch, name, gguf}"""
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        heads = c["num_attention_heads"]
        return {
            "gguf": False,
            "arch": c.get("model_type", "llama"),
            "name": c.get("_name_or_path") or os.path.abspath(path),
            "dim": c["hidden_size"],
            "layers": c["num_hidden_layers"],
            "heads": heads,
            "kv_heads": c.get("num_key_value_heads") or heads,
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
            "ffn": c["intermediate_size"],
        }
    meta = tiny.read_gguf_metadata(path)
    arch = meta["general.architecture"]

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise SystemExit(f"{path}: metadata {arch}.{key} is missing")
        return int(v)

    dim, heads = get("embedding_length"), get("attention.head_count")
    return {
        "gguf": True,
        "arch": arch,
        "name": meta.get("general.name") or os.path.basename(path),
        "dim": dim,
        "layers": get("block_count"),
        "heads": heads,
        "kv_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", dim // heads),
        "ffn": get("feed_forward_length"),
    }


def target_dims(c, target):
    """(in, out) of the base matrix a target adapts."""
    qd, kvd = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    return {"q_proj": (c["dim"], qd), "k_proj": (c["dim"], kvd),
            "v_proj": (c["dim"], kvd), "o_proj": (qd, c["dim"]),
            "gate_proj": (c["dim"], c["ffn"]), "up_proj": (c["dim"], c["ffn"]),
            "down_proj": (c["ffn"], c["dim"])}[target]


def module_name(layer, target):
    return f"model.layers.{layer}.{BLOCK[target]}.{target}"


def pattern_value(patterns, module, default):
    """peft's get_pattern_key: the first key K with the module name
    matching (.*\\.)?(K)$ gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(cfg, module, rank):
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module,
                          cfg.get("lora_alpha", 8))
    if cfg.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


# --------------------------------------------------------------------------
# Reading adapters and safetensors (for merge_lora.py and checks)
# --------------------------------------------------------------------------

def read_safetensors(path):
    """{name: float32 array}; F32, F16 and BF16 only."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    base, out = 8 + n, {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        raw = data[base + b:base + end]
        dt = e["dtype"]
        if dt == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        elif dt == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif dt == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32)
                 << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: tensor {name}: dtype {dt}")
        out[name] = a.astype(np.float32).reshape(e["shape"])
    return out


def read_adapter(d):
    """(config, {(layer, target): (A, B, scale)}), A [r, in], B [out, r]
    float32 in Hugging Face layout."""
    with open(os.path.join(d, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("modules_to_save"):
        raise SystemExit(f"{d}: modules_to_save is not supported")
    t = read_safetensors(os.path.join(d, "adapter_model.safetensors"))
    pairs = {}
    for name, x in t.items():
        m = KEY_RE.match(name)
        if m is None or m.group(3) not in TARGETS:
            raise SystemExit(f"{d}: tensor {name} is not a supported LoRA "
                             f"weight")
        key = (int(m.group(1)), m.group(3))
        pairs.setdefault(key, {})[m.group(4)] = x
    out = {}
    for (layer, target), ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            raise SystemExit(f"{d}: layer {layer} {target}: lora_A or "
                             f"lora_B missing")
        a, b = ab["A"], ab["B"]
        out[(layer, target)] = (a, b, module_scale(
            cfg, module_name(layer, target), a.shape[0]))
    return cfg, out


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

def parse_patterns(s, conv):
    out = {}
    if not s:
        return out
    for item in s.split(","):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"bad pattern item {item!r} (want KEY=VALUE)")
        out[k] = conv(v)
    return out


def parse_targets(s):
    out = []
    for t in s.split(","):
        t = SHORT.get(t.strip(), t.strip())
        if t not in TARGETS:
            raise SystemExit(f"unknown target {t!r} (q,k,v,o,gate,up,down)")
        if t not in out:
            out.append(t)
    return out


def main():
    ap = argparse.ArgumentParser(
        description="Write a random LoRA adapter in peft's layout.")
    ap.add_argument("--base", required=True,
                    help="GGUF file or Hugging Face folder of the base")
    ap.add_argument("--out", required=True, help="adapter folder to write")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=None,
                    help="lora_alpha (default: 2 * rank)")
    ap.add_argument("--targets", default="q,v",
                    help="comma list of q,k,v,o,gate,up,down")
    ap.add_argument("--layers", default=None,
                    help="comma list of layers to adapt (default: all)")
    ap.add_argument("--rank-pattern", default="",
                    help="KEY=RANK,... (peft rank_pattern)")
    ap.add_argument("--alpha-pattern", default="",
                    help="KEY=ALPHA,... (peft alpha_pattern)")
    ap.add_argument("--rslora", action="store_true",
                    help="use_rslora: scale = alpha / sqrt(r)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale-std", type=float, default=0.5)
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    ap.add_argument("--base-name", default=None,
                    help="base_model_name_or_path (default: from the base)")
    ap.add_argument("--key-adapter-name", default=None,
                    help="keep an adapter name in the keys "
                         "(lora_A.NAME.weight), as some tools do")
    ap.add_argument("--no-prefix", action="store_true",
                    help="keys without the base_model.model. prefix")
    a = ap.parse_args()

    c = base_config(a.base)
    targets = parse_targets(a.targets)
    if not 1 <= a.rank <= 256:
        ap.error("--rank must be 1 to 256")
    alpha = a.alpha if a.alpha is not None else 2.0 * a.rank
    if alpha == int(alpha):
        alpha = int(alpha)
    layers = list(range(c["layers"]))
    if a.layers:
        layers = sorted({int(x) for x in a.layers.split(",")})
        if any(l < 0 or l >= c["layers"] for l in layers):
            ap.error(f"--layers: the base has {c['layers']} layers")
    rank_pattern = parse_patterns(a.rank_pattern, int)
    alpha_pattern = parse_patterns(a.alpha_pattern, float)

    cfg = {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        "base_model_name_or_path": a.base_name or c["name"],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": layers if a.layers else None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": a.rank,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": a.rslora,
    }

    rng = np.random.default_rng(a.seed)
    prefix = "" if a.no_prefix else "base_model.model."
    name = f".{a.key_adapter_name}" if a.key_adapter_name else ""
    tensors = []
    for layer in layers:
        for t in TARGETS:
            if t not in targets:
                continue
            mod = module_name(layer, t)
            r = pattern_value(rank_pattern, mod, a.rank)
            if not 1 <= r <= 256:
                ap.error(f"{mod}: rank {r} out of range")
            fan_in, fan_out = target_dims(c, t)
            scale = module_scale(cfg, mod, r)
            std_b = a.scale_std / (abs(scale) * math.sqrt(r)) if scale else 0
            A = rng.standard_normal((r, fan_in), dtype=np.float32)
            A /= np.float32(math.sqrt(fan_in))
            B = rng.standard_normal((fan_out, r), dtype=np.float32)
            B *= np.float32(std_b)
            tensors.append((f"{prefix}{mod}.lora_A{name}.weight",
                            tiny.round_to(A, a.dtype)))
            tensors.append((f"{prefix}{mod}.lora_B{name}.weight",
                            tiny.round_to(B, a.dtype)))

    os.makedirs(a.out, exist_ok=True)
    tiny.write_safetensors(os.path.join(a.out, "adapter_model.safetensors"),
                           tensors, a.dtype)
    with open(os.path.join(a.out, "adapter_config.json"), "w") as f:
        # peft writes its config with sorted keys
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
