"""The effective receptive field (cnnjax.probe) and experiments/effective_receptive_field's code:
exact path counts on a linear all-ones net, the mass radii of hand-made maps, the study's feature
layers, and every study model's untrained ERF inside its analysis window."""

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONF_DIR, compose_config
from hydra.utils import instantiate

from cnnjax import analysis, models, probe

STUDY = CONF_DIR.parent / "experiments" / "effective_receptive_field" / "erf.py"
_spec = importlib.util.spec_from_file_location("erf_study", STUDY)
erf_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(erf_study)


class OnesStack(nn.Module):
    """Three 3x3 convs (padding 1, no bias, no nonlinearity) with every weight 1."""

    features: int = 2

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for k in (1, 2, 3):
            conv = nn.Conv(
                self.features, (3, 3), padding=1, use_bias=False,
                kernel_init=nn.initializers.ones, name=f"conv{k}",
            )  # fmt: skip
            x_BxHxWxC = conv(x_BxHxWxC)
        return x_BxHxWxC


def paths_back(shape: tuple[int, int], unit: tuple[int, int], layers: int = 3) -> np.ndarray:
    """The number of paths from `unit` of the last of `layers` 3x3 all-ones convs with zero
    padding 1 back to each input pixel: a delta spread by a 3x3 sum of ones per layer."""
    counts = np.zeros(shape)
    counts[unit] = 1
    for _ in range(layers):
        padded = np.pad(counts, 1)
        counts = sum(padded[i : i + shape[0], j : j + shape[1]] for i in range(3) for j in range(3))
    return counts


def test_the_erf_of_a_linear_all_ones_net_counts_its_paths():
    model, x = OnesStack(), jax.random.normal(jax.random.key(0), (5, 9, 9, 2))
    variables = jax.jit(model.init)(jax.random.key(1), x[:1])
    table = analysis.analyze(model, (1, 9, 9, 2))
    row, unit = probe.choose_unit(table, None, None)
    assert (row.name, unit, row.rf) == ("conv3", (4, 4), (7, 7))
    paths_1d = np.convolve(np.convolve(np.ones(3), np.ones(3)), np.ones(3))  # 1 3 6 7 6 3 1
    # 2 input channels x 2 channels per layer x 3 layers: 2 * 2**3 channel paths per pixel path
    counts = 2 * 2**3 * np.outer(paths_1d, paths_1d)
    erf = probe.effective_receptive_field(model, variables, x, "conv3", unit, batch_size=2)
    expected = np.zeros((9, 9))
    expected[1:8, 1:8] = counts
    np.testing.assert_allclose(erf, expected, rtol=1e-6)
    np.testing.assert_allclose(erf, 2 * 2**3 * paths_back((9, 9), unit), rtol=1e-6)
    # the corner unit: its window hangs over the top and left; each layer's padding cuts paths
    corner = probe.effective_receptive_field(model, variables, x, "conv3", (0, 0))
    expected = 2 * 2**3 * paths_back((9, 9), (0, 0))
    # back to pixel 0 per axis: steps 0 0 0, +1 -1 0, +1 0 -1, 0 +1 -1 (never below 0)
    assert expected[0, 0] == 2 * 2**3 * 4**2 and not expected[4:].any()
    np.testing.assert_allclose(corner, expected, rtol=1e-6)
    np.testing.assert_array_equal(probe.unit_gradient(model, variables, x[:1], "conv3", (0, 0)),
                                  corner)  # fmt: skip
    rf = probe.receptive_field(row, unit, erf)
    assert rf.window == rf.footprint == ((1, 7), (1, 7))
    mass = erf_study.checked_mass(erf, rf)
    assert mass.inside == pytest.approx(1.0)
    # of 27**2 paths, the centred 3x3 holds (6+7+6)**2, the 5x5 (3+6+7+6+3)**2, the 7x7 all
    assert (mass.r50, mass.r95) == (2.0, 3.0)
    assert (19 / 27) ** 2 < 0.5 < (25 / 27) ** 2 < 0.95


