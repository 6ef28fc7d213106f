"""One rule per JAX primitive: how an equation moves the image's receptive field (a `Field` per
array), and the multiply-adds it does. Shapes come from the equation itself.

A primitive without a rule makes its outputs' receptive fields unknown (`NO_RULE` note);
call-like primitives (`jit`, custom derivatives, remat) are not here: the walker enters them.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from jax.extend import core

from cnnjax import geometry
from cnnjax.analysis.fields import AxisWindow, Field, collapse, contiguous, merge, shift
from cnnjax.analysis.fields import through_window as _through
from cnnjax.errors import CnnjaxError

UNARY = frozenset(
    {"neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
     "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
     "acosh", "atanh", "abs", "sqrt", "rsqrt", "cbrt", "integer_pow", "square", "erf", "erfc",
     "erf_inv", "lgamma", "digamma", "not", "convert_element_type", "copy", "copy_p",
     "reduce_precision", "real", "imag", "conj", "stop_gradient", "population_count", "clz"}
)  # fmt: skip
NARY = frozenset(
    {"add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "and", "or",
     "xor", "eq", "ne", "lt", "le", "gt", "ge", "select_n", "nextafter", "clamp", "shift_left",
     "shift_right_logical", "shift_right_arithmetic"}
)  # fmt: skip
REDUCTIONS = frozenset(
    {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax",
     "argmin"}
)  # fmt: skip
WINDOWS = {
    "reduce_window_max": "max_pool",
    "reduce_window_min": "min_pool",
    "reduce_window_sum": "sum_pool",
    "reduce_window": "pool",
}
UNKNOWN = "receptive field unknown"  # starts the note of a step that loses the receptive field
UNCOUNTED = "MACs not counted"  # starts the note of a step whose multiply-adds no rule counts
FOREIGN = frozenset({"ffi_call", "custom_call", "pure_callback", "io_callback"})


class AnalysisError(CnnjaxError, RuntimeError):
    """The formulas and the traced program disagree: a bug in cnnjax, never the user's."""


@dataclass
class Effect:
    """What one equation does: its outputs' Fields, multiply-adds over the whole batch, and for
    a conv or pool its window along each image axis."""

    out: list[Field | None]
    macs: int = 0
    label: str | None = None
    windows: dict[int, AxisWindow] | None = None  # image axis -> window
    groups: int | None = None
    features: tuple[int, int] | None = None  # (in, out) of a conv or dense layer
    notes: list[str] = field(default_factory=list)


def _avals(eqn: core.JaxprEqn) -> list:
    return [v.aval for v in eqn.invars]


def _same_shape(eqn, field_: Field | None, label: str | None) -> Effect:
    return Effect([field_] * len(eqn.outvars), label=label)


def _unary(eqn, fields, layer, same_source) -> Effect:
    return _same_shape(eqn, fields[0], eqn.primitive.name)


def _nary(eqn, fields, layer, same_source) -> Effect:
    data = [f for f in fields if f is not None]
    if len(data) == 1:
        return _same_shape(eqn, data[0], _label_one(eqn, fields))
    merged, notes = merge(data, same_source)
    return Effect([merged], label=eqn.primitive.name, notes=notes)


def _label_one(eqn, fields) -> str | None:
    """max(x, 0) is a ReLU; other ops of the image with a parameter or constant (a bias, a
    scale) are the affine part of a layer and go unnamed."""
    name = eqn.primitive.name
    if name == "max":
        others = [v for v, f in zip(eqn.invars, fields, strict=True) if f is None]
        if all(isinstance(v, core.Literal) and v.val == 0 for v in others):
            return "relu"
    return None


def _reduction(eqn, fields, layer, same_source) -> Effect:
    shape = eqn.invars[0].aval.shape
    axes = tuple(eqn.params["axes"])
    out = collapse(fields[0], axes, shape)
    spatial = any(fields[0].axes[a] is not None for a in axes)
    return Effect([out] * len(eqn.outvars), label="global_pool" if spatial else "reduce")


