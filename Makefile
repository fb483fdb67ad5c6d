# REPA: make demo | make test | make bench | make bench-gpu
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install first; override on other platforms, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo
PYTEST_ARGS ?=
# Test processes (pytest-xdist). The suite is mostly subprocesses that wait on each other (Ray, torchrun, servers),
# so 3 keep 2 cores busy. Slow end-to-end tests are collected first (tests/conftest.py) and handed out one at a
# time (--maxschedchunk 1), so they spread over the workers instead of queueing behind each other on one.
TEST_WORKERS ?= 3

.PHONY: venv demo demo-fast demo-t2i test bench bench-gpu wheelhouse clean

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

demo-t2i: venv
	$(PY) scripts/demo.py --t2i --out $(DEMO_DIR)-t2i

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxschedchunk 1 $(PYTEST_ARGS)

bench: venv
	@for f in tests/benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# What the project needs beyond a stock PyTorch GPU image (torch, torchvision, timm, h5py, scipy, safetensors,
# huggingface_hub, numpy, pillow, tqdm, matplotlib, tensorboard, fsspec, pyyaml), as wheels for an offline node.
# Ray is left out: the benchmarks do not need it (it is 60+ MiB). `make wheelhouse PY=3.12` picks the Python.
WHEEL_PY = $(if $(findstring /,$(PY)),$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'),$(PY))
WHEEL_PLATFORM ?= manylinux2014_x86_64
WHEELS ?= diffusers webdataset braceexpand open_clip_torch ftfy wcwidth regex torch-fidelity importlib_metadata zipp

wheelhouse:
	rm -rf wheelhouse && mkdir -p wheelhouse
	$(PYTHON) -m pip download -q --dest wheelhouse --no-deps --only-binary=:all: --python-version $(WHEEL_PY) \
		--platform $(WHEEL_PLATFORM) --platform manylinux_2_17_x86_64 --platform any $(WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps --wheel-dir wheelhouse .
	@du -sh wheelhouse | sed 's/\t.*/ wheelhouse (Python $(WHEEL_PY), $(WHEEL_PLATFORM))/'; ls wheelhouse

# On a GPU node: its own python3 and torch, no network. Installs the project and the wheelhouse (--no-index,
# --no-deps: torch is never touched), then runs each benchmark in its own capped process. Without CUDA it runs
# the same harness in a tiny CPU mode. Writes bench-gpu.json and bench-gpu.md.
bench-gpu:
	@if [ -d wheelhouse ]; then PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --no-index \
		--find-links wheelhouse --no-deps repa $(WHEELS) || echo "warning: wheelhouse install failed (built for \
		another Python?); running from the checkout with what is installed"; fi
	python3 tests/benchmarks/gpu_all.py --out bench-gpu.json --md bench-gpu.md

clean:
	rm -rf $(DEMO_DIR) $(DEMO_DIR)-fast .pytest_cache
