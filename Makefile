# Developer shortcuts. CI runs .ci/run (which runs the README test command).
PY ?= python3

.PHONY: build test lint format bench-quick info

build:            ## compile b2kernels._C in place (for running from the source tree)
	$(PY) setup.py build_ext --inplace

test:             ## the CPU test suite (Triton kernels under the interpreter)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

lint:             ## what CI checks: formatting and lint of the whole tree
	ruff format --check .
	ruff check .

format:           ## format and auto-fix the whole tree
	ruff format .
	ruff check --fix .

bench-quick:      ## every suite on its smallest shapes
	for s in ddim_logprob kv_inject_attention arena stage dfusion; do $(PY) -m bench $$s --quick || exit 1; done

info:
	$(PY) -m b2kernels.info
