"""DDIM sampling with per-image seeds, image writing, and loading a model to sample from.

Image ``i`` starts from noise drawn by its own generator seeded ``seed + i`` (and, for
``eta > 0``, takes its step noise from that generator too), so every image depends on
its seed only, not on the batch size or on how many images are drawn.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..eval.plots import save_image_grid
from .checkpoint import read_verified_state
from .models import (ModelFamily, family_for_config, load_pretrained, read_config, resolve_model_dir,
                     scheduler_config_near)


def ddim_scheduler_from(noise_scheduler_config: dict):
    from diffusers import DDIMScheduler

    cfg = {k: v for k, v in dict(noise_scheduler_config).items() if not k.startswith("_")}
    return DDIMScheduler.from_config(cfg)


@torch.no_grad()
def ddim_sample(family: ModelFamily, model: nn.Module, scheduler, num_images: int, sample_shape, *, seed: int = 0,
                num_inference_steps: int = 50, eta: float = 0.0, batch_size: int = 64, device=None,
                progress: bool = False, cond: dict | None = None, uncond: dict | None = None,
                guidance_scale: float = 1.0, clamp: bool = True) -> Tensor:
    """``num_images`` samples ``[N, *sample_shape]`` (float32, CPU), clamped to [-1, 1] (``clamp``).

    ``cond``: conditioning per image (tensors ``[N, ...]``); with ``uncond`` (one row, ``[1, ...]``)
    and ``guidance_scale > 1``, classifier-free guidance ``u + s * (c - u)``."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = next(model.parameters())
    device = torch.device(device) if device is not None else p.device
    was_training = model.training
    model.eval()
    scheduler.set_timesteps(num_inference_steps)
    out = []
    starts = range(0, num_images, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch")
    try:
        for start in starts:
            ids = range(start, min(num_images, start + batch_size))
            gens = [torch.Generator().manual_seed(seed + i) for i in ids]
            x = torch.stack([torch.randn(tuple(sample_shape), generator=g) for g in gens]).to(device)
            x = x * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(x, t)
                tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
                c = {k: v[ids.start:ids.stop].to(device) for k, v in (cond or {}).items()}
                eps = family.forward(model, model_in.to(p.dtype), tt, c).float()
                if uncond is not None and guidance_scale != 1.0:
                    u = {k: v.to(device).expand(x.shape[0], *v.shape[1:]) for k, v in uncond.items()}
                    eps_u = family.forward(model, model_in.to(p.dtype), tt, u).float()
                    eps = eps_u + guidance_scale * (eps - eps_u)
                noise = None
                if eta > 0:
                    noise = torch.stack([torch.randn(tuple(sample_shape), generator=g) for g in gens]).to(device)
                x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
            out.append((x.clamp(-1, 1) if clamp else x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def scheduler_from_config(sched_cfg: dict):
    """The scheduler a model was trained with, from its ``scheduler_config.json``."""
    import diffusers

    name = sched_cfg.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {name!r} in the scheduler config")
    return cls.from_config({k: v for k, v in sched_cfg.items() if not k.startswith("_")})


@torch.no_grad()
def sample_images(family, model: nn.Module, scheduler, num_images: int, sample_shape, *, seed: int = 0,
                  num_inference_steps: int = 50, batch_size: int = 64, device=None, cond: dict | None = None,
                  uncond: dict | None = None, guidance_scale: float = 1.0, clamp: bool = True) -> Tensor:
    """Samples with the sampler that matches ``scheduler`` (see the module notes); image ``i``
    starts from the noise of ``seed + i``."""
    from .dit import _ddpm_learned_sample
    from .flow import flow_sample

    kw = dict(seed=seed, num_inference_steps=num_inference_steps, batch_size=batch_size, device=device, cond=cond,
              uncond=uncond, guidance_scale=guidance_scale, clamp=clamp)
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        return flow_sample(family, model, scheduler, num_images, sample_shape, **kw)
    if getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range"):
        return _ddpm_learned_sample(family, model, scheduler, num_images, sample_shape, **kw)
    if family.learned_sigma(dict(model.config)):
        # DDIM ignores the variance: sample from the mean half only (diffusers' DiTPipeline does the same)
        c, full = sample_shape[0], family

        class _MeanHalf:
            name, cond_keys = full.name, full.cond_keys

            @staticmethod
            def forward(m, x, t, cd):
                return full.forward(m, x, t, cd)[:, :c]

        family = _MeanHalf()
    return ddim_sample(family, model, ddim_scheduler_from(scheduler.config), num_images, sample_shape, **kw)


def text_to_image(family: ModelFamily, model: nn.Module, encoders, scheduler, prompts: list[str], *,
                  images_per_prompt: int = 1, guidance_scale: float = 7.5, seed: int = 0, num_inference_steps: int = 50,
                  eta: float = 0.0, batch_size: int = 64, device=None, progress: bool = False,
                  sample_shape=None) -> Tensor:
    """Images ``[len(prompts) * images_per_prompt, C, H, W]`` in [-1, 1]: DDIM on latents with
    classifier-free guidance (the empty prompt as the null condition), decoded by the VAE.
    Image ``i`` (prompt ``i // images_per_prompt``) starts from the noise of ``seed + i``."""
    shape = sample_shape or family.sample_shape(dict(model.config))
    text = [p for p in prompts for _ in range(images_per_prompt)]
    cond = {"encoder_hidden_states": encoders.embed(text)}
    uncond = {"encoder_hidden_states": encoders.embed([""])} if guidance_scale != 1.0 else None
    latents = ddim_sample(family, model, scheduler, len(text), shape, seed=seed, num_inference_steps=num_inference_steps,
                          eta=eta, batch_size=batch_size, device=device, progress=progress, cond=cond, uncond=uncond,
                          guidance_scale=guidance_scale, clamp=False)
    return torch.cat([encoders.decode(latents[i:i + batch_size]).cpu() for i in range(0, len(latents), batch_size)])


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]``."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _pil(arr: Tensor):
    from PIL import Image

    a = arr.numpy()
    return Image.fromarray(a[..., 0]) if a.shape[-1] == 1 else Image.fromarray(a)


def save_grid(images: Tensor, path, nrow: int | None = None) -> Path:
    """One PNG grid of ``images`` in [-1, 1] (tiles upscaled for viewing); see ``liftplace.eval.plots``."""
    return save_image_grid(images, path, nrow=nrow)


def save_images(images: Tensor, folder, *, first_index: int = 0) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(images)):
        p = folder / f"{first_index + i:06d}.png"
        _pil(arr).save(p)
        paths.append(p)
    return paths


def load_for_sampling(path, *, prefer_ema: bool = True, default_family: str = "unet2d"):
    """``(family, model, noise_scheduler_config, source_dir)`` from an exported model folder,
    a pipeline folder, a training output folder, a ``checkpoint-<step>`` folder (its
    ``student_ema``, else ``student``) or ``builtin:NAME``."""
    p = Path(str(path))
    if not str(path).startswith("builtin:") and p.is_dir() and (p / "trainer_state.json").is_file():
        read_verified_state(p)
        sub = p / "student_ema" if prefer_ema and (p / "student_ema").is_dir() else p / "student"
        model_dir = sub
    else:
        model_dir = resolve_model_dir(path)
    cfg = read_config(model_dir)
    family = family_for_config(cfg, default_family)
    model = load_pretrained(model_dir, family, f"model {str(path)!r}")
    sched_path = scheduler_config_near(model_dir)
    if sched_path is None:
        from diffusers import DDPMScheduler

        sched_cfg = dict(DDPMScheduler().config)
        warnings.warn(f"no scheduler_config.json next to {model_dir}; using DDPMScheduler defaults "
                      "(1000 linear steps, epsilon prediction)", stacklevel=2)
    else:
        sched_cfg = json.loads(sched_path.read_text())
    return family, model, sched_cfg, model_dir
