"""Forward + backward time and peak extra memory of lift_place_loss, side by side.

    ext          liftplace.lift_place_loss on the compiled extension
    torch        the same call on liftplace's pure-torch path (set_backend("torch"))
    baseline     the released code's loss, eager: an unfused version written plainly below
                 (argsort, gather into [R, G, P], separate mean/var/cov reductions, autograd)
    base+compile (--compile) torch.compile of that baseline: what a user would pick instead
    compile      (--compile) torch.compile of liftplace's pure-torch path

``--threads 1,2`` times every method at each thread count, interleaved in rounds
(``--rounds``; each cell keeps its best round), so thread scaling and the ratios come from
one run on a shared machine.

Correctness is checked first (ext loss and gradient against the baseline). Times are
the median (or --stat min) of --repeats steps after warm-up, in wall time or, with
--clock cpu, process CPU time. Memory is measured in a fresh subprocess per method, see
measure_memory(). benchmarks/README.md has the details, RESULTS.md the measured tables.

    python benchmarks/bench_loss.py                      # CPU, default shapes
    python benchmarks/bench_loss.py --threads 1 --clock cpu --repeats 15 --kernels
    python benchmarks/bench_loss.py --threads 1,2 --compile --rounds 3 --no-memory
    python benchmarks/bench_loss.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import liftplace
from liftplace import _ops

CPU_SHAPES = [(64, 3, 32, 32), (16, 4, 64, 64), (8, 3, 256, 256)]
CUDA_EXTRA_SHAPES = [(64, 4, 128, 128), (32, 16, 32, 32)]
EPS = 1e-7


# ---------------------------------------------------------------------------------------
# The unfused eager baseline: what one writes without liftplace (reduction="sum", L1,
# adaptive weight, as the released pixel-DDPM code).

def baseline_error(student, teacher, P, eps=EPS):
    B, C = student.shape[:2]
    R, N = B * C, student[0, 0].numel()
    assert N % P == 0, "the plain baseline has no ragged last group"
    x, y = student.reshape(R, N), teacher.reshape(R, N)
    order = torch.argsort((y - x).detach().square(), dim=1, stable=True)
    xs = x.gather(1, order).view(R, N // P, P)
    ys = y.gather(1, order).view(R, N // P, P)
    mx, my = xs.mean(-1, keepdim=True), ys.mean(-1, keepdim=True)
    dx, dy = xs - mx, ys - my
    vx, cxy = (dx * dx).mean(-1, keepdim=True), (dx * dy).mean(-1, keepdim=True)
    a = cxy / (vx + eps)
    b = my - a * mx
    coarse = (P * ((a - 1).abs() + b.abs())).sum() / B
    fine = (a.detach() * xs + b.detach() - ys).square().sum() / B
    w = 1 - ((a - 1).abs().mean() + b.abs().mean()).detach().clamp(max=1)
    return coarse + w * fine


def baseline_global(student, teacher, eps=EPS):
    B, C = student.shape[:2]
    R, N = B * C, student[0, 0].numel()
    x, y = student.reshape(R, N), teacher.reshape(R, N)
    mx, my = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
    dx, dy = x - mx, y - my
    a = (dx * dy).mean(1, keepdim=True) / ((dx * dx).mean(1, keepdim=True) + eps)
    b = my - a * mx
    coarse = (N * ((a - 1).abs() + b.abs())).sum() / B
    fine = (a.detach() * x + b.detach() - y).square().sum() / B
    w = 1 - ((a - 1).abs().mean() + b.abs().mean()).detach().clamp(max=1)
    return coarse + w * fine


# ---------------------------------------------------------------------------------------

def make_inputs(shape, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = torch.randn(shape, generator=g)
    t = 1.1 * s + 0.05 + 0.3 * torch.randn(shape, generator=g)
    return s.to(device).requires_grad_(True), t.to(device)


def loss_fn(method, grouping, P, compiled=None):
    if method == "baseline":
        if grouping == "error":
            return lambda s, t: baseline_error(s, t, P)
        return lambda s, t: baseline_global(s, t)
    if method in ("compile", "base+compile"):
        return compiled[method]
    return lambda s, t: liftplace.lift_place_loss(s, t, group_size=P, grouping=grouping)


class backend:
    """Runs the liftplace methods on the backend they name, then restores "auto"."""

    def __init__(self, method):
        self.name = "torch" if method in ("torch", "compile") else "auto"  # base+compile: no liftplace

    def __enter__(self):
        liftplace.set_backend(self.name)

    def __exit__(self, *exc):
        liftplace.set_backend("auto")


def step(fn, s, t):
    s.grad = None
    loss = fn(s, t)
    loss.backward()
    return loss


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# "wall": elapsed time. "cpu": process CPU time (user + system, all threads), which a busy
# shared machine inflates far less; with one thread it is the work one step costs.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_method(method, fn, s, t, device, repeats, warmup=2):
    with backend(method):
        for _ in range(warmup):
            step(fn, s, t)
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = clock()
            step(fn, s, t)
            sync(device)
            times.append(clock() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def check_correct(shape, grouping, P, device):
    s, t = make_inputs(shape, device, seed=1)
    ref_loss = step(loss_fn("baseline", grouping, P), s, t)
    ref_grad = s.grad.clone()
    with backend("ext"):
        ext_loss = step(loss_fn("ext", grouping, P), s, t)
    torch.testing.assert_close(ext_loss, ref_loss, rtol=1e-4, atol=1e-4)
    # A group whose |b| or |a - 1| sits at rounding level flips its L1 subgradient sign
    # between float32 (baseline) and double (ext) sums: allow a few such groups.
    close = torch.isclose(s.grad, ref_grad, rtol=1e-3, atol=1e-3 * ref_grad.abs().max().item())
    bad = (~close).sum().item()
    assert bad <= 1e-4 * close.numel() + P, f"{bad} gradient entries differ from the baseline"


# ---------------------------------------------------------------------------------------
# Memory. CUDA: the caching allocator's peak above what was allocated before the step.
# CPU: torch has no CPU allocator statistics, so a fresh worker process (glibc told to
# mmap every block >= 64 KiB, so freed tensors really leave the process) resets the
# kernel's peak-RSS counter (/proc/self/clear_refs = 5) before each step and reports
# VmHWM - VmRSS: the resident memory the step added at its peak (outputs, saved tensors,
# scratch and the student's gradient), measured after one warm-up step of the same shape.

def _proc_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mb(method, shape, grouping, P, device, compiled=None):
    fn = loss_fn(method, grouping, P, compiled)
    with backend(method):
        s, t = make_inputs(shape, device)
        step(fn, s, t)  # warm-up: lazy initialisation and compilation are not counted
        s.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(fn, s, t)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_kb("VmRSS")
        step(fn, s, t)
        return (_proc_kb("VmHWM") - before) / 1024


def measure_memory(configs, methods, args):
    """{(method, config-key): MB}, each method measured in its own fresh process."""
    out = {}
    for method in methods:
        if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
            break
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        cmd = [sys.executable, __file__, "--_memory-worker", method, "--device", args.device,
               "--threads", str(args.threads[0])]
        cmd += ["--_configs", json.dumps([[c["shape"], c["grouping"], c["group_size"]] for c in configs])]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"memory worker for {method} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        for key, mb in json.loads(res.stdout.strip().splitlines()[-1]).items():
            out[(method, key)] = mb
    return out


def memory_worker(method, configs_json, device):
    result = {}
    for shape, grouping, P in json.loads(configs_json):
        shape = tuple(shape)
        compiled = compile_methods(grouping, P) if method in COMPILED else None
        result[config_key(shape, grouping, P)] = peak_extra_mb(method, shape, grouping, P, device, compiled)
    print(json.dumps(result))


def stubbed_layer(configs, args):
    """The ext fwd+bwd step with both kernels stubbed out (they allocate their outputs and
    return, csrc/cpu/lift_place_cpu.cpp): the per-call layer measured directly, as the issue
    asks, in a fresh process because the kernels read LIFTPLACE_BENCH_STUB_KERNELS once."""
    if args.device != "cpu":
        print("--stub-kernels: CPU only", file=sys.stderr)
        return
    env = dict(os.environ, LIFTPLACE_BENCH_STUB_KERNELS="1")
    cmd = [sys.executable, __file__, "--_stub-worker", "--threads", str(args.threads[0]), "--repeats",
           str(max(args.repeats, 15)), "--_configs",
           json.dumps([[c["shape"], c["grouping"], c["group_size"]] for c in configs])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"stub worker failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return
    found = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nper-call layer with both kernels stubbed out, {args.threads[0]} thread(s) "
          "(ms per fwd+bwd step, best of the rounds)")
    for c in configs:
        key = config_key(tuple(c["shape"]), c["grouping"], c["group_size"])
        c["stubbed_step_ms"] = found[key]
        print(f"  {key:26s}| {found[key]:.3f}")


def stub_worker(configs_json, repeats, inner=20):
    pin_allocator()
    result = {}
    for shape, grouping, P in json.loads(configs_json):
        shape = tuple(shape)
        s, t = make_inputs(shape, "cpu")
        fn = loss_fn("ext", grouping, P)
        step(fn, s, t)
        best = math.inf
        for _ in range(repeats):
            t0 = clock()
            for _ in range(inner):
                step(fn, s, t)
            best = min(best, (clock() - t0) / inner)
        result[config_key(shape, grouping, P)] = best * 1e3
    print(json.dumps(result))


COMPILED = ("base+compile", "compile")


def compile_methods(grouping, P):
    """torch.compile of the baseline and of liftplace's pure-torch path (default inductor)."""
    return {"base+compile": torch.compile(loss_fn("baseline", grouping, P)),
            "compile": torch.compile(loss_fn("torch", grouping, P))}


