"""Pinned parameter counts and output shapes of every model, from jax.eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import MODELS
from hydra.utils import instantiate

from cnnjax import engine

# Parameter counts with 10 classes (from the notes' tables and formulas).
PARAMS_10 = {
    "mnist_allconv": 33_058,
    "lenet": 81_194,
    "lenet5": 59_386,
    "alexnet": 58_322_314,  # 62,378,344 - 4097 * 990: fc3 shrinks from 1000 to 10 outputs
    "blocknet": 20_106,
    # torchvision's counts at 224x224x3 minus (1000 - 10) * (fc_in + 1) for the smaller last layer
    "vgg11": 128_807_306,  # 132,863,336 - 4097 * 990
    "vgg16": 134_301_514,  # 138,357,544 - 4097 * 990
    "resnet18": 11_181_642,  # 11,689,512 - 513 * 990
    "resnet50": 23_528_522,  # 25,557,032 - 2049 * 990
    # the small-input configs: AlexNet at 67x67 flattens 1x1x256, so fc1 has 257 * 4096
    "alexnet_small": 21_622_154,  # 58,322,314 - (9216 - 256) * 4096
    "vgg11_small": 9_750_922,  # convs 9,220,480 + 513 * 512 + 513 * 512 + 513 * 10
    "vgg16_small": 15_245_130,  # convs 14,714,688 + the same head
    "resnet18_small": 11_181_642,  # the layers of resnet18: a 32x32 input changes no count
    "resnet50_small": 23_528_522,
    "mobilenet_v2": 2_236_682,  # 3,504,872 - 1281 * 990
    "mobilenet_v2_small": 2_236_682,  # strides change no count
    "densenet121": 6_964_106,  # 7,978,856 - 1025 * 990
    "densenet121_small": 6_964_106,  # the layers of densenet121
}


def param_count(model, batch: int = 2) -> tuple[int, tuple]:
    x = jax.ShapeDtypeStruct(
        (batch, model.input_size, model.input_size, model.in_channels), jnp.float32
    )
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    return sum(np.prod(a.shape) for a in jax.tree.leaves(variables["params"])), out.shape


def test_every_model_config_is_pinned():
    assert set(MODELS) == set(PARAMS_10)


@pytest.mark.parametrize("name", sorted(PARAMS_10))
def test_params_and_output_shape(compose_cfg, name):
    model = instantiate(compose_cfg(f"model={name}").model)
    n, shape = param_count(model, batch=3)
    assert n == PARAMS_10[name]
    assert shape == (3, 10)


@pytest.mark.parametrize(
    "name, classes, expected",
    [
        ("alexnet", 1000, 62_378_344),
        ("mnist_allconv", 10, 33_058),
        ("lenet", 10, 81_194),
        ("vgg11", 1000, 132_863_336),  # torchvision vgg11
        ("vgg16", 1000, 138_357_544),  # torchvision vgg16
        ("resnet18", 1000, 11_689_512),  # torchvision resnet18
        ("resnet50", 1000, 25_557_032),  # torchvision resnet50
        ("mobilenet_v2", 1000, 3_504_872),  # torchvision mobilenet_v2
        ("densenet121", 1000, 7_978_856),  # torchvision densenet121
    ],
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


# Small inputs with the overrides the YAML comments of resnet18 and vgg11 give.
COMMENTED = {
    "resnet18": ["model.small_input=true"],
    "vgg11": ["model.head_pool=1", "model.classifier_width=512"],
}


@pytest.mark.parametrize("name", sorted(COMMENTED))
def test_small_input_overrides_run_on_32x32(compose_cfg, name):
    cfg = compose_cfg(f"model={name}", "model.input_size=32", *COMMENTED[name])
    model = instantiate(cfg.model)
    n, shape = param_count(model, batch=5)
    assert shape == (5, 10)
    assert n < PARAMS_10[name]


def test_vgg_head_rejects_a_map_it_cannot_pool(compose_cfg):
    model = instantiate(compose_cfg("model=vgg11", "model.input_size=32").model)  # 1x1 map, pool 7
    with pytest.raises(ValueError, match="head_pool=7"):
        param_count(model)


def test_resnet_train_step_updates_batch_stats(compose_cfg):
    cfg = compose_cfg(
        "model=resnet18", "model.input_size=32", "model.stage_sizes=[1,1,1,1]",
        *COMMENTED["resnet18"],
    )  # fmt: skip
    model = instantiate(cfg.model)
    shape = (4, 32, 32, 3)
    state = engine.create_train_state(model, optax.sgd(0.1), shape, jax.random.key(0))
    assert set(state.model_state) == {"batch_stats"}
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, shape).astype(np.uint8),
        "label": rng.integers(0, 10, 4).astype(np.int32),
    }
    step = jax.jit(
        lambda s, b: engine.train_step(s, b, jax.random.key(1), preprocess=lambda x: x / 255.0)
    )
    new, metrics = step(state, batch)
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
    before, after = state.model_state["batch_stats"], new.model_state["batch_stats"]
    assert jax.tree.structure(before) == jax.tree.structure(after)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
    assert all(jax.tree.leaves(changed))  # every running mean and variance moved
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
    assert any(
        bool(jnp.any(a != b))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params), strict=True)
    )
