"""`python -m cnnjax.visualize run_dir=<dir> [images=4] [layer=<name>] [unit=[i,j]]`: pictures of
a trained (or checkpointed) run, written into `<dir>/visualize/`.

The run is rebuilt from its own `config.yaml` by `train.prepare` (model, data, input adaptation,
the state's structure) and given its latest readable checkpoint (parameters and BatchNorm
statistics; the model runs in eval mode). Images are shown as the model sees them (after the
run's resize and channel adaptation, before normalisation): receptive fields live in those pixels.

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
- `curves.png`: train loss and accuracy by step, test accuracy by epoch (`metrics.jsonl`).
- `confusion.png`: the confusion matrix on the test split (counts; the dataset config's
  `class_names` when it has them, else class indices).
"""

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import hydra
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from omegaconf import DictConfig, OmegaConf

from cnnjax import analysis, checkpoint, data, layers, onednn, train
from cnnjax.report import DPI, FIGSIZE, read_metrics

Pair = tuple[int, int]
Box = tuple[Pair, Pair]  # (first, last) row and (first, last) column, inclusive
CELL = 1.0  # inches per panel of the kernel and feature-map grids (DPI pixels)
BAR, TITLE = 1.0, 0.75  # inches added to a grid for its colour bar and its title
WIDE = (2 * FIGSIZE[0], FIGSIZE[1])  # curves.png: 1280x480 pixels
RF_SIZE = (10.0, FIGSIZE[1])  # receptive_field.png: 1000x480 pixels
CONFUSION_SIZE = (8.0, 6.4)  # 800x640 pixels
ELEMENTWISE = (nn.BatchNorm, layers.ReLU)  # followed from a conv's output to its feature map
AUTO_MACS = 100_000_000  # confusion_images=auto: the whole test split up to these MACs per image,
AUTO_IMAGES = 1000  # and the first AUTO_IMAGES test images above


class VisualizeError(RuntimeError):
    """A run directory or setting that cannot be visualised; the message says what to do."""


# ---------------------------------------------------------------- the run


class LoadedRun(NamedTuple):
    cfg: DictConfig  # the run's resolved config.yaml
    recipe: train.Recipe  # what training set up from it
    variables: dict  # restored: params and the other collections (BatchNorm statistics)
    step: int  # of the checkpoint


def load_run(run_dir: Path) -> LoadedRun:
    """The run's config, set up as training set it up (with the run's compilation cache, which
    holds training's compilations), and its latest readable checkpoint."""
    if not run_dir.is_dir():
        problem = "is not a directory" if run_dir.exists() else "does not exist"
        raise VisualizeError(
            f"run_dir={run_dir} {problem}: pass the directory of a `python -m cnnjax.train` run "
            "(outputs/<date>/<time>_<model>)"
        )
    if not (run_dir / "config.yaml").is_file():
        raise VisualizeError(
            f"{run_dir} holds no config.yaml, so it is not a training run directory: "
            "`python -m cnnjax.train` writes config.yaml (the resolved config) when it starts; "
            "pass that run's directory, e.g. run_dir=outputs/<date>/<time>_<model>"
        )
    cfg = OmegaConf.load(run_dir / "config.yaml")
    directory = run_dir / "checkpoints"
    fix = (
        f"run its training command again with hydra.run.dir={run_dir} (it resumes there) until "
        "it saves one: every trainer.checkpoint_every steps, every epoch end and the last step"
    )
    if not directory.is_dir():
        raise VisualizeError(f"{run_dir} has no checkpoints/: the run saved none; {fix}")
    checkpoints = checkpoint.Checkpoints(directory, cfg.trainer.keep_checkpoints)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise VisualizeError(f"{directory} holds no checkpoint; {fix}")
        train.use_compilation_cache(cfg.trainer.compilation_cache_dir)  # training's compilations
        recipe = train.prepare(cfg)
        restored = checkpoints.restore_latest(recipe.state, recipe.rng)
    finally:
        checkpoints.close()
    if restored is None:
        raise VisualizeError(
            f"none of the checkpoints in {directory} (steps {steps}) can be read (the warnings "
            f"above say why); {fix}"
        )
    state, _, meta = restored
    return LoadedRun(cfg, recipe, {"params": state.params, **state.model_state}, meta["step"])


