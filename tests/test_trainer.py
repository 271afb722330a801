"""The distillation trainer on tiny in-memory models (CPU, seconds per test)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from liftplace.train import (CheckpointError, ConfigError, Trainer, TrainingDivergedError,  # noqa: E402
                             build_config, derive_student_config, distill)
from liftplace.train.checkpoint import list_checkpoints, read_verified_state  # noqa: E402
from liftplace.train.data import SyntheticDataset  # noqa: E402
from liftplace.train.models import UNet2DFamily, count_parameters, get_family  # noqa: E402
from liftplace.train.objective import TeacherOutputCache  # noqa: E402
from liftplace.train.sampling import ddim_sample, ddim_scheduler_from  # noqa: E402

from testing import TINY_UNET as TEACHER  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(out, **kw):
    base = dict(output_dir=str(out), teacher_config=TEACHER, dataset_name="synthetic", train_batch_size=4,
                max_train_steps=4, logging_steps=1, checkpointing_steps=100, validation_steps=0,
                num_validation_images=4, ddpm_num_inference_steps=2, student_width_mult=0.5, report_to="none",
                progress_bar=False, learning_rate=1e-3)
    base.update(kw)
    return build_config(None, base)


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- step level ---------------------------------------------------------------------------------

def test_one_step_changes_student_never_teacher(tmp_path):
    tr = Trainer(make_config(tmp_path, max_train_steps=1, use_ema=False)).setup()
    teacher0, student0 = snapshot(tr.teacher), snapshot(tr.student)
    tr.train()
    assert all(torch.equal(v, tr.teacher.state_dict()[k]) for k, v in teacher0.items())
    changed = [k for k, v in student0.items() if not torch.equal(v, tr.student.state_dict()[k])]
    assert len(changed) > len(student0) // 2
    assert not any(p.requires_grad for p in tr.teacher.parameters())
    assert not tr.teacher.training


def test_gradients_reach_only_student_and_adapters(tmp_path):
    tr = Trainer(make_config(tmp_path, lambda_kd_feat=1e-3, kd_feat_layers="all")).setup()
    batch = torch.stack([tr.dataset[i]["pixel_values"] for i in range(4)])
    out = tr.loss_fn(batch, {}, torch.Generator().manual_seed(0), 0)
    out.loss.backward()
    assert all(p.grad is None for p in tr.teacher.parameters())
    student_grads = [p.grad for p in tr.student.parameters()]
    assert all(g is not None for g in student_grads)
    assert sum(float(g.abs().sum()) for g in student_grads) > 0
    adapter_grads = [p.grad for p in tr.adapters.parameters()]
    assert adapter_grads and all(g is not None and float(g.abs().sum()) > 0 for g in adapter_grads)
    assert {"sd_loss", "kd_loss", "feat_loss", "kd_weight", "kd_slope_mean", "output_mse"} <= set(out.terms)


@pytest.mark.parametrize("kd_loss", ["place", "lift", "output", "none"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_kd_choice_and_prediction_type_runs(tmp_path, kd_loss, prediction_type):
    extra = {"kd_coarse_weight": "anneal"} if kd_loss == "place" and prediction_type == "sample" else {}
    tr = Trainer(make_config(tmp_path, kd_loss=kd_loss, prediction_type=prediction_type, **extra)).setup()
    batch = torch.stack([tr.dataset[i]["pixel_values"] for i in range(4)])
    out = tr.loss_fn(batch, {}, torch.Generator().manual_seed(0), 0, with_stats=True)
    assert math.isfinite(float(out.loss.detach()))
    out.loss.backward()
    if kd_loss == "none":
        assert "kd_loss" not in out.terms
    else:
        assert math.isfinite(float(out.terms["kd_loss"])) and "kd_slope_mean" in out.terms
        if "coarse_weight" in str(extra):
            assert float(out.terms["kd_coarse_weight"]) == pytest.approx(1 - float(out.terms["kd_weight"]))
    # same input, timesteps and target for every choice: the diffusion term does not depend on KD
    noisy, t, target = tr.objective.prepare(batch, torch.Generator().manual_seed(0))
    if prediction_type == "sample":
        assert torch.allclose(target, batch)


def test_bf16_autocast_step_runs(tmp_path):
    res = distill(make_config(tmp_path, max_train_steps=2, mixed_precision="bf16"))
    assert res.global_step == 2 and all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))


def test_derived_student_config_and_counts(capsys):
    teacher = dict(TEACHER, block_out_channels=[32, 64, 64], layers_per_block=2,
                   down_block_types=["DownBlock2D"] * 3, up_block_types=["UpBlock2D"] * 3, norm_num_groups=8)
    cfg = derive_student_config(teacher, width_mult=0.25, layers_per_block=1)
    assert cfg["block_out_channels"] == [8, 16, 16] and cfg["layers_per_block"] == 1
    assert cfg["norm_num_groups"] == 8
    printed = capsys.readouterr().out
    assert "1,539,329" in printed and "67," in printed and "compression" in printed
    no_attn = derive_student_config(teacher, width_mult=0.25, attention=False, verbose=False)
    assert no_attn["add_attention"] is False
    with pytest.raises(ConfigError, match="attention_head_dim"):
        derive_student_config(dict(teacher, block_out_channels=[32, 64, 40]), width_mult=0.25, verbose=False)


def test_sampling_seeds_do_not_depend_on_batch_size():
    from diffusers import DDPMScheduler

    fam = get_family("unet2d")
    torch.manual_seed(0)
    model = fam.model_class().from_config(TEACHER)
    sched = ddim_scheduler_from(DDPMScheduler().config)
    a = ddim_sample(fam, model, sched, 5, (1, 16, 16), seed=3, num_inference_steps=3, batch_size=5)
    b = ddim_sample(fam, model, sched, 5, (1, 16, 16), seed=3, num_inference_steps=3, batch_size=2)
    c = ddim_sample(fam, model, sched, 2, (1, 16, 16), seed=4, num_inference_steps=3, batch_size=1, eta=0.5)
    d = ddim_sample(fam, model, sched, 4, (1, 16, 16), seed=3, num_inference_steps=3, batch_size=4, eta=0.5)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c[0], d[1])
    assert a.shape == (5, 1, 16, 16) and a.abs().max() <= 1


# --- loop level ----------------------------------------------------------------------------------

def test_short_run_writes_metrics_checkpoint_grid_and_export(tmp_path):
    from diffusers import UNet2DModel

    res = distill(make_config(tmp_path, max_train_steps=4, logging_steps=2, checkpointing_steps=2,
                              validation_steps=2))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("loss", "sd_loss", "kd_loss", "kd_coarse", "kd_fine", "kd_weight", "kd_coarse_weight",
                "kd_slope_mean", "kd_intercept_mean", "kd_slope_absdev", "kd_intercept_absdev", "output_mse",
                "lr", "grad_norm", "step_time", "bad_steps"):
        assert key in rows[-1] and rows[-1][key] is not None and math.isfinite(rows[-1][key]), key
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ck in ("checkpoint-2", "checkpoint-4"):
        state = read_verified_state(tmp_path / ck)
        assert (tmp_path / ck / "student" / "diffusion_pytorch_model.safetensors").is_file()
        assert (tmp_path / ck / "student_ema" / "diffusion_pytorch_model.safetensors").is_file()
        assert "optimizer.pt" in state["manifest"] and "random_states.pt" in state["manifest"]
    assert (tmp_path / "samples" / "step-000002.png").is_file() and (tmp_path / "samples" / "step-000004.png").is_file()
    assert (tmp_path / "config.yaml").is_file()
    model = UNet2DModel.from_pretrained(res.model_dir)
    assert (res.model_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert count_parameters(model) == res.student_params < res.teacher_params
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_reproduces_uninterrupted_run(tmp_path, accum):
    kw = dict(max_train_steps=20, checkpointing_steps=10, gradient_accumulation_steps=accum, random_flip=True)
    distill(make_config(tmp_path / "straight", **kw))
    distill(make_config(tmp_path / "resumed", **kw), until_step=13)  # "crashes" after step 13
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == ["checkpoint-10"]
    distill(make_config(tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    straight = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight")]
    resumed = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "resumed")]
    assert len(straight) == 20
    assert resumed == straight  # bitwise: same data order, noise, optimizer and EMA state


def _nan_teacher_hook(bad_calls):
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] in bad_calls or bad_calls == "all":
            out = output[0] if isinstance(output, tuple) else output.sample
            out = out.clone()
            out[0, 0, 0, 0] = float("nan")
            return (out,)
        return output
    return hook


def test_nan_teacher_output_is_skipped_and_counted(tmp_path, caplog):
    tr = Trainer(make_config(tmp_path, max_train_steps=6, use_ema=True)).setup()
    tr.teacher.register_forward_hook(_nan_teacher_hook({3}))
    res = tr.train()
    rows = read_metrics(tmp_path)
    skipped = [r for r in rows if r["skipped"]]
    assert [r["step"] for r in skipped] == [3]
    assert rows[-1]["bad_steps"] == 1 and res.bad_steps == 1 and rows[-1]["consecutive_bad_steps"] == 0
    assert res.global_step == 6
    assert all(torch.isfinite(p).all() for p in tr.student.parameters())
    assert any("non-finite" in r.message for r in caplog.records)


def test_max_bad_steps_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    tr = Trainer(make_config(tmp_path, max_train_steps=10, checkpointing_steps=2, max_bad_steps=3)).setup()
    tr.teacher.register_forward_hook(_nan_teacher_hook(set(range(3, 100))))
    with pytest.raises(TrainingDivergedError, match=r"3 consecutive steps.*checkpoint-2"):
        tr.train()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    read_verified_state(tmp_path / "checkpoint-2")  # intact
    assert not (tmp_path / "student").exists()


def test_checkpoints_total_limit_prunes(tmp_path):
    distill(make_config(tmp_path, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]


def test_corrupt_or_mismatched_checkpoint_is_refused(tmp_path):
    distill(make_config(tmp_path, max_train_steps=2, checkpointing_steps=2))
    ck = tmp_path / "checkpoint-2"
    # a leftover temporary folder from a crash is never picked as "latest"
    shutil.copytree(ck, tmp_path / ".tmp-checkpoint-9-123")
    (tmp_path / ".tmp-checkpoint-9-123" / "trainer_state.json").unlink()

    broken = tmp_path / "broken"
    shutil.copytree(ck, broken / "checkpoint-2")
    weights = broken / "checkpoint-2" / "student" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors is corrupt"):
        distill(make_config(broken, max_train_steps=4, resume_from_checkpoint="latest"))

    with pytest.raises(CheckpointError, match=r"student/config\.json does not match the student: "
                                              r"'block_out_channels'"):
        distill(make_config(tmp_path, max_train_steps=4, student_width_mult=1.0, resume_from_checkpoint="latest"))
    with pytest.raises(CheckpointError, match=r"config\.yaml does not match this run: train_batch_size"):
        distill(make_config(tmp_path, max_train_steps=4, train_batch_size=2, resume_from_checkpoint="latest"))

    (ck / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        distill(make_config(tmp_path, max_train_steps=4, resume_from_checkpoint=str(ck)))


# --- config ---------------------------------------------------------------------------------------

def test_config_unknown_key_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rat: 0.001\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        build_config(f)
    with pytest.raises(ConfigError, match=r"did you mean 'kd_loss'"):
        build_config(None, {"kd_los": "place"})


def test_config_wrong_type_and_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train_batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'train_batch_size' must be int"):
        build_config(f)
    f.write_text("use_ema: 3\n")
    with pytest.raises(ConfigError, match="'use_ema' must be bool"):
        build_config(f)
    f.write_text("kd_loss: plac\nteacher_config: {}\n")
    with pytest.raises(ConfigError, match=r"kd_loss must be one of .*did you mean 'place'"):
        build_config(f)
    f.write_text("learning_rate: 1e-4\n")  # PyYAML reads this as a string; accepted for float keys
    assert build_config(f, {"kd_loss": "none", "teacher_config": None}).learning_rate == 1e-4
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_config(None, {"kd_loss": "place"})


def test_config_precedence_defaults_file_cli(tmp_path):
    from liftplace.cli import build_parser

    f = tmp_path / "c.yaml"
    f.write_text("kd_loss: output\nlearning_rate: 0.01\ntrain_batch_size: 8\nteacher_config: {}\n")
    args, unknown = build_parser().parse_known_args(["distill", "--config", str(f), "--learning_rate", "0.5",
                                                     "--use_ema", "false"])
    assert not unknown
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    cfg = build_config(args.config, overrides)
    assert cfg.learning_rate == 0.5 and cfg.kd_loss == "output" and cfg.train_batch_size == 8
    assert cfg.use_ema is False and cfg.max_train_steps == 1000  # a default
    cfg.save_yaml(tmp_path / "resolved.yaml")
    again = build_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_shared_teacher_cache_changes_nothing(tmp_path):
    cache = TeacherOutputCache()
    distill(make_config(tmp_path / "a", kd_loss="output", max_train_steps=3), teacher_cache=cache)
    assert cache.misses == 3 and cache.hits == 0
    distill(make_config(tmp_path / "b", kd_loss="place", max_train_steps=3), teacher_cache=cache)
    distill(make_config(tmp_path / "c", kd_loss="place", max_train_steps=3))
    assert cache.hits == 3
    def losses(run):  # everything but the timings
        return [{k: v for k, v in r.items() if k not in ("step_time", "samples_per_second")}
                for r in read_metrics(tmp_path / run)]
    assert losses("b") == losses("c")  # bitwise: cached teacher outputs equal recomputed ones


def test_teacher_cache_digest_covers_cond():
    cache = TeacherOutputCache()
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 5])
    assert cache.digest(x, t, {}) == cache.digest(x, t)
    assert cache.digest(x, t, {"label": torch.tensor([1, 2])}) != cache.digest(x, t, {"label": torch.tensor([1, 3])})
    calls = []

    def compute():
        calls.append(1)
        return x * len(calls)

    a = cache.fetch(x, t, {"label": torch.tensor([1, 2])}, compute, key=0)
    assert torch.equal(cache.fetch(x, t, {"label": torch.tensor([1, 2])}, compute, key=0), a) and len(calls) == 1
    b = cache.fetch(x, t, {"label": torch.tensor([1, 3])}, compute, key=0)  # same key, other cond: recomputed
    assert len(calls) == 2 and not torch.equal(a, b)


def test_teacher_in_bf16(tmp_path):
    tr = Trainer(make_config(tmp_path, teacher_dtype="bf16")).setup()
    assert next(tr.teacher.parameters()).dtype == torch.bfloat16
    batch = torch.stack([tr.dataset[i]["pixel_values"] for i in range(4)])
    out = tr.loss_fn(batch, {}, torch.Generator().manual_seed(0), 0)
    assert math.isfinite(float(out.loss.detach()))


def test_image_folder_dataset_rgb(tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    rgb = dict(TEACHER, in_channels=3, out_channels=3)
    res = distill(make_config(tmp_path / "run", teacher_config=rgb, train_data_dir=str(tmp_path / "images"),
                              random_flip=True, max_train_steps=2))
    assert res.global_step == 2 and all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))


# --- conditioning: batch -> family.forward --------------------------------------------------------

class _LabelledFamily(UNet2DFamily):
    """The U-Net family, taking each batch's "label" as conditioning and recording what it got."""

    name = "labelled-unet2d"
    cond_keys = ("label",)

    def __init__(self):
        self.calls = []

    def forward(self, model, noisy, timesteps, cond):
        self.calls.append((model, dict(cond)))
        return super().forward(model, noisy, timesteps, cond)


