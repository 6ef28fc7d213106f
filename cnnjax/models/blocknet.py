"""The notes' design: convolution blocks (3x3, channels growing) joined by transition blocks
(2x2 max-pool, then a 1x1 conv squeezing the channels), ending in a 1x1 conv to the classes and
a global average pool."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers import GlobalAvgPool, MaxPool, ReLU, conv


class BlockNet(nn.Module):
    """Default on 28x28: maps 28 -> 14 -> 7; receptive field 3, 5 | pool 6 | 10, 14 | pool 16 |
    24, 32: the last 3x3 conv sees 32x32 >= 28x28, the whole image."""

    num_classes: int = 10
    input_size: int = 28
    in_channels: int = 1
    blocks: Sequence[Sequence[int]] = ((16, 32), (16, 32), (16, 32))  # 3x3 conv widths per block
    transition_width: int = 16  # channels of the 1x1 squeeze after each pool
    padding: int = 1  # of the 3x3 convs; 0 shrinks the map by 2 per conv, as in the notes
    batch_norm: bool = False  # BatchNorm after every conv but the classifier (convs lose bias)
    dropout: float = 0.0  # before the classifier

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x_BxHxWxC
        for b, widths in enumerate(self.blocks, start=1):
            if b > 1:
                x = MaxPool(2, name=f"transition{b - 1}_pool")(x)
                x = self._conv_bn_relu(
                    x, self.transition_width, 1, 0, f"transition{b - 1}_conv", train
                )
            for i, width in enumerate(widths, start=1):
                x = self._conv_bn_relu(x, width, 3, self.padding, f"block{b}_conv{i}", train)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = conv(self.num_classes, 1, name="classifier")(x)
        return GlobalAvgPool()(x)

    def _conv_bn_relu(self, x, features: int, kernel: int, padding: int, name: str, train: bool):
        if not self.batch_norm:
            return ReLU()(conv(features, kernel, padding=padding, name=name)(x))
        x = conv(features, kernel, padding=padding, use_bias=False, name=name)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"{name}_bn")(x)
        return ReLU()(x)
