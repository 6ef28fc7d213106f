"""Pure training and evaluation steps: no I/O, no config, jit-compiled where they are called.

`train_step(state, batch, rng, preprocess=...) -> (state, metrics)` and
`eval_step(state, batch, preprocess=...) -> sums`; a batch is a dict of uint8 `image` (NHWC),
int32 `label` and, for evaluation, a float `mask` marking padded examples with 0.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

Preprocess = Callable[[jnp.ndarray], jnp.ndarray]
Metrics = dict[str, jnp.ndarray]


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and step, plus non-trained variables such as batch statistics."""

    model_state: Any = None  # every variable collection except "params" (e.g. batch_stats)


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, input_BxHxWxC: tuple[int, ...], rng
) -> TrainState:
    """Initialise the model on a dummy input of `input_BxHxWxC` and wrap it with the optimizer."""
    variables = jax.jit(lambda r: model.init(r, jnp.zeros(input_BxHxWxC, jnp.float32)))(rng)
    params = variables.pop("params")
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, model_state=variables)


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def cross_entropy(logits_BxK: jnp.ndarray, labels_B: jnp.ndarray) -> jnp.ndarray:
    """Per-example softmax cross-entropy, in float32 whatever the logits' dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxK.astype(jnp.float32), labels_B)


def train_step(
    state: TrainState, batch: dict, rng, *, preprocess: Preprocess
) -> tuple[TrainState, Metrics]:
    """One optimizer step on `batch`; `rng` drives dropout and is folded with the step."""
    x = preprocess(batch["image"])
    rng = jax.random.fold_in(rng, state.step)
    mutable = list(state.model_state.keys())

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, **state.model_state},
            x,
            train=True,
            rngs={"dropout": rng},
            mutable=mutable,
        )
        return cross_entropy(logits, batch["label"]).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, model_state=updates)
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return state, {"loss": loss, "accuracy": accuracy}


def eval_step(state: TrainState, batch: dict, *, preprocess: Preprocess) -> Metrics:
    """Sums over the unmasked examples of `batch`: loss, correct predictions and count."""
    logits = state.apply_fn(
        {"params": state.params, **state.model_state}, preprocess(batch["image"]), train=False
    )
    mask = batch["mask"]
    correct = (logits.argmax(-1) == batch["label"]) * mask
    return {
        "loss_sum": (cross_entropy(logits, batch["label"]) * mask).sum(),
        "correct": correct.sum(),
        "count": mask.sum(),
    }
