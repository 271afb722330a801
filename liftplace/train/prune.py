"""Students made from the teacher: structural channel pruning (Diff-Pruning) and block copying.

``student_init: prune`` prunes a copy of a pixel ``UNet2DModel`` teacher with Torch-Pruning's
``MetaPruner`` (what Diff-Pruning uses): every conv/linear/GroupNorm channel dimension that the
dependency graph couples is pruned together at ``pruning_ratio`` (local, per layer), scored by
``pruning_importance``:

- ``magnitude``: the L2 norm of each channel's weights (``MagnitudeImportance(p=2)``);
- ``taylor``: Diff-Pruning's first-order Taylor importance, |w * dL/dw|, with the gradients
  of the diffusion loss (epsilon MSE) accumulated over the early timesteps ``t = 0, 10, 20,
  ...`` on the first :data:`CALIBRATION_BATCHES` training batches, stopping once the loss has
  fallen below :data:`TAYLOR_THRESHOLD` of its maximum (Diff-Pruning's ``thr``);
- ``random``: random scores, seeded by the run's seed.

``conv_out`` keeps its output (the sample's channels); attention heads keep their number and
lose head dimensions uniformly (``num_heads`` given for q/k/v). Three things Torch-Pruning does
not do for a diffusers U-Net are done here:

1. **The share reached.** Torch-Pruning silently skips a dependency group whose pruning would
   empty a layer or a GroupNorm group. GroupNorm layers are therefore not treated as channel
   groups by the pruner (each channel is pruned on its own merit), every prunable layer is
   checked to have reached its width, and a ratio that would skip one is refused with the
   largest ratio that works. The parameter share reached is printed next to the nominal
   ``(1 - pruning_ratio)^2``; a share more than 25 % away from it is warned about.
2. **GroupNorm regrouping.** ``num_groups`` is reset after pruning to the largest divisor of
   the layer's channels that is at most the teacher's group count and leaves >= 2 channels
   per group (one channel per group is instance norm, which ruins a diffusion U-Net). A layer
   left with fewer than 2 channels is refused. The groups go into the exported config.
3. **Stale attributes.** ``Upsample2D`` / ``Downsample2D`` ``channels`` / ``out_channels``,
   ``ResnetBlock2D`` ``in_channels`` / ``out_channels`` and ``Attention``'s dims are reset
   from their layers (the samplers assert on ``channels``; feature KD reads the resnets' width).

The pruned student is a :class:`PrunedUNet2DModel`: a ``UNet2DModel`` whose config carries a
``pruning`` record (every conv/linear/GroupNorm's shape and group count, plus the index map:
which of the teacher's channels each pruned dimension kept). ``from_config`` rebuilds the
exact architecture from that record, so ``save_pretrained`` / ``from_pretrained`` (safetensors
and config.json, no pickled modules), diffusers' ``EMAModel``, checkpoints, sampling and the
export all work as for any diffusers model; Torch-Pruning is needed to prune, not to load.

``student_init: copy`` removes resnets instead (width kept, every weight copied from the
teacher by name): the pixel-U-Net analogue of BK-SDM, with ``bk.py``'s layer rule.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import torch
from torch import nn

from .config import ConfigError
from .models import compression_summary, count_parameters, model_config_dict

IMPORTANCES = ("magnitude", "taylor", "random")
CALIBRATION_BATCHES = 2  # taylor: training batches whose diffusion-loss gradients score the channels
TAYLOR_THRESHOLD = 0.05  # taylor: stop accumulating once the loss is below this fraction of its maximum
TAYLOR_STRIDE = 10  # taylor: timesteps 0, 10, 20, ... (early timesteps first)
SHARE_TOLERANCE = 0.25  # warn when the share reached is this far (relative) from (1 - ratio)^2
RECORD_FORMAT = 1
_SHAPED = (nn.Conv2d, nn.Linear, nn.GroupNorm)


def _unet2d_class():
    from diffusers import UNet2DModel

    return UNet2DModel


def _make_pruned_class():
    UNet2DModel = _unet2d_class()

    class PrunedUNet2DModel(UNet2DModel):
        """A ``UNet2DModel`` with per-layer widths: built as the teacher's architecture, then every
        layer listed in ``pruning["modules"]`` replaced by one of the recorded shape (see
        :func:`apply_pruning_record`). ``pruning=None`` is a plain ``UNet2DModel``."""

        def __init__(self, *, pruning: dict | None = None, **kwargs):
            super().__init__(**kwargs)
            self.register_to_config(pruning=pruning)
            if pruning:
                apply_pruning_record(self, pruning)

    # diffusers reads a model's config keys from its __init__ signature: the teacher's keys + pruning
    params = list(inspect.signature(UNet2DModel.__init__).parameters.values())
    params.append(inspect.Parameter("pruning", inspect.Parameter.KEYWORD_ONLY, default=None))
    PrunedUNet2DModel.__init__.__signature__ = inspect.Signature(params)
    PrunedUNet2DModel.__module__ = __name__
    return PrunedUNet2DModel


_PRUNED_CLASS = None


def pruned_model_class():
    """The :class:`PrunedUNet2DModel` class (made on first use: diffusers is imported lazily)."""
    global _PRUNED_CLASS
    if _PRUNED_CLASS is None:
        _PRUNED_CLASS = _make_pruned_class()
    return _PRUNED_CLASS


PRUNED_CLASS_NAME = "PrunedUNet2DModel"


def is_pruned_config(config: dict) -> bool:
    return config.get("_class_name") == PRUNED_CLASS_NAME or bool(config.get("pruning"))


# --- the record: shapes, groups, index map ------------------------------------------------------

def module_shapes(model: nn.Module) -> dict[str, dict]:
    """``{name: shape}`` of every conv, linear and GroupNorm layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels}
        elif isinstance(m, nn.Linear):
            out[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.GroupNorm):
            out[name] = {"type": "GroupNorm", "num_groups": m.num_groups, "num_channels": m.num_channels}
    return out


