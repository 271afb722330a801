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

Custom specs (``custom:down=D1,...,DK;mid=0|1``, see :func:`config.parse_student_arch`) use the
same mechanism, and the presets are such specs: ``bk_base`` = every ``Ds = 1``, mid kept;
``bk_small`` = the same with ``mid=0``; ``bk_tiny`` = ``bk_small`` with one count less. The rule:

- the student keeps the teacher's outer ``K`` stages (``K`` = the number of counts), so
  student ``down_blocks.s`` <- teacher ``down_blocks.s`` and student ``up_blocks.i`` <- teacher
  ``up_blocks.{i + n - K}`` (``n``: the teacher's stages);
- down stage ``s`` keeps the teacher's first ``Ds`` resnets (+attentions), same indices;
- up stage ``i`` has ``D + 1`` resnets (``D`` the count of its mirrored down stage, as diffusers
  builds it): the first ``D`` are the teacher's first ``D`` and the last is the teacher's last
  (``resnets.{L}`` for a teacher with ``L`` layers there), as BK-SDM keeps for ``D = 1``;
- the mid block, ``conv_in``, embeddings, ``conv_out`` and samplers are copied by name.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from .config import ConfigError, parse_student_arch
from .models import compression_summary, count_parameters, model_config_dict

# per-stage config lists, ordered like down_block_types (trimmed with the innermost stage)
_STAGE_KEYS = ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "transformer_layers_per_block",
               "only_cross_attention", "layers_per_block")
_UP = re.compile(r"^up_blocks\.(\d+)(?:\.(resnets|attentions)\.(\d+))?(\..*)?$")
_UNIT = re.compile(r"^((?:down|up)_blocks\.\d+\.(?:resnets|attentions|upsamplers|downsamplers)\.\d+)\.|^([^.]+)\.")


@dataclasses.dataclass(frozen=True)
class StudentPlan:
    """Which teacher layers a student keeps: ``down`` (layers per kept down stage, outer first),
    ``mid`` (mid block kept), ``teacher_layers`` (the teacher's layers per stage)."""
    arch: str
    down: tuple
    mid: bool
    teacher_layers: tuple

    @property
    def offset(self) -> int:
        return len(self.teacher_layers) - len(self.down)

    def teacher_name(self, student_name: str) -> str:
        m = _UP.match(student_name)
        if m is None:
            return student_name
        i, kind, j, rest = m.groups()
        i = int(i)
        t = f"up_blocks.{i + self.offset}"
        if kind is not None:
            kept = self.down[len(self.down) - 1 - i]  # the student's up stage i has kept + 1 resnets
            last = self.teacher_layers[len(self.down) - 1 - i]  # the teacher's has last + 1
            t += f".{kind}.{last if int(j) == kept else int(j)}"
        return t + (rest or "")


def _teacher_layers(cfg: dict, arch: str) -> list[int]:
    n = len(cfg["down_block_types"])
    layers = cfg.get("layers_per_block", 2)
    layers = [layers] * n if isinstance(layers, int) else list(layers)
    if len(layers) != n or not all(isinstance(x, int) for x in layers):
        raise ConfigError(f"student_arch={arch}: the teacher's layers_per_block {cfg.get('layers_per_block')!r} "
                          f"is not an int or one int per stage")
    return layers


def student_plan(arch: str, teacher_config: dict) -> StudentPlan:
    """Resolve ``arch`` (a preset or a custom spec) against the teacher's config; raises
    :class:`ConfigError` naming ``student_arch`` and the fix."""
    spec = parse_student_arch(arch)
    t_layers = _teacher_layers(teacher_config, arch)
    n = len(t_layers)
    if spec is None:
        if min(t_layers) < 2:
            raise ConfigError(f"student_arch={arch}: block removal needs a teacher with layers_per_block >= 2 (an "
                              f"int), got {teacher_config.get('layers_per_block')!r}")
        if arch == "bk_tiny" and n < 2:
            raise ConfigError(f"student_arch=bk_tiny removes the innermost stage; the teacher has only {n}")
        spec = {"down": [1] * (n - (arch == "bk_tiny")), "mid": arch == "bk_base"}
    down = spec["down"]
    if not 1 <= len(down) <= n:
        raise ConfigError(f"student_arch={arch}: down= gives {len(down)} counts; give one per stage kept, between "
                          f"1 and the teacher's {n} stages (fewer counts drop the innermost stages)")
    for s, (d, t) in enumerate(zip(down, t_layers)):
        if not 1 <= d <= t:
            raise ConfigError(f"student_arch={arch}: down stage {s} keeps {d} layers; the teacher has {t} there, so "
                              f"give a count between 1 and {t}")
    return StudentPlan(arch, tuple(down), bool(spec["mid"]), tuple(t_layers))


