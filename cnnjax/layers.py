"""The few shared primitives, as Modules so that tracing (cnnjax.analysis) sees one row each."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import onednn
from cnnjax.geometry import as_pair, pads2d


class ReLU(nn.Module):
    """max(x, 0)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return nn.relu(x)


class ReLU6(nn.Module):
    """min(max(x, 0), 6) (MobileNet's activation)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return nn.relu6(x)


class Flatten(nn.Module):
    """(B, H, W, C) -> (B, H*W*C), in NHWC order."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return x.reshape(x.shape[0], -1)


def _pool_padding(padding: int | str | tuple) -> str | tuple:
    """'SAME'/'VALID' as they are, no padding as 'VALID' (what exporters such as jax2onnx
    convert), other ints or per-axis pairs as ((top, bottom), (left, right))."""
    if isinstance(padding, str):
        return padding
    pads = pads2d(padding)
    return "VALID" if pads == ((0, 0), (0, 0)) else pads


class MaxPool(nn.Module):
    """Max pooling over `window` with `stride` (defaults to the window) and padding (an int,
    per-axis pairs, 'SAME' or 'VALID').

    A non-overlapping unpadded pool is `tiled_max_pool` on the input cropped to whole windows
    (what the floor in the output size drops anyway): elementwise maxima of strided slices, and
    a one-pass backward. `reduce_window`'s backward (select-and-scatter) is slow on XLA:CPU, and
    so is the autodiff of a reshape-then-max, which counts ties.
    """

    window: int = 2
    stride: int | None = None
    padding: int | str | tuple = 0

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
        stride = self.stride or self.window
        _, h, w, _ = x_BxHxWxC.shape
        k = self.window
        if stride == k and self.padding in (0, "VALID") and min(h, w) >= k:
            return tiled_max_pool(x_BxHxWxC[:, : h - h % k, : w - w % k], k)
        padding = _pool_padding(self.padding)  # by keyword: exporters patch nn.max_pool so
        return nn.max_pool(x_BxHxWxC, window_shape=(k, k), strides=(stride,) * 2, padding=padding)


def _slices(x_BxHxWxC: jnp.ndarray, k: int) -> list[jnp.ndarray]:
    """The k*k strided slices x[:, i::k, j::k], row-major over (i, j)."""
    return [x_BxHxWxC[:, i::k, j::k, :] for i in range(k) for j in range(k)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def tiled_max_pool(x_BxHxWxC: jnp.ndarray, k: int) -> jnp.ndarray:
    """Max over non-overlapping k x k windows (H and W multiples of k). Its gradient goes to
    the first maximum of each window in row-major order, as PyTorch's max_pool2d does."""
    return functools.reduce(jnp.maximum, _slices(x_BxHxWxC, k))


def _tiled_max_pool_fwd(x, k):
    y = tiled_max_pool(x, k)
    return y, (x, y)


def _tiled_max_pool_bwd(k, residuals, dy):
    x, y = residuals
    parts, taken = [], jnp.zeros(y.shape, bool)
    for part in _slices(x, k):
        first = (part == y) & ~taken
        taken = taken | first
        parts.append(jnp.where(first, dy, 0))
    b, h, w, c = y.shape  # (i, j, b, h, w, c) -> (b, h, i, w, j, c) -> x's layout
    dx = jnp.stack(parts).reshape(k, k, b, h, w, c).transpose(2, 3, 0, 4, 1, 5)
    return (dx.reshape(x.shape),)


tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)


class AvgPool(nn.Module):
    """Average pooling over `window` with `stride` (defaults to the window); pads count as zeros."""

    window: int = 2
    stride: int | None = None
    padding: int | str | tuple = 0

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        stride = self.stride or self.window
        window, padding = (self.window,) * 2, _pool_padding(self.padding)  # keywords: as MaxPool
        return nn.avg_pool(x, window_shape=window, strides=(stride,) * 2, padding=padding)


class Add(nn.Module):
    """The sum of parallel paths (a residual join); a Module so analysis sees where paths merge."""

    @nn.compact
    def __call__(self, *xs: jnp.ndarray) -> jnp.ndarray:
        return sum(xs[1:], start=xs[0])


class GlobalAvgPool(nn.Module):
    """(B, H, W, C) -> (B, C): the mean over all positions."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return x.mean(axis=(1, 2))


class Conv(nn.Conv):
    """`nn.Conv` for NHWC inputs (same parameters and attributes, so the analysis reads it
    alike), computed by `onednn.conv`: XLA's convolution, or in a function wrapped by
    `onednn.using("onednn", ...)` oneDNN's, which adds the bias and sums its gradient in its
    own kernels."""

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
        if self.input_dilation not in (None, 1, (1, 1)) or self.mask is not None:
            raise ValueError("layers.Conv: no input dilation or mask; use flax.linen.Conv")
        kh, kw = self.kernel_size
        groups = self.feature_group_count
        shape = (kh, kw, x_BxHxWxC.shape[-1] // groups, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = self.promote_dtype(x_BxHxWxC, kernel, bias, dtype=self.dtype)
        dilation = as_pair(self.kernel_dilation or 1)
        return onednn.conv(x, kernel, bias, as_pair(self.strides), self.padding, dilation, groups)


def conv(
    features: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, **kw
) -> Conv:
    """A square convolution with symmetric integer padding (and taps `dilation` apart), as in
    the notes' PyTorch."""
    if dilation != 1:
        kw["kernel_dilation"] = (dilation, dilation)
    return Conv(features, (kernel, kernel), (stride, stride), padding=pads2d(padding), **kw)