def apply_pruning_record(model: nn.Module, record: dict) -> nn.Module:
    """Replace every layer whose recorded shape differs from the model's by a new layer of the
    recorded shape (same kernel, stride, padding, bias, eps), then fix the stale attributes."""
    if record.get("format") != RECORD_FORMAT:
        raise ConfigError(f"pruning record format {record.get('format')!r} is not supported (expected "
                          f"{RECORD_FORMAT}); re-export the pruned model with this liftplace")
    current = dict(model.named_modules())
    for name, spec in record["modules"].items():
        old = current.get(name)
        kind = spec.get("type")
        if old is None or type(old).__name__ != kind:
            raise ConfigError(f"pruning record: layer {name!r} ({kind}) is not a {kind} of this "
                              f"{type(model).__name__}; the record belongs to another architecture")
        if kind == "Conv2d":
            if (old.in_channels, old.out_channels) == (spec["in"], spec["out"]):
                continue
            new = nn.Conv2d(spec["in"], spec["out"], old.kernel_size, stride=old.stride, padding=old.padding,
                            dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                            padding_mode=old.padding_mode)
        elif kind == "Linear":
            if (old.in_features, old.out_features) == (spec["in"], spec["out"]):
                continue
            new = nn.Linear(spec["in"], spec["out"], bias=old.bias is not None)
        else:
            if (old.num_groups, old.num_channels) == (spec["num_groups"], spec["num_channels"]):
                continue
            new = nn.GroupNorm(spec["num_groups"], spec["num_channels"], eps=old.eps, affine=old.affine)
        p = next(old.parameters(), None)
        if p is not None:
            new = new.to(device=p.device, dtype=p.dtype) if p.device.type != "meta" else new.to("meta")
        model.set_submodule(name, new)
    fix_stale_attributes(model)
    return model


