"""The layer table of any Flax Linen model: shapes, parameters, MACs, memory, receptive fields.

`analyze(model, input_shape)` runs `model.init` under `jax.eval_shape` (nothing is allocated or
compiled) with `nn.intercept_methods`, and records one row per leaf module call (a module that
calls no other module), in call order. Each row is recomputed from `cnnjax.geometry` and checked
against the trace: output shapes against eval_shape's, parameter counts against the module's own
variables, the parameter total against the whole initialised pytree. Invalid geometry raises a
`GeometryError` naming the layer before the layer runs.

Conventions:
- MACs: one multiply-add = 1, per image; bias adds are not counted, nor are pooling, activation,
  normalisation or residual adds (they are not multiply-adds). Padded taps count, as in the
  notes' formula out_h*out_w*out_c*k_h*k_w*in_c/groups; XLA's cost analysis counts only the taps
  that land on real pixels (see `geometry.valid_taps`).
- Memory, as torchsummary: activations = 2 x (forward + backward) the outputs of every row except
  element-wise activations, dropout and flatten (in-place or views), x batch size; parameters and
  the input at their dtype sizes; MB = 1024**2 bytes.
- Receptive field per axis: `rf` input pixels, `jump` input pixels between adjacent output units,
  `start` the centre of the first output unit (pixel centres at 0.5, 1.5, ...). Flatten and global
  pools take the whole map (a window as large as the map); element-wise layers keep it; a layer
  joining several paths (Add) takes the widest and warns when the paths are not aligned.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import geometry, layers
from cnnjax.geometry import MIB, RF, GeometryError, Pair

IN_PLACE = ("ReLU", "Dropout", "Flatten")  # outputs not counted as activation memory


class AnalysisError(RuntimeError):
    """The formulas and the traced model disagree: a bug in cnnjax, never the user's."""


@dataclass(frozen=True)
class Row:
    """One layer call. Shapes include the batch dimension; params and MACs are per image."""

    name: str
    type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int  # trainable (the `params` collection)
    state: int  # non-trainable variables (e.g. BatchNorm statistics)
    macs: int
    rf: Pair
    jump: Pair
    start: tuple[float, float]
    kernel: Pair | None = None
    stride: Pair | None = None
    padding: tuple[Pair, Pair] | None = None  # resolved (low, high) per axis
    dilation: Pair | None = None
    groups: int | None = None
    activation_elements: int = 0  # per image, counted in the activation memory
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    @property
    def spatial(self) -> bool:
        """An NHWC output of its own (in-place layers such as ReLU and dropout are not)."""
        return len(self.output_shape) == 4 and self.type not in IN_PLACE

    def axis_rf(self, axis: int) -> RF:
        """The receptive field along `axis` (0: H, 1: W)."""
        return RF(self.rf[axis], self.jump[axis], self.start[axis])


@dataclass(frozen=True)
class Totals:
    params: int  # all variables, trainable or not
    trainable_params: int
    macs: int
    param_mb: float
    input_mb: float
    activation_mb: float  # forward + backward, for `batch_size`
    total_mb: float
    batch_size: int


@dataclass(frozen=True)
class Analysis:
    input_shape: tuple[int, ...]
    rows: tuple[Row, ...]
    totals: Totals
    warnings: tuple[str, ...] = ()  # about the whole model

    @property
    def spatial_rows(self) -> list[Row]:
        """The rows with an NHWC output of their own, in call order."""
        return [r for r in self.rows if r.spatial]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "layers": [row.to_dict() for row in self.rows],
            "totals": dataclasses.asdict(self.totals),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Window:
    """A conv or pool seen per spatial axis; `pads` already resolved."""

    kernel: Pair
    stride: Pair
    pads: tuple[Pair, Pair]
    dilation: Pair = (1, 1)
    groups: int = 1


