"""Layer geometry against the worked numbers of the course notes."""

import re

import pytest

from cnnjax.geometry import (
    RF,
    AxisLayer,
    GeometryError,
    chain_output_sizes,
    chain_rf,
    compose_rf,
    conv_macs,
    conv_output_size,
    conv_params,
    dense_macs,
    dense_params,
    dropped_border,
    fits_evenly,
    layers_to_reach_rf,
    layers_to_shrink,
    mb,
    merge_rf,
    min_input_size,
    pads2d,
    resolve_padding,
)

ALEXNET = [
    AxisLayer(11, 4, 0, name="conv1"),
    AxisLayer(3, 2, name="pool1"),
    AxisLayer(5, 1, 2, name="conv2"),
    AxisLayer(3, 2, name="pool2"),
    AxisLayer(3, 1, 1, name="conv3"),
    AxisLayer(3, 1, 1, name="conv4"),
    AxisLayer(3, 1, 1, name="conv5"),
    AxisLayer(3, 2, name="pool5"),
]

# The notes' 9-layer all-convolutional MNIST net: (layer, in_ch, out_ch), out_ch None for pools.
ALL_CONV = [
    (AxisLayer(3, 1, 1, name="conv1"), 1, 8),
    (AxisLayer(3, 1, 1, name="conv2"), 8, 8),
    (AxisLayer(2, 2, name="pool1"), None, None),
    (AxisLayer(3, 1, 1, name="conv3"), 8, 16),
    (AxisLayer(3, 1, 1, name="conv4"), 16, 16),
    (AxisLayer(2, 2, name="pool2"), None, None),
    (AxisLayer(3, 1, 0, name="conv5"), 16, 32),
    (AxisLayer(3, 1, 0, name="conv6"), 32, 64),
    (AxisLayer(3, 1, 0, name="conv7"), 64, 10),
]
ALL_CONV_LAYERS = [layer for layer, _, _ in ALL_CONV]


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad", "expected"),
    [(7, 3, 1, 0, 5), (7, 3, 2, 0, 3), (7, 3, 3, 0, 2), (7, 3, 1, 1, 7), (32, 5, 1, 2, 32)],
)
def test_conv_output_size(size, kernel, stride, pad, expected):
    assert conv_output_size(size, kernel, stride, pad) == expected


def test_stride_three_drops_a_pixel():
    # (7 - 3)/3 + 1 = 2.33: two outputs, one trailing pixel never seen.
    assert conv_output_size(7, 3, 3) == 2
    assert dropped_border(7, 3, 3) == 1
    assert not fits_evenly(7, 3, 3)
    assert fits_evenly(7, 3, 2)
    assert dropped_border(7, 3, 2) == 0


def test_dilation_widens_the_kernel():
    assert conv_output_size(7, 3, dilation=2) == 3  # F = 2*(3-1)+1 = 5
    assert compose_rf(RF(), 3, dilation=2) == RF(size=5, jump=1, start=2.5)


def test_alexnet_sizes_on_227():
    assert chain_output_sizes(227, ALEXNET) == [55, 27, 27, 13, 13, 13, 13, 6]


def test_too_small_input_names_layer_and_formula():
    expected = (
        "layer 'conv3': output size (W - F + P_lo + P_hi)/S + 1 = (5 - 11 + 0 + 0)/4 + 1 = -0.5"
    )
    with pytest.raises(GeometryError, match=re.escape(expected)) as info:
        conv_output_size(5, 11, 4, layer="conv3")
    assert "needs an input of at least 11" in str(info.value)