def fix_stale_attributes(model: nn.Module) -> None:
    """Reset the width attributes diffusers blocks keep beside their layers."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for m in model.modules():
        if isinstance(m, (Upsample2D, Downsample2D)):
            conv = getattr(m, "conv", None)
            if isinstance(conv, nn.Conv2d):
                m.channels, m.out_channels = conv.in_channels, conv.out_channels
        elif isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Attention):
            m.query_dim = m.to_q.in_features
            m.inner_dim = m.to_q.out_features
            m.inner_kv_dim = m.to_k.out_features
            m.out_dim = m.to_out[0].out_features


def check_subset(teacher: nn.Module, student: nn.Module, record: dict) -> None:
    """Assert that every student weight is the teacher's weight at the recorded kept indices
    (``record["index_map"]``; unlisted layers are unpruned). Raises ``AssertionError``."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    imap = record["index_map"]
    for name, s in s_state.items():
        module, _, leaf = name.rpartition(".")
        t = t_state[name]
        keep = imap.get(module)
        if keep is not None:
            t = t.index_select(0, torch.tensor(keep["out"], dtype=torch.long))
            if leaf == "weight" and t.dim() > 1:
                t = t.index_select(1, torch.tensor(keep["in"], dtype=torch.long))
        if t.shape != s.shape or not torch.equal(t.to(s.dtype), s):
            raise AssertionError(f"pruned weight {name} {tuple(s.shape)} is not the teacher's {tuple(t_state[name].shape)}"
                                 " at the recorded indices")


# --- pruning ------------------------------------------------------------------------------------

