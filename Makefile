# ngx_llm: top-level build.
#
#   make            build the engine library, the programs and the module
#   make test       install what is missing, build, run every test
#   make run        install, build, serve on 127.0.0.1:8080 (Ctrl-C stops);
#                   ADAPTERS=DIR also serves the LoRA adapters in DIR;
#                   REDIS=host:port uses that Redis (limits, caches)
#
# BUILD=dir puts every output in another folder (parallel work trees).

BUILD   ?= build
CC      ?= gcc
PYTHON  ?= python3
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)

OPT     ?= -O2
CFLAGS  += $(OPT) -g -fPIC -std=gnu11 -pthread -Wall -Wextra \
           -Wno-unused-parameter -Wno-sign-compare -Wno-format-truncation \
           -D_GNU_SOURCE
CPPFLAGS += -I. -I/usr/include/x86_64-linux-gnu/openblas-pthread
LDLIBS  += -lopenblas -ljansson -lhiredis -lm -lpthread

# Kernels built per instruction set; chosen at run time (cpu_features.c).
AVX2_FLAGS   := -mavx2 -mfma -mf16c
AVX512_FLAGS := -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl \
                -mavx512dq -mavx512vnni -mavx512bf16 -mamx-tile -mamx-int8

ENGINE_SRCS := $(wildcard engine/*.c)
KERNEL_SRCS := $(wildcard kernels/*.c kernels/cpu/*.c)
LIB_SRCS    := $(ENGINE_SRCS) $(KERNEL_SRCS) $(wildcard adapters/*.c)
LIB_OBJS    := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)

# CUDA: kernels/cuda/*.cu with nvcc for sm_80 and sm_90 (plus sm_90 PTX,
# which newer GPUs compile at load), whenever nvcc is present.  The rpath
# finds libcudart/libcublas at run time without ld.so.conf.
CUDA_SRCS   := $(wildcard kernels/cuda/*.cu)
ifneq ($(NVCC),)
ifneq ($(CUDA_SRCS),)
CUDA_HOME   ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_OBJS   := $(CUDA_SRCS:%.cu=$(BUILD)/obj/%.o)
CPPFLAGS    += -DLLM_HAVE_CUDA
LDLIBS      += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 \
               -lcudart -lcublas -lstdc++
NVCCFLAGS   ?= -O2 -std=c++17 -Xcompiler -fPIC -Xcompiler -Wall -I. \
               -gencode arch=compute_80,code=sm_80 \
               -gencode 'arch=compute_90,code=[sm_90,compute_90]'
endif
endif

PROGRAMS    := $(patsubst engine/cmd/%.c,$(BUILD)/%,$(wildcard engine/cmd/*.c))
TEST_SRCS   := $(wildcard t/unit/*.c)
TEST_BIN    := $(BUILD)/unit-tests

.PHONY: all lib programs deps test unit integration run clean module models
all: lib programs $(TEST_BIN) module

lib: $(BUILD)/libllm.a
programs: $(PROGRAMS)

$(BUILD)/obj/%_avx2.o: %_avx2.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(AVX2_FLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/%_avx512.o: %_avx512.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(AVX512_FLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libllm.a: $(LIB_OBJS) $(CUDA_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/%: $(BUILD)/obj/engine/cmd/%.o $(BUILD)/libllm.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libllm.a $(LDLIBS) -Wl,--no-undefined

$(TEST_BIN): $(TEST_SRCS:%.c=$(BUILD)/obj/%.o) $(BUILD)/libllm.a
	$(CC) $(CFLAGS) -o $@ $(filter %.o,$^) $(BUILD)/libllm.a $(LDLIBS)

# Kernel micro-benchmark (bench/kernels/RESULTS.md): make bench-kernels
.PHONY: bench-kernels
bench-kernels: $(BUILD)/bench-kernels
$(BUILD)/bench-kernels: $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard bench/kernels/*.c bench/common/*.c)) $(BUILD)/libllm.a
	$(CC) $(CFLAGS) -o $@ $(filter %.o,$^) $(BUILD)/libllm.a $(LDLIBS)

# The CUDA backend built with g++ for the CPU emulator (t/cuda_emu): its
# host logic and kernels checked against the CPU backend without a GPU.
#   make cuda-emu && $(BUILD)/cuda-emu/llm-selftest-emu --quick
.PHONY: cuda-emu cuda-emu-check
cuda-emu: lib
	BUILD=$(BUILD) t/cuda_emu/build.sh
cuda-emu-check: cuda-emu
	$(BUILD)/cuda-emu/llm-selftest-emu --quick

# Fuzzing (t/fuzz): libFuzzer targets built with clang, ASan and UBSan
# against their own copy of the library (no CUDA).  `make fuzz-check`
# replays the seeds, the kept failures and a fixed-seed run (part of
# `make test`); `make fuzz FUZZ_SECONDS=N` fuzzes each target N seconds.
# The SIMD kernels (*_avx2.c, *_avx512.c) parse nothing and take clang
# minutes under the sanitizers, so they are built without them.
FUZZ_CC      ?= clang
FUZZ_BUILD   := $(BUILD)/fuzz
FUZZ_FLAGS   := -O1 -g -fPIC -std=gnu11 -pthread -D_GNU_SOURCE \
                -fno-omit-frame-pointer -fsanitize=address,undefined \
                -fno-sanitize-recover=undefined
FUZZ_KERNEL_FLAGS := -O1 -g -fPIC -std=gnu11 -pthread -D_GNU_SOURCE
FUZZ_CPPFLAGS := -I. -I/usr/include/x86_64-linux-gnu/openblas-pthread
FUZZ_LIB_OBJS := $(LIB_SRCS:%.c=$(FUZZ_BUILD)/obj/%.o)
FUZZ_TARGETS := $(patsubst t/fuzz/%.c,$(FUZZ_BUILD)/%,$(wildcard t/fuzz/fuzz_*.c))
FUZZ_SECONDS ?= 60

$(FUZZ_BUILD)/obj/%_avx2.o: %_avx2.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CPPFLAGS) $(FUZZ_KERNEL_FLAGS) $(AVX2_FLAGS) \
	    -MMD -MP -c $< -o $@

$(FUZZ_BUILD)/obj/%_avx512.o: %_avx512.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CPPFLAGS) $(FUZZ_KERNEL_FLAGS) $(AVX512_FLAGS) \
	    -MMD -MP -c $< -o $@

$(FUZZ_BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CPPFLAGS) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link \
	    -MMD -MP -c $< -o $@

$(FUZZ_BUILD)/libllm.a: $(FUZZ_LIB_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/obj/t/fuzz/fuzz_%.o \
                      $(FUZZ_BUILD)/obj/t/fuzz/fuzz.o $(FUZZ_BUILD)/libllm.a
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer -o $@ $(filter %.o,$^) \
	    $(FUZZ_BUILD)/libllm.a -lopenblas -ljansson -lhiredis -lm -lpthread

.PHONY: fuzz-build fuzz-check fuzz
fuzz-build: $(FUZZ_TARGETS) programs
fuzz-check: fuzz-build
	BUILD=$(BUILD) t/fuzz/run.sh check
fuzz: fuzz-build
	BUILD=$(BUILD) t/fuzz/run.sh fuzz $(FUZZ_SECONDS)

ASAN_SAN    := -fno-omit-frame-pointer -fsanitize=address,undefined

# The unit tests under gcc's ASan and UBSan, in $(BUILD)-asan (about 10
# minutes on 2 cores; not part of `make test`): make asan-check
.PHONY: asan-check
asan-check:
	$(MAKE) BUILD=$(BUILD)-asan OPT="-O1 $(ASAN_SAN)" \
	    $(BUILD)-asan/unit-tests
	@log=$(BUILD)-asan/unit-tests.log; \
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    $(BUILD)-asan/unit-tests > $$log 2>&1; rc=$$?; cat $$log; \
	! grep -q "runtime error\|ERROR: [A-Za-z]*Sanitizer" $$log && \
	    exit $$rc

# The integration tests against a module, engine and programs built with
# ASan and UBSan (in $(BUILD)-asan; nginx preloads the runtimes through
# t/integration/nginx_asan.sh); fails on a failed test or any report in
# $(BUILD)-asan/asan-logs.  Not part of `make test` (slow).
.PHONY: asan-integration
asan-integration:
	$(MAKE) BUILD=$(BUILD)-asan OPT="-O1 $(ASAN_SAN)" \
	    NGX_CC_OPT="-O1 -g -fPIC $(ASAN_SAN) -Wno-maybe-uninitialized" \
	    NGX_LD_OPT="$(ASAN_SAN)" all
	@logs=$(CURDIR)/$(BUILD)-asan/asan-logs; rm -rf $$logs; \
	mkdir -p $$logs; \
	LLM_ASAN_LOGS=$$logs NGINX_BIN=$(CURDIR)/t/integration/nginx_asan.sh \
	LLM_BUILD=$(BUILD)-asan ASAN_OPTIONS=log_path=$$logs/engine \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=$$logs/ubsan \
	    $(PYTHON) -m pytest $(PYTEST_ARGS) t/integration; rc=$$?; \
	if [ -n "$$(ls $$logs)" ]; then \
	    echo "sanitizer reports:"; head -40 $$logs/*; exit 1; fi; \
	exit $$rc

# Multi-LoRA benchmark (bench/RESULTS.md): bench/lora_bench.py runs it
.PHONY: bench-lora
bench-lora: $(BUILD)/lora-bench
$(BUILD)/lora-bench: $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard bench/lora/*.c)) $(BUILD)/libllm.a
	$(CC) $(CFLAGS) -o $@ $(filter %.o,$^) $(BUILD)/libllm.a $(LDLIBS)

# ---- the NGINX module ------------------------------------------------
# Built by NGINX's own configure (Debian's nginx-dev tree, copied once into
# $(BUILD)/nginx) with the flags of Debian's nginx, so that the stock
# /usr/sbin/nginx loads it; the engine code it needs links in from
# libllm.a (path passed to ./config in NGX_LLM_LIB).

NGX_SRC     ?= /usr/share/nginx/src
NGX_CC_OPT  ?= -O2 -g -fPIC
NGX_LD_OPT  ?=
NGX_BUILD   := $(BUILD)/nginx
MODULE_SO   := $(BUILD)/ngx_http_llm_module.so
MODULE_DEPS := $(wildcard ngx_llm_module/*.c ngx_llm_module/*.h) \
               engine/common.h engine/protocol.h engine/tokenizer.h \
               $(wildcard engine/chat_template.h)

module: $(MODULE_SO)

$(NGX_BUILD)/objs/Makefile: config
	@test -f $(NGX_SRC)/conf_flags \
	    || { echo "$(NGX_SRC) missing: install nginx-dev (make deps)"; \
	         exit 1; }
	@test -f $(NGX_BUILD)/configure || { mkdir -p $(BUILD) \
	    && rm -rf $(NGX_BUILD) && cp -r $(NGX_SRC) $(NGX_BUILD); }
	cd $(NGX_BUILD) && NGX_LLM_LIB=$(CURDIR)/$(BUILD)/libllm.a bash -c \
	    'source ./conf_flags && ./configure "$${NGX_CONF_FLAGS[@]}" \
	     --with-cc-opt="$(NGX_CC_OPT)" --with-ld-opt="$(NGX_LD_OPT)" \
	     --add-dynamic-module=$(CURDIR)' \
	    > configure.log 2>&1 \
	    || { tail -20 configure.log; exit 1; }

# objs/Makefile does not know libllm.a: remove the .so to force the link.
$(MODULE_SO): $(NGX_BUILD)/objs/Makefile $(MODULE_DEPS) $(BUILD)/libllm.a
	rm -f $(NGX_BUILD)/objs/ngx_http_llm_module.so
	cd $(NGX_BUILD) && MAKEFLAGS= $(MAKE) -f objs/Makefile modules
	cp $(NGX_BUILD)/objs/ngx_http_llm_module.so $@

deps:
	@tools/install-deps.sh

# An F32 copy of the default model, for comparisons with llama.cpp.
F32_MODEL := .models/smollm2-135m-f32.gguf
models: $(F32_MODEL)
$(F32_MODEL):
	@mkdir -p .models
	$(PYTHON) tools/dequantize_gguf.py "$$(tools/default-model.sh)" $@

unit: all
	$(TEST_BIN)

# pytest with real nginx, llm-engine and redis-server (t/integration).
PYTEST_ARGS ?= -q
integration: all
	LLM_BUILD=$(BUILD) $(PYTHON) -m pytest $(PYTEST_ARGS) t/integration; \
	    rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# The suites run even if one fails; any failing fails the target.  Then
# the fuzz targets' replay (fuzz-check, above) and the CUDA backend's
# self-test under the CPU emulator (cuda-emu, above): no GPU here, but its
# host logic and kernels are checked.
test: deps
	$(MAKE) all models
	@rc=0; $(TEST_BIN) || rc=1; $(MAKE) integration || rc=1; \
	    $(MAKE) fuzz-check || rc=1; \
	    $(MAKE) cuda-emu-check || rc=1; exit $$rc

# ADAPTERS=DIR registers every LoRA adapter folder inside DIR; ADAPTER_DTYPE=
# auto|f16|f32|int8 sets their device copies (llm-engine --adapter-dtype).
run: deps
	$(MAKE) all
	BUILD=$(BUILD) ADAPTERS="$(ADAPTERS)" ADAPTER_DTYPE="$(ADAPTER_DTYPE)" \
	    REDIS="$(REDIS)" tools/run.sh

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD)/obj $(FUZZ_BUILD)/obj -name '*.d' 2>/dev/null)
