"""scikit-build-core metadata provider: tie a built liftplace to the torch it is built against.

A torch C++ extension only loads beside the torch (major.minor) whose headers and
libraries it was compiled with, so a wheel says which one it needs:

* ``version``: ``liftplace/_version.py``'s version plus a local tag naming that torch
  and, for a build with CUDA kernels, the CUDA version: ``0.1.0+pt213cpu``,
  ``0.1.0+pt214cu130`` (torch-scatter's convention: pip understands local versions, and
  one wheel index can hold a build per torch/CUDA side by side). ``LIFTPLACE_PLAIN_VERSION=1``
  leaves the tag off (the sdist, which builds against whatever torch is installed).
* ``dependencies``: ``numpy`` and ``torch==<major>.<minor>.*``.

The torch is the one importable by the build's Python; with build isolation on it is
missing (liftplace must build against the user's torch), and the build stops here with
the command that works. Without isolation the CMake it will use must satisfy
``tool.scikit-build.cmake.version``; an older one (a distribution's 3.25, say) stops the
build here too, naming both versions and ``pip install cmake``, before scikit-build-core's
own terser "Could not find CMake".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

NO_TORCH = (
    "liftplace's extension must be compiled against the torch it will run with, and none is"
    " importable by the Python that builds it. With pip's default build isolation the build"
    " cannot see your torch: install torch and the build tools first, then build without"
    " isolation:\n    pip install torch \"scikit-build-core>=0.10\" cmake ninja\n"
    "    pip install --no-build-isolation .\n"
    "or install a prebuilt wheel for your torch (README.md, 'Install')."
)


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(f"{NO_TORCH}\n(import torch: {exc})") from None
    return torch


def _nvcc_found() -> bool:
    # The places CMake's CUDA language support looks first (cmake/cuda.cmake uses them too).
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return any(c and os.path.exists(c) for c in candidates)


def build_tag(torch) -> str:
    """``pt<major><minor>`` plus ``cu<version>`` when CUDA kernels will be built, else ``cpu``."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    mode = os.environ.get("LIFTPLACE_CUDA", "AUTO").upper()
    cuda = torch.version.cuda if mode != "OFF" and torch.version.cuda and _nvcc_found() else None
    return f"pt{major}{minor}" + (f"cu{cuda.replace('.', '')}" if cuda else "cpu")


def _cmake_candidates():
    try:  # the `cmake` package from PyPI, which scikit-build-core prefers
        import cmake

        yield os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        pass
    for name in ("cmake3", "cmake"):
        if shutil.which(name):
            yield shutil.which(name)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_cmake() -> None:
    """Stop with the fix when no CMake this build accepts is installed (no-isolation builds)."""
    spec = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["scikit-build"]["cmake"]["version"]
    needed = spec.lstrip(">= ")
    found = []
    for path in _cmake_candidates():
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        version = re.search(r"version (\S+)", out).group(1)
        if _version_tuple(version) >= _version_tuple(needed):
            return
        found.append(f"{version} ({path})")
    raise RuntimeError(
        f"liftplace needs CMake {spec} (torch 2.14's C++20 headers need 3.25.2+ for CUDA; docs/CUDA.md) but"
        f" found {', '.join(found) or 'none'}. Install a newer one into this environment:\n    pip install cmake")


def _base_version() -> str:
    text = Path("liftplace/_version.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def dynamic_metadata(field: str, settings=None):
    if field == "version":
        if os.environ.get("LIFTPLACE_PLAIN_VERSION", "") == "1":
            return _base_version()
        torch = _torch()
        check_cmake()
        return f"{_base_version()}+{build_tag(torch)}"
    if field == "dependencies":
        major, minor = _torch().__version__.split("+")[0].split(".")[:2]
        return ["numpy", f"torch=={major}.{minor}.*"]
    raise RuntimeError(f"torch_pin provides 'version' and 'dependencies', not {field!r}")
