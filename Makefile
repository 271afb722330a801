# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv build test demo bench cuda-build-check clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install "scikit-build-core>=0.10" cmake ninja numpy pytest hypothesis \
	    "diffusers>=0.30" "accelerate>=0.30" safetensors pyyaml tqdm pillow scikit-learn matplotlib scipy
	touch $@

venv: $(VENV)/.deps

# Non-editable install; build/ keeps CMake's state so rebuilds are incremental.
build: venv
	$(PIP) install --no-build-isolation --no-deps .

test: build
	cd tests && ../$(VENV)/bin/pytest -q

demo: build
	$(VENV)/bin/liftplace demo

bench: build
	$(PY) benchmarks/bench_loss.py

cuda-build-check:
	bash .ci/cuda_build_check.sh

clean:
	rm -rf build dist *.egg-info
