# ngx_llm: top-level build.
#
#   make            build the engine library, the programs and the module
#   make test       install what is missing, build, run every test
#   make run        install, build, serve on 127.0.0.1:8080 (Ctrl-C stops)
#
# BUILD=dir puts every output in another folder (parallel work trees).

BUILD   ?= build
CC      ?= gcc
PYTHON  ?= python3
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)

OPT     ?= -O2
CFLAGS  += $(OPT) -g -fPIC -std=gnu11 -pthread -Wall -Wextra \
           -Wno-unused-parameter -Wno-sign-compare -D_GNU_SOURCE
CPPFLAGS += -I. -I/usr/include/x86_64-linux-gnu/openblas-pthread
LDLIBS  += -lopenblas -ljansson -lm -lpthread

# Kernels built per instruction set; chosen at run time (cpu_features.c).
AVX2_FLAGS   := -mavx2 -mfma -mf16c
AVX512_FLAGS := -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl \
                -mavx512dq -mavx512vnni -mavx512bf16

ENGINE_SRCS := $(wildcard engine/*.c)
KERNEL_SRCS := $(wildcard kernels/*.c kernels/cpu/*.c)
LIB_SRCS    := $(ENGINE_SRCS) $(KERNEL_SRCS)
LIB_OBJS    := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)

CUDA_SRCS   := $(wildcard kernels/cuda/*.cu)
ifneq ($(NVCC),)
ifneq ($(CUDA_SRCS),)
CUDA_OBJS   := $(CUDA_SRCS:%.cu=$(BUILD)/obj/%.o)
CPPFLAGS    += -DLLM_HAVE_CUDA
LDLIBS      += -L/usr/local/cuda/lib64 -lcudart -lcublas -lstdc++
NVCCFLAGS   ?= -O2 -Xcompiler -fPIC -I. \
               -gencode arch=compute_80,code=sm_80 \
               -gencode arch=compute_90,code=sm_90
endif
endif

PROGRAMS    := $(patsubst engine/cmd/%.c,$(BUILD)/%,$(wildcard engine/cmd/*.c))
TEST_SRCS   := $(wildcard t/unit/*.c)
TEST_BIN    := $(BUILD)/unit-tests

.PHONY: all lib programs deps test unit integration run clean module
all: lib programs $(TEST_BIN)

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
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/libllm.a: $(LIB_OBJS) $(CUDA_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/%: $(BUILD)/obj/engine/cmd/%.o $(BUILD)/libllm.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libllm.a $(LDLIBS) -Wl,--no-undefined

$(TEST_BIN): $(TEST_SRCS:%.c=$(BUILD)/obj/%.o) $(BUILD)/libllm.a
	$(CC) $(CFLAGS) -o $@ $(filter %.o,$^) $(BUILD)/libllm.a $(LDLIBS)

deps:
	@tools/install-deps.sh

unit: all
	$(TEST_BIN)

test: deps
	$(MAKE) all
	$(TEST_BIN)

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
