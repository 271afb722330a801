"""A training run's state: what a checkpoint holds, how it is written and how it is read back.

    checkpoint-<step>/
        student/                 the student (save_pretrained)
        student_ema/             its EMA (EMAModel.save_pretrained: weights + the EMA's state in config.json)
        adapters.safetensors     feature-KD adapters, when used
        kd_loss.safetensors      the KD loss's buffers (the per-timestep-bucket EMA)
        optimizer.pt             AdamW state: moments and step counts
        lr_scheduler.pt          the schedule's position (checked against the step on resume)
        random_states.pt         python / numpy / torch RNG (of rank 0)
        random_states_<r>.pt     the same of rank r > 0, in a multi-process run
        scheduler_config.json    the noise schedule;  config.yaml  the run's config
        trainer_state.json       step, data position, counters, manifest (written by checkpoint.py)

Writing goes through :func:`checkpoint.write_checkpoint` (atomic) and reading starts with
:func:`checkpoint.read_verified_state` (every listed file's size and sha256).

Resuming keeps everything that makes the run the same run (the data order, the noise, the
model: ``RESUME_CRITICAL``) and refuses a change to those. Any other setting may change,
and the change is applied, not just recorded: the optimiser takes the new lr, betas,
weight decay and eps (its moments kept), the lr schedule is rebuilt for the new
``lr_scheduler`` / ``lr_warmup_steps`` / ``max_train_steps`` from the checkpoint's step,
and the EMA takes the new decay settings (its weights and step count kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .checkpoint import (CheckpointError, compare_model_config, latest_checkpoint, load_safetensors_checked,
                         load_torch_state, prune_checkpoints, read_verified_state, required_files, rng_state,
                         set_rng_state, write_checkpoint)
from .config import ConfigError, TrainConfig, load_yaml
from .models import model_config_dict, read_config
from .optim import apply_optimizer_settings, make_lr_scheduler

if TYPE_CHECKING:
    from .trainer import Trainer

# Changing these between a checkpoint and the resumed run would silently change the data
# order, the noise or the model, so resume refuses.
RESUME_CRITICAL = ("seed", "train_batch_size", "gradient_accumulation_steps", "dataset_name", "train_data_dir",
                   "resolution", "random_flip", "model_type", "prediction_type", "ddpm_num_steps",
                   "ddpm_beta_schedule", "use_ema", "kd_loss", "lambda_kd_feat", "kd_feat_layers",
                   "image_column", "caption_column", "max_train_samples", "cond_drop_prob", "vae_sample_mode",
                   "pretrained_vae_model_name_or_path", "text_encoder_path", "noise_offset")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _cpu_tensors(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def trainer_state(tr: Trainer) -> dict:
    """The counters and facts ``trainer_state.json`` records (the manifest is added on write)."""
    import diffusers

    micro_index = tr.global_step * tr.cfg.gradient_accumulation_steps
    return {
        "global_step": tr.global_step,
        "micro_index": micro_index,
        "epoch": tr.stream.position(micro_index)[0],
        "bad_steps": tr.bad_steps,
        "consecutive_bad_steps": tr.consecutive_bad,
        "num_processes": tr.accelerator.num_processes,
        "role": tr.role,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def _gather_rng_states(acc) -> list[dict]:
    """Every process's RNG states, on every process (collective: call on all ranks)."""
    mine = rng_state()
    if acc.num_processes == 1:
        return [mine]
    states = [None] * acc.num_processes
    torch.distributed.all_gather_object(states, mine)
    return states


