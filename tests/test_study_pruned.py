"""experiments/pruned_study.py --tiny: the whole grid machinery end to end in under a minute."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("torch_pruning")

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "pruned_study.py"
# the installed-wheel check runs tests/ without the source tree's experiments/
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the source tree's experiments/")


def run(out, *extra):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--output_dir", str(out), *extra],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                             "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, time.perf_counter() - t0


@pytest.mark.slow
def test_tiny_grid_end_to_end_and_resume(tmp_path):
    out = tmp_path / "study"
    proc, wall = run(out)
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    # 2 seeds x 4 methods of the pruned student + the random-init row and the two capacity-gap rows
    # (3 methods, seed 0 each)
    assert len(cells) == 17 and not any(c["diverged"] for c in cells)
    assert {c["arch"] for c in cells} == {"prune0.5", "random", "random_small_teacher", "pruned_small_teacher"}
    for c in cells:
        assert c["frechet"] >= 0 and 0 < c["share"] < 1 and set(c["heldout_mse_by_t"]) == {"t<333", "333<=t<666",
                                                                                            "t>=666"}
        assert c["bad_steps"] == 0 and c["train_s"] > 0
    # the random-init row has the architecture of the pruned one
    shares = {c["arch"]: c["student_params"] for c in cells}
    assert shares["random"] == shares["prune0.5"] == shares["random_small_teacher"]
    # the capacity gap: the same student, a smaller teacher, both teachers measured
    teachers = json.loads((out / "teachers.json").read_text())
    assert teachers["small"]["params"] < teachers["shipped"]["params"]
    gap = {c["method"]: c for c in cells if c["arch"] == "random_small_teacher"}
    assert all(c["teacher_params"] == teachers["small"]["params"] for c in gap.values())
    assert {c["teacher_params"] for c in cells if c["arch"] == "random"} == {teachers["shipped"]["params"]}
    # the pruned gap row: the student pruned from the shipped teacher, as it was before training
    # (pruned_init/), distilled from the small teacher
    pruned_gap = [c for c in cells if c["arch"] == "pruned_small_teacher"]
    assert {c["student_params"] for c in pruned_gap} == {shares["prune0.5"]}
    assert {c["teacher_params"] for c in pruned_gap} == {teachers["small"]["params"]}
    assert (out / "pruned_init" / "config.json").is_file()
    pair = results["paired"]["prune0.5:place_anneal-vs-output"]
    assert pair["n"] == 2 and len(pair["diffs"]) == 2
    text = (out / "report.md").read_text()
    assert "Paired differences" in text and "PLACE + anneal" in text and "share" in text
    assert "Capacity gap" in text and (out / "capacity_gap.png").stat().st_size > 0
    assert (out / "quality_vs_share.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
    assert "shard done" in (out / "progress.log").read_text()
    # resumable per cell: a finished cell is not rerun; a removed one is
    victim = out / "cells" / "prune0.5" / "seed1" / "place" / "result.json"
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/*/*/result.json") if p != victim}
    victim.unlink()
    run(out)
    assert victim.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert wall < 120  # the first, full tiny run (a minute on an idle machine)
