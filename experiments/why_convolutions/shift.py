"""Why convolutions, measured: parameters of dense, locally connected and convolutional layers,
how far each trained net's first layer is from translation equivariance, and its test accuracy
when the test images are shifted by 0 ... 6 pixels.

python experiments/why_convolutions/shift.py   # reads multirun/why_convolutions, writes results/

Shifts move the uint8 image's content right, left, down or up by k pixels and fill the pixels
it leaves with 0 (Fashion-MNIST's background); the accuracy at k is the mean over the four
directions (every direction is in results/shift.csv).
"""

import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import trained
from cnnjax.geometry import dense_params
from cnnjax.models.locality import ConvNet
from cnnjax.plots.figures import DPI, new_figure

HERE = Path(__file__).parent
RESULTS = HERE / "results"
RUNS = HERE.parents[1] / "multirun" / "why_convolutions"
SHIFTS = range(7)  # pixels
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (rows, cols)
EQUIVARIANCE_SHIFT = 2  # input pixels: one unit of a stride-2 first layer's output
CONNECTIVITY = {"ConvNet": "conv", "LocallyConnectedNet": "local", "FullyConnectedNet": "dense"}
NOTES_EXAMPLES = (  # (height, width, channels, neurons): the notes' (002, 003) dense layers
    (32, 32, 3, 1),
    (200, 200, 3, 1),
    (1000, 1000, 1, 1000),
)


def dense_weights(height: int, width: int, channels: int, neurons: int = 1) -> int:
    """Weights (no biases) of `neurons` fully connected neurons on a height x width x channels
    image: height*width*channels per neuron."""
    return dense_params(height * width * channels, neurons, bias=False)


def shift_images(images_NxHxWxC: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The images' content moved down by `rows` and right by `cols` pixels (negative: up, left),
    the pixels it leaves set to 0; shifts as large as the image leave only zeros."""
    out = np.zeros_like(images_NxHxWxC)
    _, h, w, _ = images_NxHxWxC.shape
    if abs(rows) >= h or abs(cols) >= w:
        return out
    src_r, dst_r = slice(max(-rows, 0), h - max(rows, 0)), slice(max(rows, 0), h - max(-rows, 0))
    src_c, dst_c = slice(max(-cols, 0), w - max(cols, 0)), slice(max(cols, 0), w - max(-cols, 0))
    out[:, dst_r, dst_c] = images_NxHxWxC[:, src_r, src_c]
    return out


def first_layer(model: nn.Module, variables: dict, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    """The output of the model's `layer1` (before its ReLU)."""
    _, state = model.apply(
        variables, x_BxHxWxC, capture_intermediates=lambda m, _: m.name == "layer1"
    )
    return state["intermediates"]["layer1"]["__call__"][0]


def equivariance_error(
    model: ConvNet, variables: dict, x_BxHxWxC: jnp.ndarray, shift: int = EQUIVARIANCE_SHIFT
) -> float:
    """||layer1(shift x) - shift layer1(x)|| / ||layer1(x)|| over the output units whose windows
    see neither the padding nor the pixels the shift fills: an input moved down and right by
    `shift` pixels should move the map by shift/stride units. 0 (to rounding) for a convolution."""
    if shift % model.stride:
        raise ValueError(f"shift={shift} is not a multiple of the stride {model.stride}")
    units, margin = shift // model.stride, -(-(model.kernel + shift) // model.stride)
    moved = jnp.asarray(shift_images(np.asarray(x_BxHxWxC), shift, shift))
    a = first_layer(model, variables, moved)[:, margin:-1, margin:-1]
    b = first_layer(model, variables, x_BxHxWxC)[
        :, margin - units : -1 - units, margin - units : -1 - units
    ]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def label(run: trained.TrainedRun) -> str:
    """conv / local / dense, and the head: "conv, pool"."""
    name = run.cfg.model._target_.rsplit(".", 1)[-1]
    return f"{CONNECTIVITY.get(name, name)}, {run.cfg.model.head}"


def checked_layer_params(run: trained.TrainedRun) -> list[int]:
    """Each layer's parameters from the formulas (model.layer_params), checked against the
    trained pytree: a disagreement raises."""
    model, params = run.recipe.model, run.variables["params"]
    formula = model.layer_params()
    names = [f"layer{i}" for i in range(1, len(model.features) + 1)] + ["classifier"]
    real = [sum(v.size for v in jax.tree.leaves(params[n])) for n in names]
    if formula != real:
        raise ValueError(f"{label(run)}: formula {formula} != the trained pytree's {real}")
    return formula


def accuracy_under_shift(run: trained.TrainedRun, shifts: Sequence[int]) -> dict:
    """Test accuracy for each (direction, shift); shift 0 is the unshifted test set."""
    split = run.recipe.test_split

    def accuracy_of(images_NxHxWxC: np.ndarray) -> float:
        logits = trained.logits(run, images_NxHxWxC, batch_size=1000)
        return float((logits.argmax(-1) == split.labels_N).mean())

    unshifted = accuracy_of(split.images_NxHxWxC)
    return {
        (direction, k): accuracy_of(shift_images(split.images_NxHxWxC, dr * k, dc * k))
        if k
        else unshifted
        for direction, (dr, dc) in DIRECTIONS.items()
        for k in shifts
    }


def mean_over_directions(accuracy: dict, k: int) -> float:
    return float(np.mean([accuracy[d, k] for d in DIRECTIONS]))


def notes_table() -> list[str]:
    lines = ["| image | neurons | weights (H*W*C per neuron x neurons) |", "|---|---:|---:|"]
    for h, w, c, n in NOTES_EXAMPLES:
        lines.append(f"| {h}x{w}x{c} | {n:,} | {dense_weights(h, w, c, n):,} |")
    return lines


def params_table(runs: dict[str, trained.TrainedRun]) -> list[str]:
    """Per-layer parameters (formula = pytree) of each net."""
    counts = {name: checked_layer_params(run) for name, run in runs.items()}
    layers = len(next(iter(counts.values())))
    head = " | ".join(f"layer{i}" for i in range(1, layers)) + " | classifier"
    lines = [f"| net, head | {head} | total |", "|---" + "|---:" * (layers + 1) + "|"]
    for name, per_layer in counts.items():
        cells = " | ".join(f"{p:,}" for p in per_layer)
        lines.append(f"| {name} | {cells} | {sum(per_layer):,} |")
    return lines


def plot(results: dict[str, dict], params: dict[str, int], path: Path) -> None:
    fig = new_figure()
    ax = fig.subplots()
    colours = {"conv": "C0", "local": "C1", "dense": "C2"}
    for name, accuracy in results.items():
        connectivity, head = name.split(", ")
        ax.plot(
            list(SHIFTS),
            [mean_over_directions(accuracy, k) for k in SHIFTS],
            marker="o",
            color=colours.get(connectivity),
            linestyle="-" if head == "pool" else "--",
            label=f"{name} ({params[name]:,} params)",
        )
    ax.set(
        xlabel="shift of the test images (pixels, mean of right/left/down/up)",
        ylabel="test accuracy",
        title="Fashion-MNIST, equal training budget (2 epochs)",
    )
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=DPI)


