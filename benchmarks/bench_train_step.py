"""The KD loss inside a real distillation step: what `place` costs over plain output KD.

One step is what liftplace's trainer does per batch: add noise (DDPM), the teacher's
forward under ``torch.no_grad()``, the student's forward, the diffusion loss
``MSE(student, noise)`` plus the KD loss, the backward, an AdamW step. The KD loss is
``output`` (MSE between student and teacher outputs, the conventional baseline) or
``place`` (``lift_place_loss``, error grouping, P = 16, the trainer's default). Steps
with the two losses are interleaved, and the loss alone (its forward + backward on the
same tensors) is timed beside them, so the table gives the step ratio and the loss's
share of the step.

Models:
    demo     the shipped digits teacher (liftplace/assets/digits_teacher, 1x16x16) and
             the demo's student (widths x0.25, one resnet per block), batch 64
    latent   a latent-sized pixel U-Net pair on [4, 64, 64] inputs (Stable Diffusion's
             latent shape at 512 px), batch 8, random weights built from a config:
             teacher widths (64, 128, 256), student (32, 64, 128), no attention, so a
             2-core CPU finishes a step in seconds. The KD loss cost does not depend on
             the weights, only on the [8, 4, 64, 64] output it reads.

    python benchmarks/bench_train_step.py                      # both models, torch's threads
    python benchmarks/bench_train_step.py --models latent --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

import liftplace
from liftplace.train.models import count_parameters, derive_student_config

ASSETS = Path(liftplace.__file__).parent / "assets" / "digits_teacher"
LATENT_BLOCKS = dict(down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, layers_per_block=1)


def build(which: str):
    """(teacher, student, batch, sample shape)."""
    if which == "demo":
        teacher = UNet2DModel.from_pretrained(ASSETS)
        cfg = derive_student_config(dict(teacher.config), width_mult=0.25, layers_per_block=1, norm_num_groups=4,
                                    verbose=False)
        return teacher, UNet2DModel.from_config(cfg), 64, (1, 16, 16)
    torch.manual_seed(0)
    teacher = UNet2DModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256),
                          norm_num_groups=32, **LATENT_BLOCKS)
    student = UNet2DModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128),
                          norm_num_groups=16, **LATENT_BLOCKS)
    return teacher, student, 8, (4, 64, 64)


def kd_loss(kind: str, student_out, teacher_out):
    if kind == "output":
        return F.mse_loss(student_out, teacher_out)
    return liftplace.lift_place_loss(student_out, teacher_out, grouping="error", group_size=16)


def make_step(kind, teacher, student, opt, scheduler, clean, gen):
    def step():
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), generator=gen)
        noisy = scheduler.add_noise(clean, noise, t)
        with torch.no_grad():
            teacher_out = teacher(noisy, t).sample
        student_out = student(noisy, t).sample
        loss = F.mse_loss(student_out, noise) + kd_loss(kind, student_out, teacher_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make_loss_only(kind, shape):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(shape, generator=g).requires_grad_(True)
    t = 1.1 * s.detach() + 0.3 * torch.randn(shape, generator=g)

    def run():
        s.grad = None
        kd_loss(kind, s, t).backward()
    return run


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench(which: str, repeats: int, rounds: int) -> dict:
    teacher, student, batch, shape = build(which)
    teacher.eval().requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    clean = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    res = {"model": which, "batch": batch, "shape": list(shape), "teacher_params": count_parameters(teacher),
           "student_params": count_parameters(student), "step_s": {}, "loss_ms": {}}
    kinds = ("output", "place")
    steps, losses = {}, {}
    for kind in kinds:
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        steps[kind] = make_step(kind, teacher, student, opt, scheduler, clean, torch.Generator().manual_seed(2))
        losses[kind] = make_loss_only(kind, (batch, *shape))
    step_times = {k: [] for k in kinds}
    loss_times = {k: [] for k in kinds}
    for r in range(rounds):  # interleaved: both losses see the same machine state
        for kind in kinds:
            step_times[kind] += timed(steps[kind], repeats)
            loss_times[kind] += timed(losses[kind], 5 * repeats)
        print(f"  {which}: round {r + 1}/{rounds}", flush=True)
    for kind in kinds:
        res["step_s"][kind] = statistics.median(step_times[kind])
        res["loss_ms"][kind] = statistics.median(loss_times[kind]) * 1e3
    res["place_over_output"] = res["step_s"]["place"] / res["step_s"]["output"]
    res["loss_share"] = {k: res["loss_ms"][k] / 1e3 / res["step_s"][k] for k in kinds}
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,latent", help="comma-separated: demo, latent")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per loss and round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (output, place, output, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=str(Path(__file__).parent / "out" / "bench_train_step.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = [bench(m, args.repeats, args.rounds) for m in args.models.split(",")]
    load_after = os.getloadavg()

    print(f"\nmedian step time, {torch.get_num_threads()} thread(s), load average {load_before[0]:.1f} ->"
          f" {load_after[0]:.1f}")
    head = ["model", "batch x shape", "teacher/student params", "output step ms", "place step ms", "place/output",
            "output KD ms (share)", "place KD ms (share)"]
    rows = []
    for r in results:
        rows.append([r["model"], f"{r['batch']}x{'x'.join(map(str, r['shape']))}",
                     f"{r['teacher_params'] / 1e6:.2f}M / {r['student_params'] / 1e6:.2f}M",
                     f"{r['step_s']['output'] * 1e3:.1f}", f"{r['step_s']['place'] * 1e3:.1f}",
                     f"{r['place_over_output']:.3f}",
                     f"{r['loss_ms']['output']:.2f} ({100 * r['loss_share']['output']:.2f} %)",
                     f"{r['loss_ms']['place']:.2f} ({100 * r['loss_share']['place']:.2f} %)"])
    widths = [max(len(row[i]) for row in rows + [head]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths]] + rows:
        print(" | ".join(v.rjust(w) for v, w in zip(row, widths)))
    report = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "liftplace": liftplace.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_avg_before_after": [load_before, load_after],
              "repeats": args.repeats, "rounds": args.rounds, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
