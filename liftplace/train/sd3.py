"""SD3 (MMDiT) conditioning: prompt embeddings from local CLIP-L/G (+ optional T5) or a cache.

As diffusers' ``StableDiffusion3Pipeline.encode_prompt``: each CLIP text encoder
(``CLIPTextModelWithProjection``) gives its penultimate hidden states and its projected
pooled output; the two hidden states are concatenated on the feature axis, zero-padded to
``joint_attention_dim`` and followed on the token axis by the T5 embeddings
(``text_encoder_3``), or, without T5 (SD3 allows dropping it), by ``max_sequence_length``
zero tokens. ``pooled_projections`` is the two pooled outputs concatenated.

Sources: ``text_encoder_path`` (a folder with ``text_encoder/``, ``tokenizer/``,
``text_encoder_2/``, ``tokenizer_2/`` and, with ``use_t5``, ``text_encoder_3/``,
``tokenizer_3/``; default: the teacher's pipeline folder), or ``prompt_embeds_path``: a
folder written by :func:`cache_prompt_embeddings` (``prompt_embeds.safetensors`` +
``captions.json``) so no text encoder is loaded during training. Models run in pixel space,
or on VAE latents when ``pretrained_vae_model_name_or_path`` is set (scaled and shifted by the
VAE's ``scaling_factor`` / ``shift_factor``, as SD3). The empty prompt is the null condition
of classifier-free guidance (``cond_drop_prob``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ConfigError

CACHE_WEIGHTS, CACHE_CAPTIONS = "prompt_embeds.safetensors", "captions.json"


def drop_prompts(cond: dict, generator, prob: float) -> dict:
    """The sd3 family drops captions before encoding (:meth:`SD3Encoders.encode_batch`); nothing here."""
    return cond


class SD3Encoders:
    """Frozen text encoders (or cached embeddings) and an optional VAE for the ``sd3`` family."""

    def __init__(self, *, clips=(), t5=None, cached: dict | None = None, joint_attention_dim: int,
                 max_sequence_length: int = 77, vae: nn.Module | None = None, pixel_channels: int = 3,
                 cond_drop_prob: float = 0.0, sample_mode: str = "sample", device=None, dtype=torch.float32):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.clips = [(enc.to(self.device).eval().requires_grad_(False), tok) for enc, tok in clips]
        self.t5 = None if t5 is None else (t5[0].to(self.device).eval().requires_grad_(False), t5[1])
        self.cached = cached
        self.joint_attention_dim = int(joint_attention_dim)
        self.max_sequence_length = int(max_sequence_length)
        self.vae = None if vae is None else vae.to(self.device).eval().requires_grad_(False)
        self.pixel_channels = int(vae.config.in_channels) if vae is not None else int(pixel_channels)
        self.cond_drop_prob = float(cond_drop_prob)
        self.sample_mode = sample_mode
        self.cache = None  # no latent cache for sd3 (cache_latents is refused)
        self.source_folders: dict[str, Path] = {}

    # --- prompts -------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, prompts: list[str]) -> dict:
        """``{"encoder_hidden_states": [B, S, joint_attention_dim], "pooled_projections": [B, P]}``."""
        prompts = list(prompts)
        if self.cached is not None:
            index = self.cached["index"]
            missing = [p for p in dict.fromkeys(prompts) if p not in index]
            if missing:
                raise ConfigError(f"prompt_embeds_path: no cached embedding for {missing[:3]!r}; re-run "
                                  "cache_prompt_embeddings with every training caption and the empty prompt")
            ids = torch.tensor([index[p] for p in prompts])
            return {"encoder_hidden_states": self.cached["encoder_hidden_states"][ids].to(self.device),
                    "pooled_projections": self.cached["pooled_projections"][ids].to(self.device)}
        hidden, pooled = [], []
        for enc, tok in self.clips:
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            pooled.append(out.text_embeds.float())
            hidden.append(out.hidden_states[-2].float())
        clip = torch.cat(hidden, dim=-1)
        if clip.shape[-1] > self.joint_attention_dim:
            raise ConfigError(f"the CLIP hidden sizes add up to {clip.shape[-1]}, more than the model's "
                              f"joint_attention_dim={self.joint_attention_dim}")
        clip = nn.functional.pad(clip, (0, self.joint_attention_dim - clip.shape[-1]))
        if self.t5 is not None:
            enc, tok = self.t5
            ids = tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            t5 = enc(ids)[0].float()
            if t5.shape[-1] != self.joint_attention_dim:
                raise ConfigError(f"the T5 hidden size {t5.shape[-1]} must equal joint_attention_dim "
                                  f"{self.joint_attention_dim}")
        else:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim)
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def drop_captions(self, captions: list[str], generator: torch.Generator) -> list[str]:
        if self.cond_drop_prob <= 0:
            return list(captions)
        coins = torch.rand(len(captions), generator=generator)
        return ["" if float(c) < self.cond_drop_prob else cap for c, cap in zip(coins, captions)]

    # --- images ---------------------------------------------------------------------------------
    def latents(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.vae is None:
            return pixels.float()
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
            z = dist.mean if self.sample_mode == "mean" else dist.sample(generator=generator)
        shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        return ((z - shift) * float(self.vae.config.scaling_factor)).float()

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        with torch.no_grad():
            z = latents.to(self.device, self.dtype) / float(self.vae.config.scaling_factor) + shift
            return self.vae.decode(z).sample.float().clamp(-1, 1)

    def encode_batch(self, pixels: Tensor, batch: dict, generator: torch.Generator, flips=None):
        if "caption" not in batch:
            raise ConfigError("sd3 needs captions: use a train_data_dir with metadata.jsonl or metadata.csv; the "
                              "dataset's items have only " + ", ".join(batch))
        captions = self.drop_captions(list(batch["caption"]), generator)
        return self.latents(pixels, generator), self.embed(captions)

    def pipeline(self, model: nn.Module, scheduler, dtype=torch.float32):
        return _SD3Export(model, scheduler, self)


class _SD3Export:
    """What an sd3 run exports: the model and its scheduler_config.json in the folder itself
    (``from_pretrained`` reads it), and the text encoders / VAE it was trained with beside them."""

    def __init__(self, model, scheduler, encoders: SD3Encoders):
        self.model, self.scheduler, self.encoders = model, scheduler, encoders

    def save_pretrained(self, folder, safe_serialization=True):
        folder = Path(folder)
        self.model.save_pretrained(str(folder), safe_serialization=True)
        self.scheduler.save_pretrained(str(folder))
        for name, src in self.encoders.source_folders.items():
            if src.is_dir():
                shutil.copytree(src, folder / name)


def cache_prompt_embeddings(encoders: SD3Encoders, captions, folder) -> Path:
    """Write the embeddings of ``captions`` (and of the empty prompt) for ``prompt_embeds_path``."""
    from safetensors.torch import save_file

    captions = list(dict.fromkeys(["", *captions]))
    emb = encoders.embed(captions)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CACHE_WEIGHTS}.{os.getpid()}.tmp"
    save_file({k: v.contiguous().cpu() for k, v in emb.items()}, str(tmp))
    os.replace(tmp, folder / CACHE_WEIGHTS)
    (folder / CACHE_CAPTIONS).write_text(json.dumps(captions))
    return folder


def load_prompt_cache(folder) -> dict:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CACHE_WEIGHTS).is_file() or not (folder / CACHE_CAPTIONS).is_file():
        raise ConfigError(f"prompt_embeds_path={str(folder)!r} must hold {CACHE_WEIGHTS} and {CACHE_CAPTIONS} "
                          "(written by liftplace.train.sd3.cache_prompt_embeddings)")
    tensors = load_file(str(folder / CACHE_WEIGHTS))
    captions = json.loads((folder / CACHE_CAPTIONS).read_text())
    return {**tensors, "index": {c: i for i, c in enumerate(captions)}}


def load_clip_pair(folder: Path, enc_name: str, tok_name: str):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    try:
        enc = CLIPTextModelWithProjection.from_pretrained(str(folder / enc_name), local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(str(folder / tok_name), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - name the folder whatever transformers raised
        raise ConfigError(f"cannot load CLIPTextModelWithProjection / CLIPTokenizer from {str(folder / enc_name)!r} "
                          f"and {str(folder / tok_name)!r}: {exc}") from exc
    return enc, tok


def load_t5(folder: Path):
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        return (T5EncoderModel.from_pretrained(str(folder / "text_encoder_3"), local_files_only=True),
                AutoTokenizer.from_pretrained(str(folder / "tokenizer_3"), local_files_only=True))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"use_t5: cannot load T5EncoderModel / tokenizer from {str(folder)!r} (text_encoder_3/, "
                          f"tokenizer_3/): {exc}; set use_t5 false to drop T5") from exc


def _teacher_config(cfg) -> dict:
    from .config import load_model_config
    from .models import read_config, resolve_model_dir

    if cfg.pretrained_model_name_or_path is not None:
        return read_config(resolve_model_dir(cfg.pretrained_model_name_or_path))
    if cfg.teacher_config is not None:
        return load_model_config(cfg.teacher_config, "teacher_config")
    raise ConfigError("sd3 needs the teacher (pretrained_model_name_or_path or teacher_config) to size the prompt "
                      "embeddings (joint_attention_dim)")


def build_sd3_encoders(cfg, device, dtype=torch.float32) -> SD3Encoders:
    from .latent import load_vae, pipeline_folder_of

    if cfg.cache_latents:
        raise ConfigError("cache_latents is not supported for sd3 yet; leave it off")
    tcfg = _teacher_config(cfg)
    joint = int(tcfg.get("joint_attention_dim", 4096))
    vae = load_vae(cfg.pretrained_vae_model_name_or_path) if cfg.pretrained_vae_model_name_or_path else None
    common = dict(joint_attention_dim=joint, max_sequence_length=cfg.max_sequence_length, vae=vae,
                  pixel_channels=int(tcfg.get("in_channels", 16)), cond_drop_prob=cfg.cond_drop_prob,
                  sample_mode=cfg.vae_sample_mode, device=device, dtype=dtype)
    if cfg.prompt_embeds_path is not None:
        enc = SD3Encoders(cached=load_prompt_cache(cfg.prompt_embeds_path), **common)
    else:
        folder = cfg.text_encoder_path or pipeline_folder_of(cfg.pretrained_model_name_or_path)
        if folder is None or not Path(folder).is_dir():
            raise ConfigError("sd3 needs prompt embeddings: set text_encoder_path (a folder with text_encoder/, "
                              "tokenizer/, text_encoder_2/, tokenizer_2/) or prompt_embeds_path (cached embeddings)")
        folder = Path(folder)
        clips = [load_clip_pair(folder, "text_encoder", "tokenizer"),
                 load_clip_pair(folder, "text_encoder_2", "tokenizer_2")]
        t5 = load_t5(folder) if cfg.use_t5 else None
        enc = SD3Encoders(clips=clips, t5=t5, **common)
        names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        names += ["text_encoder_3", "tokenizer_3"] if cfg.use_t5 else []
        enc.source_folders = {n: folder / n for n in names}
    if vae is not None:
        from .latent import _sub

        enc.source_folders["vae"] = _sub(Path(cfg.pretrained_vae_model_name_or_path), "vae")
    return enc


def sd3_model_resolution(cfg) -> int:
    if cfg.pretrained_vae_model_name_or_path is None:
        return cfg.resolution
    from .latent import _sub

    path = _sub(Path(cfg.pretrained_vae_model_name_or_path), "vae") / "config.json"
    try:
        factor = 2 ** (len(json.loads(path.read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"pretrained_vae_model_name_or_path: cannot read block_out_channels from {str(path)!r}: "
                          f"{exc}") from exc
    if cfg.resolution % factor:
        raise ConfigError(f"resolution={cfg.resolution} must be a multiple of the VAE's downsampling factor {factor}")
    return cfg.resolution // factor