# ---------------------------------------------------------------- what the model computes


@dataclass
class _Recorder:
    """An `nn.intercept_methods` interceptor: every module call's output by layer name (the
    analysis table's names), and each conv's output followed through the element-wise layers
    (BatchNorm, ReLU) applied to it next."""

    outputs: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, Any] = field(default_factory=dict)  # conv name -> its feature map
    stages: dict[str, list[str]] = field(default_factory=dict)  # conv name -> module types
    owner: dict[int, str] = field(default_factory=dict)  # id(array) -> the conv it continues
    alive: list = field(default_factory=list)  # the outputs, so that their ids stay unique

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not args:
            return out
        module = context.module
        name = "/".join(module.scope.path) or type(module).__name__
        self.outputs[name] = out
        self.alive.append(out)
        conv = None
        if isinstance(module, nn.Conv):
            conv, self.stages[name] = name, []
        elif isinstance(module, ELEMENTWISE):
            conv = self.owner.get(id(args[0]))
        if conv is not None:
            self.maps[conv] = out
            self.stages[conv].append(type(module).__name__)
            self.owner[id(out)] = conv
        return out


def _record(model: nn.Module, variables: dict, x: jnp.ndarray) -> _Recorder:
    recorder = _Recorder()
    with nn.intercept_methods(recorder):
        model.apply(variables, x, train=False)
    return recorder


