"""The dit family: labels, label dropout, learned sigma, depth pruning, feature pairs, export round trip."""

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from liftplace.train import ConfigError, Trainer, build_config  # noqa: E402
from liftplace.train.dit import (drop_labels, layer_scores, load_and_sample, make_depth_pruned_student,  # noqa: E402
                                 select_layers)
from liftplace.train.models import build_from_config, count_parameters, get_family  # noqa: E402
from liftplace.train.objective import learned_range_vb, make_noise_scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DIT = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 1,
       "out_channels": 2, "num_layers": 4, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}
DIT_FLOW = {**DIT, "out_channels": 1}


def make_config(out, **kw):
    base = dict(output_dir=str(out), teacher_config=DIT, dataset_name="digits", resolution=8, train_batch_size=8,
                max_train_steps=1, logging_steps=1, checkpointing_steps=100, validation_steps=0,
                num_validation_images=2, ddpm_num_inference_steps=3, report_to="none", progress_bar=False,
                student_depth=2, use_ema=False, guidance_scale=2.0)
    base.update(kw)
    return build_config(None, base)


def batch_of(tr, n=8):
    items = [tr.dataset[i] for i in range(n)]
    return torch.stack([it["pixel_values"] for it in items]), {"label": torch.tensor([it["label"] for it in items])}


def teacher(seed=0, config=DIT):
    fam = get_family("dit")
    return fam, build_from_config(config, fam, "teacher", seed=seed).eval()


# --- labels -------------------------------------------------------------------------------------

def test_labels_reach_the_model_and_the_loss(tmp_path):
    tr = Trainer(make_config(tmp_path, cond_drop_prob=0.0)).setup()
    clean, cond = batch_of(tr)
    assert len(set(cond["label"].tolist())) > 1  # the digits' own labels
    other = {"label": (cond["label"] + 3) % 10}
    a = tr.loss_fn(clean, cond, torch.Generator().manual_seed(0), 0)
    b = tr.loss_fn(clean, other, torch.Generator().manual_seed(0), 0)
    # same noise and timesteps, different labels: the losses (student and teacher outputs) differ
    assert not math.isclose(float(a.terms["sd_loss"]), float(b.terms["sd_loss"]), rel_tol=1e-6)
    assert not math.isclose(float(a.terms["kd_loss"]), float(b.terms["kd_loss"]), rel_tol=1e-6)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 500])
    out0 = tr.family.forward(tr.teacher, x, t, {"label": torch.tensor([0, 0])})
    out1 = tr.family.forward(tr.teacher, x, t, {"label": torch.tensor([1, 1])})
    assert not torch.allclose(out0, out1)
    with pytest.raises(ValueError, match="class labels"):
        tr.family.forward(tr.teacher, x, t, {})


def test_label_dropout_is_ours_and_seeded(tmp_path):
    labels = torch.arange(10).repeat(20)
    g = torch.Generator().manual_seed(3)
    d = drop_labels({"label": labels}, g, 0.3, 10)["label"]
    frac = float((d == 10).float().mean())
    assert 0.15 < frac < 0.45 and torch.equal(d[d != 10], labels[d != 10])
    assert torch.equal(d, drop_labels({"label": labels}, torch.Generator().manual_seed(3), 0.3, 10)["label"])
    assert torch.equal(drop_labels({"label": labels}, g, 0.0, 10)["label"], labels)
    assert (drop_labels({"label": labels}, g, 1.0, 10)["label"] == 10).all()
    with pytest.raises(ConfigError, match="num_embeds_ada_norm"):
        drop_labels({"label": torch.tensor([0, 12])}, g, 0.1, 10)
    # diffusers' own in-model dropout (global RNG, per block) is off: train-mode calls are deterministic
    fam, m = teacher()
    m.train()
    x, t, y = torch.randn(64, 1, 8, 8), torch.full((64,), 100), {"label": torch.zeros(64, dtype=torch.long)}
    assert torch.equal(fam.forward(m, x, t, y), fam.forward(m, x, t, y))