def _window_effect(field_: Field, shape, windows: list[AxisWindow], out_shape, layer) -> Effect:
    """A sliding window over every array axis: output sizes checked against the formula."""
    for size, w, got in zip(shape, windows, out_shape, strict=True):
        if not w.identity and (formula := w.output_size(size, layer)) != got:
            raise AnalysisError(
                f"layer {layer!r}: the formula gives output length {formula} for an input of "
                f"{size} and window {w}, the trace {got}"
            )
    out, notes = _through(field_, windows)
    axes = field_.axes
    image = {axes[axis]: w for axis, w in enumerate(windows) if axes[axis] is not None}
    sizes = {axes[axis]: shape[axis] for axis in range(len(shape))}
    notes += unfit(image, sizes)
    return Effect([out], windows=image, notes=notes)


def unfit(windows: dict[int, AxisWindow], sizes: dict[int, int]) -> list[str]:
    """A warning per stride that leaves real pixels unread, axes with the same formula joined:
    `windows` and `sizes` by image axis."""
    formulas: dict[str, list[str]] = {}
    for a, w in sorted(windows.items()):
        size = sizes[a]
        if (dropped := w.dropped(size)) <= 0:
            continue
        eff = geometry.effective_kernel(w.kernel, w.dilation)
        value = (size - eff + sum(w.pad)) / w.stride + 1
        formula = (
            f"({size} - {eff} + {w.pad[0]} + {w.pad[1]})/{w.stride} + 1 = {value:.4g}, floored "
            f"to {math.floor(value)}: the last {dropped} pixel(s) of its input"
        )
        formulas.setdefault(formula, []).append("HW"[a])
    return [
        f"stride does not fit on {' and '.join(axes)}: {formula} are never read; change the "
        "padding or the input size so that it divides evenly"
        for formula, axes in formulas.items()
    ]


def _reduce_window(eqn, fields, layer, same_source) -> Effect:
    p = eqn.params
    shape = _avals(eqn)[0].shape
    windows = [
        AxisWindow(k, s, tuple(pad), d, b)
        for k, s, pad, b, d in zip(
            p["window_dimensions"], p["window_strides"], p["padding"],
            p["base_dilation"], p["window_dilation"], strict=True,
        )
    ]  # fmt: skip
    effect = _window_effect(fields[0], shape, windows, eqn.outvars[0].aval.shape, layer)
    effect.label = WINDOWS[eqn.primitive.name]
    effect.out = effect.out * len(eqn.outvars)
    return effect


def _conv(eqn, fields, layer, same_source) -> Effect:
    p = eqn.params
    lhs, rhs = _avals(eqn)
    if fields[1] is not None:
        return _no_rule(eqn, fields, layer, same_source, "a kernel computed from the image")
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    windows = [AxisWindow() for _ in lhs.shape]
    taps = 1
    for i, axis in enumerate(lhs_spec[2:]):
        w = AxisWindow(
            rhs.shape[rhs_spec[2 + i]], p["window_strides"][i], tuple(p["padding"][i]),
            p["rhs_dilation"][i], p["lhs_dilation"][i],
        )  # fmt: skip
        windows[axis] = w
        taps *= w.taps(lhs.shape[axis])
    out_shape = eqn.outvars[0].aval.shape
    # the output's spatial axes in the lhs's order; batch and feature axes carry no image axis
    in_order = [out_shape[out_spec[lhs_spec.index(axis)]] if axis in lhs_spec[2:] else None
                for axis in range(len(lhs.shape))]  # fmt: skip
    expected = [s if s is not None else lhs.shape[a] for a, s in enumerate(in_order)]
    effect = _window_effect(fields[0], lhs.shape, windows, expected, layer)
    f = effect.out[0]
    axes = [None] * len(out_shape)
    for i, axis in enumerate(lhs_spec[2:]):
        axes[out_spec[2 + i]] = f.axes[axis]
    if fields[0].axes[lhs_spec[0]] is not None or fields[0].axes[lhs_spec[1]] is not None:
        return _no_rule(eqn, fields, layer, same_source, "an image axis as batch or features")
    effect.out = [Field(tuple(axes), f.rf)]
    effect.macs = out_shape[out_spec[0]] * out_shape[out_spec[1]] * rhs.shape[rhs_spec[1]] * taps
    effect.groups = p["feature_group_count"]
    effect.features = (lhs.shape[lhs_spec[1]], out_shape[out_spec[1]])
    effect.label = "conv_transpose" if any(d > 1 for d in p["lhs_dilation"]) else "conv"
    return effect


