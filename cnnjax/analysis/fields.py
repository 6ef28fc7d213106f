"""What one traced array knows about the input image: which of its axes run along the image's
H and W, and the receptive field of its units along each.

An array that does not depend on the image (a parameter, a constant) has no Field (None).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cnnjax import geometry
from cnnjax.geometry import RF

IMAGE_AXES = ("H", "W")


@dataclass(frozen=True)
class Field:
    """`axes[i]`: the image axis (0: H, 1: W) that array axis i runs along, or None (batch,
    channels, features). `rf[a]`: the receptive field along image axis a of every unit, None when
    unknown. An image axis no array axis runs along has been pooled or flattened away: its `rf`
    is then the window of the whole map, which every unit sees."""

    axes: tuple[int | None, ...]
    rf: tuple[RF | None, RF | None]

    @classmethod
    def image(cls, ndim: int, spatial: Sequence[int]) -> "Field":
        """The model's input: `spatial` are its H and W axes."""
        axes = tuple(spatial.index(i) if i in spatial else None for i in range(ndim))
        return cls(axes, (RF(), RF()))

    def axis_of(self, image_axis: int) -> int | None:
        """The array axis running along `image_axis`, None when it has been pooled away."""
        return self.axes.index(image_axis) if image_axis in self.axes else None

    @property
    def known(self) -> bool:
        return all(r is not None for r in self.rf)

    def with_rf(self, image_axis: int, rf: RF | None) -> "Field":
        rfs = list(self.rf)
        rfs[image_axis] = rf
        return replace(self, rf=(rfs[0], rfs[1]))

    def unknown(self) -> "Field":
        return replace(self, rf=(None, None))


@dataclass(frozen=True)
class AxisWindow:
    """A sliding window along one array axis; pads may be negative (a crop)."""

    kernel: int = 1
    stride: int = 1
    pad: tuple[int, int] = (0, 0)
    dilation: int = 1  # between kernel taps (rhs / window dilation)
    base_dilation: int = 1  # between input pixels (lhs / base dilation: a transposed conv)

    @property
    def identity(self) -> bool:
        return self == AxisWindow()

    def output_size(self, size: int, layer: str) -> int:
        """floor((W' - F + P_lo + P_hi)/S) + 1 with W' = (W-1)*base_dilation + 1; raises
        GeometryError, with the formula, when it is not positive."""
        if self.base_dilation == 1 and min(self.pad) >= 0:
            return geometry.conv_output_size(
                size, self.kernel, self.stride, self.pad, self.dilation, layer
            )
        span = (size - 1) * self.base_dilation + 1
        eff = geometry.effective_kernel(self.kernel, self.dilation)
        out = (span - eff + sum(self.pad)) // self.stride + 1
        if out <= 0:
            raise geometry.GeometryError(
                f"layer {layer!r}: output size (W' - F + P_lo + P_hi)/S + 1 = ({span} - {eff} + "
                f"{self.pad[0]} + {self.pad[1]})/{self.stride} + 1 <= 0 (W' = ({size}-1)*"
                f"{self.base_dilation}+1); feed a larger input, reduce kernel/stride, or pad"
            )
        return out

    def taps(self, size: int) -> int:
        """(output position, kernel tap) pairs that read the input or its explicit padding: all
        out*kernel of them without base dilation (the notes' formula), and only those on real
        pixels with it (the zeros a transposed convolution inserts are not read)."""
        out = self.output_size(size, "layer")
        if self.base_dilation == 1:
            return out * self.kernel
        d, span = self.base_dilation, (size - 1) * self.base_dilation + 1
        positions = (
            o * self.stride - self.pad[0] + k * self.dilation
            for o in range(out)
            for k in range(self.kernel)
        )
        return sum(0 <= p < span and p % d == 0 for p in positions)

    def dropped(self, size: int) -> int:
        """Real trailing pixels no window reaches because the stride does not fit."""
        if self.base_dilation != 1 or min(self.pad) < 0:
            return 0
        border = geometry.dropped_border(size, self.kernel, self.stride, self.pad, self.dilation)
        return border - self.pad[1]


