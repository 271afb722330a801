"""Diffusion transformers: class labels, depth-pruned students and sampling.

* **Labels.** The ``dit`` family reads the batch's integer ``label``; :func:`drop_labels`
  replaces each by the null class ``num_embeds_ada_norm`` with probability
  ``cond_drop_prob`` (coins from the step's generator, so a resumed run draws the same).
  diffusers' ``LabelEmbedding`` would also drop labels by itself in training mode, from the
  global RNG and independently in every block (each block of the diffusers DiT owns an
  embedder); :func:`label_dropout_off` turns that off, so the dropout is ours alone.
* **Depth pruning** (TinyFusion's setting): :func:`make_depth_pruned_student` keeps
  ``student_depth`` of the teacher's ``transformer_blocks`` (:func:`select_layers`), and
  copies every weight by name: student ``transformer_blocks.i.*`` from teacher
  ``transformer_blocks.<kept[i]>.*``, the rest (patch embedding, final layer) unchanged.
  Note that diffusers' DiT takes the final layer's conditioning from block 0's embedder,
  so the student's final layer reads the embedder of its first kept block.
* **Sampling** (:func:`sample_images`) picks the sampler from the scheduler the model was
  trained with: Euler on the velocity for ``FlowMatchEulerDiscreteScheduler``, DDPM with
  the learned variance for ``variance_type="learned_range"``, DDIM otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ConfigError, parse_layer_selection
from .sampling import sample_images, scheduler_from_config  # noqa: F401  (the general sampler lives in sampling.py)


# --- labels ------------------------------------------------------------------------------------

def label_dropout_off(model: nn.Module) -> None:
    """Stop diffusers' LabelEmbedding modules from dropping labels on their own (once per model)."""
    if getattr(model, "_liftplace_label_dropout_off", False):
        return
    for m in model.modules():
        if type(m).__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0
    model._liftplace_label_dropout_off = True


def drop_labels(cond: dict, generator: torch.Generator, prob: float, null_class: int) -> dict:
    """``cond`` with each ``label`` replaced by ``null_class`` with probability ``prob``; checks the range."""
    labels = cond["label"]
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= null_class):
        raise ConfigError(f"class labels must be in [0, {null_class}) (the model's num_embeds_ada_norm classes), got "
                          f"{int(labels.min())}..{int(labels.max())}; check class_column / the class folders or "
                          "build the teacher with more classes")
    if prob <= 0:
        return cond
    coins = torch.rand(labels.shape[0], generator=generator, device=generator.device).to(labels.device)
    return {**cond, "label": torch.where(coins < prob, torch.full_like(labels, null_class), labels)}


class ClassLabelled(torch.utils.data.Dataset):
    """An image folder's items with ``label`` from ``class_column`` (metadata) or the class subfolder."""

    def __init__(self, data, labels: list[int], names: list[str] | None = None):
        self.data, self.labels = data, torch.as_tensor(labels, dtype=torch.long)
        self.class_names = names

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {**self.data[i], "label": int(self.labels[i])}


