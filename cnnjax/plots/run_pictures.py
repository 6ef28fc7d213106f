"""A run's pictures (`python -m cnnjax.visualize`, `trainer.visualize=true`), written into
`<run dir>/visualize/` from the run's config and latest readable checkpoint (`cnnjax.trained`).
Images are shown as the model sees them (after the run's resize and channel adaptation, before
normalisation): receptive fields live in those pixels.

- `kernels.png`: the first conv layer's kernels, one panel per output channel: RGB when the layer
  reads 3 channels (each kernel min-max scaled), else its first input channel divided by the
  kernel's max |weight| (one colour bar, -1 to 1).
- `feature_maps/<NN>_<layer>.png`, one per conv layer in call order: the first `images` test
  images (rows) and the first `channels` channels of the conv's output followed through the
  BatchNorm and ReLU applied to it next (post-activation where there is one; the title says),
  on one colour scale per layer.
- `receptive_field.png`: a unit of a spatial layer (default: the centre unit of the last one) on
  the first test image. Left, its receptive field from the analysis table: centre
  start + index * jump, rf pixels wide, dashed where it extends beyond the image. Right, the
  independent check: the gradient of the unit's channel sum w.r.t. the input pixels, whose
  footprint must lie inside that window.
- `hand_set_kernels.png` (with `hand_set_kernels=true`, for a first conv reading one channel):
  hand-set 3x3 kernels (Sobel, blur, sharpen, Laplacian) and the first test image filtered by
  each, beside the first conv's first `channels` kernels and the image filtered by each the same
  way, each learned kernel titled with its closest hand-set one (`cnnjax.plots.kernels`).
- `curves.png`: train loss and accuracy by step, test accuracy by epoch (`metrics.jsonl`).
- `confusion.png`: the confusion matrix on the test split (counts; the dataset config's
  `class_names` when it has them, else class indices).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from cnnjax import analysis, batches, onednn, probe, rundir, trained
from cnnjax.data import Split
from cnnjax.errors import ConfigError
from cnnjax.plots.figures import DPI, FIGSIZE, Mosaic, grid_columns, mosaic, new_figure
from cnnjax.plots.kernels import draw_hand_set_kernels

CELL = 1.0  # inches per panel of the kernel and feature-map grids (DPI pixels)
BAR, TITLE = 1.0, 0.75  # inches added to a grid for its colour bar and its title
WIDE = (2 * FIGSIZE[0], FIGSIZE[1])  # curves.png: 1280x480 pixels
RF_SIZE = (10.0, FIGSIZE[1])  # receptive_field.png: 1000x480 pixels
CONFUSION_SIZE = (8.0, 6.4)  # 800x640 pixels
AUTO_MACS = 100_000_000  # confusion_images=auto: the whole test split up to these MACs per image,
AUTO_IMAGES = 1000  # and the first AUTO_IMAGES test images above


def show_inputs(ax: Axes, images_NxHxWxC: np.ndarray) -> Mosaic:
    """[0, 1] model inputs in a column: RGB when they have 3 channels, else the first in grey."""
    if images_NxHxWxC.shape[-1] == 3:
        grid = mosaic(np.clip(images_NxHxWxC, 0, 1), 1, fill=1.0)
        ax.imshow(grid.image, interpolation="nearest")
    else:
        grid = mosaic(images_NxHxWxC[..., 0], 1)
        ax.imshow(grid.image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    return grid


def draw_kernels(path: Path, kernel_HxWxIxO: np.ndarray, layer: str) -> None:
    """kernels.png: one panel per output channel, each kernel normalised on its own."""
    kh, kw, cin, cout = kernel_HxWxIxO.shape
    rgb = cin == 3
    shown = np.moveaxis(kernel_HxWxIxO[:, :, : 3 if rgb else 1, :], -1, 0)  # (O, kh, kw, 1|3)
    scale = np.abs(shown).reshape(cout, -1).max(1)
    cols = grid_columns(cout)
    rows = math.ceil(cout / cols)
    fig = new_figure((cols * CELL + (0 if rgb else BAR), rows * CELL + TITLE))
    ax = fig.subplots()
    if rgb:
        low = shown.min(axis=(1, 2, 3), keepdims=True)
        span = shown.max(axis=(1, 2, 3), keepdims=True) - low
        grid = mosaic((shown - low) / np.where(span > 0, span, 1), cols, fill=1.0)
        ax.imshow(grid.image, interpolation="nearest")
        how = "RGB, each kernel min-max scaled to [0, 1]"
    else:
        grid = mosaic(shown[..., 0] / np.where(scale > 0, scale, 1)[:, None, None], cols)
        image = ax.imshow(grid.image, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="w / max |w|", shrink=0.9)
        how = "each kernel / its max |w|" + (f"; input channel 0 of {cin}" if cin > 1 else "")
    ax.set_yticks(grid.centres[0], [str(i * cols) for i in range(rows)], fontsize=7)
    ax.set_xticks(grid.centres[1], [f"+{j}" for j in range(cols)], fontsize=7)
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    fig.suptitle(
        f"{layer}: {cout} kernels {kh}x{kw}x{cin} ({how}; max |w| {scale.min():.3g} to "
        f"{scale.max():.3g})",
        fontsize=9,
    )
    fig.savefig(path, dpi=DPI)


def draw_feature_maps(
    path: Path,
    layer: str,
    stages: str,
    inputs_NxHxWxC: np.ndarray,
    maps_NxHxWxC: np.ndarray,
    channels: int,
) -> None:
    """One conv layer's feature maps: a row per image (its input on the left), a column per
    channel shown (`maps` holds the first of `channels`), one colour scale for the layer."""
    n, h, w, shown = maps_NxHxWxC.shape
    fig = new_figure(((shown + 1) * CELL + BAR, n * CELL + TITLE))
    inputs_ax, maps_ax = fig.subplots(1, 2, width_ratios=[1, shown])
    inputs = show_inputs(inputs_ax, inputs_NxHxWxC)
    panels = np.moveaxis(maps_NxHxWxC, -1, 1).reshape(n * shown, h, w)  # image-major
    grid = mosaic(panels, shown)
    lo, hi = float(maps_NxHxWxC.min()), float(maps_NxHxWxC.max())
    image = maps_ax.imshow(grid.image, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    inputs_ax.set_yticks(inputs.centres[0], [f"test {i}" for i in range(n)], fontsize=8)
    inputs_ax.set_xticks(inputs.centres[1], ["input"], fontsize=8)
    maps_ax.set_xticks(grid.centres[1], [f"ch {c}" for c in range(shown)], fontsize=8)
    maps_ax.set_yticks([])
    for ax in (inputs_ax, maps_ax):
        ax.xaxis.set_ticks_position("top")
        ax.tick_params(length=0)
        ax.set_frame_on(False)
    which = f"channels 0-{shown - 1} of {channels}" if shown < channels else "all channels"
    fig.suptitle(f"{layer} ({stages}): {h}x{w}x{channels}, {which}", fontsize=9)
    fig.colorbar(image, ax=maps_ax, label="activation", shrink=0.9)
    fig.savefig(path, dpi=DPI)


def _box(ax: Axes, box: probe.Box, **style) -> None:
    """A rectangle around the pixels of `box` (inclusive pixel indices)."""
    (t, b), (left, r) = box
    ax.add_patch(Rectangle((left - 0.5, t - 0.5), r - left + 1, b - t + 1, fill=False, **style))


def draw_receptive_field(
    path: Path, image_HxWxC: np.ndarray, gradient_HxW: np.ndarray, rf: probe.ReceptiveField
) -> None:
    """receptive_field.png: the analysis window (left) and the input gradient (right)."""
    fig = new_figure(RF_SIZE)
    left, right = fig.subplots(1, 2)
    peak = gradient_HxW.max()
    heat = np.ma.masked_equal(gradient_HxW / (peak or 1), 0)
    for ax in (left, right):
        show_inputs(ax, image_HxWxC[None])
    overlay = right.imshow(heat, cmap="inferno", vmin=0, vmax=1, alpha=0.8, interpolation="nearest")
    (t, b), (lo, hi) = rf.window
    h, w = rf.image_hw
    for ax, label in ((left, None), (right, "analysis window")):
        _box(ax, rf.window, edgecolor="tab:red", lw=2, ls="--" if rf.beyond else "-", label=label)
        if rf.beyond:
            _box(ax, rf.clipped, edgecolor="tab:red", lw=1, label=label and "clipped to the image")
        ax.plot(rf.centre[1] - 0.5, rf.centre[0] - 0.5, "+", color="tab:red", ms=10)
        ax.set_xlim(min(lo, 0) - 1, max(hi, w - 1) + 1)
        ax.set_ylim(max(b, h - 1) + 1, min(t, 0) - 1)
    if rf.footprint is not None:
        _box(right, rf.footprint, edgecolor="cyan", lw=1.5, ls=":", label="gradient footprint")
    left.set_title("receptive field (analysis table)", fontsize=10)
    right.set_title("|∂ unit / ∂ input| (channel sums)", fontsize=10)
    left.set_xlabel(rf.analysis_text(), fontsize=8)
    right.set_xlabel(rf.gradient_text(), fontsize=8)
    fig.legend(*right.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    fig.colorbar(overlay, ax=right, label="gradient / its max")
    fig.suptitle(
        f"{rf.layer} unit ({rf.unit[0]}, {rf.unit[1]}): receptive field {rf.rf[0]}x{rf.rf[1]} "
        "on test image 0",
        fontsize=11,
    )
    fig.savefig(path, dpi=DPI)


def draw_curves(path: Path, rows: list[dict]) -> bool:
    """curves.png: train loss (and test loss) and train accuracy by step, test accuracy by
    epoch; False when there is nothing to draw."""
    train_rows = [r for r in rows if r.get("split") == "train"]
    test_rows = [r for r in rows if r.get("split") == "test"]
    if not train_rows and not test_rows:
        return False
    fig = new_figure(WIDE)
    loss_ax, acc_ax, test_ax = fig.subplots(1, 3)

    def column(rows: list[dict], key: str) -> list[float]:
        return [r[key] for r in rows]

    if train_rows:
        steps = column(train_rows, "step")
        loss_ax.plot(steps, column(train_rows, "loss"), ".-", label="train")
        acc_ax.plot(steps, column(train_rows, "accuracy"), ".-", label="train")
    if test_rows:
        loss_ax.plot(column(test_rows, "step"), column(test_rows, "loss"), "o", label="test")
        test_ax.plot(column(test_rows, "epoch"), column(test_rows, "accuracy"), "o-")
    else:
        test_ax.text(0.5, 0.5, "no test evaluation yet", ha="center", transform=test_ax.transAxes)
    loss_ax.set(title="loss", xlabel="step")
    acc_ax.set(title="train accuracy", xlabel="step")
    test_ax.set(title="test accuracy", xlabel="epoch")
    loss_ax.legend(fontsize="small")
    for ax in (loss_ax, acc_ax, test_ax):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=DPI)
    return True


def draw_confusion(path: Path, matrix: np.ndarray, labels: list[str], title: str) -> None:
    """confusion.png: counts, true class by row; numbers written in the cells up to 20 classes."""
    k = len(matrix)
    fig = new_figure(CONFUSION_SIZE)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, label="test images")
    if k <= 30:
        slanted = max(map(len, labels)) > 2  # names rather than indices
        ax.set_xticks(range(k), labels, rotation=45 if slanted else 0, fontsize=8,
                      ha="right" if slanted else "center")  # fmt: skip
        ax.set_yticks(range(k), labels, fontsize=8)
    if k <= 20:
        for (i, j), count in np.ndenumerate(matrix):
            colour = "white" if count > matrix.max() / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=7)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=DPI)


def confusion_count(setting: Any, n_test: int, macs: int) -> int:
    """How many test images (the first ones) `confusion_images` asks for."""
    if setting == "all":
        return n_test
    if setting == "auto":
        return n_test if macs <= AUTO_MACS else min(n_test, AUTO_IMAGES)
    if isinstance(setting, int) and setting > 0:
        return min(setting, n_test)
    raise ConfigError(f"confusion_images={setting!r}: use auto, all or a positive number")


@dataclass
class Result:
    lines: list[str]  # what was done, a line each
    files: list[Path]  # the PNGs written
    receptive_field: probe.ReceptiveField
    confusion: np.ndarray  # counts, true class by row


def _param(params: dict, layer: str) -> dict:
    for key in layer.split("/"):
        params = params[key]
    return params


def _first_kernel(variables: dict, maps: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """The first conv layer's name and kernel (H, W, I, O)."""
    first = next(iter(maps))
    return first, np.asarray(_param(variables["params"], first)["kernel"])


