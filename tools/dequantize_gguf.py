#!/usr/bin/env python3
"""Writes an F32 copy of a GGUF model: every tensor dequantized with the
`gguf` package (an implementation independent of ours), all metadata kept.

    tools/dequantize_gguf.py IN.gguf OUT.gguf

The reference logits come from llama.cpp running this F32 file, so that the
comparison with our engine tests the forward pass, not the quantization.
"""
import os
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize


def copy_field(w, field):
    name = field.name
    if name.startswith("GGUF.") or name == "general.architecture":
        return
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            vals = [bytes(field.parts[i]).decode("utf-8", "surrogateescape")
                    for i in field.data]
        else:
            vals = [field.parts[i].tolist()[0] for i in field.data]
        w.add_key_value(name, vals, vtype, sub_type=sub)
    elif vtype == GGUFValueType.STRING:
        w.add_key_value(name, bytes(field.parts[field.data[0]]).decode(
            "utf-8", "surrogateescape"), vtype)
    else:
        w.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    r = GGUFReader(src)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    tmp = dst + ".tmp"
    w = GGUFWriter(tmp, arch)
    for field in r.fields.values():
        if field.name == "general.file_type":
            w.add_key_value(field.name, 0, GGUFValueType.UINT32)  # ALL_F32
            continue
        copy_field(w, field)
    for t in r.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        # numpy shape is GGUF's dims reversed: [rows, cols]
        w.add_tensor(t.name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)


if __name__ == "__main__":
    main()
