# Developer shortcuts.  The README's two commands are the reference; these wrap them.
PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: build debug annotate test unit integration bench lint clean

build:            ## compile _core in place (optimised)
	$(PY) -m pip install -q --no-build-isolation -e .

debug:            ## compile _core without optimisation, with line tracing
	FASTPATH_DEBUG=1 $(PY) -m pip install -q --no-build-isolation -e .

annotate:         ## cython -a: writes src/fastpath/_core.html (yellow = Python interaction)
	FASTPATH_ANNOTATE=1 $(PY) -m pip install -q --no-build-isolation -e .
	@echo "open src/fastpath/_core.html"

test:             ## the whole suite, as CI runs it
	$(PY) -m pytest -q tests

unit:
	$(PY) -m pytest -q tests/unit

integration:
	$(PY) -m pytest -q tests/integration

bench:            ## micro-benchmarks, then the load benchmark against nginx (needs wrk, nginx)
	$(PY) -m pytest benchmarks/ --benchmark-only
	$(PY) benchmarks/load.py

lint:
	$(PY) -m ruff check src cellsync tests benchmarks
	$(PY) -m mypy

clean:
	rm -rf build src/fastpath/_core.c src/fastpath/_core*.so src/fastpath/_core.html src/fastpath/_core_hash.h
	find src/fastpath cellsync -name '*.cpython-*.so' -delete
	find src/fastpath cellsync -name '*.c' -not -path '*/includes/*' -delete
	rm -f src/fastpath/_accel.json
