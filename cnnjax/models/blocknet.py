"""The notes' design: convolution blocks (3x3, channels growing) joined by transition blocks
(2x2 max-pool, then a 1x1 conv squeezing the channels), ending in a 1x1 conv to the classes and
a global average pool."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.errors import ConfigError
from cnnjax.layers import GlobalAvgPool, MaxPool, ReLU, conv


class BlockNet(nn.Module):
    """Default on 28x28: maps 28 -> 14 -> 7; receptive field 3, 5 | pool 6 | 10, 14 | pool 16 |
    24, 32: the last 3x3 conv sees 32x32 >= 28x28, the whole image.

    A 3x3 conv of dilation d spaces its taps d apart: it spans 2d + 1 pixels of its input with
    the same 9 weights per channel pair, and is padded `padding * d` per side (so padding 1
    keeps the size at any dilation). Its receptive field grows by 2d times the input's jump."""

    num_classes: int = 10
    input_size: int = 28
    in_channels: int = 1
    blocks: Sequence[Sequence[int]] = ((16, 32), (16, 32), (16, 32))  # 3x3 conv widths per block
    transition_width: int = 16  # channels of the 1x1 squeeze after each pool
    padding: int = 1  # of the 3x3 convs, times their dilation: 1 keeps the size, 0 shrinks by 2d
    dilation: int | Sequence[int] = 1  # of the 3x3 convs: one for all blocks, or one per block
    batch_norm: bool = False  # BatchNorm after every conv but the classifier (convs lose bias)
    dropout: float = 0.0  # before the classifier

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x_BxHxWxC
        dilations = self.block_dilations()
        for b, (widths, d) in enumerate(zip(self.blocks, dilations, strict=True), start=1):
            if b > 1:
                x = MaxPool(2, name=f"transition{b - 1}_pool")(x)
                x = self._conv_bn_relu(
                    x, self.transition_width, 1, 0, f"transition{b - 1}_conv", train
                )
            for i, width in enumerate(widths, start=1):
                x = self._conv_bn_relu(x, width, 3, self.padding * d, f"block{b}_conv{i}", train, d)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = conv(self.num_classes, 1, name="classifier")(x)
        return GlobalAvgPool()(x)

    def block_dilations(self) -> tuple[int, ...]:
        """The dilation of each block's 3x3 convs; ConfigError when they do not fit `blocks`."""
        d = self.dilation
        dilations = (d,) * len(self.blocks) if isinstance(d, int) else tuple(d)
        if len(dilations) != len(self.blocks) or not all(
            isinstance(k, int) and k >= 1 for k in dilations
        ):
            raise ConfigError(
                f"BlockNet: dilation={d!r} for {len(self.blocks)} blocks; give one integer >= 1 "
                f"for all of them, or a list of {len(self.blocks)} (one per block)"
            )
        return dilations

    def _conv_bn_relu(
        self, x, features: int, kernel: int, padding: int, name: str, train: bool, dilation: int = 1
    ):
        if not self.batch_norm:
            return ReLU()(conv(features, kernel, padding=padding, dilation=dilation, name=name)(x))
        x = conv(features, kernel, padding=padding, dilation=dilation, use_bias=False, name=name)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"{name}_bn")(x)
        return ReLU()(x)
