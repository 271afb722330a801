"""``liftplace eval``: Fréchet distance (FID with Inception features) and KID of generated
images against a reference, with the protocol recorded beside every score.

Generated images come from a folder, or are sampled from a model folder with the DDIM
sampler into a sample folder (image ``i`` from seed ``seed + i`` alone, so the set does not
depend on the batch size; images already there are kept, so an interrupted run resumes).
The reference is an image folder, a built-in dataset (``digits``) or pytorch-fid style
``.npz`` statistics. Features:

- ``classifier:PATH``: a :class:`~liftplace.eval.metrics.DigitsClassifier` saved by
  ``liftplace train-classifier`` (the demo's digits metric; images resized bilinearly to
  its resolution when they differ);
- ``inception``: torch-fidelity's ``inception-v3-compat`` (the TF-FID network that
  torchmetrics also uses) with weights from ``--inception_weights PATH``; nothing is
  downloaded.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..train.data import IMAGE_EXTENSIONS
from .classifier import file_sha256, load_classifier
from .cost import _check_unconditional
from .frechet import (frechet_distance_from_stats, gaussian_stats, kid, load_stats, precision_recall, save_stats,
                      stats_sha256)

__all__ = ["ClassifierFeatures", "InceptionFeatures", "evaluate", "generate_samples", "load_images",
           "make_extractor"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
SEED_POLICY = "image i is sampled from noise seeded seed + i alone (independent of batch size and N)"


# --- images -----------------------------------------------------------------------------------

def image_files(folder, *, limit: int | None = None, what: str = "images") -> list[Path]:
    """The image files directly in ``folder``, sorted by name (the order every score pairs them in)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what} folder {str(folder)!r} does not exist")
    # grid.png is the overview `liftplace sample` writes beside its images, not a sample
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.name != "grid.png")
    return files[:limit] if limit is not None else files


def load_images(folder, *, limit: int | None = None, what: str = "images") -> Tensor:
    """uint8 ``[N, C, H, W]`` of the images directly in ``folder`` (sorted by name, ``grid.png``
    skipped), C = 1 for grayscale files and 3 for RGB; every image must have the same size and
    channels."""
    from PIL import Image

    folder = Path(folder)
    files = image_files(folder, limit=limit, what=what)
    if not files:
        raise ValueError(f"{what} folder {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                         "point at the folder that holds the image files")
    arrays, first = [], None
    for p in files:
        with Image.open(p) as im:
            if im.mode in ("1", "L", "I;16", "I"):
                im = im.convert("L")
            elif im.mode not in ("RGB", "L"):
                raise ValueError(f"{p}: image mode {im.mode!r} is neither grayscale nor RGB; convert the "
                                 f"{what} to L or RGB first")
            a = np.asarray(im, dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if first is None:
            first = (p, a.shape)
        elif a.shape != first[1]:
            raise ValueError(f"{what} in {folder} differ in size or channels: {first[0].name} is "
                             f"{_shape_text(first[1])}, {p.name} is {_shape_text(a.shape)}; every image must "
                             "share one size and channel count (resize/convert them first)")
        arrays.append(a)
    return torch.from_numpy(np.stack(arrays))


def _shape_text(chw) -> str:
    return f"{chw[2]}x{chw[1]} with {chw[0]} channel{'s' if chw[0] > 1 else ''}"


def to_float(images_u8: Tensor) -> Tensor:
    """uint8 -> float32 in [-1, 1], the data range of the models and the digits classifier."""
    return images_u8.float() / 127.5 - 1.0


# --- feature extractors ---------------------------------------------------------------------------

class ClassifierFeatures:
    """Penultimate-layer features of a classifier from ``liftplace train-classifier``."""

    def __init__(self, path, device="cpu", batch_size: int = 512):
        self.model, self.meta = load_classifier(path)
        self.model.to(device)
        self.device, self.batch_size = torch.device(device), batch_size
        self.feature_dim = self.model.feature_dim
        self.resolution = int(self.meta["resolution"])
        self.protocol = {"name": "classifier", "path": str(path), "sha256": file_sha256(path),
                         "feature_dim": self.feature_dim, "trained_on": self.meta.get("data"),
                         "heldout_accuracy": self.meta.get("accuracy"), "input": "[-1, 1] float32",
                         "resolution": self.resolution}

    def resize_method(self, hw) -> str:
        return "none" if tuple(hw) == (self.resolution,) * 2 else (
            f"bilinear (antialias) {hw[0]}x{hw[1]} -> {self.resolution}x{self.resolution}")

    @torch.no_grad()
    def __call__(self, images_u8: Tensor) -> Tensor:  # [N, C, H, W] uint8 -> [N, D] float64
        return self.features(to_float(images_u8))

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:  # [N, C, H, W] in [-1, 1] -> [N, D]
        c = self.meta["in_channels"]
        if images.shape[1] != c:
            raise ValueError(f"the classifier takes {c}-channel images, got {images.shape[1]} channels; "
                             "train a classifier on data like these images (liftplace train-classifier)")
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i:i + self.batch_size].to(self.device)
            if x.shape[-2:] != (self.resolution, self.resolution):
                x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False,
                                  antialias=True)
            out.append(self.model.features(x).double().cpu())
        return torch.cat(out)


