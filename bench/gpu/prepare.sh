#!/bin/sh
# Packs, on the development machine, what bench/gpu/run.sh needs on the
# GPU machine, which reaches no network and takes at most 64 MiB per call
# (bench/gpu/README.md):
#
#   build-gpu/pack/bin/*.xz         llm-selftest, gpubench and lora-bench,
#                                   built here
#                                   with OpenBLAS, jansson, libstdc++ and
#                                   cudart linked in (cuBLAS comes from the
#                                   device's CUDA 13), stripped, xz'd
#   build-gpu/pack/pylib/gguf/      the gguf package (pure Python), for
#                                   tools/make_tiny_model.py
#   build-gpu/pack/vocab.gguf       SmolLM2's tokenizer without weights
#                                   (make_tiny_model.py --vocab-from)
#   build-gpu-m1/, build-gpu-m2/    the default model in two halves, one
#                                   per call (each call carries < 64 MiB)
#
# Every output is under build*/, which git ignores; name the folders in
# the device call's carry.  Needs nvcc (the build defines LLM_HAVE_CUDA).
#
#   bench/gpu/prepare.sh            (BUILD=build-gpu by default)
set -eu

BUILD=${BUILD:-build-gpu}
PACK=$BUILD/pack
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}

[ -x "$NVCC" ] || { echo "$0: nvcc not found: the pack needs the CUDA build"; exit 1; }
make BUILD="$BUILD" -j"$(nproc)" lib
mkdir -p "$PACK/bin" "$PACK/pylib"

LIBS="-L$CUDA_HOME/lib64 -Wl,-rpath,/usr/local/cuda/lib64 \
      -Wl,-Bstatic -lopenblas -ljansson -lhiredis -lcudart_static -lstdc++ \
      -lgfortran -lquadmath -Wl,-Bdynamic -lcublas -static-libgcc \
      -lm -lpthread -ldl -lrt"
CFLAGS="-O2 -std=gnu11 -D_GNU_SOURCE -DLLM_HAVE_CUDA -I. -I/usr/include/x86_64-linux-gnu/openblas-pthread"
for prog in engine/cmd/llm-selftest.c \
            "bench/gpu/gpubench.c bench/common/lora_step.c" \
            bench/lora/lora_bench.c; do
    name=$(basename "${prog%% *}" .c | tr _ -)
    # shellcheck disable=SC2086
    gcc $CFLAGS $prog "$BUILD/libllm.a" -o "$PACK/bin/$name" $LIBS
    strip "$PACK/bin/$name"
    xz -9 -T0 -f "$PACK/bin/$name"
done

# gguf: copied from this Python (pure Python; its own needs, numpy,
# pyyaml, requests and tqdm, are on the GPU image)
rm -rf "$PACK/pylib/gguf"
cp -r "$("$PYTHON" -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')" \
      "$PACK/pylib/gguf"
find "$PACK/pylib" -name __pycache__ -prune -exec rm -rf {} +

MODEL=$(tools/default-model.sh) || { echo "$0: default model missing"; exit 1; }
"$PYTHON" - "$MODEL" "$PACK/vocab.gguf" <<'PY'
import importlib.util, sys
import gguf

spec = importlib.util.spec_from_file_location("mtm", "tools/make_tiny_model.py")
mtm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mtm)
meta = mtm.read_gguf_metadata(sys.argv[1])
w = gguf.GGUFWriter(sys.argv[2], "llama")
w.add_tokenizer_model(meta["tokenizer.ggml.model"])
w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
w.add_token_list(meta["tokenizer.ggml.tokens"])
w.add_token_types([int(x) for x in meta["tokenizer.ggml.token_type"]])
w.add_token_merges(meta["tokenizer.ggml.merges"])
for key, fn in (("bos_token_id", w.add_bos_token_id),
                ("eos_token_id", w.add_eos_token_id),
                ("unknown_token_id", w.add_unk_token_id),
                ("padding_token_id", w.add_pad_token_id)):
    if "tokenizer.ggml." + key in meta:
        fn(int(meta["tokenizer.ggml." + key]))
if "tokenizer.ggml.add_bos_token" in meta:
    w.add_add_bos_token(bool(meta["tokenizer.ggml.add_bos_token"]))
if "tokenizer.chat_template" in meta:
    w.add_chat_template(meta["tokenizer.chat_template"])
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
PY

# the model, halved: carried by two calls in a row (bench/gpu/README.md)
mkdir -p "$BUILD-m1" "$BUILD-m2"
size=$(stat -c %s "$MODEL")
half=$(( (size + 1) / 2 ))
head -c "$half" "$MODEL" > "$BUILD-m1/model.part1"
tail -c +"$((half + 1))" "$MODEL" > "$BUILD-m2/model.part2"
sha256sum "$MODEL" | cut -d' ' -f1 > "$PACK/model.sha256"
basename "$MODEL" > "$PACK/model.name"

du -sh "$PACK" "$BUILD-m1" "$BUILD-m2"
