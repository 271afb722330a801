"""Teacher and student models: loading, student derivation, and the calling convention.

The training step never calls a model directly: it goes through a :class:`ModelFamily`,
which knows the model class, how to call it on ``(noisy, timesteps, conditioning)``,
which blocks carry features for feature KD, and how to derive a smaller student.
Families: pixel ``UNet2DModel`` (``unet2d``), text-conditional
``UNet2DConditionModel`` (``unet2d_condition``, the Stable Diffusion U-Net; its latents and
prompt embeddings come from the frozen encoders of ``latent.py``), class-conditional
``DiTTransformer2DModel`` (``dit``, see ``dit.py``) and ``SD3Transformer2DModel`` (``sd3``,
see ``sd3.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ConfigError

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODELS = {"digits": ASSETS / "digits_teacher"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_PRIVATE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
# The config's dtype names (teacher_dtype, export_dtype).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ModelFamily:
    """How the trainer builds, calls and shrinks one kind of denoiser.

    ``cond_keys`` names the batch entries the family takes as conditioning: the trainer
    hands ``{key: batch[key]}`` to :meth:`forward` of teacher and student alike.
    ``end_of_run`` names the steps that close a finished run (see ``finish.py``).
    """

    name: str
    class_names: tuple[str, ...]
    cond_keys: tuple[str, ...] = ()
    # the export first: a sample grid that fails must never cost the trained model
    end_of_run: tuple[str, ...] = ("export", "sample_grid", "bucket_heatmaps")

    def model_class(self):
        raise NotImplementedError

    def forward(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict) -> Tensor:
        """Denoiser output for ``noisy`` at ``timesteps`` under conditioning ``cond``
        (the batch entries named by ``cond_keys``; empty for an unconditional family)."""
        raise NotImplementedError

    def sample_shape(self, config: dict, resolution: int | None = None) -> tuple[int, ...]:
        """Shape of one sample ``(C, *S)`` the model denoises."""
        raise NotImplementedError

    def feature_points(self, model: nn.Module) -> dict[str, nn.Module]:
        """Named submodules whose outputs feature KD can match."""
        raise NotImplementedError

    def derive_student_config(self, teacher_config: dict, **options) -> dict:
        raise NotImplementedError

    def check_supported(self, config: dict, what: str) -> None:
        pass

    def class_for_config(self, config: dict):
        """The class that builds ``config`` (a pruned student's config needs its own, see prune.py)."""
        return self.model_class()

    def build_encoders(self, cfg, device, dtype):
        """The frozen encoders between the data and the denoiser (latents, prompt embeddings), or
        None when the model takes the dataset's pixels directly."""
        return None

    def model_resolution(self, cfg) -> int:
        """The spatial size the models see for ``cfg.resolution`` (from configs only)."""
        return cfg.resolution

    def example_cond(self, config: dict, batch_size: int, device, dtype) -> dict:
        """Conditioning of the shapes a call needs, for measuring a model (``liftplace cost``):
        zeros, which cost what real conditioning costs. ``{}`` for an unconditional family."""
        return {}

    def learned_sigma(self, config: dict) -> bool:
        """Whether the model outputs ``[mean | variance values]`` (DiT's ``out_channels = 2·in_channels``)."""
        return False

    def drop_condition(self, cond: dict, generator: torch.Generator, prob: float, config: dict) -> dict:
        """Replace each sample's conditioning by the null condition with probability ``prob``
        (classifier-free guidance), coins from ``generator``; the base family has none to drop."""
        return cond


class UNet2DFamily(ModelFamily):
    """Unconditional pixel-space ``diffusers.UNet2DModel``."""

    name = "unet2d"
    class_names = ("UNet2DModel",)
    derived_class_names = ("PrunedUNet2DModel",)  # a student pruned from a UNet2DModel (prune.py)

    def model_class(self):
        from diffusers import UNet2DModel

        return UNet2DModel

    def class_for_config(self, config):
        from .prune import is_pruned_config, pruned_model_class

        return pruned_model_class() if is_pruned_config(config) else self.model_class()

    def forward(self, model, noisy, timesteps, cond):
        return model(noisy, timesteps, return_dict=False)[0]

    def sample_shape(self, config, resolution=None):
        size = resolution or config.get("sample_size") or 32
        if isinstance(size, (list, tuple)):
            return (int(config.get("in_channels", 3)), int(size[0]), int(size[1]))
        return (int(config.get("in_channels", 3)), int(size), int(size))

    def feature_points(self, model):
        """Every down/mid/up block, and (below block level) each block's resnets and attentions."""
        points = {f"down_blocks.{i}": b for i, b in enumerate(model.down_blocks)}
        if model.mid_block is not None:
            points["mid_block"] = model.mid_block
        points.update({f"up_blocks.{i}": b for i, b in enumerate(model.up_blocks)})
        for name, block in list(points.items()):
            for kind in ("resnets", "attentions"):
                for j, sub in enumerate(getattr(block, kind, None) or ()):
                    points[f"{name}.{kind}.{j}"] = sub
        return points

    def check_supported(self, config, what):
        if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
            raise ConfigError(f"{what}: class-conditional UNet2DModel (class_embed_type / num_class_embeds) is "
                              "not supported by this trainer yet; use an unconditional model")
        if config.get("in_channels") != config.get("out_channels"):
            raise ConfigError(f"{what}: in_channels ({config.get('in_channels')}) must equal out_channels "
                              f"({config.get('out_channels')}) for a denoiser")

    def derive_student_config(self, teacher_config, *, width_mult=0.25, layers_per_block=None,
                              attention=None, norm_num_groups=None):
        cfg = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
        widths = [int(c) for c in cfg.get("block_out_channels", (224, 448, 672, 896))]
        t_groups = int(cfg.get("norm_num_groups", 32))
        groups = norm_num_groups or t_groups
        new = []
        for c in widths:
            w = max(1, round(c * width_mult))
            if norm_num_groups is not None:
                # an explicit group count: round the width to a multiple of it
                w = max(groups, round(w / groups) * groups)
            new.append(w)
        if norm_num_groups is None:
            # keep the teacher's group count where it divides every width, else the largest that does
            g = math.gcd(*new)
            groups = max(d for d in range(1, min(t_groups, g) + 1) if g % d == 0)
        cfg["block_out_channels"] = new
        cfg["norm_num_groups"] = groups
        if cfg.get("attn_norm_num_groups") is not None:
            cfg["attn_norm_num_groups"] = groups
        if layers_per_block is not None:
            cfg["layers_per_block"] = int(layers_per_block)
        if attention is False:
            cfg["down_block_types"] = [t.replace("AttnDownBlock2D", "DownBlock2D")
                                       for t in cfg.get("down_block_types", ())]
            cfg["up_block_types"] = [t.replace("AttnUpBlock2D", "UpBlock2D") for t in cfg.get("up_block_types", ())]
            cfg["add_attention"] = False
        head = cfg.get("attention_head_dim", 8)
        attn_widths = [c for c, t in zip(new, cfg.get("down_block_types", ())) if "Attn" in t]
        attn_widths += [c for c, t in zip(reversed(new), cfg.get("up_block_types", ())) if "Attn" in t]
        if cfg.get("add_attention", True):
            attn_widths.append(new[-1])
        if head and any(c % head for c in attn_widths):
            raise ConfigError(f"derived student widths {new} are not multiples of attention_head_dim={head}; "
                              "pick another student_width_mult or set student_attention: false")
        return cfg


class UNet2DConditionFamily(UNet2DFamily):
    """Text-conditional ``diffusers.UNet2DConditionModel`` (Stable Diffusion, BK-SDM), called with
    the prompt embeddings as ``encoder_hidden_states`` (batch key of the same name)."""

    name = "unet2d_condition"
    class_names = ("UNet2DConditionModel",)
    cond_keys = ("encoder_hidden_states",)

    def model_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def forward(self, model, noisy, timesteps, cond):
        hidden = cond["encoder_hidden_states"]
        return model(noisy, timesteps, encoder_hidden_states=hidden.to(noisy.dtype), return_dict=False)[0]

    def build_encoders(self, cfg, device, dtype):
        from .latent import build_encoders

        return build_encoders(cfg, device, dtype)

    def model_resolution(self, cfg) -> int:
        from .latent import latent_factor

        factor = latent_factor(cfg)
        if cfg.resolution % factor:
            raise ConfigError(f"resolution={cfg.resolution} must be a multiple of the VAE's downsampling factor "
                              f"{factor}")
        return cfg.resolution // factor

    def example_cond(self, config, batch_size, device, dtype, tokens: int = 77):
        """Zero prompt embeddings ``[B, tokens, cross_attention_dim]``; 77 is CLIP's context length."""
        dim = config.get("cross_attention_dim")
        if not isinstance(dim, int):
            raise ValueError(f"cross_attention_dim={dim!r}: measuring needs one text-embedding width (an int)")
        return {"encoder_hidden_states": torch.zeros(batch_size, tokens, dim, device=device, dtype=dtype)}

    def check_supported(self, config, what):
        for key in ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim"):
            if config.get(key) is not None:
                raise ConfigError(f"{what}: UNet2DConditionModel with {key}={config.get(key)!r} (SDXL-style or "
                                  "class conditioning) is not supported yet; only prompt embeddings "
                                  "(encoder_hidden_states) condition the model")
        if config.get("in_channels") != config.get("out_channels"):
            raise ConfigError(f"{what}: in_channels ({config.get('in_channels')}) must equal out_channels "
                              f"({config.get('out_channels')}) for a denoiser")

    def derive_student_config(self, teacher_config, *, width_mult=0.25, layers_per_block=None, attention=None,
                              norm_num_groups=None):
        if attention is False:
            raise ConfigError("student_attention=false is not supported for unet2d_condition (the cross-attention "
                              "carries the prompt); use student_arch (bk_base|bk_small|bk_tiny or custom:...) or "
                              "student_config")
        return super().derive_student_config(teacher_config, width_mult=width_mult,
                                             layers_per_block=layers_per_block, norm_num_groups=norm_num_groups)


class _TransformerFamily(ModelFamily):
    """Patchified transformers: blocks in ``transformer_blocks``, students by depth pruning."""

    def sample_shape(self, config, resolution=None):
        size = resolution or config.get("sample_size") or 32
        return (int(config.get("in_channels", 4)), int(size), int(size))

    def feature_points(self, model):
        return {f"transformer_blocks.{i}": b for i, b in enumerate(model.transformer_blocks)}

    def derive_student_config(self, teacher_config, **options):
        raise ConfigError(f"model_type={self.name}: a student is derived from the teacher by depth pruning; set "
                          "student_depth (and layer_selection), or give student_config / "
                          "student_model_name_or_path")

    def sample_grid(self, tr):
        from .dit import sample_grid

        return sample_grid(tr)


class DiTFamily(_TransformerFamily):
    """Class-conditional ``diffusers.DiTTransformer2DModel`` (pixels or latents), called with the
    batch's integer ``label`` as ``class_labels``; the null class ``num_embeds_ada_norm`` is the
    unconditional input of classifier-free guidance. ``out_channels = 2·in_channels`` is DiT's
    learned sigma: the first ``in_channels`` are the prediction, the rest the variance values."""

    name = "dit"
    class_names = ("DiTTransformer2DModel",)
    cond_keys = ("label",)

    def model_class(self):
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel

    def forward(self, model, noisy, timesteps, cond):
        from .dit import label_dropout_off

        labels = cond.get("label") if cond else None
        if labels is None:
            raise ValueError("the dit family needs class labels: cond['label'] (integers, the null class for "
                             "unconditional calls)")
        label_dropout_off(model)
        return model(noisy, timestep=timesteps, class_labels=labels.long(), return_dict=False)[0]

    def example_cond(self, config, batch_size, device, dtype):
        """Class 0 for every image (the embedding lookup costs the same for any label)."""
        return {"label": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def learned_sigma(self, config):
        c_in, c_out = config.get("in_channels", 4), config.get("out_channels")
        return c_out is not None and c_out == 2 * c_in

    def null_class(self, config: dict) -> int:
        return int(config["num_embeds_ada_norm"])

    def build_encoders(self, cfg, device, dtype):
        from .dit import build_latent_encoder

        return build_latent_encoder(cfg, device, dtype)

    def model_resolution(self, cfg) -> int:
        from .sd3 import sd3_model_resolution  # the VAE's factor when latent, else the pixels

        return sd3_model_resolution(cfg)

    def drop_condition(self, cond, generator, prob, config):
        from .dit import drop_labels

        return drop_labels(cond, generator, prob, self.null_class(config))

    def check_supported(self, config, what):
        c_in, c_out = config.get("in_channels", 4), config.get("out_channels")
        if c_out is not None and c_out not in (c_in, 2 * c_in):
            raise ConfigError(f"{what}: DiTTransformer2DModel out_channels ({c_out}) must be in_channels ({c_in}) or "
                              f"2·in_channels (learned sigma)")
        n = config.get("num_embeds_ada_norm", 1000)
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"{what}: num_embeds_ada_norm (the number of classes) must be an int >= 1, got {n!r}")


class SD3Family(_TransformerFamily):
    """``diffusers.SD3Transformer2DModel`` (MMDiT), trained with flow matching by default; called
    with the prompt embeddings ``encoder_hidden_states`` and ``pooled_projections``."""

    name = "sd3"
    class_names = ("SD3Transformer2DModel",)
    cond_keys = ("encoder_hidden_states", "pooled_projections")
    default_objective = "flow"

    def model_class(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def forward(self, model, noisy, timesteps, cond):
        return model(hidden_states=noisy, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
                     pooled_projections=cond["pooled_projections"].to(noisy.dtype), timestep=timesteps,
                     return_dict=False)[0]

    def example_cond(self, config, batch_size, device, dtype, tokens: int = 333):
        """Zero prompt embeddings ``[B, tokens, joint_attention_dim]`` and pooled projections
        ``[B, pooled_projection_dim]``; 333 = 77 CLIP + 256 T5 tokens, SD3's default context."""
        return {"encoder_hidden_states": torch.zeros(batch_size, tokens, config["joint_attention_dim"], device=device,
                                                     dtype=dtype),
                "pooled_projections": torch.zeros(batch_size, config["pooled_projection_dim"], device=device,
                                                  dtype=dtype)}

    def drop_condition(self, cond, generator, prob, config):
        from .sd3 import drop_prompts

        return drop_prompts(cond, generator, prob)

    def build_encoders(self, cfg, device, dtype):
        from .sd3 import build_sd3_encoders

        return build_sd3_encoders(cfg, device, dtype)

    def model_resolution(self, cfg) -> int:
        from .sd3 import sd3_model_resolution

        return sd3_model_resolution(cfg)

    def check_supported(self, config, what):
        if config.get("in_channels", 16) != config.get("out_channels", 16):
            raise ConfigError(f"{what}: in_channels ({config.get('in_channels')}) must equal out_channels "
                              f"({config.get('out_channels')}) for a flow-matching denoiser")


FAMILIES: dict[str, ModelFamily] = {"unet2d": UNet2DFamily(), "unet2d_condition": UNet2DConditionFamily(),
                                    "dit": DiTFamily(), "sd3": SD3Family()}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(f"model_type {name!r} is not known; supported families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# --- locating and loading ----------------------------------------------------------------------

def resolve_model_dir(path) -> Path:
    """A folder holding ``config.json`` + weights: the path itself, its ``unet/`` (a pipeline
    folder), its ``student/`` or ``teacher/`` (a training output) or a ``builtin:NAME`` asset."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ConfigError(f"unknown built-in model {text!r}; available: "
                              + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS))
        p = BUILTIN_MODELS[name]
        if not (p / "config.json").is_file():
            raise ConfigError(f"the built-in model {text!r} is missing from this installation ({p}); "
                              "train it with `liftplace train-teacher` (see README)")
        return p
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model folder {text!r} does not exist (only local folders are supported; "
                          "nothing is downloaded)")
    for cand in (p, p / "unet", p / "student", p / "teacher"):
        if (cand / "config.json").is_file() and any((cand / w).is_file() for w in WEIGHT_FILES):
            return cand
    raise ConfigError(f"{text!r} is not a diffusers model folder: expected config.json and "
                      f"{WEIGHT_FILES[0]} in it (or in its unet/ subfolder)")


def read_config(model_dir: Path) -> dict:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {Path(model_dir) / 'config.json'}: {exc}") from exc


def family_for_config(config: dict, default: str) -> ModelFamily:
    """The family of a model config: its ``_class_name``; without one, ``cross_attention_dim``
    means a ``UNet2DConditionModel``, else ``default``."""
    cls = config.get("_class_name")
    if cls is None:
        return get_family("unet2d_condition" if "cross_attention_dim" in config else default)
    for fam in FAMILIES.values():
        if cls in fam.class_names or cls in getattr(fam, "derived_class_names", ()):
            return fam
    raise ConfigError(f"model class {cls!r} is not supported; supported families: "
                      + ", ".join(f"{f.name} ({', '.join(f.class_names)})" for f in FAMILIES.values()))


def load_pretrained(path, family: ModelFamily, what: str, dtype=torch.float32) -> nn.Module:
    model_dir = resolve_model_dir(path)
    cfg = read_config(model_dir)
    family.check_supported(cfg, what)
    cls = family.class_for_config(cfg)
    try:
        model = cls.from_pretrained(str(model_dir), torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - name the folder whatever diffusers raised
        raise ConfigError(f"{what}: cannot load the model in {str(model_dir)!r}: {exc}") from exc
    return model


def build_from_config(config: dict, family: ModelFamily, what: str, seed: int | None = None) -> nn.Module:
    family.check_supported(config, what)
    cls = family.class_for_config(config)
    clean = {k: v for k, v in config.items() if k not in _PRIVATE_KEYS}
    try:
        if seed is None:
            return cls.from_config(clean)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls.from_config(clean)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{what}: cannot build {cls.__name__} from the config: {exc}") from exc


def model_config_dict(model: nn.Module) -> dict:
    return {k: _jsonable(v) for k, v in dict(model.config).items() if k not in _PRIVATE_KEYS}


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def parameter_count_of_config(config: dict, family: ModelFamily) -> int:
    with torch.device("meta"):
        model = build_from_config(config, family, "model config")
    return count_parameters(model)


def derive_student_config(teacher_config: dict, *, model_type: str = "unet2d", width_mult: float = 0.25,
                          layers_per_block: int | None = None, attention: bool | None = None,
                          norm_num_groups: int | None = None, verbose: bool = True) -> dict:
    """Student config from the teacher's: widths x ``width_mult``, optional layers per block,
    attention on/off. Prints (and logs) both parameter counts and the compression ratio."""
    family = get_family(model_type)
    cfg = family.derive_student_config(teacher_config, width_mult=width_mult, layers_per_block=layers_per_block,
                                       attention=attention, norm_num_groups=norm_num_groups)
    if verbose:
        t = parameter_count_of_config(teacher_config, family)
        s = parameter_count_of_config(cfg, family)
        print(compression_summary(t, s))
    return cfg


def compression_summary(teacher_params: int, student_params: int) -> str:
    ratio = student_params / teacher_params
    return (f"teacher {teacher_params:,} parameters; student {student_params:,} parameters; "
            f"compression (student/teacher) {ratio:.4f} = {100 * ratio:.2f} % ({1 / ratio:.1f}x smaller)")


def scheduler_config_near(model_dir: Path) -> Path | None:
    """``scheduler_config.json`` beside the model, in its parent, or in a pipeline's scheduler/."""
    model_dir = Path(model_dir)
    for cand in (model_dir / "scheduler_config.json", model_dir.parent / "scheduler_config.json",
                 model_dir.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return cand
    return None


# --- feature distillation ---------------------------------------------------------------------

class FeatureTaps:
    """Forward hooks that keep the latest output of named blocks (feature KD)."""

    def __init__(self, points: dict[str, nn.Module]):
        self.outputs: dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in points.items()]

    def _hook(self, name):
        def hook(module, args, output):
            if isinstance(output, (tuple, list)):
                # SD3's JointTransformerBlock returns (encoder_hidden_states, hidden_states): the image tokens
                output = output[1] if type(module).__name__ == "JointTransformerBlock" else output[0]
            self.outputs[name] = output
        return hook

    def pop(self) -> dict[str, Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def select_feature_points(family: ModelFamily, teacher: nn.Module, student: nn.Module, spec: str,
                          student_arch: str | None = None):
    """``(teacher points, student points)``, two dicts keyed alike by pair label. ``spec``: ``all``
    (every block of the same name), ``bk_sdm`` (BK-SDM's pairs for ``student_arch``, see
    ``bk.bk_feature_pairs``) or a comma list of module names, each ``name`` (the same in both)
    or ``teacher_name:student_name``. Any module path of the models is allowed, below block
    level too (``down_blocks.2.attentions.1.proj_out``). Resolved on the unwrapped models."""
    t_points, s_points = family.feature_points(teacher), family.feature_points(student)
    kept = getattr(student, "liftplace_kept_blocks", None)
    if spec.strip() == "all" and kept is not None:
        # a depth-pruned student: block i <-> the teacher block it was copied from
        pairs = [(f"transformer_blocks.{src}", f"transformer_blocks.{i}") for i, src in enumerate(kept)]
    elif spec.strip() == "all":  # every block (not the resnets/attentions inside them); a pruned student keeps the names
        pairs = [(n, n) for n in t_points if n.count(".") <= 1]
    elif spec.strip() == "bk_sdm":
        if student_arch is None:
            raise ConfigError("kd_feat_layers=bk_sdm pairs the blocks BK-SDM distils for a student_arch; set "
                              "student_arch bk_base|bk_small|bk_tiny, or list the layers")
        from .bk import bk_feature_pairs

        pairs = bk_feature_pairs(student_arch, teacher, student)
    else:
        pairs = []
        for item in (x.strip() for x in spec.split(",")):
            if item:
                t, _, s = item.partition(":")
                pairs.append((t.strip(), (s or t).strip()))
    out_t, out_s = {}, {}
    for t_name, s_name in pairs:
        label = t_name if t_name == s_name else f"{t_name}:{s_name}"
        out_t[label] = _feature_module(teacher, t_points, t_name, "teacher")
        out_s[label] = _feature_module(student, s_points, s_name, "student")
    return out_t, out_s


def _feature_module(model: nn.Module, points: dict, name: str, role: str) -> nn.Module:
    if name in points:
        return points[name]
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"kd_feat_layers: {name!r} is not a module of the {role}; blocks: "
                          + ", ".join(n for n in points if n.count(".") <= 1)) from None


def block_channels(module: nn.Module) -> int:
    """Output channels of a U-Net block (from its last resnet, or its upsampler/downsampler)."""
    resnets = getattr(module, "resnets", None)
    if resnets:
        return resnets[-1].out_channels
    if isinstance(getattr(module, "out_channels", None), int):  # a resnet, attention or conv inside a block
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    ff = getattr(module, "ff", None)  # a transformer block: its feed-forward's output width
    if ff is not None:
        return [m for m in ff.modules() if isinstance(m, nn.Linear)][-1].out_features
    raise ConfigError(f"cannot tell the output width of block {type(module).__name__}")


class FeatureAdapters(nn.Module):
    """FitNet 1x1 conv adapters: student block features -> teacher width (identity when equal)."""

    def __init__(self, pairs: dict[str, tuple[int, int]]):
        super().__init__()
        self.names = list(pairs)
        self.adapters = nn.ModuleDict({
            self.key(n): (nn.Conv2d(s, t, kernel_size=1) if s != t else nn.Identity())
            for n, (s, t) in pairs.items()
        })

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "_").replace(":", "__")

    def forward(self, name: str, x: Tensor) -> Tensor:
        adapter = self.adapters[self.key(name)]
        if x.dim() == 3 and isinstance(adapter, nn.Conv2d):  # tokens [B, N, D]: the 1x1 conv per token
            return nn.functional.linear(x, adapter.weight[:, :, 0, 0], adapter.bias)
        return adapter(x)
