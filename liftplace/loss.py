"""The public LIFT/PLACE loss: validation, backend choice and the scalar reduction."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import _ops
from . import _reference as ref
from .timesteps import _bucket_stats, check_timesteps

GROUPINGS = ("global", "error", "patch")
NORMS = ("l1", "l2")
REDUCTIONS = ("sum", "mean")
WEIGHTS = ("adaptive", "adaptive-timestep", "constant", "linear", "cosine")
PARTS = ("both", "coarse", "fine")
COARSE_WEIGHTS = ("constant", "anneal")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Layout:
    R: int  # rows = B * C
    N: int  # elements per row
    G: int  # groups per row
    B: int
    C: int
    width: int  # W for patch grouping, else 0


def _choice(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


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


def _layout(shape: torch.Size, group_size: int, grouping: str) -> _Layout:
    B, C = shape[0], shape[1]
    N = math.prod(shape[2:])
    if N < 2:
        raise ValueError(f"each row needs prod(S) >= 2 elements; shape {list(shape)} gives {N}")
    width = 0
    if grouping != "global":
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size < 2 or group_size > N:
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
    G = 1 if grouping == "global" else N // group_size
    return _Layout(R=B * C, N=N, G=G, B=B, C=C, width=width)


def _check_options(grouping, norm, reduction, weight, parts, coarse_weight, eps, step, total_steps):
    _choice("grouping", grouping, GROUPINGS)
    _choice("norm", norm, NORMS)
    _choice("reduction", reduction, REDUCTIONS)
    _choice("weight", weight, WEIGHTS)
    _choice("parts", parts, PARTS)
    _choice("coarse_weight", coarse_weight, COARSE_WEIGHTS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    if weight in ("linear", "cosine"):
        if step is None or total_steps is None:
            raise ValueError(f"weight={weight!r} needs step= and total_steps= (the training progress)")
        if total_steps <= 0 or step < 0:
            raise ValueError(f"need step >= 0 and total_steps > 0, got step={step}, total_steps={total_steps}")


def _check_finite(student: Tensor, teacher: Tensor) -> None:
    for name, t in (("student", student), ("teacher", teacher)):
        bad = int((~torch.isfinite(t)).sum())  # host sync, by request
        if bad:
            raise ValueError(f"{name} holds {bad} non-finite values (NaN or Inf) out of {t.numel()}")


def _rows(student: Tensor, teacher: Tensor, lay: _Layout, group_size: int, grouping: str):
    # [B, C, *S] -> [R, N]; copies only when the input is not already row-contiguous.
    x = student.reshape(lay.R, lay.N).contiguous()
    y = teacher.reshape(lay.R, lay.N).contiguous()
    return x, y, (group_size if grouping != "global" else lay.N)


def _schedule(weight: str, step, total_steps) -> float:
    if weight == "constant":
        return 1.0
    progress = min(1.0, max(0.0, float(step) / float(total_steps)))
    if weight == "linear":
        return progress
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def lift_place_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    group_size: int = 16,
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
    bucket_ema: float = 0.9,
):
    """LIFT/PLACE distillation loss between student and teacher outputs (METHOD.md §3–§5).

    Args:
        student, teacher: outputs ``[B, C, *S]`` of the same shape, dtype and device.
            Gradients flow to both when they require grad (the teacher usually does not).
        group_size: elements per group ``P`` for ``"error"`` / ``"patch"`` grouping.
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
        check_finite: raise a ``ValueError`` on NaN/Inf inputs (costs a host-device sync).
            Without it a non-finite input gives a NaN loss.
        return_stats: also return a dict of detached statistics (no host sync); with
            timesteps, also ``bucket_*`` tensors ``[K]`` (NaN for empty buckets).
        timesteps, num_buckets, t_max: per-sample timesteps ``[B]`` and ``K`` buckets over
            ``[0, t_max)``; needed by ``weight="adaptive-timestep"``, optional otherwise
            (then only the per-bucket statistics are added).
        bucket_state, bucket_ema: a dict of tensors ``{"absdev": [K], "seen": [K] bool}``
            updated in place with an EMA of each bucket's mean ``|a-1| + |b|`` (what
            :class:`LiftPlaceLoss` keeps as buffers); ``None`` uses the batch alone.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs); with ``return_stats``,
        ``(loss, stats)``.
    """
    _check_tensors(student, teacher)
    _check_options(grouping, norm, reduction, weight, parts, coarse_weight, eps, step, total_steps)
    lay = _layout(student.shape, group_size, grouping)
    buckets = None
    if weight == "adaptive-timestep" or timesteps is not None:
        if timesteps is None:
            raise ValueError('weight="adaptive-timestep" needs timesteps= (one per sample), num_buckets= and t_max=')
        check_timesteps(timesteps, lay.B, num_buckets, t_max, student.device, sync=check_finite)
        if not 0.0 <= bucket_ema < 1.0:
            raise ValueError(f"bucket_ema must be in [0, 1), got {bucket_ema!r}")
        buckets = (timesteps, num_buckets, float(t_max), bucket_state, float(bucket_ema))
    if check_finite:
        _check_finite(student, teacher)
    x, y, P = _rows(student, teacher, lay, group_size, grouping)

    if _ops.use_ext(x.device):
        _, _, rows, _, _ = torch.ops.liftplace.lift_place_fwd(x, y, P, grouping, norm, float(eps), lay.width)
    else:
        _, _, rows = ref.lift_place_rows(x, y, P, grouping, norm, float(eps), lay.width)
    return _reduce(rows, lay, reduction, weight, parts, coarse_weight, step, total_steps, return_stats, buckets)


def _all_reduce(t: Tensor) -> Tensor:
    """Sum over ranks when running distributed (METHOD.md §8), else the tensor itself."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _reduce(rows, lay, reduction, weight, parts, coarse_weight, step, total_steps, return_stats,
            buckets=None):
    totals = rows.sum(0)  # [ROW_STATS], one fixed-order reduction
    scale = 1.0 / lay.B if reduction == "sum" else 1.0 / (lay.R * lay.N)
    coarse = totals[ref.COARSE] * scale
    fine = totals[ref.FINE] * scale
    groups = lay.R * lay.G
    slope_absdev = totals[ref.ABS_SLOPE_DEV].detach() / groups
    intercept_absdev = totals[ref.ABS_INTERCEPT].detach() / groups
    per_bucket = per_sample = None
    if buckets is not None:
        per_sample = rows.view(lay.B, lay.C, ref.ROW_STATS).sum(1)  # [B, ROW_STATS]
        per_bucket = _bucket_weights(per_sample.detach(), lay, buckets)
    if weight == "adaptive":
        absdev = totals[ref.ABS_SLOPE_DEV:ref.ABS_INTERCEPT + 1].detach()
        absdev = _all_reduce(torch.cat([absdev, absdev.new_full((1,), groups)]))
        w = 1.0 - ((absdev[0] + absdev[1]) / absdev[2]).clamp(max=1.0)
    elif weight == "adaptive-timestep":
        w = per_bucket["sample_weight"].mean()
    else:
        w = torch.full_like(coarse, _schedule(weight, step, total_steps)).detach()
    cw = (1.0 - w) if coarse_weight == "anneal" else torch.ones_like(w)

    if weight == "adaptive-timestep":
        # One weight per sample, from its bucket: w_b·fine_b and, annealed, (1 - w_b)·coarse_b.
        w_b = per_bucket["sample_weight"]
        cw_b = (1.0 - w_b) if coarse_weight == "anneal" else torch.ones_like(w_b)
        coarse_term = (cw_b * per_sample[:, ref.COARSE]).sum() * scale
        fine_term = (w_b * per_sample[:, ref.FINE]).sum() * scale
    else:
        coarse_term, fine_term = cw * coarse, w * fine
    if parts == "both":
        loss = coarse_term + fine_term
    elif parts == "coarse":
        loss = coarse
    else:
        loss = fine
    if not return_stats:
        return loss
    groups_f = float(groups)
    stats = {
        "coarse": coarse.detach(),
        "fine": fine.detach(),
        "weight": w.detach(),
        "coarse_weight": cw.detach(),
        "slope_mean": totals[ref.SUM_SLOPE].detach() / groups_f,
        "intercept_mean": totals[ref.SUM_INTERCEPT].detach() / groups_f,
        "slope_absdev": slope_absdev,
        "intercept_absdev": intercept_absdev,
        "output_mse": totals[ref.SQERR].detach() / (lay.R * lay.N),
    }
    if per_bucket is not None:
        sums, counts = per_bucket["sums"], per_bucket["counts"]
        n = counts.to(sums.dtype)
        n = torch.where(counts > 0, n, torch.full_like(n, float("nan")))  # empty bucket -> NaN
        stats.update({
            "bucket_coarse": sums[:, ref.COARSE] * (scale * lay.B) / n,
            "bucket_fine": sums[:, ref.FINE] * (scale * lay.B) / n,
            "bucket_slope_absdev": sums[:, ref.ABS_SLOPE_DEV] / (n * lay.C * lay.G),
            "bucket_intercept_absdev": sums[:, ref.ABS_INTERCEPT] / (n * lay.C * lay.G),
            "bucket_output_mse": sums[:, ref.SQERR] / (n * lay.C * lay.N),
            "bucket_weight": per_bucket["weight"],
            "bucket_count": counts,
        })
    return loss, stats