def bk_student_config(teacher_config: dict, arch) -> dict:
    """The student's ``UNet2DConditionModel`` config for ``arch`` (bk_base, bk_small, bk_tiny, a
    custom spec, or a :class:`StudentPlan`)."""
    plan = arch if isinstance(arch, StudentPlan) else student_plan(arch, teacher_config)
    cfg = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
    n, k = len(plan.teacher_layers), len(plan.down)
    if not plan.mid:
        cfg["mid_block_type"] = None
    if k < n:
        cfg["block_out_channels"] = list(cfg["block_out_channels"])[:k]
        cfg["down_block_types"] = list(cfg["down_block_types"])[:k]
        cfg["up_block_types"] = list(cfg["up_block_types"])[n - k:]
        for key in _STAGE_KEYS:
            if isinstance(cfg.get(key), (list, tuple)) and len(cfg[key]) == n:
                cfg[key] = list(cfg[key])[:k]
    cfg["layers_per_block"] = plan.down[0] if len(set(plan.down)) == 1 else list(plan.down)
    return cfg


def teacher_name(student_name: str, arch, teacher_layers) -> str:
    """The teacher parameter/module name a student name is copied from (``arch``: a
    :class:`StudentPlan`, or a preset/spec with ``teacher_layers`` an int for a 4-stage teacher or
    one int per teacher stage)."""
    if not isinstance(arch, StudentPlan):
        layers = [teacher_layers] * 4 if isinstance(teacher_layers, int) else list(teacher_layers)
        arch = student_plan(arch, {"down_block_types": [None] * len(layers), "layers_per_block": layers})
    return arch.teacher_name(student_name)


def _unit(name: str) -> str:
    m = _UNIT.match(name)
    return (m.group(1) or m.group(2)) if m else name


def bk_module_map(student: nn.Module, plan: StudentPlan) -> dict[str, str]:
    """``{student module: teacher module}`` at the level of resnets, attentions, samplers and
    top-level modules (``conv_in``, ``time_embedding``, ``mid_block``, ...)."""
    out = {}
    for name in student.state_dict():
        unit = _unit(name)
        out.setdefault(unit, _unit(plan.teacher_name(name)))
    return out


def make_bk_student(teacher: nn.Module, arch: str, *, verbose: bool = True):
    """``(student, mapping)``: the ``arch`` student with every weight copied from ``teacher``."""
    from diffusers import UNet2DConditionModel

    if not isinstance(teacher, UNet2DConditionModel):
        raise ConfigError(f"student_arch={arch} removes blocks from a UNet2DConditionModel teacher; the teacher is "
                          f"a {type(teacher).__name__}")
    t_cfg = model_config_dict(teacher)
    plan = student_plan(arch, t_cfg)
    s_cfg = bk_student_config(t_cfg, plan)
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(s_cfg)
    t_state = teacher.state_dict()
    state = {}
    for name, p in student.state_dict().items():
        src = plan.teacher_name(name)
        if src not in t_state:
            raise ConfigError(f"student_arch={arch}: student weight {name!r} has no teacher weight {src!r}")
        if t_state[src].shape != p.shape:
            raise ConfigError(f"student_arch={arch}: student weight {name!r} {tuple(p.shape)} does not match teacher "
                              f"weight {src!r} {tuple(t_state[src].shape)}")
        state[name] = t_state[src].detach().to("cpu", torch.float32).clone()
    student = UNet2DConditionModel.from_config(s_cfg)
    student.load_state_dict(state, strict=True)
    mapping = bk_module_map(student, plan)
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
        raise ConfigError(f"kd_feat_layers=bk_sdm: no BK-SDM feature pairs for student_arch={arch!r}; list the "
                          f"kd_feat_layers pairs ('teacher_name:student_name,...')")
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
