#!/usr/bin/env python3
"""Writes t/fixtures/quant/*.bin: quantized rows with the floats the gguf
package (gguf.quants, an implementation independent of ours) dequantizes
them to, and float rows with the blocks it quantizes them to.  The unit
test t/unit/test_kernels.c checks kernels/quant_ref.c against them.

    python3 tools/gen_quant_fixtures.py [model.gguf]

File format (little-endian):
    "LLMQ" u32 type u32 rows u32 cols  raw[rows * row_bytes]  f32[rows * cols]
        dequantization: raw -> expected floats
    "LLMZ" u32 type u32 rows u32 cols  f32[rows * cols]  raw[rows * row_bytes]
        quantization: floats -> expected blocks (bit exact)
The model rows come from the default model (tools/default-model.sh) when
it is installed; the random rows need nothing but numpy and gguf.
"""
import os
import struct
import subprocess
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "t",
                   "fixtures", "quant")
BLOCK = {T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2), T.Q4_0: (32, 18),
         T.Q4_1: (32, 20), T.Q8_0: (32, 34), T.Q4_K: (256, 144),
         T.Q5_K: (256, 176), T.Q6_K: (256, 210)}
# offsets of the f16 scale fields inside a block
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2],
              T.Q5_K: [0, 2], T.Q6_K: [208]}


def write_deq(name, qtype, raw, rows, cols):
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1)
    expect = quants.dequantize(raw, qtype).astype(np.float32)
    assert expect.shape == (rows, cols), (name, expect.shape)
    with open(os.path.join(OUT, name + ".bin"), "wb") as f:
        f.write(b"LLMQ" + struct.pack("<III", int(qtype), rows, cols))
        f.write(raw.tobytes())
        f.write(expect.tobytes())


def write_quant(name, qtype, x):
    rows, cols = x.shape
    raw = quants.quantize(x.astype(np.float32), qtype)
    with open(os.path.join(OUT, name + ".bin"), "wb") as f:
        f.write(b"LLMZ" + struct.pack("<III", int(qtype), rows, cols))
        f.write(x.astype(np.float32).tobytes())
        f.write(np.ascontiguousarray(raw).view(np.uint8).tobytes())


def random_blocks(rng, qtype, rows, cols):
    blk, size = BLOCK[qtype]
    nb = rows * cols // blk
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        # finite scales of either sign and a spread of magnitudes
        d = (rng.uniform(-1, 1, nb) * 10.0 ** rng.uniform(-4, 0, nb))
        raw[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw


def model_path():
    if len(sys.argv) > 1:
        return sys.argv[1]
    try:
        out = subprocess.run([os.path.join(os.path.dirname(__file__),
                                           "default-model.sh")],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20240601)

    for qtype in (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K):
        write_deq("rand_" + qtype.name.lower(), qtype,
                  random_blocks(rng, qtype, 2, 512), 2, 512)
    x = (rng.standard_normal((2, 160)) * 3).astype(np.float32)
    x[0, :7] = [0.0, -0.0, 65504.0, -1e-7, 1e-8, 3.14159, -6.0e4]
    write_deq("rand_f16", T.F16, x.astype(np.float16).view(np.uint8), 2, 160)
    write_deq("rand_bf16", T.BF16, quants.quantize(x, T.BF16), 2, 160)

    # quantization: Gaussian rows, one with a zero block and outliers
    x = (rng.standard_normal((2, 512)) * 0.5).astype(np.float32)
    x[0, 0:32] = 0.0
    x[1, 40] = 12.0
    x[1, 100] = -9.0
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.F16, T.BF16):
        write_quant("quant_" + qtype.name.lower(), qtype, x)

    path = model_path()
    if path is None or not os.path.exists(path):
        print("model not found: wrote the random fixtures only")
        return
    r = GGUFReader(path)
    want = {"token_embd.weight": [0, 1, 19556],
            "blk.0.attn_q.weight": [0, 575],
            "blk.7.ffn_down.weight": [3]}
    for t in r.tensors:
        if t.name not in want:
            continue
        qtype = T(t.tensor_type)
        cols = int(t.shape[0])
        data = np.asarray(t.data)
        rows = want[t.name]
        raw = np.stack([data[i].view(np.uint8).reshape(-1) for i in rows])
        name = "model_" + t.name.replace(".weight", "").replace(".", "_")
        write_deq(name, qtype, raw, len(rows), cols)
    print("wrote fixtures to", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
