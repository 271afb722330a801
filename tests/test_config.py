"""Trainer config: values that only the model or the loss would reject are refused up front,
naming the config key; the key table in docs/TRAINER.md is the generated one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from liftplace.cli import main  # noqa: E402
from liftplace.train import ConfigError, Trainer, build_config  # noqa: E402
from liftplace.train import config as config_module  # noqa: E402
from liftplace.train import build as build_module  # noqa: E402
from liftplace.train import trainer as trainer_module  # noqa: E402
from liftplace.train.config import config_help_table, validate_against_model  # noqa: E402

from testing import TINY_UNET  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
THREE_DOWN = dict(TINY_UNET, block_out_channels=[8, 16, 16], down_block_types=["DownBlock2D"] * 3,
                  up_block_types=["UpBlock2D"] * 3)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), teacher_config=TINY_UNET, dataset_name="synthetic",
                train_batch_size=4, max_train_steps=2, validation_steps=0, report_to="none", progress_bar=False,
                student_width_mult=0.5)
    base.update(kw)
    return build_config(None, base)


@pytest.mark.parametrize("kw, message", [
    (dict(kd_num_buckets=0), r"kd_num_buckets must be between 1 and ddpm_num_steps \(1000\).*got 0"),
    (dict(kd_num_buckets=-3), "kd_num_buckets must be between 1"),
    (dict(kd_num_buckets=101, ddpm_num_steps=100), r"kd_num_buckets must be between 1 and ddpm_num_steps \(100\)"),
    (dict(kd_bucket_ema=1.0), r"kd_bucket_ema must be in \[0, 1\)"),
    (dict(kd_bucket_ema=-0.1), r"kd_bucket_ema must be in \[0, 1\)"),
    (dict(kd_bucket_ema=float("nan")), r"kd_bucket_ema must be in \[0, 1\)"),
    (dict(group_size=300), r"group_size=300 is larger than a row of the model output: .*16x16 sample "
                           r"\(resolution=16\) has 256 elements; set group_size <= 256"),
    (dict(group_size=80, resolution=8, kd_loss="output"), "group_size=80 is larger than a row"),
    (dict(group_size=15, kd_grouping="patch"), "kd_grouping=patch .*group_size must be a perfect square.*got 15"),
    (dict(group_size=64, kd_grouping="patch", resolution=12),
     r"group_size=64 tiles 8x8 patches: resolution must be a multiple of 8, got 12"),
])
def test_config_values_only_the_loss_would_reject_name_the_key(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **kw)


def test_group_size_is_free_where_no_groups_are_formed(tmp_path):
    config(tmp_path, group_size=300, kd_grouping="global")
    config(tmp_path, group_size=300, kd_loss="none", lambda_kd_feat=0.0)
    config(tmp_path, kd_num_buckets=1000, kd_bucket_ema=0.0)


def _no_build(*args, **kwargs):
    raise AssertionError("a model was built before the config was checked against it")


@pytest.mark.parametrize("kw, key", [
    (dict(teacher_config=THREE_DOWN, resolution=18), "teacher_config"),
    (dict(student_config=THREE_DOWN, resolution=10), "student_config"),
    (dict(teacher_config=None, pretrained_model_name_or_path="builtin:digits", resolution=18),
     "pretrained_model_name_or_path"),
])
def test_resolution_the_unet_cannot_take_is_refused_before_building(tmp_path, monkeypatch, kw, key):
    monkeypatch.setattr(build_module, "build_from_config", _no_build)
    monkeypatch.setattr(build_module, "load_pretrained", _no_build)
    monkeypatch.setattr(trainer_module, "_make_accelerator", _no_build)
    with pytest.raises(ConfigError, match=rf"resolution={kw['resolution']} does not fit the model (of|in) {key}.*: its 3 "
                                          r"down blocks \(down_block_types\) halve the sample 2 times, so resolution "
                                          r"must be a multiple of 4"):
        Trainer(config(tmp_path, **kw)).setup()


def test_resolution_checked_for_train_teacher_and_models_passed_in(tmp_path, monkeypatch):
    from diffusers import UNet2DModel

    cfg = config(tmp_path, kd_loss="none", resolution=18, teacher_config=THREE_DOWN)
    monkeypatch.setattr(trainer_module, "_make_accelerator", _no_build)
    with pytest.raises(ConfigError, match="resolution=18 does not fit the model of teacher_config"):
        Trainer(cfg, role="teacher").setup()
    model = UNet2DModel.from_config(THREE_DOWN)
    with pytest.raises(ConfigError, match="resolution=18 does not fit the teacher passed to Trainer"):
        Trainer(config(tmp_path, resolution=18), teacher=model).setup()


def test_validate_against_model_accepts_what_the_unet_takes(tmp_path):
    for r in (4, 8, 12, 16, 20):
        validate_against_model(config(tmp_path, resolution=r, group_size=16), THREE_DOWN, "teacher_config")
    validate_against_model(config(tmp_path, resolution=9), TINY_UNET | {"down_block_types": ["DownBlock2D"]}, "x")


def test_output_dir_naming_a_file_is_a_config_error(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir '.*notes\.txt' cannot be a folder: .* is not a folder"):
        config(tmp_path, output_dir=str(a_file))
    with pytest.raises(ConfigError, match=r"notes\.txt' is in its path"):
        config(tmp_path, output_dir=str(a_file / "run"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher_config: {json.dumps(TINY_UNET)}\ndataset_name: synthetic\n")
    assert main(["distill", "--config", str(cfg), "--output_dir", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "liftplace distill: error: output_dir" in err and "Traceback" not in err


def test_cli_reports_model_config_errors_without_traceback(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher_config: {json.dumps(THREE_DOWN)}\ndataset_name: synthetic\nresolution: 18\n"
                   "report_to: none\nprogress_bar: false\n")
    assert main(["distill", "--config", str(cfg), "--output_dir", str(tmp_path / "run")]) == 2
    assert "resolution=18 does not fit the model of teacher_config" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- the key table in docs/TRAINER.md ----------------------------------------------------------------

def test_trainer_doc_key_table_is_the_generated_one():
    doc = (REPO / "docs" / "TRAINER.md").read_text()
    assert doc.count(config_module.TABLE_START) == 1 and doc.count(config_module.TABLE_END) == 1
    between = doc.split(config_module.TABLE_START)[1].split(config_module.TABLE_END)[0]
    assert between.strip() == config_help_table(), (
        "docs/TRAINER.md's key table is stale: run `python -m liftplace.train.config_doc --update-doc docs/TRAINER.md`")
    for needle in ("`kd_num_buckets`", "`kd_bucket_ema`", "adaptive-timestep"):
        assert needle in between


def test_generated_table_has_one_row_per_key_and_escapes_pipes():
    rows = config_help_table().splitlines()[2:]
    assert len(rows) == len(config_module.dataclasses.fields(config_module.TrainConfig))
    for row in rows:  # "|a-1|" in a help text must not open new cells
        assert row.replace("\\|", "").count("|") == 4, row


def test_update_doc_command(tmp_path):
    doc = tmp_path / "T.md"
    doc.write_text(f"intro\n\n{config_module.TABLE_START}\nold\n{config_module.TABLE_END}\n\nafter\n")
    run = [sys.executable, "-m", "liftplace.train.config_doc"]
    assert subprocess.run(run + ["--update-doc", str(doc)], check=True).returncode == 0
    text = doc.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\nafter\n") and config_help_table() in text
    out = subprocess.run(run + ["--markdown"], check=True, capture_output=True, text=True).stdout
    assert out.strip() == config_help_table()
    doc.write_text("no markers\n")
    res = subprocess.run(run + ["--update-doc", str(doc)], capture_output=True, text=True)
    assert res.returncode != 0 and "config-table:start" in res.stderr
