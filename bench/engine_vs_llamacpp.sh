#!/bin/sh
# Decode throughput of llm-bench against llama.cpp on the same GGUF file and
# thread count, in one run (the peer first, then ours, then the peer again,
# so drift on a noisy machine shows).  Needs llama-cpp-python.
#
#   bench/engine_vs_llamacpp.sh [MODEL] [THREADS]
set -e
cd "$(dirname "$0")/.."
M=${1:-$(tools/default-model.sh)}
T=${2:-2}
ARGS="--threads $T --prompt-tokens 128 --gen-tokens 64 --concurrency 1,8,32"
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
python3 bench/llamacpp_bench.py --model "$M" $ARGS 2>/dev/null
build/llm-bench --model "$M" $ARGS 2>/dev/null
python3 bench/llamacpp_bench.py --model "$M" $ARGS 2>/dev/null
