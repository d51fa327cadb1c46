"""Plot a training run's loss curve (`train_log.csv`, written by `s3diff train`) as a PNG.

    python3 -m s3diff_serve.evaluation.training_curve runs/demo/train_log.csv -o curve.png
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

TERMS = ("l1", "mse", "lpips", "estimator")


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` rows (fewer at the start): the per-step loss varies with the draws."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def plot_training_log(log: Path, out: Path, window: int = 10) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{log}: no logged steps")
    steps = np.array([int(row["step"]) for row in rows])
    terms = [t for t in TERMS if t in rows[0] and any(float(row[t]) for row in rows)]
    figure, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3), squeeze=False)
    for axis, term in zip(axes[0], terms):
        values = np.array([float(row[term]) for row in rows])
        axis.plot(steps, values, color="0.8", linewidth=0.8, label="logged")
        axis.plot(steps, moving_average(values, window), color="C0", label=f"mean of {window}")
        axis.set_title(term)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    print(plot_training_log(args.log, args.out, args.window))


if __name__ == "__main__":
    main()