def _conv_window(m: nn.Conv, in_hw: Pair, name: str) -> Window:
    kernel, stride = geometry.as_pair(m.kernel_size), geometry.as_pair(m.strides)
    dilation = geometry.as_pair(m.kernel_dilation)
    pad = m.padding
    if isinstance(pad, str | int):
        per_axis = [pad, pad]
    else:
        per_axis = [p if isinstance(p, int) else tuple(p) for p in pad]
    pads = tuple(
        geometry.resolve_padding(per_axis[a], in_hw[a], kernel[a], stride[a], dilation[a], name)
        for a in range(2)
    )
    return Window(kernel, stride, pads, dilation, m.feature_group_count)


def _pool_window(m: layers.MaxPool | layers.AvgPool) -> Window:
    stride = m.stride or m.window
    return Window((m.window,) * 2, (stride,) * 2, ((m.padding,) * 2,) * 2)


def window_of(module: nn.Module, in_hw: Pair, name: str) -> Window | None:
    """The sliding window of a 2-D conv or pool, None for other layers."""
    if isinstance(module, nn.Conv) and not isinstance(module, nn.ConvTranspose):
        if geometry.as_pair(module.input_dilation) != (1, 1):
            return None
        return _conv_window(module, in_hw, name)
    if isinstance(module, layers.MaxPool | layers.AvgPool):
        return _pool_window(module)
    return None


