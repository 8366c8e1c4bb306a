# Two commands for a fresh machine: `make demo` and `make test`. Each sets itself up first.
# `make test-fast`: the in-process unit tier only (tests/unit), for a quick check while editing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastalign-installed

.PHONY: setup lint test test-fast demo gpu-check bench-cpu clean

setup: $(STAMP)

# The CPU wheel torch==2.13.0 lies on this kind of machine's disk; a CUDA machine takes its own torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet torch; \
	else \
		$(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

# Lint rules and line length live in pyproject.toml ([tool.ruff]); the tree is not run through `ruff format`.
lint: $(STAMP)
	$(VENV)/bin/ruff check fastalign benchmarks tests

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

demo: $(STAMP)
	$(PY) -m fastalign.demo

# For a lent GPU machine (no network, no venv): uses the image's python and the source tree.
# Without make: PYTHONPATH=. python3 benchmarks/gpu_check.py --out_dir DIR
# GPU_CHECK_ARGS: --out_dir DIR, a folder that comes back from the machine (the default,
# benchmarks/results/tmp/gpu-check-<date>-<gpu>/, stays on it); --budget_s (default 420).
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

bench-cpu: $(STAMP)
	$(PY) benchmarks/loss_head.py --preset cpu
	$(PY) benchmarks/train_throughput.py --preset cpu-tiny

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
