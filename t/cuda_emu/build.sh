#!/bin/sh
# Builds $BUILD/cuda-emu/llm-selftest-emu: llm-selftest linked against
# the CUDA backend compiled with g++ for the CPU emulator (emu.h), so the
# backend's host logic and kernels run, and are checked against the CPU
# backend, on a machine without a GPU.  Needs the normal build first
# (make BUILD=...): it reuses the engine's objects.
#
#   BUILD=build t/cuda_emu/build.sh && build/cuda-emu/llm-selftest-emu --quick
set -eu

BUILD=${BUILD:-build}
CXX=${CXX:-g++}
CC=${CC:-gcc}
PYTHON=${PYTHON:-python3}
OUT=$BUILD/cuda-emu
EMU=t/cuda_emu

[ -d "$BUILD/obj/engine" ] \
    || { echo "$0: build $BUILD first (make BUILD=$BUILD)"; exit 1; }
mkdir -p "$OUT"

# EMU_SANITIZE=1: AddressSanitizer catches reads and writes out of bounds
SAN=${EMU_SANITIZE:+-fsanitize=address -fno-omit-frame-pointer}
CXXFLAGS="-std=c++17 -O2 -g -fPIC -fno-strict-aliasing -Wall $SAN
          -Wno-unknown-pragmas -Wno-unused-function -Wno-unused-variable"
objs=""
for cu in kernels/cuda/*.cu; do
    name=$(basename "$cu" .cu)
    "$PYTHON" "$EMU/transform.py" "$cu" "$OUT/$name.cpp"
    $CXX $CXXFLAGS -I. -Ikernels/cuda -include "$EMU/emu.h" \
        -c "$OUT/$name.cpp" -o "$OUT/$name.o"
    objs="$objs $OUT/$name.o"
done
$CXX $CXXFLAGS -I. -c "$EMU/emu_runtime.cpp" -o "$OUT/emu_runtime.o"

CFLAGS="-O2 -g -std=gnu11 -pthread -D_GNU_SOURCE -DLLM_HAVE_CUDA -I.
        -I/usr/include/x86_64-linux-gnu/openblas-pthread $SAN"
$CC $CFLAGS -c engine/cmd/llm-selftest.c -o "$OUT/llm-selftest.o"
$CC $CFLAGS -c kernels/backend.c -o "$OUT/backend.o"

lib=$(find "$BUILD/obj/engine" "$BUILD/obj/kernels" "$BUILD/obj/adapters" \
      -name '*.o' ! -path '*/cmd/*' ! -path '*/cuda/*' ! -name backend.o \
      2>/dev/null | sort)
$CXX $SAN -o "$OUT/llm-selftest-emu" "$OUT/llm-selftest.o" "$OUT/backend.o" \
    $objs "$OUT/emu_runtime.o" $lib -lopenblas -ljansson -lhiredis -lm -lpthread
echo "$OUT/llm-selftest-emu"