class InceptionFeatures:
    """torch-fidelity's ``inception-v3-compat`` pool features (2048-d), weights from a local file."""

    feature_dim = 2048

    def __init__(self, weights_path, device="cpu", batch_size: int = 64):
        if weights_path is None or not Path(weights_path).is_file():
            raise ValueError(
                f"--features inception needs the Inception weights as a local file: pass --inception_weights "
                f"PATH to {INCEPTION_FILE} (download it once, on a machine with internet, from {INCEPTION_URL}); "
                + ("no path was given" if weights_path is None else f"{str(weights_path)!r} does not exist"))
        try:
            import torch_fidelity
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError on import
            raise ValueError(
                f"--features inception needs torch-fidelity, which did not import ({type(exc).__name__}: {exc}). "
                "Install the eval extra, `pip install 'liftplace[eval]'`, with a torchvision built for this torch "
                f"({torch.__version__}): a CPU torch needs torchvision from https://download.pytorch.org/whl/cpu "
                "(the PyPI torchvision wheel is the CUDA build and fails with 'operator torchvision::nms does "
                "not exist'). Or use --features classifier:PATH.") from exc
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                 feature_extractor_weights_path=str(weights_path)).eval().to(device)
        self.device, self.batch_size = torch.device(device), batch_size
        self.protocol = {"name": "inception-v3-compat (torch-fidelity)", "path": str(weights_path),
                         "sha256": file_sha256(weights_path), "feature_dim": 2048,
                         "torch_fidelity": torch_fidelity.__version__, "input": "uint8 RGB (gray repeated)",
                         "resolution": 299}

    def resize_method(self, hw) -> str:
        return f"torch-fidelity TF1-compatible bilinear {hw[0]}x{hw[1]} -> 299x299"

    @torch.no_grad()
    def __call__(self, images_u8: Tensor) -> Tensor:
        out = []
        for i in range(0, images_u8.shape[0], self.batch_size):
            x = images_u8[i:i + self.batch_size]
            x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
            out.append(self.model(x.to(self.device))[0].double().cpu())
        return torch.cat(out)


def make_extractor(spec: str, *, inception_weights=None, device="cpu"):
    if spec == "inception":
        return InceptionFeatures(inception_weights, device)
    if spec.startswith("classifier:"):
        return ClassifierFeatures(spec[len("classifier:"):], device)
    raise ValueError(f"--features must be 'inception' or 'classifier:PATH', got {spec!r}")


# --- generated images -----------------------------------------------------------------------------

