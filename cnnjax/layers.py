"""The few shared primitives, as Modules so that tracing (cnnjax.analysis) sees one row each."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class ReLU(nn.Module):
    """max(x, 0)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return nn.relu(x)


class Flatten(nn.Module):
    """(B, H, W, C) -> (B, H*W*C), in NHWC order."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return x.reshape(x.shape[0], -1)


class MaxPool(nn.Module):
    """Max pooling over `window` with `stride` (defaults to the window) and integer padding.

    A non-overlapping pool that tiles the input exactly is computed as reshape-then-max: its
    backward pass is a plain compare, while `reduce_window`'s select-and-scatter is slow on XLA:CPU.
    """

    window: int = 2
    stride: int | None = None
    padding: int = 0

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
        stride = self.stride or self.window
        b, h, w, c = x_BxHxWxC.shape
        k = self.window
        if stride == k and self.padding == 0 and h % k == 0 and w % k == 0:
            return x_BxHxWxC.reshape(b, h // k, k, w // k, k, c).max(axis=(2, 4))
        return nn.max_pool(x_BxHxWxC, (k, k), (stride, stride), _pads(self.padding))


class AvgPool(nn.Module):
    """Average pooling over `window` with `stride` (defaults to the window); pads count as zeros."""

    window: int = 2
    stride: int | None = None
    padding: int = 0

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        stride = self.stride or self.window
        return nn.avg_pool(x, (self.window,) * 2, (stride, stride), _pads(self.padding))


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


def _pads(p: int) -> Sequence[tuple[int, int]]:
    return ((p, p), (p, p))


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, **kw) -> nn.Conv:
    """A square convolution with symmetric integer padding, as in the notes' PyTorch."""
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=_pads(padding), **kw)
