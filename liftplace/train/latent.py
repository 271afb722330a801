"""The frozen encoders of latent text-to-image distillation (Stable Diffusion, BK-SDM).

Images become VAE latents, ``(z - shift_factor) * scaling_factor`` with ``z`` a sample of the
VAE's posterior (or its mean), and captions become CLIP prompt embeddings, the
``encoder_hidden_states`` a ``UNet2DConditionModel`` takes. Every random draw (the
posterior sample, the classifier-free-guidance caption dropout) comes from the step's
generator, so a resumed run encodes exactly as the uninterrupted one. Nothing here trains.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ConfigError, TrainConfig
from .models import BUILTIN_PREFIX

PIPELINE_INDEX = "model_index.json"


class TextToImageEncoders:
    """A frozen ``AutoencoderKL`` + ``CLIPTextModel`` + ``CLIPTokenizer``."""

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, tokenizer, *, sample_mode: str = "sample",
                 cond_drop_prob: float = 0.0, device=None, dtype=torch.float32, cache_prompts: bool = False):
        if sample_mode not in ("sample", "mean"):
            raise ValueError(f"sample_mode must be 'sample' or 'mean', got {sample_mode!r}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        # cast only when needed: diffusers warns about casting a VAE with .to(dtype)
        self.vae, self.text_encoder = (m.to(self.device) if dtype == torch.float32 else m.to(self.device, dtype)
                                       for m in (vae, text_encoder))
        for m in (self.vae, self.text_encoder):
            m.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.sample_mode = sample_mode
        self.cond_drop_prob = float(cond_drop_prob)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.pixel_channels = int(vae.config.in_channels)
        self.cache: Tensor | None = None  # [N, flips, 2c, h, w] posterior parameters (use_cache)
        self.prompt_cache: dict[str, Tensor] | None = {} if cache_prompts else None

    @torch.no_grad()
    def posterior(self, pixels: Tensor) -> Tensor:
        """The VAE posterior's parameters (mean and log-variance stacked on channels) ``[B, 2c, h, w]``."""
        return self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.parameters

    def latents_from_posterior(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(params.to(self.device, self.dtype))
        z = dist.sample(generator=generator) if self.sample_mode == "sample" else dist.mean
        return (z.float() - self.shift_factor) * self.scaling_factor

    def latents(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``pixels`` ``[B, C, H, W]`` in [-1, 1] -> scaled latents ``[B, c, H/f, W/f]`` (float32)."""
        return self.latents_from_posterior(self.posterior(pixels), generator)

    def vae_hash(self) -> str:
        """sha256 of the VAE's config and weights: what a latent cache was made with."""
        h = hashlib.sha256(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        for name, t in self.vae.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def use_cache(self, dataset, folder, *, flips: bool, log, main_process: bool = True, wait=lambda: None,
                  batch_size: int = 16) -> None:
        """Load the posteriors of every item of ``dataset`` (and of its mirror image when ``flips``)
        from ``folder``, encoding and writing them first when the cache is missing or its
        manifest (VAE hash, data, resolution, flips) differs."""
        folder = Path(folder)
        key = {"vae_sha256": self.vae_hash(), "data_sha256": _data_hash(dataset), "flips": bool(flips),
               "dtype": str(self.dtype)}
        manifest, weights = folder / "manifest.json", folder / "posteriors.safetensors"
        if main_process:
            old = json.loads(manifest.read_text()) if manifest.is_file() else None
            if old != key or not weights.is_file():
                if old is not None:
                    log.warning(f"latent cache {folder} was made with another VAE or data "
                                f"({', '.join(k for k in key if old.get(k) != key[k])} differ); re-encoding")
                self._write_cache(dataset, folder, key, flips, batch_size)
                log.info(f"latent cache: encoded {len(dataset)} images into {weights}")
        wait()
        from safetensors.torch import load_file

        self.cache = load_file(str(weights))["posteriors"]

    def _write_cache(self, dataset, folder: Path, key: dict, flips: bool, batch_size: int) -> None:
        from safetensors.torch import save_file

        out = []
        for start in range(0, len(dataset), batch_size):
            pixels = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(len(dataset), start + batch_size))])
            views = [pixels, pixels.flip(-1)] if flips else [pixels]
            out.append(torch.stack([self.posterior(v).cpu() for v in views], dim=1))
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "posteriors.safetensors.tmp"
        save_file({"posteriors": torch.cat(out).contiguous()}, str(tmp))
        tmp.replace(folder / "posteriors.safetensors")
        (folder / "manifest.json.tmp").write_text(json.dumps(key, indent=1))
        (folder / "manifest.json.tmp").replace(folder / "manifest.json")

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] (float32)."""
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> Tensor:
        """Prompt embeddings ``[B, L, D]`` (float32), padded to the tokenizer's ``model_max_length``;
        with ``cache_prompts``, each distinct prompt is encoded once and kept in memory."""
        if self.prompt_cache is None:
            return self._encode_prompts(list(prompts))
        missing = list(dict.fromkeys(p for p in prompts if p not in self.prompt_cache))
        if missing:
            self.prompt_cache.update(zip(missing, self._encode_prompts(missing)))
        return torch.stack([self.prompt_cache[p] for p in prompts])

    def _encode_prompts(self, prompts: list[str]) -> Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device), return_dict=False)[0].float()

    def drop_captions(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """Each caption replaced by the empty prompt with probability ``cond_drop_prob`` (coins
        from ``generator``; none drawn when it is 0), as diffusers' ``proportion_empty_prompts``."""
        if self.cond_drop_prob <= 0:
            return list(captions)
        coins = torch.rand(len(captions), generator=generator)
        return ["" if float(c) < self.cond_drop_prob else cap for c, cap in zip(coins, captions)]

    def encode_batch(self, pixels: Tensor, batch: dict, generator: torch.Generator,
                     flips: Tensor | None = None) -> tuple[Tensor, dict]:
        """``(latents, {"encoder_hidden_states": ...})`` for a batch with ``caption`` strings; with a
        cache, the latents come from the cached posteriors of ``batch["index"]`` (mirrored where
        ``flips``) and ``pixels`` is not read."""
        if "caption" not in batch:
            raise ConfigError("unet2d_condition needs captions: the dataset's items have no 'caption' (use a "
                              "train_data_dir with metadata.jsonl or metadata.csv); items have only "
                              + ", ".join(batch))
        if self.cache is not None:
            index = torch.as_tensor(batch["index"])
            view = flips.long() if flips is not None else torch.zeros_like(index)
            latents = self.latents_from_posterior(self.cache[index, view], generator)
        else:
            latents = self.latents(pixels, generator)
        captions = self.drop_captions(list(batch["caption"]), generator)
        return latents, {"encoder_hidden_states": self.embed(captions)}

    def pipeline(self, unet: nn.Module, scheduler, dtype=torch.float32):
        """A CPU ``StableDiffusionPipeline`` of copies of these encoders and ``unet`` (no safety checker)."""
        from diffusers import StableDiffusionPipeline

        vae, text_encoder = (copy.deepcopy(m).to("cpu") for m in (self.vae, self.text_encoder))
        if dtype != torch.float32:
            vae, text_encoder = vae.to(dtype=dtype), text_encoder.to(dtype=dtype)
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=self.tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


