"""Why convolutions: three nets with one spatial layout that differ only in connectivity.

Every layer maps an (H, W, C) map to (H', W', features) with the geometry of a k x k window at
stride s and padding p (28 -> 14 -> 7 -> 4 with the defaults), then a ReLU; the same head
follows. What differs is how an output unit is connected to the layer's input:

- `ConvNet`: to a k x k window, with one kernel shared by every position (a convolution);
- `LocallyConnectedNet`: to the same window, with its own kernel at every position
  (`flax.linen.ConvLocal`: unshared weights and a bias per output unit);
- `FullyConnectedNet`: to every unit of the input map (a dense layer, bias per output unit).

`layer_params()` gives each layer's parameter count from `cnnjax.geometry`'s formulas.
"""

from collections.abc import Sequence
from itertools import pairwise

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.errors import ConfigError
from cnnjax.geometry import conv_output_size, conv_params, dense_params, pads2d
from cnnjax.layers import Flatten, GlobalAvgPool, ReLU, conv

HEADS = ("pool", "flatten")


class ConvNet(nn.Module):
    """Shared weights: each layer a k x k convolution, (k*k*C + 1)*features parameters."""

    num_classes: int = 10
    input_size: int = 28
    in_channels: int = 1
    features: Sequence[int] = (16, 32, 64)  # channels of each layer's output map
    kernel: int = 3  # window of every layer
    stride: int = 2
    padding: int = 1
    head: str = "pool"  # pool: global average pool -> dense; flatten: flatten -> dense

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.head not in HEADS:
            raise ConfigError(f"{type(self).__name__}: head={self.head!r}; use one of {HEADS}")
        x = x_BxHxWxC
        for i, width in enumerate(self.features, start=1):
            x = ReLU()(self.layer(width, x.shape[1], f"layer{i}")(x))
        x = GlobalAvgPool()(x) if self.head == "pool" else Flatten()(x)
        return nn.Dense(self.num_classes, name="classifier")(x)

    def layer(self, features: int, in_size: int, name: str) -> nn.Module:
        """The layer that maps an in_size x in_size map to `features` channels."""
        return conv(features, self.kernel, self.stride, self.padding, name=name)

    def map_sizes(self) -> list[int]:
        """The side of the input map and of each layer's output map."""
        sizes = [self.input_size]
        for _ in self.features:
            sizes.append(conv_output_size(sizes[-1], self.kernel, self.stride, self.padding))
        return sizes

    def layer_params(self) -> list[int]:
        """Parameters of each layer and of the classifier, from the formulas."""
        return [*self._spatial_params(), dense_params(self._head_inputs(), self.num_classes)]

    def _spatial_params(self) -> list[int]:
        window = (self.kernel, self.kernel)
        channels = [self.in_channels, *self.features]
        return [conv_params(window, c_in, c_out) for c_in, c_out in pairwise(channels)]

    def _head_inputs(self) -> int:
        side = self.map_sizes()[-1]
        return self.features[-1] * (side * side if self.head == "flatten" else 1)


class LocallyConnectedNet(ConvNet):
    """Unshared weights: each layer `flax.linen.ConvLocal`, the same window with its own kernel
    and bias at each of the H' x W' output positions, H'*W'*(k*k*C + 1)*features parameters."""

    def layer(self, features: int, in_size: int, name: str) -> nn.Module:
        window, strides = (self.kernel, self.kernel), (self.stride, self.stride)
        return nn.ConvLocal(features, window, strides, padding=pads2d(self.padding), name=name)

    def _spatial_params(self) -> list[int]:
        sides = self.map_sizes()[1:]
        return [side * side * p for side, p in zip(sides, super()._spatial_params(), strict=True)]


class DenseMap(nn.Module):
    """Every input unit to every output unit: flatten, a dense layer of out_size*out_size*
    features units, laid out as an out_size x out_size x features map."""

    features: int
    out_size: int

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
        units = self.out_size * self.out_size * self.features
        x = nn.Dense(units, name="dense")(Flatten()(x_BxHxWxC))
        return x.reshape(x.shape[0], self.out_size, self.out_size, self.features)


class FullyConnectedNet(ConvNet):
    """An MLP on the flattened image whose hidden widths match the conv net's activations: layer
    i has as many units as the conv net's i-th output map (H'*W'*features; 3,136, 1,568 and
    1,024 with the defaults), held as that map so the same head follows. `kernel`, `stride` and
    `padding` only set the map sizes; (H*W*C + 1)*H'*W'*features parameters per layer."""

    def layer(self, features: int, in_size: int, name: str) -> nn.Module:
        out_size = conv_output_size(in_size, self.kernel, self.stride, self.padding, layer=name)
        return DenseMap(features, out_size, name=name)

    def _spatial_params(self) -> list[int]:
        sides, channels = self.map_sizes(), [self.in_channels, *self.features]
        units = [side * side * c for side, c in zip(sides, channels, strict=True)]
        return [dense_params(n_in, n_out) for n_in, n_out in pairwise(units)]
