"""What dilation buys: the receptive field of stacks of 3x3 convs against depth for dilation 1,
2 and 4 (analysis beside the closed form 1 + 2*d*n), the input pixels each stack's centre unit
is wired to, and the study's runs: accuracy, parameters, MACs, the share of the last conv's
window its centre unit is wired to, and how far its trained effective receptive field spreads.

python experiments/dilation/plot_dilation.py   # after the sweep and cnnjax.report of README.md;
                                               # writes results/rf_vs_depth.{md,png},
                                               # results/study.md and results/footprints.png
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.patches import Rectangle

from cnnjax import analysis, probe, sweep, trained
from cnnjax.models.blocknet import BlockNet
from cnnjax.plots.figures import DPI, new_figure

RESULTS = Path(__file__).parent / "results"
RUNS = Path(__file__).parents[2] / "multirun" / "study_dilation"
DILATIONS = (1, 2, 4)
DEPTH = 8  # 3x3 convs in the deepest stack
SIZE = 28  # the image side
FOOTPRINT_DEPTH = 3  # convs of the stacks whose footprints are drawn
ERF_IMAGES = 1000  # the first test images, over which each trained ERF is averaged
WIRING_IMAGES = 64  # random images over which max-pools pick every pixel of their windows


def closed_form_rf(depth: int, dilation: int) -> int:
    """The receptive field of `depth` stacked 3x3 convs of dilation d, stride 1: each adds 2d."""
    return 1 + 2 * dilation * depth


def stack(depth: int, dilation: int, width: int = 4) -> BlockNet:
    """A BlockNet of one block: `depth` 3x3 convs of dilation `dilation`, no pooling."""
    return BlockNet(blocks=((width,) * depth,), dilation=dilation)


def conv3x3_rows(table: analysis.Analysis) -> list[analysis.Row]:
    """The 3x3 conv rows of an analysis table, in call order."""
    return [r for r in table.rows if r.type == "Conv" and r.kernel == (3, 3)]


def stack_rfs(depth: int, dilation: int, size: int = SIZE) -> list[int]:
    """The analysis's receptive field after each of `stack(depth, dilation)`'s 3x3 convs."""
    table = analysis.analyze(stack(depth, dilation), (1, size, size, 1))
    return [row.rf[0] for row in conv3x3_rows(table)]


def rf_table(depth: int = DEPTH, dilations=DILATIONS) -> dict[int, list[int]]:
    """Dilation -> receptive field after 1..depth convs, from the analysis; AssertionError where
    it and the closed form disagree."""
    table = {d: stack_rfs(depth, d) for d in dilations}
    for d, rfs in table.items():
        expected = [closed_form_rf(n, d) for n in range(1, depth + 1)]
        if rfs != expected:
            raise AssertionError(f"dilation {d}: analysis {rfs}, closed form {expected}")
    return table


def ones_variables(model: BlockNet, x_BxHxWxC: jnp.ndarray) -> dict:
    """The model's variables with every weight and bias 1 (shapes from jax.eval_shape, nothing
    initialised): with positive images ReLU passes everything, so a unit's input gradient is
    nonzero exactly on the pixels it is wired to (through max-pools: those each image makes
    the maxima)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x_BxHxWxC)
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)


def wiring(
    model: BlockNet, layer: str, unit: tuple[int, int], images: int = WIRING_IMAGES
) -> np.ndarray:
    """(H, W): the mean input gradient of `unit` of `layer` over random positive images with all
    weights 1; nonzero where the unit is wired to the input (a max-pool passes one pixel of its
    window per image, so over many images every pixel of every window)."""
    shape = (images, model.input_size, model.input_size, model.in_channels)
    x = jax.random.uniform(jax.random.key(0), shape, minval=0.5, maxval=1.5)
    variables = ones_variables(model, x[:1])
    return probe.effective_receptive_field(model, variables, x, layer, unit)


def window_coverage(gradient_HxW: np.ndarray, rf: probe.ReceptiveField) -> float:
    """The share of the unit's analysis window (clipped to the image) where the gradient is
    nonzero; AssertionError when any nonzero pixel lies outside the window."""
    if not rf.footprint_inside:
        raise AssertionError(f"{rf.layer} {rf.unit}: {rf.gradient_text()}")
    (top, bottom), (left, right) = rf.clipped
    return float((gradient_HxW[top : bottom + 1, left : right + 1] != 0).mean())


def last_conv_unit(model: BlockNet) -> tuple[analysis.Row, tuple[int, int]]:
    """The last 3x3 conv's row and its centre unit (rounding towards the top left)."""
    table = analysis.analyze(model, (1, model.input_size, model.input_size, model.in_channels))
    return probe.choose_unit(table, conv3x3_rows(table)[-1].name, None)


def stack_wiring(depth: int, dilation: int) -> tuple[np.ndarray, probe.ReceptiveField]:
    """The wiring of the centre unit of `stack(depth, dilation)`'s last conv and its window."""
    model = stack(depth, dilation)
    row, unit = last_conv_unit(model)
    gradient = wiring(model, row.name, unit, images=1)
    return gradient, probe.receptive_field(row, unit, gradient)