def _data_hash(dataset) -> str:
    """sha256 of what a dataset's pixels depend on: its files (name, size, mtime) and resolution."""
    h = hashlib.sha256(repr((type(dataset).__name__, getattr(dataset, "resolution", None),
                             getattr(dataset, "channels", None), getattr(dataset, "center_crop", None))).encode())
    for f in getattr(dataset, "files", ()):
        st = Path(f).stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(str(len(dataset)).encode())
    return h.hexdigest()


def pipeline_folder_of(path) -> Path | None:
    """The pipeline folder a teacher path belongs to: the path itself (``model_index.json`` or
    ``vae/`` in it) or, for its ``unet/`` subfolder, the parent."""
    if path is None or str(path).startswith(BUILTIN_PREFIX):
        return None
    p = Path(path)
    for cand in (p, p.parent):
        if (cand / PIPELINE_INDEX).is_file() or (cand / "vae").is_dir():
            return cand
    return None


def _sub(folder: Path, name: str) -> Path:
    return folder / name if (folder / name).is_dir() else folder


def load_vae(path) -> nn.Module:
    from diffusers import AutoencoderKL

    folder = _sub(Path(path), "vae")
    try:
        return AutoencoderKL.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - name the folder whatever diffusers raised
        raise ConfigError(f"cannot load the AutoencoderKL in {str(folder)!r}: {exc}") from exc


