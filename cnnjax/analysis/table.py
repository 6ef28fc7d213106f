"""The layer table: the steps of a traced program grouped into rows, one per layer call.

Rows of a Linen model are its module calls (a leaf call: one row, typed by its class; the code
a module runs between its submodule calls: rows named by the module, typed by what they do).
Rows of an NNX module or a function start at each conv, pool, dense, join, pad, crop or flatten,
and where the parameters read change owner; they are named after those parameters' owner.
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cnnjax import geometry
from cnnjax.analysis import program as programs
from cnnjax.analysis.calls import innermost_call
from cnnjax.analysis.fields import AxisWindow, Field
from cnnjax.analysis.rules import UNCOUNTED, UNKNOWN, AnalysisError, unfit
from cnnjax.analysis.walk import Step, Value, walk
from cnnjax.geometry import MIB, RF, GeometryError, Pair

IN_PLACE = ("ReLU", "ReLU6", "Dropout", "Flatten")  # module rows whose outputs are not memory
QUIET = {None, "relu", "convert_element_type", "copy", "stop_gradient"}  # labels not shown
ACTIVATIONS = {"relu", "tanh", "logistic", "exp", "abs", "square", "sqrt", "rsqrt", "erf"}


@dataclass(frozen=True)
class Row:
    """One layer call. Shapes include the batch dimension; params and MACs are per image. The
    receptive field (`rf`, `jump`, `start`) is None where it is unknown."""

    name: str
    type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int  # trainable, counted at their first use
    state: int  # non-trainable variables (e.g. BatchNorm statistics)
    macs: int
    rf: Pair | None
    jump: Pair | None
    start: tuple[float, float] | None
    kernel: Pair | None = None
    stride: Pair | None = None
    padding: tuple[Pair, Pair] | None = None  # resolved (low, high) per axis
    dilation: Pair | None = None
    groups: int | None = None
    activation_elements: int = 0  # per image, counted in the activation memory
    warnings: tuple[str, ...] = ()
    in_place: bool = False  # an activation, dropout or view: its output is not new memory
    bias_adds: int = 0  # per image, of a conv or dense layer with a bias (not in `macs`)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    @property
    def spatial(self) -> bool:
        """An NHWC output of its own (in-place layers such as ReLU and dropout are not)."""
        return len(self.output_shape) == 4 and not self.in_place

    def axis_rf(self, axis: int) -> RF | None:
        """The receptive field along `axis` (0: H, 1: W), None when unknown."""
        if self.rf is None:
            return None
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
    modules: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> class name

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


@dataclass
class _Group:
    key: Any
    name: str
    type: str | None  # a leaf module's class
    steps: list[Step]
    window: Any = None  # a leaf conv or pool module's declared window (calls.Window)


def _anchor(step: Step) -> bool:
    """A step that starts a row of its own in a module's body or a function."""
    return step.merges > 1 or step.label not in QUIET | ACTIVATIONS


def group(program: programs.Program, steps: Sequence[Step]) -> list[_Group]:
    """Consecutive steps of one module call (Linen), or of one layer (NNX, functions)."""
    groups: list[_Group] = []
    leaves = program.leaves
    for step in steps:
        call = innermost_call(step.stack)
        owners = {leaves[i].owner for i in step.consumed}
        owner = min(owners) if owners else None
        last = groups[-1] if groups else None
        if call is not None:
            info = program.calls[call]
            if last and last.key == call and (info.leaf or not _anchor(step)):
                last.steps.append(step)
            else:
                kind = info.type if info.leaf else None
                groups.append(_Group(call, info.path, kind, [step], info.window if kind else None))
            continue
        # a function or NNX module: a new row at an anchor, a new name stack or a new owner
        unnamed = last is not None and last.name == step.stack  # no parameters read yet
        same_owner = owner is None or last is None or unnamed or last.name == owner
        if last and last.key == step.stack and not _anchor(step) and same_owner:
            last.steps.append(step)
            if owner and unnamed:
                last.name = owner
        else:
            name = owner or step.stack
            groups.append(_Group(step.stack, name, program.types.get(name), [step]))
    return groups


