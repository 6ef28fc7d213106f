"""MobileNetV2 in torchvision's layout: 3,504,872 parameters at 224x224x3 with 1000 classes
(batch statistics are not parameters).

Stem 3x3/2 conv to 32 channels; 17 inverted-residual blocks: a 1x1 conv expanding the channels
t times (skipped when t = 1), a 3x3 depthwise conv (groups = channels) with the block's stride,
a 1x1 conv projecting to the output channels without activation, and the input added back when
the stride is 1 and the channels agree; a 1x1 conv to 1280, global average pool, dropout 0.2,
dense. Every conv has no bias and is followed by BatchNorm (momentum 0.9 in flax's convention,
epsilon 1e-5) and, except the projections, ReLU6.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers import Add, GlobalAvgPool, ReLU6, conv

# (expansion t, output channels c, blocks n, first stride s), as in the paper's Table 2
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def _conv_bn(x, features: int, kernel: int, stride: int, groups: int, name: str, train: bool,
             relu6: bool = True):  # fmt: skip
    x = conv(features, kernel, stride, padding=(kernel - 1) // 2, use_bias=False,
             feature_group_count=groups, name=name)(x)  # fmt: skip
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     name=f"{name}_bn")(x)  # fmt: skip
    return ReLU6()(x) if relu6 else x


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3 (stride), project (1x1, linear); + input when shapes agree."""

    features: int
    stride: int
    expansion: int

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        hidden = x_BxHxWxC.shape[-1] * self.expansion
        x = x_BxHxWxC
        if self.expansion != 1:
            x = _conv_bn(x, hidden, 1, 1, 1, "expand", train)
        x = _conv_bn(x, hidden, 3, self.stride, hidden, "depthwise", train)
        x = _conv_bn(x, self.features, 1, 1, 1, "project", train, relu6=False)
        if self.stride == 1 and x_BxHxWxC.shape[-1] == self.features:
            return Add()(x, x_BxHxWxC)
        return x


class MobileNetV2(nn.Module):
    """224 -> 112 (stem) -> 112, 56, 28, 14, 14, 7, 7 (stages) -> pooled -> classes.

    `small_input` makes the stem and the second stage stride 1 (32 -> 32, 32, 16, 8, 8, 4, 4):
    the CIFAR-style variant for 32x32 or 28x28 images.
    """

    num_classes: int = 1000
    input_size: int = 224
    in_channels: int = 3
    settings: Sequence[Sequence[int]] = SETTINGS
    last_features: int = 1280
    dropout: float = 0.2  # before the classifier
    small_input: bool = False

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = _conv_bn(x_BxHxWxC, 32, 3, 1 if self.small_input else 2, 1, "stem", train)
        for s, (t, c, n, stride) in enumerate(self.settings):
            if self.small_input and s == 1:
                stride = 1
            for b in range(n):
                x = InvertedResidual(c, stride if b == 0 else 1, t, name=f"block{s + 1}_{b}")(
                    x, train
                )
        x = _conv_bn(x, self.last_features, 1, 1, 1, "last", train)
        x = GlobalAvgPool()(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)
