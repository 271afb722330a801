"""Pure-torch twins of the liftplace kernels: the fallback path and the test oracle.

Everything here follows ``METHOD.md`` line by line and favours clarity over speed.
Rows are ``[R, N]`` views of ``[B, C, *S]`` inputs (``R = B*C``, ``N = prod(S)``).
The functions mirror the C++ ops ``liftplace::lift_place_fwd`` / ``lift_place_bwd``
(same arguments, same outputs), so the kernels can be checked output by output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The output layout and the accumulation-dtype rule belong to the op layer.
from ._ops import (ABS_INTERCEPT, ABS_SLOPE_DEV, COARSE, FINE, SQERR, SUM_INTERCEPT, SUM_SLOPE,  # noqa: F401
                   ROW_STATS, AUX, DENOM, MEAN_X, MEAN_Y, acc_dtype, num_groups)


def group_ids(x: Tensor, y: Tensor, group_size: int, grouping: str, width: int = 0) -> Tensor:
    """Group of every element, ``[R, N]`` int64 (METHOD.md §3)."""
    R, N = x.shape
    if grouping == "global":
        return torch.zeros(R, N, dtype=torch.long, device=x.device)
    if grouping == "patch":
        p = math.isqrt(group_size)
        idx = torch.arange(N, device=x.device)
        row, col = idx // width, idx % width
        gid = (row // p) * (width // p) + col // p
        return gid.expand(R, N).contiguous()
    # "error": rank by e = (y - x)^2 ascending, ties by lower index (a stable sort);
    # rank k goes to group k // P, and the N % P highest ranks join the last group.
    acc = acc_dtype(x.dtype)
    e = (y.to(acc) - x.to(acc)).square()
    order = torch.sort(e, dim=1, stable=True).indices
    G = N // group_size
    group_of_rank = (torch.arange(N, device=x.device) // group_size).clamp_max(G - 1)
    return torch.empty_like(order).scatter_(1, order, group_of_rank.expand(R, N))


def _segment_sum(v: Tensor, gid: Tensor, G: int) -> Tensor:
    return torch.zeros(v.shape[0], G, dtype=v.dtype, device=v.device).scatter_add(1, gid, v)


def _centre(x: Tensor, y: Tensor):
    """Rows shifted by their (detached) means: ``(x - cx, y - cy, cx, cy)``.

    Sums then see values of the size of the spread, not of the mean, so float32 keeps its
    accuracy when ``|mean| ≫ std`` as the kernels' double partials do. The shift is a
    constant, so gradients are unchanged.
    """
    cx = x.detach().mean(1, keepdim=True)
    cy = y.detach().mean(1, keepdim=True)
    return x - cx, y - cy, cx, cy


def _fit_centred(xc: Tensor, yc: Tensor, cx: Tensor, cy: Tensor, gid: Tensor, G: int, eps: float):
    """The two-pass fit of centred rows: ``a, b, mxc, myc, d, n`` (means still centred)."""
    n = _segment_sum(torch.ones_like(xc), gid, G)
    mxc = _segment_sum(xc, gid, G) / n
    myc = _segment_sum(yc, gid, G) / n
    dx = xc - mxc.gather(1, gid)
    dy = yc - myc.gather(1, gid)
    d = _segment_sum(dx * dx, gid, G) / n + eps
    a = _segment_sum(dx * dy, gid, G) / n / d
    b = (myc - a * mxc) + (cy - a * cx)
    return a, b, mxc, myc, d, n


def fit(x: Tensor, y: Tensor, gid: Tensor, G: int, eps: float):
    """Per-group least squares ``y ≈ a·x + b`` (§4), centred before anything is summed.

    Returns ``a, b, mx, my, d, n``, each ``[R, G]``, with ``d = vx + eps``.
    Differentiable in ``x`` and ``y``; ``gid`` is a constant.
    """
    xc, yc, cx, cy = _centre(x, y)
    a, b, mxc, myc, d, n = _fit_centred(xc, yc, cx, cy, gid, G, eps)
    return a, b, mxc + cx, myc + cy, d, n


def lift_place_fwd(x: Tensor, y: Tensor, group_size: int, grouping: str, norm: str, eps: float,
                   width: int = 0, gid: Tensor | None = None):
    """Twin of ``liftplace::lift_place_fwd``: ``(slope, intercept, rows, aux, group_id)``.

    ``x, y``: ``[R, N]``. Like the kernels, which sum in double partials, the statistics
    are computed in float64 from centred rows and returned in ``acc_dtype`` (float32, or
    float64 for float64 inputs), so the twin is as accurate as the kernels when
    ``|mean| ≫ std`` and overflows where they do (a square beyond float32's range becomes
    ``inf`` in ``rows``, never a NaN slope). Slope, intercept and rows are differentiable
    through autograd. ``gid`` may be passed to evaluate a fixed grouping (the float64
    oracle, double backward).
    """
    acc = acc_dtype(x.dtype)
    G = num_groups(x.shape[1], group_size, grouping)
    if gid is None:
        gid = group_ids(x, y, group_size, grouping, width)
    compute = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    x, y = x.to(compute), y.to(compute)
    xc, yc, cx, cy = _centre(x, y)
    a, b, mxc, myc, d, n = _fit_centred(xc, yc, cx, cy, gid, G, eps)
    # The fine term's residual uses the fitted line with gradients stopped (â, b̂ in §5).
    per_elem = lambda t: t.detach().gather(1, gid)  # noqa: E731
    r = per_elem(a) * (xc - per_elem(mxc)) - (yc - per_elem(myc))
    if norm == "l1":
        coarse_g = (a - 1).abs() + b.abs()
    else:
        coarse_g = (a - 1).square() + b.square()
    rows = torch.stack([
        (n * coarse_g).sum(1),
        r.square().sum(1),
        (x - y).square().sum(1),
        (a - 1).abs().sum(1),
        b.abs().sum(1),
        a.sum(1),
        b.sum(1),
    ], dim=1)
    aux = torch.stack([mxc + cx, myc + cy, d], dim=2).detach().to(acc)
    saved_gid = gid.to(torch.int32) if grouping == "error" else gid.new_empty(0, dtype=torch.int32)
    return a.to(acc), b.to(acc), rows.to(acc), aux, saved_gid


def lift_place_rows(x: Tensor, y: Tensor, group_size: int, grouping: str, norm: str, eps: float,
                    width: int = 0, gid: Tensor | None = None):
    """``(slope, intercept, rows)`` of :func:`lift_place_fwd`."""
    return lift_place_fwd(x, y, group_size, grouping, norm, eps, width, gid)[:3]


def lift_place_bwd(grad_rows: Tensor, grad_slope: Tensor | None, grad_intercept: Tensor | None,
                   x: Tensor, y: Tensor, slope: Tensor, intercept: Tensor, aux: Tensor,
                   group_id: Tensor, group_size: int, grouping: str, norm: str, width: int,
                   need_grad_y: bool):
    """Twin of ``liftplace::lift_place_bwd``: the closed-form gradients of METHOD.md §6.

    With the grouping fixed every term is affine in ``x_i`` and ``y_i`` per group; with
    ``dx = x - mx``, ``dy = y - my`` and the fit residual ``r = a·dx - dy``:

        GA = dL/da (direct + through coarse and the |a-1|, a sums)     GB likewise for b
        K  = (GA - GB·mx) / (n·d)
        grad_x = K·(dy - 2a·dx) - GB·a/n + 2a·g_fine·r + 2·g_sqerr·(x - y)
        grad_y = K·dx + GB/n - 2·g_fine·r - 2·g_sqerr·(x - y)
    """
    acc = acc_dtype(x.dtype)
    R, N = x.shape
    G = slope.shape[1]
    if grouping == "error":
        gid = group_id.long()
    else:
        gid = group_ids(x, y, group_size, grouping, width)
    n = _segment_sum(torch.ones(R, N, dtype=acc, device=x.device), gid, G)
    a, b = slope, intercept
    mx, my, d = aux.unbind(2)
    g = grad_rows.to(acc)
    g_coarse, g_fine, g_sqerr = g[:, COARSE, None], g[:, FINE, None], g[:, SQERR, None]
    if norm == "l1":
        da, db = torch.sign(a - 1), torch.sign(b)
    else:
        da, db = 2 * (a - 1), 2 * b
    GA = g_coarse * n * da + g[:, ABS_SLOPE_DEV, None] * torch.sign(a - 1) + g[:, SUM_SLOPE, None]
    GB = g_coarse * n * db + g[:, ABS_INTERCEPT, None] * torch.sign(b) + g[:, SUM_INTERCEPT, None]
    if grad_slope is not None:
        GA = GA + grad_slope
    if grad_intercept is not None:
        GB = GB + grad_intercept
    K = (GA - GB * mx) / (n * d)

    def per_elem(t: Tensor) -> Tensor:
        return t.gather(1, gid)

    xa, ya = x.to(acc), y.to(acc)
    dx, dy = xa - per_elem(mx), ya - per_elem(my)
    ae, Ke, GBe, ne = per_elem(a), per_elem(K), per_elem(GB), per_elem(n)
    r = ae * dx - dy
    diff = xa - ya
    grad_x = Ke * (dy - 2 * ae * dx) - GBe * ae / ne + 2 * ae * g_fine * r + 2 * g_sqerr * diff
    if need_grad_y:
        grad_y = (Ke * dx + GBe / ne - 2 * g_fine * r - 2 * g_sqerr * diff).to(y.dtype)
    else:
        grad_y = y.new_empty(0)
    return grad_x.to(x.dtype), grad_y


def bucket_index(timesteps: Tensor, num_buckets: int, t_max: float) -> Tensor:
    """Bucket ``k = floor(t·K / T)`` of each timestep, clamped to ``[0, K)`` (METHOD.md §8)."""
    k = torch.floor(timesteps.double() * num_buckets / t_max)
    return k.nan_to_num(0.0).clamp(0, num_buckets - 1).long()


def bucket_stats(values: Tensor, timesteps: Tensor, num_buckets: int, t_max: float):
    """Twin of ``liftplace::bucket_stats``: ``(sums [K, S], counts [K], bucket [B])``."""
    acc = acc_dtype(values.dtype)
    bucket = bucket_index(timesteps, num_buckets, t_max)
    onehot = torch.nn.functional.one_hot(bucket, num_buckets)  # [B, K]
    sums = (onehot.to(acc).unsqueeze(2) * values.to(acc).unsqueeze(1)).sum(0)
    return sums, onehot.sum(0), bucket
