"""The optimiser and its learning-rate schedule, from the config."""

from __future__ import annotations

import torch

from .config import TrainConfig


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def make_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """diffusers' ``get_scheduler`` for ``max_train_steps``.

    Not passed through ``accelerator.prepare``: a prepared scheduler steps once per process.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.max_train_steps)
