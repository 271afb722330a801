"""Loading the compiled extension and attaching fake kernels and autograd to its ops.

The schemas live in ``csrc/ops.cpp``; CPU and CUDA kernels register under their
dispatch keys. This module makes the ops usable under ``torch.compile`` (fake kernels)
and differentiable (``register_autograd`` over the ``_bwd`` op).
"""

from __future__ import annotations

import os
import warnings

import torch

from . import _reference as ref

_BACKENDS = ("auto", "ext", "torch")

try:
    from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)

    _EXT_ERROR: str | None = None
except ImportError as exc:  # no compiler at install time, or an ABI mismatch
    _C = None
    _EXT_ERROR = str(exc)

try:
    from . import _build_info
except ImportError:
    _build_info = None

HAS_EXT = _C is not None
OPS = ("lift_place_fwd", "lift_place_bwd", "bucket_stats")


def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return HAS_EXT and key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"liftplace::{op}", key)


# (op, device type) pairs with a compiled kernel; fixed once the library is loaded.
EXT_KERNELS = frozenset((op, d) for op in OPS for d in ("cpu", "cuda") if _has_kernel(op, d))
# Devices where every op has a kernel.
EXT_DEVICES = frozenset(d for d in ("cpu", "cuda") if all((op, d) in EXT_KERNELS for op in OPS))


def _backend_from_env() -> str:
    name = os.environ.get("LIFTPLACE_BACKEND", "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"LIFTPLACE_BACKEND must be one of {_BACKENDS}, got {name!r}")
    if name == "ext" and not HAS_EXT:
        raise ImportError(_missing_ext_message())
    return name


def _missing_ext_message() -> str:
    return (
        "LIFTPLACE_BACKEND=ext but the liftplace C++ extension is not importable"
        f" ({_EXT_ERROR}). Build it with `pip install --no-build-isolation .` in the"
        " source tree (needs a C++17 compiler and torch installed first), or unset"
        " LIFTPLACE_BACKEND to use the pure-torch path."
    )


_state = {"backend": _backend_from_env()}


def get_backend() -> str:
    return _state["backend"]


def set_backend(name: str) -> None:
    """Choose ``"auto"`` (extension where it has a kernel), ``"ext"`` or ``"torch"``."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "ext" and not HAS_EXT:
        raise ImportError(_missing_ext_message())
    _state["backend"] = name


def use_ext(device: torch.device, op: str = "lift_place_fwd") -> bool:
    """Whether ``op`` runs on the extension for tensors on ``device`` (else the twin)."""
    backend = _state["backend"]
    if backend == "torch":
        return False
    if (op, device.type) in EXT_KERNELS:
        return True
    if backend == "ext":
        raise ValueError(
            f"LIFTPLACE_BACKEND=ext but the extension has no {op} kernel for {device.type} tensors"
            f" (compiled for: {sorted(EXT_DEVICES) or 'nothing'}). Move the tensors to one of"
            " those devices, rebuild with that device's kernels, or use backend 'auto'."
        )
    return False


if HAS_EXT:

    @torch.library.register_fake("liftplace::lift_place_fwd")
    def _fwd_fake(x, y, group_size, grouping, norm, eps, width):
        torch._check(x.dim() == 2 and x.shape == y.shape, lambda: "x and y must be [R, N] and match")
        R, N = x.shape
        G = 1 if grouping == "global" else N // group_size
        acc = ref.acc_dtype(x.dtype)
        slope = x.new_empty(R, G, dtype=acc)
        rows = x.new_empty(R, ref.ROW_STATS, dtype=acc)
        aux = x.new_empty(R, G, ref.AUX, dtype=acc)
        gid = x.new_empty((R, N) if grouping == "error" else (0,), dtype=torch.int32)
        return slope, torch.empty_like(slope), rows, aux, gid

    @torch.library.register_fake("liftplace::lift_place_bwd")
    def _bwd_fake(grad_rows, grad_slope, grad_intercept, x, y, slope, intercept, aux, group_id,
                  group_size, grouping, norm, width, need_grad_y):
        return torch.empty_like(x), (torch.empty_like(y) if need_grad_y else y.new_empty(0))

    @torch.library.register_fake("liftplace::bucket_stats")
    def _bucket_fake(values, timesteps, num_buckets, t_max):
        acc = ref.acc_dtype(values.dtype)
        sums = values.new_empty(num_buckets, values.shape[1], dtype=acc)
        counts = values.new_empty(num_buckets, dtype=torch.long)
        return sums, counts, values.new_empty(values.shape[0], dtype=torch.long)

    def _fwd_setup_context(ctx, inputs, output):
        x, y, group_size, grouping, norm, eps, width = inputs
        slope, intercept, rows, aux, gid = output
        ctx.save_for_backward(x, y, slope, intercept, aux, gid)
        ctx.mark_non_differentiable(aux, gid)
        # Unused outputs (aux, group_id, often slope) then cost no zero-filled gradient.
        ctx.set_materialize_grads(False)
        ctx.args = (group_size, grouping, norm, width)

    def _fwd_backward(ctx, grad_slope, grad_intercept, grad_rows, _grad_aux, _grad_gid):
        x, y, slope, intercept, aux, gid = ctx.saved_tensors
        group_size, grouping, norm, width = ctx.args
        if grad_rows is None:
            grad_rows = slope.new_zeros(x.shape[0], ref.ROW_STATS)
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_y = torch.ops.liftplace.lift_place_bwd(
            grad_rows.contiguous(),
            None if grad_slope is None else grad_slope.contiguous(),
            None if grad_intercept is None else grad_intercept.contiguous(),
            x, y, slope, intercept, aux, gid, group_size, grouping, norm, width, need_y,
        )
        return (grad_x if need_x else None), (grad_y if need_y else None), None, None, None, None, None

    torch.library.register_autograd(
        "liftplace::lift_place_fwd", _fwd_backward, setup_context=_fwd_setup_context
    )


def backend_info() -> dict:
    """What was compiled and what is in use: ``{"cpu_ext", "cuda_ext", "cuda_version", ...}``."""
    info = {
        "version": _version(),
        "backend": _state["backend"],
        "cpu_ext": "cpu" in EXT_DEVICES,
        "cuda_ext": "cuda" in EXT_DEVICES,
        "cuda_version": getattr(_build_info, "CUDA_VERSION", None) if HAS_EXT else None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "built_with_torch": getattr(_build_info, "TORCH_VERSION", None) if HAS_EXT else None,
        "ext_error": _EXT_ERROR,
    }
    built, running = info["cuda_version"], torch.version.cuda
    if built and running and built.split(".")[0] != running.split(".")[0]:
        warnings.warn(
            f"liftplace's CUDA kernels were built with CUDA {built} but torch uses CUDA {running};"
            " reinstall with `pip install --no-build-isolation --force-reinstall .`",
            stacklevel=2,
        )
    return info


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("liftplace")
    except Exception:
        return "0+unknown"
