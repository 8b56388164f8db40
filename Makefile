# make demo / make test: each sets up what is missing (virtualenv, packages, redis-server).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install chromium test test-all chaos demo bench lint clean

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# tests/integration/test_report.py opens the HTML report in headless Chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (apt)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# lint-imports: the layer contracts in pyproject.toml ([tool.importlinter]).
test: install chromium
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install chromium
	$(BIN)/python -m pytest -q

# The reliability suite with 30 s outages, 10 kills a flow and 10 min of load near capacity
# (make test: 3 s and 2 kills, no load test); it ends with a table of what it counted.
chaos: install
	CHAOS_OUTAGE_S=30 CHAOS_KILLS=10 SOAK_S=600 $(BIN)/python -m pytest -q -s \
	  tests/integration/test_chaos.py tests/integration/test_bad_input.py \
	  tests/integration/test_security.py tests/integration/test_soak.py

demo: install
	$(BIN)/python -m ctrstream.demo

bench: install
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "installing wrk (apt)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python bench/produce.py
	$(BIN)/python bench/join.py
	@# The Pathway peer of bench/pipeline.py, in a virtualenv of its own (its dependencies
	@# are not the project's); never made by `make test`.
	@test -x $(VENV)/peers/bin/python || $(PYTHON) -m venv $(VENV)/peers
	$(VENV)/peers/bin/python -m pip install -q pathway==0.33.0 redis==8.1.0
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/features.py
	$(BIN)/python bench/learners.py
	$(BIN)/python bench/publish.py
	$(BIN)/python bench/embeddings_core.py
	$(BIN)/python bench/serving.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	-$(BIN)/ctrstream stack down
	rm -rf .ctrstream