def load_text_encoder(path):
    """``(CLIPTextModel, CLIPTokenizer)`` from ``path/text_encoder`` + ``path/tokenizer`` (or ``path``)."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as exc:
        raise ConfigError("unet2d_condition needs transformers: pip install 'liftplace[train]'") from exc
    folder = Path(path)
    enc_dir, tok_dir = _sub(folder, "text_encoder"), _sub(folder, "tokenizer")
    try:
        encoder = CLIPTextModel.from_pretrained(str(enc_dir), local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot load the CLIP text encoder / tokenizer from {str(folder)!r} (text_encoder/ and "
                          f"tokenizer/): {exc}") from exc
    return encoder, tokenizer


def encoder_folders(cfg: TrainConfig) -> tuple[Path, Path]:
    """``(VAE folder, text encoder folder)``: ``pretrained_vae_model_name_or_path`` and
    ``text_encoder_path``, each defaulting to the teacher's pipeline folder."""
    pipe = pipeline_folder_of(cfg.pretrained_model_name_or_path)
    out = []
    for key in ("pretrained_vae_model_name_or_path", "text_encoder_path"):
        value = getattr(cfg, key) or pipe
        if value is None:
            raise ConfigError(f"unet2d_condition needs {key}: the teacher ({cfg.pretrained_model_name_or_path!r}) "
                              "is not in a diffusers pipeline folder (model_index.json, vae/, text_encoder/, "
                              f"tokenizer/) to take it from; set --{key}")
        if not Path(value).is_dir():
            raise ConfigError(f"{key}: folder {str(value)!r} does not exist (only local folders; nothing is "
                              "downloaded)")
        out.append(Path(value))
    return out[0], out[1]


def latent_factor(cfg: TrainConfig) -> int:
    """How much the VAE shrinks an image side, from its config alone (before anything is loaded)."""
    path = _sub(encoder_folders(cfg)[0], "vae") / "config.json"
    try:
        return 2 ** (len(json.loads(path.read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the VAE's block_out_channels from {str(path)!r}: {exc}") from exc


def build_encoders(cfg: TrainConfig, device, dtype=torch.float32) -> TextToImageEncoders:
    """The frozen VAE and text encoder of :func:`encoder_folders`."""
    vae_path, text_path = encoder_folders(cfg)
    encoder, tokenizer = load_text_encoder(text_path)
    return TextToImageEncoders(load_vae(vae_path), encoder, tokenizer, sample_mode=cfg.vae_sample_mode,
                               cond_drop_prob=cfg.cond_drop_prob, device=device, dtype=dtype,
                               cache_prompts=cfg.cache_prompt_embeds)


def encoders_from_pipeline(folder, device=None) -> TextToImageEncoders:
    """The encoders of an exported pipeline folder (for sampling)."""
    encoder, tokenizer = load_text_encoder(folder)
    return TextToImageEncoders(load_vae(folder), encoder, tokenizer, sample_mode="mean", device=device)