def draw_rf_vs_depth(table: dict[int, list[int]], path: Path) -> None:
    """Receptive field against depth per dilation, and the centre unit's wiring after
    FOOTPRINT_DEPTH convs of each dilation."""
    fig = new_figure((12.0, 4.2))
    plot, *panels = fig.subplots(1, 1 + len(table), width_ratios=[1.6] + [1] * len(table))
    depths = np.arange(1, DEPTH + 1)
    for d, rfs in table.items():
        plot.plot(depths, rfs, "o", label=f"dilation {d} (analysis)")
        plot.plot(depths, [closed_form_rf(n, d) for n in depths], "-", color="grey", lw=0.8)
    plot.axhline(SIZE, color="grey", ls="--", label=f"the {SIZE}x{SIZE} image")
    plot.set(xlabel="3x3 convs stacked (stride 1)", ylabel="receptive field (pixels)")
    plot.set_title("analysis; grey lines: 1 + 2·d·n", fontsize=10)
    plot.legend(fontsize=8)
    plot.grid(alpha=0.3)
    for ax, d in zip(panels, table, strict=True):
        gradient, rf = stack_wiring(FOOTPRINT_DEPTH, d)
        ax.imshow(gradient != 0, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        (top, bottom), (left, right) = rf.clipped
        corner, sides = (left - 0.5, top - 0.5), (right - left + 1, bottom - top + 1)
        ax.add_patch(Rectangle(corner, *sides, fill=False, edgecolor="tab:red", lw=1.5))
        coverage = window_coverage(gradient, rf)
        ax.set_title(f"d={d}: RF {rf.rf[0]}, {coverage:.0%} wired", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    panels[0].set_xlabel(
        f"pixels wired to the centre unit\nafter {FOOTPRINT_DEPTH} convs (red: RF)"
    )
    fig.savefig(path, dpi=DPI)


def write_rf_table(table: dict[int, list[int]], path: Path) -> None:
    """The receptive field after 1..DEPTH convs, one row per dilation, as markdown."""
    lines = ["| dilation | " + " | ".join(f"n={n}" for n in range(1, DEPTH + 1)) + " |"]
    lines.append("|---:|" + "---:|" * DEPTH)
    lines += [f"| {d} | " + " | ".join(map(str, rfs)) + " |" for d, rfs in table.items()]
    path.write_text("\n".join(lines) + "\n")


def run_row(group: sweep.Group) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """One model of the sweep: its geometry, accuracy over the seeds, the share of its last
    conv's window its centre unit is wired to, and the spread of that unit's trained ERF
    (its completed run of the lowest seed, over the first ERF_IMAGES test images); and the two
    maps."""
    first = min(group.completed, key=lambda run: run.seed)
    run = trained.load(RUNS / first.run)
    model, r = run.recipe.model, run.recipe
    row, unit = last_conv_unit(model)
    wired = wiring(model, row.name, unit)
    rf = probe.receptive_field(row, unit, wired)
    x = r.preprocess(r.test_split.images_NxHxWxC[:ERF_IMAGES])
    erf = probe.effective_receptive_field(model, run.variables, x, row.name, unit)
    mass = probe.mass_radii(erf, rf.centre, rf.window)
    convs = conv3x3_rows(r.table)
    return (
        {
            "model": first.model,
            "3x3 convs": str(len(convs)),
            "dilations": ",".join(str(c.dilation[0]) for c in convs),
            "last conv RF": f"{rf.rf[0]}x{rf.rf[1]}",
            "window wired": f"{window_coverage(wired, rf):.3f}",
            "params": f"{first.params:,}",
            "MACs": f"{first.macs:,}",
            "test accuracy": f"{group.mean:.4f} ± {group.std:.4f} (n={group.n})",
            "trained ERF r50 / r95": f"{mass.r50:g} / {mass.r95:g} (seed {first.seed})",
        },
        wired,
        erf,
    )


def draw_footprints(names: list[str], maps: list[tuple[np.ndarray, np.ndarray]], path: Path):
    """Per model: the pixels its last conv's centre unit is wired to, and its trained ERF."""
    fig = new_figure((2.4 * len(names), 5.0))
    axes = fig.subplots(2, len(names), squeeze=False)
    for k, (name, (wired, erf)) in enumerate(zip(names, maps, strict=True)):
        axes[0, k].imshow(wired != 0, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        axes[1, k].imshow(erf / erf.max(), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        axes[0, k].set_title(name, fontsize=9)
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("wired pixels")
    axes[1, 0].set_ylabel(f"trained ERF\n(mean |grad|, {ERF_IMAGES} images)")
    fig.savefig(path, dpi=DPI)


def write_study(rows: list[dict[str, str]], path: Path) -> None:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    table = rf_table()
    write_rf_table(table, RESULTS / "rf_vs_depth.md")
    draw_rf_vs_depth(table, RESULTS / "rf_vs_depth.png")
    print((RESULTS / "rf_vs_depth.md").read_text())
    groups = sweep.group_runs(sweep.load_runs(RUNS), ["model"])
    results = [run_row(g) for g in groups if g.n]
    if len(results) < len(groups):
        print(f"{len(groups) - len(results)} model(s) without a completed run left out")
    rows = [row for row, _, _ in results]
    write_study(rows, RESULTS / "study.md")
    draw_footprints(
        [r["model"] for r in rows], [m[1:] for m in results], RESULTS / "footprints.png"
    )
    print((RESULTS / "study.md").read_text())


if __name__ == "__main__":
    main()
