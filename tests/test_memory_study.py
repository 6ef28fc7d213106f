"""experiments/memory: the notes' two chains (001), their sizes, parameters and receptive fields
against the notes and the formulas, the bytes of each layer's output, and the largest batch
against the planner's arithmetic. Nothing is compiled."""

import importlib.util
import math
from pathlib import Path

from cnnjax.analysis import memory
from cnnjax.models.blocknet import BlockNet

MEMORY_PY = Path(__file__).parents[1] / "experiments" / "memory" / "memory.py"
_spec = importlib.util.spec_from_file_location("memory_study", MEMORY_PY)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def convs(name: str) -> list:
    return [r for r in study.memory_rows(study.chain(name)) if r.type == "Conv"][:-1]  # no head


def rows_by_type(name: str, *types: str) -> list:
    return [r for r in study.memory_rows(study.chain(name)) if r.type in types]


def test_the_growing_channels_table():
    """28 -> 26 ... 18 with 32 ... 512 channels; the notes' "992 images" are channel maps."""
    rows = convs("growing_28")
    assert [r.output_shape[1:] for r in rows] == [
        (26, 26, 32),
        (24, 24, 64),
        (22, 22, 128),
        (20, 20, 256),
        (18, 18, 512),
    ]
    assert [r.params for r in rows] == [320, 18_496, 73_856, 295_168, 1_180_160]
    channels = [(1, 32), (32, 64), (64, 128), (128, 256), (256, 512)]
    assert [r.params for r in rows] == [(3 * 3 * c_in + 1) * c_out for c_in, c_out in channels]
    assert sum(r.output_shape[-1] for r in rows) == 992
    assert [r.rf[0] for r in rows] == [3, 5, 7, 9, 11]
    assert sum(study.activation_bytes(r) for r in rows) == 1_554_944  # 388,736 values x 4


def test_activation_bytes_are_h_w_c_times_4():
    for row in study.memory_rows(study.chain("growing_28")):
        assert study.activation_bytes(row) == math.prod(row.output_shape[1:]) * 4, row.name
    assert study.activation_bytes(convs("growing_28")[-1]) == 18 * 18 * 512 * 4 == 663_552


def test_the_400_chain_sizes_parameters_and_receptive_fields():
    """The notes' sizes hold (398 ... 390, 195, 193 ... 187, 93, 91); their receptive fields
    double at the pool (22) and grow by 2 after it; pooling adds (k - 1) x jump instead."""
    rows = rows_by_type("blocks_400", "Conv", "MaxPool")[:-1]  # up to block3_conv1
    sides = [398, 396, 394, 392, 390, 195, 195, 193, 191, 189, 187, 93, 93, 91]
    channels = [32, 64, 128, 256, 512, 512, 32, 64, 128, 256, 512, 512, 32, 64]
    assert [r.output_shape[1] for r in rows] == sides
    assert [r.output_shape[-1] for r in rows] == channels
    assert [r.rf[0] for r in rows] == [3, 5, 7, 9, 11, 12, 12, 16, 20, 24, 28, 30, 30, 38]
    assert [r.jump[0] for r in rows] == [1] * 5 + [2] * 6 + [4] * 3
    c_in = [3, 32, 64, 128, 256, 512, 512, 32, 64, 128, 256, 512, 512, 32]
    for row, c in zip(rows, c_in, strict=True):
        k = row.kernel[0]
        assert row.params == (
            0 if row.type == "MaxPool" else (k * k * c + 1) * row.output_shape[-1]
        )
    squeeze = {r.name: r.params for r in rows}["transition1_conv"]
    assert squeeze == (512 + 1) * 32 == 16_416
    total = sum(study.activation_bytes(r) for r in study.memory_rows(study.chain("blocks_400")))
    assert total == 849_176_848


def test_largest_batches_follow_the_planner_arithmetic():
    model = BlockNet(blocks=[[4, 8]], input_size=12, padding=0)
    step = memory.plan(model, (1, 12, 12, 1), "sgd", "fp32")
    params = 4 * ((9 * 1 + 1) * 4 + (9 * 4 + 1) * 8 + (8 + 1) * 10)
    assert step.fixed == 3 * params  # parameters, gradients, momentum
    assert step.input_per_image == 12 * 12 + 4
    budgets_gb = [1e-4, 5e-4, 1e-3]
    expected = [int((gb * 1024**3 - 3 * params) // step.per_image) for gb in budgets_gb]
    assert study.largest_batches(step, budgets_gb) == expected
    assert all(b > 0 for b in expected) and expected == sorted(expected)
    for gb, batch in zip(budgets_gb, expected, strict=True):
        assert step.total(batch) <= gb * 1024**3 < step.total(batch + 1)
    assert study.largest_batches(step, [1e-6]) == [0]  # not even the parameters


def test_the_400_chain_largest_batches():
    """The README's headline: 4, 9 and 47 images in 8, 16 and 80 GB (SGD, fp32)."""
    step = memory.plan(study.chain("blocks_400"), (1, 400, 400, 3), "sgd", "fp32")
    assert study.largest_batches(step) == [4, 9, 47]
