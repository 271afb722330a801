"""Training configuration: one dataclass, loaded from defaults < YAML file < command line.

Keys are the flag names of diffusers' training examples where a meaning exists
(``output_dir``, ``train_batch_size``, ``learning_rate``, ...) and BK-SDM's KD names
(``lambda_sd``, ``lambda_kd_output``, ``lambda_kd_feat``); the LIFT/PLACE options are
``kd_*`` and ``group_size``. A YAML file uses the same keys, flat.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
KD_LOSSES = ("place", "lift", "output", "none")
MODEL_TYPES = ("auto", "unet2d", "unet2d_condition", "dit", "sd3")
OBJECTIVES = ("ddpm", "flow")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")  # diffusers' SD3 scripts
# Presets: values applied under the file and the command line (defaults < preset < file < flags).
PRESETS = {
    # BK-SDM's kd_train_text_to_image.py defaults and released scripts
    "bk_sdm": dict(kd_reduction="mean", lambda_sd=1.0, lambda_kd_output=1.0, lambda_kd_feat=1.0,
                   kd_feat_layers="bk_sdm", learning_rate=5e-5, lr_scheduler="constant", adam_weight_decay=1e-2,
                   use_ema=False),
}
STUDENT_ARCHS = ("bk_base", "bk_small", "bk_tiny")  # presets; or a custom spec, see parse_student_arch


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _f(default, help: str, group: str, choices=None, **kw):
    meta = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """Every knob of ``liftplace distill`` / ``train-teacher``; see ``liftplace distill --help``."""

    preset: str | None = _f(None, "bk_sdm: BK-SDM's KD settings (kd_reduction mean, lambda_sd = "
                            "lambda_kd_output = lambda_kd_feat = 1, kd_feat_layers bk_sdm, learning_rate 5e-5, "
                            "constant lr, adam_weight_decay 1e-2, no EMA) for every key the file or the command "
                            "line leaves unset.", "model", choices=tuple(PRESETS))
    # --- models ------------------------------------------------------------------------
    model_type: str = _f("auto", "Model family (the calling convention of teacher and student): auto = from the "
                         "teacher's config.json (_class_name), unet2d (UNet2DModel, pixels) or unet2d_condition "
                         "(UNet2DConditionModel: VAE latents, CLIP prompt embeddings), dit (DiTTransformer2DModel, class labels) or "
                         "sd3 (SD3Transformer2DModel: flow matching, CLIP/T5 prompt embeddings).", "model",
                         choices=MODEL_TYPES)
    pretrained_model_name_or_path: str | None = _f(
        None, "Teacher: a local diffusers model folder (save_pretrained: config.json + weights) or a "
        "pipeline folder with unet/. Nothing is downloaded. 'builtin:digits' is the teacher shipped "
        "with liftplace.", "model")
    teacher_config: dict | str | None = _f(
        None, "Teacher architecture (a dict in YAML, or a JSON file) with random weights; for tests "
        "and smoke runs. Exclusive with pretrained_model_name_or_path.", "model")
    teacher_dtype: str = _f("fp32", "Dtype of the frozen teacher's weights.", "model", choices=("fp32", "bf16", "fp16"))
    student_model_name_or_path: str | None = _f(
        None, "Initialise the student from this local diffusers model folder.", "model")
    student_config: dict | str | None = _f(
        None, "Student architecture (a dict in YAML, or a JSON file). When neither this nor "
        "student_model_name_or_path is set, the student is derived from the teacher with "
        "student_width_mult / student_layers_per_block / student_attention.", "model")
    student_width_mult: float = _f(0.25, "Derived student: channel width multiplier (0 < m <= 1).", "model")
    student_layers_per_block: int | None = _f(
        None, "Derived student: resnet layers per block (default: the teacher's).", "model")
    student_attention: bool | None = _f(
        None, "Derived student: keep (true) or drop (false) attention blocks (default: as the teacher).",
        "model")
    student_norm_num_groups: int | None = _f(
        None, "Derived student: GroupNorm groups (default: the teacher's, reduced to divide every "
        "width).", "model")
    student_arch: str | None = _f(
        None, "unet2d_condition: a BK-SDM student made from the teacher by block removal, every remaining "
        "weight copied from the teacher (BK-SDM's use_copy_weight_from_teacher); the student<-teacher module "
        "mapping is printed. bk_base: one resnet(+attention) less per down and up stage; bk_small: also no "
        "mid block; bk_tiny: also no innermost stage. Or a custom spec 'custom:down=D1,...,DK;mid=0|1' "
        "(optional ';up=U1,...,UK'): Ds = resnet(+attention) layers kept in down stage s (outer first, "
        "1..the teacher's), K stages kept (1..the teacher's; the innermost ones go), mid block kept or not "
        "(default 1); up stage i keeps D(K+1-i)+1 layers, the first D and the teacher's last. "
        "bk_small = custom:down=1,1,1,1;mid=0 for a 4-stage teacher.", "model")
    # --- students made from the teacher (prune.py) ---
    student_init: str = _f("random", "How the student starts: random (the architecture of student_config or derived "
                           "from the teacher, random weights; student_arch copies weights as it says), prune (the "
                           "pixel UNet2DModel teacher structurally pruned with Torch-Pruning at pruning_ratio, "
                           "Diff-Pruning; GroupNorm regrouped to >= 2 channels per group; the parameter share reached "
                           "is printed) or copy (width-preserving block removal, BK-SDM's rule for a UNet2DModel: "
                           "student_layers_per_block, or student_arch, resnets kept per stage, weights copied).",
                           "model", choices=("random", "prune", "copy"))
    pruning_ratio: float = _f(0.5, "student_init=prune: share of channels removed from every prunable layer (local "
                              "pruning); the parameter share is about (1 - r)^2: 0.5, 0.75 and 0.85 keep 0.252, 0.064 "
                              "and 0.021 of the digits teacher's parameters.", "model")
    pruning_importance: str = _f("magnitude", "student_init=prune: channel importance: magnitude (L2 norm of the "
                                 "weights), taylor (Diff-Pruning: |w * grad| of the diffusion loss over early "
                                 "timesteps on the first training batches) or random (seeded).", "model",
                                 choices=("magnitude", "taylor", "random"))
    pretrained_vae_model_name_or_path: str | None = _f(
        None, "unet2d_condition: the AutoencoderKL folder (default: vae/ of the teacher's pipeline folder); "
        "dit / sd3: train on this VAE's latents (default: pixels).", "model")
    text_encoder_path: str | None = _f(
        None, "unet2d_condition: a folder with text_encoder/ (CLIPTextModel) and tokenizer/ (CLIPTokenizer), "
        "e.g. a pipeline folder (default: the teacher's pipeline folder). Frozen.", "model")

    # --- data --------------------------------------------------------------------------
    dataset_name: str = _f("digits", "'digits' (scikit-learn's bundled digits, upscaled), 'synthetic', "
                           "or the path of an image folder.", "data")
    train_data_dir: str | None = _f(None, "An image folder (overrides dataset_name).", "data")
    resolution: int = _f(16, "Training image resolution (square).", "data")
    center_crop: bool = _f(True, "Image folders: centre crop (else random crop) after resizing.", "data")
    random_flip: bool = _f(False, "Flip training images horizontally with probability 0.5.", "data")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes (0: load in the main process).", "data")
    image_column: str = _f("image", "Captioned data (train_data_dir with metadata.jsonl/.csv): the column of "
                           "image file names, relative to the folder.", "data")
    caption_column: str = _f("text", "Captioned data: the column of captions.", "data")
    max_train_samples: int | None = _f(None, "Keep only the first this many training samples.", "data")
    cond_drop_prob: float = _f(0.0, "unet2d_condition / sd3: probability of replacing a caption by the empty prompt; "
                               "dit: of replacing a class label by the null class (DiT uses 0.1): the null "
                               "condition of classifier-free guidance.", "data")
    cache_latents: bool = _f(False, "unet2d_condition: encode every training image (and its mirror image, with "
                             "random_flip) with the VAE once and keep the posteriors on disk; the latents are still "
                             "drawn each step. The cache's manifest holds the VAE's hash and the data's, so a "
                             "different VAE or data set is re-encoded, never reused.", "data")
    cache_prompt_embeds: bool = _f(False, "unet2d_condition: keep each distinct caption's CLIP embedding in memory "
                                   "after its first use (the text encoder is frozen); for small caption sets.",
                                   "data")
    latent_cache_dir: str | None = _f(None, "Folder of the latent cache (default: output_dir/latent_cache); "
                                      "runs with the same VAE and data may share it.", "data")
    vae_sample_mode: str = _f("sample", "unet2d_condition: latents are a sample of the VAE's posterior or its "
                              "mean; scaled by the VAE's scaling_factor (after its shift_factor).", "data",
                              choices=("sample", "mean"))

    # --- noise schedule ------------------------------------------------------------------
    prediction_type: str = _f("epsilon", "What the models predict (the DDPMScheduler prediction type); "
                              "must be what the teacher was trained for.", "schedule",
                              choices=("epsilon", "v_prediction", "sample"))
    ddpm_num_steps: int = _f(1000, "Training timesteps of the DDPM noise schedule.", "schedule")
    ddpm_beta_schedule: str = _f("linear", "Beta schedule of the DDPM noise schedule.", "schedule",
                                 choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    ddpm_num_inference_steps: int = _f(50, "DDIM steps for validation sample grids.", "schedule")

    # --- optimisation ------------------------------------------------------------------
    output_dir: str = _f("runs/distill", "Where checkpoints, metrics, samples and the final model go.", "train")
    seed: int = _f(0, "Seed of initialisation, data order, noise and timesteps.", "train")
    train_batch_size: int = _f(64, "Batch size per process (per micro-batch).", "train")
    max_train_steps: int = _f(1000, "Optimizer steps to train for.", "train")
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.", "train")
    learning_rate: float = _f(1e-3, "Peak AdamW learning rate.", "train")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule (diffusers.optimization.get_scheduler).", "train",
                           choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "Linear warmup steps of the learning-rate schedule.", "train")
    adam_beta1: float = _f(0.9, "AdamW beta1.", "train")
    adam_beta2: float = _f(0.999, "AdamW beta2.", "train")
    adam_weight_decay: float = _f(1e-6, "AdamW decoupled weight decay.", "train")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", "train")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0: no clipping; the norm is still logged).",
                              "train")
    use_ema: bool = _f(True, "Keep an EMA of the student (diffusers EMAModel); samples and the final "
                       "export use it.", "train")
    ema_decay: float = _f(0.9999, "Maximum EMA decay.", "train")
    use_ema_warmup: bool = _f(True, "EMA warmup: decay = 1 - (1 + step/ema_inv_gamma)^-ema_power.", "train")
    ema_inv_gamma: float = _f(1.0, "EMA warmup inverse gamma.", "train")
    ema_power: float = _f(0.75, "EMA warmup power.", "train")
    mixed_precision: str = _f("no", "Autocast of the forward passes (accelerate); losses stay fp32.", "train",
                              choices=("no", "bf16", "fp16"))
    snr_gamma: float | None = _f(None, "Min-SNR-gamma weighting of the denoising loss (diffusers' compute_snr; "
                                 "5.0 is the paper's value); null: unweighted.", "train")
    noise_offset: float = _f(0.0, "diffusers' noise offset: add noise_offset * N(0, 1) per sample and channel "
                             "to the noise.", "train")
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing of the student (less memory, slower).",
                                      "train")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls and convolutions on Ampere+ GPUs.", "train")
    max_bad_steps: int = _f(10, "Stop with an error after this many consecutive steps with a non-finite "
                            "loss or gradient (each one is skipped).", "train")

    # --- multi-process training and memory (distributed.py) -------------------------------
    cast_teacher: bool = _f(False, "Cast the frozen teacher's weights to the compute dtype of mixed_precision "
                            "(bf16/fp16; fp32 with mixed_precision no); it runs under torch.no_grad() either way. "
                            "Overrides teacher_dtype, which must then be fp32 or the same dtype.", "train")

    # --- distillation --------------------------------------------------------------------
    kd_loss: str = _f("place", "Output distillation: place (LIFT+PLACE), lift (one fit per row), output "
                      "(plain MSE, conventional KD) or none (plain training).", "kd", choices=KD_LOSSES)
    lambda_sd: float = _f(1.0, "Weight of the student's own denoising loss.", "kd")
    lambda_kd_output: float = _f(1.0, "Weight of the output distillation loss.", "kd")
    lambda_kd_feat: float = _f(0.0, "Weight of FitNet feature distillation (1x1 conv adapters; 0: off).", "kd")
    kd_feat_layers: str = _f("all", "Feature KD points: 'all' (every block, same names), 'bk_sdm' (BK-SDM's "
                             "pairs for student_arch) or a comma list of module names, each 'name' or "
                             "'teacher_name:student_name', such as 'mid_block,up_blocks.1:up_blocks.0'.", "kd")
    kd_feat_loss: str = _f("mse", "Feature KD loss: mse (FitNet, BK-SDM) or lift_place (the LIFT/PLACE loss on "
                           "the adapted feature maps, with the kd_* options).", "kd", choices=("mse", "lift_place"))
    group_size: int = _f(16, "Elements per group (PLACE and patch grouping).", "kd")
    kd_grouping: str | None = _f(None, "Override the grouping implied by kd_loss (place: error, lift: "
                                 "global).", "kd", choices=("global", "error", "patch"))
    kd_norm: str = _f("l1", "Coarse penalty on (a - 1, b).", "kd", choices=("l1", "l2"))
    kd_reduction: str = _f("sum", "Reduction of every loss term: sum (over C,H,W; mean over batch) or "
                           "mean.", "kd", choices=("sum", "mean"))
    kd_weight: str = _f("adaptive", "Fine-term weight schedule (adaptive-timestep: one adaptive weight per "
                        "timestep bucket, METHOD.md §8).", "kd",
                        choices=("adaptive", "adaptive-timestep", "constant", "linear", "cosine"))
    kd_num_buckets: int = _f(10, "Timestep buckets for kd_weight=adaptive-timestep and the per-bucket "
                             "statistics in metrics.jsonl.", "kd")
    kd_bucket_ema: float = _f(0.9, "EMA of each bucket's mean |a-1|+|b| across steps (adaptive-timestep); "
                              "0 uses the batch alone.", "kd")
    kd_parts: str = _f("both", "Which LIFT/PLACE terms: both, coarse or fine.", "kd",
                       choices=("both", "coarse", "fine"))
    kd_coarse_weight: str = _f("constant", "constant (the paper) or anneal: (1 - w)*coarse + w*fine "
                               "(liftplace's extension).", "kd", choices=("constant", "anneal"))
    kd_eps: float = _f(1e-7, "Added to each group's mean variance in the fit.", "kd")

    # --- logging and checkpoints ----------------------------------------------------------
    logging_steps: int = _f(10, "Write a metrics.jsonl line every this many steps.", "log")
    report_to: str = _f("none", "Experiment trackers, through accelerate's tracker support: none, or a comma list "
                        "of accelerate's tracker names (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, "
                        "swanlab, trackio; all: every installed one). A tracker whose package is not installed is an "
                        "error. Training metrics (means over the processes) and validation grids go to each; "
                        "metrics.jsonl is written either way.", "log")
    logging_dir: str = _f("logs", "Folder of the trackers' files (tensorboard events, ...), relative to output_dir.",
                          "log")
    validation_steps: int = _f(500, "Save a DDIM sample grid from the (EMA) student every this many steps "
                               "and at the end (0: only at the end).", "log")
    num_validation_images: int = _f(16, "Images in each validation grid (per prompt for unet2d_condition).",
                                    "log")
    validation_prompts: list[str] | None = _f(
        None, "unet2d_condition: prompts of the validation grids (default: the first training captions).", "log")
    guidance_scale: float = _f(7.5, "unet2d_condition / dit / sd3: classifier-free guidance scale of the "
                               "validation grids (1: no guidance).", "log")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every this many steps (and at the end).",
                                  "log")
    checkpoints_total_limit: int | None = _f(None, "Keep only this many most recent checkpoints.", "log")
    resume_from_checkpoint: str | None = _f(None, "'latest' (in output_dir) or a checkpoint folder.", "log")
    progress_bar: bool = _f(True, "Show a tqdm progress bar.", "log")
    export_dtype: str = _f("fp32", "Dtype of the final exported model's weights.", "log",
                           choices=("fp32", "fp16", "bf16"))

    # --- transformers (dit, sd3), depth pruning and the flow-matching objective -------------
    objective: str | None = _f(None, "Training objective: ddpm (DDPMScheduler; epsilon / v / sample targets by "
                               "prediction_type) or flow (rectified flow: x_t = (1-sigma)*x_0 + sigma*noise, velocity "
                               "target noise - x_0, FlowMatchEulerDiscreteScheduler); null: the family's own (flow for "
                               "sd3, ddpm otherwise). The exported model carries the scheduler it was trained with.",
                               "schedule", choices=OBJECTIVES)
    weighting_scheme: str = _f("logit_normal", "objective=flow: timestep density (logit_normal, mode, else "
                               "uniform) and loss weighting (sigma_sqrt, cosmap, else 1), as diffusers' SD3 training "
                               "scripts.", "schedule", choices=WEIGHTING_SCHEMES)
    logit_mean: float = _f(0.0, "objective=flow, weighting_scheme=logit_normal: mean of the logit-normal density.",
                           "schedule")
    logit_std: float = _f(1.0, "objective=flow, weighting_scheme=logit_normal: std of the logit-normal density.",
                          "schedule")
    mode_scale: float = _f(1.29, "objective=flow, weighting_scheme=mode: scale of the mode density.", "schedule")
    flow_shift: float = _f(1.0, "objective=flow: the FlowMatchEulerDiscreteScheduler's shift (SD3 uses 3.0).",
                           "schedule")
    class_column: str | None = _f(None, "dit: the metadata.jsonl/.csv column of integer class labels of an image "
                                  "folder; without it an image folder's labels are its class subfolders (sorted "
                                  "names, 0..K-1); the digits data set has its own labels.", "data")
    student_depth: int | None = _f(None, "dit/sd3: a depth-pruned student keeping this many of the teacher's "
                                   "transformer blocks (chosen by layer_selection), their weights, the embedders "
                                   "and the final layer copied from the teacher by name (TinyFusion's setting).",
                                   "model")
    layer_selection: str = _f("uniform", "student_depth: which teacher blocks to keep: uniform (evenly spaced), "
                              "first (the first K), list:0,2,5,... (those blocks, in order) or score (the K blocks "
                              "whose removal raises a calibration denoising loss on held-out batches most; the "
                              "scores are printed).", "model")
    layer_score_batches: int = _f(4, "layer_selection=score: held-out batches (of train_batch_size) of the "
                                  "calibration loss.", "model")
    max_sequence_length: int = _f(77, "sd3: T5 tokens (text_encoder_3, when used); with no T5 the joint sequence "
                                  "is the CLIP tokens followed by this many zero tokens, as the SD3 pipeline.", "data")
    prompt_embeds_path: str | None = _f(None, "sd3: a folder of cached prompt embeddings (prompt_embeds.safetensors "
                                        "+ captions.json, from liftplace.train.sd3.cache_prompt_embeddings) used "
                                        "instead of loading the text encoders.", "data")
    use_t5: bool = _f(False, "sd3: use text_encoder_3 (T5) from text_encoder_path; false drops it (zeros in its "
                      "place), as SD3 allows.", "data")

    # ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save_yaml(self, path) -> None:
        import yaml

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied and validated (unknown keys are errors)."""
        merged = self.to_dict()
        merged.update(_coerce_mapping(changes, "arguments"))
        cfg = TrainConfig(**merged)
        cfg.validate()
        return cfg

    @property
    def grouping(self) -> str:
        if self.kd_grouping is not None:
            return self.kd_grouping
        return "global" if self.kd_loss == "lift" else "error"

    def validate(self) -> "TrainConfig":
        """Check ranges and combinations; raises :class:`ConfigError` naming the key."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, _field_kinds()[f.name], "config")
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(repr, choices))}; got {value!r}"
                                  + _suggest(str(value), choices))
        positive = ("resolution", "ddpm_num_steps", "ddpm_num_inference_steps", "train_batch_size",
                    "max_train_steps", "gradient_accumulation_steps", "logging_steps", "checkpointing_steps",
                    "num_validation_images", "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "validation_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "kd_eps", "ema_inv_gamma", "ema_power"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a positive finite number, got {v}")
        for name in ("lambda_sd", "lambda_kd_output", "lambda_kd_feat", "max_grad_norm", "adam_weight_decay",
                     "adam_epsilon"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v}")
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            v = getattr(self, name)
            if not 0 <= v < 1 and not (name == "ema_decay" and v == 1):
                raise ConfigError(f"{name} must be in [0, 1), got {v}")
        if self.snr_gamma is not None and not (self.snr_gamma > 0 and math.isfinite(self.snr_gamma)):
            raise ConfigError(f"snr_gamma must be a positive finite number (or null), got {self.snr_gamma}")
        if not (self.noise_offset >= 0 and math.isfinite(self.noise_offset)):
            raise ConfigError(f"noise_offset must be a finite number >= 0, got {self.noise_offset}")
        if not 0 <= self.cond_drop_prob <= 1:
            raise ConfigError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if not (self.guidance_scale >= 1 and math.isfinite(self.guidance_scale)):
            raise ConfigError(f"guidance_scale must be a finite number >= 1, got {self.guidance_scale}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be >= 1 (or null), got {self.max_train_samples}")
        if self.cast_teacher and self.teacher_dtype not in ("fp32", self.mixed_precision):
            raise ConfigError(f"cast_teacher casts the teacher to the compute dtype of mixed_precision="
                              f"{self.mixed_precision!r}, but teacher_dtype is {self.teacher_dtype!r}; drop one of "
                              "the two")
        if self.report_to.strip().lower() not in ("", "none"):
            from .distributed import parse_report_to  # accelerate's tracker names

            parse_report_to(self.report_to)
        if self.cache_latents and not self.center_crop:
            raise ConfigError("cache_latents needs center_crop: a random crop would be frozen into the cache")
        if self.student_arch is not None:
            parse_student_arch(self.student_arch)
        if self.student_arch is not None and (self.student_config is not None
                                              or self.student_model_name_or_path is not None):
            raise ConfigError("set only one of student_arch, student_config and student_model_name_or_path "
                              "(the student)")
        if self.student_init != "random":
            others = [k for k in ("student_config", "student_model_name_or_path") if getattr(self, k) is not None]
            if self.student_init == "prune" and self.student_arch is not None:
                others.append("student_arch")
            if others:
                raise ConfigError(f"student_init={self.student_init} makes the student from the teacher; unset "
                                  f"{' and '.join(others)} (or use student_init=random)")
            if self.pretrained_model_name_or_path is None and self.teacher_config is None:
                raise ConfigError(f"student_init={self.student_init} makes the student from the teacher: set "
                                  "pretrained_model_name_or_path (or teacher_config)")
        if not (0 <= self.pruning_ratio < 1):
            raise ConfigError(f"pruning_ratio must be in [0, 1) (the share of channels removed per layer), got "
                              f"{self.pruning_ratio}")
        if not 0 < self.student_width_mult <= 1:
            raise ConfigError(f"student_width_mult must be in (0, 1], got {self.student_width_mult}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2, got {self.group_size}")
        self._check_kd_shape()
        if not 1 <= self.kd_num_buckets <= self.ddpm_num_steps:
            raise ConfigError(f"kd_num_buckets must be between 1 and ddpm_num_steps ({self.ddpm_num_steps}): each "
                              f"bucket covers ddpm_num_steps / kd_num_buckets timesteps; got {self.kd_num_buckets}")
        if not 0 <= self.kd_bucket_ema < 1:
            raise ConfigError(f"kd_bucket_ema must be in [0, 1) (0: each bucket uses the batch alone), "
                              f"got {self.kd_bucket_ema}")
        for name in ("student_layers_per_block", "student_norm_num_groups", "checkpoints_total_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 (or null), got {v}")
        if self.pretrained_model_name_or_path is not None and self.teacher_config is not None:
            raise ConfigError("set only one of pretrained_model_name_or_path and teacher_config (the teacher)")
        if self.student_model_name_or_path is not None and self.student_config is not None:
            raise ConfigError("set only one of student_model_name_or_path and student_config (the student)")
        if self.lambda_sd == 0 and (self.kd_loss == "none" or self.lambda_kd_output == 0) and self.lambda_kd_feat == 0:
            raise ConfigError("every loss weight is zero: set lambda_sd, lambda_kd_output (with kd_loss != none) "
                              "or lambda_kd_feat above 0")
        if self.kd_loss == "none" and self.lambda_kd_feat == 0:
            pass  # plain training; a teacher is optional
        elif self.pretrained_model_name_or_path is None and self.teacher_config is None:
            raise ConfigError(f"kd_loss={self.kd_loss!r} needs a teacher: set pretrained_model_name_or_path "
                              "(a model folder) or teacher_config")
        self._check_transformer_keys()
        self._check_output_dir()
        return self

    def _check_transformer_keys(self) -> None:
        if not (self.logit_std > 0 and math.isfinite(self.logit_std)):
            raise ConfigError(f"logit_std must be a positive finite number, got {self.logit_std}")
        for name in ("logit_mean", "mode_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)}")
        if not (self.flow_shift > 0 and math.isfinite(self.flow_shift)):
            raise ConfigError(f"flow_shift must be a positive finite number, got {self.flow_shift}")
        if self.objective == "flow" and self.prediction_type != "epsilon":
            raise ConfigError(f"objective=flow predicts the velocity noise - x_0; prediction_type="
                              f"{self.prediction_type!r} is a DDPM setting: leave it at epsilon or use objective=ddpm")
        if self.objective == "flow" and self.snr_gamma is not None:
            raise ConfigError("snr_gamma (min-SNR weighting) is a DDPM weighting; with objective=flow use "
                              "weighting_scheme (sigma_sqrt, cosmap) instead")
        if self.layer_score_batches < 1:
            raise ConfigError(f"layer_score_batches must be >= 1, got {self.layer_score_batches}")
        if self.max_sequence_length < 1:
            raise ConfigError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")
        if self.student_depth is not None:
            if self.student_depth < 1:
                raise ConfigError(f"student_depth must be >= 1 (the transformer blocks the student keeps), "
                                  f"got {self.student_depth}")
            if any(v is not None for v in (self.student_arch, self.student_config, self.student_model_name_or_path)):
                raise ConfigError("set only one of student_depth, student_arch, student_config and "
                                  "student_model_name_or_path (the student)")
        parse_layer_selection(self.layer_selection, self.student_depth)

    def _check_kd_shape(self) -> None:
        """group_size against the rows the KD loss sees: one channel of a resolution x resolution
        sample, N = resolution**2 elements (the trainer feeds every model that sample size)."""
        if self.kd_loss == "none" or self.grouping == "global":
            return
        n, r = self.resolution ** 2, self.resolution
        if self.group_size > n:
            raise ConfigError(f"group_size={self.group_size} is larger than a row of the model output: one channel "
                              f"of a {r}x{r} sample (resolution={r}) has {n} elements; set group_size <= {n}, "
                              "raise resolution, or use kd_grouping=global")
        if self.grouping == "patch":
            p = math.isqrt(self.group_size)
            if p * p != self.group_size:
                raise ConfigError(f"kd_grouping=patch tiles p x p patches: group_size must be a perfect square "
                                  f"(4, 9, 16, 64, ...), got {self.group_size}")
            if r % p:
                raise ConfigError(f"kd_grouping=patch with group_size={self.group_size} tiles {p}x{p} patches: "
                                  f"resolution must be a multiple of {p}, got {r}")

    def _check_output_dir(self) -> None:
        out = Path(self.output_dir)
        for p in (out, *out.parents):
            if p.exists() or p.is_symlink():
                if not p.is_dir():
                    where = "" if p == out else f" ({str(p)!r} is in its path)"
                    raise ConfigError(f"output_dir {self.output_dir!r} cannot be a folder: {str(p)!r} exists and is "
                                      f"not a folder{where}; choose another output_dir")
                return


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# --- type handling -------------------------------------------------------------------------

_KINDS: dict | None = None


def _field_kinds() -> dict:
    """``{name: (base, optional)}`` with base one of int, float, str, bool, 'model_config'."""
    global _KINDS
    if _KINDS is None:
        hints = typing.get_type_hints(TrainConfig)
        kinds = {}
        for f in dataclasses.fields(TrainConfig):
            args = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            optional = type(None) in args
            args.discard(type(None))
            if dict in args:
                base = "model_config"
            elif any(typing.get_origin(a) is list for a in args):
                base = "str_list"
            else:
                base = next(iter(args))
            kinds[f.name] = (base, optional)
        _KINDS = kinds
    return _KINDS


def _type_name(base) -> str:
    names = {"model_config": "a mapping or a JSON file path", "str_list": "a list of strings"}
    return names[base] if isinstance(base, str) else getattr(base, "__name__", str(base))


def _check_type(key: str, value, kind, source: str):
    base, optional = kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: key {key!r} must be {_type_name(base)}, got null")
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif base is str:
        ok = isinstance(value, str)
    elif base == "model_config":
        ok = isinstance(value, (dict, str))
    elif base == "str_list":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"{source}: key {key!r} must be {_type_name(base)}{' or null' if optional else ''}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _coerce(key: str, value, source: str):
    """Check one value from a YAML file or a keyword argument; ints are accepted for floats."""
    base, optional = _field_kinds()[key]
    # PyYAML reads 1e-4 (no dot) as a string; accept numeric strings for float keys.
    if base is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    _check_type(key, value, (base, optional), source)
    if base is float and value is not None:
        value = float(value)
    return value


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


CUSTOM_ARCH_EXAMPLE = "custom:down=1,1,1,1;mid=0"


def parse_student_arch(value: str) -> dict | None:
    """``None`` for a preset (bk_base, bk_small, bk_tiny); for ``custom:down=D1,...,DK;mid=0|1``
    (optional ``;up=U1,...,UK``, which must equal ``D(K+1-i)+1``) ``{"down": [...], "mid": bool}``.
    Checks the syntax only; :func:`liftplace.train.bk.student_plan` checks it against the teacher."""
    if value in STUDENT_ARCHS:
        return None
    if not isinstance(value, str) or not value.startswith("custom:"):
        raise ConfigError(f"student_arch must be bk_base, bk_small, bk_tiny or a custom spec such as "
                          f"{CUSTOM_ARCH_EXAMPLE!r}; got {value!r}" + _suggest(str(value), STUDENT_ARCHS))
    parts, body = {}, value[len("custom:"):]
    for item in (p.strip() for p in body.split(";")):
        if not item:
            continue
        key, eq, val = (x.strip() for x in item.partition("="))
        if not eq or key not in ("down", "up", "mid"):
            raise ConfigError(f"student_arch={value!r}: {item!r} is not down=..., up=... or mid=...; "
                              f"write e.g. {CUSTOM_ARCH_EXAMPLE!r}")
        if key in parts:
            raise ConfigError(f"student_arch={value!r}: {key} is given twice; give it once")
        parts[key] = val
    if "down" not in parts:
        raise ConfigError(f"student_arch={value!r}: down=... (the layers kept per down stage, outer first, one "
                          f"count per stage kept) is required; e.g. {CUSTOM_ARCH_EXAMPLE!r}")

    def counts(key):
        try:
            out = [int(x) for x in parts[key].split(",")]
        except ValueError:
            raise ConfigError(f"student_arch={value!r}: {key}={parts[key]!r} must be a comma list of integers, "
                              f"one per stage, e.g. {key}=1,1,1,1") from None
        if any(c < 1 for c in out):
            raise ConfigError(f"student_arch={value!r}: {key}={parts[key]!r}: every count must be >= 1 (a stage "
                              f"keeps at least one resnet; drop the innermost stages by giving fewer counts)")
        return out

    down = counts("down")
    if "up" in parts:
        up = counts("up")
        want = [d + 1 for d in reversed(down)]
        if up != want:
            raise ConfigError(f"student_arch={value!r}: up={parts['up']!r} must be {','.join(map(str, want))}: "
                              f"diffusers' UNet2DConditionModel gives up stage i (innermost first) one layer more "
                              f"than the mirrored down stage, which it takes the skip connections of; fix up= or "
                              f"leave it out")
    mid = parts.get("mid", "1")
    if mid not in ("0", "1"):
        raise ConfigError(f"student_arch={value!r}: mid={mid!r} must be 1 (keep the mid block) or 0 (remove it)")
    return {"down": down, "mid": mid == "1"}


def parse_layer_selection(value: str, depth: int | None = None):
    """``("uniform"|"first"|"score", None)`` or ``("list", [i, ...])``; checks the syntax and, for a
    list, that it names ``depth`` distinct blocks in increasing order (the teacher's range is
    checked when the teacher is known)."""
    if value in ("uniform", "first", "score"):
        return value, None
    if not isinstance(value, str) or not value.startswith("list:"):
        raise ConfigError(f"layer_selection must be uniform, first, score or list:I,J,... (teacher block indices, "
                          f"e.g. list:0,2,5); got {value!r}" + _suggest(str(value), ("uniform", "first", "score")))
    try:
        idx = [int(x) for x in value[len("list:"):].split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"layer_selection={value!r}: list: takes comma-separated integers, e.g. list:0,2,5") from None
    if not idx or any(i < 0 for i in idx) or idx != sorted(set(idx)):
        raise ConfigError(f"layer_selection={value!r}: the block indices must be distinct, >= 0 and increasing "
                          "(the student keeps the teacher's order)")
    if depth is not None and len(idx) != depth:
        raise ConfigError(f"layer_selection={value!r} names {len(idx)} blocks but student_depth={depth}; give "
                          f"{depth} indices or change student_depth")
    return "list", idx


def _coerce_mapping(mapping: dict, source: str) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in mapping.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key {key!r}" + _suggest(str(key), names))
        out[key] = _coerce(key, value, source)
    return out


def load_yaml(path) -> dict:
    """Read a flat YAML mapping of config keys; errors name the file and key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return _coerce_mapping(data, str(path))


