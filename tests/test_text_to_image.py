"""Latent text-to-image distillation (Stable Diffusion / BK-SDM) on tiny random-weight pipelines:
UNet2DConditionModel + AutoencoderKL + CLIPTextModel with a character-level CLIPTokenizer, all
built from configs in tmp folders (liftplace.train.tiny); nothing is downloaded."""

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from liftplace.cli import main as cli_main  # noqa: E402
from liftplace.train import ConfigError, Trainer, build_config, distill  # noqa: E402
from liftplace.train import finish  # noqa: E402
from liftplace.train.bk import bk_student_config, make_bk_student, student_plan, teacher_name  # noqa: E402
from liftplace.train.data import CaptionedImageDataset  # noqa: E402
from liftplace.train.models import count_parameters  # noqa: E402
from liftplace.train.tiny import write_tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = [f"a digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven")]


def write_images(folder, n=8, seed=0):
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        arr = (torch.rand(20, 18, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    pipe = write_tiny_pipeline(root / "teacher")
    data = write_images(root / "data")
    rows = [{"file_name": f"{i}.png", "text": c} for i, c in enumerate(CAPTIONS)]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pipe, data


def make_config(out, assets, **kw):
    pipe, data = assets
    base = dict(output_dir=str(out), pretrained_model_name_or_path=str(pipe), train_data_dir=str(data), resolution=16,
                train_batch_size=4, max_train_steps=2, logging_steps=1, checkpointing_steps=100, validation_steps=0,
                num_validation_images=2, ddpm_num_inference_steps=2, report_to="none", progress_bar=False,
                student_arch="bk_small", validation_prompts=["a digit one", "a digit seven"], guidance_scale=2.0)
    base.update(kw)
    return build_config(None, base)


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# --- the family, the conditioning and one step per KD choice --------------------------------------------

def test_family_is_selected_from_the_teacher_config(tmp_path, assets):
    tr = Trainer(make_config(tmp_path, assets)).setup()
    assert tr.family.name == "unet2d_condition" and tr.encoders is not None
    assert tr.sample_shape == (4, 8, 8)  # 16 px through a VAE that halves once
    bad = {"_class_name": "UNet3DConditionModel", "in_channels": 4, "out_channels": 4}
    with pytest.raises(ConfigError, match=r"UNet3DConditionModel.*supported families: unet2d \(UNet2DModel\), "
                                          r"unet2d_condition \(UNet2DConditionModel\)"):
        Trainer(make_config(tmp_path / "bad", assets, pretrained_model_name_or_path=None, teacher_config=bad,
                            student_arch=None)).setup()


@pytest.mark.parametrize("kd_loss", ["output", "place", "lift", "none"])
def test_one_training_step_per_kd_choice(tmp_path, assets, kd_loss):
    res = distill(make_config(tmp_path, assets, kd_loss=kd_loss, max_train_steps=1), end_of_run=[])
    rec = read_metrics(tmp_path)[-1]
    assert res.global_step == 1 and torch.isfinite(torch.tensor(rec["loss"]))
    assert ("kd_loss" in rec) == (kd_loss != "none")


def _capture_hidden(model, seen):
    def hook(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_prompt_embeddings_reach_teacher_and_student(tmp_path, assets):
    """Fails if encoder_hidden_states is dropped, replaced, or ignored by the call."""
    tr = Trainer(make_config(tmp_path, assets, use_ema=False)).setup()
    seen_t, seen_s = [], []
    handles = [_capture_hidden(tr.teacher, seen_t), _capture_hidden(tr.student, seen_s)]
    tr.train(until_step=1)
    for h in handles:
        h.remove()
    first = tr.stream.epoch_batches(0)[0]
    want = tr.encoders.embed([tr.dataset.captions[i] for i in first])
    assert len(seen_t) == len(seen_s) == 1
    assert torch.equal(seen_t[0], want) and torch.equal(seen_s[0], want)
    # and the models use it: another prompt changes the output of both
    noisy, t = torch.randn(4, *tr.sample_shape), torch.full((4,), 500)
    other = tr.encoders.embed([""] * 4)
    for model in (tr.teacher, tr.student):
        a = tr.family.forward(model, noisy, t, {"encoder_hidden_states": want})
        b = tr.family.forward(model, noisy, t, {"encoder_hidden_states": other})
        assert not torch.allclose(a, b)


def test_cond_drop_prob_one_feeds_the_empty_prompt(tmp_path, assets):
    tr = Trainer(make_config(tmp_path, assets, cond_drop_prob=1.0, use_ema=False)).setup()
    seen = []
    h = _capture_hidden(tr.student, seen)
    tr.train(until_step=1)
    h.remove()
    assert torch.equal(seen[0], tr.encoders.embed([""] * 4))


def test_latents_are_scaled_vae_means(tmp_path, assets):
    tr = Trainer(make_config(tmp_path, assets, vae_sample_mode="mean")).setup()
    x = torch.stack([tr.dataset[i]["pixel_values"] for i in range(2)])
    vae = tr.encoders.vae
    want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(tr.encoders.latents(x), want)


# --- captioned data ---------------------------------------------------------------------------

def test_captioned_folder_jsonl_csv_and_max_train_samples(tmp_path):
    data = write_images(tmp_path, n=3)
    (data / "metadata.csv").write_text("image,caption\n0.png,a cat\n1.png,\"a dog, sitting\"\n2.png,a bird\n")
    ds = CaptionedImageDataset(data, 16, caption_column="caption", max_train_samples=2)
    assert len(ds) == 2 and ds[1]["caption"] == "a dog, sitting" and ds[0]["pixel_values"].shape == (3, 16, 16)


@pytest.mark.parametrize("rows, match", [
    ([{"file_name": "0.png", "caption": "x"}], r"metadata.jsonl' row 1 has no caption column 'text'.*caption"),
    ([{"path": "0.png", "text": "x"}], r"row 1 has no image column 'image' \(nor 'file_name'\)"),
    ([{"file_name": "9.png", "text": "x"}], r"row 1, column 'file_name': image .*9.png' does not exist"),
    ([{"file_name": "bad.png", "text": "x"}], r"cannot read image .*bad.png' \(column 'image'"),
    ([{"file_name": "0.png", "text": 3}], r"row 1, column 'text': the caption must be a string"),
    ([], r"metadata.jsonl' lists no images"),
])
def test_bad_captioned_data_names_the_file_and_column(tmp_path, rows, match):
    data = write_images(tmp_path, n=1)
    (data / "bad.png").write_text("not an image")
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=match):
        CaptionedImageDataset(data, 16)


def test_missing_metadata_and_uncaptioned_dataset_are_errors(tmp_path, assets):
    data = write_images(tmp_path / "plain", n=2)
    with pytest.raises(ValueError, match=r"has no metadata.jsonl or metadata.csv"):
        CaptionedImageDataset(data, 16)
    with pytest.raises(ConfigError, match=r"captioned data: set train_data_dir"):
        Trainer(make_config(tmp_path / "o", assets, train_data_dir=None, dataset_name="synthetic")).setup()


# --- resume ------------------------------------------------------------------------------------

def test_resume_reproduces_uninterrupted_run_with_conditioning(tmp_path, assets):
    kw = dict(max_train_steps=6, checkpointing_steps=3, cond_drop_prob=0.5, random_flip=True, kd_loss="place")
    distill(make_config(tmp_path / "straight", assets, **kw), end_of_run=[])
    distill(make_config(tmp_path / "resumed", assets, **kw), until_step=4)
    distill(make_config(tmp_path / "resumed", assets, resume_from_checkpoint="latest", **kw), end_of_run=[])
    straight = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight")]
    resumed = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "resumed")]
    assert len(straight) == 6 and resumed == straight  # bitwise: latents, caption dropout and noise replayed


