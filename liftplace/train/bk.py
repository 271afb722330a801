"""BK-SDM students: blocks removed from a ``UNet2DConditionModel`` teacher, every remaining
weight copied from the teacher by name (BK-SDM's ``use_copy_weight_from_teacher``).

The rule, as BK-SDM's released configs (``src/unet_config/bk_*/config.json``) and its
``copy_weight_from_teacher`` define it for Stable Diffusion v1 (``layers_per_block=2``):

- ``bk_base``: ``layers_per_block`` 2 -> 1. Each down stage keeps its first resnet (and
  attention) and drops the second; each up stage keeps its first and its *last* resnet
  (and attention): student ``up_blocks.i.resnets.1`` <- teacher ``up_blocks.i.resnets.2``.
  The mid block stays.
- ``bk_small``: ``bk_base`` without the mid block (``mid_block_type=None``).
- ``bk_tiny``: ``bk_small`` without the innermost stage: the last down block and the first
  up block go, so student ``up_blocks.i`` <- teacher ``up_blocks.{i+1}``.

Generalised here to any ``layers_per_block >= 2``: the kept up-stage resnets are the first and
the last (the last takes the stage's input skip connection, which fixes its shape).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import ConfigError
from .models import compression_summary, count_parameters, model_config_dict

# per-stage config lists, ordered like down_block_types (trimmed with the innermost stage)
_STAGE_KEYS = ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "transformer_layers_per_block",
               "only_cross_attention", "layers_per_block")
_UP = re.compile(r"^up_blocks\.(\d+)(?:\.(resnets|attentions)\.(\d+))?(\..*)?$")
_UNIT = re.compile(r"^((?:down|up)_blocks\.\d+\.(?:resnets|attentions|upsamplers|downsamplers)\.\d+)\.|^([^.]+)\.")


def bk_student_config(teacher_config: dict, arch: str) -> dict:
    """The student's ``UNet2DConditionModel`` config for ``arch`` (bk_base, bk_small, bk_tiny)."""
    if arch not in ("bk_base", "bk_small", "bk_tiny"):
        raise ConfigError(f"student_arch must be bk_base, bk_small or bk_tiny; got {arch!r}")
    cfg = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
    layers = cfg.get("layers_per_block", 2)
    if not isinstance(layers, int) or layers < 2:
        raise ConfigError(f"student_arch={arch}: block removal needs a teacher with layers_per_block >= 2 (an int), "
                          f"got {layers!r}")
    cfg["layers_per_block"] = 1
    if arch in ("bk_small", "bk_tiny"):
        cfg["mid_block_type"] = None
    if arch == "bk_tiny":
        n = len(cfg["down_block_types"])
        if n < 2:
            raise ConfigError(f"student_arch=bk_tiny removes the innermost stage; the teacher has only {n}")
        cfg["block_out_channels"] = list(cfg["block_out_channels"])[:-1]
        cfg["down_block_types"] = list(cfg["down_block_types"])[:-1]
        cfg["up_block_types"] = list(cfg["up_block_types"])[1:]
        for key in _STAGE_KEYS:
            if isinstance(cfg.get(key), (list, tuple)) and len(cfg[key]) == n:
                cfg[key] = list(cfg[key])[:-1]
    return cfg


def teacher_name(student_name: str, arch: str, teacher_layers: int) -> str:
    """The teacher parameter/module name a student name is copied from."""
    m = _UP.match(student_name)
    if m is None:
        return student_name
    i, kind, j, rest = m.groups()
    t = f"up_blocks.{int(i) + (1 if arch == 'bk_tiny' else 0)}"
    if kind is not None:
        # the student's up stage has 2 resnets: the first, and the last (input skip) of the teacher's
        t += f".{kind}.{teacher_layers if int(j) == 1 else int(j)}"
    return t + (rest or "")


def _unit(name: str) -> str:
    m = _UNIT.match(name)
    return (m.group(1) or m.group(2)) if m else name


