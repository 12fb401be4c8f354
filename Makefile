# Set-up and entry points. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel for torch: a bare `torch` requirement pulls gigabytes of CUDA packages.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test bench fetch clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,eval]" "$(TORCH_PIN)"
	touch $@

venv: $(VENV)/.installed

fetch: venv
	$(VENV)/bin/sparsealloc fetch

# Main job on the default model (SmolLM2-135M-Instruct, Wikipedia summaries), CPU-sized protocol:
# 32 calibration windows and 32 test windows of 512 tokens (16k tokens each). About 3 to 5 minutes
# on 2 CPU cores the first time; later runs reuse the cached dense perplexity. Ends with the report.
demo: venv
	$(VENV)/bin/sparsealloc prune --pruner wanda --sparsity 0.5 \
		--calib-samples 32 --seqlen 512 --eval-windows 32 --out runs/demo-wanda-50 --overwrite
	$(VENV)/bin/sparsealloc report runs/demo-wanda-50

test: venv
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m bench.pruners
	$(PY) -m bench.profiles
	$(PY) -m bench.pool

clean:
	rm -rf $(VENV) runs
