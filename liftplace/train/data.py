"""Datasets for distillation runs: built-in digits, an image folder, synthetic fields.

Every dataset returns ``{"pixel_values": Tensor[C, H, W] in [-1, 1], "label": int}``,
the layout diffusers' training examples feed to a ``UNet2DModel`` (a captioned folder
adds ``"caption": str``, diffusers' ``train_text_to_image.py`` layout); a model family
names the keys beyond ``pixel_values`` it takes as conditioning (``cond_keys``).
Nothing is downloaded: ``digits`` is scikit-learn's bundled 8x8 digits set, upscaled.

The datasets do not flip: the horizontal flip is :func:`random_hflip`, applied by the
trainer to a batch with the step's own generator, so a resumed run flips exactly as
the uninterrupted one whatever the DataLoader workers.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "DigitsDataset",
    "CaptionedImageDataset",
    "ImageFolderDataset",
    "SyntheticDataset",
    "flip_coins",
    "make_dataset",
    "random_hflip",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = ("train", "test", "all")


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    return resolution


def _check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
    return split


def _check_channels(channels) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return channels


def flip_coins(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` fair coins (bool ``[n]``) from ``generator`` (a CPU generator; one draw of ``n`` values)."""
    return torch.rand(n, generator=generator) < 0.5


def random_hflip(images: torch.Tensor, generator: torch.Generator, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Flip each image of ``images`` (``[B, C, H, W]``) horizontally with probability 0.5, the
    coins drawn from ``generator`` by :func:`flip_coins` (or given as ``flips``)."""
    flip = (flip_coins(images.shape[0], generator) if flips is None else flips).to(images.device)
    return torch.where(flip.view(-1, *([1] * (images.dim() - 1))), images.flip(-1), images)


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 digits (1797 images), upscaled to ``resolution``.

    Pixel values 0..16 are mapped to [-1, 1] (background -1, strokes towards +1) and
    upscaled bilinearly, so every image is ``[1, resolution, resolution]`` float32.

    ``split`` is ``"train"``, ``"test"`` or ``"all"``: a seeded permutation puts
    ``round(N * holdout_fraction)`` images in ``"test"`` and the rest in ``"train"``.
    The split depends only on ``seed`` and ``holdout_fraction``, not on
    ``resolution``, so a classifier and a diffusion model built at different
    resolutions agree on which images are held out.

    Attributes: ``images`` (``[N, 1, H, W]``), ``labels`` (LongTensor ``[N]``) and
    ``indices`` (positions in scikit-learn's array), all for the selected split.
    """

    num_classes = 10

    def __init__(
        self,
        resolution: int = 16,
        split: str = "train",
        holdout_fraction: float = 0.2,
        seed: int = 0,
    ):
        from sklearn.datasets import load_digits  # bundled with scikit-learn; no download

        self.resolution = _check_resolution(resolution)
        self.split = _check_split(split)
        if not 0.0 < float(holdout_fraction) < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
        self.holdout_fraction = float(holdout_fraction)
        self.seed = int(seed)

        digits = load_digits()
        raw = torch.from_numpy(digits.images.astype(np.float32))  # [N, 8, 8], 0..16
        targets = torch.from_numpy(digits.target.astype(np.int64))
        n = raw.shape[0]

        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_test = int(round(n * self.holdout_fraction))
        if split == "test":
            idx = perm[:n_test]
        elif split == "train":
            idx = perm[n_test:]
        else:
            idx = torch.arange(n)
        # Sorted so the order of samples does not depend on the permutation.
        self.indices = torch.sort(idx).values

        x = raw[self.indices].unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
        if resolution != 8:
            x = F.interpolate(
                x, size=(resolution, resolution), mode="bilinear",
                align_corners=False, antialias=resolution < 8,
            )
        # Bilinear up-sampling stays within the input range; the clamp covers rounding.
        self.images = (x * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()
        self.labels = targets[self.indices].clone()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i].clone(), "label": int(self.labels[i])}

    def __repr__(self) -> str:
        return (f"DigitsDataset(split={self.split!r}, n={len(self)}, "
                f"resolution={self.resolution}, seed={self.seed})")


