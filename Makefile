# REPA: make demo | make test | make bench | make bench-gpu
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install first; override on other platforms, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: venv demo demo-fast test bench bench-gpu clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,s3]'
	touch $@

demo: venv
	$(PY) scripts/demo.py --out $(DEMO_DIR)

demo-fast: venv
	DEMO_FAST=1 $(PY) scripts/demo.py --out $(DEMO_DIR)-fast

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	@for f in tests/benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

bench-gpu: venv
	$(PY) tests/benchmarks/gpu_all.py

clean:
	rm -rf $(DEMO_DIR) $(DEMO_DIR)-fast .pytest_cache