def regroup_norms(model: nn.Module, teacher_groups: dict[str, int]) -> dict[str, list[int]]:
    """Set each GroupNorm's ``num_groups`` to the largest divisor of its channels that is at
    most the teacher's and leaves >= 2 channels per group. ``{name: [teacher, new, channels]}``
    for the changed ones; :class:`ConfigError` for a layer left with fewer than 2 channels."""
    changed = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.GroupNorm):
            continue
        c, g0 = m.num_channels, teacher_groups[name]
        if c < 2:
            raise ConfigError(f"pruning_ratio leaves GroupNorm {name!r} with {c} channel(s); a group needs at least "
                              "2 channels (1 is instance norm): lower pruning_ratio")
        g = max(d for d in range(1, g0 + 1) if c % d == 0 and c // d >= 2)
        if g != m.num_groups:
            m.num_groups = g
        if g != g0:
            changed[name] = [g0, g, c]
    return changed


def _idx_list(idxs) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


def _taylor_gradients(model, calibration, scheduler, generator) -> int:
    """Accumulate Diff-Pruning's diffusion-loss gradients into ``model``'s ``.grad``; returns
    the number of timesteps used."""
    model.zero_grad(set_to_none=True)
    T = scheduler.config.num_train_timesteps
    loss_max, used = 0.0, 0
    for i, t in enumerate(range(0, T, TAYLOR_STRIDE)):
        clean = calibration[i % len(calibration)].float()
        noise = torch.randn(clean.shape, generator=generator)
        tt = torch.full((clean.shape[0],), t, dtype=torch.long)
        noisy = scheduler.add_noise(clean, noise, tt)
        loss = nn.functional.mse_loss(model(noisy, tt).sample, noise)
        loss.backward()
        used += 1
        value = loss.item()
        loss_max = max(loss_max, value)
        if value < loss_max * TAYLOR_THRESHOLD:
            break
    return used


def prune_unet(teacher: nn.Module, ratio: float, importance: str = "magnitude", *, seed: int = 0,
               calibration: list[torch.Tensor] | None = None, scheduler=None, verbose: bool = True):
    """``(student, record)``: a :class:`PrunedUNet2DModel` pruned from ``teacher`` (left
    untouched) and its pruning record (also in ``student.config.pruning``). ``calibration``:
    batches of clean samples ``[B, C, H, W]`` for ``taylor``; ``scheduler``: its DDPM schedule."""
    UNet2DModel = _unet2d_class()
    if not isinstance(teacher, UNet2DModel):
        raise ConfigError(f"student_init=prune prunes a pixel UNet2DModel teacher; the teacher is a "
                          f"{type(teacher).__name__} (use student_arch for a UNet2DConditionModel)")
    if importance not in IMPORTANCES:
        raise ConfigError(f"pruning_importance must be one of {', '.join(IMPORTANCES)}; got {importance!r}")
    if not 0 <= ratio < 1:
        raise ConfigError(f"pruning_ratio must be in [0, 1) (the share of channels removed per layer), got {ratio}")
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError("student_init=prune needs Torch-Pruning: pip install 'liftplace[prune]' "
                          "(or pip install torch-pruning)") from None
    t_cfg = model_config_dict(teacher)
    t_cfg.pop("pruning", None)
    if is_pruned_config(model_config_dict(teacher)):
        raise ConfigError("student_init=prune: the teacher is itself a pruned model; prune its unpruned teacher")
    m = copy.deepcopy(teacher)
    p0 = next(m.parameters())
    if (p0.device.type, p0.dtype) != ("cpu", torch.float32):
        m = m.to("cpu", torch.float32)
    m.eval().requires_grad_(True)
    shape = (1, int(t_cfg.get("in_channels", 3)), *_size(t_cfg))
    example = (torch.zeros(shape), torch.ones(1, dtype=torch.long))
    heads = {}
    from diffusers.models.attention_processor import Attention

    for mod in m.modules():
        if isinstance(mod, Attention):
            for lin in (mod.to_q, mod.to_k, mod.to_v):
                heads[lin] = mod.heads
    imp = {"magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
           "taylor": lambda: tp.importance.TaylorImportance(),
           "random": lambda: tp.importance.RandomImportance()}[importance]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(m, example, importance=imp, pruning_ratio=ratio, ignored_layers=[m.conv_out],
                                      num_heads=dict(heads), in_channel_groups={}, out_channel_groups={})
    # GroupNorms are regrouped afterwards: each channel is pruned on its own merit, never a whole group skipped
    for groups in (pruner.in_channel_groups, pruner.out_channel_groups):
        for k in [k for k in groups if isinstance(k, nn.GroupNorm)]:
            groups.pop(k)
    names = {mod: n for n, mod in m.named_modules()}
    init = {n: (mod.weight.shape[0], mod.weight.shape[1] if mod.weight.dim() > 1 else None)
            for n, mod in m.named_modules() if isinstance(mod, _SHAPED)}
    teacher_groups = {n: mod.num_groups for n, mod in m.named_modules() if isinstance(mod, nn.GroupNorm)}
    kept = {n: {"out": list(range(o)), **({"in": list(range(i))} if i is not None else {})} for n, (o, i) in init.items()}

    taylor_steps = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if importance == "taylor":
            if not calibration or scheduler is None:
                raise ConfigError("pruning_importance=taylor needs calibration batches of the training data")
            taylor_steps = _taylor_gradients(m, calibration, scheduler, torch.Generator().manual_seed(seed))
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                name = names.get(dep.target.module)
                if name not in kept:
                    continue
                mod = dep.target.module
                dim = "out" if isinstance(mod, nn.GroupNorm) or pruner.DG.is_out_channel_pruning_fn(dep.handler) else "in"
                drop = set(_idx_list(idxs))
                kept[name][dim] = [x for k, x in enumerate(kept[name][dim]) if k not in drop]
            group.prune()
    m.zero_grad(set_to_none=True)
    m.requires_grad_(False)
    _check_reached(m, init, ratio, heads, names)
    regrouped = regroup_norms(m, teacher_groups)
    fix_stale_attributes(m)
    shapes = module_shapes(m)
    index_map = {n: k for n, k in kept.items() if len(k["out"]) != init[n][0] or ("in" in k and len(k["in"]) != init[n][1])}
    for n, k in index_map.items():  # the replayed index lists must describe the pruned layers
        assert len(k["out"]) == (shapes[n].get("out") or shapes[n].get("num_channels")), n
    t_params, s_params = count_parameters(teacher), count_parameters(m)
    share, nominal = s_params / t_params, (1 - ratio) ** 2
    record = {"format": RECORD_FORMAT, "method": "torch-pruning MetaPruner (local)", "pruning_ratio": ratio,
              "pruning_importance": importance, "taylor_timesteps": taylor_steps, "teacher_parameters": t_params,
              "parameters": s_params, "parameter_share": share, "nominal_share": nominal,
              "regrouped_norms": regrouped, "modules": shapes, "index_map": index_map}
    cls = pruned_model_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = cls.from_config({**t_cfg, "pruning": record})
    student.load_state_dict(m.state_dict(), strict=True)
    check_subset(teacher, student, record)
    if verbose:
        print(describe_pruning(record))
    if abs(share / nominal - 1) > SHARE_TOLERANCE if nominal > 0 else False:
        warnings.warn(f"pruning_ratio={ratio} reached a parameter share of {100 * share:.2f} %, more than "
                      f"{100 * SHARE_TOLERANCE:.0f} % away from the nominal (1 - ratio)^2 = {100 * nominal:.2f} %",
                      stacklevel=2)
    return student, record


def _size(cfg: dict) -> tuple[int, int]:
    s = cfg.get("sample_size") or 32
    return (int(s[0]), int(s[1])) if isinstance(s, (list, tuple)) else (int(s), int(s))


def _check_reached(model, init, ratio, heads, names) -> None:
    """Refuse a ratio Torch-Pruning could not apply everywhere (it skips a dependency group that
    would leave a layer empty): every prunable conv/linear output must have its target width."""
    if ratio == 0:
        return
    head_of = {names[k]: v for k, v in heads.items()}
    short = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or name == "conv_out":
            continue
        c0 = init[name][0]
        h = head_of.get(name, 1)
        want = h * int((c0 // h) * (1 - ratio)) if h > 1 else int(c0 * (1 - ratio))
        now = mod.weight.shape[0]
        if now == c0 and want < c0:
            short.append((name, c0, want))
    if short:
        worst = min(w for _, _, w in short)
        names_ = ", ".join(f"{n} ({c} -> {w})" for n, c, w in short[:4]) + (" ..." if len(short) > 4 else "")
        def ok(r):
            return all((h * int((c // h) * (1 - r)) >= h) if (h := head_of.get(n, 1)) > 1 else int(c * (1 - r)) >= 2
                       for n, c, _ in short)
        lim = max((r for r in (x / 100 for x in range(100)) if ok(r)), default=0.0)
        raise ConfigError(f"pruning_ratio={ratio} would leave {len(short)} layer(s) with {worst} channel(s) per "
                          f"group, so Torch-Pruning skipped them and they kept every channel: {names_}. The parameter "
                          f"share would be far above the request; use pruning_ratio <= {lim:.2f}")


def describe_pruning(record: dict) -> str:
    lines = [f"student pruned from the teacher (Torch-Pruning, {record['pruning_importance']} importance, "
             f"pruning_ratio {record['pruning_ratio']}): parameter share reached "
             f"{100 * record['parameter_share']:.2f} % (requested: (1 - ratio)^2 = {100 * record['nominal_share']:.2f} %)",
             compression_summary(record["teacher_parameters"], record["parameters"])]
    if record["regrouped_norms"]:
        kinds = sorted({tuple(v) for v in record["regrouped_norms"].values()})
        lines.append(f"GroupNorm regrouped in {len(record['regrouped_norms'])} layers (>= 2 channels per group): "
                     + ", ".join(f"{c} channels {g0} -> {g} groups" for g0, g, c in kinds))
    return "\n".join(lines)


# --- students for the trainer (build.py) --------------------------------------------------------

def make_pruned_student(cfg, teacher: nn.Module, *, verbose: bool = True):
    """The ``student_init=prune`` student for a run: the teacher pruned at ``pruning_ratio`` with
    ``pruning_importance`` (calibration data: the run's first training batches)."""
    calibration, scheduler = None, None
    if cfg.pruning_importance == "taylor":
        from .build import build_dataset
        from .objective import make_noise_scheduler

        channels = int(model_config_dict(teacher).get("in_channels", 3))
        data = build_dataset(cfg, channels)
        b = cfg.train_batch_size
        n = min(len(data), CALIBRATION_BATCHES * b)
        items = torch.stack([data[i]["pixel_values"] for i in range(n)])
        calibration = [items[i:i + b] for i in range(0, n, b)]
        scheduler = make_noise_scheduler(cfg)
    p = next(teacher.parameters())
    t = teacher if (p.device.type, p.dtype) == ("cpu", torch.float32) else copy.deepcopy(teacher).to("cpu", torch.float32)
    student, _ = prune_unet(t, cfg.pruning_ratio, cfg.pruning_importance, seed=cfg.seed, calibration=calibration,
                            scheduler=scheduler, verbose=verbose)
    return student


def copy_plan_arch(cfg, teacher_config: dict) -> str:
    """The ``bk.py`` spec of a ``student_init=copy`` student: ``student_arch``, else
    ``student_layers_per_block`` resnets kept in every down stage (mid block kept)."""
    if cfg.student_arch is not None:
        return cfg.student_arch
    n = len(teacher_config["down_block_types"])
    layers = cfg.student_layers_per_block
    t_layers = teacher_config.get("layers_per_block", 2)
    if layers is None:
        if not isinstance(t_layers, int) or t_layers < 2:
            raise ConfigError("student_init=copy keeps a subset of the teacher's resnets: set student_layers_per_block "
                              "(fewer than the teacher's layers_per_block) or student_arch")
        layers = t_layers - 1
    return f"custom:down={','.join([str(layers)] * n)};mid=1"


def make_copy_student(cfg, teacher: nn.Module, *, verbose: bool = True):
    """Width-preserving block removal for a ``UNet2DModel`` teacher (BK-SDM's rule, ``bk.py``):
    each down stage keeps its first resnets, each up stage its first and its last; every
    remaining weight copied from the teacher by name."""
    from .bk import bk_student_config, describe_mapping, student_plan

    UNet2DModel = _unet2d_class()
    if type(teacher) is not UNet2DModel:
        raise ConfigError(f"student_init=copy removes resnets from a pixel UNet2DModel teacher; the teacher is a "
                          f"{type(teacher).__name__} (for a UNet2DConditionModel use student_arch)")
    t_cfg = model_config_dict(teacher)
    arch = copy_plan_arch(cfg, t_cfg)
    plan = student_plan(arch, t_cfg)
    if len(set(plan.down)) != 1:
        raise ConfigError(f"student_init=copy: UNet2DModel takes one layers_per_block for every stage; {arch!r} "
                          "keeps different counts")
    s_cfg = bk_student_config(t_cfg, plan)
    student = UNet2DModel.from_config(s_cfg)
    t_state = teacher.state_dict()
    state, mapping = {}, {}
    for name, p in student.state_dict().items():
        src = plan.teacher_name(name)
        if src not in t_state or t_state[src].shape != p.shape:
            raise ConfigError(f"student_init=copy ({arch}): student weight {name!r} has no teacher weight {src!r} of "
                              f"shape {tuple(p.shape)}")
        state[name] = t_state[src].detach().to("cpu", torch.float32).clone()
        mapping[name.rpartition(".")[0]] = src.rpartition(".")[0]
    student.load_state_dict(state, strict=True)
    if verbose:
        from .bk import bk_module_map

        print(describe_mapping(bk_module_map(student, plan), teacher, f"student_init=copy ({arch})").splitlines()[0])
        print(compression_summary(count_parameters(teacher), count_parameters(student)))
    return student


def ratio_for_share(share: float) -> float:
    """The pruning ratio whose nominal share ``(1 - r)^2`` is ``share``."""
    return 1 - math.sqrt(share)