def draw(
    run_dir: str | Path | None,
    out_dir: str | Path | None = None,
    images: int = 4,
    channels: int = 8,
    layer: str | None = None,
    unit: Any = None,
    confusion_images: Any = "auto",
    batch_size: int = 256,
    conv_backend: str = "auto",
    hand_set_kernels: bool = False,
) -> Result:
    """Draw the pictures of the run in `run_dir` into `out_dir` (default <run_dir>/visualize):
    `images` test images and `channels` channels per feature map, the receptive field of `unit`
    of `layer`, the confusion matrix of `confusion_images` test images (see the module's
    docstring); hand_set_kernels.png too with `hand_set_kernels`."""
    if not run_dir:
        raise ConfigError(
            "run_dir is required: python -m cnnjax.visualize run_dir=outputs/<date>/<time>_<model>"
        )
    if images < 1 or channels < 1:
        raise ConfigError(f"images={images}, channels={channels}: both must be >= 1")
    tfds.disable_progress_bar()
    run_dir = Path(run_dir).expanduser()
    run = trained.load(run_dir)
    r, variables = run.recipe, run.variables
    out = Path(out_dir).expanduser() if out_dir else run_dir / "visualize"
    (out / "feature_maps").mkdir(parents=True, exist_ok=True)
    test = r.test_split
    raw = test.images_NxHxWxC[:images]
    source_hwc, target_hwc = test.images_NxHxWxC.shape[1:], r.table.input_shape[1:]
    unnormalised, _ = batches.make_preprocess(source_hwc, target_hwc, [0.0], [1.0])
    shown = np.asarray(unnormalised(raw))  # what the model sees, before normalisation
    x = r.preprocess(raw)
    n_confusion = confusion_count(confusion_images, len(test.labels_N), r.table.totals.macs)
    subset = Split(test.images_NxHxWxC[:n_confusion], test.labels_N[:n_confusion])
    row, unit = probe.choose_unit(r.table, layer, unit)
    backend = onednn.resolve(conv_backend)
    maps, stages = probe.feature_maps(r.model, variables, x, backend)
    maps = {name: np.asarray(m[..., :channels]) for name, m in maps.items()}
    gradient = probe.unit_gradient(r.model, variables, x[:1], row.name, unit, backend)
    predicted = probe.logits(
        r.state.apply_fn, variables, r.preprocess, subset.images_NxHxWxC, batch_size, backend
    ).argmax(-1)
    written = _Written([
        f"warning: checkpoint {step} cannot be read ({why}); the pictures are of step {run.step}"
        for step, why in sorted(run.unreadable.items())
    ])  # fmt: skip
    written.lines.append(
        f"{type(r.model).__name__} from {run_dir} at step {run.step} "
        f"(input adaptation: {r.adaptation})"
    )
    _conv_pictures(out, variables, maps, stages, r.table, shown, written)
    if hand_set_kernels:
        _hand_set_picture(out, variables, maps, shown[0], channels, written)
    rf = probe.receptive_field(row, unit, gradient)
    draw_receptive_field(out / "receptive_field.png", shown[0], gradient, rf)
    written.add(out / "receptive_field.png")
    written.lines += [rf.analysis_text().replace("\n", " "), rf.gradient_text().replace("\n", " ")]
    if draw_curves(out / "curves.png", rundir.read_metrics(run_dir)):
        written.add(out / "curves.png")
    else:
        written.lines.append(f"skipped curves.png: {run_dir / rundir.METRICS} has no metrics yet")
    matrix = probe.confusion_matrix(subset.labels_N, predicted, run.cfg.dataset.num_classes)
    _confusion_picture(out, run, matrix, len(test.labels_N), written)
    return Result(written.lines, written.files, rf, matrix)


