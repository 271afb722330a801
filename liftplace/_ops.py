"""The op layer: the contract of every liftplace op and the one place that picks kernel or twin.

The schemas live in ``csrc/ops.cpp`` and the output layout in ``csrc/contract.h``; CPU and
CUDA kernels register under their dispatch keys. This module

* holds the Python side of the layout (row and aux statistic columns, accumulation dtype),
  which the pure-torch twin (``_reference.py``) imports;
* loads the extension, warning once (with the reason and the fix) when it cannot;
* attaches fake kernels (``torch.compile``) and autograd (``register_autograd`` over the
  ``_bwd`` op) to the ops;
* exposes one thin function per op (:func:`lift_place_fwd`, :func:`lift_place_bwd`,
  :func:`bucket_stats`) that runs the kernel where one is compiled for the tensors'
  device and the twin otherwise. Everything else in liftplace calls these.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
from torch import Tensor

from ._version import __version__

# ---------------------------------------------------------------------------------------
# The layout of the ops' outputs (csrc/contract.h holds the same numbers for C++).

# Columns of the per-row statistics ``rows`` [R, ROW_STATS]; every one is differentiable.
COARSE = 0          # sum_g n_g * coarse_g
FINE = 1            # sum_i (a*x_i + b - y_i)^2 with a, b held constant
SQERR = 2           # sum_i (x_i - y_i)^2
ABS_SLOPE_DEV = 3   # sum_g |a_g - 1|
ABS_INTERCEPT = 4   # sum_g |b_g|
SUM_SLOPE = 5       # sum_g a_g
SUM_INTERCEPT = 6   # sum_g b_g
ROW_STATS = 7
# Columns of ``aux`` [R, G, AUX]: what the backward needs besides slope and intercept.
MEAN_X, MEAN_Y, DENOM = 0, 1, 2  # DENOM = vx + eps
AUX = 3

GROUPINGS = ("global", "error", "patch")
NORMS = ("l1", "l2")
OPS = ("lift_place_fwd", "lift_place_bwd", "bucket_stats")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / output dtype of every op: float64 stays float64, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_groups(n: int, group_size: int, grouping: str) -> int:
    """Groups per row (METHOD.md §3); for "error" the last group takes the ``n % P`` leftovers."""
    return 1 if grouping == "global" else n // group_size


# ---------------------------------------------------------------------------------------
# Loading the extension.

from . import _reference as ref  # noqa: E402  (the twin imports the layout above)

_BACKENDS = ("auto", "ext", "torch")
_FIX = ("build it with `make build` in the source tree, or `pip install --no-build-isolation .`"
        " (needs a C++17 compiler and torch installed first)")


def _minor(version: str | None) -> str | None:
    return ".".join(version.split("+")[0].split(".")[:2]) if version else None


try:  # plain Python written at build time: loads even when _C cannot
    from . import _build_info
except ImportError:
    _build_info = None
BUILT_WITH_TORCH = getattr(_build_info, "TORCH_VERSION", None)
_TORCH_MISMATCH = (BUILT_WITH_TORCH is not None and _minor(BUILT_WITH_TORCH) != _minor(torch.__version__))


def _matching_install() -> str:
    cuda = (torch.version.cuda or "").replace(".", "")
    tag = f"pt{_minor(torch.__version__).replace('.', '')}{'cu' + cuda if cuda else 'cpu'}"
    return (f"install the liftplace wheel built for it (`pip install 'liftplace=={__version__}+{tag}'`, see"
            " README.md 'Install') or rebuild from source (`pip install --no-build-isolation --force-reinstall .`)")


def _load_extension():
    """``(module, None)`` or ``(None, reason)``; never raises."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        where = os.path.dirname(os.path.abspath(__file__))
        return None, f"no compiled liftplace._C in {where}"
    if _TORCH_MISMATCH:
        # Loading it would fail on undefined symbols at best; say why instead.
        return None, (f"liftplace._C was built against torch {BUILT_WITH_TORCH} but torch {torch.__version__} is"
                      f" installed; {_matching_install()}")
    try:
        from . import _C
    except ImportError as exc:  # a missing library, a torch of the same minor built differently
        return None, f"liftplace._C failed to load: {exc}"
    return _C, None


