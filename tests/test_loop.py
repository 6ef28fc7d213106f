"""The loop's parts on their own: the progress a checkpoint records, the metrics window with its
NaN check, and the settings' epoch arithmetic (the loop itself runs in test_train and
test_checkpoint)."""

import jax.numpy as jnp
import pytest

from cnnjax import loop


def _settings(**kw) -> loop.Settings:
    base = dict(
        total_steps=20, steps_per_epoch=8, batch_size=4, eval_batch_size=4, eval_every=1,
        log_every=5, checkpoint_every=10, seed=0, learning_rate=0.1, schedule=lambda s: 0.1,
    )  # fmt: skip
    return loop.Settings(**(base | kw))


def test_progress_is_the_checkpoints_json_and_back():
    fresh = loop.Progress()
    assert fresh.meta(0) == {
        "step": 0, "best_test_accuracy": -1.0, "best_epoch": None, "test": None,
    }  # fmt: skip
    full = loop.Progress(
        best_test_accuracy=0.9, best_epoch=2, test={"loss": 0.3, "accuracy": 0.9},
        reached_target={"accuracy": 0.9, "step": 16, "epoch": 2.0, "train_wall_s": 1.5},
        pending=[{"loss": 0.2, "accuracy": 1.0}],
    )  # fmt: skip
    meta = full.meta(17)
    assert set(meta) == {"step", "best_test_accuracy", "best_epoch", "test", "reached_target",
                         "pending"}  # fmt: skip
    assert loop.Progress.from_meta(meta) == (17, full)
    assert loop.Progress.from_meta(fresh.meta(3)) == (3, fresh)


def test_the_metrics_window_averages_and_stops_on_a_non_finite_loss():
    window = loop.MetricsWindow(carried=[{"loss": 1.0, "accuracy": 0.0}])  # saved by a signal
    window.add({"loss": jnp.float32(3.0), "accuracy": jnp.float32(0.5)}, images=4)
    row, rate = window.close(step=2)
    assert row == {"loss": 2.0, "accuracy": 0.25} and rate > 0
    assert window.pending == [] and window.images == 0  # a new window
    window.add({"loss": jnp.float32(jnp.nan), "accuracy": jnp.float32(0.5)}, images=4)
    window.add({"loss": jnp.float32(1.0), "accuracy": jnp.float32(0.5)}, images=4)
    with pytest.raises(ArithmeticError, match="the mean loss of steps 3-4 is nan"):
        window.close(step=4)


def test_a_window_without_images_has_no_rate():
    window = loop.MetricsWindow(carried=[])
    window.add({"loss": jnp.float32(1.0), "accuracy": jnp.float32(1.0)}, images=0)  # compiling
    assert window.close(step=1) == ({"loss": 1.0, "accuracy": 1.0}, None)


def test_epochs_are_fractional_steps():
    s = _settings()
    assert (s.epoch(8), s.epoch(12), s.epoch(20)) == (1.0, 1.5, 2.5)


def test_progress_keeps_the_best_and_the_first_evaluation_at_the_target():
    p = loop.Progress()
    at = lambda step: {"step": step, "epoch": step / 8, "train_wall_s": float(step)}  # noqa: E731
    p.record_test({"loss": 1.0, "accuracy": 0.5}, 1, 0.8, at(8))
    assert (p.best_test_accuracy, p.best_epoch, p.reached_target) == (0.5, 1, None)
    assert p.target_fields(0.8) == {
        "target_accuracy": 0.8, "reached_target": False, "target_step": None,
        "target_epoch": None, "target_train_wall_s": None,
    }  # fmt: skip
    p.record_test({"loss": 0.4, "accuracy": 0.85}, 2, 0.8, at(16))
    p.record_test({"loss": 0.5, "accuracy": 0.7}, 3, 0.8, at(24))  # (a loop stops before it)
    p.record_test({"loss": 0.3, "accuracy": 0.9}, 4, 0.8, at(32))
    assert (p.best_test_accuracy, p.best_epoch, p.test["accuracy"]) == (0.9, 4, 0.9)
    assert p.reached_target == {"accuracy": 0.85, **at(16)}  # the first evaluation at the target
    assert p.target_fields(None) == {}


def test_a_resumed_run_forgets_a_target_below_its_own():
    reached = {"accuracy": 0.85, "step": 16, "epoch": 2.0, "train_wall_s": 3.0}
    for target, kept in ((0.8, True), (0.85, True), (0.9, False), (None, False)):
        p = loop.Progress(reached_target=dict(reached))
        p.retarget(target)
        assert (p.reached_target is not None) == kept, target


def test_the_clock_reports_compile_time_and_the_median_throughput():
    clock = loop.Clock(compile_s=1.234, rates=[100.0, 300.0, 200.0])
    fields = clock.fields()
    assert (fields["compile_s"], fields["images_per_s"]) == (1.23, 200.0)
    assert fields["train_wall_s"] >= 0
    assert loop.Clock().fields()["images_per_s"] is None


def test_a_model_field_added_since_counts_at_its_default():
    """A run recorded before BlockNet had `dilation` resumes (and loads) at dilation 1, its
    implicit value then; any other value, or any other missing key, is a difference."""
    recorded = {"model._target_": "cnnjax.models.blocknet.BlockNet", "model.padding": 1}
    current = recorded | {"model.dilation": 1}
    assert loop.differences(recorded, current) == []
    assert loop.differences(recorded, current | {"model.dilation": 2}) == [
        "model.dilation: 2 here, 1 there"
    ]
    assert loop.differences(recorded | {"x": 1}, current) == ["x: '(unset)' here, 1 there"]
    unknown = {"model._target_": "nowhere.Model"}
    assert loop.differences(unknown, unknown | {"model.k": 1}) == [
        "model.k: 1 here, '(unset)' there"
    ]
