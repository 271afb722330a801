"""CLIP score in `liftplace eval`: a tiny random-weight CLIPModel folder, nothing downloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from liftplace.cli import main as cli_main
from liftplace.eval.clip_score import clip_score, read_prompts
from liftplace.eval.fid import evaluate, image_files, load_images
from liftplace.train.tiny import write_tiny_clip

PROMPTS = ["a red circle", "a blue square", "two", "seven", "a digit one", "zero"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(len(PROMPTS)):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder


def test_score_is_clips_own_cosine(clip_dir, images):
    """100 * max(cos, 0) per pair, against CLIPModel.forward's logits_per_image / logit_scale."""
    from transformers import CLIPModel, CLIPProcessor

    u8 = load_images(images)
    mean, std, per_pair, proto = clip_score(u8, PROMPTS, clip_dir, batch_size=4)
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    proc = CLIPProcessor.from_pretrained(str(clip_dir))
    inputs = proc(text=PROMPTS, images=[Image.open(f).convert("RGB") for f in image_files(images)],
                  return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
        cos = out.logits_per_image.diagonal().double() / model.logit_scale.exp().double()
    expected = 100 * cos.clamp(min=0)
    torch.testing.assert_close(per_pair, expected, rtol=1e-4, atol=1e-3)
    assert mean == pytest.approx(float(expected.mean()), abs=1e-3)
    assert std == pytest.approx(float(expected.std()), abs=1e-3)
    assert len(proto["weights_sha256"]) == 64 and proto["text_truncation"]


def test_pairs_follow_the_prompts(clip_dir, images):
    """Shuffling the prompts changes the per-pair scores: they are really paired."""
    u8 = load_images(images)
    _, _, a, _ = clip_score(u8, PROMPTS, clip_dir)
    _, _, b, _ = clip_score(u8, PROMPTS[::-1], clip_dir)
    assert not torch.allclose(a, b)


def test_eval_writes_clip_score_with_protocol(clip_dir, images, tmp_path, capsys):
    rc = cli_main(["eval", "--images", str(images), "--prompts", str(tmp_path / "prompts.txt"),
                   "--clip_model", str(clip_dir), "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 0
    rec = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert set(rec["scores"]) == {"clip_score", "clip_score_std"}
    assert rec["protocol"]["clip"]["model"] == str(clip_dir)
    assert rec["protocol"]["images"]["n"] == len(PROMPTS)
    assert "clip_score:" in capsys.readouterr().out


def test_metadata_jsonl_prompts(clip_dir, images, tmp_path):
    rows = [{"file_name": f.name, "text": p} for f, p in zip(image_files(images), PROMPTS)]
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::-1]))
    assert read_prompts(images / "metadata.jsonl", image_files(images)) == PROMPTS
    rec = evaluate(images=images, prompts=images, clip_model=clip_dir, output_dir=tmp_path / "o", device="cpu")
    txt = evaluate(images=images, prompts=tmp_path / "prompts.txt", clip_model=clip_dir, output_dir=tmp_path / "p",
                   device="cpu")
    assert rec["scores"]["clip_score"] == pytest.approx(txt["scores"]["clip_score"])


def test_bad_input_names_the_fix(clip_dir, images, tmp_path):
    with pytest.raises(ValueError, match="--clip_model .* is not a CLIP model folder"):
        evaluate(images=images, prompts=tmp_path / "prompts.txt", clip_model=tmp_path / "nope",
                 output_dir=tmp_path / "o")
    (tmp_path / "short.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="2 non-empty lines for 6 images"):
        evaluate(images=images, prompts=tmp_path / "short.txt", clip_model=clip_dir, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="--clip_model and --prompts go together"):
        evaluate(images=images, clip_model=clip_dir, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="nothing to compute"):
        evaluate(images=images, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="--reference and --features go together"):
        evaluate(images=images, reference="digits", output_dir=tmp_path / "o")
    assert not (tmp_path / "o" / "scores.json").exists()
