"""Students made from the teacher: Torch-Pruning students (student_init=prune) and copied-block
students (student_init=copy) of a tiny UNet2DModel teacher, built in memory."""

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
tp = pytest.importorskip("torch_pruning")

from diffusers import UNet2DModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from liftplace.train import ConfigError, Trainer, build_config  # noqa: E402
from liftplace.train.models import count_parameters, load_pretrained, get_family, model_config_dict  # noqa: E402
from liftplace.train.prune import (PRUNED_CLASS_NAME, check_subset, make_copy_student,  # noqa: E402
                                   prune_unet, pruned_model_class)
from liftplace.train.sampling import ddim_sample, ddim_scheduler_from, load_for_sampling  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# two stages of 16/32 channels, GroupNorm 8 (2 and 4 channels per group), mid-block attention (4 heads of 8)
TEACHER = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[16, 32], layers_per_block=2,
               down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
               norm_num_groups=8, attention_head_dim=8)


def make_teacher(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel.from_config(TEACHER).eval()


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.tensor([0, 500, 999][:n])


def make_config(out, **kw):
    base = dict(output_dir=str(out), teacher_config=TEACHER, dataset_name="synthetic", train_batch_size=4,
                max_train_steps=4, logging_steps=1, checkpointing_steps=2, validation_steps=0,
                num_validation_images=2, ddpm_num_inference_steps=2, report_to="none", progress_bar=False,
                student_init="prune", pruning_ratio=0.5, kd_loss="place")
    base.update(kw)
    return build_config(None, base)


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_pruned_student_runs_with_the_teachers_output_shape(importance):
    teacher = make_teacher()
    student, record = prune_unet(teacher, 0.5, importance, verbose=False)
    x, t = inputs()
    with torch.no_grad():
        y = student(x, t).sample
    assert y.shape == teacher(x, t).sample.shape == x.shape
    assert torch.isfinite(y).all()
    assert type(student).__name__ == PRUNED_CLASS_NAME and isinstance(student, UNet2DModel)
    assert student.conv_in.out_channels == 8 and student.down_blocks[1].resnets[0].conv1.out_channels == 16
    assert student.conv_out.out_channels == 1  # the sample's channels are never pruned


def test_taylor_importance_uses_diffusion_loss_gradients():
    from diffusers import DDPMScheduler

    teacher = make_teacher()
    calib = [torch.rand(4, 1, 16, 16) * 2 - 1 for _ in range(2)]
    student, record = prune_unet(teacher, 0.5, "taylor", calibration=calib, scheduler=DDPMScheduler(), verbose=False)
    assert record["taylor_timesteps"] >= 1
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is left untouched
    check_subset(teacher, student, record)
    again, record2 = prune_unet(teacher, 0.5, "taylor", calibration=calib, scheduler=DDPMScheduler(), verbose=False)
    assert record2["index_map"] == record["index_map"]  # deterministic: a resumed run rebuilds the same student
    with pytest.raises(ConfigError, match="calibration"):
        prune_unet(teacher, 0.5, "taylor", verbose=False)


def test_pruned_weights_are_a_subset_of_the_teachers_at_the_recorded_indices():
    teacher = make_teacher()
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, record = prune_unet(teacher, 0.5, "magnitude", verbose=False)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in snapshot.items())  # teacher unchanged
    check_subset(teacher, student, record)
    # by hand, for one conv: student weight == teacher weight[out][:, in]
    keep = record["index_map"]["down_blocks.1.resnets.0.conv1"]
    assert len(keep["out"]) == 16 and len(keep["in"]) == 8
    assert sorted(keep["out"]) == keep["out"] and set(keep["out"]) <= set(range(32))
    w_t = teacher.down_blocks[1].resnets[0].conv1.weight
    assert torch.equal(student.down_blocks[1].resnets[0].conv1.weight, w_t[keep["out"]][:, keep["in"]])
    # a tampered student is caught
    with torch.no_grad():
        student.down_blocks[1].resnets[0].conv1.weight[0, 0, 0, 0] += 1
    with pytest.raises(AssertionError, match="conv1.weight"):
        check_subset(teacher, student, record)


def test_magnitude_keeps_the_largest_channels():
    teacher = make_teacher()
    student, record = prune_unet(teacher, 0.5, "magnitude", verbose=False)
    # conv_in's output is coupled to its GroupNorm and the next convs; the kept channels are a subset, and the
    # record's count is the layer's width
    assert len(record["index_map"]["conv_in"]["out"]) == student.conv_in.out_channels