def test_image_folder_labels(tmp_path):
    from PIL import Image

    from liftplace.train.build import build_dataset

    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(root / cls / f"{i}.png")
    cfg = make_config(tmp_path / "out", train_data_dir=str(root), model_type="dit")
    data = build_dataset(cfg, 1)
    assert sorted(data[i]["label"] for i in range(len(data))) == [0, 0, 1, 1]
    lines = [json.dumps({"image": f"{c}/{i}.png", "cls": 7 if c == "cat" else 3}) for c in ("cat", "dog")
             for i in range(2)]
    (root / "metadata.jsonl").write_text("\n".join(lines))
    data = build_dataset(cfg.replace(class_column="cls"), 1)
    assert sorted(data[i]["label"] for i in range(len(data))) == [3, 3, 7, 7]
    with pytest.raises(ConfigError, match="class_column"):
        build_dataset(cfg.replace(class_column="nope"), 1)


# --- learned sigma ------------------------------------------------------------------------------

def _grad_of_output(tr, monkeypatch, clean, cond):
    kept = {}
    fam = tr.family
    orig = type(fam).forward

    def forward(self, model, noisy, t, c):
        out = orig(self, model, noisy, t, c)
        if model is tr.student:
            out.retain_grad()
            kept["out"] = out
        return out

    monkeypatch.setattr(type(fam), "forward", forward)
    tr.loss_fn(clean, cond, torch.Generator().manual_seed(0), 0).loss.backward()
    monkeypatch.undo()
    return kept["out"].grad


@pytest.mark.parametrize("kd_loss", ["place", "output"])
def test_learned_sigma_kd_reaches_only_the_mean_half(tmp_path, monkeypatch, kd_loss):
    tr = Trainer(make_config(tmp_path, lambda_sd=0.0, kd_loss=kd_loss)).setup()
    clean, cond = batch_of(tr)
    g = _grad_of_output(tr, monkeypatch, clean, cond)
    assert g.shape[1] == 2
    assert g[:, 1:].abs().max() == 0 and g[:, :1].abs().max() > 0
    # the denoising side: the variance half is trained (by the VB term) and only by it
    tr2 = Trainer(make_config(tmp_path / "b", lambda_kd_output=0.0, kd_loss="none")).setup()
    g2 = _grad_of_output(tr2, monkeypatch, clean, cond)
    assert g2[:, 1:].abs().max() > 0 and g2[:, :1].abs().max() > 0


def test_vb_term_zero_at_the_true_posterior_and_float64():
    sched = make_noise_scheduler(build_config(None, {"output_dir": "unused", "kd_loss": "none"}), learned_sigma=True)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([1, 300, 999])
    ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    # v = -1: the model's variance is the (clipped) posterior variance; eps exact: the means agree
    vb = learned_range_vb(sched, eps, -torch.ones_like(x0), x0, xt, t)
    assert vb.abs().max() < 1e-4
    # a direct float64 KL for another variance value v = 0.5
    v = 0.5
    got = learned_range_vb(sched, eps, torch.full_like(x0, v), x0, xt, t)
    b = sched.betas.double()
    a = sched.alphas_cumprod.double()
    ap = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    pv = b * (1 - ap) / (1 - a)
    lv_true = torch.log(torch.cat([pv[1:2], pv[1:]]))[t]
    lv_model = (v + 1) / 2 * torch.log(b[t]) + (1 - (v + 1) / 2) * lv_true
    kl = 0.5 * (-1 + lv_model - lv_true + torch.exp(lv_true - lv_model)) / math.log(2)
    assert torch.allclose(got.double(), kl, rtol=1e-4)


# --- depth pruning ------------------------------------------------------------------------------

def test_select_layers():
    assert select_layers("uniform", 28, 14) == sorted(set(round(i * 27 / 13) for i in range(14)))
    assert select_layers("uniform", 4, 2) == [0, 3]
    assert select_layers("first", 6, 3) == [0, 1, 2]
    assert select_layers("first", 6, 3, keep_last=True) == [0, 1, 5]
    assert select_layers("list:0,2,5", 6, 3) == [0, 2, 5]
    assert select_layers("score", 5, 2, scores=[0.1, 0.5, -0.2, 0.5, 0.0]) == [1, 3]
    with pytest.raises(ConfigError, match="does not exist"):
        select_layers("list:0,7", 6, 2)
    with pytest.raises(ConfigError, match="student_depth=3"):
        select_layers("list:0,2", 6, 3)
    with pytest.raises(ConfigError, match="between 1 and"):
        select_layers("uniform", 4, 5)
    with pytest.raises(ConfigError, match="increasing"):
        select_layers("list:2,0", 6, 2)
    with pytest.raises(ConfigError, match="layer_selection"):
        build_config(None, {"output_dir": "x", "kd_loss": "none", "student_depth": 2, "layer_selection": "random"})