# --- BK-SDM students ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bk_base", "bk_small", "bk_tiny"])
def test_bk_student_copies_teacher_weights_and_removes_blocks(assets, arch, capsys):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(str(assets[0] / "unet"))
    student, mapping = make_bk_student(teacher, arch)
    printed = capsys.readouterr().out
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        assert torch.equal(value, t_state[teacher_name(name, arch, 2)]), name
    assert mapping["up_blocks.1.resnets.1"] == ("up_blocks.2.resnets.2" if arch == "bk_tiny" else "up_blocks.1.resnets.2")
    assert "  up_blocks.1.resnets.1 <- " + mapping["up_blocks.1.resnets.1"] in printed
    assert all(len(b.resnets) == 1 for b in student.down_blocks)
    assert all(len(b.resnets) == 2 for b in student.up_blocks)
    assert (student.mid_block is None) == (arch != "bk_base")
    assert len(student.down_blocks) == (3 if arch == "bk_tiny" else 4)
    assert "removed: down_blocks.0.resnets.1" in printed
    counts = re.search(r"teacher ([\d,]+) parameters; student ([\d,]+) parameters", printed).groups()
    assert [int(c.replace(",", "")) for c in counts] == [count_parameters(teacher), count_parameters(student)]
    assert bk_student_config(dict(teacher.config), arch)["layers_per_block"] == 1


