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

# Main job on the default model (SmolLM2-135M-Instruct, Wikipedia summaries): a search over per-block
# profiles with every driver on a small token budget, a CPU-sized protocol (8 calibration windows and
# 16 test windows of 128 tokens), then the final Wanda pass of the winner, Tune's ATP pick and uniform.
# Prints the three side by side and ends with the report's path.
DEMO_FLAGS := --method all --sparsity 0.7 --budget-tokens 56000 --fitness-windows 8 --fidelities 128 512 \
	--top-fitness kl --estimator sliding --finalists 1 --seqlen 128 --calib-samples 8 --eval-windows 16 \
	--selection-windows 8
demo: venv
	$(VENV)/bin/sparsealloc search $(DEMO_FLAGS) --out runs/demo --overwrite

test: venv
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 3 --dist worksteal --durations=15 tests

bench: venv
	$(PY) -m bench.pruners
	$(PY) -m bench.profiles
	$(PY) -m bench.pool
	$(PY) -m pytest -q bench/test_pruner_order.py

clean:
	rm -rf $(VENV) runs