def generate_samples(model_path, samples_dir, num_images: int, *, batch_size: int = 64, num_inference_steps: int = 50,
                     eta: float = 0.0, seed: int = 0, device=None, progress: bool = True,
                     guidance_scale: float = 1.0) -> dict:
    """Sample images ``000000.png`` ... into ``samples_dir``, keeping those already there (a
    resumed run draws only the missing ones). Unconditional models: DDIM (or the sampler of
    their flow-matching / learned-variance scheduler). Class-conditional DiTs: image ``i`` has
    class ``i % K`` (balanced classes), guided by ``guidance_scale`` against the null class.
    ``samples.json`` records the settings; a folder made with other settings is refused.
    Returns that record."""
    from ..train.dit import LatentEncoder
    from ..train.sampling import sample_images, scheduler_from_config
    from ..train.sampling import ddim_sample, ddim_scheduler_from, load_for_sampling, save_images
    from .cost import sampler_name

    for key, v in (("num_images", num_images), ("batch_size", batch_size), ("num_inference_steps",
                                                                          num_inference_steps)):
        if v < 1:
            raise ValueError(f"--{key} must be >= 1, got {v}")
    family, model, sched_cfg, model_dir = load_for_sampling(model_path)
    labelled = family.name == "dit"
    if not labelled:
        _check_unconditional(family)
    scheduler = scheduler_from_config(sched_cfg)
    plain_ddim = not labelled and sampler_name(scheduler).startswith("DDIM")
    if eta != 0.0 and not plain_ddim:
        raise ValueError(f"--eta {eta}: this model samples with {sampler_name(scheduler)}, which has no eta; "
                         "leave --eta at 0")
    if guidance_scale != 1.0 and not labelled:
        raise ValueError(f"--guidance_scale {guidance_scale}: the {family.name} model in {model_dir} is "
                         "unconditional; leave it at 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    samples_dir = Path(samples_dir)
    num_classes = family.null_class(dict(model.config)) if labelled else None
    record = {"model": str(model_path), "model_dir": str(model_dir),
              "sampler": "DDIM" if plain_ddim else sampler_name(scheduler),  # DDIM's eta is its own field
              "num_inference_steps": num_inference_steps, "eta": eta,
              "guidance": guidance_scale if labelled else None, "seed": seed, "seed_policy": SEED_POLICY,
              "class_labels": f"image i has class i % {num_classes}" if labelled else None}
    rec_path = samples_dir / "samples.json"
    if rec_path.is_file():
        old = json.loads(rec_path.read_text())
        if any(old.get(k) != record[k] for k in ("model_dir", "num_inference_steps", "eta", "seed", "guidance")):
            raise ValueError(f"{samples_dir} holds samples made with other settings ({rec_path}: {old}); "
                             "pass another --samples_dir or delete that folder")
    samples_dir.mkdir(parents=True, exist_ok=True)
    rec_path.write_text(json.dumps(record, indent=2))
    missing = [i for i in range(num_images) if not (samples_dir / f"{i:06d}.png").is_file()]
    runs = [missing[k:k + batch_size] for k in range(0, len(missing), batch_size)]
    bar = None
    if progress and missing:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc="sampling", unit="img")
    shape = family.sample_shape(dict(model.config))
    sched = ddim_scheduler_from(sched_cfg)
    vae = LatentEncoder(_load_vae(model_dir / "vae"), device=device) if (model_dir / "vae").is_dir() else None
    for run in runs:
        # a batch of consecutive indices from the missing list: split where indices jump
        groups, start = [], 0
        for j in range(1, len(run) + 1):
            if j == len(run) or run[j] != run[j - 1] + 1:
                groups.append(run[start:j])
                start = j
        for g in groups:
            if plain_ddim:
                images = ddim_sample(family, model, sched, len(g), shape, seed=seed + g[0],
                                     num_inference_steps=num_inference_steps, eta=eta, batch_size=len(g),
                                     device=device)
            else:
                cond = uncond = None
                if labelled:
                    cond = {"label": torch.tensor([i % num_classes for i in g])}
                    uncond = {"label": torch.tensor([num_classes])}
                images = sample_images(family, model, scheduler, len(g), shape, seed=seed + g[0],
                                       num_inference_steps=num_inference_steps, batch_size=len(g), device=device,
                                       cond=cond, uncond=uncond, guidance_scale=guidance_scale, clamp=vae is None)
                if vae is not None:  # a latent DiT exported with its VAE
                    images = vae.decode(images).cpu().clamp(-1, 1)
            save_images(images, samples_dir, first_index=g[0])
        if bar is not None:
            bar.update(len(run))
    if bar is not None:
        bar.close()
    record["reused"] = num_images - len(missing)
    return record


