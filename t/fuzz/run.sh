#!/bin/bash
# Runs the libFuzzer targets built in $BUILD/fuzz (make fuzz-build).
#
#   t/fuzz/run.sh check
#       every target on its seeds (t/fuzz/make_seeds.py) and on the inputs
#       kept in t/fuzz/regress/TARGET (each a bug found once), then
#       FUZZ_RUNS (default 2000) mutated inputs from a fixed random seed:
#       the same inputs on every run, so a failure reproduces.  Part of
#       `make test`.
#   t/fuzz/run.sh fuzz SECONDS [TARGET...]
#       fuzzes each target (default all) for SECONDS, keeping the corpus
#       in $BUILD/fuzz/corpus/TARGET; a failing input lands in
#       $BUILD/fuzz/crashes/.  Copy it to t/fuzz/regress/TARGET/ with the
#       fix.
#
# Prints a line per target and "N passed, N failed"; exits 1 if any
# failed.
set -u
cd "$(dirname "$0")/../.."

BUILD=${BUILD:-build}
FUZZ=$BUILD/fuzz
SEEDS=$FUZZ/seeds
mode=${1:-check}
shift || true

if [ ! -f "$SEEDS/.done" ]; then
    rm -rf "$SEEDS"
    python3 t/fuzz/make_seeds.py --build "$BUILD" --out "$SEEDS" \
        || { echo "fuzz: could not make the seeds"; exit 1; }
    touch "$SEEDS/.done"
fi
LLM_FUZZ_MODEL=$SEEDS/work/a/hf
LLM_FUZZ_ADAPTERS=$SEEDS/work/adapters
LLM_FUZZ_TOKENIZER=$(tools/default-model.sh) \
    || { echo "fuzz: the default model is not installed"; exit 1; }
LLM_FUZZ_TOKENIZER_SPM=$SEEDS/work/spm.gguf
export LLM_FUZZ_MODEL LLM_FUZZ_ADAPTERS LLM_FUZZ_TOKENIZER \
    LLM_FUZZ_TOKENIZER_SPM
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

targets=()
for t in t/fuzz/fuzz_*.c; do
    t=$(basename "$t" .c)
    targets+=("${t#fuzz_}")
done

passed=0
failed=0
run_target() {
    local name=$1 bin=$FUZZ/fuzz_$1 log=$FUZZ/logs/$1.log
    shift
    mkdir -p "$FUZZ/logs" "$FUZZ/crashes"
    if "$bin" -timeout=20 -rss_limit_mb=4096 \
            -artifact_prefix="$FUZZ/crashes/$name-" "$@" > "$log" 2>&1
    then
        passed=$((passed + 1))
        echo "fuzz $name: ok ($(grep -o 'Done [0-9]* runs' "$log" \
                                  | tail -1 | cut -d' ' -f2) runs)"
    else
        failed=$((failed + 1))
        echo "fuzz $name: FAILED (log: $log)"
        grep -m1 -A12 'ERROR:\|fuzz: \|runtime error' "$log" | sed 's/^/    /'
    fi
}

case $mode in
check)
    for t in "${targets[@]}"; do
        work=$(mktemp -d)
        dirs=("$SEEDS/$t")
        [ -d "t/fuzz/regress/$t" ] && dirs+=("t/fuzz/regress/$t")
        run_target "$t" -seed=1 -runs="${FUZZ_RUNS:-2000}" \
            "$work" "${dirs[@]}"
        rm -rf "$work"
    done
    ;;
fuzz)
    secs=${1:?usage: run.sh fuzz SECONDS [TARGET...]}
    shift
    [ $# -gt 0 ] && targets=("$@")
    for t in "${targets[@]}"; do
        mkdir -p "$FUZZ/corpus/$t"
        dirs=("$FUZZ/corpus/$t" "$SEEDS/$t")
        [ -d "t/fuzz/regress/$t" ] && dirs+=("t/fuzz/regress/$t")
        run_target "$t" -max_total_time="$secs" "${dirs[@]}"
    done
    ;;
*)
    echo "usage: t/fuzz/run.sh check | fuzz SECONDS [TARGET...]"
    exit 2
    ;;
esac
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
