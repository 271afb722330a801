"""What a denoiser costs to run: parameters, MACs, peak memory and measured latency.

``model_cost`` measures one model, ``compare_cost`` a teacher and a student side by
side with the student/teacher ratios and a block-by-block table (the U-Net's top-level
children, ``down_blocks``/``up_blocks`` split per block), ``format_cost`` prints it.

- **MACs** come from ``torch.utils.flop_counter.FlopCounterMode`` on one denoiser call
  with the given batch and resolution: it counts the FLOPs of matrix multiplies,
  convolutions and attention (``2·M·N·K`` for a matmul), not of normalisations,
  activations or element-wise ops; MACs are reported as FLOPs / 2.
- **Peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` during one call, minus
  what was allocated before it (inputs and weights are reported separately). On CPU
  torch has no allocator statistics, so the peak is the largest total size of the
  tensors created by operators during the call and still alive (tracked per storage
  under a ``TorchDispatchMode``); it ignores scratch space inside kernels (im2col,
  oneDNN workspaces) and allocator slack, so it is a lower bound on the real peak.
- **Latency**: wall time of one denoiser call (median of ``repeats`` after ``warmup``
  calls, synchronised on CUDA) and of one full DDIM sample of ``batch_size`` images with
  ``num_inference_steps`` steps (the scheduler's work included), under ``no_grad``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from ..train.models import DTYPES, ModelFamily, count_parameters

__all__ = ["ModelCost", "compare_cost", "count_macs", "format_cost", "model_cost", "peak_memory"]

COST_SCHEMA_VERSION = 1


@dataclass
class ModelCost:
    name: str
    parameters: int
    parameter_bytes: int
    macs_per_call: int
    peak_memory_bytes: int
    peak_memory_method: str
    latency_per_call_s: float
    latency_per_sample_s: float  # one full DDIM sample of batch_size images
    blocks: dict = field(default_factory=dict)  # block -> {"parameters", "macs"}


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level children, a ``ModuleList`` (``down_blocks``) split into its items."""
    out = {}
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            out.update({f"{name}.{i}": c for i, c in enumerate(child)})
        else:
            out[name] = child
    return out


def _check_unconditional(family: ModelFamily | None) -> None:
    """Sampling for ``liftplace eval --model`` draws unconditional samples only."""
    if family is not None and family.cond_keys:
        raise ValueError(f"the {family.name} family needs conditioning ({', '.join(family.cond_keys)}) for every "
                         "call; `liftplace eval --model` samples unconditional families only: sample the model "
                         "with `liftplace sample` and pass the folder as --images")


def _call(family: ModelFamily | None, model: nn.Module, x: Tensor, t: Tensor, cond: dict | None = None):
    if family is None:
        return model(x, t)
    return family.forward(model, x, t, cond or {})


def _inputs(sample_shape, batch_size: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *sample_shape), generator=g).to(device=device, dtype=dtype)
    t = torch.full((batch_size,), 500, dtype=torch.long, device=device)
    return x, t


