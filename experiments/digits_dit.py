"""Class-conditional DiT distillation with depth-pruned students on the bundled digits (issue 12).

    python experiments/digits_dit.py --output_dir runs/digits_dit            # ~20-30 min, 1 thread
    python experiments/digits_dit.py --quick --output_dir /tmp/digits_dit    # smoke run, ~1-2 min

1. Data: scikit-learn's digits at their native 8x8 pixels, class labels 0-9 (DigitsDataset).
2. Teachers, trained here by the project's recipe (`liftplace train-teacher` = Trainer(role="teacher"),
   kd_loss none, label dropout cond_drop_prob 0.1 to the null class):
   a DiTTransformer2DModel (8 blocks, width 64, patch 2, learned sigma: out_channels 2,
   DDPM with DiT's VB term) and the same DiT with out_channels 1 trained with the
   flow-matching objective (objective flow, logit-normal timesteps).
3. Students: 4 of the teacher's 8 blocks (student_depth 4, layer_selection score: the blocks
   whose removal raises a held-out denoising loss most), every weight copied from the
   teacher, then distilled with the same seeds: no KD (denoising loss only), output KD, PLACE,
   PLACE + token-feature KD (student block i <-> its source teacher block); and PLACE on
   the flow teacher (the flow objective on real data).
4. Report: per-class sample grids (one row per class, guided), class adherence (the digits
   classifier's accuracy on the requested label), sample quality (classifier Frechet distance
   to held-out digits, confidence) and teacher agreement (output MSE on held-out noisy
   inputs, the mean half for learned sigma).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DIT = dict(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=2, num_layers=8, sample_size=8,
           patch_size=2, num_embeds_ada_norm=10)
DIT_FLOW = dict(DIT, out_channels=1)


@torch.no_grad()
def agreement(family, student, teacher, objective, images, labels, seed: int) -> float:
    """Output MSE (mean half) of student vs teacher on held-out noisy inputs from the objective."""
    clean = images
    noisy, t, _ = objective.prepare(clean, torch.Generator().manual_seed(seed))
    cond = {"label": labels}
    c = clean.shape[1]
    s = family.forward(student.eval(), noisy, t, cond)[:, :c]
    te = family.forward(teacher.eval(), noisy, t, cond)[:, :c]
    return float((s - te).square().mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/digits_dit")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teacher_steps", type=int, default=None)
    parser.add_argument("--student_steps", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from liftplace.eval.metrics import sample_quality, train_digits_classifier
    from liftplace.train import Trainer, build_config
    from liftplace.train.data import DigitsDataset
    from liftplace.train.dit import load_and_sample
    from liftplace.train.models import count_parameters, get_family, load_pretrained
    from liftplace.train.objective import make_objective
    from liftplace.train.sampling import save_grid

    t_start = time.perf_counter()
    out = Path(args.output_dir)
    q = args.quick
    teacher_steps, student_steps = (60, 20) if q else (1500, 500)
    teacher_steps = args.teacher_steps or teacher_steps
    student_steps = args.student_steps or student_steps
    n_per, sample_steps, guidance = (2, 5, 2.0) if q else (10, 50, 2.0)
    fam = get_family("dit")
    timings = {}
    common = dict(model_type="dit", dataset_name="digits", resolution=8, train_batch_size=64, logging_steps=50, validation_steps=0,
                  num_validation_images=8, ddpm_num_inference_steps=sample_steps, report_to="none",
                  progress_bar=False, seed=args.seed, checkpointing_steps=10 ** 6, guidance_scale=guidance,
                  cond_drop_prob=0.1)

    teachers = {}
    for tname, tcfg, extra in (("teacher", DIT, {}), ("teacher_flow", DIT_FLOW, {"objective": "flow"})):
        t0 = time.perf_counter()
        cfg = build_config(None, dict(common, output_dir=str(out / tname), teacher_config=tcfg, kd_loss="none",
                                      max_train_steps=teacher_steps, learning_rate=1e-3, lr_warmup_steps=50,
                                      use_ema=True, ema_decay=0.999, **extra))
        teachers[tname] = (Trainer(cfg, role="teacher").train().model_dir, cfg)
        timings[tname] = time.perf_counter() - t0
        print(f"{tname}: {timings[tname]:.0f} s", flush=True)

    students = {"no_kd": ("teacher", dict(kd_loss="none")),
                "output": ("teacher", dict(kd_loss="output")),
                "place": ("teacher", dict(kd_loss="place")),
                "place_feat": ("teacher", dict(kd_loss="place", lambda_kd_feat=0.1, kd_feat_layers="all")),
                "flow_place": ("teacher_flow", dict(kd_loss="place", objective="flow"))}
    dirs = {"teacher": teachers["teacher"][0], "teacher_flow": teachers["teacher_flow"][0]}
    kept = {}
    for name, (tname, kw) in students.items():
        t0 = time.perf_counter()
        cfg = build_config(None, dict(common, output_dir=str(out / name), pretrained_model_name_or_path=str(dirs[tname]),
                                      student_depth=4, layer_selection="score", max_train_steps=student_steps,
                                      learning_rate=5e-4, use_ema=False, group_size=16, **kw))
        tr = Trainer(cfg)
        dirs[name] = tr.train().model_dir
        kept[name] = tr.student.liftplace_kept_blocks
        timings[name] = time.perf_counter() - t0
        print(f"{name}: {timings[name]:.0f} s, kept teacher blocks {kept[name]}", flush=True)

    t0 = time.perf_counter()
    classifier, clf_acc = train_digits_classifier(8, seed=args.seed)
    held = DigitsDataset(8, split="test")
    train_imgs = DigitsDataset(8, split="train").images
    real_floor = sample_quality(classifier, train_imgs[:len(held)], held.images)["frechet"]
    n_held = 64 if q else 256
    h_img, h_lab = held.images[:n_held], held.labels[:n_held]
    t_models = {k: load_pretrained(dirs[k], fam, k).eval() for k in ("teacher", "teacher_flow")}
    objectives = {}
    for tname, (_, tcfg) in teachers.items():
        objectives[tname] = make_objective(tcfg.replace(model_type="dit"), fam, dict(t_models[tname].config))[1]
    labels = torch.arange(10).repeat_interleave(n_per)
    results = {}
    for name, d in dirs.items():
        images, sched = load_and_sample(d, labels, guidance_scale=guidance, num_inference_steps=sample_steps,
                                        seed=args.seed)
        save_grid(images, out / f"grid_{name}.png", nrow=n_per)
        adherence = float((classifier(images).argmax(-1) == labels).float().mean())
        qual = sample_quality(classifier, images, held.images)
        model = load_pretrained(d, fam, name).eval()
        r = {"params": count_parameters(model), "class_adherence": adherence, "scheduler": type(sched).__name__,
             "frechet": qual["frechet"], "confidence": qual["confidence"]}
        tname = students[name][0] if name in students else None
        if tname is not None:
            r["teacher_output_mse"] = agreement(fam, model, t_models[tname], objectives[tname], h_img, h_lab, 1234)
            r["kept_blocks"] = kept[name]
        results[name] = r
    timings["eval"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start

    lines = [f"# Digits class-conditional DiT distillation ({'quick' if q else 'full'} run)", "",
             f"Teachers {teacher_steps} steps (DiT 8 blocks x 64, patch 2, 8x8 digits, 10 classes; `teacher`: "
             f"DDPM + learned sigma, `teacher_flow`: flow matching), each student {student_steps} steps "
             f"(4 of 8 blocks, layer_selection score, weights copied). Samples: {n_per} per class, "
             f"{sample_steps} steps, guidance {guidance}; digits classifier held-out accuracy {clf_acc:.3f}; "
             f"Frechet of real train vs held-out digits (the floor) {real_floor:.2f}. Wall time {wall / 60:.1f} min "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).", "",
             "| model | teacher | parameters | sampler | class adherence | Frechet | confidence | teacher output MSE | kept blocks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        tname = students[name][0] if name in students else "-"
        lines.append(f"| {name} | {tname} | {r['params']:,} | {r['scheduler']} | {r['class_adherence']:.3f} | "
                     f"{r['frechet']:.2f} | {r['confidence']:.3f} | {r.get('teacher_output_mse', float('nan')):.4f} | "
                     f"{r.get('kept_blocks', '-')} |")
    lines += ["", "Grids (one row per class 0-9): " + ", ".join(f"`grid_{n}.png`" for n in results)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "wall_s": wall, "timings": timings,
                                                  "classifier_accuracy": clf_acc, "real_floor": real_floor}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
