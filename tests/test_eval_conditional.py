"""`liftplace eval --model` on a class-conditional DiT: balanced classes, guidance, the model's own sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from liftplace.eval.fid import evaluate, generate_samples
from liftplace.train import Trainer
from liftplace.train.dit import load_and_sample
from liftplace.train.sampling import to_uint8
from test_dit import DIT_FLOW, make_config


@pytest.fixture(scope="module", params=[False, True], ids=["ddpm-learned-sigma", "flow"])
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("dit")
    extra = dict(objective="flow", teacher_config=DIT_FLOW) if request.param else {}
    return Trainer(make_config(out, **extra)).train().model_dir


def test_samples_are_class_balanced_guided_and_batch_independent(exported, tmp_path):
    rec = generate_samples(exported, tmp_path / "a", 5, batch_size=2, num_inference_steps=2, guidance_scale=2.0,
                           progress=False)
    assert rec["class_labels"] == "image i has class i % 10" and rec["guidance"] == 2.0
    assert rec["sampler"].startswith("flow-matching") or rec["sampler"].startswith("DDPM ancestral")
    files = sorted((tmp_path / "a").glob("0*.png"))
    assert len(files) == 5
    got = np.stack([np.asarray(Image.open(f)) for f in files])
    # image i is the model sampled with label i % 10 from seed i, as load_and_sample draws it
    want, _ = load_and_sample(exported, torch.arange(5) % 10, guidance_scale=2.0, num_inference_steps=2, seed=0)
    assert np.array_equal(got, to_uint8(want.clamp(-1, 1))[..., 0].numpy())
    # the batch size does not change the images; a resumed folder keeps them
    generate_samples(exported, tmp_path / "b", 5, batch_size=5, num_inference_steps=2, guidance_scale=2.0,
                     progress=False)
    again = np.stack([np.asarray(Image.open(f)) for f in sorted((tmp_path / "b").glob("0*.png"))])
    assert np.array_equal(got, again)
    with pytest.raises(ValueError, match="other settings"):
        generate_samples(exported, tmp_path / "a", 5, num_inference_steps=2, guidance_scale=3.0, progress=False)
    with pytest.raises(ValueError, match="has no eta"):
        generate_samples(exported, tmp_path / "c", 2, num_inference_steps=2, eta=0.5, progress=False)


def test_eval_model_scores_a_dit(exported, tmp_path):
    # scored in a digits classifier's features against a folder of 8x8 images
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(ref / f"{i}.png")
    from liftplace.eval.classifier import save_classifier, train_classifier

    clf, _, meta = train_classifier("digits", resolution=8, channels=1, seed=0, epochs=1)
    path = save_classifier(clf, tmp_path / "clf.safetensors", meta)
    rec = evaluate(model=exported, reference=str(ref), features=f"classifier:{path}", output_dir=tmp_path / "ev",
                   num_images=6, batch_size=3, num_inference_steps=2, allow_small_n=True, guidance_scale=1.5)
    assert np.isfinite(rec["scores"]["frechet_distance"])
    gen = rec["protocol"]["generated"]
    assert gen["guidance"] == 1.5 and gen["class_labels"].startswith("image i has class")
    assert json.loads((tmp_path / "ev" / "scores.json").read_text())["scores"] == rec["scores"]
