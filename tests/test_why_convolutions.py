"""experiments/why_convolutions: the three connectivities' parameters against the formulas, the
translation equivariance of a shared-weight layer (and its absence without sharing), the notes'
dense-layer numbers and the study's image shift."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import probe
from cnnjax.errors import ConfigError
from cnnjax.geometry import conv_macs
from cnnjax.models.locality import ConvNet, FullyConnectedNet, LocallyConnectedNet

SHIFT_PY = Path(__file__).parents[1] / "experiments" / "why_convolutions" / "shift.py"
_spec = importlib.util.spec_from_file_location("why_convolutions_shift", SHIFT_PY)
shift = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shift)

TINY = {"input_size": 12, "features": (2, 3)}  # 12 -> 6 -> 3


def init(model, size: int) -> dict:
    return model.init(jax.random.key(0), jnp.zeros((1, size, size, model.in_channels)))


def shapes(model, size: int) -> dict:
    """The variables' shapes, nothing computed."""
    return jax.eval_shape(lambda: init(model, size))


def per_layer(variables: dict) -> list[int]:
    params = variables["params"]
    names = sorted(n for n in params if n.startswith("layer")) + ["classifier"]
    return [sum(v.size for v in jax.tree.leaves(params[n])) for n in names]


@pytest.mark.parametrize("head", ["pool", "flatten"])
def test_parameters_follow_the_formulas(head):
    nets = [cls(head=head, **TINY) for cls in (ConvNet, LocallyConnectedNet, FullyConnectedNet)]
    conv, local, dense = (per_layer(shapes(net, 12)) for net in nets)
    assert [net.layer_params() for net in nets] == [conv, local, dense]
    classifier = (3 * (9 if head == "flatten" else 1) + 1) * 10
    assert conv == [(9 * 1 + 1) * 2, (9 * 2 + 1) * 3, classifier]  # (F*F*D1 + 1)*K
    assert local == [36 * (9 * 1 + 1) * 2, 9 * (9 * 2 + 1) * 3, classifier]  # x positions
    assert dense == [(144 + 1) * 72, (72 + 1) * 27, classifier]  # every unit to every unit


def test_the_study_defaults():
    """The numbers the study's README quotes for its three nets (pool head)."""
    assert ConvNet().map_sizes() == [28, 14, 7, 4]
    assert ConvNet().layer_params() == [160, 4_640, 18_496, 650]
    assert LocallyConnectedNet().layer_params() == [31_360, 227_360, 295_936, 650]
    assert FullyConnectedNet().layer_params() == [2_461_760, 4_918_816, 1_606_656, 650]
    assert ConvNet(head="flatten").layer_params()[-1] == 10_250
    sides, channels = ConvNet().map_sizes(), (1, 16, 32, 64)
    macs = [conv_macs((s, s), (3, 3), c_in, c_out) for s, c_in, c_out in
            zip(sides[1:], channels[:-1], channels[1:], strict=True)]  # fmt: skip
    assert macs == [28_224, 225_792, 294_912]


def test_an_unknown_head_is_refused():
    with pytest.raises(ConfigError, match="head='gap'"):
        shapes(ConvNet(head="gap", **TINY), 12)


def test_the_notes_dense_layers():
    assert shift.dense_weights(32, 32, 3) == 3_072
    assert shift.dense_weights(200, 200, 3) == 120_000
    assert shift.dense_weights(1000, 1000, 1, neurons=1000) == 1_000_000_000


def test_shift_images_moves_content_and_fills_zeros():
    images = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3, 1)
    right = shift.shift_images(images, 0, 1)[0, :, :, 0]
    assert right.tolist() == [[0, 1, 2], [0, 4, 5], [0, 7, 8]]
    up_left = shift.shift_images(images, -1, -2)[0, :, :, 0]
    assert up_left.tolist() == [[6, 0, 0], [9, 0, 0], [0, 0, 0]]
    assert shift.shift_images(images, 3, 0).sum() == 0
    assert shift.shift_images(images, 0, 0).tolist() == images.tolist()


def test_shared_weights_are_equivariant_unshared_are_not():
    """A 2-pixel shift of the input moves a stride-2 conv's map by one unit, exactly away from
    the borders; a locally connected layer's map does not follow."""
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
    nets = [cls(input_size=16, features=(4,)) for cls in (ConvNet, LocallyConnectedNet)]
    conv_error, local_error = (shift.equivariance_error(n, init(n, 16), x) for n in nets)
    assert conv_error < 1e-5
    assert local_error > 0.3


def test_feature_maps_of_a_locally_connected_net():
    """cnnjax.probe (and so cnnjax.visualize) draws ConvLocal layers' maps as it draws convs'."""
    net = LocallyConnectedNet(**TINY)
    x = jnp.zeros((1, 12, 12, 1))
    maps, stages = probe.feature_maps(net, init(net, 12), x)
    assert {k: v.shape for k, v in maps.items()} == {
        "layer1": (1, 6, 6, 2),
        "layer2": (1, 3, 3, 3),
    }
    assert stages == {"layer1": "ConvLocal → ReLU", "layer2": "ConvLocal → ReLU"}
