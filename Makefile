# make demo  — create .venv, install everything, train + certify 2C2F on the embedded MNIST sample
# make test  — same install, then the full test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CSRC   := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cpp csrc/cuda/*.cu)
NVCC   ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/bin/nvcc)
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

.PHONY: install demo test bench bench-quick cuda-check kernels-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build found on the package index configured for this machine;
# installing it first keeps pip from pulling a CUDA build for the dev extras. The extension
# is built against that torch (--no-build-isolation), with ninja.
$(STAMP): $(PY) setup.py $(CSRC)
	$(PY) -m pip install --upgrade pip setuptools wheel ninja
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m gloro_fast train

test: $(STAMP)
	$(PY) -m pytest -q tests

# Benchmarks (benchmarks/, pytest-benchmark): results/<device>.json, RESULTS.md and plots.
# bench-quick: reduced grid, < 3 min, written to benchmarks/quick/ (not committed).
bench: $(STAMP)
	@mkdir -p benchmarks/.raw
	$(PY) -m pytest -q benchmarks --benchmark-json=benchmarks/.raw/bench.json; rc=$$?; \
	$(PY) benchmarks/report.py --raw benchmarks/.raw/bench.json --out benchmarks && exit $$rc

bench-quick: $(STAMP)
	@mkdir -p benchmarks/.raw
	BENCH_QUICK=1 $(PY) -m pytest -q benchmarks --benchmark-json=benchmarks/.raw/bench-quick.json; rc=$$?; \
	$(PY) benchmarks/report.py --raw benchmarks/.raw/bench-quick.json --out benchmarks/quick && exit $$rc

# Compile-only check of the CUDA sources (no GPU needed): they must never rot. Every
# csrc/cuda/*.cu by nvcc for sm_80 and sm_90, and every CUDA binding csrc/cuda/*.cpp with
# -DGLORO_FAST_WITH_CUDA against the installed (CPU) torch's headers, through nvcc (which adds
# the CUDA include path). CPU wheels lack the one header that torch's CMake generates for
# CUDA builds, c10/cuda/impl/cuda_cmake_macros.h: a build-only copy is written under build/.
CUDA_CHECK_INC := build/cuda-check/include
cuda-check: $(STAMP)
	@test -x "$(NVCC)" || { echo "cuda-check: nvcc not found"; exit 1; }
	@mkdir -p $(CUDA_CHECK_INC)/c10/cuda/impl
	@printf '#pragma once\n// build-only stand-in for the header CUDA builds of torch generate (make cuda-check)\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
		> $(CUDA_CHECK_INC)/c10/cuda/impl/cuda_cmake_macros.h
	@set -e; for f in csrc/cuda/*.cu; do \
		[ -e "$$f" ] || continue; \
		echo "nvcc $$f (sm_80, sm_90)"; \
		"$(NVCC)" -std=c++17 -O3 $(CUDA_ARCHS) -Icsrc -c "$$f" -o /dev/null; \
	done
	@set -e; inc=$$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))"); \
	abi=$$($(PY) -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"); \
	for f in csrc/cuda/*.cpp; do \
		[ -e "$$f" ] || continue; \
		echo "nvcc -x c++ -DGLORO_FAST_WITH_CUDA $$f (binding, torch headers)"; \
		"$(NVCC)" -x c++ -std=c++17 -O0 -DGLORO_FAST_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI=$$abi \
			-I$(CUDA_CHECK_INC) $$inc -Icsrc -Xcompiler -fPIC,-Wno-c++20-extensions -c "$$f" -o /dev/null; \
	done

# Ahead-of-time compile of every Triton kernel config for sm_90 (no GPU needed): compile
# time, registers, spills and local memory per config; fails on a spilling or slow config.
kernels-check: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m gloro_fast.kernels._aot --arch 90

clean:
	rm -rf $(VENV) build *.egg-info runs gloro_fast/*.so
