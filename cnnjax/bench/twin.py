"""The same network in PyTorch, built from the analysis layer table, with the Flax weights.

For reference runs only (`pip install -e '.[torch]'`); cnnjax never needs torch to train. Chain
models (no branches) are supported: Conv, MaxPool, AvgPool, ReLU, Flatten, GlobalAvgPool, Dense,
Dropout and BatchNorm rows. Flax flattens NHWC maps in (h, w, c) order, so the twin's Flatten
permutes NCHW to NHWC first and the dense weights transfer unchanged.
"""

from typing import Any

import numpy as np
import torch
from torch import nn

from cnnjax.analysis import Analysis, Row
from cnnjax.errors import ConfigError


class FlattenNHWC(nn.Module):
    """Flatten in Flax's (h, w, c) order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _tensor(a: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy


def _padding(row: Row) -> tuple[nn.Module | None, tuple[int, int]]:
    """Symmetric pads go to the layer; lopsided ones (JAX 'SAME') to a ZeroPad2d before it."""
    (top, bottom), (left, right) = row.padding
    if top == bottom and left == right:
        return None, (top, left)
    return nn.ZeroPad2d((left, right, top, bottom)), (0, 0)


SIMPLE = {
    "ReLU": nn.ReLU,
    "Flatten": FlattenNHWC,
    "GlobalAvgPool": GlobalAvgPool,
}
SUPPORTED = {"Conv", "Dense", "MaxPool", "AvgPool", "BatchNorm", "Dropout", *SIMPLE}


def _layer(row: Row, variables: dict, dropout: float) -> list[nn.Module]:
    params = variables.get("params", {})
    if row.type == "Conv":
        pad, padding = _padding(row)
        conv = nn.Conv2d(
            row.input_shape[-1], row.output_shape[-1], row.kernel, row.stride, padding,
            row.dilation, row.groups, bias="bias" in params,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(_tensor(params["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
            if "bias" in params:
                conv.bias.copy_(_tensor(params["bias"]))
        return [m for m in (pad, conv) if m is not None]
    if row.type == "Dense":
        linear = nn.Linear(row.input_shape[-1], row.output_shape[-1], bias="bias" in params)
        with torch.no_grad():
            linear.weight.copy_(_tensor(params["kernel"]).T)
            if "bias" in params:
                linear.bias.copy_(_tensor(params["bias"]))
        return [linear]
    if row.type in ("MaxPool", "AvgPool"):
        pad, padding = _padding(row)
        pool_cls = nn.MaxPool2d if row.type == "MaxPool" else nn.AvgPool2d
        return [m for m in (pad, pool_cls(row.kernel, row.stride, padding)) if m is not None]
    if row.type == "BatchNorm":
        stats = variables.get("batch_stats", {})
        bn = nn.BatchNorm2d(row.output_shape[-1], eps=1e-5, momentum=0.1)
        with torch.no_grad():
            bn.weight.copy_(_tensor(params["scale"]))
            bn.bias.copy_(_tensor(params["bias"]))
            bn.running_mean.copy_(_tensor(stats["mean"]))
            bn.running_var.copy_(_tensor(stats["var"]))
        return [bn]
    if row.type == "Dropout":
        return [nn.Dropout(dropout)]
    return [SIMPLE[row.type]()]


def branches(table: Analysis) -> bool:
    """True when paths of the model meet (a residual add, a concatenation)."""
    return any(r.type == "Add" or "concat" in r.type.split("+") for r in table.rows)


def check(table: Analysis) -> None:
    """Raise ConfigError when the twin of `table`'s model cannot be built."""
    if branches(table):
        raise ConfigError("the PyTorch twin supports chain models only (this one has branches)")
    for row in table.rows:
        if row.type not in SUPPORTED:
            raise ConfigError(
                f"the PyTorch twin has no {row.type} layer ({row.name}); it supports chain "
                "models of Conv, MaxPool, AvgPool, ReLU, Flatten, GlobalAvgPool, Dense, Dropout, "
                "BatchNorm"
            )


def build(table: Analysis, variables: dict[str, Any], dropout: float = 0.5) -> nn.Sequential:
    """A torch.nn.Sequential computing what the Flax model computes, on NCHW inputs; its Dropout
    rows drop with rate `dropout` in training mode (0.5: AlexNet's and VGG's default)."""
    check(table)
    modules = []
    for row in table.rows:
        own = _scope(variables, row.name.split("/"))
        modules += _layer(row, own, dropout)
    return nn.Sequential(*modules)


def _scope(variables: dict, path: list[str]) -> dict:
    """The variables of the module at `path`, per collection."""
    out = {}
    for collection, tree in variables.items():
        node = tree
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        out[collection] = node
    return out
