"""Evaluation: a small digits classifier, a Fréchet distance in its feature space,
and agreement between a student and its teacher on held-out noisy inputs.

The Fréchet distance between Gaussians fitted to classifier features is the
dataset-specific stand-in for FID: FID uses an Inception network trained on
ImageNet, which would need a download and says little about 16x16 digits; a CNN
trained in seconds on the digits themselves gives features that separate good
digits from bad ones at this scale. Numbers are comparable between runs that use
the same classifier (same resolution and seed), not with published FIDs.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train.data import DigitsDataset
from .frechet import _as_2d_float64, frechet_distance_from_stats, gaussian_stats

__all__ = [
    "DigitsClassifier",
    "frechet_distance",
    "sample_quality",
    "teacher_agreement",
    "train_digits_classifier",
]

logger = logging.getLogger(__name__)


class DigitsClassifier(nn.Module):
    """A small CNN for ``[N, in_channels, res, res]`` images in [-1, 1] (any res >= 8).

    ``features(x)`` is the ``feature_dim``-wide penultimate layer, taken before its
    ReLU so that no unit is identically zero (a dead unit would make the feature
    covariance singular); ``forward(x)`` gives logits ``[N, 10]``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = 64, in_channels: int = 1):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(inplace=True),
            # Adaptive pooling makes the head independent of the input resolution.
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:  # x: [N, 1, H, W] -> [N, D]
        return self.fc(self.body(x))

    def forward(self, x: Tensor) -> Tensor:  # x: [N, 1, H, W] -> [N, num_classes]
        return self.head(F.relu(self.features(x)))


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Small random affine jitter (shift, rotation, scale) and pixel noise."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) - 0.5) * (2 * math.radians(10))
    scale = 1.0 + (torch.rand(n, generator=g) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.25  # up to 1/8 of the image
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Shift so the background (-1) becomes 0, the value grid_sample pads with.
    out = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False) - 1.0
    # Generated samples are rarely clean; mild noise keeps the features robust to that.
    out = out + 0.05 * torch.randn(out.shape, generator=g)
    return out.clamp_(-1.0, 1.0)


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        pred = model(images[i:i + batch_size]).argmax(1)
        correct += int((pred == labels[i:i + batch_size]).sum())
    return correct / max(1, images.shape[0])


def train_digits_classifier(
    resolution: int = 16,
    seed: int = 0,
    epochs: int = 20,
    device="cpu",
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    holdout_fraction: float = 0.2,
    augment: bool = True,
    num_threads: int | None = 1,
) -> tuple[DigitsClassifier, float]:
    """Train :class:`DigitsClassifier` on ``DigitsDataset(split="train")``.

    Adam with a one-cycle learning rate (short warm-up, cosine decay) and light
    augmentation (small affine jitter, pixel noise); a few seconds on
    two CPU cores at resolution 16. The caller's global RNG state is left untouched
    (initialisation runs under ``torch.random.fork_rng``), and shuffling and
    augmentation use their own seeded generator, so the result is a function of
    ``seed`` (bitwise, for a given torch build and ``num_threads``).

    On CPU, training runs with ``num_threads`` torch threads (restored afterwards).
    One is the default: the convolutions are too small to gain from more, a fixed
    count makes the weights identical on every machine, and on a busy machine
    multi-threaded tiny ops were measured 10x slower. ``None`` keeps torch's setting.

    Returns ``(model in eval mode, accuracy on DigitsDataset(split="test"))``, the
    accuracy a float in [0, 1]. Both splits use ``seed``, so they are disjoint.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    device = torch.device(device)
    train = DigitsDataset(resolution, split="train", holdout_fraction=holdout_fraction, seed=seed)
    test = DigitsDataset(resolution, split="test", holdout_fraction=holdout_fraction, seed=seed)

    prev_threads = torch.get_num_threads()
    if num_threads is not None and device.type == "cpu":
        torch.set_num_threads(num_threads)
    try:
        model, acc = _fit_classifier(train, test, seed, epochs, device, batch_size, lr, augment)
    finally:
        torch.set_num_threads(prev_threads)
    return model, acc


def _fit_classifier(train, test, seed, epochs, device, batch_size, lr, augment):
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # a labelled folder (liftplace.eval.classifier) may be RGB or have other than 10 classes
        model = DigitsClassifier(num_classes=train.num_classes, in_channels=train.images.shape[1]).to(device)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = train.images, train.labels
    n = x_all.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total, pct_start=0.15, anneal_strategy="cos"
    )

    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        running = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = x_all[idx]
            if augment:
                x = _augment(x, g)
            loss = F.cross_entropy(model(x.to(device)), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * idx.numel()
        logger.debug("digits classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, running / n)

    model.eval()
    acc = _accuracy(model, test.images.to(device), test.labels.to(device))
    logger.info("digits classifier: held-out accuracy %.4f after %d epochs (%.1f s)",
                acc, epochs, time.perf_counter() - t0)
    return model, acc


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``feats_a`` [Na, D] and ``feats_b`` [Nb, D].

        d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)

    (the quantity FID reports; here in the feature space of whatever network made
    the features — :class:`DigitsClassifier` for the digits stand-in for FID).
    Computed in float64. The trace of the cross term is the sum of square roots of
    the eigenvalues of the symmetric PSD matrix ``S_a^1/2 S_b S_a^1/2`` (the same
    eigenvalues as ``S_a S_b``), so it needs no complex ``sqrtm`` and stays finite
    for singular covariances (fewer samples than dimensions, dead features).
    Covariances are unbiased (``N - 1``), as in ``numpy.cov``.
    """
    a = _as_2d_float64("feats_a", feats_a)
    b = _as_2d_float64("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feats_a and feats_b must have the same feature dim, got {a.shape[1]} and {b.shape[1]}"
        )
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def _model_device_dtype(model, fallback: Tensor) -> tuple[torch.device, torch.dtype]:
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device, p.dtype
    return fallback.device, fallback.dtype


