"""The tiled max pool: XLA's reduce_window pool in value and gradient, first maximum on ties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cnnjax import layers


@pytest.mark.parametrize("k", [2, 3])
def test_tiled_max_pool_equals_reduce_window(k):
    x = jax.random.normal(jax.random.key(0), (3, 6 * k, 4 * k, 5))  # no ties
    cot = jax.random.normal(jax.random.key(1), (3, 6, 4, 5))
    pool = lambda f: lambda x: (f(x) * cot).sum()  # noqa: E731
    reference = pool(lambda x: nn.max_pool(x, (k, k), (k, k)))
    np.testing.assert_array_equal(layers.tiled_max_pool(x, k), nn.max_pool(x, (k, k), (k, k)))
    np.testing.assert_array_equal(
        jax.grad(pool(lambda x: layers.tiled_max_pool(x, k)))(x), jax.grad(reference)(x)
    )


def test_tied_windows_send_the_gradient_to_the_first_maximum():
    """As PyTorch's max_pool2d: row-major first; a window of zeros (after a ReLU) included."""
    x = jnp.array([[3.0, 3.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0]]).reshape(1, 2, 4, 1)
    weights = jnp.array([2.0, 5.0]).reshape(1, 1, 2, 1)
    dx = jax.grad(lambda x: (layers.tiled_max_pool(x, 2) * weights).sum())(x)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[2.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_max_pool_module_takes_the_tiled_path_for_unpadded_non_overlapping_windows():
    def hlo(x, **kw):
        return jax.jit(lambda x: layers.MaxPool(**kw).apply({}, x)).lower(x).as_text()

    assert "reduce_window" not in hlo(jnp.ones((1, 8, 8, 1)), window=2)
    assert "reduce_window" in hlo(jnp.ones((1, 8, 8, 1)), window=3, stride=2)  # overlapping
    assert "reduce_window" in hlo(jnp.ones((1, 8, 8, 1)), window=2, padding=1)


def test_max_pool_crops_what_the_floor_drops():
    x = jax.random.normal(jax.random.key(0), (2, 13, 11, 3))
    cot = jax.random.normal(jax.random.key(1), (2, 6, 5, 3))
    reference = lambda x: (nn.max_pool(x, (2, 2), (2, 2)) * cot).sum()  # noqa: E731
    ours = lambda x: (layers.MaxPool(2).apply({}, x) * cot).sum()  # noqa: E731
    np.testing.assert_array_equal(ours(x), reference(x))
    np.testing.assert_array_equal(jax.grad(ours)(x), jax.grad(reference)(x))
