# Everything a new machine needs comes from here: `make run`/`make demo` and `make test`
# create .venv and install what they use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-proxy
LISTEN ?= 127.0.0.1:8080
MODEL_LISTEN ?= 127.0.0.1:8000
METER ?= auto

.PHONY: install run demo test test-slow lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: on the project's machines 2.13.0 is a CPU build on local disk, where a
# bare `torch` would fetch a multi-GB CUDA build. The extra then finds it installed.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,model-server]'
	touch $@

install: $(STAMP)

# The model server on tiny local models (built on first run), joulegate in front of it once
# the models are loaded.
run: install
	@trap 'kill $$server 2>/dev/null' EXIT INT TERM; \
	JOULEGATE_TINY_MODELS=$(CURDIR)/.tiny-models $(BIN)/joulegate-model-server --listen $(MODEL_LISTEN) & server=$$!; \
	echo "waiting for the model server to load its models..."; \
	until $(BIN)/python -c "import urllib.request as r; r.urlopen('http://$(MODEL_LISTEN)/health')" 2>/dev/null; do \
	  kill -0 $$server 2>/dev/null || exit 1; sleep 1; \
	done; \
	$(BIN)/joulegate serve --upstream http://$(MODEL_LISTEN) --listen $(LISTEN) --meter $(METER)

demo: install
	JOULEGATE_TINY_MODELS=$(CURDIR)/.tiny-models $(BIN)/joulegate demo --meter $(METER)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# The load and soak tests (tests/test_load.py): 1,000 concurrent SSE streams held for
# JOULEGATE_STREAMS_SECONDS (default 60) and a soak of JOULEGATE_SOAK_SECONDS (default 600)
# each after ~50,000 requests that fill what joulegate keeps in memory: about 13 minutes on
# 2 cores. -s shows their figures.
# pytest exits 5 when no test is marked slow: that is not a failure.
test-slow: install
	$(BIN)/pytest -q -s -m slow || [ $$? -eq 5 ]

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every benchmark in benchmarks/, one after another, then one table of figures against
# targets (also written with each benchmark's output to bench-results.md): about 20 minutes.
# `make bench BENCH_ARGS=--quick` shortens each (under 2 minutes, rough figures);
# BENCH_ARGS='--only soak' runs one.
bench: install
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
