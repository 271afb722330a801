"""Overhead of weight="adaptive-timestep" over weight="adaptive" (fwd+bwd), side by side.

    python benchmarks/bench_timesteps.py [--device cpu|cuda] [--shape 16 4 64 64] [--buckets 10]

Both variants run interleaved in one process so machine noise hits them alike; the table
reports medians and their ratio, and a JSON copy goes to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import liftplace


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 4, 64, 64])
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--groupings", nargs="+", default=["error", "global"])
    parser.add_argument("--buckets", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default="benchmarks/out/bench_timesteps.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.shape, generator=g).to(device).requires_grad_()
    y = (0.9 * x.detach() + 0.1 * torch.randn(args.shape, generator=g).to(device))
    t = torch.randint(0, 1000, (args.shape[0],), generator=g).to(device)
    results = []
    print(f"device={device} shape={args.shape} P={args.group_size} K={args.buckets} "
          f"threads={torch.get_num_threads()} backend={liftplace.get_backend()} ext={liftplace.backend_info()['cpu_ext']}")
    print(f"{'grouping':>9} {'adaptive ms':>12} {'timestep ms':>12} {'overhead':>9}")
    for grouping in args.groupings:
        def run(weight):
            kw = dict(timesteps=t, num_buckets=args.buckets, t_max=1000) if weight == "adaptive-timestep" else {}
            loss = liftplace.lift_place_loss(x, y, group_size=args.group_size, grouping=grouping, weight=weight, **kw)
            loss.backward()
            x.grad = None
        for _ in range(3):
            run("adaptive"); run("adaptive-timestep")
        a, b = [], []
        for _ in range(args.repeats):  # interleaved
            a.append(time_once(lambda: run("adaptive"), device))
            b.append(time_once(lambda: run("adaptive-timestep"), device))
        ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        results.append(dict(grouping=grouping, adaptive_ms=ma, timestep_ms=mb, overhead=mb / ma - 1))
        print(f"{grouping:>9} {ma:12.3f} {mb:12.3f} {100 * (mb / ma - 1):8.1f}%")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=str(device), shape=args.shape, buckets=args.buckets,
                                   machine=platform.processor() or platform.machine(),
                                   torch=torch.__version__, threads=torch.get_num_threads(),
                                   results=results), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
