# hamgr: `make demo` and `make test` are the two commands; both set the machine up first.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup build lint type unit integration e2e test demo doctor clean

setup:
	@bash scripts/setup.sh

build:
	$(MAKE) -C dpdk_vhost

lint: setup
	$(VENV)/bin/ruff check hamgr shim policies dpdk_vhost tests
	$(VENV)/bin/ruff format --check hamgr shim policies dpdk_vhost tests

type: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: setup
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# One pytest run over every suite, so the last line is pytest's summary for all of them.
test: setup
	$(VENV)/bin/ruff check hamgr shim policies dpdk_vhost tests
	$(VENV)/bin/ruff format --check hamgr shim policies dpdk_vhost tests
	$(VENV)/bin/mypy
	$(PY) -m pytest tests/unit tests/integration tests/e2e $(PYTEST_ARGS)

doctor: setup
	$(VENV)/bin/hamgr doctor

demo: setup
	$(VENV)/bin/hamgr demo

clean:
	$(MAKE) -C dpdk_vhost clean
	rm -rf .mypy_cache .ruff_cache .pytest_cache demo-report
