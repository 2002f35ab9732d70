# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu
# Python caches each module's bytecode (__pycache__) on first import, so that the many processes of a run or
# of the tests do not compile the same sources again: a few seconds of every `python -m cream_jax...` start.
# pip installs with --no-compile (byte-compiling all of torch, jax and transformers takes minutes); what is
# imported is compiled once, when first imported.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast lint setup clean

$(STAMP): requirements.txt requirements-test.txt requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -c requirements-lock.txt -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m cream_jax.demo --out results/demo

# Two pytest-xdist workers, each taking whole files (module fixtures and compile caches stay together): on 2
# cores one worker's compiles and subprocess start-ups overlap the other's work. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The tests not marked slow (pyproject.toml's markers): a quick check while working.
test-fast: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) results .pytest_cache
