"""Test accuracy against MACs per image, a labelled point per model, from results/report.csv.

python experiments/zoo/plot_zoo.py   # writes results/zoo.png and prints the zoo table
"""

import csv
import statistics
from pathlib import Path

from cnnjax.plots.figures import DPI, new_figure

RESULTS = Path(__file__).parent / "results"
CLASSES = {  # the sweep directory of each size class, and its recipe
    "small": "under 100k parameters: adam 3e-3, warmup-cosine, 8 epochs, 2 seeds",
    "large": "millions, small inputs: adam 1e-3, warmup-cosine, 2 epochs, 1 seed",
}


def main() -> None:
    by_model: dict[str, list[dict]] = {}
    for run in csv.DictReader((RESULTS / "report.csv").open()):
        if run["status"] == "completed":
            by_model.setdefault(run["model"], []).append(run)
    fig = new_figure()
    ax = fig.subplots()
    print("| model | class | params | MACs / image | receptive field | test accuracy | train s |")
    print("|---|---|---:|---:|---|---|---:|")
    for size, color in (("small", "tab:blue"), ("large", "tab:orange")):
        models = {m: runs for m, runs in by_model.items() if runs[0]["run"].startswith(size)}
        for model, runs in sorted(models.items(), key=lambda kv: int(kv[1][0]["macs"])):
            accs = [float(r["test_accuracy"]) for r in runs]
            mean = statistics.mean(accs)
            std = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
            macs, params = int(runs[0]["macs"]), int(runs[0]["params"])
            wall = statistics.mean(float(r["train_wall_s"]) for r in runs)
            ax.plot(macs, mean, "o", color=color)
            ax.annotate(model, (macs, mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
            cells = [model, size, f"{params:,}", f"{macs:,}", runs[0]["receptive_field"]]
            print("| " + " | ".join([*cells, f"{mean:.4f}{std}", f"{wall:.0f}"]) + " |")
        ax.plot([], [], "o", color=color, label=CLASSES[size])
    ax.set(
        xscale="log",
        xlabel="MACs per image (forward)",
        ylabel="test accuracy",
        title="Fashion-MNIST: every model config, one recipe per size class",
    )
    ax.set_xlim(right=ax.get_xlim()[1] * 4)  # room for the labels of the largest
    ax.legend(fontsize="small", loc="center left")
    ax.grid(alpha=0.3)
    fig.savefig(RESULTS / "zoo.png", dpi=DPI)


if __name__ == "__main__":
    main()
