"""Pinned parameter counts and output shapes of every model, from jax.eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CONF_DIR
from hydra.utils import instantiate

from cnnjax import engine

# Parameter counts with 10 classes (from the notes' tables and formulas).
PARAMS_10 = {
    "mnist_allconv": 33_058,
    "lenet": 81_194,
    "lenet5": 59_386,
    "alexnet": 58_322_314,  # 62,378,344 - 4097 * 990: fc3 shrinks from 1000 to 10 outputs
    "blocknet": 20_106,
}


def param_count(model, batch: int = 2) -> tuple[int, tuple]:
    x = jax.ShapeDtypeStruct(
        (batch, model.input_size, model.input_size, model.in_channels), jnp.float32
    )
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    return sum(np.prod(a.shape) for a in jax.tree.leaves(variables["params"])), out.shape


def test_every_model_config_is_pinned():
    assert {p.stem for p in (CONF_DIR / "model").glob("*.yaml")} == set(PARAMS_10)


@pytest.mark.parametrize("name", sorted(PARAMS_10))
def test_params_and_output_shape(compose_cfg, name):
    model = instantiate(compose_cfg(f"model={name}").model)
    n, shape = param_count(model, batch=3)
    assert n == PARAMS_10[name]
    assert shape == (3, 10)


@pytest.mark.parametrize(
    "name, classes, expected",
    [("alexnet", 1000, 62_378_344), ("mnist_allconv", 10, 33_058), ("lenet", 10, 81_194)],
)
def test_published_counts(compose_cfg, name, classes, expected):
    model = instantiate(compose_cfg(f"model={name}", f"model.num_classes={classes}").model)
    assert param_count(model)[0] == expected


@pytest.mark.parametrize("name", ["mnist_allconv", "lenet", "lenet5", "blocknet"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(compose_cfg, name):
    model = instantiate(compose_cfg(f"model={name}").model)
    size = model.input_size
    shape = (32, size, size, model.in_channels)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 32).astype(np.int32)
    images = rng.integers(0, 60, shape).astype(np.uint8)
    for image, k in zip(images, labels, strict=True):  # class k: a bright band at row 2k+4
        image[2 * k + 4 : 2 * k + 6, 4 : size - 4] = 250
    batch = {"image": images, "label": labels}
    state = engine.create_train_state(model, optax.adam(3e-3), shape, jax.random.key(0))
    step = jax.jit(
        lambda s, b: engine.train_step(
            s, b, jax.random.key(1), preprocess=lambda x: (x / 255.0 - 0.2) * 3
        )
    )
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 20