def _bucket_weights(per_sample, lay, buckets) -> dict:
    """Per-bucket statistics and the per-bucket adaptive weight ``w_k`` (METHOD.md §8)."""
    timesteps, K, t_max, state, ema = buckets
    sums, counts, bucket = _bucket_stats(per_sample, timesteps, K, t_max)
    sums, counts = _all_reduce(sums), _all_reduce(counts)
    present = counts > 0
    groups = (counts * (lay.C * lay.G)).clamp(min=1).to(sums.dtype)
    absdev = (sums[:, ref.ABS_SLOPE_DEV] + sums[:, ref.ABS_INTERCEPT]) / groups
    if state is not None:
        with torch.no_grad():
            seen = state["seen"]
            smoothed = torch.where(seen, ema * state["absdev"] + (1.0 - ema) * absdev, absdev)
            state["absdev"].copy_(torch.where(present, smoothed, state["absdev"]))
            seen.logical_or_(present)
        absdev = state["absdev"].to(sums.dtype)
        present = state["seen"]
    w_k = 1.0 - absdev.clamp(max=1.0)
    w_k = torch.where(present, w_k, torch.zeros_like(w_k))  # no samples: contributes nothing
    return {"sums": sums, "counts": counts, "weight": w_k, "sample_weight": w_k[bucket]}


