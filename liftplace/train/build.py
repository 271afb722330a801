"""The models and the dataset a run trains on, from the config (or given directly).

Seeds are fixed per role (``mix_seed(seed, 1)`` the student, ``mix_seed(seed, 3)`` a
teacher built from a config), so a model does not depend on what else a run builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .config import ConfigError, TrainConfig, load_model_config
from .data import CaptionedImageDataset, make_dataset
from .models import (DTYPES, ModelFamily, build_from_config, family_for_config, get_family, load_pretrained,
                     model_config_dict, read_config, resolve_model_dir, scheduler_config_near)
from .stream import mix_seed


def _trainable(model: nn.Module, device) -> nn.Module:
    model = model.to(device)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    return model.train().requires_grad_(True)


def check_teacher_schedule(cfg: TrainConfig, model_dir: Path) -> None:
    """Refuse a noise schedule other than the one the teacher was trained with (its
    ``scheduler_config.json``, when there is one)."""
    path = scheduler_config_near(model_dir)
    if path is None:
        return
    saved = json.loads(path.read_text())
    flow_teacher = str(saved.get("_class_name", "")).startswith("FlowMatch")
    objective = cfg.objective or ("flow" if cfg.model_type == "sd3" else "ddpm")  # the family's default
    if flow_teacher != (objective == "flow"):
        raise ConfigError(f"the teacher was trained with {saved.get('_class_name')} ({path}) but this run uses "
                          f"objective={objective}; pass --objective {'flow' if flow_teacher else 'ddpm'}")
    if flow_teacher:
        return
    for key, mine in (("prediction_type", cfg.prediction_type), ("num_train_timesteps", cfg.ddpm_num_steps),
                      ("beta_schedule", cfg.ddpm_beta_schedule)):
        if key in saved and saved[key] != mine:
            flag = {"num_train_timesteps": "ddpm_num_steps", "beta_schedule": "ddpm_beta_schedule"}.get(key, key)
            raise ConfigError(f"the teacher was trained with {key}={saved[key]!r} ({path}) but this run uses "
                              f"{flag}={mine!r}; pass --{flag} {saved[key]}")


def build_teacher(cfg: TrainConfig, family: ModelFamily, device, log, given: nn.Module | None = None):
    """The frozen teacher (eval mode, no gradients, in ``teacher_dtype``), or None without one."""
    t = given
    if t is None and cfg.pretrained_model_name_or_path is not None:
        path = cfg.pretrained_model_name_or_path
        t = load_pretrained(path, family, "teacher (pretrained_model_name_or_path)")
        check_teacher_schedule(cfg, resolve_model_dir(path))
    elif t is None and cfg.teacher_config is not None:
        tc = load_model_config(cfg.teacher_config, "teacher_config")
        t = build_from_config(tc, family, "teacher_config", seed=mix_seed(cfg.seed, 3))
        log.warning("the teacher is built from teacher_config with random weights (tests/smoke runs only)")
    if t is None:
        return None
    t = t.to(device)
    dtype = DTYPES[cfg.teacher_dtype]
    if cfg.cast_teacher:  # the compute dtype (fp32 without mixed precision)
        dtype = DTYPES.get(cfg.mixed_precision, torch.float32)
    if dtype != torch.float32:
        t = t.to(dtype)
    t.eval().requires_grad_(False)
    return t


def build_model_to_train(cfg: TrainConfig, family: ModelFamily, device, given: nn.Module | None = None):
    """The model ``train-teacher`` trains: ``teacher_config``, or ``pretrained_model_name_or_path`` to continue."""
    m = given
    if m is None and cfg.pretrained_model_name_or_path is not None:
        m = load_pretrained(cfg.pretrained_model_name_or_path, family, "pretrained_model_name_or_path")
    elif m is None and cfg.teacher_config is not None:
        tc = load_model_config(cfg.teacher_config, "teacher_config")
        m = build_from_config(tc, family, "teacher_config", seed=mix_seed(cfg.seed, 3))
    elif m is None:
        raise ConfigError("train-teacher needs the architecture: set teacher_config (a mapping or JSON file), "
                          "or pretrained_model_name_or_path to continue from a model folder")
    return _trainable(m, device)


def build_student(cfg: TrainConfig, family: ModelFamily, device, teacher: nn.Module | None,
                  given: nn.Module | None = None):
    """The student: given, loaded, built from ``student_config`` or derived from the teacher."""
    s = given
    if s is None and cfg.student_init in ("prune", "copy"):  # made from the teacher (prune.py)
        if teacher is None:
            raise ConfigError(f"student_init={cfg.student_init} makes the student from the teacher: set a teacher")
        from .prune import make_copy_student, make_pruned_student

        s = (make_pruned_student if cfg.student_init == "prune" else make_copy_student)(cfg, teacher)
    elif s is None and cfg.student_model_name_or_path is not None:
        s = load_pretrained(cfg.student_model_name_or_path, family, "student (student_model_name_or_path)")
    elif s is None and cfg.student_depth is not None:
        if teacher is None or not hasattr(teacher, "transformer_blocks"):
            raise ConfigError("student_depth keeps blocks of a transformer teacher (model_type dit or sd3): set one")
        from .dit import build_depth_pruned_student

        s = build_depth_pruned_student(cfg, family, teacher, device)
    elif s is None and cfg.student_arch is not None:
        if teacher is None:
            raise ConfigError(f"student_arch={cfg.student_arch} copies the teacher's weights: set a teacher")
        from .bk import make_bk_student

        s, _ = make_bk_student(teacher, cfg.student_arch)
    elif s is None:
        if cfg.student_config is not None:
            sc = load_model_config(cfg.student_config, "student_config")
        elif teacher is not None:
            sc = family.derive_student_config(
                model_config_dict(teacher), width_mult=cfg.student_width_mult,
                layers_per_block=cfg.student_layers_per_block, attention=cfg.student_attention,
                norm_num_groups=cfg.student_norm_num_groups)
        else:
            raise ConfigError("no model to train: set student_config (or student_model_name_or_path), "
                              "or a teacher to derive the student from")
        s = build_from_config(sc, family, "student", seed=mix_seed(cfg.seed, 1))
    return _trainable(s, device)


def resolve_family(cfg: TrainConfig, role: str = "student", teacher: nn.Module | None = None,
                   student: nn.Module | None = None) -> ModelFamily:
    """``model_type``, or with ``auto`` the family of the teacher's config (``_class_name``; the
    trained model's for ``train-teacher``); ``unet2d`` when there is no config to ask."""
    if cfg.model_type != "auto":
        return get_family(cfg.model_type)
    given = student if role == "teacher" else teacher
    if given is not None:
        return family_for_config(dict(given.config), "unet2d")
    if cfg.pretrained_model_name_or_path is not None:
        return family_for_config(read_config(resolve_model_dir(cfg.pretrained_model_name_or_path)), "unet2d")
    if cfg.teacher_config is not None:
        return family_for_config(load_model_config(cfg.teacher_config, "teacher_config"), "unet2d")
    if student is not None:
        return family_for_config(dict(student.config), "unet2d")
    return get_family("unet2d")


def build_dataset(cfg: TrainConfig, channels: int, captioned: bool = False) -> Dataset:
    name = cfg.train_data_dir or cfg.dataset_name
    if captioned:
        if not (isinstance(name, str) and Path(name).is_dir()):
            raise ConfigError(f"a text-conditional model trains on captioned data: set train_data_dir to a folder "
                              f"with images and metadata.jsonl or metadata.csv (got {name!r})")
        return CaptionedImageDataset(name, cfg.resolution, channels, center_crop=cfg.center_crop,
                                     image_column=cfg.image_column, caption_column=cfg.caption_column,
                                     max_train_samples=cfg.max_train_samples)
    extra = {"center_crop": cfg.center_crop} if name not in ("digits", "synthetic") else {}
    # seed=0: the digits train/held-out split stays the same whatever the training seed
    data = make_dataset(name, cfg.resolution, channels, split="train", seed=0, **extra)
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(data):
        data = Subset(data, range(cfg.max_train_samples))
    if cfg.model_type == "dit":  # class labels: class_column or class subfolders (dit.py)
        from .dit import with_class_labels

        data = with_class_labels(data, cfg, name)
    return data
