"""Property tests: random chains and small DAGs of convolutions (strided, dilated, padded
unevenly), average pools, pads and crops, strided slices, and branches joined by an add or a
channel concatenation, on random input sizes. For each: the output shape equals jax.eval_shape's,
and the receptive field of the centre output unit (size, jump, start) equals the footprint of
its input gradient. The networks are linear with positive weights, so a gradient is non-zero
exactly where a unit reads."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jax import lax

from cnnjax import analysis, probe
from cnnjax.geometry import GeometryError

C = 2  # channels everywhere
DN = ("NHWC", "HWIO", "NHWC")
pads = st.tuples(st.integers(0, 2), st.integers(0, 2))
conv = st.tuples(
    st.just("conv"), st.integers(1, 4), st.integers(1, 3), pads, pads, st.integers(1, 3)
)
pool = st.tuples(st.just("pool"), st.integers(1, 3), st.integers(1, 3), pads, pads)
pad = st.tuples(st.just("pad"), st.tuples(st.integers(-1, 2), st.integers(-1, 2)), pads)
crop = st.tuples(st.just("slice"), st.integers(0, 2), st.integers(1, 3))
branch = st.tuples(
    st.just("branch"),
    st.integers(1, 3),  # kernel of path a (path b: a 1x1 conv, or the identity)
    st.integers(1, 2),  # its dilation
    st.integers(0, 4),  # its low padding, of the d*(k-1) that keep the shape
    st.sampled_from(["add", "concat"]),
    st.booleans(),  # path b: identity, else a 1x1 conv
)
layer = st.one_of(conv, conv, pool, pad, crop, branch)


def _kernel(key, k: int, cin: int, cout: int) -> jnp.ndarray:
    return jax.random.uniform(key, (k, k, cin, cout), minval=0.1, maxval=1.0)


def build(spec, key):
    """The network of `spec` as f(params, x), and its params."""
    params = []
    for i, op in enumerate(spec):
        key_i = jax.random.fold_in(key, i)
        if op[0] == "conv":
            params.append(_kernel(key_i, op[1], C, C))
        elif op[0] == "branch":
            params.append({"a": _kernel(key_i, op[1], C, C), "b": _kernel(key_i, 1, C, C)})
        else:
            params.append(None)

    def f(params, x):
        for op, p in zip(spec, params, strict=True):
            x = _apply(op, p, x)
        return x

    return f, params


def _apply(op, p, x):
    kind = op[0]
    if kind == "conv":
        _, k, s, ph, pw, d = op
        return lax.conv_general_dilated(x, p, (s, s), (ph, pw), rhs_dilation=(d, d),
                                        dimension_numbers=DN)  # fmt: skip
    if kind == "pool":
        _, k, s, ph, pw = op
        padding = ((0, 0), ph, pw, (0, 0))
        return lax.reduce_window(x, 0.0, lax.add, (1, k, k, 1), (1, s, s, 1), padding) / k**2
    if kind == "pad":
        _, ph, pw = op
        return lax.pad(x, 0.0, ((0, 0, 0), (*ph, 0), (*pw, 0), (0, 0, 0)))
    if kind == "slice":
        _, start, stride = op
        return x[:, start::stride, start::stride, :]
    _, k, d, low, join, identity = op
    total = d * (k - 1)
    low = min(low, total)
    a = lax.conv_general_dilated(x, p["a"], (1, 1), ((low, total - low),) * 2,
                                 rhs_dilation=(d, d), dimension_numbers=DN)  # fmt: skip
    b = (
        x
        if identity
        else lax.conv_general_dilated(x, p["b"], (1, 1), "VALID", dimension_numbers=DN)
    )
    return a + b if join == "add" else jnp.concatenate([a, b[..., :C]], axis=-1)[..., :C]


def unpadded(op):
    """`op` without padding: the windows of its units read only real pixels."""
    kind = op[0]
    if kind in ("conv", "pool"):
        return (*op[:3], (0, 0), (0, 0), *op[5:])
    if kind == "pad":
        return ("pad", tuple(min(p, 0) for p in op[1]), tuple(min(p, 0) for p in op[2]))
    if kind == "branch":
        return ("branch", 1, *op[2:])  # a 1x1 path a: no padding keeps the shape
    return op


def _footprint(f, params, shape, unit) -> probe.Box | None:
    """The first and last input pixel per axis whose gradient for `unit` is non-zero."""

    def value(x):
        return f(params, x)[0, unit[0], unit[1], :].sum()

    return probe.footprint(np.abs(np.asarray(jax.grad(value)(jnp.ones(shape)))).sum(axis=(0, 3)))


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    spec=st.lists(layer, min_size=1, max_size=5),
    height=st.integers(4, 24),
    width=st.integers(4, 24),
    no_padding=st.booleans(),
)
def test_receptive_field_equals_the_gradient_footprint(spec, height, width, no_padding):
    """Without padding every unit reads its whole window: the footprint is the window. With
    padding, the taps on padding (counted in the receptive field, as in the notes) read
    nothing: the footprint lies within the window."""
    if no_padding:
        spec = [unpadded(op) for op in spec]
    shape = (1, height, width, C)
    f, params = build(spec, jax.random.key(0))
    try:
        out = jax.eval_shape(f, params, jax.ShapeDtypeStruct(shape, jnp.float32))
        result = analysis.analyze(f, shape, params=params)
    except (GeometryError, TypeError, ValueError):  # an empty map somewhere: not a network
        assume(False)
    assume(min(out.shape) > 0 and result.rows)  # an empty map, or nothing computed
    last = result.rows[-1]
    assert last.output_shape == out.shape
    unit = (out.shape[1] // 2, out.shape[2] // 2)
    spans = _footprint(f, params, shape, unit)
    assume(spans is not None)  # the centre unit is padding, a zero that reads nothing
    for a, size in enumerate((height, width)):
        rf = last.axis_rf(a)
        first, end = rf.window(unit[a])
        if no_padding:
            assert spans[a] == (first, end), (spec, a, rf)
        else:
            assert max(first, 0) <= spans[a][0] <= spans[a][1] <= min(end, size - 1), (
                spec,
                a,
                spans,
                rf,
            )
