"""The optimiser and its learning-rate schedule, as functions of the config and the step.

The schedule is a pure function of ``(config, global_step)``, so resuming rebuilds it
rather than unpickling it: a resume with a new ``learning_rate``, Adam settings,
``lr_scheduler``, ``lr_warmup_steps`` or ``max_train_steps`` continues from the
checkpoint's step under the new values, with the optimiser's moments kept.
"""

from __future__ import annotations

import torch

from .config import TrainConfig


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set the config's lr, betas, weight decay and eps on every param group (after
    ``load_state_dict`` restored the checkpoint's); the per-parameter state is untouched."""
    for group in optimizer.param_groups:
        group.update(lr=cfg.learning_rate, initial_lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                     weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def make_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, global_step: int = 0):
    """diffusers' ``get_scheduler`` for ``max_train_steps``, positioned after ``global_step``
    optimizer steps: the optimizer's lr is then the one for step ``global_step + 1``.

    Not passed through ``accelerator.prepare``: a prepared scheduler steps once per process.
    """
    from diffusers.optimization import get_scheduler

    if global_step > 0:
        for group in optimizer.param_groups:  # LambdaLR resumes from each group's initial_lr
            group.setdefault("initial_lr", group["lr"])
    # LambdaLR takes one step on construction: last_epoch = global_step - 1 lands on global_step
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.max_train_steps, last_epoch=global_step - 1)
