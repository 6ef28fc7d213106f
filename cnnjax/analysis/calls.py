"""Flax Linen module calls seen while a model is traced: `LeafCalls` (hooks around every leaf
call, for code that records layer outputs) and `CallScopes` (a JAX name scope per call, so each
equation of the program says which call made it; and a geometry check before a conv or pool
runs, naming the layer).
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax

from cnnjax import geometry, layers
from cnnjax.geometry import GeometryError, Pair

TOKEN = "cnnjax_call_"
_TOKEN = re.compile(rf"{TOKEN}(\d+)")


def layer_name(module: nn.Module) -> str:
    """A module's path in the model ("layer1_0/conv1"); the root's class name."""
    return "/".join(module.scope.path) or type(module).__name__


def innermost_call(stack: str) -> int | None:
    """The index of the innermost module call on an equation's name stack, None outside any."""
    found = _TOKEN.findall(stack)
    return int(found[-1]) if found else None


@dataclass
class LeafCalls:
    """An `nn.intercept_methods` interceptor: `before(module, name, arrays)` ahead of every
    module call and `after(module, name, arrays, output)` after each leaf call (a module that
    calls no other module), with the call's array arguments."""

    before: Callable | None = None
    after: Callable | None = None
    children: list[int] = field(default_factory=list)  # calls made by each open call

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module, name = context.module, layer_name(context.module)
        if self.children:
            self.children[-1] += 1
        self.children.append(0)
        arrays = [a for a in args if hasattr(a, "shape")]
        if self.before:
            self.before(module, name, arrays)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            leaf = self.children.pop() == 0
        if leaf and self.after:
            self.after(module, name, arrays, out)
        return out


@dataclass
class Call:
    """One module call: its path, its class, and whether it called no other module."""

    path: str
    type: str
    leaf: bool = True
    window: "Window | None" = None  # of a conv or pool module, as declared


@dataclass
class CallScopes:
    """An `nn.intercept_methods` interceptor that runs each module call inside
    `jax.named_scope("cnnjax_call_<i>")` (so `innermost_call` finds it on every equation it
    makes) after checking the geometry of a conv or pool, and lists the calls."""

    calls: list[Call] = field(default_factory=list)
    open: list[int] = field(default_factory=list)

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        index = len(self.calls)
        self.calls.append(Call(layer_name(module), type(module).__name__))
        if self.open:
            self.calls[self.open[-1]].leaf = False
        arrays = [a for a in args if hasattr(a, "shape")]
        if arrays and len(arrays[0].shape) == 4:
            self.calls[-1].window = check_geometry(module, self.calls[-1].path, arrays[0].shape)
        self.open.append(index)
        try:
            with jax.named_scope(f"{TOKEN}{index}"):
                out = next_fun(*args, **kwargs)
                if any(out is a for a in arrays):  # computes nothing (dropout when evaluating)
                    out = jax.lax.optimization_barrier(out)  # an equation, so that it has a row
                return out
        finally:
            self.open.pop()


@dataclass(frozen=True)
class Window:
    """A conv or pool module's window per spatial axis; `pads` already resolved."""

    kernel: Pair
    stride: Pair
    pads: tuple[Pair, Pair]
    dilation: Pair = (1, 1)


def window_of(module: nn.Module, in_hw: Pair, name: str) -> Window | None:
    """The sliding window of a 2-D conv or pool module, None for other modules."""
    if isinstance(module, nn.Conv) and not isinstance(module, nn.ConvTranspose):
        if geometry.as_pair(module.input_dilation) != (1, 1):
            return None
        kernel, stride = geometry.as_pair(module.kernel_size), geometry.as_pair(module.strides)
        dilation, pad = geometry.as_pair(module.kernel_dilation), module.padding
    elif isinstance(module, layers.MaxPool | layers.AvgPool):
        kernel = (module.window,) * 2
        stride = (module.stride,) * 2 if module.stride else kernel
        dilation, pad = (1, 1), module.padding
    else:
        return None
    if isinstance(pad, str | int):
        per_axis = [pad, pad]
    else:
        per_axis = [p if isinstance(p, int) else tuple(p) for p in pad]
    pads = tuple(
        geometry.resolve_padding(per_axis[a], in_hw[a], kernel[a], stride[a], dilation[a], name)
        for a in range(2)
    )
    return Window(kernel, stride, pads, dilation)


def check_geometry(module: nn.Module, name: str, shape: tuple[int, ...]) -> Window | None:
    """The window of a conv or pool module; raises GeometryError, naming the layer and the
    formula, before one whose output would be empty runs."""
    w = window_of(module, tuple(shape[1:3]), name)
    if w is None:
        return None
    try:
        for a in range(2):
            geometry.conv_output_size(
                shape[1 + a], w.kernel[a], w.stride[a], w.pads[a], w.dilation[a], name
            )
    except GeometryError as e:
        raise GeometryError(f"{e}. Its input map is {shape[1]}x{shape[2]}x{shape[3]}") from None
    return w