def _load_vae(path):
    from ..train.latent import load_vae

    return load_vae(path)


# --- the evaluation -------------------------------------------------------------------------------

def _reference(reference: str, extractor, image_hw, channels: int, limit: int | None):
    """``(mu, sigma, feats or None, description)`` of the reference."""
    if reference.endswith(".npz"):
        mu, sigma = load_stats(reference)
        if mu.shape[0] != extractor.feature_dim:
            raise ValueError(f"{reference} holds {mu.shape[0]}-d statistics but the features are "
                             f"{extractor.feature_dim}-d; use statistics made with the same extractor")
        return mu, sigma, None, {"kind": "npz statistics", "path": reference, "n": None,
                                 "file_sha256": file_sha256(reference)}
    if reference in ("digits", "builtin:digits"):
        from ..train.data import DigitsDataset

        if channels != 1 or image_hw[0] != image_hw[1]:
            raise ValueError(f"--reference digits is 1-channel square; the images are {channels}-channel "
                             f"{image_hw[1]}x{image_hw[0]}")
        x = DigitsDataset(image_hw[0], split="train", seed=0).images
        feats = extractor.features(x) if hasattr(extractor, "features") else extractor(
            ((x + 1) * 127.5).round().to(torch.uint8))
        desc = {"kind": "built-in digits (train split, seed 0, float images)", "path": "digits",
                "n": x.shape[0], "resolution": image_hw[0]}
    else:
        u8 = load_images(reference, limit=limit, what="reference images")
        if u8.shape[1] != channels:
            raise ValueError(f"reference images have {u8.shape[1]} channels, generated ones {channels}")
        feats = extractor(u8)
        desc = {"kind": "image folder", "path": reference, "n": u8.shape[0], "size": list(u8.shape[1:])}
    mu, sigma = gaussian_stats(feats, "reference features")
    return mu, sigma, feats, desc


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for pkg in ("liftplace", "diffusers", "torch-fidelity", "torchvision"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def evaluate(*, images=None, model=None, reference: str | None = None, features: str | None = None, output_dir,
             inception_weights=None, clip_model=None, prompts=None,
             num_images: int = 1000, batch_size: int = 64, num_inference_steps: int = 50, eta: float = 0.0,
             seed: int = 0, samples_dir=None, device=None, guidance_scale: float = 1.0, kid_subsets: int = 100,
             kid_subset_size: int = 1000,
             reference_limit: int | None = None, save_reference_stats=None, allow_small_n: bool = False,
             precision_recall_k: int | None = None) -> dict:
    """Score ``images`` (a folder) or ``model`` (sampled first): the Fréchet distance (and KID)
    against ``reference`` in ``features``, and/or the CLIP score against ``prompts`` with
    ``clip_model``; writes ``output_dir/scores.json`` and returns it."""
    t0 = time.perf_counter()
    if (images is None) == (model is None):
        raise ValueError("pass exactly one of --images DIR and --model PATH")
    if (reference is None) != (features is None):
        raise ValueError("--reference and --features go together: pass both (a Fréchet distance) or neither")
    if features is None and clip_model is None:
        raise ValueError("nothing to compute: pass --reference and --features (FID/KID), or --clip_model with "
                         "--prompts (CLIP score), or both")
    if (clip_model is None) != (prompts is None):
        raise ValueError("--clip_model and --prompts go together: the CLIP score pairs each image with its prompt")
    if clip_model is not None and model is not None:
        raise ValueError("--clip_model scores an --images folder against --prompts; sample the text-to-image model "
                         "first (`liftplace sample --prompt ...`), then pass that folder as --images")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(output_dir)
    if clip_model is not None:
        from .clip_score import load_clip

        load_clip(clip_model)  # a missing or incomplete folder fails before any work
    extractor = make_extractor(features, inception_weights=inception_weights, device=device) if features else None
    generated = {"source": "image folder", "path": str(images)}
    if model is not None:
        samples_dir = Path(samples_dir) if samples_dir else output_dir / "samples"
        generated = generate_samples(model, samples_dir, num_images, batch_size=batch_size,
                                     num_inference_steps=num_inference_steps, eta=eta, seed=seed, device=device,
                                     guidance_scale=guidance_scale)
        generated.update(source="model", samples_dir=str(samples_dir))
        images = samples_dir
    u8 = load_images(images, limit=num_images if model is not None else None, what="generated images")
    scores, protocol = {}, {}
    if clip_model is not None:
        from .clip_score import clip_score, read_prompts

        texts = read_prompts(prompts, image_files(images))
        scores["clip_score"], scores["clip_score_std"], _, protocol["clip"] = clip_score(
            u8, texts, clip_model, device=device, batch_size=batch_size)
        protocol["clip"]["prompts"] = str(prompts)
    if extractor is not None:
        _frechet_scores(u8, extractor, scores, protocol, reference=reference, features=features,
                        reference_limit=reference_limit, save_reference_stats=save_reference_stats,
                        allow_small_n=allow_small_n, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                        precision_recall_k=precision_recall_k)
    protocol.update({
        "images": {"n": u8.shape[0], "size": list(u8.shape[1:]), "storage": "8-bit PNG"},
        "generated": generated,
        "versions": _versions(),
        "device": str(device),
    })
    record = {"scores": scores, "protocol": protocol, "wall_time_s": time.perf_counter() - t0}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "scores.json").write_text(json.dumps(record, indent=2))
    return record


