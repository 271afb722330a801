"""Tiny random-weight text-to-image pipelines built from configs, for tests and smoke runs.

Nothing is downloaded: the tokenizer is a character-level ``CLIPTokenizer`` (every character,
with and without CLIP's end-of-word mark ``</w>``, is a token; no BPE merges), written to
disk with its vocabulary, so ``CLIPTokenizer.from_pretrained`` reads it like a real one.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARS = string.ascii_lowercase + string.digits + ".,'!?-"

# A Stable-Diffusion-shaped U-Net (3 cross-attention stages + a plain one, 2 layers per block),
# a few thousand parameters: the shape BK-SDM's block removal expects.
TINY_SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[8, 16, 16, 16],
                    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                      "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
                down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=4, sample_size=16)


def write_char_tokenizer(folder, model_max_length: int = 16):
    """A character-level ``CLIPTokenizer`` saved in ``folder``; returns it."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [BOS, EOS] + list(CHARS) + [c + "</w>" for c in CHARS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    tok.save_pretrained(str(folder))
    return tok


def tiny_text_encoder(tokenizer, hidden_size: int = 16, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(cfg)


def write_tiny_pipeline(folder, *, unet_config: dict | None = None, vae_config: dict | None = None,
                        seed: int = 0, num_train_timesteps: int = 1000) -> Path:
    """A complete random-weight ``StableDiffusionPipeline`` folder (unet/, vae/, text_encoder/,
    tokenizer/, scheduler/, model_index.json) that ``from_pretrained`` loads offline."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(folder)
    tokenizer = write_char_tokenizer(folder / "tokenizer")
    text_encoder = tiny_text_encoder(tokenizer, seed=seed)
    ucfg = dict(unet_config or TINY_SD_UNET)
    ucfg["cross_attention_dim"] = text_encoder.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**(vae_config or TINY_VAE))
        unet = UNet2DConditionModel(**ucfg)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_tiny_clip(folder, *, image_size: int = 32, seed: int = 0) -> Path:
    """A random-weight ``CLIPModel`` folder (config, safetensors weights, the character-level
    tokenizer, a ``CLIPImageProcessor``) that ``liftplace eval --clip_model`` reads offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    tokenizer = write_char_tokenizer(folder)
    vocab = tokenizer.get_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=vocab[BOS],
                eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.save_pretrained(str(folder), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(str(folder))
    return folder
