"""The analysis of what JAX computes, off the path of `cnnjax.layers`: functions written with
jnp and lax, pools called as functions, joins, shared weights, transposed convolutions, NNX
modules and plain functions. Receptive fields are checked against the input-gradient footprint
of one output unit, shapes against jax.eval_shape, MACs against XLA's cost analysis."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnjax import analysis, geometry, layers, probe
from cnnjax.geometry import RF
from cnnjax.layers import conv

NHWC = ("NHWC", "HWIO", "NHWC")
SAMPLES = 32  # random positive inputs whose gradient footprints are joined (max picks one)


def positive(variables):
    """Kernels positive, biases and means zero, variances one: every unit grows with every
    input pixel it reads, so a gradient is non-zero exactly where a unit reads (ReLU passes)."""

    def leaf(path, x):
        key = jax.tree_util.keystr(path[-1:], simple=True)
        if key in ("bias", "mean"):
            return jnp.zeros_like(x)
        if key == "var":
            return jnp.ones_like(x)
        return jnp.abs(x) + 0.01

    return jax.tree_util.tree_map_with_path(leaf, variables)


def footprint(fn, shape, unit) -> probe.Box | None:
    """Per image axis, the first and last input pixel whose gradient for output unit
    `unit` = (i, j) is non-zero on any of SAMPLES random positive inputs."""
    x = jax.random.uniform(jax.random.key(7), (SAMPLES, *shape[1:]), minval=0.1, maxval=1.0)

    def unit_sum(x):
        out = fn(x)
        return out[:, unit[0], unit[1], :].sum() if out.ndim == 4 else out.sum()

    return probe.footprint(np.abs(np.asarray(jax.grad(unit_sum)(x))).sum(axis=(0, 3)))


def expected_span(rf: RF, unit: int, size: int) -> tuple[int, int]:
    first, last = rf.window(unit)
    return max(first, 0), min(last, size - 1)


def check_against_gradient(result: analysis.Analysis, fn, shape, row: analysis.Row | None = None):
    """The receptive field of the centre unit of `row` (the last row) against its footprint."""
    row = row or result.rows[-1]
    unit = [row.output_shape[1 + a] // 2 if len(row.output_shape) == 4 else 0 for a in (0, 1)]
    spans = footprint(fn, shape, unit)
    for a in (0, 1):
        assert spans[a] == expected_span(row.axis_rf(a), unit[a], shape[1 + a]), (row.name, a)


def linen(model: nn.Module, shape):
    variables = positive(model.init(jax.random.key(0), jnp.zeros(shape)))
    result = analysis.analyze(model, shape)
    assert (
        result.rows[-1].output_shape
        == jax.eval_shape(model.apply, variables, jnp.zeros(shape)).shape
    )
    return result, lambda x: model.apply(variables, x)


class PoolFunction(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = conv(2, 3, name="c1")(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        return conv(2, 3, name="c2")(x)


def test_max_pool_called_as_a_function():
    result, fn = linen(PoolFunction(), (1, 16, 16, 1))
    pool, c2 = result.rows[1], result.rows[2]
    assert (pool.name, pool.type, pool.kernel, pool.stride) == (
        "PoolFunction",
        "max_pool",
        (2, 2),
        (2, 2),
    )
    assert (c2.rf, c2.jump) == ((8, 8), (2, 2))
    check_against_gradient(result, fn, (1, 16, 16, 1))


class MeanPool(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(conv(4, 3, name="c1")(x))
        x = conv(4, 3, name="c2")(x)
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


def test_global_average_pool_written_with_jnp_mean():
    result, fn = linen(MeanPool(), (1, 12, 12, 1))
    mean = next(r for r in result.rows if r.type == "global_pool")
    assert mean.rf == (12, 12) and mean.start == (6.0, 6.0)  # the whole 12x12 image
    assert mean.output_shape == (1, 4)
    (warning,) = [w for w in result.warnings if "last spatial layer" in w]
    assert "'c2' has a 5x5 receptive field" in warning and "no unit" not in warning
    check_against_gradient(result, fn, (1, 12, 12, 1))


class Inception(nn.Module):
    """Two paths of different receptive fields joined by jnp.concatenate, then a 1x1 conv."""

    @nn.compact
    def __call__(self, x):
        a = conv(2, 1, name="a")(x)
        b = conv(2, 5, padding=2, name="b")(x)
        x = jnp.concatenate([a, b], axis=-1)
        return conv(2, 1, name="mix")(x)


def test_concatenated_branches_take_the_wider_path():
    result, fn = linen(Inception(), (1, 9, 9, 1))
    join = next(r for r in result.rows if r.type == "concat")
    assert join.rf == (5, 5) and not join.warnings
    assert result.rows[-1].rf == (5, 5)
    check_against_gradient(result, fn, (1, 9, 9, 1))


class FunctionalResidual(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.relu(conv(2, 3, padding=1, name="c1")(x))
        y = conv(2, 3, padding=1, name="c2")(y)
        return nn.relu(x + y)


def test_residual_block_with_functions():
    result, fn = linen(FunctionalResidual(), (1, 8, 8, 2))
    join = result.rows[-1]
    assert (join.name, join.type, join.rf, join.warnings) == (
        "FunctionalResidual",
        "add+relu",
        (5, 5),
        (),
    )
    assert not any("not aligned" in w for r in result.rows for w in r.warnings)
    check_against_gradient(result, fn, (1, 8, 8, 2))


def test_transposed_conv_with_stride_one_is_a_convolution():
    model = nn.ConvTranspose(2, (3, 3), padding="VALID")
    result, fn = linen(model, (1, 6, 6, 1))
    (row,) = result.rows
    assert (row.type, row.output_shape, row.rf) == ("ConvTranspose", (1, 8, 8, 2), (3, 3))
    assert row.macs == 8 * 8 * 2 * 3 * 3 * 1  # the notes' formula on the padded equivalent conv
    check_against_gradient(result, fn, (1, 6, 6, 1))
    flops = xla_flops(
        model.apply, model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1))), (1, 6, 6, 1)
    )
    taps = geometry.valid_taps(6, 3, 1, (2, 2))
    assert flops == 2 * taps * taps * 2 + 8 * 8 * 2  # XLA: real taps, and the bias adds


def test_transposed_conv_with_stride_two_has_no_single_receptive_field():
    model = nn.ConvTranspose(2, (3, 3), strides=(2, 2), use_bias=False)
    result = analysis.analyze(model, (1, 5, 5, 1))
    (row,) = result.rows
    assert row.rf is None and row.output_shape == (1, 10, 10, 2)
    (warning,) = result.warnings
    assert "from `conv_general_dilated` in 'ConvTranspose'" in warning and "dilation 2" in warning
    # only the taps on real pixels: 14 per axis (the 'SAME' crop drops one of the 5 x 3), so
    # fewer than torchinfo's 5*5*3*3*2 = 450; exactly what XLA counts
    assert row.macs == 14 * 14 * 2
    variables = model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)))
    assert xla_flops(model.apply, variables, (1, 5, 5, 1)) == 2 * row.macs


class SharedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = conv(3, 3, padding=1, name="c")
        return c(nn.relu(c(x)))


def test_shared_weights_are_counted_once():
    result, fn = linen(SharedConv(), (1, 8, 8, 3))
    first, second = [r for r in result.rows if r.type == "Conv"]
    assert (first.params, second.params, result.totals.params) == (84, 0, 84)
    assert any("reuses the parameters of the earlier call 'c'" in w for w in second.warnings)
    assert second.rf == (5, 5) and second.macs == first.macs
    check_against_gradient(result, fn, (1, 8, 8, 3))


def test_locally_connected_layer_counts_the_multiply_adds_of_its_dot_only():
    """Flax's ConvLocal extracts patches with a conv of constant 0/1 kernels (a copy, no MACs),
    then multiplies by a kernel per position; a depthwise conv of the same shape whose kernel is
    a parameter keeps its MACs."""
    result, fn = linen(nn.ConvLocal(4, (3, 3), padding=1), (1, 6, 6, 2))
    (row,) = result.rows
    assert row.macs == 6 * 6 * (3 * 3 * 2) * 4 == 2_592  # as a conv of the same window
    assert row.params == 6 * 6 * (3 * 3 * 2 + 1) * 4 and row.groups is None
    assert row.kernel == (3, 3) and row.rf == (3, 3)
    assert any("counted as patch extraction" in w for w in row.warnings)  # said, not silent
    check_against_gradient(result, fn, (1, 6, 6, 2))
    result, _ = linen(nn.Conv(18, (3, 3), padding=1, feature_group_count=2), (1, 6, 6, 2))
    (row,) = result.rows
    assert row.macs == 6 * 6 * 3 * 3 * 18 and row.groups == 2


class SamePool(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = layers.MaxPool(3, 2, padding="SAME")(x)
        x = jnp.pad(x, ((0, 0), (2, 0), (0, 1), (0, 0)))
        return conv(2, 3, name="c")(x)


def test_same_padded_pool_and_jnp_pad():
    result, fn = linen(SamePool(), (1, 9, 9, 1))
    pool, pad, c = result.rows
    assert pool.output_shape == (1, 5, 5, 1) and pool.padding == ((1, 1), (1, 1))
    assert pad.type == "pad" and pad.start == (-3.5, 0.5)  # two pixels of jump 2 added on top
    assert c.output_shape == (1, 5, 4, 2) and c.rf == (7, 7) and c.start == (-1.5, 2.5)
    check_against_gradient(result, fn, (1, 9, 9, 1))


def test_a_primitive_without_a_rule_makes_the_receptive_field_unknown():
    def fn(params, x):
        x = jax.lax.conv_general_dilated(x, params, (1, 1), "VALID", dimension_numbers=NHWC)
        return jnp.cumsum(x, axis=1)  # a running sum: every unit sees all rows above it

    result = analysis.analyze(fn, (1, 8, 8, 1), params=jnp.ones((3, 3, 1, 2)))
    conv_row, cumsum = result.rows
    assert conv_row.rf == (3, 3) and cumsum.rf is None
    (warning,) = [w for w in result.warnings if "unknown" in w]
    assert "from `cumsum` in 'the program'" in warning


def test_multiply_adds_inside_a_loop_are_not_passed_off_as_the_total():
    def fn(w, x):
        def body(i, y):
            return jax.lax.conv_general_dilated(y, w, (1, 1), "SAME", dimension_numbers=NHWC)

        return jax.lax.fori_loop(0, 3, body, x)  # three convs the analysis does not enter

    result = analysis.analyze(fn, (1, 8, 8, 1), params=jnp.ones((3, 3, 1, 1)))
    (row,) = result.rows
    assert row.rf is None and result.totals.macs == 0
    (uncounted,) = [w for w in result.warnings if w.startswith("MACs not counted")]
    assert "inside `scan`" in uncounted and "lower bound" in uncounted


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(1, 4, (3, 3), strides=2, padding="VALID", rngs=rngs)
        self.c2 = nnx.Conv(4, 4, (3, 3), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(4, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c1(x))
        x = nnx.relu(self.c2(x))
        return self.fc(x.mean(axis=(1, 2)))


def test_nnx_module():
    result = analysis.analyze(NNXNet(nnx.Rngs(0)), (1, 11, 11, 1))
    names = [(r.name, r.type) for r in result.rows]
    assert names[:2] == [("c1", "Conv"), ("c2", "Conv")]
    assert [r.params for r in result.rows] == [40, 148, 0, 50]
    assert result.rows[1].rf == (7, 7) and result.rows[1].jump == (2, 2)
    assert result.totals.params == 238


def test_plain_function_with_a_dense_layer():
    params = {
        "conv": {"kernel": jnp.ones((5, 5, 1, 6))},
        "fc": {"kernel": jnp.ones((6 * 4 * 4, 10))},
    }

    def fn(params, x):
        x = jax.lax.conv_general_dilated(
            x, params["conv"]["kernel"], (2, 2), "VALID", dimension_numbers=NHWC
        )
        return x.reshape(x.shape[0], -1) @ params["fc"]["kernel"]

    result = analysis.analyze(fn, (2, 11, 11, 1), params=params)
    c, flat, fc = result.rows
    assert (flat.type, flat.output_shape, flat.rf, flat.start) == (
        "flatten",
        (2, 96),
        (11, 11),
        (5.5, 5.5),
    )
    assert (c.name, c.params, c.macs, c.rf, c.jump) == ("conv", 150, 4 * 4 * 6 * 25, (5, 5), (2, 2))
    assert (fc.name, fc.type, fc.params, fc.macs, fc.rf) == (
        "fc",
        "dense",
        960,
        960,
        (11, 11),
    )


def xla_flops(fn, variables, shape) -> float:
    cost = jax.jit(fn).lower(variables, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    cost = cost.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def _conv3(x, w, dn=NHWC):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dn)


RULES = {  # f(w, x) on a 12x12 input -> (rf, start) of its output
    "transpose and NCHW dimension numbers": (
        lambda w, x: _conv3(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1),
                            ("NCHW", "OIHW", "NCHW")).transpose(0, 2, 3, 1),
        (3, 3), (1.5, 1.5),
    ),
    "remat": (lambda w, x: jax.checkpoint(_conv3)(x, w), (3, 3), (1.5, 1.5)),
    "dynamic_slice with a known start": (
        lambda w, x: _conv3(jax.lax.dynamic_slice(x, (0, 2, 3, 0), (1, 8, 8, 1)), w),
        (3, 3), (3.5, 4.5),
    ),
    "spatial concatenation of two halves": (
        lambda w, x: _conv3(jnp.concatenate([x[:, :6], x[:, 6:]], axis=1), w), (3, 3), (1.5, 1.5),
    ),
    "expand_dims and squeeze": (
        lambda w, x: _conv3(jnp.squeeze(jnp.expand_dims(x, 1), 1), w), (3, 3), (1.5, 1.5),
    ),
    "strided slice, then conv": (lambda w, x: _conv3(x[:, 1::2, ::3], w), (5, 7), (3.5, 3.5)),
    "reversed rows: no rule keeps the field": (lambda w, x: _conv3(jnp.flip(x, 1), w), None, None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RULES))
def test_primitive_rules(case):
    fn, rf, start = RULES[case]
    w = jnp.full((3, 3, 1, 1), 0.5)
    result = analysis.analyze(fn, (1, 12, 12, 1), params=w)
    last = result.rows[-1]
    assert (last.rf, last.start) == (rf, start), [(r.type, r.rf, r.start) for r in result.rows]
    assert last.output_shape == jax.eval_shape(fn, w, jnp.zeros((1, 12, 12, 1))).shape
    if rf is None:
        assert any("from `rev`" in w for w in result.warnings)
    else:
        check_against_gradient(result, lambda x: fn(w, x), (1, 12, 12, 1))
