# Two entry points, both from a fresh clone with nothing but Python 3.10+:
#   make demo   -- create .venv, install, run the demo on bundled data
#   make test   -- create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,hf]"

demo: install
	$(VENV)/bin/laplace-ggn demo

test: install
	$(VENV)/bin/ruff check laplace_ggn tests examples
	$(VENV)/bin/ruff format --check laplace_ggn tests examples
	$(PY) -m pytest -q

bench:
	bash benchmarks/setup_venv.sh
	.bench-venv/bin/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
