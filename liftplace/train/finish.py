"""Steps that close a finished run: a sample grid, the export, the per-bucket heat-maps.

A model family names the steps its runs end with (``ModelFamily.end_of_run``); a program
or the CLI may pass others to ``Trainer(end_of_run=...)``: names from ``END_OF_RUN`` or
callables ``step(trainer)``. Each step runs after the last optimizer step, in order.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..eval.plots import plot_bucket_heatmaps
from .models import DTYPES
from .sampling import ddim_sample, ddim_scheduler_from, save_grid, text_to_image

if TYPE_CHECKING:
    from .trainer import Trainer

def sample_grid(tr: Trainer) -> Path | None:
    """A DDIM grid of ``num_validation_images`` from the (EMA) student: ``samples/step-<N>.png``.
    Latent text-to-image models: one row per validation prompt, guided by ``guidance_scale``
    and decoded by the VAE."""
    if hasattr(tr.family, "sample_grid") or getattr(tr.objective, "kind", "ddpm") != "ddpm":
        from .dit import sample_grid as transformer_grid  # dit / sd3 / flow-matching runs: their own sampler

        if hasattr(tr.family, "sample_grid"):
            return tr.family.sample_grid(tr)
        return transformer_grid(tr)
    if not tr.accelerator.is_main_process:
        return None
    cfg = tr.cfg
    sched = ddim_scheduler_from(tr.noise_scheduler.config)
    nrow = None
    with tr.ema_weights() as model:
        if tr.encoders is not None:
            prompts = validation_prompts(tr)
            images = text_to_image(tr.family, model, tr.encoders, sched, prompts,
                                   images_per_prompt=cfg.num_validation_images, guidance_scale=cfg.guidance_scale,
                                   seed=cfg.seed, num_inference_steps=cfg.ddpm_num_inference_steps,
                                   batch_size=cfg.num_validation_images, device=tr.device,
                                   sample_shape=tr.sample_shape)
            nrow = cfg.num_validation_images
        else:
            images = ddim_sample(tr.family, model, sched, cfg.num_validation_images, tr.sample_shape, seed=cfg.seed,
                                 num_inference_steps=cfg.ddpm_num_inference_steps,
                                 batch_size=cfg.num_validation_images, device=tr.device)
    path = save_grid(images, tr.output_dir / "samples" / f"step-{tr.global_step:06d}.png", nrow=nrow)
    tr.log.info(f"saved sample grid {path}")
    if hasattr(tr, "log_image"):  # to the trackers of report_to (tensorboard, wandb, ...)
        tr.log_image("validation", path)
    return path


def validation_prompts(tr: Trainer, default_count: int = 4) -> list[str]:
    """``validation_prompts``, else the first distinct non-empty training captions."""
    if tr.cfg.validation_prompts:
        return list(tr.cfg.validation_prompts)
    captions = getattr(tr.dataset, "captions", None) or []
    return list(dict.fromkeys(c for c in captions if c))[:default_count] or [""]


def export_model(tr: Trainer) -> Path | None:
    """The final (EMA) model with save_pretrained (safetensors) + scheduler_config.json in
    ``output_dir/<role>``, written beside it and renamed into place; sets ``tr.model_dir``.
    A latent text-to-image model is exported as a complete ``StableDiffusionPipeline`` folder
    (the run's VAE, text encoder and tokenizer, the noise schedule, the model as ``unet/``)."""
    acc = tr.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    out = tr.output_dir / tr.role
    with tr.ema_weights() as model:
        m = copy.deepcopy(model)
    m = m.to(torch.device("cpu"))
    if DTYPES[tr.cfg.export_dtype] != torch.float32:
        m = m.to(DTYPES[tr.cfg.export_dtype])
    tmp = tr.output_dir / f".tmp-{tr.role}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if tr.encoders is not None:
        tr.encoders.pipeline(m, tr.noise_scheduler, DTYPES[tr.cfg.export_dtype]).save_pretrained(
            str(tmp), safe_serialization=True)
    else:
        m.save_pretrained(str(tmp), safe_serialization=True)
        tr.noise_scheduler.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    tr.log.info(f"exported the final {'EMA ' if tr.ema is not None else ''}{tr.role} to {out}")
    tr.model_dir = out
    return out


def bucket_heatmaps(tr: Trainer) -> list[Path]:
    """Per-timestep-bucket heat-maps of the logged KD statistics (none when not logged)."""
    if not tr.accelerator.is_main_process:
        return []
    paths = plot_bucket_heatmaps(tr.metrics_path, tr.output_dir)
    for path in paths:
        tr.log.info(f"saved per-timestep-bucket heat-map {path}")
    return paths


END_OF_RUN: dict[str, Callable] = {"sample_grid": sample_grid, "export": export_model,
                                   "bucket_heatmaps": bucket_heatmaps}


def resolve_steps(steps: Sequence[str | Callable]) -> list[Callable]:
    out = []
    for s in steps:
        if callable(s):
            out.append(s)
        elif s in END_OF_RUN:
            out.append(END_OF_RUN[s])
        else:
            raise ValueError(f"unknown end-of-run step {s!r}; available: {', '.join(END_OF_RUN)} or a callable")
    return out
