"""Hand-set kernels (`cnnjax.plots.kernels`): what each does to a step edge and a constant image,
that filtering is the network's cross-correlation, the cosine table, hand_set_kernels.png for an
untrained conv (no training), and experiments/kernels/kernel_table.py's tables."""

import importlib.util
import math
from pathlib import Path

import jax
import matplotlib.image
import numpy as np
import pytest

from cnnjax.layers import conv
from cnnjax.plots import kernels, run_pictures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STUDY = Path(__file__).parents[1] / "experiments" / "kernels" / "kernel_table.py"
_spec = importlib.util.spec_from_file_location("kernel_table", STUDY)
kernel_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_table)


@pytest.fixture(scope="module")
def untrained_kernel() -> np.ndarray:
    """An initialised 3x3 conv reading one channel, 4 kernels: (3, 3, 1, 4)."""
    variables = conv(4, 3, padding=1).init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    return np.asarray(variables["params"]["kernel"])


def test_sobel_x_gives_4_per_unit_step_at_a_vertical_edge_and_0_elsewhere():
    step = np.zeros((8, 10), np.float32)
    step[:, 5:] = 1.0  # dark left of column 5, bright from it on
    response = kernels.filter_image(step, kernels.SOBEL_X[None])[0]
    inside = response[1:-1]  # rows whose window stays in the image
    assert (inside[:, [4, 5]] == 4.0).all()  # the two columns whose window spans the edge
    assert (inside[:, [1, 2, 3, 6, 7, 8]] == 0.0).all()  # flat on both sides
    across = kernels.filter_image(step.T, kernels.SOBEL_Y[None])[0]  # a horizontal edge
    np.testing.assert_array_equal(across[4:6, 1:-1], 4.0)
    flipped = kernels.filter_image(step[:, ::-1], kernels.SOBEL_X[None])[0]  # bright to dark
    np.testing.assert_array_equal(flipped[1:-1, [4, 5]], -4.0)


@pytest.mark.parametrize("name", ["box_blur", "gaussian_blur", "sharpen"])
def test_blurs_and_sharpen_keep_a_constant_image_away_from_borders(name):
    kernel = kernels.HAND_SET[name]
    assert kernel.sum() == pytest.approx(1.0)
    flat = np.full((6, 7), 0.7, np.float32)
    out = kernels.filter_image(flat, kernel[None])[0]
    np.testing.assert_allclose(out[1:-1, 1:-1], 0.7, rtol=1e-6)
    assert abs(out[0, 0] - 0.7) > 0.05  # the zero padding shows at a corner


def test_edge_kernels_give_0_on_a_constant_image_and_constants_are_read_only():
    edges = np.stack([kernels.SOBEL_X, kernels.SOBEL_Y, kernels.LAPLACIAN])
    out = kernels.filter_image(np.full((5, 5), 3.0, np.float32), edges)
    np.testing.assert_array_equal(out[:, 1:-1, 1:-1], 0.0)
    with pytest.raises(ValueError):
        kernels.SOBEL_X[0, 0] = 5.0


def test_filtering_is_the_network_conv_cross_correlation(untrained_kernel):
    image = np.random.default_rng(0).random((9, 11), np.float32)
    layer = conv(4, 3, padding=1, use_bias=False)
    variables = {"params": {"kernel": untrained_kernel}}
    network = np.asarray(layer.apply(variables, image[None, :, :, None]))[0]
    ours = kernels.filter_image(image, np.moveaxis(untrained_kernel[:, :, 0], -1, 0))
    np.testing.assert_allclose(np.moveaxis(ours, 0, -1), network, atol=1e-5)


