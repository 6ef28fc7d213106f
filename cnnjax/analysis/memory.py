"""The memory a training step needs, by optimizer and compute dtype: parameters, their
gradients, the optimizer's state, the model's other variables, the input batch, and the
activations the backward pass keeps. Answers "the largest batch that fits in N GB".

Activations kept for the backward pass are the residuals of `jax.vjp` of the loss with respect
to the parameters, traced at batches of 1 and 2 (nothing runs): their growth per image is the
activation memory per image. In bf16 they are bf16, and the parameters have a bf16 copy.
XLA's own count for the compiled step (`compare_with_xla`) adds its working buffers.
"""

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cnnjax import engine
from cnnjax.analysis.program import linen_variables
from cnnjax.geometry import MIB

OPTIMIZERS = {  # the optimizers a plan is made for: name -> optax transformation
    "sgd": optax.sgd(0.1, momentum=0.9),
    "adam": optax.adam(1e-3),
}
GIB = 1024**3


def _nbytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step: fixed parts, and what grows with each image of the batch."""

    optimizer: str
    precision: str
    params: int  # trainable parameters (float32)
    gradients: int
    optimizer_state: int
    model_state: int  # non-trained variables (BatchNorm statistics)
    compute_copy: int  # the parameters cast to the compute dtype (bf16 only)
    input_per_image: int  # the uint8 image and its int32 label
    activations_per_image: int  # kept for the backward pass

    @property
    def fixed(self) -> int:
        return (
            self.params + self.gradients + self.optimizer_state + self.model_state
            + self.compute_copy
        )  # fmt: skip

    @property
    def per_image(self) -> int:
        return self.input_per_image + self.activations_per_image

    def total(self, batch_size: int) -> int:
        return self.fixed + batch_size * self.per_image

    def largest_batch(self, budget_bytes: float) -> int:
        """The largest batch whose step fits in `budget_bytes` (0: not even the parameters)."""
        return max(int((budget_bytes - self.fixed) // self.per_image), 0)


def _takes_train(model: nn.Module) -> bool:
    return "train" in inspect.signature(type(model).__call__).parameters


def _loss(model: nn.Module, dtype) -> Any:
    """loss(params, model_state, x): the summed logits of a training-mode forward pass."""
    train = {"train": True} if _takes_train(model) else {}

    def loss(params, model_state, x):
        cast = engine.cast_floating
        variables = {"params": cast(params, dtype), **model_state}
        out = model.apply(variables, cast(x, dtype), rngs={"dropout": jax.random.key(0)},
                          mutable=list(model_state) or False, **train)  # fmt: skip
        logits = out[0] if model_state else out
        return logits.astype(jnp.float32).sum()

    return loss


def _residual_bytes(model: nn.Module, variables: Any, image: Sequence[int], batch: int, dtype):
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    x = jax.ShapeDtypeStruct((batch, *image), jnp.float32)
    loss = _loss(model, dtype)

    def residuals(params, model_state, x):
        return jax.vjp(lambda p: loss(p, model_state, x), params)[1]

    return _nbytes(jax.eval_shape(residuals, params, model_state, x))


def plans(
    model: nn.Module,
    input_shape: Sequence[int],
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
    precisions: Sequence[str] = tuple(engine.COMPUTE_DTYPES),
) -> list[StepMemory]:
    """The memory of a training step of `model` on images of `input_shape[1:]`, for each
    optimizer and precision (in that order): the model is traced once per precision."""
    image = tuple(input_shape[1:])
    variables = linen_variables(model, (1, *image))
    params = variables["params"]
    param_bytes = _nbytes(params)
    model_state = _nbytes({k: v for k, v in variables.items() if k != "params"})
    activations, copies = {}, {}
    for precision in precisions:
        dtype = engine.COMPUTE_DTYPES[precision]
        one, two = (_residual_bytes(model, variables, image, b, dtype) for b in (1, 2))
        activations[precision] = two - one
        copies[precision] = 0 if dtype is None else param_bytes * jnp.dtype(dtype).itemsize // 4
    return [
        StepMemory(
            optimizer=optimizer,
            precision=precision,
            params=param_bytes,
            gradients=param_bytes,
            optimizer_state=_nbytes(jax.eval_shape(OPTIMIZERS[optimizer].init, params)),
            model_state=model_state,
            compute_copy=copies[precision],
            input_per_image=math.prod(image) + 4,  # the uint8 image and its int32 label
            activations_per_image=activations[precision],
        )
        for optimizer in optimizers
        for precision in precisions
    ]


def plan(
    model: nn.Module, input_shape: Sequence[int], optimizer: str = "adam", precision: str = "fp32"
) -> StepMemory:
    """The memory of a training step of `model` with one optimizer and precision."""
    (step,) = plans(model, input_shape, (optimizer,), (precision,))
    return step


def compare_with_xla(model: nn.Module, input_shape: Sequence[int], step: StepMemory) -> dict:
    """The plan `step` at `input_shape[0]` images against the compiled engine training step's
    buffers (arguments + outputs + temporaries - donated), in MB. Compiles."""
    batch, image = input_shape[0], tuple(input_shape[1:])
    tx = OPTIMIZERS[step.optimizer]
    state = jax.eval_shape(
        lambda r: engine.create_train_state(model, tx, (1, *image), r), jax.random.key(0)
    )
    batch_spec = {
        "image": jax.ShapeDtypeStruct((batch, *image), jnp.uint8),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }

    def train_step(state, batch_, rng):
        return engine.train_step(state, batch_, rng, preprocess=lambda im: im / 255.0,
                                 compute_dtype=engine.COMPUTE_DTYPES[step.precision])  # fmt: skip

    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch_spec, jax.random.key(0))
    mem = compiled.compile().memory_analysis()
    xla = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )  # fmt: skip
    return {
        "batch_size": batch,
        "estimate_mb": step.total(batch) / MIB,
        "xla_mb": xla / MIB,
        "ratio": xla / step.total(batch),
    }