class _LabelledImages(torch.utils.data.Dataset):
    def __init__(self, n=8, with_label=True):
        self.images = SyntheticDataset(num_samples=n, resolution=16).images
        self.with_label = with_label

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = {"pixel_values": self.images[i]}
        if self.with_label:
            item["label"] = 100 + i
        return item


def test_cond_keys_flow_from_the_batch_to_teacher_and_student(tmp_path):
    family = _LabelledFamily()
    tr = Trainer(make_config(tmp_path, max_train_steps=2, use_ema=False), family=family,
                 train_dataset=_LabelledImages(), end_of_run=["export"]).setup()
    res = tr.train()
    expected = [torch.tensor(b) + 100 for b in tr.stream.epoch_batches(0)[:2]]
    for who in (tr.teacher, tr.student):
        seen = [cond["label"] for model, cond in family.calls if model is who]
        assert len(seen) == 2, who
        for got, want in zip(seen, expected):
            assert torch.equal(got.cpu(), want)
    # the end-of-run steps are the ones asked for: an export, no sample grid
    assert res.model_dir == tmp_path / "student" and res.model_dir.is_dir()
    assert not (tmp_path / "samples").exists()

    with pytest.raises(ConfigError, match=r"takes 'label' from the batch as conditioning.*pixel_values"):
        distill(make_config(tmp_path / "nolabel", max_train_steps=1), family=_LabelledFamily(),
                train_dataset=_LabelledImages(with_label=False))


