"""The notes' small worked examples, each with the notes' numbers, computed by the project's own
layers and functions: the 5x5 image and its 3x3 kernel, the 2x2 max-pool, P = (F-1)/2, the
199x199 -> 1x1 chain, the backward pass of a convolution, and im2col's copies of each pixel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cnnjax import analysis
from cnnjax.geometry import conv_output_size
from cnnjax.layers import MaxPool, conv
from cnnjax.ops import conv2d_im2col, im2col

# notes 002 ("Converting FC and CONV") and 003 ("Convolutions"): the 5x5 binary image and the
# kernel of ones on the diagonals and corners
IMAGE_5x5 = np.array(
    [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 0, 0]],
    np.float32,
)
KERNEL_3x3 = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)
CONVOLVED = np.array([[4, 3, 4], [2, 4, 3], [2, 3, 4]], np.float32)


def run_conv(module: nn.Module, x: np.ndarray, kernel_HWIO: np.ndarray) -> np.ndarray:
    """`module` (a bias-free conv layer) with its kernel set to `kernel_HWIO`, on x (B, H, W, C)."""
    params = {"params": {"kernel": jnp.asarray(kernel_HWIO)}}
    return np.asarray(module.apply(params, jnp.asarray(x)))


def test_the_5x5_image_convolved_with_the_diagonal_kernel():
    x = IMAGE_5x5[None, :, :, None]
    k = KERNEL_3x3[:, :, None, None]
    out = run_conv(conv(1, 3, use_bias=False), x, k)[0, :, :, 0]
    np.testing.assert_array_equal(out, CONVOLVED)
    np.testing.assert_array_equal(np.asarray(conv2d_im2col(x, k))[0, :, :, 0], CONVOLVED)
    # the notes' one worked product, the top-left window times the kernel, is the first output
    top_left = IMAGE_5x5[:3, :3] * KERNEL_3x3
    np.testing.assert_array_equal(top_left, [[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    assert top_left.sum() == out[0, 0] == 4


def test_the_2x2_max_pool_keeps_6_and_3():
    x = np.array([[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]], np.float32)
    out = MaxPool(2).apply({}, jnp.asarray(x)[None, :, :, None])
    np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], [[6, 8], [3, 4]])
    # [[1, 1], [5, 6]] becomes 6 and [[3, 2], [1, 2]] becomes 3; 75 % of the values are dropped
    assert out.size == x.size // 4


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_padding_of_half_the_kernel_keeps_the_size(kernel):
    padding = (kernel - 1) // 2
    assert conv_output_size(7, kernel, 1, padding) == 7
    layer = conv(2, kernel, padding=padding)
    out_shape = jax.eval_shape(
        lambda x: layer.init_with_output(jax.random.key(0), x)[0], jnp.zeros((1, 7, 7, 3))
    )
    assert out_shape.shape == (1, 7, 7, 2)


def shrink_199_rows() -> list[analysis.Row]:
    """The conv rows of experiments/worked_examples/model/shrink_199.yaml on its 199x199 input."""
    study = CONF_DIR.parent / "experiments" / "worked_examples"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("summary", [f"hydra.searchpath=[file://{study}]", "model=shrink_199"])
    model = instantiate(cfg.model)
    table = analysis.analyze(model, (1, model.input_size, model.input_size, model.in_channels))
    return [r for r in table.rows if r.kernel == (3, 3)]


def test_99_convs_take_199_to_1_and_see_199():
    rows = shrink_199_rows()
    assert len(rows) == 99
    assert [r.output_shape[1] for r in rows] == list(range(197, 0, -2))
    assert [r.rf[0] for r in rows] == [2 * n + 1 for n in range(1, 100)]
    assert rows[-1].output_shape[1:3] == (1, 1) and rows[-1].rf == (199, 199)


@pytest.mark.parametrize("stride", [1, 2])
def test_the_backward_pass_of_a_convolution_is_a_convolution(stride):
    """The input gradient is the output gradient convolved ('full', spread by the stride) with
    the kernel flipped in space, its in and out channels swapped; the kernel gradient is the
    input correlated with the output gradient."""
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 9, 9, 3))
    kernel = jax.random.normal(kk, (3, 3, 3, 4))
    dims = ("NHWC", "HWIO", "NHWC")

    def forward(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                            dimension_numbers=dims)  # fmt: skip

    y, vjp = jax.vjp(forward, x, kernel)
    g = jax.random.normal(kg, y.shape)
    dx, dk = vjp(g)

    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # HWIO -> flipped HW, O as input
    full = ((2, 2), (2, 2))  # kernel - 1 on each side
    dx_conv = jax.lax.conv_general_dilated(
        g, flipped, (1, 1), full, lhs_dilation=(stride, stride), dimension_numbers=dims
    )
    np.testing.assert_allclose(dx_conv, dx, rtol=1e-5, atol=1e-5)

    # kernel gradient: x (channels as the batch) correlated with g (spread by the stride)
    dk_conv = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), "VALID",
        rhs_dilation=(stride, stride), dimension_numbers=dims,
    )  # fmt: skip
    np.testing.assert_allclose(dk_conv.transpose(1, 2, 0, 3), dk, rtol=1e-4, atol=1e-4)


def test_im2col_copies_alexnet_conv1s_pixels_seven_times_on_average():
    """AlexNet's conv1 (11x11, stride 4, on 227x227x3): X_col holds 363 x 3025 = 1,098,075
    entries for 154,587 input values; a pixel is copied once (a corner) to 9 times."""
    x = jnp.arange(227 * 227 * 3, dtype=jnp.float32).reshape(1, 227, 227, 3)
    columns = np.asarray(im2col(x, (11, 11), stride=4)).astype(np.int64)
    assert columns.shape == (1, 3025, 363) and columns.size == 1_098_075
    copies = np.bincount(columns.ravel(), minlength=x.size)
    assert copies.size == x.size == 154_587
    assert copies.sum() == 1_098_075
    assert (copies.min(), copies.max()) == (1, 9)
    assert copies[0] == 1 and copies.reshape(227, 227, 3)[113, 113, 0] == 9  # 3 windows per axis
    assert round(copies.mean(), 2) == 7.10