def build_config(yaml_path=None, overrides: dict | None = None, base: dict | None = None) -> TrainConfig:
    """defaults < ``base`` (a caller's defaults) < YAML file < ``overrides``; validated."""
    merged = TrainConfig().to_dict()
    if base:
        merged.update(_coerce_mapping(base, "defaults"))
    explicit = {}
    if yaml_path is not None:
        explicit.update(load_yaml(yaml_path))
    if overrides:
        explicit.update(_coerce_mapping(overrides, "command line"))
    preset = explicit.get("preset", merged["preset"])
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(map(repr, PRESETS))}; got {preset!r}")
        merged.update(PRESETS[preset])
    merged.update(explicit)
    cfg = TrainConfig(**merged)
    cfg.validate()
    return cfg


def load_model_config(value, what: str) -> dict:
    """A model config given as a dict or a JSON/YAML file path -> dict."""
    if isinstance(value, dict):
        return dict(value)
    path = Path(value)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{what}: {str(value)!r} is neither a mapping nor an existing JSON/YAML file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - report any parse error with the file name
        raise ConfigError(f"{what}: cannot parse {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def validate_against_model(cfg: TrainConfig, model_config: dict, what: str, resolution: int | None = None) -> None:
    """Check ``cfg`` against one model's config (its ``config.json`` as a dict) before the model is
    built; ``what`` names where the model comes from (a config key). Raises :class:`ConfigError`."""
    down = model_config.get("down_block_types")
    if isinstance(down, (list, tuple)) and len(down) > 1:
        factor = 2 ** (len(down) - 1)
        r = resolution or cfg.resolution
        if r % factor:
            lower, upper = max(factor, r // factor * factor), (r // factor + 1) * factor
            raise ConfigError(f"resolution={r} does not fit {what}: its {len(down)} down blocks "
                              f"(down_block_types) halve the sample {len(down) - 1} times, so resolution must be a "
                              f"multiple of {factor}; use resolution {lower} or {upper}")


def validate_models(cfg: TrainConfig, role: str = "student", *, teacher=None, student=None,
                    resolution: int | None = None) -> None:
    """:func:`validate_against_model` for every model the run will build or load, from the configs
    alone (``config.json`` of a model folder, ``teacher_config`` / ``student_config``), before any
    model is instantiated. ``teacher`` / ``student``: models passed in directly (their ``.config``).
    ``role="teacher"`` (train-teacher): the model trained is ``student`` or the teacher keys.
    ``resolution``: the size the models see (the latent size for latent models; default ``cfg.resolution``)."""
    from .models import read_config, resolve_model_dir  # models imports this module

    def from_keys(module, name: str, path_key: str, config_key: str):
        if module is not None:
            return f"the {name} passed to Trainer", dict(module.config)
        path = getattr(cfg, path_key)
        if path is not None:
            return f"the model in {path_key} ({str(path)!r})", read_config(resolve_model_dir(path))
        if getattr(cfg, config_key) is not None:
            return f"the model of {config_key}", load_model_config(getattr(cfg, config_key), config_key)
        return None

    if role == "teacher":
        sources = [from_keys(student, "model", "pretrained_model_name_or_path", "teacher_config")]
    else:  # a derived student keeps the teacher's down blocks
        sources = [from_keys(teacher, "teacher", "pretrained_model_name_or_path", "teacher_config"),
                   from_keys(student, "student", "student_model_name_or_path", "student_config")]
    for source in sources:
        if source is not None:
            validate_against_model(cfg, source[1], source[0], resolution)


# --- command line ----------------------------------------------------------------------------

_GROUP_TITLES = {
    "model": "teacher and student models",
    "data": "data",
    "schedule": "noise schedule and prediction type",
    "train": "optimisation",
    "kd": "distillation (LIFT/PLACE)",
    "log": "logging, validation and checkpoints",
}

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")
_NONE = ("none", "null")


def _cli_parser(key: str):
    base, optional = _field_kinds()[key]

    def parse(text: str):
        low = text.lower()
        if optional and low in _NONE:
            return None
        if base is bool:
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if base is int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if base is float:
            try:
                return float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if base == "model_config":
            stripped = text.strip()
            if stripped.startswith("{"):
                try:
                    return json.loads(stripped)
                except json.JSONDecodeError as exc:
                    raise argparse.ArgumentTypeError(f"invalid JSON: {exc}") from None
            return text
        return text

    parse.__name__ = _type_name(base)
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, *, skip=(), defaults: dict | None = None) -> None:
    """One ``--key`` flag per config field, grouped; values left unset do not override the file."""
    defaults = dict(defaults or {})
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        gname = f.metadata["group"]
        if gname not in groups:
            groups[gname] = parser.add_argument_group(_GROUP_TITLES[gname])
        base, optional = _field_kinds()[f.name]
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        text = f.metadata["help"]
        choices = f.metadata.get("choices")
        if choices:
            text += f" Choices: {', '.join(choices)}."
        text += f" Default: {default!r}." if not isinstance(default, str) else f" Default: {default}."
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, type=_cli_parser(f.name), help=text)
        if base is bool:
            kwargs.update(nargs="?", const=True, metavar="{true,false}" + (",none" if optional else ""))
        elif base == "str_list":
            kwargs.update(nargs="+", type=str, metavar="TEXT")
        elif choices:
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
        else:
            kwargs["metavar"] = f.name.upper()
        groups[gname].add_argument(f"--{f.name}", **kwargs)


