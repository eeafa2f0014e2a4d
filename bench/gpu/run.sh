#!/bin/sh
# The GPU session's script (bench/gpu/README.md), run on the GPU machine
# from the repository root:
#
#   1. llm-selftest --device cuda:0: every CUDA op against the CPU op, then
#      the tiny model and (if carried) SmolLM2 end to end;
#   2. a ~1B-parameter Llama-shaped random model, generated here with
#      tools/make_tiny_model.py (large files cannot travel);
#   3. gpubench on it: decode tokens/s for batches 1..256 against the
#      bandwidth floor, prefill tokens/s, the multi-LoRA op;
#   4. lora-bench on it: 32 random adapters (tools/make_lora.py, ranks 8
#      and 16, all seven projections), 32 sequences through the engine:
#      the base alone and spread over 1, 8, 32 adapters, f16 and int8.
#
# Reads build-gpu/pack/ (bench/gpu/prepare.sh) and, when both halves are
# there, build-gpu-m1/ + build-gpu-m2/ (the default model).  Writes
# reports to $OUT (the device tool's folder), else bench/gpu/out/.
#
#   STEPS="selftest bench lora" bench/gpu/run.sh    (all by default)
set -u

PACK=${PACK:-build-gpu/pack}
OUT=${OUT:-bench/gpu/out}
WORK=${WORK:-/tmp/llm-gpu}
STEPS=${STEPS:-selftest bench lora}
PYTHON=${PYTHON:-python3}
rc=0

mkdir -p "$OUT" "$WORK/bin"
{
    date -u
    nvidia-smi 2>&1
    nvcc --version 2>&1 | tail -2
    uname -a
} > "$OUT/device.txt"
head -20 "$OUT/device.txt"

[ -d "$PACK/bin" ] || { echo "run.sh: $PACK missing: run bench/gpu/prepare.sh and carry it"; exit 1; }
for f in "$PACK"/bin/*.xz; do
    b="$WORK/bin/$(basename "$f" .xz)"
    "$PYTHON" -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' "$f" "$b"
    chmod +x "$b"
done

MODEL=
p1=${PACK%/pack}-m1/model.part1
p2=${PACK%/pack}-m2/model.part2
if [ -f "$p1" ] && [ -f "$p2" ]; then
    MODEL="$WORK/$(cat "$PACK/model.name")"
    cat "$p1" "$p2" > "$MODEL"
    if [ "$(sha256sum "$MODEL" | cut -d' ' -f1)" != "$(cat "$PACK/model.sha256")" ]; then
        echo "run.sh: reassembled model does not match its sha256: not used"
        MODEL=
    fi
fi

case " $STEPS " in *" selftest "*)
    echo "== llm-selftest"
    if [ -n "$MODEL" ]; then
        "$WORK/bin/llm-selftest" --device cuda:0 --model "$MODEL" > "$OUT/selftest.txt" 2>&1
    else
        "$WORK/bin/llm-selftest" --device cuda:0 --no-model > "$OUT/selftest.txt" 2>&1
    fi
    st=$?
    grep -E "FAIL|^llm-selftest|skipped" "$OUT/selftest.txt"
    [ $st -eq 0 ] || rc=1
    ;;
esac

M="$WORK/m1b"
case " $STEPS " in *" bench "*|*" lora "*)
    echo "== 1B model"
    if [ ! -f "$M/model.gguf" ]; then
        PYTHONPATH="$PACK/pylib${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" \
            tools/make_tiny_model.py --layers 16 --dim 2048 --heads 32 \
            --kv-heads 8 --ffn 8192 --ctx 4096 --rope-base 500000 \
            --gguf-type f16 --no-hf --vocab-from "$PACK/vocab.gguf" \
            --out "$M" || { echo "run.sh: model generation failed"; exit 1; }
    fi
    ls -la "$M/model.gguf"
    ;;
esac

case " $STEPS " in *" bench "*)
    echo "== gpubench"
    "$WORK/bin/gpubench" --model "$M/model.gguf" --device cuda:0 \
        --batches 1,2,4,8,16,32,64,128,256 --context 512 --steps 32 \
        --prefill 128,512,2048 2>&1 | tee "$OUT/gpubench.txt"
    ;;
esac
case " $STEPS " in *" lora "*)
    echo "== adapters for the 1B model"
    A="$WORK/lora1b"
    for i in $(seq 0 31); do
        d=$(printf "%s/a%02d" "$A" "$i")
        [ -f "$d/adapter_config.json" ] && continue
        PYTHONPATH="$PACK/pylib${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" \
            tools/make_lora.py --base "$M/model.gguf" --out "$d" \
            --rank $((i % 2 ? 16 : 8)) --targets q,k,v,o,gate,up,down \
            --seed $((1000 + i)) > /dev/null \
            || { echo "run.sh: make_lora.py failed"; rc=1; break; }
    done
    du -sh "$A"
    for dt in f16 int8; do
        echo "== lora-bench, adapters in $dt"
        "$WORK/bin/lora-bench" --model "$M/model.gguf" --adapters "$A" \
            --device cuda:0 --seqs 32 --prompt 32 --gen 64 --repeat 3 \
            --adapter-dtype "$dt" > "$OUT/lora-$dt.txt" 2>&1 || rc=1
        head -8 "$OUT/lora-$dt.txt"
    done
    ;;
esac
exit $rc
