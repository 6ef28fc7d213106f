"""What a model computes, probed: every conv's feature map, one unit's input gradient beside its
receptive field from the analysis table, its effective receptive field over many images and how
that spreads, the logits of images and the confusion matrix."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import analysis, batches, layers, onednn
from cnnjax.data import Split
from cnnjax.errors import ConfigError
from cnnjax.geometry import Pair

Box = tuple[Pair, Pair]  # (first, last) row and (first, last) column, inclusive
ELEMENTWISE = (nn.BatchNorm, layers.ReLU)  # followed from a conv's output to its feature map
CONVS = (nn.Conv, nn.ConvLocal)  # layers whose outputs are feature maps (shared or not)


@dataclass
class _Recorder:
    """Every layer call's output by layer name (the analysis table's names), and each conv's
    output followed through the element-wise layers (BatchNorm, ReLU) applied to it next."""

    outputs: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, Any] = field(default_factory=dict)  # conv name -> its feature map
    stages: dict[str, list[str]] = field(default_factory=dict)  # conv name -> module types
    owner: dict[int, str] = field(default_factory=dict)  # id(array) -> the conv it continues
    alive: list = field(default_factory=list)  # the outputs, so that their ids stay unique

    def after(self, module: nn.Module, name: str, arrays: list, out: Any) -> None:
        """`analysis.LeafCalls`'s hook after each layer call."""
        self.outputs[name] = out
        self.alive.append(out)
        conv = None
        if isinstance(module, CONVS):
            conv, self.stages[name] = name, []
        elif isinstance(module, ELEMENTWISE) and arrays:
            conv = self.owner.get(id(arrays[0]))
        if conv is not None:
            self.maps[conv] = out
            self.stages[conv].append(type(module).__name__)
            self.owner[id(out)] = conv


def _record(model: nn.Module, variables: dict, x: jnp.ndarray) -> _Recorder:
    recorder = _Recorder()
    with nn.intercept_methods(analysis.LeafCalls(after=recorder.after)):
        model.apply(variables, x, train=False)
    return recorder