class ImageFolderDataset(Dataset):
    """All images under ``root`` (searched recursively), for unconditional training.

    Each image is loaded with PIL, converted to ``"L"`` (``channels=1``) or ``"RGB"``
    (``channels=3``), its shorter side resized to ``resolution`` (bicubic), cropped
    to a square (centre, or random when ``center_crop=False``) and mapped to [-1, 1]:
    ``pixel_values`` is ``[channels, resolution, resolution]`` float32; ``label`` is 0.
    """

    def __init__(
        self,
        root,
        resolution: int,
        channels: int = 3,
        center_crop: bool = True,
        extensions=IMAGE_EXTENSIONS,
    ):
        self.root = Path(root)
        self.resolution = _check_resolution(resolution)
        self.channels = _check_channels(channels)
        self.center_crop = bool(center_crop)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower()
                                for e in extensions)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        self.files = sorted(
            p for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in self.extensions
        )
        if not self.files:
            raise ValueError(
                f"no images found in {str(self.root)!r} (searched recursively for "
                f"{', '.join(self.extensions)})"
            )

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path):
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot read image {str(path)!r}: {exc}") from exc
        return im

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self._square(self.files[i]), "label": 0}

    def _square(self, path: Path) -> torch.Tensor:
        """The image at ``path``: shorter side resized to ``resolution``, square-cropped, in [-1, 1]."""
        from PIL import Image

        im = self._load(path)
        res = self.resolution
        w, h = im.size
        scale = res / min(w, h)
        # max(res, ...) guards against rounding the shorter side to res - 1.
        new_w, new_h = max(res, round(w * scale)), max(res, round(h * scale))
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if self.center_crop:
            left, top = (new_w - res) // 2, (new_h - res) // 2
        else:
            left = int(torch.randint(0, new_w - res + 1, ()))
            top = int(torch.randint(0, new_h - res + 1, ()))
        im = im.crop((left, top, left + res, top + res))

        arr = np.asarray(im, dtype=np.float32)  # [H, W] or [H, W, 3], 0..255
        x = torch.from_numpy(arr.copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return (x / 127.5 - 1.0).contiguous()

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, "
                f"resolution={self.resolution}, channels={self.channels})")


METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def read_caption_metadata(root, image_column: str = "image", caption_column: str = "text"):
    """``[(image path, caption)]`` from ``root/metadata.jsonl`` or ``metadata.csv`` (diffusers'
    image-folder layout: the image's path relative to ``root`` in ``image_column`` or, as in
    ``datasets``' imagefolder, in ``file_name``). Errors name the file, the row and the column."""
    root = Path(root)
    meta = next((root / m for m in METADATA_FILES if (root / m).is_file()), None)
    if meta is None:
        raise ValueError(f"captioned data: {str(root)!r} has no {' or '.join(METADATA_FILES)} (one row per image "
                         f"with columns {image_column!r} or 'file_name', and {caption_column!r})")
    try:
        if meta.suffix == ".jsonl":
            rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        else:
            with open(meta, newline="") as f:
                rows = list(csv.DictReader(f))
    except (OSError, ValueError) as exc:
        raise ValueError(f"captioned data: cannot read {str(meta)!r}: {exc}") from exc
    if not rows:
        raise ValueError(f"captioned data: {str(meta)!r} lists no images")
    items = []
    for n, row in enumerate(rows, start=1):
        where = f"{str(meta)!r} row {n}"
        if not isinstance(row, dict):
            raise ValueError(f"captioned data: {where} is not an object with columns")
        key = image_column if image_column in row else "file_name"
        if key not in row:
            raise ValueError(f"captioned data: {where} has no image column {image_column!r} (nor 'file_name'); "
                             f"its columns: {', '.join(map(str, row))}; set image_column")
        if caption_column not in row:
            raise ValueError(f"captioned data: {where} has no caption column {caption_column!r}; its columns: "
                             f"{', '.join(map(str, row))}; set caption_column")
        caption = row[caption_column]
        if not isinstance(caption, str):
            raise ValueError(f"captioned data: {where}, column {caption_column!r}: the caption must be a string, "
                             f"got {caption!r}")
        path = root / str(row[key])
        if not path.is_file():
            raise ValueError(f"captioned data: {where}, column {key!r}: image {str(path)!r} does not exist")
        items.append((path, caption))
    return items


class CaptionedImageDataset(ImageFolderDataset):
    """Images with captions, in diffusers' ``train_text_to_image.py`` layout: ``root`` holds
    the images and ``metadata.jsonl`` / ``metadata.csv`` (see :func:`read_caption_metadata`).
    Items: ``{"pixel_values": [channels, resolution, resolution], "caption": str, "label": 0}``.
    Every image is opened once here, so an unreadable one fails before training starts."""

    def __init__(self, root, resolution: int, channels: int = 3, center_crop: bool = True,
                 image_column: str = "image", caption_column: str = "text", max_train_samples: int | None = None):
        from PIL import Image

        self.root = Path(root)
        self.resolution = _check_resolution(resolution)
        self.channels = _check_channels(channels)
        self.center_crop = bool(center_crop)
        if not self.root.is_dir():
            raise ValueError(f"captioned data: {str(self.root)!r} does not exist or is not a directory")
        items = read_caption_metadata(self.root, image_column, caption_column)
        if max_train_samples is not None:
            items = items[:max_train_samples]
        for path, _ in items:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; name the file
                raise ValueError(f"captioned data: cannot read image {str(path)!r} (column {image_column!r} of "
                                 f"{str(self.root)!r}'s metadata): {exc}") from exc
        self.files = [p for p, _ in items]
        self.captions = [c for _, c in items]

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self._square(self.files[i]), "caption": self.captions[i], "label": 0, "index": i}

    def __repr__(self) -> str:
        return (f"CaptionedImageDataset(root={str(self.root)!r}, n={len(self)}, "
                f"resolution={self.resolution}, channels={self.channels})")


