"""Several processes on accelerate (torch.distributed underneath): the launch checks, the
randomness of a micro-batch shared out over the ranks, metrics reduced across ranks, and
the experiment trackers of ``report_to``.

Launching (docs/TRAINER.md, "Multi-process training"; every recipe there is run by
tests/test_distributed.py in its CPU form):

    accelerate launch --multi_gpu --num_processes N -m liftplace distill ...      # N GPUs
    torchrun --nproc_per_node N -m liftplace distill ...                          # N GPUs, torchrun
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m liftplace distill ...  # 2 CPU processes (gloo)

A launch that starts several processes which accelerate does not see as one job (torchrun
on CPU without ``ACCELERATE_USE_CPU``: each process a complete single-process run writing
the same output_dir), or one that asked for several and got one (``accelerate launch --cpu
--num_processes 2``: accelerate's single-process launcher) is refused by
:func:`check_launch` before anything is written.

The micro-batch of step ``k`` is one global batch of ``R x train_batch_size`` samples,
dealt to the ranks by the data stream (rank ``r`` holds global rows ``r, r + R, ...``).
:class:`ShardedObjective` draws the noise and timesteps of the whole global batch from the
one generator of micro-batch ``k`` and keeps the rank's rows, so ``R`` ranks with batch
``b`` train exactly as one process with batch ``R x b`` (to floating-point summation order).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor

from .config import ConfigError

CPU_RECIPE = "ACCELERATE_USE_CPU=true torchrun --nproc_per_node {n} -m liftplace distill ..."
GPU_RECIPE = "accelerate launch --multi_gpu --num_processes {n} -m liftplace distill ..."


class LaunchError(ConfigError):
    """The processes that were started are not the job accelerate runs (see :func:`check_launch`)."""


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _name(distributed_type) -> str:
    return str(getattr(distributed_type, "value", distributed_type))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_launch(num_processes: int, distributed_type: str = "") -> None:
    """Refuse a launch whose processes are not one accelerate job; call it before anything is
    written. ``num_processes`` / ``distributed_type``: what accelerate's state says.

    - the launcher started ``WORLD_SIZE > 1`` processes (or torch.distributed is initialised
      with more than one rank) but accelerate runs each as a single process: on CPU, torchrun
      without ``ACCELERATE_USE_CPU=true``;
    - accelerate is distributed but torch.distributed disagrees on the number of processes;
    - ``accelerate launch`` was asked for several processes (it set ``MASTER_ADDR``) but used
      its single-process launcher (``--cpu``, or no ``--multi_gpu``), so one process runs.
    """
    import torch.distributed as dist

    env_world = _env_int("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    dist_world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    launched = max(env_world or 1, dist_world or 1)
    on_cpu = not torch.cuda.is_available() or _truthy("ACCELERATE_USE_CPU")
    if launched > 1 and num_processes == 1:
        fix = (f"on CPU run `{CPU_RECIPE.format(n=launched)}` (accelerate needs ACCELERATE_USE_CPU=true to "
               "join torchrun's processes into one job on CPU)" if on_cpu
               else f"run `{GPU_RECIPE.format(n=launched)}` or torchrun with one GPU per process")
        raise LaunchError(
            f"{launched} processes were started (torch.distributed world size {launched}) but accelerate runs "
            f"each of them as a single-process job (distributed_type {distributed_type or 'NO'}): every process "
            f"would train on all the data and write the same output_dir. Nothing was written; {fix}.")
    if num_processes > 1 and dist_world is not None and dist_world != num_processes:
        raise LaunchError(f"accelerate runs {num_processes} processes but torch.distributed has world size "
                          f"{dist_world}; launch with one launcher (accelerate launch or torchrun), not both")
    if num_processes > 1 and env_world is not None and env_world != num_processes:
        raise LaunchError(f"accelerate runs {num_processes} processes but WORLD_SIZE is {env_world}; launch with "
                          "one launcher (accelerate launch or torchrun), not both")
    for flag, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if _truthy(flag) and distributed_type and distributed_type != wanted:
            raise LaunchError(
                f"the launch asked for {wanted} ({flag}=true, from an accelerate config) but accelerate runs "
                f"{distributed_type}: accelerate uses {wanted} on GPUs only (on CPU it keeps plain multi-process "
                f"DDP). Nothing was written; on CPU use `{CPU_RECIPE.format(n=2)}` without the {wanted} config")
    simple_launcher = ("ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ
                       and env_world is None and "LOCAL_RANK" not in os.environ and "RANK" not in os.environ)
    if num_processes == 1 and simple_launcher:
        raise LaunchError(
            "accelerate launch was asked for several processes (it set MASTER_ADDR/MASTER_PORT) but started only "
            "this one: with --cpu (or without --multi_gpu) accelerate uses its single-process launcher. Nothing "
            f"was written; on CPU run `{CPU_RECIPE.format(n=2)}` (or `ACCELERATE_USE_CPU=true accelerate launch "
            f"--multi_gpu --num_processes 2 -m liftplace distill ...`), on GPUs `{GPU_RECIPE.format(n='N')}`; for "
            "one process drop --num_processes (and unset MASTER_ADDR if you exported it yourself)")


def preflight_launch() -> None:
    """:func:`check_launch` against accelerate's process state (``PartialState``, which joins the
    process group), before the trainer and the models are even imported. The trainer checks
    again with its accelerator."""
    from accelerate import PartialState

    state = PartialState(cpu=_truthy("ACCELERATE_USE_CPU"))  # as Accelerator() reads it
    check_launch(state.num_processes, _name(state.distributed_type))


# What the trainer does not do yet under the sharding engines; docs/TRAINER.md "Scale options".
UNSUPPORTED_SHARDING = {
    "FSDP": "its checkpoints and export need the sharded student and optimizer state gathered from every rank "
            "(and restored into the shards on resume), and the mid-run sample grids need every rank to run the "
            "sharded student, which the trainer does only on rank 0; the EMA would average shards",
    "DEEPSPEED": "ZeRO-2 keeps each rank's part of the optimizer state in the DeepSpeed engine, which liftplace's "
                 "checkpoint (optimizer.pt) does not hold, and DeepSpeed takes one model per engine (the student "
                 "and the feature-KD adapters are two); deepspeed cannot run on this project's CPU CI (its CPU "
                 "backend needs intel-extension-for-pytorch, which has no build for torch 2.13)",
}


def check_scale_engine(distributed_type: str) -> None:
    """Refuse FSDP and DeepSpeed (accelerate configs in configs/, GPU only) until the trainer
    handles sharded state: a clear error before anything is written, instead of a resume from a
    partial optimizer state or a sampling deadlock."""
    reason = UNSUPPORTED_SHARDING.get(distributed_type)
    if reason is not None:
        raise LaunchError(f"accelerate runs {distributed_type}, which this trainer does not support yet: {reason}. "
                          f"Nothing was written; use DDP (`{GPU_RECIPE.format(n='N')}`), with --cast_teacher, "
                          "--mixed_precision bf16 and --gradient_checkpointing to save memory")


class ShardedObjective:
    """A training objective whose random draws are those of the global micro-batch.

    ``prepare(clean, generator)`` places this rank's ``b`` samples at global rows
    ``rank, rank + R, ...`` of a zero batch of ``R x b``, lets the wrapped objective draw
    noise and timesteps for all of it from ``generator`` (seeded alike on every rank), and
    returns the rank's rows of every batch-sized output. Every per-sample operation of the
    objective sees the same values as in a one-process run with batch ``R x b``. Other
    attributes are the wrapped objective's."""

    def __init__(self, objective, rank: int, world_size: int):
        self.inner = objective
        self.rank = int(rank)
        self.world_size = int(world_size)

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copy/unpickle)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def prepare(self, clean: Tensor, generator: torch.Generator, *args, **kwargs):
        if self.world_size == 1:
            return self.inner.prepare(clean, generator, *args, **kwargs)
        b = clean.shape[0]
        full = clean.new_zeros((b * self.world_size, *clean.shape[1:]))
        full[self.rank::self.world_size] = clean
        out = self.inner.prepare(full, generator, *args, **kwargs)
        return type(out)(self._mine(v, b) for v in out) if isinstance(out, tuple) else self._mine(out, b)

    def _mine(self, value, b: int):
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == b * self.world_size:
            return value[self.rank::self.world_size]
        return value