def test_hand_set_kernels_against_each_other_match_their_formulas():
    pairs = kernels.hand_set_pairs()
    names = pairs.names
    cos = dict(zip(names, pairs.cosine_NxM, strict=True))
    at = names.index
    assert cos["sobel_x"][at("sobel_y")] == pytest.approx(0.0, abs=1e-12)
    assert cos["sharpen"][at("laplacian")] == pytest.approx(-72 / math.sqrt(5200))  # -0.998
    assert cos["gaussian_blur"][at("sharpen")] == pytest.approx(92 / math.sqrt(17680))  # 0.692
    assert cos["gaussian_blur"][at("laplacian")] == pytest.approx(-24 / math.sqrt(1360))  # -0.651
    assert np.isnan(pairs.cosine_NxM[:, at("box_blur")]).all()  # constant: nothing left
    assert pairs.undefined() == ["box_blur"]
    shares = dict(zip(names, pairs.mean_share_N, strict=True))
    assert shares["box_blur"] == pytest.approx(1.0)
    assert shares["gaussian_blur"] == pytest.approx(256 / 324)  # 16^2 / (9 * 36): 0.790
    assert shares["sobel_x"] == shares["laplacian"] == 0.0
    table = pairs.markdown(names)
    assert "| sharpen | +0.000 | +0.000 | n/a | +0.692 | +1.000 | -0.998 |" in table
    assert "n/a: box_blur is constant" in table


def test_similarity_finds_a_scaled_shifted_flipped_sobel():
    made = np.stack(
        [-2 * kernels.SOBEL_X + 0.5, kernels.SOBEL_Y + kernels.SOBEL_X, np.ones((3, 3))]
    )
    sim = kernels.similarity(made)
    assert sim.match(0) == "-sobel_x 1.00"  # up to sign, brightness offset removed
    assert sim.cosine_NxM[1, 0] == pytest.approx(1 / math.sqrt(2))  # halfway between the Sobels
    assert sim.match(2) == "no match" and sim.mean_share_N[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        kernels.similarity(np.zeros((2, 5, 5)))


def test_picture_of_an_untrained_conv(tmp_path, untrained_kernel):
    image = np.random.default_rng(1).random((12, 12), np.float32)
    learned = np.moveaxis(untrained_kernel[:, :, 0], -1, 0)
    path = tmp_path / "hand_set_kernels.png"
    sim = kernels.draw_hand_set_kernels(path, image, learned, "conv1")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).shape == (500, 770, 4)  # 4 x 7 panels of 1.1 inches
    assert sim is not None and sim.cosine_NxM.shape == (4, 6)


def test_visualize_skips_the_picture_unless_the_first_conv_reads_one_channel(tmp_path):
    image = np.zeros((10, 10, 1), np.float32)
    rgb = {"params": {"conv1": {"kernel": np.zeros((3, 3, 3, 4), np.float32)}}}
    written = run_pictures._Written([])
    run_pictures._hand_set_picture(tmp_path, rgb, {"conv1": image}, image, 8, written)
    assert written.files == []
    assert written.lines == [
        "skipped hand_set_kernels.png: conv1 reads 3 channels and the hand-set kernels filter "
        "one grey channel"
    ]
    run_pictures._hand_set_picture(tmp_path, rgb, {}, image, 8, written)
    assert written.lines[-1] == "skipped hand_set_kernels.png: the model has no conv layer"


def test_chance_level_of_random_kernels_matches_the_readme():
    best = kernel_table.chance_best(2000)
    assert ((best >= 0) & (best <= 1)).all()
    # README (100,000 kernels): median 0.523, 95% 0.783; 2,000 agree to sampling error
    assert np.quantile(best, 0.5) == pytest.approx(0.523, abs=0.02)
    assert np.quantile(best, 0.95) == pytest.approx(0.783, abs=0.03)
    random = np.random.default_rng(0).standard_normal((2000, 3, 3))
    shares = kernels.similarity(random).mean_share_N  # 1 of 9 directions: 1/9 on average
    assert shares.mean() == pytest.approx(1 / 9, abs=0.01)
    assert "| best \\|cosine\\| | 0.500 |" in kernel_table.chance_table(np.full(10, 0.5))


def test_moved_table_of_a_kernel_that_doubled_and_one_that_turned():
    initial = np.stack([kernels.SOBEL_X, kernels.SOBEL_Y])
    trained = np.stack([2 * kernels.SOBEL_X, kernels.SOBEL_X])
    table = kernel_table.moved_table(initial, trained).splitlines()
    assert table[2] == "| ch 0 | +sobel_x 1.00 | +sobel_x 1.00 | +1.000 | 1.00 |"
    assert table[3] == f"| ch 1 | +sobel_y 1.00 | +sobel_x 1.00 | +0.000 | {math.sqrt(2):.2f} |"
