"""The layer table against the notes' numbers and against independent checks: the real parameter
pytree, XLA's cost analysis, and the input-gradient footprint of one output unit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MODELS, RUNNABLE
from hydra.utils import instantiate

from cnnjax import analysis, geometry, layers, models, probe
from cnnjax.analysis import AnalysisError, GeometryError
from cnnjax.layers import Add, conv
from cnnjax.models.alexnet import AlexNet

CHECKED = ("Conv", "MaxPool", "AvgPool", "Add")  # the rows whose receptive fields are probed


def _analyze(compose_cfg, name: str, *overrides: str) -> tuple[nn.Module, analysis.Analysis]:
    model = instantiate(compose_cfg(f"model={name}", *overrides).model)
    return model, analysis.analyze(model, models.input_shape(model))


def _spatial(result: analysis.Analysis) -> list[analysis.Row]:
    return [r for r in result.rows if r.type in CHECKED]


def test_allconv_matches_the_notes(compose_cfg):
    _, result = _analyze(compose_cfg, "mnist_allconv")
    rows = _spatial(result)
    assert [r.output_shape[1] for r in rows] == [28, 28, 14, 14, 14, 7, 5, 3, 1]
    assert [r.rf[0] for r in rows] == [3, 5, 6, 10, 14, 16, 24, 32, 40]
    assert [r.params for r in rows if r.type == "Conv"] == [80, 584, 1168, 2320, 4640, 18496, 5770]
    t = result.totals
    assert (t.params, t.trainable_params) == (33_058, 33_058)
    # the notes' torchsummary block: 0.00 / 0.17 / 0.13 / 0.30 MB
    assert [round(v, 2) for v in (t.input_mb, t.activation_mb, t.param_mb, t.total_mb)] == [
        0.0,
        0.17,
        0.13,
        0.30,
    ]
    assert not result.warnings  # RF 40 >= 28: the last layer sees the whole image


def test_alexnet_matches_the_notes(compose_cfg):
    _, result = _analyze(compose_cfg, "alexnet", "dataset.num_classes=1000")
    rows = _spatial(result)
    assert [r.output_shape[1] for r in rows] == [55, 27, 27, 13, 13, 13, 13, 6]
    convs = [r.params for r in rows if r.type == "Conv"]
    assert convs == [34_944, 614_656, 885_120, 1_327_488, 884_992]
    assert result.totals.params == 62_378_344
    assert rows[0].macs == 55 * 55 * 96 * 11 * 11 * 3  # 105,415,200


def test_single_layer_5x5_pad2_on_cifar():
    result = analysis.analyze(nn.Conv(10, (5, 5), padding=2), (1, 32, 32, 3))
    (row,) = result.rows
    assert (row.output_shape, row.params, row.padding) == ((1, 32, 32, 10), 760, ((2, 2), (2, 2)))


def test_channel_table_28x28():
    model = nn.Sequential([conv(32, 3), conv(64, 3), conv(128, 3)])
    rows = analysis.analyze(model, (1, 28, 28, 1)).rows
    assert [r.output_shape[1:] for r in rows] == [(26, 26, 32), (24, 24, 64), (22, 22, 128)]
    assert [r.params for r in rows] == [320, 18_496, 73_856]


def test_alexnet_on_28x28_names_the_layer_and_the_smallest_input():
    with pytest.raises(GeometryError) as info:
        analysis.analyze(AlexNet(num_classes=10), (1, 28, 28, 3))
    message = str(info.value)
    assert "'pool2'" in message
    assert "(2 - 3 + 0 + 0)/2 + 1" in message
    assert "67x67" in message
    analysis.analyze(AlexNet(num_classes=10), (1, 67, 67, 3))  # the hint is right...
    with pytest.raises(GeometryError):
        analysis.analyze(AlexNet(num_classes=10), (1, 66, 66, 3))  # ...and the smallest


def test_uneven_stride_warns_with_the_dropped_pixels():
    (row,) = analysis.analyze(conv(1, 3, stride=3), (1, 7, 7, 1)).rows
    assert row.output_shape[1:3] == (2, 2)
    (warning,) = row.warnings
    assert "on H and W" in warning and "2.333" in warning and "last 1 pixel" in warning
    (row,) = analysis.analyze(conv(1, 3, stride=2), (1, 7, 7, 1)).rows
    assert row.warnings == ()  # (7 - 3)/2 + 1 = 3 fits


def test_same_padding_is_lopsided():
    model = nn.Conv(4, (3, 3), strides=2, padding="SAME")
    (row,) = analysis.analyze(model, (1, 28, 27, 1)).rows
    assert row.padding == ((0, 1), (1, 1))  # the odd pixel goes to the high side
    assert row.output_shape == (1, 14, 14, 4)
    assert row.start == (1.5, 0.5)  # centre of the first unit: 0.5 + (1 - pad_low)


class TwoPaths(nn.Module):
    """Two 3x3 paths joined by an add; `shift` moves one path's padding to the high side."""

    shift: bool = False

    @nn.compact
    def __call__(self, x):
        a = conv(4, 3, padding=1, name="a")(x)
        pad = ((0, 2), (0, 2)) if self.shift else ((1, 1), (1, 1))
        b = nn.Conv(4, (3, 3), padding=pad, name="b")(x)
        b = conv(4, 3, padding=1, name="b2")(b)
        return Add()(a, b)