def global_rows(values: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's rows of a tensor drawn for the global micro-batch."""
    return values if world_size == 1 else values[rank::world_size]


def mean_over_processes(accelerator, values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """The mean over all processes of each scalar in ``values`` (one all-reduce for all of
    them, in float64); ``values`` must have the same keys on every process. NaN stays NaN."""
    keys = sorted(values)
    if not keys:
        return {}
    device = accelerator.device
    t = torch.stack([values[k].detach().to(device, torch.float64).reshape(()) if isinstance(values[k], Tensor)
                     else torch.tensor(float(values[k]), dtype=torch.float64, device=device) for k in keys])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum") / accelerator.num_processes
    return dict(zip(keys, t.tolist()))  # one device -> host copy


# --- trackers ----------------------------------------------------------------------------------

def supported_trackers() -> list[str]:
    """The tracker names accelerate accepts for ``log_with``: its ``LoggerType`` values
    (``all`` included) and any tracker class registered with ``register_tracker_class``."""
    from accelerate.utils import LoggerType

    names = [str(t.value if hasattr(t, "value") else t) for t in LoggerType]
    try:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        names += [n for n in LOGGER_TYPE_TO_CLASS if n not in names]
    except ImportError:
        pass
    return names


def installed_trackers() -> list[str]:
    """Trackers whose package is installed (accelerate's ``get_available_trackers``), plus
    registered custom trackers."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    available = [str(t.value if hasattr(t, "value") else t) for t in get_available_trackers()]
    builtin = {str(t.value) for t in LoggerType}
    return available + [n for n in supported_trackers() if n not in builtin and n not in available]


def parse_report_to(value: str | None) -> list[str]:
    """``report_to`` -> tracker names: ``none`` -> ``[]``, otherwise a comma list of
    accelerate's tracker names (``all``: every installed one). Unknown names are a
    :class:`ConfigError` listing accelerate's."""
    if value is None or value.strip().lower() in ("", "none"):
        return []
    names = [n.strip() for n in value.split(",") if n.strip()]
    supported = supported_trackers()
    for n in names:
        if n not in supported:
            import difflib

            close = difflib.get_close_matches(n, supported, n=1)
            raise ConfigError(f"report_to: {n!r} is not a tracker accelerate supports; use none or a comma list of "
                              f"{', '.join(supported)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return list(dict.fromkeys(names))


PIP_NAMES = {"comet_ml": "comet-ml", "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
             "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def resolve_trackers(value: str | None) -> list[str]:
    """The trackers to log to: :func:`parse_report_to`, each checked to be installed (a
    :class:`ConfigError` naming the package to install otherwise); ``all`` -> every
    installed tracker (maybe none)."""
    names = parse_report_to(value)
    if not names:
        return []
    installed = installed_trackers()
    if "all" in names:
        return installed
    missing = [n for n in names if n not in installed]
    if missing:
        pkgs = " ".join(PIP_NAMES.get(n, n) for n in missing)
        raise ConfigError(f"report_to={value}: accelerate's {', '.join(missing)} tracker needs a package that is not "
                          f"installed: pip install {pkgs} (or set report_to to none, or to one of the installed "
                          f"trackers: {', '.join(installed) or 'none is installed'}); metrics.jsonl is written "
                          "either way")
    return names


def log_images(accelerator, name: str, images, step: int) -> None:
    """Send a list of ``[C, H, W]`` images in [0, 1] (or one ``[H, W, C]`` uint8 grid as a
    numpy array) to every active tracker that takes images (``log_images``); others get the
    saved file as an artifact when they take one (MLflow's ``log_artifact``) -- see
    :func:`log_file`."""
    import numpy as np

    if not accelerator.trackers:
        return
    grid = np.asarray(images)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: grid}, step=step, dataformats="HWC")
        elif hasattr(tracker, "log_images"):
            try:
                tracker.log_images({name: [grid]}, step=step)
            except NotImplementedError:
                pass


def log_file(accelerator, path) -> None:
    """``path`` as an artifact to every active tracker that stores files (MLflow)."""
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_artifact"):
            try:
                tracker.log_artifact(str(path))
            except (NotImplementedError, TypeError):
                pass


def log_scores(report_to: str | None, logging_dir, scores: Mapping[str, float], config: Mapping | None = None,
               *, step: int = 0, project: str = "liftplace-eval") -> list[str]:
    """Evaluation scores (``liftplace eval``) to the trackers of ``report_to``, through accelerate's
    tracker classes (``LOGGER_TYPE_TO_CLASS``) outside a training run: each is started with
    ``project`` (and ``logging_dir`` where it keeps files), given ``config`` (the protocol,
    flattened) and the scores at ``step``, and finished. Returns the trackers logged to."""
    from pathlib import Path

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = resolve_trackers(report_to)
    flat = {}

    def flatten(prefix, value):
        if isinstance(value, Mapping):
            for k, v in value.items():
                flatten(f"{prefix}{k}/", v)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    flatten("", dict(config or {}))
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        if cls.requires_logging_directory:
            Path(logging_dir).mkdir(parents=True, exist_ok=True)
            tracker = cls(project, str(logging_dir))
        else:
            tracker = cls(project)
        if hasattr(tracker, "start"):  # accelerate >= 1.x starts trackers lazily
            tracker.start()
        if flat:
            tracker.store_init_configuration(flat)
        tracker.log({k: float(v) for k, v in scores.items()}, step=step)
        tracker.finish()
    return names