def config_key(shape, grouping, P):
    return f"{'x'.join(map(str, shape))}/{grouping}/P{P}"


# ---------------------------------------------------------------------------------------

def kernel_breakdown(configs, device, repeats, threads):
    """ns per element of the raw ops, next to the time the same bytes take at copy speed, and
    the layer's cost per call: everything a loss step costs beyond its two kernels.

    The layer is measured as the kernels stubbed out would show it, by difference in one
    interleaved loop: the full step (``s.grad = None``, ``lift_place_loss``, ``backward``)
    minus the raw pair (the same two kernels called directly, their outputs and the gradient
    held as the step holds them, so allocation costs cancel), best of ``repeats`` rounds each.
    What remains is validation, layout, the reduction to the scalar loss, the autograd node
    and the engine's own cost of ``backward()`` (about 20 us on this machine even for a
    four-element sum). On glibc the allocator is pinned first (``pin_allocator``): otherwise
    the page faults of fresh 1 MB buffers, which come and go with the order of allocations,
    move either side by +-70 us and are not the layer's."""
    src = torch.ones(16 * 2**20, device=device)  # 64 MiB
    dst = torch.empty_like(src)
    copy_ms = time_fn(lambda: dst.copy_(src), device, repeats)
    copy_gbs = 2 * src.numel() * 4 / copy_ms / 1e6  # read + write
    print(f"\nraw ops, {torch.get_num_threads()} thread(s); copy_ {copy_gbs:.1f} GB/s (read + write)")
    print("  shape/grouping/P          | fwd ns/el | floor | bwd ns/el | floor | layer ms (step - kernels)")
    for c in configs:
        shape, grouping, P = tuple(c["shape"]), c["grouping"], c["group_size"]
        s, t = make_inputs(shape, device)
        R, N = shape[0] * shape[1], shape[2] * shape[3]
        x, y = s.detach().reshape(R, N), t.reshape(R, N)
        out = _ops.lift_place_fwd(x, y, P, grouping, "l1", EPS, 0)
        grad_rows = torch.ones(R, _ops.ROW_STATS, device=device)
        fwd = lambda: _ops.lift_place_fwd(x, y, P, grouping, "l1", EPS, 0)  # noqa: E731
        bwd = lambda: _ops.lift_place_bwd(  # noqa: E731
            grad_rows, None, None, x, y, out[0], out[1], out[3], out[4], P, grouping, "l1", 0, False)
        # Compulsory traffic: fwd reads x, y (+ writes the int32 group id); bwd also reads
        # the group id and writes grad_x.
        fwd_bytes = 8 + (4 if grouping == "error" else 0)
        bwd_bytes = fwd_bytes + 4
        ns = {k: time_fn(f, device, repeats) * 1e6 / (R * N) for k, f in (("fwd", fwd), ("bwd", bwd))}
        floor = {k: b / copy_gbs for k, b in (("fwd", fwd_bytes), ("bwd", bwd_bytes))}
        c["kernel_ns_per_elem"] = ns
        c["traffic_floor_ns_per_elem"] = floor
        c["python_layer_ms"] = layer_ms(s, t, x, y, P, grouping, device, repeats)
        print(f"  {config_key(shape, grouping, P):26s}| {ns['fwd']:9.2f} | {floor['fwd']:5.2f} |"
              f" {ns['bwd']:9.2f} | {floor['bwd']:5.2f} | {c['python_layer_ms']:.3f}")
    return copy_gbs


