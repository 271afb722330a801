"""The public LIFT/PLACE loss: options, validation, backend choice and the scalar reduction.

``lift_place_loss`` validates its options once into a frozen :class:`LiftPlaceOptions`,
checks the tensors, runs the fused forward through the op layer (``_ops``) and reduces the
per-row statistics in two steps: the fine-term weight (:func:`_fine_weight`) and the
combination of the coarse and fine terms (:func:`_combine`); without timestep buckets both run
inside one autograd node (:class:`_LinearInRows`). In eager mode on the extension's kernels,
one process, without buckets or finiteness checks, the whole call is one op with a C++
autograd node instead (:func:`_fused`, csrc/kd.cpp): the same kernels and reduction ops, so
the same bits, at a fraction of the per-call Python.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from . import _ops
from ._ops import (ABS_INTERCEPT, ABS_SLOPE_DEV, COARSE, FINE, GROUPINGS, NORMS, ROW_STATS, SQERR,
                   SUM_INTERCEPT, SUM_SLOPE, acc_dtype)
from .timesteps import check_bucket_options, check_timesteps

REDUCTIONS = ("sum", "mean")
WEIGHTS = ("adaptive", "adaptive-timestep", "constant", "linear", "cosine")
PARTS = ("both", "coarse", "fine")
COARSE_WEIGHTS = ("constant", "anneal")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEFAULT_GROUP_SIZE = 16


def _choice(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass(frozen=True)
class LiftPlaceOptions:
    """The loss's options, validated once (shape-dependent checks happen per call).

    Fields are the keyword arguments of :func:`lift_place_loss` / :class:`LiftPlaceLoss`
    of the same names. ``num_buckets``/``t_max`` enable timestep bucketing (required by
    ``weight="adaptive-timestep"``); ``bucket_ema=None`` disables the per-bucket EMA.
    """

    group_size: int = _DEFAULT_GROUP_SIZE
    grouping: str = "error"
    norm: str = "l1"
    reduction: str = "sum"
    weight: str = "adaptive"
    parts: str = "both"
    coarse_weight: str = "constant"
    eps: float = 1e-7
    check_finite: bool = False
    return_stats: bool = False
    num_buckets: int | None = None
    t_max: float | None = None
    bucket_ema: float | None = 0.9
    channel_dim: int = 1

    def __post_init__(self):
        _choice("grouping", self.grouping, GROUPINGS)
        _choice("norm", self.norm, NORMS)
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("weight", self.weight, WEIGHTS)
        _choice("parts", self.parts, PARTS)
        _choice("coarse_weight", self.coarse_weight, COARSE_WEIGHTS)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise TypeError(f"group_size must be an int, got {type(self.group_size).__name__}")
        if not _is_real(self.eps) or not math.isfinite(self.eps) or not self.eps > 0:
            raise ValueError(f"eps must be a positive finite float, got {self.eps!r}")
        for name in ("check_finite", "return_stats"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.num_buckets is not None or self.t_max is not None:
            check_bucket_options(self.num_buckets, self.t_max)
        elif self.weight == "adaptive-timestep":
            raise ValueError('weight="adaptive-timestep" needs num_buckets= and t_max= (and timesteps= per call)')
        if self.bucket_ema is not None and (not _is_real(self.bucket_ema) or not 0.0 <= self.bucket_ema < 1.0):
            raise ValueError(f"bucket_ema must be in [0, 1) or None (no smoothing), got {self.bucket_ema!r}")
        if isinstance(self.channel_dim, bool) or not isinstance(self.channel_dim, int):
            raise TypeError(f"channel_dim must be an int (1 for [B, C, *S], -1 for tokens [B, N, D]),"
                            f" got {self.channel_dim!r}")

    @property
    def buckets(self) -> bool:
        return self.num_buckets is not None


def _check_number(name: str, value) -> None:
    if value is None:
        return
    if not _is_real(value):
        raise TypeError(f"{name} must be an int or float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_progress(weight: str, step, total_steps) -> None:
    _check_number("step", step)
    _check_number("total_steps", total_steps)
    if weight in ("linear", "cosine"):
        if step is None or total_steps is None:
            raise ValueError(f"weight={weight!r} needs step= and total_steps= (the training progress)")
        if total_steps <= 0 or step < 0:
            raise ValueError(f"need step >= 0 and total_steps > 0, got step={step}, total_steps={total_steps}")


@dataclass(frozen=True)
class _Layout:
    R: int  # rows = B * C
    N: int  # elements per row
    G: int  # groups per row
    B: int
    C: int
    width: int  # W for patch grouping, else 0


def _check_tensors(student, teacher) -> None:
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype};"
                f" convert it with {name}.float()"
            )
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"teacher dtype {teacher.dtype} does not match student dtype {student.dtype};"
            " cast one of them, e.g. teacher.to(student.dtype)"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student is on {student.device} but teacher is on {teacher.device};"
            " move both to the same device"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student must have the same shape as teacher {list(teacher.shape)},"
            f" got {list(student.shape)}"
        )
    if student.dim() < 3:
        raise ValueError(
            f"student and teacher must be [B, C, *S] with prod(S) >= 2 (at least 3 dims),"
            f" got shape {list(student.shape)}; add a channel dim, e.g. x.unsqueeze(1)"
        )
    if student.numel() == 0:
        raise ValueError(f"student and teacher are empty (shape {list(student.shape)})")


def _channels_first(student: Tensor, teacher: Tensor, opts: LiftPlaceOptions):
    """Move the axis ``channel_dim`` to position 1 (a view; ``_fit`` makes the one copy).

    Tokens ``[B, N, D]`` with ``channel_dim=-1`` become ``[B, D, N]``: each PLACE row is one
    feature channel ``d`` over all ``N`` tokens of a sample (METHOD.md, "Token layouts").
    The kernels read contiguous rows, and a channel of a token tensor is strided (stride
    ``D``), so the rows are gathered by one copy per input: exactly the copy the caller
    would make with ``x.transpose(1, 2).contiguous()``.
    """
    cd = opts.channel_dim
    ndim = student.dim()
    if not -ndim <= cd < ndim or cd % ndim == 0:
        raise ValueError(f"channel_dim={cd} must name a non-batch axis of the {ndim}-d inputs"
                         f" {list(student.shape)} (1..{ndim - 1} or -{ndim - 1}..-1); 1 is [B, C, *S],"
                         " -1 is tokens [B, N, D]")
    cd %= ndim
    if cd == 1:
        return student, teacher
    if opts.grouping == "patch" and ndim == 3:
        raise ValueError(f"grouping='patch' tiles a 2-D grid [B, C, H, W]; tokens {list(student.shape)} with"
                         f" channel_dim={opts.channel_dim} have none. Use grouping='error' or 'global' on"
                         " tokens, or un-patchify them to [B, C, H, W] first")
    return student.movedim(cd, 1), teacher.movedim(cd, 1)


def _layout(shape: torch.Size, opts: LiftPlaceOptions) -> _Layout:
    B, C = shape[0], shape[1]
    N = math.prod(shape[2:])
    if N < 2:
        raise ValueError(f"each row needs prod(S) >= 2 elements; shape {list(shape)} gives {N}")
    group_size, grouping, width = opts.group_size, opts.grouping, 0
    # "global" ignores group_size; any value but the default must still be a valid one.
    if (grouping != "global" or group_size != _DEFAULT_GROUP_SIZE) and not 2 <= group_size <= N:
        raise ValueError(
            f"group_size must be between 2 and the row length N={N} (prod of dims after"
            f" [B, C] in {list(shape)}), got {group_size}"
        )
    if grouping == "patch":
        if len(shape) != 4:
            raise ValueError(
                f"grouping='patch' needs 2-D spatial dims [B, C, H, W], got shape {list(shape)};"
                " use grouping='error' or 'global' for other layouts"
            )
        p = math.isqrt(group_size)
        if p * p != group_size:
            raise ValueError(
                f"grouping='patch' needs group_size = p*p (a perfect square such as 4, 16, 64),"
                f" got {group_size}"
            )
        H, width = shape[2], shape[3]
        if H % p or width % p:
            raise ValueError(
                f"grouping='patch' with group_size={group_size} tiles {p}x{p}; H={H} and W={width}"
                f" must both be divisible by {p}"
            )
    return _Layout(R=B * C, N=N, G=_ops.num_groups(N, group_size, grouping), B=B, C=C, width=width)


def _check_finite(student: Tensor, teacher: Tensor) -> None:
    for name, t in (("student", student), ("teacher", teacher)):
        bad = int((~torch.isfinite(t)).sum())  # host sync, by request
        if bad:
            raise ValueError(f"{name} holds {bad} non-finite values (NaN or Inf) out of {t.numel()}")


def _check_no_overflow(rows: Tensor, student: Tensor, teacher: Tensor) -> None:
    """Finite inputs whose squares overflow the accumulation dtype (|x| near 1e19 in float32)."""
    if not bool(torch.isfinite(rows).all()):  # host sync, by request
        big = max(student.detach().abs().max().item(), teacher.detach().abs().max().item())
        raise OverflowError(
            f"student and teacher are finite but the loss overflows {acc_dtype(student.dtype)} (largest |value|"
            f" {big:.3g}; squares of values beyond ~1e19 do not fit in float32): rescale the outputs or pass"
            " float64 tensors")


def _fit(student: Tensor, teacher: Tensor, opts: LiftPlaceOptions, lay: _Layout):
    """The fused forward over ``[R, N]`` rows: ``(slope, intercept, rows)``, differentiable."""
    # [B, C, *S] -> [R, N]; copies only when the input is not already row-contiguous.
    x = student.reshape(lay.R, lay.N).contiguous()
    y = teacher.reshape(lay.R, lay.N).contiguous()
    P = opts.group_size if opts.grouping != "global" else lay.N
    slope, intercept, rows, _, _ = _ops.lift_place_fwd(x, y, P, opts.grouping, opts.norm, float(opts.eps), lay.width)
    return slope, intercept, rows


def lift_place_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    group_size: int = _DEFAULT_GROUP_SIZE,
    grouping: str = "error",
    norm: str = "l1",
    reduction: str = "sum",
    weight: str = "adaptive",
    parts: str = "both",
    coarse_weight: str = "constant",
    eps: float = 1e-7,
    step: int | None = None,
    total_steps: int | None = None,
    check_finite: bool = False,
    return_stats: bool = False,
    timesteps: Tensor | None = None,
    num_buckets: int | None = None,
    t_max: float | None = None,
    bucket_state: dict | None = None,
    bucket_ema: float | None = 0.9,
    channel_dim: int = 1,
):
    """LIFT/PLACE distillation loss between student and teacher outputs (METHOD.md §3–§5).

    Args:
        student, teacher: outputs ``[B, C, *S]`` of the same shape, dtype and device.
            Gradients flow to both when they require grad (the teacher usually does not),
            to any order (``create_graph=True`` works on every backend).
        group_size: elements per group ``P`` for ``"error"`` / ``"patch"`` grouping (an int
            >= 2; unused by ``"global"``).
        grouping: ``"error"`` (PLACE: groups of similar error rank), ``"global"`` (LIFT:
            one fit per row) or ``"patch"`` (``sqrt(P) x sqrt(P)`` spatial tiles).
        norm: coarse penalty on ``(a - 1, b)``: ``"l1"`` or ``"l2"``.
        reduction: ``"sum"`` (over C and S, mean over the batch) or ``"mean"``.
        weight: fine-term weight ``w``: ``"adaptive"`` (from the coefficients' distance
            to (1, 0)), ``"adaptive-timestep"`` (one adaptive ``w_k`` per timestep bucket,
            METHOD.md §8), ``"constant"`` (1), ``"linear"`` / ``"cosine"`` (over ``total_steps``).
            Under ``torch.distributed`` the statistics behind an adaptive weight are summed
            over ranks first, so every rank uses the same ``w``.
        parts: ``"both"`` (coarse + w·fine), ``"coarse"`` or ``"fine"``.
        coarse_weight: ``"constant"`` (the paper) or ``"anneal"``: ``(1 - w)·coarse + w·fine``,
            liftplace's own extension.
        eps: added to each group's mean variance of the student output.
        step, total_steps: training progress (finite numbers) for ``"linear"`` / ``"cosine"``.
        check_finite: raise a ``ValueError`` on NaN/Inf inputs and an ``OverflowError`` when
            finite inputs overflow the statistics (costs a host-device sync). Without it a
            non-finite input gives a non-finite loss.
        return_stats: also return a dict of detached statistics (no host sync); with
            timesteps, also ``bucket_*`` tensors ``[K]`` (NaN for empty buckets).
        timesteps, num_buckets, t_max: per-sample timesteps ``[B]`` and ``K`` buckets over
            ``[0, t_max)``; needed by ``weight="adaptive-timestep"``, optional otherwise
            (then only the per-bucket statistics are added).
        bucket_state, bucket_ema: a dict of tensors ``{"absdev": [K], "seen": [K] bool}``
            updated in place with an EMA of each bucket's mean ``|a-1| + |b|`` (what
            :class:`LiftPlaceLoss` keeps as buffers); ``None`` (either) uses the batch alone.
        channel_dim: the axis holding the channels: ``1`` (default, ``[B, C, *S]``) or, for
            transformer tokens ``[B, N, D]``, ``-1`` (or 2). The result equals the call on
            ``x.movedim(channel_dim, 1)`` in value and gradient: a PLACE row is one channel
            over every other non-batch position (for tokens, one feature over all tokens).
            Rows of a non-channel-first layout are strided, so they are gathered by one copy
            of each input. ``grouping="patch"`` on tokens is an error (they have no 2-D grid).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs); with ``return_stats``,
        ``(loss, stats)``.
    """
    _check_tensors(student, teacher)
    if weight == "adaptive-timestep" and timesteps is None:
        raise ValueError('weight="adaptive-timestep" needs timesteps= (one per sample), num_buckets= and t_max=')
    if timesteps is not None and num_buckets is None:
        raise ValueError("timesteps= needs num_buckets= and t_max= (the buckets to sort them into)")
    fields = (group_size, grouping, norm, reduction, weight, parts, coarse_weight, eps, check_finite, return_stats,
              num_buckets if timesteps is not None else None, t_max if timesteps is not None else None, bucket_ema,
              channel_dim)
    try:
        opts = _options(*fields)
    except TypeError:  # an unhashable value: validate it uncached, which names it
        opts = LiftPlaceOptions(*fields)
    return _loss(student, teacher, opts, step, total_steps, timesteps, bucket_state)


@functools.lru_cache(maxsize=64, typed=True)
def _options(*fields) -> LiftPlaceOptions:
    """Validated options, built once per distinct combination (a training loop repeats one).
    The fields are positional in :class:`LiftPlaceOptions` order; ``typed=True`` makes each
    value's type part of the key (``16`` and ``16.0`` or ``True`` and ``1`` are different
    entries), so a cached entry is exactly what validation saw."""
    return LiftPlaceOptions(*fields)


def _loss(student, teacher, opts: LiftPlaceOptions, step, total_steps, timesteps, bucket_state):
    _check_progress(opts.weight, step, total_steps)
    student, teacher = _channels_first(student, teacher, opts)
    lay = _layout(student.shape, opts)
    if timesteps is not None:
        check_timesteps(timesteps, lay.B, opts.t_max, student.device, sync=opts.check_finite)
    if opts.check_finite:
        _check_finite(student, teacher)
    if _fused_ok(student, opts, timesteps):
        loss, totals, w, cw = _fused(student, teacher, lay, opts, step, total_steps)
        return loss if not opts.return_stats else (loss, _stats(totals, lay, opts, w, cw, None))
    _, _, rows = _fit(student, teacher, opts, lay)
    if opts.check_finite:
        _check_no_overflow(rows, student, teacher)
    buckets = None
    if timesteps is not None:
        state = bucket_state if opts.bucket_ema is not None else None
        buckets = _bucket_weights(rows, lay, timesteps, opts, state)
    if buckets is None:
        loss, totals, w, cw = _LinearInRows.apply(rows, lay, opts, step, total_steps)
        return loss if not opts.return_stats else (loss, _stats(totals, lay, opts, w, cw, None))
    totals = rows.sum(0)  # [ROW_STATS], one fixed-order reduction
    w, per_sample_w = _fine_weight(totals, lay, opts, step, total_steps, buckets)
    return _assemble(totals, lay, opts, w, per_sample_w, buckets)


def _fused_ok(student: Tensor, opts: LiftPlaceOptions, timesteps) -> bool:
    """Whether the call can take :func:`_fused`: the extension's kernels in eager mode, one
    process (an adaptive weight is summed over ranks in between), without timestep buckets or
    the finiteness checks (they need the rows in between)."""
    return (timesteps is None and not opts.check_finite and _ops.HAS_KD and not torch.compiler.is_compiling()
            and not _distributed() and _ops.use_ext(student.device, "lift_place_fwd"))  # bwd: same devices


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fused(student: Tensor, teacher: Tensor, lay: _Layout, opts: LiftPlaceOptions, step, total_steps):
    """``(loss, totals, w, cw)`` by one op, ``liftplace::lift_place_kd`` (csrc/kd.cpp), whose
    autograd node is C++ and whose backward is one op too.

    Same values and derivatives (first and second) as :func:`_fit` followed by
    :class:`_LinearInRows`: the op runs the same kernels and the same reduction as
    :func:`_reduce_rows`, in the same order (tests/test_fused.py compares them bit for bit).
    What it saves is per-call Python: two Python autograd nodes, the registered op's Python
    autograd wrapper and about twenty small tensor ops (benchmarks/RESULTS.md §7).
    """
    x = student.reshape(lay.R, lay.N).contiguous()
    y = teacher.reshape(lay.R, lay.N).contiguous()
    adaptive = opts.weight == "adaptive"
    out = torch.ops.liftplace.lift_place_kd.default(
        x, y, opts.group_size if opts.grouping != "global" else lay.N, opts.grouping, opts.norm, float(opts.eps),
        lay.width, _scale(lay, opts), float(lay.R * lay.G), adaptive,
        0.0 if adaptive else _schedule(opts.weight, step, total_steps), opts.parts, opts.coarse_weight == "anneal")
    return out[:4]


def _reduce_rows(rows: Tensor, lay: _Layout, opts: LiftPlaceOptions, step, total_steps):
    """``(loss, totals, w, cw, coef)`` of the rows; ``d loss / d rows[r] = coef`` for every row."""
    totals = rows.sum(0)  # [ROW_STATS], one fixed-order reduction
    w, _ = _fine_weight(totals, lay, opts, step, total_steps, None)
    loss, cw, scale = _combine(totals, lay, opts, w, None, None)
    coef = rows.new_zeros(ROW_STATS)
    if opts.parts != "fine":
        coef[COARSE] = scale if opts.parts == "coarse" else cw * scale
    if opts.parts != "coarse":
        coef[FINE] = scale if opts.parts == "fine" else w * scale
    return loss, totals, w, cw, coef


class _LinearInRows(torch.autograd.Function):
    """``(loss, totals, w, cw)`` from the per-row statistics, as one autograd node.

    Without timestep buckets the loss is ``c · Σ_r rows[r]`` with coefficients that carry no
    gradient (``w`` is a detached statistic, METHOD.md §5; the schedules are constants), so its
    gradient is ``grad · c`` for every row. One node with that rule replaces the ~20 small
    nodes autograd records for the same expression (benchmarks/RESULTS.md §7); the value is
    computed by the same code as the bucketed path. Double backward is exact: the rule is linear
    in ``grad`` and the loss is linear in the rows.
    """

    @staticmethod
    def forward(ctx, rows, lay, opts, step, total_steps):
        loss, totals, w, cw, coef = _reduce_rows(rows, lay, opts, step, total_steps)
        ctx.save_for_backward(coef)
        ctx.rows = rows.shape[0]
        ctx.mark_non_differentiable(totals, w, cw)
        return loss, totals, w, cw

    @staticmethod
    def backward(ctx, grad, _grad_totals, _grad_w, _grad_cw):
        (coef,) = ctx.saved_tensors
        return (grad * coef).expand(ctx.rows, ROW_STATS), None, None, None, None


def _all_reduce(t: Tensor) -> Tensor:
    """Sum over ranks when running distributed (METHOD.md §8), else the tensor itself."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _schedule(weight: str, step, total_steps) -> float:
    if weight == "constant":
        return 1.0
    progress = min(1.0, max(0.0, float(step) / float(total_steps)))
    if weight == "linear":
        return progress
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def _fine_weight(totals: Tensor, lay: _Layout, opts: LiftPlaceOptions, step, total_steps, buckets):
    """The fine-term weight ``w`` (a detached scalar) and, for adaptive-timestep, one per sample."""
    if opts.weight == "adaptive":
        absdev = totals[ABS_SLOPE_DEV:ABS_INTERCEPT + 1].detach()
        absdev = _all_reduce(torch.cat([absdev, absdev.new_full((1,), lay.R * lay.G)]))
        return 1.0 - ((absdev[0] + absdev[1]) / absdev[2]).clamp(max=1.0), None
    if opts.weight == "adaptive-timestep":
        w_b = buckets["sample_weight"]
        return w_b.mean(), w_b
    return totals.new_full((), _schedule(opts.weight, step, total_steps)), None


