"""Hand-set 3x3 kernels (edges, blur, sharpen) beside the ones a network learned: the kernels as
named constants, an image filtered by each (cross-correlation, as a conv layer computes it), the
cosine similarity of learned and hand-set kernels, and `hand_set_kernels.png`."""

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.axes import Axes

from cnnjax.plots.figures import DPI, new_figure


def _constant(rows: list[list[float]], scale: float = 1.0) -> np.ndarray:
    """A read-only float32 kernel: `rows` times `scale`."""
    kernel = np.asarray(rows, np.float32) * np.float32(scale)
    kernel.setflags(write=False)
    return kernel


# Cross-correlation (a conv layer's sum of w * x, no flip): each is positive where its name says.
SOBEL_X = _constant([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])  # the image brightens to the right
SOBEL_Y = _constant([[-1, -2, -1], [0, 0, 0], [1, 2, 1]])  # the image brightens downwards
BOX_BLUR = _constant([[1, 1, 1], [1, 1, 1], [1, 1, 1]], 1 / 9)  # the mean of the 3x3 window
GAUSSIAN_BLUR = _constant([[1, 2, 1], [2, 4, 2], [1, 2, 1]], 1 / 16)  # binomial, sigma ~0.85
SHARPEN = _constant([[0, -1, 0], [-1, 5, -1], [0, -1, 0]])  # the pixel minus the Laplacian
LAPLACIAN = _constant([[0, 1, 0], [1, -4, 1], [0, 1, 0]])  # the 4 neighbours minus 4 x the pixel
HAND_SET = {
    "sobel_x": SOBEL_X,
    "sobel_y": SOBEL_Y,
    "box_blur": BOX_BLUR,
    "gaussian_blur": GAUSSIAN_BLUR,
    "sharpen": SHARPEN,
    "laplacian": LAPLACIAN,
}
PANEL = 1.1  # inches per panel of hand_set_kernels.png


def _stack(kernels_by_name: dict[str, np.ndarray]) -> np.ndarray:
    """The kernels of a name -> kernel dict as one array (K, h, w), in the dict's order."""
    return np.stack(list(kernels_by_name.values()))


