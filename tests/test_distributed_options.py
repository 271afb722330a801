"""Launch checks, the global micro-batch's randomness, the accelerate configs in configs/ and the
memory options (cast_teacher, gradient_checkpointing), in one process (fast)."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from liftplace.train import ConfigError, Trainer, build_config  # noqa: E402
from liftplace.train.distributed import (LaunchError, ShardedObjective, check_launch,  # noqa: E402
                                         check_scale_engine, mean_over_processes)
from liftplace.train.objective import NoiseObjective, make_noise_scheduler  # noqa: E402

from testing import TINY_UNET as TEACHER  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION",
               "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "PMI_SIZE",
               "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def make_config(out, **kw):
    base = dict(output_dir=str(out), teacher_config=TEACHER, dataset_name="synthetic", train_batch_size=4,
                max_train_steps=2, logging_steps=1, checkpointing_steps=100, validation_steps=0,
                num_validation_images=4, ddpm_num_inference_steps=2, student_width_mult=0.5, report_to="none",
                progress_bar=False)
    base.update(kw)
    return build_config(None, base)


def test_one_process_launch_is_fine(clean_env):
    check_launch(1, "NO")


def test_torchrun_without_accelerate_use_cpu_is_refused_with_the_cpu_recipe(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "0")
    with pytest.raises(LaunchError, match=r"2 processes were started .* single-process job .* Nothing was written; "
                                          r"on CPU run `ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2"):
        check_launch(1, "NO")


def test_accelerate_simple_launcher_with_several_processes_is_refused(clean_env):
    # what `accelerate launch --cpu --num_processes 2` leaves in the environment of its one process
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    clean_env.setenv("ACCELERATE_USE_CPU", "True")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", "29500")
    with pytest.raises(LaunchError, match="started only this one"):
        check_launch(1, "NO")


def test_world_sizes_that_disagree_are_refused(clean_env):
    clean_env.setenv("WORLD_SIZE", "4")
    with pytest.raises(LaunchError, match="WORLD_SIZE is 4"):
        check_launch(2, "MULTI_GPU")


@pytest.mark.parametrize("flag,engine", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")])
def test_sharding_engine_asked_for_but_not_running_is_refused(clean_env, flag, engine):
    clean_env.setenv(flag, "true")
    with pytest.raises(LaunchError, match=f"asked for {engine}.*accelerate runs MULTI_CPU.*GPUs only"):
        check_launch(2, "MULTI_CPU")


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_fsdp_and_deepspeed_are_refused_with_the_reason(engine):
    with pytest.raises(LaunchError, match=f"accelerate runs {engine}, which this trainer does not support yet"):
        check_scale_engine(engine)
    check_scale_engine("MULTI_GPU")


@pytest.mark.parametrize("name", ["multi_gpu", "multi_node", "fsdp", "deepspeed_zero2"])
def test_accelerate_configs_load(name):
    """configs/accelerate/: accelerate config files (not liftplace configs, hence their own folder)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    kind = {"fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}.get(name, "MULTI_GPU")
    assert str(getattr(cfg.distributed_type, "value", cfg.distributed_type)) == kind
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sharded_objective_draws_the_global_batch(prediction_type):
    """Ranks 0 and 1 of 2, each with its rows of a global batch, get exactly the rows of a
    one-process draw for the whole batch."""
    cfg = make_config("/tmp/unused", prediction_type=prediction_type, noise_offset=0.1)
    objective = NoiseObjective(make_noise_scheduler(cfg), noise_offset=0.1)
    clean = torch.randn(6, 1, 8, 8)
    one = objective.prepare(clean, torch.Generator().manual_seed(7))
    for rank in range(2):
        mine = ShardedObjective(objective, rank, 2).prepare(clean[rank::2], torch.Generator().manual_seed(7))
        for a, b in zip(one, mine):
            assert torch.equal(a[rank::2], b)
    assert ShardedObjective(objective, 0, 2).num_train_timesteps == objective.num_train_timesteps


def test_mean_over_one_process_is_the_value():
    class One:
        num_processes = 1
        device = torch.device("cpu")

    assert mean_over_processes(One(), {"a": torch.tensor(2.5), "b": 1.0}) == {"a": 2.5, "b": 1.0}


def test_cast_teacher_runs_the_frozen_teacher_in_the_compute_dtype(tmp_path):
    tr = Trainer(make_config(tmp_path, mixed_precision="bf16", cast_teacher=True)).setup()
    assert {p.dtype for p in tr.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tr.student.parameters()} == {torch.float32}  # trained in fp32 under autocast
    assert not any(p.requires_grad for p in tr.teacher.parameters())
    noisy, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    with torch.enable_grad():
        y = tr.loss_fn.teacher_output(noisy, t, {})
    assert not y.requires_grad and y.dtype == torch.float32
    tr.train()
    assert tr.global_step == 2
    fp32 = Trainer(make_config(tmp_path / "fp32", cast_teacher=True)).setup()  # mixed_precision no: fp32
    assert {p.dtype for p in fp32.teacher.parameters()} == {torch.float32}


def test_cast_teacher_conflicting_with_teacher_dtype_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cast_teacher .* mixed_precision='bf16', but teacher_dtype is 'fp16'"):
        make_config(tmp_path, mixed_precision="bf16", cast_teacher=True, teacher_dtype="fp16")


def test_gradient_checkpointing_of_the_student_only(tmp_path):
    tr = Trainer(make_config(tmp_path, gradient_checkpointing=True)).setup()
    assert tr.accelerator.unwrap_model(tr.student).is_gradient_checkpointing
    assert not tr.teacher.is_gradient_checkpointing