def _label(steps: Sequence[Step]) -> str:
    labels: list[str] = []
    prims = {s.primitive for s in steps}
    for s in steps:
        label = s.label
        if label == "sum_pool" and "div" in prims:
            label = "avg_pool"
        if label is not None and label not in labels and label not in QUIET - {"relu"}:
            labels.append(label)
    return "+".join(labels) or "affine"


def _window(g: _Group) -> tuple | None:
    """(kernel, stride, pads, dilation) per axis pair of the row's one conv or pool: the traced
    one, or the module's (a pool computed without a window primitive)."""
    windowed = [s for s in g.steps if s.windows]
    if len(windowed) == 1 and set(windowed[0].windows) == {0, 1}:
        h, w = windowed[0].windows[0], windowed[0].windows[1]
        return (h.kernel, w.kernel), (h.stride, w.stride), (h.pad, w.pad), (h.dilation, w.dilation)
    if not windowed and g.window is not None:
        return g.window.kernel, g.window.stride, g.window.pads, g.window.dilation
    return None


def _declared_unfit(g: _Group) -> list[str]:
    """The stride warning of a pool module computed without a window primitive (its crop drops
    the pixels), from its declared window."""
    if g.window is None or any(s.windows for s in g.steps) or len(g.steps[0].in_shape) != 4:
        return []
    w = g.window
    windows = {a: AxisWindow(w.kernel[a], w.stride[a], w.pads[a], w.dilation[a]) for a in (0, 1)}
    return unfit(windows, {a: g.steps[0].in_shape[1 + a] for a in (0, 1)})


def build_rows(program: programs.Program, steps: Sequence[Step], batch: int) -> list[Row]:
    rows: list[Row] = []
    seen: dict[int, tuple[int, str]] = {}  # parameter leaf -> the group that first used it
    for index, g in enumerate(group(program, steps)):
        first, last = g.steps[0], g.steps[-1]
        params = state = 0
        notes = [n for s in g.steps for n in s.notes] + _declared_unfit(g)
        shared = set()
        for s in g.steps:
            for i in sorted(s.consumed):
                leaf = program.leaves[i]
                if i in seen:
                    if seen[i][0] != index:
                        shared.add(seen[i][1])
                    continue
                seen[i] = (index, g.name or "")
                params += leaf.size if leaf.trainable else 0
                state += 0 if leaf.trainable else leaf.size
        notes += [
            f"reuses the parameters of the earlier call {other!r} (counted there)"
            for other in sorted(shared)
        ]
        macs = sum(s.macs for s in g.steps)
        if macs % batch:
            raise AnalysisError(f"layer {g.name!r}: {macs:,} MACs for a batch of {batch}")
        w = _window(g)
        kind = g.type or _label(g.steps)
        in_place = kind in IN_PLACE if g.type else all(s.unary for s in g.steps)
        f: Field = last.field
        known = f.known
        conv = next((s for s in g.steps if s.groups), None)
        row = Row(
            name=g.name or kind,
            type=kind,
            input_shape=first.in_shape,
            output_shape=last.out_shape,
            params=params,
            state=state,
            macs=macs // batch,
            rf=(f.rf[0].size, f.rf[1].size) if known else None,
            jump=(f.rf[0].jump, f.rf[1].jump) if known else None,
            start=(f.rf[0].start, f.rf[1].start) if known else None,
            kernel=w and w[0],
            stride=w and w[1],
            padding=w and w[2],
            dilation=w and w[3],
            groups=conv.groups if conv and w else None,
            activation_elements=0 if in_place else math.prod(last.out_shape[1:]),
            warnings=tuple(dict.fromkeys(notes)),
            in_place=in_place,
        )
        core = _core(g.steps, program)
        if core is not None and not shared:
            _check_params(row, *core)
        bias = math.prod(core[0].out_shape[1:]) if core and core[1] else 0  # one per output
        rows.append(dataclasses.replace(row, bias_adds=bias))
    return rows


def _core(steps: Sequence[Step], program: programs.Program) -> tuple[Step, set[int]] | None:
    """The one conv or dense step of a row that reads parameters, and the other parameters the
    row reads when they can only be its bias (one value per output feature); else None."""
    cores = [s for s in steps if s.primitive in ("conv_general_dilated", "dot_general")]
    if len(cores) != 1 or not cores[0].consumed or cores[0].features is None:
        return None
    others = {i for s in steps if s is not cores[0] for i in s.consumed}
    if len(others) > 1 or any(program.leaves[i].size != cores[0].features[1] for i in others):
        return None  # more than a bias (a module with a norm inside, say): no single formula
    return cores[0], others