class SyntheticDataset(Dataset):
    """Deterministic smooth random images in (-1, 1), for tests and smoke runs.

    Each image is a low-frequency random field (Gaussian noise on a 4x4 grid,
    upsampled bicubically) plus two to four Gaussian blobs of random position, width
    and sign, squashed with ``tanh``. The whole set is a function of ``seed``.
    ``label`` is 0 for every image; ``images`` holds the ``[N, C, H, W]`` tensor.
    """

    def __init__(self, num_samples: int = 64, resolution: int = 16, channels: int = 1, seed: int = 0):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.num_samples = num_samples
        self.resolution = _check_resolution(resolution)
        self.channels = channels
        self.seed = int(seed)

        g = torch.Generator().manual_seed(self.seed)
        n, c, res = num_samples, channels, resolution
        coarse = torch.randn(n, c, 4, 4, generator=g)
        field = F.interpolate(coarse, size=(res, res), mode="bicubic", align_corners=True)

        k = 4  # blob slots; each active with probability so images hold 2..4 blobs
        centers = torch.rand(n, c, k, 2, generator=g)  # in [0, 1]^2
        widths = 0.08 + 0.17 * torch.rand(n, c, k, generator=g)
        signs = torch.where(torch.rand(n, c, k, generator=g) < 0.5, -1.0, 1.0)
        active = torch.rand(n, c, k, generator=g) < 0.75
        active[..., :2] = True
        coords = (torch.arange(res, dtype=torch.float32) + 0.5) / res
        dy = coords.view(1, 1, 1, res, 1) - centers[..., 0].unsqueeze(-1).unsqueeze(-1)
        dx = coords.view(1, 1, 1, 1, res) - centers[..., 1].unsqueeze(-1).unsqueeze(-1)
        w2 = (widths ** 2).unsqueeze(-1).unsqueeze(-1)
        blobs = torch.exp(-(dx ** 2 + dy ** 2) / (2 * w2))  # [n, c, k, res, res]
        blobs = (blobs * (signs * active).unsqueeze(-1).unsqueeze(-1)).sum(2)

        self.images = torch.tanh(0.5 * field + 1.5 * blobs).contiguous()
        self.labels = torch.zeros(n, dtype=torch.long)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i].clone(), "label": 0}

    def __repr__(self) -> str:
        return (f"SyntheticDataset(n={self.num_samples}, resolution={self.resolution}, "
                f"channels={self.channels}, seed={self.seed})")


# A fixed offset keeps synthetic "test" images disjoint from "train" images of the same seed.
_SYNTHETIC_TEST_SEED_OFFSET = 1_000_003

_EXTRA_OPTIONS = {
    "digits": ("holdout_fraction",),
    "synthetic": ("num_samples",),
    "folder": ("center_crop", "extensions"),
}


def _check_options(kind: str, kw: dict) -> None:
    unknown = sorted(set(kw) - set(_EXTRA_OPTIONS[kind]))
    if unknown:
        raise TypeError(
            f"unknown option(s) for the {kind!r} dataset: {', '.join(unknown)} "
            f"(accepted: {', '.join(_EXTRA_OPTIONS[kind]) or 'none'})"
        )


def make_dataset(
    name,
    resolution: int,
    channels: int,
    *,
    split: str = "train",
    seed: int = 0,
    **kw,
) -> Dataset:
    """Build a dataset by name: ``"digits"``, ``"synthetic"``, or a path to an image folder.

    - ``"digits"``: :class:`DigitsDataset`; needs ``channels=1``; option ``holdout_fraction``.
    - ``"synthetic"``: :class:`SyntheticDataset`; option ``num_samples``. ``split="test"``
      draws from a different seed than ``"train"``/``"all"``, so the sets differ.
    - a directory: :class:`ImageFolderDataset`; options ``center_crop``, ``extensions``.
      The folder is the training set: ``"train"`` and ``"all"`` give every image,
      ``"test"`` is an error (pass a separate folder for evaluation).

    The built-in names take precedence over directories of the same name.
    """
    resolution = _check_resolution(resolution)
    split = _check_split(split)
    if name == "digits":
        _check_options("digits", kw)
        if channels != 1:
            raise ValueError(
                f"the 'digits' dataset is grayscale (1 channel) but channels={channels!r}; "
                "use models with in_channels=out_channels=1"
            )
        return DigitsDataset(resolution=resolution, split=split, seed=seed, **kw)
    if name == "synthetic":
        _check_options("synthetic", kw)
        s = seed + _SYNTHETIC_TEST_SEED_OFFSET if split == "test" else seed
        return SyntheticDataset(resolution=resolution, channels=channels, seed=s, **kw)
    if isinstance(name, (str, os.PathLike)) and Path(name).is_dir():
        _check_options("folder", kw)
        if split == "test":
            raise ValueError(
                f"image folder {str(name)!r} has no held-out split (split='test'); "
                "pass a separate folder for evaluation"
            )
        return ImageFolderDataset(name, resolution, channels=channels, **kw)
    raise ValueError(
        f"unknown dataset {str(name)!r}: expected 'digits', 'synthetic' or the path of an "
        f"existing image folder (no directory {str(name)!r} exists)"
    )