def test_chain_error_names_the_failing_layer():
    with pytest.raises(GeometryError, match=r"layer 'pool5': .* = \(2 - 3 \+ 0 \+ 0\)/2 \+ 1"):
        chain_output_sizes(66, ALEXNET)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(28, 2, 2, (0, 0)), (7, 4, 1, (1, 2)), (5, 3, 2, (1, 1)), (6, 3, 2, (0, 1))],
)
def test_same_padding_puts_the_odd_pixel_high(size, kernel, stride, expected):
    assert resolve_padding("SAME", size, kernel, stride) == expected
    assert conv_output_size(size, kernel, stride, "SAME") == -(-size // stride)


@pytest.mark.parametrize(
    ("padding", "expected"), [("VALID", (0, 0)), (2, (2, 2)), ((1, 3), (1, 3)), ("CAUSAL", (2, 0))]
)
def test_other_paddings(padding, expected):
    assert resolve_padding(padding, 10, 3, 1) == expected


def test_circular_padding_is_refused():
    with pytest.raises(GeometryError, match="layer 'wrap': padding 'CIRCULAR'"):
        resolve_padding("CIRCULAR", 8, 3, 1, layer="wrap")


@pytest.mark.parametrize(
    ("kernel", "in_ch", "out_ch", "expected"),
    [
        (5, 3, 10, 760),
        (3, 1, 32, 320),
        (3, 32, 64, 18_496),
        (3, 64, 128, 73_856),
        (11, 3, 96, 34_944),
        (5, 96, 256, 614_656),
        (3, 256, 384, 885_120),
        (3, 384, 384, 1_327_488),
        (3, 384, 256, 884_992),
    ],
)
def test_conv_params(kernel, in_ch, out_ch, expected):
    assert conv_params((kernel, kernel), in_ch, out_ch) == expected


def test_all_conv_params_sum():
    params = [
        0 if cin is None else conv_params((layer.kernel, layer.kernel), cin, cout)
        for layer, cin, cout in ALL_CONV
    ]
    assert params == [80, 584, 0, 1_168, 2_320, 0, 4_640, 18_496, 5_770]
    assert sum(params) == 33_058


def test_grouped_and_bias_free_params():
    assert conv_params((3, 3), 32, 32, groups=32) == 320  # depthwise
    assert conv_params((3, 3), 32, 64, groups=2) == 9_280
    assert conv_params((3, 3), 32, 64, bias=False) == 18_432
    assert dense_params(4096, 1000) == 4_097_000
    assert dense_params(10, 5, bias=False) == 50


def test_indivisible_groups():
    with pytest.raises(GeometryError, match=r"layer 'dw': groups = 3 .* in_ch = 32"):
        conv_params((3, 3), 32, 64, groups=3, layer="dw")
    with pytest.raises(GeometryError, match="groups = 4"):
        conv_macs((8, 8), (3, 3), 8, 6, groups=4)


def test_macs():
    assert conv_macs((55, 55), (11, 11), 3, 96) == 105_415_200  # AlexNet conv1
    assert conv_macs((28, 28), (3, 3), 32, 32, groups=32) == 225_792
    assert dense_macs(4096, 4096) == 16_777_216


def test_all_conv_sizes_and_receptive_fields():
    assert chain_output_sizes(28, ALL_CONV_LAYERS) == [28, 28, 14, 14, 14, 7, 5, 3, 1]
    rfs = chain_rf(28, ALL_CONV_LAYERS)
    assert [rf.size for rf in rfs] == [3, 5, 6, 10, 14, 16, 24, 32, 40]
    assert [rf.jump for rf in rfs] == [1, 1, 2, 2, 2, 4, 4, 4, 4]
    assert rfs[-1].start == 14.0  # the single output unit is centred on the 28-pixel image


def test_pooling_adds_k_minus_one_jumps_not_doubling():
    layers = [AxisLayer(3, name=f"conv{i}") for i in range(5)]
    layers += [AxisLayer(2, 2, name="pool"), AxisLayer(1, name="1x1")]
    layers += [AxisLayer(3, name="conv5"), AxisLayer(3, name="conv6")]
    sizes = [rf.size for rf in chain_rf(400, layers)]
    assert sizes == [3, 5, 7, 9, 11, 12, 12, 16, 20]


def test_merge_rf_aligned():
    main = chain_rf(8, [AxisLayer(3, 2, 1), AxisLayer(3, 1, 1)])[-1]
    shortcut = compose_rf(RF(), 1, 2)
    assert (main, shortcut) == (RF(7, 2, 0.5), RF(1, 2, 0.5))
    assert merge_rf([main, shortcut]) == (main, None)


def test_merge_rf_misaligned_same_padding():
    # XLA 'SAME' pads a stride-2 conv on an even input only on the high side: start shifts.
    main = chain_rf(8, [AxisLayer(3, 2, "SAME"), AxisLayer(3, 1, "SAME")])[-1]
    merged, message = merge_rf([main, compose_rf(RF(), 1, 2)])
    assert merged == RF(7, 2, 1.5)
    assert message is not None
    assert "path 0: jump 2, start 1.5; path 1: jump 2, start 0.5" in message


def test_merge_rf_misaligned_jumps():
    merged, message = merge_rf([RF(5, 1, 2.5), RF(3, 2, 2.5)])
    assert merged is None  # windows that grow apart: no one receptive field
    assert message is not None and "path 1: jump 2" in message


def test_merge_rf_takes_the_hull_of_shifted_windows():
    # the max of x[0::2] and x[1::2] (a 2-wide max-pool written by hand) sees pixels 2i and 2i+1
    merged, message = merge_rf([RF(1, 2, 0.5), RF(1, 2, 1.5)])
    assert merged == RF(2, 2, 1.0)
    assert message is not None and "not aligned" in message


def test_planners_199():
    assert layers_to_reach_rf(199) == 99
    assert layers_to_shrink(199) == 99
    assert layers_to_reach_rf(1) == 0
    assert layers_to_shrink(8, 3, 2) == 2  # 8 -> 3 -> 1


def test_shrink_that_never_lands_on_one():
    with pytest.raises(GeometryError, match=r"after 99 layers the size is 2"):
        layers_to_shrink(200)
    with pytest.raises(GeometryError, match="get stuck at size 9"):
        layers_to_shrink(9, 3, 1, "SAME")
    with pytest.raises(GeometryError, match="never grows"):
        layers_to_reach_rf(5, kernel=1)


@pytest.mark.parametrize(("layers", "expected"), [(ALEXNET, 67), (ALL_CONV_LAYERS, 28)])
def test_min_input_size(layers, expected):
    assert min_input_size(layers) == expected
    assert chain_output_sizes(expected, layers)[-1] == 1
    with pytest.raises(GeometryError):
        chain_output_sizes(expected - 1, layers)


def test_min_input_size_with_same_padding():
    layers = [AxisLayer(3, 2, "SAME"), AxisLayer(3, 2, "SAME"), AxisLayer(3, 1, "VALID")]
    assert min_input_size(layers) == 9  # 9 -> 5 -> 3 -> 1
    with pytest.raises(GeometryError):
        chain_output_sizes(8, layers)


def test_mb():
    assert mb(3 * 224 * 224) == pytest.approx(0.574, abs=1e-3)
    assert mb(1024**2, bytes_per_element=2) == 2.0


def test_pads2d_takes_an_int_or_a_pair_per_axis():
    assert pads2d(2) == ((2, 2), (2, 2))
    assert pads2d([(0, 1), [2, 3]]) == ((0, 1), (2, 3))


def test_a_units_window_is_its_centre_plus_minus_half_the_field():
    """The all-conv net's conv7 (rf 40, jump 4, start 14) and pool1 (rf 6, jump 2, start 1)."""
    conv7, pool1 = RF(40, 4, 14.0), RF(6, 2, 1.0)
    assert (conv7.centre(0), conv7.window(0)) == (14.0, (-6, 33))  # 6 pixels beyond each side
    assert (pool1.centre(3), pool1.window(3)) == (7.0, (4, 9))  # 2x2 window 3 of 14: pixels 6, 7
    assert RF().window(5) == (5, 5)  # the input: a unit is its pixel
