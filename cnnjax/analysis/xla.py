"""XLA's own figures next to the analysis: they compile; the analysis itself never does."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.analysis.program import linen_variables
from cnnjax.analysis.table import analyze
from cnnjax.geometry import MIB


def xla_check(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """For a batch of `input_shape`: the forward pass's flops against 2 x MACs, and a compiled
    SGD training step's buffers (arguments + outputs + temporaries) against the memory
    estimate."""
    input_shape = tuple(input_shape)
    result = analyze(model, input_shape, batch_size=input_shape[0])
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    variables = linen_variables(model, input_shape)

    def sgd_step(variables, x):
        grads = jax.grad(lambda v: model.apply(v, x).sum())(variables)
        return jax.tree.map(lambda v, g: v - 1e-3 * g, variables, grads)

    forward = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
    forward = forward[0] if isinstance(forward, list) else forward
    mem = jax.jit(sgd_step, donate_argnums=0).lower(variables, x).compile().memory_analysis()
    step_bytes = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    macs = result.totals.macs * input_shape[0]
    return {
        "xla_forward_flops": forward["flops"],
        "macs": macs,
        "flops_ratio": forward["flops"] / (2 * macs),
        "xla_step_mb": step_bytes / MIB,
        "estimated_mb": result.totals.total_mb,
        "memory_ratio": step_bytes / MIB / result.totals.total_mb,
    }