def test_share_reached_is_reported_and_equals_the_parameter_count(capsys):
    teacher = make_teacher()
    student, record = prune_unet(teacher, 0.5, "magnitude", verbose=True)
    printed = capsys.readouterr().out
    n_t, n_s = count_parameters(teacher), count_parameters(student)
    assert record["parameters"] == n_s and record["teacher_parameters"] == n_t
    assert record["parameter_share"] == pytest.approx(n_s / n_t)
    assert f"{100 * n_s / n_t:.2f} %" in printed and f"{n_s:,}" in printed and "requested" in printed
    assert 0.2 < record["parameter_share"] < 0.3  # about (1 - 0.5)^2


def test_a_ratio_that_would_empty_a_group_is_refused_never_skipped():
    teacher = make_teacher()
    # 0.9: the 4 attention heads of 8 dims would keep int(8 * 0.1) = 0 dims each; Torch-Pruning skips such a group
    with pytest.raises(ConfigError, match=r"pruning_ratio=0.9 .*skipped.*pruning_ratio <= 0\.8"):
        prune_unet(teacher, 0.9, "magnitude", verbose=False)
    # without attention: 16 channels x 0.1 -> 1 channel, which no GroupNorm group can hold
    cfg = dict(TEACHER, add_attention=False)
    with pytest.raises(ConfigError, match="GroupNorm .* 1 channel"):
        prune_unet(UNet2DModel.from_config(cfg), 0.9, "magnitude", verbose=False)
    with pytest.raises(ConfigError, match="pruning_ratio must be in"):
        prune_unet(teacher, 1.0, "magnitude", verbose=False)


def test_groupnorm_is_regrouped_to_two_channels_per_group_and_exported():
    teacher = make_teacher()
    student, record = prune_unet(teacher, 0.5, "magnitude", verbose=False)
    # 16 -> 8 channels with 8 groups would be 1 channel per group (instance norm): 4 groups of 2
    norms = {n: m for n, m in student.named_modules() if isinstance(m, nn.GroupNorm)}
    assert all(m.num_channels // m.num_groups >= 2 and m.num_channels % m.num_groups == 0 for m in norms.values())
    assert norms["conv_norm_out"].num_channels == 8 and norms["conv_norm_out"].num_groups == 4
    assert record["regrouped_norms"]["conv_norm_out"] == [8, 4, 8]
    # the exported config carries the groups
    cfg = model_config_dict(student)
    assert cfg["pruning"]["modules"]["conv_norm_out"] == {"type": "GroupNorm", "num_groups": 4, "num_channels": 8}


def test_stale_channel_attributes_are_fixed():
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    student, _ = prune_unet(make_teacher(), 0.5, "magnitude", verbose=False)
    samplers = [m for m in student.modules() if isinstance(m, (Upsample2D, Downsample2D))]
    assert samplers and all(m.channels == m.conv.in_channels and m.out_channels == m.conv.out_channels
                            for m in samplers)
    assert all(m.out_channels == m.conv2.out_channels and m.in_channels == m.conv1.in_channels
               for m in student.modules() if isinstance(m, ResnetBlock2D))
    attn = student.mid_block.attentions[0]
    assert attn.heads == 4 and attn.to_q.out_features == 16  # 4 heads of 4 dims: heads stay, dims shrink


def test_save_load_forward_bitwise_through_the_projects_loaders(tmp_path):
    student, record = prune_unet(make_teacher(), 0.5, "magnitude", verbose=False)
    student.save_pretrained(tmp_path / "m", safe_serialization=True)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["_class_name"] == PRUNED_CLASS_NAME and saved["pruning"]["modules"] == record["modules"]
    assert not list((tmp_path / "m").glob("*.bin")) and not list((tmp_path / "m").glob("*.pt"))
    assert set(load_file(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))) == set(student.state_dict())
    loaded = load_pretrained(tmp_path / "m", get_family("unet2d"), "test")
    assert type(loaded).__name__ == PRUNED_CLASS_NAME
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, student(x, t).sample)
    # rebuilt from the config alone (no weights): the same architecture
    rebuilt = pruned_model_class().from_config(saved)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}


def test_no_torch_load_of_pickled_modules_anywhere():
    """Every torch.load in the package is weights_only=True; nothing pickles a module."""
    root = Path(__import__("liftplace").__file__).resolve().parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: {m.group(0)}"
        assert "import pickle" not in text and "torch.save(model" not in text, path


