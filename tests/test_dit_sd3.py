"""The sd3 family: tiny random SD3Transformer2DModel + tiny CLIP text encoders built from configs."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from liftplace.train import ConfigError, Trainer, build_config  # noqa: E402
from liftplace.train.dit import load_and_sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SD3 = {"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 3, "out_channels": 3,
       "num_layers": 3, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
       "caption_projection_dim": 16, "pooled_projection_dim": 32, "pos_embed_max_size": 8}
CAPTIONS = ["red", "green", "blue", "a dot", "two lines", "a square"]


def _clip(folder: Path, enc: str, tok: str, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from liftplace.train.tiny import BOS, EOS, write_char_tokenizer

    t = write_char_tokenizer(folder / tok, model_max_length=12)
    vocab = t.get_vocab()
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, projection_dim=16,
                         bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    torch.manual_seed(seed)
    CLIPTextModelWithProjection(cfg).save_pretrained(str(folder / enc))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("sd3")
    text = root / "text"
    _clip(text, "text_encoder", "tokenizer", 1)
    _clip(text, "text_encoder_2", "tokenizer_2", 2)
    data = root / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, c in enumerate(CAPTIONS):
        Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": c})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return text, data


def make_config(out, assets, **kw):
    text, data = assets
    base = dict(output_dir=str(out), teacher_config=SD3, text_encoder_path=str(text), train_data_dir=str(data),
                resolution=8, train_batch_size=4, max_train_steps=1, logging_steps=1, checkpointing_steps=100,
                validation_steps=0, num_validation_images=2, ddpm_num_inference_steps=2, report_to="none",
                progress_bar=False, use_ema=False, student_depth=2, max_sequence_length=5, guidance_scale=2.0,
                validation_prompts=["red", "blue"])
    base.update(kw)
    return build_config(None, base)


def test_prompt_embeddings_shape_and_t5_dropped(tmp_path, assets):
    tr = Trainer(make_config(tmp_path, assets)).setup()
    assert tr.family.name == "sd3" and type(tr.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    emb = tr.encoders.embed(["red", ""])
    h, p = emb["encoder_hidden_states"], emb["pooled_projections"]
    assert h.shape == (2, 12 + 5, 32) and p.shape == (2, 32)
    assert h[:, :, 32:].numel() == 0 and (h[:, 12:] == 0).all()  # no T5: zero tokens
    # the depth-pruned student keeps the teacher's last (context_pre_only) block
    assert tr.student.liftplace_kept_blocks[-1] == 2


def test_text_reaches_the_model(tmp_path, assets):
    tr = Trainer(make_config(tmp_path, assets)).setup()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([100.0, 800.0])
    a = tr.family.forward(tr.teacher, x, t, tr.encoders.embed(["red", "red"]))
    b = tr.family.forward(tr.teacher, x, t, tr.encoders.embed(["blue", "blue"]))
    assert not torch.allclose(a, b)
    clean = torch.rand(4, 3, 8, 8) * 2 - 1
    c1 = tr.encoders.embed(["red"] * 4)
    c2 = tr.encoders.embed(["a square"] * 4)
    l1 = tr.loss_fn(clean, c1, torch.Generator().manual_seed(0), 0)
    l2 = tr.loss_fn(clean, c2, torch.Generator().manual_seed(0), 0)
    assert not math.isclose(float(l1.terms["kd_loss"]), float(l2.terms["kd_loss"]), rel_tol=1e-6)
    # pooled projections alone also reach the model
    c3 = {**c1, "pooled_projections": c2["pooled_projections"]}
    assert not torch.allclose(tr.family.forward(tr.teacher, x, t, {k: v[:2] for k, v in c1.items()}),
                              tr.family.forward(tr.teacher, x, t, {k: v[:2] for k, v in c3.items()}))


@pytest.mark.parametrize("kd", [dict(kd_loss="output"), dict(kd_loss="place"),
                                dict(kd_loss="place", lambda_kd_feat=0.5, kd_feat_loss="lift_place", group_size=4)])
def test_one_step_and_round_trip(tmp_path, assets, kd):
    tr = Trainer(make_config(tmp_path, assets, cond_drop_prob=0.5, kd_weight="adaptive-timestep", **kd))
    r = tr.train()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(rec["loss"]) and ("feat_loss" in rec) == ("lambda_kd_feat" in kd)
    sched = json.loads((r.model_dir / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (r.model_dir / "text_encoder_2" / "config.json").is_file()
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel.from_pretrained(str(r.model_dir))
    assert m.config.num_layers == 2
    emb = tr.encoders.embed(["red"])
    # the exported folder samples like the in-memory student, with the scheduler it names
    from liftplace.train.dit import sample_images

    a, s = load_and_sample(r.model_dir, num_images=1, num_inference_steps=2, cond=emb)
    assert type(s).__name__ == "FlowMatchEulerDiscreteScheduler"
    b = sample_images(tr.family, tr.student, tr.noise_scheduler, 1, (3, 8, 8), num_inference_steps=2, cond=emb)
    assert torch.allclose(a, b, atol=1e-5)


def test_cached_prompt_embeddings(tmp_path, assets):
    from liftplace.train.sd3 import cache_prompt_embeddings

    tr = Trainer(make_config(tmp_path / "a", assets)).setup()
    cache_prompt_embeddings(tr.encoders, CAPTIONS, tmp_path / "cache")
    tr2 = Trainer(make_config(tmp_path / "b", assets, text_encoder_path=None,
                              prompt_embeds_path=str(tmp_path / "cache"))).setup()
    assert not tr2.encoders.clips
    for k, v in tr.encoders.embed(["red", ""]).items():
        assert torch.allclose(v, tr2.encoders.embed(["red", ""])[k], atol=1e-5)  # batch composition: rounding
    with pytest.raises(ConfigError, match="no cached embedding"):
        tr2.encoders.embed(["purple"])
    with pytest.raises(ConfigError, match="prompt_embeds_path"):
        Trainer(make_config(tmp_path / "c", assets, prompt_embeds_path=str(tmp_path))).setup()


def test_optional_t5(tmp_path, assets):
    """use_t5: text_encoder_3 (a tiny T5EncoderModel from config) fills the token tail instead of zeros."""
    import shutil

    from transformers import T5Config, T5EncoderModel

    text, data = assets
    folder = tmp_path / "text"
    shutil.copytree(text, folder)
    shutil.copytree(folder / "tokenizer", folder / "tokenizer_3")  # any tokenizer AutoTokenizer can load
    vocab = len(json.loads((folder / "tokenizer_3" / "vocab.json").read_text()))
    torch.manual_seed(3)
    T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        str(folder / "text_encoder_3"))
    tr = Trainer(make_config(tmp_path / "run", (folder, data), text_encoder_path=str(folder), use_t5=True)).setup()
    h = tr.encoders.embed(["red", "blue"])["encoder_hidden_states"]
    assert h.shape == (2, 12 + 5, 32) and h[:, 12:].abs().sum() > 0
    out = tr.loss_fn(torch.rand(4, 3, 8, 8) * 2 - 1, tr.encoders.embed(["red"] * 4), torch.Generator().manual_seed(0), 0)
    assert math.isfinite(float(out.loss))
    with pytest.raises(ConfigError, match="use_t5"):
        Trainer(make_config(tmp_path / "run2", assets, use_t5=True)).setup()
