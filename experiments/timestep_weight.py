"""Issue experiment: weight="adaptive" vs "adaptive-timestep" on the demo task.

    python experiments/timestep_weight.py --seed 0 --output_dir runs/exp_timestep_seed0

Runs the demo pipeline (shipped digits teacher, 67.7K-parameter student, same seeds, steps,
data order and evaluation) with two PLACE students that differ only in kd_weight, then
writes per-bucket heat-maps of w_k and mean |a-1| for each run.
"""

import argparse

from liftplace.eval.demo import run_demo
from liftplace.eval.plots import plot_bucket_heatmaps

STUDENTS = (
    ("place", "PLACE, adaptive w", dict(kd_loss="place", kd_weight="adaptive")),
    ("place_timestep", "PLACE, adaptive-timestep w (K=10, EMA 0.9)",
     dict(kd_loss="place", kd_weight="adaptive-timestep", kd_num_buckets=10, kd_bucket_ema=0.9)),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", default="runs/exp_timestep")
    args = parser.parse_args()
    report = run_demo(output_dir=args.output_dir, seed=args.seed, steps=args.steps, threads=args.threads,
                      students=STUDENTS)
    for folder, _, _ in STUDENTS:
        run = report.parent / folder
        for path in plot_bucket_heatmaps(run / "metrics.jsonl", report.parent, prefix=f"buckets_{folder}"):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
