"""The distillation loop on ``accelerate.Accelerator``.

One process runs without a launcher; the same code runs under ``accelerate launch``.
Gradient accumulation is explicit (consecutive micro-batches of a deterministic
stream, ``no_sync`` on all but the last), so a checkpoint is always taken at an
optimizer-step boundary and resuming reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (CheckpointError, clean_stale_temporaries, compare_model_config, latest_checkpoint,
                         load_safetensors_checked, load_torch_state, prune_checkpoints, read_verified_state,
                         rng_state, set_rng_state, write_checkpoint)
from ..eval.plots import plot_bucket_heatmaps
from .config import ConfigError, TrainConfig, load_model_config, load_yaml
from .data import make_dataset, random_hflip
from .models import (FeatureAdapters, FeatureTaps, block_channels, build_from_config, compression_summary,
                     count_parameters, get_family, load_pretrained, model_config_dict, read_config,
                     resolve_model_dir, scheduler_config_near, select_feature_points)
from .objective import DistillationLoss, NoiseObjective, make_noise_scheduler
from .sampling import ddim_sample, ddim_scheduler_from, save_grid
from .stream import BatchStream, mix_seed

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Changing these between a checkpoint and the resumed run would silently change the data
# order, the noise or the model, so resume refuses.
RESUME_CRITICAL = ("seed", "train_batch_size", "gradient_accumulation_steps", "dataset_name", "train_data_dir",
                   "resolution", "random_flip", "model_type", "prediction_type", "ddpm_num_steps",
                   "ddpm_beta_schedule", "use_ema", "kd_loss", "lambda_kd_feat", "kd_feat_layers")


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    model_dir: Path | None
    metrics_path: Path
    bad_steps: int
    last_checkpoint: Path | None
    wall_time: float
    teacher_params: int | None
    student_params: int


def _logger():
    from accelerate.logging import get_logger

    return get_logger(__name__)


def _tensorboard_available() -> bool:
    try:
        from accelerate.utils import is_tensorboard_available

        return bool(is_tensorboard_available())
    except ImportError:
        return False


def _make_accelerator(cfg: TrainConfig, log_with):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import ProjectConfiguration

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision \
            and PartialState().num_processes == 1:
        # A previous run in this process fixed another precision; accelerate keeps it in a
        # singleton. Safe to reset for a single process (tests, the demo, notebooks).
        AcceleratorState._reset_state()
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir))
    return Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with, project_config=project)


def _finite(x) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


def _scalar(v):
    if isinstance(v, torch.Tensor):
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/Inf
    return v


class Trainer:
    """Distil ``teacher`` into ``student`` (or, with ``kd_loss="none"`` and no teacher, train
    a model from scratch: ``liftplace train-teacher``).

    Models and the dataset come from ``config``; tests may pass them in directly.
    ``role`` names the final export folder (``output_dir/<role>``).
    """

    def __init__(self, config: TrainConfig, *, teacher: nn.Module | None = None, student: nn.Module | None = None,
                 train_dataset=None, role: str = "student", teacher_cache=None):
        self.cfg = config.validate()
        self.role = role
        if role not in ("student", "teacher"):
            raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
        if role == "teacher" and (config.kd_loss != "none" or config.lambda_kd_feat > 0):
            raise ConfigError("training a teacher is plain diffusion training: kd_loss must be 'none' and "
                              "lambda_kd_feat 0")
        self._teacher_in, self._student_in, self._dataset_in = teacher, student, train_dataset
        self.teacher_cache = teacher_cache
        self.output_dir = Path(self.cfg.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"

    # --- setup ----------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        """Build accelerator, models, optimizer, EMA and data (idempotent; ``train`` calls it)."""
        if not getattr(self, "_is_setup", False):
            self._setup()
            self._is_setup = True
        return self

    def _setup(self):
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        cfg = self.cfg
        log_with = None
        if cfg.report_to == "tensorboard":
            log_with = "tensorboard" if _tensorboard_available() else None
        self.accelerator = acc = _make_accelerator(cfg, log_with)
        self.log = _logger()
        if cfg.report_to == "tensorboard" and log_with is None:
            self.log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
        self.device = acc.device
        set_seed(cfg.seed)
        self.family = family = get_family(cfg.model_type)

        if self.role == "teacher":
            self.teacher, self.student = None, self._build_teacher_to_train()
        else:
            self.teacher = self._build_teacher()
            self.student = self._build_student()
        s_cfg = model_config_dict(self.student)
        shape = family.sample_shape(s_cfg, cfg.resolution)
        if self.teacher is not None:
            t_shape = family.sample_shape(model_config_dict(self.teacher), cfg.resolution)
            if t_shape != shape:
                raise ConfigError(f"teacher and student disagree on the sample shape: teacher {t_shape}, "
                                  f"student {shape} (in_channels/out_channels)")
        self.sample_shape = shape
        self.teacher_params = count_parameters(self.teacher) if self.teacher is not None else None
        self.student_params = count_parameters(self.student)
        if self.teacher is not None:
            self.log.info(compression_summary(self.teacher_params, self.student_params), main_process_only=True)
        else:
            self.log.info(f"model {self.student_params:,} parameters", main_process_only=True)

        self.noise_scheduler = make_noise_scheduler(cfg)
        self.objective = NoiseObjective(self.noise_scheduler)

        # feature KD: hooks on matched blocks, 1x1 adapters to the teacher's widths
        self.adapters, taps = None, None
        if cfg.lambda_kd_feat > 0:
            t_pts, s_pts = select_feature_points(family, self.teacher, self.student, cfg.kd_feat_layers)
            pairs = {n: (block_channels(s_pts[n]), block_channels(t_pts[n])) for n in t_pts}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(cfg.seed, 2))
                self.adapters = FeatureAdapters(pairs)
            taps = (FeatureTaps(t_pts), FeatureTaps(s_pts))

        params = list(self.student.parameters()) + (list(self.adapters.parameters()) if self.adapters else [])
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        # Not passed through accelerator.prepare: a prepared scheduler steps once per process.
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_train_steps)
        if self.adapters is not None:
            self.student, self.adapters, self.optimizer = acc.prepare(self.student, self.adapters, optimizer)
        else:
            self.student, self.optimizer = acc.prepare(self.student, optimizer)
        self.trainable = params
        self.ema = None
        if cfg.use_ema:
            raw = acc.unwrap_model(self.student)
            self.ema = EMAModel(raw.parameters(), decay=cfg.ema_decay, use_ema_warmup=cfg.use_ema_warmup,
                                inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power, model_cls=type(raw),
                                model_config=raw.config)
            self.ema.to(self.device)
        self.loss_fn = DistillationLoss(cfg, family, self.objective, self.student, self.teacher,
                                        feature_taps=taps, adapters=self.adapters, teacher_cache=self.teacher_cache)

        self.dataset = self._build_dataset(shape)
        self.stream = BatchStream(self.dataset, cfg.train_batch_size, cfg.seed, num_replicas=acc.num_processes,
                                  rank=acc.process_index, num_workers=cfg.dataloader_num_workers)
        self.global_step = 0
        self.bad_steps = 0
        self.consecutive_bad = 0
        self.last_checkpoint = None

    def _build_teacher(self):
        cfg = self.cfg
        t = self._teacher_in
        if t is None and cfg.pretrained_model_name_or_path is not None:
            path = cfg.pretrained_model_name_or_path
            t = load_pretrained(path, self.family, "teacher (pretrained_model_name_or_path)")
            self._check_teacher_schedule(resolve_model_dir(path))
        elif t is None and cfg.teacher_config is not None:
            tc = load_model_config(cfg.teacher_config, "teacher_config")
            t = build_from_config(tc, self.family, "teacher_config", seed=mix_seed(cfg.seed, 3))
            self.log.warning("the teacher is built from teacher_config with random weights (tests/smoke runs only)")
        if t is None:
            return None
        t = t.to(self.device)
        if _DTYPES[cfg.teacher_dtype] != torch.float32:
            t = t.to(_DTYPES[cfg.teacher_dtype])
        t.eval().requires_grad_(False)
        return t

    def _check_teacher_schedule(self, model_dir: Path):
        path = scheduler_config_near(model_dir)
        if path is None:
            return
        saved = json.loads(path.read_text())
        cfg = self.cfg
        for key, mine in (("prediction_type", cfg.prediction_type), ("num_train_timesteps", cfg.ddpm_num_steps),
                          ("beta_schedule", cfg.ddpm_beta_schedule)):
            if key in saved and saved[key] != mine:
                flag = {"num_train_timesteps": "ddpm_num_steps", "beta_schedule": "ddpm_beta_schedule"}.get(key, key)
                raise ConfigError(f"the teacher was trained with {key}={saved[key]!r} ({path}) but this run uses "
                                  f"{flag}={mine!r}; pass --{flag} {saved[key]}")

    def _build_teacher_to_train(self):
        cfg = self.cfg
        m = self._student_in
        if m is None and cfg.pretrained_model_name_or_path is not None:
            m = load_pretrained(cfg.pretrained_model_name_or_path, self.family, "pretrained_model_name_or_path")
        elif m is None and cfg.teacher_config is not None:
            tc = load_model_config(cfg.teacher_config, "teacher_config")
            m = build_from_config(tc, self.family, "teacher_config", seed=mix_seed(cfg.seed, 3))
        elif m is None:
            raise ConfigError("train-teacher needs the architecture: set teacher_config (a mapping or JSON file), "
                              "or pretrained_model_name_or_path to continue from a model folder")
        m = m.to(self.device)
        if any(p.dtype != torch.float32 for p in m.parameters()):
            m = m.float()
        return m.train().requires_grad_(True)

    def _build_student(self):
        cfg = self.cfg
        s = self._student_in
        if s is None and cfg.student_model_name_or_path is not None:
            s = load_pretrained(cfg.student_model_name_or_path, self.family, "student (student_model_name_or_path)")
        elif s is None:
            if cfg.student_config is not None:
                sc = load_model_config(cfg.student_config, "student_config")
            elif self.teacher is not None:
                sc = self.family.derive_student_config(
                    model_config_dict(self.teacher), width_mult=cfg.student_width_mult,
                    layers_per_block=cfg.student_layers_per_block, attention=cfg.student_attention,
                    norm_num_groups=cfg.student_norm_num_groups)
            else:
                raise ConfigError("no model to train: set student_config (or student_model_name_or_path), "
                                  "or a teacher to derive the student from")
            s = build_from_config(sc, self.family, "student", seed=mix_seed(cfg.seed, 1))
        s = s.to(self.device)
        if any(p.dtype != torch.float32 for p in s.parameters()):
            s = s.float()
        s.train().requires_grad_(True)
        return s

    def _build_dataset(self, shape):
        if self._dataset_in is not None:
            return self._dataset_in
        cfg = self.cfg
        name = cfg.train_data_dir or cfg.dataset_name
        extra = {"center_crop": cfg.center_crop} if name not in ("digits", "synthetic") else {}
        # seed=0: the digits train/held-out split stays the same whatever the training seed
        return make_dataset(name, cfg.resolution, shape[0], split="train", seed=0, **extra)

    # --- checkpoints --------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        import diffusers

        return {
            "global_step": self.global_step,
            "micro_index": self.global_step * self.cfg.gradient_accumulation_steps,
            "epoch": self.stream.position(self.global_step * self.cfg.gradient_accumulation_steps)[0],
            "bad_steps": self.bad_steps,
            "consecutive_bad_steps": self.consecutive_bad,
            "num_processes": self.accelerator.num_processes,
            "role": self.role,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        }

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            def writer(tmp: Path):
                acc.unwrap_model(self.student).save_pretrained(tmp / "student", safe_serialization=True)
                if self.ema is not None:
                    self.ema.save_pretrained(tmp / "student_ema")
                if self.adapters is not None:
                    adapters = acc.unwrap_model(self.adapters)
                    sd = {k: v.detach().cpu().contiguous() for k, v in adapters.state_dict().items()}
                    save_file(sd, str(tmp / "adapters.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
                # The KD loss's per-timestep-bucket EMA (adaptive-timestep), so a resume continues it.
                save_file({k: v.detach().cpu().contiguous() for k, v in self.loss_fn.state_dict().items()},
                          str(tmp / "kd_loss.safetensors"))
                torch.save(rng_state(), tmp / "random_states.pt")
                self.noise_scheduler.save_pretrained(str(tmp))
                self.cfg.save_yaml(tmp / "config.yaml")
                return self._trainer_state()

            path = write_checkpoint(self.output_dir, self.global_step, writer)
            removed = prune_checkpoints(self.output_dir, self.cfg.checkpoints_total_limit)
            for p in removed:
                self.log.info(f"removed old checkpoint {p}")
            self.log.info(f"saved checkpoint {path}")
        acc.wait_for_everyone()
        self.last_checkpoint = self.output_dir / f"checkpoint-{self.global_step}"
        return self.last_checkpoint

    def _resolve_resume(self) -> Path | None:
        r = self.cfg.resume_from_checkpoint
        if r is None:
            return None
        if r == "latest":
            p = latest_checkpoint(self.output_dir)
            if p is None:
                self.log.info(f"no checkpoint in {self.output_dir}; starting a new training run")
            return p
        p = Path(r)
        if not p.is_dir():
            raise CheckpointError(f"resume_from_checkpoint: checkpoint folder {r!r} does not exist")
        return p

    def load_checkpoint(self, ckpt: Path) -> None:
        cfg = self.cfg
        state = read_verified_state(ckpt)
        saved_cfg_path = ckpt / "config.yaml"
        try:
            saved = load_yaml(saved_cfg_path)
        except ConfigError as exc:
            raise CheckpointError(f"{saved_cfg_path} cannot be used: {exc}") from exc
        for key in RESUME_CRITICAL:
            if key in saved and saved[key] != getattr(cfg, key):
                raise CheckpointError(f"{saved_cfg_path} does not match this run: {key} is {saved[key]!r} in the "
                                      f"checkpoint but {getattr(cfg, key)!r} now; resume with the same {key} "
                                      "or start a new output_dir")
        changed = [k for k in saved if k not in RESUME_CRITICAL and k != "resume_from_checkpoint"
                   and saved[k] != getattr(cfg, k)]
        if changed:
            self.log.warning(f"resuming with changed settings: {', '.join(changed)}")
        if state.get("num_processes", 1) != self.accelerator.num_processes:
            raise CheckpointError(f"{ckpt / 'trainer_state.json'} was written by {state.get('num_processes')} "
                                  f"process(es) but this run has {self.accelerator.num_processes}; the data "
                                  "order would differ")

        raw = self.accelerator.unwrap_model(self.student)
        cur_cfg = model_config_dict(raw)
        compare_model_config(ckpt / "student" / "config.json", read_config(ckpt / "student"), cur_cfg, "student")
        weights = ckpt / "student" / "diffusion_pytorch_model.safetensors"
        sd = load_safetensors_checked(weights, raw.state_dict(), "student")
        raw.load_state_dict(sd)
        if self.ema is not None:
            ema_dir = ckpt / "student_ema"
            if not ema_dir.is_dir():
                raise CheckpointError(f"{ema_dir} is missing but use_ema is on")
            ema_cfg = read_config(ema_dir)
            compare_model_config(ema_dir / "config.json", ema_cfg, cur_cfg, "student")
            named = dict(raw.named_parameters())
            esd = load_safetensors_checked(ema_dir / "diffusion_pytorch_model.safetensors",
                                           {k: v for k, v in raw.state_dict().items()}, "student EMA")
            self.ema.shadow_params = [esd[k].to(self.device, p.dtype).clone() for k, p in named.items()]
            self.ema.load_state_dict({k: ema_cfg[k] for k in ("decay", "min_decay", "optimization_step",
                                                              "update_after_step", "use_ema_warmup",
                                                              "inv_gamma", "power") if k in ema_cfg})
        if self.adapters is not None:
            ad = self.accelerator.unwrap_model(self.adapters)
            asd = load_safetensors_checked(ckpt / "adapters.safetensors", ad.state_dict(), "feature adapters")
            ad.load_state_dict(asd)
        opt_path = ckpt / "optimizer.pt"
        try:
            self.optimizer.load_state_dict(load_torch_state(opt_path))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{opt_path} does not match this run's optimizer: {exc}") from exc
        self.lr_scheduler.load_state_dict(load_torch_state(ckpt / "lr_scheduler.pt"))
        kd_path = ckpt / "kd_loss.safetensors"
        if kd_path.is_file():
            expected = self.loss_fn.state_dict()
            self.loss_fn.load_state_dict(load_safetensors_checked(kd_path, expected, "KD loss state"))
        set_rng_state(load_torch_state(ckpt / "random_states.pt"))
        self.global_step = int(state["global_step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.consecutive_bad = int(state.get("consecutive_bad_steps", 0))
        self.last_checkpoint = Path(ckpt)
        self.log.info(f"resumed from {ckpt} at step {self.global_step}")

    # --- logging ------------------------------------------------------------------------------
    def _truncate_metrics(self):
        """Drop metric lines past the resumed step (written after the checkpoint by a crashed run)."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.global_step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line
        self.metrics_path.write_text("".join(s + "\n" for s in keep))

    def _write_metrics(self, record: dict):
        if not self.accelerator.is_main_process:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: _scalar(v) for k, v in record.items()}) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: float(v) for k, v in record.items()
                                  if isinstance(v, (int, float, torch.Tensor)) and k != "step"
                                  and _scalar(v) is not None}, step=record["step"])

    # --- validation and export ------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily load the EMA weights into the student (no-op without EMA)."""
        raw = self.accelerator.unwrap_model(self.student)
        if self.ema is None:
            yield raw
            return
        self.ema.store(raw.parameters())
        self.ema.copy_to(raw.parameters())
        try:
            yield raw
        finally:
            self.ema.restore(raw.parameters())

    def validate(self) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        cfg = self.cfg
        sched = ddim_scheduler_from(self.noise_scheduler.config)
        with self.ema_weights() as model:
            images = ddim_sample(self.family, model, sched, cfg.num_validation_images, self.sample_shape,
                                 seed=cfg.seed, num_inference_steps=cfg.ddpm_num_inference_steps,
                                 batch_size=cfg.num_validation_images, device=self.device)
        path = save_grid(images, self.output_dir / "samples" / f"step-{self.global_step:06d}.png")
        self.log.info(f"saved sample grid {path}")
        return path

    def export(self) -> Path | None:
        """Save the final (EMA) model with save_pretrained (safetensors) + scheduler_config.json."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        out = self.output_dir / self.role
        with self.ema_weights() as model:
            m = copy.deepcopy(model)
        m = m.to(torch.device("cpu"))
        if _DTYPES[self.cfg.export_dtype] != torch.float32:
            m = m.to(_DTYPES[self.cfg.export_dtype])
        tmp = self.output_dir / f".tmp-{self.role}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(str(tmp), safe_serialization=True)
        self.noise_scheduler.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        self.log.info(f"exported the final {'EMA ' if self.ema is not None else ''}{self.role} to {out}")
        return out

    # --- the loop -------------------------------------------------------------------------------
    def _step_generator(self, micro_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.cfg.seed, micro_index, self.accelerator.process_index))

    def _any(self, flag: bool) -> bool:
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(acc.reduce(t, reduction="sum").item() > 0)

    def train(self, until_step: int | None = None) -> TrainResult:
        """Run to ``max_train_steps`` (or stop after ``until_step``, as if interrupted:
        no export, for tests and time-boxed runs)."""
        t_start = time.perf_counter()
        self.setup()
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(self.output_dir)
        ckpt = self._resolve_resume()
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        if acc.is_main_process:
            cfg.save_yaml(self.output_dir / "config.yaml")
            self._truncate_metrics()
        if acc.log_with:
            acc.init_trackers("liftplace", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                   for k, v in cfg.to_dict().items()})
        stop = cfg.max_train_steps if until_step is None else min(until_step, cfg.max_train_steps)
        accum = cfg.gradient_accumulation_steps
        batches = self.stream.iterate(self.global_step * accum)

        bar = None
        if cfg.progress_bar and acc.is_local_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_train_steps, initial=self.global_step, desc=f"{self.role} {cfg.kd_loss}",
                       unit="step", dynamic_ncols=True)
        window = []
        try:
            while self.global_step < stop:
                t0 = time.perf_counter()
                step = self.global_step + 1
                want_stats = step % cfg.logging_steps == 0 or step == cfg.max_train_steps
                sums: dict[str, torch.Tensor] = {}
                bad, reason = False, ""
                for j in range(accum):
                    k, batch = next(batches)
                    if bad:
                        continue  # keep the data position; nothing to compute for a skipped step
                    gen = self._step_generator(k)
                    clean = batch["pixel_values"].to(self.device)
                    if cfg.random_flip:
                        clean = random_hflip(clean, gen)
                    sync = contextlib.nullcontext() if j == accum - 1 else acc.no_sync(self.student)
                    with sync:
                        out = self.loss_fn(clean, {}, gen, self.global_step, with_stats=want_stats,
                                           autocast=acc.autocast, cache_key=k)
                        if self._any(not _finite(out.terms["loss"])):
                            bad, reason = True, f"loss is {float(out.terms['loss'])}"
                            continue
                        acc.backward(out.loss / accum)
                    for name, v in out.terms.items():
                        sums[name] = sums.get(name, 0) + v / accum
                grad_norm = None
                if not bad:
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                    grad_norm = acc.clip_grad_norm_(self.trainable, max_norm)
                    if acc.scaler is None and self._any(not _finite(grad_norm)):
                        bad, reason = True, f"gradient norm is {float(grad_norm)}"
                if bad:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.bad_steps += 1
                    self.consecutive_bad += 1
                    self.log.warning(f"step {step}: non-finite training signal ({reason}); step skipped "
                                     f"({self.consecutive_bad} in a row, {self.bad_steps} in total)")
                else:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.step(acc.unwrap_model(self.student).parameters())
                    self.consecutive_bad = 0
                lr = self.lr_scheduler.get_last_lr()[0]
                self.lr_scheduler.step()
                self.global_step = step
                dt = time.perf_counter() - t0

                if bad and self.consecutive_bad >= cfg.max_bad_steps:
                    self._write_metrics({"step": step, "skipped": True, "bad_steps": self.bad_steps,
                                         "consecutive_bad_steps": self.consecutive_bad})
                    last = self.last_checkpoint
                    raise TrainingDivergedError(
                        f"stopped at step {step}: {self.consecutive_bad} consecutive steps had a non-finite loss or "
                        f"gradient (max_bad_steps={cfg.max_bad_steps}; last: {reason}). "
                        + (f"The last good checkpoint is {last} (step {last.name.split('-')[-1]}), untouched. "
                           if last is not None else "No checkpoint was written. ")
                        + "Lower learning_rate, keep max_grad_norm on, or check the teacher and the data.")
                loss_value = float(sums["loss"]) if not bad else float("nan")
                if not bad:
                    window.append(loss_value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.2e}", bad=self.bad_steps, refresh=False)
                if bad or want_stats:
                    record = {"step": step, "epoch": self.stream.position(step * accum - 1)[0]}
                    if not bad:
                        record["loss"] = sums.pop("loss")
                        record.update(sums)
                        record["loss_avg"] = sum(window) / len(window) if window else None
                        window = []
                    record.update({"lr": lr, "grad_norm": grad_norm, "step_time": dt,
                                   "samples_per_second": cfg.train_batch_size * accum * acc.num_processes / dt,
                                   "bad_steps": self.bad_steps, "consecutive_bad_steps": self.consecutive_bad,
                                   "skipped": bad})
                    self._write_metrics(record)
                if cfg.validation_steps and step % cfg.validation_steps == 0 and step < cfg.max_train_steps:
                    self.validate()
                if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                    if bad:  # keep the last checkpoint a good one: never save inside a bad streak
                        self.log.warning(f"step {step}: checkpoint not saved (the step was skipped)")
                    else:
                        self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if acc.log_with:
                acc.end_training()
        model_dir = None
        if self.global_step >= cfg.max_train_steps:
            self.validate()
            model_dir = self.export()
            if acc.is_main_process:
                for path in plot_bucket_heatmaps(self.metrics_path, self.output_dir):
                    self.log.info(f"saved per-timestep-bucket heat-map {path}")
        return TrainResult(output_dir=self.output_dir, global_step=self.global_step, model_dir=model_dir,
                           metrics_path=self.metrics_path, bad_steps=self.bad_steps,
                           last_checkpoint=self.last_checkpoint, wall_time=time.perf_counter() - t_start,
                           teacher_params=self.teacher_params, student_params=self.student_params)


def distill(config: TrainConfig, **kwargs) -> TrainResult:
    """Run :class:`Trainer` with ``config``; see its arguments."""
    until = kwargs.pop("until_step", None)
    return Trainer(config, **kwargs).train(until_step=until)
