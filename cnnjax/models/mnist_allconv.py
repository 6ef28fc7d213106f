"""The notes' 9-layer all-convolutional MNIST net: 33,058 parameters with 10 classes."""

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers import Flatten, MaxPool, ReLU, conv


class MnistAllConv(nn.Module):
    """28x28 -> 28, 28, 14, 14, 14, 7, 5, 3, 1; the last 3x3 conv gives the logits."""

    num_classes: int = 10
    input_size: int = 28
    in_channels: int = 1

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x_BxHxWxC
        x = ReLU()(conv(8, 3, padding=1, name="conv1")(x))
        x = ReLU()(conv(8, 3, padding=1, name="conv2")(x))
        x = MaxPool(2, name="pool1")(x)
        x = ReLU()(conv(16, 3, padding=1, name="conv3")(x))
        x = ReLU()(conv(16, 3, padding=1, name="conv4")(x))
        x = MaxPool(2, name="pool2")(x)
        x = ReLU()(conv(32, 3, name="conv5")(x))
        x = ReLU()(conv(64, 3, name="conv6")(x))
        x = conv(self.num_classes, 3, name="conv7")(x)  # 1x1xclasses for a 28x28 input
        return Flatten()(x)
