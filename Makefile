# The Calejo Control Adapter: build, run, test.
#
#   make run     start the adapter (demonstration station when unconfigured)
#   make test    lint, type check, build and run every test
#   make bench   run the benchmark suites
#
# Everything runs inside .venv, which the first target creates.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXT_SOURCES := $(wildcard calejo_core/*.pyx calejo_core/*.pxd)
PYTEST_ARGS ?=

.PHONY: all venv build run test lint typecheck pytest test-debug bench fuzz \
	dist image clean test-tools

all: build

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "setuptools>=77,<85" "Cython>=3.1,<3.3" \
		"numpy>=2.0,<3" wheel
	$(BIN)/pip install --quiet --no-build-isolation \
		--config-settings editable_mode=compat -e '.[server,dev]'
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP) $(EXT_SOURCES)
	$(BIN)/python setup.py --quiet build_ext --inplace -j 2

# Port 502 needs root: without it, Modbus TCP listens on 5020 unless
# CALEJO_MODBUS_PORT says otherwise.
run: build
	@if [ "$$(id -u)" != 0 ] && [ -z "$$CALEJO_MODBUS_PORT" ]; then \
		echo "make run: not root, so Modbus TCP listens on port 5020" \
			"(set CALEJO_MODBUS_PORT to choose)"; \
		export CALEJO_MODBUS_PORT=5020; \
	fi; \
	exec $(BIN)/calejo serve

lint: $(STAMP)
	$(BIN)/ruff check calejo_core calejo_server tests benchmarks setup.py
	$(BIN)/ruff format --check calejo_core calejo_server tests benchmarks setup.py

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: build test-tools
	$(BIN)/pytest $(PYTEST_ARGS)

# Programs the tests drive besides Python: mbpoll (a Modbus TCP client).
# Installed with apt-get when running as root on Debian or Ubuntu; without
# it the mbpoll test skips (and fails under CI=true).
test-tools:
	@if ! command -v mbpoll >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y -q mbpoll >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null && apt-get install -y -q mbpoll; } || \
			echo "test-tools: could not install mbpoll"; \
		else \
			echo "test-tools: mbpoll not found (apt-get install mbpoll)"; \
		fi; \
	fi

# The core's tests again, against a debug build (bounds checks, line
# tracing, no optimisation) made in a copy of the tree.
test-debug: $(STAMP)
	rm -rf .debug-build/src
	mkdir -p .debug-build/src
	cp -r calejo_core tests setup.py pyproject.toml .debug-build/src/
	find .debug-build/src -name '*.so' -delete
	cd .debug-build/src && CALEJO_DEBUG_BUILD=1 ../../$(BIN)/python setup.py \
		--quiet build_ext --inplace -j 2
	cd .debug-build/src && CALEJO_DEBUG_BUILD=1 PYTHONPATH=. \
		../../$(BIN)/pytest -p no:cacheprovider tests/core -q

test: lint typecheck pytest test-debug

bench: build
	$(BIN)/pytest benchmarks --benchmark-only --benchmark-group-by=group \
		--benchmark-columns=min,median,mean,ops,rounds -p no:randomly

fuzz: build
	CALEJO_FUZZ=1 $(BIN)/pytest tests -m slow -q

dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .

# The container image, built as the README builds a wheel (needs Docker).
image:
	docker build -f docker/Dockerfile -t calejo-control-adapter .

clean:
	rm -rf build dist .debug-build *.egg-info calejo_core/*.so calejo_core/*.c