def test_end_of_run_steps_are_chosen_by_the_caller(tmp_path):
    ran = []
    res = distill(make_config(tmp_path, max_train_steps=1, use_ema=False), end_of_run=[lambda tr: ran.append(tr)])
    assert len(ran) == 1 and res.model_dir is None and not (tmp_path / "student").exists()
    with pytest.raises(ValueError, match="unknown end-of-run step 'plot'"):
        Trainer(make_config(tmp_path), end_of_run=["plot"])


# --- resume with changed settings (issue 10) -------------------------------------------------------

def test_resume_applies_changed_optimizer_settings(tmp_path, caplog):
    kw = dict(max_train_steps=6, checkpointing_steps=3, lr_scheduler="cosine", lr_warmup_steps=0)
    distill(make_config(tmp_path, **kw), until_step=3)
    saved = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    changed = dict(learning_rate=1e-5, adam_beta1=0.5, adam_weight_decay=0.5, adam_epsilon=1e-6, ema_decay=0.5)
    tr = Trainer(make_config(tmp_path, resume_from_checkpoint="latest", **changed, **kw))
    tr.train(until_step=3)  # resume only: no step taken
    # the EMA keeps its weights and step count and takes the new decay
    ema_saved = load_file(str(tmp_path / "checkpoint-3" / "student_ema" / "diffusion_pytorch_model.safetensors"))
    names = [n for n, _ in tr.student.named_parameters()]
    assert all(torch.equal(p, ema_saved[n]) for n, p in zip(names, tr.ema.shadow_params))
    assert tr.ema.optimization_step == 3 and tr.ema.decay == 0.5
    for group in tr.optimizer.param_groups:
        assert group["betas"] == (0.5, 0.999) and group["weight_decay"] == 0.5 and group["eps"] == 1e-6
        assert group["initial_lr"] == 1e-5
    # the cosine schedule continues from step 3 of 6 at the new lr: factor 0.5 for step 4
    assert tr.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert tr.optimizer.param_groups[0]["lr"] == tr.lr_scheduler.get_last_lr()[0]
    # the moments are the checkpoint's
    state = tr.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], saved["state"][i]["exp_avg"]) for i in saved["state"])
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "learning_rate 0.001 -> 1e-05" in message and "adam_beta1 0.9 -> 0.5" in message
    assert "in effect from step 4" in message
    # config.yaml records what is in effect, and the next step uses it
    res = distill(make_config(tmp_path, resume_from_checkpoint="latest", **changed, **kw))
    assert build_config(tmp_path / "config.yaml").learning_rate == 1e-5
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path)}
    assert lrs[3] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 6)))
    assert lrs[4] == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert res.global_step == 6


