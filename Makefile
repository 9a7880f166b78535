# make demo  — create .venv, install everything, train + certify 2C2F on the embedded MNIST sample
# make test  — same install, then the full test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CSRC   := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cpp csrc/cuda/*.cu)
NVCC   ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/bin/nvcc)
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

.PHONY: install demo test bench bench-quick cuda-check clean

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

# Compile-only check of the CUDA kernels (no GPU needed): they must never rot.
cuda-check:
	@test -x "$(NVCC)" || { echo "cuda-check: nvcc not found"; exit 1; }
	@set -e; for f in csrc/cuda/*.cu; do \
		[ -e "$$f" ] || continue; \
		echo "nvcc $$f (sm_80, sm_90)"; \
		"$(NVCC)" -std=c++17 -O3 $(CUDA_ARCHS) -Icsrc -c "$$f" -o /dev/null; \
	done

clean:
	rm -rf $(VENV) build *.egg-info runs gloro_fast/*.so