def extracts_patches(eqn: core.JaxprEqn) -> bool:
    """A conv with the signature of `lax.conv_general_dilated_patches` (the first step of Flax's
    `ConvLocal`): one group per input channel, one input channel per group and one output channel
    per input channel and tap. With a kernel computed from no parameter it copies each window's
    values into the channels (im2col), and a copy takes no multiply-add."""
    if eqn.primitive.name != "conv_general_dilated":
        return False
    lhs, rhs = _avals(eqn)
    dn = eqn.params["dimension_numbers"]
    c_in = lhs.shape[dn.lhs_spec[1]]
    taps = math.prod(rhs.shape[a] for a in dn.rhs_spec[2:])
    return (
        eqn.params["feature_group_count"] == c_in
        and eqn.params["batch_group_count"] == 1
        and rhs.shape[dn.rhs_spec[1]] == 1
        and rhs.shape[dn.rhs_spec[0]] == c_in * taps
    )


def as_patches(effect: Effect) -> Effect:
    """A conv that only extracts patches: its window and receptive field, no MACs, no groups."""
    note = (
        "counted as patch extraction (no MACs): a conv of a kernel computed from no parameter "
        "with lax.conv_general_dilated_patches' shape; a fixed filter bank of that shape would "
        "have its MACs left out"
    )
    return replace(effect, macs=0, groups=None, label="patches", notes=[*effect.notes, note])


def _dot_general(eqn, fields, layer, same_source) -> Effect:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = _avals(eqn)
    out_shape = eqn.outvars[0].aval.shape
    contracted = math.prod(lhs.shape[a] for a in lc)
    parts = []
    sides = ((fields[0], lhs.shape, lc, lb), (fields[1], rhs.shape, rc, rb))
    for f, shape, contract, batch in sides:
        if f is None:
            parts.append(None)
            continue
        f = collapse_keep(f, contract, shape)
        free = [a for a in range(len(shape)) if a not in contract and a not in batch]
        parts.append((f, [f.axes[a] for a in batch], [f.axes[a] for a in free]))
    axes_out: list[Field] = []
    n_batch, n_lfree = len(lb), len(lhs.shape) - len(lc) - len(lb)
    for side, part in enumerate(parts):
        if part is None:
            continue
        f, batch_axes, free_axes = part
        axes = [None] * len(out_shape)
        axes[:n_batch] = batch_axes
        start = n_batch if side == 0 else n_batch + n_lfree
        axes[start : start + len(free_axes)] = free_axes
        axes_out.append(Field(tuple(axes), f.rf))
    label = "dense" if len(axes_out) == 1 else "matmul"
    out, notes = merge(axes_out) if len(axes_out) > 1 else (axes_out[0], [])
    features = None
    if fields[1] is None and len(rhs.shape) == 2 and len(rc) == 1 and not rb:
        features = (contracted, rhs.shape[1 - rc[0]])  # x @ W with a parameter W
    macs = math.prod(out_shape) * contracted
    return Effect([out], macs=macs, label=label, notes=notes, features=features)


def collapse_keep(f: Field, axes: Sequence[int], shape: Sequence[int]) -> Field:
    """`collapse` that keeps the contracted axes in place (as non-image axes), so that the
    remaining axes keep their positions."""
    pooled = collapse(f, axes, shape)
    return Field(tuple(None if i in set(axes) else a for i, a in enumerate(f.axes)), pooled.rf)


