# make demo  — create .venv, install everything, train + certify 2C2F on the embedded MNIST sample
# make test  — same install, then the full test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build found on the package index configured for this machine;
# asking for it first keeps pip from pulling a CUDA build for the dev extras.
$(STAMP): $(PY) setup.py
	$(PY) -m pip install --upgrade setuptools wheel
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m gloro_fast train

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info runs
