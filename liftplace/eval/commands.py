"""The evaluation subcommands of the ``liftplace`` CLI: ``cost``, ``eval``, ``train-classifier``.

``add_parsers(sub, formatter)`` adds them to the CLI's subparsers; ``COMMANDS`` maps each
name to the function that runs it (``args -> exit code``).
"""

from __future__ import annotations

import json
import platform
import textwrap
from pathlib import Path


def _device_arg(p):
    p.add_argument("--device", default=None, help="torch device. Default: cuda when available, else cpu.")


def add_parsers(sub, formatter) -> None:
    p = sub.add_parser(
        "cost", allow_abbrev=False, formatter_class=formatter,
        help="parameters, MACs, peak memory and latency of a teacher and a student",
        description=textwrap.dedent("""\
            Measure what one denoiser call and one full DDIM sample cost: parameters, MACs per call
            (torch.utils.flop_counter; MACs = FLOPs/2, matmul/conv/attention only), peak memory per
            call (CUDA: max_memory_allocated; CPU: peak bytes of live operator outputs, a lower bound),
            median latency per step and wall time of a full sample, for the teacher and the student,
            with the student/teacher ratio and a block-by-block table."""),
        epilog="example: liftplace cost --teacher builtin:digits --student runs/demo/place/student --json cost.json")
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="Teacher model folder or builtin:NAME (omit to measure --student alone).")
    p.add_argument("--student", default=None, metavar="PATH",
                   help="Student model folder, training output_dir or checkpoint folder.")
    _device_arg(p)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="Default: fp32.")
    p.add_argument("--batch_size", type=int, default=1, metavar="B", help="Images per call. Default: 1.")
    p.add_argument("--resolution", type=int, default=None, metavar="R",
                   help="Sample side in pixels. Default: the model's sample_size.")
    p.add_argument("--num_inference_steps", type=int, default=50, metavar="STEPS",
                   help="DDIM steps of the timed full sample. Default: 50.")
    p.add_argument("--repeats", type=int, default=10, metavar="N", help="Timed calls per model (median). Default: 10.")
    p.add_argument("--threads", type=int, default=None, metavar="T", help="torch CPU threads. Default: torch's.")
    p.add_argument("--json", default=None, metavar="PATH", help="Also write the record as JSON here.")
    add_eval_parsers(sub, formatter)