@pytest.mark.parametrize("kept", [[0, 2], [1, 3], [3], [0, 1, 2, 3]])
def test_pruned_blocks_are_bitwise_copies(kept, capsys):
    fam, t = teacher()
    s = make_depth_pruned_student(t, fam, kept)
    assert len(s.transformer_blocks) == len(kept) and s.liftplace_kept_blocks == kept
    ts = t.state_dict()
    for k, v in s.state_dict().items():
        if k.startswith("transformer_blocks."):
            _, i, rest = k.split(".", 2)
            src = f"transformer_blocks.{kept[int(i)]}.{rest}"
        else:
            src = k
        assert torch.equal(v, ts[src]), k
    out = capsys.readouterr().out
    assert f"keeps teacher blocks {kept}" in out and f"student {count_parameters(s):,} parameters" in out
    if kept == [0, 1, 2, 3]:  # keeping every block is the teacher itself
        x, tt, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), {"label": torch.tensor([1, 2])}
        assert torch.equal(fam.forward(s, x, tt, y), fam.forward(t, x, tt, y))


def test_layer_scores_rank_by_calibration_loss_rise(tmp_path, capsys):
    tr = Trainer(make_config(tmp_path, layer_selection="score", layer_score_batches=1)).setup()
    out = capsys.readouterr().out
    scores = [float(line.split(":")[1]) for line in out.splitlines() if line.strip().startswith("block")]
    assert len(scores) == 4
    best = sorted(sorted(range(4), key=lambda j: (-scores[j], j))[:2])
    assert tr.student.liftplace_kept_blocks == best
    # the scores are what layer_scores measures: recompute one
    clean, cond = batch_of(tr)
    s = layer_scores(tr.teacher, tr.family, tr.objective, [(clean, cond)], seed=0)
    assert len(s) == 4 and all(math.isfinite(v) for v in s)


def test_feature_pairs_follow_the_source_blocks(tmp_path):
    tr = Trainer(make_config(tmp_path, layer_selection="list:1,3", lambda_kd_feat=0.5, kd_feat_layers="all")).setup()
    assert set(tr.adapters.names) == {"transformer_blocks.1:transformer_blocks.0",
                                      "transformer_blocks.3:transformer_blocks.1"}
    clean, cond = batch_of(tr)
    out = tr.loss_fn(clean, cond, torch.Generator().manual_seed(0), 0)
    assert out.terms["feat_loss"] > 0
    out.loss.backward()


# --- one step per KD choice, export round trip --------------------------------------------------

@pytest.mark.parametrize("kd", [dict(kd_loss="output"), dict(kd_loss="place"),
                                dict(kd_loss="place", lambda_kd_feat=0.5, kd_feat_loss="lift_place", group_size=4),
                                dict(kd_loss="lift", objective="flow", teacher_config=DIT_FLOW)])
def test_one_step_per_kd_choice(tmp_path, kd):
    tr = Trainer(make_config(tmp_path, cond_drop_prob=0.2, **kd)).setup()
    before = {k: v.clone() for k, v in tr.student.state_dict().items()}
    t0 = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    r = tr.train()
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(rec["loss"]) and "kd_loss" in rec
    assert ("feat_loss" in rec) == ("lambda_kd_feat" in kd)
    assert any(not torch.equal(v, tr.student.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, tr.teacher.state_dict()[k]) for k, v in t0.items())
    sched = json.loads((r.model_dir / "scheduler_config.json").read_text())
    want = "FlowMatchEulerDiscreteScheduler" if kd.get("objective") == "flow" else "DDPMScheduler"
    assert sched["_class_name"] == want
    assert (tmp_path / "samples" / "step-000001.png").is_file()


