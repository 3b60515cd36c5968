# Everything installs from here, on a machine with only python3, make and apt-get.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed: installing python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

# the browser tests drive Debian's Chromium (never a downloaded one)
/usr/bin/chromium:
	apt-get update -qq && apt-get install -y -qq chromium

# Graphviz's dot draws the report's service graph
/usr/bin/dot:
	apt-get update -qq && apt-get install -y -qq graphviz

# Prometheus' promtool checks and unit-tests the alert rules (deploy/prometheus/), and its server
# scrapes a running serve in tests/test_metrics.py: Debian's package has both
/usr/bin/promtool /usr/bin/prometheus:
	apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus

# the Spark audit's tests run Spark in local mode on Debian's Java 17 (make demo needs no Java)
/usr/lib/jvm/java-17-openjdk-amd64/bin/java:
	apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless

install: $(STAMP) /usr/bin/dot

## make demo: start ctxaudit serve on a DuckDB file, send it spans through the OTel SDK, show what was stored
demo: $(STAMP) /usr/bin/dot
	$(BIN)/ctxaudit demo

## make test: lint, the import contracts, and the whole suite (with the UI in real Chromium)
test: $(STAMP) /usr/bin/chromium /usr/bin/dot /usr/lib/jvm/java-17-openjdk-amd64/bin/java /usr/bin/promtool /usr/bin/prometheus
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

## make test-fast: the tests not marked slow (no server processes, browser, fleet or fuzzer): under a minute
test-fast: $(STAMP) /usr/bin/dot /usr/bin/promtool
	$(BIN)/python -m pytest -m "not slow"

## make bench: ingest benchmark (figures in docs/performance.md)
bench: $(STAMP)
	$(BIN)/python -m bench.ingest

clean:
	rm -rf $(VENV) demo-data test-artifacts .pytest_cache
