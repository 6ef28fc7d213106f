"""Figure setup, once for every picture and plot: sizes, resolution, and grids of panels.

Figures are matplotlib's object API on the Agg canvas (no global pyplot state); a PNG is
size x DPI pixels.
"""

import math
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
FIGSIZE = (6.4, 4.8)  # inches: 640x480 pixels


def new_figure(size: tuple[float, float] = FIGSIZE) -> Figure:
    """A figure of `size` inches with a constrained layout, saved at DPI (size x DPI pixels)."""
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
