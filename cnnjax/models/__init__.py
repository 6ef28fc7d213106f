"""Architectures: one family per file. Every model takes NHWC images and returns logits.

Each model declares `input_size` and `in_channels`, the image it expects; the data path adapts
the dataset to it. `train` switches dropout (and, where used, batch statistics) on.
"""

import flax.linen as nn

from cnnjax.errors import ConfigError


def input_shape(model: nn.Module, batch_size: int = 1) -> tuple[int, int, int, int]:
    """The NHWC input the model declares: (batch_size, input_size, input_size, in_channels)."""
    size, channels = getattr(model, "input_size", None), getattr(model, "in_channels", None)
    if size is None or channels is None:
        raise ConfigError(
            f"{type(model).__name__} declares no input_size/in_channels; pass the input shape"
        )
    return (batch_size, size, size, channels)
