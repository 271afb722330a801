"""When does PLACE beat conventional KD? Students pruned from the teacher, on the digits task.

    nice -n 10 python experiments/pruned_study.py --output_dir runs/pruned_study \\
        --ratios 0.85 --seeds 0,1,2,3,4 --methods output,output_fitnet,place,place_anneal &
    python experiments/pruned_study.py --output_dir runs/pruned_study --report   # table + plots from what finished
    python experiments/pruned_study.py --tiny --output_dir /tmp/study            # a < 1 minute smoke run

    # the capacity gap: one fixed student (the random-init row's architecture and seeds) from two teachers
    OMP_NUM_THREADS=1 liftplace train-teacher --config configs/digits_teacher_small.yaml   # 389K params
    python experiments/pruned_study.py --ratios "" --seeds "" --random_seeds 0,1,2 \
        --gap_teacher runs/digits_teacher_small/teacher --gap_seeds 0,1,2 --gap_pruned_seeds 0,1,2

A *row* is one student architecture and one seed: the shipped teacher (``builtin:digits``)
pruned with ``student_init=prune`` at ``pruning_ratio`` r (0.5, 0.75, 0.85 reach about 25 %,
6.4 % and 2.1 % of the teacher's parameters; the share reached is recorded), or ``random``
(the architecture of the smallest pruned student with random weights), or ``gap``: the same
random-init student distilled from a smaller teacher (``--gap_teacher``, trained by the same
recipe), so the two rows differ only in the teacher, i.e. in the capacity gap; and
``gapprune`` (``--gap_pruned_seeds``): the student pruned from the shipped teacher, with the
weights it had before training (``pruned_init/``), distilled from the smaller teacher, paired
with the ``prune<r>`` rows of the same seeds. Every method of a row
(the KD losses of :data:`METHODS`) trains with the same seed, hence the same data order, noise,
timesteps, optimiser, learning rate and steps, and the rows' methods share the teacher's
outputs in memory (a digest-verified cache; the numbers equal separate runs). Each finished
*cell* (row x method) leaves ``cells/<arch>/seed<S>/<method>/result.json``; a rerun skips it,
so the script resumes per cell. ``--shard i/n`` splits the rows over n processes (one thread
each); a cell checkpoints every tenth of its steps and an interrupted cell resumes from there. Measures per cell: classifier-Fréchet of DDIM samples (the demo's yardstick), held-out
teacher agreement (output MSE) by timestep range, stability (largest loss spike relative to
the running median of the previous ten logged losses, skipped steps, divergence) and wall time.
``--report`` (also run at the end of every shard) writes ``report.md`` (mean ± sample std per
cell, per-seed values, paired differences against output KD and output + FitNet: per-seed
differences, their mean, standard error, t and wins), ``results.json``, ``quality_vs_share.png``
and ``loss_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

# settings shared by every cell (the demo's, see liftplace/eval/demo.py)
BASE = dict(pretrained_model_name_or_path="builtin:digits", dataset_name="digits", resolution=16,
            prediction_type="epsilon", train_batch_size=64, max_train_steps=1000, learning_rate=1e-3,
            lr_scheduler="cosine", lr_warmup_steps=0, max_grad_norm=1.0, use_ema=True, lambda_sd=1.0,
            lambda_kd_output=1.0, group_size=16, kd_norm="l1", kd_reduction="sum", kd_weight="adaptive",
            logging_steps=10, validation_steps=0, report_to="none", progress_bar=False,
            pruning_importance="magnitude")
# FitNet (LIFT_PLACE_fitnet): 1x1 adapters, MSE per block pair, every down/mid/up block. The released
# pixel-DDPM weight is 1e-6 with sum reduction; here the feature term would then be ~0.1 % of the loss
# (indistinguishable from output KD), so the baseline uses 1e-4 (~10 % of the KD term at the start).
FEAT = dict(lambda_kd_feat=1e-4, kd_feat_layers="all", kd_feat_loss="mse")
METHODS = {
    "output": ("output KD (MSE)", dict(kd_loss="output")),
    "output_fitnet": ("output KD + FitNet", dict(kd_loss="output", **FEAT)),
    "lift": ("LIFT", dict(kd_loss="lift")),
    "place": ("PLACE (paper)", dict(kd_loss="place", kd_coarse_weight="constant")),
    "place_fitnet": ("PLACE + FitNet", dict(kd_loss="place", kd_coarse_weight="constant", **FEAT)),
    "place_anneal": ("PLACE + anneal", dict(kd_loss="place", kd_coarse_weight="anneal")),
    "place_l2": ("PLACE, L2 coarse", dict(kd_loss="place", kd_norm="l2")),
    "anneal_fitnet": ("PLACE + anneal + FitNet", dict(kd_loss="place", kd_coarse_weight="anneal", **FEAT)),
    "none": ("no KD", dict(kd_loss="none")),
}
BASELINES = ("output", "output_fitnet")
TINY_TEACHER = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                    down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                    norm_num_groups=4)
TINY = dict(max_train_steps=4, train_batch_size=8, logging_steps=1)
RANGES = (("t<333", 0, 333), ("333<=t<666", 333, 666), ("t>=666", 666, 1000))


def log(out: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "progress.log", "a") as f:
        f.write(line + "\n")


GAP = "random_small_teacher"  # the cells of the random-init student distilled from --gap_teacher
GAP_PRUNED = "pruned_small_teacher"  # the pruned-init student (from the shipped teacher) from --gap_teacher


def arch_name(arch) -> str:
    return {"random": "random", "gap": GAP, "gapprune": GAP_PRUNED}.get(arch, f"prune{arch}")


def _order(a: str):
    """Report order: pruned students by ratio, then the random-init rows, then the gap rows."""
    return ({"random": 1, GAP: 2, GAP_PRUNED: 3}.get(a, 0), a)


def _teacher_of(arch) -> str:
    return "gap" if arch in ("gap", "gapprune") else "shipped"


def loss_spike(metrics_path: Path, window: int = 10) -> float | None:
    """Largest logged loss divided by the median of the previous ``window`` logged losses."""
    losses = [r.get("loss") for r in map(json.loads, metrics_path.read_text().splitlines()) if r.get("loss") is not None]
    ratios = [losses[i] / statistics.median(losses[i - window:i]) for i in range(window, len(losses))
              if statistics.median(losses[i - window:i]) > 0]
    return max(ratios) if ratios else None


class Context:
    """What every cell of a process shares: classifier, real digits, memoised teacher."""

    def __init__(self, args):
        from diffusers import DDPMScheduler

        from liftplace.eval.demo import MemoModel
        from liftplace.eval.metrics import train_digits_classifier
        from liftplace.train.data import DigitsDataset
        from liftplace.train.sampling import ddim_scheduler_from, load_for_sampling

        self.args = args
        self.classifier, self.clf_acc = train_digits_classifier(resolution=16, seed=0,
                                                                **({"epochs": 1} if args.tiny else {}))
        self.heldout = DigitsDataset(16, split="test", seed=0).images[:args.num_samples]
        self.reference = DigitsDataset(16, split="train", seed=0).images
        if args.tiny:
            from liftplace.train.build import build_teacher
            from liftplace.train.config import build_config
            from liftplace.train.models import get_family

            cfg = build_config(None, {**self.base(), "output_dir": str(args.output_dir / "tmp")})
            self.teacher = build_teacher(cfg, get_family("unet2d"), "cpu", _NullLog())
            self.family = get_family("unet2d")
            sched_cfg = dict(DDPMScheduler(num_train_timesteps=1000).config)
            if not (args.gap_teacher / "config.json").is_file():  # a smaller random teacher for the gap rows
                from diffusers import UNet2DModel

                torch.manual_seed(1)
                small = UNet2DModel(**{**TINY_TEACHER, "block_out_channels": [8, 12], "norm_num_groups": 4})
                small.save_pretrained(args.gap_teacher)
                DDPMScheduler(num_train_timesteps=1000).save_config(args.gap_teacher)
        else:
            self.family, self.teacher, sched_cfg, _ = load_for_sampling(BASE["pretrained_model_name_or_path"])
        self.teacher.eval().requires_grad_(False)
        self.memo = MemoModel(self.teacher, self.family)
        self._gap_memo = None
        self.sampler = ddim_scheduler_from(sched_cfg)
        self.noise = DDPMScheduler.from_config({k: v for k, v in sched_cfg.items() if not k.startswith("_")})

    def memo_for(self, arch):
        """The memoised teacher a row's held-out agreement is measured against (its own teacher)."""
        if _teacher_of(arch) != "gap":
            return self.memo
        if self._gap_memo is None:
            from liftplace.eval.demo import MemoModel
            from liftplace.train.sampling import load_for_sampling

            _, teacher, _, _ = load_for_sampling(self.args.gap_teacher)
            self._gap_memo = MemoModel(teacher.eval().requires_grad_(False), self.family)
        return self._gap_memo

    def base(self) -> dict:
        base = dict(BASE, max_train_steps=self.args.steps, checkpointing_steps=max(1, self.args.steps // 10),
                    checkpoints_total_limit=1)
        if self.args.tiny:
            base.update(TINY, checkpointing_steps=TINY["max_train_steps"])
            base.pop("pretrained_model_name_or_path")
            base["teacher_config"] = TINY_TEACHER
        return base


class _NullLog:
    def warning(self, *a, **k):
        pass

    info = warning


def row_config(ctx: Context, arch, seed: int, method: str, cell_dir: Path) -> dict:
    over = {**ctx.base(), **METHODS[method][1], "seed": seed, "output_dir": str(cell_dir)}
    if arch in ("random", "gap"):
        over.update(student_init="random", student_config=str(ctx.args.output_dir / "random_arch.json"))
    elif arch == "gapprune":  # the student pruned from the shipped teacher, as it was before training
        over.update(student_init="random", student_model_name_or_path=str(ctx.args.output_dir / "pruned_init"))
    else:
        over.update(student_init="prune", pruning_ratio=float(arch))
    if _teacher_of(arch) == "gap":
        over.pop("teacher_config", None)
        over["pretrained_model_name_or_path"] = str(ctx.args.gap_teacher)
    return over


def pruned_init(ctx: Context, ratio: float) -> None:
    """The student pruned from the shipped teacher at ``ratio``, before any training, saved once
    (``pruned_init/``): the fixed student of the pruned capacity-gap rows. Magnitude importance
    does not depend on the seed, so it is the initial student of every ``prune<ratio>`` row too."""
    path = ctx.args.output_dir / "pruned_init"
    if (path / "config.json").is_file():
        return
    from liftplace.train.prune import prune_unet

    student, _ = prune_unet(ctx.teacher, ratio, "magnitude", verbose=False)
    tmp = ctx.args.output_dir / f".tmp-pruned_init-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(str(tmp), safe_serialization=True)
    os.replace(tmp, path)


def random_arch(ctx: Context, ratio: float) -> None:
    """The config of the smallest pruned student (random-init row), written once."""
    path = ctx.args.output_dir / "random_arch.json"
    if path.is_file():
        return
    from liftplace.train.models import model_config_dict
    from liftplace.train.prune import prune_unet

    student, _ = prune_unet(ctx.teacher, ratio, "magnitude", verbose=False)
    path.write_text(json.dumps(model_config_dict(student)))


def teacher_quality(ctx: Context) -> dict:
    """Fréchet and parameters of both teachers of the capacity-gap rows (``teachers.json``, once)."""
    from liftplace.eval.metrics import sample_quality
    from liftplace.train.models import count_parameters
    from liftplace.train.sampling import ddim_sample, load_for_sampling

    path = ctx.args.output_dir / "teachers.json"
    if path.is_file():
        return json.loads(path.read_text())
    args, out = ctx.args, {}
    for name, model in (("shipped", ctx.teacher), ("small", ctx.memo_for("gap").inner)):
        t0 = time.perf_counter()
        samples = ddim_sample(ctx.family, model, ctx.sampler, args.num_samples,
                              ctx.family.sample_shape(dict(model.config)), seed=0,
                              num_inference_steps=args.ddim_steps, batch_size=128)
        q = sample_quality(ctx.classifier, samples, ctx.reference)
        out[name] = {"source": BASE["pretrained_model_name_or_path"] if name == "shipped" else str(args.gap_teacher),
                     "params": count_parameters(model), "frechet": q["frechet"], "sample_s": time.perf_counter() - t0}
        log(args.output_dir, f"teacher {name}: {out[name]['params']:,} parameters, Frechet {q['frechet']:.2f}")
    path.write_text(json.dumps(out, indent=1))
    return out


def run_cell(ctx: Context, arch, seed: int, method: str, cache) -> dict:
    from liftplace.eval.metrics import sample_quality, teacher_agreement
    from liftplace.train import Trainer, TrainingDivergedError, build_config
    from liftplace.train.sampling import ddim_sample, load_for_sampling

    args = ctx.args
    cell = args.output_dir / "cells" / arch_name(arch) / f"seed{seed}" / method
    done = cell / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    over = row_config(ctx, arch, seed, method, cell)
    if list(cell.glob("checkpoint-*")):  # an interrupted cell resumes from its last checkpoint
        over["resume_from_checkpoint"] = "latest"
    else:
        shutil.rmtree(cell, ignore_errors=True)
    cfg = build_config(None, over)
    t0 = time.perf_counter()
    result = {"arch": arch_name(arch), "ratio": _ratio(arch, args), "seed": seed,
              "method": method, "label": METHODS[method][0], "steps": cfg.max_train_steps}
    try:
        teacher = ctx.teacher if args.tiny and _teacher_of(arch) != "gap" else None
        res = Trainer(cfg, teacher=teacher, teacher_cache=cache, end_of_run=["export"]).train()
    except TrainingDivergedError as exc:
        result.update(diverged=True, error=str(exc), train_s=time.perf_counter() - t0)
        done.write_text(json.dumps(result, indent=1))
        return result
    train_s = time.perf_counter() - t0
    fam, model, _, _ = load_for_sampling(res.model_dir)
    model.eval()
    shape = fam.sample_shape(dict(model.config))
    samples = ddim_sample(fam, model, ctx.sampler, args.num_samples, shape, seed=0,
                          num_inference_steps=args.ddim_steps, batch_size=128)
    quality = sample_quality(ctx.classifier, samples, ctx.reference)
    agree = teacher_agreement(model, ctx.memo_for(arch), ctx.noise, ctx.heldout, num_timesteps=9, seed=0)
    by_range = {}
    for name, lo, hi in RANGES:
        vals = [v for t, v in agree["per_timestep"].items() if lo <= int(t) < hi]
        by_range[name] = sum(vals) / len(vals) if vals else None
    result.update(diverged=False, student_params=res.student_params, teacher_params=res.teacher_params,
                  share=res.student_params / res.teacher_params, frechet=quality["frechet"],
                  confidence=quality["confidence"], class_entropy=quality["class_entropy"],
                  heldout_output_mse=agree["output_mse"], heldout_mse_by_t=by_range,
                  loss_spike=loss_spike(res.metrics_path), bad_steps=res.bad_steps, train_s=train_s,
                  total_s=time.perf_counter() - t0)
    from safetensors.torch import save_file  # keep the samples for the report's grids

    save_file({"samples": samples[:64].contiguous()}, str(cell / "samples.safetensors"))
    for p in cell.glob("checkpoint-*"):  # the export is kept; checkpoints only matter while training
        shutil.rmtree(p)
    done.write_text(json.dumps(result, indent=1))
    return result


def rows(args) -> list[tuple]:
    out = [(r, s) for r in args.ratios for s in args.seeds]
    if args.random_seeds:
        out += [("random", s) for s in args.random_seeds]
    if args.gap_teacher is not None:
        out += [("gap", s) for s in args.gap_seeds] + [("gapprune", s) for s in args.gap_pruned_seeds]
    return out


def _ratio(arch, args) -> float | None:
    if arch in ("random", "gap"):
        return None
    return args.random_ratio if arch == "gapprune" else float(arch)


def run(args) -> None:
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from liftplace.train.objective import TeacherOutputCache

    ctx = Context(args)
    log(out, f"start: shard {args.shard}, ratios {args.ratios}, seeds {args.seeds}, random-init seeds "
             f"{args.random_seeds}, methods {args.methods}, {args.steps} steps, pid {os.getpid()}")
    if args.random_seeds or args.gap_teacher is not None:
        random_arch(ctx, args.random_ratio)
    if args.gap_teacher is not None:
        teacher_quality(ctx)
        if args.gap_pruned_seeds:
            pruned_init(ctx, args.random_ratio)
    my_rows = [r for i, r in enumerate(rows(args)) if i % args.shard[1] == args.shard[0]]
    for arch, seed in my_rows:
        cache = TeacherOutputCache()
        methods = args.methods if arch not in ("random", "gap", "gapprune") else args.random_methods
        for method in methods:
            t0 = time.perf_counter()
            r = run_cell(ctx, arch, seed, method, cache)
            if r.get("diverged"):
                log(out, f"{arch_name(arch)} seed {seed} {method}: DIVERGED")
            else:
                log(out, f"{arch_name(arch)} seed {seed} {method}: Frechet {r['frechet']:.2f}, share "
                         f"{100 * r['share']:.2f} %, {time.perf_counter() - t0:.0f} s")
        cache.entries.clear()
    log(out, "shard done")
    report(args)


# --- the report --------------------------------------------------------------------------------------

def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(m, s=None, d=3):
    if m is None:
        return "–"
    return f"{m:.{d}g}" + (f" ± {s:.2g}" if s is not None else "")


def paired(results, arch, a, b):
    """Per-seed ``F(a) - F(b)`` (positive: b better) over the seeds where both finished."""
    fa = {r["seed"]: r.get("frechet") for r in results if r["arch"] == arch and r["method"] == a}
    fb = {r["seed"]: r.get("frechet") for r in results if r["arch"] == arch and r["method"] == b}
    seeds = sorted(s for s in fa if s in fb and fa[s] is not None and fb[s] is not None)
    d = [fa[s] - fb[s] for s in seeds]
    if len(d) < 2:
        return None
    mean, sd = statistics.mean(d), statistics.stdev(d)
    se = sd / math.sqrt(len(d))
    return {"seeds": seeds, "diffs": d, "mean": mean, "sd": sd, "se": se, "t": mean / se if se > 0 else math.inf,
            "wins": sum(x > 0 for x in d), "n": len(d)}


def report(args) -> Path:
    out = args.output_dir
    results = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/seed*/*/result.json"))]
    if not results:
        print("no finished cells yet")
        return out / "report.md"
    archs = sorted({r["arch"] for r in results}, key=_order)
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    lines = ["# Pruned-student study: output KD vs FitNet vs LIFT/PLACE variants\n",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, one thread per run. "
             f"Cells finished: {len(results)}. Fréchet: classifier-Fréchet of {args.num_samples} DDIM samples "
             f"({args.ddim_steps} steps) to the training digits (lower is better); mean ± sample std over seeds.\n",
             "## Fréchet by student and KD method\n",
             "| student | share | " + " | ".join(METHODS[m][0] for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    summary = {}
    for a in archs:
        shares = [r["share"] for r in results if r["arch"] == a and r.get("share")]
        cells = []
        for m in methods:
            vals = [r.get("frechet") for r in results if r["arch"] == a and r["method"] == m]
            mean, sd = _mean_sd(vals)
            div = sum(1 for r in results if r["arch"] == a and r["method"] == m and r.get("diverged"))
            summary.setdefault(a, {})[m] = {"mean": mean, "sd": sd, "n": len([v for v in vals if v is not None]),
                                            "diverged": div}
            cells.append(_fmt(mean, sd) + (f" (n={summary[a][m]['n']})" if vals else "") + (f", {div} diverged" if div else ""))
        lines.append(f"| {a} | {100 * shares[0]:.2f} % | " + " | ".join(cells) + " |" if shares else f"| {a} | – | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Per seed (Fréchet)\n", "| student | method | per seed |", "|---|---|---|"]
    for a in archs:
        for m in methods:
            rs = sorted((r for r in results if r["arch"] == a and r["method"] == m), key=lambda r: r["seed"])
            if rs:
                per = [f"s{r['seed']}: " + ("div" if r.get("diverged") else f"{r['frechet']:.2f}") for r in rs]
                lines.append(f"| {a} | {METHODS[m][0]} | " + ", ".join(per) + " |")
    lines += ["", "## Paired differences (same seed: same data order, noise, timesteps)\n",
              "Difference = Fréchet(baseline) − Fréchet(method): positive means the method is better. "
              "SE = sample std of the differences / sqrt(n); t = mean / SE.\n",
              "| student | method vs baseline | n | mean diff | SE | t | method better on |", "|---|---|---|---|---|---|---|"]
    pairs = {}
    for a in archs:
        for base in BASELINES:
            for m in methods:
                if m in BASELINES and m == base:
                    continue
                p = paired(results, a, base, m)
                if p:
                    pairs[f"{a}:{m}-vs-{base}"] = p
                    lines.append(f"| {a} | {METHODS[m][0]} vs {METHODS[base][0]} | {p['n']} | {p['mean']:.2f} | "
                                 f"{p['se']:.2f} | {p['t']:.2f} | {p['wins']} of {p['n']} |")
    lines += _gap_section(out, results, summary, pairs)
    lines += ["", "## Teacher agreement, stability and time (means over seeds)\n",
              "| student | method | held-out output MSE | MSE t<333 | 333–666 | t>=666 | largest loss spike | "
              "bad steps | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for a in archs:
        for m in methods:
            rs = [r for r in results if r["arch"] == a and r["method"] == m and not r.get("diverged")]
            if not rs:
                continue
            mean = lambda k: _mean_sd([r.get(k) for r in rs])[0]  # noqa: E731
            rng = lambda k: _mean_sd([r["heldout_mse_by_t"].get(k) for r in rs])[0]  # noqa: E731
            lines.append(f"| {a} | {METHODS[m][0]} | {_fmt(mean('heldout_output_mse'))} | {_fmt(rng(RANGES[0][0]))} | "
                         f"{_fmt(rng(RANGES[1][0]))} | {_fmt(rng(RANGES[2][0]))} | "
                         f"{_fmt(max((r['loss_spike'] or 0) for r in rs))} | {sum(r['bad_steps'] for r in rs)} | "
                         f"{_fmt(mean('train_s'))} |")
    plots = _plots(out, results, summary, archs, methods)
    lines += ["", "## Plots\n"] + [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"cells": results, "summary": summary, "paired": pairs,
                                                  "methods": {k: v[0] for k, v in METHODS.items()}}, indent=1))
    print(f"report: {out / 'report.md'}")
    return out / "report.md"


def _gap_pairs(results, summary) -> list[tuple[str, str, str]]:
    """``(student label, arch from the shipped teacher, arch from the small one)`` with results."""
    out = []
    if "random" in summary and GAP in summary:
        out.append(("random-init student", "random", GAP))
    ratio = next((r["ratio"] for r in results if r["arch"] == GAP_PRUNED), None)
    if ratio is not None and f"prune{ratio}" in summary and GAP_PRUNED in summary:
        out.append((f"student pruned at {ratio} (initial weights from the shipped teacher)", f"prune{ratio}",
                    GAP_PRUNED))
    return out


def _gap_section(out: Path, results, summary, pairs) -> list[str]:
    """The capacity gap: one fixed student distilled from the shipped teacher and from the smaller one."""
    gaps = _gap_pairs(results, summary)
    if not gaps:
        return []
    teachers = json.loads((out / "teachers.json").read_text()) if (out / "teachers.json").is_file() else {}
    big, small = teachers.get("shipped", {}), teachers.get("small", {})
    lines = ["", "## Capacity gap: one student, two teachers\n",
             "The same student (same initial weights, seeds, data order, noise and steps) distilled from the shipped "
             "teacher and from a smaller teacher trained by the same recipe (configs/digits_teacher_small.yaml). "
             "Fréchet, mean ± sample std (n); the last column is the paired difference output KD minus the method "
             "(positive: the method is better), ± its standard error (wins/n), per teacher.\n"]
    for t, name in ((big, "shipped"), (small, "small")):
        if t:
            lines.append(f"- {name} teacher: {t['params']:,} parameters, Fréchet of its own samples {t['frechet']:.2f}")
    for label, a_big, a_small in gaps:
        student = next((r["student_params"] for r in results if r["arch"] == a_small and r.get("student_params")),
                       None)
        ratio = lambda t: f" ({t['params'] / student:.0f}x the student)" if t and student else ""  # noqa: E731
        lines += ["", f"**{label}**, {student:,} parameters:\n" if student else f"**{label}**:\n",
                  f"| method | from the shipped teacher{ratio(big)} | from the small teacher{ratio(small)} | "
                  "paired vs output KD: shipped / small |", "|---|---|---|---|"]
        for m in METHODS:
            a, b = summary[a_big].get(m), summary[a_small].get(m)
            if not any(x and x["mean"] is not None for x in (a, b)):
                continue
            cell = lambda s: _fmt(s["mean"], s["sd"]) + f" ({s['n']})" if s and s["mean"] is not None else "–"  # noqa: E731

            def pair(arch):
                pr = pairs.get(f"{arch}:{m}-vs-output")
                return f"{pr['mean']:+.2f} ± {pr['se']:.2f} ({pr['wins']}/{pr['n']})" if pr else "–"

            lines.append(f"| {METHODS[m][0]} | {cell(a)} | {cell(b)} | {pair(a_big)} / {pair(a_small)} |")
    return lines + ["", "![capacity gap](capacity_gap.png)"]


def _sample_grid(out: Path, results, arch: str, methods, per_row: int = 16) -> Path | None:
    """``samples_<arch>.png``: one strip of DDIM samples per method (same initial noise), the
    arch's lowest seed."""
    from matplotlib.figure import Figure
    from safetensors.torch import load_file

    seeds = sorted({r["seed"] for r in results if r["arch"] == arch})
    if not seeds:
        return None
    strips = []
    for m in methods:
        f = out / "cells" / arch / f"seed{seeds[0]}" / m / "samples.safetensors"
        if f.is_file():
            x = load_file(str(f))["samples"][:per_row, 0].clamp(-1, 1)  # [n, H, W]
            strips.append((METHODS[m][0], torch.cat(list(x), dim=1)))
    if not strips:
        return None
    fig = Figure(figsize=(per_row * 0.5, 0.55 * len(strips) + 0.4), dpi=110, layout="constrained")
    for i, (label, strip) in enumerate(strips):
        ax = fig.add_subplot(len(strips), 1, i + 1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize="small")
    share = next((r["share"] for r in results if r["arch"] == arch and r.get("share")), None)
    fig.suptitle(f"{arch}" + (f" ({100 * share:.2f} % of the teacher)" if share else "") + f", seed {seeds[0]}",
                 fontsize="medium")
    p = out / f"samples_{arch}.png"
    fig.savefig(p)
    return p


def _plots(out: Path, results, summary, archs, methods) -> list[Path]:
    from matplotlib.figure import Figure

    from liftplace.eval.plots import plot_training_curves

    paths = []
    fig = Figure(figsize=(6.5, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for i, m in enumerate(methods):
        pts = []
        for a in archs:
            if a in ("random", GAP, GAP_PRUNED):
                continue
            share = next((r["share"] for r in results if r["arch"] == a and r.get("share")), None)
            s = summary[a][m]
            if share and s["mean"] is not None:
                pts.append((100 * share, s["mean"], s["sd"] or 0))
        if pts:
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], label=METHODS[m][0],
                        marker="o", capsize=3, color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters, % of the teacher")
    ax.set_ylabel("classifier-Fréchet (lower is better)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize="small")
    p = out / "quality_vs_share.png"
    fig.savefig(p)
    paths.append(p)
    pruned = [a for a in archs if a not in ("random", GAP, GAP_PRUNED)]
    for a in pruned:  # what the numbers look like: 16 samples per method, the row's lowest seed
        p = _sample_grid(out, results, a, methods)
        if p is not None:
            paths.append(p)
    gaps = _gap_pairs(results, summary)
    if gaps:
        fig = Figure(figsize=(6.5, 3.4 * len(gaps)), dpi=110, layout="constrained")
        for k, (label, a_big, a_small) in enumerate(gaps):
            ax = fig.add_subplot(len(gaps), 1, k + 1)
            ms = [m for m in methods if summary[a_big].get(m, {}).get("mean") is not None
                  and summary[a_small].get(m, {}).get("mean") is not None]
            for j, (a, name) in enumerate(((a_big, "shipped teacher"), (a_small, "small teacher"))):
                ax.bar([i + 0.4 * j for i in range(len(ms))], [summary[a][m]["mean"] for m in ms], width=0.4,
                       yerr=[summary[a][m]["sd"] or 0 for m in ms], capsize=3, label=name, color=f"C{j}")
            ax.set_xticks([i + 0.2 for i in range(len(ms))], [METHODS[m][0] for m in ms], fontsize="small")
            ax.set_ylabel("classifier-Fréchet (lower is better)")
            ax.set_title(label, fontsize="medium")
            ax.legend(fontsize="small")
        p = out / "capacity_gap.png"
        fig.savefig(p)
        paths.append(p)
    if pruned:
        smallest = min(pruned, key=lambda a: next(r["share"] for r in results if r["arch"] == a and r.get("share")))
        seed = min(r["seed"] for r in results if r["arch"] == smallest)
        runs = {METHODS[m][0]: out / "cells" / smallest / f"seed{seed}" / m / "metrics.jsonl" for m in methods
                if (out / "cells" / smallest / f"seed{seed}" / m / "metrics.jsonl").is_file()}
        if runs:
            paths.append(plot_training_curves(runs, out / "loss_curves.png",
                                              keys=("loss", "sd_loss", "kd_loss", "output_mse", "feat_loss",
                                                    "kd_weight")))
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=Path("runs/pruned_study"))
    p.add_argument("--ratios", default="0.5,0.75,0.85", help="pruning ratios (about 25 %%, 6.4 %%, 2.1 %%)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the pruned rows")
    p.add_argument("--random_seeds", default="", help="seeds of the random-init row (smallest architecture)")
    p.add_argument("--methods", default="output,place_anneal,place,output_fitnet,place_l2,lift,place_fitnet",
                   help="in run order: the cheap ones (teacher outputs reused from the row's first run) first")
    p.add_argument("--random_methods", default="output,place,place_anneal",
                   help="methods of the random-init and capacity-gap rows")
    p.add_argument("--random_ratio", type=float, default=0.85,
                   help="the random-init student has the architecture of the student pruned at this ratio")
    p.add_argument("--gap_teacher", type=Path, default=None,
                   help="a smaller teacher (configs/digits_teacher_small.yaml): the random-init student is also "
                        "distilled from it, the capacity-gap rows")
    p.add_argument("--gap_seeds", default="0,1,2", help="seeds of the capacity-gap rows")
    p.add_argument("--gap_pruned_seeds", default="",
                   help="seeds of the pruned capacity-gap rows: the student pruned at --random_ratio from the "
                        "shipped teacher (its initial weights) distilled from --gap_teacher; paired with the "
                        "prune<ratio> rows of the same seeds")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--num_samples", type=int, default=359)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="i/n: run rows i, i+n, ... (n processes in parallel)")
    p.add_argument("--report", action="store_true", help="only write the report from the finished cells")
    p.add_argument("--tiny", action="store_true", help="a smoke run of every part in under a minute (a test)")
    a = p.parse_args(argv)
    if a.tiny:
        a.steps, a.num_samples, a.ddim_steps = TINY["max_train_steps"], 16, 4
        if a.ratios == "0.5,0.75,0.85":
            a.ratios = "0.5"
        if a.seeds == "0,1,2":
            a.seeds = "0,1"
        if not a.random_seeds:
            a.random_seeds = "0"
        if a.methods == p.get_default("methods"):
            a.methods = "output,output_fitnet,place,place_anneal"
        a.random_ratio = min(float(x) for x in a.ratios.split(",")) if a.ratios else 0.5
        if a.gap_teacher is None:
            a.gap_teacher = a.output_dir / "tiny_small_teacher"
            a.gap_seeds = "0"
            a.gap_pruned_seeds = a.gap_pruned_seeds or "0"
    a.ratios = [float(x) for x in a.ratios.split(",") if x]
    a.seeds = [int(x) for x in a.seeds.split(",") if x]
    a.random_seeds = [int(x) for x in a.random_seeds.split(",") if x]
    a.methods = [m for m in a.methods.split(",") if m]
    a.random_methods = [m for m in a.random_methods.split(",") if m]
    a.gap_seeds = [int(x) for x in a.gap_seeds.split(",") if x]
    a.gap_pruned_seeds = [int(x) for x in a.gap_pruned_seeds.split(",") if x]
    if a.gap_teacher is not None and not a.tiny and not (a.gap_teacher / "config.json").is_file():
        p.error(f"--gap_teacher {a.gap_teacher}: no config.json there; train it first with "
                "`liftplace train-teacher --config configs/digits_teacher_small.yaml` and pass its teacher/ folder")
    for m in a.methods + a.random_methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    i, _, n = a.shard.partition("/")
    a.shard = (int(i), int(n or 1))
    if not 0 <= a.shard[0] < a.shard[1]:
        p.error(f"--shard {a.shard}: i must be in [0, n)")
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
