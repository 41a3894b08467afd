# The two commands of the README. Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test install install-tpu clean-venv

$(VENV)/.installed-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PY) -m pip install --quiet -e ".[test,serve]"
	touch $@

$(VENV)/.installed-tpu: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e ".[tpu]"
	touch $@

install: $(VENV)/.installed-test

install-tpu: $(VENV)/.installed-tpu

# Main job: train a tiny Molmo on synthetic data, evaluate it, draw its points (CPU, ~15 min).
# glibc.malloc.hugetlb=1 makes malloc use transparent huge pages: XLA:CPU allocates and frees a
# large temporary buffer every step, which otherwise costs tens of thousands of page faults per
# step. glibc reads it only at process start, hence here and not in Python.
demo: $(VENV)/.installed-base
	GLIBC_TUNABLES=$${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1} JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} \
	  $(PY) -m molmo_jax.demo --workdir outputs/demo

# The test suite (CPU-only JAX with 8 simulated devices; see tests/conftest.py).
test: $(VENV)/.installed-tpu
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
