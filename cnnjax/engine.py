"""Pure training and evaluation steps: no I/O, no config, jit-compiled where they are called.

`train_step(state, batch, rng, preprocess=...) -> (state, metrics)` and
`eval_step(state, batch, preprocess=...) -> sums`; a batch is a dict of uint8 `image` (NHWC),
int32 `label` and, for evaluation, a float `mask` marking padded examples with 0. Both take the
convolution backend (`conv_backend`, "xla" or "onednn"): bind it with the other keywords before
jitting, and each backend is its own compiled function.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from cnnjax import onednn

Preprocess = Callable[[jnp.ndarray], jnp.ndarray]
Augment = Callable[[jnp.ndarray, jax.Array], jnp.ndarray]  # (uint8 NHWC images, rng) -> images
Metrics = dict[str, jnp.ndarray]
COMPUTE_DTYPES = {"fp32": None, "bf16": jnp.bfloat16}  # trainer.precision; parameters stay fp32


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


def all_finite(tree: Any) -> jnp.ndarray:
    """True when every floating-point value of `tree` is finite (one device reduction)."""
    leaves = [
        jnp.isfinite(a).all()
        for a in jax.tree.leaves(tree)
        if jnp.issubdtype(a.dtype, jnp.floating)
    ]
    return jnp.all(jnp.array(leaves))


def cross_entropy(
    logits_BxK: jnp.ndarray, labels_B: jnp.ndarray, label_smoothing: float = 0.0
) -> jnp.ndarray:
    """Per-example softmax cross-entropy, in float32 whatever the logits' dtype; with
    `label_smoothing` a, the target puts 1 - a on the label and a/K on every class."""
    logits_BxK = logits_BxK.astype(jnp.float32)
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)
    targets = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BxK.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits_BxK, targets)


def cast_floating(tree: Any, dtype) -> Any:
    """Floating-point leaves to `dtype` (None: unchanged)."""
    if dtype is None:
        return tree
    floating = lambda a: jnp.issubdtype(a.dtype, jnp.floating)  # noqa: E731
    return jax.tree.map(lambda a: a.astype(dtype) if floating(a) else a, tree)


def train_step(
    state: TrainState,
    batch: dict,
    rng,
    *,
    preprocess: Preprocess,
    augment: Augment | None = None,
    label_smoothing: float = 0.0,
    compute_dtype: Any = None,
    conv_backend: str = "xla",
) -> tuple[TrainState, Metrics]:
    """One optimizer step on `batch`. `rng` is folded with the step, then drives augmentation
    (uint8 images, before preprocessing) and dropout. With `compute_dtype` (e.g. bfloat16) the
    forward and backward passes run in it while parameters and their updates stay float32."""
    apply = onednn.using(conv_backend, state.apply_fn)
    rng = jax.random.fold_in(rng, state.step)
    dropout_rng, augment_rng = jax.random.split(rng)
    images = batch["image"] if augment is None else augment(batch["image"], augment_rng)
    x = cast_floating(preprocess(images), compute_dtype)
    mutable = list(state.model_state.keys())

    def loss_fn(params):
        logits, updates = apply(
            {"params": cast_floating(params, compute_dtype), **state.model_state},
            x,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=mutable,
        )
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, model_state=cast_floating(updates, jnp.float32))
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return state, {"loss": loss, "accuracy": accuracy}


def eval_step(
    state: TrainState, batch: dict, *, preprocess: Preprocess, conv_backend: str = "xla"
) -> Metrics:
    """Sums over the unmasked examples of `batch`: loss, correct predictions and count."""
    logits = onednn.using(conv_backend, state.apply_fn)(
        {"params": state.params, **state.model_state}, preprocess(batch["image"]), train=False
    )
    mask = batch["mask"]
    correct = (logits.argmax(-1) == batch["label"]) * mask
    return {
        "loss_sum": (cross_entropy(logits, batch["label"]) * mask).sum(),
        "correct": correct.sum(),
        "count": mask.sum(),
    }
