# Two commands for a new user: `make serve` and `make test`. Both bootstrap .venv idempotently.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps jemalloc serve test lint bench bench-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,tracing]'
	touch $(STAMP)

setup: $(STAMP)

# Tools the tests drive: promtool (Debian's prometheus) and a headless Chromium. Installed
# once, with apt (as root, or through sudo).
SYSTEM_TOOLS := /usr/bin/promtool /usr/bin/chromium
$(SYSTEM_TOOLS):
	@if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	$$sudo apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq prometheus chromium

# jemalloc for the engine process (`--engine-allocator auto` uses it when installed; see
# benchmarks/README.md, "Allocators"). `make serve` goes on with glibc when apt cannot run.
JEMALLOC_STAMP := $(VENV)/.jemalloc
$(JEMALLOC_STAMP): | $(BIN)/python
	@if ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 && [ ! -e /usr/lib/libjemalloc.so.2 ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq libjemalloc2; \
	fi
	touch $@

jemalloc: $(JEMALLOC_STAMP)

system-deps: $(SYSTEM_TOOLS) jemalloc

serve: $(STAMP)
	@$(MAKE) --no-print-directory jemalloc || echo "libjemalloc2 not installed: the engine runs on glibc"
	$(BIN)/enduro serve

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

test: lint system-deps
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/enduro bench offline

# The llama.cpp baselines of the performance benchmarks (llama-cpp-python into the venv,
# llama-server into .bench/): source builds of about 10 minutes each, never part of `make test`.
bench-deps: $(STAMP)
	VENV=$(VENV) benchmarks/baselines/build.sh

clean:
	rm -rf $(VENV) .bench .mypy_cache .ruff_cache .pytest_cache