def _reshape(eqn, fields, layer, same_source) -> Effect:
    f, shape = fields[0], _avals(eqn)[0].shape
    new = eqn.outvars[0].aval.shape
    prefix_new = [math.prod(new[:j]) for j in range(len(new) + 1)]
    axes, pooled = [None] * len(new), []
    for i, a in enumerate(f.axes):
        if a is None:
            continue
        before, n = math.prod(shape[:i]), shape[i]
        kept = [j for j in range(len(new)) if prefix_new[j] == before and new[j] == n]
        if kept:
            axes[kept[0]] = a
        elif n == 1 or any(
            prefix_new[j] <= before and prefix_new[j + 1] >= before * n and new[j] > n
            for j in range(len(new))
        ):
            pooled.append(i)  # merged into a larger axis (a flatten): the whole map
        else:
            return _no_rule(eqn, fields, layer, same_source, "an image axis split in parts")
    out = collapse(f, pooled, shape)
    label = "flatten" if pooled and n_image(f) > 0 else None
    return Effect([Field(tuple(axes), out.rf)], label=label)


def n_image(f: Field) -> int:
    return sum(a is not None for a in f.axes)


def _transpose(eqn, fields, layer, same_source) -> Effect:
    f = fields[0]
    axes = tuple(f.axes[p] for p in eqn.params["permutation"])
    return Effect([Field(axes, f.rf)], label="transpose" if n_image(f) else None)


def _broadcast(eqn, fields, layer, same_source) -> Effect:
    f, shape = fields[0], _avals(eqn)[0].shape
    new = eqn.outvars[0].aval.shape
    dims = eqn.params["broadcast_dimensions"]
    stretched = [i for i, d in enumerate(dims) if f.axes[i] is not None and new[d] != shape[i]]
    f = collapse_keep(f, stretched, shape)
    axes = [None] * len(new)
    for i, d in enumerate(dims):
        axes[d] = f.axes[i]
    return Effect([Field(tuple(axes), f.rf)])


def _squeeze(eqn, fields, layer, same_source) -> Effect:
    f, shape = fields[0], _avals(eqn)[0].shape
    return Effect([collapse(f, tuple(eqn.params["dimensions"]), shape)])


def _expand_dims(eqn, fields, layer, same_source) -> Effect:
    f = fields[0]
    axes = list(f.axes)
    for d in sorted(eqn.params["dimensions"]):
        axes.insert(d, None)
    return Effect([Field(tuple(axes), f.rf)])


def _slice(eqn, fields, layer, same_source) -> Effect:
    f, p = fields[0], eqn.params
    strides = p["strides"] or (1,) * len(f.axes)
    for axis, (start, stride) in enumerate(zip(p["start_indices"], strides, strict=True)):
        f = shift(f, axis, start, stride)
    return Effect([f], label="slice" if f != fields[0] else None)


def _dynamic_slice(eqn, fields, layer, same_source) -> Effect:
    f, shape = fields[0], _avals(eqn)[0].shape
    if any(g is not None for g in fields[1:]):
        return _no_rule(eqn, fields, layer, same_source, "a slice start computed from the image")
    sizes = eqn.params["slice_sizes"]
    for axis, (index, size) in enumerate(zip(eqn.invars[1:], sizes, strict=True)):
        if f.axes[axis] is None or size == shape[axis]:
            continue
        if not isinstance(index, core.Literal):
            return _no_rule(eqn, fields, layer, same_source, "a slice start known only at run time")
        start = min(max(int(index.val), 0), shape[axis] - size)  # clamped, as lax does
        f = shift(f, axis, start)
    return Effect([f], label="slice" if f != fields[0] else None)


