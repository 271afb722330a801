"""Distillation trainer: teacher -> lightweight student with LIFT/PLACE on diffusers.

>>> from liftplace.train import build_config, distill
>>> result = distill(build_config("configs/digits_place.yaml", {"output_dir": "runs/x"}))
"""

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig, build_config
from .models import compression_summary, count_parameters, derive_student_config
from .sampling import ddim_sample, load_for_sampling, save_grid, save_images
from .trainer import TrainingDivergedError, Trainer, TrainResult, distill

__all__ = [
    "CheckpointError",
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "build_config",
    "compression_summary",
    "count_parameters",
    "ddim_sample",
    "derive_student_config",
    "distill",
    "load_for_sampling",
    "save_grid",
    "save_images",
]
