"""VGG (torchvision's non-BN vgg11/vgg16) on 224x224x3: 132,863,336 and 138,357,544 params.

Stages of 3x3 convs (padding 1, ReLU), each ending in a 2x2 max-pool; then torchvision's
AdaptiveAvgPool to 7x7, flatten and three dense layers (4096, 4096, classes) with dropout 0.5
before the last two. Initialisation as torchvision: convs kaiming-normal (fan out, ReLU gain),
dense layers normal(0, 0.01), biases zero.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.geometry import GeometryError
from cnnjax.layers import AvgPool, Flatten, MaxPool, ReLU, conv

VGG11 = ((64,), (128,), (256, 256), (512, 512), (512, 512))
VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.normal(0.01)


class VGG(nn.Module):
    """224 -> 112 -> 56 -> 28 -> 14 -> 7; 7*7*512 = 25088 -> 4096 -> 4096 -> classes.

    The head pools the last map to `head_pool` x `head_pool` (an average pool, as torchvision's
    AdaptiveAvgPool, allowed only when the map is a multiple of it; the identity when equal).
    Small inputs: 32x32 ends in a 1x1x512 map, so `head_pool=1` (and e.g. `classifier_width=512`).
    """

    num_classes: int = 1000
    input_size: int = 224
    in_channels: int = 3
    stages: Sequence[Sequence[int]] = VGG16  # 3x3 conv widths per stage; each ends in a 2x2 pool
    head_pool: int = 7  # side of the map the classifier flattens
    classifier_width: int = 4096  # of the two hidden dense layers
    dropout: float = 0.5  # before the second and third dense layers, as torchvision

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x_BxHxWxC
        for s, widths in enumerate(self.stages, start=1):
            for i, width in enumerate(widths, start=1):
                x = conv(width, 3, padding=1, kernel_init=_conv_init, name=f"stage{s}_conv{i}")(x)
                x = ReLU()(x)
            if min(x.shape[1:3]) < 2:
                raise GeometryError(
                    f"VGG: the {x.shape[1]}x{x.shape[2]} map before stage {s}'s 2x2 max-pool is "
                    f"too small; input {x_BxHxWxC.shape[1]}x{x_BxHxWxC.shape[2]} is too small for "
                    f"{len(self.stages)} stages (use an input of at least {2 ** len(self.stages)})"
                )
            x = MaxPool(2, name=f"stage{s}_pool")(x)
        x = self._head_pool(x, x_BxHxWxC.shape[1:3])
        x = Flatten()(x)
        x = ReLU()(nn.Dense(self.classifier_width, kernel_init=_dense_init, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = ReLU()(nn.Dense(self.classifier_width, kernel_init=_dense_init, name="fc2")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=_dense_init, name="fc3")(x)

    def _head_pool(self, x: jnp.ndarray, input_hw: tuple[int, int]) -> jnp.ndarray:
        """torchvision's AdaptiveAvgPool to `head_pool`, where it is a plain average pool."""
        h, w, p = x.shape[1], x.shape[2], self.head_pool
        if h == w == p:
            return x
        if h != w or h % p:
            raise GeometryError(
                f"VGG: the last feature map is {h}x{w} (input {input_hw[0]}x{input_hw[1]}), "
                f"not a square multiple of head_pool={p}: set head_pool to a divisor of {h} "
                f"(head_pool={h} flattens it as is) or use a square input that is a multiple of "
                f"{2 ** len(self.stages) * p}"
            )
        return AvgPool(h // p, name="head_pool")(x)