@pytest.mark.parametrize("arch, spec", [("bk_base", "custom:down=1,1,1,1;mid=1"),
                                        ("bk_small", "custom:down=1,1,1,1;up=2,2,2,2;mid=0"),
                                        ("bk_tiny", "custom: down=1,1,1 ; mid=0")])
def test_custom_spec_equal_to_a_preset_gives_its_student(assets, arch, spec):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(str(assets[0] / "unet"))
    a, map_a = make_bk_student(teacher, arch, verbose=False)
    b, map_b = make_bk_student(teacher, spec, verbose=False)
    assert map_a == map_b and dict(a.config) == dict(b.config)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_custom_spec_copies_the_mapped_teacher_layers(assets, capsys):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.load_config(str(assets[0] / "unet"))
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config({**base, "layers_per_block": 3})  # random weights, 3 per block
    spec = "custom:down=2,1,3;mid=1"
    student, mapping = make_bk_student(teacher, spec)
    printed = capsys.readouterr().out
    t_state = teacher.state_dict()
    plan = student_plan(spec, dict(teacher.config))
    for name, value in student.state_dict().items():
        assert torch.equal(value, t_state[plan.teacher_name(name)]), name
        assert torch.equal(value, t_state[teacher_name(name, spec, 3)]), name
    assert [len(b.resnets) for b in student.down_blocks] == [2, 1, 3]
    assert [len(b.resnets) for b in student.up_blocks] == [4, 2, 3]  # mirrored down counts + 1
    assert student.mid_block is not None and len(student.down_blocks) == 3
    # up stage i <- teacher up stage i + 1 (one stage dropped); first D resnets, then the teacher's last (3)
    assert [mapping[f"up_blocks.0.resnets.{j}"] for j in range(4)] == [f"up_blocks.1.resnets.{j}" for j in range(4)]
    assert [mapping[f"up_blocks.1.resnets.{j}"] for j in range(2)] == ["up_blocks.2.resnets.0", "up_blocks.2.resnets.3"]
    assert [mapping[f"up_blocks.2.attentions.{j}"] for j in range(3)] == [
        "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.3"]
    assert mapping["down_blocks.0.resnets.1"] == "down_blocks.0.resnets.1" and "down_blocks.1.resnets.1" not in mapping
    assert not any(k.startswith("up_blocks.3") or k.startswith("down_blocks.3") for k in student.state_dict())
    for gone in ("down_blocks.0.resnets.2", "down_blocks.1.resnets.1", "down_blocks.1.resnets.2",
                 "up_blocks.0.resnets.0", "up_blocks.2.resnets.1", "up_blocks.2.resnets.2", "down_blocks.3.resnets.0",
                 "down_blocks.2.downsamplers.0"):
        assert f"removed: {gone}" in printed
    counts = re.search(r"teacher ([\d,]+) parameters; student ([\d,]+) parameters", printed).groups()
    assert [int(c.replace(",", "")) for c in counts] == [count_parameters(teacher), count_parameters(student)]


