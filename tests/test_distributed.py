"""Multi-process training on 2 CPU processes (gloo), launched as README and docs/TRAINER.md
show (``torchrun`` with rendezvous flags, ``accelerate launch --multi_gpu``), in their CPU
form (``ACCELERATE_USE_CPU=true``).

One torchrun launch runs this file as the worker on both ranks: an uninterrupted 4-step run
(A) and a run killed right after its checkpoint at step 2 (B). Each rank records what it
computed itself (its loss, the adaptive weight w, the per-bucket weights) and its final
parameters. README's CPU torchrun recipe then resumes B on 2 ranks through the CLI, while
``accelerate launch --multi_gpu`` (CPU form) runs a fresh job beside it. A one-process
run with twice the batch is trained in the test process. Models: a tiny UNet2DModel from a
config, synthetic data, feature KD on (hooks under the DDP wrapper) with
``kd_weight=adaptive`` (w from statistics summed over the ranks; per-bucket statistics
logged); one thread per process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
TEACHER = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
               down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
               norm_num_groups=4)
STEPS, KILL_AT, BATCH = 4, 2, 2


def overrides(out, **kw) -> dict:
    base = dict(output_dir=str(out), teacher_config=TEACHER, dataset_name="synthetic", train_batch_size=BATCH,
                max_train_steps=STEPS, logging_steps=1, checkpointing_steps=KILL_AT, validation_steps=0,
                num_validation_images=2, ddpm_num_inference_steps=2, student_width_mult=0.5, report_to="none",
                progress_bar=False, learning_rate=1e-3, kd_weight="adaptive", kd_num_buckets=4,
                lambda_kd_feat=0.5, kd_feat_layers="mid_block,up_blocks.0", group_size=4, use_ema=True,
                # Adam divides by sqrt(v) + eps: with the default 1e-8 a gradient that is rounding noise (a
                # conv bias before a GroupNorm) moves its weight by +-lr, so two summation orders (2 ranks vs
                # 1) would differ by ~lr there; 1e-3 keeps such weights still and the comparison meaningful
                adam_epsilon=1e-3)
    base.update(kw)
    return base


# --- the worker: runs in every launched process ------------------------------------------------------

class _Recorder:
    """Wraps the trainer's loss: keeps what this rank computed at every micro-batch."""

    def __init__(self, loss_fn, trainer, log):
        self.inner, self.trainer, self.log = loss_fn, trainer, log

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        t = out.terms
        self.log.append({"step": self.trainer.global_step + 1, "loss": float(t["loss"]),
                         "kd_weight": float(t["kd_weight"]), "feat_loss": float(t["feat_loss"]),
                         "bucket_weight": [float(t[f"kd_bucket_weight_{i}"]) for i in range(4)]})
        return out


def _save_final(tr, path):
    from safetensors.torch import save_file

    acc = tr.accelerator
    state = {f"student.{k}": v for k, v in acc.unwrap_model(tr.student).state_dict().items()}
    if tr.adapters is not None:
        state.update({f"adapters.{k}": v for k, v in acc.unwrap_model(tr.adapters).state_dict().items()})
    state.update({f"kd.{k}": v.float() for k, v in tr.loss_fn.state_dict().items()})
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


def _worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    from liftplace.train import Trainer, build_config

    for run in spec["runs"]:
        tr = Trainer(build_config(None, run["overrides"])).setup()
        rank = tr.accelerator.process_index
        log: list = []
        tr.loss_fn = _Recorder(tr.loss_fn, tr, log)
        record = Path(run["record"])
        kill_at = run.get("kill_at")
        if kill_at:
            after = tr._after_step

            def after_step(reason, _after=after, _tr=tr):
                _after(reason)
                if _tr.global_step == kill_at:  # killed once the checkpoint is on disk: no clean exit
                    (record / f"rank{rank}.json").write_text(json.dumps(
                        {"log": log, "checkpointing": _tr.accelerator.unwrap_model(_tr.student).is_gradient_checkpointing}))
                    _tr.accelerator.wait_for_everyone()
                    os._exit(0)

            tr._after_step = after_step
        tr.train()
        record.mkdir(parents=True, exist_ok=True)
        (record / f"rank{rank}.json").write_text(json.dumps({"log": log, "world": tr.accelerator.num_processes,
                                                             "wrapped": type(tr.student).__name__,
                                                             "adapters_wrapped": type(tr.adapters).__name__,
                                                             "teacher": type(tr.teacher).__name__}))
        _save_final(tr, record / f"rank{rank}.safetensors")


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    _worker(json.loads(sys.argv[2]))
    sys.exit(0)


