"""Integer geometry of convolution and pooling layers: sizes, padding, parameters, MACs, RFs.

Everything here is per spatial axis (call once for H and once for W) and knows nothing about
Flax: callers pass plain ints. Pooling is convolution geometry without parameters.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cnnjax.errors import CnnjaxError

Pair = tuple[int, int]
Padding = str | int | Pair
MIB = 1024**2  # bytes in a MB as torchsummary reports them


class GeometryError(CnnjaxError, ValueError):
    """A layer whose geometry does not work; the message names the layer, formula and a fix."""


def as_pair(v: int | Sequence[int] | None, default: int = 1) -> tuple[int, int]:
    """(v, v) for an int, the first two entries of a sequence, (default, default) for None."""
    if v is None:
        return (default, default)
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def pads2d(padding: int | tuple[Pair, Pair]) -> tuple[Pair, Pair]:
    """((top, bottom), (left, right)) of a 2-D window: an int pads every side alike."""
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    (top, bottom), (left, right) = padding
    return (int(top), int(bottom)), (int(left), int(right))


def effective_kernel(kernel: int, dilation: int = 1) -> int:
    """Span of a dilated kernel: dilation*(kernel-1)+1."""
    return dilation * (kernel - 1) + 1


def _check_window(kernel: int, stride: int, dilation: int, layer: str, size: int = 1) -> None:
    checks = (("input size", size), ("kernel", kernel), ("stride", stride), ("dilation", dilation))
    for what, value in checks:
        if value < 1:
            raise GeometryError(f"layer {layer!r}: {what} = {value}; it must be at least 1")


def resolve_padding(
    padding: Padding, size: int, kernel: int, stride: int, dilation: int = 1, layer: str = "layer"
) -> tuple[int, int]:
    """(low, high) padding for 'VALID', 'SAME' (XLA: odd pixel on the high side), 'CAUSAL',
    an int p (-> (p, p)) or a pair (lo, hi)."""
    eff = effective_kernel(kernel, dilation)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0)
        if mode == "SAME":
            total = max((-(-size // stride) - 1) * stride + eff - size, 0)  # out = ceil(W/S)
            return (total // 2, total - total // 2)
        if mode == "CAUSAL":
            return (eff - 1, 0)
        raise GeometryError(
            f"layer {layer!r}: padding {padding!r} has no fixed zero-padding geometry here; "
            "use 'SAME', 'VALID', 'CAUSAL', an int or a (low, high) pair"
        )
    lo, hi = (padding, padding) if isinstance(padding, int) else padding
    if lo < 0 or hi < 0:
        raise GeometryError(f"layer {layer!r}: padding ({lo}, {hi}) is negative; use pads >= 0")
    return (lo, hi)


def conv_output_size(
    size: int,
    kernel: int,
    stride: int = 1,
    pad: Padding = (0, 0),
    dilation: int = 1,
    layer: str = "layer",
) -> int:
    """Output length floor((W - F + P_lo + P_hi)/S) + 1, with F the dilated kernel span."""
    _check_window(kernel, stride, dilation, layer, size)
    lo, hi = resolve_padding(pad, size, kernel, stride, dilation, layer)
    eff = effective_kernel(kernel, dilation)
    out = (size - eff + lo + hi) // stride + 1
    if out <= 0:
        value = (size - eff + lo + hi) / stride + 1
        floored = "" if value == out else f", floored to {out}"
        span = f" (F = {dilation}*({kernel}-1)+1)" if dilation > 1 else ""
        raise GeometryError(
            f"layer {layer!r}: output size (W - F + P_lo + P_hi)/S + 1 = "
            f"({size} - {eff} + {lo} + {hi})/{stride} + 1 = {value:.4g}{floored} <= 0{span}; "
            f"this layer needs an input of at least {max(eff - lo - hi, 1)}: "
            "feed a larger input, reduce kernel/stride, or pad"
        )
    return out


def dropped_border(
    size: int, kernel: int, stride: int, pad: Padding = (0, 0), dilation: int = 1
) -> int:
    """Trailing (high-side, padded) pixels no window reaches because S does not divide evenly:
    (W + P_lo + P_hi - F) mod S. Gaps between windows when S > F are not counted."""
    conv_output_size(size, kernel, stride, pad, dilation)  # validates the geometry
    lo, hi = resolve_padding(pad, size, kernel, stride, dilation)
    return (size + lo + hi - effective_kernel(kernel, dilation)) % stride


def fits_evenly(
    size: int, kernel: int, stride: int, pad: Padding = (0, 0), dilation: int = 1
) -> bool:
    """True when the windows end exactly on the last (padded) pixel."""
    return dropped_border(size, kernel, stride, pad, dilation) == 0


def _check_groups(in_ch: int, out_ch: int, groups: int, layer: str) -> None:
    if groups < 1:
        raise GeometryError(f"layer {layer!r}: groups = {groups}; it must be at least 1")
    if in_ch % groups or out_ch % groups:
        raise GeometryError(
            f"layer {layer!r}: groups = {groups} must divide both in_ch = {in_ch} and "
            f"out_ch = {out_ch} (in_ch/groups = {in_ch / groups:g}, "
            f"out_ch/groups = {out_ch / groups:g}); pick a common divisor of the channel counts"
        )


def conv_params(
    kernel_hw: tuple[int, int],
    in_ch: int,
    out_ch: int,
    groups: int = 1,
    bias: bool = True,
    layer: str = "layer",
) -> int:
    """Weights and biases: (kh*kw*in_ch/groups + bias)*out_ch."""
    _check_groups(in_ch, out_ch, groups, layer)
    kh, kw = kernel_hw
    return (kh * kw * in_ch // groups + int(bias)) * out_ch


def dense_params(in_features: int, out_features: int, bias: bool = True) -> int:
    """Weights and biases of a dense layer: (in + bias)*out."""
    return (in_features + int(bias)) * out_features


def conv_macs(
    out_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    in_ch: int,
    out_ch: int,
    groups: int = 1,
    layer: str = "layer",
) -> int:
    """Multiply-accumulates per image: out_h*out_w*out_ch*kh*kw*in_ch/groups (bias adds not
    counted)."""
    _check_groups(in_ch, out_ch, groups, layer)
    (oh, ow), (kh, kw) = out_hw, kernel_hw
    return oh * ow * out_ch * kh * kw * in_ch // groups


def dense_macs(in_features: int, out_features: int) -> int:
    """Multiply-accumulates per example of a dense layer (bias adds not counted)."""
    return in_features * out_features


@dataclass(frozen=True)
class RF:
    """Receptive field on one axis: `size` input pixels, `jump` input pixels between adjacent
    output units, `start` the centre of the first output unit in input coordinates (pixel
    centres at 0.5, 1.5, ...). The input itself is RF(1, 1, 0.5)."""

    size: int = 1
    jump: int = 1
    start: float = 0.5

    def centre(self, index: int) -> float:
        """The centre of output unit `index`'s window: start + index * jump."""
        return self.start + index * self.jump

    def window(self, index: int) -> Pair:
        """The first and last input pixels (inclusive, 0-based; they may lie outside the input)
        of unit `index`: the pixel centres within (size - 1)/2 of its centre."""
        centre, half = self.centre(index), (self.size - 1) / 2
        return round(centre - half - 0.5), round(centre + half - 0.5)