def test_distill_a_pruned_student_resume_sample_export(tmp_path):
    """Checkpoints (student, EMA, FitNet adapters), resume equal to the uninterrupted run, sampling
    and export of a pruned student; FitNet pairs follow the teacher's block names."""
    kw = dict(lambda_kd_feat=1e-3, kd_feat_layers="all", use_ema=True)
    full = Trainer(make_config(tmp_path / "full", **kw)).train()
    first = Trainer(make_config(tmp_path / "resumed", **kw))
    first.train(until_step=2)
    ckpt = tmp_path / "resumed" / "checkpoint-2"
    assert (ckpt / "adapters.safetensors").is_file()
    saved_adapters = load_file(str(ckpt / "adapters.safetensors"))
    names = first.accelerator.unwrap_model(first.adapters).names
    assert set(names) == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}
    ad = first.accelerator.unwrap_model(first.adapters).adapters
    assert ad["mid_block"].in_channels == 16 and ad["mid_block"].out_channels == 32  # student -> teacher width
    second = Trainer(make_config(tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    second.setup()
    second.load_checkpoint(ckpt)
    restored = second.accelerator.unwrap_model(second.adapters).state_dict()
    assert all(torch.equal(restored[k], v) for k, v in saved_adapters.items())
    res = Trainer(make_config(tmp_path / "resumed", resume_from_checkpoint="latest", **kw)).train()
    a = load_file(str(full.model_dir / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(res.model_dir / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa = load_file(str(tmp_path / "full" / "checkpoint-4" / "adapters.safetensors"))
    fb = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "adapters.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    fam, model, sched, _ = load_for_sampling(tmp_path / "resumed")
    assert type(model).__name__ == PRUNED_CLASS_NAME
    x = ddim_sample(fam, model, ddim_scheduler_from(sched), 2, (1, 16, 16), num_inference_steps=2)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    # the checkpoint's EMA loads with the loaders too
    _, ema, _, _ = load_for_sampling(tmp_path / "resumed" / "checkpoint-4")
    assert type(ema).__name__ == PRUNED_CLASS_NAME
    # a pruned export initialises another run's student
    more = Trainer(make_config(tmp_path / "more", student_init="random",
                               student_model_name_or_path=str(res.model_dir))).setup()
    assert count_parameters(more.student) == res.student_params


def test_copy_student_keeps_a_subset_of_resnets_with_the_teachers_weights(tmp_path):
    teacher = make_teacher()
    cfg = make_config(tmp_path, student_init="copy", student_layers_per_block=1)
    student = make_copy_student(cfg, teacher, verbose=False)
    assert student.config.layers_per_block == 1 and student.config.block_out_channels == [16, 32]
    assert len(student.up_blocks[0].resnets) == 2
    t = teacher.state_dict()
    s = student.state_dict()
    assert torch.equal(s["down_blocks.0.resnets.0.conv1.weight"], t["down_blocks.0.resnets.0.conv1.weight"])
    # up stages keep their first and last resnet (the last takes the stage's input skip)
    assert torch.equal(s["up_blocks.0.resnets.1.conv1.weight"], t["up_blocks.0.resnets.2.conv1.weight"])
    assert torch.equal(s["mid_block.attentions.0.to_q.weight"], t["mid_block.attentions.0.to_q.weight"])
    x, tt = inputs()
    with torch.no_grad():
        assert student(x, tt).sample.shape == x.shape
    tr = Trainer(cfg).setup()  # through the trainer: the student is copied from the run's teacher
    assert count_parameters(tr.student) == count_parameters(student)
    name = "down_blocks.1.resnets.0.conv2.weight"
    assert torch.equal(tr.student.state_dict()[name], tr.teacher.state_dict()[name])


@pytest.mark.parametrize("bad, match", [
    (dict(student_config=TEACHER), "student_init=prune .* unset student_config"),
    (dict(student_arch="bk_base"), "unset student_arch"),
    (dict(pruning_ratio=1.0), "pruning_ratio must be in"),
    (dict(pruning_ratio=-0.1), "pruning_ratio must be in"),
    (dict(pruning_importance="l1"), "pruning_importance must be one of"),
    (dict(student_init="shrink"), "student_init must be one of"),
])
def test_bad_pruning_settings_name_the_key(tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        make_config(tmp_path, **bad)


def test_prune_refuses_a_non_unet2d_teacher(tmp_path):
    with pytest.raises(ConfigError, match="UNet2DModel"):
        prune_unet(nn.Linear(2, 2), 0.5)


def test_copy_cannot_drop_stages_of_a_unet2d(tmp_path):
    # UNet2DModel's outer up block takes the removed stage's width as input: no teacher weight fits it
    with pytest.raises(ConfigError, match="student_init=copy"):
        Trainer(make_config(tmp_path, student_init="copy", student_arch="custom:down=1;mid=0")).setup()
