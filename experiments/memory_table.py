"""Peak memory per process of a distillation step (teacher + student + KD) under the memory
options, at the size of the digits example (configs/digits_place.yaml: the shipped 1.54M-parameter
teacher, the 67.7K-parameter student, batch 64 per process, 16x16). The table in docs/TRAINER.md
("Memory") is this script's output:

    OMP_NUM_THREADS=1 python experiments/memory_table.py            # ~1 min on one thread

Each configuration runs in a fresh process: setup, one optimizer step (so Adam's moments
exist), then one more step measured. "state" = the bytes of every tensor that lives across
steps (teacher, student, adapters, Adam moments, EMA); "step peak" = the peak total size of
the tensors the step itself creates (activations kept for backward, gradients, teacher
outputs, KD temporaries), counted operator by operator with liftplace.eval.cost's
live-storage counter (the CPU stand-in for torch.cuda.max_memory_allocated); "max RSS" = the
process's resident peak (ru_maxrss), which includes the Python + torch runtime. Under DDP
each process holds the same plus one flat copy of the student's gradients (its buckets).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "fp32 (default)": {},
    "--gradient_checkpointing": {"gradient_checkpointing": True},
    "--mixed_precision bf16 --cast_teacher": {"mixed_precision": "bf16", "cast_teacher": True},
    "bf16 + cast_teacher + gradient_checkpointing": {"mixed_precision": "bf16", "cast_teacher": True,
                                                     "gradient_checkpointing": True},
    # for comparison: the student's own training step, no teacher call (what checkpointing acts on)
    "student alone (--kd_loss none)": {"kd_loss": "none"},
    "student alone + --gradient_checkpointing": {"kd_loss": "none", "gradient_checkpointing": True},
}


def measure(overrides: dict) -> dict:
    import torch

    from liftplace.eval.cost import _LiveTensorBytes
    from liftplace.train import Trainer, build_config

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config(ROOT / "configs" / "digits_place.yaml",
                           {"output_dir": out, "max_train_steps": 10, "checkpointing_steps": 1000,
                            "validation_steps": 0, "progress_bar": False, "logging_steps": 1000, **overrides})
        tr = Trainer(cfg, end_of_run=[]).setup()
        tr.train(until_step=1)
        acc = tr.accelerator
        kept = [*tr.teacher.parameters(), *tr.teacher.buffers(), *acc.unwrap_model(tr.student).parameters(),
                *acc.unwrap_model(tr.student).buffers()]
        if tr.adapters is not None:
            kept += list(acc.unwrap_model(tr.adapters).parameters())
        kept += [v for s in tr.optimizer.state_dict()["state"].values() for v in s.values()
                 if isinstance(v, torch.Tensor)]
        if tr.ema is not None:
            kept += list(tr.ema.shadow_params)
        state = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in kept}.values())
        counter = _LiveTensorBytes(kept)
        with counter:
            tr.train(until_step=2)
        return {"state_bytes": state, "step_peak_bytes": counter.peak,
                "teacher_dtype": str(next(tr.teacher.parameters()).dtype).replace("torch.", ""),
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one configuration
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(measure(json.loads(args.one))))
        return
    rows = []
    for name, ov in OPTIONS.items():
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(ov)], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        rows.append((name, json.loads(out)))
    print("| options | teacher dtype | state (weights, Adam, EMA) | step peak | state + step peak | max RSS |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['teacher_dtype']} | {mib(r['state_bytes'])} | {mib(r['step_peak_bytes'])} | "
              f"{mib(r['state_bytes'] + r['step_peak_bytes'])} | {r['max_rss_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
