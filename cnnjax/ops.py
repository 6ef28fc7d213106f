"""Convolution as a matrix multiply (im2col), and dense layers rewritten as convolutions.

Layouts are Flax's: NHWC images, HWIO kernels of shape (kh, kw, in_ch/groups, out_ch).
Everything is a pure function of arrays and ints, written for reading rather than speed.
"""

import jax
import jax.numpy as jnp

from cnnjax.geometry import Pair, as_pair, conv_output_size, pads2d

Padding = int | tuple[Pair, Pair]  # an int pads every side alike


def im2col(
    x_BxHxWxC: jax.Array,
    kernel_hw: Pair,
    stride: int | Pair = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
    dilation: int | Pair = (1, 1),
) -> jax.Array:
    """Every receptive-field patch as one row: (B, out_h*out_w, kh*kw*C).

    Rows run over output positions in row-major (out_h, out_w) order; each row is the patch
    flattened in (kh, kw, C) order, the order of a HWIO kernel reshaped to (kh*kw*C_in, out).
    """
    B, H, W, C = x_BxHxWxC.shape
    (kh, kw), (sh, sw), (dh, dw) = as_pair(kernel_hw), as_pair(stride), as_pair(dilation)
    pad_h, pad_w = pads2d(padding)
    out_h = conv_output_size(H, kh, sh, pad_h, dh)
    out_w = conv_output_size(W, kw, sw, pad_w, dw)
    xp_BxHpxWpxC = jnp.pad(x_BxHxWxC, ((0, 0), pad_h, pad_w, (0, 0)))
    # Padded-input row of output row i and kernel row a is i*sh + a*dh (likewise for columns).
    rows_OHxKH = jnp.arange(out_h)[:, None] * sh + jnp.arange(kh)[None, :] * dh
    cols_OWxKW = jnp.arange(out_w)[:, None] * sw + jnp.arange(kw)[None, :] * dw
    r_idx = rows_OHxKH[:, None, :, None]  # (out_h, 1, kh, 1)
    c_idx = cols_OWxKW[None, :, None, :]  # (1, out_w, 1, kw)
    patches_BxOHxOWxKHxKWxC = xp_BxHpxWpxC[:, r_idx, c_idx, :]
    return patches_BxOHxOWxKHxKWxC.reshape(B, out_h * out_w, kh * kw * C)


def conv2d_im2col(
    x_BxHxWxC: jax.Array,
    kernel_HWIO: jax.Array,
    bias_O: jax.Array | None = None,
    stride: int | Pair = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
    dilation: int | Pair = (1, 1),
    groups: int = 1,
) -> jax.Array:
    """Convolution (cross-correlation, as in lax/Flax) as im2col + one matmul per group: NHWC.

    Group g sees input channels [g*C/G, (g+1)*C/G) and makes output channels [g*O/G, (g+1)*O/G);
    its weight matrix W_row has shape (O/G, kh*kw*C/G).
    """
    B, H, W, C = x_BxHxWxC.shape
    kh, kw, Cg, n_out = kernel_HWIO.shape
    G = groups
    if Cg * G != C or n_out % G:
        raise ValueError(f"input channels {C}, kernel {kernel_HWIO.shape} and groups {G} disagree")
    pad_h, pad_w = pads2d(padding)
    (sh, sw), (dh, dw) = as_pair(stride), as_pair(dilation)
    out_h, out_w = conv_output_size(H, kh, sh, pad_h, dh), conv_output_size(W, kw, sw, pad_w, dw)
    cols_BxPxK = im2col(x_BxHxWxC, (kh, kw), stride, padding, dilation)
    P, K = out_h * out_w, kh * kw * Cg
    # Split C into (G, C/G) and gather each group's (kh, kw, C/G) patch entries together.
    cols_BxPxGxK = cols_BxPxK.reshape(B, P, kh * kw, G, Cg).transpose(0, 1, 3, 2, 4)
    cols_BxPxGxK = cols_BxPxGxK.reshape(B, P, G, K)
    w_row_GxOgxK = kernel_HWIO.reshape(K, G, n_out // G).transpose(1, 2, 0)
    out_BxPxGxOg = jnp.einsum("bpgk,gok->bpgo", cols_BxPxGxK, w_row_GxOgxK)  # G matmuls
    out_BxHoxWoxO = out_BxPxGxOg.reshape(B, out_h, out_w, n_out)
    return out_BxHoxWoxO if bias_O is None else out_BxHoxWoxO + bias_O


def im2col_sizes(
    input_hwc: tuple[int, int, int],
    kernel_hw: Pair,
    out_channels: int,
    stride: int | Pair = (1, 1),
    padding: Padding = 0,
    dilation: int | Pair = (1, 1),
) -> dict[str, tuple[int, ...]]:
    """Matrix sizes for one image: out_col = W_row (O x K) @ X_col (K x P), K = kh*kw*C."""
    H, W, C = input_hwc
    (kh, kw), (sh, sw), (dh, dw) = as_pair(kernel_hw), as_pair(stride), as_pair(dilation)
    pad_h, pad_w = pads2d(padding)
    out_h, out_w = conv_output_size(H, kh, sh, pad_h, dh), conv_output_size(W, kw, sw, pad_w, dw)
    K, P = kh * kw * C, out_h * out_w
    return {"x_col": (K, P), "w_row": (out_channels, K), "out": (out_h, out_w, out_channels)}


def dense_to_conv(dense_kernel_IxO: jax.Array, feature_hwc: tuple[int, int, int]) -> jax.Array:
    """A Dense kernel after a row-major (h, w, c) flatten as a VALID conv kernel (h, w, c, O).

    On an (h, w, c) map the conv gives a 1x1xO output equal to the dense layer; on a larger map
    it slides the classifier with stride 1, one output per h x w crop.
    """
    h, w, c = feature_hwc
    n_in, n_out = dense_kernel_IxO.shape
    if h * w * c != n_in:
        raise ValueError(f"dense input size {n_in} != {h}*{w}*{c} = {h * w * c}")
    return dense_kernel_IxO.reshape(h, w, c, n_out)


def dense_params_to_conv(params: dict, feature_hwc: tuple[int, int, int]) -> dict:
    """Flax nn.Dense params {"kernel", "bias"} -> params of nn.Conv(O, (h, w), padding="VALID")."""
    out = {"kernel": dense_to_conv(params["kernel"], feature_hwc)}
    if "bias" in params:
        out["bias"] = params["bias"]
    return out