def add_eval_parsers(sub, formatter) -> None:
    p = sub.add_parser(
        "eval", allow_abbrev=False, formatter_class=formatter,
        help="Frechet distance (FID), KID and CLIP score of a model's samples or an image folder",
        description=textwrap.dedent("""\
            Score generated images against a reference: the Frechet distance between Gaussians fitted to
            features (FID with --features inception) and KID (unbiased, polynomial kernel; needs reference
            images, not only statistics). Generated images: --images DIR, or --model PATH sampled with DDIM
            into --samples_dir (image i from seed + i; images already there are kept, so a run resumes).
            Reference: an image folder, `digits` (the built-in train split) or a pytorch-fid .npz with
            mu/sigma. With --clip_model and --prompts, also the CLIP score (100 * max(cos, 0), mean over
            image-prompt pairs) of an --images folder. Writes output_dir/scores.json with the scores and
            their protocol (extractor and weights SHA-256, versions, N, resize, sampler, steps,
            reference-stat hash, seed policy). Nothing is downloaded."""),
        epilog=textwrap.dedent("""\
            examples:
              liftplace train-classifier --output runs/digits_classifier.safetensors
              liftplace eval --model runs/demo/place/student --reference digits \\
                  --features classifier:runs/digits_classifier.safetensors --num_images 1000 --output_dir runs/eval
              liftplace eval --images samples/ --reference ref_stats.npz --features inception \\
                  --inception_weights weights-inception-2015-12-05-6726825d.pth --output_dir runs/eval
              liftplace eval --images samples/ --prompts samples/prompts.txt --clip_model clip-vit-large-patch14/ \
                  --output_dir runs/eval_clip"""))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH", help="Model folder, training output_dir, checkpoint or builtin:NAME.")
    src.add_argument("--images", metavar="DIR", help="Folder of generated images (all one size).")
    p.add_argument("--reference", metavar="REF", help="Image folder, `digits`, or a .npz (mu, sigma).")
    p.add_argument("--features", metavar="SPEC", help="`inception` or `classifier:PATH` (with --reference).")
    p.add_argument("--inception_weights", metavar="PATH", help="Local Inception weights file (--features inception).")
    p.add_argument("--clip_model", metavar="PATH",
                   help="Local CLIP model folder (CLIPModel + CLIPProcessor save_pretrained): adds the CLIP score.")
    p.add_argument("--prompts", metavar="FILE",
                   help="With --clip_model: a .txt with one prompt per image (sorted-name order) or a metadata.jsonl.")
    p.add_argument("--output_dir", required=True, metavar="DIR", help="Where scores.json (and samples/) go.")
    p.add_argument("--samples_dir", metavar="DIR", help="Where --model's samples go. Default: output_dir/samples.")
    p.add_argument("--num_images", type=int, default=1000, metavar="N", help="Samples from --model. Default: 1000.")
    p.add_argument("--batch_size", type=int, default=64, metavar="B", help="Sampling batch. Default: 64.")
    p.add_argument("--num_inference_steps", type=int, default=50, metavar="STEPS", help="DDIM steps. Default: 50.")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta. Default: 0.")
    p.add_argument("--guidance_scale", type=float, default=1.0,
                   help="Class-conditional DiT --model: guidance against the null class (image i has class i % K). "
                        "Default: 1 (no guidance).")
    p.add_argument("--seed", type=int, default=0, help="Seed of image 0 (image i uses seed + i). Default: 0.")
    p.add_argument("--kid_subsets", type=int, default=100, metavar="K", help="KID subsets. Default: 100.")
    p.add_argument("--kid_subset_size", type=int, default=1000, metavar="M", help="KID subset size. Default: 1000.")
    p.add_argument("--save_reference_stats", metavar="NPZ", help="Also write the reference mu/sigma here.")
    p.add_argument("--precision_recall", type=int, nargs="?", const=3, default=None, metavar="K",
                   help="Also improved precision/recall with K nearest neighbours (default K: 3).")
    p.add_argument("--allow_small_n", action="store_true",
                   help="Score even when N <= feature dim (singular covariance; a rough number).")
    p.add_argument("--threads", type=int, default=None, metavar="T", help="torch CPU threads. Default: torch's.")
    p.add_argument("--report_to", default="none", metavar="TRACKERS",
                   help="Also log the scores (and the protocol as the run's config) to these accelerate trackers: "
                        "none or a comma list (tensorboard, wandb, mlflow, ...; files under output_dir/logs). "
                        "Default: none.")
    _device_arg(p)

    p = sub.add_parser(
        "train-classifier", allow_abbrev=False, formatter_class=formatter,
        help="train the small CNN behind --features classifier:PATH",
        description="Train the small CNN whose features `liftplace eval --features classifier:PATH` uses, on the "
                    "built-in digits or a labelled folder (DIR/<class>/*.png); under a minute on 2 CPU cores.",
        epilog="example: liftplace train-classifier --data digits --output runs/digits_classifier.safetensors")
    p.add_argument("--data", default="digits", metavar="DATA", help="`digits` or a folder with one subfolder per class.")
    p.add_argument("--output", required=True, metavar="FILE", help="The .safetensors file to write.")
    p.add_argument("--resolution", type=int, default=16, metavar="R", help="Image side. Default: 16.")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="For a folder: 1 or 3. Default: 1.")
    p.add_argument("--epochs", type=int, default=20, metavar="E", help="Default: 20.")
    p.add_argument("--seed", type=int, default=0, help="Default: 0 (the demo's classifier).")


