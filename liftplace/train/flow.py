"""The rectified-flow (flow-matching) objective and sampler, beside the DDPM one.

As diffusers' SD3 training scripts (``train_dreambooth_sd3.py``): a density value
``u ~ weighting_scheme`` (``logit_normal`` with ``logit_mean`` / ``logit_std``, ``mode``
with ``mode_scale``, else uniform) picks the index ``floor(u·T)`` into the
``FlowMatchEulerDiscreteScheduler``'s training schedule; its sigma ``σ`` noises

    x_t = (1 − σ)·x_0 + σ·ε,     target (the velocity) v = ε − x_0,

the models see the timestep ``σ·T`` (``T = num_train_timesteps``), and each sample's
squared error is weighted by ``compute_loss_weighting_for_sd3`` (``sigma_sqrt``: ``σ⁻²``,
``cosmap``: ``2 / (π(1 − 2σ + 2σ²))``, else 1). Sampling integrates the velocity with the
scheduler's Euler steps from ``σ = 1`` (pure noise) to ``σ = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")


def make_flow_scheduler(num_train_timesteps: int = 1000, shift: float = 1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


class FlowMatchObjective:
    """Rectified-flow noising with a velocity target; the same interface as ``NoiseObjective``.

    ``prepare`` returns ``(noisy, timesteps, target)`` with float timesteps ``σ·T`` (what the
    models and the KD loss's timestep buckets see; ``t_max = T``); :meth:`sigmas_of` maps
    them back, :meth:`loss_weights` gives the SD3 weighting of each sample.
    """

    kind = "flow"
    prediction_type = "flow_velocity"

    def __init__(self, scheduler, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
        self.scheduler = scheduler
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        # the training schedule, fixed at construction (set_timesteps at sampling time changes the scheduler's)
        self.train_sigmas = scheduler.sigmas[:self.num_train_timesteps].clone().float()

    def sample_u(self, batch: int, generator: torch.Generator) -> Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        return compute_density_for_timestep_sampling(self.weighting_scheme, batch, logit_mean=self.logit_mean,
                                                     logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                     device=generator.device, generator=generator)

    def prepare(self, clean: Tensor, generator: torch.Generator):
        """``(noisy, timesteps, target)``; noise, then the density values, drawn from ``generator`` only."""
        noise = torch.randn(clean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        u = self.sample_u(clean.shape[0], generator)
        idx = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        sigmas = self.train_sigmas[idx.cpu()].to(clean.device)
        noise = noise.to(clean.device)
        clean = clean.float()
        s = sigmas.view(-1, *([1] * (clean.dim() - 1)))
        noisy = (1.0 - s) * clean + s * noise
        target = noise - clean
        return noisy, sigmas * self.num_train_timesteps, target

    def sigmas_of(self, timesteps: Tensor) -> Tensor:
        return timesteps.float() / self.num_train_timesteps

    def loss_weights(self, timesteps: Tensor, cfg=None) -> Tensor | None:
        """Per-sample weights ``[B]`` of the denoising loss (None: uniform)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigmas_of(timesteps)).float()


@torch.no_grad()
def flow_sample(family, model: nn.Module, scheduler, num_images: int, sample_shape, *, seed: int = 0,
                num_inference_steps: int = 50, batch_size: int = 64, device=None, cond: dict | None = None,
                uncond: dict | None = None, guidance_scale: float = 1.0, clamp: bool = True) -> Tensor:
    """Euler integration of the velocity with a ``FlowMatchEulerDiscreteScheduler``; image ``i``
    starts from the noise of ``seed + i``. ``cond``/``uncond``/``guidance_scale`` as ``ddim_sample``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    p = next(model.parameters())
    device = torch.device(device) if device is not None else p.device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, num_images, batch_size):
            ids = range(start, min(num_images, start + batch_size))
            x = torch.stack([torch.randn(tuple(sample_shape), generator=torch.Generator().manual_seed(seed + i))
                             for i in ids]).to(device)
            scheduler.set_timesteps(num_inference_steps, device=device)
            c = {k: v[ids.start:ids.stop].to(device) for k, v in (cond or {}).items()}
            for t in scheduler.timesteps:
                tt = t.expand(x.shape[0]).to(device)
                v = family.forward(model, x.to(p.dtype), tt, c).float()
                if uncond is not None and guidance_scale != 1.0:
                    u = {k: w.to(device).expand(x.shape[0], *w.shape[1:]) for k, w in uncond.items()}
                    vu = family.forward(model, x.to(p.dtype), tt, u).float()
                    v = vu + guidance_scale * (v - vu)
                x = scheduler.step(v, t, x).prev_sample
            out.append((x.clamp(-1, 1) if clamp else x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
