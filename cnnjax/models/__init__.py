"""Architectures: one family per file. Every model takes NHWC images and returns logits.

Each model declares `input_size` and `in_channels`, the image it expects; the data path adapts
the dataset to it. `train` switches dropout (and, where used, batch statistics) on.
"""
