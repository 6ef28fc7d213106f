"""oneDNN's convolutions (cnnjax/_onednn.so, built by make) against XLA's: values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra.utils import instantiate

from cnnjax import engine, models, onednn
from cnnjax.errors import ConfigError
from cnnjax.models.mnist_allconv import MnistAllConv

# (input NHWC, kernel HWIO, strides, padding, dilation): odd batches split unevenly over threads
CASES = {
    "3x3 same": ((4, 9, 11, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    "5x3 stride 2x1 uneven pads": ((5, 10, 10, 4), (5, 3, 4, 6), (2, 1), ((0, 1), (2, 0)), (1, 1)),
    "SAME dilated stride 1x2": ((2, 12, 12, 2), (3, 3, 2, 4), (1, 2), "SAME", (2, 2)),
    "1 channel valid": ((3, 28, 28, 1), (3, 3, 1, 8), (1, 1), "VALID", (1, 1)),
    "batch 1, 11x11 stride 4": ((1, 35, 35, 3), (11, 11, 3, 16), (4, 4), "VALID", (1, 1)),
    "1x1": ((7, 6, 6, 16), (1, 1, 16, 8), (1, 1), "VALID", (1, 1)),
}


def _loss(x, w, b, geometry):
    y = onednn.conv(x, w, b, *geometry)
    return (y * jnp.sin(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))).sum()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_values_and_gradients_equal_xla(case, bias):
    x_shape, w_shape, *geometry = case
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    b = jax.random.normal(jax.random.key(2), w_shape[-1:]) if bias else None
    argnums = (0, 1, 2) if bias else (0, 1)
    value_and_grad = jax.value_and_grad(_loss, argnums)
    grad = {
        name: jax.jit(onednn.using(name, value_and_grad), static_argnums=3)
        for name in ("xla", "onednn")
    }
    expected = grad["xla"](x, w, b, tuple(geometry))
    hlo = grad["onednn"].lower(x, w, b, tuple(geometry)).as_text()
    got = grad["onednn"](x, w, b, tuple(geometry))
    assert hlo.count("cnnjax_conv_") == 3  # forward, backward-data, backward-weights
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * float(jnp.abs(e).max()))


def _lowered(x, w, backend: str | None = None, groups=1) -> str:
    f = functools.partial(onednn.conv, strides=(1, 1), padding="SAME", groups=groups)
    fn = lambda x, w: f(x, w, None)  # noqa: E731
    return jax.jit(fn if backend is None else onednn.using(backend, fn)).lower(x, w).as_text()


def test_xla_unless_asked_and_for_what_onednn_does_not_take():
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    assert "cnnjax_conv" not in _lowered(x, w)  # nobody asked: XLA's
    assert "cnnjax_conv" in _lowered(x, w, "onednn")
    assert "cnnjax_conv" not in _lowered(x, w, "xla")
    bf16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert "cnnjax_conv" not in _lowered(*bf16, "onednn")
    assert "cnnjax_conv" not in _lowered(x, jnp.ones((3, 3, 2, 4)), "onednn", groups=2)
    with pytest.raises(ValueError, match="convolution backend 'auto': use 'xla' or 'onednn'"):
        onednn.using("auto", jnp.sum)


def test_the_backend_is_part_of_what_jit_compiles():
    """The backend is bound into the step before jit: one compiled function per backend, and
    tracing one never changes the kernels of the other (a backend read from context at trace
    time would be cached with whichever trace came first)."""
    model = MnistAllConv()
    state = engine.create_train_state(model, optax.sgd(0.1), (1, 28, 28, 1), jax.random.key(0))
    batch = {"image": jnp.zeros((4, 28, 28, 1), jnp.uint8), "label": jnp.zeros(4, jnp.int32)}
    step = {
        backend: jax.jit(
            functools.partial(engine.train_step, preprocess=lambda i: i / 255, conv_backend=backend)
        )
        for backend in ("xla", "onednn")
    }
    lowered = {b: f.lower(state, batch, jax.random.key(1)).as_text() for b, f in step.items()}
    assert lowered["xla"].count("cnnjax_conv_") == 0
    assert lowered["onednn"].count("cnnjax_conv_forward") == 7  # every conv of the model
    assert step["xla"].lower(state, batch, jax.random.key(1)).as_text() == lowered["xla"]


def test_backend_names():
    assert onednn.resolve("auto") == "onednn"  # on this CPU, with the library built
    assert onednn.resolve("xla") == "xla"
    with pytest.raises(ConfigError, match="unknown convolution backend 'mkl'"):
        onednn.resolve("mkl")


def test_missing_library_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "LIBRARY", tmp_path / "_onednn.so")
    monkeypatch.setattr(onednn, "available", functools.cache(onednn.available.__wrapped__))
    assert onednn.resolve("auto") == "xla"
    with pytest.raises(ConfigError, match="is not available .*make onednn"):
        onednn.resolve("onednn")


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=mnist_allconv"],
        ["model=blocknet", "model.batch_norm=true"],  # convolutions without bias, BatchNorm
        # strides, 1x1 shortcuts, residual adds (a block per stage: the same kinds of layer)
        ["model=resnet18", "model.input_size=32", "model.stage_sizes=[1,1,1,1]"],
    ],
    ids=lambda o: " ".join(o),
)
def test_train_steps_match_xla(compose_cfg, overrides):
    """One SGD step (forward, backward and update through the whole net) gives the same loss and
    parameters with either backend. Later steps are left out: they amplify float rounding in
    these small-batch nets by orders of magnitude, as much between XLA's own NHWC and NCHW
    convolutions as between XLA and oneDNN."""
    model = instantiate(compose_cfg(*overrides).model)
    tx = optax.sgd(0.05, momentum=0.9)
    shape = models.input_shape(model, batch_size=33)
    # float pixels: with uint8 ones this ResNet's first-block gradients are ill-conditioned
    # (XLA's own NHWC and NCHW convolutions already disagree there by 5%)
    batch = {
        "image": jax.random.uniform(jax.random.key(2), shape),
        "label": jnp.arange(shape[0]) % 10,
    }
    results = {}
    for name in ("xla", "onednn"):
        state = engine.create_train_state(model, tx, (1, *shape[1:]), jax.random.key(0))
        step = functools.partial(engine.train_step, preprocess=lambda i: i, conv_backend=name)
        state, metrics = jax.jit(step)(state, batch, jax.random.key(1))
        results[name] = (state.params, metrics["loss"])
    np.testing.assert_allclose(results["onednn"][1], results["xla"][1], rtol=1e-5)
    for a, b in zip(*(jax.tree.leaves(r[0]) for r in results.values()), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()))  # per leaf scale
