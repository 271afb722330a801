"""CLIP score of generated images against their prompts, from a local CLIP model folder.

The score is torchmetrics' (and the text-to-image literature's) definition: for each
image-prompt pair ``100 · max(cos(E_img, E_txt), 0)`` with CLIP's projected embeddings,
averaged over the pairs. The model is read with ``transformers`` from a folder
(``CLIPModel.save_pretrained`` layout: config, weights, tokenizer and image-processor
files; e.g. a local copy of ``openai/clip-vit-large-patch14``); nothing is downloaded.
Images are preprocessed by the folder's own ``CLIPImageProcessor`` (resize of the shorter
side, centre crop, CLIP's normalisation), and prompts longer than the text model's
context are truncated; both are recorded in the protocol.

Prompts pair with images in sorted-name order (the order ``load_images`` reads): a text
file with one prompt per line, or diffusers' captioned-folder ``metadata.jsonl`` /
``metadata.csv`` (``file_name`` + ``text`` columns) naming each image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["clip_score", "load_clip", "read_prompts"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_prompts(prompts, image_files: list[Path]) -> list[str]:
    """One prompt per image in ``image_files`` (sorted by name) from ``prompts``: a .txt file
    (one per line, same order) or a captioned folder's metadata file / folder."""
    from ..train.data import METADATA_FILES, read_caption_metadata

    path = Path(prompts)
    if path.is_dir() or path.name in METADATA_FILES:
        root = path if path.is_dir() else path.parent
        by_name = {p.name: caption for p, caption in read_caption_metadata(root)}
        missing = [f.name for f in image_files if f.name not in by_name]
        if missing:
            raise ValueError(f"--prompts {str(path)!r} has no caption for {len(missing)} image(s), e.g. "
                             f"{missing[0]!r}; its metadata must name every generated image (file_name column)")
        return [by_name[f.name] for f in image_files]
    if not path.is_file():
        raise ValueError(f"--prompts {str(path)!r} does not exist; pass a .txt file with one prompt per line "
                         "(images in sorted-name order) or a folder with metadata.jsonl")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if len(lines) != len(image_files):
        raise ValueError(f"--prompts {str(path)!r} holds {len(lines)} non-empty lines for {len(image_files)} images; "
                         "give one prompt per image, in the images' sorted-name order")
    return lines


def load_clip(path, device="cpu"):
    """``(model, tokenizer, image_processor, protocol)`` from a local CLIP folder."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(path)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if not folder.is_dir() or not (folder / "config.json").is_file() or weights is None:
        raise ValueError(
            f"--clip_model {str(folder)!r} is not a CLIP model folder (config.json + {' or '.join(WEIGHT_FILES)} + "
            "tokenizer and preprocessor files). Nothing is downloaded: on a machine with internet run "
            "`CLIPModel.from_pretrained('openai/clip-vit-large-patch14').save_pretrained(DIR)` and the same for "
            "CLIPProcessor, then copy DIR here")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--clip_model {str(folder)!r}: cannot read its tokenizer / image processor ({exc}); save "
                         "them with CLIPProcessor.save_pretrained into the same folder") from exc
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    protocol = {
        "name": "CLIP score: 100 * max(cos(image, text), 0), mean over pairs",
        "model": str(folder),
        "weights_file": weights.name,
        "weights_sha256": digest.hexdigest(),
        "image_preprocess": {"resize": _plain(processor.size), "resample": int(processor.resample),
                             "center_crop": _plain(processor.crop_size), "normalize_mean": list(processor.image_mean),
                             "normalize_std": list(processor.image_std)},
        "text_max_tokens": int(model.config.text_config.max_position_embeddings),
        "text_truncation": True,
    }
    return model, tokenizer, processor, protocol


def _plain(v):
    """A processor's size setting (a dict-like ``SizeDict`` in recent transformers) as JSON."""
    if hasattr(v, "items"):
        return {k: x for k, x in v.items() if x is not None}
    keys = ("shortest_edge", "longest_edge", "height", "width")
    if all(hasattr(v, k) for k in keys):
        return {k: getattr(v, k) for k in keys if getattr(v, k) is not None}
    return v


@torch.no_grad()
def clip_score(images_u8: Tensor, prompts: list[str], clip_model, *, device="cpu", batch_size: int = 64):
    """``(mean, std, per_pair_scores, protocol)`` for uint8 ``[N, C, H, W]`` images (C = 1 or 3)."""
    if images_u8.shape[0] != len(prompts):
        raise ValueError(f"{images_u8.shape[0]} images but {len(prompts)} prompts; give one prompt per image")
    if images_u8.shape[0] == 0:
        raise ValueError("no images to score")
    model, tokenizer, processor, protocol = load_clip(clip_model, device)
    scores = []
    for i in range(0, len(prompts), batch_size):
        u8 = images_u8[i:i + batch_size]
        if u8.shape[1] == 1:  # grayscale: CLIP sees it as RGB
            u8 = u8.expand(-1, 3, -1, -1)
        pixels = processor(images=[img.permute(1, 2, 0).numpy() for img in u8], return_tensors="pt")["pixel_values"]
        text = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True,
                         max_length=protocol["text_max_tokens"], return_tensors="pt")
        img = model.get_image_features(pixel_values=pixels.to(device))
        txt = model.get_text_features(input_ids=text["input_ids"].to(device),
                                      attention_mask=text["attention_mask"].to(device))
        img = getattr(img, "pooler_output", img)  # newer transformers wrap the features
        txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
        scores.append(100.0 * cos.clamp(min=0).cpu())
    per_pair = torch.cat(scores)
    std = float(per_pair.std()) if per_pair.numel() > 1 else 0.0
    return float(per_pair.mean()), std, per_pair, protocol
