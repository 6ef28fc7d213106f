"""AlexNet on 227x227x3 (single-tower, as in the notes): 62,378,344 params with 1000 classes."""

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers import Flatten, MaxPool, ReLU, conv


class AlexNet(nn.Module):
    """227 -> 55 -> 27 -> 27 -> 13 -> 13 -> 13 -> 13 -> 6; 9216 -> 4096 -> 4096 -> classes."""

    num_classes: int = 1000
    input_size: int = 227
    in_channels: int = 3
    dropout: float = 0.5  # before each of the two hidden dense layers, as in the original

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = ReLU()(conv(96, 11, stride=4, name="conv1")(x_BxHxWxC))
        x = MaxPool(3, 2, name="pool1")(x)
        x = ReLU()(conv(256, 5, padding=2, name="conv2")(x))
        x = MaxPool(3, 2, name="pool2")(x)
        x = ReLU()(conv(384, 3, padding=1, name="conv3")(x))
        x = ReLU()(conv(384, 3, padding=1, name="conv4")(x))
        x = ReLU()(conv(256, 3, padding=1, name="conv5")(x))
        x = MaxPool(3, 2, name="pool3")(x)
        x = Flatten()(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = ReLU()(nn.Dense(4096, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = ReLU()(nn.Dense(4096, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)
