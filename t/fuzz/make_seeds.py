#!/usr/bin/env python3
"""Writes the seed inputs of the libFuzzer targets in t/fuzz, one folder
per target, from files the repository's own tools generate:

  gguf/       tiny models (tools/make_tiny_model.py --vocab-size 400):
              Q8_0 llama with tied embeddings, F16 qwen2-style with qkv
              bias and an untied output, F32 llama with a SentencePiece
              vocabulary (tools/make_spm_vocab.py, whose whole vocabulary
              work/spm.gguf is the tokenizer target's second one)
  hf/         the same models' Hugging Face folders, parts joined by
              fuzz.h's FUZZ_SEP (config, tokenizer.json,
              tokenizer_config.json, model.safetensors)
  lora/       PEFT adapters of the first model (tools/make_lora.py):
              config and safetensors joined by FUZZ_SEP
  protocol/   real engine traffic: what a client sends (HELLO, SUBMIT,
              STATS_REQ, ADAPTER_*, PING, CANCEL) and what llm-engine,
              serving the first model, sends back
  tokenizer/  the tokenizer fixture's texts, with a mode byte
  chat/       each chat template fixture with a conversation
  engine/     request scripts of fuzz_engine.c: a shared prefix,
              adapters and the base together, a cancel, preemption

Usage: make_seeds.py --build BUILD --out DIR
The first model's HF folder (DIR/work/a/hf) is the base model of the lora
target (run.sh passes it as LLM_FUZZ_MODEL).
"""

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import llm_proto  # noqa: E402

SEP = b"\n#@fuzz-part@#\n"      # fuzz.h FUZZ_SEP
HF_PARTS = ["config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors"]


def run(*args):
    subprocess.run([sys.executable] + list(args), check=True,
                   stdout=subprocess.DEVNULL)