def _pad(eqn, fields, layer, same_source) -> Effect:
    f = fields[0]
    for axis, (lo, _, interior) in enumerate(eqn.params["padding_config"]):
        if f.axes[axis] is not None and interior:
            return _no_rule(eqn, fields, layer, same_source, "interior padding of an image axis")
        f = shift(f, axis, -lo)
    return Effect([f], label="pad" if f != fields[0] else None)


def _concatenate(eqn, fields, layer, same_source) -> Effect:
    axis = eqn.params["dimension"]
    data = [f for f in fields if f is not None]
    if any(f.axes[axis] is not None for f in data):
        sizes = [a.shape[axis] for a in _avals(eqn)]
        joined = contiguous(data, axis, sizes) if len(data) == len(fields) else None
        if joined is None:
            return _no_rule(eqn, fields, layer, same_source, "parts that do not continue a grid")
        return Effect([joined], label="concat")
    out, notes = merge(data) if len(data) > 1 else (data[0], [])
    return Effect([out], label="concat", notes=notes)


def _rev(eqn, fields, layer, same_source) -> Effect:
    if any(fields[0].axes[d] is not None for d in eqn.params["dimensions"]):
        return _no_rule(eqn, fields, layer, same_source, "an image axis reversed")
    return Effect([fields[0]])


def _each(eqn, fields, layer, same_source) -> Effect:
    """Outputs equal to inputs, one for one (an optimization barrier)."""
    return Effect(list(fields))


def _no_rule(eqn, fields, layer, same_source, why: str = "") -> Effect:
    """Receptive field unknown from here: the outputs keep no image axes and no numbers."""
    outs = [Field((None,) * len(v.aval.shape), (None, None)) for v in eqn.outvars]
    reason = f" ({why})" if why else ""
    note = f"cnnjax.analysis has no receptive-field rule for it{reason}"
    return Effect(outs, label=eqn.primitive.name, notes=[note])


Rule = Callable[..., Effect]
RULES: dict[str, Rule] = {
    "conv_general_dilated": _conv,
    "dot_general": _dot_general,
    "reshape": _reshape,
    "transpose": _transpose,
    "broadcast_in_dim": _broadcast,
    "squeeze": _squeeze,
    "expand_dims": _expand_dims,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "pad": _pad,
    "concatenate": _concatenate,
    "rev": _rev,
    "optimization_barrier": _each,
    **dict.fromkeys(WINDOWS, _reduce_window),
    **dict.fromkeys(UNARY, _unary),
    **dict.fromkeys(NARY, _nary),
    **dict.fromkeys(REDUCTIONS, _reduction),
}


def apply(eqn: core.JaxprEqn, fields: Sequence[Field | None], layer: str, same: bool) -> Effect:
    """The rule of `eqn`'s primitive on its inputs' Fields (None: not from the image)."""
    if all(f is None for f in fields):
        return Effect([None] * len(eqn.outvars))
    rule = RULES.get(eqn.primitive.name, _no_rule)
    effect = rule(eqn, list(fields), layer, same)
    out = effect.out[0]
    if any(f is not None and f.known for f in fields) and out is not None and not out.known:
        why = "; ".join(effect.notes) or "no rule keeps it"
        effect.notes = [
            f"{UNKNOWN} from `{eqn.primitive.name}` in {layer!r} on: {why}; the table shows "
            "none for the layers after it"
        ]
    if rule is _no_rule and (eqn.primitive.name in FOREIGN or _has_body(eqn)):
        effect.notes.append(
            f"{UNCOUNTED} inside `{eqn.primitive.name}` in {layer!r} (a loop, a branch or a "
            "call cnnjax.analysis does not enter): the MACs of this layer and the totals are a "
            "lower bound"
        )
    return effect


def _has_body(eqn: core.JaxprEqn) -> bool:
    """True when `eqn` runs a program of its own (a scan, while or cond body)."""
    bodies = (core.Jaxpr, core.ClosedJaxpr)
    return any(
        isinstance(v, bodies)
        or (isinstance(v, tuple | list) and any(isinstance(b, bodies) for b in v))
        for v in eqn.params.values()
    )
