"""``liftplace`` command line: distill, train-teacher, sample, demo; cost, eval, train-classifier (eval/commands.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from . import __version__

_CONFIG_HELP = ("YAML file of config keys (the flag names below, without --). Precedence: built-in "
                "defaults < this file < command-line flags.")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=36, width=100)


def build_parser() -> argparse.ArgumentParser:
    from .train.config import add_config_arguments

    parser = argparse.ArgumentParser(
        prog="liftplace", allow_abbrev=False,
        formatter_class=_formatter,
        description=textwrap.dedent("""\
            LIFT and PLACE knowledge distillation for diffusion models (diffusers + accelerate).

            Distil a diffusers teacher into a much smaller student with the LIFT/PLACE loss, train
            a teacher, sample from a trained model, or run the self-contained demo. Everything runs
            offline: models come from local folders, datasets from local files or built-ins."""),
        epilog=textwrap.dedent("""\
            examples:
              liftplace demo                      # teacher vs output-KD vs PLACE students, report in runs/demo
              liftplace distill --config configs/digits_place.yaml
              liftplace distill --config configs/digits_place.yaml --resume_from_checkpoint latest
              liftplace sample --model runs/digits_place/student --num_images 64 --output_dir samples/
              liftplace train-teacher --config configs/digits_teacher.yaml

            `liftplace SUBCOMMAND --help` lists every option of a subcommand."""),
    )
    parser.add_argument("--version", action="version", version=f"liftplace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser(
        "distill", allow_abbrev=False, formatter_class=_formatter, help="distil a teacher into a smaller student",
        description=textwrap.dedent("""\
            Distil a frozen teacher into a student:
                loss = lambda_sd * L_diffusion + lambda_kd_output * KD(student, teacher) + lambda_kd_feat * L_feat
            with KD = LIFT/PLACE (kd_loss place|lift), plain output MSE (output) or nothing (none).

            Writes to output_dir: config.yaml (the resolved config), metrics.jsonl (one line every
            logging_steps), samples/step-*.png (DDIM grids from the EMA student), checkpoint-<step>/
            (resumable with --resume_from_checkpoint latest) and, at the end, student/ (save_pretrained,
            safetensors; loads with diffusers.UNet2DModel.from_pretrained)."""),
        epilog="example: liftplace distill --config configs/digits_place.yaml --max_train_steps 500")
    p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    add_config_arguments(p)

    p = sub.add_parser(
        "train-teacher", allow_abbrev=False, formatter_class=_formatter,
        help="train a teacher (plain diffusion training)",
        description=textwrap.dedent("""\
            Train a diffusion model from scratch (or continue from pretrained_model_name_or_path) with
            the plain denoising loss: the recipe of the teacher shipped with liftplace. The architecture
            is teacher_config (a mapping in the YAML file, or a JSON file); kd_loss is always none.
            The trained model is exported to output_dir/teacher (save_pretrained + scheduler_config.json)."""),
        epilog="example: liftplace train-teacher --config configs/digits_teacher.yaml")
    p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    add_config_arguments(p, defaults={"output_dir": "runs/teacher", "kd_loss": "none"})

    p = sub.add_parser(
        "sample", allow_abbrev=False, formatter_class=_formatter, help="draw images from a trained model with DDIM",
        description=textwrap.dedent("""\
            Draw N images with DDIM from an exported model folder (output_dir/student, a teacher, a
            diffusers pipeline folder), a training output_dir, a checkpoint-<step> folder (its EMA
            weights unless --no_ema) or builtin:digits. Image i uses seed + i alone, so an image does
            not change with --batch_size or --num_images. Writes 000000.png ... and grid.png."""),
        epilog="example: liftplace sample --model runs/demo/place/student --num_images 64 --output_dir samples/")
    p.add_argument("--model", required=True, metavar="PATH", help="Model folder, checkpoint folder or builtin:NAME.")
    p.add_argument("--output_dir", required=True, metavar="DIR", help="Folder for the images and grid.png.")
    p.add_argument("--num_images", type=int, default=64, metavar="N", help="Number of images. Default: 64.")
    p.add_argument("--batch_size", type=int, default=64, metavar="B", help="Images per forward pass. Default: 64.")
    p.add_argument("--seed", type=int, default=0, help="Seed of image 0 (image i uses seed + i). Default: 0.")
    p.add_argument("--num_inference_steps", type=int, default=50, metavar="STEPS", help="DDIM steps. Default: 50.")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic). Default: 0.")
    p.add_argument("--no_ema", action="store_true", help="From a checkpoint folder, use the raw (not EMA) weights.")
    p.add_argument("--nrow", type=int, default=None, help="Images per grid row. Default: about sqrt(N).")
    p.add_argument("--device", default=None, help="torch device. Default: cuda when available, else cpu.")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="Text-to-image pipeline folders: a prompt (repeat for several; --num_images per prompt).")
    p.add_argument("--class_labels", type=int, nargs="+", default=None, metavar="K",
                   help="dit models: the class of each image (cycled over --num_images; default 0..9 cycled); "
                        "guided by --guidance_scale against the null class.")
    p.add_argument("--guidance_scale", type=float, default=7.5,
                   help="Classifier-free guidance scale with --prompt (1: none). Default: 7.5.")

    p = sub.add_parser(
        "demo", allow_abbrev=False, formatter_class=_formatter, help="the self-contained demo behind `make demo`",
        description=textwrap.dedent("""\
            On the built-in digits data (16x16, 1 channel): the shipped teacher U-Net (builtin:digits,
            trained by `liftplace train-teacher --config configs/digits_teacher.yaml`) is distilled into
            a student at ~4.4 % of its parameters three times with identical seeds and steps -- output KD,
            PLACE, and PLACE with coarse annealing -- then every model is sampled with DDIM and compared:
            agreement with the teacher on held-out noisy inputs, and a Frechet distance in the feature
            space of a small digits classifier trained on the spot (its held-out accuracy is reported).
            Writes output_dir/report.md, sample grids and training-curve plots; no network needed."""),
        epilog="example: liftplace demo --quick --output_dir /tmp/demo")
    p.add_argument("--quick", action="store_true", help="A short run (about 1-2 minutes) for tests and smoke checks.")
    p.add_argument("--output_dir", default="runs/demo", metavar="DIR", help="Default: runs/demo.")
    p.add_argument("--seed", type=int, default=0, help="Seed of every run (training and sampling). Default: 0.")
    p.add_argument("--max_train_steps", type=int, default=None, metavar="N",
                   help="Override the steps per student (default: the demo's own, smaller with --quick).")
    p.add_argument("--teacher", default="builtin:digits", metavar="PATH",
                   help="Teacher model folder. Default: builtin:digits (shipped with liftplace).")
    p.add_argument("--num_samples", type=int, default=None, metavar="N",
                   help="Images sampled per model for the Frechet distance (default: as many as held-out images).")
    p.add_argument("--threads", type=int, default=1, metavar="T",
                   help="torch CPU threads. Default: 1 -- the demo's models are small, and one thread is "
                        "several times faster than two when the cores are shared with other work; on an idle "
                        "machine --threads 2 is somewhat faster.")
    from .eval.commands import add_parsers

    add_parsers(sub, _formatter)  # cost, eval, train-classifier
    return parser


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "accelerate.utils", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except ImportError:
        pass


def _train_command(args, role: str) -> int:
    from .train.config import build_config
    from .train.distributed import preflight_launch

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    base = {"output_dir": "runs/teacher", "kd_loss": "none"} if role == "teacher" else None
    cfg = build_config(args.config, overrides, base=base)
    preflight_launch()  # an inconsistent multi-process launch fails here, before the models are imported

    from .train.trainer import Trainer

    result = Trainer(cfg, role=role).train()
    print(f"done: {result.global_step} steps in {result.wall_time:.1f} s"
          + (f", {result.bad_steps} skipped" if result.bad_steps else ""))
    print(f"metrics:     {result.metrics_path}")
    print(f"checkpoint:  {result.last_checkpoint}")
    if result.model_dir is not None:
        print(f"final model: {result.model_dir}")
    return 0


def _sample_command(args) -> int:
    import torch

    from .train.sampling import (ddim_sample, ddim_scheduler_from, load_for_sampling, save_grid, save_images,
                                 text_to_image)

    if args.num_images < 1 or args.batch_size < 1 or args.num_inference_steps < 1:
        raise ValueError("--num_images, --batch_size and --num_inference_steps must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    family, model, sched_cfg, model_dir = load_for_sampling(args.model, prefer_ema=not args.no_ema)
    model = model.to(device)
    if family.cond_keys == ("encoder_hidden_states",):
        from .train.latent import encoders_from_pipeline, pipeline_folder_of

        pipe = pipeline_folder_of(model_dir)
        if pipe is None:
            raise ValueError(f"{model_dir} is a text-conditional U-Net outside a pipeline folder; sample from the "
                             "exported pipeline folder (output_dir/student), which has its VAE and text encoder")
        if not args.prompt:
            raise ValueError("a text-to-image model needs --prompt TEXT")
        images = text_to_image(family, model, encoders_from_pipeline(pipe, device), ddim_scheduler_from(sched_cfg),
                               args.prompt, images_per_prompt=args.num_images, guidance_scale=args.guidance_scale,
                               seed=args.seed, num_inference_steps=args.num_inference_steps, eta=args.eta,
                               batch_size=args.batch_size, device=device, progress=True)
    elif family.name == "dit" or str(sched_cfg.get("_class_name", "")).startswith("FlowMatch"):
        # class-conditional DiT and flow-matching models: the sampler of the scheduler they were trained with
        from .train.sampling import sample_images, scheduler_from_config

        if args.prompt:
            raise ValueError(f"--prompt: the model in {model_dir} is not text-conditional")
        cond = uncond = None
        if family.name == "dit":
            k = family.null_class(dict(model.config))
            pool = args.class_labels or list(range(min(k, 10)))
            if any(not 0 <= c < k for c in pool):
                raise ValueError(f"--class_labels must be in [0, {k}) for this model (num_embeds_ada_norm={k})")
            cond = {"label": torch.tensor([pool[i % len(pool)] for i in range(args.num_images)])}
            uncond = {"label": torch.tensor([k])}
        images = sample_images(family, model, scheduler_from_config(sched_cfg), args.num_images,
                               family.sample_shape(dict(model.config)), seed=args.seed,
                               num_inference_steps=args.num_inference_steps, batch_size=args.batch_size,
                               device=device, cond=cond, uncond=uncond, guidance_scale=args.guidance_scale,
                               clamp=not (model_dir / "vae").is_dir())
        if (model_dir / "vae").is_dir():  # a latent DiT exported with its VAE
            from .train.dit import LatentEncoder
            from .train.latent import load_vae

            images = LatentEncoder(load_vae(model_dir / "vae"), device=device).decode(images).cpu()
    else:
        if args.prompt:
            raise ValueError(f"--prompt: the model in {model_dir} is not text-conditional")
        images = ddim_sample(family, model, ddim_scheduler_from(sched_cfg), args.num_images,
                             family.sample_shape(dict(model.config)), seed=args.seed,
                             num_inference_steps=args.num_inference_steps, eta=args.eta, batch_size=args.batch_size,
                             device=device, progress=True)
    save_images(images, args.output_dir)
    grid = save_grid(images, f"{args.output_dir}/grid.png", nrow=args.nrow)
    print(f"{len(images)} images from {model_dir} -> {args.output_dir}/ (grid: {grid})")
    return 0


def main(argv=None) -> int:
    from .train.checkpoint import CheckpointError
    from .train.config import ConfigError, check_unknown_flags

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    try:
        if unknown:
            check_unknown_flags(unknown)
        _setup_logging()
        if args.command == "distill":
            return _train_command(args, "student")
        if args.command == "train-teacher":
            return _train_command(args, "teacher")
        if args.command == "sample":
            return _sample_command(args)
        if args.command == "demo":
            from .eval.demo import run_demo

            run_demo(quick=args.quick, output_dir=args.output_dir, seed=args.seed, steps=args.max_train_steps,
                     teacher=args.teacher, num_samples=args.num_samples, threads=args.threads,
                     argv=list(argv) if argv is not None else sys.argv[1:])
            return 0
        from .eval.commands import COMMANDS

        if args.command in COMMANDS:
            return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, ValueError) as exc:
        print(f"liftplace {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from .train.trainer import TrainingDivergedError

        if isinstance(exc, TrainingDivergedError):
            print(f"liftplace {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise
    parser.error(f"unknown command {args.command!r}")  # exits 2; argparse's choices make it unreachable today


if __name__ == "__main__":
    sys.exit(main())