def fit_groups(student: Tensor, teacher: Tensor, *, group_size: int = 16, grouping: str = "error",
               eps: float = 1e-7):
    """Per-group least-squares fit ``teacher ≈ slope·student + intercept``.

    Returns ``(slope, intercept)``, each ``[B, C, G]``; differentiable on both backends.
    """
    _check_tensors(student, teacher)
    _choice("grouping", grouping, GROUPINGS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    lay = _layout(student.shape, group_size, grouping)
    x, y, P = _rows(student, teacher, lay, group_size, grouping)
    if _ops.use_ext(x.device):
        slope, intercept, _, _, _ = torch.ops.liftplace.lift_place_fwd(x, y, P, grouping, "l1", float(eps), lay.width)
    else:
        slope, intercept, _ = ref.lift_place_rows(x, y, P, grouping, "l1", float(eps), lay.width)
    return slope.reshape(lay.B, lay.C, lay.G), intercept.reshape(lay.B, lay.C, lay.G)


class LiftPlaceLoss(nn.Module):
    """``nn.Module`` form of :func:`lift_place_loss`; options as keyword arguments.

    ``forward(student, teacher, step=None, total_steps=None)`` — ``step`` is needed only
    for the ``"linear"`` / ``"cosine"`` weight schedules.
    """

    def __init__(self, *, group_size: int = 16, grouping: str = "error", norm: str = "l1",
                 reduction: str = "sum", weight: str = "adaptive", parts: str = "both",
                 coarse_weight: str = "constant", eps: float = 1e-7, total_steps: int | None = None,
                 check_finite: bool = False, return_stats: bool = False,
                 num_buckets: int | None = None, t_max: float | None = None,
                 bucket_ema: float | None = 0.9):
        super().__init__()
        _check_options(grouping, norm, reduction, weight, parts, coarse_weight, eps, 0, total_steps or 1)
        self.options = dict(group_size=group_size, grouping=grouping, norm=norm, reduction=reduction,
                            weight=weight, parts=parts, coarse_weight=coarse_weight, eps=eps,
                            check_finite=check_finite, return_stats=return_stats)
        self.total_steps = total_steps
        self.num_buckets, self.t_max, self.bucket_ema = num_buckets, t_max, bucket_ema
        if num_buckets is not None:
            check_timesteps(torch.zeros(1), 1, num_buckets, t_max, torch.device("cpu"), sync=False)
            if bucket_ema is not None and not 0.0 <= bucket_ema < 1.0:
                raise ValueError(f"bucket_ema must be in [0, 1) or None, got {bucket_ema!r}")
            # EMA of each bucket's mean |a-1| + |b|: in state_dict(), hence in checkpoints.
            self.register_buffer("bucket_absdev", torch.zeros(num_buckets, dtype=torch.float64))
            self.register_buffer("bucket_seen", torch.zeros(num_buckets, dtype=torch.bool))
        elif weight == "adaptive-timestep":
            raise ValueError('weight="adaptive-timestep" needs num_buckets= and t_max= at construction')

    def forward(self, student: Tensor, teacher: Tensor, step: int | None = None,
                total_steps: int | None = None, timesteps: Tensor | None = None):
        bucket_kw = {}
        if self.num_buckets is not None and timesteps is not None:
            use_ema = self.bucket_ema is not None and self.training
            state = {"absdev": self.bucket_absdev, "seen": self.bucket_seen} if use_ema else None
            bucket_kw = dict(timesteps=timesteps, num_buckets=self.num_buckets, t_max=self.t_max,
                             bucket_state=state, bucket_ema=self.bucket_ema or 0.0)
        return lift_place_loss(student, teacher, step=step,
                               total_steps=total_steps if total_steps is not None else self.total_steps,
                               **self.options, **bucket_kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