_C, _EXT_ERROR = _load_extension()
HAS_EXT = _C is not None
# the fused loss ops of loss.py's eager fast path (csrc/kd.cpp)
HAS_KD = HAS_EXT and hasattr(torch.ops.liftplace, "lift_place_kd")


def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return HAS_EXT and key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"liftplace::{op}", key)


# (op, device type) pairs with a compiled kernel; fixed once the library is loaded.
EXT_KERNELS = frozenset((op, d) for op in OPS for d in ("cpu", "cuda") if _has_kernel(op, d))
# Devices where every op has a kernel.
EXT_DEVICES = frozenset(d for d in ("cpu", "cuda") if all((op, d) in EXT_KERNELS for op in OPS))


def _missing_ext_message() -> str:
    return (f"LIFTPLACE_BACKEND=ext but the liftplace C++ extension is not importable ({_EXT_ERROR});"
            f" {_FIX}, or unset LIFTPLACE_BACKEND to use the pure-torch path.")


def _check_backend(name, source: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"{source} must be one of {_BACKENDS}, got {name!r}")
    if name == "ext" and not HAS_EXT:
        raise ImportError(_missing_ext_message())
    return name


_state = {"backend": _check_backend(os.environ.get("LIFTPLACE_BACKEND", "auto").strip().lower() or "auto",
                                    "LIFTPLACE_BACKEND")}
if _TORCH_MISMATCH:  # always worth saying: the install is broken, whichever backend was chosen
    warnings.warn(f"liftplace is using its slower pure-torch path: {_EXT_ERROR}.", RuntimeWarning, stacklevel=2)
elif not HAS_EXT and _state["backend"] == "auto":
    warnings.warn(f"liftplace is using its slower pure-torch path: {_EXT_ERROR}. To use the kernels, {_FIX}."
                  " Set LIFTPLACE_BACKEND=torch to choose the pure-torch path without this warning.",
                  RuntimeWarning, stacklevel=2)


def get_backend() -> str:
    return _state["backend"]


def set_backend(name: str) -> None:
    """Choose ``"auto"`` (extension where it has a kernel), ``"ext"`` or ``"torch"``."""
    _state["backend"] = _check_backend(name, "backend")


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


# ---------------------------------------------------------------------------------------
# The ops, kernel or twin.

def lift_place_fwd(x: Tensor, y: Tensor, group_size: int, grouping: str, norm: str, eps: float,
                   width: int = 0):
    """``(slope [R, G], intercept [R, G], rows [R, ROW_STATS], aux [R, G, AUX], group_id)``.

    ``x, y``: ``[R, N]`` contiguous rows of one dtype. ``group_size`` is ``N`` for
    ``"global"``; ``width`` is ``W`` for ``"patch"``, else 0. ``group_id`` is ``[R, N]``
    int32 for ``"error"``, else empty. Slope, intercept and rows are differentiable in
    ``x`` and ``y`` on both paths.
    """
    if use_ext(x.device, "lift_place_fwd"):
        return torch.ops.liftplace.lift_place_fwd(x, y, group_size, grouping, norm, eps, width)
    return _TwinFwd.apply(x, y, group_size, grouping, norm, eps, width)