def through_window(field: Field, windows: Sequence[AxisWindow]) -> tuple[Field, list[str]]:
    """The Field after a conv or pool with `windows[i]` along array axis i (same rank), and
    warnings. A window over a pooled-away axis cannot occur (that axis is gone)."""
    out, notes = field, []
    for axis, w in enumerate(windows):
        a = field.axes[axis]
        if a is None or w.identity or field.rf[a] is None:
            continue
        if w.base_dilation != 1:
            notes.append(
                f"base (input) dilation {w.base_dilation} along {IMAGE_AXES[a]} (a transposed "
                "convolution or an upsampling) gives neighbouring output units windows of "
                "different sizes, so no one receptive field describes them"
            )
            out = out.with_rf(a, None)
            continue
        rf = geometry.compose_rf(field.rf[a], w.kernel, w.stride, w.pad[0], w.dilation)
        out = out.with_rf(a, rf)
    return out, notes


def shift(field: Field, axis: int, offset: int, stride: int = 1) -> Field:
    """Unit i of the output is unit offset + i*stride of the input along array `axis` (a slice,
    a pad with offset = -low pad)."""
    a = field.axes[axis]
    if a is None or field.rf[a] is None:
        return field
    rf = field.rf[a]
    return field.with_rf(a, RF(rf.size, rf.jump * int(stride), rf.start + int(offset) * rf.jump))


def collapse(field: Field, axes: Sequence[int], shape: Sequence[int]) -> Field:
    """Array axes `axes` (of sizes `shape[axis]`) pooled away: each unit now sees the window of
    the whole map along them. The axes are removed from the Field."""
    for axis in axes:
        a = field.axes[axis]
        if a is not None and field.rf[a] is not None:
            field = field.with_rf(a, geometry.compose_rf(field.rf[a], shape[axis]))
    keep = tuple(x for i, x in enumerate(field.axes) if i not in set(axes))
    return replace(field, axes=keep)


def merge(fields: Sequence[Field], same_source: bool = False) -> tuple[Field, list[str]]:
    """Where arrays of one shape meet element by element (an add, a max, a concatenation of
    channels): the hull of their windows per image axis. Paths that are not aligned are
    reported, except when they are shifted views of one array (`same_source`: a pooling written
    as a max of slices), where the shift is the point."""
    first, notes = fields[0], []
    if any(f.axes != first.axes for f in fields):
        listing = "; ".join(f"path {i}: {_layout(f)}" for i, f in enumerate(fields))
        notes.append(
            f"paths whose image axes differ meet here ({listing}): a unit mixes a pooled path "
            "with a spatial one, or mismatched axes; no one receptive field describes it"
        )
        return first.unknown(), notes
    rfs: list[RF | None] = []
    for a in range(2):
        paths = [f.rf[a] for f in fields]
        if any(p is None for p in paths):
            rfs.append(None)
            continue
        if len(set(paths)) == 1:
            rfs.append(paths[0])
            continue
        merged, note = geometry.merge_rf(paths)
        rfs.append(merged)
        if note and not (same_source and merged is not None):
            notes.append(f"along {IMAGE_AXES[a]}: {note}")
    return replace(first, rf=(rfs[0], rfs[1])), notes


def _layout(field: Field) -> str:
    names = ["." if a is None else IMAGE_AXES[a] for a in field.axes]
    return "".join(names) or "scalar"


def contiguous(fields: Sequence[Field], axis: int, sizes: Sequence[int]) -> Field | None:
    """Arrays joined along image-running array `axis` (a spatial concatenation): one Field when
    each part continues the previous one's grid, else None."""
    first = fields[0]
    a = first.axes[axis]
    rfs = [f.rf[a] for f in fields]
    if any(r is None for r in rfs) or any(f.axes != first.axes for f in fields):
        return None
    for (prev, size), nxt in zip(zip(rfs, sizes, strict=False), rfs[1:], strict=False):
        if (nxt.size, nxt.jump) != (prev.size, prev.jump) or not math.isclose(
            nxt.start, prev.start + size * prev.jump
        ):
            return None
    merged, _ = merge([f.with_rf(a, rfs[0]) for f in fields])
    return merged
