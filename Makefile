# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu

.PHONY: demo test setup clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m cream_jax.demo --out results/demo

# Two pytest-xdist workers, each taking whole files (module fixtures and compile caches stay together). On 2
# cores one worker's compiles and subprocess start-ups overlap the other's work: 692 s against 906 s serially
# for the same code here (616 s with the compilation cache that tests/conftest.py shares). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) results .pytest_cache
