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

# Wheels the GPU device image lacks (it has torch, triton, transformers, peft, accelerate), for Python 3.12
# x86-64, into the ignored .whl/; the device call carries .whl and bench/device_check.sh installs them.
# Versions as tested here; diffusers needs huggingface-hub>=1.32 and safetensors>=0.8 (the image has both).
DEVICE_WHEELS ?= diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
	open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0
.PHONY: device-wheels
device-wheels:    ## download the wheels bench/device_check.sh installs on a fresh GPU machine
	mkdir -p .whl
	grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(DEVICE_WHEELS)