def test_branches_take_the_widest_aligned_path():
    add = analysis.analyze(TwoPaths(), (1, 8, 8, 1)).rows[-1]
    assert (add.type, add.rf, add.start, add.warnings) == ("Add", (5, 5), (0.5, 0.5), ())


def test_misaligned_branches_are_reported():
    add = analysis.analyze(TwoPaths(shift=True), (1, 8, 8, 1)).rows[-1]
    assert add.rf == (5, 5)
    assert any("not aligned" in w for w in add.warnings)


def test_residual_network_has_aligned_branches(compose_cfg):
    _, result = _analyze(compose_cfg, "resnet18")
    adds = [r for r in result.rows if r.type == "Add"]
    assert len(adds) == 8 and all(not r.warnings for r in adds)
    assert result.totals.trainable_params == 11_181_642
    assert result.totals.params - result.totals.trainable_params == 9_600  # BN statistics


def test_a_formula_disagreement_is_a_bug_that_raises(monkeypatch):
    monkeypatch.setattr(geometry, "conv_params", lambda *a, **k: 1)
    with pytest.raises(AnalysisError, match="formula gives 1 parameters"):
        analysis.analyze(conv(8, 3), (1, 8, 8, 1))


def test_lenet_warns_that_its_last_layer_does_not_see_the_image(compose_cfg):
    model, result = _analyze(compose_cfg, "lenet")
    assert any("'pool2' has a 10x10 receptive field" in w for w in result.warnings)
    off_size = analysis.analyze(model, (1, 28, 28, 1))
    assert any("576 at the model's declared input_size 32" in w for w in off_size.warnings)


