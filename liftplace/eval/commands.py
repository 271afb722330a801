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


def cost_command(args) -> int:
    import torch

    from ..train.sampling import ddim_scheduler_from, load_for_sampling
    from .cost import compare_cost, format_cost, model_cost

    if args.teacher is None and args.student is None:
        raise ValueError("nothing to measure: pass --student PATH and/or --teacher PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    costs, shapes, sources = {}, {}, {}
    for role in ("teacher", "student"):
        path = getattr(args, role)
        if path is None:
            continue
        family, model, sched_cfg, model_dir = load_for_sampling(path)
        shape = family.sample_shape(dict(model.config), args.resolution)
        shapes[role], sources[role] = shape, str(model_dir)
        costs[role] = model_cost(model, family, shape, name=role, batch_size=args.batch_size, device=device,
                                 dtype=args.dtype, num_inference_steps=args.num_inference_steps,
                                 scheduler=ddim_scheduler_from(sched_cfg), repeats=args.repeats)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"teacher and student sample shapes differ: {shapes}; they must denoise the same input")
    protocol = {"command": "liftplace cost", "models": sources, "device": device,
                "device_name": (torch.cuda.get_device_name(device) if device.startswith("cuda")
                                else platform.processor() or platform.machine()),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
                "batch_size": args.batch_size, "sample_shape": list(next(iter(shapes.values()))),
                "num_inference_steps": args.num_inference_steps, "repeats": args.repeats,
                "sampler": "DDIM (eta 0)"}
    teacher = costs["teacher"] if len(costs) == 2 else None
    record = compare_cost(teacher, costs.get("student") or costs["teacher"], protocol)
    print(format_cost(record))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
        print(f"written: {args.json}")
    return 0


COMMANDS = {"cost": cost_command}
