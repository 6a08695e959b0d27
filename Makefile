# The two commands of the quick start: `make up` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: up test check test-deps lint protos install bench clean

$(STAMP): pyproject.toml setup.py native/spawn/stoker_spawn.c
	sh scripts/install-test-deps.sh --build
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/stoker up $(ARGS)

# System packages first: a fresh machine may lack what the venv or the tests need.
test-deps:
	bash scripts/install-test-deps.sh

test: test-deps $(STAMP)
	$(VENV)/bin/ruff check engine tests scripts bench
	$(VENV)/bin/mypy
	$(VENV)/bin/python -c 'import engine.native as n; assert n.IMPLEMENTATION == "native", n.IMPLEMENTATION'
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	@echo "--- again on the pure-Python fallback (everything the native core touches) ---"
	STOKER_FORCE_PYTHON=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/native tests/worker tests/cas tests/integration

# The fast inner loop (under 2 minutes): lint, types, and every test not marked slow (no
# Stoker, Bazel, BuildGrid or container is started). `make test` runs everything.
check: $(STAMP)
	$(VENV)/bin/ruff check engine tests scripts bench
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

# Every benchmark beside its reference; refreshes bench/RESULTS.md.
bench: test-deps $(STAMP)
	$(PY) -m bench.run --with-node --wait-idle 120 --record bench/RESULTS.md $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check engine tests scripts bench

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info
