"""The training-memory planner against the real parameter and optimizer-state pytrees and the
compiled training step's own count (XLA's memory_analysis)."""

import jax
import pytest
from helpers import compose_config
from hydra.utils import instantiate

from cnnjax import models
from cnnjax.analysis import memory


def _model(name: str):
    return instantiate(compose_config("summary", f"model={name}").model)


def test_plan_parts_against_the_pytrees():
    model = _model("mnist_allconv")
    sgd, adam = (memory.plan(model, models.input_shape(model), o) for o in ("sgd", "adam"))
    assert sgd.params == sgd.gradients == 33_058 * 4
    assert sgd.optimizer_state == 33_058 * 4  # momentum: one value per parameter
    assert adam.optimizer_state == 2 * 33_058 * 4 + 4  # two moments and the step count
    assert sgd.input_per_image == 28 * 28 + 4  # uint8 image, int32 label
    assert sgd.activations_per_image > 0


def test_bf16_halves_what_the_backward_pass_keeps():
    model = _model("lenet5")
    fp32, bf16 = (memory.plan(model, (1, 32, 32, 3), "sgd", p) for p in ("fp32", "bf16"))
    assert bf16.compute_copy == fp32.params // 2  # a bf16 copy of the parameters
    assert 0.5 <= bf16.activations_per_image / fp32.activations_per_image < 0.6


def test_largest_batch_fits_and_one_more_does_not():
    step = memory.plan(_model("vgg11_small"), (1, 32, 32, 1), "adam")
    budget = 0.25 * memory.GIB
    batch = step.largest_batch(budget)
    assert batch > 0 and step.total(batch) <= budget < step.total(batch + 1)
    assert memory.plan(_model("vgg11_small"), (1, 32, 32, 1)).largest_batch(1024) == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["mnist_allconv", "lenet5"])
def test_estimate_against_the_compiled_step(name, optimizer):
    """The README's tolerance: XLA:CPU's buffers for the compiled training step are 0.8 to 1.4
    times the estimate (XLA adds working buffers and keeps some values the plan does not)."""
    model = _model(name)
    shape = models.input_shape(model, 64)
    check = memory.compare_with_xla(model, shape, memory.plan(model, shape, optimizer))
    assert 0.8 <= check["ratio"] <= 1.4, check
    jax.clear_caches()