def put(out, target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def models(out, work):
    tiny = os.path.join(ROOT, "tools", "make_tiny_model.py")
    common = ["--vocab-size", "400", "--layers", "1", "--dim", "32",
              "--heads", "2", "--kv-heads", "1", "--ffn", "64"]
    run(tiny, *common, "--gguf-type", "q8_0", "--out",
        os.path.join(work, "a"))
    run(tiny, *common, "--gguf-type", "f16", "--qkv-bias", "--untied",
        "--seed", "1", "--out", os.path.join(work, "b"))
    # a SentencePiece vocabulary (also the tokenizer target's second one)
    spm = os.path.join(work, "spm.gguf")
    run(os.path.join(ROOT, "tools", "make_spm_vocab.py"), spm)
    run(tiny, *common, "--vocab-from", spm, "--seed", "2", "--out",
        os.path.join(work, "c"))
    for m in "abc":
        put(out, "gguf", m + ".gguf",
            read(os.path.join(work, m, "model.gguf")))
        hf = os.path.join(work, m, "hf")
        put(out, "hf", m, SEP.join(read(os.path.join(hf, p))
                                   for p in HF_PARTS))


def adapters(out, work):
    make = os.path.join(ROOT, "tools", "make_lora.py")
    base = os.path.join(work, "a", "hf")
    kinds = {
        "all": ["--rank", "4", "--targets", "q,k,v,o,gate,up,down"],
        "qv-f16-pattern": ["--rank", "2", "--targets", "q,v", "--dtype",
                           "f16", "--rank-pattern", "v_proj=3",
                           "--alpha-pattern", "q_proj=5"],
        "mlp-bf16-rslora": ["--rank", "8", "--targets", "gate,up,down",
                            "--dtype", "bf16", "--rslora"],
    }
    for name, args in kinds.items():
        d = os.path.join(work, "adapters", name)
        run(make, "--base", base, "--out", d, *args)
        put(out, "lora", name,
            read(os.path.join(d, "adapter_config.json")) + SEP
            + read(os.path.join(d, "adapter_model.safetensors")))


def traffic(out, work, build):
    """Client frames, and the engine's answers recorded off the socket."""
    sock = os.path.join(work, "engine.sock")
    log = open(os.path.join(work, "engine.log"), "wb")
    eng = subprocess.Popen(
        [os.path.join(build, "llm-engine"), "--model",
         os.path.join(work, "a", "model.gguf"), "--listen", "unix:" + sock,
         "--threads", "1", "--adapters", os.path.join(work, "adapters")],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        sent = [
            llm_proto.encode_hello("seed"),
            llm_proto.encode_submit(1, [17, 18, 19, 300], max_tokens=4,
                                    logprobs=True, top_logprobs=3,
                                    stop_ids=[2, 5], tenant="acme",
                                    cache_namespace="acme", seed=7,
                                    temperature=0.8, top_k=20, top_p=0.9),
            llm_proto.encode_submit(2, [40, 41], max_tokens=3,
                                    adapter="all", priority=1, weight=2,
                                    cache_shared_namespace="pub",
                                    cache_shared_tokens=1),
            llm_proto.encode_submit(3, [40], adapter="nope"),
            llm_proto.frame(llm_proto.STATS_REQ, 4),
            llm_proto.frame(llm_proto.ADAPTER_LIST, 5),
            llm_proto.encode_adapter_unload(6, "all"),
            llm_proto.encode_adapter_load(7, "all"),
            llm_proto.frame(llm_proto.PING, 8),
            llm_proto.encode_submit(9, [50] * 20, max_tokens=50),
            llm_proto.frame(llm_proto.CANCEL, 9),
        ]
        with llm_proto.Client("unix:" + sock, timeout=10) as c:
            for f in sent:
                c.send(f)
            got = b""
            deadline = time.monotonic() + 5
            c.sock.settimeout(0.5)
            while time.monotonic() < deadline:
                try:
                    d = c.sock.recv(1 << 16)
                except OSError:
                    if got:
                        break
                    continue
                if not d:
                    break
                got += d
    finally:
        eng.terminate()
        eng.wait(timeout=30)
        log.close()
    put(out, "protocol", "client-stream", b"".join(sent))
    put(out, "protocol", "server-stream", got)
    for i, f in enumerate(sent):
        put(out, "protocol", "client-frame-%02d" % i, f)
    if len(got) < 64:
        sys.exit("make_seeds: the engine answered %d bytes (see %s)"
                 % (len(got), os.path.join(work, "engine.log")))


def texts(out):
    seen = set()
    with open(os.path.join(ROOT, "t", "fixtures", "tokenizer",
                           "smollm2.txt")) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 5 or parts[0] != "enc" or parts[2] != "0":
                continue
            text = b"" if parts[4] in ("-", ":") else bytes.fromhex(parts[4])
            if text in seen or len(text) > 4000:
                continue
            seen.add(text)
            n = len(seen)
            put(out, "tokenizer", "text-%03d" % n, bytes([n % 3]) + text)
    ids = b"".join(i.to_bytes(4, "little", signed=True)
                   for i in [0, 1, 2, 17, 300, 49151, 49152, -1, 1000])
    put(out, "tokenizer", "ids", b"\x03" + ids)


def chats(out):
    conv = [b"system", b"You are terse.", b"user", b"Hi!\n",
            b"assistant", b" Hello \xf0\x9f\x91\x8b", b"user", b"2+2?"]
    for path in sorted(glob.glob(os.path.join(ROOT, "t", "fixtures", "chat",
                                              "*.tmpl"))):
        name = os.path.basename(path)[:-5]
        put(out, "chat", name, SEP.join([read(path)] + conv))
    put(out, "chat", "by-name", SEP.join([b"llama3"] + conv[2:]))


def engine_submit(prompt, max_tokens, temp=0, adapter=0, logprobs=False,
                  top_logprobs=0, priority=1, ns=2, shared=0, stops=()):
    """One submit of fuzz_engine.c's script (its take() order)."""
    b = [0, len(prompt)]
    for t in prompt:
        b += [t & 0xff, t >> 8]
    b += [max_tokens + 1, temp, 0, 8 if logprobs else 0, 7, top_logprobs,
          len(stops)] + list(stops)
    b += [priority << 2, adapter | (2 << 3) | (ns << 5), shared]
    return bytes(b)


def engines(out):
    steps = bytes([7, 7]) * 4
    common = list(range(300, 340))
    put(out, "engine", "shared-prefix",
        engine_submit(common + [20, 21], 8, shared=16)
        + engine_submit(common + [22], 8, shared=16) + steps)
    put(out, "engine", "adapters",
        engine_submit([40, 41, 42], 6, adapter=1, logprobs=True,
                      top_logprobs=3)
        + engine_submit([40, 41, 42], 6, adapter=2, temp=2)
        + engine_submit([40, 41, 42], 6, adapter=3)
        + engine_submit([40, 41, 42], 6) + steps)
    put(out, "engine", "cancel",
        engine_submit([50] * 30, 20) + bytes([7, 2, 4, 0]) + steps)
    put(out, "engine", "preempt",
        b"".join(engine_submit([60 + i] * 63, 46, priority=i % 3)
                 for i in range(6)) + steps * 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    work = os.path.join(a.out, "work")
    os.makedirs(work, exist_ok=True)
    models(a.out, work)
    adapters(a.out, work)
    traffic(a.out, work, a.build)
    texts(a.out)
    chats(a.out)
    engines(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