# --- the tests ----------------------------------------------------------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_SIZE",
                                                                      "RANK", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def torchrun(*args) -> list[str]:
    """The multi-node recipe in its CPU form: torchrun with rendezvous flags, one node."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", *args]


def accelerate_launch(*args) -> list[str]:
    """The multi-GPU recipes (the flags and configs/accelerate/multi_gpu.yaml) in their CPU form
    (ACCELERATE_USE_CPU=true in the environment)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(HERE.parents[1] / "configs" / "accelerate" / "multi_gpu.yaml"), "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "liftplace", *args]


def cpu_torchrun(*args) -> list[str]:
    """README's CPU recipe: ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m liftplace ..."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "liftplace", *args]


def run(cmd, env, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli_procs):
    """Launch 1 (torchrun with rendezvous flags, 2 ranks): A uninterrupted, B killed after
    checkpoint-2. Launch 2 (README's CPU recipe, torchrun, the CLI): B resumed from ``latest``."""
    root = tmp_path_factory.mktemp("ddp")
    spec = {"runs": [{"overrides": overrides(root / "A"), "record": str(root / "rec_A")},
                     # B with gradient checkpointing of the student: recomputation changes no number
                     {"overrides": overrides(root / "B", gradient_checkpointing=True), "record": str(root / "rec_B"),
                      "kill_at": KILL_AT}]}
    (root / "rec_B").mkdir()
    check(run(torchrun(str(HERE), "worker", json.dumps(spec)), cpu_env(ACCELERATE_USE_CPU="true")))
    assert not (root / "B" / "student").exists() and (root / "B" / f"checkpoint-{KILL_AT}").is_dir()
    assert all(rec["checkpointing"] for rec in rank_records(root / "rec_B"))
    resumed = run(cpu_torchrun("distill", "--config", str(root / "B" / "config.yaml"),
                               "--resume_from_checkpoint", "latest"), cpu_env(ACCELERATE_USE_CPU="true"))
    check(resumed)
    return root


def rank_records(folder):
    return [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_wrap_student_and_adapters_not_teacher(runs):
    recs = rank_records(runs / "rec_A")
    for rec in recs:
        assert rec["world"] == 2
        assert rec["wrapped"] == "DistributedDataParallel"
        assert rec["adapters_wrapped"] == "DistributedDataParallel"
        assert rec["teacher"] == "UNet2DModel"


def test_parameters_identical_across_ranks(runs):
    a, b = (load_file(str(runs / "rec_A" / f"rank{r}.safetensors")) for r in range(2))
    assert a.keys() == b.keys() and any(k.startswith("adapters.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_each_rank_computes_the_same_w_and_bucket_weights(runs):
    r0, r1 = (rec["log"] for rec in rank_records(runs / "rec_A"))
    assert [e["step"] for e in r0] == [e["step"] for e in r1] == list(range(1, STEPS + 1))
    for e0, e1 in zip(r0, r1):
        assert e0["kd_weight"] == e1["kd_weight"]  # bitwise: from statistics summed over the ranks
        assert e0["bucket_weight"] == e1["bucket_weight"]
    assert any(e0["loss"] != e1["loss"] for e0, e1 in zip(r0, r1))  # the ranks saw different samples


def test_logged_metrics_are_means_over_ranks(runs):
    r0, r1 = (rec["log"] for rec in rank_records(runs / "rec_A"))
    lines = [json.loads(s) for s in (runs / "A" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    for m, e0, e1 in zip(lines, r0, r1):
        assert m["loss"] == pytest.approx((e0["loss"] + e1["loss"]) / 2, rel=1e-6)
        assert m["feat_loss"] == pytest.approx((e0["feat_loss"] + e1["feat_loss"]) / 2, rel=1e-6)
        assert m["kd_weight"] == pytest.approx(e0["kd_weight"], rel=1e-6)
        assert math_isfinite(m["feat_loss"]) and m["feat_loss"] > 0  # feature-KD hooks fired under DDP


def math_isfinite(x):
    return x is not None and x == x and abs(x) != float("inf")


def test_one_process_writes_checkpoints_and_export(runs):
    a = runs / "A"
    assert sorted(p.name for p in a.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((a / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and "random_states_1.pt" in state["manifest"]
    assert (a / "student" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(a.glob(".tmp*"))


def test_kill_and_resume_on_two_ranks_equals_uninterrupted(runs):
    """B: checkpointed at step 2, killed (os._exit on both ranks), resumed on 2 ranks by the CLI
    under torchrun (README's CPU recipe), with gradient checkpointing; A: 4 straight steps.
    Bitwise equal."""
    import yaml

    assert yaml.safe_load((runs / "B" / "config.yaml").read_text())["gradient_checkpointing"] is True
    for name in ("student/diffusion_pytorch_model.safetensors", "student_ema/diffusion_pytorch_model.safetensors",
                 "adapters.safetensors", "kd_loss.safetensors"):
        a = load_file(str(runs / "A" / f"checkpoint-{STEPS}" / name))
        b = load_file(str(runs / "B" / f"checkpoint-{STEPS}" / name))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    la = [json.loads(s) for s in (runs / "A" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(s) for s in (runs / "B" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in la] == [m["loss"] for m in lb]


def test_two_ranks_batch_b_equal_one_rank_batch_2b(runs, tmp_path, one_thread):
    from liftplace.train import Trainer, build_config

    tr = Trainer(build_config(None, overrides(tmp_path / "one", train_batch_size=2 * BATCH,
                                              checkpointing_steps=100)))
    tr.train()
    two = load_file(str(runs / "rec_A" / "rank0.safetensors"))
    one = {f"student.{k}": v for k, v in tr.student.state_dict().items()}
    one.update({f"adapters.{k}": v for k, v in tr.adapters.state_dict().items()})
    one.update({f"kd.{k}": v.float() for k, v in tr.loss_fn.state_dict().items()})
    assert one.keys() == two.keys()
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert worst < 1e-5, worst
    m1 = [json.loads(s) for s in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(s) for s in (runs / "A" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["kd_weight"] == pytest.approx(b["kd_weight"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def cli_procs(tmp_path_factory):
    """Three launches of the CLI, started first and run beside the worker launches (the test
    file stays within a minute on 2 cores): the multi-GPU recipe in its CPU form (accelerate
    launch --config_file configs/accelerate/multi_gpu.yaml --multi_gpu --num_processes 2,
    ACCELERATE_USE_CPU=true, 2 steps), torchrun without ACCELERATE_USE_CPU, and accelerate
    launch --cpu --num_processes 2 (the last two must be refused). Output goes to files."""
    root = tmp_path_factory.mktemp("cli")
    args = ["distill", "--teacher_config", json.dumps(TEACHER), "--dataset_name", "synthetic", "--max_train_steps",
            "2", "--train_batch_size", "2", "--student_width_mult", "0.5", "--validation_steps", "0",
            "--num_validation_images", "2", "--ddpm_num_inference_steps", "2", "--progress_bar", "false"]
    cmds = {
        "recipe": (accelerate_launch()[2:-2], True),
        "torchrun": (["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())], False),
        "accelerate": (["accelerate.commands.launch", "--cpu", "--num_processes", "2", "--main_process_port",
                        str(free_port())], False),
    }
    procs = {}
    for name, (launcher, use_cpu) in cmds.items():
        env = cpu_env(ACCELERATE_USE_CPU="true") if use_cpu else cpu_env()
        log = open(root / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", *launcher, "-m", "liftplace", *args, "--output_dir",
                                         str(root / name)], env=env, stdout=log, stderr=subprocess.STDOUT), log)
    yield root, procs
    for p, log in procs.values():
        if p.poll() is None:
            p.kill()
        log.close()


@pytest.fixture(scope="module")
def cli_launches(cli_procs):
    root, procs = cli_procs
    results = {}
    for name, (p, log) in procs.items():
        p.wait(timeout=240)
        log.flush()
        results[name] = (p.returncode, (root / f"{name}.log").read_text())
    return root, results


def test_multi_gpu_recipe_in_cpu_form_trains_on_two_ranks(cli_launches):
    root, results = cli_launches
    code, text = results["recipe"]
    assert code == 0, text[-5000:]
    assert "2 process(es) (MULTI_CPU" in text and "samples per optimizer step" in text
    assert text.count("done: 2 steps") == 2  # both ranks finished ...
    assert (root / "recipe" / "checkpoint-2").is_dir() and (root / "recipe" / "student").is_dir()
    state = json.loads((root / "recipe" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2  # ... as one job, one writer


def test_inconsistent_launches_are_refused_before_any_write(cli_launches):
    """torchrun on CPU without ACCELERATE_USE_CPU (two single-process jobs), and accelerate
    launch --cpu --num_processes 2 (one process): both an error, nothing written."""
    root, results = cli_launches
    code, text = results["torchrun"]
    assert code != 0 and "ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2" in text, text[-3000:]
    code, text = results["accelerate"]
    assert code != 0 and "started only this one" in text, text[-3000:]
    assert not (root / "torchrun").exists() and not (root / "accelerate").exists()