def _frechet_scores(u8, extractor, scores: dict, protocol: dict, *, reference, features, reference_limit,
                    save_reference_stats, allow_small_n, kid_subsets, kid_subset_size, precision_recall_k) -> None:
    """The Fréchet distance, KID and precision/recall of ``u8`` against ``reference``, into
    ``scores`` and their protocol into ``protocol``."""
    n, d = u8.shape[0], extractor.feature_dim
    if n <= d and not allow_small_n:
        raise ValueError(f"{n} generated images give a singular {d}x{d} feature covariance: the Fréchet distance "
                         f"needs N > feature dim; use --num_images > {d} (FID papers use 10,000-50,000 with "
                         "Inception's 2048-d features), or --allow_small_n for a rough number")
    feats = extractor(u8)
    mu, sigma = gaussian_stats(feats, "generated features")
    r_mu, r_sigma, r_feats, r_desc = _reference(reference, extractor, tuple(u8.shape[-2:]), u8.shape[1],
                                                reference_limit)
    if r_desc.get("n") is not None and r_desc["n"] <= d and not allow_small_n:
        raise ValueError(f"{r_desc['n']} reference images give a singular {d}x{d} covariance; use more than {d} "
                         "reference images, or --allow_small_n")
    if save_reference_stats:
        save_stats(save_reference_stats, r_mu, r_sigma)
    scores["frechet_distance"] = frechet_distance_from_stats(mu, sigma, r_mu, r_sigma)
    if features == "inception":
        scores["fid"] = scores["frechet_distance"]
    kid_info = None
    if r_feats is not None:
        scores["kid"], scores["kid_std"] = kid(feats, r_feats, num_subsets=kid_subsets, subset_size=kid_subset_size,
                                               seed=0)
        kid_info = {"kernel": "(x.y/d + 1)^3", "subsets": kid_subsets,
                    "subset_size": min(kid_subset_size, n, r_feats.shape[0]), "seed": 0, "estimator": "unbiased"}
    if precision_recall_k:
        if r_feats is None:
            raise ValueError("precision/recall needs reference images (a folder or digits), not .npz statistics")
        scores["precision"], scores["recall"] = precision_recall(r_feats, feats, k=precision_recall_k)
    protocol.update({
        "features": extractor.protocol,
        "precision_recall": ({"method": "Kynkäänniemi et al. 2019 (k-NN balls)", "k": precision_recall_k}
                             if precision_recall_k else None),
        "resize": extractor.resize_method(tuple(u8.shape[-2:])),
        "reference": dict(r_desc, stats_sha256=stats_sha256(r_mu, r_sigma)),
        "kid": kid_info or "not computed: the reference is statistics only (KID needs reference features)",
        "covariance": "unbiased (N - 1), float64",
    })
