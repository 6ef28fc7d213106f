"""Walk a jaxpr equation by equation, entering call-like primitives, and record for each what
the rules say: a `Step` per equation that touches the image.

Besides the receptive field (`Field`), every value carries the parameter leaves it was computed
from while it does not yet depend on the image; the equation where such a value meets the image
is where those parameters are used (`Step.consumed`).
"""

from collections.abc import Callable
from dataclasses import dataclass

from jax.extend import core

from cnnjax.analysis import rules
from cnnjax.analysis.fields import Field

CALLS = frozenset(
    {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
     "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2"}
)  # fmt: skip
VIEWS = frozenset(
    {"slice", "dynamic_slice", "pad", "reshape", "transpose", "squeeze", "expand_dims",
     "convert_element_type", "copy", "optimization_barrier"}
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One equation that reads the image (directly or not)."""

    stack: str  # the equation's name stack, from the top of the program
    primitive: str
    label: str | None  # what it does, in a word ("conv", "relu", "global_pool", ...)
    in_shape: tuple[int, ...]  # of its first operand computed from the image
    out_shape: tuple[int, ...]
    field: Field | None  # of its first output
    macs: int  # over the whole batch
    windows: dict | None  # image axis -> AxisWindow, for a conv or pool
    groups: int | None
    features: tuple[int, int] | None  # (in, out) of a conv or dense layer
    consumed: frozenset[int]  # parameter leaves that meet the image here
    notes: tuple[str, ...]
    merges: int  # operands computed from the image (2+: paths meet here)
    unary: bool  # an element-wise op of one image operand, or a view: keeps the data in place


@dataclass
class Value:
    """What the walk knows of one array."""

    field: Field | None = None
    sources: frozenset[int] = frozenset()  # parameter leaves, while field is None
    base: object = None  # the array this one is a view of (for a max of shifted slices)


def walk(
    jaxpr: core.Jaxpr, inputs: list[Value], namer: Callable[[str], str], stack: str = ""
) -> tuple[list[Step], list[Value]]:
    """The steps of `jaxpr` given its inputs' values; and its outputs' values."""
    env: dict = {}

    def read(v) -> Value:
        return Value() if isinstance(v, core.Literal) else env.get(v, Value())

    for var, value in zip(jaxpr.invars, inputs, strict=True):
        env[var] = (
            value
            if value.base is not None or value.field is None
            else Value(value.field, value.sources, var)
        )
    steps: list[Step] = []
    for eqn in jaxpr.eqns:
        here = _join(stack, str(eqn.source_info.name_stack))
        ins = [read(v) for v in eqn.invars]
        inner = _callee(eqn)
        if inner is not None:
            sub, outs = walk(inner, ins, namer, here)
            steps += sub
        else:
            outs = _step(eqn, ins, here, namer, steps)
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return steps, [read(v) for v in jaxpr.outvars]


def _step(eqn, ins: list[Value], here: str, namer, steps: list[Step]) -> list[Value]:
    fields = [v.field for v in ins]
    data = [v for v in ins if v.field is not None]
    if not data:
        sources = frozenset().union(*(v.sources for v in ins))
        return [Value(None, sources) for _ in eqn.outvars]
    same = len({id(v.base) for v in data}) == 1 and data[0].base is not None
    effect = rules.apply(eqn, fields, namer(here), same)
    consumed = frozenset().union(*(v.sources for v in ins if v.field is None))
    if not consumed and rules.extracts_patches(eqn):  # a kernel of constants: im2col
        effect = rules.as_patches(effect)
    name = eqn.primitive.name
    first = eqn.invars[[f is not None for f in fields].index(True)]
    steps.append(
        Step(
            stack=here,
            primitive=name,
            label=effect.label,
            in_shape=tuple(first.aval.shape),
            out_shape=tuple(eqn.outvars[0].aval.shape),
            field=effect.out[0],
            macs=effect.macs,
            windows=effect.windows,
            groups=effect.groups,
            features=effect.features,
            consumed=consumed,
            notes=tuple(effect.notes),
            merges=len(data),
            unary=len(data) == 1 and name in rules.UNARY | rules.NARY | VIEWS,
        )
    )
    base = data[0].base if (name in VIEWS or name in rules.NARY) and same else None
    outs = []
    for var, f in zip(eqn.outvars, effect.out, strict=True):
        outs.append(Value(f, frozenset(), base if base is not None else var))
    return outs


def _callee(eqn: core.JaxprEqn) -> core.Jaxpr | None:
    """The body of a call-like equation (same inputs and outputs), else None."""
    if eqn.primitive.name not in CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        body = eqn.params.get(key)
        if body is None:
            continue
        body = getattr(body, "jaxpr", body)  # a ClosedJaxpr's open jaxpr (consts: not data)
        if len(body.invars) == len(eqn.invars) and len(body.outvars) == len(eqn.outvars):
            return body
    return None


def _join(outer: str, inner: str) -> str:
    return "/".join(p for p in (outer, inner) if p)