def _assemble(totals: Tensor, lay: _Layout, opts: LiftPlaceOptions, w: Tensor, per_sample_w, buckets):
    """``coarse_weight·coarse + w·fine`` (or one part) and, with ``return_stats``, the statistics."""
    loss, cw, _ = _combine(totals, lay, opts, w, per_sample_w, buckets)
    return loss if not opts.return_stats else (loss, _stats(totals, lay, opts, w, cw, buckets))


def _scale(lay: _Layout, opts: LiftPlaceOptions) -> float:
    return 1.0 / lay.B if opts.reduction == "sum" else 1.0 / (lay.R * lay.N)


def _combine(totals: Tensor, lay: _Layout, opts: LiftPlaceOptions, w: Tensor, per_sample_w, buckets):
    """``(loss, coarse weight, scale)``: ``coarse_weight·coarse + w·fine`` or one part, times the
    reduction's scale. csrc/kd.cpp repeats this op for op: keep them in step."""
    scale = _scale(lay, opts)
    coarse = totals[COARSE] * scale
    fine = totals[FINE] * scale
    anneal = opts.coarse_weight == "anneal"
    cw = (1.0 - w) if anneal else torch.ones_like(w)
    if opts.parts == "coarse":
        loss = coarse
    elif opts.parts == "fine":
        loss = fine
    elif per_sample_w is not None:
        # One weight per sample, from its bucket: w_b·fine_b and, annealed, (1 - w_b)·coarse_b.
        per_sample = buckets["per_sample"]
        cw_b = (1.0 - per_sample_w) if anneal else torch.ones_like(per_sample_w)
        loss = ((cw_b * per_sample[:, COARSE]).sum() + (per_sample_w * per_sample[:, FINE]).sum()) * scale
    else:
        loss = cw * coarse + w * fine
    return loss, cw, scale