def compose_rf(rf: RF, kernel: int, stride: int = 1, pad_low: int = 0, dilation: int = 1) -> RF:
    """The RF after one more conv/pool layer."""
    eff = effective_kernel(kernel, dilation)
    return RF(
        size=rf.size + (eff - 1) * rf.jump,
        jump=rf.jump * stride,
        start=rf.start + ((eff - 1) / 2 - pad_low) * rf.jump,
    )


def merge_rf(paths: Sequence[RF]) -> tuple[RF | None, str | None]:
    """RF where parallel paths meet (an add, a concatenation of channels, a max of shifted
    views): the hull of their windows, plus a message when they are not aligned. Paths with
    different jumps have no common window per unit: (None, message)."""
    if not paths:
        raise GeometryError("merge_rf needs at least one path")
    first = paths[0]
    aligned = all(p.jump == first.jump and math.isclose(p.start, first.start) for p in paths)
    listing = "; ".join(f"path {i}: jump {p.jump}, start {p.start:g}" for i, p in enumerate(paths))
    if any(p.jump != first.jump for p in paths):
        return None, (
            f"paths with different jumps meet here ({listing}): their units' windows grow apart, "
            "so no one receptive field describes the units; make the strides agree"
        )
    low = min(p.start - (p.size - 1) / 2 for p in paths)
    high = max(p.start + (p.size - 1) / 2 for p in paths)
    hull = RF(round(high - low) + 1, first.jump, (low + high) / 2)
    if aligned:
        return hull, None
    return hull, (
        f"branches meeting here are not aligned ({listing}): the same output unit sees "
        "different input positions in each branch; make strides and low-side padding agree"
    )


