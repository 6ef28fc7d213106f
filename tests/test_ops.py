"""im2col convolution against lax, the notes' AlexNet matrix sizes, and dense-as-conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.ops import conv2d_im2col, dense_params_to_conv, dense_to_conv, im2col, im2col_sizes

TOL = {"rtol": 1e-5, "atol": 1e-5}


def lax_conv(x, k, stride, padding, dilation, groups):
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return jax.lax.conv_general_dilated(
        x,
        k,
        window_strides=stride,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


# (input HxW, kernel hxw, stride, padding, dilation, groups); input has 4 channels, output 8.
CASES = [
    ((7, 7), (3, 3), (1, 1), 0, (1, 1), 1),
    ((8, 9), (3, 2), (2, 2), 1, (1, 1), 1),
    ((10, 11), (2, 3), (3, 3), 0, (1, 1), 1),
    ((9, 8), (3, 3), (1, 2), ((0, 2), (0, 2)), (1, 1), 1),
    ((9, 9), (2, 3), (1, 1), ((1, 0), (0, 2)), (2, 2), 1),
    ((11, 10), (3, 2), (2, 3), 1, (2, 1), 2),
    ((7, 8), (1, 3), (1, 1), 0, (1, 1), 2),
    ((8, 8), (3, 3), (1, 1), 1, (1, 1), 4),  # depthwise: one input channel per group
    ((12, 10), (3, 2), (3, 2), ((0, 2), (1, 1)), (2, 2), 4),
    ((6, 6), (2, 2), (2, 2), 0, (1, 1), 4),
]


@pytest.mark.parametrize(("hw", "khw", "stride", "padding", "dilation", "groups"), CASES)
def test_conv2d_im2col_matches_lax(hw, khw, stride, padding, dilation, groups):
    kx, kk, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, *hw, 4), jnp.float32)
    k = jax.random.normal(kk, (*khw, 4 // groups, 8), jnp.float32)
    got = conv2d_im2col(x, k, None, stride, padding, dilation, groups)
    want = lax_conv(x, k, stride, padding, dilation, groups)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)
    b = jax.random.normal(kb, (8,), jnp.float32)
    got_b = conv2d_im2col(x, k, b, stride, padding, dilation, groups)
    np.testing.assert_allclose(got_b, want + b, **TOL)


def test_conv2d_im2col_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        conv2d_im2col(jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 4, 6)), groups=2)


def test_im2col_ordering_matches_patches_op_reordered():
    x = jax.random.normal(jax.random.key(1), (2, 6, 7, 3), jnp.float32)
    got = im2col(x, (2, 3), (2, 1), ((1, 0), (0, 1)), (1, 2))
    patches = jax.lax.conv_general_dilated_patches(
        x, (2, 3), (2, 1), ((1, 0), (0, 1)), rhs_dilation=(1, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    B, oh, ow, _ = patches.shape
    # lax orders each patch as (C, kh, kw); ours is (kh, kw, C).
    want = patches.reshape(B, oh, ow, 3, 2, 3).transpose(0, 1, 2, 4, 5, 3).reshape(B, oh * ow, -1)
    assert got.shape == (2, 12, 18)  # out 3x4: (6+1-2)//2+1, 7+1-5+1
    np.testing.assert_array_equal(got, want)


def test_im2col_hand_checkable_3x3():
    x = jnp.arange(1, 10, dtype=jnp.float32).reshape(1, 3, 3, 1)
    cols = im2col(x, (2, 2))
    want = [[1, 2, 4, 5], [2, 3, 5, 6], [4, 5, 7, 8], [5, 6, 8, 9]]
    np.testing.assert_array_equal(cols[0], np.array(want, np.float32))


def test_im2col_int_padding_adds_zero_border():
    x = jnp.arange(1, 10, dtype=jnp.float32).reshape(1, 3, 3, 1)
    cols = im2col(x, (2, 2), padding=1)
    assert cols.shape == (1, 16, 4)
    np.testing.assert_array_equal(cols[0, 0], [0, 0, 0, 1])
    np.testing.assert_array_equal(cols[0, -1], [9, 0, 0, 0])


def test_alexnet_conv1_matrix_sizes():
    sizes = im2col_sizes((227, 227, 3), (11, 11), 96, stride=(4, 4), padding=0)
    assert sizes == {"x_col": (363, 3025), "w_row": (96, 363), "out": (55, 55, 96)}


def test_alexnet_conv1_im2col_shape():
    x = jnp.zeros((1, 227, 227, 3), jnp.float32)
    assert im2col(x, (11, 11), stride=4).shape == (1, 3025, 363)


def test_im2col_sizes_with_padding_and_dilation():
    sizes = im2col_sizes((28, 28, 1), (3, 3), 32, stride=1, padding=((1, 1), (1, 1)), dilation=2)
    assert sizes == {"x_col": (9, 676), "w_row": (32, 9), "out": (26, 26, 32)}


def _lenet_dense():
    kx, kw, kb, kbig = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(kx, (3, 6, 6, 16), jnp.float32)
    w = jax.random.normal(kw, (576, 120), jnp.float32) / 24.0
    b = jax.random.normal(kb, (120,), jnp.float32)
    big = jax.random.normal(kbig, (3, 8, 8, 16), jnp.float32)
    return x, w, b, big


def test_dense_to_conv_same_size_gives_1x1_output():
    x, w, b, _ = _lenet_dense()
    k = dense_to_conv(w, (6, 6, 16))
    assert k.shape == (6, 6, 16, 120)
    conv = lax_conv(x, k, (1, 1), 0, (1, 1), 1) + b
    assert conv.shape == (3, 1, 1, 120)
    np.testing.assert_allclose(conv[:, 0, 0], x.reshape(3, -1) @ w + b, **TOL)


def test_dense_to_conv_slides_over_larger_map():
    _, w, b, big = _lenet_dense()
    conv = lax_conv(big, dense_to_conv(w, (6, 6, 16)), (1, 1), 0, (1, 1), 1) + b
    assert conv.shape == (3, 3, 3, 120)
    for i in range(3):
        for j in range(3):
            crop = big[:, i : i + 6, j : j + 6, :].reshape(3, -1)
            np.testing.assert_allclose(conv[:, i, j], crop @ w + b, **TOL)
    assert not np.allclose(conv[:, 0, 0], conv[:, 2, 2])  # the positions really differ


def test_dense_to_conv_rejects_wrong_feature_shape():
    with pytest.raises(ValueError, match="576"):
        dense_to_conv(jnp.zeros((576, 120)), (5, 5, 16))


def test_flax_dense_params_run_in_flax_conv():
    x, _, _, big = _lenet_dense()
    dense = nn.Dense(120)
    params = dense.init(jax.random.key(3), x.reshape(3, -1))["params"]
    conv_params = dense_params_to_conv(params, (6, 6, 16))
    conv = nn.Conv(120, (6, 6), padding="VALID")
    out = conv.apply({"params": conv_params}, x)
    np.testing.assert_allclose(
        out[:, 0, 0], dense.apply({"params": params}, x.reshape(3, -1)), **TOL
    )
    out_big = conv.apply({"params": conv_params}, big)
    assert out_big.shape == (3, 3, 3, 120)
    crop = big[:, 1:7, 2:8, :].reshape(3, -1)
    np.testing.assert_allclose(out_big[:, 1, 2], dense.apply({"params": params}, crop), **TOL)