def feature_maps(
    model: nn.Module, variables: dict, x_BxHxWxC: jnp.ndarray
) -> tuple[dict[str, jnp.ndarray], dict[str, str]]:
    """Every conv layer's feature map (its output after the BatchNorm and ReLU applied to it
    next, where there are), by layer name in call order, and what each one is, e.g.
    "Conv → BatchNorm → ReLU". Eval mode, one compiled forward pass; works under jax.eval_shape."""
    stages: dict[str, str] = {}

    def forward(variables: dict, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        rec = _record(model, variables, x)
        stages.update({name: " → ".join(types) for name, types in rec.stages.items()})
        return rec.maps

    maps = jax.jit(forward)(variables, x_BxHxWxC)  # a new function: traced, so stages are set
    return {name: maps[name] for name in stages}, stages  # jit sorts dict keys; call order back


def layer_output(model: nn.Module, variables: dict, x: jnp.ndarray, layer: str) -> jnp.ndarray:
    """The output of the layer named `layer` (a name of the analysis table), in eval mode."""
    return _record(model, variables, x).outputs[layer]


def unit_gradient(
    model: nn.Module, variables: dict, x_1xHxWxC: jnp.ndarray, layer: str, unit: Pair
) -> np.ndarray:
    """|d (the channel sum of `layer`'s output at `unit`) / d input|, summed over the input
    channels: (H, W), zero outside the pixels the unit depends on."""

    def activation(x: jnp.ndarray) -> jnp.ndarray:
        return layer_output(model, variables, x, layer)[0, unit[0], unit[1]].sum()

    grad = jax.jit(jax.grad(activation))(x_1xHxWxC)
    return np.abs(np.asarray(grad[0])).sum(-1)


def predictions(
    apply_fn: Callable, variables: dict, preprocess: Callable, split: data.Split, batch_size: int
) -> np.ndarray:
    """The predicted class of every image of `split`, in eval mode, `batch_size` at a time
    (the last batch padded, as in evaluation)."""
    n = len(split.labels_N)
    predict = jax.jit(lambda v, images: apply_fn(v, preprocess(images), train=False).argmax(-1))
    out = [predict(variables, b["image"]) for b in data.eval_batches(split, min(batch_size, n))]
    return np.concatenate(jax.device_get(out))[:n]


def confusion_matrix(labels_N: np.ndarray, predicted_N: np.ndarray, classes: int) -> np.ndarray:
    """Counts: rows the true class, columns the predicted one."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (labels_N, predicted_N), 1)
    return matrix


def confusion_count(setting: Any, n_test: int, macs: int) -> int:
    """How many test images (the first ones) `confusion_images` asks for."""
    if setting == "all":
        return n_test
    if setting == "auto":
        return n_test if macs <= AUTO_MACS else min(n_test, AUTO_IMAGES)
    if isinstance(setting, int) and setting > 0:
        return min(setting, n_test)
    raise VisualizeError(f"confusion_images={setting!r}: use auto, all or a positive number")


# ---------------------------------------------------------------- receptive fields


def spatial_rows(table: analysis.Analysis) -> list[analysis.Row]:
    """The rows with a spatial output (NHWC), in-place layers (ReLU, dropout) left out."""
    return [r for r in table.rows if len(r.output_shape) == 4 and r.type not in analysis.IN_PLACE]


def choose_unit(
    table: analysis.Analysis, layer: str | None, unit: Sequence[int] | None
) -> tuple[analysis.Row, Pair]:
    """The row of `layer` (None: the last spatial layer) and the unit (None: the centre one,
    rounding towards the top left)."""
    spatial = spatial_rows(table)
    names = [r.name for r in spatial]
    if not spatial or (layer is not None and layer not in names):
        raise VisualizeError(
            f"layer={layer!r} is not a spatial layer of this model; choose one of {names}"
        )
    row = spatial[-1] if layer is None else spatial[names.index(layer)]
    h, w = row.output_shape[1:3]
    if unit is None:
        return row, ((h - 1) // 2, (w - 1) // 2)
    try:
        chosen = tuple(int(u) for u in unit)
    except (TypeError, ValueError):
        chosen = ()
    if len(chosen) != 2 or not (0 <= chosen[0] < h and 0 <= chosen[1] < w):
        raise VisualizeError(
            f"unit={unit} is not a unit of {row.name!r}, whose output is {h}x{w}: "
            f"use unit=[i,j] with 0 <= i < {h} and 0 <= j < {w}"
        )
    return row, chosen


def unit_centre(row: analysis.Row, unit: Pair) -> tuple[float, float]:
    """The centre of `unit`'s receptive field, start + index * jump per axis, in input pixel
    coordinates (pixel centres at 0.5, 1.5, …)."""
    return row.start[0] + unit[0] * row.jump[0], row.start[1] + unit[1] * row.jump[1]


def unit_window(row: analysis.Row, unit: Pair) -> Box:
    """The first and last input pixel rows and columns (inclusive, 0-based; they may lie
    outside the image) of `unit`'s receptive field: the pixel centres within (rf - 1)/2 of
    its centre."""
    (ch, cw), (rh, rw) = unit_centre(row, unit), row.rf
    return (
        (round(ch - (rh - 1) / 2 - 0.5), round(ch + (rh - 1) / 2 - 0.5)),
        (round(cw - (rw - 1) / 2 - 0.5), round(cw + (rw - 1) / 2 - 0.5)),
    )


def footprint(weights_HxW: np.ndarray) -> Box | None:
    """The bounding box of the nonzero pixels; None when there are none."""
    rows, cols = np.nonzero(weights_HxW)
    if not rows.size:
        return None
    return (int(rows.min()), int(rows.max())), (int(cols.min()), int(cols.max()))


@dataclass(frozen=True)
class ReceptiveField:
    """A unit's receptive field from the analysis table, and its input gradient's footprint."""

    layer: str
    unit: Pair
    rf: Pair
    centre: tuple[float, float]  # in pixel coordinates (pixel centres at 0.5, 1.5, …)
    window: Box  # from the analysis, unclipped
    image_hw: Pair
    footprint: Box | None  # of the input gradient; None when it is zero everywhere

    @property
    def clipped(self) -> Box:
        (t, b), (left, r) = self.window
        h, w = self.image_hw
        return (max(t, 0), min(b, h - 1)), (max(left, 0), min(r, w - 1))

    @property
    def beyond(self) -> dict[str, int]:
        """Pixels of the window outside the image, per side (only the sides where it does)."""
        (t, b), (left, r) = self.window
        h, w = self.image_hw
        sides = {"top": -t, "bottom": b - (h - 1), "left": -left, "right": r - (w - 1)}
        return {side: n for side, n in sides.items() if n > 0}

    @property
    def footprint_inside(self) -> bool:
        if self.footprint is None:
            return True
        return all(
            lo <= f_lo and f_hi <= hi
            for (f_lo, f_hi), (lo, hi) in zip(self.footprint, self.clipped, strict=True)
        )

    def analysis_text(self) -> str:
        (t, b), (left, r) = self.window
        h, w = self.image_hw
        text = (
            f"analysis: {self.rf[0]}x{self.rf[1]} window centred at "
            f"({self.centre[0]:g}, {self.centre[1]:g}):\nrows {t}..{b}, cols {left}..{r}"
        )
        if not self.beyond:
            return text + f", inside the {h}x{w} image"
        (ct, cb), (cl, cr) = self.clipped
        sides = ", ".join(f"{n} {side}" for side, n in self.beyond.items())
        return (
            text + f", beyond the {h}x{w} image\n({sides}): clipped to rows {ct}..{cb}, "
            f"cols {cl}..{cr}"
        )

    def gradient_text(self) -> str:
        if self.footprint is None:
            return "input gradient: zero everywhere (the unit is inactive on this image)"
        (t, b), (left, r) = self.footprint
        if self.footprint == self.clipped:
            verdict = "= the clipped window"
        elif self.footprint_inside:
            verdict = "inside the window"
        else:
            verdict = "OUTSIDE the window: the analysis table is wrong"
        return f"input gradient footprint: rows {t}..{b}, cols {left}..{r},\n{verdict}"


def receptive_field(row: analysis.Row, unit: Pair, gradient_HxW: np.ndarray) -> ReceptiveField:
    """The analysis window of `unit` of `row` beside the footprint of its input gradient."""
    return ReceptiveField(
        row.name, unit, row.rf, unit_centre(row, unit), unit_window(row, unit),
        gradient_HxW.shape, footprint(gradient_HxW),
    )  # fmt: skip


# ---------------------------------------------------------------- drawing


def new_figure(size: tuple[float, float]) -> Figure:
    """A figure of `size` inches, saved at DPI (so size x DPI pixels)."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def grid_columns(n: int) -> int:
    """Columns of a grid of n panels: 8 per row, more (about a square) beyond 64."""
    return min(n, max(8, math.ceil(math.sqrt(n))))


class Mosaic(NamedTuple):
    image: np.ndarray  # the panels, row-major, with gaps of `fill` between them
    centres: tuple[list[float], list[float]]  # of the panel rows and columns, in its pixels


def mosaic(panels: np.ndarray, cols: int, fill: float = np.nan) -> Mosaic:
    """Panels (N, h, w) or (N, h, w, 3) as one image, `cols` to a row: one imshow draws a whole
    grid (hundreds of axes would take seconds). Gaps are max(1, side // 8) pixels."""
    n, h, w = panels.shape[:3]
    rows, gap = math.ceil(n / cols), max(1, max(h, w) // 8)
    shape = (rows * (h + gap) - gap, cols * (w + gap) - gap, *panels.shape[3:])
    out = np.full(shape, fill, np.float32)
    for k, panel in enumerate(panels):
        i, j = divmod(k, cols)
        out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = panel
    centres = [i * (h + gap) + (h - 1) / 2 for i in range(rows)]
    return Mosaic(out, (centres, [j * (w + gap) + (w - 1) / 2 for j in range(cols)]))


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


def _box(ax: Axes, box: Box, **style) -> None:
    """A rectangle around the pixels of `box` (inclusive pixel indices)."""
    (t, b), (left, r) = box
    ax.add_patch(Rectangle((left - 0.5, t - 0.5), r - left + 1, b - t + 1, fill=False, **style))


def draw_receptive_field(
    path: Path, image_HxWxC: np.ndarray, gradient_HxW: np.ndarray, rf: ReceptiveField
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


def class_labels(dataset: DictConfig) -> list[str]:
    """The dataset config's `class_names` when it has one per class, else the indices."""
    names = dataset.get("class_names")
    if names and len(names) == dataset.num_classes:
        return [str(n) for n in names]
    return [str(k) for k in range(dataset.num_classes)]


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


# ---------------------------------------------------------------- the command


@dataclass
class Result:
    lines: list[str]  # what was done, a line each
    files: list[Path]  # the PNGs written
    receptive_field: ReceptiveField
    confusion: np.ndarray  # counts, true class by row


def _param(params: dict, layer: str) -> dict:
    for key in layer.split("/"):
        params = params[key]
    return params


def visualize(cfg: DictConfig) -> Result:
    """Draw the pictures of the run in `cfg.run_dir` (see the module's docstring)."""
    if not cfg.run_dir:
        raise VisualizeError(
            "run_dir is required: python -m cnnjax.visualize run_dir=outputs/<date>/<time>_<model>"
        )
    if cfg.images < 1 or cfg.channels < 1:
        raise VisualizeError(f"images={cfg.images}, channels={cfg.channels}: both must be >= 1")
    tfds.disable_progress_bar()
    run_dir = Path(cfg.run_dir).expanduser()
    run = load_run(run_dir)
    r, variables = run.recipe, run.variables
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir else run_dir / "visualize"
    (out / "feature_maps").mkdir(parents=True, exist_ok=True)
    test = r.test_split
    raw = test.images_NxHxWxC[: cfg.images]
    source_hwc, target_hwc = test.images_NxHxWxC.shape[1:], r.table.input_shape[1:]
    unnormalised, _ = data.make_preprocess(source_hwc, target_hwc, [0.0], [1.0])
    shown = np.asarray(unnormalised(raw))  # what the model sees, before normalisation
    x = r.preprocess(raw)
    n_confusion = confusion_count(cfg.confusion_images, len(test.labels_N), r.table.totals.macs)
    subset = data.Split(test.images_NxHxWxC[:n_confusion], test.labels_N[:n_confusion])
    row, unit = choose_unit(r.table, cfg.layer, cfg.unit)
    with onednn.backend(cfg.conv_backend):  # the functions below are traced inside
        maps, stages = feature_maps(r.model, variables, x)
        maps = {name: np.asarray(m[..., : cfg.channels]) for name, m in maps.items()}
        gradient = unit_gradient(r.model, variables, x[:1], row.name, unit)
        predicted = predictions(r.state.apply_fn, variables, r.preprocess, subset, cfg.batch_size)
    lines = [
        f"{type(r.model).__name__} from {run_dir} at step {run.step} "
        f"(input adaptation: {r.adaptation})"
    ]
    files: list[Path] = []

    def wrote(path: Path) -> None:
        files.append(path)
        lines.append(f"wrote {path}")

    conv_rows = {c.name: c for c in r.table.rows if c.type == "Conv"}
    if maps:
        first = next(iter(maps))
        kernel = np.asarray(_param(variables["params"], first)["kernel"])
        draw_kernels(out / "kernels.png", kernel, first)
        wrote(out / "kernels.png")
    else:
        lines.append("skipped kernels.png and feature_maps/: the model has no conv layer")
    width = len(str(len(maps)))
    for k, (name, fmap) in enumerate(maps.items(), start=1):
        path = out / "feature_maps" / f"{k:0{width}d}_{name.replace('/', '.')}.png"
        total = conv_rows[name].output_shape[-1]
        draw_feature_maps(path, name, stages[name], shown, fmap, total)
        wrote(path)

    rf = receptive_field(row, unit, gradient)
    draw_receptive_field(out / "receptive_field.png", shown[0], gradient, rf)
    wrote(out / "receptive_field.png")
    lines += [rf.analysis_text().replace("\n", " "), rf.gradient_text().replace("\n", " ")]

    if draw_curves(out / "curves.png", read_metrics(run_dir / "metrics.jsonl")):
        wrote(out / "curves.png")
    else:
        lines.append(f"skipped curves.png: {run_dir / 'metrics.jsonl'} has no metrics yet")

    matrix = confusion_matrix(subset.labels_N, predicted, run.cfg.dataset.num_classes)
    accuracy = np.trace(matrix) / n_confusion
    of = "all" if n_confusion == len(test.labels_N) else f"the first {n_confusion:,} of"
    title = (
        f"{run.cfg.dataset.name} test split ({of} {len(test.labels_N):,} images), step "
        f"{run.step}: accuracy {accuracy:.4f}"
    )
    draw_confusion(out / "confusion.png", matrix, class_labels(run.cfg.dataset), title)
    wrote(out / "confusion.png")
    lines.append(f"confusion matrix: {title}")
    return Result(lines, files, rf, matrix)


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
def main(cfg: DictConfig) -> None:
    """Entry point; exits with status 2 and the message when the run cannot be visualised."""
    try:
        result = visualize(cfg)
    except (VisualizeError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(result.lines))


if __name__ == "__main__":
    main()
