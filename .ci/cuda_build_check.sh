#!/usr/bin/env bash
# CI stage: build liftplace's CUDA kernels against a CUDA build of torch, without a GPU.
# Proves that every .cu file compiles, that the library links and loads, and that every op
# has a kernel registered under the CUDA dispatch key. With a GPU present it also runs
# tests/test_ops.py, which checks every CUDA kernel against the pure-torch twin.
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
  "${PIP[@]}" install "$TORCH_CUDA_PKG" "scikit-build-core>=0.10" cmake ninja numpy 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$VENV_CUDA/.deps"
fi
stamp "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

# Build and install with the CUDA kernels required (LIFTPLACE_CUDA=ON fails instead of
# silently building CPU-only). A failing .cu file fails pip, and so this script.
export LIFTPLACE_CUDA=ON
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
stamp "building (LIFTPLACE_CUDA_ARCH=${LIFTPLACE_CUDA_ARCH:-default}, $CMAKE_BUILD_PARALLEL_LEVEL jobs, build/cuda)"
build_start=$(date +%s)
"${PIP[@]}" install --no-build-isolation --no-deps --force-reinstall -C build-dir=build/cuda .
stamp "build and install took $(( $(date +%s) - build_start ))s"

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
