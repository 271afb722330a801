"""``liftplace train-classifier``: the small CNN whose features a dataset-specific Fréchet
distance uses (``liftplace eval --features classifier:PATH``), trained on the built-in
digits or on a labelled folder (``root/<class name>/*.png``), saved as one safetensors file.

The digits classifier is :func:`liftplace.eval.metrics.train_digits_classifier`, the one
the demo trains; a labelled folder goes through the same fitting loop.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..train.data import ImageFolderDataset
from .metrics import DigitsClassifier, _fit_classifier, train_digits_classifier

__all__ = ["LabelledFolder", "file_sha256", "load_classifier", "save_classifier", "train_classifier"]

_ARCH_KEYS = ("num_classes", "width", "feature_dim", "in_channels")


class LabelledFolder:
    """``root/<class>/...`` images (one subfolder per class, sorted names = labels 0..K-1),
    loaded as ``images`` [N, C, R, R] in [-1, 1] and ``labels`` [N]; ``split`` takes a seeded
    ``holdout_fraction`` of each class as ``"test"`` and the rest as ``"train"``."""

    def __init__(self, root, resolution: int, channels: int = 3, split: str = "train",
                 holdout_fraction: float = 0.2, seed: int = 0):
        root = Path(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if len(classes) < 2:
            raise ValueError(f"{str(root)!r} must hold one subfolder of images per class (at least 2), "
                             f"found {len(classes)}")
        self.classes, self.num_classes = classes, len(classes)
        g = torch.Generator().manual_seed(seed)
        images, labels = [], []
        for label, name in enumerate(classes):
            ds = ImageFolderDataset(root / name, resolution, channels=channels)
            x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
            perm = torch.randperm(x.shape[0], generator=g)
            n_test = max(1, round(x.shape[0] * holdout_fraction))
            keep = perm[:n_test] if split == "test" else perm[n_test:]
            images.append(x[keep.sort().values])
            labels.append(torch.full((keep.numel(),), label, dtype=torch.long))
        self.images, self.labels = torch.cat(images), torch.cat(labels)


def train_classifier(data: str = "digits", *, resolution: int = 16, channels: int = 1, seed: int = 0,
                     epochs: int = 20, device="cpu"):
    """``(model, held-out accuracy, metadata)`` for ``data`` = ``"digits"`` or a labelled folder."""
    if data == "digits":
        model, acc = train_digits_classifier(resolution=resolution, seed=seed, epochs=epochs, device=device)
    else:
        train = LabelledFolder(data, resolution, channels, "train", seed=seed)
        test = LabelledFolder(data, resolution, channels, "test", seed=seed)
        model, acc = _fit_classifier(train, test, seed, epochs, torch.device(device), 64, 3e-3, True)
    meta = {"data": str(data), "resolution": resolution, "seed": seed, "epochs": epochs, "accuracy": acc,
            "num_classes": model.head.out_features, "width": model.body[0].out_channels,
            "feature_dim": model.feature_dim, "in_channels": model.body[0].in_channels}
    return model, acc, meta


def save_classifier(model: DigitsClassifier, path, meta: dict) -> Path:
    """Weights and ``meta`` (architecture, resolution, accuracy) in one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"liftplace_classifier": json.dumps(meta)})
    return path


def load_classifier(path) -> tuple[DigitsClassifier, dict]:
    """``(model in eval mode, metadata)`` from :func:`save_classifier`'s file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"classifier file {str(path)!r} does not exist; train one with "
                         f"`liftplace train-classifier --output {path}`")
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("liftplace_classifier")
    if raw is None:
        raise ValueError(f"{path} is not a liftplace classifier (no 'liftplace_classifier' metadata); "
                         "make one with `liftplace train-classifier`")
    meta = json.loads(raw)
    model = DigitsClassifier(**{k: meta[k] for k in _ARCH_KEYS})
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
