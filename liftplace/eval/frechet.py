"""Fréchet distance and KID between feature sets (or Gaussian statistics), in float64.

The demo's digits metric (:func:`liftplace.eval.metrics.frechet_distance`) and
``liftplace eval`` both end here: features -> :func:`gaussian_stats` ->
:func:`frechet_distance_from_stats`. Statistics follow pytorch-fid's ``.npz`` format
(``mu`` [D], ``sigma`` [D, D], unbiased covariance), so published reference files work.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["frechet_distance_from_stats", "gaussian_stats", "kid", "load_stats", "precision_recall", "save_stats",
           "stats_sha256"]


def _as_2d_float64(name: str, feats) -> Tensor:
    t = torch.as_tensor(feats).detach().to(device="cpu", dtype=torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {list(t.shape)}")
    if t.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to fit a covariance, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _sqrt_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix via ``eigh``."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    # Rounding can leave tiny negative eigenvalues on a singular covariance.
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def gaussian_stats(feats, name: str = "features") -> tuple[Tensor, Tensor]:
    """``(mu [D], sigma [D, D])`` of ``feats`` [N, D] in float64; covariance with ``N - 1``."""
    t = _as_2d_float64(name, feats)
    return t.mean(0), torch.cov(t.T).reshape(t.shape[1], t.shape[1])


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, clamped at 0.

    The cross term's trace is the sum of square roots of the eigenvalues of the symmetric
    PSD matrix ``S_a^1/2 S_b S_a^1/2`` (those of ``S_a S_b``): no complex ``sqrtm``, finite
    for singular covariances."""
    mu_a, mu_b = (torch.as_tensor(m, dtype=torch.float64) for m in (mu_a, mu_b))
    cov_a, cov_b = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma_a, sigma_b))
    d = mu_a.shape[0]
    for name, mu, cov in (("a", mu_a, cov_a), ("b", mu_b, cov_b)):
        if mu.shape != (d,) or cov.shape != (d, d):
            raise ValueError(f"statistics {name}: expected mu [{d}] and sigma [{d}, {d}], got mu "
                             f"{list(mu.shape)} and sigma {list(cov.shape)} (feature dims must match)")
    s = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(s @ cov_b @ s).clamp_min(0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    # The exact value is >= 0; rounding can leave about -1e-12 for identical sets.
    return max(float(d2), 0.0)


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(feats_a, feats_b, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of the squared
    MMD with the kernel ``(x·y / D + 1)^3``, averaged over ``num_subsets`` random subsets of
    ``min(subset_size, Na, Nb)`` rows from each set (drawn without replacement by a generator
    seeded ``seed``). Returns ``(mean, std over subsets)``; can be slightly negative."""
    a = _as_2d_float64("feats_a", feats_a)
    b = _as_2d_float64("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dim, got {a.shape[1]} and {b.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"num_subsets must be >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}")
    m = min(subset_size, a.shape[0], b.shape[0])
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        x = a[torch.randperm(a.shape[0], generator=g)[:m]]
        y = b[torch.randperm(b.shape[0], generator=g)[:m]]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(float(off - 2 * kxy.sum() / (m * m)))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=False)) if len(values) > 1 else 0.0


def _covered(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    """For each row of ``points``: is it inside some ball (``centres``, ``radii``)?"""
    out = [(torch.cdist(points[i:i + chunk], centres) <= radii).any(1) for i in range(0, points.shape[0], chunk)]
    return torch.cat(out)


def precision_recall(real_feats, fake_feats, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the
    union of balls reaching every point's ``k``-th nearest neighbour in its own set; precision
    is the fraction of generated points inside the real manifold, recall the fraction of real
    points inside the generated one."""
    real = _as_2d_float64("real features", real_feats)
    fake = _as_2d_float64("generated features", fake_feats)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got "
                         f"{real.shape[0]} real and {fake.shape[0]} generated")

    def radii(x):  # distance to the k-th neighbour, the point itself excluded
        return torch.cat([torch.cdist(x[i:i + 1024], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, x.shape[0], 1024)])

    precision = float(_covered(fake, real, radii(real)).double().mean())
    recall = float(_covered(real, fake, radii(fake)).double().mean())
    return precision, recall


def stats_sha256(mu, sigma) -> str:
    """SHA-256 of the float64 bytes of ``mu`` then ``sigma``: which reference a score used."""
    h = hashlib.sha256()
    for arr in (mu, sigma):
        h.update(np.ascontiguousarray(torch.as_tensor(arr, dtype=torch.float64).numpy()).tobytes())
    return h.hexdigest()


def save_stats(path, mu, sigma) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=torch.as_tensor(mu).double().numpy(), sigma=torch.as_tensor(sigma).double().numpy())
    return path


def load_stats(path) -> tuple[Tensor, Tensor]:
    """``(mu, sigma)`` from a pytorch-fid style ``.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference statistics {str(path)!r} do not exist")
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"{path} must hold arrays 'mu' [D] and 'sigma' [D, D] (pytorch-fid's format); "
                             f"missing {missing}, found {f.files}")
        mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: expected mu [D] and sigma [D, D], got {list(mu.shape)} and {list(sigma.shape)}")
    return mu, sigma
