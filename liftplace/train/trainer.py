"""The distillation loop on ``accelerate.Accelerator``.

One process runs without a launcher; the same code runs on several processes under
``accelerate launch`` or ``torchrun`` (``distributed.py``: launch checks, the global
micro-batch's randomness, metrics reduced across ranks, trackers).
Each optimizer step is accumulate -> step-or-skip -> log. Gradient accumulation is
explicit (consecutive micro-batches of a deterministic stream, ``no_sync`` on all but
the last), so a checkpoint is always taken at an optimizer-step boundary and resuming
reproduces the uninterrupted run exactly. The models and data come from ``build.py``;
what a checkpoint holds and how a resume restores it is ``state.py``; the steps that close
a finished run are ``finish.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import abandon_later_checkpoints, clean_stale_temporaries
from .build import build_dataset, build_model_to_train, build_student, build_teacher, resolve_family
from .config import MODEL_TYPES, ConfigError, TrainConfig, validate_models
from .data import flip_coins, random_hflip
from .distributed import (ShardedObjective, check_launch, check_scale_engine, global_rows, log_file, log_images,
                          mean_over_processes, resolve_trackers)
from .finish import export_model, resolve_steps, sample_grid
from .models import (FeatureAdapters, FeatureTaps, ModelFamily, block_channels, compression_summary,
                     count_parameters, model_config_dict, select_feature_points)
from .objective import DistillationLoss, make_objective
from .optim import make_lr_scheduler, make_optimizer
from .state import load_checkpoint, resolve_resume, save_checkpoint
from .stream import BatchStream, mix_seed


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps, or every step of a run, had a non-finite loss or gradient."""


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

    Models, the dataset and the model family come from ``config``; tests and programs may
    pass them in directly. ``role`` names the final export folder (``output_dir/<role>``).
    ``end_of_run`` lists the steps that close a finished run (names from
    ``finish.END_OF_RUN`` or callables ``step(trainer)``); default: the family's.
    """

    def __init__(self, config: TrainConfig, *, teacher: nn.Module | None = None, student: nn.Module | None = None,
                 train_dataset=None, role: str = "student", teacher_cache=None, family: ModelFamily | None = None,
                 end_of_run: Sequence[str | Callable] | None = None):
        self.cfg = config.validate()
        self.role = role
        if role not in ("student", "teacher"):
            raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
        if role == "teacher" and (config.kd_loss != "none" or config.lambda_kd_feat > 0):
            raise ConfigError("training a teacher is plain diffusion training: kd_loss must be 'none' and "
                              "lambda_kd_feat 0")
        self._teacher_in, self._student_in, self._dataset_in = teacher, student, train_dataset
        self._family_in = family
        self._end_of_run_in = None if end_of_run is None else resolve_steps(end_of_run)
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
        from diffusers.training_utils import EMAModel

        cfg = self.cfg
        self.family = family = self._family_in or resolve_family(cfg, self.role, self._teacher_in, self._student_in)
        if cfg.model_type == "auto" and family.name in MODEL_TYPES:
            # record the family resolved (config.yaml, checkpoints; resume compares it)
            self.cfg = cfg = cfg.replace(model_type=family.name)
        self.model_resolution = family.model_resolution(cfg)  # latent models: resolution / the VAE's factor
        validate_models(cfg, self.role, teacher=self._teacher_in, student=self._student_in,
                        resolution=self.model_resolution)
        trackers = resolve_trackers(cfg.report_to)  # unknown or not installed: an error before anything runs
        self.accelerator = acc = _make_accelerator(cfg, trackers or None)
        # several processes that are not one accelerate job (or one that should be several): refuse
        # before anything is written
        check_launch(acc.num_processes, getattr(acc.distributed_type, "value", str(acc.distributed_type)))
        check_scale_engine(getattr(acc.distributed_type, "value", str(acc.distributed_type)))
        self.log = _logger()
        self.device = acc.device
        self.rank, self.world_size = acc.process_index, acc.num_processes
        set_seed(cfg.seed, device_specific=True)  # the global RNGs: seed + rank (the models use their own seeds)
        self.distributed_type = getattr(acc.distributed_type, "value", str(acc.distributed_type))
        self.log.info(f"{self.world_size} process(es) ({self.distributed_type}, {self.device}); batch "
                      f"{cfg.train_batch_size} per process x {self.world_size} x {cfg.gradient_accumulation_steps} "
                      f"accumulated = {cfg.train_batch_size * self.world_size * cfg.gradient_accumulation_steps} "
                      "samples per optimizer step", main_process_only=True)
        # frozen encoders (VAE latents, prompt embeddings) in the compute dtype, as diffusers' scripts
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        self.encoders = family.build_encoders(cfg, self.device, weight_dtype)
        self.end_of_run = (self._end_of_run_in if self._end_of_run_in is not None
                           else resolve_steps(family.end_of_run))

        if self.role == "teacher":
            self.teacher = None
            self.student = build_model_to_train(cfg, family, self.device, given=self._student_in)
        else:
            self.teacher = build_teacher(cfg, family, self.device, self.log, given=self._teacher_in)
            self.student = build_student(cfg, family, self.device, self.teacher, given=self._student_in)
        s_cfg = model_config_dict(self.student)
        shape = family.sample_shape(s_cfg, self.model_resolution)
        if self.teacher is not None:
            t_shape = family.sample_shape(model_config_dict(self.teacher), self.model_resolution)
            if t_shape != shape:
                raise ConfigError(f"teacher and student disagree on the sample shape: teacher {t_shape}, "
                                  f"student {shape} (in_channels/out_channels)")
        self.sample_shape = shape
        if cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        if cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.teacher_params = count_parameters(self.teacher) if self.teacher is not None else None
        self.student_params = count_parameters(self.student)
        if self.teacher is not None:
            self.log.info(compression_summary(self.teacher_params, self.student_params), main_process_only=True)
        else:
            self.log.info(f"model {self.student_params:,} parameters", main_process_only=True)
        if acc.is_main_process:
            from ..eval.cost import log_cost_summary  # eval imports train: import here, not at the top

            log_cost_summary(self.log, self.teacher, self.student, family, shape)

        # DDPM or flow matching (objective.py); latents are not bounded: never clip the predicted sample
        self.noise_scheduler, self.objective = make_objective(cfg, family, s_cfg, latent=self.encoders is not None)

        # feature KD: hooks on matched blocks, 1x1 adapters to the teacher's widths
        self.adapters, taps = None, None
        if cfg.lambda_kd_feat > 0:
            t_pts, s_pts = select_feature_points(family, self.teacher, self.student, cfg.kd_feat_layers,
                                                 cfg.student_arch)
            pairs = {n: (block_channels(s_pts[n]), block_channels(t_pts[n])) for n in t_pts}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(cfg.seed, 2))
                self.adapters = FeatureAdapters(pairs)
            taps = (FeatureTaps(t_pts), FeatureTaps(s_pts))

        adapter_params = list(self.adapters.parameters()) if self.adapters is not None else []
        params = list(self.student.parameters()) + adapter_params
        optimizer = make_optimizer(params, cfg)
        self.lr_scheduler = make_lr_scheduler(cfg, optimizer)
        # the trainable modules go through accelerate (DDP/FSDP/DeepSpeed wrappers): the student and
        # the feature adapters (when any has weights); the teacher and the frozen encoders do not
        if adapter_params:
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
        # noise and timesteps drawn for the global micro-batch, this rank's rows kept (distributed.py)
        objective = ShardedObjective(self.objective, self.rank, self.world_size)
        self.loss_fn = DistillationLoss(cfg, family, objective, self.student, self.teacher,
                                        feature_taps=taps, adapters=self.adapters, teacher_cache=self.teacher_cache)

        if self._dataset_in is not None:
            self.dataset = self._dataset_in
        elif self.encoders is not None:
            self.dataset = build_dataset(cfg, self.encoders.pixel_channels,
                                         captioned=getattr(self.encoders, "captioned", True))
        else:
            self.dataset = build_dataset(cfg, shape[0])
        if cfg.cache_latents:
            if self.encoders is None:
                raise ConfigError("cache_latents caches VAE latents: it needs a latent model (unet2d_condition)")
            folder = Path(cfg.latent_cache_dir or self.output_dir / "latent_cache")
            self.encoders.use_cache(self.dataset, folder, flips=cfg.random_flip, log=self.log,
                                    main_process=acc.is_main_process, wait=acc.wait_for_everyone)
        self.stream = BatchStream(self.dataset, cfg.train_batch_size, cfg.seed, num_replicas=acc.num_processes,
                                  rank=acc.process_index, num_workers=cfg.dataloader_num_workers)
        self.global_step = 0
        self.bad_steps = 0
        self.consecutive_bad = 0
        self.last_checkpoint = None
        self.model_dir = None

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
        self.log_to_trackers({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_to_trackers(self, values: dict, step: int | None = None) -> None:
        """Scalars to the trackers of ``report_to`` (main process; non-numbers and non-finite values
        are left out). Validation grids go there too (:meth:`log_image`)."""
        acc = self.accelerator
        if not acc.trackers or not acc.is_main_process:
            return
        scalars = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool) and _scalar(v) is not None}
        acc.log(scalars, step=self.global_step if step is None else step)

    def log_image(self, name: str, path: Path) -> None:
        """A saved image (a validation grid) to the trackers that take images, and as a file to
        those that store files (main process)."""
        acc = self.accelerator
        if not acc.trackers or not acc.is_main_process:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            log_images(acc, name, np.asarray(im.convert("RGB")), self.global_step)
        log_file(acc, path)

    # --- checkpoints (state.py) -----------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        self.last_checkpoint = save_checkpoint(self)
        return self.last_checkpoint

    def load_checkpoint(self, ckpt: Path) -> None:
        load_checkpoint(self, ckpt)

    # --- validation and export (finish.py) --------------------------------------------------------
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
        """A sample grid (main process; the others wait)."""
        path = sample_grid(self)
        self.accelerator.wait_for_everyone()
        return path

    def export(self) -> Path | None:
        return export_model(self)

    # --- the loop -------------------------------------------------------------------------------
    def _step_generator(self, micro_index: int) -> torch.Generator:
        """Micro-batch ``micro_index``'s generator, the same on every rank: it draws the flips, noise
        and timesteps of the global micro-batch, of which each rank keeps its rows."""
        return torch.Generator().manual_seed(mix_seed(self.cfg.seed, micro_index, 0))

    def _rank_generator(self, micro_index: int, gen: torch.Generator) -> torch.Generator:
        """The generator of draws made per rank (frozen encoders: VAE posterior samples, caption
        dropout): ``gen`` itself for one process, else one seeded by ``(seed, micro_index, rank)``."""
        if self.world_size == 1:
            return gen
        return torch.Generator().manual_seed(mix_seed(self.cfg.seed, micro_index, self.rank, 0xE4C))

    def _any(self, flag: bool) -> bool:
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(acc.reduce(t, reduction="sum").item() > 0)

    def _inputs(self, batch: dict, gen: torch.Generator, rank_gen: torch.Generator | None = None
                ) -> tuple[Tensor, dict]:
        """Clean samples (flipped when ``random_flip``, coins from ``gen`` for the global micro-batch)
        and the conditioning the family takes from the batch (its ``cond_keys``)."""
        clean = batch["pixel_values"].to(self.device)
        flips = None
        if self.cfg.random_flip:
            flips = global_rows(flip_coins(clean.shape[0] * self.world_size, gen), self.rank, self.world_size)
            clean = random_hflip(clean, gen, flips)
        if self.encoders is not None:  # pixels (or cached posteriors) -> latents, captions -> prompt embeddings
            clean, encoded = self.encoders.encode_batch(clean, batch, rank_gen or gen, flips)
            batch = {**batch, **encoded}
        missing = [k for k in self.family.cond_keys if k not in batch]
        if missing:
            raise ConfigError(f"model family {self.family.name!r} takes {', '.join(map(repr, missing))} from the "
                              f"batch as conditioning, but the dataset's items have only {', '.join(batch)}")
        cond = {k: batch[k].to(self.device) if isinstance(batch[k], Tensor) else batch[k]
                for k in self.family.cond_keys}
        return clean, cond

    def _accumulate(self, batches: Iterator, with_stats: bool) -> tuple[dict[str, Tensor], str | None]:
        """Forward and backward over the step's micro-batches: ``(mean terms, None)``, or
        ``({}, reason)`` once one has a non-finite loss (the rest are read, not computed)."""
        acc, accum = self.accelerator, self.cfg.gradient_accumulation_steps
        sums: dict[str, Tensor] = {}
        reason = None
        for j in range(accum):
            k, batch = next(batches)
            if reason is not None:
                continue  # keep the data position; nothing to compute for a skipped step
            gen = self._step_generator(k)
            clean, cond = self._inputs(batch, gen, self._rank_generator(k, gen))
            sync = contextlib.nullcontext() if j == accum - 1 else acc.no_sync(self.student)
            with sync:
                out = self.loss_fn(clean, cond, gen, self.global_step, with_stats=with_stats,
                                   autocast=acc.autocast, cache_key=k)
                if self._any(not _finite(out.terms["loss"])):
                    reason = f"loss is {float(out.terms['loss'])}"
                    continue
                acc.backward(out.loss / accum)
            for name, v in out.terms.items():
                sums[name] = sums.get(name, 0) + v / accum
        return ({} if reason else sums), reason

    def _step_or_skip(self, reason: str | None) -> tuple[Tensor | None, str | None, float]:
        """Clip and take the optimizer (and EMA) step, or skip it when the loss or the gradient
        norm is not finite; advance the lr schedule either way. ``(grad_norm, reason, lr)``."""
        cfg, acc = self.cfg, self.accelerator
        grad_norm = None
        if reason is None:
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = acc.clip_grad_norm_(self.trainable, max_norm)
            if acc.scaler is None and self._any(not _finite(grad_norm)):
                reason = f"gradient norm is {float(grad_norm)}"
        step = self.global_step + 1
        if reason is not None:
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
        return grad_norm, reason, lr

    def _stop_if_diverged(self, reason: str | None) -> None:
        if reason is None or self.consecutive_bad < self.cfg.max_bad_steps:
            return
        step = self.global_step
        self._write_metrics({"step": step, "skipped": True, "bad_steps": self.bad_steps,
                             "consecutive_bad_steps": self.consecutive_bad})
        last = self.last_checkpoint
        raise TrainingDivergedError(
            f"stopped at step {step}: {self.consecutive_bad} consecutive steps had a non-finite loss or "
            f"gradient (max_bad_steps={self.cfg.max_bad_steps}; last: {reason}). "
            + (f"The last good checkpoint is {last} (step {last.name.split('-')[-1]}), untouched. "
               if last is not None else "No checkpoint was written. ")
            + "Lower learning_rate, keep max_grad_norm on, or check the teacher and the data.")

    def _log_step(self, sums: dict[str, Tensor], reason: str | None, grad_norm, lr: float, dt: float,
                  with_stats: bool) -> None:
        cfg, step, accum = self.cfg, self.global_step, self.cfg.gradient_accumulation_steps
        bad = reason is not None  # the same on every rank (_any)
        # every logged value is the mean over the processes (one all-reduce; the adaptive weights and
        # per-bucket statistics are already the same on every rank, so their mean is that value)
        sums = mean_over_processes(self.accelerator, sums) if not bad else {}
        loss_value = float(sums["loss"]) if not bad else float("nan")
        if not bad:
            self._loss_window.append(loss_value)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.2e}", bad=self.bad_steps, refresh=False)
        if not (bad or with_stats):
            return
        record = {"step": step, "epoch": self.stream.position(step * accum - 1)[0]}
        if not bad:
            record["loss"] = sums.pop("loss")
            record.update(sums)
            window = self._loss_window
            record["loss_avg"] = sum(window) / len(window) if window else None
            self._loss_window = []
        record.update({"lr": lr, "grad_norm": grad_norm, "step_time": dt,
                       "samples_per_second": cfg.train_batch_size * accum * self.accelerator.num_processes / dt,
                       "bad_steps": self.bad_steps, "consecutive_bad_steps": self.consecutive_bad, "skipped": bad})
        self._write_metrics(record)

    def _after_step(self, reason: str | None) -> None:
        """Mid-run validation grid and checkpoint, on their schedules."""
        cfg, step = self.cfg, self.global_step
        # the checkpoint first: a validation grid that fails must never cost it
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            if reason is not None:  # keep the last checkpoint a good one: never save inside a bad streak
                self.log.warning(f"step {step}: checkpoint not saved (the step was skipped)")
            else:
                self.save_checkpoint()
        if cfg.validation_steps and step % cfg.validation_steps == 0 and step < cfg.max_train_steps:
            self.validate()

    def _begin(self) -> None:
        """Output folder, resume, config.yaml, trackers, progress bar."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(self.output_dir)
        acc.wait_for_everyone()  # stale temporaries gone, a rewind finished: every rank sees the same folder
        ckpt = resolve_resume(cfg, self.output_dir, self.log)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        if acc.is_main_process:
            abandon_later_checkpoints(self.output_dir, self.global_step, resumed_from=ckpt)
            cfg.save_yaml(self.output_dir / "config.yaml")  # every value in it is in effect (state.py)
            self._truncate_metrics()
        if acc.log_with:
            acc.init_trackers("liftplace", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                   for k, v in cfg.to_dict().items()})
        self._bar = None
        acc.wait_for_everyone()  # config.yaml written and metrics truncated before any rank trains
        if cfg.progress_bar and acc.is_main_process:  # one bar, on rank 0
            from tqdm.auto import tqdm

            self._bar = tqdm(total=cfg.max_train_steps, initial=self.global_step, desc=f"{self.role} {cfg.kd_loss}",
                             unit="step", dynamic_ncols=True)
        self._loss_window = []

    def train(self, until_step: int | None = None) -> TrainResult:
        """Run to ``max_train_steps`` (or stop after ``until_step``, as if interrupted:
        no end-of-run steps, for tests and time-boxed runs)."""
        t_start = time.perf_counter()
        self.setup()
        cfg, acc = self.cfg, self.accelerator
        self._begin()
        stop = cfg.max_train_steps if until_step is None else min(until_step, cfg.max_train_steps)
        batches = self.stream.iterate(self.global_step * cfg.gradient_accumulation_steps)
        first_step, skipped, reason = self.global_step, 0, None
        try:
            while self.global_step < stop:
                t0 = time.perf_counter()
                step = self.global_step + 1
                with_stats = step % cfg.logging_steps == 0 or step == cfg.max_train_steps
                sums, reason = self._accumulate(batches, with_stats)
                grad_norm, reason, lr = self._step_or_skip(reason)
                skipped += reason is not None
                self._stop_if_diverged(reason)
                self._log_step(sums, reason, grad_norm, lr, time.perf_counter() - t0, with_stats)
                self._after_step(reason)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            ran = self.global_step - first_step
            if ran and skipped == ran:
                raise TrainingDivergedError(
                    f"every one of the {ran} steps of this run (steps {first_step + 1}-{self.global_step}) was "
                    f"skipped: non-finite loss or gradient (last: {reason}); nothing was trained and nothing is "
                    "exported. Check the teacher, the data and the checkpoint resumed from, or lower learning_rate.")
            if self.global_step >= cfg.max_train_steps:
                for finish in self.end_of_run:  # before end_training: the final grid goes to the trackers too
                    finish(self)
            acc.wait_for_everyone()  # no process leaves while rank 0 still writes
        finally:
            if self._bar is not None:
                self._bar.close()
            if acc.log_with:
                acc.end_training()
        return TrainResult(output_dir=self.output_dir, global_step=self.global_step, model_dir=self.model_dir,
                           metrics_path=self.metrics_path, bad_steps=self.bad_steps,
                           last_checkpoint=self.last_checkpoint, wall_time=time.perf_counter() - t_start,
                           teacher_params=self.teacher_params, student_params=self.student_params)


def distill(config: TrainConfig, **kwargs) -> TrainResult:
    """Run :class:`Trainer` with ``config``; see its arguments."""
    until = kwargs.pop("until_step", None)
    return Trainer(config, **kwargs).train(until_step=until)
