#!/usr/bin/env bash
# CI: the sdist in dist/ (make sdist) must build, and the CPU wheel in dist/ (make wheel) installed into a fresh venv that has torch but no
# compiler on PATH and no source tree on sys.path; the whole test suite runs against it.
# Also: a default `pip install .` (build isolation on) must stop with the command that works
# instead of building against some other torch.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
TORCH_PKG=${TORCH_PKG:-torch==2.13.0}
start=$(date +%s)
stamp() { echo "wheel-check [$(( $(date +%s) - start ))s] $*"; }
whl=$(ls dist/liftplace-*cpu-*.whl | head -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PIP=("$work/venv/bin/python" -m pip --disable-pip-version-check -q)
quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }

stamp "wheel: $whl"
sdist=$(ls dist/liftplace-*.tar.gz | head -1)
stamp "the sdist builds on its own: $sdist"
LIFTPLACE_CUDA=OFF "$root/.venv/bin/python" -m pip --disable-pip-version-check -q wheel --no-build-isolation \
  --no-deps -w "$work/from-sdist" "$sdist" 2> >(quiet)
ls "$work"/from-sdist/liftplace-*.whl
python3 -m venv "$work/venv"
"${PIP[@]}" install "$TORCH_PKG" 2> >(quiet)
"${PIP[@]}" install "$whl[train,test,prune]" 2> >(quiet)
# The tests (and the docs/configs some of them check) without the package sources; PATH
# holds the venv and basic tools, no compiler.
cp -r tests docs configs "$work/"
mkdir "$work/bin"
for tool in sh bash env cat ls rm mkdir cp mv sed grep tar uname dirname basename readlink date; do
  ln -s "$(command -v "$tool")" "$work/bin/$tool"
done
export PATH="$work/venv/bin:$work/bin"
for cc in cc c++ gcc g++ clang nvcc; do
  if command -v "$cc" >/dev/null; then echo "wheel-check: a compiler ($cc) is on PATH" >&2; exit 1; fi
done
cd "$work/tests"
python -W error::RuntimeWarning -c '
import liftplace, sys
info = liftplace.backend_info()
assert info["cpu_ext"] and not liftplace.__file__.startswith(sys.argv[1]), (info, liftplace.__file__)
print("wheel-check: installed", liftplace.__file__, {k: info[k] for k in ("version", "cpu_ext", "built_with_torch")})' "$root"
stamp "running the test suite against the installed wheel"
python -m pytest -q -p no:cacheprovider
stamp "default pip install . (build isolation on) must refuse with the working command"
cd "$root"
export PATH="$work/venv/bin:/usr/bin:/bin"
if out=$(pip install --no-deps --dry-run . 2>&1); then
  echo "wheel-check: 'pip install .' with build isolation did not stop" >&2; exit 1
fi
grep -q "pip install --no-build-isolation" <<<"$out" || { echo "$out" | tail -20 >&2; exit 1; }
stamp "ok: the isolated build stopped with the --no-build-isolation command"
stamp "a --no-build-isolation build without a new enough CMake must name both versions and the fix"
"$work/venv/bin/python" -m pip --disable-pip-version-check -q install "scikit-build-core>=0.10" 2> >(quiet)
if out=$("$work/venv/bin/python" -m pip --disable-pip-version-check install --no-build-isolation --no-deps \
         --dry-run . 2>&1); then
  echo "wheel-check: a build with no CMake >= 3.26 available did not stop" >&2; exit 1
fi
grep -q "liftplace needs CMake >=3.26" <<<"$out" && grep -q "pip install cmake" <<<"$out" \
  || { echo "$out" | tail -20 >&2; exit 1; }
stamp "ok: it stopped naming the CMake it found and 'pip install cmake'"
