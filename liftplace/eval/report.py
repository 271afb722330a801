"""The demo report's cost section and the saved digits classifier, so that the demo's
students can be re-measured with ``liftplace cost`` and re-scored with ``liftplace eval``."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch

from ..train.sampling import ddim_scheduler_from, load_for_sampling
from .classifier import save_classifier
from .cost import compare_cost, format_cost, model_cost


def append_cost_and_eval(report: Path, out: Path, teacher: str, student_dir, classifier, clf_acc: float,
                         ddim_steps: int, num_samples: int) -> dict:
    """Save the demo's classifier beside the report, measure teacher vs ``student_dir`` with
    ``liftplace cost``'s code (batch 1, ``ddim_steps`` steps) and append both to ``report``."""
    clf_path = save_classifier(classifier, out / "digits_classifier.safetensors",
                               {"data": "digits", "resolution": 16, "seed": 0, "accuracy": clf_acc,
                                "num_classes": 10, "width": 16, "feature_dim": classifier.feature_dim,
                                "in_channels": 1})
    costs, shape = {}, None
    for role, path in (("teacher", teacher), ("student", student_dir)):
        family, model, sched_cfg, _ = load_for_sampling(path)
        shape = family.sample_shape(dict(model.config))
        costs[role] = model_cost(model, family, shape, name=role, num_inference_steps=ddim_steps,
                                 scheduler=ddim_scheduler_from(sched_cfg))
    protocol = {"command": "liftplace cost", "device": "cpu", "threads": torch.get_num_threads(),
                "torch": torch.__version__, "dtype": "fp32", "batch_size": 1, "sample_shape": list(shape),
                "num_inference_steps": ddim_steps, "sampler": "DDIM (eta 0)"}
    record = compare_cost(costs["teacher"], costs["student"], protocol)
    (out / "cost.json").write_text(json.dumps(record, indent=2))
    cost_cmd = shlex.join(["liftplace", "cost", "--teacher", str(teacher), "--student", str(student_dir),
                           "--num_inference_steps", str(ddim_steps), "--device", "cpu"])
    eval_cmd = shlex.join(["liftplace", "eval", "--model", str(student_dir), "--reference", "digits", "--features",
                           f"classifier:{clf_path}", "--num_images", str(max(num_samples, 65)),
                           "--num_inference_steps", str(ddim_steps), "--output_dir", str(out / "eval")])
    text = ["", "## Cost (`liftplace cost`)", "",
            f"Teacher vs one student (all three students share one architecture); `{cost_cmd}`, "
            f"record in `cost.json`:", "", "```", format_cost(record), "```", "",
            "## Re-scoring (`liftplace eval`)", "",
            "The Fréchet distance above is `liftplace eval --features classifier:PATH`'s computation on the "
            f"in-memory samples; the classifier is saved as `{clf_path.name}`, so a student can be re-scored "
            "(from 8-bit PNG samples, with KID and the protocol in `scores.json`) with", "",
            f"```\n{eval_cmd}\n```", ""]
    with open(report, "a") as f:
        f.write("\n".join(text))
    return record