def lift_place_bwd(grad_rows: Tensor, grad_slope: Tensor | None, grad_intercept: Tensor | None, x: Tensor,
                   y: Tensor, slope: Tensor, intercept: Tensor, aux: Tensor, group_id: Tensor, group_size: int,
                   grouping: str, norm: str, width: int, need_grad_y: bool):
    """``(grad_x, grad_y)``: the gradients of (slope, intercept, rows) pulled back to x and y
    through a saved forward (METHOD.md §6). ``grad_y`` is empty unless ``need_grad_y``."""
    args = (grad_rows, grad_slope, grad_intercept, x, y, slope, intercept, aux, group_id, group_size, grouping,
            norm, width, need_grad_y)
    if use_ext(x.device, "lift_place_bwd"):
        return torch.ops.liftplace.lift_place_bwd(*args)
    return ref.lift_place_bwd(*args)


def bucket_stats(values: Tensor, timesteps: Tensor, num_buckets: int, t_max: float):
    """``(sums [K, S], counts [K], bucket [B])`` of per-sample statistics ``values [B, S]``
    per timestep bucket ``k = floor(t·K / t_max)`` clamped to ``[0, K)`` (METHOD.md §8)."""
    if use_ext(values.device, "bucket_stats"):
        return torch.ops.liftplace.bucket_stats(values.contiguous(), timesteps.contiguous(), num_buckets, t_max)
    return ref.bucket_stats(values, timesteps, num_buckets, t_max)


# ---------------------------------------------------------------------------------------
# Fake kernels and autograd for the compiled ops.