def _stats(totals: Tensor, lay: _Layout, opts: LiftPlaceOptions, w: Tensor, cw: Tensor, buckets) -> dict:
    """The detached statistics ``return_stats=True`` adds."""
    scale = 1.0 / lay.B if opts.reduction == "sum" else 1.0 / (lay.R * lay.N)
    coarse = totals[COARSE] * scale
    fine = totals[FINE] * scale
    groups = float(lay.R * lay.G)
    stats = {
        "coarse": coarse.detach(),
        "fine": fine.detach(),
        "weight": w.detach(),
        "coarse_weight": cw.detach(),
        "slope_mean": totals[SUM_SLOPE].detach() / groups,
        "intercept_mean": totals[SUM_INTERCEPT].detach() / groups,
        "slope_absdev": totals[ABS_SLOPE_DEV].detach() / groups,
        "intercept_absdev": totals[ABS_INTERCEPT].detach() / groups,
        "output_mse": totals[SQERR].detach() / (lay.R * lay.N),
    }
    if buckets is not None:
        sums, counts = buckets["sums"], buckets["counts"]
        n = counts.to(sums.dtype)
        n = torch.where(counts > 0, n, torch.full_like(n, float("nan")))  # empty bucket -> NaN
        stats.update({
            "bucket_coarse": sums[:, COARSE] * (scale * lay.B) / n,
            "bucket_fine": sums[:, FINE] * (scale * lay.B) / n,
            "bucket_slope_absdev": sums[:, ABS_SLOPE_DEV] / (n * lay.C * lay.G),
            "bucket_intercept_absdev": sums[:, ABS_INTERCEPT] / (n * lay.C * lay.G),
            "bucket_output_mse": sums[:, SQERR] / (n * lay.C * lay.N),
            "bucket_weight": buckets["weight"],
            "bucket_count": counts,
        })
    return stats