def _check_params(row: Row, core_: Step, bias_leaves: set[int]) -> None:
    """A row of one conv or dense layer (`core_`, with a bias when `bias_leaves`): the formula's
    parameter count against its variables."""
    if row.state:
        return
    cin, out, bias = *core_.features, bool(bias_leaves)
    if core_.primitive == "conv_general_dilated" and row.kernel is not None:
        expected = geometry.conv_params(row.kernel, cin, out, row.groups or 1, bias, row.name)
    elif core_.primitive == "dot_general":
        expected = geometry.dense_params(cin, out, bias)
    else:
        return
    if expected != row.params:
        raise AnalysisError(
            f"layer {row.name!r}: the formula gives {expected:,} parameters, "
            f"the initialised module has {row.params:,}"
        )


def trace_rows(
    model: Any, input_shape: Sequence[int], params: Any = None
) -> tuple[list[Row], programs.Program]:
    """Rows in call order, and the traced program."""
    program = programs.trace(model, input_shape, params)
    leaves = [Value(sources=frozenset({i})) for i in range(len(program.leaves))]
    image = Value(Field.image(len(input_shape), (1, 2)))
    steps, _ = walk(program.jaxpr.jaxpr, [*leaves, image], _namer(program))
    return build_rows(program, steps, input_shape[0]), program


def _namer(program: programs.Program):
    def name(stack: str) -> str:
        call = innermost_call(stack)
        return program.calls[call].path if call is not None else (stack or "the program")

    return name


def smallest_input(model: Any, input_shape: Sequence[int], limit: int = 4096) -> int | None:
    """Smallest square input side the model accepts (sizes grow monotonically through convs and
    pools), by bisection over traces; None when nothing up to `limit` works."""

    def works(side: int) -> bool:
        try:
            trace_rows(model, (1, side, side, input_shape[-1]))
        except Exception:  # any failure means this size does not work
            return False
        return True

    if works(1):  # padded models often accept any size
        return 1
    hi = max(input_shape[1], input_shape[2], 2)
    while not works(hi):
        if hi >= limit:
            return None
        hi = min(hi * 2, limit)
    lo = 1  # invariant: lo fails, hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    return hi


def analyze(
    model: Any, input_shape: Sequence[int], batch_size: int = 1, params: Any = None
) -> Analysis:
    """The checked layer table of `model` (a Linen or NNX module, or a function `model(params,
    x)` with its `params`) on NHWC inputs of `input_shape` (batch included)."""
    input_shape = tuple(input_shape)
    try:
        rows, program = trace_rows(model, input_shape, params)
    except GeometryError as e:
        if params is not None or not hasattr(model, "init"):
            raise
        side = smallest_input(model, input_shape)
        hint = (
            f"the smallest square input this model accepts is {side}x{side} (the data path "
            "resizes to the model's input_size)"
            if side
            else "no square input up to 4096x4096 works"
        )
        h, w = input_shape[1:3]
        raise GeometryError(f"{e}, from the {h}x{w} model input; {hint}.") from None
    totals = _totals(rows, program, input_shape, batch_size)
    warnings = tuple(_model_warnings(model, rows, program))
    modules = program.types | {c.path: c.type for c in program.calls}
    return Analysis(input_shape, tuple(rows), totals, warnings, modules)


def fold(result: Analysis, depth: int) -> Analysis:
    """The table with every row deeper than `depth` module levels folded into its ancestor at
    that depth (torchinfo's `depth`): consecutive rows of one ancestor become one row, with
    their parameters and MACs summed and the last one's output and receptive field."""
    if depth < 1:
        raise ValueError(f"depth={depth}: use 1 or more (1: the model's top-level modules)")
    groups: list[list[Row]] = []
    for row in result.rows:
        key = "/".join(row.name.split("/")[:depth])
        if groups and "/".join(groups[-1][0].name.split("/")[:depth]) == key:
            groups[-1].append(row)
        else:
            groups.append([row])
    rows = tuple(g[0] if len(g) == 1 else _folded(g, depth, result.modules) for g in groups)
    return dataclasses.replace(result, rows=rows)


