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
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_PIN)"
	touch $@

venv: $(VENV)/.installed

fetch: venv
	$(VENV)/bin/sparsealloc fetch

# Main job on the default model (SmolLM2-135M-Instruct, Wikipedia summaries), CPU-sized calibration.
demo: venv
	$(VENV)/bin/sparsealloc prune --pruner wanda --sparsity 0.5 \
		--calib-samples 32 --seqlen 512 --eval-windows 64 --out runs/demo-wanda-50 --overwrite

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m bench.pruners
	$(PY) -m bench.profiles
	$(PY) -m bench.pool

clean:
	rm -rf $(VENV) runs
