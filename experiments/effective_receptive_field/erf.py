"""The effective receptive field (Luo et al., 2016) of three trained runs and of their initial
weights: how much of its theoretical receptive field the centre unit of each net's last feature
map uses.

python experiments/effective_receptive_field/erf.py   # after the three training commands of
                                                      # README.md; writes results/erf.{md,csv}
                                                      # and results/erf_<model>.png
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from cnnjax import analysis, probe, rundir, trained
from cnnjax.plots.figures import DPI, new_figure

# The layer probed per model: the last feature map, as in Luo et al. For the two plain nets that
# is the last 3x3 conv before the 1x1 classifier conv (conv7, classifier), whose channel sum would
# be the sum of the class scores, a quantity the softmax ignores; for the ResNet, whose classifier
# is a Dense after global pooling, the last block's output.
FEATURE_LAYERS = {
    "mnist_allconv": "conv6",
    "blocknet": "block3_conv2",
    "resnet18_small": "layer4_1/Add_0",
}
RUNS = Path(__file__).parents[2] / "multirun" / "study_erf"  # one run directory per model
RESULTS = Path(__file__).parent / "results"
IMAGES = 1000  # the first test images, over which each map is averaged
INSIDE_TOLERANCE = 1e-6  # of the mass outside the analysis window (float error only)
WHEN = ("untrained", "trained")


@dataclass(frozen=True)
class ModelErf:
    """One model's unit, its theoretical receptive field and its ERF before and after training."""

    rf: probe.ReceptiveField  # the unit's analysis window (its footprint: the untrained ERF's)
    maps: dict[str, np.ndarray]  # "untrained" / "trained" -> (H, W) ERF
    masses: dict[str, probe.MassRadii]
    uniform: probe.MassRadii  # of a map equal on every pixel: a unit using the whole image
    # the share of each map's mass (and the uniform map's) in the uniform map's 50 % square
    centre_shares: dict[str, float]


def checked_mass(erf_HxW: np.ndarray, rf: probe.ReceptiveField) -> probe.MassRadii:
    """`probe.mass_radii` around the unit's centre; AssertionError when any mass lies outside
    the analysis window (the table would be wrong)."""
    mass = probe.mass_radii(erf_HxW, rf.centre, rf.window)
    if mass.inside < 1 - INSIDE_TOLERANCE:
        raise AssertionError(
            f"{1 - mass.inside:.3g} of the ERF of {rf.layer} unit {rf.unit} lies outside its "
            f"analysis window {rf.window}: the analysis table is wrong"
        )
    return mass


def model_erf(
    model: nn.Module,
    table: analysis.Analysis,
    variables: dict[str, dict],
    x_NxHxWxC: jnp.ndarray,
    layer: str,
    batch_size: int = 250,
) -> ModelErf:
    """The ERF of the centre unit of `layer` (probe.choose_unit's, rounding towards the top left)
    under each of `variables` ("untrained", "trained")."""
    row, unit = probe.choose_unit(table, layer, None)
    maps = {
        when: probe.effective_receptive_field(model, v, x_NxHxWxC, row.name, unit, batch_size)
        for when, v in variables.items()
    }
    rf = probe.receptive_field(row, unit, maps[WHEN[0]])
    masses = {when: checked_mass(erf, rf) for when, erf in maps.items()}
    flat = np.ones(rf.image_hw)
    uniform = probe.mass_radii(flat, rf.centre, rf.window)
    shares = {when: probe.mass_within(erf, rf.centre, uniform.r50) for when, erf in maps.items()}
    shares["uniform"] = probe.mass_within(flat, rf.centre, uniform.r50)
    return ModelErf(rf, maps, masses, uniform, shares)


def run_erf(run_dir: Path, layer: str, images: int = IMAGES) -> tuple[ModelErf, float]:
    """The ERF of `layer`'s centre unit in a training run (its seed's initial weights and its
    checkpoint) over its first `images` test images, and its final test accuracy."""
    run = trained.load(run_dir)
    r = run.recipe
    untrained = {"params": r.state.params, **r.state.model_state}  # recipe.prepare's init
    x = r.preprocess(r.test_split.images_NxHxWxC[:images])
    variables = {"untrained": untrained, "trained": run.variables}
    result = model_erf(r.model, r.table, variables, x, layer)
    return result, float(rundir.read_summary(run_dir)["test_accuracy"])


