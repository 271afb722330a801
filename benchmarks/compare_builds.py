"""Two builds of liftplace side by side: bench_loss.py run alternately on each, one table of ratios.

The machine is shared and noisy, so "before" and "after" are timed in interleaved rounds
of the same benchmark (same shapes, threads, clock) and compared by their best time:

    pip install --no-build-isolation --no-deps --target /tmp/before <old checkout>
    python benchmarks/compare_builds.py --before /tmp/before --rounds 3 -- --threads 1 --clock cpu

``--before`` / ``--after`` are folders put first on ``PYTHONPATH`` (an installed package,
e.g. from ``pip install --target``); ``--after`` defaults to the liftplace this Python
imports. Arguments after ``--`` go to bench_loss.py. Writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).with_name("bench_loss.py")


def run_bench(pythonpath: str | None, bench_args: list[str], out: Path) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(BENCH), "--no-memory", "--json", str(out), *bench_args]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    return json.loads(out.read_text())


def key(c: dict) -> str:
    return f"{'x'.join(map(str, c['shape']))}/{c['grouping']}/P{c['group_size']}"


def per_threads(ms_min: dict, threads) -> list[tuple[str, dict]]:
    """``[(" @Nt", {method: ms})]``: bench_loss.py nests times by thread count since
    ``--threads`` takes a list; older builds' benchmark wrote one flat dict."""
    if ms_min and all(isinstance(v, dict) for v in ms_min.values()):
        return [(f" @{n}t", times) for n, times in ms_min.items()]
    return [(f" @{threads}t" if threads else "", ms_min)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="PYTHONPATH folder holding the 'before' liftplace")
    p.add_argument("--after", default=None, help="PYTHONPATH folder of the 'after' build (default: as imported)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=str(Path(__file__).parent / "out" / "compare_builds.json"))
    args, bench_args = p.parse_known_args()
    bench_args = [a for a in bench_args if a != "--"]

    best: dict[str, dict[str, dict[str, float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, path in (("before", args.before), ("after", args.after)):
                report = run_bench(path, bench_args, Path(tmp) / f"{name}.json")
                for c in report["configs"]:
                    for suffix, times in per_threads(c["ms_min"], report.get("threads")):
                        slot = best[name].setdefault(key(c) + suffix, {})
                        for method, ms in times.items():
                            slot[method] = min(slot.get(method, float("inf")), ms)
                print(f"round {r + 1}/{args.rounds}: {name} done", flush=True)

    head = ["config", "ext before ms", "ext after ms", "after/before", "base/ext before", "base/ext after",
            "torch/ext before", "torch/ext after"]
    rows = []
    for k in best["after"]:
        b, a = best["before"][k], best["after"][k]
        rows.append([k, f"{b['ext']:.2f}", f"{a['ext']:.2f}", f"{a['ext'] / b['ext']:.2f}",
                     f"{b['baseline'] / b['ext']:.1f}x", f"{a['baseline'] / a['ext']:.1f}x",
                     f"{b['torch'] / b['ext']:.1f}x", f"{a['torch'] / a['ext']:.1f}x"])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print(" | ".join(v.rjust(w) for v, w in zip(r, widths)))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"bench_args": bench_args, "rounds": args.rounds, "best_ms": best},
                                          indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