@dataclass(frozen=True)
class AxisLayer:
    """One conv/pool layer seen along one spatial axis."""

    kernel: int
    stride: int = 1
    pad: Padding = (0, 0)
    dilation: int = 1
    name: str = ""


def _name(layer: AxisLayer, index: int) -> str:
    return layer.name or f"#{index}"


def chain_output_sizes(size: int, layers: Sequence[AxisLayer]) -> list[int]:
    """Output size after each layer of the chain; GeometryError names the first that fails."""
    sizes = []
    for i, ly in enumerate(layers):
        size = conv_output_size(size, ly.kernel, ly.stride, ly.pad, ly.dilation, _name(ly, i))
        sizes.append(size)
    return sizes


def chain_rf(size: int, layers: Sequence[AxisLayer]) -> list[RF]:
    """RF after each layer of the chain, for an input of `size` (string pads depend on it)."""
    rf, rfs = RF(), []
    for i, ly in enumerate(layers):
        lo, _ = resolve_padding(ly.pad, size, ly.kernel, ly.stride, ly.dilation, _name(ly, i))
        size = conv_output_size(size, ly.kernel, ly.stride, ly.pad, ly.dilation, _name(ly, i))
        rf = compose_rf(rf, ly.kernel, ly.stride, lo, ly.dilation)
        rfs.append(rf)
    return rfs


def _min_input(ly: AxisLayer, out: int, index: int) -> int:
    """Smallest input length whose output is >= out (outputs grow with the input)."""
    _check_window(ly.kernel, ly.stride, ly.dilation, _name(ly, index))
    if isinstance(ly.pad, str) and ly.pad.upper() == "SAME":
        return (out - 1) * ly.stride + 1  # ceil(W/S) >= out
    lo, hi = resolve_padding(ly.pad, 1, ly.kernel, ly.stride, ly.dilation, _name(ly, index))
    eff = effective_kernel(ly.kernel, ly.dilation)
    return max((out - 1) * ly.stride + eff - lo - hi, 1)


def min_input_size(layers: Sequence[AxisLayer]) -> int:
    """Smallest input length for which every layer's output is >= 1 (backwards, then checked)."""
    need = 1
    for i in reversed(range(len(layers))):
        need = _min_input(layers[i], need, i)
    chain_output_sizes(need, layers)  # forward check: raises if the backward pass were wrong
    return need


def layers_to_reach_rf(target: int, kernel: int = 3, stride: int = 1) -> int:
    """Fewest stacked kernel/stride layers whose receptive field is at least `target`."""
    if kernel < 2 and target > 1:
        raise GeometryError(f"a kernel of {kernel} never grows the RF (size' = size + (k-1)*jump)")
    rf, n = RF(), 0
    while rf.size < target:
        rf, n = compose_rf(rf, kernel, stride), n + 1
    return n


def layers_to_shrink(size: int, kernel: int = 3, stride: int = 1, pad: Padding = 0) -> int:
    """How many identical layers take `size` to exactly 1."""
    n, what = 0, f"kernel {kernel}, stride {stride}, pad {pad!r}"
    while size > 1:
        lo, hi = resolve_padding(pad, size, kernel, stride)
        if size + lo + hi < kernel:
            raise GeometryError(
                f"layers of {what} never reach exactly 1: after {n} layers the size is {size} and "
                f"the next window does not fit ({size} + {lo} + {hi} < {kernel}); "
                "start from a size that lands exactly on 1"
            )
        nxt = conv_output_size(size, kernel, stride, (lo, hi))
        if nxt >= size:
            raise GeometryError(
                f"layers of {what} get stuck at size {size} after {n} layers "
                f"(output {nxt} >= input {size}); use less padding or a larger kernel/stride"
            )
        size, n = nxt, n + 1
    return n


def valid_taps(
    size: int, kernel: int, stride: int = 1, pad: Padding = (0, 0), dilation: int = 1
) -> int:
    """(output position, kernel tap) pairs that land on real pixels, not padding: the taps XLA's
    cost analysis counts. Equals out*kernel when there is no padding."""
    lo, _ = resolve_padding(pad, size, kernel, stride, dilation)
    out = conv_output_size(size, kernel, stride, pad, dilation)
    return sum(
        0 <= o * stride - lo + k * dilation < size for o in range(out) for k in range(kernel)
    )


def mb(n_elements: int, bytes_per_element: int = 4) -> float:
    """MiB as torchsummary reports them: n*bytes/1024**2."""
    return n_elements * bytes_per_element / MIB