@dataclass
class _Written:
    """What `draw` did, a line each, and the PNGs it wrote."""

    lines: list[str]
    files: list[Path] = field(default_factory=list)

    def add(self, path: Path) -> None:
        self.files.append(path)
        self.lines.append(f"wrote {path}")


def _conv_pictures(
    out: Path,
    variables: dict,
    maps: dict[str, np.ndarray],
    stages: dict[str, str],
    table: analysis.Analysis,
    shown: np.ndarray,
    written: _Written,
) -> None:
    """kernels.png (the first conv's) and every conv's feature maps."""
    if not maps:
        written.lines.append("skipped kernels.png and feature_maps/: the model has no conv layer")
        return
    first, kernel = _first_kernel(variables, maps)
    draw_kernels(out / "kernels.png", kernel, first)
    written.add(out / "kernels.png")
    channels = {row.name: row.output_shape[-1] for row in table.rows if row.type == "Conv"}
    width = len(str(len(maps)))
    for k, (name, fmap) in enumerate(maps.items(), start=1):
        path = out / "feature_maps" / f"{k:0{width}d}_{name.replace('/', '.')}.png"
        draw_feature_maps(path, name, stages[name], shown, fmap, channels[name])
        written.add(path)


def _hand_set_picture(
    out: Path,
    variables: dict,
    maps: dict[str, np.ndarray],
    image_HxWxC: np.ndarray,
    channels: int,
    written: _Written,
) -> None:
    """hand_set_kernels.png: the first conv's first `channels` kernels beside hand-set ones, on
    the image; skipped, with the reason, unless that conv reads one channel."""
    if not maps:
        written.lines.append("skipped hand_set_kernels.png: the model has no conv layer")
        return
    first, kernel = _first_kernel(variables, maps)
    if kernel.shape[2] != 1 or image_HxWxC.shape[-1] != 1:
        written.lines.append(
            f"skipped hand_set_kernels.png: {first} reads {kernel.shape[2]} channels and the "
            "hand-set kernels filter one grey channel"
        )
        return
    learned = np.moveaxis(kernel[:, :, 0, :channels], -1, 0)
    path = out / "hand_set_kernels.png"
    similarity = draw_hand_set_kernels(path, image_HxWxC[..., 0], learned, first)
    written.add(path)
    if similarity is None:
        written.lines.append(f"{first}'s kernels are not 3x3: no cosine with the hand-set ones")
    else:
        written.lines.append(
            f"{first}'s kernels' closest hand-set ones: "
            + ", ".join(f"ch {k} {similarity.match(k)}" for k in range(len(learned)))
        )


def _confusion_picture(
    out: Path, run: trained.TrainedRun, matrix: np.ndarray, n_test: int, written: _Written
) -> None:
    """confusion.png of the first matrix.sum() test images of the run."""
    n = int(matrix.sum())
    of = "all" if n == n_test else f"the first {n:,} of"
    title = (
        f"{run.cfg.dataset.name} test split ({of} {n_test:,} images), step {run.step}: "
        f"accuracy {np.trace(matrix) / n:.4f}"
    )
    draw_confusion(out / "confusion.png", matrix, run.recipe.class_names, title)
    written.add(out / "confusion.png")
    written.lines.append(f"confusion matrix: {title}")