@pytest.mark.parametrize("flow", [False, True])
def test_export_from_pretrained_sample_round_trip(tmp_path, flow):
    from diffusers import DiTTransformer2DModel

    extra = dict(objective="flow", teacher_config=DIT_FLOW) if flow else {}
    tr = Trainer(make_config(tmp_path, **extra))
    r = tr.train()
    loaded = DiTTransformer2DModel.from_pretrained(str(r.model_dir))
    for k, v in tr.student.state_dict().items():
        assert torch.equal(v.cpu(), loaded.state_dict()[k]), k
    labels = torch.tensor([0, 3, 3, 7])
    images, sched = load_and_sample(r.model_dir, labels, guidance_scale=2.0, num_inference_steps=3)
    if flow:
        assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler"
    else:
        assert type(sched).__name__ == "DDPMScheduler" and sched.config.variance_type == "learned_range"
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    # the in-memory student gives the same images with the run's own scheduler
    from liftplace.train.dit import sample_images

    direct = sample_images(tr.family, tr.student, tr.noise_scheduler, 4, (1, 8, 8), num_inference_steps=3,
                           cond={"label": labels}, uncond={"label": torch.tensor([10])}, guidance_scale=2.0)
    assert torch.allclose(images, direct, atol=1e-5)
    # labels matter: the same seeds with other labels give other images
    images2, _ = load_and_sample(r.model_dir, torch.tensor([1, 1, 1, 1]), guidance_scale=2.0, num_inference_steps=3)
    assert not torch.allclose(images[1:3], images2[1:3])
    # `liftplace sample` takes the same path (--class_labels)
    from liftplace.cli import main

    assert main(["sample", "--model", str(r.model_dir), "--num_images", "2", "--class_labels", "3",
                 "--num_inference_steps", "2", "--output_dir", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "grid.png").is_file() and (tmp_path / "cli" / "000001.png").is_file()


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="student_depth"):
        make_config(tmp_path, student_config=DIT)
    with pytest.raises(ConfigError, match="learned sigma"):
        Trainer(make_config(tmp_path, objective="flow")).setup()
    with pytest.raises(ConfigError, match="depth pruning"):
        Trainer(make_config(tmp_path, student_depth=None)).setup()


def test_latent_dit_round_trip(tmp_path):
    """dit on VAE latents (pretrained_vae_model_name_or_path): 16x16x3 images -> 4x8x8 latents, the
    export carries the VAE and samples decode to images."""
    from diffusers import AutoencoderKL

    from liftplace.train.tiny import TINY_VAE

    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(tmp_path / "vae"))
    latent_dit = {**DIT, "in_channels": 4, "out_channels": 8}
    cfg = make_config(tmp_path / "run", teacher_config=latent_dit, dataset_name="synthetic", resolution=16,
                      pretrained_vae_model_name_or_path=str(tmp_path / "vae"), train_batch_size=4)
    tr = Trainer(cfg)
    r = tr.train()
    assert tr.sample_shape == (4, 8, 8) and tr.model_resolution == 8
    assert (r.model_dir / "vae" / "config.json").is_file()
    images, sched = load_and_sample(r.model_dir, torch.tensor([0, 5]), guidance_scale=2.0, num_inference_steps=2)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert (tmp_path / "run" / "samples" / "step-000001.png").is_file()
    from liftplace.cli import main

    assert main(["sample", "--model", str(r.model_dir), "--num_images", "1", "--class_labels", "2",
                 "--num_inference_steps", "2", "--output_dir", str(tmp_path / "cli")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "cli" / "000000.png").size == (16, 16)


def test_teacher_scheduler_must_match_the_objective(tmp_path):
    """A flow-trained teacher folder refuses a DDPM run (the dit default) and the other way round."""
    r = Trainer(make_config(tmp_path / "t", teacher_config=DIT_FLOW, objective="flow", student_depth=None,
                            kd_loss="none", student_config=DIT_FLOW), role="teacher").train()
    with pytest.raises(ConfigError, match="--objective flow"):
        Trainer(make_config(tmp_path / "s", teacher_config=None, pretrained_model_name_or_path=str(r.model_dir),
                            model_type="dit")).setup()
    Trainer(make_config(tmp_path / "s2", teacher_config=None, pretrained_model_name_or_path=str(r.model_dir),
                        model_type="dit", objective="flow")).setup()


def test_learned_sigma_teacher_plain_student(tmp_path):
    """A learned-sigma teacher distils into a student without learned sigma (its prediction half)."""
    tr = Trainer(make_config(tmp_path, student_depth=None, student_config=DIT_FLOW)).setup()
    clean, cond = batch_of(tr)
    out = tr.loss_fn(clean, cond, torch.Generator().manual_seed(0), 0)
    assert math.isfinite(float(out.loss)) and "vb_loss" not in out.terms