def bk_module_map(student: nn.Module, arch: str, teacher_layers: int) -> dict[str, str]:
    """``{student module: teacher module}`` at the level of resnets, attentions, samplers and
    top-level modules (``conv_in``, ``time_embedding``, ``mid_block``, ...)."""
    out = {}
    for name in student.state_dict():
        unit = _unit(name)
        out.setdefault(unit, _unit(teacher_name(name, arch, teacher_layers)))
    return out


def make_bk_student(teacher: nn.Module, arch: str, *, verbose: bool = True):
    """``(student, mapping)``: the ``arch`` student with every weight copied from ``teacher``."""
    from diffusers import UNet2DConditionModel

    if not isinstance(teacher, UNet2DConditionModel):
        raise ConfigError(f"student_arch={arch} removes blocks from a UNet2DConditionModel teacher; the teacher is "
                          f"a {type(teacher).__name__}")
    t_cfg = model_config_dict(teacher)
    s_cfg = bk_student_config(t_cfg, arch)
    layers = int(t_cfg["layers_per_block"])
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(s_cfg)
    t_state = teacher.state_dict()
    state = {}
    for name, p in student.state_dict().items():
        src = teacher_name(name, arch, layers)
        if src not in t_state:
            raise ConfigError(f"student_arch={arch}: student weight {name!r} has no teacher weight {src!r}")
        if t_state[src].shape != p.shape:
            raise ConfigError(f"student_arch={arch}: student weight {name!r} {tuple(p.shape)} does not match teacher "
                              f"weight {src!r} {tuple(t_state[src].shape)}")
        state[name] = t_state[src].detach().to("cpu", torch.float32).clone()
    student = UNet2DConditionModel.from_config(s_cfg)
    student.load_state_dict(state, strict=True)
    mapping = bk_module_map(student, arch, layers)
    if verbose:
        print(describe_mapping(mapping, teacher, arch))
        print(compression_summary(count_parameters(teacher), count_parameters(student)))
    return student, mapping


def describe_mapping(mapping: dict[str, str], teacher: nn.Module, arch: str) -> str:
    kept = set(mapping.values())
    removed = sorted({_unit(n) for n in teacher.state_dict()} - kept)
    lines = [f"{arch} student initialised from the teacher: {len(mapping)} modules copied "
             f"({sum(s != t for s, t in mapping.items())} from another name), {len(removed)} teacher modules removed",
             "  student module <- teacher module"]
    lines += [f"  {s} <- {t}" for s, t in mapping.items()]
    lines += [f"  removed: {r}" for r in removed]
    return "\n".join(lines)


def bk_feature_pairs(arch: str, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
    """BK-SDM's feature-KD pairs ``(teacher module, student module)`` (its
    ``kd_train_text_to_image.py``): bk_base/bk_small every up and down block, same names;
    bk_tiny the outer down blocks, the last kept down stage's last attention ``proj_out``
    (the stage lost its resnet.1 and downsampler) and every student up block against the
    teacher's next one."""
    n = len(teacher.down_blocks)
    if arch in ("bk_base", "bk_small"):
        names = [f"up_blocks.{i}" for i in range(n)] + [f"down_blocks.{i}" for i in range(n)]
        return [(x, x) for x in names]
    if arch != "bk_tiny":
        raise ConfigError(f"kd_feat_layers=bk_sdm: no BK-SDM feature pairs for student_arch={arch!r}")
    pairs = [(f"down_blocks.{i}",) * 2 for i in range(n - 2)]
    last = n - 2
    t_attn = getattr(teacher.down_blocks[last], "attentions", None)
    if t_attn:
        pairs.append((f"down_blocks.{last}.attentions.{len(t_attn) - 1}.proj_out",
                      f"down_blocks.{last}.attentions.0.proj_out"))
    else:
        pairs.append((f"down_blocks.{last}.resnets.{len(teacher.down_blocks[last].resnets) - 1}",
                      f"down_blocks.{last}.resnets.0"))
    pairs += [(f"up_blocks.{i + 1}", f"up_blocks.{i}") for i in range(len(student.up_blocks))]
    return pairs
