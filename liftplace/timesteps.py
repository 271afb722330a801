"""Piecewise timestep bucketing (METHOD.md §8): per-bucket sums of per-sample statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _ops

# Buckets hold [K, S] sums and a [K] EMA: far more buckets than a schedule has timesteps
# (1000 for DDPM) only leaves them empty, and an unbounded K would exhaust memory.
MAX_BUCKETS = 65536


def check_bucket_options(num_buckets, t_max) -> None:
    """Validate ``num_buckets`` and ``t_max`` (no tensors needed)."""
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or not 1 <= num_buckets <= MAX_BUCKETS:
        raise ValueError(f"num_buckets must be an int >= 1 and <= {MAX_BUCKETS} (MAX_BUCKETS), got {num_buckets!r}")
    if (isinstance(t_max, bool) or not isinstance(t_max, (int, float)) or not math.isfinite(t_max)
            or not t_max > 0):
        raise ValueError(
            f"t_max must be a positive finite number (the scheduler's num_train_timesteps), got {t_max!r}")


def check_timesteps(timesteps, batch: int, t_max, device, *, sync: bool) -> None:
    """Validate per-sample timesteps. Value checks (range, NaN) read the tensor, so they run
    for CPU tensors always and for accelerator tensors only when ``sync`` is allowed."""
    if not isinstance(timesteps, Tensor):
        raise TypeError(f"timesteps must be a torch.Tensor of shape [{batch}], got {type(timesteps).__name__}")
    if timesteps.dim() != 1 or timesteps.shape[0] != batch:
        raise ValueError(
            f"timesteps must have shape [{batch}] (one per sample), got {list(timesteps.shape)};"
            " pass the per-sample timesteps the models were called with")
    if timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer or floating tensor, got {timesteps.dtype}")
    if timesteps.device != device:
        raise ValueError(f"timesteps are on {timesteps.device} but the outputs are on {device}; move them")
    if timesteps.device.type == "cpu" or sync:
        if timesteps.is_floating_point() and bool(torch.isnan(timesteps).any()):
            raise ValueError("timesteps hold NaN; every sample needs a real timestep to pick its bucket")
        low, high = timesteps.min().item(), timesteps.max().item()
        if low < 0:
            raise ValueError(f"timesteps must be >= 0, got a minimum of {low}")
        if not timesteps.is_floating_point() and high >= t_max:
            raise ValueError(f"integer timesteps must be < t_max={t_max}, got a maximum of {high}")


def bucket_stats(values: Tensor, timesteps: Tensor, num_buckets: int, t_max: float):
    """Sum per-sample statistics per timestep bucket, deterministically and without a host sync.

    Args:
        values: ``[B]`` or ``[B, S]`` floating statistics, one row per sample (detached).
        timesteps: ``[B]`` integer or floating timesteps.
        num_buckets: ``K`` (at most ``MAX_BUCKETS``); bucket ``k = floor(t·K / t_max)``
            clamped to ``[0, K)``.
        t_max: the timestep range ``T`` (e.g. the scheduler's ``num_train_timesteps``).

    Returns:
        ``(sums, counts)``: ``[K]`` or ``[K, S]`` sums (float32, float64 for float64 values)
        and ``[K]`` int64 sample counts.
    """
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError("values must be a floating torch.Tensor of shape [B] or [B, S]")
    if values.dim() not in (1, 2) or values.shape[0] == 0:
        raise ValueError(f"values must be a non-empty [B] or [B, S] tensor, got {list(values.shape)}")
    check_bucket_options(num_buckets, t_max)
    check_timesteps(timesteps, values.shape[0], t_max, values.device, sync=False)
    squeeze = values.dim() == 1
    v = values.detach().reshape(values.shape[0], -1)
    sums, counts, _ = _ops.bucket_stats(v, timesteps, num_buckets, float(t_max))
    return (sums.squeeze(1) if squeeze else sums), counts