@pytest.mark.parametrize("name", RUNNABLE)
def test_params_equal_the_real_pytree(compose_cfg, name):
    model, result = _analyze(compose_cfg, name)
    x = jax.ShapeDtypeStruct(models.input_shape(model), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # the pytree, as shapes
    assert result.totals.params == sum(a.size for a in jax.tree.leaves(variables))
    trainable = sum(a.size for a in jax.tree.leaves(variables["params"]))
    assert result.totals.trainable_params == trainable
    assert result.rows[-1].output_shape == jax.eval_shape(model.apply, variables, x).shape


def _xla_flops(fn, *shapes) -> float:
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("name", MODELS)
def test_macs_against_xla_cost_analysis(compose_cfg, name):
    """XLA counts 2 flops per multiply-add but only for taps on real pixels: padded taps are
    skipped. So each conv's XLA flops equal 2 x the non-padding taps (geometry.valid_taps), and
    2 x MACs exactly where there is no padding; dense layers are 2 x MACs."""
    _, result = _analyze(compose_cfg, name)
    for r in result.rows:
        if r.type == "Conv":
            cin, cout, g = r.input_shape[-1], r.output_shape[-1], r.groups

            def conv_fn(x, w, r=r, g=g):
                return jax.lax.conv_general_dilated(
                    x, w, r.stride, r.padding, rhs_dilation=r.dilation,
                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g,
                )  # fmt: skip

            flops = _xla_flops(conv_fn, r.input_shape, (*r.kernel, cin // g, cout))
            taps = [
                geometry.valid_taps(r.input_shape[1 + a], r.kernel[a], r.stride[a], r.padding[a])
                for a in range(2)
            ]
            assert flops == 2 * taps[0] * taps[1] * cin // g * cout, r.name
            if r.padding == ((0, 0), (0, 0)):
                assert flops == 2 * r.macs, r.name
            else:
                assert flops <= 2 * r.macs, r.name
        elif r.type == "Dense":
            flops = _xla_flops(jnp.dot, r.input_shape, (r.input_shape[-1], r.output_shape[-1]))
            assert flops == 2 * r.macs, r.name


def _linearised(model: nn.Module, variables, x, names: set[str]) -> dict:
    """Outputs of the layers in `names` on a linear copy of the model: ReLU(6) -> identity, max ->
    average pooling, kernels positive and normalised (each output a weighted mean), biases 0."""
    outputs = {}

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, layers.ReLU | layers.ReLU6):
            out = args[0]
        elif context.method_name == "__call__" and isinstance(m, layers.MaxPool):
            out = layers.AvgPool(m.window, m.stride, m.padding).apply({}, args[0])
        else:
            out = next_fun(*args, **kwargs)
        name = "/".join(m.scope.path)
        if context.method_name == "__call__" and name in names:
            outputs[name] = out
        return out

    with nn.intercept_methods(interceptor):
        model.apply(variables, x)
    return outputs


def _positive(path, leaf):
    if path[-1].key == "kernel":
        leaf = jnp.abs(leaf) + 1e-3
        return leaf / leaf.sum(axis=tuple(range(leaf.ndim - 1)), keepdims=True)
    return jnp.zeros_like(leaf) if path[-1].key == "bias" else leaf


def _expected(row: analysis.Row, axis: int, unit: int, size: int) -> tuple[int, int]:
    """Pixels covered by output unit `unit`: centre +- rf/2, clipped to the image."""
    centre = row.start[axis] + unit * row.jump[axis]
    first, last = centre - row.rf[axis] / 2, centre + row.rf[axis] / 2 - 1
    assert first == int(first), (row.name, first)
    return max(int(first), 0), min(int(last), size - 1)


@pytest.mark.parametrize("name", [m for m in RUNNABLE if m != "vgg16_small"])  # vgg11's layers
def test_receptive_fields_against_gradient_footprints(compose_cfg, name):
    """For the first and last output unit of every conv, pool and add (of about 12 spread over
    the deepest models): the input pixels whose gradient is non-zero span exactly the receptive
    field the analysis computed."""
    model, result = _analyze(compose_cfg, name)
    shape = models.input_shape(model)
    spec = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))  # no eager init
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.0, s.shape).astype(s.dtype), spec)
    variables = {**variables, "params": jax.tree.map_with_path(_positive, variables["params"])}
    spatial = _spatial(result)
    every = max(1, len(spatial) // 12)  # at most about 12 rows, spread, and the last
    rows = {r.name: r for r in spatial[::every] + spatial[-1:]}
    x = jax.random.uniform(jax.random.key(1), shape)
    forward = lambda x: _linearised(model, variables, x, set(rows))  # noqa: E731
    probes = [(name_, unit) for name_, row in rows.items()
              for unit in ((0, 0), tuple(d - 1 for d in row.output_shape[1:3]))]  # fmt: skip
    outs = jax.eval_shape(forward, x)
    cotangents = {k: np.zeros((len(probes), *v.shape), v.dtype) for k, v in outs.items()}
    for n, (name_, (i, j)) in enumerate(probes):
        cotangents[name_][n, 0, i, j, 0] = 1.0

    def input_gradients(x, cotangents):  # every probe's backward pass at once, compiled
        return jax.vmap(jax.vjp(forward, x)[1])(cotangents)[0]

    grads = jax.jit(input_gradients)(x, cotangents)
    for (name_, (i, j)), grad in zip(probes, np.asarray(grads), strict=True):
        box = probe.footprint(np.abs(grad[0]).sum(axis=-1))
        assert box is not None, name_
        assert box[0] == _expected(rows[name_], 0, i, shape[1]), (name_, i)
        assert box[1] == _expected(rows[name_], 1, j, shape[2]), (name_, j)


def test_memory_estimate_against_xla(compose_cfg):
    """The estimate (params + input + 2 x activations) against the compiled training step's
    buffers (arguments + outputs + temporaries): same order of magnitude."""
    model, _ = _analyze(compose_cfg, "mnist_allconv")
    check = analysis.xla_check(model, (128, 28, 28, 1))
    assert 0.5 < check["memory_ratio"] < 2.0, check
    assert 0.9 < check["flops_ratio"] < 1.1, check
