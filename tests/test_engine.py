"""Recipe pieces of the engine: label smoothing, bfloat16 compute, BatchNorm train vs eval,
schedules and on-device augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import engine, schedules
from cnnjax.models.blocknet import BlockNet


def _state(model, lr: float = 1e-2) -> engine.TrainState:
    return engine.create_train_state(model, optax.sgd(lr), (1, 28, 28, 1), jax.random.key(0))


def _batch(n: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


def test_label_smoothing_matches_the_formula():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    logp = jax.nn.log_softmax(logits)[0]
    a = 0.1
    expected = -((1 - a + a / 3) * logp[0] + a / 3 * (logp[1] + logp[2]))
    got = engine.cross_entropy(logits, jnp.array([0]), label_smoothing=a)[0]
    assert got == pytest.approx(float(expected), rel=1e-6)
    assert engine.cross_entropy(logits, jnp.array([0]))[0] == pytest.approx(float(-logp[0]))


def test_bf16_step_computes_in_bf16_and_keeps_fp32_params():
    state, batch = _state(BlockNet(batch_norm=True)), _batch()

    def step(dtype):
        return engine.train_step(
            state, batch, jax.random.key(1), preprocess=lambda x: x / 255.0, compute_dtype=dtype
        )

    new, metrics = jax.jit(lambda: step(jnp.bfloat16))()
    dtypes = {a.dtype for a in jax.tree.leaves((new.params, new.model_state))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, new.params)
    assert max(jax.tree.leaves(moved)) > 0
    fp32_loss = float(jax.jit(lambda: step(None))()[1]["loss"])
    assert float(metrics["loss"]) == pytest.approx(fp32_loss, rel=0.05)  # the same maths...
    assert float(metrics["loss"]) != fp32_loss  # ...not computed in float32


def test_batchnorm_train_uses_batch_statistics_eval_the_running_ones():
    model = BlockNet(batch_norm=True)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    # eval: an example's logits do not depend on the rest of the batch
    alone = model.apply(variables, x[:1])
    assert jnp.allclose(model.apply(variables, x)[:1], alone, atol=1e-5)
    # train: they do, and the running statistics move
    train_all, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    train_two, _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
    assert not jnp.allclose(train_all[:1], train_two[:1], atol=1e-3)
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not jnp.allclose(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    "schedule, points",
    [
        (schedules.constant(0.1, 100), {0: 0.1, 50: 0.1, 99: 0.1}),
        (schedules.warmup_cosine(1.0, 100, warmup_steps=10), {0: 0.0, 5: 0.5, 10: 1.0, 100: 0.0}),
        # one-cycle: peak/25 -> peak at 30% -> peak/25/1e4
        (schedules.onecycle(1.0, 100), {0: 0.04, 30: 1.0, 100: 4e-6}),
        (schedules.step(1.0, 100), {0: 1.0, 49: 1.0, 50: 0.1, 74: 0.1, 75: 0.01, 99: 0.01}),
    ],
)
def test_schedule_values(schedule, points):
    for step, value in points.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-4, abs=1e-9), step