@torch.no_grad()
def _batched(fn, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def sample_quality(
    classifier: DigitsClassifier, images: Tensor, reference: Tensor, *, batch_size: int = 512
) -> dict:
    """Quality of generated ``images`` [N, 1, H, W] against real ``reference`` [M, 1, H, W].

    Returns ``{"frechet": Fréchet distance of classifier features (lower is better),
    "confidence": mean max softmax probability over the generated images (higher:
    more digit-like), "class_entropy": entropy in nats of the histogram of predicted
    classes (log 10 = 2.303 when every class is equally frequent; low values mean
    mode collapse)}``. Images are used as given (no clamping), in [-1, 1] like the
    classifier's training data.
    """
    for name, t in (("images", images), ("reference", reference)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape [N, C, H, W], got {shape}")
    if images.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"images {list(images.shape)} and reference {list(reference.shape)} must have "
            "the same [C, H, W]"
        )
    was_training = classifier.training
    classifier.eval()
    try:
        device, dtype = _model_device_dtype(classifier, images)
        prep = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731

        feats_gen = _batched(lambda x: classifier.features(prep(x)), images, batch_size)
        feats_ref = _batched(lambda x: classifier.features(prep(x)), reference, batch_size)
        logits = _batched(lambda x: classifier(prep(x)), images, batch_size).double()
    finally:
        classifier.train(was_training)

    probs = logits.softmax(-1)
    counts = torch.bincount(probs.argmax(-1).cpu(), minlength=probs.shape[-1]).double()
    hist = counts / counts.sum()
    nz = hist[hist > 0]
    return {
        "frechet": frechet_distance(feats_gen, feats_ref),
        "confidence": float(probs.max(-1).values.mean()),
        "class_entropy": float(-(nz * nz.log()).sum()),
    }


def _output_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]  # diffusers models with return_dict=False
    raise TypeError(
        f"model output must be a Tensor, an object with .sample, or a tuple; got {type(out).__name__}"
    )


