"""The training objective (METHOD.md §7) for one micro-batch.

    L = lambda_sd * L_diffusion(student) + lambda_kd_output * KD(student_out, teacher_out)
        + lambda_kd_feat * L_feat

:class:`NoiseObjective` turns clean samples into ``(noisy, timesteps, target)``;
:class:`DistillationLoss` runs both models through their :class:`ModelFamily` and
returns the total loss plus detached terms for logging. Neither assumes pixels or a
U-Net: latent models encode before the objective, conditional ones pass ``cond``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..loss import LiftPlaceLoss, lift_place_loss
from .config import ConfigError, TrainConfig
from .models import FeatureAdapters, FeatureTaps, ModelFamily

STAT_KEYS = ("coarse", "fine", "weight", "coarse_weight", "slope_mean", "intercept_mean", "slope_absdev",
             "intercept_absdev")
# Per-timestep-bucket statistics ([K] tensors), logged as one scalar per bucket:
# kd_bucket_weight_0 ... kd_bucket_weight_{K-1}.
BUCKET_KEYS = ("bucket_weight", "bucket_slope_absdev", "bucket_intercept_absdev", "bucket_count")


def make_noise_scheduler(cfg: TrainConfig, learned_sigma: bool = False):
    """The DDPM training schedule; ``learned_sigma`` models (DiT's ``out_channels = 2·in_channels``)
    get ``variance_type="learned_range"``, which their sampler then uses (DiT's convention)."""
    from diffusers import DDPMScheduler

    extra = {"variance_type": "learned_range"} if learned_sigma else {}
    return DDPMScheduler(num_train_timesteps=cfg.ddpm_num_steps, beta_schedule=cfg.ddpm_beta_schedule,
                         prediction_type=cfg.prediction_type, **extra)


def resolve_objective(cfg: TrainConfig, family: ModelFamily) -> str:
    """``objective``, else the family's own (``flow`` for sd3, ``ddpm`` for the rest)."""
    return cfg.objective or getattr(family, "default_objective", "ddpm")


def make_objective(cfg: TrainConfig, family: ModelFamily, model_config: dict | None = None, *, latent: bool = False):
    """``(scheduler, objective)`` for a run: the DDPM :class:`NoiseObjective` or the flow-matching
    :class:`~liftplace.train.flow.FlowMatchObjective`. The scheduler is what the export carries."""
    kind = resolve_objective(cfg, family)
    learned = bool(model_config) and family.learned_sigma(model_config)
    if kind == "flow":
        from .flow import FlowMatchObjective, make_flow_scheduler

        if learned:
            raise ConfigError("objective=flow predicts a velocity: the model must have out_channels == in_channels "
                              "(its out_channels = 2·in_channels is DiT's learned sigma, a DDPM-only output); build "
                              "the model with out_channels = in_channels or use objective=ddpm")
        sched = make_flow_scheduler(cfg.ddpm_num_steps, cfg.flow_shift)
        return sched, FlowMatchObjective(sched, cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale)
    sched = make_noise_scheduler(cfg, learned_sigma=learned)
    if latent:  # latents are not bounded: never clip the predicted sample
        sched = type(sched).from_config(sched.config, clip_sample=False)
    return sched, NoiseObjective(sched, noise_offset=cfg.noise_offset)


class NoiseObjective:
    """DDPM forward process with an epsilon, v or sample target (diffusers' DDPMScheduler)."""

    kind = "ddpm"

    def __init__(self, scheduler, noise_offset: float = 0.0):
        self.scheduler = scheduler
        self.noise_offset = float(noise_offset)
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def prepare(self, clean: Tensor, generator: torch.Generator):
        """``(noisy, timesteps, target)``; noise and timesteps drawn from ``generator`` only."""
        noise = torch.randn(clean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        timesteps = torch.randint(0, self.num_train_timesteps, (clean.shape[0],), generator=generator,
                                  device=generator.device)
        if self.noise_offset:  # diffusers' noise offset: one extra constant per sample and channel
            noise = noise + self.noise_offset * torch.randn((*clean.shape[:2], *([1] * (clean.dim() - 2))),
                                                            generator=generator, device=generator.device)
        noise, timesteps = noise.to(clean.device), timesteps.to(clean.device)
        clean = clean.float()
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(clean, noise, timesteps)
        else:
            target = clean
        return noisy, timesteps, target

    def loss_weights(self, timesteps: Tensor, cfg: TrainConfig) -> Tensor | None:
        """Per-sample weights of the denoising loss: min-SNR-gamma with ``snr_gamma``, else None."""
        if cfg.snr_gamma is None:
            return None
        return min_snr_weights(self.scheduler, timesteps, cfg.snr_gamma, self.prediction_type)

    def vb_term(self, eps: Tensor, var_values: Tensor, clean: Tensor, noisy: Tensor, timesteps: Tensor) -> Tensor:
        """DiT's variational-bound term for a learned-range variance, per sample ``[B]`` in bits
        (``mean_flat``, times ``T / 1000`` as DiT's rescaled MSE). ``eps`` is detached by the
        caller: the term trains the variance half only (DiT's ``frozen_out``)."""
        return learned_range_vb(self.scheduler, eps, var_values, clean.float(), noisy.float(), timesteps)


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (DiT / improved DDPM)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def learned_range_vb(scheduler, eps: Tensor, var_values: Tensor, clean: Tensor, noisy: Tensor,
                     timesteps: Tensor) -> Tensor:
    """``[B]``: KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)) in bits (the decoder NLL at t = 0), with
    p's log-variance ``frac·log β_t + (1 − frac)·log β̃_t`` (clipped), ``frac = (v + 1) / 2``."""
    ac = scheduler.alphas_cumprod.to(device=clean.device, dtype=torch.float64)
    betas = scheduler.betas.to(device=clean.device, dtype=torch.float64)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac)
    shape = (-1, *([1] * (clean.dim() - 1)))

    def at(v):
        return v[timesteps.long()].float().view(shape)

    true_mean = at(coef1) * clean + at(coef2) * noisy
    true_logvar = at(post_logvar)
    frac = (var_values.float() + 1.0) / 2.0
    model_logvar = frac * at(torch.log(betas)) + (1.0 - frac) * true_logvar
    pred_x0 = at((1.0 / ac).sqrt()) * noisy - at((1.0 / ac - 1.0).sqrt()) * eps.float()
    model_mean = at(coef1) * pred_x0 + at(coef2) * noisy
    kl = 0.5 * (-1.0 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                + (true_mean - model_mean).square() * torch.exp(-model_logvar))
    kl = kl.flatten(1).mean(1) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(clean, model_mean, 0.5 * model_logvar).flatten(1).mean(1) / math.log(2.0)
    vb = torch.where(timesteps == 0, nll, kl)
    return vb * (scheduler.config.num_train_timesteps / 1000.0)


def reduce_squared_error(x: Tensor, y: Tensor, reduction: str, weights: Tensor | None = None) -> Tensor:
    """Squared error summed over all but the batch dim and averaged over the batch ("sum"),
    or averaged over every element ("mean") — the same reductions as the KD loss.
    ``weights`` ``[B]``: per-sample weights of the batch average (min-SNR weighting)."""
    sq = (x.float() - y.float()).square()
    if weights is not None:
        per_sample = sq.flatten(1).sum(1) if reduction == "sum" else sq.flatten(1).mean(1)
        return (per_sample * weights).mean()
    return sq.sum() / x.shape[0] if reduction == "sum" else sq.mean()


def min_snr_weights(scheduler, timesteps: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) as diffusers' ``train_text_to_image.py``:
    ``min(snr, gamma) / snr`` for epsilon, ``/ (snr + 1)`` for v-prediction, ``min(snr, gamma)``
    for sample prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    w = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return w / snr
    if prediction_type == "v_prediction":
        return w / (snr + 1)
    return w


@dataclass
class StepTerms:
    loss: Tensor  # total, differentiable
    terms: dict[str, Tensor] = field(default_factory=dict)  # detached scalars for logging


class TeacherOutputCache:
    """Teacher outputs keyed by micro-batch number (or by the input digest itself),
    verified against a digest of the whole input: noisy sample, timesteps and conditioning.

    Runs that share seed, data and schedule feed the teacher bitwise-identical inputs, so
    a second run can reuse the first run's teacher outputs (the demo distils three
    students this way, and memoises the teacher on its held-out inputs). A lookup whose
    input digest differs recomputes, so reuse can never change a result. Holds
    everything in memory: size it to the run.
    """

    def __init__(self):
        self.entries: dict[Hashable, tuple[bytes, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def digest(noisy: Tensor, timesteps: Tensor, cond: dict | None = None) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(noisy.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(timesteps.detach().cpu().numpy().tobytes())
        for name in sorted(cond or {}):
            value = cond[name]
            h.update(name.encode())
            if isinstance(value, Tensor):
                h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
                h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(value).encode())
        return h.digest()

    def get(self, key: Hashable, digest: bytes) -> Tensor | None:
        hit = self.entries.get(key)
        if hit is not None and hit[0] == digest:
            self.hits += 1
            return hit[1]
        self.misses += 1
        return None

    def put(self, key: Hashable, digest: bytes, output: Tensor) -> None:
        self.entries[key] = (digest, output.detach())

    def fetch(self, noisy: Tensor, timesteps: Tensor, cond: dict, compute: Callable[[], Tensor],
              key: Hashable | None = None) -> Tensor:
        """The cached output for this input, else ``compute()`` stored under ``key``
        (default: the digest, for callers without a micro-batch number)."""
        digest = self.digest(noisy, timesteps, cond)
        key = digest if key is None else key
        out = self.get(key, digest)
        if out is None:
            out = compute()
            self.put(key, digest, out)
        return out


class DistillationLoss:
    """Runs teacher (frozen) and student on the same noisy input and combines the losses."""

    def __init__(self, cfg: TrainConfig, family: ModelFamily, objective: NoiseObjective, student: nn.Module,
                 teacher: nn.Module | None, *, feature_taps: tuple[FeatureTaps, FeatureTaps] | None = None,
                 adapters: FeatureAdapters | None = None, teacher_cache: TeacherOutputCache | None = None):
        self.cfg = cfg
        self.teacher_cache = teacher_cache
        self.family = family
        self.objective = objective
        self.student = student
        self.teacher = teacher
        self.taps = feature_taps
        self.adapters = adapters
        self.uses_teacher = teacher is not None and (cfg.kd_loss != "none" or cfg.lambda_kd_feat > 0)
        self.teacher_dtype = next(teacher.parameters()).dtype if teacher is not None else None
        # The LIFT/PLACE loss as a module: with kd_weight="adaptive-timestep" it keeps the
        # per-bucket EMA in buffers, which checkpoints save (state_dict / load_state_dict).
        self.kd_module = LiftPlaceLoss(**self.kd_options(), total_steps=cfg.max_train_steps, return_stats=True,
                                       num_buckets=cfg.kd_num_buckets, t_max=objective.num_train_timesteps,
                                       bucket_ema=cfg.kd_bucket_ema or None)
        # DiT's learned sigma: models output [mean | variance values]; KD sees the mean half
        raw = getattr(student, "module", student)  # DDP-wrapped under accelerate launch
        self.model_config = dict(raw.config) if hasattr(raw, "config") else {}
        self.learned_sigma = family.learned_sigma(self.model_config)

    def state_dict(self) -> dict:
        return self.kd_module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.kd_module.load_state_dict(state)

    def kd_options(self) -> dict:
        c = self.cfg
        return dict(group_size=c.group_size, grouping=c.grouping, norm=c.kd_norm, reduction=c.kd_reduction,
                    weight=c.kd_weight, parts=c.kd_parts, coarse_weight=c.kd_coarse_weight, eps=c.kd_eps)

    def feature_loss(self, name: str, student: Tensor, teacher: Tensor, step: int,
                     timesteps: Tensor | None = None) -> Tensor:
        """One feature pair's loss: squared error (``mse``) or LIFT/PLACE on the feature maps."""
        c = self.cfg
        if c.kd_feat_loss == "mse":
            return reduce_squared_error(student, teacher, c.kd_reduction)
        # transformer tokens [B, N, D]: one row per feature channel over the N tokens (channel_dim=-1)
        channel_dim = -1 if student.dim() == 3 else 1
        n = student.shape[1] if student.dim() == 3 else student[0, 0].numel()
        if c.grouping != "global" and n < c.group_size:
            raise ValueError(f"kd_feat_loss=lift_place: feature {name!r} {tuple(student.shape)} has {n} elements per "
                             f"channel, fewer than group_size={c.group_size}; pick larger feature maps in "
                             "kd_feat_layers or lower group_size")
        buckets = {}
        if c.kd_weight == "adaptive-timestep" and timesteps is not None:  # per-batch buckets (no EMA) for features
            buckets = dict(timesteps=timesteps, num_buckets=c.kd_num_buckets,
                           t_max=self.objective.num_train_timesteps, bucket_ema=None)
        return lift_place_loss(student, teacher, step=step, total_steps=c.max_train_steps, channel_dim=channel_dim,
                               **self.kd_options(), **buckets)

    def teacher_output(self, noisy: Tensor, timesteps: Tensor, cond: dict) -> Tensor:
        """The teacher's prediction (its mean half for a learned-sigma model)."""
        with torch.no_grad():
            out = self.family.forward(self.teacher, noisy.to(self.teacher_dtype), timesteps, cond)
        if out.shape[1] != noisy.shape[1] and self.family.learned_sigma(dict(self.teacher.config)):
            out = out[:, :noisy.shape[1]]  # a learned-sigma teacher: its prediction half
        return out.float()

    def __call__(self, clean: Tensor, cond: dict, generator: torch.Generator, step: int,
                 *, with_stats: bool = False, autocast=None, cache_key: int | None = None) -> StepTerms:
        c = self.cfg
        autocast = autocast or contextlib.nullcontext
        noisy, timesteps, target = self.objective.prepare(clean, generator)
        # classifier-free guidance: the null condition with probability cond_drop_prob (dit labels,
        # sd3 prompts; coins from the same generator, after the noise)
        cond = self.family.drop_condition(cond, generator, c.cond_drop_prob, self.model_config)
        terms: dict[str, Tensor] = {}
        y = None
        t_feats = None
        if self.uses_teacher:
            def compute():
                with autocast():
                    return self.teacher_output(noisy, timesteps, cond)

            # feature KD needs the teacher's hooks to fire, so it never reads the cache
            if self.teacher_cache is not None and cache_key is not None and not self.taps:
                y = self.teacher_cache.fetch(noisy, timesteps, cond, compute, key=cache_key)
            else:
                y = compute()
            t_feats = self.taps[0].pop() if self.taps else None
        with autocast():
            x = self.family.forward(self.student, noisy, timesteps, cond)
        x = x.float()  # losses in fp32 whatever the autocast dtype
        s_feats = self.taps[1].pop() if self.taps else None
        x_var = None
        if self.learned_sigma:  # DiT: the mean half gets the denoising and KD losses
            x, x_var = x[:, :noisy.shape[1]], x[:, noisy.shape[1]:]

        weights = self.objective.loss_weights(timesteps, c)
        sd = reduce_squared_error(x, target, c.kd_reduction, weights)
        if x_var is not None:
            # the variance half: DiT's hybrid variational-bound term, on the detached mean (frozen_out)
            vb = self.objective.vb_term(x.detach(), x_var, clean, noisy, timesteps)
            vb = vb * (x[0].numel() if c.kd_reduction == "sum" else 1.0)
            terms["vb_loss"] = vb.mean().detach()
            sd = sd + vb.mean()
        total = c.lambda_sd * sd if c.lambda_sd else sd.new_zeros(())
        terms["sd_loss"] = sd.detach()

        if y is not None and c.kd_loss != "none":
            if c.kd_loss == "output":
                kd = reduce_squared_error(x, y, c.kd_reduction)
                stats = None
                if with_stats:  # the fit of the teacher on the student, for comparison only
                    with torch.no_grad():
                        _, stats = lift_place_loss(x.detach(), y, step=step, total_steps=c.max_train_steps,
                                                   return_stats=True, timesteps=timesteps,
                                                   num_buckets=c.kd_num_buckets,
                                                   t_max=self.objective.num_train_timesteps, **self.kd_options())
            else:
                self.kd_module.to(x.device)
                kd, stats = self.kd_module(x, y, step=step, timesteps=timesteps)
            total = total + c.lambda_kd_output * kd
            terms["kd_loss"] = kd.detach()
            if stats is not None:
                for k in STAT_KEYS:
                    terms[f"kd_{k}"] = stats[k]
                for k in BUCKET_KEYS:
                    for i, v in enumerate(stats.get(k, ())):
                        terms[f"kd_{k}_{i}"] = v
            terms["output_mse"] = (x.detach() - y).square().mean()

        if c.lambda_kd_feat > 0 and t_feats is not None:
            feat = x.new_zeros(())
            for name, ft in t_feats.items():
                fs = self.adapters(name, s_feats[name].float())
                feat = feat + self.feature_loss(name, fs, ft.float(), step, timesteps)
            total = total + c.lambda_kd_feat * feat
            terms["feat_loss"] = feat.detach()
        terms["loss"] = total.detach()
        return StepTerms(loss=total, terms=terms)