def _check_same_device(what: str, *tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    torch._check(len(devices) == 1, lambda: f"liftplace: {what} must all be on one device, got {sorted(map(str, devices))}")


def _check_fwd_args(x, y, group_size, grouping, norm, eps) -> None:
    torch._check(x.dim() == 2 and x.shape == y.shape, lambda: f"liftplace: x and y must be [R, N] and match, got"
                 f" {list(x.shape)} and {list(y.shape)}")
    torch._check(x.dtype == y.dtype, lambda: "liftplace: x and y differ in dtype")
    _check_same_device("x and y", x, y)
    torch._check(grouping in GROUPINGS, lambda: f"liftplace: grouping must be one of {GROUPINGS}, got {grouping!r}")
    torch._check(norm in NORMS, lambda: f"liftplace: norm must be one of {NORMS}, got {norm!r}")
    torch._check(eps > 0, lambda: f"liftplace: eps must be > 0, got {eps}")
    if grouping != "global":
        n = x.shape[1]
        torch._check(2 <= group_size <= n, lambda: f"liftplace: group_size must be in [2, {n}], got {group_size}")


if HAS_EXT:

    @torch.library.register_fake("liftplace::lift_place_fwd")
    def _fwd_fake(x, y, group_size, grouping, norm, eps, width):
        _check_fwd_args(x, y, group_size, grouping, norm, eps)
        R, N = x.shape
        G = num_groups(N, group_size, grouping)
        acc = acc_dtype(x.dtype)
        slope = x.new_empty(R, G, dtype=acc)
        rows = x.new_empty(R, ROW_STATS, dtype=acc)
        aux = x.new_empty(R, G, AUX, dtype=acc)
        gid = x.new_empty((R, N) if grouping == "error" else (0,), dtype=torch.int32)
        return slope, torch.empty_like(slope), rows, aux, gid

    @torch.library.register_fake("liftplace::lift_place_bwd")
    def _bwd_fake(grad_rows, grad_slope, grad_intercept, x, y, slope, intercept, aux, group_id,
                  group_size, grouping, norm, width, need_grad_y):
        _check_fwd_args(x, y, group_size, grouping, norm, 1.0)
        _check_same_device("the lift_place_bwd tensors", grad_rows, grad_slope, grad_intercept, x, y, slope,
                           intercept, aux, group_id)
        R, N = x.shape
        G = num_groups(N, group_size, grouping)
        acc = acc_dtype(x.dtype)
        for name, t, shape in (("grad_rows", grad_rows, (R, ROW_STATS)), ("grad_slope", grad_slope, (R, G)),
                               ("grad_intercept", grad_intercept, (R, G)), ("slope", slope, (R, G)),
                               ("intercept", intercept, (R, G)), ("aux", aux, (R, G, AUX))):
            if t is not None:
                torch._check(tuple(t.shape) == shape and t.dtype == acc,
                             lambda: f"liftplace: {name} must be {list(shape)} {acc}, got {list(t.shape)} {t.dtype}")
        gid_shape = (R, N) if grouping == "error" else (0,)
        torch._check(tuple(group_id.shape) == gid_shape and group_id.dtype == torch.int32,
                     lambda: f"liftplace: group_id must be {list(gid_shape)} int32, got {list(group_id.shape)}")
        return torch.empty_like(x), (torch.empty_like(y) if need_grad_y else y.new_empty(0))

    @torch.library.register_fake("liftplace::bucket_stats")
    def _bucket_fake(values, timesteps, num_buckets, t_max):
        torch._check(values.dim() == 2, lambda: f"liftplace: values must be [B, S], got {list(values.shape)}")
        torch._check(timesteps.dim() == 1 and timesteps.shape[0] == values.shape[0],
                     lambda: f"liftplace: timesteps must be [{values.shape[0]}], got {list(timesteps.shape)}")
        _check_same_device("values and timesteps", values, timesteps)
        torch._check(num_buckets >= 1, lambda: f"liftplace: num_buckets must be >= 1, got {num_buckets}")
        torch._check(t_max > 0, lambda: f"liftplace: t_max must be > 0, got {t_max}")
        acc = acc_dtype(values.dtype)
        sums = values.new_empty(num_buckets, values.shape[1], dtype=acc)
        counts = values.new_empty(num_buckets, dtype=torch.long)
        return sums, counts, values.new_empty(values.shape[0], dtype=torch.long)

    if HAS_KD:

        @torch.library.register_fake("liftplace::lift_place_kd")
        def _kd_fake(x, y, group_size, grouping, norm, eps, width, scale, num_groups, adaptive, weight_value, parts,
                     anneal):
            torch._check(parts in ("both", "coarse", "fine"), lambda: f"liftplace: parts must be 'both', 'coarse' "
                         f"or 'fine', got {parts!r}")
            slope, intercept, rows, aux, gid = _fwd_fake(x, y, group_size, grouping, norm, eps, width)
            scalar = rows.new_empty(())
            return (scalar, rows.new_empty(ROW_STATS), torch.empty_like(scalar), torch.empty_like(scalar),
                    rows.new_empty(ROW_STATS), slope, intercept, aux, gid)

        @torch.library.register_fake("liftplace::lift_place_kd_bwd")
        def _kd_bwd_fake(grad, coef, x, y, slope, intercept, aux, group_id, group_size, grouping, norm, width,
                         need_grad_y):
            return _bwd_fake(coef.new_empty(x.shape[0], ROW_STATS), None, None, x, y, slope, intercept, aux,
                             group_id, group_size, grouping, norm, width, need_grad_y)

        @torch.library.impl("liftplace::lift_place_kd_bwd_graph", "CompositeImplicitAutograd")
        def _kd_bwd_graph(grad, coef, x, y, slope, intercept, aux, group_id, group_size, grouping, norm, eps, width,
                          need_grad_x, need_grad_y):
            # lift_place_kd's backward under create_graph=True (csrc/kd.cpp): differentiable ops only.
            grad_rows = (grad * coef).expand(x.shape[0], ROW_STATS)
            view = _SavedView((x, y, slope, intercept, aux, group_id), (group_size, grouping, norm, eps, width),
                              (need_grad_x, need_grad_y))
            grad_x, grad_y = _backward(view, None, None, grad_rows, None)[:2]
            return (grad_x if grad_x is not None else x.new_empty(0)), (grad_y if grad_y is not None else
                                                                        y.new_empty(0))

    def _fwd_setup_context(ctx, inputs, output):
        _save_for_backward(ctx, inputs, output)

    def _fwd_backward(ctx, grad_slope, grad_intercept, grad_rows, _grad_aux, _grad_gid):
        return _backward(ctx, grad_slope, grad_intercept, grad_rows, torch.ops.liftplace.lift_place_bwd)

    torch.library.register_autograd(
        "liftplace::lift_place_fwd", _fwd_backward, setup_context=_fwd_setup_context
    )


# ---------------------------------------------------------------------------------------
# Autograd shared by kernel and twin: the backward is the closed form of METHOD.md §6
# (the _bwd op, or its twin), never autograd through the forward. Both backends therefore
# have the same first derivative, and the same second one: under create_graph=True the
# closed form is evaluated by the twin with the fit recomputed differentiably over the
# saved grouping, so double backward differentiates exactly the gradient that was used.

def _save_for_backward(ctx, inputs, output) -> None:
    x, y, group_size, grouping, norm, eps, width = inputs
    slope, intercept, rows, aux, gid = output
    ctx.mark_non_differentiable(aux, gid)
    # Unused outputs (aux, group_id, often slope) then cost no zero-filled gradient.
    ctx.set_materialize_grads(False)
    ctx.args = (group_size, grouping, norm, eps, width)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:  # nothing to keep for a frozen pair
        ctx.save_for_backward(x, y, slope, intercept, aux, gid)


def _backward(ctx, grad_slope, grad_intercept, grad_rows, bwd_op):
    x, y, slope, intercept, aux, gid = ctx.saved_tensors
    group_size, grouping, norm, eps, width = ctx.args
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_rows is None:
        grad_rows = slope.new_zeros(x.shape[0], ROW_STATS)
    if torch.is_grad_enabled():  # create_graph=True
        with torch.enable_grad():
            G = slope.shape[1]
            fixed = gid.long() if grouping == "error" else ref.group_ids(x, y, group_size, grouping, width)
            acc = acc_dtype(x.dtype)
            a, b, mx, my, d, _ = ref.fit(x.to(acc), y.to(acc), fixed, G, eps)
            slope, intercept, aux = a, b, torch.stack([mx, my, d], dim=2)
        bwd_op = ref.lift_place_bwd
    else:
        grad_rows = grad_rows.contiguous()
        grad_slope = None if grad_slope is None else grad_slope.contiguous()
        grad_intercept = None if grad_intercept is None else grad_intercept.contiguous()
    grad_x, grad_y = bwd_op(grad_rows, grad_slope, grad_intercept, x, y, slope, intercept, aux, gid,
                            group_size, grouping, norm, width, need_y)
    return (grad_x if need_x else None), (grad_y if need_y else None), None, None, None, None, None


class _SavedView:
    """What :func:`_backward` reads from an autograd context, for callers without one."""

    def __init__(self, saved, args, needs):
        self.saved_tensors, self.args, self.needs_input_grad = saved, args, needs


class _TwinFwd(torch.autograd.Function):
    """The twin forward with the same autograd contract as the registered op."""

    @staticmethod
    def forward(x, y, group_size, grouping, norm, eps, width):
        return ref.lift_place_fwd(x, y, group_size, grouping, norm, eps, width)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_for_backward(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_slope, grad_intercept, grad_rows, _grad_aux, _grad_gid):
        return _backward(ctx, grad_slope, grad_intercept, grad_rows, ref.lift_place_bwd)


def backend_info() -> dict:
    """What was compiled and what is in use: ``{"cpu_ext", "cuda_ext", "cuda_version", ...}``."""
    info = {
        "version": __version__,
        "backend": _state["backend"],
        "cpu_ext": "cpu" in EXT_DEVICES,
        "cuda_ext": "cuda" in EXT_DEVICES,
        "cuda_version": getattr(_build_info, "CUDA_VERSION", None) if HAS_EXT else None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "built_with_torch": BUILT_WITH_TORCH,
        "torch_mismatch": _TORCH_MISMATCH,
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
