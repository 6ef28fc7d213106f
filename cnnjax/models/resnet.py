"""ResNet v1.5 in torchvision's layout: resnet18 11,689,512 and resnet50 25,557,032 params
(224x224x3, 1000 classes; batch statistics are not parameters).

Stem 7x7/2 conv (pad 3), BN, ReLU, 3x3/2 max-pool (pad 1); four stages of 64, 128, 256, 512
channels (times 4 at a bottleneck's output), the first block of stages 2-4 with stride 2; global
average pool and a dense layer. Convs have no bias and are followed by BatchNorm (momentum 0.9
in flax's convention = PyTorch's 0.1, epsilon 1e-5); a block whose shape changes has a projection
shortcut (1x1 conv stride s + BN). v1.5: a bottleneck strides in its 3x3 conv, not its first 1x1.
Convs are initialised kaiming-normal (fan out, ReLU gain), as torchvision does.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers import Add, GlobalAvgPool, MaxPool, ReLU, conv

_conv = functools.partial(
    conv, use_bias=False, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal")
)


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """3x3 conv (stride s), BN, ReLU, 3x3 conv, BN; + shortcut; ReLU. Out: `features` channels."""

    features: int
    stride: int = 1

    expansion = 1  # output channels / features (a class attribute, not a field)

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = _conv(self.features, 3, self.stride, padding=1, name="conv1")(x_BxHxWxC)
        x = ReLU()(_bn(train, "bn1")(x))
        x = _conv(self.features, 3, padding=1, name="conv2")(x)
        x = _bn(train, "bn2")(x)
        return ReLU()(Add()(x, _shortcut(self, x_BxHxWxC, train)))


class Bottleneck(nn.Module):
    """1x1 conv, BN, ReLU, 3x3 conv (stride s), BN, ReLU, 1x1 conv to 4*features, BN;
    + shortcut; ReLU."""

    features: int
    stride: int = 1

    expansion = 4

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = _conv(self.features, 1, name="conv1")(x_BxHxWxC)
        x = ReLU()(_bn(train, "bn1")(x))
        x = _conv(self.features, 3, self.stride, padding=1, name="conv2")(x)
        x = ReLU()(_bn(train, "bn2")(x))
        x = _conv(self.features * self.expansion, 1, name="conv3")(x)
        x = _bn(train, "bn3")(x)
        return ReLU()(Add()(x, _shortcut(self, x_BxHxWxC, train)))


def _shortcut(block: BasicBlock | Bottleneck, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """The identity, or a 1x1 conv (stride s) + BN where the block changes the shape; called in
    the block's compact `__call__`, so the two layers are the block's submodules."""
    out = block.features * block.expansion
    if block.stride == 1 and x.shape[-1] == out:
        return x
    x = _conv(out, 1, block.stride, name="downsample_conv")(x)
    return _bn(train, "downsample_bn")(x)


class ResNet(nn.Module):
    """224 -> 112 (stem conv) -> 56 (max-pool) -> 56, 28, 14, 7 (stages) -> pooled -> classes.

    `small_input` swaps the stem for a 3x3 stride-1 conv without the max-pool (the CIFAR-style
    stem): 32 -> 32, 16, 8, 4.
    """

    num_classes: int = 1000
    input_size: int = 224
    in_channels: int = 3
    stage_sizes: Sequence[int] = (2, 2, 2, 2)  # blocks per stage
    bottleneck: bool = False  # Bottleneck blocks (resnet50/101/152), else BasicBlock (18/34)
    small_input: bool = False  # 3x3/1 stem conv, no max-pool

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        block = Bottleneck if self.bottleneck else BasicBlock
        if self.small_input:
            x = _conv(64, 3, padding=1, name="conv1")(x_BxHxWxC)
            x = ReLU()(_bn(train, "bn1")(x))
        else:
            x = _conv(64, 7, 2, padding=3, name="conv1")(x_BxHxWxC)
            x = ReLU()(_bn(train, "bn1")(x))
            x = MaxPool(3, 2, padding=1, name="maxpool")(x)
        for s, n_blocks in enumerate(self.stage_sizes):
            for b in range(n_blocks):
                stride = 2 if s > 0 and b == 0 else 1
                x = block(64 * 2**s, stride, name=f"layer{s + 1}_{b}")(x, train)
        x = GlobalAvgPool()(x)
        return nn.Dense(self.num_classes, name="fc")(x)
