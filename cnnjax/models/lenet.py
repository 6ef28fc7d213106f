"""LeNet family: the notes' LeNet (3x3 convs, 32x32x1) and the LeNet-5-like CIFAR net (32x32x3)."""

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers import Flatten, MaxPool, ReLU, conv


class LeNet(nn.Module):
    """conv3(6) pool conv3(16) pool -> 16*6*6 = 576 -> 120 -> 84 -> classes; 81,194 params."""

    num_classes: int = 10
    input_size: int = 32
    in_channels: int = 1

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = MaxPool(2, name="pool1")(ReLU()(conv(6, 3, name="conv1")(x_BxHxWxC)))
        x = MaxPool(2, name="pool2")(ReLU()(conv(16, 3, name="conv2")(x)))
        x = Flatten()(x)
        x = ReLU()(nn.Dense(120, name="fc1")(x))
        x = ReLU()(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


class LeNet5(nn.Module):
    """conv5(6) pool conv5(16) pool conv5(120) -> 64 -> classes; 59,386 params on 32x32x3."""

    num_classes: int = 10
    input_size: int = 32
    in_channels: int = 3

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = MaxPool(2, name="pool1")(ReLU()(conv(6, 5, name="conv1")(x_BxHxWxC)))
        x = MaxPool(2, name="pool2")(ReLU()(conv(16, 5, name="conv2")(x)))
        x = ReLU()(conv(120, 5, name="conv3")(x))
        x = Flatten()(x)
        x = ReLU()(nn.Dense(64, name="fc1")(x))
        return nn.Dense(self.num_classes, name="fc2")(x)