def _sharded(acc) -> bool:
    """FSDP / DeepSpeed: the model's full state dict has to be gathered from all ranks."""
    return str(acc.distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED")


def save_checkpoint(tr: Trainer) -> Path:
    """Write ``checkpoint-<global_step>`` (main process; every process waits for it)."""
    acc = tr.accelerator
    acc.wait_for_everyone()
    rng_states = _gather_rng_states(acc)
    # FSDP / DeepSpeed: gathered on every rank (collective); DDP and one process: the module's own
    student_state = acc.get_state_dict(tr.student) if _sharded(acc) else None
    if acc.is_main_process:
        def writer(tmp: Path) -> dict:
            raw = acc.unwrap_model(tr.student)
            if student_state is None:
                raw.save_pretrained(tmp / "student", safe_serialization=True)
            else:  # the same files save_pretrained writes, from the gathered state dict
                raw.save_config(tmp / "student")
                save_file(_cpu_tensors(student_state), str(tmp / "student" / WEIGHTS))
            if tr.ema is not None:
                tr.ema.save_pretrained(tmp / "student_ema")
            if tr.adapters is not None:
                save_file(_cpu_tensors(acc.unwrap_model(tr.adapters).state_dict()), str(tmp / "adapters.safetensors"))
            save_file(_cpu_tensors(tr.loss_fn.state_dict()), str(tmp / "kd_loss.safetensors"))
            torch.save(tr.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(tr.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            for rank, state in enumerate(rng_states):
                torch.save(state, tmp / ("random_states.pt" if rank == 0 else f"random_states_{rank}.pt"))
            tr.noise_scheduler.save_pretrained(str(tmp))
            tr.cfg.save_yaml(tmp / "config.yaml")
            return trainer_state(tr)

        path = write_checkpoint(tr.output_dir, tr.global_step, writer)
        for p in prune_checkpoints(tr.output_dir, tr.cfg.checkpoints_total_limit):
            tr.log.info(f"removed old checkpoint {p}")
        tr.log.info(f"saved checkpoint {path}")
    acc.wait_for_everyone()
    return tr.output_dir / f"checkpoint-{tr.global_step}"


def resolve_resume(cfg: TrainConfig, output_dir: Path, log) -> Path | None:
    """The checkpoint folder ``resume_from_checkpoint`` names (``latest``: the newest in
    ``output_dir``, or None to start afresh)."""
    r = cfg.resume_from_checkpoint
    if r is None:
        return None
    if r == "latest":
        p = latest_checkpoint(output_dir)
        if p is None:
            log.info(f"no checkpoint in {output_dir}; starting a new training run")
        return p
    p = Path(r)
    if not p.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: checkpoint folder {r!r} does not exist")
    return p


def changed_settings(ckpt: Path, cfg: TrainConfig) -> dict[str, tuple]:
    """``{key: (checkpoint value, this run's value)}`` for the settings this run changes;
    a :class:`CheckpointError` if one of them is in ``RESUME_CRITICAL``."""
    path = ckpt / "config.yaml"
    try:
        saved = load_yaml(path)
    except ConfigError as exc:
        raise CheckpointError(f"{path} cannot be used: {exc}") from exc
    for key in RESUME_CRITICAL:
        if key in saved and saved[key] != getattr(cfg, key):
            raise CheckpointError(f"{path} does not match this run: {key} is {saved[key]!r} in the checkpoint "
                                  f"but {getattr(cfg, key)!r} now; resume with the same {key} or start a new "
                                  "output_dir")
    return {k: (saved[k], getattr(cfg, k)) for k in saved
            if k not in RESUME_CRITICAL and k != "resume_from_checkpoint" and hasattr(cfg, k)
            and saved[k] != getattr(cfg, k)}


def restore_ema(ema, ema_dir: Path, model: torch.nn.Module, device) -> None:
    """Load the EMA weights and step count of ``ema_dir`` into ``ema`` through
    ``EMAModel.load_state_dict``; the decay settings stay this run's."""
    if not ema_dir.is_dir():
        raise CheckpointError(f"{ema_dir} is missing but use_ema is on")
    saved = read_config(ema_dir)
    compare_model_config(ema_dir / "config.json", saved, model_config_dict(model), "student")
    weights = load_safetensors_checked(ema_dir / WEIGHTS, model.state_dict(), "student EMA")
    step = saved.get("optimization_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{ema_dir / 'config.json'}: optimization_step must be an int >= 0, got {step!r}")
    state = ema.state_dict()  # this run's decay, warmup, inv_gamma, power
    state["optimization_step"] = step
    state["shadow_params"] = [weights[name].to(device, p.dtype) for name, p in model.named_parameters()]
    ema.load_state_dict(state)


def _describe(changed: dict[str, tuple], step: int, cfg: TrainConfig) -> str:
    parts = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
    return (f"resuming at step {step} with changed settings, in effect from step {step + 1}: {parts}. "
            f"The optimiser keeps its moments and takes lr {cfg.learning_rate:g}, betas "
            f"({cfg.adam_beta1:g}, {cfg.adam_beta2:g}), weight decay {cfg.adam_weight_decay:g}, eps "
            f"{cfg.adam_epsilon:g}; the {cfg.lr_scheduler} lr schedule runs to step {cfg.max_train_steps}")


def load_checkpoint(tr: Trainer, ckpt: Path) -> None:
    """Restore ``tr`` from ``ckpt``: models, EMA, adapters, optimiser, schedule, KD loss, RNG, counters."""
    cfg, acc = tr.cfg, tr.accelerator
    state = read_verified_state(ckpt, required_files(ema=tr.ema is not None, adapters=tr.adapters is not None,
                                                     kd_state=cfg.kd_weight == "adaptive-timestep"))
    changed = changed_settings(ckpt, cfg)
    if state.get("num_processes", 1) != acc.num_processes:
        raise CheckpointError(f"{ckpt / 'trainer_state.json'} was written by {state.get('num_processes')} "
                              f"process(es) but this run has {acc.num_processes}; the data order would differ")
    step = int(state["global_step"])

    raw = acc.unwrap_model(tr.student)
    compare_model_config(ckpt / "student" / "config.json", read_config(ckpt / "student"), model_config_dict(raw),
                         "student")
    raw.load_state_dict(load_safetensors_checked(ckpt / "student" / WEIGHTS, raw.state_dict(), "student"))
    if tr.ema is not None:
        restore_ema(tr.ema, ckpt / "student_ema", raw, tr.device)
    if tr.adapters is not None:
        ad = acc.unwrap_model(tr.adapters)
        ad.load_state_dict(load_safetensors_checked(ckpt / "adapters.safetensors", ad.state_dict(),
                                                    "feature adapters"))

    opt_path = ckpt / "optimizer.pt"
    try:
        tr.optimizer.load_state_dict(load_torch_state(opt_path))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{opt_path} does not match this run's optimizer: {exc}") from exc
    apply_optimizer_settings(tr.optimizer, cfg)
    sched_path = ckpt / "lr_scheduler.pt"
    saved_schedule = load_torch_state(sched_path)
    saved_position = saved_schedule.get("last_epoch") if isinstance(saved_schedule, dict) else None
    if saved_position != step:
        raise CheckpointError(f"{sched_path} is at step {saved_position!r} but the checkpoint at step {step}")
    # rebuilt on the optimizer the schedule was made for (the unwrapped one, see trainer.setup)
    tr.lr_scheduler = make_lr_scheduler(cfg, tr.lr_scheduler.optimizer, step)

    kd_path = ckpt / "kd_loss.safetensors"
    if kd_path.is_file():
        tr.loss_fn.load_state_dict(load_safetensors_checked(kd_path, tr.loss_fn.state_dict(), "KD loss state"))
    own = ckpt / f"random_states_{acc.process_index}.pt"  # each rank its own RNG states
    set_rng_state(load_torch_state(own if acc.process_index > 0 and own.is_file() else ckpt / "random_states.pt"))
    tr.global_step = step
    tr.bad_steps = int(state.get("bad_steps", 0))
    tr.consecutive_bad = int(state.get("consecutive_bad_steps", 0))
    tr.last_checkpoint = Path(ckpt)
    if changed:
        tr.log.warning(_describe(changed, step, cfg))
    tr.log.info(f"resumed from {ckpt} at step {step}")