def main() -> None:
    run_dirs = sorted((p for p in RUNS.iterdir() if (p / "config.yaml").is_file()), key=str)
    if not run_dirs:
        sys.exit(f"no runs under {RUNS}: run the sweep in README.md first")
    runs = {}
    for run_dir in run_dirs:
        run = trained.load(run_dir)
        runs[label(run)] = run
    RESULTS.mkdir(exist_ok=True)
    results, rows, equivariance = {}, [], {}
    for name, run in runs.items():
        results[name] = accuracy_under_shift(run, SHIFTS)
        x = run.recipe.preprocess(run.recipe.test_split.images_NxHxWxC[:256])
        equivariance[name] = equivariance_error(run.recipe.model, run.variables, x)
        rows += [[name, d, k, f"{a:.4f}"] for (d, k), a in results[name].items()]
        print(name, [round(mean_over_directions(results[name], k), 4) for k in SHIFTS])
    with (RESULTS / "shift.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["net", "direction", "shift", "test_accuracy"], *rows])
    params = {name: sum(checked_layer_params(run)) for name, run in runs.items()}
    shifts = " | ".join(f"{k} px" for k in SHIFTS)
    lines = ["## Test accuracy under translation (mean of 4 directions)", ""]
    lines += [f"| net, head | params | {shifts} |", "|---|---:" + "|---:" * len(SHIFTS) + "|"]
    for name, accuracy in results.items():
        cells = " | ".join(f"{mean_over_directions(accuracy, k):.4f}" for k in SHIFTS)
        lines.append(f"| {name} | {params[name]:,} | {cells} |")
    lines += ["", f"## First layer's equivariance error ({EQUIVARIANCE_SHIFT} px down and right)"]
    lines += ["", "| net, head | relative error |", "|---|---:|"]
    lines += [f"| {name} | {err:.3g} |" for name, err in equivariance.items()]
    lines += ["", "## Parameters per layer (formulas, checked against the trained pytrees)", ""]
    lines += params_table(runs) + ["", "## The notes' fully connected layers", ""] + notes_table()
    (RESULTS / "shift.md").write_text("\n".join(lines) + "\n")
    plot(results, params, RESULTS / "accuracy_under_translation.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
