"""The CPU kernels run on torch's intra-op threads, in torch's one OpenMP runtime.

at::parallel_for is inlined into the extension; built without OpenMP its pragma is
ignored and every kernel runs on one thread whatever torch.set_num_threads says (the
cause of the flat thread scaling in benchmarks/RESULTS.md §7). These tests check the
work is really shared between threads (per-thread CPU time, not wall time, so a busy
machine does not make them flaky) and that the process holds a single libgomp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from liftplace import _ops

pytestmark = pytest.mark.skipif(not _ops.EXT_DEVICES, reason="needs the compiled extension")
OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()

# Runs in a fresh process: per-thread CPU time (utime + stime from /proc/self/task) spent in
# the kernels at the requested thread count, and the OpenMP runtimes mapped in.
PROBE = textwrap.dedent("""
    import json, os, sys, torch, liftplace
    threads, op = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)
    x, y = torch.randn(24, 65536), torch.randn(24, 65536)
    fwd = lambda: torch.ops.liftplace.lift_place_fwd(x, y, 16, "error", "l1", 1e-7, 0)
    out = fwd()
    grad_rows = torch.ones(24, liftplace._ops.ROW_STATS)
    bwd = lambda: torch.ops.liftplace.lift_place_bwd(grad_rows, None, None, x, y, out[0], out[1], out[3], out[4],
                                                      16, "error", "l1", 0, False)
    run = fwd if op == "fwd" else bwd

    def ticks():
        out = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = int(fields[11]) + int(fields[12])  # utime + stime, clock ticks
        return out

    before = ticks()
    total = 0
    while total < 150:  # at least 1.5 s of CPU time in the kernel, whatever the machine
        for _ in range(5):
            run()
        after = ticks()
        used = {tid: after[tid] - before.get(tid, 0) for tid in after}
        total = sum(used.values())
    libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line.split("/")[-1]})
    print(json.dumps({"used": sorted(used.values(), reverse=True), "libgomp": libs}))
""")


def probe(threads: int, op: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, "-c", PROBE, str(threads), op], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads per-thread CPU time from /proc")
@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_kernels_share_work_between_threads(op):
    used = probe(2, op)["used"] + [0]
    # Rows are split evenly between the two threads: the second-busiest thread does a real
    # share of the work (a serial kernel leaves it near zero).
    assert used[1] >= 0.25 * used[0], f"per-thread CPU ticks {used}: the kernel ran on one thread"


@pytest.mark.skipif(not OPENMP or not os.path.exists("/proc/self/maps"), reason="torch without OpenMP, or no /proc")
def test_one_openmp_runtime_torchs_own():
    libs = probe(1, "fwd")["libgomp"]
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    assert len(libs) == 1, f"several OpenMP runtimes in one process: {libs}"
    assert os.path.realpath(libs[0]).startswith(torch_lib), f"{libs[0]} is not torch's libgomp"