def with_class_labels(data, cfg, name) -> torch.utils.data.Dataset:
    """The dit family's dataset: digits keep their labels; an image folder gets ``class_column``
    from metadata.jsonl/.csv, else its class subfolders (sorted names -> 0..K-1)."""
    if not (isinstance(name, str) and Path(name).is_dir()):
        return data  # digits / synthetic: labels come with the data set
    base = getattr(data, "dataset", data)  # a Subset of max_train_samples
    files = [Path(f) for f in getattr(base, "files", [])]
    root = Path(name)
    if cfg.class_column is not None:
        meta = {}
        for mfile in (root / "metadata.jsonl", root / "metadata.csv"):
            if mfile.is_file():
                if mfile.suffix == ".jsonl":
                    rows = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
                else:
                    import csv

                    rows = list(csv.DictReader(mfile.open()))
                for r in rows:
                    if cfg.class_column not in r:
                        raise ConfigError(f"class_column={cfg.class_column!r} is not a column of {mfile} (columns: "
                                          f"{', '.join(r)})")
                    meta[str(r.get(cfg.image_column))] = r[cfg.class_column]
                break
        else:
            raise ConfigError(f"class_column={cfg.class_column!r} needs {root}/metadata.jsonl or metadata.csv")
        labels = []
        for f in files:
            key = str(f.relative_to(root)) if f.is_absolute() or str(f).startswith(str(root)) else str(f)
            if key not in meta:
                raise ConfigError(f"class_column: image {key!r} has no row in the metadata ({cfg.image_column} column)")
            try:
                labels.append(int(meta[key]))
            except (TypeError, ValueError):
                raise ConfigError(f"class_column={cfg.class_column!r}: {meta[key]!r} (image {key!r}) is not an "
                                  "integer class label") from None
        names = None
    else:
        parents = [str((f if f.is_absolute() else root / f).parent.relative_to(root)) for f in files]
        names = sorted(set(parents))
        if names == ["."]:
            raise ConfigError(f"the dit family needs class labels: {root} has no class subfolders; put each class's "
                              "images in its own subfolder or set class_column (a metadata.jsonl/.csv column)")
        labels = [names.index(p) for p in parents]
    full = ClassLabelled(base, labels, names)
    if base is not data:
        return torch.utils.data.Subset(full, data.indices)
    return full


# --- latent DiT ---------------------------------------------------------------------------------