def check_unknown_flags(unknown: list[str]) -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for item in unknown:
        if item.startswith("--"):
            key = item[2:].split("=", 1)[0]
            raise ConfigError(f"unknown option --{key}" + _suggest(key, names))
    if unknown:
        raise ConfigError(f"unexpected arguments: {' '.join(unknown)}")


TABLE_START = "<!-- config-table:start: generated by `python -m liftplace.train.config_doc --update-doc FILE` -->"
TABLE_END = "<!-- config-table:end -->"


def config_help_table() -> str:
    """Markdown table of every key, its default and help (docs/TRAINER.md holds it between
    :data:`TABLE_START` and :data:`TABLE_END`; a test keeps the two equal)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata["help"]
        if f.metadata.get("choices"):
            text += f" ({' / '.join(f.metadata['choices'])})"
        text = text.replace("|", "\\|")  # a literal | would open a new cell
        lines.append(f"| `{f.name}` | `{default!r}` | {text} |")
    return "\n".join(lines)


def update_doc(path) -> bool:
    """Replace the table between the markers in ``path``; returns whether the file changed."""
    path = Path(path)
    text = path.read_text()
    if text.count(TABLE_START) != 1 or text.count(TABLE_END) != 1 or text.index(TABLE_START) > text.index(TABLE_END):
        raise ConfigError(f"{path} must hold one {TABLE_START!r} line and, after it, one {TABLE_END!r} line")
    head, rest = text.split(TABLE_START)
    tail = rest.split(TABLE_END)[1]
    new = f"{head}{TABLE_START}\n{config_help_table()}\n{TABLE_END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text