def _bucket_weights(rows: Tensor, lay: _Layout, timesteps: Tensor, opts: LiftPlaceOptions, state) -> dict:
    """Per-sample and per-bucket statistics and the per-bucket adaptive weight ``w_k`` (METHOD.md §8)."""
    per_sample = rows.view(lay.B, lay.C, ROW_STATS).sum(1)  # [B, ROW_STATS], differentiable
    sums, counts, bucket = _ops.bucket_stats(per_sample.detach(), timesteps, opts.num_buckets, float(opts.t_max))
    sums, counts = _all_reduce(sums), _all_reduce(counts)
    present = counts > 0
    groups = (counts * (lay.C * lay.G)).clamp(min=1).to(sums.dtype)
    absdev = (sums[:, ABS_SLOPE_DEV] + sums[:, ABS_INTERCEPT]) / groups
    if state is not None:
        ema = float(opts.bucket_ema)
        with torch.no_grad():
            seen = state["seen"]
            smoothed = torch.where(seen, ema * state["absdev"] + (1.0 - ema) * absdev, absdev)
            state["absdev"].copy_(torch.where(present, smoothed, state["absdev"]))
            seen.logical_or_(present)
        absdev = state["absdev"].to(sums.dtype)
        present = state["seen"]
    w_k = 1.0 - absdev.clamp(max=1.0)
    w_k = torch.where(present, w_k, torch.zeros_like(w_k))  # no samples: contributes nothing
    return {"per_sample": per_sample, "sums": sums, "counts": counts, "weight": w_k, "sample_weight": w_k[bucket]}