def filter_image(image_HxW: np.ndarray, kernels_KxhxW: np.ndarray) -> np.ndarray:
    """The image cross-correlated with each kernel, stride 1, zero padding that keeps its size
    ((k-1)//2 before, k//2 after; borders see the zeros): (K, H, W)."""
    k_h, k_w = kernels_KxhxW.shape[1:]
    out = jax.lax.conv_general_dilated(
        jnp.asarray(image_HxW, jnp.float32)[None, :, :, None],
        jnp.asarray(np.moveaxis(kernels_KxhxW, 0, -1)[:, :, None, :], jnp.float32),
        window_strides=(1, 1),
        padding=(((k_h - 1) // 2, k_h // 2), ((k_w - 1) // 2, k_w // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return np.moveaxis(np.asarray(out[0]), -1, 0)


class Similarity(NamedTuple):
    """Learned kernels (rows) against hand-set ones (columns)."""

    names: list[str]  # the hand-set kernels, one per column
    cosine_NxM: np.ndarray  # of the mean-removed kernels, signed; NaN where one is constant
    mean_share_N: np.ndarray  # of each learned kernel's sum of squares, the part its mean holds
    best_N: np.ndarray  # column of the largest |cosine| per row; -1 when every one is NaN

    def undefined(self) -> list[str]:
        """The hand-set kernels whose column is all NaN (constant: nothing left once the mean
        is removed)."""
        return [
            n for n, col in zip(self.names, self.cosine_NxM.T, strict=True) if np.isnan(col).all()
        ]

    def match(self, row: int) -> str:
        """The row's best match as sign, name and |cosine|, e.g. "-sobel_x 0.93"; "no match"
        when it has none."""
        j = int(self.best_N[row])
        if j < 0:
            return "no match"
        c = float(self.cosine_NxM[row, j])
        return f"{'-' if c < 0 else '+'}{self.names[j]} {abs(c):.2f}"

    def markdown(self, row_names: list[str]) -> str:
        """A markdown table: a row per learned kernel, the cosines, its best match (up to sign)
        and its mean share; an undefined cosine is "n/a", said why below the table."""
        head = ["kernel", *self.names, "best match (up to sign)", "mean share"]
        lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for i, name in enumerate(row_names):
            cells = [
                "n/a" if np.isnan(c) else f"{round(c, 3) + 0.0:+.3f}" for c in self.cosine_NxM[i]
            ]
            mean = f"{self.mean_share_N[i]:.3f}"
            lines.append(f"| {name} | " + " | ".join([*cells, self.match(i), mean]) + " |")
        for name in self.undefined():
            lines.append(f"\nn/a: {name} is constant: nothing is left of it without its mean.")
        return "\n".join(lines)


def _centred_unit(kernels_NxhxW: np.ndarray) -> np.ndarray:
    """Each kernel flattened, its mean removed, scaled to norm 1; NaN where nothing is left."""
    flat = kernels_NxhxW.reshape(len(kernels_NxhxW), -1).astype(np.float64)
    centred = flat - flat.mean(1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    scale = np.abs(flat).max(1, keepdims=True)
    constant = norm <= 1e-6 * np.where(scale > 0, scale, 1)  # float32 rounding of a constant
    return np.where(constant, np.nan, centred / np.where(constant, 1, norm))


def similarity(learned_NxhxW: np.ndarray, hand_set: dict[str, np.ndarray] = HAND_SET) -> Similarity:
    """Cosine similarity of each learned kernel with each hand-set one (both mean-removed, so a
    brightness offset does not count), its best match by |cosine|, and the share of its sum of
    squares in its mean (1 for a box blur, 0 for a Sobel). ValueError when the shapes differ."""
    shapes = {name: k.shape for name, k in hand_set.items()}
    if any(s != learned_NxhxW.shape[1:] for s in shapes.values()):
        raise ValueError(
            f"learned kernels {learned_NxhxW.shape[1:]} and hand-set kernels {shapes}: "
            "the cosine needs kernels of one shape"
        )
    cosine = _centred_unit(learned_NxhxW) @ _centred_unit(_stack(hand_set)).T
    defined = ~np.isnan(cosine)
    scores = np.where(defined, np.abs(cosine), -1.0)
    best = np.where(defined.any(1), scores.argmax(1), -1)
    flat = learned_NxhxW.reshape(len(learned_NxhxW), -1).astype(np.float64)
    squares = (flat**2).sum(1)
    mean_share = flat.sum(1) ** 2 / (flat.shape[1] * np.where(squares > 0, squares, np.nan))
    return Similarity(list(hand_set), cosine, mean_share, best)


def _show_kernel(ax: Axes, kernel_hxW: np.ndarray, numbers: bool) -> None:
    """The kernel / its max |w| on a red-blue scale; its weights written in the cells."""
    peak = float(np.abs(kernel_hxW).max())
    ax.imshow(kernel_hxW / (peak or 1), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    if numbers:
        for (i, j), w in np.ndenumerate(kernel_hxW):
            colour = "white" if abs(w) > 0.6 * peak else "black"
            ax.text(j, i, f"{w:.3g}", ha="center", va="center", fontsize=6, color=colour)


def _show_map(ax: Axes, map_HxW: np.ndarray) -> None:
    """A filtered image in grey, min-max scaled; its range below it."""
    lo, hi = float(map_HxW.min()), float(map_HxW.max())
    ax.imshow(
        map_HxW, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest"
    )
    ax.set_xlabel(f"{lo:.2g} to {hi:.2g}", fontsize=6, labelpad=1)


def draw_hand_set_kernels(
    path: Path, image_HxW: np.ndarray, learned_KxhxW: np.ndarray, layer: str
) -> Similarity | None:
    """hand_set_kernels.png: rows of the hand-set kernels, the image (in [0, 1]) filtered by
    each, the learned kernels (titled with their best hand-set match when they are 3x3) and the
    image filtered by each of them the same way (no bias, no normalisation, no activation).
    Returns the similarity, None when the learned kernels are not 3x3."""
    hand = _stack(HAND_SET)
    fits = learned_KxhxW.shape[1:] == hand.shape[1:]
    sim = similarity(learned_KxhxW) if fits else None
    cols = 1 + max(len(hand), len(learned_KxhxW))
    fig = new_figure((cols * PANEL, 4 * PANEL + 0.6))
    axes = fig.subplots(4, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    rows = (
        ("hand-set", hand, list(HAND_SET), True),
        (layer, learned_KxhxW, [f"ch {k}" for k in range(len(learned_KxhxW))], False),
    )
    for r, (label, shown, names, numbers) in enumerate(rows):
        kernel_axes, map_axes = axes[2 * r], axes[2 * r + 1]
        kernel_axes[0].text(0.5, 0.5, label, ha="center", va="center", fontsize=9)
        map_axes[0].imshow(image_HxW, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        map_axes[0].set_title("input", fontsize=8)
        for k, (name, kernel, fmap) in enumerate(
            zip(names, shown, filter_image(image_HxW, shown), strict=True), start=1
        ):
            _show_kernel(kernel_axes[k], kernel, numbers)
            title = name if numbers or sim is None else f"{name}\n{sim.match(k - 1)}"
            kernel_axes[k].set_title(title, fontsize=7)
            _show_map(map_axes[k], fmap)
    how = "best |cosine| of mean-removed kernels" if sim else "not 3x3: no cosine"
    fig.suptitle(
        f"hand-set 3x3 kernels and {layer}'s learned ones ({how})\nunder each kernel: the input "
        "cross-correlated with it, stride 1, zero padding (kernels / max |w|, images min-max "
        "scaled, range below)",
        fontsize=8,
    )
    fig.savefig(path, dpi=DPI)
    return sim


def hand_set_pairs() -> Similarity:
    """The hand-set kernels against each other (how far apart the references are)."""
    return similarity(_stack(HAND_SET))