def centred_square(ax: Axes, centre: tuple[float, float], radius: float, **style) -> None:
    """The pixels within `radius` of `centre` (pixel coordinates) along both axes, outlined on
    an imshow axes (pixel i at data coordinate i)."""
    corner = (centre[1] - radius - 1, centre[0] - radius - 1)
    ax.add_patch(Rectangle(corner, 2 * radius + 1, 2 * radius + 1, fill=False, **style))


def draw(path: Path, name: str, result: ModelErf) -> None:
    """erf_<model>.png: the untrained and trained ERF, each over its own maximum, with the
    analysis window and the 50 % / 95 % squares; the view is the image and the window, at most
    half an image beyond it."""
    rf, (h, w) = result.rf, result.rf.image_hw
    fig = new_figure((10.0, 5.0))
    axes = fig.subplots(1, 2)
    (top, bottom), (left, right) = rf.window
    for ax, when in zip(axes, WHEN, strict=True):
        erf, mass = result.maps[when], result.masses[when]
        shown = ax.imshow(erf / erf.max(), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        half = ((rf.rf[0] - 1) / 2, (rf.rf[1] - 1) / 2)
        centred_square(ax, rf.centre, half[0], edgecolor="tab:red", lw=2, label="analysis RF")
        centred_square(ax, rf.centre, mass.r95, edgecolor="cyan", lw=1.5, label="95 % of mass")
        centred_square(ax, rf.centre, mass.r50, edgecolor="lime", lw=1.5, label="50 % of mass")
        ax.plot(rf.centre[1] - 0.5, rf.centre[0] - 0.5, "+", color="tab:red", ms=10)
        ax.set_xlim(max(min(left, 0), -w // 2) - 1, min(max(right, w - 1), w - 1 + w // 2) + 1)
        ax.set_ylim(min(max(bottom, h - 1), h - 1 + h // 2) + 1, max(min(top, 0), -h // 2) - 1)
        ax.set_title(f"{when}: r50 = {mass.r50:g}, r95 = {mass.r95:g} px", fontsize=10)
    axes[0].set_xlabel(rf.analysis_text(), fontsize=8)
    axes[1].set_xlabel(f"mean |∂ unit / ∂ input| over {IMAGES} test images", fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    fig.colorbar(shown, ax=axes[1], label="ERF / its max")
    fig.suptitle(
        f"{name}: effective receptive field of {rf.layer} unit {rf.unit} "
        f"(theoretical {rf.rf[0]}x{rf.rf[1]}, image {h}x{w})",
        fontsize=11,
    )
    fig.savefig(path, dpi=DPI)


def table_rows(results: dict[str, tuple[ModelErf, float]]) -> list[dict[str, str]]:
    """One row per model: its layer, receptive fields, the radii holding 50 % / 95 % of the
    ERF's mass untrained and trained and of a uniform map, the share of each in the uniform
    map's 50 % square, and the run's test accuracy."""
    rows = []
    for name, (result, accuracy) in results.items():
        rf, m = result.rf, result.masses
        rows.append({
            "model": name, "layer": rf.layer, "unit": f"{rf.unit[0]},{rf.unit[1]}",
            "theoretical RF": f"{rf.rf[0]}x{rf.rf[1]}",
            "RF radius": f"{(rf.rf[0] - 1) / 2:g}",
            "image": f"{rf.image_hw[0]}x{rf.image_hw[1]}",
            "r50 untrained": f"{m['untrained'].r50:g}", "r95 untrained": f"{m['untrained'].r95:g}",
            "r50 trained": f"{m['trained'].r50:g}", "r95 trained": f"{m['trained'].r95:g}",
            "r50 uniform": f"{result.uniform.r50:g}", "r95 uniform": f"{result.uniform.r95:g}",
            **{f"centre share {when}": f"{share:.3f}"
               for when, share in result.centre_shares.items()},
            "test accuracy": f"{accuracy:.4f}",
        })  # fmt: skip
    return rows


def write_tables(rows: list[dict[str, str]], out: Path) -> None:
    """out/erf.csv and out/erf.md."""
    with (out / "erf.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    (out / "erf.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    results = {name: run_erf(RUNS / name, layer) for name, layer in FEATURE_LAYERS.items()}
    for name, (result, _) in results.items():
        draw(RESULTS / f"erf_{name}.png", name, result)
    rows = table_rows(results)
    write_tables(rows, RESULTS)
    print((RESULTS / "erf.md").read_text())


if __name__ == "__main__":
    main()
