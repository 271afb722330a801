"""Forward time of the ``error`` grouping per element against the row length ``N``.

The error forward ranks every row with a sort whose fixed costs (histogram sweeps) matter for
short rows, e.g. transformer tokens with ``channel_dim=-1``. Each call covers the same
262,144 elements as ``[262144 / N, N]`` rows; one thread by default.

    python benchmarks/bench_row_length.py
    python benchmarks/bench_row_length.py --lengths 16,256,4096 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import liftplace  # noqa: F401  (registers torch.ops.liftplace)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16,64,256,1024,4096,16384", help="comma-separated row lengths N")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="rounds; the best is kept")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fwd = torch.ops.liftplace.lift_place_fwd.default
    results = []
    print(f"error forward, group {args.group_size}, {args.threads} thread(s), best of {args.repeats}")
    print("      N |      R | ns/element")
    for n in (int(v) for v in args.lengths.split(",") if v):
        rows = max(1, 262144 // n)
        g = torch.Generator().manual_seed(n)
        x = torch.randn(rows, n, generator=g)
        y = 1.1 * x + 0.3 * torch.randn(rows, n, generator=g)
        P = min(args.group_size, n)

        def call():
            with torch._C._AutoDispatchBelowAutograd():
                fwd(x, y, P, "error", "l1", 1e-7, 0)

        call()
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(5):
                call()
            best = min(best, (time.perf_counter() - t0) / 5)
        ns = best * 1e9 / (rows * n)
        results.append({"N": n, "R": rows, "ns_per_element": ns})
        print(f" {n:6d} | {rows:6d} | {ns:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "group_size": args.group_size, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