class LatentEncoder:
    """The frozen VAE of a latent ``dit`` run (``pretrained_vae_model_name_or_path``): images ->
    ``(z - shift_factor)·scaling_factor`` latents, and back. No text; labels stay in the batch."""

    captioned = False
    cache = None

    def __init__(self, vae: nn.Module, *, sample_mode: str = "sample", device=None, dtype=torch.float32,
                 source: Path | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.vae = vae.to(self.device, dtype).eval().requires_grad_(False)
        self.pixel_channels = int(vae.config.in_channels)
        self.sample_mode = sample_mode
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.source = source

    @torch.no_grad()
    def latents(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = dist.mean if self.sample_mode == "mean" else dist.sample(generator=generator)
        return ((z - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.device, self.dtype) / self.scaling + self.shift
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    def encode_batch(self, pixels: Tensor, batch: dict, generator: torch.Generator, flips=None):
        return self.latents(pixels, generator), {}

    def pipeline(self, model: nn.Module, scheduler, dtype=torch.float32):
        from .sd3 import _SD3Export

        exp = _SD3Export(model, scheduler, self)
        self.source_folders = {"vae": self.source} if self.source is not None else {}
        return exp


def build_latent_encoder(cfg, device, dtype=torch.float32):
    """The dit family's encoders: None (pixels) unless ``pretrained_vae_model_name_or_path`` is set."""
    if cfg.pretrained_vae_model_name_or_path is None:
        return None
    if cfg.cache_latents:
        raise ConfigError("cache_latents is not supported for dit yet; leave it off")
    from .latent import _sub, load_vae

    src = _sub(Path(cfg.pretrained_vae_model_name_or_path), "vae")
    return LatentEncoder(load_vae(cfg.pretrained_vae_model_name_or_path), sample_mode=cfg.vae_sample_mode,
                         device=device, dtype=dtype, source=src)


# --- depth pruning ---------------------------------------------------------------------------

def uniform_layers(depth: int, k: int) -> list[int]:
    """``k`` evenly spaced block indices of ``depth``, first and last included (k >= 2)."""
    if k == 1:
        return [0]
    return sorted({round(i * (depth - 1) / (k - 1)) for i in range(k)})


def select_layers(selection: str, teacher_depth: int, k: int, *, scores: list[float] | None = None,
                  keep_last: bool = False) -> list[int]:
    """Teacher block indices the student keeps, increasing. ``keep_last``: the teacher's last block
    must be kept (SD3's last block is a different kind, ``context_pre_only``)."""
    if not 1 <= k <= teacher_depth:
        raise ConfigError(f"student_depth={k} must be between 1 and the teacher's {teacher_depth} transformer blocks")
    kind, idx = parse_layer_selection(selection, k)
    if kind == "uniform":
        idx = uniform_layers(teacher_depth, k)
    elif kind == "first":
        idx = list(range(k - 1)) + [teacher_depth - 1] if keep_last else list(range(k))
    elif kind == "score":
        cand = range(teacher_depth - 1) if keep_last else range(teacher_depth)
        ranked = sorted(cand, key=lambda j: (-scores[j], j))
        idx = sorted(ranked[:k - 1] + [teacher_depth - 1] if keep_last else ranked[:k])
    if idx[-1] >= teacher_depth:
        raise ConfigError(f"layer_selection={selection!r}: block {idx[-1]} does not exist; the teacher has "
                          f"{teacher_depth} transformer blocks (0..{teacher_depth - 1})")
    if keep_last and idx[-1] != teacher_depth - 1:
        raise ConfigError(f"layer_selection={selection!r}: an sd3 student must keep the teacher's last block "
                          f"({teacher_depth - 1}, the context_pre_only block); add it to the list")
    return list(idx)


class _SkipBlock:
    """A forward hook that makes a transformer block the identity (its input passes through)."""

    def __call__(self, module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):  # JointTransformerBlock: (encoder_hidden_states, hidden_states)
            return (kwargs.get("encoder_hidden_states"), hidden)
        return hidden


@torch.no_grad()
def layer_scores(teacher: nn.Module, family, objective, batches: list[tuple[Tensor, dict]], seed: int) -> list[float]:
    """Per teacher block: the rise of the teacher's own denoising loss (MSE to the objective's
    target, mean half) on ``batches`` when that block is skipped. Same noise for every block."""
    def loss() -> float:
        total = 0.0
        for i, (clean, cond) in enumerate(batches):
            gen = torch.Generator().manual_seed(seed + i)
            noisy, t, target = objective.prepare(clean, gen)
            out = family.forward(teacher, noisy.to(next(teacher.parameters()).dtype), t, cond).float()
            total += float((out[:, :clean.shape[1]] - target).square().mean())
        return total / len(batches)

    base = loss()
    scores = []
    for block in teacher.transformer_blocks:
        h = block.register_forward_hook(_SkipBlock(), with_kwargs=True)
        try:
            scores.append(loss() - base)
        finally:
            h.remove()
    return scores


def calibration_batches(cfg, family, channels: int, device, count: int) -> list[tuple[Tensor, dict]]:
    """``count`` held-out batches (the data set's test split; an image folder has none, so its
    last samples) for ``layer_selection=score``."""
    from .data import make_dataset

    name = cfg.train_data_dir or cfg.dataset_name
    try:
        data = make_dataset(name, cfg.resolution, channels, split="test", seed=0)
    except ValueError:
        from .build import build_dataset

        data = build_dataset(cfg, channels)
    if cfg.model_type == "dit" or family.name == "dit":
        data = with_class_labels(data, cfg, name)
    n = min(len(data), count * cfg.train_batch_size)
    items = [data[i] for i in range(len(data) - n, len(data))]
    out = []
    for s in range(0, n, cfg.train_batch_size):
        chunk = items[s:s + cfg.train_batch_size]
        clean = torch.stack([it["pixel_values"] for it in chunk]).to(device)
        cond = {k: torch.as_tensor([it[k] for it in chunk]).to(device) for k in family.cond_keys if k in chunk[0]}
        out.append((clean, cond))
    return out


def make_depth_pruned_student(teacher: nn.Module, family, kept: list[int], *, verbose: bool = True) -> nn.Module:
    """A student of ``len(kept)`` blocks, every weight copied from the teacher by name (bitwise)."""
    from .models import build_from_config, compression_summary, count_parameters, model_config_dict

    cfg = model_config_dict(teacher)
    cfg["num_layers"] = len(kept)
    if cfg.get("dual_attention_layers"):  # SD3.5: the kept blocks keep their kind
        cfg["dual_attention_layers"] = [i for i, src in enumerate(kept) if src in set(cfg["dual_attention_layers"])]
    student = build_from_config(cfg, family, "depth-pruned student")
    t_state = teacher.state_dict()
    new = {}
    for key, value in student.state_dict().items():
        src = key
        if key.startswith("transformer_blocks."):
            _, i, rest = key.split(".", 2)
            src = f"transformer_blocks.{kept[int(i)]}.{rest}"
        if src not in t_state or t_state[src].shape != value.shape:
            raise ConfigError(f"depth pruning: student weight {key!r} has no teacher weight {src!r} of shape "
                              f"{tuple(value.shape)}")
        new[key] = t_state[src].detach().clone().to(value.dtype)
    student.load_state_dict(new, strict=True)
    student.liftplace_kept_blocks = list(kept)
    if verbose:
        print(f"depth-pruned student: keeps teacher blocks {kept} of {len(teacher.transformer_blocks)} "
              f"(student block i <- teacher block kept[i]); "
              + compression_summary(count_parameters(teacher), count_parameters(student)), flush=True)
    return student


def build_depth_pruned_student(cfg, family, teacher: nn.Module, device) -> nn.Module:
    """``student_depth`` / ``layer_selection`` of the config -> the student (scores printed for ``score``)."""
    from .objective import make_objective

    depth = len(teacher.transformer_blocks)
    keep_last = family.name == "sd3"
    scores = None
    if parse_layer_selection(cfg.layer_selection, cfg.student_depth)[0] == "score":
        from .models import model_config_dict

        t_cfg = model_config_dict(teacher)
        _, objective = make_objective(cfg, family, t_cfg)
        channels = family.sample_shape(t_cfg)[0]
        batches = calibration_batches(cfg, family, channels, device, cfg.layer_score_batches)
        if family.name == "sd3":
            raise ConfigError("layer_selection=score needs prompt embeddings for the calibration batches; for sd3 use "
                              "uniform, first or list:")
        scores = layer_scores(teacher, family, objective, batches, seed=cfg.seed)
        print("layer_selection=score: calibration loss rise when each teacher block is skipped "
              f"({len(batches)} held-out batches):", flush=True)
        for j, sc in enumerate(scores):
            print(f"  block {j:3d}: {sc:+.6f}", flush=True)
    kept = select_layers(cfg.layer_selection, depth, cfg.student_depth, scores=scores, keep_last=keep_last)
    return make_depth_pruned_student(teacher, family, kept)


# --- sampling ----------------------------------------------------------------------------------

def _ddpm_learned_sample(family, model, scheduler, num_images, sample_shape, *, seed, num_inference_steps,
                         batch_size, device, cond, uncond, guidance_scale, clamp):
    """DDPM ancestral sampling with the model's learned variance (DiT): guidance on the mean half,
    the conditional variance kept; per-image generators for the start and the step noise."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler.config)
    p = next(model.parameters())
    device = torch.device(device) if device is not None else p.device
    was_training = model.training
    model.eval()
    c = sample_shape[0]
    out = []
    try:
        for start in range(0, num_images, batch_size):
            ids = range(start, min(num_images, start + batch_size))
            gens = [torch.Generator().manual_seed(seed + i) for i in ids]
            x = torch.stack([torch.randn(tuple(sample_shape), generator=g) for g in gens]).to(device)
            scheduler.set_timesteps(num_inference_steps)
            cd = {k: v[ids.start:ids.stop].to(device) for k, v in (cond or {}).items()}
            for t in scheduler.timesteps:
                tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
                o = family.forward(model, x.to(p.dtype), tt, cd).float()
                if uncond is not None and guidance_scale != 1.0:
                    u = {k: w.to(device).expand(x.shape[0], *w.shape[1:]) for k, w in uncond.items()}
                    ou = family.forward(model, x.to(p.dtype), tt, u).float()
                    o = torch.cat([ou[:, :c] + guidance_scale * (o[:, :c] - ou[:, :c]), o[:, c:]], dim=1)
                # the step noise of image i from its own generator (randn_tensor takes one per sample)
                x = scheduler.step(o, t, x, generator=gens).prev_sample
            out.append((x.clamp(-1, 1) if clamp else x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def class_grid_labels(num_classes: int, per_class: int, max_classes: int = 10) -> Tensor:
    """Labels of a per-class grid: ``per_class`` of each of the first ``max_classes`` classes, row by row."""
    k = min(num_classes, max_classes)
    return torch.arange(k).repeat_interleave(per_class)


def sample_grid(tr):
    """The validation grid of a transformer family: dit, one row per class (the first 10), guided
    by ``guidance_scale``; sd3, one row per validation prompt. The run's own scheduler picks the sampler."""
    from .sampling import save_grid

    if not tr.accelerator.is_main_process:
        return None
    cfg = tr.cfg
    per = min(cfg.num_validation_images, 8)
    with tr.ema_weights() as model:
        mcfg = dict(model.config)
        if tr.family.name == "dit":
            labels = class_grid_labels(tr.family.null_class(mcfg), per)
            cond = {"label": labels}
            uncond = {"label": torch.tensor([tr.family.null_class(mcfg)])}
            images = sample_images(tr.family, model, tr.noise_scheduler, len(labels), tr.sample_shape, seed=cfg.seed,
                                   num_inference_steps=cfg.ddpm_num_inference_steps, batch_size=64, device=tr.device,
                                   cond=cond, uncond=uncond, guidance_scale=cfg.guidance_scale,
                                   clamp=tr.encoders is None)
            if tr.encoders is not None:  # latent DiT: decode with the run's VAE
                images = tr.encoders.decode(images).cpu()
        elif tr.encoders is not None:  # prompts (sd3, or unet2d_condition trained with flow matching)
            from .finish import validation_prompts

            prompts = validation_prompts(tr)
            text = [p for p in prompts for _ in range(per)]
            cond, uncond = tr.encoders.embed(text), tr.encoders.embed([""])
            if isinstance(cond, Tensor):
                cond, uncond = {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}
            latents = sample_images(tr.family, model, tr.noise_scheduler, len(text), tr.sample_shape, seed=cfg.seed,
                                    num_inference_steps=cfg.ddpm_num_inference_steps, batch_size=64, device=tr.device,
                                    cond=cond, uncond=uncond, guidance_scale=cfg.guidance_scale, clamp=False)
            images = torch.cat([tr.encoders.decode(latents[i:i + 64]).cpu() for i in range(0, len(latents), 64)])
            images = images.clamp(-1, 1)
        else:  # an unconditional model (unet2d trained with flow matching)
            per = cfg.num_validation_images
            images = sample_images(tr.family, model, tr.noise_scheduler, per, tr.sample_shape, seed=cfg.seed,
                                   num_inference_steps=cfg.ddpm_num_inference_steps, batch_size=64, device=tr.device)
    path = save_grid(images, tr.output_dir / "samples" / f"step-{tr.global_step:06d}.png", nrow=per)
    tr.log.info(f"saved sample grid {path}")
    return path


def load_and_sample(path, labels: Tensor | None = None, *, num_images: int | None = None, guidance_scale: float = 1.0,
                    num_inference_steps: int = 50, seed: int = 0, batch_size: int = 64, sample_size: int | None = None,
                    cond: dict | None = None, uncond: dict | None = None):
    """Load an exported model folder (``from_pretrained`` + its ``scheduler_config.json``) and sample:
    ``(images, scheduler)``. ``labels`` (dit) condition image ``i`` on ``labels[i]``; other
    families take ``cond`` / ``uncond`` (sd3: prompt embeddings, one row per image)."""
    from .sampling import load_for_sampling

    family, model, sched_cfg, model_dir = load_for_sampling(path)
    scheduler = scheduler_from_config(sched_cfg)
    shape = family.sample_shape(dict(model.config), sample_size)
    if cond is not None and num_images is None:
        num_images = len(next(iter(cond.values())))
    if family.name == "dit":
        null = family.null_class(dict(model.config))
        if labels is None:
            raise ValueError("a dit model samples per class: pass labels (one per image)")
        cond, uncond = {"label": labels.long()}, {"label": torch.tensor([null])}
        num_images = len(labels)
    vae = Path(model_dir) / "vae"
    images = sample_images(family, model, scheduler, num_images, shape, seed=seed,
                           num_inference_steps=num_inference_steps, batch_size=batch_size, cond=cond, uncond=uncond,
                           guidance_scale=guidance_scale, clamp=not vae.is_dir())
    if vae.is_dir():  # a latent model exported with its VAE
        from .latent import load_vae

        images = LatentEncoder(load_vae(vae)).decode(images)
    return images, scheduler