def fit_groups(student: Tensor, teacher: Tensor, *, group_size: int = _DEFAULT_GROUP_SIZE,
               grouping: str = "error", eps: float = 1e-7, channel_dim: int = 1):
    """Per-group least-squares fit ``teacher ≈ slope·student + intercept``.

    Returns ``(slope, intercept)``, each ``[B, C, G]`` (``C`` the size of ``channel_dim``);
    differentiable on both backends.
    """
    _check_tensors(student, teacher)
    opts = LiftPlaceOptions(group_size=group_size, grouping=grouping, eps=eps, channel_dim=channel_dim)
    student, teacher = _channels_first(student, teacher, opts)
    lay = _layout(student.shape, opts)
    slope, intercept, _ = _fit(student, teacher, opts, lay)
    return slope.reshape(lay.B, lay.C, lay.G), intercept.reshape(lay.B, lay.C, lay.G)


class LiftPlaceLoss(nn.Module):
    """``nn.Module`` form of :func:`lift_place_loss`; options as keyword arguments, validated
    at construction into ``self.options`` (a :class:`LiftPlaceOptions`).

    ``forward(student, teacher, step=None, total_steps=None, timesteps=None)`` — ``step`` is
    needed only for the ``"linear"`` / ``"cosine"`` weight schedules, ``timesteps`` only
    when built with ``num_buckets``. ``channel_dim=-1`` reads token outputs ``[B, N, D]``
    (see :func:`lift_place_loss`). With buckets, each bucket's mean ``|a-1| + |b|`` is
    smoothed across steps (``bucket_ema``; ``None`` turns it off) in buffers that go into
    ``state_dict()``; the EMA is updated in training mode only.
    """

    def __init__(self, *, group_size: int = _DEFAULT_GROUP_SIZE, grouping: str = "error", norm: str = "l1",
                 reduction: str = "sum", weight: str = "adaptive", parts: str = "both",
                 coarse_weight: str = "constant", eps: float = 1e-7, total_steps: int | None = None,
                 check_finite: bool = False, return_stats: bool = False,
                 num_buckets: int | None = None, t_max: float | None = None,
                 bucket_ema: float | None = 0.9, channel_dim: int = 1):
        super().__init__()
        if weight == "adaptive-timestep" and num_buckets is None:
            raise ValueError('weight="adaptive-timestep" needs num_buckets= and t_max= at construction')
        if not isinstance(group_size, bool) and isinstance(group_size, int) and group_size < 2:
            raise ValueError(f"group_size must be between 2 and the row length N, got {group_size}")
        self.options = LiftPlaceOptions(group_size=group_size, grouping=grouping, norm=norm, reduction=reduction,
                                        weight=weight, parts=parts, coarse_weight=coarse_weight, eps=eps,
                                        check_finite=check_finite, return_stats=return_stats,
                                        num_buckets=num_buckets, t_max=t_max, bucket_ema=bucket_ema,
                                        channel_dim=channel_dim)
        _check_number("total_steps", total_steps)
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        self.total_steps = total_steps
        if num_buckets is not None:
            # EMA of each bucket's mean |a-1| + |b|: in state_dict(), hence in checkpoints.
            self.register_buffer("bucket_absdev", torch.zeros(num_buckets, dtype=torch.float64))
            self.register_buffer("bucket_seen", torch.zeros(num_buckets, dtype=torch.bool))

    @property
    def num_buckets(self):
        return self.options.num_buckets

    @property
    def t_max(self):
        return self.options.t_max

    @property
    def bucket_ema(self):
        return self.options.bucket_ema

    def forward(self, student: Tensor, teacher: Tensor, step: int | None = None,
                total_steps: int | None = None, timesteps: Tensor | None = None):
        _check_tensors(student, teacher)
        if timesteps is not None and not self.options.buckets:
            raise ValueError("timesteps were passed but this LiftPlaceLoss was built without num_buckets=;"
                             " construct it with num_buckets= and t_max= to use them")
        if self.options.buckets and timesteps is None and self.options.weight == "adaptive-timestep":
            raise ValueError('weight="adaptive-timestep" needs timesteps= (one per sample) in every call')
        state = None
        if timesteps is not None and self.options.bucket_ema is not None and self.training:
            state = {"absdev": self.bucket_absdev, "seen": self.bucket_seen}
        return _loss(student, teacher, self.options, step,
                     total_steps if total_steps is not None else self.total_steps, timesteps, state)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self.options).items()
                         if v is not None and not (k == "channel_dim" and v == 1))