def feature_maps(
    model: nn.Module, variables: dict, x_BxHxWxC: jnp.ndarray, conv_backend: str = "xla"
) -> tuple[dict[str, jnp.ndarray], dict[str, str]]:
    """Every conv layer's feature map (its output after the BatchNorm and ReLU applied to it
    next, where there are), by layer name in call order, and what each one is, e.g.
    "Conv → BatchNorm → ReLU". Eval mode, one compiled forward pass; works under jax.eval_shape."""
    stages: dict[str, str] = {}

    def forward(variables: dict, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        rec = _record(model, variables, x)
        stages.update({name: " → ".join(types) for name, types in rec.stages.items()})
        return rec.maps

    maps = jax.jit(onednn.using(conv_backend, forward))(variables, x_BxHxWxC)  # new: traced
    return {name: maps[name] for name in stages}, stages  # jit sorts dict keys; call order back


def layer_output(model: nn.Module, variables: dict, x: jnp.ndarray, layer: str) -> jnp.ndarray:
    """The output of the layer named `layer` (a name of the analysis table), in eval mode."""
    return _record(model, variables, x).outputs[layer]


def unit_gradient(
    model: nn.Module,
    variables: dict,
    x_1xHxWxC: jnp.ndarray,
    layer: str,
    unit: Pair,
    conv_backend: str = "xla",
) -> np.ndarray:
    """|d (the channel sum of `layer`'s output at `unit`) / d input|, summed over the input
    channels: (H, W), zero outside the pixels the unit depends on."""
    return effective_receptive_field(model, variables, x_1xHxWxC, layer, unit, 1, conv_backend)


def effective_receptive_field(
    model: nn.Module,
    variables: dict,
    x_NxHxWxC: jnp.ndarray,
    layer: str,
    unit: Pair,
    batch_size: int = 256,
    conv_backend: str = "xla",
) -> np.ndarray:
    """The effective receptive field (Luo et al., 2016) of `unit` of `layer`: the mean over the
    N images of |d (the channel sum of `layer`'s output at `unit`) / d input|, summed over the
    input channels, (H, W) float64. One jitted gradient of the batch's sum per batch: in eval
    mode (BatchNorm's running statistics) an image's unit depends on that image alone, so the
    batch gradient holds each image's own gradient."""
    i, j = unit

    def batch_activation(x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
        return layer_output(model, variables, x_BxHxWxC, layer)[:, i, j].sum()

    grad = jax.grad(onednn.using(conv_backend, batch_activation))
    abs_sum = jax.jit(lambda x: jnp.abs(grad(x)).sum((0, 3)))  # over images and channels
    n = len(x_NxHxWxC)
    if n == 0:
        raise ConfigError("the effective receptive field needs at least one image; got none")
    total = sum(
        np.asarray(abs_sum(x_NxHxWxC[k : k + batch_size]), np.float64)
        for k in range(0, n, batch_size)
    )
    return total / n


def logits(
    apply_fn: Callable,
    variables: dict,
    preprocess: Callable,
    images_NxHxWxC: np.ndarray,
    batch_size: int,
    conv_backend: str = "xla",
) -> np.ndarray:
    """The float32 logits (N, K) of uint8 images, in eval mode, `batch_size` at a time (the last
    batch padded, as in evaluation)."""
    n = len(images_NxHxWxC)
    apply_fn = onednn.using(conv_backend, apply_fn)
    forward = jax.jit(lambda v, images: apply_fn(v, preprocess(images), train=False))
    split = Split(images_NxHxWxC, np.zeros(n, np.int32))
    out = [forward(variables, b["image"]) for b in batches.eval_batches(split, min(batch_size, n))]
    return np.concatenate(jax.device_get(out)).astype(np.float32)[:n]


def confusion_matrix(labels_N: np.ndarray, predicted_N: np.ndarray, classes: int) -> np.ndarray:
    """Counts: rows the true class, columns the predicted one."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (labels_N, predicted_N), 1)
    return matrix


def choose_unit(
    table: analysis.Analysis, layer: str | None, unit: Sequence[int] | None
) -> tuple[analysis.Row, Pair]:
    """The row of `layer` (None: the last spatial layer whose receptive field is known) and the
    unit (None: the centre one, rounding towards the top left)."""
    spatial = table.spatial_rows
    names = [r.name for r in spatial]
    if not spatial or (layer is not None and layer not in names):
        raise ConfigError(
            f"layer={layer!r} is not a spatial layer of this model; choose one of {names}"
        )
    known = [r for r in spatial if r.rf is not None]
    row = (known or spatial)[-1] if layer is None else spatial[names.index(layer)]
    if row.rf is None:
        raise ConfigError(
            f"the receptive field of {row.name!r} is unknown (see `python -m cnnjax.summary`'s "
            f"warnings), so it has no window to draw; choose a layer before it, one of "
            f"{[r.name for r in known]}"
        )
    h, w = row.output_shape[1:3]
    if unit is None:
        return row, ((h - 1) // 2, (w - 1) // 2)
    try:
        chosen = tuple(int(u) for u in unit)
    except (TypeError, ValueError):
        chosen = ()
    if len(chosen) != 2 or not (0 <= chosen[0] < h and 0 <= chosen[1] < w):
        raise ConfigError(
            f"unit={unit} is not a unit of {row.name!r}, whose output is {h}x{w}: "
            f"use unit=[i,j] with 0 <= i < {h} and 0 <= j < {w}"
        )
    return row, chosen


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
    """The analysis window of `unit` of `row` (start + index * jump, rf pixels wide, per axis)
    beside the footprint of its input gradient."""
    axes = [row.axis_rf(a) for a in range(2)]
    return ReceptiveField(
        row.name, unit, row.rf, tuple(rf.centre(i) for rf, i in zip(axes, unit, strict=True)),
        tuple(rf.window(i) for rf, i in zip(axes, unit, strict=True)), gradient_HxW.shape,
        footprint(gradient_HxW),
    )  # fmt: skip


@dataclass(frozen=True)
class MassRadii:
    """How an (H, W) map of gradient mass spreads around a unit's centre: the radii of the
    smallest centred squares holding half and 95 % of it, and its share inside a window."""

    r50: float  # pixels from the centre to the square's outermost pixel centres (width 2r + 1)
    r95: float
    inside: float  # fraction of the mass inside the window (the analysis's: 1 up to float error)


def _square_mass(weights_HxW: np.ndarray, centre: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """The radii of the squares centred at `centre` (pixel coordinates, pixel centres at 0.5,
    1.5, ...) that hold different pixels, ascending, and the map's mass within each (pixels with
    centres within r of `centre` along both axes: a square 2r + 1 pixels wide)."""
    h, w = weights_HxW.shape
    rows = np.abs(np.arange(h) + 0.5 - centre[0])[:, None]
    cols = np.abs(np.arange(w) + 0.5 - centre[1])[None, :]
    distance_HxW = np.maximum(rows, cols)  # Chebyshev: the square on which a pixel lies
    radii, ring = np.unique(distance_HxW, return_inverse=True)
    return radii, np.bincount(ring.ravel(), weights_HxW.ravel(), minlength=len(radii)).cumsum()


def _total(weights_HxW: np.ndarray) -> float:
    total = float(weights_HxW.sum())
    if total <= 0 or not np.isfinite(total):
        raise ValueError(
            f"the map's total ({total}) must be a positive number: an all-zero map (a unit "
            "inactive on every image) has no mass to locate"
        )
    return total


def mass_radius(weights_HxW: np.ndarray, centre: tuple[float, float], fraction: float) -> float:
    """The radius r of the smallest square centred at `centre` (pixel coordinates) whose pixels
    (centres within r of it along both axes, 2r + 1 wide) hold at least `fraction` of the map's
    total; the image clips it."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must lie in (0, 1]")
    total = _total(weights_HxW)
    radii, mass = _square_mass(weights_HxW, centre)
    return float(radii[np.argmax(mass >= fraction * total * (1 - 1e-12))])


def mass_within(weights_HxW: np.ndarray, centre: tuple[float, float], radius: float) -> float:
    """The fraction of the map's total on the pixels within `radius` of `centre` along both
    axes (pixel coordinates)."""
    radii, mass = _square_mass(weights_HxW, centre)
    held = mass[radii <= radius + 1e-9]
    return float(held[-1] / _total(weights_HxW)) if held.size else 0.0


def mass_radii(weights_HxW: np.ndarray, centre: tuple[float, float], window: Box) -> MassRadii:
    """The 50 % and 95 % radii of `mass_radius` and the fraction of the mass inside `window`
    ((first, last) row and column, inclusive; clipped to the map)."""
    (top, bottom), (left, right) = window
    rows, cols = slice(max(top, 0), max(bottom + 1, 0)), slice(max(left, 0), max(right + 1, 0))
    inside = weights_HxW[rows, cols].sum()
    return MassRadii(
        mass_radius(weights_HxW, centre, 0.5),
        mass_radius(weights_HxW, centre, 0.95),
        float(inside / weights_HxW.sum()),
    )