def _size(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _count(tree: Any) -> int:
    """The number of values in the arrays of `tree` (parameters, say)."""
    return sum(_size(x.shape) for x in jax.tree.leaves(tree))


def _bytes(tree: Any) -> int:
    return sum(_size(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclass
class _Tensor:
    """What the trace knows about one array: its receptive field per axis."""

    array: Any  # kept alive so that its id() stays unique during the trace
    rf: tuple[RF, RF]


def layer_name(module: nn.Module) -> str:
    """A module's path in the model ("layer1_0/conv1"); the root's class name."""
    return "/".join(module.scope.path) or type(module).__name__


@dataclass
class LeafCalls:
    """An `nn.intercept_methods` interceptor: `before(module, name, arrays)` ahead of every
    module call and `after(module, name, arrays, output)` after each leaf call (a module that
    calls no other module), with the call's array arguments."""

    before: Callable | None = None
    after: Callable | None = None
    children: list[int] = field(default_factory=list)  # calls made by each open call

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module, name = context.module, layer_name(context.module)
        if self.children:
            self.children[-1] += 1
        self.children.append(0)
        arrays = [a for a in args if hasattr(a, "shape")]
        if self.before:
            self.before(module, name, arrays)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            leaf = self.children.pop() == 0
        if leaf and self.after:
            self.after(module, name, arrays, out)
        return out


@dataclass
class _Tracer:
    """Collects rows while the model is traced (its `calls` go to nn.intercept_methods)."""

    rows: list[Row] = field(default_factory=list)
    tensors: dict[int, _Tensor] = field(default_factory=dict)
    last_rf: tuple[RF, RF] = (RF(), RF())

    @property
    def calls(self) -> LeafCalls:
        return LeafCalls(before=self._check, after=self._record_call)

    def _check(self, module: nn.Module, name: str, arrays: list) -> None:
        """Raise GeometryError before XLA sees a conv or pool whose output would be empty."""
        if arrays and len(arrays[0].shape) == 4:
            window = window_of(module, tuple(arrays[0].shape[1:3]), name)
            if window is not None:
                _check_geometry(arrays[0].shape, window, name)

    def _record_call(self, module: nn.Module, name: str, arrays: list, out: Any) -> None:
        if not arrays or not hasattr(out, "shape"):
            return
        window = None
        if len(arrays[0].shape) == 4:
            window = window_of(module, tuple(arrays[0].shape[1:3]), name)
        self._record(module, name, arrays, out, window)

    def rf_of(self, x: Any) -> tuple[RF, RF]:
        known = self.tensors.get(id(x))
        return known.rf if known is not None else self.last_rf

    def _record(self, module, name: str, arrays: list, out, window: Window | None) -> None:
        x = arrays[0]
        kind = type(module).__name__
        warnings: list[str] = []
        rf_in = [self.rf_of(a) for a in arrays]
        if len(arrays) > 1:
            merged = [geometry.merge_rf([r[a] for r in rf_in]) for a in range(2)]
            rf = (merged[0][0], merged[1][0])
            warnings += sorted({m for _, m in merged if m})
        else:
            rf = rf_in[0]
        expected = tuple(out.shape)
        macs = 0
        if window is not None:
            rf, expected = _through_window(rf, x.shape, window, out.shape[-1], name, warnings)
            if isinstance(module, nn.Conv):
                macs = geometry.conv_macs(
                    expected[1:3], window.kernel, x.shape[-1], out.shape[-1], window.groups, name
                )
        elif kind in ("Flatten", "GlobalAvgPool") and len(x.shape) == 4:
            rf = tuple(geometry.compose_rf(rf[a], x.shape[1 + a]) for a in range(2))
            expected = (x.shape[0], _size(x.shape[1:]) if kind == "Flatten" else x.shape[-1])
        elif isinstance(module, nn.Dense):
            macs = _size(x.shape[1:-1]) * geometry.dense_macs(x.shape[-1], module.features)
            expected = (*x.shape[:-1], module.features)
        elif len(arrays) > 1 or tuple(out.shape) == tuple(x.shape):
            expected = tuple(x.shape)  # element-wise: activations, normalisation, dropout, add
        else:
            warnings.append(
                f"{kind} changes the shape {tuple(x.shape)} -> {tuple(out.shape)} in a way "
                "cnnjax.analysis does not model; its receptive field is carried over unchanged"
            )
        if expected != tuple(out.shape):
            raise AnalysisError(
                f"layer {name!r} ({kind}): the formulas give output shape {expected}, "
                f"jax.eval_shape gives {tuple(out.shape)}"
            )
        variables = module.variables
        params = _count(variables.get("params", {}))
        state = _count({k: v for k, v in variables.items() if k != "params"})
        _check_row_params(module, name, x.shape, params)
        self.last_rf = rf
        self.tensors[id(out)] = _Tensor(out, rf)
        self.rows.append(
            Row(
                name=name,
                type=kind,
                input_shape=tuple(x.shape),
                output_shape=tuple(out.shape),
                params=params,
                state=state,
                macs=macs,
                rf=(rf[0].size, rf[1].size),
                jump=(rf[0].jump, rf[1].jump),
                start=(rf[0].start, rf[1].start),
                kernel=window and window.kernel,
                stride=window and window.stride,
                padding=window and window.pads,
                dilation=window and window.dilation,
                groups=window.groups if window and isinstance(module, nn.Conv) else None,
                activation_elements=0 if kind in IN_PLACE else _size(out.shape[1:]),
                warnings=tuple(warnings),
            )
        )


def _check_geometry(shape: Sequence[int], w: Window, name: str) -> None:
    """Raise GeometryError, naming the layer and the formula, when an output size would be <= 0."""
    try:
        for a in range(2):
            geometry.conv_output_size(
                shape[1 + a], w.kernel[a], w.stride[a], w.pads[a], w.dilation[a], name
            )
    except GeometryError as e:
        raise GeometryError(f"{e}. Its input map is {shape[1]}x{shape[2]}x{shape[3]}") from None


def _through_window(
    rf: tuple[RF, RF], shape: Sequence[int], w: Window, out_ch: int, name: str, warnings: list
) -> tuple[tuple[RF, RF], tuple[int, ...]]:
    """The receptive field and output shape after a conv/pool; warns on a stride that does not
    fit."""
    sizes, rfs, unfit = [], [], {}
    for a, axis in enumerate("HW"):
        size, k, s, pad, d = shape[1 + a], w.kernel[a], w.stride[a], w.pads[a], w.dilation[a]
        sizes.append(geometry.conv_output_size(size, k, s, pad, d, name))
        rfs.append(geometry.compose_rf(rf[a], k, s, pad[0], d))
        dropped = geometry.dropped_border(size, k, s, pad, d) - pad[1]  # real pixels only
        if dropped > 0:
            eff = geometry.effective_kernel(k, d)
            value = (size - eff + pad[0] + pad[1]) / s + 1
            formula = (
                f"({size} - {eff} + {pad[0]} + {pad[1]})/{s} + 1 = {value:.4g}, floored to "
                f"{sizes[-1]}: the last {dropped} pixel(s) of its input"
            )
            unfit.setdefault(formula, []).append(axis)
    for formula, axes in unfit.items():
        warnings.append(
            f"stride does not fit on {' and '.join(axes)}: {formula} are never read; change the "
            "padding or the input size so that it divides evenly"
        )
    return (rfs[0], rfs[1]), (shape[0], sizes[0], sizes[1], out_ch)


def _check_row_params(module: nn.Module, name: str, in_shape: Sequence[int], params: int) -> None:
    """The formula parameter count of a conv or dense layer against its real variables."""
    if isinstance(module, nn.Conv) and len(in_shape) == 4:
        kernel = geometry.as_pair(module.kernel_size)
        expected = geometry.conv_params(
            kernel, in_shape[-1], module.features, module.feature_group_count, module.use_bias, name
        )
    elif isinstance(module, nn.Dense):
        expected = geometry.dense_params(in_shape[-1], module.features, module.use_bias)
    else:
        return
    if expected != params:
        raise AnalysisError(
            f"layer {name!r}: the formula gives {expected:,} parameters, "
            f"the initialised module has {params:,}"
        )


def trace(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[Row], Any]:
    """Rows in call order and the abstract variables, from one `init` under jax.eval_shape."""
    tracer = _Tracer()
    x_spec = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)

    def init(x):
        tracer.tensors[id(x)] = _Tensor(x, (RF(), RF()))
        with nn.intercept_methods(tracer.calls):
            return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)

    variables = jax.eval_shape(init, x_spec)
    return tracer.rows, variables


def smallest_input(model: nn.Module, input_shape: Sequence[int], limit: int = 4096) -> int | None:
    """Smallest square input side the model accepts (sizes grow monotonically through convs and
    pools), by bisection over traces; None when nothing up to `limit` works."""

    def works(side: int) -> bool:
        try:
            trace(model, (1, side, side, input_shape[-1]))
        except Exception:  # any failure means this size does not work
            return False
        return True

    hi = max(input_shape[1], input_shape[2], 2)
    while not works(hi):
        if hi >= limit:
            return None
        hi = min(hi * 2, limit)
    lo = 0  # invariant: lo fails (or is 0), hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    return hi


def analyze(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> Analysis:
    """The checked layer table of `model` on inputs of `input_shape` (NHWC, batch included)."""
    input_shape = tuple(input_shape)
    try:
        rows, variables = trace(model, input_shape)
    except GeometryError as e:
        side = smallest_input(model, input_shape)
        hint = (
            f"the smallest square input this model accepts is {side}x{side} (the data path "
            "resizes to the model's input_size)"
            if side
            else "no square input up to 4096x4096 works"
        )
        h, w = input_shape[1:3]
        raise GeometryError(f"{e}, from the {h}x{w} model input; {hint}.") from None
    totals = _totals(rows, variables, input_shape, batch_size)  # params from the whole pytree
    row_trainable = sum(r.params for r in rows)
    row_all = row_trainable + sum(r.state for r in rows)
    if (row_trainable, row_all) != (totals.trainable_params, totals.params):
        raise AnalysisError(
            f"the rows hold {row_trainable:,} trainable / {row_all:,} total parameters, the "
            f"initialised pytree {totals.trainable_params:,} / {totals.params:,}: some module "
            "owns variables and also calls submodules, which the layer table cannot attribute"
        )
    return Analysis(input_shape, tuple(rows), totals, tuple(_model_warnings(model, rows)))


def _totals(rows: list[Row], variables: Any, input_shape: tuple, batch_size: int) -> Totals:
    param_bytes = _bytes(variables)
    input_bytes = _size(input_shape[1:]) * 4 * batch_size
    act_bytes = 2 * sum(r.activation_elements for r in rows) * 4 * batch_size
    return Totals(
        params=_count(variables),
        trainable_params=_count(variables.get("params", {})),
        macs=sum(r.macs for r in rows),
        param_mb=param_bytes / MIB,
        input_mb=input_bytes / MIB,
        activation_mb=act_bytes / MIB,
        total_mb=(param_bytes + input_bytes + act_bytes) / MIB,
        batch_size=batch_size,
    )


def _model_warnings(model: nn.Module, rows: list[Row]) -> list[str]:
    """Whole-model teaching warnings: a last spatial layer that cannot see the whole input, and a
    flatten whose size differs from the one at the model's declared input size."""
    out: list[str] = []
    spatial = [r for r in rows if r.spatial]
    if spatial:
        last, in_hw = spatial[-1], rows[0].input_shape[1:3]
        if any(last.rf[a] < in_hw[a] for a in range(2)):
            out.append(
                f"the last spatial layer {last.name!r} has a {last.rf[0]}x{last.rf[1]} receptive "
                f"field on a {in_hw[0]}x{in_hw[1]} input: no unit before the classifier sees the "
                "whole image; add layers or pooling until the receptive field covers the input"
            )
    declared = getattr(model, "input_size", None)
    flats = [r for r in rows if r.type == "Flatten"]
    in_shape = rows[0].input_shape if rows else ()
    if declared and flats and tuple(in_shape[1:3]) != (declared, declared):
        ref_rows, _ = trace(model, (1, declared, declared, in_shape[-1]))
        ref = {r.name: r for r in ref_rows if r.type == "Flatten"}
        for r in flats:
            if r.name in ref and ref[r.name].output_shape[1:] != r.output_shape[1:]:
                out.append(
                    f"{r.name!r} flattens {r.input_shape[1:]} into {r.output_shape[1]:,} features "
                    f"at this {in_shape[1]}x{in_shape[2]} input, but into "
                    f"{ref[r.name].output_shape[1]:,} at the model's declared input_size "
                    f"{declared}: the dense layer after it changes size, so weights do not "
                    f"transfer; feed {declared}x{declared} inputs (the data path resizes)"
                )
    return out


def xla_check(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """XLA's own figures next to the analysis, for a batch of `input_shape`: the forward pass's
    flops against 2 x MACs, and a compiled SGD training step's buffers (arguments + outputs +
    temporaries) against the memory estimate. Compiles; the analysis itself never does."""
    input_shape = tuple(input_shape)
    result = analyze(model, input_shape, batch_size=input_shape[0])
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def sgd_step(variables, x):
        grads = jax.grad(lambda v: model.apply(v, x).sum())(variables)
        return jax.tree.map(lambda v, g: v - 1e-3 * g, variables, grads)

    forward = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
    forward = forward[0] if isinstance(forward, list) else forward
    mem = jax.jit(sgd_step, donate_argnums=0).lower(variables, x).compile().memory_analysis()
    step_bytes = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    macs = result.totals.macs * input_shape[0]
    return {
        "xla_forward_flops": forward["flops"],
        "macs": macs,
        "flops_ratio": forward["flops"] / (2 * macs),
        "xla_step_mb": step_bytes / MIB,
        "estimated_mb": result.totals.total_mb,
        "memory_ratio": step_bytes / MIB / result.totals.total_mb,
    }