def _folded(rows: list[Row], depth: int, modules: dict[str, str]) -> Row:
    name = "/".join(rows[0].name.split("/")[:depth])
    last = rows[-1]
    return dataclasses.replace(
        last,
        name=name,
        type=modules.get(name, "+".join(dict.fromkeys(r.type for r in rows))),
        input_shape=rows[0].input_shape,
        params=sum(r.params for r in rows),
        state=sum(r.state for r in rows),
        macs=sum(r.macs for r in rows),
        bias_adds=sum(r.bias_adds for r in rows),
        kernel=None, stride=None, padding=None, dilation=None, groups=None,
        activation_elements=sum(r.activation_elements for r in rows),
        warnings=tuple(w for r in rows for w in r.warnings),
        in_place=all(r.in_place for r in rows),
    )  # fmt: skip


def _totals(rows: list[Row], program: programs.Program, input_shape, batch_size: int) -> Totals:
    param_bytes = sum(leaf.nbytes for leaf in program.leaves)
    input_bytes = math.prod(input_shape[1:]) * 4 * batch_size
    act_bytes = 2 * sum(r.activation_elements for r in rows) * 4 * batch_size
    return Totals(
        params=sum(leaf.size for leaf in program.leaves),
        trainable_params=sum(leaf.size for leaf in program.leaves if leaf.trainable),
        macs=sum(r.macs for r in rows),
        param_mb=param_bytes / MIB,
        input_mb=input_bytes / MIB,
        activation_mb=act_bytes / MIB,
        total_mb=(param_bytes + input_bytes + act_bytes) / MIB,
        batch_size=batch_size,
    )


def _model_warnings(model: Any, rows: list[Row], program: programs.Program) -> list[str]:
    """Whole-model warnings: variables the forward pass never reads, receptive fields made
    unknown, multiply-adds not counted, a last spatial layer that cannot see the whole input,
    and a flatten whose size differs from the one at the model's declared input size."""
    out: list[str] = []
    used = sum(r.params + r.state for r in rows)
    total = sum(leaf.size for leaf in program.leaves)
    if used != total:
        out.append(
            f"{total - used:,} of the model's {total:,} parameters are never read by its forward "
            "pass (counted in the totals, in no row)"
        )
    out += [w for r in rows for w in r.warnings if w.startswith((UNKNOWN, UNCOUNTED))]
    spatial = [r for r in rows if r.spatial]
    in_hw = rows[0].input_shape[1:3] if rows else ()
    if spatial and spatial[-1].rf is not None:
        last = spatial[-1]
        if any(last.rf[a] < in_hw[a] for a in range(2)):
            out.append(
                f"the last spatial layer {last.name!r} has a {last.rf[0]}x{last.rf[1]} receptive "
                f"field on a {in_hw[0]}x{in_hw[1]} input: each of its units sees part of the "
                "image, and what follows pools or flattens those parts; add layers or pooling "
                "until the receptive field covers the input"
            )
    out += _flatten_warnings(model, rows)
    return out


def _flatten_warnings(model: Any, rows: list[Row]) -> list[str]:
    declared = getattr(model, "input_size", None)
    flats = [r for r in rows if _flattens(r)]
    in_shape = rows[0].input_shape if rows else ()
    if not (declared and flats and tuple(in_shape[1:3]) != (declared, declared)):
        return []
    ref_rows, _ = trace_rows(model, (1, declared, declared, in_shape[-1]))
    ref = {r.name: r for r in ref_rows if _flattens(r)}
    return [
        f"{r.name!r} flattens {r.input_shape[1:]} into {r.output_shape[1]:,} features "
        f"at this {in_shape[1]}x{in_shape[2]} input, but into "
        f"{ref[r.name].output_shape[1]:,} at the model's declared input_size "
        f"{declared}: the dense layer after it changes size, so weights do not "
        f"transfer; feed {declared}x{declared} inputs (the data path resizes)"
        for r in flats
        if r.name in ref and ref[r.name].output_shape[1:] != r.output_shape[1:]
    ]


def _flattens(row: Row) -> bool:
    return "flatten" in row.type.lower().split("+")
