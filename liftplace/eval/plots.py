"""PNG outputs: sample grids, training curves from metrics.jsonl, and heatmaps.

Figures are drawn with matplotlib's Agg canvas directly (``matplotlib.figure.Figure``,
never ``pyplot``), so no display is needed and the caller's matplotlib backend and
global figure state are left alone.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_CURVE_KEYS", "plot_heatmap", "plot_training_curves", "save_image_grid"]

DEFAULT_CURVE_KEYS = (
    "loss", "kd_loss", "kd_weight", "kd_slope_mean", "kd_intercept_mean", "output_mse",
)


def _prepare_path(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_image_grid(
    images: Tensor,
    path,
    nrow: int | None = None,
    padding: int = 1,
    *,
    min_tile: int = 64,
    pad_value: float = 1.0,
) -> Path:
    """Save ``images`` [N, C, H, W] in [-1, 1] (C = 1 or 3) as one PNG grid.

    ``nrow`` images per row (default ``ceil(sqrt(N))``), ``padding`` pixels of
    ``pad_value`` between and around tiles. The whole grid is then upscaled by an
    integer factor with nearest-neighbour so each tile is at least ``min_tile``
    pixels wide (16x16 digits become 64x64 tiles, padding 4 px). Values outside
    [-1, 1] are clipped; NaN is drawn as -1 with a warning (a diverged sampler should
    still leave a grid to look at). Returns the path.
    """
    from PIL import Image

    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape [N, C, H, W], got {shape}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("images is empty (N = 0); nothing to draw")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c} (shape {list(images.shape)})")
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")

    x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        warnings.warn("save_image_grid: images contain NaN/Inf; drawing them as -1/+1", stacklevel=2)
        x = torch.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    pad = int(round((pad_value + 1) * 127.5))
    grid = torch.full(
        (c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad, dtype=torch.uint8
    )
    for k in range(n):
        r, q = divmod(k, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = x[k]

    scale = max(1, math.ceil(min_tile / max(h, w)))
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr[..., 0] if c == 1 else arr))  # L or RGB
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = _prepare_path(path)
    img.save(path)
    return path


def _read_metrics(source) -> list[dict]:
    p = Path(source)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"metrics file {str(p)!r} not found")
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write can leave a truncated last line.
                warnings.warn(f"{p}:{lineno}: skipping a line that is not valid JSON", stacklevel=3)
                continue
            if isinstance(rec, dict):
                rows.append(rec)
    return rows


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _loss_like(key: str) -> bool:
    return "loss" in key or "mse" in key or key.endswith("frechet")


def plot_training_curves(runs: dict, path, keys=DEFAULT_CURVE_KEYS) -> Path:
    """One subplot per metric, one labelled line per run, from each run's metrics.jsonl.

    ``runs`` maps a label to a run directory (its ``metrics.jsonl`` is read) or to the
    jsonl file itself. Each line is a JSON object with ``"step"`` and any of ``keys``;
    missing keys, non-numeric and non-finite values (a skipped NaN step) are left
    out, as are unparseable lines (with a warning). A key gets a subplot when any run
    has it; loss-like keys (containing "loss" or "mse") use a log y axis when all
    their values are positive. Each run keeps one colour in every subplot. With no
    key present anywhere the PNG says so.
    Returns the path.
    """
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("runs is empty; pass {label: run_dir_or_metrics_jsonl}")
    data = {label: _read_metrics(src) for label, src in runs.items()}
    # One colour per run across all subplots, even where a run lacks a key.
    colors = {label: f"C{i % 10}" for i, label in enumerate(data)}
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for key in keys:
        per_run = {}
        for label, rows in data.items():
            pts = [(r["step"], r[key]) for r in rows
                   if _is_number(r.get("step")) and _is_number(r.get(key))]
            if pts:
                pts.sort(key=lambda sv: sv[0])
                per_run[label] = ([s for s, _ in pts], [v for _, v in pts])
        if per_run:
            series[key] = per_run

    n = max(1, len(series))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), dpi=110, layout="constrained")
    if not series:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, f"no values for {', '.join(keys)}", ha="center", va="center")
        ax.set_axis_off()
    for i, (key, per_run) in enumerate(series.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for label, (steps, vals) in per_run.items():
            ax.plot(steps, vals, label=str(label), color=colors[label], linewidth=1.4,
                    marker="o" if len(steps) == 1 else None)
        values = [v for _, vals in per_run.values() for v in vals]
        if _loss_like(key) and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize="small")
    path = _prepare_path(path)
    fig.savefig(path)
    return path


def plot_heatmap(
    matrix,
    path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    xticks=None,
    yticks=None,
    cmap: str = "viridis",
) -> Path:
    """A heatmap of a 2-D ``matrix`` [rows, cols] (Tensor, array or nested lists).

    Row 0 is drawn at the bottom (``origin="lower"``), so with timestep buckets as
    rows the noise level rises upwards. ``xticks``/``yticks`` are one label per
    column/row (thinned to at most 12 shown). NaN cells are left blank.
    Returns the path.
    """
    from matplotlib.figure import Figure

    if isinstance(matrix, Tensor):
        matrix = matrix.detach().to("cpu", torch.float64).numpy()
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {list(m.shape)}")
    for name, ticks, size in (("xticks", xticks, m.shape[1]), ("yticks", yticks, m.shape[0])):
        if ticks is not None and len(ticks) != size:
            raise ValueError(f"{name} must have one label per {'column' if name == 'xticks' else 'row'} "
                             f"({size}), got {len(ticks)}")

    fig = Figure(figsize=(7.0, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", origin="lower",
                   interpolation="nearest", cmap=cmap)
    fig.colorbar(im, ax=ax)

    def thin(labels):
        step = max(1, math.ceil(len(labels) / 12))
        pos = list(range(0, len(labels), step))
        return pos, [str(labels[p]) for p in pos]

    if xticks is not None:
        pos, lab = thin(list(xticks))
        ax.set_xticks(pos, lab, rotation=45 if max(map(len, lab)) > 4 else 0)
    if yticks is not None:
        pos, lab = thin(list(yticks))
        ax.set_yticks(pos, lab)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    path = _prepare_path(path)
    fig.savefig(path)
    return path


def plot_bucket_heatmaps(metrics, out_dir, *, prefix: str = "buckets") -> list[Path]:
    """Heat-maps (timestep bucket x training step) of the per-bucket adaptive weight ``w_k``
    and mean ``|a - 1|`` from a run's metrics.jsonl (keys ``kd_bucket_weight_k``,
    ``kd_bucket_slope_absdev_k``). Returns the PNG paths written (none without such keys)."""
    records = [r for r in _read_metrics(metrics) if "kd_bucket_weight_0" in r]
    if not records:
        return []
    num_buckets = 1 + max(int(k.rsplit("_", 1)[1]) for k in records[0] if k.startswith("kd_bucket_weight_"))
    steps = [r["step"] for r in records]
    out = []
    for key, title in (("weight", "adaptive weight w_k"), ("slope_absdev", "mean |a - 1|")):
        m = [[_nan_if_none(r.get(f"kd_bucket_{key}_{k}")) for r in records] for k in range(num_buckets)]
        out.append(plot_heatmap(m, Path(out_dir) / f"{prefix}_{key}.png", xlabel="training step",
                                ylabel="timestep bucket (low noise at the bottom)", title=title,
                                xticks=steps, yticks=list(range(num_buckets))))
    return out


def _nan_if_none(v) -> float:
    return float("nan") if v is None else float(v)