def pin_allocator():
    """glibc: serve large blocks from the heap and keep freed memory (mallopt M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD = 256 MiB), as a long training run's allocator settles to; no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 28)) and bool(libc.mallopt(-1, 1 << 28))
    except (OSError, AttributeError):
        return False


def layer_ms(s, t, x, y, P, grouping, device, repeats, inner=20):
    """Full step minus the raw kernel pair, interleaved (kernel_breakdown's docstring)."""
    pin_allocator()
    R = x.shape[0]
    grad_rows = torch.ones(R, _ops.ROW_STATS, device=device)
    fn = loss_fn("ext", grouping, P)

    fwd_op, bwd_op = torch.ops.liftplace.lift_place_fwd.default, torch.ops.liftplace.lift_place_bwd.default

    def raw():  # the kernels alone: no Python wrapper, no autograd dispatch
        s.grad = None
        with torch._C._AutoDispatchBelowAutograd():
            out = fwd_op(x, y, P, grouping, "l1", EPS, 0)
            gx, _ = bwd_op(grad_rows, None, None, x, y, out[0], out[1], out[3], out[4], P, grouping, "l1", 0, False)
        s.grad = gx.view_as(s)

    def full():
        step(fn, s, t)

    best = {"raw": math.inf, "full": math.inf}
    for f in (raw, full):
        f()
    for _ in range(repeats):
        for name, f in (("raw", raw), ("full", full)):
            sync(device)
            t0 = clock()
            for _ in range(inner):
                f()
            sync(device)
            best[name] = min(best[name], (clock() - t0) / inner)
    return (best["full"] - best["raw"]) * 1e3


def time_fn(fn, device, repeats):
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync(device)
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def parse_shapes(text):
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated BxCxHxW list (default: the standard set for the device)")
    p.add_argument("--group-size", default=None, help="comma-separated P values for 'error' (default 16; 16,64 on cuda)")
    p.add_argument("--groupings", default="error,global")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", default=None,
                   help="comma-separated torch.set_num_threads values, e.g. 1,2 (CPU; default: torch's)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved rounds over threads x methods; each cell keeps its best round")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or process CPU time (cpu; CPU device only, see CLOCKS)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="which time the table shows (the JSON keeps both); min resists a busy machine")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the baseline and of the pure-torch path")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--kernels", action="store_true",
                   help="also time the raw ops and compare with the copy-bandwidth floor")
    p.add_argument("--stub-kernels", action="store_true",
                   help="also time the ext step with both kernels stubbed out (CPU; a fresh process with "
                        "LIFTPLACE_BENCH_STUB_KERNELS=1): the per-call layer by itself")
    p.add_argument("--json", default=str(Path(__file__).parent / "out" / "bench_loss.json"))
    p.add_argument("--_memory-worker", dest="memory_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_stub-worker", dest="stub_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_configs", dest="configs", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    args.threads = [int(v) for v in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    torch.set_num_threads(args.threads[0])
    global clock
    if args.clock == "cpu" and args.device == "cuda":
        sys.exit("--clock cpu measures host CPU time; use the wall clock on cuda")
    clock = CLOCKS[args.clock]
    if args.memory_worker:
        memory_worker(args.memory_worker, args.configs, args.device)
        return
    if args.stub_worker:
        stub_worker(args.configs, args.repeats)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    info = liftplace.backend_info()
    if not info[f"{args.device}_ext"]:
        sys.exit(f"liftplace has no {args.device} kernels here ({info}); build the extension first")

    shapes = args.shapes or (CPU_SHAPES + (CUDA_EXTRA_SHAPES if args.device == "cuda" else []))
    sizes = [int(v) for v in (args.group_size or ("16,64" if args.device == "cuda" else "16")).split(",")]
    configs = []
    for shape in shapes:
        for grouping in args.groupings.split(","):
            for P in (sizes if grouping != "global" else [shape[2] * shape[3]]):
                configs.append({"shape": list(shape), "grouping": grouping, "group_size": P})
    methods = ["ext", "torch", "baseline"] + (list(COMPILED) if args.compile else [])

    load_before = os.getloadavg()
    for c in configs:
        check_correct(tuple(c["shape"]), c["grouping"], c["group_size"], args.device)
    print(f"correctness: ext matches the eager baseline on {len(configs)} configs")

    for c in configs:
        shape, grouping, P = tuple(c["shape"]), c["grouping"], c["group_size"]
        s, t = make_inputs(shape, args.device)
        compiled = compile_methods(grouping, P) if args.compile else None
        c["ms"], c["ms_min"] = {}, {}  # {threads: {method: ms}}
        for _ in range(args.rounds):
            for threads in args.threads:
                torch.set_num_threads(threads)
                med, low = c["ms"].setdefault(threads, {}), c["ms_min"].setdefault(threads, {})
                for m in methods:
                    a, b = time_method(m, loss_fn(m, grouping, P, compiled), s, t, args.device, args.repeats)
                    med[m], low[m] = min(a, med.get(m, a)), min(b, low.get(m, b))
        for threads in args.threads:
            print(f"  timed {config_key(shape, grouping, P)} at {threads} thread(s): "
                  + ", ".join(f"{m} {c['ms'][threads][m]:.2f}" for m in methods), flush=True)
    torch.set_num_threads(args.threads[0])
    load_after = os.getloadavg()

    if not args.no_memory:
        mem = measure_memory(configs, methods, args)
        for c in configs:
            key = config_key(tuple(c["shape"]), c["grouping"], c["group_size"])
            c["peak_extra_mb"] = {m: mem.get((m, key)) for m in methods}

    print(f"\n{args.stat} {args.clock} time of {args.repeats} fwd+bwd steps (best of {args.rounds} round(s)),"
          f" threads {args.threads}, load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print_table(configs, methods, args)
    if len(args.threads) > 1:
        print_scaling(configs, methods, args)
    copy_gbs = kernel_breakdown(configs, args.device, args.repeats, args.threads[0]) if args.kernels else None
    if args.stub_kernels:
        stubbed_layer(configs, args)
    report = {
        "copy_gb_per_s": copy_gbs,
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "liftplace": info,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "repeats": args.repeats,
        "clock": args.clock,
        "load_avg_before_after": [load_before, load_after],
        "memory_method": "cuda max_memory_allocated delta" if args.device == "cuda"
        else "fresh process, VmHWM - VmRSS around one step (clear_refs=5, MALLOC_MMAP_THRESHOLD_=65536)",
        "configs": configs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


LABELS = {"baseline": "released eager", "base+compile": "released compiled", "compile": "twin compiled"}


def print_rows(head, rows):
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: " | ".join(v.rjust(w) for v, w in zip(r, widths))  # noqa: E731
    print(line(head))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def print_table(configs, methods, args):
    others = [m for m in methods if m != "ext"]
    head = ["shape", "grouping", "P", "threads"] + [f"{LABELS.get(m, m)} ms" for m in methods]
    head += [f"{LABELS.get(m, m)}/ext" for m in others]
    if not args.no_memory:
        head += ["ext MB", "base MB", "ext/base mem"]
    rows = []
    for c in configs:
        for threads in args.threads:
            ms = (c["ms"] if args.stat == "median" else c["ms_min"])[threads]
            row = ["x".join(map(str, c["shape"])), c["grouping"], str(c["group_size"]), str(threads)]
            row += [f"{ms[m]:.2f}" for m in methods]
            row += [f"{ms[m] / ms['ext']:.1f}x" for m in others]
            if not args.no_memory:
                mem = c.get("peak_extra_mb", {})
                e, b = mem.get("ext"), mem.get("baseline")
                row += [f"{e:.1f}" if e is not None else "-", f"{b:.1f}" if b is not None else "-",
                        f"{e / b:.2f}" if e is not None and b else "-"]
            rows.append(row)
    print_rows(head, rows)


def print_scaling(configs, methods, args):
    """Speed-up from the first thread count to each other one, per method."""
    lo = args.threads[0]
    print(f"\nthread scaling: time at {lo} thread(s) / time at n threads")
    head = ["shape", "grouping", "n"] + [LABELS.get(m, m) for m in methods]
    rows = []
    for c in configs:
        ms = c["ms"] if args.stat == "median" else c["ms_min"]
        for n in args.threads[1:]:
            rows.append(["x".join(map(str, c["shape"])), c["grouping"], str(n)]
                        + [f"{ms[lo][m] / ms[n][m]:.2f}x" for m in methods])
    print_rows(head, rows)


if __name__ == "__main__":
    main()
