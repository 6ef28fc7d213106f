"""DenseNet-121 in torchvision's layout: 7,978,856 parameters at 224x224x3 with 1000 classes
(batch statistics are not parameters).

Stem 7x7/2 conv to 64 channels, BN, ReLU, 3x3/2 max-pool (pad 1); four dense blocks of 6, 12,
24, 16 layers, each layer BN, ReLU, 1x1 conv to 4 x 32 channels, BN, ReLU, 3x3 conv to 32
channels (the growth rate), its output concatenated to its input; between blocks a transition
(BN, ReLU, 1x1 conv halving the channels, 2x2 average pool); BN, ReLU, global average pool,
dense. Convs have no bias; BatchNorm momentum 0.9 in flax's convention, epsilon 1e-5.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers import AvgPool, GlobalAvgPool, MaxPool, ReLU, conv


def _bn_relu(x, train: bool, name: str):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)(x)
    return ReLU()(x)


class DenseLayer(nn.Module):
    """BN, ReLU, 1x1 conv (bn_size x growth), BN, ReLU, 3x3 conv (growth); concatenated to x."""

    growth_rate: int = 32
    bn_size: int = 4

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = _bn_relu(x_BxHxWxC, train, "norm1")
        y = conv(self.bn_size * self.growth_rate, 1, use_bias=False, name="conv1")(y)
        y = _bn_relu(y, train, "norm2")
        y = conv(self.growth_rate, 3, padding=1, use_bias=False, name="conv2")(y)
        return jnp.concatenate([x_BxHxWxC, y], axis=-1)


class DenseBlock(nn.Module):
    """`layers` dense layers: the channels grow by `growth_rate` per layer."""

    layers: int
    growth_rate: int = 32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for i in range(1, self.layers + 1):
            x = DenseLayer(self.growth_rate, name=f"denselayer{i}")(x, train)
        return x


class Transition(nn.Module):
    """BN, ReLU, 1x1 conv halving the channels, 2x2 average pool."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = _bn_relu(x, train, "norm")
        x = conv(x.shape[-1] // 2, 1, use_bias=False, name="conv")(x)
        return AvgPool(2, name="pool")(x)


class DenseNet(nn.Module):
    """224 -> 112 (stem) -> 56 (max-pool) -> 56, 28, 14, 7 (blocks) -> pooled -> classes.

    `small_input` swaps the stem for a 3x3 stride-1 conv without the max-pool (32 -> 32, 16, 8, 4).
    """

    num_classes: int = 1000
    input_size: int = 224
    in_channels: int = 3
    block_sizes: Sequence[int] = (6, 12, 24, 16)  # dense layers per block (DenseNet-121)
    growth_rate: int = 32
    init_features: int = 64
    small_input: bool = False

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.small_input:
            x = conv(self.init_features, 3, padding=1, use_bias=False, name="conv0")(x_BxHxWxC)
            x = _bn_relu(x, train, "norm0")
        else:
            x = conv(self.init_features, 7, 2, padding=3, use_bias=False, name="conv0")(x_BxHxWxC)
            x = _bn_relu(x, train, "norm0")
            x = MaxPool(3, 2, padding=1, name="pool0")(x)
        for b, n_layers in enumerate(self.block_sizes, start=1):
            x = DenseBlock(n_layers, self.growth_rate, name=f"denseblock{b}")(x, train)
            if b < len(self.block_sizes):
                x = Transition(name=f"transition{b}")(x, train)
        x = _bn_relu(x, train, "norm5")
        x = GlobalAvgPool()(x)
        return nn.Dense(self.num_classes, name="classifier")(x)