@torch.no_grad()
def count_macs(model: nn.Module, *args, family: ModelFamily | None = None,
               cond: dict | None = None) -> tuple[int, dict[str, int]]:
    """``(total MACs, {block: MACs})`` of one call ``model(*args)`` (or ``family.forward``
    with ``args = (x, t)`` and ``cond``). MACs = FLOPs / 2 as counted by ``FlopCounterMode``."""
    root = type(model).__name__
    with FlopCounterMode(display=False) as fc:
        if family is None:
            model(*args)
        else:
            _call(family, model, *args, cond)
    counts = fc.get_flop_counts()
    per_block = {name: sum(counts.get(f"{root}.{name}", {}).values()) // 2 for name in _blocks(model)}
    return fc.get_total_flops() // 2, per_block


class _LiveTensorBytes(TorchDispatchMode):
    """Peak total size of live storages created by operators (CPU memory stand-in)."""

    def __init__(self, existing=()):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak = StorageWeakRef
        # weights and inputs: views of them (a linear layer's weight.t()) allocate nothing
        self.existing = {StorageWeakRef(t.untyped_storage()).cdata for t in existing}
        self.live: dict[int, tuple] = {}  # storage cdata -> (weakref, nbytes)
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                ref = self._weak(t.untyped_storage())
                if ref.cdata not in self.live and ref.cdata not in self.existing:
                    nbytes = t.untyped_storage().nbytes()
                    self.live[ref.cdata] = (ref, nbytes)
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


@torch.no_grad()
def peak_memory(model: nn.Module, x: Tensor, t: Tensor, family: ModelFamily | None = None,
                cond: dict | None = None) -> tuple[int, str]:
    """``(bytes, method)``: peak memory one call adds beyond weights and inputs (see module doc)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        _call(family, model, x, t, cond)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base, "torch.cuda.max_memory_allocated minus before"
    mode = _LiveTensorBytes([x, t, *(cond or {}).values(), *model.parameters(), *model.buffers()])
    with mode:
        out = _call(family, model, x, t, cond)
    del out
    return mode.peak, "peak bytes of live operator outputs (TorchDispatchMode; kernel scratch not counted)"


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def model_cost(model: nn.Module, family: ModelFamily, sample_shape, *, name: str = "model", batch_size: int = 1,
               device=None, dtype: str | None = None, num_inference_steps: int = 50, scheduler=None,
               warmup: int = 2, repeats: int = 10, sample_repeats: int = 1) -> ModelCost:
    """Measure ``model`` on ``[batch_size, *sample_shape]`` inputs, under ``no_grad`` in eval mode
    (its training mode is restored). ``device``/``dtype`` (``"fp32"``, ``"bf16"``, ``"fp16"``)
    move or cast the model in place (``None``: keep its own). With a ``scheduler`` a full DDIM
    sample of ``num_inference_steps`` steps is timed too."""
    from ..train.sampling import sample_images

    for key, v in (("batch_size", batch_size), ("num_inference_steps", num_inference_steps),
                   ("repeats", repeats), ("sample_repeats", sample_repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be a positive int, got {v!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but torch.cuda.is_available() is False; "
                         "pass --device cpu")
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=DTYPES[dtype] if dtype else None)
    p = next(model.parameters())
    device = p.device
    was_training = model.training
    model.eval()
    try:
        x, t = _inputs(sample_shape, batch_size, device, p.dtype)
        # conditional families: zero conditioning of the right shapes (a call costs the same)
        cond = family.example_cond(dict(model.config), batch_size, device, p.dtype) if family is not None else {}
        missing = [k for k in (family.cond_keys if family is not None else ()) if k not in cond]
        if missing:
            raise ValueError(f"the {family.name} family needs conditioning ({', '.join(missing)}) for every call "
                             "and gives no example of it (ModelFamily.example_cond), so it cannot be measured")
        macs, per_block = count_macs(model, x, t, family=family, cond=cond)
        peak, method = peak_memory(model, x, t, family, cond)
        per_call = _timed(lambda: _call(family, model, x, t, cond), device, warmup, repeats)
        per_sample = 0.0
        if scheduler is not None:
            # the sampler of the model's scheduler: DDIM, flow-matching Euler, or DDPM with learned variance
            run = lambda: sample_images(family, model, scheduler, batch_size, sample_shape,  # noqa: E731
                                        num_inference_steps=num_inference_steps, batch_size=batch_size,
                                        device=device, cond=cond or None)
            per_sample = _timed(run, device, 0, sample_repeats)
    finally:
        model.train(was_training)
    blocks = {n: {"parameters": count_parameters(m), "macs": per_block[n]} for n, m in _blocks(model).items()}
    return ModelCost(name=name, parameters=count_parameters(model),
                     parameter_bytes=sum(q.numel() * q.element_size() for q in model.parameters()),
                     macs_per_call=macs, peak_memory_bytes=peak, peak_memory_method=method,
                     latency_per_call_s=per_call, latency_per_sample_s=per_sample, blocks=blocks)


def sampler_name(scheduler) -> str:
    """The sampler :func:`~liftplace.train.dit.sample_images` runs for ``scheduler``."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return f"flow-matching Euler ({type(scheduler).__name__})"
    if getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range"):
        return "DDPM ancestral with the learned variance"
    return "DDIM (eta 0)"


def compare_cost(teacher: ModelCost | None, student: ModelCost, protocol: dict) -> dict:
    """The JSON-ready record: protocol, each model, student/teacher ratios, block table."""
    models = [c for c in (teacher, student) if c is not None]
    out = {"schema_version": COST_SCHEMA_VERSION, "protocol": protocol,
           "models": {c.name: asdict(c) for c in models}}
    if teacher is not None:
        keys = ("parameters", "macs_per_call", "peak_memory_bytes", "latency_per_call_s", "latency_per_sample_s")
        out["ratio_student_over_teacher"] = {
            k: (getattr(student, k) / getattr(teacher, k) if getattr(teacher, k) else None) for k in keys}
        rows = []
        for name in dict.fromkeys([*teacher.blocks, *student.blocks]):
            tb, sb = teacher.blocks.get(name, {}), student.blocks.get(name, {})
            rows.append({"block": name, "teacher_parameters": tb.get("parameters"), "student_parameters":
                         sb.get("parameters"), "teacher_macs": tb.get("macs"), "student_macs": sb.get("macs")})
        out["blocks"] = rows
    return out


def _si(v: float | int | None, unit: str = "") -> str:
    if v is None:
        return "–"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {prefix}{unit}"
    return f"{v:.3g} {unit}".rstrip()


def _ms(v: float) -> str:
    return f"{1e3 * v:.2f} ms" if v else "–"


def _pct(a, b) -> str:
    return f"{100 * a / b:.1f} %" if a is not None and b else "–"


def format_cost(record: dict, *, blocks: bool = True) -> str:
    """Human-readable table of a :func:`compare_cost` record."""
    p = record["protocol"]
    models = list(record["models"].values())
    steps = p.get("num_inference_steps")
    lines = [f"cost per denoiser call: batch {p['batch_size']}, sample shape {p['sample_shape']}, {p['dtype']} on "
             f"{p['device']}" + (f"; full sample = {steps} DDIM steps" if steps else "")
             + "; MACs = FLOPs/2 (FlopCounterMode: matmul/conv/attention only)"]
    head = ["", *[m["name"] for m in models]] + (["student/teacher"] if len(models) == 2 else [])
    rows = [("parameters", "parameters", lambda v: f"{v:,}"),
            ("MACs per call", "macs_per_call", _si),
            ("peak memory per call", "peak_memory_bytes", lambda v: _si(v, "B")),
            ("latency per step", "latency_per_call_s", _ms),
            ("latency per full sample", "latency_per_sample_s", _ms)][:5 if steps else 4]
    table = [head]
    for label, key, fmt in rows:
        r = [label, *[fmt(m[key]) for m in models]]
        if len(models) == 2:
            r.append(_pct(models[1][key], models[0][key]))
        table.append(r)
    if blocks and "blocks" in record:
        # a block's share of the MACs saved: where the student's savings come from
        saved = models[0]["macs_per_call"] - models[1]["macs_per_call"]
        table.append(["block: params / MACs", "", "", "MACs; share of the saving"])
        for b in record["blocks"]:
            tm, sm = b["teacher_macs"] or 0, b["student_macs"] or 0
            table.append([f"  {b['block']}", f"{_si(b['teacher_parameters'])} / {_si(b['teacher_macs'])}",
                          f"{_si(b['student_parameters'])} / {_si(b['student_macs'])}",
                          f"{_pct(b['student_macs'], b['teacher_macs'])}; {_pct(tm - sm, saved)}"])
    widths = [max(len(str(r[i])) for r in table if i < len(r)) for i in range(len(head))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append(f"peak memory: {models[0]['peak_memory_method']}")
    return "\n".join(lines)


def cost_summary(teacher: nn.Module | None, student: nn.Module, family: ModelFamily, sample_shape, *,
                 batch_size: int = 1, repeats: int = 3) -> str:
    """Per-call cost of the models as they are (device, dtype), for the trainer's start."""
    t = (model_cost(teacher, family, sample_shape, name="teacher", batch_size=batch_size, warmup=1,
                    repeats=repeats) if teacher is not None else None)
    s = model_cost(student, family, sample_shape, name="student" if teacher is not None else "model",
                   batch_size=batch_size, warmup=1, repeats=repeats)
    p = next(student.parameters())
    protocol = {"batch_size": batch_size, "sample_shape": list(sample_shape), "dtype": str(p.dtype),
                "device": str(p.device), "num_inference_steps": None}
    return format_cost(compare_cost(t, s, protocol), blocks=False)


def log_cost_summary(log, teacher: nn.Module | None, student: nn.Module, family: ModelFamily, sample_shape) -> None:
    """Log :func:`cost_summary` at a run's start (conditional families with zero conditioning,
    see :meth:`ModelFamily.example_cond`); any failure is a warning, never a failed run."""
    try:
        log.info("\n" + cost_summary(teacher, student, family, sample_shape))
    except Exception as exc:  # noqa: BLE001 - a summary must not stop training
        log.warning(f"cost summary skipped ({type(exc).__name__}: {exc}); run `liftplace cost` on the models")