def test_resume_with_more_steps_rebuilds_the_schedule(tmp_path):
    kw = dict(checkpointing_steps=4, lr_scheduler="linear", lr_warmup_steps=0)
    distill(make_config(tmp_path, max_train_steps=4, **kw))  # linear: lr reaches 0 after step 4
    distill(make_config(tmp_path, max_train_steps=8, resume_from_checkpoint="latest", **kw))
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path)}
    assert sorted(lrs) == list(range(1, 9))
    # step s runs at lr0 * (1 - (s - 1) / 8): the 8-step schedule from step 4 on
    for s in range(5, 9):
        assert lrs[s] > 0 and lrs[s] == pytest.approx(1e-3 * (1 - (s - 1) / 8)), s


# --- a run that trains nothing fails (issue 10) --------------------------------------------------

def test_run_whose_steps_are_all_skipped_raises(tmp_path):
    tr = Trainer(make_config(tmp_path, max_train_steps=3, checkpointing_steps=1, max_bad_steps=10)).setup()
    tr.teacher.register_forward_hook(_nan_teacher_hook(set(range(100))))
    with pytest.raises(TrainingDivergedError, match=r"every one of the 3 steps of this run \(steps 1-3\) was skipped"):
        tr.train()
    assert not (tmp_path / "student").exists() and not list_checkpoints(tmp_path)
    assert [r["skipped"] for r in read_metrics(tmp_path)] == [True, True, True]


