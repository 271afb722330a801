"""The ``liftplace`` command line: help texts, distill/train-teacher/sample, and the demo."""

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

import liftplace  # noqa: E402
from liftplace.cli import main  # noqa: E402
from liftplace.train import TrainConfig, build_config  # noqa: E402

PKG_PARENT = str(Path(liftplace.__file__).resolve().parent.parent)
REPO = Path(__file__).resolve().parent.parent
TINY_YAML = """\
dataset_name: synthetic
teacher_config:
  sample_size: 16
  in_channels: 1
  out_channels: 1
  block_out_channels: [8, 16]
  layers_per_block: 1
  down_block_types: [DownBlock2D, DownBlock2D]
  up_block_types: [UpBlock2D, UpBlock2D]
  norm_num_groups: 4
student_width_mult: 0.5
train_batch_size: 4
max_train_steps: 100
logging_steps: 1
validation_steps: 0
num_validation_images: 4
ddpm_num_inference_steps: 2
report_to: none
progress_bar: false
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "liftplace", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("sub", [None, "distill", "train-teacher", "sample", "demo"])
def test_help_of_every_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main(([sub] if sub else []) + ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    if sub is None:
        assert all(s in text for s in ("distill", "train-teacher", "sample", "demo"))
    elif sub in ("distill", "train-teacher"):
        for f in dataclasses.fields(TrainConfig):  # every config key is a documented flag
            assert f"--{f.name}" in text, f.name
        assert "--config" in text and "Default:" in text
    elif sub == "sample":
        assert all(s in text for s in ("--model", "--num_images", "--batch_size", "--seed", "--output_dir"))
    else:
        assert "--quick" in text and "report" in text


def test_unknown_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distil"])
    assert exc.value.code == 2 and "invalid choice: 'distil'" in capsys.readouterr().err


def test_python_m_liftplace():
    res = run_cli("--help", timeout=120)
    assert res.returncode == 0 and "train-teacher" in res.stdout


def test_distill_yaml_cli_precedence_then_sample(tmp_path, capsys):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(TINY_YAML + "learning_rate: 0.01\n")
    out = tmp_path / "run"
    rc = main(["distill", "--config", str(cfg_file), "--max_train_steps", "3", "--output_dir", str(out),
               "--kd_loss", "lift", "--checkpointing_steps", "3"])
    assert rc == 0
    resolved = build_config(out / "config.yaml")
    assert resolved.max_train_steps == 3 and resolved.kd_loss == "lift"  # command line over file
    assert resolved.learning_rate == 0.01 and resolved.train_batch_size == 4  # file over defaults
    assert resolved.kd_norm == "l1"  # default
    assert "final model:" in capsys.readouterr().out

    for model, n in ((out / "student", 3), (out / "checkpoint-3", 2)):
        dest = tmp_path / f"samples_{model.name}"
        rc = main(["sample", "--model", str(model), "--num_images", str(n), "--batch_size", "2",
                   "--num_inference_steps", "2", "--output_dir", str(dest)])
        assert rc == 0
        assert sorted(p.name for p in dest.glob("*.png")) == [f"{i:06d}.png" for i in range(n)] + ["grid.png"]


def test_train_teacher_cli(tmp_path):
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text(TINY_YAML.replace("student_width_mult: 0.5\n", ""))
    out = tmp_path / "teacher_run"
    assert main(["train-teacher", "--config", str(cfg_file), "--max_train_steps", "2", "--output_dir", str(out),
                 "--export_dtype", "fp16"]) == 0
    from safetensors.torch import load_file

    weights = load_file(str(out / "teacher" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert (out / "teacher" / "scheduler_config.json").is_file()
    assert main(["train-teacher", "--config", str(cfg_file), "--kd_loss", "place", "--output_dir", str(out)]) == 2


def test_run_whose_steps_are_all_skipped_exits_non_zero(tmp_path, capsys, monkeypatch):
    from liftplace.train.objective import DistillationLoss

    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(TINY_YAML)
    out = tmp_path / "run"
    flags = ["distill", "--config", str(cfg_file), "--output_dir", str(out), "--checkpointing_steps", "2",
             "--max_bad_steps", "100"]
    assert main(flags + ["--max_train_steps", "2"]) == 0
    capsys.readouterr()
    real = DistillationLoss.teacher_output
    nan_from = {"call": 10 ** 9}
    calls = []

    def teacher_output(self, noisy, timesteps, cond):
        calls.append(1)
        y = real(self, noisy, timesteps, cond)
        return y * float("nan") if len(calls) >= nan_from["call"] else y
    monkeypatch.setattr(DistillationLoss, "teacher_output", teacher_output)
    nan_from["call"] = 1  # every step of the resumed run (steps 3 and 4) is skipped
    rc = main(flags + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    err = capsys.readouterr().err
    assert rc == 1 and "every one of the 2 steps of this run" in err, err
    calls.clear()
    nan_from["call"] = 2  # one good step, then skipped ones: the run did something
    assert main(flags + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"]) == 0


def test_cli_errors_name_the_key(tmp_path, capsys):
    assert main(["distill", "--learning_rat", "0.1"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_batch_size: [1]\n")
    assert main(["distill", "--config", str(bad)]) == 2
    assert "'train_batch_size' must be int" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--train_batch_size", "many"])
    assert exc.value.code == 2
    assert main(["distill", "--kd_loss", "place", "--output_dir", str(tmp_path / "x")]) == 2
    assert "needs a teacher" in capsys.readouterr().err


def test_example_configs_are_valid():
    from liftplace.eval.demo import DEMO_BASE

    files = sorted((REPO / "configs").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        overrides = {"pretrained_model_name_or_path": "builtin:digits"} if "folder" in f.name else None
        build_config(f, overrides)
    place = build_config(REPO / "configs" / "digits_place.yaml")
    for key, value in DEMO_BASE.items():  # the documented config is what the demo runs
        if key not in ("validation_steps", "checkpointing_steps"):
            assert getattr(place, key) == value, key


def _report_numbers(text):
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    values = []
    for line in rows[1:]:
        for cell in line.strip("|").split("|")[1:]:
            cell = cell.strip().replace(",", "").rstrip("%").strip()
            if re.fullmatch(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?", cell):
                values.append(float(cell))
            elif cell.lower() in ("nan", "inf", "-inf"):
                values.append(float(cell))
    return values


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    res = run_cli("demo", "--quick", "--output_dir", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = out / "report.md"
    assert str(report.resolve()) in res.stdout
    text = report.read_text()
    for name in ("samples_real.png", "samples_teacher.png", "samples_output_kd.png", "samples_place.png",
                 "samples_place_anneal.png", "training_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
        assert name in text
    for label in ("teacher", "output KD", "PLACE (paper)", "PLACE + coarse anneal", "real held-out"):
        assert label in text
    numbers = _report_numbers(text)
    assert len(numbers) > 40 and all(math.isfinite(v) for v in numbers)
    assert "held-out accuracy" in text and "liftplace demo --quick" in text
