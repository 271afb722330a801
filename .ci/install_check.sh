#!/usr/bin/env bash
# CI-only: README's by-hand install, run exactly as written (the lines between the
# install:start / install:end markers) in a fresh venv, from a copy of the tree without
# build output; then the installed package must import its kernels and run its CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | (cd "$root" && xargs -0 tar cf -) | (cd "$work" && tar xf -)
sed -n '/<!-- install:start -->/,/<!-- install:end -->/p' README.md | sed '/^<!--/d;/^```/d' > "$work/install.sh"
echo "install-check: running README's install lines:"; cat "$work/install.sh"
start=$(date +%s)
# The lines stay as written; a constraint keeps CI on the CPU torch the project tests with
# (an unpinned `pip install torch` here resolves to the 5.5 GB CUDA build).
echo "torch==${TORCH_VERSION:-2.13.0}" > "$work/constraints.txt"
(cd "$work" && PIP_CONSTRAINT="$work/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1 bash -euo pipefail install.sh >"$work/install.log" 2>&1) \
  || { tail -40 "$work/install.log"; exit 1; }
cd "$work/.." # outside the copied tree: import the installed package
"$work/.venv/bin/python" -W error::RuntimeWarning -c '
import liftplace
info = liftplace.backend_info()
assert info["cpu_ext"], f"the by-hand install did not give the CPU kernels: {info}"
print("install-check: backend_info", {k: info[k] for k in ("version", "cpu_ext", "built_with_torch")})'
"$work/.venv/bin/liftplace" --help >/dev/null
echo "install-check: README's by-hand install works from a fresh venv ($(( $(date +%s) - start ))s)"