def test_custom_spec_trains_a_step_with_feature_kd(tmp_path, assets):
    cfg = make_config(tmp_path, assets, student_arch="custom:down=1,2,1;mid=0", max_train_steps=1,
                      lambda_kd_feat=1.0, kd_feat_loss="mse", kd_feat_layers="up_blocks.2:up_blocks.1")
    res = distill(cfg, end_of_run=[])
    rec = read_metrics(tmp_path)[-1]
    assert res.global_step == 1 and torch.isfinite(torch.tensor(rec["loss"]))


@pytest.mark.parametrize("spec, match", [
    ("bk_huge", "bk_base, bk_small, bk_tiny or a custom spec"),
    ("custom:mid=0", "down=... .* is required"),
    ("custom:down=1,x", "comma list of integers"),
    ("custom:down=1,0,1,1", "every count must be >= 1"),
    ("custom:down=1,1,1,1;up=2,2,2", "up=.* must be 2,2,2,2"),
    ("custom:down=1,2,1,1;up=2,2,2,2", "up=.* must be 2,2,3,2"),
    ("custom:down=1,1,1,1;mid=2", "mid='2' must be 1"),
    ("custom:down=1;down=1", "down is given twice"),
    ("custom:down=1;width=2", "not down=..., up=... or mid="),
])
def test_bad_student_arch_specs_name_the_key(tmp_path, assets, spec, match):
    with pytest.raises(ConfigError, match="student_arch") as err:
        make_config(tmp_path, assets, student_arch=spec)
    assert re.search(match, str(err.value)), str(err.value)


@pytest.mark.parametrize("spec, match", [
    ("custom:down=1,1,1,1,1", "5 counts; give one per stage kept, between 1 and the teacher's 4"),
    ("custom:down=1,3,1,1", "down stage 1 keeps 3 layers; the teacher has 2 there, so give a count between 1 and 2"),
])
def test_custom_spec_checked_against_the_teacher(tmp_path, assets, spec, match):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(str(assets[0] / "unet"))
    make_config(tmp_path, assets, student_arch=spec)  # the syntax is fine
    with pytest.raises(ConfigError, match="student_arch") as err:
        make_bk_student(teacher, spec, verbose=False)
    assert match in str(err.value)


# --- validation and export ------------------------------------------------------------------------

