"""``liftplace demo`` (``make demo``): output KD vs PLACE vs PLACE with coarse annealing.

The shipped digits teacher (``builtin:digits``, 1.54M parameters, trained by
``liftplace train-teacher --config configs/digits_teacher.yaml``) is distilled into
the same 67.7K-parameter student (4.4 %) three times, with identical seeds, data order,
noise, timesteps and steps; only the KD loss differs. Every model is then sampled with
DDIM from the same initial noise and compared. The report states the numbers as they
come out; nothing here is tuned per method.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from ..loss import lift_place_loss
from ..train.config import build_config
from ..train.data import DigitsDataset
from ..train.models import compression_summary, count_parameters
from ..train.objective import TeacherOutputCache
from ..train.sampling import ddim_sample, ddim_scheduler_from, load_for_sampling
from ..train.trainer import Trainer
from .metrics import sample_quality, teacher_agreement, train_digits_classifier
from .plots import plot_training_curves, save_image_grid
from .report import append_cost_and_eval

# Distillation settings shared by the three students (configs/digits_place.yaml mirrors them).
DEMO_BASE = dict(
    pretrained_model_name_or_path="builtin:digits",
    dataset_name="digits",
    resolution=16,
    student_width_mult=0.25,
    student_layers_per_block=1,
    student_norm_num_groups=4,
    prediction_type="epsilon",
    train_batch_size=64,
    max_train_steps=1000,
    learning_rate=1e-3,
    lr_scheduler="cosine",
    lr_warmup_steps=0,
    max_grad_norm=1.0,
    use_ema=True,
    lambda_sd=1.0,
    lambda_kd_output=1.0,
    group_size=16,
    kd_norm="l1",
    kd_reduction="sum",
    kd_weight="adaptive",
    logging_steps=10,
    validation_steps=0,
    num_validation_images=64,
    report_to="none",
)
QUICK = dict(max_train_steps=40, train_batch_size=32, logging_steps=5, num_validation_images=16,
             ddpm_num_inference_steps=10)

# (folder, label, overrides): the three students, in report order.
STUDENTS = (
    ("output_kd", "output KD (MSE)", dict(kd_loss="output")),
    ("place", "PLACE (paper)", dict(kd_loss="place", kd_coarse_weight="constant")),
    ("place_anneal", "PLACE + coarse anneal", dict(kd_loss="place", kd_coarse_weight="anneal")),
)
CURVE_KEYS = ("loss", "sd_loss", "kd_loss", "output_mse", "kd_weight", "kd_coarse_weight", "kd_slope_mean",
              "kd_intercept_mean")


@dataclass
class DemoSettings:
    quick: bool
    steps: int
    batch_size: int
    num_samples: int
    ddim_steps: int
    agreement_timesteps: int
    classifier_epochs: int | None  # None: train_digits_classifier's default


def _settings(quick: bool, steps, num_samples, n_heldout: int) -> DemoSettings:
    base = dict(DEMO_BASE, **(QUICK if quick else {}))
    return DemoSettings(quick=quick, steps=steps or base["max_train_steps"], batch_size=base["train_batch_size"],
                        num_samples=num_samples or (64 if quick else n_heldout),
                        ddim_steps=10 if quick else 50, agreement_timesteps=4 if quick else 8,
                        classifier_epochs=4 if quick else None)


def _fmt(v, digits=4):
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.{digits}g}"


def _last_metrics(run_dir: Path) -> dict:
    rows = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    good = [r for r in rows if not r.get("skipped")]
    return good[-1] if good else {}


class MemoModel(torch.nn.Module):
    """Wraps a frozen model and memoises its outputs in a :class:`TeacherOutputCache` keyed by
    the input digest, so the teacher runs once on the held-out noisy inputs that every
    student is compared on."""

    def __init__(self, model: torch.nn.Module, family):
        super().__init__()
        self.inner = model
        self.family = family
        self.cache = TeacherOutputCache()

    @torch.no_grad()
    def forward(self, sample, timesteps):
        return self.cache.fetch(sample, timesteps, {},
                                lambda: self.family.forward(self.inner, sample, timesteps, {}).float())


@torch.no_grad()
def heldout_kd_losses(family, student, teacher, scheduler, images, *, num_timesteps: int, seed: int,
                      group_size: int = 16, batch_size: int = 64):
    """Both KD losses of ``student`` against ``teacher`` on held-out noisy inputs: output MSE
    (sum-reduced, as trained) and the PLACE loss with the paper's settings, averaged over
    evenly spaced timesteps. Noise, timesteps and batching follow
    :func:`liftplace.eval.metrics.teacher_agreement`, so a memoised teacher is reused."""
    T = scheduler.config.num_train_timesteps
    ts = torch.linspace(0, T - 1, num_timesteps).round().long().unique()
    g = torch.Generator().manual_seed(seed)
    mse, place, count = 0.0, 0.0, 0
    for t in ts.tolist():
        noise = torch.randn(images.shape, generator=g)
        tb = torch.full((images.shape[0],), t, dtype=torch.long)
        noisy = scheduler.add_noise(images.float(), noise, tb)
        for i in range(0, images.shape[0], batch_size):
            xin, tt = noisy[i:i + batch_size], tb[i:i + batch_size]
            x = family.forward(student, xin, tt, {}).float()
            y = teacher(xin, tt).float()
            mse += float((x - y).square().sum())
            place += float(lift_place_loss(x, y, group_size=group_size)) * x.shape[0]
            count += x.shape[0]
    return {"output_kd_loss": mse / count, "place_loss": place / count}


def run_demo(*, quick: bool = False, output_dir="runs/demo", seed: int = 0, steps: int | None = None,
             teacher: str = "builtin:digits", num_samples: int | None = None, threads: int | None = None,
             argv: list[str] | None = None, students=STUDENTS) -> Path:
    """Run the demo; returns the path of ``report.md`` (also printed). ``students`` lists
    ``(folder, label, config overrides)`` per student, in report order; the demo's own
    three by default (an experiment passes others, e.g. ``experiments/timestep_weight.py``)."""
    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    heldout = DigitsDataset(16, split="test", seed=0).images
    reference = DigitsDataset(16, split="train", seed=0).images
    s = _settings(quick, steps, num_samples, heldout.shape[0])
    timings = {}

    def say(msg):
        print(f"[demo {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    # 1. the teacher
    t_family, t_model, sched_cfg, t_dir = load_for_sampling(teacher)
    t_model.eval().requires_grad_(False)
    teacher_params = count_parameters(t_model)
    t_memo = MemoModel(t_model, t_family)
    say(f"teacher {teacher} ({t_dir}): {teacher_params:,} parameters")

    # 2. three students, identical but for the KD loss
    cache = TeacherOutputCache()
    runs = {}
    for name, label, kd in students:
        overrides = {**DEMO_BASE, **(QUICK if quick else {}), **kd}
        overrides.update(pretrained_model_name_or_path=teacher, seed=seed, max_train_steps=s.steps,
                         checkpointing_steps=s.steps, output_dir=str(out / name))
        cfg = build_config(None, overrides)
        # Each demo run starts afresh in its own folder (the trainer would otherwise move an
        # earlier demo's checkpoints aside into abandoned-* folders).
        shutil.rmtree(out / name, ignore_errors=True)
        say(f"distilling student '{label}' ({s.steps} steps, batch {cfg.train_batch_size}, seed {seed})")
        t0 = time.perf_counter()
        res = Trainer(cfg, teacher_cache=cache).train()
        timings[name] = time.perf_counter() - t0
        runs[name] = (label, cfg, res)
        say(f"  done in {timings[name]:.1f} s -> {res.model_dir}")
    say(compression_summary(teacher_params, next(iter(runs.values()))[2].student_params))

    # 3. evaluation: classifier, samples, agreement
    t0 = time.perf_counter()
    # seed 0 whatever --seed: one yardstick, so Frechet distances compare across demo seeds
    clf_kw = {} if s.classifier_epochs is None else {"epochs": s.classifier_epochs}
    classifier, clf_acc = train_digits_classifier(resolution=16, seed=0, **clf_kw)
    timings["classifier"] = time.perf_counter() - t0
    say(f"digits classifier: held-out accuracy {clf_acc:.4f} ({timings['classifier']:.1f} s)")
    n = s.num_samples
    sampler = ddim_scheduler_from(sched_cfg)
    noise_sched = DDPMScheduler.from_config({k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    real = heldout[:n]  # also the held-out inputs of the agreement measures
    rows = []
    q = sample_quality(classifier, real, reference)
    rows.append(dict(name="real held-out digits", params=None, ratio=None, quality=q, train={}, agree={}, kd={}))
    save_image_grid(real[:64], out / "samples_real.png", nrow=8)

    t0 = time.perf_counter()
    shape = t_family.sample_shape(dict(t_model.config))
    samples = ddim_sample(t_family, t_model, sampler, n, shape, seed=seed, num_inference_steps=s.ddim_steps,
                          batch_size=128)
    save_image_grid(samples[:64], out / "samples_teacher.png", nrow=8)
    rows.append(dict(name="teacher", params=teacher_params, ratio=1.0,
                     quality=sample_quality(classifier, samples, reference), train={}, agree={}, kd={}))
    timings["teacher_sampling"] = time.perf_counter() - t0
    say(f"teacher: {n} DDIM samples in {timings['teacher_sampling']:.1f} s")

    for name, (label, cfg, res) in runs.items():
        fam, model, _, _ = load_for_sampling(res.model_dir)
        model.eval()
        samples = ddim_sample(fam, model, sampler, n, shape, seed=seed, num_inference_steps=s.ddim_steps,
                              batch_size=128)
        save_image_grid(samples[:64], out / f"samples_{name}.png", nrow=8)
        agree = teacher_agreement(model, t_memo, noise_sched, real, num_timesteps=s.agreement_timesteps,
                                  seed=seed)
        kd = heldout_kd_losses(fam, model, t_memo, noise_sched, real, num_timesteps=s.agreement_timesteps,
                               seed=seed, group_size=cfg.group_size)
        rows.append(dict(name=label, folder=name, params=res.student_params, ratio=res.student_params / teacher_params,
                         quality=sample_quality(classifier, samples, reference), train=_last_metrics(res.output_dir),
                         agree=agree, kd=kd))
        say(f"{label}: Frechet {rows[-1]['quality']['frechet']:.2f}, held-out output MSE "
            f"{agree['output_mse']:.4g}")

    plot_training_curves({label: res.output_dir for _, (label, _, res) in runs.items()},
                         out / "training_curves.png", keys=CURVE_KEYS)
    timings["total"] = time.perf_counter() - t_start
    report = _write_report(out, rows, runs, s, seed, teacher, t_dir, clf_acc, timings, cache, argv)
    first = next(iter(runs.values()))[2].model_dir
    append_cost_and_eval(report, out, teacher, first, classifier, clf_acc, s.ddim_steps, n)
    results = {"seed": seed, "quick": quick, "steps": s.steps, "batch_size": s.batch_size,
               "num_samples": s.num_samples, "ddim_steps": s.ddim_steps, "classifier_accuracy": clf_acc,
               "teacher": str(teacher), "threads": torch.get_num_threads(), "timings_s": timings,
               "rows": [{k: v for k, v in r.items() if k != "train"} | {"train_last": r["train"]} for r in rows]}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    say(f"report: {report}")
    print(f"\nDemo report written to {report.resolve()}")
    return report


def _write_report(out: Path, rows, runs, s: DemoSettings, seed, teacher, t_dir, clf_acc, timings, cache, argv):
    lines = []
    add = lines.append
    cmd = "liftplace " + shlex.join(argv) if argv else "liftplace demo"
    add("# liftplace demo: output KD vs PLACE vs PLACE with coarse annealing\n")
    add(f"Command: `{cmd}`{'  (quick mode: a smoke run, numbers not meaningful)' if s.quick else ''}  ")
    add(f"Seed {seed} for every run (initialisation, data order, noise, timesteps) and for sampling "
        f"(image i starts from noise seeded {seed}+i, the same for every model).  ")
    add(f"Teacher: `{teacher}` ({t_dir}). Students: derived from the teacher with width x0.25, one layer per "
        "block, GroupNorm 4; each distilled for "
        f"{s.steps} steps of batch {s.batch_size} on the digits train split (1,438 images, 16x16).  ")
    add(f"Wall time {timings['total']:.0f} s on {torch.get_num_threads()} CPU thread(s) "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}).\n")

    add("## Results\n")
    add("| model | parameters | student/teacher | final train KD loss (own objective) | held-out output-KD loss "
        "(MSE, sum) ↓ | held-out PLACE loss ↓ | held-out output MSE ↓ | held-out cosine ↑ | Fréchet distance ↓ "
        "| classifier confidence | class entropy (max 2.303) |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q, tr, ag, kd = r["quality"], r["train"], r["agree"], r["kd"]
        ratio = "–" if r["ratio"] is None else f"{100 * r['ratio']:.2f} %"
        add(f"| {r['name']} | {_fmt(r['params']) if r['params'] else '–'} | "
            f"{ratio} | {_fmt(tr.get('kd_loss'))} | "
            f"{_fmt(kd.get('output_kd_loss'))} | {_fmt(kd.get('place_loss'))} | {_fmt(ag.get('output_mse'))} | "
            f"{_fmt(ag.get('cosine'))} | {_fmt(q['frechet'])} | {_fmt(q['confidence'])} | "
            f"{_fmt(q['class_entropy'])} |")
    add("")
    add(f"Sample quality: Fréchet distance between {s.num_samples} DDIM samples ({s.ddim_steps} steps, eta 0) and "
        "the 1,438 training digits, in the 64-d feature space of a small CNN digits classifier trained on the spot "
        f"(seed 0, held-out accuracy **{100 * clf_acc:.2f} %**); the stand-in for FID on this data. The real-data row "
        f"puts {min(s.num_samples, 359)} held-out real digits in place of samples (the floor at this sample size). "
        f"Agreement: student and teacher on the same held-out digits noised at {s.agreement_timesteps} evenly "
        "spaced timesteps (same noise for every student); the output-KD loss is the sum-reduced MSE the output-KD "
        "student trains on, the PLACE loss uses the paper's settings (error grouping, 16 per group, L1, constant "
        "coarse weight). The training KD loss is each run's own objective and is not comparable across runs.\n")

    add("## Training at the last logged step\n")
    add("| student | loss | diffusion loss | KD loss | output MSE | adaptive weight w | coarse weight | "
        "mean slope | mean intercept | bad steps | wall time (s) |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (label, cfg, res) in runs.items():
        m = _last_metrics(res.output_dir)
        add(f"| {label} | {_fmt(m.get('loss'))} | {_fmt(m.get('sd_loss'))} | {_fmt(m.get('kd_loss'))} | "
            f"{_fmt(m.get('output_mse'))} | {_fmt(m.get('kd_weight'))} | {_fmt(m.get('kd_coarse_weight'))} | "
            f"{_fmt(m.get('kd_slope_mean'))} | {_fmt(m.get('kd_intercept_mean'))} | {res.bad_steps} | "
            f"{timings.get(name, float('nan')):.0f} |")
    add("\n(For the output-KD student, w, slope and intercept are measured with the PLACE fit but not trained on.)\n")

    add("## Images and curves\n")
    add("| real | teacher | " + " | ".join(label for _, (label, _, _) in runs.items()) + " |")
    add("|---|---|" + "---|" * len(runs))
    add("| ![](samples_real.png) | ![](samples_teacher.png) | "
        + " | ".join(f"![](samples_{name}.png)" for name in runs) + " |")
    add("\n![training curves](training_curves.png)\n")
    add("Loss curves, the adaptive weight w, the coarse weight and the mean per-group slope/intercept of the "
        "teacher-on-student fit over training (`training_curves.png`).\n")

    add("## Reproduce\n")
    add("Each student is an ordinary `liftplace distill` run; its resolved config is in its folder:\n")
    add("```")
    for name, (label, cfg, res) in runs.items():
        add(f"liftplace distill --config {res.output_dir / 'config.yaml'}   # {label}")
    add("```")
    add(f"The runs shared one in-memory cache of teacher outputs (verified by an input digest; {cache.hits} hits, "
        f"{cache.misses} misses): the teacher sees bitwise-identical inputs in all three runs, so the numbers "
        "equal three separate runs.  ")
    add("The teacher was trained with `liftplace train-teacher --config configs/digits_teacher.yaml` "
        "(see README); it is loaded, not retrained, by the demo.\n")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def seed_summary(result_files) -> str:
    """A markdown table of mean ± sample std over several demo runs' ``results.json``
    (e.g. ``liftplace demo --seed 0/1/2``): Fréchet distance and held-out agreement per model."""
    runs = [json.loads(Path(f).read_text()) for f in result_files]
    names = [r["name"] for r in runs[0]["rows"]]
    cols = (("Fréchet distance ↓", lambda r: r["quality"]["frechet"]),
            ("held-out output MSE ↓", lambda r: r["agree"].get("output_mse")),
            ("held-out PLACE loss ↓", lambda r: r["kd"].get("place_loss")))

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        if len(values) == 1:
            return _fmt(values[0])
        return f"{_fmt(statistics.mean(values))} ± {_fmt(statistics.stdev(values), 2)}"

    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [f"| model (seeds {seeds}) | " + " | ".join(c for c, _ in cols) + " | per seed: Fréchet |",
             "|---|" + "---|" * (len(cols) + 1)]
    for name in names:
        rows = [next(x for x in r["rows"] if x["name"] == name) for r in runs]
        per_seed = ", ".join(_fmt(x["quality"]["frechet"]) for x in rows)
        lines.append(f"| {name} | " + " | ".join(cell([f(x) for x in rows]) for _, f in cols) + f" | {per_seed} |")
    return "\n".join(lines)
