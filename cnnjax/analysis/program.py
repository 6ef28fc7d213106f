"""A model (Flax Linen, Flax NNX) or a function `f(params, x)` as the program JAX traces: its
jaxpr, the parameter leaves it reads, and (for Linen) the module calls that made each equation.
Nothing is allocated or compiled."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core

from cnnjax.analysis.calls import Call, CallScopes


@dataclass(frozen=True)
class Leaf:
    """One variable of the model: its path ("params/conv1/kernel"), size and bytes."""

    path: str
    size: int
    nbytes: int
    trainable: bool
    owner: str  # the path of the module holding it ("conv1"), without the collection


@dataclass(frozen=True)
class Program:
    jaxpr: core.ClosedJaxpr  # inputs: the variables' leaves, then the image
    leaves: tuple[Leaf, ...]
    calls: tuple[Call, ...]  # Linen module calls, by index (empty for NNX and functions)
    types: dict[str, str]  # module path -> class name (NNX)
    variables: Any  # the abstract variables


def _leaves(variables: Any, collections: bool) -> tuple[Leaf, ...]:
    """The leaves of `variables`; with `collections` the first key names a collection, and
    only "params" is trainable."""
    out = []
    for keys, x in jax.tree_util.tree_flatten_with_path(variables)[0]:
        path = jax.tree_util.keystr(keys, simple=True, separator="/").removesuffix("/value")
        parts = path.split("/")
        size = int(x.size)
        trainable = parts[0] == "params" or not collections
        owner = "/".join(parts[1:-1] if collections else parts[:-1])
        out.append(Leaf(path, size, size * jnp.dtype(x.dtype).itemsize, trainable, owner))
    return tuple(out)


def _image(input_shape: Sequence[int]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)


def linen_variables(model: nn.Module, input_shape: Sequence[int]) -> Any:
    """The model's variables as shapes (`init` under jax.eval_shape), after the geometry check
    of every conv and pool."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}

    def init(x):
        with nn.intercept_methods(CallScopes()):
            return model.init(rngs, x)

    return jax.eval_shape(init, _image(input_shape))


def from_linen(model: nn.Module, input_shape: Sequence[int]) -> Program:
    """The program of `model.apply(variables, x)` in evaluation mode."""
    variables = linen_variables(model, input_shape)
    scopes = CallScopes()

    def apply(variables, x):
        with nn.intercept_methods(scopes):
            return model.apply(variables, x)

    jaxpr = jax.make_jaxpr(apply)(variables, _image(input_shape))
    return Program(jaxpr, _leaves(variables, True), tuple(scopes.calls), {}, variables)


def from_nnx(model: Any, input_shape: Sequence[int]) -> Program:
    """The program of an NNX module's call; its `nnx.Param`s are the trainable leaves."""
    from flax import nnx  # imported when used: most models are Linen

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    variables = {"params": params, "rest": rest}

    def apply(variables, x):
        return nnx.merge(graphdef, variables["params"], variables["rest"])(x)

    jaxpr = jax.make_jaxpr(apply)(variables, _image(input_shape))
    types = {
        "/".join(map(str, path)): type(node).__name__
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module) and path
    }
    return Program(jaxpr, _leaves(variables, True), (), types, variables)


def from_function(fn: Callable, params: Any, input_shape: Sequence[int]) -> Program:
    """The program of `fn(params, x)`; every leaf of `params` counts as trainable."""
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    jaxpr = jax.make_jaxpr(fn)(params, _image(input_shape))
    return Program(jaxpr, _leaves(params, False), (), {}, params)


def _is_nnx(model: Any) -> bool:
    from flax import nnx

    return isinstance(model, nnx.Module)


def trace(model: Any, input_shape: Sequence[int], params: Any = None) -> Program:
    """The program of a Linen module, an NNX module, or `model(params, x)`."""
    if isinstance(model, nn.Module):
        return from_linen(model, input_shape)
    if _is_nnx(model):
        return from_nnx(model, input_shape)
    if callable(model) and params is not None:
        return from_function(model, params, input_shape)
    raise TypeError(
        f"cannot analyse {type(model).__name__}: pass a flax.linen Module, a flax.nnx Module, "
        "or a function f(params, x) with its params"
    )
