"""kd_weight="adaptive-timestep" in the trainer: per-bucket weights reach the loss and the logs."""

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from liftplace.train import Trainer, build_config  # noqa: E402

from testing import TINY_UNET as TEACHER  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(out, **kw):
    base = dict(output_dir=str(out), teacher_config=TEACHER, dataset_name="synthetic", train_batch_size=8,
                max_train_steps=3, logging_steps=1, checkpointing_steps=100, validation_steps=0,
                student_width_mult=0.5, report_to="none", progress_bar=False, learning_rate=1e-3,
                kd_num_buckets=4, ddpm_num_steps=100)
    base.update(kw)
    return build_config(None, base)


def test_adaptive_timestep_trains_and_logs_buckets(tmp_path):
    tr = Trainer(make_config(tmp_path, kd_weight="adaptive-timestep", kd_bucket_ema=0.5)).setup()
    tr.train()
    records = [json.loads(line) for line in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    weights = [last[f"kd_bucket_weight_{k}"] for k in range(4)]
    counts = [last[f"kd_bucket_count_{k}"] for k in range(4)]
    assert sum(counts) == 8
    assert all(0.0 <= w <= 1.0 for w in weights)
    # The EMA lives in the loss module's buffers and has seen the sampled buckets.
    module = tr.loss_fn.kd_module
    assert module.bucket_seen.any() and set(module.state_dict()) >= {"bucket_absdev", "bucket_seen"}


def test_other_weights_still_log_bucket_statistics(tmp_path):
    tr = Trainer(make_config(tmp_path, kd_weight="adaptive")).setup()
    tr.train()
    last = json.loads((Path(tmp_path) / "metrics.jsonl").read_text().splitlines()[-1])
    assert "kd_bucket_slope_absdev_0" in last and "kd_weight" in last


def test_bucket_heatmaps_from_metrics(tmp_path):
    from liftplace.eval.plots import plot_bucket_heatmaps

    tr = Trainer(make_config(tmp_path, kd_weight="adaptive-timestep")).setup()
    tr.train()
    paths = plot_bucket_heatmaps(tmp_path / "metrics.jsonl", tmp_path)
    assert [p.name for p in paths] == ["buckets_weight.png", "buckets_slope_absdev.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_resume_continues_the_bucket_ema(tmp_path):
    from liftplace.train import distill

    kw = dict(max_train_steps=8, checkpointing_steps=4, kd_weight="adaptive-timestep", kd_bucket_ema=0.8)
    distill(make_config(tmp_path / "straight", **kw))
    distill(make_config(tmp_path / "resumed", **kw), until_step=6)
    distill(make_config(tmp_path / "resumed", resume_from_checkpoint="latest", **kw))

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["kd_bucket_weight_1"]) for r in map(json.loads, lines)]

    assert len(losses("straight")) == 8
    assert losses("resumed") == losses("straight")  # bitwise, EMA included
    assert (tmp_path / "straight" / "checkpoint-8" / "kd_loss.safetensors").is_file()