def test_resumed_run_whose_steps_are_all_skipped_raises(tmp_path):
    distill(make_config(tmp_path, max_train_steps=4, checkpointing_steps=2), until_step=2)
    tr = Trainer(make_config(tmp_path, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"))
    tr.setup().teacher.register_forward_hook(_nan_teacher_hook(set(range(100))))
    with pytest.raises(TrainingDivergedError, match=r"every one of the 2 steps of this run \(steps 3-4\)"):
        tr.train()


def test_cli_exits_non_zero_when_every_step_is_skipped(tmp_path, capsys):
    from diffusers import UNet2DModel

    from liftplace.cli import main

    teacher = UNet2DModel.from_config(TEACHER)
    with torch.no_grad():
        teacher.conv_out.bias.fill_(float("nan"))  # every teacher output is NaN
    teacher.save_pretrained(tmp_path / "nan_teacher")
    rc = main(["distill", "--pretrained_model_name_or_path", str(tmp_path / "nan_teacher"), "--dataset_name",
               "synthetic", "--resolution", "16", "--train_batch_size", "4", "--max_train_steps", "2",
               "--student_width_mult", "0.5", "--validation_steps", "0", "--report_to", "none",
               "--progress_bar", "false", "--output_dir", str(tmp_path / "run")])
    assert rc == 1 and "every one of the 2 steps" in capsys.readouterr().err
    assert not (tmp_path / "run" / "student").exists()