def eval_command(args) -> int:
    import torch

    from .fid import evaluate

    if getattr(args, "report_to", "none") not in (None, "none"):
        from ..train.distributed import resolve_trackers

        resolve_trackers(args.report_to)  # an unknown or missing tracker fails before the evaluation
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = evaluate(images=args.images, model=args.model, reference=args.reference, features=args.features,
                   output_dir=args.output_dir, inception_weights=args.inception_weights, clip_model=args.clip_model,
                   prompts=args.prompts, num_images=args.num_images,
                   batch_size=args.batch_size, num_inference_steps=args.num_inference_steps, eta=args.eta,
                   seed=args.seed, samples_dir=args.samples_dir, device=args.device,
                   guidance_scale=args.guidance_scale, kid_subsets=args.kid_subsets,
                   kid_subset_size=args.kid_subset_size, save_reference_stats=args.save_reference_stats,
                   allow_small_n=args.allow_small_n, precision_recall_k=args.precision_recall)
    p = rec["protocol"]
    if "features" in p:
        print(f"features {p['features']['name']} ({p['features']['feature_dim']}-d, sha256 "
              f"{p['features']['sha256'][:12]}), N {p['images']['n']}, resize {p['resize']}, reference "
              f"{p['reference']['path']} (stats {p['reference']['stats_sha256'][:12]})")
    if "clip" in p:
        print(f"CLIP {p['clip']['model']} (weights sha256 {p['clip']['weights_sha256'][:12]}), N {p['images']['n']}, "
              f"prompts {p['clip']['prompts']}")
    for k, v in rec["scores"].items():
        print(f"{k}: {v:.6g}")
    print(f"written: {args.output_dir}/scores.json (protocol included)")
    if getattr(args, "report_to", "none") not in (None, "none"):
        from pathlib import Path

        from ..train.distributed import log_scores

        sent = log_scores(args.report_to, Path(args.output_dir) / "logs", rec["scores"], rec["protocol"])
        print(f"scores logged to: {', '.join(sent) or 'no tracker'}")
    return 0


def train_classifier_command(args) -> int:
    from .classifier import save_classifier, train_classifier

    model, acc, meta = train_classifier(args.data, resolution=args.resolution, channels=args.channels,
                                        seed=args.seed, epochs=args.epochs)
    path = save_classifier(model, args.output, meta)
    print(f"classifier on {args.data}: held-out accuracy {100 * acc:.2f} % -> {path}")
    return 0


def cost_command(args) -> int:
    import torch

    from ..train.sampling import scheduler_from_config
    from ..train.sampling import load_for_sampling
    from .cost import compare_cost, format_cost, model_cost, sampler_name

    if args.teacher is None and args.student is None:
        raise ValueError("nothing to measure: pass --student PATH and/or --teacher PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    costs, shapes, sources, conds, samplers = {}, {}, {}, {}, {}
    for role in ("teacher", "student"):
        path = getattr(args, role)
        if path is None:
            continue
        family, model, sched_cfg, model_dir = load_for_sampling(path)
        shape = family.sample_shape(dict(model.config), args.resolution)
        shapes[role], sources[role] = shape, str(model_dir)
        scheduler = scheduler_from_config(sched_cfg)
        samplers[role] = sampler_name(scheduler)
        conds[role] = {k: list(v.shape) for k, v in family.example_cond(dict(model.config), args.batch_size, "cpu",
                                                                        torch.float32).items()}
        costs[role] = model_cost(model, family, shape, name=role, batch_size=args.batch_size, device=device,
                                 dtype=args.dtype, num_inference_steps=args.num_inference_steps,
                                 scheduler=scheduler, repeats=args.repeats)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"teacher and student sample shapes differ: {shapes}; they must denoise the same input")
    protocol = {"command": "liftplace cost", "models": sources, "device": device,
                "device_name": (torch.cuda.get_device_name(device) if device.startswith("cuda")
                                else platform.processor() or platform.machine()),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
                "batch_size": args.batch_size, "sample_shape": list(next(iter(shapes.values()))),
                "num_inference_steps": args.num_inference_steps, "repeats": args.repeats,
                "sampler": samplers if len(set(samplers.values())) > 1 else next(iter(samplers.values())),
                "conditioning": ({role: {k: f"zeros {shape}" for k, shape in c.items()} for role, c in conds.items()}
                                 if any(conds.values()) else None),
                "measures": "the denoiser alone (text encoders and VAE decoding are not included)"}
    teacher = costs["teacher"] if len(costs) == 2 else None
    record = compare_cost(teacher, costs.get("student") or costs["teacher"], protocol)
    print(format_cost(record))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
        print(f"written: {args.json}")
    return 0


COMMANDS = {"cost": cost_command, "eval": eval_command, "train-classifier": train_classifier_command}
