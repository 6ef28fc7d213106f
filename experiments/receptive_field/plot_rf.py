"""Test accuracy against the receptive field of the last 3x3 conv (what one position of the map
sees before the global average pool), from results/report.csv and cnnjax.analysis.

python experiments/receptive_field/plot_rf.py   # writes results/accuracy_vs_last_conv_rf.png
"""

import csv
import json
import statistics
from pathlib import Path

from cnnjax import analysis
from cnnjax.models.blocknet import BlockNet
from cnnjax.plots.figures import DPI, new_figure

RESULTS = Path(__file__).parent / "results"


def last_conv_rf(blocks: list[list[int]]) -> int:
    """The receptive field of the last 3x3 conv of this study's blocknet on 28x28."""
    table = analysis.analyze(BlockNet(blocks=blocks, transition_width=32), (1, 28, 28, 1))
    return [r for r in table.rows if r.type == "Conv" and r.kernel == (3, 3)][-1].rf[0]


def main() -> None:
    runs = list(csv.DictReader((RESULTS / "report.csv").open()))
    by_blocks: dict[str, list[float]] = {}
    for run in runs:
        by_blocks.setdefault(run["model.blocks"], []).append(float(run["test_accuracy"]))
    points = sorted((last_conv_rf(json.loads(b)), acc) for b, acc in by_blocks.items())
    fig = new_figure()
    ax = fig.subplots()
    rf = [p[0] for p in points]
    ax.errorbar(
        rf,
        [statistics.mean(a) for _, a in points],
        yerr=[statistics.stdev(a) for _, a in points],
        marker="o",
        capsize=3,
    )
    ax.axvline(28, color="grey", linestyle="--", label="the 28x28 image")
    ax.set(
        xlabel="receptive field of the last 3x3 conv (pixels)",
        ylabel="test accuracy",
        title="blocknet variants, 3 epochs, mean ± std of 2 seeds",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(RESULTS / "accuracy_vs_last_conv_rf.png", dpi=DPI)
    for r, acc in points:
        print(f"rf {r:3d}: {statistics.mean(acc):.4f} ± {statistics.stdev(acc):.4f}")


if __name__ == "__main__":
    main()