def _predicted_x0(out: Tensor, noisy: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    a = alpha_bar.sqrt().view(-1, *([1] * (noisy.ndim - 1)))
    s = (1 - alpha_bar).sqrt().view(-1, *([1] * (noisy.ndim - 1)))
    if prediction_type == "epsilon":
        return (noisy - s * out) / a
    if prediction_type == "v_prediction":
        return a * noisy - s * out
    return out  # "sample"


@torch.no_grad()
def teacher_agreement(
    student,
    teacher,
    scheduler,
    images: Tensor,
    *,
    num_timesteps: int = 8,
    seed: int = 0,
    prediction_type: str | None = None,
    batch_size: int = 64,
) -> dict:
    """How closely ``student`` reproduces ``teacher`` on held-out noisy inputs.

    ``images`` [N, C, H, W] (clean, in the model's data range) are noised with
    ``scheduler.add_noise`` at ``num_timesteps`` evenly spaced timesteps over
    ``[0, num_train_timesteps - 1]``, with noise from a generator seeded by ``seed``
    (one draw of ``[N, C, H, W]`` per timestep, so results do not depend on
    ``batch_size``). Both models get the same ``(noisy, t)``; their outputs
    (``model(sample, timestep).sample``, a plain tensor, or ``[0]`` of a tuple) are
    compared in float32:

    - ``"output_mse"``: mean squared difference over every element and timestep;
    - ``"per_timestep"``: ``{int(t): mse}``;
    - ``"cosine"``: mean cosine similarity of each sample's flattened outputs;
    - ``"x0_mse"``: the same MSE after converting both outputs to the predicted clean
      image with ``prediction_type`` (default ``scheduler.config.prediction_type``),
      which compares runs with different prediction types on one scale. Present only
      when the scheduler has ``alphas_cumprod`` (DDPM/DDIM-style schedules).

    Models are put in eval mode for the call and restored afterwards; inputs are
    cast to each model's parameter device and dtype (a bf16 teacher works).
    """
    if not isinstance(images, Tensor) or images.ndim < 2 or images.shape[0] == 0:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty tensor of shape [N, C, ...], got {shape}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    config = getattr(scheduler, "config", None)
    T = int(getattr(config, "num_train_timesteps", 0) or 0)
    if T < 1:
        raise ValueError("scheduler.config.num_train_timesteps must be a positive int")
    if num_timesteps > T:
        raise ValueError(f"num_timesteps={num_timesteps} exceeds the schedule's {T} timesteps")
    if prediction_type is None:
        prediction_type = getattr(config, "prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            "prediction_type must be 'epsilon', 'v_prediction' or 'sample', "
            f"got {prediction_type!r}"
        )
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)

    timesteps = torch.linspace(0, T - 1, num_timesteps).round().long().unique()
    clean = images.detach().float()
    n = clean.shape[0]
    g = torch.Generator().manual_seed(seed)
    modes = [(m, m.training) for m in (student, teacher) if isinstance(m, nn.Module)]
    for m, _ in modes:
        m.eval()

    def run(model, noisy: Tensor, t: Tensor) -> Tensor:
        device, dtype = _model_device_dtype(model, noisy)
        if not dtype.is_floating_point:
            dtype = noisy.dtype
        out = _output_tensor(model(noisy.to(device=device, dtype=dtype), t.to(device)))
        return out.to(device=clean.device, dtype=torch.float32)

    per_t: dict[int, float] = {}
    x0_sq, x0_count = 0.0, 0
    cos_sum = 0.0
    try:
        for t in timesteps.tolist():
            noise = torch.randn(clean.shape, generator=g).to(clean.device)
            t_batch = torch.full((n,), t, dtype=torch.long, device=clean.device)
            noisy = scheduler.add_noise(clean, noise, t_batch)
            sq, count = 0.0, 0
            for i in range(0, n, batch_size):
                x, tb = noisy[i:i + batch_size], t_batch[i:i + batch_size]
                s_out, t_out = run(student, x, tb), run(teacher, x, tb)
                if s_out.shape != t_out.shape:
                    raise ValueError(
                        f"student output {list(s_out.shape)} and teacher output "
                        f"{list(t_out.shape)} must have the same shape"
                    )
                sq += float((s_out.double() - t_out.double()).square().sum())
                count += s_out.numel()
                cos_sum += float(F.cosine_similarity(
                    s_out.flatten(1).double(), t_out.flatten(1).double(), dim=1).sum())
                if alphas_cumprod is not None:
                    ab = alphas_cumprod.to(clean.device, torch.float64)[tb]
                    x0_s = _predicted_x0(s_out.double(), x.double(), ab, prediction_type)
                    x0_t = _predicted_x0(t_out.double(), x.double(), ab, prediction_type)
                    x0_sq += float((x0_s - x0_t).square().sum())
                    x0_count += x0_s.numel()
            per_t[int(t)] = sq / count
    finally:
        for m, mode in modes:
            m.train(mode)

    n_t = len(per_t)
    result = {
        "output_mse": sum(per_t.values()) / n_t,
        "per_timestep": per_t,
        "cosine": cos_sum / (n * n_t),
    }
    if alphas_cumprod is not None:
        result["x0_mse"] = x0_sq / x0_count
    return result