def test_export_loads_as_a_pipeline_and_samples(tmp_path, assets):
    from diffusers import StableDiffusionPipeline

    res = distill(make_config(tmp_path, assets, use_ema=False, max_train_steps=1))
    assert (tmp_path / "samples" / "step-000001.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(res.model_dir), local_files_only=True)
    saved = pipe.unet.state_dict()
    trained = res.model_dir  # the student of the run, and the teacher's encoders
    from diffusers import AutoencoderKL

    teacher_vae = AutoencoderKL.from_pretrained(str(assets[0] / "vae"))
    assert all(torch.equal(v, teacher_vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())
    assert count_parameters(pipe.unet) == res.student_params
    assert saved.keys() and trained.is_dir()
    images = pipe("a digit seven", num_inference_steps=2, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    out = tmp_path / "cli"
    assert cli_main(["sample", "--model", str(res.model_dir), "--prompt", "a digit one", "--prompt", "a digit two",
                     "--num_images", "2", "--num_inference_steps", "2", "--guidance_scale", "3",
                     "--output_dir", str(out), "--device", "cpu"]) == 0
    assert len(list(out.glob("0*.png"))) == 4 and (out / "grid.png").is_file()


def test_a_failing_validation_grid_never_costs_the_export(tmp_path, assets, monkeypatch):
    def broken(tr):
        raise RuntimeError("validation broke")

    monkeypatch.setitem(finish.END_OF_RUN, "sample_grid", broken)
    with pytest.raises(RuntimeError, match="validation broke"):
        distill(make_config(tmp_path, assets, max_train_steps=1))
    assert (tmp_path / "student" / "model_index.json").is_file() and (tmp_path / "checkpoint-1").is_dir()


# --- feature KD as BK-SDM does it, and with LIFT/PLACE ------------------------------------------------

@pytest.mark.parametrize("arch, feat_loss", [("bk_tiny", "mse"), ("bk_small", "mse"), ("bk_base", "lift_place")])
def test_bk_sdm_feature_pairs_train(tmp_path, assets, arch, feat_loss):
    layers = "bk_sdm" if feat_loss == "mse" else "up_blocks.3,down_blocks.0"  # lift_place: 8x8 maps >= group_size
    tr = Trainer(make_config(tmp_path, assets, student_arch=arch, lambda_kd_feat=0.5, kd_feat_layers=layers,
                             kd_feat_loss=feat_loss, group_size=4)).setup()
    names = tr.accelerator.unwrap_model(tr.adapters).names
    if arch == "bk_tiny":  # BK-SDM's pairs: the student's up block i against the teacher's i + 1
        assert names == ["down_blocks.0", "down_blocks.1",
                         "down_blocks.2.attentions.1.proj_out:down_blocks.2.attentions.0.proj_out",
                         "up_blocks.1:up_blocks.0", "up_blocks.2:up_blocks.1", "up_blocks.3:up_blocks.2"]
    elif feat_loss == "mse":
        assert names == [f"up_blocks.{i}" for i in range(4)] + [f"down_blocks.{i}" for i in range(4)]
    tr.train(until_step=1)
    rec = read_metrics(tmp_path)[-1]
    assert rec["feat_loss"] > 0 and torch.isfinite(torch.tensor(rec["loss"]))


def test_feature_pairs_with_different_names_and_a_ddp_style_wrapper(tmp_path, assets):
    tr = Trainer(make_config(tmp_path, assets, student_arch="bk_tiny", lambda_kd_feat=1.0,
                             kd_feat_layers="up_blocks.2:up_blocks.1,down_blocks.0")).setup()

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel does to names: module.<name>
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    tr.loss_fn.student = Wrapper(tr.loss_fn.student)
    x = torch.stack([tr.dataset[i]["pixel_values"] for i in range(4)])
    latents, cond = tr.encoders.encode_batch(x, {"caption": CAPTIONS[:4]}, torch.Generator().manual_seed(0))
    out = tr.loss_fn(latents, cond, torch.Generator().manual_seed(1), 0)
    assert float(out.terms["feat_loss"]) > 0
    with pytest.raises(ConfigError, match=r"'up_blocks.9' is not a module of the teacher"):
        Trainer(make_config(tmp_path / "x", assets, lambda_kd_feat=1.0, kd_feat_layers="up_blocks.9")).setup()


def test_lift_place_feature_loss_refuses_maps_smaller_than_a_group(tmp_path, assets):
    tr = Trainer(make_config(tmp_path, assets, lambda_kd_feat=1.0, kd_feat_layers="down_blocks.3",
                             kd_feat_loss="lift_place")).setup()
    with pytest.raises(ValueError, match=r"feature 'down_blocks.3' .* fewer than group_size=16"):
        tr.train(until_step=1)


def test_bk_sdm_preset_sits_under_file_and_flags(tmp_path, assets):
    cfg = make_config(tmp_path, assets, preset="bk_sdm", learning_rate=1e-4)
    assert (cfg.kd_reduction, cfg.lambda_kd_feat, cfg.kd_feat_layers, cfg.lr_scheduler, cfg.use_ema) == \
        ("mean", 1.0, "bk_sdm", "constant", False)
    assert cfg.learning_rate == 1e-4  # the command line wins over the preset


# --- latent cache ------------------------------------------------------------------------------

def test_latent_cache_matches_encoding_and_is_rebuilt_for_another_vae(tmp_path, assets, caplog):
    from diffusers import AutoencoderKL

    kw = dict(max_train_steps=3, random_flip=True, latent_cache_dir=str(tmp_path / "cache"), use_ema=False)
    distill(make_config(tmp_path / "plain", assets, **kw), end_of_run=[])
    distill(make_config(tmp_path / "cached", assets, cache_latents=True, **kw), end_of_run=[])
    plain = [r["loss"] for r in read_metrics(tmp_path / "plain")]
    cached = [r["loss"] for r in read_metrics(tmp_path / "cached")]
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain))  # batched encoding may round apart
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["flips"] is True
    # the same VAE again: the cache is reused as it is
    stamp = (tmp_path / "cache" / "posteriors.safetensors").stat().st_mtime_ns
    distill(make_config(tmp_path / "again", assets, cache_latents=True, **kw), end_of_run=[])
    assert (tmp_path / "cache" / "posteriors.safetensors").stat().st_mtime_ns == stamp
    # another VAE (other weights): re-encoded, never reused
    other = tmp_path / "vae2"
    vae = AutoencoderKL.from_pretrained(str(assets[0] / "vae"))
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(2)
    vae.save_pretrained(str(other))
    with caplog.at_level("WARNING"):
        distill(make_config(tmp_path / "other", assets, cache_latents=True, pretrained_vae_model_name_or_path=str(other),
                            **kw), end_of_run=[])
    assert "made with another VAE or data (vae_sha256 differ)" in caplog.text
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["vae_sha256"] != manifest["vae_sha256"]


# --- diffusers' training flags ----------------------------------------------------------------------

def test_snr_gamma_noise_offset_and_gradient_checkpointing(tmp_path, assets):
    from liftplace.train.objective import min_snr_weights

    tr = Trainer(make_config(tmp_path, assets, snr_gamma=5.0, noise_offset=0.1, gradient_checkpointing=True,
                             allow_tf32=True, use_ema=False)).setup()
    assert tr.student.is_gradient_checkpointing
    t = torch.tensor([1, 500, 999])
    w = min_snr_weights(tr.noise_scheduler, t, 5.0, "epsilon")
    assert w[0] < 1 and torch.allclose(w[2], torch.tensor(1.0))  # high SNR capped, low SNR unweighted
    res = tr.train(until_step=2)
    assert res.global_step == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(tmp_path))
    from liftplace.train.objective import NoiseObjective

    clean = torch.zeros(2, 4, 8, 8)
    plain = NoiseObjective(tr.noise_scheduler).prepare(clean, torch.Generator().manual_seed(0))[2]
    offset = tr.objective.prepare(clean, torch.Generator().manual_seed(0))[2]
    diff = offset - plain  # the offset: one constant per sample and channel
    assert diff.abs().max() > 0 and torch.allclose(diff, diff[..., :1, :1].expand_as(diff), atol=1e-6)


def test_auto_model_type_is_recorded_as_the_family_resolved(tmp_path, assets):
    tr = Trainer(make_config(tmp_path, assets)).setup()
    assert tr.cfg.model_type == "unet2d_condition"  # config.yaml and checkpoints name the family, not 'auto'


def test_prompt_embedding_cache_trains_like_no_cache(tmp_path, assets):
    kw = dict(max_train_steps=2, cond_drop_prob=0.5, use_ema=False)
    distill(make_config(tmp_path / "plain", assets, **kw), end_of_run=[])
    tr = Trainer(make_config(tmp_path / "cached", assets, cache_prompt_embeds=True, **kw), end_of_run=[])
    tr.train()
    plain = [r["loss"] for r in read_metrics(tmp_path / "plain")]
    cached = [r["loss"] for r in read_metrics(tmp_path / "cached")]
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain))
    assert set(tr.encoders.prompt_cache) <= set(CAPTIONS) | {""} and len(tr.encoders.prompt_cache) >= 2
