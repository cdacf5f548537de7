# sparsemm_kernels — every target sets itself up on a fresh CPU-only machine: it creates .venv if missing,
# installs the CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build) and the tools,
# then builds the extension in place.
#
#   make test       the whole CPU test suite (Triton kernels under TRITON_INTERPRET=1)
#   make report     the main job: the profiling report (dense vs MoT vs reference-style) for this machine
#   make bench      pytest-benchmark microbenchmarks
#   make lint       ruff
#   make gpu-check  on a GPU machine: build, CUDA tests, GPU benchmarks (uses the python3 there, installs nothing)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
DEPS   := torch==2.13.0 triton==3.9.0 numpy pytest pytest-benchmark pybind11 ninja setuptools wheel ruff \
          matplotlib tqdm nvidia-ml-py

.PHONY: test report bench lint build gpu-check clean mutate aot

$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(DEPS)
	touch $@

$(BUILT): $(STAMP) setup.py $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(PY) -m ruff check sparsemm_kernels tests benchmarks profiling
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests benchmarks/test_bench_smoke.py benchmarks/test_bench_ops.py

report: $(BUILT)
	$(PY) -m profiling $(ARGS)

bench: $(BUILT)
	$(PY) -m pytest -q -p no:cacheprovider benchmarks/test_bench_smoke.py benchmarks/test_bench_ops.py --benchmark-only

mutate: $(BUILT)
	TRITON_INTERPRET=1 $(PY) -m tests.mutation

lint: $(STAMP)
	$(PY) -m ruff check sparsemm_kernels tests benchmarks profiling

gpu-check:
	bash benchmarks/gpu_check.sh

# make aot: every Triton kernel x config x specialisation compiled for sm_80 and sm_90a (no GPU needed), with this
# Triton and with the GPU machines' Triton 3.6 (a second venv); tables in benchmarks/results/aot-<version>.md.
AOT36       := .venv-aot36
AOT36_STAMP := $(AOT36)/.deps-installed
AOT_ARGS    ?=

$(AOT36_STAMP):
	test -x $(AOT36)/bin/python || $(PYTHON) -m venv $(AOT36)
	$(AOT36)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.6.0 numpy
	touch $@

aot: $(BUILT) $(AOT36_STAMP)
	$(PY) -m benchmarks.aot $(AOT_ARGS); a=$$?; \
	PYTHONPATH=$(CURDIR) $(AOT36)/bin/python -m benchmarks.aot $(AOT_ARGS); b=$$?; \
	test $$a -eq 0 && test $$b -eq 0

clean:
	rm -rf build *.egg-info sparsemm_kernels/*.so $(BUILT)
