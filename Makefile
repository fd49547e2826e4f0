# shardps: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PROTOS := $(wildcard protos/shardps/pscommon/wire/v1/*.proto)
# glibc: stop mmap/munmap of every multi-MB gRPC buffer (measured in docs/benchmarks.md)
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296

.PHONY: install demo test test-fast test-slow proto bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# setuptools warns that any editable install with a package-dir map may be shadowed by cwd
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo   # a fresh job: a kept --state-dir would resume the last one
	$(VENV)/bin/psctl up --servers 2 --workers 3 --mode async --model digits-mlp --steps 300 \
		--run-dir runs/demo --plot runs/demo/curve.png --min-accuracy 0.95

# two tests at a time (pytest-xdist; worksteal evens out the long integration runs): the
# suite's processes wait on leases, steps and sockets about half the time, so two share CI's
# two cores with room to spare (three finished sooner but starved timing-bound tests: a sync
# consistent cut was outrun five times). JOBS=1 runs one at a time (-p no:xdist is not needed).
JOBS   ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist worksteal)

# the slowest tests are listed at the end, to keep the suite inside its 15 minutes
test: $(STAMP)
	$(PYTEST) --durations=20

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

# protoc writes by import path (shardps/pscommon/wire/v1/); the folder is pscommon/wire/v1/
proto: $(STAMP)
	rm -rf build/proto && mkdir -p build/proto
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=build/proto --pyi_out=build/proto \
		--grpc_python_out=build/proto $(PROTOS)
	cp build/proto/shardps/pscommon/wire/v1/*_pb2*.py* pscommon/wire/v1/

bench: $(STAMP)
	$(PY) bench/ps_loop.py --preset small --servers 1 --workers 1 --json

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