def test_mass_radii_of_hand_made_maps():
    weights = np.zeros((5, 5))
    weights[2, 2], weights[1, 2], weights[4, 4] = 0.5, 0.3, 0.2  # rings 0, 1 and 2
    centre = (2.5, 2.5)  # pixel (2, 2)'s centre
    assert probe.mass_radius(weights, centre, 0.5) == 0.0  # exactly half in the centre pixel
    assert probe.mass_radius(weights, centre, 0.8) == 1.0
    assert probe.mass_radius(weights, centre, 0.95) == 2.0
    mass = probe.mass_radii(weights, centre, ((1, 3), (1, 3)))
    assert (mass.r50, mass.r95, mass.inside) == (0.0, 2.0, pytest.approx(0.8))
    assert probe.mass_radii(weights, centre, ((-9, 9), (-9, 9))).inside == pytest.approx(1.0)
    assert [probe.mass_within(weights, centre, r) for r in (0, 0.5, 1, 5)] == pytest.approx(
        [0.5, 0.5, 0.8, 1.0]
    )
    # a centre between pixels: squares of 2x2, 4x4 pixels have radii 0.5, 1.5
    uniform = np.ones((4, 4))
    assert probe.mass_radius(uniform, (2.0, 2.0), 0.25) == 0.5
    assert probe.mass_radius(uniform, (2.0, 2.0), 0.26) == 1.5
    with pytest.raises(ValueError, match="all-zero map"):
        probe.mass_radius(np.zeros((3, 3)), (1.5, 1.5), 0.5)


@pytest.mark.parametrize(
    ("size", "centre", "r50", "r95", "share"),
    [
        (28, (14.0, 14.0), 9.5, 13.5, 400 / 784),  # side 20: 400/784 >= 0.5 > 324/784
        (32, (0.5, 0.5), 22.0, 31.0, 529 / 1024),  # from a corner: 23**2 = 529 >= 512 > 484
    ],
)
def test_the_uniform_radii_the_readme_quotes(size, centre, r50, r95, share):
    uniform = np.ones((size, size))
    assert probe.mass_radius(uniform, centre, 0.5) == r50
    assert probe.mass_radius(uniform, centre, 0.95) == r95  # all: 0.95 > (1 - 1/size)**2
    assert probe.mass_within(uniform, centre, r50) == pytest.approx(share)


def untrained_variables(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> dict:
    """Random weights at an init's scale (normal / sqrt(fan-in), zero biases, BatchNorm as the
    identity), drawn in numpy on `jax.eval_shape`'s shapes: no initialiser to compile."""
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct(shape, np.float32)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        if any(k in name for k in ("bias", "mean")):
            return np.zeros(leaf.shape, leaf.dtype)
        if any(k in name for k in ("scale", "var")):
            return np.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    shapes = jax.eval_shape(model.init, jax.random.key(seed), x)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize(
    ("overrides", "layer", "later", "unit", "rf", "centre"),
    [
        # the plain nets' last 3x3 conv, the last feature map: only the classifier conv follows
        (["model=mnist_allconv"], "conv6", ["conv7"], (1, 1), 32, 14.0),
        (["model=blocknet"], "block3_conv2", ["classifier"], (3, 3), 32, 14.0),
        # resnet18_small's stem, blocks and strided shortcuts, two stages of one block (faster)
        (["model=resnet18_small", "model.stage_sizes=[1,1]"], "layer2_0/Add_0", [],
         (1, 1), 51, 8.5),
    ],
)  # fmt: skip
def test_every_study_models_untrained_erf_lies_inside_its_window(
    overrides, layer, later, unit, rf, centre
):
    model = instantiate(compose_config("train", *overrides).model)
    shape = models.input_shape(model)
    table = analysis.analyze(model, shape)
    names = [r.name for r in table.spatial_rows]
    assert names[names.index(layer) + 1 :] == later  # the spatial layers after the probed one
    if len(overrides) == 1:  # an uncut study model: erf.py probes this layer
        assert erf_study.FEATURE_LAYERS[overrides[0].removeprefix("model=")] == layer
    x = jax.random.normal(jax.random.key(0), (2, *shape[1:]))
    variables = untrained_variables(model, shape)
    result = erf_study.model_erf(model, table, {"untrained": variables}, x, layer, batch_size=2)
    assert (result.rf.layer, result.rf.unit, result.rf.rf) == (layer, unit, (rf, rf))
    assert result.rf.centre == (centre, centre)
    assert result.masses["untrained"].inside == pytest.approx(1.0, abs=1e-6)
    assert result.maps["untrained"].sum() > 0
    # an earlier layer whose centre unit's window lies inside the image: nothing outside it
    row = next(r for r in reversed(table.spatial_rows) if r.rf and r.rf[0] < shape[1] // 2)
    inner = (row.output_shape[1] - 1) // 2, (row.output_shape[2] - 1) // 2
    erf = probe.effective_receptive_field(model, variables, x, row.name, inner)
    window = probe.receptive_field(row, inner, erf)
    assert not window.beyond and window.footprint_inside and erf.sum() > 0
    assert erf_study.checked_mass(erf, window).inside == pytest.approx(1.0, abs=1e-6)
    outside = erf.copy()
    (t, b), (left, r) = window.window
    outside[t : b + 1, left : r + 1] = 0
    assert not outside.any()
