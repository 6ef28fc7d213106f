"""experiments/dilation and BlockNet's `dilation`: the receptive field 1 + 2*d*n of stacked
dilated 3x3 convs against the analysis, dilation adding no weights nor MACs, the default BlockNet
unchanged, a dilated conv's input-gradient footprint, and the numbers the study's README quotes."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cnnjax import analysis, probe
from cnnjax.errors import ConfigError
from cnnjax.models.blocknet import BlockNet

STUDY = Path(__file__).parents[1] / "experiments" / "dilation"
_spec = importlib.util.spec_from_file_location("plot_dilation", STUDY / "plot_dilation.py")
plot_dilation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_dilation)


def table_of(model: BlockNet, size: int = 28) -> analysis.Analysis:
    return analysis.analyze(model, (1, size, size, model.in_channels))


def test_the_receptive_field_of_stacked_dilated_convs_is_1_plus_2dn():
    table = plot_dilation.rf_table()  # raises where the analysis and the closed form differ
    assert table == {
        1: [3, 5, 7, 9, 11, 13, 15, 17],
        2: [5, 9, 13, 17, 21, 25, 29, 33],
        4: [9, 17, 25, 33, 41, 49, 57, 65],
    }
    assert table == {d: [1 + 2 * d * n for n in range(1, 9)] for d in (1, 2, 4)}


@pytest.mark.parametrize("dilation", [2, (1, 3)])
def test_dilation_adds_no_weights_nor_macs(dilation):
    blocks = ((4,), (4, 4))
    plain, dilated = (table_of(BlockNet(blocks=blocks, dilation=d)) for d in (1, dilation))
    assert dilated.totals.params == plain.totals.params
    assert dilated.totals.macs == plain.totals.macs
    assert [r.output_shape for r in dilated.rows] == [r.output_shape for r in plain.rows]
    assert plot_dilation.conv3x3_rows(dilated)[-1].rf > plot_dilation.conv3x3_rows(plain)[-1].rf


def test_the_default_blocknet_is_unchanged():
    """Undilated 3x3 convs padded 1, as before the option: the same table (parameters, MACs,
    receptive fields), also for a dilation of 1 given per block."""
    table = table_of(BlockNet())
    convs = plot_dilation.conv3x3_rows(table)
    assert all(r.dilation == (1, 1) and r.padding == ((1, 1), (1, 1)) for r in convs)
    assert [r.rf[0] for r in convs] == [3, 5, 10, 14, 24, 32]  # the class docstring's
    assert (table.totals.params, table.totals.macs) == (20_106, 5_560_128)
    per_block = table_of(BlockNet(dilation=[1, 1, 1]))
    assert per_block.rows == table.rows


@pytest.mark.parametrize("dilation", [0, [1, 2], [2.0, 1, 1]])
def test_a_dilation_that_does_not_fit_the_blocks_is_refused(dilation):
    with pytest.raises(ConfigError, match="dilation="):
        BlockNet(dilation=dilation).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


@pytest.mark.parametrize("d", [1, 2, 4])
def test_a_dilated_convs_input_gradient_has_holes_d_apart(d):
    """jax.grad of one centre output unit (all weights 1, so the ReLU passes it) is nonzero on
    the 3x3 taps d apart and nowhere else: its footprint spans the analysis's 2d + 1."""
    model = plot_dilation.stack(1, d, width=1)
    x = jnp.ones((1, 15, 15, 1))
    variables = plot_dilation.ones_variables(model, x)
    gradient = probe.unit_gradient(model, variables, x, "block1_conv1", (7, 7))
    taps = [7 - d, 7, 7 + d]
    expected = np.zeros((15, 15), bool)
    expected[np.ix_(taps, taps)] = True
    np.testing.assert_array_equal(gradient != 0, expected)
    row = plot_dilation.conv3x3_rows(table_of(model, 15))[0]
    rf = probe.receptive_field(row, (7, 7), gradient)
    assert rf.rf == (2 * d + 1,) * 2
    assert rf.footprint == rf.window == ((7 - d, 7 + d),) * 2


@pytest.mark.parametrize("d", [2, 4])
def test_a_stack_of_one_dilation_is_wired_to_one_pixel_in_d_squared(d):
    """The README's shares: 3 convs of dilation d reach the 2*3 + 1 offsets that are multiples
    of d per axis, of the 2*3*d + 1 of the window."""
    gradient, rf = plot_dilation.stack_wiring(3, d)
    assert plot_dilation.window_coverage(gradient, rf) == pytest.approx((7 / (6 * d + 1)) ** 2)


STUDY_MODELS = {  # name: 3x3 convs, last conv RF, params, MACs (README)
    "rf28_plain6": (7, 28, 14_522, 2_903_936),
    "rf28_dilated3": (4, 28, 7_562, 1_549_184),
    "rf28_dilated2": (3, 28, 5_242, 1_097_600),
    "rf16_plain3": (4, 16, 7_562, 1_549_184),
    "rf12_plain2": (3, 12, 5_242, 1_097_600),
}


@pytest.mark.parametrize("name", STUDY_MODELS)
def test_the_study_models(name):
    cfg = OmegaConf.load(STUDY / "model" / f"{name}.yaml")
    cfg.num_classes = 10
    table = table_of(instantiate(cfg))
    convs = plot_dilation.conv3x3_rows(table)
    assert (len(convs), convs[-1].rf[0], table.totals.params, table.totals.macs) == (
        STUDY_MODELS[name]
    )


@pytest.mark.parametrize(("name", "blocks", "dilation", "wired"), [
    ("rf28_dilated3", ((16,), (16,) * 3), (1, 2), 1.0),
    ("rf28_dilated2", ((16,), (16,) * 2), (1, 3), 19**2 / 27**2),
])  # fmt: skip
def test_the_study_wiring(name, blocks, dilation, wired):
    """The README's wired shares: after the pool each pixel of the 14x14 map stands for 4
    contiguous input pixels; dilation 2 there spaces taps 4 apart (no holes), dilation 3 spaces
    them 6 apart (5 groups of 4 of the window's 27 clipped pixels per axis, one group clipped
    to 3)."""
    model = BlockNet(blocks=blocks, dilation=dilation)
    row, unit = plot_dilation.last_conv_unit(model)
    gradient = plot_dilation.wiring(model, row.name, unit)
    rf = probe.receptive_field(row, unit, gradient)
    assert (row.rf, rf.clipped) == ((28, 28), ((0, 26), (0, 26)))
    assert plot_dilation.window_coverage(gradient, rf) == pytest.approx(wired)
